-- least_conn_lock.lua: least connection over one shared object map updated under a lock, the
-- pattern of the Kahlua proxy of 2011 (an object map with `{ [server] = connections }`
-- guarded by NewLuaLock), done so that no count can leak (issue #14 part 3).
--
-- It exists to show luaproxy.lock on a real job. For least connection itself prefer
-- examples/least_conn.lua (luaproxy.balancer): one lock-free atomic counter per backend and a
-- lease per request, nothing to wait for. Here every request takes a lock that all workers
-- share and copies the whole map in and out of the dict (its size grows with the requests in
-- flight); see the README's tour for when a lock is the right tool.
--
-- State, in the shared dict `least_conn_lock`:
--   "lb"          { backends = { addr, ... }, inflight = { [addr] = n },
--                   holders = { [token] = addr } }: one value, read and written only while
--                 holding the lock "lb:lock" (luaproxy.lock, lua-resty-lock's API)
--   "live:TOKEN"  1 while the request holding TOKEN lives, 0 once it has ended
--
-- Why counts cannot leak. The original decremented after its blocking send returned, so an
-- exception or a dropped client left the count up forever. A request can end in many ways
-- (response sent, an error in the handler, lua_budget, the client gone mid-request), and Lua
-- code after the handler's last yield is not guaranteed to run in all of them; the one thing
-- luaproxy runs whenever a request ends is the release of its leases (Rust code, no Lua). So
-- each request holds a lease on its own "live:TOKEN" key (1 now, 0 when it ends, however it
-- ends), and the decrement itself, which needs the lock and so must run where Lua can wait, is
-- done by whoever holds the lock next: every pick first reaps the holders whose live key is 0
-- (so a pick always sees exact counts), and a timer on each worker does the same every
-- REAP_INTERVAL when something ended, so the map settles to 0 without traffic too. (A __gc
-- finalizer on an object in req:ctx() would run at an unknown time and cannot wait for a lock;
-- a task spawned per request to watch for the end would cost a coroutine per request.) A live
-- key lost to eviction (a full dict) counts as ended: a count may then drop early, never leak
-- or go negative. Holders live in the shared map, not in a worker, so a reload that replaces
-- a worker's VM leaves nothing behind.
--
-- GET /admin/backends/ (from 127.0.0.1) shows the map as stored: { backends, inflight,
-- holders = n, worker = the worker that answered }.
--
-- Run:  lua main.lua --policy examples/least_conn_lock.lua --backend 127.0.0.1:9001 --backend 127.0.0.1:9002
-- Settings it reads: backends, proxy_read_timeout (as every req:proxy does).

local luaproxy = require "luaproxy"
local lock = require "luaproxy.lock"

local ipairs, pairs, tostring = ipairs, pairs, tostring
local log, ERR = luaproxy.log, luaproxy.ERR

local _M = {}

local DICT, DICT_SIZE = "least_conn_lock", "10m"
local MAP_KEY, LOCK_KEY, LIVE_PREFIX = "lb", "lb:lock", "live:"
-- The critical section never yields, so a holder keeps the lock for microseconds; exptime
-- only matters if one is stopped inside it (lua_budget), and then frees the others soon.
local LOCK_OPTS = { timeout = 5, exptime = 3 }
local REAP_INTERVAL = 0.5

local dict
local rr = 0

-- fn(lb) with the map, under the lock; the map is written back after it unless it raised.
-- Returns what fn returns, or nil, err when the lock could not be had.
local function with_lock(fn)
    local lk, err = lock.new(DICT, LOCK_OPTS)
    if not lk then return nil, err end
    local elapsed
    elapsed, err = lk:lock(LOCK_KEY)
    if not elapsed then return nil, "lock: " .. err end
    local lb = dict:get(MAP_KEY) or { backends = {}, inflight = {}, holders = {} }
    local ok, r1, r2 = pcall(fn, lb)
    local written, werr = true, nil
    if ok then written, werr = dict:set(MAP_KEY, lb) end
    lk:unlock()
    if not ok then error(r1, 0) end
    if not written then return nil, werr end
    return r1, r2
end

local function ended(token)
    local v = dict:get(LIVE_PREFIX .. token)
    return v == nil or v <= 0
end

-- Under the lock: drops the holders whose request has ended, and their counts.
local function reap(lb)
    for token, addr in pairs(lb.holders) do
        if ended(token) then
            lb.holders[token] = nil
            local n = lb.inflight[addr]
            if n and n > 0 then lb.inflight[addr] = n - 1 end
            dict:delete(LIVE_PREFIX .. token)
        end
    end
end

-- From the timer: reap only when something ended (a read of the map without the lock says).
local function reap_if_needed(premature)
    if premature then return end
    local lb = dict:get(MAP_KEY)
    if not lb then return end
    for token in pairs(lb.holders) do
        if ended(token) then
            local ok, err = with_lock(function(m) reap(m) return true end)
            if not ok then log(ERR, "least_conn_lock: reaping: ", err) end
            return
        end
    end
end

--- Called once per worker (and again on a reload) with the settings table.
function _M.init_worker(config)
    local err
    dict, err = luaproxy.shared.open(DICT, DICT_SIZE)
    if not dict then error("least_conn_lock: " .. err) end
    local backends = config.backends or {}
    local ok
    ok, err = with_lock(function(lb)
        lb.backends = backends
        local listed = {}
        for _, addr in ipairs(backends) do
            listed[addr] = true
            lb.inflight[addr] = lb.inflight[addr] or 0
        end
        -- a backend no longer listed goes once nothing counts against it
        for addr, n in pairs(lb.inflight) do
            if not listed[addr] and n == 0 then lb.inflight[addr] = nil end
        end
        return true
    end)
    if not ok then error("least_conn_lock: " .. tostring(err)) end
    rr = luaproxy.worker.id() or 0
    local timer
    timer, err = luaproxy.timer.every(REAP_INTERVAL, reap_if_needed)
    if not timer then error("least_conn_lock: " .. err) end
end

--- addr, err = _M.take(req): the backend with the fewest requests in flight, counted against
-- it until `req` ends (however it ends). Exposed so a policy built on this one can take too.
function _M.take(req)
    local ctx = req:ctx()
    ctx.lock_takes = (ctx.lock_takes or 0) + 1
    local token = req:get_request_id() .. "." .. ctx.lock_takes
    local live = LIVE_PREFIX .. token
    local ok, err = dict:set(live, 0)
    if not ok then return nil, err end
    local _, lerr = dict:lease(live, req)
    if lerr then
        dict:delete(live)
        return nil, lerr
    end
    local addr
    addr, err = with_lock(function(lb)
        reap(lb)
        local list = lb.backends
        local n = #list
        if n == 0 then return nil, "no backends" end
        -- ties (all idle is common) go round-robin, each worker from its own turn
        local best, best_count
        for i = 0, n - 1 do
            local a = list[(rr + i) % n + 1]
            local c = lb.inflight[a] or 0
            if not best_count or c < best_count then best, best_count = a, c end
        end
        rr = rr + 1
        lb.inflight[best] = best_count + 1
        lb.holders[token] = best
        return best
    end)
    if not addr then
        dict:delete(live)
        return nil, err
    end
    return addr
end

local function admin_view(req)
    if req:get_remote_addr() ~= "127.0.0.1" then
        return 403, { error = "admin endpoints are only open to 127.0.0.1" }
    end
    local lb = dict:get(MAP_KEY) or { backends = {}, inflight = {}, holders = {} }
    local holders = 0
    for _ in pairs(lb.holders) do holders = holders + 1 end
    return 200, { backends = lb.backends, inflight = lb.inflight, holders = holders,
        worker = luaproxy.worker.id() }
end

function _M.handler(req)
    local path = req:get_path()
    if path == "/admin/backends/" or path == "/admin/backends" then
        return admin_view(req)
    end
    local addr, err = _M.take(req)
    if not addr then
        log(ERR, "no backend for ", req:get_uri(), ": ", err)
        return 503, "503 Service Unavailable\n"
    end
    local res
    res, err = req:proxy(addr)
    if not res then
        if err == "timeout" then return 504, "504 Gateway Timeout\n" end
        return 502, "502 Bad Gateway\n"
    end
    return res
end

return _M
