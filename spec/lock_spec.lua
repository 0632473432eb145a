-- luaproxy.lock: exclusive across coroutines (and workers: it lives in a shared dict), waiting
-- without blocking the loop, with timeout and exptime.
local luaproxy = require "luaproxy"
local lock_mod = require "luaproxy.lock"
local util = require "support.util"

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

    it("held by one worker, blocks another worker's lock() until unlock; both keep serving", function()
        luaproxy.shared.new("lock_xw", "64k")
        -- The first worker to start takes the lock for 1 s; the other waits for it. Every
        -- request answers "<worker> <worker waiting for the lock, or false>".
        local policy = util.write_temp("lock_xw.lua", [[
            local luaproxy = require "luaproxy"
            local lock_mod = require "luaproxy.lock"
            local d = luaproxy.shared.lock_xw
            return {
                init_worker = function()
                    local id = luaproxy.worker.id()
                    local lk = assert(lock_mod.new("lock_xw", { timeout = 5 }))
                    luaproxy.timer.at(0, function()
                        if d:add("holder", id) then
                            assert(lk:lock("L"))
                            d:set("held", true)
                            luaproxy.sleep(1)
                            d:set("released", luaproxy.now())
                            assert(lk:unlock())
                        else
                            while not d:get("held") do luaproxy.sleep(0.005) end
                            d:set("waiting", id)
                            local elapsed, err = lk:lock("L")
                            d:set("got", luaproxy.now())
                            d:set("waited", elapsed or err)
                            d:set("waiting", false)
                            lk:unlock()
                        end
                    end)
                end,
                handler = function()
                    return 200, luaproxy.worker.id() .. " " .. tostring(d:get("waiting"))
                end,
            }
        ]])
        local d = luaproxy.shared.lock_xw
        luaproxy.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 2 })
            assert.is_true(util.wait_for(function() return d:get("waiting") end, 5))
            -- Fresh connections (one curl each) spread over both workers by SO_REUSEPORT.
            local out = util.sh("for i in $(seq 40); do curl -s -m 2 http://127.0.0.1:" .. srv.port
                .. "/; echo; sleep 0.01; done")
            assert.is_true(util.wait_for(function() return d:get("waited") end, 5))
            srv:close()
            srv:wait()
            local on_waiter, total = 0, 0
            for worker, waiting in out:gmatch("(%d+) (%w+)") do
                total = total + 1
                if waiting == worker then on_waiter = on_waiter + 1 end
            end
            assert.are.equal(40, total)
            assert.is_true(on_waiter > 0, "no request served by the waiting worker while it waited")
            assert.is_number(d:get("waited"))
            assert.is_true(d:get("waited") >= 0.5, tostring(d:get("waited")))
            assert.is_true(d:get("got") >= d:get("released"))
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
