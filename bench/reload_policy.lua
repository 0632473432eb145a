-- bench/reload_policy.lua: the policy bench/reload.sh reloads under load. The seed workload
-- (least connection over the configured backends, as examples/least_conn.lua), plus /slow,
-- which waits 2 s before proxying: the requests a SIGTERM must let finish.
--
-- Run:  bench/reload.sh   (it starts `lua main.lua --policy bench/reload_policy.lua ...`)
local luaproxy = require "luaproxy"
local balancer = require "luaproxy.balancer"

local _M = {}

local bal

function _M.init_worker(config)
    bal = assert(balancer.new{ backends = config.backends })
end

function _M.handler(req)
    if req:get_path() == "/slow" then
        luaproxy.sleep(2)
    end
    local backend, err = bal:take(req)
    if not backend then
        return balancer.error_status(err)
    end
    local res
    res, err = req:proxy(backend)
    if not res then
        return balancer.error_status(err)
    end
    return res
end

return _M
