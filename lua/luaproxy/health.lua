-- luaproxy.health: active and passive health checks of backends, shared by every worker.
--
--   local hc = require("luaproxy.health").new{
--       backends = function() return bal:backends() end,      -- or a plain list
--       check = { path = "/health", interval = 2, timeout = 1, fall = 3, rise = 2,
--                 valid_statuses = { 200, 302 } },             -- nil: passive checks only
--       max_fails = 1, fail_timeout = 10,                      -- nginx's passive checks
--   }
--   hc:start()                           -- in init_worker, on every worker
--   if hc:is_up(addr) then ... end       -- one dict get
--   hc:report(addr, res or err)          -- after req:proxy, for passive checks
--
-- Active checks (lua-resty-upstream-healthcheck's words): every `interval` seconds one worker,
-- whichever reaches the time slot first (a cas on one dict key), probes every backend at once
-- (GET `path`, each bounded by `timeout`); `fall` failed probes in a row mark a backend down,
-- `rise` good ones mark it up again. Passive checks (nginx's words): `max_fails` connect
-- errors, resets or timeouts on real traffic within `fail_timeout` seconds take a backend out
-- for `fail_timeout` seconds, or until `rise` good probes bring it back. Passive ejection never
-- takes out the last backend still up: only failed probes can say that every backend is down.
--
-- Dict layout ("luaproxy_health" by default; one checker per dict):
--   "st:<addr>"  state: absent or 0 = up, -1 = down (probes), t > 0 = out until time t (passive)
--   "ok:<addr>"  good probes in a row        "ng:<addr>"  failed probes in a row
--   "pf:<addr>"  passive failures in the current window (expires after fail_timeout)
--   "probe_slot" the last interval slot a worker took to probe in
--   "eject"      a short mutex, so two workers cannot eject the last two backends at once

local luaproxy = require "luaproxy"

local http = luaproxy.http
local now, log, spawn = luaproxy.now, luaproxy.log, luaproxy.spawn
local NOTICE, WARN = luaproxy.NOTICE, luaproxy.WARN
local type, ipairs, pairs, tostring, setmetatable = type, ipairs, pairs, tostring, setmetatable
local floor, find = math.floor, string.find

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

local DEFAULT_DICT = "luaproxy_health"
local DEFAULT_SIZE = "1m"
local DEFAULT_MAX_FAILS = 1
local DEFAULT_FAIL_TIMEOUT = 10
local DEFAULT_CHECK = { path = "/", interval = 2, timeout = 1, fall = 3, rise = 2 }
local DOWN = -1
local UP = 0
local SLOT_KEY = "probe_slot"
local EJECT_KEY = "eject"
local EJECT_HOLD = 1
local PROBE_BODY_MAX = 65536

-- Errors from req:proxy that say the backend (not the client, not the response) failed.
local FAILURES = {
    ["connection refused"] = true,
    ["timeout"] = true,
    ["connection reset by peer"] = true,
    ["upstream closed connection"] = true,
    ["address not available"] = true,
}
local FAILURE_PREFIXES = { "could not resolve", "no route to host", "network is unreachable",
    "host is unreachable", "connection refused", "connection reset" }

-- "st:" .. addr and friends, made once per address (bounded by the addresses ever checked).
local function key_cache(prefix)
    return setmetatable({}, { __index = function(t, addr)
        local k = prefix .. addr
        t[addr] = k
        return k
    end })
end
local ST, OK, NG, PF = key_cache("st:"), key_cache("ok:"), key_cache("ng:"), key_cache("pf:")

--- bool = health.is_failure(err): an error from req:proxy that counts against the backend
function _M.is_failure(err)
    if type(err) ~= "string" then return false end
    if FAILURES[err] then return true end
    for _, p in ipairs(FAILURE_PREFIXES) do
        if find(err, p, 1, true) == 1 then return true end
    end
    return false
end

local function positive(v, what)
    if type(v) ~= "number" or v <= 0 then
        error("health.new: " .. what .. " must be a positive number", 3)
    end
    return v
end

local function count(v, what, min)
    if type(v) ~= "number" or v ~= floor(v) or v < min then
        error("health.new: " .. what .. " must be an integer >= " .. min, 3)
    end
    return v
end

local function check_opts(c)
    if c == nil then return nil end
    if type(c) ~= "table" then error("health.new: check must be a table", 3) end
    local out = {}
    out.path = c.path or DEFAULT_CHECK.path
    if type(out.path) ~= "string" or out.path:sub(1, 1) ~= "/" then
        error("health.new: check.path must start with /", 3)
    end
    out.interval = positive(c.interval or DEFAULT_CHECK.interval, "check.interval")
    out.timeout = positive(c.timeout or DEFAULT_CHECK.timeout, "check.timeout")
    out.fall = count(c.fall or DEFAULT_CHECK.fall, "check.fall", 1)
    out.rise = count(c.rise or DEFAULT_CHECK.rise, "check.rise", 1)
    if c.host ~= nil and type(c.host) ~= "string" then
        error("health.new: check.host must be a string", 3)
    end
    out.host = c.host
    if c.valid_statuses ~= nil then
        if type(c.valid_statuses) ~= "table" or #c.valid_statuses == 0 then
            error("health.new: check.valid_statuses must be a list of status codes", 3)
        end
        out.valid = {}
        for _, s in ipairs(c.valid_statuses) do
            out.valid[count(s, "check.valid_statuses[i]", 100)] = true
        end
    end
    return out
end

--- hc, err = health.new{ dict?, backends, check?, max_fails?, fail_timeout? }
function _M.new(opts)
    if type(opts) ~= "table" then error("health.new: opts must be a table", 2) end
    local backends = opts.backends
    if type(backends) ~= "function" and type(backends) ~= "table" then
        error("health.new: backends must be a list or a function returning one", 2)
    end
    local check = check_opts(opts.check)
    local max_fails = count(opts.max_fails or DEFAULT_MAX_FAILS, "max_fails", 0)
    local fail_timeout = positive(opts.fail_timeout or DEFAULT_FAIL_TIMEOUT, "fail_timeout")
    local name = opts.dict or DEFAULT_DICT
    if type(name) ~= "string" then error("health.new: dict must be a name", 2) end
    local dict, err = luaproxy.shared.open(name, opts.dict_size or DEFAULT_SIZE)
    if not dict then return nil, err end
    return setmetatable({
        dict = dict, backends = backends, check = check,
        max_fails = max_fails, fail_timeout = fail_timeout, timer = nil,
    }, mt)
end

local function list_of(self)
    local b = self.backends
    if type(b) == "function" then b = b() end
    return b or {}
end

-- luaproxy_upstream_up{upstream}: 1 up, 0 down or ejected, for every backend listed; set at
-- each interval and on every change (a process-wide gauge: every worker writes the same
-- values, read from the shared state).
local up_gauge
local function publish(self)
    up_gauge = up_gauge or luaproxy.metrics.gauge("luaproxy_upstream_up",
        "1 when health checks let traffic go to the backend, else 0", { "upstream" })
    local listed = {}
    for _, addr in ipairs(list_of(self)) do
        listed[addr] = true
        local v = self.dict:get(ST[addr])
        local up = not v or v == UP or (v > 0 and now() >= v)
        up_gauge:set(up and 1 or 0, { addr })
    end
    local was = self.published or {}
    for addr in pairs(was) do
        if not listed[addr] then up_gauge:del({ addr }) end
    end
    self.published = listed
end

--- up = hc:is_up(addr): false while probes say it is down or passive checks took it out
function _M.is_up(self, addr)
    local v = self.dict:get(ST[addr])
    if not v or v == UP then return true end
    if v < 0 then return false end
    if now() < v then return false end
    -- A passive ejection that has run its time: the caller that flips it logs it.
    if self.dict:cas(ST[addr], v, UP) then
        self.dict:delete(PF[addr])
        log(NOTICE, "health: backend ", addr, " is up again: fail_timeout (", self.fail_timeout, " s) passed")
        publish(self)
    end
    return true
end

-- Whether some backend other than `addr` in the list is up now.
local function others_up(self, addr)
    for _, other in ipairs(list_of(self)) do
        if other ~= addr and self:is_up(other) then return true end
    end
    return false
end

--- hc:report(addr, res_or_err): the outcome of a real request to `addr`; an error string
-- that is_failure() counts moves it towards max_fails. Returns true when this report took
-- the backend out.
function _M.report(self, addr, outcome)
    if type(outcome) ~= "string" or self.max_fails == 0 or not _M.is_failure(outcome) then
        return false
    end
    local dict = self.dict
    local n = dict:incr(PF[addr], 1, 0, self.fail_timeout)
    if not n or n < self.max_fails then return false end
    local cur = dict:get(ST[addr])
    if cur and cur ~= UP then return false end -- already out
    -- One ejection at a time across workers, so two cannot take out the last two backends.
    if not dict:add(EJECT_KEY, true, EJECT_HOLD) then return false end
    local ejected = false
    cur = dict:get(ST[addr])
    if not cur or cur == UP then
        if others_up(self, addr) then
            dict:set(ST[addr], now() + self.fail_timeout)
            dict:set(OK[addr], 0)
            dict:delete(PF[addr])
            ejected = true
            log(NOTICE, "health: backend ", addr, " is down: ", n, " failures within ",
                self.fail_timeout, " s (last: ", outcome, "); out for ", self.fail_timeout, " s")
        elseif n == self.max_fails then
            log(WARN, "health: backend ", addr, " failed ", n, " times (last: ", outcome,
                ") but is the last one up; kept until probes say it is down")
        end
    end
    dict:delete(EJECT_KEY)
    if ejected then publish(self) end
    return ejected
end

-- One probe: true, or false and why.
local function probe(self, addr)
    local c = self.check
    local res, err = http.request("http://" .. addr .. c.path, {
        headers = { host = c.host or addr, ["user-agent"] = "luaproxy health check" },
        connect_timeout = c.timeout, send_timeout = c.timeout, read_timeout = c.timeout,
        max_body_size = PROBE_BODY_MAX,
    })
    if not res then return false, err end
    local s = res.status
    -- read (and drop) the body so the connection can be pooled; the status alone decides
    res:read_body()
    if c.valid then
        if not c.valid[s] then return false, "status " .. s end
    elseif s >= 400 then
        return false, "status " .. s
    end
    return true
end

-- Applies one probe's result to the shared state (only the prober of this slot writes here).
local function record(self, addr, ok, why)
    local dict, c = self.dict, self.check
    local raw = dict:get(ST[addr])
    local cur = raw or UP
    if ok then
        dict:set(NG[addr], 0)
        local n = dict:incr(OK[addr], 1, 0)
        if cur ~= UP and n and n >= c.rise and dict:cas(ST[addr], raw, UP) then
            dict:delete(PF[addr])
            log(NOTICE, "health: backend ", addr, " is up: ", n, " good probes in a row")
        end
    else
        dict:set(OK[addr], 0)
        local n = dict:incr(NG[addr], 1, 0)
        if cur ~= DOWN and n and n >= c.fall then
            -- probes are the truth: this overrides a passive ejection, and may take out the last
            dict:set(ST[addr], DOWN)
            log(NOTICE, "health: backend ", addr, " is down: ", n, " failed probes in a row (last: ",
                tostring(why), ")")
        end
    end
end

--- n = hc:probe_all(): probes every backend now, concurrently, and records the results;
-- returns how many were probed. start() calls it from one worker per interval.
function _M.probe_all(self)
    if not self.check then error("health: probe_all needs a check table", 2) end
    local list = list_of(self)
    local tasks = {}
    for i, addr in ipairs(list) do
        tasks[i] = spawn(probe, self, addr)
    end
    for i, task in ipairs(tasks) do
        local done, ok, why = task:wait()
        if done then
            record(self, list[i], ok, why)
        else
            record(self, list[i], false, ok)
        end
    end
    publish(self)
    return #list
end

-- The timer's callback on every worker: the first to claim this interval's slot probes.
local function tick(premature, self)
    if premature then return end
    local interval = self.check.interval
    local slot = floor(now() / interval)
    local dict = self.dict
    local last = dict:get(SLOT_KEY)
    if last and last >= slot then
        publish(self) -- what another worker's probes found (and passive ejections that ran out)
        return
    end
    if not dict:cas(SLOT_KEY, last, slot) then return end -- another worker took it
    self:probe_all()
end

--- ok, err = hc:start(): from init_worker on every worker; one of them probes per interval.
-- Without a check table only passive checks run, and this does nothing.
function _M.start(self)
    if not self.check then return true end
    if self.timer then return nil, "already started" end
    local timer, err = luaproxy.timer.every(self.check.interval, tick, self)
    if not timer then return nil, err end
    self.timer = timer
    -- a first round now rather than one interval from now (still one worker per slot)
    luaproxy.timer.at(0, tick, self)
    return true
end

--- hc:stop(): no more probes from this worker
function _M.stop(self)
    if self.timer then
        self.timer:cancel()
        self.timer = nil
    end
    return true
end

--- status = hc:status(): { [addr] = { up, state, fails, successes, failures, out_for? } }
function _M.status(self)
    local dict, out, t = self.dict, {}, now()
    for _, addr in ipairs(list_of(self)) do
        local up = self:is_up(addr)
        local v = dict:get(ST[addr])
        local e = {
            up = up,
            state = up and "up" or (v == DOWN and "down" or "ejected"),
            fails = dict:get(PF[addr]) or 0,
            successes = dict:get(OK[addr]) or 0,
            failures = dict:get(NG[addr]) or 0,
        }
        if not up and v and v > 0 then e.out_for = v - t end
        out[addr] = e
    end
    return out
end

--- hc:reset(): forgets every backend's state (all up)
function _M.reset(self)
    for _, addr in ipairs(list_of(self)) do
        for _, keys in pairs({ ST, OK, NG, PF }) do self.dict:delete(keys[addr]) end
    end
    publish(self)
    return true
end

return _M
