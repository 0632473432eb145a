-- bench/dict_calls.lua: nanoseconds per dict method call from one Lua VM, no loop running, no
-- contention: what a single call costs through each path (a C API or FFI hot method, an mlua
-- method). Run: LUA_CPATH='./?.so;;' lua5.4 bench/dict_calls.lua
--          LUA_CPATH='target/luajit/lib/?.so;;' luajit bench/dict_calls.lua   (after make luajit)
local luaproxy = require "luaproxy"

local N = 3000000
local d = luaproxy.shared.new("dict_calls", "1m")
local VALUE = ("v"):rep(32)
d:set("k", VALUE)
d:set("c", 0)

local function ns(f)
    local t0 = os.clock()
    f()
    return (os.clock() - t0) / N * 1e9
end

local rows = {
    { "math.abs (a plain C function)", function() local abs = math.abs for i = 1, N do abs(i) end end },
    { "d:capacity() (an mlua method)", function() for _ = 1, N do d:capacity() end end },
    { "d:get (32-byte string)", function() for _ = 1, N do d:get("k") end end },
    { "d:set (32-byte string)", function() for _ = 1, N do d:set("k", VALUE) end end },
    { "d:incr (one counter)", function() for _ = 1, N do d:incr("c", 1) end end },
}
print((jit and jit.version or _VERSION) .. ", " .. N .. " calls each")
for _, r in ipairs(rows) do
    print(string.format("%-32s %7.1f ns/call", r[1], ns(r[2])))
end
