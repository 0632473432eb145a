-- Stop and reload like nginx (#12): real signals to a real `lua main.lua` process.
-- TERM/QUIT drain and exit 0; a second one stops at once; HUP reloads the policy and the
-- config in every worker, a failed reload keeps the old one, dicts and caches survive.
local luaproxy = require "luaproxy"
local util = require "support.util"

-- The policy of version `v`: answers "v<v> ..." and keeps state in a dict and a cache that a
-- reload must not lose. Its init_worker starts a timer that logs when it fires prematurely.
local function policy_text(v, extra)
    return ([[
local luaproxy = require "luaproxy"
local V = %q
local _M = {}
local config_backend
function _M.init_worker(config)
    config_backend = config.backends[1]
    %s
    luaproxy.timer.every(60, function(premature)
        if premature then luaproxy.log(luaproxy.NOTICE, "premature timer of v", V) end
    end)
    local cache = luaproxy.cache.new("signals_spec_cache", { capacity = "1m" })
    if not cache:get("first") then cache:set("first", "v" .. V, 3600) end
end
function _M.handler(req)
    local p = req:get_path()
    local hits = luaproxy.shared.signals_hits:incr("n", 1, 0)
    if p == "/up" then
        return req:proxy(config_backend)
    elseif p == "/slow" then
        luaproxy.sleep(tonumber(req:get_uri_args().s) or 1)
        return 200, "v" .. V .. " slow\n"
    elseif p == "/state" then
        return 200, ("v%%s hits=%%d first=%%s\n"):format(V, hits, luaproxy.cache.signals_spec_cache:get("first"))
    end
    return 200, "v" .. V .. "\n"
end
return _M
]]):format(v, extra or "")
end

local function write(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
end

local function config_text(port, policy, extra, backend, workers)
    return ([[return { listen = "127.0.0.1:%d", policy = %q, workers = %d, backends = { %q },
        dicts = { signals_hits = "64k" }, shutdown_timeout = "10s" %s }]])
        :format(port, policy, workers or 2, backend or "127.0.0.1:9", extra or "")
end

local function count(text, pat)
    local n = 0
    for _ in text:gmatch(pat) do n = n + 1 end
    return n
end

local function start(backend, workers)
    local port = util.free_port()
    local policy = util.write_temp("signals_policy.lua", policy_text("1"))
    local conf = policy:gsub("[^/]+$", "signals.conf.lua")
    write(conf, config_text(port, policy, nil, backend, workers))
    local proc = util.main("--config " .. conf, 60)
    local base = "http://127.0.0.1:" .. port
    assert(util.wait_for(function() return util.get(base .. "/") == 200 end, 10), proc.log())
    return proc, base, policy, conf, port
end

-- curl in the background: the response (head and body) lands in a file.
local function curl_bg(url, secs)
    local out = util.write_temp("curl.out", "")
    os.execute(("curl -s -i -m %d '%s' >%s 2>&1 &"):format(secs or 10, url, out))
    return out
end

describe("signals", function()
    it("SIGTERM: 10 slow requests in flight all complete (Connection: close), nothing new is accepted, idle connections close, timers fire premature, exit 0", function()
        local proc, base
        local ok, err = pcall(util.run, function()
            proc, base = start()
            local outs = {}
            for i = 1, 10 do outs[i] = curl_bg(base .. "/slow?s=1.5") end
            -- An idle keep-alive connection: one request answered, then nothing.
            local idle = util.write_temp("idle.out", "")
            local port = base:match(":(%d+)$")
            os.execute(("bash -c 'exec 3<>/dev/tcp/127.0.0.1/%s; printf \"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n\" >&3; timeout 8 cat <&3; echo; echo CLOSED' >%s 2>&1 &")
                :format(port, idle))
            assert(util.wait_for(function() return (util.read_file(idle) or ""):find("v1") ~= nil end, 5))
            luaproxy.sleep(0.4) -- the slow ones are in flight
            local t0 = luaproxy.now()
            proc:signal("TERM")
            luaproxy.sleep(0.2)
            local refused = util.get(base .. "/", { connect_timeout = 1 })
            assert.is_nil(refused, "a new connection was served after SIGTERM")
            local code = proc:wait_exit(8)
            local took = luaproxy.now() - t0
            assert.are.equal(0, code, proc.log())
            -- It waited for the slow requests (1.5 s from their start), not for shutdown_timeout.
            assert.is_true(took > 0.5 and took < 5, "exited after " .. took)
            for i = 1, 10 do
                local out = util.read_file(outs[i])
                assert.matches("^HTTP/1.1 200", out)
                assert.matches("\r\n[Cc]onnection: close\r\n", out)
                assert.matches("v1 slow\n$", out)
            end
            local idle_out = util.read_file(idle)
            assert.matches("v1\n", idle_out, 1, true)
            assert.matches("CLOSED", idle_out, 1, true)
        end, 20)
        if proc and proc:status() == nil then proc:kill() end
        assert(ok, err)
        local log = proc.log()
        assert.matches("SIGTERM: stopping", log, 1, true)
        assert.are.equal(2, count(log, "premature timer of v1"), log)
    end)

    it("a SIGTERM while the workers start (init_worker still running) stops it cleanly, exit 0", function()
        -- Workers may accept before luaproxy.serve returns (one ready, another still in
        -- init_worker): a TERM then must not find the signal's default action (exit 143).
        local port = util.run(util.free_port)
        local mark = util.write_temp("init.started", "")
        os.remove(mark)
        local policy = util.write_temp("slow_init_policy.lua", ([[
            local luaproxy = require "luaproxy"
            return {
                init_worker = function()
                    local f = assert(io.open(%q, "w"))
                    f:close()
                    luaproxy.sleep(1.5)
                end,
                handler = function() return 200, "up\n" end,
            }
        ]]):format(mark))
        local conf = policy:gsub("[^/]+$", "slow_init.conf.lua")
        write(conf, config_text(port, policy))
        local proc = util.main("--config " .. conf, 30)
        local ok, err = pcall(util.run, function()
            assert(util.wait_for(function() return util.read_file(mark) ~= nil end, 10), proc.log())
            proc:signal("TERM")
            assert.are.equal(0, proc:wait_exit(10), proc.log())
        end, 20)
        if proc:status() == nil then proc:kill() end
        assert(ok, err)
        assert.matches("SIGTERM: stopping", proc.log(), 1, true)
    end)

    it("a second SIGTERM stops at once, without waiting for requests in flight", function()
        local proc, base
        local ok, err = pcall(util.run, function()
            proc, base = start()
            local out = curl_bg(base .. "/slow?s=20", 25)
            luaproxy.sleep(0.4)
            local t0 = luaproxy.now()
            proc:signal("QUIT")
            luaproxy.sleep(0.2)
            proc:signal("TERM")
            local code = proc:wait_exit(5)
            assert.are.equal(0, code, proc.log())
            assert.is_true(luaproxy.now() - t0 < 3)
            assert.is_nil((util.read_file(out) or ""):find("200", 1, true))
        end, 20)
        if proc and proc:status() == nil then proc:kill() end
        assert(ok, err)
        assert.matches("SIGTERM again: stopping now", proc.log(), 1, true)
    end)

    it("SIGHUP swaps the policy and the config under traffic; requests in flight finish on the old one; dicts and caches survive; a failed reload keeps the old one", function()
        local proc, base, policy, conf, port
        local ok, err = pcall(util.run, function()
            proc, base, policy, conf, port = start()
            assert.matches("^v1 hits=%d+ first=v1\n$", select(2, util.get(base .. "/state")))
            -- A request that starts on v1 and is still running when v2 takes over.
            local inflight = luaproxy.spawn(function() return util.get(base .. "/slow?s=1") end)
            luaproxy.sleep(0.3)
            write(policy, policy_text("2"))
            -- The config changes too: bodies over 10 bytes are now refused.
            write(conf, config_text(port, policy, ", client_max_body_size = 10"))
            proc:signal("HUP")
            assert(util.wait_for(function() return select(2, util.get(base .. "/")) == "v2\n" end, 5), proc.log())
            for _ = 1, 6 do assert.are.equal("v2\n", select(2, util.get(base .. "/"))) end
            local _, s, b = inflight:wait()
            assert.are.equal(200, s)
            assert.are.equal("v1 slow\n", b)
            local _, state = util.get(base .. "/state")
            -- The dict count went on (not back to 1) and the cache kept v1's entry.
            local hits = tonumber(state:match("hits=(%d+)"))
            assert.is_true(hits > 8, state)
            assert.matches("first=v1\n$", state)
            local status = util.curl(base .. "/", "--data-binary 'more than ten bytes'")
            assert.are.equal(413, status)

            -- Reloads that fail leave v2 serving, each with one log line saying why.
            local failures = {
                { policy_text("3") .. "\nthis is not lua(", "signals_policy.lua:%d+:" },
                { policy_text("3", "error('init refuses')"), "init refuses" },
            }
            for i, f in ipairs(failures) do
                write(policy, f[1])
                proc:signal("HUP")
                assert(util.wait_for(function()
                    return select(2, proc.log():gsub("reload failed", "")) >= i end, 5), proc.log())
                for _ = 1, 4 do assert.are.equal("v2\n", select(2, util.get(base .. "/"))) end
            end
            write(policy, policy_text("3"))
            for i, bad in ipairs({ ", no_such_setting = 1", ", client_max_body_size = 'lots'" }) do
                write(conf, config_text(port, policy, bad))
                proc:signal("HUP")
                assert(util.wait_for(function()
                    return select(2, proc.log():gsub("reload failed", "")) >= 2 + i end, 5), proc.log())
                assert.are.equal("v2\n", select(2, util.get(base .. "/")))
            end
            -- Fixed: the next HUP takes.
            write(conf, config_text(port, policy))
            proc:signal("HUP")
            assert(util.wait_for(function() return select(2, util.get(base .. "/")) == "v3\n" end, 5), proc.log())
        end, 40)
        if not proc then error(err) end
        proc:signal("TERM")
        local code = proc:wait_exit(8)
        if code == nil then proc:kill() end
        assert(ok, err)
        assert.are.equal(0, code)
        local log = proc.log()
        local lines = {}
        for line in log:gmatch("[^\n]*reload failed[^\n]*") do lines[#lines + 1] = line end
        assert.are.equal(4, #lines, log)
        assert.matches("signals_policy.lua:%d+:", lines[1])
        assert.matches("init refuses", lines[2], 1, true)
        assert.matches("unknown setting 'no_such_setting'", lines[3], 1, true)
        assert.matches("setting 'client_max_body_size': bad size 'lots'", lines[4], 1, true)
        -- v1's timers fired prematurely when v2 took over (one per worker), v2's at v3.
        assert.are.equal(2, count(log, "premature timer of v1"), log)
        assert.are.equal(2, count(log, "premature timer of v2"), log)
    end)

    it("a reload keeps the worker's upstream connections: the next request reuses the same one", function()
        local up, proc
        local ok, err = pcall(util.run, function()
            up = util.python_upstream("record", 30)
            local base, policy
            proc, base, policy = start(up.addr, 1)
            local s1, b1 = util.get(base .. "/up")
            assert.are.equal(200, s1)
            write(policy, policy_text("2"))
            proc:signal("HUP")
            assert(util.wait_for(function() return select(2, util.get(base .. "/")) == "v2\n" end, 5), proc.log())
            local s2, b2 = util.get(base .. "/up")
            assert.are.equal(200, s2)
            -- "conn=C n=N": the same upstream connection, its second request.
            assert.are.equal(b1:match("conn=(%d+)"), b2:match("conn=(%d+)"), b1 .. " / " .. b2)
            assert.are.equal("2", b2:match(" n=(%d+)"), b1 .. " / " .. b2 .. " / " .. table.concat(up.log(), "; "))
        end, 20)
        if up then up.stop() end
        if proc then
            proc:signal("TERM")
            if not proc:wait_exit(5) then proc:kill() end
        end
        assert(ok, err)
    end)

    it("srv:close(timeout) bounds the drain: what is still running after it is dropped", function()
        util.run(function()
            local policy = util.write_temp("close_policy.lua", [[
                local luaproxy = require "luaproxy"
                return function(req) luaproxy.sleep(5) return 200, "late\n" end
            ]])
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 1 })
            local task = luaproxy.spawn(function()
                return util.get("http://" .. srv.addr .. "/", { read_timeout = 10 })
            end)
            luaproxy.sleep(0.3)
            local t0 = luaproxy.now()
            srv:close(0.5)
            srv:wait()
            local took = luaproxy.now() - t0
            assert.is_true(took >= 0.45 and took < 3, "stopped after " .. took)
            local _, status, err = task:wait()
            assert.is_nil(status, "the request should have been dropped")
            assert.is_string(err)
        end, 15)
    end)
end)
