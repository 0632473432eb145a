-- luaproxy.health with luaproxy.balancer in a 2-worker policy server in front of two real
-- backends (luaproxy handler servers on 127.0.0.1 whose /health can be made to fail, and
-- which can be closed and reopened on the same port): one prober per interval, fall/rise,
-- passive max_fails/fail_timeout, never ejecting the last backend, 503 when all are down,
-- recovery, and retries that only follow connect failures.
local luaproxy = require "luaproxy"
local util = require "support.util"
local health = require "luaproxy.health"
local balancer = require "luaproxy.balancer"

local POLICY = util.write_temp("health_policy.lua", [[
    local luaproxy = require "luaproxy"
    local balancer = require "luaproxy.balancer"
    local health = require "luaproxy.health"
    local bal, hc, cfg
    return {
        init_worker = function(config)
            cfg = config
            hc = assert(health.new{ dict = config.hdict, backends = function() return bal:backends() end,
                check = config.check, max_fails = config.max_fails, fail_timeout = config.fail_timeout })
            bal = assert(balancer.new{ dict = config.bdict, backends = config.backends, health = hc })
            assert(hc:start())
        end,
        handler = function(req)
            if req:get_path() == "/status" then return 200, hc:status() end
            if req:get_header("x-replayable") then req:read_body() end
            local res, err = bal:proxy(req, { tries = cfg.tries, proxy = { read_timeout = cfg.read_timeout } })
            if not res then
                if err == "no backend up" or err == "no backends" then return 503, err end
                return err == "timeout" and 504 or 502, err
            end
            res:set_header("x-worker", tostring(luaproxy.worker.id()))
            return res
        end,
    }
]])

-- A backend named `name`; st.healthy (default true) decides /health's answer, st.probes and
-- st.hits count probes and other requests; /slow takes 1 s.
local function backend(name, st)
    st.probes, st.hits = st.probes or 0, st.hits or 0
    if st.healthy == nil then st.healthy = true end
    return function(req)
        if req:get_path() == "/health" then
            st.probes = st.probes + 1
            if st.healthy then return 200, "ok" end
            return 500, "sick"
        end
        st.hits = st.hits + 1
        if req:get_path() == "/slow" then luaproxy.sleep(1) end
        local body = req:read_body() or ""
        return 200, name .. " " .. #body
    end
end

local function open(name, st, port)
    return util.serve_handler(backend(name, st), port)
end

local shut = util.shut

local n = 0

-- fn(t) with the policy in 2 workers in front of backends b1 and b2; `config` adds to the
-- policy's config (check, max_fails, fail_timeout, tries, read_timeout).
local function with_policy(config, fn, seconds)
    n = n + 1
    local hdict, bdict = "health_spec_h" .. n, "health_spec_b" .. n
    return util.run(function()
        local t = { s1 = {}, s2 = {} }
        t.b1 = open("b1", t.s1)
        t.b2 = open("b2", t.s2)
        local cfg = { hdict = hdict, bdict = bdict, backends = { t.b1.addr, t.b2.addr } }
        for k, v in pairs(config) do cfg[k] = v end
        t.proxy = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = POLICY, workers = 2, config = cfg })
        t.url = "http://" .. t.proxy.addr
        t.a1, t.a2 = t.b1.addr, t.b2.addr
        -- the spec's own view of the shared state (same dicts as the workers')
        t.view = assert(health.new{ dict = hdict, backends = { t.a1, t.a2 } })
        t.bal = assert(balancer.new{ dict = bdict })
        -- make pick() prefer backend `addr` (the other one looks busy)
        function t.prefer(addr)
            local other = addr == t.a1 and t.a2 or t.a1
            t.bal.dict:set("conn:" .. addr, 0)
            t.bal.dict:set("conn:" .. other, 1000)
        end
        function t.state(addr) return t.view:status()[addr] end
        local ok, e = pcall(fn, t)
        t.proxy:close(0)
        t.proxy:wait()
        for _, b in ipairs({ t.b1, t.b2 }) do pcall(shut, b) end
        assert(ok, e)
    end, seconds or 30)
end

-- status, body (only: the lists compared below hold just these two)
local function get(t, path, opts)
    local status, body = util.get(t.url .. (path or "/"), opts)
    return status, body
