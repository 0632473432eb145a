-- luaproxy.ratelimit: exact GCRA counts per key, on one VM and shared by the 2 worker VMs of
-- a policy server (429 with Retry-After), with keys independent of each other.
local luaproxy = require "luaproxy"
local util = require "support.util"
local ratelimit = require "luaproxy.ratelimit"

local n = 0
local function fresh(rate, burst)
    n = n + 1
    return assert(ratelimit.new{ dict = "rl_spec_" .. n, rate = rate, burst = burst })
end

local POLICY = util.write_temp("ratelimit_policy.lua", [[
    local luaproxy = require "luaproxy"
    local ratelimit = require "luaproxy.ratelimit"
    local rl
    return {
        init_worker = function(config)
            rl = assert(ratelimit.new{ dict = config.dict, rate = config.rate, burst = config.burst })
        end,
        handler = function(req)
            local key = req:get_header("x-api-key")
            if not key then return 400, "no key" end
            local ok, err, retry_after = rl:incoming(key)
            local worker = tostring(luaproxy.worker.id())
            if not ok then
                if err ~= "rejected" then return 500, err end
                return 429, "Too Many Requests\n",
                    { ["retry-after"] = tostring(math.ceil(retry_after)), ["x-worker"] = worker }
            end
            return 200, worker, { ["x-worker"] = worker }
        end,
    }
]])

