-- luaproxy.shared: the ngx.shared.DICT methods implemented so far, without a loop (dict calls
-- never yield), plus sharing with worker VMs. Short real TTLs; no mocks of time.
local luaproxy = require "luaproxy"
local util = require "support.util"

local n = 0
local function dict(size)
    n = n + 1
    return assert(luaproxy.shared.new("shdict_spec_" .. n, size or "64k"))
end

local function sleep(s)
    util.run(luaproxy.sleep, s + 5, s)
end

describe("luaproxy.shared", function()
    it("open: the existing dict whatever its capacity, else a new one; reserved names refused", function()
        local a = assert(luaproxy.shared.open("shdict_spec_open", "64k"))
        assert.are.equal(65536, a:capacity())
        a:set("k", "v")
        local b = assert(luaproxy.shared.open("shdict_spec_open", "1m"))
        assert.are.equal("v", b:get("k"))
        assert.are.equal(65536, b:capacity())
        assert.are.equal("v", luaproxy.shared.shdict_spec_open:get("k"))
        assert.has_error(function() luaproxy.shared.open("open", "64k") end)
        assert.has_error(function() luaproxy.shared.new("open", "64k") end)
        assert.has_error(function() luaproxy.shared.open("shdict_spec_open2", "lots") end)
    end)

    it("new returns the same dict for the same name and capacity, nil, err otherwise", function()
        local d = dict("1m")
        assert.are.equal(1024 * 1024, d:capacity())
        assert.is_truthy(luaproxy.shared.new("shdict_spec_" .. n, "1m"))
        local none, err = luaproxy.shared.new("shdict_spec_" .. n, "2m")
        assert.is_nil(none)
        assert.matches("exists with capacity", err)
        assert.are.equal(d:capacity(), luaproxy.shared["shdict_spec_" .. n]:capacity())
        assert.is_nil(luaproxy.shared.no_such_dict)
        assert.has_error(function() luaproxy.shared.new("x", "lots") end)
    end)

    it("get/set/add/replace/delete with ngx return values", function()
        local d = dict()
        assert.are.same({ true, nil, false }, { d:set("k", "v", 0, 7) })
        assert.are.same({ "v", 7 }, { d:get("k") })
        assert.are.same({ false, "exists", false }, { d:add("k", "w") })
        assert.are.same({ false, "not found", false }, { d:replace("missing", 1) })
        assert.is_true((d:replace("k", 42)))
        util.assert_number_type("integer", d:get("k"))
        assert.is_true((d:set("f", 1.5)))
        assert.are.equal(1.5, d:get("f"))
        assert.is_true((d:set("b", false)))
        assert.is_false(d:get("b"))
        assert.is_true((d:set("bin", "a\0b")))
        assert.are.equal("a\0b", d:get("bin"))
        assert.is_true(d:delete("k"))
        assert.is_nil(d:get("k"))
        assert.is_true((d:set("b", nil)))
        assert.is_nil(d:get("b"))
        assert.are.same({ false, "empty key", false }, { d:set("", 1) })
        assert.are.same({ false, "key too long", false }, { d:set(("k"):rep(65536), 1) })
        assert.has_error(function() d:set("t", print) end)
    end)

    it("incr with init and init_ttl, not found, not a number", function()
        local d = dict()
        assert.are.same({ nil, "not found", false }, { d:incr("c", 1) })
        assert.are.equal(5, d:incr("c", 5, 0))
        assert.are.equal(3, d:incr("c", -2))
        assert.are.equal(3.5, d:incr("c", 0.5))
        d:set("s", "x")
        assert.are.same({ nil, "not a number", false }, { d:incr("s", 1) })
        assert.are.equal(1, d:incr("t", 1, 0, 0.1))
        sleep(0.15)
        assert.is_nil(d:get("t"))
    end)

    it("expires by TTL; ttl, expire, get_stale, flush_expired", function()
        local d = dict()
        d:set("a", "x", 0.1)
        d:set("b", "y")
        local ttl = d:ttl("a")
        assert.is_true(ttl > 0 and ttl <= 0.1)
        assert.are.equal(0, d:ttl("b"))
        assert.are.same({ nil, "not found" }, { d:ttl("zz") })
        assert.is_true((d:expire("b", 0.1)))
        sleep(0.15)
        assert.is_nil(d:get("a"))
        assert.is_nil(d:get("b"))
        assert.are.same({ "x", nil, true }, { d:get_stale("a") })
        assert.are.same({ nil, "not found" }, { d:expire("a", 1) })
        assert.are.equal(2, d:flush_expired())
        assert.are.same({ nil, nil, nil }, { d:get_stale("a") })
        d:set("c", 1, 5)
        assert.is_true((d:expire("c", 0)))
        assert.are.equal(0, d:ttl("c"))
        -- absurd lifetimes are clamped (to 100 years), never a crash; NaN is misuse
        assert.is_true((d:set("far", "v", 1e300)))
        assert.is_true(d:ttl("far") > 3e9)
        assert.is_true((d:expire("far", 1e19)))
        assert.are.equal(1, (d:incr("farc", 1, 0, 1e30)))
        assert.has_error(function() d:set("nan", 1, 0 / 0) end)
    end)

    it("lists: push, pop, llen, type errors", function()
        local d = dict()
        assert.are.equal(1, d:lpush("l", "b"))
        assert.are.equal(2, d:lpush("l", "a"))
        assert.are.equal(3, d:rpush("l", 3))
        assert.are.equal(3, d:llen("l"))
        assert.are.equal("a", d:lpop("l"))
        assert.are.equal(3, d:rpop("l"))
        assert.are.equal("b", d:rpop("l"))
        assert.is_nil(d:lpop("l"))
        assert.are.equal(0, d:llen("l"))
        d:set("s", "x")
        assert.are.same({ nil, "value not a list" }, { d:lpush("s", 1) })
        assert.are.same({ nil, "value not a list" }, { d:llen("s") })
        d:rpush("l2", 1)
        assert.are.same({ nil, "value is a list" }, { d:get("l2") })
    end)

    it("stores tables by copy, nested, never shared", function()
        local d = dict()
        local v = { name = "x", n = 1, list = { 1, 2, { deep = true } }, [10] = "ten" }
        assert.is_true((d:set("t", v)))
        local got = d:get("t")
        assert.are.same(v, got)
        assert.are_not.equal(v, got)
        v.name = "changed"
        got.n = 99
        assert.are.equal("x", d:get("t").name)
        assert.are.equal(1, d:get("t").n)
        assert.is_true((d:set("empty", {})))
        assert.are.same({}, d:get("empty"))
        local cycle = {}
        cycle.self = cycle
        assert.has_error(function() d:set("c", cycle) end)
        assert.has_error(function() d:set("k", { [{}] = 1 }) end)
        assert.has_error(function() d:set("f", { f = print }) end)
    end)

    it("cas sets only over the expected value", function()
        local d = dict()
        assert.are.same({ true, nil }, { d:cas("k", nil, "v1") })
        assert.are.same({ false, "changed" }, { d:cas("k", nil, "v2") })
        assert.are.same({ false, "changed" }, { d:cas("k", "nope", "v2") })
        assert.are.same({ true, nil }, { d:cas("k", "v1", 2) })
        assert.are.equal(2, d:get("k"))
    end)

    it("counts bytes: a full dict says no memory and free_space comes back", function()
        local d = dict(4096)
        local free = d:free_space()
        assert.are.equal(4096, free)
        assert.are.same({ false, "no memory", false }, { d:set("big", ("x"):rep(5000)) })
        assert.is_true((d:safe_set("a", ("x"):rep(1000))))
        assert.is_true(d:free_space() < free - 1000)
        d:delete("a")
        assert.are.equal(free, d:free_space())
        local keys = 0
        for i = 1, 1000 do
            if not d:safe_add("k" .. i, i) then break end
            keys = keys + 1
        end
        assert.is_true(keys > 10 and keys < 1000)
        assert.are.same({ false, "no memory" }, { d:safe_add("one-more-key", 1) })
        assert.are.equal(keys, #d:get_keys(0))
        assert.are.equal(10, #d:get_keys(10))
        d:flush_all()
        assert.are.equal(0, #d:get_keys(0))
    end)

    it("evicts the least recently used entry when full, and says so with forcible", function()
        local d = dict(8192)
        local m = 0
        while d:safe_add("k" .. (m + 1), ("v"):rep(100)) do m = m + 1 end
        assert.is_true(m > 10)
        assert.are.equal("string", type(d:get("k1")))      -- k1 is now the most recently used
        assert.are.same({ true, nil, true }, { d:set("new1", ("n"):rep(100)) })
        assert.is_nil(d:get("k2"))                          -- the oldest untouched entry went
        assert.is_truthy(d:get("k1"))
        assert.is_truthy(d:get("k3"))
        assert.are.same({ 1, nil, true }, { d:incr("counter", 1, 0) })
        assert.is_nil(d:get("k4"))
        assert.is_truthy(d:get("k3"))                       -- read just before
        assert.are.equal(1, (d:lpush("list", ("x"):rep(100))))
        assert.is_nil(d:get("k5"))
        assert.are.same({ false, "no memory" }, { d:safe_set("new2", ("n"):rep(100)) })
        assert.is_truthy(d:get("k6"))                       -- safe_set evicted nothing
        assert.are.same({ false, "no memory", false }, { d:set("huge", ("h"):rep(9000)) })
        assert.is_truthy(d:get("k6"))                       -- nor did a value that can never fit
        assert.is_true(d:free_space() >= 0)
    end)

    it("reclaims expired entries first without calling it forcible; safe_set may use them", function()
        local d = dict(8192)
        local m = 0
        while d:safe_add("t" .. (m + 1), ("v"):rep(100), 0.05) do m = m + 1 end
        sleep(0.1)
        assert.are.same({ true, nil, false }, { d:set("a", ("a"):rep(100)) })
        assert.are.same({ true, nil }, { d:safe_set("b", ("b"):rep(100)) })
        assert.are.same({ true, nil }, { d:safe_add("c", ("c"):rep(100)) })
        assert.are.same({ "b" .. ("b"):rep(99), nil }, { d:get("b") })
    end)

    it("get_keys and flush_expired walk dicts bigger than one chunk, each key once", function()
        local d = dict("8m")
        for i = 1, 5000 do assert.is_true((d:set("p" .. i, i))) end
        -- a TTL long enough for a slow machine to list them all before they expire
        for i = 1, 3000 do assert.is_true((d:set("e" .. i, i, 0.5))) end
        assert.are.equal(1024, #d:get_keys())
        assert.are.equal(8000, #d:get_keys(0))
        sleep(0.6)
        local keys, seen = d:get_keys(0), {}
        assert.are.equal(5000, #keys)
        for _, k in ipairs(keys) do
            assert.is_nil(seen[k])
            seen[k] = true
        end
        assert.are.equal("p1", keys[1])                    -- least recently written first
        assert.are.equal(30, d:flush_expired(30))
        assert.are.equal(2970, d:flush_expired())
        assert.are.equal(0, d:flush_expired())
        assert.are.equal(5000, #d:get_keys(0))
    end)

    it("is the same dict in every worker VM: concurrent incr from 2 workers sums exactly", function()
        local name = "shdict_spec_workers"
        luaproxy.shared.new(name, "64k")
        local policy = util.write_temp("incr_policy.lua", ([[
            local luaproxy = require "luaproxy"
            return {
                init_worker = function()
                    local d = luaproxy.shared[%q]
                    for _ = 1, 100000 do d:incr("n", 1, 0) end
                end,
                handler = function() return 200 end,
            }
        ]]):format(name))
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 2 })
            srv:close()
            srv:wait()
        end, 20)
        assert.are.equal(200000, luaproxy.shared[name]:get("n"))
    end)

    it("keeps every add when a counter turns float while 3 workers add to it lock-free", function()
        -- Each worker adds 1 N times (after its first incr, the lock-free path). Worker 0, half
        -- way, waits until every other worker is past N/10 and adds 0.5, which retires the
        -- integer counter under the others' feet; they are still adding then (the progress
        -- they logged is at most 9N/10, where they stop to wait for the switch if it has not
        -- come yet, so they cannot have finished before it). All start together.
        local name = "shdict_spec_float_race"
        local d = luaproxy.shared.new(name, "64k")
        local W, N = 3, 1000000
        local policy = util.write_temp("float_race_policy.lua", ([[
            local luaproxy = require "luaproxy"
            local W, N = %d, %d
            local function wait_until(what, cond)
                local deadline = luaproxy.now() + 10
                while not cond() do
                    if luaproxy.now() > deadline then error("timed out waiting for " .. what) end
                    luaproxy.sleep(0.0005)
                end
            end
            return {
                init_worker = function()
                    local d = luaproxy.shared[%q]
                    local me = luaproxy.worker.id()
                    d:incr("ready", 1, 0)
                    wait_until("every worker", function() return d:get("ready") == W end)
                    for i = 1, N do
                        d:incr("n", 1, 0)
                        if i %% 1000 == 0 then d:set("p" .. me, i) end
                        if me == 0 and i == N / 2 then
                            wait_until("the others past N/10", function()
                                for k = 1, W - 1 do
                                    if (d:get("p" .. k) or 0) < N / 10 then return false end
                                end
                                return true
                            end)
                            local before = {}
                            for k = 1, W - 1 do before[k] = d:get("p" .. k) end
                            d:incr("n", 0.5)
                            d:set("switched", true)
                            for k = 1, W - 1 do d:set("at_switch" .. k, before[k]) end
                        elseif me ~= 0 and i == N * 9 / 10 and not d:get("switched") then
                            wait_until("the switch", function() return d:get("switched") end)
                        end
                    end
                end,
                handler = function() return 200 end,
            }
        ]]):format(W, N, name))
        util.run(function()
            -- init_worker runs its million adds without yielding: more than lua_budget allows.
            local srv, err = luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = W,
                lua_budget = 0 }
            assert(srv, err)
            srv:close()
            srv:wait()
        end, 30)
        for k = 1, W - 1 do
            local at = d:get("at_switch" .. k) or -1   -- -1: no progress logged yet
            -- At most 9N/10: a worker that got there first waits there for the switch.
            assert.is_true(at >= N / 10 and at <= N * 9 / 10, "worker " .. k .. " was at " .. at .. " of " .. N)
        end
        local n = d:get("n")
        util.assert_number_type("float", n)
        assert.are.equal(W * N + 0.5, n)
    end)
end)
