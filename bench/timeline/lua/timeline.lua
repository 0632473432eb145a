-- bench/timeline/lua/timeline.lua: the nginx + ngx_lua peer of examples/timeline_cache.lua for
-- bench/timeline.sh (nginx-timeline.conf's content_by_lua). The same answers: the filtered
-- array (id, text, created_at) from a lua_shared_dict for 300 s, one fetch per user at a time
-- across workers, Cache-Control with the seconds left, a strong ETag, 304 on If-None-Match,
-- a stale copy when the fetch fails, JSON errors. serve(true) puts a per-worker
-- lua-resty-lrucache in front of the dict (lua-resty-mlcache's two levels), as the luaproxy
-- example does with its own per-worker table (timeline_lru_size).
local cjson = require "cjson.safe"
local lrucache = require "resty.lrucache"
-- (cjson prints numbers with 14 significant digits, the most Debian's 2.1.0 allows: the
-- benchmark's ids have 14 digits so they come out intact)

local ngx = ngx
local dict = ngx.shared.timeline
local match, find, sub, byte, format, floor = string.match, string.find, string.sub, string.byte, string.format, math.floor

local _M = {}

local FIELDS = { "id", "text", "created_at" }
local TTL = 300
local LOCK_TTL = 30          -- a fetcher that dies frees its lock after this
local WAIT = 15              -- how long a request waits for another's fetch
local NEG_TTL = 5            -- after a failed refresh, serve the stale copy this long
local LRU_SIZE = 1000

local lru = assert(lrucache.new(LRU_SIZE))

local function json_error(status, message)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.print(cjson.encode({ error = message }))
    return ngx.exit(status)
end

-- If-None-Match's weak comparison (RFC 9110 13.1.2), as the luaproxy example does it.
local function none_match(h, etag)
    if match(h, "^[ \t]*%*[ \t]*$") then return true end
    local pos, len = find(h, "[^ \t,]") or #h + 1, #h
    while pos <= len do
        if sub(h, pos, pos + 1) == "W/" then pos = pos + 2 end
        if byte(h, pos) ~= 34 then return false end
        local close = find(h, '"', pos + 1, true)
        if not close then return false end
        if sub(h, pos, close) == etag then return true end
        pos = close + 1
        local sep = find(h, "[^ \t]", pos)
        if sep and byte(h, sep) ~= 44 then return false end
        pos = find(h, "[^ \t,]", pos) or len + 1
    end
    return false
end

local function send(body, crc, left, how)
    local etag = format('"%08x"', crc)
    local h = ngx.header
    h["ETag"] = etag
    h["X-Cache"] = how
    if left then
        h["Cache-Control"] = "public, max-age=" .. floor(left)
    else
        h["Cache-Control"] = "public, max-age=0"
        h["Warning"] = '110 - "Response is Stale"'
    end
    local inm = ngx.var.http_if_none_match
    if inm and none_match(inm, etag) then
        return ngx.exit(304)
    end
    h["Content-Type"] = "application/json"
    h["Content-Length"] = #body   -- as luaproxy sends it (nginx would go chunked)
    ngx.print(body)
end

-- The filtered body of the upstream's answer, or nil, status, why.
local function fetch(user)
    local res = ngx.location.capture("/_fetch/" .. ngx.escape_uri(user))
    if res.status == 404 then return nil, 404, "no timeline for this user" end
    if res.status == 504 then return nil, 504, "upstream timed out" end
    if res.status ~= 200 or res.truncated then return nil, 502, "upstream answered " .. res.status end
    local doc = cjson.decode(res.body)
    if type(doc) ~= "table" or (next(doc) ~= nil and doc[1] == nil) then
        return nil, 502, "upstream answer is not a JSON array"
    end
    local out = {}
    for _, item in ipairs(doc) do
        if type(item) == "table" then
            local o = {}
            for _, f in ipairs(FIELDS) do o[f] = item[f] end
            out[#out + 1] = o
        end
    end
    if #out == 0 then return "[]" end
    return cjson.encode(out)
end

function _M.serve(use_lru)
    local user = match(ngx.var.uri, "^/timeline/([^/]+)$")
    if not user or #user > 256 then return json_error(404, "not found") end
    local method = ngx.req.get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx.header["Allow"] = "GET, HEAD"
        return json_error(405, "method not allowed")
    end
    local key = "t:" .. user
    if use_lru then
        local v = lru:get(user)  -- { body, crc, expires }, dropped by lrucache at its expiry
        if v then return send(v[1], v[2], v[3] - ngx.now(), "HIT") end
    end
    local body, crc = dict:get(key)
    if body then
        local left = dict:ttl(key)
        if use_lru then lru:set(user, { body, crc, ngx.now() + left }, left) end
        return send(body, crc, left, "HIT")
    end

    local stale, stale_crc = dict:get_stale(key)
    if stale and dict:get("r:" .. user) then return send(stale, stale_crc, nil, "STALE") end

    -- one fetch per user across workers: the first to add the lock fetches, the others poll
    local lock = "l:" .. user
    local status, why
    if dict:add(lock, true, LOCK_TTL) then
        body, status, why = fetch(user)
        if body then
            crc = ngx.crc32_long(body) % 0x80000000  -- dict flags hold 31 bits safely
            dict:set(key, body, TTL, crc)
            if use_lru then lru:set(user, { body, crc, ngx.now() + TTL }, TTL) end
        end
        dict:delete(lock)
        if body then return send(body, crc, TTL, "MISS") end
    else
        local waited, step = 0, 0.001
        while waited < WAIT do
            ngx.sleep(step)
            waited = waited + step
            step = math.min(step * 2, 0.05)
            body, crc = dict:get(key)
            if body then return send(body, crc, dict:ttl(key), "SHARED") end
            if not dict:get(lock) then break end
        end
        status, why = 502, "upstream failed"
    end
    if stale and status ~= 404 then
        dict:set("r:" .. user, true, NEG_TTL)
        return send(stale, stale_crc, nil, "STALE")
    end
    return json_error(status, why)
end

return _M
