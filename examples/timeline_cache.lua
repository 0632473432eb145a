-- timeline_cache.lua: a cached, filtered JSON timeline, after the 2011 Kahlua proxy's headline
-- policy (issue #14).
--
-- GET /timeline/<user> fetches a JSON array from a backend (least connection over the config's
-- backends, luaproxy.balancer), keeps only the configured fields of each item, and serves the
-- result as application/json from a cache every worker shares (luaproxy.cache, 300 s by
-- default). However many clients ask for one user at once, on however many workers, the
-- upstream sees one fetch per user per TTL: the others wait for that fetch and share its
-- result. Only the path's user matters; the query is ignored. Each worker also keeps the
-- timelines it served last in a table of its own (up to `timeline_lru_size`, until the same
-- expiry), so a hit costs no copy out of the shared cache: lua-resty-mlcache's two levels.
--
-- The filter: `timeline_fields` names the fields kept, in the order they are written; a dotted
-- name (`user.screen_name`) keeps one field of a nested object (its parent is written as an
-- object holding only the named fields, or left out if it is not an object); a field an item
-- lacks is left out (a field present with null stays null); items that are not objects are
-- dropped. Values are copied as they are (numbers exactly: luaproxy.json keeps integers).
--
-- Answers:
--   200  the filtered array, with `Cache-Control: public, max-age=<seconds left>`, a strong
--        `ETag` (a 64-bit hash of the body) and `X-Cache: HIT` (from the cache), `MISS` (this
--        request fetched it) or `SHARED` (it waited for another request's fetch)
--   304  `If-None-Match` matches the ETag (weak comparison, lists and `*`, RFC 9110 13.1.2)
--   200 from a stale copy, `X-Cache: STALE`, `Warning: 110 - "Response is Stale"`,
--        `max-age=0`: the refresh failed (refused, timeout, a 5xx, no backend, an answer that
--        is not a JSON array) and an expired copy at most `timeline_stale` s old is cached;
--        for `timeline_neg_ttl` s after such a failure the stale copy is served without asking
--        the upstream again
--   502/503/504 with `{"error": ...}`: the same failures without a stale copy (504 for a
--        timeout, 503 when no backend is configured); nothing is cached
--   404  `{"error": ...}` for other paths (and users over 256 bytes), and when the upstream
--        answers 404 (never stale)
--   405  with `Allow: GET, HEAD` for other methods on /timeline/<user>
--
-- Run:  lua main.lua --policy examples/timeline_cache.lua --backend 127.0.0.1:3000 [--config examples/timeline_cache.conf.lua]
-- Settings it reads (from --config, all optional):
--   backends             where timelines come from (or --backend)
--   timeline_fields      fields kept (default { "id", "text", "created_at" })
--   timeline_path        the upstream path; `{user}` becomes the %-encoded user
--                        (default "/timeline/{user}", the path asked for)
--   timeline_ttl         seconds a timeline is served from the cache (300)
--   timeline_timeout     seconds for connecting to, writing to and each read from the
--                        upstream (10); a connection refused is retried on another backend
--   timeline_stale       how long past its expiry a copy may be served when the upstream fails
--                        (86400; 0: never)
--   timeline_neg_ttl     seconds after a failed refresh during which the stale copy is served
--                        without asking the upstream (5)
--   timeline_cache_size  the cache's capacity ("64m"; least recently used timelines go first)
--   timeline_lru_size    timelines each worker keeps in its own Lua table (1000; 0: none);
--                        when full it is emptied and refilled from the shared cache

local luaproxy = require "luaproxy"
local balancer = require "luaproxy.balancer"

local json = luaproxy.json
local http = luaproxy.http
local now, crc32, hash32 = luaproxy.now, luaproxy.crc32, luaproxy.hash32
local log, ERR, WARN = luaproxy.log, luaproxy.ERR, luaproxy.WARN
local type, ipairs, tostring, tonumber, getmetatable = type, ipairs, tostring, tonumber, getmetatable
local find, sub, byte, match, gsub, format = string.find, string.sub, string.byte, string.match, string.gsub, string.format
local concat, floor = table.concat, math.floor

local _M = {}

local CACHE_NAME = "timeline"
local DEFAULT_FIELDS = { "id", "text", "created_at" }
local DEFAULT_PATH = "/timeline/{user}"
local DEFAULT_TTL = 300
local DEFAULT_TIMEOUT = 10
local DEFAULT_STALE = 86400
local DEFAULT_NEG_TTL = 5
local DEFAULT_CACHE_SIZE = "64m"
local DEFAULT_LRU_SIZE = 1000
local MAX_USER_LEN = 256
local MAX_TRIES = 3
local VALUE_PREFIX, RETRY_PREFIX = "t:", "r:"

local JSON_TYPE = "application/json"
local ALLOW = "GET, HEAD"
local STALE_WARNING = '110 - "Response is Stale"'

local bal, cache, path_template, ttl, timeout, stale_limit, neg_ttl, fetch_opts
local filter -- the compiled timeline_fields (compile below)
-- This worker's copies of cached values, by user: { body, etag, expires } as the shared cache
-- holds them. Valid until their own expiry: a value in the shared cache is replaced only after
-- it has expired (or the upstream said 404, which is asked only then too).
local lru, lru_count, lru_size = {}, 0, DEFAULT_LRU_SIZE

-- What getmetatable gives for a table json.decode marked as an array (json.array_mt hides
-- itself behind __metatable = false, so compare with this rather than with array_mt).
local ARRAY_MARK = getmetatable(json.empty_array)

-- A decoded JSON object: a table that json.decode did not mark as an array.
local function is_object(v)
    return type(v) == "table" and getmetatable(v) ~= ARRAY_MARK
end

-- timeline_fields -> { { name =, key = '"name"', sub = <the same, for a nested object> } }
-- in the order first named. A name kept whole wins over its dotted children.
local function compile(fields)
    local root = { list = {}, by_name = {} }
    for i, f in ipairs(fields) do
        if type(f) ~= "string" or f == "" or find(f, "..", 1, true) or find(f, "^%.") or find(f, "%.$") then
            error("timeline_cache: timeline_fields[" .. i .. "] must be a field name or a dotted path, not "
                .. format("%q", tostring(f)), 0)
        end
        local node = root
        local parts = {}
        for part in f:gmatch("[^.]+") do parts[#parts + 1] = part end
        for depth, part in ipairs(parts) do
            local entry = node.by_name[part]
            if not entry then
                entry = { name = part, key = json.encode(part) }
                node.by_name[part] = entry
                node.list[#node.list + 1] = entry
            end
            if depth == #parts then
                entry.sub = nil
                entry.whole = true
            elseif entry.whole then
                break
            else
                entry.sub = entry.sub or { list = {}, by_name = {} }
                node = entry.sub
            end
        end
    end
    if #root.list == 0 then error("timeline_cache: timeline_fields must name at least one field", 0) end
    return root
end

-- Appends the JSON of the filtered object `obj` to buf; nil, err if a value cannot be encoded.
local function write_object(obj, spec, buf)
    local n = #buf + 1
    buf[n] = "{"
    local first = true
    for _, f in ipairs(spec.list) do
        local v = obj[f.name]
        if v ~= nil then
            if f.sub then
                if is_object(v) then
                    buf[#buf + 1] = first and f.key or "," .. f.key
                    buf[#buf + 1] = ":"
                    local ok, err = write_object(v, f.sub, buf)
                    if not ok then return nil, err end
                    first = false
                end
            else
                local text, err = json.encode(v)
                if not text then return nil, err end
                buf[#buf + 1] = first and f.key or "," .. f.key
                buf[#buf + 1] = ":"
                buf[#buf + 1] = text
                first = false
            end
        end
    end
    buf[#buf + 1] = "}"
    return true
end

--- body, err = filter_timeline(text): the filtered JSON array of the upstream's `text`
local function filter_timeline(text)
    local doc, err = json.decode(text)
    if doc == nil then return nil, "not JSON (" .. tostring(err) .. ")" end
    if type(doc) ~= "table" or getmetatable(doc) ~= ARRAY_MARK then
        return nil, "not a JSON array"
    end
    local buf = { "[" }
    for _, item in ipairs(doc) do
        if is_object(item) then
            if #buf > 1 then buf[#buf + 1] = "," end
            local ok, eerr = write_object(item, filter, buf)
            if not ok then return nil, "cannot encode an item (" .. tostring(eerr) .. ")" end
        end
    end
    buf[#buf + 1] = "]"
    return concat(buf)
end

local function escape_char(c)
    return format("%%%02X", byte(c))
end

local function upstream_path(user)
    local enc = gsub(user, "[^%w%-%._~]", escape_char)
    return (gsub(path_template, "{user}", function() return enc end))
end

-- Fetch failures carry the status the client gets without a stale copy: "<status> <why>".
local function failure(status, why)
    return status .. " " .. why
end

-- The cached value for `user`: { body, etag, expires }, or nil, failure(...). Runs once per
-- user at a time across every worker (cache:get_or_fetch); `req` holds the backend's lease.
local function fetch(req, user)
    local path = upstream_path(user)
    local addr, err = bal:take(req)
    if not addr then
        log(ERR, "timeline ", user, ": no backend: ", err)
        return nil, failure(503, "no backend")
    end
    local res, exclude
    local tries = 1
    while true do
        res, err = http.request_uri("http://" .. addr .. path, {
            headers = { accept = JSON_TYPE },
            connect_timeout = timeout, send_timeout = timeout, read_timeout = timeout,
        })
        -- only a connection that never opened is sure not to have reached the backend
        if res or tries >= MAX_TRIES or not balancer.is_connect_error(err) then break end
        exclude = exclude or {}
        exclude[addr] = true
        local next_addr = bal:take(req, { exclude = exclude })
        if not next_addr then break end
        log(WARN, "timeline ", user, ": upstream ", addr, " failed (", err, "), trying ", next_addr)
        addr, tries = next_addr, tries + 1
    end
    if not res then
        log(ERR, "timeline ", user, ": upstream ", addr, " failed: ", err)
        if err == "timeout" then return nil, failure(504, "upstream timed out") end
        return nil, failure(502, "upstream failed")
    end
    if res.status == 404 then
        -- the user is gone: no stale copy of theirs is served on a later failure either
        cache:delete(VALUE_PREFIX .. user)
        return nil, failure(404, "no timeline for this user")
    end
    if res.status ~= 200 then
        log(ERR, "timeline ", user, ": upstream ", addr, " answered ", res.status)
        return nil, failure(502, "upstream answered " .. res.status)
    end
    local body, ferr = filter_timeline(res.body)
    if not body then
        log(ERR, "timeline ", user, ": upstream ", addr, "'s answer is ", ferr)
        return nil, failure(502, "upstream answer is " .. ferr:match("^[^(]*"):gsub("%s+$", ""))
    end
    return {
        body = body,
        etag = format('"%08x%08x"', hash32(body), crc32(body)),
        expires = now() + ttl,
    }
end

local function trim_start(h, pos)
    return find(h, "[^ \t,]", pos) or #h + 1
end

--- matched = none_match(header, etag): If-None-Match's weak comparison (RFC 9110 13.1.2)
local function none_match(h, etag)
    if match(h, "^[ \t]*%*[ \t]*$") then return true end
    local pos, len = trim_start(h, 1), #h
    while pos <= len do
        if sub(h, pos, pos + 1) == "W/" then pos = pos + 2 end
        if byte(h, pos) ~= 34 then return false end -- malformed: no match
        local close = find(h, '"', pos + 1, true)
        if not close then return false end
        if sub(h, pos, close) == etag then return true end
        pos = close + 1
        local sep = find(h, "[^ \t]", pos)
        if sep and byte(h, sep) ~= 44 then return false end
        pos = trim_start(h, pos)
    end
    return false
end
_M.none_match = none_match

local function error_response(status, message)
    return status, { error = message }
end

--- Called once per worker before it serves, with the settings table.
function _M.init_worker(config)
    local function number(name, default, min)
        local v = config[name]
        if v == nil then return default end
        if type(v) ~= "number" or v < min then
            error(format("timeline_cache: %s must be a number >= %g", name, min), 0)
        end
        return v
    end
    ttl = number("timeline_ttl", DEFAULT_TTL, 0.001)
    timeout = number("timeline_timeout", DEFAULT_TIMEOUT, 0.001)
    stale_limit = number("timeline_stale", DEFAULT_STALE, 0)
    neg_ttl = number("timeline_neg_ttl", DEFAULT_NEG_TTL, 0)
    lru_size = floor(number("timeline_lru_size", DEFAULT_LRU_SIZE, 0))
    lru, lru_count = {}, 0
    local fields = config.timeline_fields or DEFAULT_FIELDS
    if type(fields) ~= "table" then error("timeline_cache: timeline_fields must be a list", 0) end
    filter = compile(fields)
    path_template = config.timeline_path or DEFAULT_PATH
    if type(path_template) ~= "string" or sub(path_template, 1, 1) ~= "/" then
        error("timeline_cache: timeline_path must start with /", 0)
    end
    local err
    bal, err = balancer.new{ backends = config.backends }
    if not bal then error("timeline_cache: " .. err, 0) end
    cache = luaproxy.cache[CACHE_NAME]
    if not cache then
        local ok
        ok, cache, err = pcall(luaproxy.cache.new, CACHE_NAME,
            { capacity = config.timeline_cache_size or DEFAULT_CACHE_SIZE })
        if not ok then error("timeline_cache: timeline_cache_size: " .. tostring(cache), 0) end
        -- another worker may have made it between the lookup and the new
        cache = cache or luaproxy.cache[CACHE_NAME]
        if not cache then error("timeline_cache: " .. tostring(err), 0) end
    end
    -- A waiter gives up on another request's fetch only after that fetch had all its tries.
    fetch_opts = { timeout = MAX_TRIES * 3 * timeout + 5 }
end

local function remember(user, v)
    if lru_size == 0 then return end
    if lru[user] == nil then
        lru_count = lru_count + 1
        if lru_count > lru_size then
            -- cheaper than an exact LRU, and the shared cache still has every entry
            lru, lru_count = {}, 1
        end
    end
    lru[user] = v
end

-- The 200 (or 304) for a cached value; `t` is now().
local function respond(req, v, how, t, stale)
    local headers = {
        ["content-type"] = JSON_TYPE,
        ["etag"] = v.etag,
        ["x-cache"] = how,
    }
    if stale then
        headers["cache-control"] = "public, max-age=0"
        headers["warning"] = STALE_WARNING
    else
        local left = floor(v.expires - t)
        headers["cache-control"] = "public, max-age=" .. (left > 0 and left or 0)
    end
    local inm = req:get_header("if-none-match")
    if inm and none_match(inm, v.etag) then
        headers["content-type"] = nil
        return 304, nil, headers
    end
    return 200, v.body, headers
end

function _M.handler(req)
    local user = match(req:get_path(), "^/timeline/([^/]+)$")
    if not user or #user > MAX_USER_LEN then
        return error_response(404, "not found")
    end
    local method = req:get_method()
    if method ~= "GET" and method ~= "HEAD" then
        return 405, { error = "method not allowed" }, { allow = ALLOW }
    end

    local t = now()
    local v = lru[user]
    if v and v.expires > t then return respond(req, v, "HIT", t) end

    local key = VALUE_PREFIX .. user
    local stale
    v, stale = cache:get(key)
    if v then
        remember(user, v)
        return respond(req, v, "HIT", t)
    end
    if stale and t - stale.expires > stale_limit then stale = nil end
    -- a refresh failed a moment ago: do not make every client wait for the upstream again
    if stale and neg_ttl > 0 and cache:get(RETRY_PREFIX .. user) then
        return respond(req, stale, "STALE", t, true)
    end

    local err, how
    v, err, how = cache:get_or_fetch(key, ttl, function() return fetch(req, user) end, fetch_opts)
    if v then
        remember(user, v)
        return respond(req, v, how == "miss" and "MISS" or how == "shared" and "SHARED" or "HIT", now())
    end
    local status, why = match(err, "^(%d%d%d) (.*)$")
    status = tonumber(status)
    if not status then
        -- the fetch raised (the cache logged it), or waiting for another one timed out
        status = err == "timeout" and 504 or 502
        why = err == "timeout" and "upstream timed out" or "upstream failed"
    end
    if stale and status ~= 404 then
        if neg_ttl > 0 then cache:set(RETRY_PREFIX .. user, true, neg_ttl) end
        return respond(req, stale, "STALE", now(), true)
    end
    return error_response(status, why)
end

return _M
