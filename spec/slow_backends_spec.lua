-- Slow backends (#16, the router's real case): a real `lua main.lua --workers 2` (util.main)
-- in front of a fast backend (answers after FAST_DELAY) and a slow one (after SLOW_DELAY),
-- both luaproxy handler servers in this spec's loop, and CLIENTS tasks here sending GETs with
-- an API key in a loop for WINDOW seconds.
--
-- No head-of-line blocking: every request the fast backend answered took far less than the
-- slow delay, and many of them completed while the slow backend held many requests at once (a
-- worker that blocked on the slow backend, or fast requests queued behind slow ones on a pooled
-- connection or a per-backend limit, would make some take the slow delay).
-- Least connection: the slow backend got a small share of the requests (round-robin gives it
-- half: each client alternates between the backends).
local luaproxy = require "luaproxy"
local util = require "support.util"

local CLIENTS = 200
local FAST_DELAY, SLOW_DELAY = 0.05, 3
local WINDOW = 4      -- clients start requests for this long
local FAST_BOUND = 1  -- every fast-backend request under this (s): a third of the slow delay
local MANY = 40       -- "many in flight" at the slow backend
local MAX_SLOW_SHARE = 0.25

local function backend(name, delay, st)
    return util.serve_handler(function()
        st.inflight = st.inflight + 1
        if st.inflight > st.max_inflight then st.max_inflight = st.inflight end
        luaproxy.sleep(delay)
        st.inflight = st.inflight - 1
        st.hits = st.hits + 1
        return 200, name, { ["x-backend"] = name }
    end)
end

local function sorted(xs)
    local s = {}
    for i, x in ipairs(xs) do s[i] = x end
    table.sort(s)
    return s
end

-- runs the load through main.lua with `policy` (an API key required); returns the figures
local function run(policy)
    return util.run(function()
        local fast_st = { inflight = 0, max_inflight = 0, hits = 0 }
        local slow_st = { inflight = 0, max_inflight = 0, hits = 0 }
        local fast = backend("fast", FAST_DELAY, fast_st)
        local slow = backend("slow", SLOW_DELAY, slow_st)
        local port = util.free_port()
        local conf = util.write_temp("slow.conf.lua", 'return { api_key_header = "X-Api-Key" }')
        local p = util.main(("--listen 127.0.0.1:%d --workers 2 --backend %s --backend %s --policy %s --config %s")
            :format(port, fast.addr, slow.addr, policy, conf), 40)
        local url = "http://127.0.0.1:" .. port .. "/item"
        local r = { fast = {}, slow = {}, failed = {}, fast_while_slow_busy = 0 }
        local ok, err = pcall(function()
            -- up, and both backends idle again before the load starts
            assert(util.wait_for(function()
                return util.request(url, { headers = { ["x-api-key"] = "k" } }, 5) == 200
            end, 10), "main.lua did not start")
            assert(util.wait_for(function() return slow_st.inflight == 0 end, SLOW_DELAY + 2))
            fast_st.max_inflight, slow_st.max_inflight = 0, 0
            local stop_at = luaproxy.now() + WINDOW
            local tasks = {}
            for i = 1, CLIENTS do
                tasks[i] = luaproxy.spawn(function()
                    local opts = { headers = { ["x-api-key"] = "client-" .. i } }
                    while luaproxy.now() < stop_at do
                        local t0 = luaproxy.now()
                        local status, body, headers = util.request(url, opts, SLOW_DELAY + 5)
                        local took = luaproxy.now() - t0
                        local be = status == 200 and headers["x-backend"]
                        if be == "fast" or be == "slow" then
                            local list = r[be]
                            list[#list + 1] = took
                            if be == "fast" and slow_st.inflight >= MANY then
                                r.fast_while_slow_busy = r.fast_while_slow_busy + 1
                            end
                        else
                            r.failed[#r.failed + 1] = tostring(status) .. " " .. tostring(body)
                            luaproxy.sleep(0.05)
                        end
                    end
                end)
            end
            for _, t in ipairs(tasks) do assert(t:wait()) end
        end)
        p:signal("TERM")
        if not p:wait_exit(SLOW_DELAY + 3) then p:kill() end
        util.shut(fast)
        util.shut(slow)
        if not ok then error(tostring(err) .. "\n--- main.lua's log:\n" .. p:log(), 0) end
        r.slow_max_inflight = slow_st.max_inflight
        return r
    end, WINDOW + 3 * SLOW_DELAY + 20)
end

local function check(r)
    local nf, ns = #r.fast, #r.slow
    local fast = sorted(r.fast)
    local summary = ("fast %d (p50 %.0f ms, max %.0f ms), slow %d (%.1f %%), slow max in flight %d, "
        .. "fast answers while the slow backend held >= %d: %d, failures %d (%s)")
        :format(nf, (fast[math.ceil(nf / 2)] or 0) * 1000, (fast[nf] or 0) * 1000, ns,
            100 * ns / math.max(1, nf + ns), r.slow_max_inflight, MANY, r.fast_while_slow_busy,
            #r.failed, tostring(r.failed[1]))
    assert.are.equal(0, #r.failed, summary)
    -- the slow backend held many requests, and fast ones kept completing meanwhile
    assert.is_true(r.slow_max_inflight >= MANY, summary)
    assert.is_true(r.fast_while_slow_busy >= CLIENTS, summary)
    -- ... each far quicker than the slow delay: nothing waited behind a slow request
    assert.is_true(fast[nf] < FAST_BOUND, summary)
    -- least connection: the slow backend got few (round-robin: half)
    assert.is_true(ns >= 1 and ns / (nf + ns) < MAX_SLOW_SHARE, summary)
end

describe("slow backends (#16)", function()
    for _, policy in ipairs({ "examples/least_conn.lua", "examples/api_router.lua" }) do
        it(policy .. ": fast requests never wait behind slow ones; the slow backend gets few", function()
            check(run(policy))
        end)
    end
end)
