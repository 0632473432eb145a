-- api_router.lua: an API gateway in front of a dynamic backend list, after TextRazor's 2013
-- nginx + Lua router (issue #13).
--
-- Every request outside /admin/ must carry an API key (luaproxy.apikey): the `apiKey` field
-- of an application/x-www-form-urlencoded body, else the `apiKey` query argument, else the
-- `X-Api-Key` header (the first source that gives a non-empty value wins; names and values
-- are %-decoded, as nginx decodes arguments, among the first 100 fields; a repeated field
-- counts with its first value). Without one: 400 `Request is missing apiKey param.` and
-- nothing goes upstream. Reading the form keeps the body in memory, and it is forwarded byte
-- for byte with the same Content-Length (other bodies stream through unread). A key longer
-- than 256 bytes gets 400 too.
--
-- Keys within their rate limit (when one is configured; 429 with Retry-After past it) are
-- counted in the shared dict `api_usage` (requests let through per key, every worker's) and
-- go to the backend with the fewest requests in flight among those up (luaproxy.balancer
-- with luaproxy.health): active probes when `health_check` is set, passive checks on real
-- traffic always (nginx's max_fails = 1, fail_timeout = 10 s unless set). A refused
-- connection is retried on another backend when the request can be sent again (no body, or a
-- form body); every backend down gives 503 at once, a timeout 504, other failures 502.
--
-- Logs: the key goes into req:ctx().api_key, so the access log's `log_format = "router"`
-- (client, API key, time, request line, request length, status, bytes sent, backend, request
-- time, upstream response time) names it; `log_level = "info"` adds the original's
-- per-request line, "processing request from <key>". Metrics (`metrics_listen`) count
-- requests by status and backend and time each backend.
--
-- Admin endpoints, from 127.0.0.1 only (others get 403), no API key needed:
--   POST /admin/set_backends/   JSON list of "host:port": replaces the list in every worker
--   GET  /admin/backends/       the list, requests in flight and each backend's health
--   GET  /admin/usage/          { "<api key>": requests, ... }
--
-- Run:  lua main.lua --policy examples/api_router.lua --backend 127.0.0.1:9001 --backend 127.0.0.1:9002 [--config FILE]
-- Settings it reads (from --config, all optional):
--   backends        the initial list (or --backend)
--   health_check    { path = "/health", interval = 2, timeout = 1, fall = 3, rise = 2,
--                     valid_statuses = { 200, 302 } }: active probes (off when absent)
--   max_fails       failures on real traffic within fail_timeout that take a backend out (1; 0: off)
--   fail_timeout    seconds: that window, and how long the backend stays out (10)
--   rate_limit      { rate = N, burst = M }: N requests per second per key, M more at once,
--                   shared by every worker (off when absent)
--   api_key_header  the header holding the key (default "X-Api-Key")
--   dicts           { api_usage = "10m" } to size the usage dict (10m by default; when full,
--                   the least recently counted keys are dropped)

local luaproxy = require "luaproxy"
local cli = require "luaproxy.cli"
local balancer = require "luaproxy.balancer"
local health = require "luaproxy.health"
local ratelimit = require "luaproxy.ratelimit"
local admin = require "luaproxy.admin"
local apikey = require "luaproxy.apikey"

local ceil, tostring = math.ceil, tostring
local log, ERR, INFO = luaproxy.log, luaproxy.ERR, luaproxy.INFO

local _M = {}

local USAGE_DICT, USAGE_SIZE = "api_usage", "10m"
local bal, hc, rl, usage, key_header
local admin_opts

-- new(opts), or an error naming the config setting behind a bad option.
local function make(what, new, opts)
    return cli.make("api_router", what, new, opts)
end

--- Called once per worker before it serves, with the settings table.
function _M.init_worker(config)
    hc = make("health_check, max_fails or fail_timeout", health.new, {
        backends = function() return bal:backends() end,
        check = config.health_check,
        max_fails = config.max_fails,
        fail_timeout = config.fail_timeout,
    })
    bal = make("backends", balancer.new, { backends = config.backends, health = hc })
    if config.rate_limit then
        rl = make("rate_limit", ratelimit.new, config.rate_limit)
    end
    local err
    usage, err = luaproxy.shared.open(USAGE_DICT, USAGE_SIZE)
    if not usage then error("api_router: " .. err) end
    key_header = config.api_key_header or "X-Api-Key"
    admin_opts = { usage = usage }
    local ok, serr = hc:start()
    if not ok then error("api_router: health checks: " .. serr) end
end

function _M.handler(req)
    if admin.is_admin(req) then
        return admin.handle(req, bal, admin_opts)
    end
    local key, err = apikey.get(req, key_header)
    if not key then
        -- (for a body that could not be read the server answers 413/408/400 itself)
        return apikey.error_status(err)
    end
    if rl then
        local ok, _, retry_after = rl:incoming(key)
        if not ok then
            return 429, "429 Too Many Requests\n", { ["retry-after"] = tostring(ceil(retry_after or 1)) }
        end
    end
    usage:incr(key, 1, 0)
    -- for the access log's $ctx_api_key (log_format "router"), and the original's info line
    req:ctx().api_key = key
    log(INFO, "processing request from ", key)

    local res
    res, err = bal:proxy(req)
    if not res then
        local status, body = balancer.error_status(err)
        if status == 503 then log(ERR, "no backend for ", req:get_uri(), ": ", err) end
        return status, body
    end
    return res
end

return _M
