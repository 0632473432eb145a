-- examples/api_router.lua under luaproxy.test: the API key rule (400 and nothing upstream),
-- its three sources, per-key usage, the rate limit (429, and its window on the virtual
-- clock), active health checks every 2 s and passive ejection for fail_timeout, admin 403,
-- and failures as 502/503/504. The same checks spec/api_router_spec.lua makes against real
-- processes take tens of seconds there; here none waits.
local luaproxy = require "luaproxy"
local t = require "luaproxy.test"

local json = luaproxy.json
local POLICY = "examples/api_router.lua"
local A, B = "127.0.0.1:9001", "127.0.0.1:9002"

-- Fake backends: `state[addr]` says how each answers ("ok", "sick": 500 on /health,
-- "refused", "slow": after 100 s).
local function backends(state)
    local ups = {}
    for _, addr in ipairs({ A, B }) do
        state[addr] = state[addr] or "ok"
        ups[addr] = t.upstream(addr, function(req)
            local s = state[addr]
            if s == "refused" then return { fail = "refused" } end
            if req.path == "/health" then return s == "sick" and 500 or 200, "health" end
            if s == "slow" then return { body = "late", delay = 100 } end
            return 200, addr .. " " .. req.method .. " " .. req.target .. " " .. #req.body
        end)
    end
    return ups
end

local function count(up, path)
    local n = 0
    for _, r in ipairs(up.requests) do
        if path == nil or r.path == path then n = n + 1 end
    end
    return n
end

