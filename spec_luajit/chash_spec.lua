-- luaproxy.chash on the LuaJIT build: hashes are doubles there, and the ring must map every
-- key exactly as the Lua 5.4 build does (a proxy fleet may mix the two).
-- Run: busted --run=luajit (after `make luajit`; the Lua 5.4 ./luaproxy.so for the comparison).
local luaproxy = require "luaproxy"
local chash = require "luaproxy.chash"
local paths = require "support.paths"

local function digest(ring)
    local out = {}
    for i = 1, 10000 do out[i] = ring:find("/item/" .. i) end
    local text = table.concat(out, "\n")
    return ("%08x %08x %d"):format(luaproxy.hash32(text), luaproxy.crc32(text), #text)
end

describe("luaproxy.chash on LuaJIT", function()
    it("hashes as the Lua 5.4 build does", function()
        assert.are.equal(0xCBF43926, luaproxy.crc32("123456789"))
        assert.are.equal(0xC75E35EC, luaproxy.hash32("123456789"))
        assert.has_error(function() luaproxy.hash32(1) end)
    end)

    it("maps 10,000 keys as a Lua 5.4 process does", function()
        local nodes = {}
        for i = 1, 10 do nodes[i] = "10.0.0." .. i .. ":8080" end
        local here = digest(chash.new(nodes))
        -- the digest spec/chash_spec.lua pins for Lua 5.4
        assert.are.equal("f6e7a460 d3a4b7fe 140932", here)
        local script = os.tmpname()
        local f = assert(io.open(script, "w"))
        f:write([[
local luaproxy = require "luaproxy"
local ring = require("luaproxy.chash").new()
for i = 10, 1, -1 do ring:add("10.0.0." .. i .. ":8080") end
local out = {}
for i = 1, 10000 do out[i] = ring:find("/item/" .. i) end
local text = table.concat(out, "\n")
io.write(("%08x %08x %d"):format(luaproxy.hash32(text), luaproxy.crc32(text), #text))
]])
        f:close()
        -- the checkout's Lua 5.4 build, whichever LuaJIT build is under test
        local root = paths.ROOT
        local so = io.open(root .. "/luaproxy.so")
        if so then so:close() else
            os.remove(script)
            pending("no Lua 5.4 build at " .. root .. "/luaproxy.so to compare with (make install)")
            return
        end
        local env = ("LUA_CPATH='%s/?.so;;' LUA_PATH='%s/lua/?.lua;;'"):format(root, root)
        local p = assert(io.popen(env .. " " .. env:gsub("LUA_(%a+)PATH", "LUA_%1PATH_5_4") .. " timeout 20 lua5.4 "
            .. script .. " 2>&1"))
        local out = p:read("*a")
        p:close()
        os.remove(script)
        assert.are.equal(here, out)
    end)
end)
