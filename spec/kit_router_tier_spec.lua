-- examples/router_tier.lua under luaproxy.test: keys sharded over routers on a consistent-hash
-- ring, the tier's own 400 without a key, a router that goes away (its keys move, no request
-- fails, the others' keys stay) and comes back (its keys return, after probes that expect a
-- router's own 400), bodies sent again on a retry, admin 403. The routers are fakes that answer
-- as api_router does: 400 without a key.
local luaproxy = require "luaproxy"
local t = require "luaproxy.test"

local json = luaproxy.json
local POLICY = "examples/router_tier.lua"
local R = { "127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083" }
local CHECK = { path = "/", interval = 2, timeout = 1, fall = 2, rise = 2, valid_statuses = { 400 } }

local function decode_form(body)
    return body:match("apiKey=([^&]*)")
end

-- Fake routers: down[addr] refuses connections; otherwise "<addr> <key>", or their own 400.
local function routers(down)
    local ups = {}
    for _, addr in ipairs(R) do
        ups[addr] = t.upstream(addr, function(req)
            if down[addr] then return { fail = "refused" } end
            local key = decode_form(req.body) or req.query.apiKey or req.headers["x-api-key"]
            if not key then return 400, "Request is missing apiKey param.\n" end
            return 200, addr .. " " .. key .. " " .. #req.body
        end)
    end
    return ups
end

local function router_of(app, key)
    local res = app:request{ path = "/classify", query = { apiKey = key } }
    assert.are.equal(200, res.status, res.body)
    return (res.body:match("^(%S+)"))
end

describe("examples/router_tier.lua (kit)", function()
    after_each(function() t.reset() end)

    it("answers a request without a key itself with 400; no router sees it", function()
        local ups = routers({})
        local app = assert(t.load(POLICY, { backends = R }))
        local res = app:request{ path = "/classify" }
        assert.are.equal(400, res.status)
        assert.are.equal("Request is missing apiKey param.\n", res.body)
        for _, addr in ipairs(R) do assert.are.equal(0, #ups[addr].requests) end
        assert.are.equal(403, app:request{ path = "/admin/backends/", remote_addr = "192.168.1.9" }.status)
    end)

    it("sends each key to its router on the ring, whatever its source; keys spread over all routers", function()
        routers({})
        local app = assert(t.load(POLICY, { backends = R }))
        local where, used = {}, {}
        for i = 1, 30 do
            local key = "k-" .. i
            where[key] = router_of(app, key)
            used[where[key]] = (used[where[key]] or 0) + 1
        end
        for _, addr in ipairs(R) do assert.is_true((used[addr] or 0) > 0, addr .. " got no key") end
        for i = 1, 30, 7 do
            local key = "k-" .. i
            assert.are.equal(where[key], router_of(app, key))
            local h = app:request{ path = "/x", headers = { ["X-Api-Key"] = key } }
            assert.are.equal(where[key], h.body:match("^(%S+)"))
            local f = app:request{ method = "POST", path = "/x", body = "apiKey=" .. key .. "&text=hi",
                headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } }
            assert.are.equal(where[key], f.body:match("^(%S+)"))
        end
    end)

    it("a router down: its keys move at once (bodies sent again), the others' stay; back, its keys return", function()
        local down = {}
        local ups = routers(down)
        local app = assert(t.load(POLICY, { backends = R, health_check = CHECK }))
        local where = {}
        for i = 1, 30 do where["k-" .. i] = router_of(app, "k-" .. i) end
        local gone = R[2]
        down[gone] = true
        for i = 1, 30 do
            local key = "k-" .. i
            local res = app:request{ method = "POST", path = "/classify", body = "apiKey=" .. key .. "&text=abc",
                headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } }
            assert.are.equal(200, res.status, "no request fails")
            local now_at = res.body:match("^(%S+)")
            if where[key] == gone then
                assert.are_not.equal(gone, now_at)
                assert.matches(" " .. #("apiKey=" .. key .. "&text=abc") .. "$", res.body, 1)
            else
                assert.are.equal(where[key], now_at, key .. " stayed")
            end
        end
        assert.is_truthy(app:log_text():find("upstream " .. gone .. " failed (connection refused), trying", 1, true))
        -- probes (every 2 s, expecting 400) see it down; when it answers again, rise = 2 brings it back
        t.clock:advance(4)
        assert.are.equal("down", json.decode(app:request{ path = "/admin/backends/" }.body).health[gone].state)
        down[gone] = nil
        t.clock:advance(4)
        for i = 1, 30 do assert.are.equal(where["k-" .. i], router_of(app, "k-" .. i)) end
        local probes = 0
        for _, r in ipairs(ups[R[1]].requests) do
            if r.path == "/" and not r.query.apiKey then probes = probes + 1 end
        end
        assert.are.equal(5, probes, "a probe at 0, 2, 4, 6 and 8")
    end)

    it("every router down is 503 at once; a timeout is 504", function()
        local down = { [R[1]] = true, [R[2]] = true, [R[3]] = true }
        routers(down)
        local app = assert(t.load(POLICY, { backends = R, health_check = CHECK }))
        t.clock:advance(2)
        local res = app:request{ path = "/", query = { apiKey = "k" } }
        assert.are.equal(503, res.status)
        assert.is_truthy(app:log_text():find("no router for key k: no backend up", 1, true))
        t.upstream(R[1], function(req)
            if not req.query.apiKey then return 400, "no key\n" end
            return { delay = 600, body = "late" }
        end)
        t.clock:advance(4)
        local t0 = luaproxy.now()
        res = app:request{ path = "/", query = { apiKey = "k" } }
        assert.are.equal(504, res.status)
        assert.are.equal(60, luaproxy.now() - t0)
    end)
end)
