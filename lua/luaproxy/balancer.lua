-- luaproxy.balancer: least-connection choice over a backend list kept in a shared dict,
-- so every worker sees the same list and the same in-flight counts.
--
-- Dict layout: "backends" = JSON list of "host:port"; "version" = bumped on every change
-- (workers re-read the list only then); "conn:<addr>" = requests in flight to <addr>,
-- counted with leases so a count can never leak.
--
-- With `health = hc` (a luaproxy.health checker) pick/take skip backends that are down, and
-- bal:proxy(req) tries another backend when one refused the connection (nothing reached it).

local luaproxy = require "luaproxy"

local json = luaproxy.json
local chash = require "luaproxy.chash"
local type, ipairs, tostring, find = type, ipairs, tostring, string.find
local hash32 = luaproxy.hash32

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

local DEFAULT_DICT = "luaproxy_upstreams"
local DEFAULT_SIZE = "1m"
local COUNT_PREFIX = "conn:"
local DEFAULT_TRIES = 3

-- Errors from req:proxy raised before a connection existed: the backend got nothing, so the
-- request may go to another one. ("timeout" is not here: a connect timeout and a read
-- timeout give the same error, and after the latter the backend may have acted on it.)
local CONNECT_ERRORS = { "connection refused", "could not resolve", "address not available",
    "no route to host", "network is unreachable", "host is unreachable" }

-- "conn:" .. addr, made once per address rather than on every request (bounded by the
-- addresses ever configured).
local count_keys = setmetatable({}, { __index = function(t, addr)
    local k = COUNT_PREFIX .. addr
    t[addr] = k
    return k
end })

--- ok = balancer.valid_addr(addr): "host:port" with a port from 1 to 65535
function _M.valid_addr(addr)
    if type(addr) ~= "string" or #addr > 300 then return false end
    local host, port = addr:match("^([%w%.%-]+):(%d+)$")
    if not host then host, port = addr:match("^(%[[%x:%.]+%]):(%d+)$") end
    port = tonumber(port)
    return host ~= nil and port ~= nil and port >= 1 and port <= 65535
end

--- ok = balancer.is_connect_error(err): req:proxy failed before the backend got anything
function _M.is_connect_error(err)
    if type(err) ~= "string" then return false end
    for _, prefix in ipairs(CONNECT_ERRORS) do
        if find(err, prefix, 1, true) == 1 then return true end
    end
    return false
end

-- Errors after the request may have reached the backend but before any answer came: sent
-- again elsewhere only for an idempotent method (nginx's proxy_next_upstream error, without
-- non_idempotent), where doing it twice is harmless (RFC 9110 section 9.2.2).
local BROKEN_ERRORS = { ["upstream closed connection"] = true, ["connection reset by peer"] = true }
local IDEMPOTENT = { GET = true, HEAD = true, OPTIONS = true, PUT = true, DELETE = true }

--- ok = balancer.is_retryable(err, method): whether bal:proxy sends a request that failed
-- with `err` to another backend: a connect error always, a connection the backend closed or
-- reset before answering when `method` is idempotent
function _M.is_retryable(err, method)
    if _M.is_connect_error(err) then return true end
    return BROKEN_ERRORS[err] == true and IDEMPOTENT[method] == true
end

-- What a policy answers when a balancer or req:proxy gave up: nothing to choose from is 503,
-- a timeout 504, anything else the backend's fault as far as the client can tell: 502.
local UNAVAILABLE = { ["no backends"] = true, ["no backend up"] = true,
    ["no other backend"] = true }
local BODY_503 = "503 Service Unavailable\n"
local BODY_504 = "504 Gateway Timeout\n"
local BODY_502 = "502 Bad Gateway\n"

--- status, body = balancer.error_status(err): the answer to a failed bal:take/bal:proxy or
-- req:proxy: 503 for "no backends" / "no backend up" / "no other backend", 504 for
-- "timeout", 502 for anything else; the body is the status line's text
function _M.error_status(err)
    if type(err) ~= "string" then
        error("balancer.error_status: err must be a string", 2)
    end
    if UNAVAILABLE[err] then return 503, BODY_503 end
    if err == "timeout" then return 504, BODY_504 end
    return 502, BODY_502
end

