-- bench/json.lua: luaproxy.json against lua-cjson in the same process, on a ~100 KB API-style
-- document and on small objects. Run: lua5.4 bench/json.lua  (after `make install`;
-- lua-cjson comes from Debian's lua-cjson package).
local luaproxy = require "luaproxy"
local ok_cjson, cjson = pcall(require, "cjson.safe")
local json = luaproxy.json

local function api_document(n)
    local items = {}
    for i = 1, n do
        items[i] = {
            id = i, user = { id = 1000 + i, name = "user" .. i, verified = i % 3 == 0 },
            text = "status text number " .. i .. " with some words, a link http://example.com/x/" .. i,
            score = i * 1.25, tags = { "alpha", "beta", "gamma" }, reply_to = (i % 5 == 0) and json.null or i - 1,
        }
    end
    return { data = setmetatable(items, json.array_mt), meta = { count = n, next = "cursor-abc" } }
end

local function bench(label, fn, bytes, seconds)
    local n, t0 = 0, os.clock()
    repeat
        for _ = 1, 10 do fn() end
        n = n + 10
    until os.clock() - t0 >= seconds
    local dt = os.clock() - t0
    return string.format("%-34s %10.0f ops/s %10.1f MB/s", label, n / dt, bytes * n / dt / 1e6)
end

local big = api_document(420)
local big_text = assert(json.encode(big))
local small = { id = 42, name = "x", ok = true, tags = { "a", "b" } }
local small_text = assert(json.encode(small))
print(string.format("%s, document %d bytes, small object %d bytes", _VERSION, #big_text, #small_text))
local rows = {
    bench("luaproxy.json decode ~100 KB", function() json.decode(big_text) end, #big_text, 1),
    bench("luaproxy.json encode ~100 KB", function() json.encode(big) end, #big_text, 1),
    bench("luaproxy.json decode small", function() json.decode(small_text) end, #small_text, 1),
    bench("luaproxy.json encode small", function() json.encode(small) end, #small_text, 1),
}
if ok_cjson then
    rows[#rows + 1] = bench("cjson decode ~100 KB", function() cjson.decode(big_text) end, #big_text, 1)
    rows[#rows + 1] = bench("cjson encode ~100 KB", function() cjson.encode(big) end, #big_text, 1)
    rows[#rows + 1] = bench("cjson decode small", function() cjson.decode(small_text) end, #small_text, 1)
    rows[#rows + 1] = bench("cjson encode small", function() cjson.encode(small) end, #small_text, 1)
end
for _, r in ipairs(rows) do print(r) end
