-- luaproxy.json's settings (cjson's encode_*/decode_* functions and new()) against Debian's
-- lua-cjson 2.1.0 where it has them, and against OpenResty's lua-cjson README for its additions
-- (array_mt, empty_array, empty_array_mt, encode_empty_table_as_object,
-- decode_array_with_array_mt, encode_escape_forward_slash, encode_number_precision up to 16).
-- Every test works on a fresh json.new() / cjson.new() unless it is about the module itself.
local luaproxy = require "luaproxy"
local util = require "spec.support.util"
local json = luaproxy.json
-- Debian's lua-cjson is the reference (`make deps` installs it): the comparison never skips.
local cjson = require "cjson.safe"

local SETTERS = {
    "encode_sparse_array", "encode_max_depth", "decode_max_depth", "encode_number_precision",
    "encode_escape_forward_slash", "encode_invalid_numbers", "decode_invalid_numbers",
    "encode_empty_table_as_object", "decode_array_with_array_mt", "encode_keep_buffer",
}

-- {ok, values...} or {false, reason}: the reason is what luaL_argerror puts in parentheses,
-- without the function name and argument number (Debian's cjson names the function
-- 'cjson.safe.x', and reports every range error as argument #1).
local function call(f, ...)
    local r = table.pack(pcall(f, ...))
    if r[1] then return r end
    return { false, (tostring(r[2]):match("%((.*)%)$")) or tostring(r[2]) }
end

local function is_nan(x) return x ~= x end

-- Two results of decode are equal: deep-equal tables, NaN equal to NaN.
local function same_value(a, b)
    if type(a) == "table" and type(b) == "table" then
        for k, v in pairs(a) do if not same_value(v, b[k]) then return false end end
        for k in pairs(b) do if a[k] == nil then return false end end
        return true
    end
    if type(a) == "number" and type(b) == "number" and is_nan(a) then return is_nan(b) end
    return a == b
end

describe("luaproxy.json settings", function()
    it("has every cjson 2.1 setter, plus OpenResty's, and new()", function()
        local names = { "encode", "decode", "new" }
        for _, n in ipairs(SETTERS) do names[#names + 1] = n end
        for _, n in ipairs(names) do
            assert.is_function(json[n], n)
            assert.is_function(json.new()[n], n)
        end
        for _, n in ipairs({ "encode_sparse_array", "encode_max_depth", "decode_max_depth",
            "encode_number_precision", "encode_invalid_numbers", "decode_invalid_numbers", "encode_keep_buffer" }) do
            assert.is_function(cjson[n], "Debian's cjson has " .. n)
        end
    end)

    it("reads the defaults when called with no argument (cjson's, except where luaproxy documents its own)", function()
        local j, c = json.new(), cjson.new()
        for _, n in ipairs({ "encode_sparse_array", "encode_max_depth", "decode_max_depth",
            "encode_invalid_numbers", "encode_keep_buffer" }) do
            assert.are.same(call(c[n]), call(j[n]), n)
        end
        assert.are.same({ false, 2, 10 }, { j.encode_sparse_array() })
        -- luaproxy's documented defaults: shortest round-trip floats (17), strict numbers,
        -- decoded arrays marked with array_mt; cjson: 14, lenient, unmarked.
        assert.are.equal(17, j.encode_number_precision())
        assert.are.equal(14, c.encode_number_precision())
        assert.is_false(j.decode_invalid_numbers())
        assert.is_true(c.decode_invalid_numbers())
        assert.is_true(j.decode_array_with_array_mt())
        assert.is_true(j.encode_empty_table_as_object())
        assert.is_true(j.encode_escape_forward_slash())
    end)

    it("takes and refuses arguments as Debian's cjson does, returning the settings after", function()
        local A = table.pack
        local cases = {
            encode_sparse_array = { A(), A("on"), A("off"), A(true, 3), A(nil, nil, 5), A(false, 0, 0),
                A("x"), A(1), A({}), A(false, -1), A(false, 1.5), A(false, "3"), A(false, "x"),
                A(nil, nil, 2 ^ 31), A(false, 2, 10, 4), A(nil, nil, nil, nil) },
            encode_max_depth = { A(), A(5), A(1), A(0), A(-3), A("x"), A("7"), A(7.0), A(1.5), A(true),
                A(2 ^ 31), A(1, 2), A(nil) },
            decode_max_depth = { A(), A(5), A(0), A("x"), A(3, nil) },
            -- (the range differs: Debian's 1..14, OpenResty's 1..16, ours 1..17; tested below)
            encode_number_precision = { A(14), A(), A(1), A(3), A(14), A("x"), A(2.5), A(print) },
            encode_invalid_numbers = { A(), A(true), A(false), A("on"), A("off"), A("null"), A("x"), A(1),
                A({}), A(true, 1) },
            -- luaproxy's default differs (strict): compare from the first setting on
            decode_invalid_numbers = { A(true), A(), A(false), A(), A("on"), A("off"), A("null"), A(print) },
            encode_keep_buffer = { A(), A(false), A(true), A("on"), A("nope") },
        }
        for name, list in pairs(cases) do
            local j, c = json.new(), cjson.new()
            for _, args in ipairs(list) do
                local shown = {}
                for i = 1, args.n do shown[i] = tostring(args[i]) end
                local what = name .. "(" .. table.concat(shown, ", ") .. ")"
                local want = call(c[name], table.unpack(args, 1, args.n))
                local got = call(j[name], table.unpack(args, 1, args.n))
                assert.are.same(want, got, what)
            end
        end
    end)

    it("names the function and the argument in its errors", function()
        local j = json.new()
        assert.has_error(function() j.encode_sparse_array(false, -1) end,
            "bad argument #2 to 'encode_sparse_array' (expected integer between 0 and 2147483647)")
        assert.has_error(function() j.encode_max_depth(1, 2) end,
            "bad argument #2 to 'encode_max_depth' (found too many arguments)")
        assert.has_error(function() j.encode_invalid_numbers("x") end,
            "bad argument #1 to 'encode_invalid_numbers' (invalid option 'x')")
        -- a bad argument changes nothing, not even the good ones before it
        assert.has_error(function() j.encode_sparse_array(true, 5, -1) end)
        assert.are.same({ false, 2, 10 }, { j.encode_sparse_array() })
    end)
end)

describe("luaproxy.json settings against Debian's cjson", function()
    local function both(setter, ...)
        local j, c = json.new(), cjson.new()
        assert.are.same({ c[setter](...) }, { j[setter](...) }, setter)
        return j, c
    end

    -- Same result: both nil, or texts that decode (with Debian's cjson) to the same value.
    local function same_encoding(j, c, v, what)
        local ours, theirs = j.encode(v), c.encode(v)
        if theirs == nil then
            assert.is_nil(ours, what)
        else
            assert.is_string(ours, what)
            assert.is_true(same_value(cjson.decode(theirs), cjson.decode(ours)), what .. ": " .. ours .. " vs " .. theirs)
        end
    end

    it("encode_sparse_array: refuses, converts or pads sparse arrays as cjson does", function()
        local tables = {
            { [1] = 1, [100] = 2 }, { [1] = 1, [20] = 2, [3] = 3 }, { [1] = 1, [3] = 2 }, { 1, 2, nil, 4 },
            { [11] = 1 }, { [10] = 1 }, { [1] = 1, [2] = 2, [4] = 4, [30] = 30 }, { [5] = 5, [6] = 6 }, {},
        }
        for _, args in ipairs({ {}, { true }, { false, 0 }, { false, 1, 0 }, { true, 1, 0 }, { true, 3, 5 },
            { false, 2, 100 }, { true, 1, 20 } }) do
            local j, c = both("encode_sparse_array", table.unpack(args))
            for i, t in ipairs(tables) do
                same_encoding(j, c, t, "encode_sparse_array(" .. tostring(args[1]) .. ", "
                    .. tostring(args[2]) .. ", " .. tostring(args[3]) .. ") on table " .. i)
            end
        end
        local j = json.new()
        assert.are.same({ nil, "excessively sparse array" }, { j.encode({ [1] = 1, [100] = 2 }) })
    end)

    it("encode_max_depth and decode_max_depth: the same nesting is refused", function()
        local j, c = both("encode_max_depth", 2)
        same_encoding(j, c, { { 1 } }, "depth 2")
        same_encoding(j, c, { { { 1 } } }, "depth 3")
        same_encoding(j, c, { a = { b = 1 } }, "depth 2 object")
        same_encoding(j, c, { a = { b = {} } }, "depth 3 object")
        assert.matches("nesting deeper than 2", select(2, j.encode({ { { 1 } } })))
        j, c = both("decode_max_depth", 2)
        for _, text in ipairs({ "[[1]]", "[[[1]]]", '{"a":[1]}', '{"a":[[1]]}', '[{"a":{}}]', "1" }) do
            local ours, theirs = j.decode(text), c.decode(text)
            assert.are.equal(theirs == nil, ours == nil, text)
        end
        j, c = both("decode_max_depth", 5000)
        both("encode_max_depth", 5000)
        j.encode_max_depth(5000)
        local deep = ("["):rep(3000) .. ("]"):rep(3000)
        assert.are.equal(deep, j.encode(j.decode(deep)))
    end)

    it("a raised depth limit ends in an error, never a crashed stack", function()
        local j = json.new()
        j.decode_max_depth(2 ^ 31 - 1)
        j.encode_max_depth(2 ^ 31 - 1)
        local v, err = j.decode(("["):rep(1000000))
        assert.is_nil(v)
        assert.matches("nesting too deep", err)
        local deep = {}
        local t = deep
        for _ = 1, 1000000 do t[1] = {}; t = t[1] end
        local s, err2 = j.encode(deep)
        assert.is_nil(s)
        assert.matches("nesting too deep", err2)
    end)

    it("encode_number_precision 1 to 14 prints floats exactly as cjson does", function()
        local floats = { math.pi, 1 / 3, 2 / 3, 123456.789, 1e20, 1e-7, -2.5, 0.1, 2 ^ 53 + 0.0, 1e300,
            5e-324, -0.0, 100.0, 9.5, 0.5, 0.000123456, 1234567890.125, 999999.5 }
        for p = 1, 14 do
            local j, c = both("encode_number_precision", p)
            for _, f in ipairs(floats) do
                assert.are.equal(c.encode(f), j.encode(f), ("%.17g at %d"):format(f, p))
            end
            assert.are.equal(c.encode({ [1.5] = 1 }), j.encode({ [1.5] = 1 }), "a number key at " .. p)
        end
        -- integers stay exact at any precision (as OpenResty's cjson on Lua 5.3+); LuaJIT has
        -- no integers (123456 is 123456.0), so there every number follows the precision, as
        -- its cjson does
        local j = json.new()
        j.encode_number_precision(3)
        assert.are.equal(util.JIT and "1.23e+05" or "123456", j.encode(123456))
        assert.are.equal("1.23e+05", j.encode(123456.0))
    end)

    it("encode_invalid_numbers: off refuses, null writes null, on writes what cjson reads back", function()
        local j, c = both("encode_invalid_numbers", "null")
        for _, v in ipairs({ 0 / 0, 1 / 0, -1 / 0, { 1, 1 / 0 }, { a = 0 / 0 } }) do
            assert.are.equal(c.encode(v), j.encode(v))
        end
        j, c = both("encode_invalid_numbers", false)
        for _, v in ipairs({ 0 / 0, 1 / 0, { -1 / 0 } }) do
            assert.is_nil(c.encode(v))
            assert.is_nil(j.encode(v))
        end
        -- on: JavaScript's spelling, as OpenResty's cjson writes (Debian's 2.1.0 writes nan,
        -- inf); Debian's cjson reads it back, and we read Debian's.
        j, c = both("encode_invalid_numbers", true)
        j.decode_invalid_numbers(true)
        assert.are.equal("[NaN,Infinity,-Infinity]", j.encode({ 0 / 0, 1 / 0, -1 / 0 }))
        assert.are.equal('{"Infinity":1}', j.encode({ [1 / 0] = 1 }))
        for _, v in ipairs({ 0 / 0, 1 / 0, -1 / 0 }) do
            assert.is_true(same_value(v, cjson.decode(j.encode(v))))
            assert.is_true(same_value(v, j.decode(c.encode(v))))
        end
    end)

    it("decode_invalid_numbers: on reads what cjson's strtod reads, off refuses it", function()
        local j, c = both("decode_invalid_numbers", true)
        for _, text in ipairs({ "NaN", "nan", "-nan", "-Infinity", "infinity", "inf", "Inf", "+inf", "+1", "0x10",
            "0X1f", "-0x10", "01", "-007", "1.", "-.5", "1.e3", "0x1p3", "0x1.8", "[1,NaN,0x1F,+2]",
            '{"a":-Infinity}', ".5", "1e", "0x", "nul", "+", "-", "infinit", "[1,nan]" }) do
            local ours, theirs = j.decode(text), c.decode(text)
            assert.is_true(same_value(theirs, ours), text .. ": " .. tostring(ours) .. " vs " .. tostring(theirs))
        end
        j, c = both("decode_invalid_numbers", false)
        for _, text in ipairs({ "NaN", "-Infinity", "inf", "+1", "0x10", "01", "[1,NaN]" }) do
            assert.is_nil((c.decode(text)), text)
            assert.is_nil((j.decode(text)), text)
        end
    end)

    it("encode_keep_buffer: either way, the same text", function()
        local doc = { a = { 1, 2, 3 }, b = ("x"):rep(5000) }
        local j, c = both("encode_keep_buffer", false)
        assert.are.equal(json.encode(doc), j.encode(doc))
        same_encoding(j, c, doc, "keep_buffer off")
        j.encode_keep_buffer(true)
        assert.are.equal(json.encode(doc), j.encode(doc))
    end)
end)

describe("luaproxy.json settings from OpenResty's lua-cjson", function()
    it("encode_empty_table_as_object: {} or [] for an empty table", function()
        local j = json.new()
        assert.are.equal("{}", j.encode({}))
        assert.are.equal('{"dogs":{}}', j.encode({ dogs = {} }))
        assert.is_false(j.encode_empty_table_as_object(false))
        assert.are.equal("[]", j.encode({}))
        assert.are.equal('{"dogs":[]}', j.encode({ dogs = {} }))
        assert.is_true(j.encode_empty_table_as_object("on"))
        assert.are.equal("{}", j.encode({}))
        assert.is_false(j.encode_empty_table_as_object("off"))
        assert.are.equal("[]", j.encode({}))
        assert.is_true(j.encode_empty_table_as_object(true))
        assert.are.equal('{"a":1}', j.encode({ a = 1 }))
    end)

    it("empty_array, array_mt and empty_array_mt encode as the README shows", function()
        local j = json.new()
        local text = j.encode({ foo = "bar", some_object = {}, some_array = j.empty_array })
        assert.matches('"some_object":{}', text, 1, true)
        assert.matches('"some_array":[]', text, 1, true)
        assert.are.equal('["hello","world"]', j.encode(setmetatable({ "hello", "world" }, j.array_mt)))
        local t = {}
        t[1] = "one"; t[2] = "two"; t[4] = "three"; t.foo = "bar"
        assert.are.equal('["one","two",null,"three"]', j.encode(setmetatable(t, j.array_mt)))
        assert.are.equal('{"some_array":[]}', j.encode({ some_array = setmetatable({}, j.empty_array_mt) }))
        assert.are.equal("[1,2]", j.encode(setmetatable({ 1, 2 }, j.empty_array_mt)))
        assert.are.equal('{"a":1}', j.encode(setmetatable({ a = 1 }, j.empty_array_mt)))
        assert.are.equal("[]", j.encode(setmetatable({ foo = "bar" }, j.array_mt)))
        -- one of each per VM, shared by every instance
        assert.are.equal(json.empty_array_mt, j.empty_array_mt)
        assert.are.equal(json.array_mt, j.array_mt)
        assert.are.equal(json.empty_array, j.empty_array)
        assert.are.equal(cjson.null, j.null)
    end)

    it("decode_array_with_array_mt: on by default (luaproxy), off gives plain tables as cjson's", function()
        local j = json.new()
        -- array_mt is mlua's array metatable, which is protected (getmetatable gives false)
        assert.are.equal(j.array_mt, debug.getmetatable(j.decode("[]")))
        assert.are.equal('{"my_array":[]}', j.encode(j.decode('{"my_array":[]}')))
        assert.is_false(j.decode_array_with_array_mt(false))
        local t = j.decode('{"my_array":[],"b":[1]}')
        assert.is_nil(debug.getmetatable(t.my_array))
        assert.is_nil(debug.getmetatable(t.b))
        assert.are.equal('{"my_array":{}}', j.encode({ my_array = t.my_array }))
        assert.is_true(j.decode_array_with_array_mt(true))
        assert.are.equal(j.array_mt, debug.getmetatable(j.decode("[1]")))
    end)

    it("encode_escape_forward_slash: \\/ by default, / when off", function()
        local j = json.new()
        assert.are.equal('"a\\/b"', j.encode("a/b"))
        assert.is_false(j.encode_escape_forward_slash(false))
        assert.are.equal('"http://x/y"', j.encode("http://x/y"))
        assert.are.equal('{"a/b":"c/d"}', j.encode({ ["a/b"] = "c/d" }))
        assert.are.equal('"\\"\\\\\\n\\u0001"', j.encode('"\\\n\1'))
        assert.is_true(j.encode_escape_forward_slash("on"))
        assert.are.equal('"a\\/b"', j.encode("a/b"))
    end)

    it("encode_number_precision goes to 16 (OpenResty) and 17 is the shortest round trip", function()
        local j = json.new()
        assert.are.equal(16, j.encode_number_precision(16))
        assert.are.equal("0.3333333333333333", j.encode(1 / 3))
        assert.are.equal("0.3", j.encode(0.1 + 0.2))
        assert.are.equal(17, j.encode_number_precision(17))
        assert.are.equal("0.30000000000000004", j.encode(0.1 + 0.2))
        assert.are.equal(0.1 + 0.2, j.decode(j.encode(0.1 + 0.2)))
        for _, bad in ipairs({ 0, 18 }) do
            assert.has_error(function() j.encode_number_precision(bad) end,
                "bad argument #1 to 'encode_number_precision' (expected integer between 1 and 17)")
        end
    end)
end)

describe("luaproxy.json instances", function()
    it("new() has settings of its own: changing one changes neither the module nor another", function()
        local a, b = json.new(), json.new()
        a.encode_sparse_array(true)
        a.encode_escape_forward_slash(false)
        a.encode_number_precision(3)
        a.decode_invalid_numbers(true)
        local t = { [1] = 1, [100] = 2, s = "a/b", f = 1 / 3 }
        assert.is_truthy(a.encode(t))
        assert.are.equal('"a/b"', a.encode("a/b"))
        assert.are.equal("0.333", a.encode(1 / 3))
        assert.are.equal(1, a.decode("+1"))
        for _, other in ipairs({ b, json, a.new() }) do
            assert.are.same({ nil, "excessively sparse array" }, { other.encode({ [1] = 1, [100] = 2 }) })
            assert.are.equal('"a\\/b"', other.encode("a/b"))
            assert.are.equal("0.3333333333333333", other.encode(1 / 3))
            assert.is_nil((other.decode("+1")))
            assert.are.same({ false, 2, 10 }, { other.encode_sparse_array() })
        end
    end)

    it("two workers' VMs do not share settings, nor with the main program", function()
        local d = luaproxy.shared.new("json_settings_spec_workers", "64k")
        local policy = util.write_temp("json_settings_workers.lua", [[
            local luaproxy = require "luaproxy"
            local json = luaproxy.json
            local d = luaproxy.shared.json_settings_spec_workers
            local function wait_until(cond)
                local deadline = luaproxy.now() + 10
                while not cond() do
                    if luaproxy.now() > deadline then error("timed out waiting for worker 0") end
                    luaproxy.sleep(0.005)
                end
            end
            return {
                init_worker = function()
                    local me = luaproxy.worker.id()
                    if me == 0 then
                        json.encode_sparse_array(true)
                        json.encode_escape_forward_slash(false)
                        json.decode_array_with_array_mt(false)
                        d:set("set", true)
                    else
                        -- only after worker 0 changed its settings
                        wait_until(function() return d:get("set") end)
                        -- a worker thread's stack survives a raised limit too
                        json.decode_max_depth(2 ^ 31 - 1)
                        local v, err = json.decode(("["):rep(300000))
                        d:set("deep" .. me, tostring(v) .. " " .. tostring(err))
                    end
                    d:set("sparse" .. me, json.encode({ [1] = 1, [100] = 2 }) or "refused")
                    d:set("slash" .. me, json.encode("a/b"))
                    d:set("mt" .. me, debug.getmetatable(json.decode("[]")) == json.array_mt)
                end,
                handler = function() return 200, { items = {}, url = "/x" } end,
            }
        ]])
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 2 })
            srv:close()
            srv:wait()
        end, 30)
        assert.are.same({ ["1"] = 1, ["100"] = 2 }, json.decode(d:get("sparse0")))
        assert.are.equal("refused", d:get("sparse1"))
        assert.are.equal('"a/b"', d:get("slash0"))
        assert.are.equal('"a\\/b"', d:get("slash1"))
        assert.is_false(d:get("mt0"))
        assert.is_true(d:get("mt1"))
        assert.matches("^nil invalid json: nesting too deep", d:get("deep1"))
        assert.are.same({ false, 2, 10 }, { json.encode_sparse_array() })
        assert.is_true(json.encode_escape_forward_slash())
        assert.are.equal(1000, json.decode_max_depth())
    end)

    it("a handler's table body is encoded with its VM's luaproxy.json settings", function()
        local status, body
        json.encode_empty_table_as_object(false)
        json.encode_escape_forward_slash(false)
        local ok, err = pcall(util.run, function()
            local srv = util.serve_handler(function() return 200, { items = {}, url = "/x" } end)
            status, body = util.get("http://127.0.0.1:" .. srv.port .. "/")
            util.shut(srv)
        end)
        json.encode_empty_table_as_object(true)
        json.encode_escape_forward_slash(true)
        assert(ok, err)
        assert.are.equal(200, status)
        assert.are.same({ items = {}, url = "/x" }, json.decode(body))
        assert.matches('"items":[]', body, 1, true)
        assert.matches('"url":"/x"', body, 1, true)
    end)
end)
