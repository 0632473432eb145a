-- luaproxy.redirect: follow an upstream's redirects server-side, so the client gets the final
-- response (the Kahlua proxy's loop of 2011, with what it left out: relative Locations
-- resolved per RFC 3986, the method and body rules browsers follow, a hop limit, loop
-- detection and an allow list so the proxy is no open relay).
--
--   local redirect = require "luaproxy.redirect"
--   local follower = redirect.new{ max_redirects = 5, hosts = { "127.0.0.1:9001" } }
--   local res, err, status = follower:proxy(req, "127.0.0.1:9001")
--   if not res then return status, err .. "\n" end
--   return res                                  -- the final response, or a 3xx not followed
--
-- Hops: the first goes out with req:proxy (or the caller's function, e.g. bal:proxy). A later
-- hop that keeps the client's method and body goes out with req:proxy too (target and Host
-- set on req, and put back afterwards), so luaproxy's own forwarding fields apply; a hop that
-- became a GET without body (303, or 301/302 after a POST) goes out with luaproxy.http.request
-- and the client's headers minus the body's, with the forwarding fields req:proxy would add
-- for a client outside trusted_ips. Either way the upstream sees the Host of the URL it is
-- asked for, a body only with a method that keeps one, and a Content-Length that matches it.

local luaproxy = require "luaproxy"

local http = luaproxy.http
local type, tostring, tonumber, ipairs, pairs = type, tostring, tonumber, ipairs, pairs
local find, sub, match, lower, gsub, format, byte = string.find, string.sub, string.match,
    string.lower, string.gsub, string.format, string.byte
local concat = table.concat

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

local DEFAULT_MAX_REDIRECTS = 5
-- An intermediate 3xx body is read (so its connection goes back to the pool) up to this; a
-- bigger one is dropped with its connection.
local DISCARD_MAX = 64 * 1024
-- A longer Location is not followed (passed to the client as it came).
local MAX_LOCATION = 8192

local REDIRECT = { [301] = true, [302] = true, [303] = true, [307] = true, [308] = true }

-- What a failed req:read_body() deserves (the server answers these anyway).
local BODY_STATUS = { ["request body too large"] = 413, ["timeout"] = 408 }

