-- examples/least_conn_lock.lua under luaproxy.test: the per-backend map kept under
-- luaproxy.lock counts every request in flight, spreads concurrent ones evenly, and comes back
-- to 0 however requests end (response, handler error, refused or timed-out upstream), within
-- the reaper's 0.5 s: virtual seconds here. The policy is the example with /boom added (a
-- handler error after its backend was taken), as in spec/least_conn_lock_spec.lua.
local luaproxy = require "luaproxy"
local t = require "luaproxy.test"

local json = luaproxy.json
local A, B = "127.0.0.1:9001", "127.0.0.1:9002"

local function policy()
    local example = dofile("examples/least_conn_lock.lua")
    return {
        init_worker = example.init_worker,
        handler = function(req)
            if req:get_path() == "/boom" then
                assert(example.take(req))
                error("boom after take")
            end
            return example.handler(req)
        end,
    }
end

local function view(app, at)
    local res = app:request{ path = "/admin/backends/", at = at }
    assert.are.equal(200, res.status)
    return json.decode(res.body)
end

describe("examples/least_conn_lock.lua (kit)", function()
    after_each(function() t.reset() end)

    it("counts 20 concurrent requests exactly (10 per backend) and settles to 0 once they end", function()
        local mode = "hold"
        local function answer(req)
            if mode == "hold" then return { body = req.path, delay = 10 } end
            return { fail = mode, body = "0123456789" }
        end
        local ups = { [A] = t.upstream(A, answer), [B] = t.upstream(B, answer) }
        local app = assert(t.load(policy(), { backends = { A, B } }))
        local reqs = {}
        for i = 1, 20 do reqs[i] = { path = "/" .. i } end
        reqs[21] = { path = "/admin/backends/", at = 5 }
        local out = app:requests(reqs)
        for i = 1, 20 do assert.are.equal(200, out[i].status) end
        local during = json.decode(out[21].body)
        assert.are.same({ [A] = 10, [B] = 10 }, during.inflight)
        assert.are.equal(20, during.holders)
        assert.are.equal(0, during.worker)
        assert.are.equal(10, #ups[A].requests)
        assert.are.equal(10, #ups[B].requests)
        t.clock:advance(0.5)
        local after = view(app)
        assert.are.same({ [A] = 0, [B] = 0 }, after.inflight)
        assert.are.equal(0, after.holders)

        -- however they end: a handler error after the take, refused, timed out, cut short
        local ends = {}
        for i = 1, 5 do ends[#ends + 1] = { path = "/boom" } end
        for _, m in ipairs({ "refused", "timeout", "truncated" }) do
            mode = m
            for _, r in ipairs(app:requests({ { path = "/x" }, { path = "/y" } })) do
                assert.are.equal(m == "timeout" and 504 or (m == "truncated" and 200 or 502), r.status, m)
            end
        end
        for _, r in ipairs(app:requests(ends)) do assert.are.equal(500, r.status) end
        t.clock:advance(0.5)
        after = view(app)
        assert.are.same({ [A] = 0, [B] = 0 }, after.inflight)
        assert.are.equal(0, after.holders)
        assert.is_truthy(app:log_text():find("boom after take", 1, true))
    end)

    it("admin view only from 127.0.0.1; no backends is 503", function()
        t.upstream(A, function() return 200, "a" end)
        local app = assert(t.load(policy(), { backends = { A } }))
        assert.are.equal(403, app:request{ path = "/admin/backends/", remote_addr = "10.9.8.7" }.status)
        assert.are.equal("a", app:request{ path = "/" }.body)
        t.reset()
        local empty = assert(t.load(policy(), { backends = {} }))
        local res = empty:request{ path = "/" }
        assert.are.equal(503, res.status)
        assert.is_truthy(empty:log_text():find("no backend for /: no backends", 1, true))
    end)
end)