describe("examples/api_router.lua (kit)", function()
    after_each(function() t.reset() end)

    it("a request without an API key gets 400 with the original's text, and nothing goes upstream", function()
        local ups = backends({})
        local app = assert(t.load(POLICY, { backends = { A, B } }))
        for _, r in ipairs({
            { path = "/classify" },
            { path = "/classify", query = { apiKey = "" } },
            { method = "POST", path = "/classify", body = "text=hello",
              headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } },
            { path = "/classify", headers = { ["X-Other"] = "k" } },
        }) do
            local res = app:request(r)
            assert.are.equal(400, res.status)
            assert.are.equal("Request is missing apiKey param.\n", res.body)
        end
        local long = app:request{ path = "/", query = { apiKey = ("k"):rep(300) } }
        assert.are.equal(400, long.status)
        assert.are.equal("apiKey param is too long.\n", long.body)
        assert.are.equal(0, #ups[A].requests + #ups[B].requests)
    end)

    it("takes the key from a form body, else the query, else X-Api-Key; counts each key's requests", function()
        local ups = backends({})
        local app = assert(t.load(POLICY, { backends = { A, B } }))
        local form = "text=caf%C3%A9+%26+cr%C3%A8me&apiKey=k-123"
        local res = app:request{ method = "POST", path = "/classify", body = form, query = { apiKey = "k-q" },
            headers = { ["Content-Type"] = "application/x-www-form-urlencoded", ["X-Api-Key"] = "k-h" } }
        assert.are.equal(200, res.status)
        assert.matches(" POST /classify%?apiKey=k%-q " .. #form .. "$", res.body)
        -- the form went upstream byte for byte, with its Content-Length
        local got
        for _, up in pairs(ups) do got = got or up.requests[1] end
        assert.are.equal(form, got.body)
        assert.are.equal(tostring(#form), got.headers["content-length"])
        assert.are.equal(200, app:request{ path = "/", query = { apiKey = "k-q" } }.status)
        assert.are.equal(200, app:request{ path = "/", headers = { ["X-Api-Key"] = "k-h" } }.status)
        assert.are.equal(200, app:request{ path = "/", headers = { ["X-Api-Key"] = "k-h" } }.status)
        local usage = json.decode(app:request{ path = "/admin/usage/" }.body)
        assert.are.same({ ["k-123"] = 1, ["k-q"] = 1, ["k-h"] = 2 }, usage)
        assert.are.equal(403, app:request{ path = "/admin/usage/", remote_addr = "127.0.0.2" }.status)
    end)

    it("rate_limit: 429 with Retry-After past rate + burst, back after the window (virtual seconds)", function()
        local ups = backends({})
        local app = assert(t.load(POLICY, { backends = { A, B }, rate_limit = { rate = 5, burst = 10 } }))
        local codes = {}
        for i = 1, 12 do
            codes[i] = app:request{ path = "/", headers = { ["X-Api-Key"] = "k-789" } }.status
        end
        assert.are.same({ 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 429 }, codes)
        local res = app:request{ path = "/", headers = { ["X-Api-Key"] = "k-789" } }
        assert.are.equal(429, res.status)
        assert.are.equal("1", res.headers["retry-after"])
        -- another key has its own budget
        assert.are.equal(200, app:request{ path = "/", headers = { ["X-Api-Key"] = "k-other" } }.status)
        t.clock:advance(0.2) -- one request's worth at 5/s
        assert.are.equal(200, app:request{ path = "/", headers = { ["X-Api-Key"] = "k-789" } }.status)
        assert.are.equal(429, app:request{ path = "/", headers = { ["X-Api-Key"] = "k-789" } }.status)
        t.clock:advance(2)
        for _ = 1, 10 do
            assert.are.equal(200, app:request{ path = "/", headers = { ["X-Api-Key"] = "k-789" } }.status)
        end
        -- limited requests were not counted, nor sent
        local usage = json.decode(app:request{ path = "/admin/usage/" }.body)
        assert.are.same({ ["k-789"] = 22, ["k-other"] = 1 }, usage)
        assert.are.equal(23, count(ups[A]) + count(ups[B]))
    end)

    it("health: probes every 2 s take a sick backend out after fall = 3 and back after rise = 2", function()
        local state = {}
        local ups = backends(state)
        local app = assert(t.load(POLICY, { backends = { A, B },
            health_check = { path = "/health", interval = 2, timeout = 1, fall = 3, rise = 2 } }))
        assert.are.equal(1, count(ups[A], "/health"), "a first round as the checker starts")
        state[B] = "sick"
        t.clock:advance(4) -- probes at 2 and 4 fail: two of three
        assert.is_true(json.decode(app:request{ path = "/admin/backends/" }.body).health[B].up)
        t.clock:advance(2)
        local view = json.decode(app:request{ path = "/admin/backends/" }.body)
        assert.are.equal("down", view.health[B].state)
        for i = 1, 6 do
            assert.matches("^" .. A, app:request{ path = "/" .. i, query = { apiKey = "k" } }.body)
        end
        assert.are.equal(0, count(ups[B], "/1"))
        assert.is_truthy(app:log_text():find("backend 127.0.0.1:9002 is down: 3 failed probes", 1, true))
        state[B] = "ok"
        t.clock:advance(2)
        assert.are.equal("down", json.decode(app:request{ path = "/admin/backends/" }.body).health[B].state)
        t.clock:advance(2)
        assert.is_true(json.decode(app:request{ path = "/admin/backends/" }.body).health[B].up)
        local seen = {}
        for i = 1, 4 do
            seen[app:request{ path = "/", query = { apiKey = "k" } }.body:match("^(%S+)")] = true
        end
        assert.is_true(seen[A] and seen[B])
        assert.are.equal(6, count(ups[A], "/health"), "probes at 0, 2, 4, 6, 8 and 10")
    end)

    it("passive: a refused connection is retried on the other backend, which serves alone for fail_timeout", function()
        local state = {}
        local ups = backends(state)
        local app = assert(t.load(POLICY, { backends = { A, B }, max_fails = 1, fail_timeout = 10 }))
        state[B] = "refused"
        for i = 1, 4 do
            local res = app:request{ method = "POST", path = "/f" .. i, body = "apiKey=k&x=" .. i,
                headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } }
            assert.are.equal(200, res.status)
            assert.matches("^" .. A, res.body)
        end
        assert.is_truthy(app:log_text():find("upstream 127.0.0.1:9002 failed (connection refused), trying 127.0.0.1:9001", 1, true))
        assert.is_truthy(app:log_text():find("backend 127.0.0.1:9002 is down: 1 failures within 10 s", 1, true))
        assert.are.equal(4, count(ups[A]))
        state[B] = "ok"
        t.clock:advance(9)
        assert.are.equal("ejected", json.decode(app:request{ path = "/admin/backends/" }.body).health[B].state)
        t.clock:advance(1)
        local seen = {}
        for _ = 1, 4 do
            seen[app:request{ path = "/", query = { apiKey = "k" } }.body:match("^(%S+)")] = true
        end
        assert.is_true(seen[B], "back after fail_timeout")
    end)

    it("every backend down is 503 at once; a backend that never answers is 504 at proxy_read_timeout", function()
        local state = { [A] = "sick", [B] = "sick" }
        backends(state)
        local app = assert(t.load(POLICY, { backends = { A, B }, proxy_read_timeout = "20s",
            health_check = { path = "/health", interval = 1, fall = 1, rise = 1 } }))
        local t0 = luaproxy.now()
        local res = app:request{ path = "/", query = { apiKey = "k" } }
        assert.are.equal(503, res.status)
        assert.are.equal(t0, luaproxy.now())
        assert.is_truthy(app:log_text():find("no backend for /?apiKey=k: no backend up", 1, true))
        state[A], state[B] = "slow", "slow"
        t.clock:advance(1)
        res = app:request{ path = "/", query = { apiKey = "k" } }
        assert.are.equal(504, res.status)
        assert.are.equal(21, luaproxy.now() - t0)
    end)

    it("logs the original's info line and its access log format, with the key", function()
        backends({})
        local app = assert(t.load(POLICY, { backends = { A }, log_level = "info",
            access_log = "/nonexistent/access.log", log_format = "router" }))
        app:request{ path = "/x", headers = { ["X-Api-Key"] = "k-1" } }
        app:request{ path = "/x" }
        assert.is_truthy(app:log_text():find("processing request from k-1", 1, true))
        local access = app:logs("access")
        assert.are.equal(2, #access)
        assert.matches('^127%.0%.0%.1 "k%-1" %[.-%] "GET /x HTTP/1%.1" %d+ 200 %d+ 127%.0%.0%.1:9001 ', access[1].line)
        assert.matches('^127%.0%.0%.1 "%-" %[.-%] "GET /x HTTP/1%.1" %d+ 400 %d+ %- ', access[2].line)
        local phase = app:logs("log")
        assert.are.equal("k-1", phase[1].ctx.api_key)
        assert.are.equal(A, phase[1].info.upstream_addr)
    end)
end)
