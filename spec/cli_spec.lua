-- `lua main.lua` as a user runs it: real processes, real ports, bounded by `timeout`.
local luaproxy = require "luaproxy"
local util = require "support.util"

local MAIN = util.lua_cmd("main.lua ", 10)

local function one_clear_line(out)
    assert.is_nil(out:find("stack traceback", 1, true), out)
    assert.is_nil(out:find("panicked", 1, true), out)
    local lines = 0
    for _ in out:gmatch("[^\n]+") do lines = lines + 1 end
    assert.are.equal(1, lines, out)
end

describe("main.lua start-up errors", function()
    it("--help prints the usage and exits 0", function()
        local out, code = util.sh(MAIN .. "--help")
        assert.are.equal(0, code)
        assert.matches("usage: lua main.lua", out)
        assert.matches("--backend ADDR", out, 1, true)
    end)

    it("an unknown option exits 2 with one line", function()
        local out, code = util.sh(MAIN .. "--bogus")
        assert.are.equal(2, code)
        one_clear_line(out)
        assert.matches("unknown option '--bogus'", out, 1, true)
    end)

    it("an address in use exits 1 with one line", function()
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", handler = function() return 200 end })
            local out, code = util.sh(MAIN .. "--listen " .. srv.addr .. " --backend 127.0.0.1:9")
            srv:close()
            assert.are.equal(1, code)
            one_clear_line(out)
            assert.matches("address already in use", out, 1, true)
        end)
    end)

    it("a bad listen address exits 1 with one line", function()
        local out, code = util.sh(MAIN .. "--listen nonsense --backend 127.0.0.1:9")
        assert.are.equal(1, code)
        one_clear_line(out)
        assert.matches("bad listen address 'nonsense'", out, 1, true)
    end)

    it("a missing policy file exits 1 with one line", function()
        local out, code = util.sh(MAIN .. "--listen 127.0.0.1:0 --policy /nonexistent/p.lua --backend 127.0.0.1:9")
        assert.are.equal(1, code)
        one_clear_line(out)
        assert.matches("cannot read policy file '/nonexistent/p.lua'", out, 1, true)
    end)

    it("a syntax error in the policy exits 1 naming file and line", function()
        local policy = util.write_temp("broken.lua", "return function(req)\n  return 200,, 'x'\nend\n")
        local out, code = util.sh(MAIN .. "--listen 127.0.0.1:0 --workers 2 --policy " .. policy .. " --backend 127.0.0.1:9")
        assert.are.equal(1, code)
        one_clear_line(out)
        assert.matches(policy .. ":2:", out, 1, true)
    end)

    it("a broken --config exits 1 with one line", function()
        local conf = util.write_temp("bad.conf.lua", "return { workers = 'two' }")
        local out, code = util.sh(MAIN .. "--config " .. conf)
        assert.are.equal(1, code)
        one_clear_line(out)
        assert.matches("setting 'workers' must be a number", out, 1, true)
    end)
end)

describe("main.lua serving", function()
    it("creates the shared dicts a --config declares, visible to the policy", function()
        util.run(function()
            local port = util.free_port()
            local policy = util.write_temp("dict_policy.lua", [[
                local luaproxy = require "luaproxy"
                return function(req)
                    local d = luaproxy.shared.counters
                    return 200, tostring(d and d:capacity()) .. " " .. tostring(d and d:incr("hits", 1, 0))
                end
            ]])
            local conf = util.write_temp("dicts.conf.lua", ("return { listen = '127.0.0.1:%d', policy = %q, "
                .. "backends = { '127.0.0.1:9' }, workers = 2, dicts = { counters = '64k' } }"):format(port, policy))
            local pidfile = util.write_temp("pid", "")
            os.execute("(" .. MAIN .. "--config " .. conf .. " >/dev/null 2>&1 & echo $! >" .. pidfile .. ")")
            local pid = io.open(pidfile):read("l")
            local url = "http://127.0.0.1:" .. port .. "/"
            util.wait_for(function() return util.get(url) ~= nil end, 5)
            local _, body1 = util.get(url)
            local _, body2 = util.get(url)
            os.execute("kill " .. pid)
            assert.matches("^65536 %d+$", body1)
            assert.are.equal(tonumber(body1:match("%d+$")) + 1, tonumber(body2:match("%d+$")))
        end)
    end)

    it("refuses a bad dict size in --config with one line", function()
        local conf = util.write_temp("baddict.conf.lua", "return { dicts = { d = 'lots' }, backends = { '127.0.0.1:9' }, listen = '127.0.0.1:0' }")
        local out, code = util.sh(MAIN .. "--config " .. conf)
        assert.are.equal(1, code)
        one_clear_line(out)
        assert.matches("bad capacity 'lots'", out, 1, true)
    end)

    local function start(args)
        local pidfile = util.write_temp("pid", "")
        local log = pidfile .. ".log"
        os.execute("(" .. MAIN .. args .. " >" .. log .. " 2>&1 & echo $! >" .. pidfile .. ")")
        local pid = io.open(pidfile):read("l")
        return pid, log
    end

    local function stop(pid)
        os.execute("kill " .. pid .. " 2>/dev/null")
    end

    it("demo mode: both embedded demo backends answer through the proxy", function()
        util.run(function()
            local port, d1, d2 = util.free_port(), util.free_port(), util.free_port()
            local conf = util.write_temp("demo.conf.lua", ("return { listen = '127.0.0.1:%d', demo_ports = { %d, %d }, workers = 2 }")
                :format(port, d1, d2))
            local pid, log = start("--config " .. conf)
            local url = "http://127.0.0.1:" .. port .. "/"
            local ok = util.wait_for(function() return util.get(url) == 200 end, 5)
            local seen = {}
            for _ = 1, 6 do
                local status, body = util.curl(url)
                assert.are.equal(200, status)
                seen[body:match("demo backend (127%.0%.0%.1:%d+)")] = true
            end
            local banner = io.open(log):read("a")
            stop(pid)
            assert.is_true(ok, banner)
            assert.is_true(seen["127.0.0.1:" .. d1] and seen["127.0.0.1:" .. d2], "both demo backends")
            assert.matches("curl http://127.0.0.1:" .. port, banner, 1, true)
        end)
    end)

    it("--backend: proxies to the given backends; 502 and its log line when one is down", function()
        util.run(function()
            local backend = assert(luaproxy.serve{ listen = "127.0.0.1:0", handler = function() return 200, "from backend" end })
            local port, dead = util.free_port(), util.free_port()
            local pid, log = start("--listen 127.0.0.1:" .. port .. " --workers 1 --backend " .. backend.addr
                .. " --backend 127.0.0.1:" .. dead)
            local url = "http://127.0.0.1:" .. port .. "/x"
            util.wait_for(function() return util.get(url) ~= nil end, 5)
            local got = {}
            for _ = 1, 4 do
                local status = util.get(url)
                got[status] = (got[status] or 0) + 1
            end
            stop(pid)
            backend:close()
            assert.are.equal(2, got[200])
            assert.are.equal(2, got[502])
            local text = io.open(log):read("a")
            assert.matches("upstream 127.0.0.1:" .. dead .. " failed: connection refused", text, 1, true)
        end)
    end)
end)
