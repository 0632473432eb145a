-- The LuaJIT build's dict methods (FFI wrappers over src/shdict_ffi.rs, falling back to the C
-- API methods): the same ngx_lua results as the Lua 5.4 build, through both paths.
-- Run: busted --run=luajit (after bench/dict.sh or `make luajit` built target/luajit/lib).
local luaproxy = require "luaproxy"

local n = 0
local function dict(size)
    n = n + 1
    return assert(luaproxy.shared.new("ffi_spec_" .. n, size or "64k"))
end

describe("dict methods on LuaJIT", function()
    it("are the FFI wrappers (Lua functions), not the C API functions", function()
        local d = dict()
        for _, m in ipairs{ "get", "get_stale", "set", "add", "replace", "safe_set", "safe_add", "incr", "delete" } do
            assert.are.equal("Lua", debug.getinfo(d[m], "S").what, m)
        end
        assert.are.equal("C", debug.getinfo(d.lpush, "S").what)
    end)

    it("get/set/add/replace/delete with ngx return values", function()
        local d = dict()
        assert.are.same({ true, nil, false }, { d:set("k", "v", 0, 7) })
        assert.are.same({ "v", 7 }, { d:get("k") })
        assert.are.same({ false, "exists", false }, { d:add("k", "w") })
        assert.are.same({ false, "not found", false }, { d:replace("missing", 1) })
        assert.is_true((d:replace("k", 42)))
        assert.are.equal(42, d:get("k"))
        assert.is_true((d:set("f", 1.5)))
        assert.are.equal(1.5, d:get("f"))
        assert.is_true((d:set("b", false)))
        assert.is_false(d:get("b"))
        assert.is_true((d:set("bin", "a\0b")))
        assert.are.equal("a\0b", d:get("bin"))
        assert.is_true((d:set("empty", "")))
        assert.are.equal("", d:get("empty"))
        assert.is_true(d:delete("k"))
        assert.is_nil(d:get("k"))
        assert.is_true((d:set("b", nil)))
        assert.is_nil(d:get("b"))
        -- through the C API method: number keys, table values, bad keys, errors
        assert.is_true((d:set(12, "twelve")))
        assert.are.equal("twelve", d:get("12"))
        assert.are.equal("twelve", d:get(12))
        assert.is_true((d:set("t", { a = 1, list = { "x" } })))
        assert.are.same({ a = 1, list = { "x" } }, d:get("t"))
        assert.are.same({ false, "empty key", false }, { d:set("", 1) })
        assert.are.same({ nil, "nil key" }, { d:get(nil) })
        assert.are.same({ false, "key too long", false }, { d:set(("k"):rep(65536), 1) })
        assert.has_error(function() d:set("x", print) end)
        assert.is_true((d:set("far", "v", 1e300)))            -- clamped, not a crash
        assert.is_true(d:ttl("far") > 3e9)
        assert.has_error(function() d:set("x", 1, -1) end)
        assert.has_error(function() d:set("x", 1, 0, -1) end)
        assert.has_error(function() d:set("x", 1, 0, 2 ^ 32) end)
        assert.has_error(function() d.set("x", 1) end)
        d:rpush("l", 1)
        assert.are.same({ nil, "value is a list" }, { d:get("l") })
    end)

    it("incr: init, init_ttl, not found, not a number", function()
        local d = dict()
        assert.are.same({ nil, "not found", false }, { d:incr("c", 1) })
        assert.are.equal(5, d:incr("c", 5, 0))
        assert.are.equal(3, d:incr("c", -2))
        assert.are.equal(3.5, d:incr("c", 0.5))
        d:set("s", "x")
        assert.are.same({ nil, "not a number", false }, { d:incr("s", 1) })
        assert.are.equal(1, d:incr("t", 1, 0, 0.05))
        luaproxy.run(luaproxy.sleep, 0.1)
        assert.is_nil(d:get("t"))
        assert.has_error(function() d:incr("c", "1") end)
    end)

    it("get_stale, safe_* and eviction with forcible", function()
        local d = dict(8192)
        d:set("old", "x", 0.05, 3)
        luaproxy.run(luaproxy.sleep, 0.1)
        assert.are.same({ "x", 3, true }, { d:get_stale("old") })
        assert.are.same({ nil }, { d:get("old") })
        local m = 0
        while d:safe_add("k" .. (m + 1), ("v"):rep(100)) do m = m + 1 end
        assert.is_true(m > 10)
        assert.are.same({ false, "no memory" }, { d:safe_set("new", ("n"):rep(100)) })
        assert.is_truthy(d:get("k1"))
        assert.are.same({ true, nil, true }, { d:set("new", ("n"):rep(100)) })
        assert.is_nil(d:get("k2"))
        assert.is_truthy(d:get("k1"))
        assert.are.same({ false, "no memory", false }, { d:set("huge", ("h"):rep(9000)) })
    end)

    it("worker VMs have the ffi library and the FFI methods too", function()
        local d = dict()
        local path = os.tmpname()
        local f = assert(io.open(path, "w"))
        f:write([[
            local luaproxy = require "luaproxy"
            return function()
                local d = luaproxy.shared["]] .. "ffi_spec_" .. n .. [["]
                d:incr("hits", 1, 0)
                return 200, type(require("ffi").new) .. " " .. debug.getinfo(d.incr, "S").what
            end
        ]])
        f:close()
        local body = luaproxy.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = path, workers = 1 })
            local res = assert(luaproxy.http.request_uri("http://127.0.0.1:" .. srv.port .. "/"))
            srv:close()
            srv:wait()
            return res.body
        end)
        os.remove(path)
        assert.are.equal("function Lua", body)
        assert.are.equal(1, d:get("hits"))
    end)

    it("a compiled loop sums exactly", function()
        local d = dict()
        d:set("n", 0)
        for _ = 1, 100000 do d:incr("n", 1) end
        assert.are.equal(100000, d:get("n"))
    end)
end)