--- bal, err = balancer.new{ dict = name?, backends = {...}?, health = hc?, mode = "least_conn"|"chash" }
-- Backends given here seed the list only if no worker has set one yet. With mode = "chash",
-- pick/take choose by opts.key on a consistent-hash ring (luaproxy.chash) over the list.
function _M.new(opts)
    opts = opts or {}
    local mode = opts.mode or "least_conn"
    if mode ~= "least_conn" and mode ~= "chash" then
        error("balancer.new: mode must be \"least_conn\" or \"chash\"", 2)
    end
    local health = opts.health
    if health ~= nil and (type(health) ~= "table" or type(health.is_up) ~= "function") then
        error("balancer.new: health must be a luaproxy.health checker", 2)
    end
    local name = opts.dict or DEFAULT_DICT
    local dict, err = luaproxy.shared.open(name, opts.dict_size or DEFAULT_SIZE)
    if not dict then return nil, err end
    local self = setmetatable({ dict = dict, version = -1, list = {}, keys = {},
        rr = luaproxy.worker.id() or 0, health = health, chash = mode == "chash",
        vnodes = opts.vnodes, dict_get = dict.get, dict_lease = dict.lease }, mt)
    if opts.backends and not dict:get("backends") then
        local ok, err = self:set_backends(opts.backends)
        if not ok then return nil, err end
    end
    return self
end

--- ok, err = bal:set_backends(list): replace the list in every worker
function _M.set_backends(self, list)
    if type(list) ~= "table" then
        return nil, "backends must be a list of host:port strings"
    end
    local clean = {}
    for i, addr in ipairs(list) do
        if not _M.valid_addr(addr) then
            return nil, "bad backend address '" .. tostring(addr) .. "'"
        end
        clean[i] = addr
    end
    if #clean == 0 and next(list) ~= nil then
        return nil, "backends must be a list of host:port strings"
    end
    local dict = self.dict
    for _, addr in ipairs(clean) do
        -- "exists" is fine: a backend that stays keeps its live count
        dict:add(COUNT_PREFIX .. addr, 0)
    end
    local text = #clean == 0 and "[]" or json.encode(clean)
    local ok, err = dict:set("backends", text)
    if not ok then return nil, err end
    dict:incr("version", 1, 0)
    return true
end

--- list = bal:backends(): the current list (re-read only when another worker changed it)
function _M.backends(self)
    local v = self.dict:get("version") or 0
    if v ~= self.version then
        local text = self.dict:get("backends")
        local list = text and json.decode(text) or {}
        local keys = {}
        for i, addr in ipairs(list) do keys[i] = count_keys[addr] end
        self.list, self.keys, self.version = list, keys, v
    end
    return self.list
end

-- The ring over the current list, rebuilt only when another worker changed the list.
local function ring_of(self)
    local list = self:backends()
    if self.ring_version ~= self.version then
        self.ring = chash.new(list, self.vnodes and { vnodes = self.vnodes } or nil)
        self.ring_version = self.version
    end
    return self.ring, #list
end

-- Whether pick may return addr: not excluded, and up. Sets the second result when excluded.
local function usable(health, exclude, addr)
    if exclude and exclude[addr] then return false, true end
    return not health or health:is_up(addr), false
end

