-- api_router.lua: an API gateway in front of a dynamic backend list, after TextRazor's 2013
-- nginx + Lua router (issue #13).
--
-- Every request outside /admin/ must carry an API key: the `apiKey` field of an
-- application/x-www-form-urlencoded body, else the `apiKey` query argument, else the
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
local balancer = require "luaproxy.balancer"
local health = require "luaproxy.health"
local ratelimit = require "luaproxy.ratelimit"
local admin = require "luaproxy.admin"

local type, find, lower, sub, ceil, tostring = type, string.find, string.lower, string.sub, math.ceil, tostring
local log, ERR, INFO = luaproxy.log, luaproxy.ERR, luaproxy.INFO

local _M = {}

local USAGE_DICT, USAGE_SIZE = "api_usage", "10m"
local FORM = "application/x-www-form-urlencoded"
local KEY_FIELD = "apiKey"
local MAX_KEY_LEN = 256

local MISSING = "Request is missing apiKey param.\n"
local TOO_LONG = "apiKey param is too long.\n"

local bal, hc, rl, usage, key_header
local admin_opts

-- new(opts), or an error naming the config setting behind a bad option.
local function make(what, new, opts)
    local ok, obj, err = pcall(new, opts)
    if not ok then
        error("api_router: bad " .. what .. ": " .. tostring(obj):gsub("^[^:]*:%d+: ", ""), 0)
    end
    if not obj then error("api_router: " .. tostring(err), 0) end
    return obj
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

-- A value from get_post_args/get_uri_args: a string, true (a bare name), or a list of them.
local function first_string(v)
    if type(v) == "table" then v = v[1] end
    if type(v) == "string" and v ~= "" then return v end
    return nil
end

local function is_form(ct)
    if find(ct, FORM, 1, true) == 1 then return true end -- the usual spelling: no copy
    return lower(sub(ct, 1, #FORM)) == FORM
end

-- The request's API key, or nil (missing), or nil, err (the body could not be read).
local function api_key(req)
    local ct = req:get_header("content-type")
    if ct and is_form(ct) then
        -- reads the whole body into memory; req:proxy then sends those same bytes
        local args, err = req:get_post_args()
        if not args then return nil, err end
        local v = first_string(args[KEY_FIELD])
        if v then return v end
    end
    local q = req:get_query()
    -- a name that decodes to apiKey holds it literally or a %-escape: skip parsing otherwise
    if q and (find(q, KEY_FIELD, 1, true) or find(q, "%", 1, true)) then
        local v = first_string(req:get_uri_args()[KEY_FIELD])
        if v then return v end
    end
    local h = req:get_header(key_header)
    if h and h ~= "" then return h end
    return nil
end

function _M.handler(req)
    if admin.is_admin(req) then
        return admin.handle(req, bal, admin_opts)
    end
    local key, err = api_key(req)
    if not key then
        if err then
            -- the server answers 413/408/400 for a body that failed, whatever we return
            return 400, "cannot read request body: " .. err .. "\n"
        end
        return 400, MISSING
    end
    if #key > MAX_KEY_LEN then
        return 400, TOO_LONG
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
        if err == "no backend up" or err == "no backends" then
            log(ERR, "no backend for ", req:get_uri(), ": ", err)
            return 503, "503 Service Unavailable\n"
        end
        if err == "timeout" then
            return 504, "504 Gateway Timeout\n"
        end
        return 502, "502 Bad Gateway\n"
    end
    return res
end

return _M
