-- luaproxy.chash (consistent hashing) and the hashes under it, luaproxy.crc32/hash32: the same
-- mapping whatever order nodes came in and in another process, a fair share per node, and
-- only the keys a node gains or loses move when it comes or goes.
local luaproxy = require "luaproxy"
local chash = require "luaproxy.chash"
local util = require "support.util"

local KEYS = 10000
local NODES = {}
for i = 1, 10 do NODES[i] = "10.0.0." .. i .. ":8080" end

local SORTED = { table.unpack(NODES) }
table.sort(SORTED) -- "10.0.0.10:8080" first

local function key(i) return "/item/" .. i end

-- The node of each of the KEYS keys.
local function mapping(ring)
    local out = {}
    for i = 1, KEYS do out[i] = ring:find(key(i)) end
    return out
end

local function shares(map)
    local n = {}
    for _, node in ipairs(map) do n[node] = (n[node] or 0) + 1 end
    return n
end

-- The ring's points and owners (its whole state): equal rings map every string alike.
local function same_ring(a, b)
    assert.are.equal(a.n, b.n)
    assert.are.same(a.points, b.points)
    assert.are.same(a.owners, b.owners)
end

-- What the spec's mapping is in any process: a digest of the 10,000 (key, node) answers.
local DIGEST_CODE = [[
local function digest(ring)
    local out = {}
    for i = 1, 10000 do out[i] = ring:find("/item/" .. i) end
    local text = table.concat(out, "\n")
    local lp = require "luaproxy"
    return ("%08x %08x %d"):format(lp.hash32(text), lp.crc32(text), #text)
end
]]
local digest = assert(load(DIGEST_CODE .. "return digest"))()

-- `fn` must raise an error whose message holds `text`.
local function raises(text, fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "no error (wanted '" .. text .. "')")
    assert.matches(text, tostring(err), 1, true)
end

describe("luaproxy.crc32 / luaproxy.hash32", function()
    it("are zlib's CRC-32 and a pinned 32-bit hash, as integers", function()
        assert.are.equal(0xCBF43926, luaproxy.crc32("123456789"))
        assert.are.equal(0, luaproxy.crc32(""))
        assert.are.equal(0xC75E35EC, luaproxy.hash32("123456789"))
        assert.are.equal(0xEFD01F60, luaproxy.hash32(""))
        util.assert_number_type("integer", luaproxy.hash32("x"))
        -- bytes, not text: NUL and high bytes count
        assert.are_not.equal(luaproxy.hash32("a\0b"), luaproxy.hash32("a\0c"))
        assert.are_not.equal(luaproxy.crc32("\255"), luaproxy.crc32("\254"))
    end)

    it("raise on anything but a string (numbers are not coerced)", function()
        for _, f in ipairs{ "crc32", "hash32" } do
            for _, bad in ipairs{ 1, 1.5, true, {} } do
                raises("bad argument #1 to 'luaproxy." .. f .. "' (string expected, got",
                    luaproxy[f], bad)
            end
            raises("string expected, got nil", luaproxy[f])
        end
    end)
end)

describe("luaproxy.chash", function()
    it("is luaproxy.chash too", function()
        assert.are.equal(chash, luaproxy.chash)
    end)

    it("maps keys the same way whatever order the nodes came in", function()
        local a = chash.new(NODES)
        local reversed = {}
        for i = #NODES, 1, -1 do reversed[#reversed + 1] = NODES[i] end
        local b = chash.new(reversed)
        local c = chash.new()
        for i = 0, 9 do assert.is_true(c:add(NODES[(i * 3) % 10 + 1])) end -- 1, 4, 7, 10, 3, ...
        local d = chash.new(NODES)
        assert.is_true(d:remove(NODES[5]))
        assert.is_true(d:add(NODES[5]))
        local want = mapping(a)
        for _, ring in ipairs{ b, c, d } do
            same_ring(a, ring)
            assert.are.same(want, mapping(ring))
        end
        assert.are.same(SORTED, a:nodes())
        assert.are.equal(10 * 160, a.n)
    end)

    it("maps keys the same way in a separate process", function()
        local script = util.write_temp("chash_digest.lua", DIGEST_CODE .. [[
local chash = require "luaproxy.chash"
local ring = chash.new()
for i = 10, 1, -1 do ring:add("10.0.0." .. i .. ":8080") end
io.write(digest(ring), "\n")
]])
        local out, code = util.sh(util.lua_cmd(script, 20))
        assert.are.equal(0, code, out)
        local here = digest(chash.new(NODES))
        assert.are.equal(here .. "\n", out)
        -- and the same as when this was written (a rolling upgrade must not remap keys);
        -- spec_luajit/chash_spec.lua pins the same digest for the LuaJIT build
        assert.are.equal("f6e7a460 d3a4b7fe 140932", here)
    end)

    it("gives each of 10 nodes a share of 10,000 keys within 25 % of the mean", function()
        local n = shares(mapping(chash.new(NODES)))
        local mean = KEYS / #NODES
        for _, node in ipairs(NODES) do
            local got = n[node] or 0
            assert.is_true(got >= 0.75 * mean and got <= 1.25 * mean,
                ("%s has %d keys, mean %d"):format(node, got, mean))
        end
    end)

    it("moves only the removed node's keys when one of 10 goes", function()
        local ring = chash.new(NODES)
        local before = mapping(ring)
        local gone = NODES[4]
        assert.is_true(ring:remove(gone))
        local after = mapping(ring)
        local moved = 0
        for i = 1, KEYS do
            if before[i] == gone then
                moved = moved + 1
                assert.are_not.equal(gone, after[i])
            else
                assert.are.equal(before[i], after[i], key(i))
            end
        end
        assert.is_true(moved >= 0.05 * KEYS and moved <= 0.15 * KEYS, moved .. " keys moved")
        local rest = {}
        for _, node in ipairs(NODES) do if node ~= gone then rest[#rest + 1] = node end end
        same_ring(chash.new(rest), ring)
        table.sort(rest)
        assert.are.same(rest, ring:nodes())
    end)

    it("moves keys only onto an 11th node, about 1/11 of them", function()
        local ring = chash.new(NODES)
        local before = mapping(ring)
        local new = "10.0.0.11:8080"
        assert.is_true(ring:add(new))
        local after = mapping(ring)
        local moved = 0
        for i = 1, KEYS do
            if after[i] ~= before[i] then
                moved = moved + 1
                assert.are.equal(new, after[i], key(i))
            end
        end
        assert.is_true(moved >= 0.05 * KEYS and moved <= 0.15 * KEYS, moved .. " keys moved")
        local eleven = { new }
        for _, node in ipairs(NODES) do eleven[#eleven + 1] = node end
        same_ring(chash.new(eleven), ring)
    end)

    it("scales a node's points by its weight; raising it moves keys only onto that node", function()
        local ring = chash.new(NODES)
        local before = mapping(ring)
        local heavy = NODES[2]
        assert.is_true(ring:add(heavy, 2))
        assert.is_true(ring:add(heavy, 2)) -- no change
        assert.are.equal(11 * 160, ring.n)
        local after = mapping(ring)
        for i = 1, KEYS do
            if after[i] ~= before[i] then assert.are.equal(heavy, after[i], key(i)) end
        end
        -- twice the points of each other node: about 2/11 of the keys
        local share = shares(after)[heavy]
        assert.is_true(share >= 0.75 * 2 / 11 * KEYS and share <= 1.25 * 2 / 11 * KEYS, share .. " keys")
        local weights = {}
        for _, node in ipairs(NODES) do weights[node] = 1 end
        weights[heavy] = 2
        same_ring(chash.new(weights), ring)
        local list, w = ring:nodes()
        assert.are.same(SORTED, list)
        assert.are.same(weights, w)
        -- and back: the extra points go, nothing else moves
        assert.is_true(ring:add(heavy, 1))
        same_ring(chash.new(NODES), ring)
    end)

    it("has no node for a key when empty; one node takes every key", function()
        local ring = chash.new()
        assert.are.same({ nil, "no nodes" }, { ring:find("k") })
        assert.are.same({}, ring:nodes())
        assert.are.same({ nil, "not found" }, { ring:remove("a:1") })
        assert.is_true(ring:add("a:1"))
        for i = 1, 1000 do assert.are.equal("a:1", ring:find(key(i))) end
        assert.are.equal("a:1", ring:find(""))
        assert.is_true(ring:remove("a:1"))
        assert.are.same({ nil, "no nodes" }, { ring:find("k") })
        assert.are.same({ nil, "no nodes" }, { chash.new({}):find("k") })
    end)

    it("takes another hash (luaproxy.crc32, as ngx.crc32_long) and fewer vnodes", function()
        local ring = chash.new({ "a:1", "b:2" }, { vnodes = 3, hash = luaproxy.crc32 })
        assert.are.equal(6, ring.n)
        local p = {}
        for _, node in ipairs{ "a:1", "b:2" } do
            for i = 0, 2 do p[#p + 1] = luaproxy.crc32(node .. "#" .. i) end
        end
        table.sort(p)
        for i = 1, 6 do assert.are.equal(p[i], ring.points[i]) end
        -- the owner of a key is the node of the first point at or after its hash
        for i = 1, 200 do
            local h = luaproxy.crc32(key(i))
            local want = ring.owners[1]
            for j = 1, 6 do
                if ring.points[j] >= h then want = ring.owners[j]; break end
            end
            assert.are.equal(want, ring:find(key(i)))
        end
    end)

    it("raises on misuse", function()
        local ring = chash.new(NODES)
        for _, bad in ipairs{ 1, true, {} } do
            raises("chash: find: key must be a string, got " .. type(bad), ring.find, ring, bad)
        end
        raises("key must be a string, got nil", ring.find, ring)
        raises("nodes must be a table, got string", chash.new, "a:1")
        raises("node must be a non-empty string, got number", chash.new, { 1 })
        raises("node must be a non-empty string, got an empty string", chash.new, { "" })
        raises("node 'a:1': weight must be an integer from 1 to 409", chash.new, { ["a:1"] = 0 })
        raises("got 1.5", chash.new, { ["a:1"] = 1.5 })
        raises("got true", chash.new, { ["a:1"] = true })
        raises("got 410", chash.new, { ["a:1"] = 410 })
        raises("node 'a:1' given twice with different weights", chash.new, { "a:1", ["a:1"] = 2 })
        assert.are.equal(160, chash.new({ "a:1", "a:1", ["a:1"] = 1 }).n)
        raises("vnodes must be an integer from 1 to 10000, got 0", chash.new, NODES, { vnodes = 0 })
        raises("got 1.5", chash.new, NODES, { vnodes = 1.5 })
        raises("got 160", chash.new, NODES, { vnodes = "160" })
        raises("opts must be a table, got number", chash.new, NODES, 160)
        raises("opts.hash must be a function, got string", chash.new, NODES, { hash = "crc32" })
        raises("opts.hash must return an integer from 0 to 2^32-1, got -1", chash.new, NODES,
            { hash = function() return -1 end })
        raises("got 4294967296", chash.new, NODES, { hash = function() return 4294967296 end })
        raises("chash.add: node must be a non-empty string, got nil", ring.add, ring)
        raises("weight must be an integer", ring.add, ring, "a:1", -1)
        raises("chash.remove: node must be a non-empty string, got number", ring.remove, ring, 5)
        same_ring(chash.new(NODES), ring) -- nothing changed
    end)
end)
