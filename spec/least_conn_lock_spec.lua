-- examples/least_conn_lock.lua (#14 part 3): the per-backend map kept under luaproxy.lock
-- counts every request, and every count comes back down however the request ends. A real
-- `lua main.lua --workers 2` (util.main) in front of two backends that are luaproxy handler
-- servers in this spec's loop; the policy is the example wrapped so one path raises an error
-- after taking its backend. Clients are luaproxy.http tasks in the same loop, 20 at once.
local luaproxy = require "luaproxy"
local util = require "support.util"

local json = luaproxy.json

-- The example, plus /boom: a handler error after the count was taken.
local POLICY = [[
local example = dofile("examples/least_conn_lock.lua")
local _M = { init_worker = example.init_worker }
function _M.handler(req)
    if req:get_path() == "/boom" then
        assert(example.take(req))
        error("boom after take")
    end
    return example.handler(req)
end
return _M
]]

-- /slow answers after 3 s; /hold once t.release is set (at most 8 s); anything else at once.
local function backend(name, st, t)
    return function(req)
        st.hits = st.hits + 1
        local path = req:get_path()
        if path == "/slow" then
            luaproxy.sleep(3)
        elseif path == "/hold" then
            util.wait_for(function() return t.release end, 8)
        end
        return 200, name
    end
end

local function view(url)
    local res = luaproxy.http.request_uri(url .. "/admin/backends/", { read_timeout = 5,
        headers = { connection = "close" } })
    if not res or res.status ~= 200 then return nil end
    return json.decode(res.body)
end

local function settled(v, addrs)
    if not v or v.holders ~= 0 then return false end
    for _, a in ipairs(addrs) do
        if v.inflight[a] ~= 0 then return false end
    end
    return true
end

-- fn(t) with main.lua (2 workers) running the wrapped example in front of b1 and b2;
-- `conf` is Lua source for more fields of the --config table.
local function with_proxy(conf, fn, seconds)
    util.run(function()
        local t = { st = { { hits = 0 }, { hits = 0 } } }
        t.srv = { util.serve_handler(backend("b1", t.st[1], t)), util.serve_handler(backend("b2", t.st[2], t)) }
        t.addrs = { t.srv[1].addr, t.srv[2].addr }
        local port = util.free_port()
        t.url = "http://127.0.0.1:" .. port
        local policy = util.write_temp("lock_policy.lua", POLICY)
        local conf_file = util.write_temp("lock.conf.lua", ([[
            return { listen = "127.0.0.1:%d", policy = %q, workers = 2, backends = { %q, %q },
                     log_level = "info", %s }
        ]]):format(port, policy, t.addrs[1], t.addrs[2], conf))
        t.p = util.main("--config " .. conf_file, seconds + 10)
        local ok, err = pcall(function()
            assert(util.wait_for(function() return view(t.url) ~= nil end, 10), "main.lua did not start")
            -- both workers answer (new connections go to either)
            local workers = {}
            assert(util.wait_for(function()
                local v = view(t.url)
                if v then workers[v.worker] = true end
                return workers[0] and workers[1]
            end, 10), "only one worker answered")
            assert.is_true(settled(view(t.url), t.addrs))
            fn(t)
        end)
        t.p:signal("TERM")
        local code = t.p:wait_exit(10)
        if not code then t.p:kill() end
        for i = 1, 2 do pcall(util.shut, t.srv[i]) end
        if not ok then error(tostring(err) .. "\n--- main.lua's log (tail):\n" .. t.p.log():sub(-4000), 0) end
        assert.are.equal(0, code)
    end, seconds)
end

local function sum(v)
    local n = 0
    for _, c in pairs(v.inflight) do n = n + c end
    return n
end

describe("examples/least_conn_lock.lua", function()
    it("counts 200 requests held at once over 2 workers exactly, spread evenly, then 0", function()
        -- Both workers take at once, many times: without the lock, two read-modify-writes of
        -- the map overlap and one of them is lost (a request not counted).
        local HELD = 200
        with_proxy("proxy_read_timeout = 10", function(t)
            local tasks = {}
            for k = 1, HELD do
                tasks[k] = luaproxy.spawn(function()
                    -- a connection each: both workers take some
                    return luaproxy.http.request_uri(t.url .. "/hold?k=" .. k,
                        { read_timeout = 10, headers = { connection = "close" } })
                end)
            end
            local v
            local held = util.wait_for(function()
                v = view(t.url)
                return v and sum(v) == HELD and v.holders == HELD
            end, 5)
            assert.is_true(held, "not " .. HELD .. " in flight: " .. json.encode(v))
            -- least connection: half each
            assert.are.same({ [t.addrs[1]] = HELD / 2, [t.addrs[2]] = HELD / 2 }, v.inflight)
            t.release = true
            for k = 1, HELD do
                local ok, res = tasks[k]:wait()
                assert.is_true(ok)
                assert.are.equal(200, res and res.status)
            end
            local last
            assert.is_true(util.wait_for(function()
                last = view(t.url)
                return settled(last, t.addrs)
            end, 5), "not settled: " .. json.encode(last))
        end, 40)
    end)

    it("counts go back to 0 after 1000 requests ending every way, 20 at once over 2 workers", function()
        with_proxy("proxy_read_timeout = 1", function(t)
            local url, srv, st, addrs, p = t.url, t.srv, t.st, t.addrs, t.p
            local N, TASKS = 1000, 20
            local outcome = {}
            local function count(k) outcome[k] = (outcome[k] or 0) + 1 end
            local next_i, max_inflight = 0, 0
            local function client()
                while next_i < N do
                    next_i = next_i + 1
                    local i = next_i
                    if i == N / 2 then
                        -- from now on b2 refuses connections
                        util.shut(srv[2])
                    end
                    local kind = i % 10
                    local path, read_timeout = "/ok", 10
                    if kind == 6 then path = "/boom"
                    elseif kind == 7 then path = "/slow"                      -- the proxy gives up: 504
                    elseif kind == 8 then path, read_timeout = "/slow", 0.2   -- the client gives up
                    end
                    local res, rerr = luaproxy.http.request_uri(url .. path .. "?i=" .. i,
                        { read_timeout = read_timeout })
                    if res then count(res.status) else count(rerr) end
                end
            end
            local tasks = {}
            for k = 1, TASKS do tasks[k] = luaproxy.spawn(client) end
            -- while the load runs, the map counts what is in flight
            local watcher = luaproxy.spawn(function()
                while true do
                    local v = view(url)
                    if v and sum(v) > max_inflight then max_inflight = sum(v) end
                    luaproxy.sleep(0.05)
                end
            end)
            for _, task in ipairs(tasks) do assert.is_true((task:wait())) end
            watcher:kill()
            local total = 0
            for _, n in pairs(outcome) do total = total + n end
            assert.are.equal(N, total)
            -- every way of ending happened
            local desc = json.encode(outcome)
            assert.is_true((outcome[200] or 0) >= 100, desc)
            assert.is_true((outcome[500] or 0) >= 50, desc)       -- the handler error
            assert.is_true((outcome[502] or 0) >= 1, desc)        -- b2 refused
            assert.is_true((outcome[504] or 0) >= 1, desc)        -- upstream timeout
            assert.is_true((outcome.timeout or 0) >= 1, desc)     -- the client gone
            assert.is_true(max_inflight >= 2, "max in flight seen: " .. max_inflight)
            -- and every count comes back down, with no traffic to trigger it
            local last
            local done = util.wait_for(function()
                last = view(url)
                return settled(last, addrs)
            end, 10)
            assert.is_true(done, "not settled: " .. json.encode(last))
            assert.are.same(addrs, last.backends)
            -- the proxy saw clients leave mid-request, the handler errors and the refusals
            local log = p.log()
            assert.matches("closed the connection while \"GET /slow?i=", log, 1, true)
            assert.matches("boom after take", log, 1, true)
            assert.matches("connection refused", log, 1, true)
            assert.is_true(st[1].hits > 0 and st[2].hits > 0)
        end, 80)
    end)
end)
