-- The event loop: run, spawn/wait, sleep, timers, stop, and the error outside the loop.
local luaproxy = require "luaproxy"

describe("luaproxy.run", function()
    it("returns what the main function returns", function()
        local a, b = luaproxy.run(function(x) return x + 1, "two" end, 41)
        assert.are.equal(42, a)
        assert.are.equal("two", b)
    end)

    it("raises the main function's error with a traceback", function()
        local ok, err = pcall(luaproxy.run, function() error("boom") end)
        assert.is_false(ok)
        assert.matches("boom", tostring(err))
        assert.matches("stack traceback", tostring(err))
    end)

    it("runs spawned tasks concurrently and waits for them", function()
        local elapsed, r1, r2 = luaproxy.run(function()
            local t0 = luaproxy.now()
            local a = luaproxy.spawn(function(n) luaproxy.sleep(0.1) return n * 2 end, 10)
            local b = luaproxy.spawn(function() luaproxy.sleep(0.1) return "b" end)
            local ok1, v1 = a:wait()
            local ok2, v2 = b:wait()
            assert.is_true(ok1 and ok2)
            return luaproxy.now() - t0, v1, v2
        end)
        assert.are.equal(20, r1)
        assert.are.equal("b", r2)
        assert.is_true(elapsed >= 0.09 and elapsed < 0.19, "elapsed " .. elapsed)
    end)

    it("reports a failing task as false, err", function()
        local ok, err = luaproxy.run(function()
            return luaproxy.spawn(function() error("task broke") end):wait()
        end)
        assert.is_false(ok)
        assert.matches("task broke", err)
    end)

    it("waits for tasks the main function left running", function()
        local done = false
        luaproxy.run(function()
            luaproxy.spawn(function() luaproxy.sleep(0.05) done = true end)
        end)
        assert.is_true(done)
    end)

    it("a timer cancelled before it first ran does not keep the loop alive", function()
        local t0 = os.time()
        luaproxy.run(function() luaproxy.timer.at(3, function() end):cancel() end)
        assert.is_true(os.time() - t0 < 2)
    end)

    it("fires timers, repeats every, and cancels", function()
        local fired, ticks, args = false, 0, nil
        luaproxy.run(function()
            luaproxy.timer.at(0.02, function(premature, x) fired = true; args = { premature, x } end, "arg")
            local t
            t = luaproxy.timer.every(0.02, function()
                ticks = ticks + 1
                if ticks == 3 then t:cancel() end
            end)
            luaproxy.sleep(0.2)
        end)
        assert.is_true(fired)
        assert.are.same({ false, "arg" }, args)
        assert.are.equal(3, ticks)
    end)

    it("stop() ends a loop that would otherwise run forever", function()
        local t0 = os.time()
        luaproxy.run(function()
            luaproxy.timer.every(0.01, function() end)
            luaproxy.timer.at(0.05, function() luaproxy.stop() end)
        end)
        assert.is_true(os.time() - t0 < 3)
    end)

    it("refuses async calls outside the loop with an error naming luaproxy.run", function()
        for _, call in ipairs({
            function() luaproxy.sleep(0.01) end,
            function() luaproxy.http.request_uri("http://127.0.0.1:1/") end,
            function() luaproxy.serve{ listen = "127.0.0.1:0", handler = print } end,
            function() luaproxy.spawn(print) end,
            function() luaproxy.timer.at(0, print) end,
        }) do
            local ok, err = pcall(call)
            assert.is_false(ok)
            assert.matches("luaproxy.run", tostring(err))
        end
    end)

    it("raises on misuse", function()
        assert.has_error(function() luaproxy.run(function() luaproxy.sleep(-1) end) end)
        assert.has_error(function() luaproxy.run("not a function") end)
    end)
end)

describe("luaproxy.run and errors", function()
    it("an error in the main function stops the loop even with a server still open", function()
        local t0 = os.time()
        local ok, err = pcall(luaproxy.run, function()
            luaproxy.serve{ listen = "127.0.0.1:0", handler = function() return 200 end }
            luaproxy.timer.every(0.01, function() end)
            error("main failed")
        end)
        assert.is_false(ok)
        assert.matches("main failed", tostring(err))
        assert.is_true(os.time() - t0 < 3)
    end)
end)
