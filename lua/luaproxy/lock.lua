-- luaproxy.lock: a lock in a shared dict, seen by every worker (lua-resty-lock's API).
--   local lock = require("luaproxy.lock").new("locks", { timeout = 5, exptime = 30 })
--   local elapsed, err = lock:lock("key")   -- waits without blocking the worker
--   ... critical section ...
--   lock:unlock()
-- The key is taken with an atomic dict:add, so exactly one holder wins; waiters poll with an
-- exponential back-off (1 ms doubling to 0.5 s, like lua-resty-lock) and yield in between, so
-- the worker keeps serving other requests. `exptime` frees a lock whose holder died.

local luaproxy = require "luaproxy"

local sleep, now = luaproxy.sleep, luaproxy.now
local type, tostring, setmetatable = type, tostring, setmetatable

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

local DEFAULT_TIMEOUT = 5
local DEFAULT_EXPTIME = 30
local FIRST_STEP = 0.001
local MAX_STEP = 0.5

local token_seq = 0

--- lock, err = lock.new(dict_name, opts?): opts.timeout (s to wait, 0 = try once),
-- opts.exptime (s the lock lives at most)
function _M.new(dict_name, opts)
    if type(dict_name) ~= "string" then
        error("lock.new: dict_name must be a string", 2)
    end
    local dict = luaproxy.shared[dict_name]
    if not dict then
        return nil, "dict not found"
    end
    opts = opts or {}
    local timeout = opts.timeout or DEFAULT_TIMEOUT
    local exptime = opts.exptime or DEFAULT_EXPTIME
    if type(timeout) ~= "number" or timeout < 0 or type(exptime) ~= "number" or exptime <= 0 then
        error("lock.new: timeout must be >= 0 and exptime > 0", 2)
    end
    token_seq = token_seq + 1
    return setmetatable({
        dict = dict, timeout = timeout, exptime = exptime, key = nil,
        -- identifies this holder, so an unlock after expiry cannot free someone else's lock
        token = tostring(luaproxy.worker.id() or "main") .. ":" .. token_seq .. ":" .. now(),
    }, mt)
end

--- elapsed, err = lock:lock(key): seconds waited, or nil, "timeout" / "locked" (already held
-- by this object)
function _M.lock(self, key)
    if type(key) ~= "string" then
        error("lock:lock: key must be a string", 2)
    end
    if self.key then
        return nil, "locked"
    end
    local start = now()
    local step = FIRST_STEP
    while true do
        local ok, err = self.dict:add(key, self.token, self.exptime)
        if ok then
            self.key = key
            return now() - start
        end
        if err ~= "exists" then
            return nil, err
        end
        local waited = now() - start
        if waited >= self.timeout then
            return nil, "timeout"
        end
        local left = self.timeout - waited
        sleep(step < left and step or left)
        step = step * 2
        if step > MAX_STEP then step = MAX_STEP end
    end
end

--- ok, err = lock:unlock(): true, or nil, "unlocked" (not held) / "expired" (taken over)
function _M.unlock(self)
    local key = self.key
    if not key then
        return nil, "unlocked"
    end
    self.key = nil
    local ok = self.dict:cas(key, self.token, "") -- only our own token, then delete
    if not ok then
        return nil, "expired"
    end
    self.dict:delete(key)
    return true
end

--- ok, err = lock:expire(seconds?): extends a held lock (exptime by default)
function _M.expire(self, seconds)
    if not self.key then
        return nil, "unlocked"
    end
    if self.dict:get(self.key) ~= self.token then
        return nil, "expired"
    end
    return self.dict:expire(self.key, seconds or self.exptime)
end

return _M
