-- luaproxy.test: test a policy in plain busted, in milliseconds, with no socket and no real
-- waiting (docs/testing.md).
--
--   local t = require "luaproxy.test"
--   local up = t.upstream("127.0.0.1:9001", function(req) return 200, "hi" end)
--   local app = assert(t.load("examples/least_conn.lua", { backends = { "127.0.0.1:9001" } }))
--   local res = app:request{ path = "/" }          -- { status, headers, body }
--   t.clock:advance(300)                            -- timers, TTLs, health checks: at once
--   t.reset()                                       -- between specs
--
-- The policy runs in this VM through the production request path (the connection loop, the
-- request and response objects, dicts, caches, balancer, log phase) on a runtime of its own
-- whose clock is virtual: it moves when a spec advances it, or, while a request runs and every
-- task waits on time, straight to the next timer. Upstreams are fakes (t.upstream); an address
-- without one refuses connections. The Rust half is luaproxy._kit (src/kit).

local luaproxy = require "luaproxy"

local kit = luaproxy._kit
local json = luaproxy.json
local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local concat, insert, sort = table.concat, table.insert, table.sort
local setmetatable, error, select = setmetatable, error, select
local char, format = string.char, string.format

local _M = { _VERSION = "0.1.0" }

local App = {}
local app_mt = { __index = App }
local Upstream = {}
local up_mt = { __index = Upstream }

local DEFAULT_HOST = "localhost"
local DEFAULT_REMOTE = "127.0.0.1"

-- Every log entry since the kit started, in order; each app shows those since it loaded.
local entries = {}

