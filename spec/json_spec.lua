-- luaproxy.json against Debian's lua-cjson (cjson.safe) on the same inputs: equal results,
-- except for the differences chosen and documented in src/json/mod.rs and docs/api.md.
local luaproxy = require "luaproxy"
local json = luaproxy.json
local util = require "support.util"
-- Debian's lua-cjson is the reference (`make deps` installs it): the comparison never skips.
local cjson = require "cjson.safe"

local DECODE_CASES = {
    '{"a":1,"b":[1,2,3],"c":{"d":null,"e":true,"f":false}}',
    '[]', '{}', '[[],{}]', 'null', 'true', '0', '-0', '12345', '-9876543210', '1.5', '-2.25e-3',
    '1E+2', '0.1', '"plain"', '"esc \\" \\\\ \\/ \\b \\f \\n \\r \\t"', '"\\u00e9\\u4e2d"',
    '"\\ud83d\\ude00"', ' [ 1 , 2 ] ', '"bytes \xc3\xa9"', '[1,[2,[3,[4]]]]',
    '{"nested":{"list":[{"x":1},{"y":[null,null]}]}}',
}

local INVALID = {
    '', ' ', '[1,]', '{"a":1,}', '{a:1}', "'x'", '[1 2]', '01', '1.', '.5', '-', '1e', 'nul', 'tru',
    '"unterminated', '"\\x"', '"\\u12"', '"\\ud83d"', '"\\ude00"', '{"a"}', '[1]x', '"tab\there"', 'NaN',
}

-- cjson accepts these; RFC 8259 does not, and neither do we (a chosen difference).
local CJSON_LENIENT = { ["01"] = true, ["1."] = true, ['"tab\there"'] = true, NaN = true }

describe("luaproxy.json.decode", function()
    it("decodes like cjson", function()
        for _, text in ipairs(DECODE_CASES) do
            local ours, err = json.decode(text)
            assert.is_nil(err, text)
            assert.are.same(cjson.decode(text), ours, text)
        end
    end)

    it("returns nil, err for invalid input, never raising", function()
        for _, text in ipairs(INVALID) do
            local v, err = json.decode(text)
            assert.is_nil(v, text)
            assert.is_string(err, text)
            assert.matches("^invalid json", err)
            if not CJSON_LENIENT[text] then assert.is_nil((cjson.decode(text)), text) end
        end
        local v, err = json.decode(42)
        assert.is_nil(v)
        assert.is_string(err)
    end)

    it("keeps integers as integers (a chosen difference: cjson gives floats)", function()
        if util.JIT then return pending("LuaJIT has no integer subtype: every number is a double") end
        assert.are.equal("integer", math.type(json.decode("1")))
        assert.are.equal("integer", math.type(json.decode("-9223372036854775808")))
        assert.are.equal("float", math.type(json.decode("1.0")))
        assert.are.equal("float", math.type(json.decode("1e2")))
        assert.are.equal("float", math.type(json.decode("9223372036854775808")))
    end)

    it("decodes null to json.null, the same sentinel as cjson.null", function()
        assert.are.equal(json.null, json.decode("null"))
        assert.are.equal(cjson.null, json.null)
    end)

    it("refuses nesting deeper than 1000 without crashing", function()
        assert.is_table(json.decode(("["):rep(1000) .. ("]"):rep(1000)))
        local v, err = json.decode(("["):rep(1001) .. ("]"):rep(1001))
        assert.is_nil(v)
        assert.matches("nesting", err)
        v, err = json.decode(("["):rep(100000))
        assert.is_nil(v)
        assert.matches("nesting", err)
    end)
end)

describe("luaproxy.json.encode", function()
    it("encodes like cjson", function()
        local cases = {
            { 1, 2, 3 }, {}, "a/b\127\1\"\\\n\t", true, false, 0.1, 1.5, -2.25, 3, -7, 1e300, 1e-300,
            { { 1 }, { { 2 } } }, { a = { b = { c = "d" } } }, { [1] = 1, [3] = 3 }, json.null, "\xc3\xa9 raw bytes",
        }
        for i, v in ipairs(cases) do
            local ours, err = json.encode(v)
            assert.is_nil(err, i)
            do
                local theirs = cjson.encode(v)
                if type(v) == "table" then
                    assert.are.same(cjson.decode(theirs), cjson.decode(ours), ours)
                elseif v == 1e300 or v == 1e-300 then -- cjson's 14 digits, ours 17: the same number
                    assert.are.equal(tonumber(theirs), tonumber(ours), ours)
                else
                    assert.are.equal(theirs, ours)
                end
            end
        end
    end)

    it("encodes empty tables as {} and arrays marked with array_mt as []", function()
        assert.are.equal("{}", json.encode({}))
        assert.are.equal("[]", json.encode(setmetatable({}, json.array_mt)))
        assert.are.equal("[]", json.encode(json.empty_array))
        assert.are.equal("[]", json.encode(json.decode("[]")))
        assert.are.equal('{"a":[]}', json.encode(json.decode('{"a":[]}')))
    end)

    it("keeps 64-bit integers exact", function()
        if util.JIT then return pending("LuaJIT has no 64-bit integers: every number is a double") end
        assert.are.equal("9007199254740993", json.encode(9007199254740993))
        assert.are.equal("-9223372036854775808", json.encode(math.mininteger))
    end)

    it("keeps numbers exact (a chosen difference: cjson rounds to 14 digits)", function()
        for _, f in ipairs({ 0.1, 1 / 3, 2 ^ 60 + 0.0, 1e-7, 123456.789, -0.0, 5e-324, 1.7976931348623157e308 }) do
            assert.are.equal(f, json.decode(json.encode(f)), tostring(f))
        end
    end)

    it("returns nil, err for what JSON cannot hold", function()
        for _, v in ipairs({ 0 / 0, 1 / 0, -1 / 0, print, { f = print }, { [true] = 1 }, { [1] = 1, [100] = 2 } }) do
            local s, err = json.encode(v)
            assert.is_nil(s)
            assert.is_string(err)
        end
        local deep = {}
        local t = deep
        for _ = 1, 1001 do t[1] = {}; t = t[1] end
        local s, err = json.encode(deep)
        assert.is_nil(s)
        assert.matches("nesting", err)
    end)

    it("round-trips nested documents", function()
        local doc = { id = 7, name = "x", tags = { "a", "b" }, geo = { lat = 51.5, lon = -0.12 }, ok = true, none = json.null }
        assert.are.same(doc, json.decode(json.encode(doc)))
    end)
end)
