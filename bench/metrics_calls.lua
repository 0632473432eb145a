-- bench/metrics_calls.lua: nanoseconds per luaproxy.metrics update from one Lua VM, no loop
-- running, no contention: what one call costs (a known series; the first call of each made it).
-- Run: LUA_CPATH='./?.so;;' lua5.4 bench/metrics_calls.lua
--      LUA_CPATH='target/luajit/lib/?.so;;' luajit bench/metrics_calls.lua   (after make luajit)
local luaproxy = require "luaproxy"

local N = 3000000
local m = luaproxy.metrics
local c = m.counter("bench_requests_total", "x", { "status" })
local c2 = m.counter("bench_requests2_total", "x", { "status", "upstream" })
local plain = m.counter("bench_plain_total", "x")
local g = m.gauge("bench_level", "x", { "k" })
local h = m.histogram("bench_latency_seconds", "x", { "status" })
local LABELS = { "200" }

local function ns(f)
    local t0 = os.clock()
    f()
    return (os.clock() - t0) / N * 1e9
end

local rows = {
    { "math.abs (a plain C function)", function() local abs = math.abs for i = 1, N do abs(i) end end },
    { "{ \"200\" } (the table alone)", function() local t for _ = 1, N do t = { "200" } end return t end },
    { "c:inc(1, { \"200\" })", function() for _ = 1, N do c:inc(1, { "200" }) end end },
    { "c:inc(1, LABELS) (kept table)", function() for _ = 1, N do c:inc(1, LABELS) end end },
    { "c:inc(1, { \"200\", \"10.0.0.1:80\" })", function() for _ = 1, N do c2:inc(1, { "200", "10.0.0.1:80" }) end end },
    { "plain:inc() (no labels)", function() for _ = 1, N do plain:inc() end end },
    { "plain:inc(0.5)", function() for _ = 1, N do plain:inc(0.5) end end },
    { "g:set(i, { \"k\" })", function() for i = 1, N do g:set(i, { "k" }) end end },
    { "h:observe(0.042, { \"200\" })", function() for _ = 1, N do h:observe(0.042, { "200" }) end end },
}
print((jit and jit.version or _VERSION) .. ", " .. N .. " calls each")
for _, r in ipairs(rows) do
    print(string.format("%-40s %7.1f ns/call", r[1], ns(r[2])))
end
local t0 = os.clock()
local text
for _ = 1, 100 do text = m.render() end
print(string.format("%-40s %7.1f us (%d bytes)", "render()", (os.clock() - t0) / 100 * 1e6, #text))
