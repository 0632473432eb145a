-- bench/dict_ops.lua: the shared-dict operation loops, identical for ngx.shared.DICT (inside
-- nginx+ngx_lua, LuaJIT) and luaproxy.shared (Lua 5.4 or LuaJIT), so both sides run the same
-- Lua. Each worker calls run(); workers start every operation together (a barrier in the
-- control dict) and add their ops/s into it, so the result is the total over all workers.
-- Driven by bench/dict.sh.
local _M = {}

local BATCH = 1000
local KEYS = 1000

local function loops(d, keys, val, cache)
    local t = {
        get = function() for i = 1, BATCH do d:get(keys[i]) end end,
        set = function() for i = 1, BATCH do d:set(keys[i], val) end end,
        -- one hot counter: what least-connection counting does on every request
        incr = function() for _ = 1, BATCH do d:incr("counter", 1) end end,
    }
    if cache then
        t.cache_get = function() for i = 1, BATCH do cache:get(keys[i]) end end
        t.cache_set = function() for i = 1, BATCH do cache:set(keys[i], val, 60) end end
    end
    return t
end

_M.OPS = { "get", "set", "incr", "cache_get", "cache_set" }

--- run(d, ctl, now, sleep, workers, seconds, cache?): d = the dict under test, ctl = a
-- control dict, now/sleep = the host's clock and yielding sleep.
function _M.run(d, ctl, now, sleep, workers, seconds, cache)
    local keys, val = {}, string.rep("v", 32)
    for i = 1, KEYS do keys[i] = "key" .. i end
    if ctl:add("populating", true) then
        for i = 1, KEYS do
            d:set(keys[i], val)
            if cache then cache:set(keys[i], val, 60) end
        end
        d:set("counter", 0)
        ctl:set("populated", true)
    end
    while not ctl:get("populated") do sleep(0.001) end
    local fns = loops(d, keys, val, cache)
    for _, op in ipairs(_M.OPS) do
        local fn = fns[op]
        if fn then
            ctl:incr("arrived:" .. op, 1, 0)
            while ctl:get("arrived:" .. op) < workers do sleep(0.001) end
            local n, t0 = 0, now()
            local deadline = t0 + seconds
            repeat
                fn()
                n = n + BATCH
            until now() >= deadline
            ctl:incr("ops:" .. op, n / (now() - t0), 0)
        end
    end
    ctl:incr("done", 1, 0)
end

return _M
