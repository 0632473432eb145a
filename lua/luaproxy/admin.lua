-- luaproxy.admin: the localhost-only admin endpoints of the least-connection policies.
--   POST /admin/set_backends/   body: JSON list of "host:port"  -> 200 {"backends": [...]}
--   GET  /admin/backends/       -> 200 {"backends": [...], "inflight": {addr = n}}, plus
--                                  "health": {addr = hc:status()[addr]} when the balancer
--                                  has a health checker
--   GET  /admin/usage/          -> 200 {key = n}: every key of the dict opts.usage (404
--                                  without one)
-- Anything not from 127.0.0.1 gets 403; a body that is not a JSON list of addresses gets 400.

local luaproxy = require "luaproxy"

local json = luaproxy.json
local type, find, ipairs = type, string.find, ipairs

local _M = { _VERSION = "0.1.0" }

local PREFIX = "/admin/"
local ALLOWED_ADDR = "127.0.0.1"

local function routes(path)
    if path == "/admin/set_backends/" or path == "/admin/set_backends" then return "set" end
    if path == "/admin/backends/" or path == "/admin/backends" then return "get" end
    if path == "/admin/usage/" or path == "/admin/usage" then return "usage" end
    return nil
end

--- bool = admin.is_admin(req): true for paths under /admin/
function _M.is_admin(req)
    return find(req:get_path(), PREFIX, 1, true) == 1
end

-- mlua's array metatable is protected, so only bare empty tables get it.
local function as_array(t)
    if next(t) == nil and getmetatable(t) == nil then
        return setmetatable(t, json.array_mt)
    end
    return t
end

local function err_response(status, msg)
    return status, { error = msg }
end

-- { key = value } for every key of a dict of counters.
local function dict_view(dict)
    local out = {}
    for _, k in ipairs(dict:get_keys(0)) do
        local v = dict:get(k)
        if v ~= nil then out[k] = v end
    end
    return out
end

--- status, body = admin.handle(req, bal, opts?): opts.usage, a dict of per-key counters
-- served at /admin/usage/
function _M.handle(req, bal, opts)
    if req:get_remote_addr() ~= ALLOWED_ADDR then
        luaproxy.log(luaproxy.WARN, "admin request from ", req:get_remote_addr(), " refused")
        return err_response(403, "admin endpoints are only open to 127.0.0.1")
    end
    local route = routes(req:get_path())
    if not route then
        return err_response(404, "no such admin endpoint")
    end
    if route == "get" then
        local hc = bal.health
        return 200, { backends = as_array(bal:backends()), inflight = bal:counts(),
            health = hc and hc:status() or nil }
    end
    if route == "usage" then
        local usage = opts and opts.usage
        if not usage then return err_response(404, "no such admin endpoint") end
        if req:get_method() ~= "GET" and req:get_method() ~= "HEAD" then
            return 405, { error = "use GET" }, { allow = "GET, HEAD" }
        end
        return 200, dict_view(usage)
    end
    if req:get_method() ~= "POST" then
        return 405, { error = "use POST" }, { allow = "POST" }
    end
    local body, err = req:read_body()
    if not body then
        return err_response(400, "cannot read body: " .. err)
    end
    local list, jerr = json.decode(body)
    if list == nil then
        return err_response(400, "body is not JSON: " .. jerr)
    end
    if type(list) ~= "table" or (next(list) ~= nil and #list == 0) then
        return err_response(400, "body must be a JSON list of \"host:port\" strings")
    end
    local ok, serr = bal:set_backends(list)
    if not ok then
        return err_response(400, serr)
    end
    luaproxy.log(luaproxy.NOTICE, "backends set to ", body)
    return 200, { backends = as_array(bal:backends()) }
end

return _M
