-- bench/dict.lua: luaproxy.shared get/set/incr (and luaproxy.cache get/set) ops/s with N
-- worker threads, each its own Lua VM. Usage: lua5.4 bench/dict.lua WORKERS [SECONDS]
-- (or luajit with a LuaJIT build on LUA_CPATH); bench/dict.sh runs it beside nginx.
local luaproxy = require "luaproxy"
local ops = dofile("bench/dict_ops.lua")

local workers = tonumber(arg[1]) or 1
local seconds = tonumber(arg[2]) or 1
luaproxy.shared.new("bench", "64m")
local ctl = luaproxy.shared.new("ctl", "1m")
luaproxy.cache.new("bench_cache", { capacity = "64m" })

luaproxy.run(function()
    local srv = assert(luaproxy.serve{
        listen = "127.0.0.1:0", workers = workers, policy = "bench/dict_policy.lua",
        config = { workers = workers, seconds = seconds },
    })
    while (ctl:get("done") or 0) < workers do luaproxy.sleep(0.05) end
    srv:close()
    srv:wait()
end)
local out = {}
for _, op in ipairs(ops.OPS) do
    out[#out + 1] = string.format("%s=%.0f", op, ctl:get("ops:" .. op) or 0)
end
-- the hot counter, to check the incr figure (it should be close to incr ops/s x seconds)
out[#out + 1] = string.format("counter=%d", luaproxy.shared.bench:get("counter"))
print(table.concat(out, " "))
