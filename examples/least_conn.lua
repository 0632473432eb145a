-- least_conn.lua: least-connection load balancing over a backend list shared by all workers.
--
-- The default policy of `lua main.lua`. Each request goes to the backend with the fewest
-- requests in flight (counted across every worker; a count is released when its request ends,
-- however it ends). POST /admin/set_backends/ with a JSON list of "host:port" replaces the
-- list at runtime (from 127.0.0.1 only); GET /admin/backends/ shows it with the counts.
--
-- Run:  lua main.lua --policy examples/least_conn.lua --backend 127.0.0.1:9001 --backend 127.0.0.1:9002
-- Settings it reads (from --config or the command line): backends, api_key_header.

local luaproxy = require "luaproxy"
local balancer = require "luaproxy.balancer"
local admin = require "luaproxy.admin"

local _M = {}

local bal
local api_key_header

--- Called once per worker before it serves, with the settings table.
function _M.init_worker(config)
    local err
    bal, err = balancer.new{ backends = config.backends }
    if not bal then
        error("least_conn: " .. err)
    end
    api_key_header = config.api_key_header
end

function _M.handler(req)
    if admin.is_admin(req) then
        return admin.handle(req, bal)
    end
    if api_key_header and not req:get_header(api_key_header) then
        return 400, "Request is missing " .. api_key_header .. " header.\n"
    end
    local backend, err = bal:take(req)
    if not backend then
        luaproxy.log(luaproxy.ERR, "no backend for ", req:get_uri(), ": ", err)
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