-- Sent by luaproxy itself (req:proxy's rules), never copied from the client on a hop made with
-- the HTTP client.
local HOP_BY_HOP = { "connection", "keep-alive", "te", "transfer-encoding", "upgrade",
    "proxy-connection", "trailer", "expect", "content-length" }
-- The Fetch standard's request-body-header names: they describe a body that is dropped.
local BODY_HEADERS = { "content-type", "content-encoding", "content-language", "content-location" }
-- Not sent to another authority (what curl and browsers do on a cross-origin redirect).
local CREDENTIALS = { "authorization", "cookie" }

--- ok = redirect.is_redirect(status): 301, 302, 303, 307 or 308
function _M.is_redirect(status)
    return REDIRECT[status] == true
end

--- parts = redirect.parse(ref): RFC 3986 appendix B's split of a URI reference into
-- { scheme, authority, path, query, fragment }; a component that is absent is nil (an empty
-- one is ""), path is always a string.
function _M.parse(ref)
    if type(ref) ~= "string" then
        error("redirect.parse: ref must be a string", 2)
    end
    local rest, fragment, query = ref, nil, nil
    local i = find(rest, "#", 1, true)
    if i then
        fragment = sub(rest, i + 1)
        rest = sub(rest, 1, i - 1)
    end
    i = find(rest, "?", 1, true)
    if i then
        query = sub(rest, i + 1)
        rest = sub(rest, 1, i - 1)
    end
    local scheme = match(rest, "^([^:/]+):")
    if scheme then
        rest = sub(rest, #scheme + 2)
    end
    local authority
    if sub(rest, 1, 2) == "//" then
        i = find(rest, "/", 3, true)
        if i then
            authority = sub(rest, 3, i - 1)
            rest = sub(rest, i)
        else
            authority = sub(rest, 3)
            rest = ""
        end
    end
    return { scheme = scheme, authority = authority, path = rest, query = query, fragment = fragment }
end

--- path = redirect.remove_dot_segments(path): RFC 3986 section 5.2.4
function _M.remove_dot_segments(path)
    if type(path) ~= "string" then
        error("redirect.remove_dot_segments: path must be a string", 2)
    end
    local input, out = path, {}
    while input ~= "" do
        if sub(input, 1, 3) == "../" then                         -- A
            input = sub(input, 4)
        elseif sub(input, 1, 2) == "./" then
            input = sub(input, 3)
        elseif sub(input, 1, 3) == "/./" then                     -- B
            input = sub(input, 3)
        elseif input == "/." then
            input = "/"
        elseif sub(input, 1, 4) == "/../" then                    -- C
            input = sub(input, 4)
            out[#out] = nil
        elseif input == "/.." then
            input = "/"
            out[#out] = nil
        elseif input == "." or input == ".." then                 -- D
            input = ""
        else                                                      -- E
            local seg = match(input, "^/?[^/]*")
            out[#out + 1] = seg
            input = sub(input, #seg + 1)
        end
    end
    return concat(out)
end

-- RFC 3986 section 5.2.3
local function merge(base, ref_path)
    if base.authority ~= nil and base.path == "" then
        return "/" .. ref_path
    end
    return (match(base.path, "^(.*/)") or "") .. ref_path
end

-- RFC 3986 section 5.3
local function recompose(t)
    local out = {}
    if t.scheme then out[#out + 1] = t.scheme .. ":" end
    if t.authority then out[#out + 1] = "//" .. t.authority end
    out[#out + 1] = t.path
    if t.query then out[#out + 1] = "?" .. t.query end
    if t.fragment then out[#out + 1] = "#" .. t.fragment end
    return concat(out)
end

-- RFC 3986 section 5.2.2 (strict: a reference with a scheme is absolute even if it is the base's)
local function transform(b, r)
    local rds = _M.remove_dot_segments
    local t = { fragment = r.fragment }
    if r.scheme then
        t.scheme, t.authority, t.path, t.query = r.scheme, r.authority, rds(r.path), r.query
        return t
    end
    if r.authority then
        t.authority, t.path, t.query = r.authority, rds(r.path), r.query
    else
        if r.path == "" then
            t.path = b.path
            if r.query then t.query = r.query else t.query = b.query end
        else
            if sub(r.path, 1, 1) == "/" then
                t.path = rds(r.path)
            else
                t.path = rds(merge(b, r.path))
            end
            t.query = r.query
        end
        t.authority = b.authority
    end
    t.scheme = b.scheme
    return t
end

--- url = redirect.resolve(base, ref): the reference `ref` resolved against the absolute URI
-- `base` (RFC 3986 section 5.2, strict), as a string
function _M.resolve(base, ref)
    if type(base) ~= "string" or type(ref) ~= "string" then
        error("redirect.resolve: base and ref must be strings", 2)
    end
    return recompose(transform(_M.parse(base), _M.parse(ref)))
end

-- "host:port" with the host lower-cased and the port spelled out (80 by default), from an
-- http authority; nil for one with userinfo, a bad host or a bad port.
local function addr_of(authority)
    if find(authority, "@", 1, true) then return nil end
    local host, port = match(authority, "^(%[[%x:%.]+%]):?(%d*)$")
    if not host then
        host, port = match(authority, "^([%w%-%.]+):?(%d*)$")
    end
    if not host then return nil end
    if port == "" then port = "80" end
    local n = tonumber(port)
    if not n or n < 1 or n > 65535 then return nil end
    return lower(host) .. ":" .. n
end

-- Percent-encodes the bytes a request target cannot carry (spaces, controls, non-ASCII), as
-- browsers do with a Location; what is already an escape stays.
local PATH_BAD = "[^%w%-%._~!%$&'%(%)%*%+,;=:@/%%]"
local QUERY_BAD = "[^%w%-%._~!%$&'%(%)%*%+,;=:@/%%%?]"
local function escape(s, bad)
    s = gsub(s, bad, function(c) return format("%%%02X", byte(c)) end)
    -- a '%' that does not start an escape stands for itself
    return (gsub(s, "%%(%x?%x?)", function(h)
        if #h == 2 then return nil end
        return "%25" .. h
    end))
end

--- follower = redirect.new{ max_redirects?, hosts?, proxy? }: `max_redirects` (5) hops at
-- most; `hosts`: the authorities ("host:port") an absolute Location may lead to, a list or a
-- function returning one (called per redirect; nil = none: only relative Locations are
-- followed); `proxy`: the options given to every hop's req:proxy / luaproxy.http.request
-- (timeouts; `max_body_size` defaults to 64 KiB, the most of a 3xx body read to discard it)
function _M.new(opts)
    opts = opts or {}
    if type(opts) ~= "table" then
        error("redirect.new: opts must be a table", 2)
    end
    local max = opts.max_redirects or DEFAULT_MAX_REDIRECTS
    if type(max) ~= "number" or max < 0 or max % 1 ~= 0 then
        error("redirect.new: max_redirects must be a whole number >= 0", 2)
    end
    local hosts = opts.hosts
    if hosts ~= nil and type(hosts) ~= "table" and type(hosts) ~= "function" then
        error("redirect.new: hosts must be a list of \"host:port\" or a function returning one", 2)
    end
    if type(hosts) == "table" then
        for _, h in ipairs(hosts) do
            if type(h) ~= "string" or not find(h, ":%d+$") or not addr_of(h) then
                error("redirect.new: bad host '" .. tostring(h) .. "' (expected host:port)", 2)
            end
        end
    end
    local proxy = {}
    for k, v in pairs(opts.proxy or {}) do proxy[k] = v end
    if proxy.max_body_size == nil then proxy.max_body_size = DISCARD_MAX end
    return setmetatable({ max_redirects = max, hosts = hosts, proxy_opts = proxy }, mt)
end

-- Whether `addr` ("host:port", normalized) is in the allow list.
local function allowed(self, addr)
    local hosts = self.hosts
    if type(hosts) == "function" then hosts = hosts() end
    if type(hosts) ~= "table" then return false end
    for _, h in ipairs(hosts) do
        if type(h) == "string" and addr_of(h) == addr then return true end
    end
    return false
end

-- Reads (and drops) an intermediate response's body, so its connection can serve again; one
-- too big is closed instead.
local function discard(res)
    res:read_body()
end

-- The headers for a hop made with the HTTP client: the client's as req holds them now, minus
-- hop-by-hop fields and those of the dropped body, with the forwarding fields req:proxy would
-- write for a client outside trusted_ips.
local function client_headers(req, host)
    local h = req:get_headers()
    for _, name in ipairs(HOP_BY_HOP) do h[name] = nil end
    for _, name in ipairs(BODY_HEADERS) do h[name] = nil end
    local ip = req:get_remote_addr()
    local xff = h["x-forwarded-for"]
    if type(xff) == "table" then xff = concat(xff, ", ") end
    xff = xff and match(xff, "^%s*(.-)%s*$") or ""
    h["x-forwarded-for"] = (xff ~= "" and xff .. ", " or "") .. ip
    h["x-real-ip"] = ip
    h["x-forwarded-proto"] = "http"
    h["x-forwarded-host"] = host
    local for_ip = find(ip, ":", 1, true) and '"[' .. ip .. ']"' or ip
    if find(host, '["\\]') then
        h["forwarded"] = "for=" .. for_ip .. ";proto=http"
    else
        h["forwarded"] = "for=" .. for_ip .. ';host="' .. host .. '";proto=http'
    end
    h["host"] = host
    return h
end

-- What to put back on req once the chain is over (req:proxy hops set target and Host on it).
local function save(req)
    local uri = req:get_uri()
    return {
        path = match(uri, "^[^?]*"), query = req:get_query(),
        host = req:get_header("host"), authorization = req:get_header("authorization"),
        cookie = req:get_header("cookie"),
    }
end

local function restore(req, saved)
    if not saved then return end
    if sub(saved.path, 1, 1) == "/" then req:set_path(saved.path) end
    req:set_query(saved.query)
    req:set_header("host", saved.host)
    req:set_header("authorization", saved.authorization)
    req:set_header("cookie", saved.cookie)
end

-- Sends one hop after the first: res, err.
local function send(self, req, st)
    if not st.rewritten then
        req:set_path(st.path)
        req:set_query(st.query)
        req:set_header("host", st.host)
        if st.foreign then
            for _, name in ipairs(CREDENTIALS) do req:clear_header(name) end
        end
        return req:proxy(st.addr, self.proxy_opts)
    end
    local params = { method = st.method, headers = client_headers(req, st.host) }
    if st.foreign then
        for _, name in ipairs(CREDENTIALS) do params.headers[name] = nil end
    end
    for k, v in pairs(self.proxy_opts) do params[k] = v end
    local target = st.path .. (st.query and st.query ~= "" and "?" .. st.query or "")
    local res, err = http.request("http://" .. st.addr .. target, params)
    if not res then
        luaproxy.log(luaproxy.ERR, "upstream ", st.addr, " failed: ", err, ", client: ",
            req:get_remote_addr(), ", request: \"", st.method, " ", target, "\" (redirected)")
    end
    return res, err
end

local function upstream_status(err)
    return err == "timeout" and 504 or 502
end

--- res, err, status = follower:proxy(req, first) *async*: reads the request body (so a 307 or
-- 308 can send it again), sends the request with `first` ("host:port", or a function(req,
-- proxy_opts) returning res, err[, addr], e.g. one calling bal:proxy), and while the answer
-- is a 301/302/303/307/308 whose Location can be followed, requests that. Returns the final
-- response (or a 3xx not followed: no or bad Location, not http, a host not allowed), or
-- nil, err and the status the client should get: 413/408/400 for a body that could not be
-- read (nothing was sent), 508 for "redirect loop" and "too many redirects", 504 for
-- "timeout", 502 for other upstream errors. req:ctx().redirects gets the chain of URLs (the
-- request's own first) when a redirect came back.
function _M.proxy(self, req, first)
    local ftype = type(first)
    if ftype ~= "string" and ftype ~= "function" then
        error("follower:proxy: first must be \"host:port\" or a function", 2)
    end
    local body, berr = req:read_body()
    if not body then
        return nil, berr, BODY_STATUS[berr] or 400
    end
    local res, err, addr
    if ftype == "function" then
        res, err, addr = first(req, self.proxy_opts)
    else
        addr = first
        res, err = req:proxy(addr, self.proxy_opts)
    end
    if not res then
        return nil, err, upstream_status(err)
    end
    if not REDIRECT[res.status] then
        return res
    end

    local method = req:get_method()
    local host = req:get_header("host") or addr
    local url = "http://" .. host .. req:get_uri()
    local chain = { url }
    local seen = { [method .. " " .. (addr_of(host) or host) .. req:get_uri()] = true }
    -- the hop being made: method, Host, upstream, target; `rewritten` once the method (and
    -- so the body) changed, `foreign` once it left the client's authority
    local st = { method = method, host = host, addr = addr, rewritten = false, foreign = false }
    local cur = addr_of(host)
    local saved
    local hops = 0
    while REDIRECT[res.status] do
        local loc = res.headers["location"]
        if type(loc) ~= "string" or #loc > MAX_LOCATION then break end
        local t = transform(_M.parse(url), _M.parse(loc))
        if not t.scheme or lower(t.scheme) ~= "http" or not t.authority then break end
        local next_addr = addr_of(t.authority)
        if not next_addr then break end
        -- the authority of the URL just requested (a relative Location, or an absolute one
        -- naming it again) is the upstream that answered; any other must be allowed
        local same = next_addr == cur and st.addr ~= nil
        if not same and not allowed(self, next_addr) then break end

        local status = res.status
        local next_method = st.method
        if (status == 303 and st.method ~= "GET" and st.method ~= "HEAD")
            or ((status == 301 or status == 302) and st.method == "POST") then
            next_method = "GET"
        end
        local path = escape(t.path == "" and "/" or t.path, PATH_BAD)
        local query = t.query and escape(t.query, QUERY_BAD)
        local target = path .. (query and "?" .. query or "")
        url = "http://" .. t.authority .. target
        chain[#chain + 1] = url
        req:ctx().redirects = chain
        discard(res)
        local key = next_method .. " " .. next_addr .. target
        if seen[key] then
            restore(req, saved)
            return nil, "redirect loop", 508
        end
        hops = hops + 1
        if hops > self.max_redirects then
            restore(req, saved)
            return nil, "too many redirects", 508
        end
        seen[key] = true

        if next_method ~= st.method then st.rewritten = true end
        st.method, st.path, st.query = next_method, path, query
        if not same then
            st.host, st.addr, st.foreign = t.authority, next_addr, true
            cur = next_addr
        end
        if not st.rewritten and not saved then saved = save(req) end
        res, err = send(self, req, st)
        if not res then
            restore(req, saved)
            return nil, err, upstream_status(err)
        end
    end
    restore(req, saved)
    return res
end

return _M