end

describe("luaproxy.health", function()
    it("probes every backend from one worker per interval, not one per worker", function()
        with_policy({ check = { path = "/health", interval = 0.25, timeout = 0.5, fall = 3, rise = 2 },
            max_fails = 0 }, function(t)
            assert.is_true(util.wait_for(function() return t.s1.probes > 0 and t.s2.probes > 0 end, 3))
            local p1, p2 = t.s1.probes, t.s2.probes
            luaproxy.sleep(3)
            local d1, d2 = t.s1.probes - p1, t.s2.probes - p2
            -- 12 intervals: one probe each (two workers probing would make 24)
            assert.is_true(d1 >= 8 and d1 <= 15, "b1 probed " .. d1 .. " times in 3 s")
            assert.is_true(d2 >= 8 and d2 <= 15, "b2 probed " .. d2 .. " times in 3 s")
            assert.is_true(math.abs(d1 - d2) <= 1, d1 .. " vs " .. d2)
            assert.is_true(t.state(t.a1).up and t.state(t.a2).up)
        end)
    end)

    it("marks a backend down after fall failed probes and up after rise good ones", function()
        with_policy({ check = { path = "/health", interval = 0.2, timeout = 0.5, fall = 3, rise = 2,
            valid_statuses = { 200, 302 } }, max_fails = 0 }, function(t)
            assert.is_true(util.wait_for(function() return t.s1.probes > 0 end, 3))
            t.s1.healthy = false
            local p0 = t.s1.probes
            assert.is_true(util.wait_for(function() return not t.state(t.a1).up end, 5), "b1 never went down")
            local failed = t.s1.probes - p0
            assert.is_true(failed >= 3 and failed <= 5, failed .. " failed probes before down")
            assert.are.equal("down", t.state(t.a1).state)
            assert.is_true(t.state(t.a2).up)
            -- traffic, from both workers (concurrent connections), avoids it
            local h1 = t.s1.hits
            local tasks = {}
            for i = 1, 12 do tasks[i] = luaproxy.spawn(get, t, "/") end
            for _, task in ipairs(tasks) do
                local ok, status, body = task:wait()
                assert.is_true(ok)
                assert.are.equal(200, status)
                assert.matches("^b2", body)
            end
            assert.are.equal(h1, t.s1.hits)

            t.s1.healthy = true
            local p1 = t.s1.probes
            assert.is_true(util.wait_for(function() return t.state(t.a1).up end, 5), "b1 never came back")
            local good = t.s1.probes - p1
            assert.is_true(good >= 2 and good <= 4, good .. " good probes before up")
            -- and it gets traffic again
            t.prefer(t.a1)
            local status, body = get(t, "/")
            assert.are.equal(200, status)
            assert.matches("^b1", body)
        end)
    end)

    it("passive: max_fails connect failures within fail_timeout take a backend out for fail_timeout", function()
        with_policy({ max_fails = 2, fail_timeout = 1.5, tries = 2 }, function(t)
            local port1 = t.b1.port
            shut(t.b1)
            t.prefer(t.a1)
            -- failures further apart than fail_timeout do not add up
            assert.are.same({ 200, "b2 0" }, { get(t, "/") })
            assert.are.equal(1, t.state(t.a1).fails)
            luaproxy.sleep(1.6)
            assert.are.same({ 200, "b2 0" }, { get(t, "/") })
            assert.are.equal(1, t.state(t.a1).fails)
            assert.is_true(t.state(t.a1).up)
            -- the second within the window takes it out
            assert.are.same({ 200, "b2 0" }, { get(t, "/") })
            local st = t.state(t.a1)
            assert.is_false(st.up)
            assert.are.equal("ejected", st.state)
            -- while out, requests go straight to b2: no more failures counted against b1
            for _ = 1, 5 do assert.are.same({ 200, "b2 0" }, { get(t, "/") }) end
            assert.are.equal(0, t.state(t.a1).fails)
            -- after fail_timeout it is back; reopened, it gets traffic again
            t.b1 = open("b1", t.s1, port1)
            assert.is_true(util.wait_for(function() return t.state(t.a1).up end, 3))
            local status, body = get(t, "/")
            assert.are.equal(200, status)
            assert.are.equal("b1 0", body)
        end)
    end)

    it("a passively ejected backend comes back after rise good probes, long before fail_timeout", function()
        with_policy({ check = { path = "/health", interval = 0.2, timeout = 0.3, fall = 5, rise = 2 },
            max_fails = 1, fail_timeout = 30, tries = 2 }, function(t)
            assert.is_true(util.wait_for(function() return t.s1.probes > 0 end, 3))
            local port1 = t.b1.port
            shut(t.b1)
            t.prefer(t.a1)
            assert.are.same({ 200, "b2 0" }, { get(t, "/") })
            assert.are.equal("ejected", t.state(t.a1).state)
            t.b1 = open("b1", t.s1, port1)
            local p0 = t.s1.probes
            assert.is_true(util.wait_for(function() return t.state(t.a1).up end, 5), "b1 never came back")
            assert.is_true(t.s1.probes - p0 >= 2, (t.s1.probes - p0) .. " probes")
            assert.are.same({ 200, "b1 0" }, { get(t, "/") })
        end)
    end)

    it("passive checks never take out the last backend up", function()
        with_policy({ max_fails = 1, fail_timeout = 10, tries = 2 }, function(t)
            shut(t.b1)
            shut(t.b2)
            for _ = 1, 4 do
                local status, body = get(t, "/")
                assert.are.equal(502, status)
                assert.are.equal("connection refused", body)
            end
            local up = 0
            for _, st in pairs(t.view:status()) do
                if st.up then up = up + 1 end
            end
            assert.are.equal(1, up)
        end)
    end)

    it("all down: 503 at once; a backend that recovers (probes) gets traffic again", function()
        with_policy({ check = { path = "/health", interval = 0.2, timeout = 0.3, fall = 2, rise = 1 },
            max_fails = 1, fail_timeout = 30 }, function(t)
            local port1, port2 = t.b1.port, t.b2.port
            shut(t.b1)
            shut(t.b2)
            -- real traffic ejects one passively; the probes find both down
            get(t, "/")
            assert.is_true(util.wait_for(function()
                return not t.state(t.a1).up and not t.state(t.a2).up
            end, 5), "not both down")
            assert.are.equal("down", t.state(t.a1).state)
            assert.are.equal("down", t.state(t.a2).state)
            for _ = 1, 5 do
                local t0 = luaproxy.now()
                local status, body = get(t, "/")
                assert.are.equal(503, status)
                assert.are.equal("no backend up", body)
                assert.is_true(luaproxy.now() - t0 < 0.3)
            end
            -- b2 comes back: probes bring it up (fail_timeout is far away) and traffic goes there
            t.b2 = open("b2", t.s2, port2)
            assert.is_true(util.wait_for(function() return t.state(t.a2).up end, 5), "b2 never came back")
            assert.is_false(t.state(t.a1).up)
            for _ = 1, 3 do assert.are.same({ 200, "b2 0" }, { get(t, "/") }) end
            t.b1 = open("b1", t.s1, port1)
            assert.is_true(util.wait_for(function() return t.state(t.a1).up end, 5), "b1 never came back")
            t.prefer(t.a1)
            assert.are.same({ 200, "b1 0" }, { get(t, "/") })
        end)
    end)

    it("retries on another backend only after a connect failure, and only a replayable request", function()
        with_policy({ max_fails = 0, tries = 2, read_timeout = 0.3 }, function(t)
            local port1 = t.b1.port
            shut(t.b1)
            t.prefer(t.a1)
            -- refused: nothing reached b1, so b2 gets the request
            assert.are.same({ 200, "b2 0" }, { get(t, "/") })
            -- a body read by the policy can be sent again
            assert.are.same({ 200, "b2 5" }, { get(t, "/", { method = "POST", body = "hello",
                headers = { ["x-replayable"] = "1" } }) })
            -- a body streamed to the first backend cannot: 502, and b2 never saw it
            local h2 = t.s2.hits
            assert.are.same({ 502, "connection refused" }, { get(t, "/", { method = "POST", body = "hello" }) })
            assert.are.equal(h2, t.s2.hits)

            -- a request that reached a backend and timed out is never sent again
            t.b1 = open("b1", t.s1, port1)
            t.prefer(t.a1)
            local h1 = t.s1.hits
            h2 = t.s2.hits
            assert.are.same({ 504, "timeout" }, { get(t, "/slow") })
            assert.are.equal(h1 + 1, t.s1.hits)
            luaproxy.sleep(0.8) -- b1 finishes the slow one
            assert.are.equal(h2, t.s2.hits)

            -- tries bounds the backends tried: two dead ones first, then b2
            local dead1, dead2 = "127.0.0.1:" .. util.free_port(), "127.0.0.1:" .. util.free_port()
            assert.is_true(t.bal:set_backends({ dead1, dead2, t.a2 }))
            t.bal.dict:set("conn:" .. t.a2, 1000)
            t.bal.dict:set("conn:" .. dead1, 0)
            t.bal.dict:set("conn:" .. dead2, 0)
            assert.are.same({ 502, "connection refused" }, { get(t, "/") })
            assert.are.equal(h2, t.s2.hits)
        end)
    end)
end)

