-- router_tier.lua: the front tier of TextRazor's 2013 nginx + Lua design (issue #13): it
-- shards requests by API key across several API routers (examples/api_router.lua), so that
-- one key's requests always reach the same router and its per-key state (usage counts, rate
-- limit) stays in one place.
--
-- The key is taken as api_router takes it (luaproxy.apikey: the `apiKey` field of a form
-- body, else the `apiKey` query argument, else `X-Api-Key`); without one: 400 `Request is
-- missing apiKey param.` from the tier itself, and no router sees the request. The router is
-- the key's node on a consistent-hash ring over the configured routers (luaproxy.balancer,
-- mode "chash"): adding or removing a router moves only the keys it gains or loses. Routers
-- that are down are skipped (luaproxy.health: active probes when `health_check` is set,
-- passive checks on real traffic always): a down router's keys go to routers that are up,
-- each key's chosen from the key alone (the same in every worker and every tier with the
-- same routers), while every other key stays where it was; when it is back, its keys
-- return. A refused connection goes to the key's next router at once. Request bodies are
-- read into memory before they go on (nginx's proxy_request_buffering), so that retry holds
-- for every request; client_max_body_size bounds them. Every router down gives 503 at once,
-- a timeout 504, other failures 502 (balancer.error_status).
--
-- Probes should test the router and only the router: api_router answers a request without
-- a key itself, with 400, so `{ path = "/", valid_statuses = { 400 } }` does that from any
-- host (from 127.0.0.1, `path = "/admin/backends/"` answers 200).
--
-- Admin endpoints, from 127.0.0.1 only (others get 403), no API key needed:
--   POST /admin/set_backends/   JSON list of "host:port": replaces the routers in every worker
--   GET  /admin/backends/       the routers, requests in flight and each router's health
--
-- Run (two api_routers, the first starting the demo backends on :9001 and :9002, behind one
-- tier on :8080; examples/router_tier.conf.lua holds the health checks):
--   lua main.lua --listen 127.0.0.1:8081 --policy examples/api_router.lua &
--   lua main.lua --listen 127.0.0.1:8082 --policy examples/api_router.lua --backend 127.0.0.1:9001 --backend 127.0.0.1:9002 &
--   lua main.lua --policy examples/router_tier.lua --config examples/router_tier.conf.lua --backend 127.0.0.1:8081 --backend 127.0.0.1:8082
-- Settings it reads (from --config, all optional):
--   backends        the routers (or --backend)
--   health_check    { path = "/", interval = 2, timeout = 1, fall = 2, rise = 2,
--                     valid_statuses = { 400 } }: active probes (off when absent)
--   max_fails       failures on real traffic within fail_timeout that take a router out (1; 0: off)
--   fail_timeout    seconds: that window, and how long the router stays out (10)
--   api_key_header  the header holding the key (default "X-Api-Key")

local luaproxy = require "luaproxy"
local cli = require "luaproxy.cli"
local balancer = require "luaproxy.balancer"
local health = require "luaproxy.health"
local admin = require "luaproxy.admin"
local apikey = require "luaproxy.apikey"

local tostring = tostring
local log, ERR = luaproxy.log, luaproxy.ERR

local _M = {}

local bal, hc, key_header

-- new(opts), or an error naming the config setting behind a bad option.
local function make(what, new, opts)
    return cli.make("router_tier", what, new, opts)
end

--- Called once per worker before it serves, with the settings table.
function _M.init_worker(config)
    hc = make("health_check, max_fails or fail_timeout", health.new, {
        backends = function() return bal:backends() end,
        check = config.health_check,
        max_fails = config.max_fails,
        fail_timeout = config.fail_timeout,
    })
    bal = make("backends", balancer.new, { backends = config.backends, health = hc,
        mode = "chash" })
    key_header = config.api_key_header or "X-Api-Key"
    local ok, err = hc:start()
    if not ok then error("router_tier: health checks: " .. err) end
end

-- Whether the request comes with a body (which a retry would have to send again).
local function has_body(req)
    local cl = req:get_header("content-length")
    if cl then return cl ~= "0" end
    return req:get_header("transfer-encoding") ~= nil
end

function _M.handler(req)
    if admin.is_admin(req) then
        return admin.handle(req, bal)
    end
    local key, err = apikey.get(req, key_header)
    if not key then
        -- (for a body that could not be read the server answers 413/408/400 itself)
        return apikey.error_status(err)
    end
    if has_body(req) and not req:get_body_data() then
        local body, berr = req:read_body()
        if not body then return 400, "cannot read request body: " .. berr .. "\n" end
    end
    local res
    res, err = bal:proxy(req, { key = key })
    if not res then
        local status, body = balancer.error_status(err)
        if status == 503 then log(ERR, "no router for key ", key, ": ", err) end
        return status, body
    end
    return res
end

return _M
