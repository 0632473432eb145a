-- Idle keep-alive connections (#16): a connection waiting for its next request holds no read
-- buffer (it takes one when bytes arrive) and keeps only a small task. A real `lua main.lua
-- --workers 2` serves 2000 keep-alive clients (spec/support/idle_clients.py); each sends one
-- request, all idle for a second, then each sends more: a head in three pieces (so a buffer
-- is taken for the first byte and the head completes across reads), a pipelined pair, or a
-- POST with a 5 KB body. Every answer must be right, on the same connection.
local util = require "support.util"

local CLIENTS = 2000

local POLICY = [[
local _M = {}
function _M.handler(req)
    local body = req:read_body() or ""
    return 200, req:get_method() .. " " .. req:get_path() .. " " .. #body
end
return _M
]]

describe("idle keep-alive connections", function()
    it("are held by the thousand and each serves its next requests right", function()
        local port = util.run(util.free_port)
        local policy = util.write_temp("idle_policy.lua", POLICY)
        local conf = util.write_temp("idle.conf.lua", ([[
            return { listen = "127.0.0.1:%d", policy = %q, workers = 2, log_level = "warn",
                     keepalive_timeout = 30, max_connections = %d }
        ]]):format(port, policy, CLIENTS + 100))
        local p = util.main("--config " .. conf, 90)
        local ok, err = pcall(function()
            assert(util.run(function()
                return util.wait_for(function()
                    return util.get("http://127.0.0.1:" .. port .. "/up") == 200
                end, 10)
            end), "main.lua did not start: " .. p.log())
            local out, code = util.sh(("timeout 60 python3 spec/support/idle_clients.py %d %d 1")
                :format(port, CLIENTS))
            assert.are.equal(0, code, out)
            local got = assert(require("luaproxy").json.decode(out:match("{.*}")), out)
            assert.are.same({ opened = CLIENTS, first_ok = CLIENTS, second_ok = CLIENTS, errors = {} },
                got, out)
        end)
        p:signal("TERM")
        if not p:wait_exit(10) then p:kill() end
        assert(ok, err)
    end)
end)
