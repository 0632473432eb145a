-- round_robin.lua: the reference row of bench/slow.sh, not a policy to run: plain round-robin
-- (per worker) over the backends, X-Api-Key required else 400. With one slow backend it sends
-- it half the requests, so the slow backend holds most clients at once: what fast requests
-- must not wait behind (no head-of-line blocking with ~1000 slow requests in flight).
local luaproxy = require "luaproxy"
local balancer = require "luaproxy.balancer"

local _M = {}

local backends, key_header
local turn = 0

function _M.init_worker(config)
    backends = config.backends
    key_header = config.api_key_header or "X-Api-Key"
end

function _M.handler(req)
    if not req:get_header(key_header) then
        return 400, "Request is missing " .. key_header .. " header.\n"
    end
    turn = turn % #backends + 1
    local res, err = req:proxy(backends[turn])
    if not res then
        luaproxy.log(luaproxy.ERR, "upstream ", backends[turn], ": ", err)
        return balancer.error_status(err)
    end
    return res
end

return _M
