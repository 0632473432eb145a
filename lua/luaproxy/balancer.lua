-- luaproxy.balancer: least-connection choice over a backend list kept in a shared dict,
-- so every worker sees the same list and the same in-flight counts.
--
-- Dict layout: "backends" = JSON list of "host:port"; "version" = bumped on every change
-- (workers re-read the list only then); "conn:<addr>" = requests in flight to <addr>,
-- counted with leases so a count can never leak.

local luaproxy = require "luaproxy"

local json = luaproxy.json
local type, ipairs, tostring = type, ipairs, tostring

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

local DEFAULT_DICT = "luaproxy_upstreams"
local DEFAULT_SIZE = "1m"
local COUNT_PREFIX = "conn:"

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

--- bal, err = balancer.new{ dict = name?, backends = {...}? }
-- Backends given here seed the list only if no worker has set one yet.
function _M.new(opts)
    opts = opts or {}
    local name = opts.dict or DEFAULT_DICT
    local dict = luaproxy.shared[name]
    if not dict then
        local err
        dict, err = luaproxy.shared.new(name, opts.dict_size or DEFAULT_SIZE)
        if not dict then
            -- another worker may have created it at the same moment
            dict = luaproxy.shared[name]
            if not dict then return nil, err end
        end
    end
    local self = setmetatable({ dict = dict, version = -1, list = {}, rr = luaproxy.worker.id() or 0 }, mt)
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
        self.list = text and json.decode(text) or {}
        self.version = v
    end
    return self.list
end

--- addr, err = bal:pick(): the backend with the fewest requests in flight; ties go round-robin
function _M.pick(self)
    local list = self:backends()
    local n = #list
    if n == 0 then return nil, "no backends" end
    local dict = self.dict
    -- Ties are common (all idle): spread them round-robin. Each worker keeps its own turn,
    -- starting at its worker id, so consecutive requests alternate whichever worker gets them.
    local start = self.rr % n
    self.rr = self.rr + 1
    local best, best_count
    for i = 0, n - 1 do
        local addr = list[(start + i) % n + 1]
        local c = dict:get(count_keys[addr]) or 0
        if not best_count or c < best_count then
            best, best_count = addr, c
        end
    end
    return best
end

--- addr, err = bal:take(req): pick a backend and count `req` against it until it ends
function _M.take(self, req)
    local addr, err = self:pick()
    if not addr then return nil, err end
    local _, lerr = self.dict:lease(count_keys[addr], req)
    if lerr then return nil, lerr end
    return addr
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
