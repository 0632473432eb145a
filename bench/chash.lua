-- bench/chash.lua: what luaproxy.chash costs and how it spreads keys. ring:find over 10 nodes
-- x 160 vnodes (1e6 calls, best of 3), the hash call alone, building and changing the ring;
-- then each node's share of 10,000 keys and the keys a removal and an addition move, with
-- luaproxy.hash32 (the default) and luaproxy.crc32.
-- Run: LUA_CPATH='./?.so;;' LUA_PATH='lua/?.lua;;' lua5.4 bench/chash.lua  (or luajit, with the
-- LuaJIT build on LUA_CPATH).
local luaproxy = require "luaproxy"
local chash = require "luaproxy.chash"

local N = 1000000
local NODES = {}
for i = 1, 10 do NODES[i] = "10.0.0." .. i .. ":8080" end
local KEYS = {}
for i = 1, 1000 do KEYS[i] = "/item/" .. i end

local function best_of(runs, fn)
    local best = math.huge
    for _ = 1, runs do
        local t0 = os.clock()
        fn()
        best = math.min(best, os.clock() - t0)
    end
    return best
end

local ring = chash.new(NODES)
local find_s = best_of(3, function()
    local find = ring.find
    for i = 1, N do find(ring, KEYS[i % 1000 + 1]) end
end)
local hash_s = best_of(3, function()
    local h = luaproxy.hash32
    for i = 1, N do h(KEYS[i % 1000 + 1]) end
end)
local loop_s = best_of(3, function()
    local x
    for i = 1, N do x = KEYS[i % 1000 + 1] end
    return x
end)
print(("%s: ring:find %.0f ns/call (luaproxy.hash32 alone %.0f ns, empty loop %.0f ns)")
    :format(jit and jit.version or _VERSION, find_s / N * 1e9, hash_s / N * 1e9, loop_s / N * 1e9))
print(("new(10 nodes) %.2f ms, add(11th) %.2f ms, remove %.2f ms"):format(
    best_of(5, function() chash.new(NODES) end) * 1e3,
    best_of(5, function() ring:add("10.0.0.11:8080"); ring:remove("10.0.0.11:8080") end) * 1e3 / 2,
    best_of(5, function() ring:remove("10.0.0.1:8080"); ring:add("10.0.0.1:8080") end) * 1e3 / 2))

local function spread(label, opts)
    local r = chash.new(NODES, opts)
    local map, n = {}, {}
    for i = 1, 10000 do
        local node = r:find("/item/" .. i)
        map[i], n[node] = node, (n[node] or 0) + 1
    end
    local lo, hi = math.huge, 0
    for _, node in ipairs(NODES) do
        lo, hi = math.min(lo, n[node] or 0), math.max(hi, n[node] or 0)
    end
    r:remove(NODES[4])
    local moved_rm = 0
    for i = 1, 10000 do if r:find("/item/" .. i) ~= map[i] then moved_rm = moved_rm + 1 end end
    r:add(NODES[4])
    r:add("10.0.0.11:8080")
    local moved_add = 0
    for i = 1, 10000 do if r:find("/item/" .. i) ~= map[i] then moved_add = moved_add + 1 end end
    print(("%-7s 10 nodes x 10,000 keys: min %d (%+.1f %%), max %d (%+.1f %%) of mean 1000; remove 1: %d moved (%s had %d); add 11th: %d moved")
        :format(label, lo, (lo - 1000) / 10, hi, (hi - 1000) / 10, moved_rm, NODES[4], n[NODES[4]], moved_add))
end
spread("hash32", nil)
spread("crc32", { hash = luaproxy.crc32 })