local function drain()
    for _, e in ipairs(kit.logs()) do
        entries[#entries + 1] = e
    end
end

local IS_SETTING = {}
for _, k in ipairs(luaproxy.server_settings) do IS_SETTING[k] = true end

local function unescape(s)
    s = s:gsub("+", " ")
    return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

local function escape(s)
    return (tostring(s):gsub("[^%w%-%._~]", function(c) return format("%%%02X", c:byte()) end))
end

-- "a=1&b=2&a=3" -> { a = { "1", "3" }, b = "2" } (names and values %-decoded)
-- out[k] = v, or a list of the values when k repeats (ngx's get_uri_args/get_headers shape)
local function add(out, k, v)
    local had = out[k]
    if had == nil then
        out[k] = v
    elseif type(had) == "table" then
        had[#had + 1] = v
    else
        out[k] = { had, v }
    end
end

local function decode_args(args)
    local out = {}
    if not args or args == "" then return out end
    for pair in args:gmatch("[^&]+") do
        local k, v = pair:match("^([^=]*)=(.*)$")
        if not k then k, v = pair, true end
        k = unescape(k)
        if v ~= true then v = unescape(v) end
        add(out, k, v)
    end
    return out
end

-- { { name, value }, ... } -> { [lowercased name] = value, or a list when repeated }
local function header_table(list)
    local out = {}
    for _, pair in ipairs(list) do
        add(out, pair[1]:lower(), pair[2])
    end
    return out
end

-- { name = value | { values } } -> { { name, value }, ... } in a stable order
local function header_list(t, what)
    local names = {}
    for k in pairs(t) do
        if type(k) ~= "string" then error(what .. ": header names must be strings", 3) end
        names[#names + 1] = k
    end
    sort(names)
    local out = {}
    for _, k in ipairs(names) do
        local v = t[k]
        if type(v) == "table" then
            for _, one in ipairs(v) do out[#out + 1] = { k, tostring(one) } end
        elseif v ~= nil and v ~= false then
            out[#out + 1] = { k, tostring(v) }
        end
    end
    return out
end

local function has_header(list, name)
    for _, pair in ipairs(list) do
        if pair[1]:lower() == name then return true end
    end
    return false
end

local function query_string(q)
    if q == nil then return nil end
    if type(q) == "string" then return q end
    if type(q) ~= "table" then error("app:request: query must be a string or a table", 3) end
    local keys = {}
    for k in pairs(q) do keys[#keys + 1] = tostring(k) end
    sort(keys)
    local parts = {}
    for _, k in ipairs(keys) do
        local v = q[k]
        if type(v) == "table" then
            for _, one in ipairs(v) do parts[#parts + 1] = escape(k) .. "=" .. escape(one) end
        elseif v == true then
            parts[#parts + 1] = escape(k)
        else
            parts[#parts + 1] = escape(k) .. "=" .. escape(v)
        end
    end
    return concat(parts, "&")
end

-- A request table -> what _kit.requests takes: the raw HTTP/1.1 bytes and its facts.
local function encode(r)
    if type(r) ~= "table" then error("app:request: expected a table { method =, path =, ... }", 3) end
    local body = r.body
    if body ~= nil and type(body) ~= "string" then
        if type(body) == "table" then body = json.encode(body)
        else error("app:request: body must be a string or a table (sent as JSON)", 3) end
    end
    local method = r.method or (body and "POST" or "GET")
    local path = r.path or "/"
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
        error("app:request: path must start with /", 3)
    end
    local q = query_string(r.query)
    local target = (q and q ~= "") and (path .. "?" .. q) or path
    local headers = header_list(r.headers or {}, "app:request")
    if not has_header(headers, "host") then insert(headers, 1, { "Host", DEFAULT_HOST }) end
    if body and not has_header(headers, "content-length") and not has_header(headers, "transfer-encoding") then
        headers[#headers + 1] = { "Content-Length", tostring(#body) }
        if type(r.body) == "table" and not has_header(headers, "content-type") then
            headers[#headers + 1] = { "Content-Type", "application/json" }
        end
    end
    local lines = { method .. " " .. target .. " HTTP/1.1" }
    for _, h in ipairs(headers) do lines[#lines + 1] = h[1] .. ": " .. h[2] end
    lines[#lines + 1] = ""
    lines[#lines + 1] = body or ""
    return {
        raw = concat(lines, "\r\n"),
        method = method,
        remote = r.remote_addr or DEFAULT_REMOTE,
        timeout = r.timeout,
        at = r.at,
    }
end

local function response(r)
    if r.failed then return nil, r.failed end
    return { status = r.status, headers = header_table(r.headers), body = r.body, error = r.error }
end

--- res, err = app:request{ method?, path?, query?, headers?, body?, remote_addr?, timeout? }
-- Runs one request to completion: { status, headers (lowercased names), body, error? (why
-- the body stopped short) }, or nil and why no response came.
function App.request(self, r)
    local req = encode(r)
    return response(kit.requests(self.ud, { req })[1])
end

--- results, errs = app:requests{ r1, r2, ... }: the requests run concurrently, each on a
-- connection of its own (r.at = seconds: r starts that long after the others, on the virtual
-- clock); results[i] is r_i's response, or false with errs[i] saying why none came.
function App.requests(self, list)
    if type(list) ~= "table" then error("app:requests: expected a list of requests", 2) end
    local reqs = {}
    for i, r in ipairs(list) do reqs[i] = encode(r) end
    local out, errs = {}, {}
    for i, r in ipairs(kit.requests(self.ud, reqs)) do
        local res, err = response(r)
        out[i] = res or false
        errs[i] = err
    end
    return out, errs
end

--- list = app:logs(kind?): what was logged since the app loaded, in order: { kind = "error",
-- level, message, line } (luaproxy.log and the runtime's own lines), { kind = "access", line }
-- (with access_log set), { kind = "log", info, ctx } (every request's log phase). `kind`
-- keeps only those.
function App.logs(self, kind)
    drain()
    local out = {}
    for i = self.first, #entries do
        local e = entries[i]
        if kind == nil or e.kind == kind then out[#out + 1] = e end
    end
    return out
end

--- text = app:log_text(): the error and access lines since the app loaded, one per line
function App.log_text(self)
    local lines = {}
    for _, e in ipairs(self:logs()) do
        if e.line then lines[#lines + 1] = e.line end
    end
    return concat(lines, "\n")
end

local function read_config(config)
    if config == nil then return {} end
    if type(config) == "string" then
        local chunk, err = loadfile(config, "t", {})
        if not chunk then error("t.load: config file " .. err, 3) end
        config = chunk()
    end
    if type(config) ~= "table" then error("t.load: config must be a table or a config file", 3) end
    return config
end

--- app, err = t.load(policy, config?): `policy` a file path or a table { handler =,
-- init_worker =, log = }; `config` a table (or a file) as --config gives it: server settings
-- by their nginx names, the rest (backends, dicts, ...) for the policy. init_worker runs.
function _M.load(policy, config)
    if type(policy) ~= "string" and type(policy) ~= "table" then
        error("t.load: policy must be a file path or a table { handler = fn, ... }", 2)
    end
    config = read_config(config)
    local settings, plain = {}, {}
    for k, v in pairs(config) do
        plain[k] = v
        if IS_SETTING[k] then settings[k] = v end
    end
    kit.start()
    if config.log_level then luaproxy.set_log_level(config.log_level) end
    for name, size in pairs(config.dicts or {}) do
        local ok, err = luaproxy.shared.open(name, size)
        if not ok then return nil, "dict '" .. tostring(name) .. "': " .. err end
    end
    drain()
    local app = setmetatable({ first = #entries + 1 }, app_mt)
    local record = function(info, ctx)
        drain()
        entries[#entries + 1] = { kind = "log", info = info, ctx = ctx }
    end
    local ud, err = kit.load(policy, plain, settings, record)
    if not ud then return nil, err end
    app.ud = ud
    return app
end

-- The answer of a fake's function -> { status, body, headers = {{n, v}}, delay, fail }.
local function answer(first, ...)
    local a
    if type(first) == "table" then
        a = first
    else
        a = { status = first, body = (select(1, ...)), headers = (select(2, ...)) }
    end
    local status = a.status or 200
    if type(status) ~= "number" then error("fake upstream: status must be a number", 3) end
    local headers = a.headers or {}
    if type(headers) ~= "table" then error("fake upstream: headers must be a table", 3) end
    local body = a.body
    local list = header_list(headers, "fake upstream")
    if type(body) == "table" then
        body = json.encode(body)
        if not has_header(list, "content-type") then list[#list + 1] = { "Content-Type", "application/json" } end
    elseif body ~= nil then
        body = tostring(body)
    end
    return { status = status, body = body or "", headers = list, delay = a.delay, fail = a.fail }
end

--- up = t.upstream(addr, fn): a fake upstream at "host:port". fn(req) gets { method, path,
-- query (decoded), args, target, headers (lowercased), body, head } and returns status,
-- body, headers, or { status =, body =, headers =, delay = seconds, fail = "refused" |
-- "reset" | "timeout" | "truncated" }. up.requests lists what it received (refused ones
-- excepted). It serves req:proxy and luaproxy.http alike; the same address again replaces it.
function _M.upstream(addr, fn)
    if type(addr) ~= "string" or not addr:match("^[^/]+:%d+$") then
        error("t.upstream: address must be \"host:port\"", 2)
    end
    if type(fn) ~= "function" then error("t.upstream: expected a function(req)", 2) end
    local up = setmetatable({ addr = addr, requests = {} }, up_mt)
    kit.listen(addr, function(raw)
        local req = {
            method = raw.method, path = raw.path, args = raw.args, target = raw.target,
            query = decode_args(raw.args), headers = header_table(raw.header_list),
            body = raw.body, head = raw.head,
        }
        local a = answer(fn(req))
        if a.fail ~= "refused" then up.requests[#up.requests + 1] = req end
        return a
    end)
    return up
end

--- up:close(): nothing listens at up.addr any more (connections refused, open ones closed)
function Upstream.close(self)
    kit.listen(self.addr, nil)
    return true
end

--- t.clock: the virtual clock. t.clock:advance(seconds) moves it on, running every timer due
-- on the way in order (health checks, TTLs, sleeps); t.clock:now() is luaproxy.now().
_M.clock = {
    advance = function(_, secs)
        if type(secs) ~= "number" or secs < 0 then
            error("t.clock:advance: seconds must be a number >= 0", 2)
        end
        return kit.advance(secs)
    end,
    now = function() return luaproxy.now() end,
}

--- t.reset(): drops every app and fake upstream (their tasks and timers), empties every
-- shared dict and cache, and puts the clock back where it starts. Between specs.
function _M.reset()
    kit.reset()
    kit.logs() -- lines of the reset itself
    entries = {}
    return true
end

return _M
