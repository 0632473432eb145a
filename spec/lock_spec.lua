-- luaproxy.lock: exclusive across coroutines (and workers: it lives in a shared dict), waiting
-- without blocking the loop, with timeout and exptime.
local luaproxy = require "luaproxy"
local lock_mod = require "luaproxy.lock"

luaproxy.shared.new("lock_spec", "64k")

describe("luaproxy.lock", function()
    it("blocks a second holder until unlock, while the loop keeps running", function()
        luaproxy.run(function()
            local a = assert(lock_mod.new("lock_spec", { timeout = 2 }))
            local b = assert(lock_mod.new("lock_spec", { timeout = 2 }))
            assert.is_number(a:lock("k"))
            local ticks = 0
            local ticker = luaproxy.timer.every(0.01, function() ticks = ticks + 1 end)
            local waiter = luaproxy.spawn(function() return b:lock("k") end)
            luaproxy.sleep(0.2)
            assert.is_false(waiter:done())
            assert.is_true(ticks >= 10, "loop stalled: " .. ticks .. " ticks")
            assert.is_true(a:unlock())
            local ok, elapsed = waiter:wait()
            ticker:cancel()
            assert.is_true(ok)
            assert.is_true(elapsed >= 0.19 and elapsed < 1.5, tostring(elapsed))
            assert.is_true(b:unlock())
        end)
    end)

    it("times out, and tries once with timeout = 0", function()
        luaproxy.run(function()
            local a = assert(lock_mod.new("lock_spec"))
            local b = assert(lock_mod.new("lock_spec", { timeout = 0.1 }))
            local c = assert(lock_mod.new("lock_spec", { timeout = 0 }))
            assert.is_number(a:lock("t"))
            local t0 = luaproxy.now()
            assert.are.same({ nil, "timeout" }, { b:lock("t") })
            assert.is_true(luaproxy.now() - t0 < 0.5)
            assert.are.same({ nil, "timeout" }, { c:lock("t") })
            assert.are.same({ nil, "locked" }, { a:lock("other") })
            assert.is_true(a:unlock())
            assert.are.same({ nil, "unlocked" }, { a:unlock() })
        end)
    end)

    it("a lock whose holder vanished expires after exptime", function()
        luaproxy.run(function()
            local dead = assert(lock_mod.new("lock_spec", { exptime = 0.2 }))
            assert.is_number(dead:lock("e"))
            -- the holder never unlocks
            local next_holder = assert(lock_mod.new("lock_spec", { timeout = 2 }))
            local elapsed = assert(next_holder:lock("e"))
            assert.is_true(elapsed >= 0.1, tostring(elapsed))
            -- the old holder cannot free the new holder's lock
            assert.are.same({ nil, "expired" }, { dead:unlock() })
            assert.is_true(next_holder:unlock())
        end)
    end)

    it("is reachable as luaproxy.lock", function()
        assert.are.equal(lock_mod, luaproxy.lock)
    end)

    it("misuse raises; a missing dict is nil, err", function()
        assert.has_error(function() lock_mod.new(42) end)
        assert.has_error(function() lock_mod.new("lock_spec", { timeout = -1 }) end)
        assert.are.same({ nil, "dict not found" }, { lock_mod.new("no_such_dict") })
    end)
end)
