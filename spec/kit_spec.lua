-- luaproxy.test (the test kit, issue #15): policies run in this VM through the production
-- request path, on a virtual clock, against fake upstreams, with no socket. These specs check
-- the kit itself: its clock (sleep, timers, dict and cache TTLs, upstream timeouts, health
-- intervals: no real waiting), its fakes (what they receive, how they fail), concurrency, the
-- logs, reset, and that it opens no socket. The example policies' kit specs are
-- spec/kit_<example>_spec.lua.
local luaproxy = require "luaproxy"
local t = require "luaproxy.test"
local health = require "luaproxy.health"
local util = require "support.util"

-- Seconds since boot, from /proc/uptime (10 ms steps): real time, whatever the kit's clock says.
local function uptime()
    local f = assert(io.open("/proc/uptime"))
    local s = f:read("n")
    f:close()
    return s
end

-- This process's sockets: how many are TCP sockets, and how many of those listen. (Socket
-- inodes from /proc/PID/fd, matched against the TCP tables, where state 0A is LISTEN.)
local function tcp_sockets()
    local f = assert(io.open("/proc/self/stat"))
    local pid = f:read("a"):match("^(%d+)")
    f:close()
    local mine = {}
    local p = assert(io.popen("ls -l /proc/" .. pid .. "/fd 2>/dev/null"))
    for inode in p:read("a"):gmatch("socket:%[(%d+)%]") do mine[inode] = true end
    p:close()
    local tcp, listening = 0, 0
    for _, table_file in ipairs({ "/proc/" .. pid .. "/net/tcp", "/proc/" .. pid .. "/net/tcp6" }) do
        local tf = io.open(table_file)
        if tf then
            tf:read("l") -- the header line
            for line in tf:lines() do
                local fields = {}
                for w in line:gmatch("%S+") do fields[#fields + 1] = w end
                if mine[fields[10]] then
                    tcp = tcp + 1
                    if fields[4] == "0A" then listening = listening + 1 end
                end
            end
            tf:close()
        end
    end
    return tcp, listening
end

local function find_log(app, pattern)
    for _, e in ipairs(app:logs()) do
        if e.line and e.line:find(pattern) then return e end
    end
    return nil
end

describe("luaproxy.test", function()
    after_each(function() t.reset() end)

    it("loads a policy table: init_worker gets the config, log(info, ctx) and app:logs() see every request", function()
        local seen_config
        local app = assert(t.load({
            init_worker = function(config) seen_config = config end,
            handler = function(req)
                req:ctx().tag = "t-" .. req:get_path()
                luaproxy.log(luaproxy.WARN, "handling ", req:get_path(), " from ", req:get_remote_addr())
                return 201, { path = req:get_path(), q = req:get_uri_args().a, ip = req:get_remote_addr() }
            end,
            log = function(info, ctx) luaproxy.log(luaproxy.NOTICE, "logged ", info.status, " ", ctx.tag) end,
        }, { backends = { "127.0.0.1:9001" }, extra = { 1, 2 } }))
        assert.are.same({ "127.0.0.1:9001" }, seen_config.backends)
        assert.are.same({ 1, 2 }, seen_config.extra)

        local res = assert(app:request{ path = "/x", query = { a = "b c" }, remote_addr = "10.1.2.3" })
        assert.are.equal(201, res.status)
        assert.are.equal("application/json", res.headers["content-type"])
        assert.are.same({ path = "/x", q = "b c", ip = "10.1.2.3" }, luaproxy.json.decode(res.body))
        assert.is_truthy(res.headers["date"])

        local phases = app:logs("log")
        assert.are.equal(1, #phases)
        assert.are.equal(201, phases[1].info.status)
        assert.are.equal("GET /x?a=b%20c HTTP/1.1", phases[1].info.request)
        assert.are.equal("10.1.2.3", phases[1].info.remote_addr)
        assert.are.equal("t-/x", phases[1].ctx.tag)
        local kinds = {}
        for _, e in ipairs(app:logs()) do kinds[#kinds + 1] = e.kind .. ":" .. (e.message or "") end
        assert.are.same({ "error:handling /x from 10.1.2.3", "log:", "error:logged 201 t-/x" }, kinds)
        assert.are.equal("warn", app:logs("error")[1].level)
    end)

    it("loads a policy file with a config file, as main.lua's --config gives it", function()
        local policy = util.write_temp("kit_policy.lua", [[
            local luaproxy = require "luaproxy"
            local cfg = ...
            local _M = {}
            function _M.init_worker(config) _M.greeting = config.greeting .. "/" .. cfg.greeting end
            function _M.handler(req) return 200, _M.greeting end
            return _M
        ]])
        local conf = util.write_temp("kit.conf.lua", [[return { greeting = "hi", proxy_read_timeout = "5s" }]])
        local app = assert(t.load(policy, conf))
        assert.are.equal("hi/hi", app:request{}.body)
        local none, err = t.load("/nonexistent/policy.lua")
        assert.is_nil(none)
        assert.matches("cannot read policy file", err)
        assert.has_error(function() t.load(42) end)
    end)

    it("runs on a virtual clock: sleep, timers, dict TTLs and upstream timeouts take no real time", function()
        local fired = {}
        local dict = assert(luaproxy.shared.open("kit_clock", "1m"))
        local up = t.upstream("127.0.0.1:9001", function() return { status = 200, body = "late", delay = 3600 } end)
        local app = assert(t.load({
            init_worker = function()
                luaproxy.timer.at(30, function(premature) fired[#fired + 1] = luaproxy.now() end)
            end,
            handler = function(req)
                if req:get_path() == "/sleep" then
                    local t0 = luaproxy.now()
                    luaproxy.sleep(5)
                    return 200, string.format("%.3f", luaproxy.now() - t0)
                end
                local res, err = req:proxy("127.0.0.1:9001", { read_timeout = 60 })
                return 200, res and res.status or err
            end,
        }))
        local real0, t0 = uptime(), luaproxy.now()
        assert.are.equal("5.000", app:request{ path = "/sleep" }.body)
        assert.are.equal(5, luaproxy.now() - t0)
        -- the fake's 3600 s meets the policy's 60 s read timeout at once
        assert.are.equal("timeout", app:request{ path = "/proxy" }.body)
        assert.are.equal(65, luaproxy.now() - t0)
        assert.are.equal(1, #up.requests)
        -- the timer set for t0 + 30 fired while the clock went past it
        assert.are.same({ t0 + 30 }, fired)

        dict:set("short", 1, 10)
        dict:set("long", 1, 300)
        t.clock:advance(9.5)
        assert.are.equal(1, dict:get("short"))
        assert.are.near(0.5, dict:ttl("short"), 1e-6)
        t.clock:advance(1)
        assert.is_nil(dict:get("short"))
        t.clock:advance(289)
        assert.are.equal(1, dict:get("long"))
        t.clock:advance(1)
        assert.is_nil(dict:get("long"))
        assert.are.equal(365.5, t.clock:now() - t0)
        assert.is_true(uptime() - real0 < 1, "kit specs do not wait in real time")
    end)

    it("a 300 s cache TTL and a 10 s health interval in well under a second", function()
        local hits = { health = 0, data = 0 }
        t.upstream("127.0.0.1:9001", function(req)
            if req.path == "/health" then
                hits.health = hits.health + 1
                return 200, "ok"
            end
            hits.data = hits.data + 1
            return 200, "v" .. hits.data
        end)
        local hc, cache
        local app = assert(t.load({
            init_worker = function()
                hc = assert(health.new{ dict = "kit_health", backends = { "127.0.0.1:9001" },
                    check = { path = "/health", interval = 10, timeout = 1 } })
                assert(hc:start())
                cache = assert(luaproxy.cache.new("kit_cache", { capacity = "1m" }))
            end,
            handler = function()
                local v, err, how = cache:get_or_fetch("k", 300, function()
                    local res, rerr = luaproxy.http.request_uri("http://127.0.0.1:9001/data")
                    if not res then return nil, rerr end
                    return res.body
                end)
                return 200, (v or err) .. " " .. how
            end,
        }))
        local real0 = uptime()
        assert.are.equal("v1 miss", app:request{}.body)
        assert.are.equal(1, hits.health, "a first probe when the checker starts")
        t.clock:advance(299)
        assert.are.equal("v1 hit", app:request{}.body)
        assert.are.equal(30, hits.health, "one probe every 10 s")
        t.clock:advance(2)
        assert.are.equal("v2 miss", app:request{}.body)
        assert.are.equal(31, hits.health)
        assert.is_true(hc:is_up("127.0.0.1:9001"))
        local took = uptime() - real0
        assert.is_true(took < 1, "took " .. took .. " s")
    end)

    it("fakes receive what the policy forwarded, byte for byte, and serve luaproxy.http too", function()
        local up = t.upstream("127.0.0.1:9001", function(req)
            return 200, "got " .. #req.body, { ["x-seen"] = req.headers["x-custom"] }
        end)
        local app = assert(t.load({ handler = function(req)
            if req:get_path() == "/client" then
                local res = assert(luaproxy.http.request_uri("http://127.0.0.1:9001/c?x=1",
                    { method = "PUT", body = "abc", headers = { ["x-custom"] = "from http" } }))
                return res.status, res.body
            end
            req:set_header("x-custom", "set by policy")
            return req:proxy("127.0.0.1:9001")
        end }))
        local body = "a=1&b=%20two&bin=" .. string.char(0, 255, 10)
        local res = assert(app:request{ method = "POST", path = "/p/q", query = "k=v&k=w&e=%41",
            headers = { ["X-Api-Key"] = "key1", ["Content-Type"] = "application/x-www-form-urlencoded" },
            body = body })
        assert.are.equal(200, res.status)
        assert.are.equal("got " .. #body, res.body)
        assert.are.equal("set by policy", res.headers["x-seen"])
        local r = up.requests[1]
        assert.are.equal("POST", r.method)
        assert.are.equal("/p/q", r.path)
        assert.are.equal("k=v&k=w&e=%41", r.args)
        assert.are.same({ k = { "v", "w" }, e = "A" }, r.query)
        assert.are.equal(body, r.body)
        assert.are.equal("key1", r.headers["x-api-key"])
        assert.are.equal("127.0.0.1", r.headers["x-forwarded-for"])
        assert.are.equal(tostring(#body), r.headers["content-length"])
        assert.matches("^POST /p/q%?k=v&k=w&e=%%41 HTTP/1.1\r\n", r.head)

        assert.are.equal("got 3", app:request{ path = "/client" }.body)
        assert.are.equal("PUT", up.requests[2].method)
        assert.are.equal("abc", up.requests[2].body)
        assert.are.equal("from http", up.requests[2].headers["x-custom"])
    end)

    it("fakes fail as sockets do: refused, reset, timeout and a truncated body give production's errors", function()
        local mode
        local up = t.upstream("127.0.0.1:9001", function()
            return { fail = mode, body = "0123456789" }
        end)
        local app = assert(t.load({ handler = function(req)
            local res, err = req:proxy("127.0.0.1:9001", { read_timeout = 7 })
            if not res then return 502, err end
            local body, berr = res:read_body()
            return 200, body or ("body: " .. berr)
        end }))
        local t0 = luaproxy.now()
        local want = {
            refused = "connection refused",
            reset = "upstream closed connection",
            timeout = "timeout",
            truncated = "body: upstream closed connection before the body ended",
        }
        for _, m in ipairs({ "refused", "reset", "timeout", "truncated" }) do
            mode = m
            assert.are.equal(want[m], app:request{ path = "/" .. m }.body, m)
        end
        assert.are.equal(7, luaproxy.now() - t0, "only the timeout took (virtual) time")
        -- a refused connection never reached the upstream
        assert.are.equal(3, #up.requests)
        -- an address without a fake refuses: the kit never touches the network
        up:close()
        mode = nil
        assert.are.equal("connection refused", app:request{}.body)
        assert.is_truthy(find_log(app, "upstream 127.0.0.1:9001 failed: connection refused"))
    end)

    it("app:requests runs requests concurrently: single-flight fetches once for five waiters", function()
        local fetches = 0
        local app = assert(t.load({
            init_worker = function() assert(luaproxy.cache.new("kit_flight")) end,
            handler = function()
                local v, _, how = luaproxy.cache.kit_flight:get_or_fetch("k", 60, function()
                    fetches = fetches + 1
                    luaproxy.sleep(2)
                    return "value"
                end)
                return 200, v .. " " .. how
            end,
        }))
        local t0 = luaproxy.now()
        local out = app:requests({ {}, {}, {}, {}, {} })
        assert.are.equal(1, fetches)
        local hows = {}
        for _, r in ipairs(out) do hows[#hows + 1] = r.body end
        table.sort(hows)
        assert.are.same({ "value miss", "value shared", "value shared", "value shared", "value shared" }, hows)
        assert.are.equal(2, luaproxy.now() - t0, "they waited together")
    end)

    it("production's rules hold: a Lua error is a 500 with its log line, a body past client_max_body_size 413", function()
        local app = assert(t.load({ handler = function(req)
            if req:get_path() == "/boom" then error("kaboom") end
            local body = req:read_body()
            return 200, #body
        end }, { client_max_body_size = "1k" }))
        local res = app:request{ path = "/boom" }
        assert.are.equal(500, res.status)
        local line = find_log(app, "error in policy: .*kaboom")
        assert.is_truthy(line)
        assert.matches(res.headers["x-request-id"], line.message, 1, true)
        assert.are.equal("100", app:request{ body = ("x"):rep(100) }.body)
        assert.are.equal(413, app:request{ body = ("x"):rep(2000) }.status)
        assert.are.equal(400, app:request{ headers = { ["Content-Length"] = { "1", "2" } }, body = "x" }.status)
    end)

    it("captures access log lines instead of writing them", function()
        local path = util.write_temp("kit_access.log", "")
        os.remove(path)
        local app = assert(t.load({ handler = function() return 200, "hello" end },
            { access_log = path, log_format = "$request $status $body_bytes_sent" }))
        app:request{ path = "/a" }
        app:request{ method = "HEAD", path = "/b" }
        local lines = {}
        for _, e in ipairs(app:logs("access")) do lines[#lines + 1] = e.line end
        assert.are.same({ "GET /a HTTP/1.1 200 5", "HEAD /b HTTP/1.1 200 0" }, lines)
        assert.is_nil(io.open(path), "the file was not opened")
    end)

    it("a fake that raises fails the request that met it; t.reset drops apps, fakes and dict contents", function()
        t.upstream("127.0.0.1:9001", function() error("oops in fake") end)
        local app = assert(t.load({ handler = function(req) return req:proxy("127.0.0.1:9001") end }))
        assert.has_error(function() app:request{} end)
        local ok, err = pcall(app.request, app, {})
        assert.is_false(ok)
        assert.matches("oops in fake", tostring(err))

        local dict = assert(luaproxy.shared.open("kit_reset", "1m"))
        dict:set("k", "v")
        local t0 = luaproxy.now()
        t.clock:advance(100)
        t.reset()
        assert.is_nil(dict:get("k"))
        local ok2, gone = pcall(app.request, app, {})
        assert.is_false(ok2)
        assert.matches("this app was dropped by t.reset()", tostring(gone), 1, true)
        local app2 = assert(t.load({ handler = function(req)
            local res, perr = req:proxy("127.0.0.1:9001")
            return 200, res and "reached" or perr
        end }))
        assert.are.equal("connection refused", app2:request{}.body)
        assert.are.equal(t0, luaproxy.now(), "the clock is back where kits start")
    end)

    it("luaproxy.run beside a running kit is the real world: real sockets, the real clock", function()
        t.upstream("127.0.0.1:9001", function() return 200, "fake" end)
        local app = assert(t.load({ handler = function(req) return req:proxy("127.0.0.1:9001") end }))
        assert.are.equal("fake", app:request{}.body)
        t.clock:advance(1e6)
        local virtual = luaproxy.now()
        luaproxy.run(function()
            assert.is_true(math.abs(luaproxy.now() - os.time()) < 5, "real time inside luaproxy.run")
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", handler = function() return 200, "real" end })
            local res = assert(luaproxy.http.request_uri("http://" .. srv.addr .. "/"))
            assert.are.equal("real", res.body)
            srv:close()
            srv:wait()
        end)
        assert.are.equal(virtual, luaproxy.now())
        assert.are.equal("fake", app:request{}.body)
    end)

    it("opens no socket: no listening one, no TCP one at all", function()
        -- the count sees a listening socket when there is one
        local _, listening0 = tcp_sockets()
        luaproxy.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", handler = function() return 200 end })
            local _, l = tcp_sockets()
            assert.are.equal(listening0 + 1, l)
            srv:close()
            srv:wait()
        end)
        local tcp0, listen0 = tcp_sockets()
        local up = t.upstream("127.0.0.1:9001", function() return 200, "x" end)
        local app = assert(t.load("examples/api_router.lua", {
            backends = { "127.0.0.1:9001", "127.0.0.1:9002" },
            health_check = { path = "/health", interval = 2 },
        }))
        for i = 1, 5 do
            assert.are.equal(200, app:request{ path = "/" .. i, query = { apiKey = "k" } }.status)
        end
        t.clock:advance(60)
        assert.is_true(#up.requests > 20)
        local tcp1, listen1 = tcp_sockets()
        assert.are.equal(listen0, listen1)
        assert.are.equal(tcp0, tcp1)
    end)
end)
