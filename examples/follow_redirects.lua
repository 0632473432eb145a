-- follow_redirects.lua: least connection over the backends, with the backends' redirects
-- followed here, so the client gets the final response (the Kahlua proxy's server-side
-- redirects of 2011, issue #14).
--
-- When the upstream answers 301, 302, 303, 307 or 308, its Location (absolute, or relative:
-- resolved per RFC 3986 against the URL just requested) is requested in turn, by the rules
-- browsers follow: 303, and 301/302 after a POST, become a GET without body; other cases (and
-- 307/308 always) keep the method and the body. So the body can be sent again it is read
-- first, bounded by client_max_body_size (past it: 413, and nothing goes upstream).
--
-- No open relay: a relative Location stays on the backend that answered (so does an absolute
-- one naming the URL's own host:port); an absolute Location to another host is followed only
-- if that host:port is in `redirect_hosts` (default: the backends); anything else (another
-- host, https, a Location that cannot be read) is given to the client as it came, 3xx and all.
-- Authorization and Cookie are not sent to another host.
--
-- More than `max_redirects` hops (5), or a redirect back to a request already made in the
-- chain (same method and URL), gives 508 Loop Detected and one error-log line with the chain:
--   redirect loop (508): http://127.0.0.1:8080/a -> http://127.0.0.1:8080/b -> http://127.0.0.1:8080/a, client: ...
-- The chain of every redirected request is in req:ctx().redirects, and logged at info by the
-- log phase (_M.log).
--
-- Run:  lua main.lua --policy examples/follow_redirects.lua --backend 127.0.0.1:9001 --backend 127.0.0.1:9002
-- Settings it reads (from --config, all optional):
--   backends         the list (or --backend)
--   max_redirects    hops followed at most (5)
--   redirect_hosts   { "host:port", ... } absolute Locations may lead to (default: the backends)
--   proxy_connect_timeout, proxy_send_timeout, proxy_read_timeout   for every hop

local luaproxy = require "luaproxy"
local balancer = require "luaproxy.balancer"
local redirect = require "luaproxy.redirect"

local concat = table.concat
local log, ERR, INFO = luaproxy.log, luaproxy.ERR, luaproxy.INFO

local _M = {}

local bal, follower

local BODIES = {
    [408] = "408 Request Timeout\n",
    [413] = "413 Request Entity Too Large\n",
    [502] = "502 Bad Gateway\n",
    [503] = "503 Service Unavailable\n",
    [504] = "504 Gateway Timeout\n",
    [508] = "508 Loop Detected\n",
}

--- Called once per worker before it serves, with the settings table.
function _M.init_worker(config)
    local err
    bal, err = balancer.new{ backends = config.backends }
    if not bal then error("follow_redirects: " .. err) end
    local hosts = config.redirect_hosts
    if hosts == nil then
        -- the backends as they are now (the list can change at runtime)
        hosts = function() return bal:backends() end
    end
    local ok, f = pcall(redirect.new, {
        max_redirects = config.max_redirects,
        hosts = hosts,
        proxy = {
            connect_timeout = config.proxy_connect_timeout,
            send_timeout = config.proxy_send_timeout,
            read_timeout = config.proxy_read_timeout,
        },
    })
    if not ok then
        error("follow_redirects: " .. tostring(f):gsub("^[^:]*:%d+: ", ""), 0)
    end
    follower = f
end

-- The first hop: least connection, and another backend when one refused the connection.
local function first(req, proxy_opts)
    return bal:proxy(req, { proxy = proxy_opts })
end

function _M.handler(req)
    local res, err, status = follower:proxy(req, first)
    if res then return res end
    if status == 508 then
        log(ERR, err, " (508): ", concat(req:ctx().redirects, " -> "), ", client: ",
            req:get_remote_addr(), ", request: \"", req:get_method(), " ", req:get_uri(), "\"")
    elseif err == "no backends" or err == "no backend up" then
        log(ERR, "no backend for ", req:get_uri(), ": ", err)
        status = 503
    end
    return status, BODIES[status] or (status .. "\n")
end

--- The log phase: the chain of a redirected request, at info.
function _M.log(_, ctx)
    local chain = ctx and ctx.redirects
    if chain then
        log(INFO, "redirects: ", concat(chain, " -> "))
    end
end

return _M
