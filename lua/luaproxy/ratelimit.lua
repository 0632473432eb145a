-- luaproxy.ratelimit: a per-key request rate limit shared exactly by every worker.
--
--   local rl = require("luaproxy.ratelimit").new{ rate = 10, burst = 5 }   -- per key, per second
--   local ok, err, retry_after = rl:incoming(api_key)
--   if not ok then
--       return 429, "Too Many Requests\n", { ["retry-after"] = math.ceil(retry_after) }
--   end
--
-- GCRA (the generic cell rate algorithm, as nginx's limit_req): each key keeps one number in
-- a shared dict, its theoretical arrival time (TAT). A request at time t is allowed when
-- TAT <= t + burst / rate, and then moves TAT to max(TAT, t) + 1 / rate. The read and the
-- write are one dict:cas, retried when another worker moved TAT in between, so every worker
-- sees the same budget and no request is counted twice or lost. Over T seconds a key gets
-- rate * T requests, plus 1 + burst at once when it starts idle (nginx's burst).
-- An idle key's entry expires once its TAT has passed.

local luaproxy = require "luaproxy"

local now = luaproxy.now
local type, setmetatable, tostring = type, setmetatable, tostring

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

local DEFAULT_DICT = "luaproxy_ratelimit"
local DEFAULT_SIZE = "10m"
local KEY_PREFIX = "rl:"
local MAX_TRIES = 1000 -- cas retries; contention is bounded by the worker count
local KEEP = 1         -- s an entry outlives its TAT
local EPSILON = 1e-6   -- rounding of epoch-sized floats (ulp ~2e-7 s) must not cost a burst slot

--- rl, err = ratelimit.new{ dict?, rate, burst? }: `rate` requests per second per key
-- (a float is fine: 0.5 = one every 2 s), `burst` extra requests allowed at once (0)
function _M.new(opts)
    if type(opts) ~= "table" then error("ratelimit.new: opts must be a table", 2) end
    local rate, burst = opts.rate, opts.burst or 0
    if type(rate) ~= "number" or rate <= 0 or rate ~= rate or rate == math.huge then
        error("ratelimit.new: rate must be a positive number", 2)
    end
    if type(burst) ~= "number" or burst < 0 or burst ~= burst or burst == math.huge then
        error("ratelimit.new: burst must be a number >= 0", 2)
    end
    local name = opts.dict or DEFAULT_DICT
    if type(name) ~= "string" then error("ratelimit.new: dict must be a name", 2) end
    local dict, err = luaproxy.shared.open(name, opts.dict_size or DEFAULT_SIZE)
    if not dict then return nil, err end
    local interval = 1 / rate
    return setmetatable({
        dict = dict, rate = rate, burst = burst,
        interval = interval,
        tolerance = burst * interval,
    }, mt)
end

--- ok, err, retry_after = rl:incoming(key): true when the request may go; nil, "rejected",
-- seconds until one would be allowed (a float: Retry-After wants math.ceil of it)
function _M.incoming(self, key)
    if type(key) ~= "string" or key == "" then
        error("ratelimit:incoming: key must be a non-empty string", 2)
    end
    local dict, interval, tolerance = self.dict, self.interval, self.tolerance
    local k = KEY_PREFIX .. key
    for _ = 1, MAX_TRIES do
        local t = now()
        local tat = dict:get(k)
        local base = (tat and tat > t) and tat or t
        local ahead = base - t
        if ahead > tolerance + EPSILON then
            return nil, "rejected", ahead - tolerance
        end
        local new_tat = base + interval
        local ok, err = dict:cas(k, tat, new_tat, new_tat - t + KEEP)
        if ok then return true end
        if err ~= "changed" then return nil, tostring(err) end
    end
    return nil, "busy"
end

--- rl:reset(key): forgets `key`'s history
function _M.reset(self, key)
    return self.dict:delete(KEY_PREFIX .. key)
end

return _M