-- chash mode: the key's node, or when it is down or excluded, the first usable node of the
-- key's rehashes (key#1 .. key#2n): the same choice in every worker and process. Rehashes can
-- all miss when few nodes are usable (with 1 of 3 up, (2/3)^7, 6% of the keys would), so after
-- them the nodes in sorted order, from a place the key's hash picks, are tried too: a key
-- finds a node whenever one is usable.
local function pick_chash(self, opts)
    local key = opts and opts.key
    if type(key) ~= "string" then
        error("bal:pick: chash mode needs opts.key (a string)", 3)
    end
    local ring, n = ring_of(self)
    if n == 0 then return nil, "no backends" end
    local health, exclude = self.health, opts.exclude
    local excluded = false
    for i = 0, n * 2 do
        local addr = ring:find(i == 0 and key or key .. "#" .. i)
        local ok, ex = usable(health, exclude, addr)
        if ok then return addr end
        excluded = excluded or ex
    end
    local nodes = ring:nodes()
    local start = hash32(key) % #nodes
    for i = 0, #nodes - 1 do
        local addr = nodes[(start + i) % #nodes + 1]
        local ok, ex = usable(health, exclude, addr)
        if ok then return addr end
        excluded = excluded or ex
    end
    return nil, excluded and "no other backend" or "no backend up"
end

-- The index in self.list of the usable backend with the fewest requests in flight, or nil
-- and why. Ties are common (all idle): they go round-robin, each worker keeping its own turn
-- from its worker id, so consecutive requests alternate whichever worker gets them. This runs
-- on every request: the dict's methods, the list and its count keys are at hand in `self`
-- (method lookups and calls were most of take's 7.1k instructions per request in callgrind).
local function least(self, exclude)
    local dict, get = self.dict, self.dict_get
    local list = self.list
    if (get(dict, "version") or 0) ~= self.version then list = self:backends() end
    local n = #list
    if n == 0 then return nil, "no backends" end
    local keys, health = self.keys, self.health
    local is_up = health and health.is_up
    local start = self.rr % n
    self.rr = self.rr + 1
    local best, best_count
    local excluded = false
    for i = 0, n - 1 do
        local j = (start + i) % n + 1
        local addr = list[j]
        if exclude and exclude[addr] then
            excluded = true
        elseif not health or is_up(health, addr) then
            local c = get(dict, keys[j]) or 0
            if not best_count or c < best_count then
                best, best_count = j, c
            end
        end
    end
    if not best then
        return nil, excluded and "no other backend" or "no backend up"
    end
    return best
end

--- addr, err = bal:pick(opts?): the backend with the fewest requests in flight (ties go
-- round-robin), or in chash mode the node of opts.key. Backends the health checker says are down, and those in opts.exclude
-- ({ [addr] = true }), are skipped: nil, "no backends" / "no backend up" / "no other backend".
function _M.pick(self, opts)
    if self.chash then return pick_chash(self, opts) end
    local j, err = least(self, opts and opts.exclude)
    if not j then return nil, err end
    return self.list[j]
end

--- addr, err = bal:take(req, opts?): pick a backend (opts as for pick) and count `req`
-- against it until it ends
function _M.take(self, req, opts)
    local addr, key, err
    if self.chash then
        addr, err = pick_chash(self, opts)
        if not addr then return nil, err end
        key = count_keys[addr]
    else
        local j
        j, err = least(self, opts and opts.exclude)
        if not j then return nil, err end
        addr, key = self.list[j], self.keys[j]
    end
    local _, lerr = self.dict_lease(self.dict, key, req)
    if lerr then return nil, lerr end
    return addr
end

--- res, err, addr = bal:proxy(req, opts?): take a backend and req:proxy to it. When the
-- connection failed before the backend got anything (balancer.is_connect_error), or the
-- backend closed or reset it before answering an idempotent request (balancer.is_retryable),
-- and the request can be sent again (no body, or a body read with req:read_body() first), another
-- backend is tried, up to opts.tries backends in all (3). Every outcome is reported to the
-- health checker. opts.proxy is passed to req:proxy; opts.key is the key in chash mode. err
-- (with addr nil) is take's when no backend could be chosen; otherwise the last backend's.
function _M.proxy(self, req, opts)
    local tries, proxy_opts, key = DEFAULT_TRIES, nil, nil
    if opts then
        tries = opts.tries or DEFAULT_TRIES
        proxy_opts = opts.proxy
        key = opts.key
        if type(tries) ~= "number" or tries < 1 then
            error("bal:proxy: opts.tries must be >= 1", 2)
        end
    end
    local health = self.health
    local addr, err = self:take(req, key and { key = key })
    if not addr then return nil, err end
    local exclude
    local tried = 1
    while true do
        local res, perr = req:proxy(addr, proxy_opts)
        if health then health:report(addr, res or perr) end
        if res then return res, nil, addr end
        -- get_body_data() is nil once an unread body was streamed: it cannot be sent again
        if tried >= tries or not _M.is_retryable(perr, req:get_method()) or req:get_body_data() == nil then
            return nil, perr, addr
        end
        exclude = exclude or {}
        exclude[addr] = true
        local next_addr = self:take(req, { exclude = exclude, key = key })
        if not next_addr then return nil, perr, addr end
        luaproxy.log(luaproxy.WARN, "upstream ", addr, " failed (", perr, "), trying ", next_addr)
        addr = next_addr
        tried = tried + 1
    end
end

--- counts = bal:counts(): { [addr] = requests in flight } for the current list
function _M.counts(self)
    local out = {}
    for _, addr in ipairs(self:backends()) do
        out[addr] = self.dict:get(COUNT_PREFIX .. addr) or 0
    end
    return out
end

return _M