describe("luaproxy.ratelimit", function()
    it("lets 1 + burst through at once, then one per 1/rate, with a sensible retry_after", function()
        local rl = fresh(10, 5)
        local passed = 0
        for _ = 1, 20 do
            if rl:incoming("k") then passed = passed + 1 end
        end
        assert.are.equal(6, passed)
        local ok, err, retry_after = rl:incoming("k")
        assert.is_nil(ok)
        assert.are.equal("rejected", err)
        assert.is_true(retry_after > 0 and retry_after <= 0.1 + 1e-3, tostring(retry_after))
        luaproxy.run(function()
            luaproxy.sleep(retry_after + 0.005)
            assert.is_true(rl:incoming("k"))
            assert.is_nil((rl:incoming("k")))
        end)
    end)

    it("keeps keys independent", function()
        local rl = fresh(1, 0)
        assert.is_true(rl:incoming("a"))
        assert.is_nil((rl:incoming("a")))
        assert.is_true(rl:incoming("b"))
        local _, _, retry_after = rl:incoming("b")
        assert.is_true(retry_after > 0.9 and retry_after <= 1, tostring(retry_after))
        rl:reset("a")
        assert.is_true(rl:incoming("a"))
    end)

    it("passes rate * T + burst over T seconds", function()
        local rl = fresh(20, 4)
        local passed, t0 = 0, nil
        util.run(function()
            t0 = luaproxy.now()
            while luaproxy.now() - t0 < 2 do
                if rl:incoming("steady") then passed = passed + 1 end
                luaproxy.sleep(0.002)
            end
        end, 10)
        -- 20 * 2 + 4, plus the first request at t0 (nginx's burst counts excess requests)
        assert.is_true(passed >= 43 and passed <= 46, passed .. " passed")
    end)

    it("is shared exactly by the worker VMs of a policy server: 429 with Retry-After", function()
        n = n + 1
        local dict = "rl_spec_srv" .. n
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = POLICY, workers = 2,
                config = { dict = dict, rate = 1, burst = 9 } })
            local url = "http://" .. srv.addr .. "/"
            local function fire(key, count)
                local tasks = {}
                for i = 1, count do
                    tasks[i] = luaproxy.spawn(util.get, url, { headers = { ["x-api-key"] = key } })
                end
                local out = { [200] = 0, [429] = 0, workers = {}, retry = {} }
                for _, task in ipairs(tasks) do
                    local ok, status, body, res = task:wait()
                    assert.is_true(ok, tostring(status))
                    out[status] = (out[status] or 0) + 1
                    out.workers[res.headers["x-worker"]] = true
                    if status == 200 then assert.matches("^%d$", body) end
                    if status == 429 then out.retry[res.headers["retry-after"]] = true end
                end
                return out
            end
            local t0 = luaproxy.now()
            local a = fire("alpha", 40)
            local elapsed = luaproxy.now() - t0
            -- 1 + 9 at once (one more per second the burst of requests took); each worker
            -- alone would have let 10 through
            local extra = math.floor(elapsed)
            assert.is_true(a[200] >= 10 and a[200] <= 10 + extra + 1, a[200] .. " passed in " .. elapsed .. " s")
            assert.are.equal(40, a[200] + a[429])
            assert.are.same({ ["1"] = true }, a.retry)
            -- another key has its own budget
            local b = fire("beta", 12)
            assert.is_true(b[200] >= 10 and b[200] <= 11, b[200] .. " passed")
            -- both workers served (concurrent connections are spread over them)
            local c = fire("gamma", 40)
            local served = {}
            for w in pairs(a.workers) do served[w] = true end
            for w in pairs(b.workers) do served[w] = true end
            for w in pairs(c.workers) do served[w] = true end
            assert.is_true(served["0"] and served["1"], "not both workers served")
            srv:close()
            srv:wait()
        end, 20)
    end)

    it("counts exactly while two workers hammer one key at the same moment (cas, no lost update)", function()
        n = n + 1
        local dict = "rl_spec_hot" .. n
        luaproxy.shared.new("rl_spec_hot_out" .. n, "64k")
        -- Both workers call incoming() in a tight loop (no yield) over the same 0.4 s: the
        -- limit must hold for the two together, as if one worker had asked.
        local policy = util.write_temp("ratelimit_hot.lua", [[
            local luaproxy = require "luaproxy"
            local ratelimit = require "luaproxy.ratelimit"
            return {
                init_worker = function(config)
                    local rl = assert(ratelimit.new{ dict = config.dict, rate = config.rate, burst = config.burst })
                    local out = luaproxy.shared[config.out]
                    luaproxy.timer.at(0, function(premature)
                        if premature then return end
                        while luaproxy.now() < config.start do luaproxy.sleep(0.001) end
                        local allowed, first, last = 0, nil, nil
                        local now = luaproxy.now
                        -- each allowed call happened between `t` and the now() after it
                        local t = now()
                        while t < config.stop do
                            if rl:incoming("hot") then
                                allowed = allowed + 1
                                first = first or t
                                last = now()
                            end
                            t = now()
                        end
                        out:incr("allowed", allowed, 0)
                        out:set("first" .. luaproxy.worker.id(), first or 0)
                        out:set("last" .. luaproxy.worker.id(), last or 0)
                        out:incr("done", 1, 0)
                    end)
                end,
                handler = function() return 200 end,
            }
        ]])
        local out = luaproxy.shared["rl_spec_hot_out" .. n]
        local rate, burst, span = 2000, 100, 0.4
        util.run(function()
            local start = luaproxy.now() + 0.5
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 2,
                config = { dict = dict, out = "rl_spec_hot_out" .. n, rate = rate, burst = burst,
                    start = start, stop = start + span } })
            assert.is_true(util.wait_for(function() return out:get("done") == 2 end, 5))
            srv:close()
            srv:wait()
        end, 15)
        local allowed = out:get("allowed")
        local first = math.min(out:get("first0"), out:get("first1"))
        local last = math.max(out:get("last0"), out:get("last1"))
        -- 1 + burst at once, then one per 1/rate over the time the two loops ran
        local most = 1 + burst + math.floor(rate * (last - first)) + 1
        assert.is_true(allowed <= most, allowed .. " allowed, at most " .. most)
        assert.is_true(allowed >= most - 0.25 * rate * span, allowed .. " allowed, expected about " .. most)
        assert.is_true(out:get("first0") > 0 and out:get("first1") > 0, "a worker got nothing")
    end)

    it("misuse raises", function()
        assert.has_error(function() ratelimit.new() end)
        assert.has_error(function() ratelimit.new{ rate = 0 } end)
        assert.has_error(function() ratelimit.new{ rate = 1, burst = -1 } end)
        assert.has_error(function() fresh(1, 0):incoming(nil) end)
    end)
end)
