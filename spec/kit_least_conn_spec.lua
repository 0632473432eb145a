-- examples/least_conn.lua under luaproxy.test: least-connection spread, the API key rule,
-- the admin endpoints (and their 403), failures as 502/503/504, and counts that come back
-- down however a request ends. Fake upstreams, virtual time: no socket, no waiting.
local luaproxy = require "luaproxy"
local t = require "luaproxy.test"

local json = luaproxy.json
local POLICY = "examples/least_conn.lua"
local A, B = "127.0.0.1:9001", "127.0.0.1:9002"

-- A fake upstream answering "<name> <path>" after `delay` (virtual) seconds.
local function backend(addr, delay)
    return t.upstream(addr, function(req)
        return { status = 200, body = addr .. " " .. req.path, delay = delay }
    end)
end

local function inflight(app)
    local res = app:request{ path = "/admin/backends/" }
    assert.are.equal(200, res.status)
    return json.decode(res.body).inflight
end

describe("examples/least_conn.lua (kit)", function()
    after_each(function() t.reset() end)

    it("sends each request to the backend with the fewest in flight, counted until it ends", function()
        local slow, fast = backend(A, 50), backend(B, 1)
        local app = assert(t.load(POLICY, { backends = { A, B } }))
        -- the first request holds A for 50 s; the others, 2 s apart, find B idle each time
        local reqs = { { path = "/0" } }
        for i = 1, 6 do reqs[#reqs + 1] = { path = "/" .. i, at = i * 2 } end
        reqs[#reqs + 1] = { path = "/admin/backends/", at = 40 }
        local out = app:requests(reqs)
        assert.are.equal(A .. " /0", out[1].body)
        for i = 2, 7 do assert.are.equal(B .. " /" .. (i - 1), out[i].body) end
        assert.are.same({ [A] = 1, [B] = 0 }, json.decode(out[8].body).inflight)
        assert.are.equal(1, #slow.requests)
        assert.are.equal(6, #fast.requests)
        assert.are.same({ [A] = 0, [B] = 0 }, inflight(app))

        -- all at once (nothing has ended yet): an even spread
        local burst = {}
        for i = 1, 10 do burst[i] = { path = "/b" .. i } end
        for _, r in ipairs(app:requests(burst)) do assert.are.equal(200, r.status) end
        assert.are.equal(6, #slow.requests)
        assert.are.equal(11, #fast.requests)
    end)

    it("with api_key_header, a request without the header gets 400 and nothing goes upstream", function()
        local up = backend(A, 0)
        local app = assert(t.load(POLICY, { backends = { A }, api_key_header = "X-Api-Key" }))
        local res = app:request{ path = "/x" }
        assert.are.equal(400, res.status)
        assert.are.equal("Request is missing X-Api-Key header.\n", res.body)
        assert.are.equal(0, #up.requests)
        res = app:request{ path = "/x", headers = { ["X-Api-Key"] = "k1" } }
        assert.are.equal(200, res.status)
        assert.are.equal("k1", up.requests[1].headers["x-api-key"])
    end)

    it("admin: from 127.0.0.1 the list and counts, set_backends replaces it; 403 from anywhere else", function()
        local up_a, up_b = backend(A, 0), backend(B, 0)
        local app = assert(t.load(POLICY, { backends = { A } }))
        local res = app:request{ path = "/admin/backends/", remote_addr = "10.0.0.7" }
        assert.are.equal(403, res.status)
        assert.are.same({ error = "admin endpoints are only open to 127.0.0.1" }, json.decode(res.body))
        res = app:request{ method = "POST", path = "/admin/set_backends/", body = json.encode({ B }),
            remote_addr = "127.0.0.2" }
        assert.are.equal(403, res.status)
        assert.are.equal(403, app:request{ path = "/%61dmin/backends/", remote_addr = "10.0.0.7" }.status)
        assert.is_truthy(app:log_text():find("admin request from 10.0.0.7 refused", 1, true))

        assert.are.same({ backends = { A }, inflight = { [A] = 0 } },
            json.decode(app:request{ path = "/admin/backends/" }.body))
        res = app:request{ method = "POST", path = "/admin/set_backends/", body = "[not json" }
        assert.are.equal(400, res.status)
        res = app:request{ method = "POST", path = "/admin/set_backends/", body = { B } }
        assert.are.equal(200, res.status)
        assert.are.same({ backends = { B } }, json.decode(res.body))
        for i = 1, 3 do assert.are.equal(B .. " /" .. i, app:request{ path = "/" .. i }.body) end
        assert.are.equal(0, #up_a.requests)
        assert.are.equal(3, #up_b.requests)
    end)

    it("refused -> 502, upstream timeout -> 504 at proxy_read_timeout, no backends -> 503; counts back to 0", function()
        local mode = "refused"
        t.upstream(A, function() return { fail = mode } end)
        local app = assert(t.load(POLICY, { backends = { A }, proxy_read_timeout = "30s" }))
        local res = app:request{ path = "/r" }
        assert.are.equal(502, res.status)
        assert.are.equal("502 Bad Gateway\n", res.body)
        mode = "timeout"
        local t0 = luaproxy.now()
        res = app:request{ path = "/t" }
        assert.are.equal(504, res.status)
        assert.are.equal(30, luaproxy.now() - t0)
        mode = "reset"
        assert.are.equal(502, app:request{ path = "/x" }.status)
        assert.are.same({ [A] = 0 }, inflight(app))
        local errors = app:logs("error")
        assert.matches("upstream 127.0.0.1:9001 failed: connection refused", errors[1].message, 1, true)
        assert.matches("upstream 127.0.0.1:9001 failed: timeout", errors[2].message, 1, true)

        assert.are.equal(200, app:request{ method = "POST", path = "/admin/set_backends/", body = "[]" }.status)
        res = app:request{ path = "/none" }
        assert.are.equal(503, res.status)
        assert.is_truthy(app:log_text():find("no backend for /none: no backends", 1, true))
    end)

    it("a request whose body is cut short by its upstream closes with what came, and still releases its count", function()
        t.upstream(A, function() return { body = ("x"):rep(100), fail = "truncated" } end)
        local app = assert(t.load(POLICY, { backends = { A } }))
        local res = app:request{ path = "/cut" }
        assert.are.equal(200, res.status)
        assert.are.equal(("x"):rep(50), res.body)
        assert.matches("before the body ended", res.error)
        assert.are.same({ [A] = 0 }, inflight(app))
    end)
end)