describe("luaproxy.health without a server", function()
    local m = 0
    local function fresh(opts)
        m = m + 1
        opts.dict = "health_unit_" .. m
        return assert(health.new(opts))
    end

    it("counts only backend failures, and max_fails = 0 turns passive checks off", function()
        assert.is_true(health.is_failure("connection refused"))
        assert.is_true(health.is_failure("timeout"))
        assert.is_true(health.is_failure("connection reset by peer"))
        assert.is_true(health.is_failure("upstream closed connection"))
        assert.is_false(health.is_failure("invalid upstream response: bad syntax"))
        assert.is_false(health.is_failure("request body too large"))
        assert.is_false(health.is_failure(true))
        local hc = fresh{ backends = { "a:1", "b:2" }, max_fails = 0 }
        for _ = 1, 5 do assert.is_false(hc:report("a:1", "connection refused")) end
        assert.is_true(hc:is_up("a:1"))
        hc = fresh{ backends = { "a:1", "b:2" }, max_fails = 3 }
        assert.is_false(hc:report("a:1", "invalid upstream response: x"))
        assert.is_false(hc:report("a:1", "timeout"))
        assert.is_false(hc:report("a:1", "timeout"))
        assert.is_true(hc:is_up("a:1"))
        assert.is_true(hc:report("a:1", "timeout"))
        assert.is_false(hc:is_up("a:1"))
        assert.are.equal("ejected", hc:status()["a:1"].state)
        -- b is the last one up: kept
        for _ = 1, 3 do assert.is_false(hc:report("b:2", "timeout")) end
        assert.is_true(hc:is_up("b:2"))
    end)

    it("balancer: skips down backends, honours exclude, says why nothing was picked", function()
        local hc = fresh{ backends = { "a:1", "b:2" }, max_fails = 1 }
        m = m + 1
        local bal = assert(balancer.new{ dict = "health_unit_bal" .. m, backends = { "a:1", "b:2" }, health = hc })
        assert.is_true(hc:report("a:1", "connection refused"))
        for _ = 1, 4 do assert.are.equal("b:2", bal:pick()) end
        assert.are.same({ nil, "no other backend" }, { bal:pick({ exclude = { ["b:2"] = true } }) })
        hc.dict:set("st:b:2", -1)
        assert.are.same({ nil, "no backend up" }, { bal:pick() })
        hc:reset()
        assert.are.equal("a:1", bal:pick({ exclude = { ["b:2"] = true } }))
        assert.is_true(balancer.is_connect_error("connection refused"))
        assert.is_false(balancer.is_connect_error("timeout"))
        assert.is_false(balancer.is_connect_error("upstream closed connection"))
    end)

    it("misuse raises", function()
        assert.has_error(function() health.new() end)
        assert.has_error(function() health.new{ backends = 42 } end)
        assert.has_error(function() health.new{ backends = {}, check = { interval = 0 } } end)
        assert.has_error(function() health.new{ backends = {}, check = { path = "health" } } end)
        assert.has_error(function() health.new{ backends = {}, check = { fall = 1.5 } } end)
        assert.has_error(function() health.new{ backends = {}, check = { valid_statuses = {} } } end)
        assert.has_error(function() health.new{ backends = {}, max_fails = -1 } end)
        assert.has_error(function() balancer.new{ health = {} } end)
    end)
end)
