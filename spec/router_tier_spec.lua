-- examples/router_tier.lua end to end on 127.0.0.1: a real `lua main.lua --policy
-- examples/router_tier.lua --workers 2` process (util.main) in front of three real
-- `lua main.lua --policy examples/api_router.lua` routers, each in front of its own backend:
-- a luaproxy handler server in this spec's loop that answers "r<i> <body bytes>", so a
-- response says which router served it. The spec predicts each key's router with
-- luaproxy.chash over the routers' addresses (and, for a router that is down, the key's
-- rehashes key#1 .. key#6, then the routers in sorted order from hash32(key): docs/api.md,
-- balancer.new's chash mode). Clients are
-- luaproxy.http, so the backends in this loop keep serving while they wait; the tier's admin
-- endpoints, which reach no backend, are also asked through the real curl. Every spec runs
-- under util.run's deadline and every main.lua under `timeout`.
local luaproxy = require "luaproxy"
local util = require "support.util"
local chash = require "luaproxy.chash"
local apikey = require "luaproxy.apikey"

local json = luaproxy.json

local MISSING = "Request is missing apiKey param.\n"
local FORM = "application/x-www-form-urlencoded"
local PROBE_UA = "luaproxy health check"
-- The tier's probes: a router answers a request without a key itself, with 400.
local TIER_CONF = "health_check = { path = '/', interval = 0.3, timeout = 0.5, fall = 2, rise = 2, "
    .. "valid_statuses = { 400 } }, max_fails = 1, fail_timeout = 30"

local KEYS = {}
for i = 1, 90 do KEYS[i] = "key-" .. i end

-- status, body of a request through luaproxy.http (bounded: 5 s)
local function request(url, opts)
    opts = opts or {}
    opts.read_timeout = opts.read_timeout or 5
    local res, err = luaproxy.http.request_uri(url, opts)
    if not res then return nil, err end
    return res.status, res.body
end

-- Backend i (behind router i only): "r<i> <bytes of body it got>"; st.keys[key] counts the
-- requests that reached it per API key (read as the routers read it).
local function backend_handler(i, st)
    return function(req)
        local key = apikey.get(req) or "?"
        local body = req:read_body() or ""
        st.hits = st.hits + 1
        st.keys[key] = (st.keys[key] or 0) + 1
        return 200, "r" .. i .. " " .. #body
    end
end

-- p, or an error: main.lua serving on `port` (the port may still be held for a moment by a
-- process killed just before: a few tries).
local function start_main(args, port, seconds)
    for _ = 1, 20 do
        local p = util.main(("--listen 127.0.0.1:%d %s"):format(port, args), seconds)
        local up = util.wait_for(function()
            return p:status() ~= nil or request("http://127.0.0.1:" .. port .. "/admin/backends/") == 200
        end, 10)
        if up and p:status() == nil then return p end
        if p:status() == nil then p:kill() end
        luaproxy.sleep(0.1)
    end
    error("main.lua " .. args .. " did not start on port " .. port)
end

local function stop_main(p)
    if not p or p:status() ~= nil then return end
    p:signal("TERM")
    if not p:wait_exit(5) then p:kill() end
end

-- fn(t) with three routers (1 worker each) and the tier (2 workers) in front of them; `conf`:
-- Lua source for the tier's --config table.
local function with_tier(conf, fn, seconds)
    seconds = seconds or 40
    util.run(function()
        local t = { st = {}, srv = {}, rp = {}, rport = {}, raddr = {}, index = {} }
        local ok, err = pcall(function()
            for i = 1, 3 do
                t.st[i] = { hits = 0, keys = {} }
                t.srv[i] = util.serve_handler(backend_handler(i, t.st[i]))
                t.rport[i] = util.free_port()
                t.raddr[i] = "127.0.0.1:" .. t.rport[i]
                t.index[t.raddr[i]] = i
            end
            function t.start_router(i)
                t.rp[i] = start_main("--workers 1 --policy examples/api_router.lua --backend " .. t.srv[i].addr,
                    t.rport[i], seconds + 5)
            end
            for i = 1, 3 do t.start_router(i) end
            local port = util.free_port()
            t.url = "http://127.0.0.1:" .. port
            local conf_file = util.write_temp("tier.conf.lua", "return { " .. (conf or "") .. " }")
            t.tier = start_main(("--workers 2 --policy examples/router_tier.lua --backend %s --backend %s "
                .. "--backend %s --config %s"):format(t.raddr[1], t.raddr[2], t.raddr[3], conf_file), port, seconds + 5)
            t.ring = chash.new(t.raddr)
            -- the router of `key` with every router up, and with router `down` down
            function t.owner(key) return t.index[t.ring:find(key)] end
            function t.fallback(key, down)
                for i = 0, 6 do
                    local r = t.index[t.ring:find(i == 0 and key or key .. "#" .. i)]
                    if r ~= down then return r end
                end
                local nodes = t.ring:nodes()
                local start = luaproxy.hash32(key) % 3
                for i = 0, 2 do
                    local r = t.index[nodes[(start + i) % 3 + 1]]
                    if r ~= down then return r end
                end
            end
            function t.tier_admin(path)
                local status, body = request(t.url .. "/admin/" .. path)
                return status, body and json.decode(body)
            end
            function t.usage(i)
                local status, body = request("http://" .. t.raddr[i] .. "/admin/usage/")
                assert.are.equal(200, status)
                return json.decode(body)
            end
            fn(t)
        end)
        local logs = t.tier and ("--- tier's log:\n" .. t.tier:log()) or ""
        for i = 1, 3 do
            if t.rp[i] then logs = logs .. "\n--- router " .. i .. "'s log:\n" .. t.rp[i]:log() end
        end
        stop_main(t.tier)
        for i = 1, 3 do stop_main(t.rp[i]) end
        for i = 1, 3 do if t.srv[i] then pcall(util.shut, t.srv[i]) end end
        if not ok then error(tostring(err) .. "\n" .. logs, 0) end
    end, seconds)
end

-- A request for `key` in one of four shapes (the key in a form body, the query or the
-- header, or the header with a JSON body): path, opts, and the body's length.
local function keyed(key, n)
    local shape = n % 4
    if shape == 0 then
        local body = "x=" .. n .. "&apiKey=" .. key
        return "/load", { method = "POST", body = body, headers = { ["content-type"] = FORM } }, #body
    elseif shape == 1 then
        return "/load?n=" .. n .. "&apiKey=" .. key, nil, 0
    elseif shape == 2 then
        return "/load?n=" .. n, { headers = { ["x-api-key"] = key } }, 0
    end
    local body = json.encode({ n = n, text = ("t"):rep(n % 100) })
    return "/load", { method = "POST", body = body, headers = { ["x-api-key"] = key,
        ["content-type"] = "application/json" } }, #body
end

-- `tasks` coroutines sending keyed requests round the keys until L.finish(). L.seen[key] =
-- { [router] = responses }, L.failed: "status body" of each request that did not get its
-- router's 200 with the right byte count. L.pause() returns once no request is in flight.
local function load(t, tasks)
    local L = { stop = false, paused = false, total = 0, failed = {}, seen = {}, running = {}, busy = 0 }
    for i = 1, tasks do
        L.running[i] = luaproxy.spawn(function()
            local n = i * 13
            while not L.stop do
                if L.paused then
                    luaproxy.sleep(0.01)
                else
                    n = n + 1
                    local key = KEYS[n % #KEYS + 1]
                    local path, opts, len = keyed(key, n)
                    -- now and then a new connection, so both tier workers take requests
                    if n % 5 == 0 then
                        opts = opts or {}
                        opts.headers = opts.headers or {}
                        opts.headers.connection = "close"
                    end
                    L.busy = L.busy + 1
                    local status, body = request(t.url .. path, opts)
                    L.busy = L.busy - 1
                    L.total = L.total + 1
                    local r, got = tostring(body):match("^r(%d) (%d+)$")
                    if status == 200 and r and tonumber(got) == len then
                        local s = L.seen[key] or {}
                        L.seen[key] = s
                        s[tonumber(r)] = (s[tonumber(r)] or 0) + 1
                    else
                        L.failed[#L.failed + 1] = tostring(status) .. " " .. tostring(body)
                    end
                end
            end
        end)
    end
    function L.pause()
        L.paused = true
        assert(util.wait_for(function() return L.busy == 0 end, 10), "requests still in flight")
    end
    function L.resume()
        L.seen = {}
        L.paused = false
    end
    -- runs the load for `secs`, then pauses it; returns how many requests went
    function L.run(secs)
        local before = L.total
        L.resume()
        luaproxy.sleep(secs)
        L.pause()
        return L.total - before
    end
    function L.finish()
        L.stop = true
        for _, task in ipairs(L.running) do task:wait() end
    end
    return L
end

-- Every key seen went to router want(key) only.
local function assert_routes(L, want, what)
    local keys = 0
    for key, routers in pairs(L.seen) do
        keys = keys + 1
        local w = want(key)
        for r, n in pairs(routers) do
            assert.are.equal(w, r, ("%s: %s went to router %d (%d times), not %d"):format(what, key, r, n, w))
        end
    end
    assert.is_true(keys >= #KEYS / 2, what .. ": too few keys seen: " .. keys)
end

describe("examples/router_tier.lua", function()
    it("sends each key to its router on the ring, whatever its source and the tier worker; keys spread over all routers", function()
        with_tier(TIER_CONF, function(t)
            local per_router = { 0, 0, 0 }
            local tasks = {}
            for k, key in ipairs(KEYS) do
                per_router[t.owner(key)] = per_router[t.owner(key)] + 1
                tasks[k] = luaproxy.spawn(function()
                    -- four shapes, twice, on new connections (both tier workers)
                    for n = 1, 8 do
                        local path, opts, len = keyed(key, n)
                        opts = opts or {}
                        opts.headers = opts.headers or {}
                        opts.headers.connection = "close"
                        local status, body = request(t.url .. path, opts)
                        assert.are.same({ 200, "r" .. t.owner(key) .. " " .. len }, { status, body }, key)
                    end
                end)
            end
            for _, task in ipairs(tasks) do
                local ok, err = task:wait()
                assert(ok, err)
            end
            -- (b) every router owns a fair share of the 90 keys (30 each on average)
            for i = 1, 3 do
                assert.is_true(per_router[i] >= 10, "router " .. i .. " owns " .. per_router[i] .. " keys")
            end
            -- (a) each router's own count: exactly its keys, 8 requests each, and its backend
            -- saw nothing else
            for i = 1, 3 do
                local want = {}
                for _, key in ipairs(KEYS) do
                    if t.owner(key) == i then want[key] = 8 end
                end
                assert.are.same(want, t.usage(i), "router " .. i .. "'s usage")
                assert.are.same(want, t.st[i].keys, "backend " .. i)
            end
            -- the admin view: the routers, all up, nothing in flight; 403 from elsewhere
            local status, view = t.tier_admin("backends/")
            assert.are.equal(200, status)
            assert.are.same(t.raddr, view.backends)
            for i = 1, 3 do
                assert.are.equal("up", view.health[t.raddr[i]].state)
                assert.are.equal(0, view.inflight[t.raddr[i]])
            end
            local body
            status, body = util.curl(t.url .. "/admin/backends/", "--interface 127.0.0.2")
            assert.are.equal(403, status)
            assert.matches("only open to 127.0.0.1", body, 1, true)
            assert.are.equal(404, (t.tier_admin("usage/")))
            -- (e) no key: the tier's 400, and no router counted anything more
            for _, args in ipairs({ "", "-d 'a=1&b=2'", "-H 'X-Api-Key;'", "-H 'Content-Type: application/json' "
                .. "-d '{\"apiKey\":\"k\"}'" }) do
                status, body = util.curl(t.url .. "/x?apikey=lower", args)
                assert.are.same({ 400, MISSING }, { status, body }, args)
            end
            status, body = util.curl(t.url .. "/x?apiKey=" .. ("k"):rep(257))
            assert.are.same({ 400, "apiKey param is too long.\n" }, { status, body })
            for i = 1, 3 do assert.are.equal(per_router[i] * 8, t.st[i].hits) end
        end)
    end)

    it("a router killed: its keys go to the others and no request fails; the others' keys stay; back, its keys return", function()
        with_tier(TIER_CONF, function(t)
            local DEAD = 2
            local dead_addr = t.raddr[DEAD]
            local L = load(t, 6)
            -- all up: every key on its owner
            assert.is_true(L.run(1) > 100, "load too light")
            assert_routes(L, t.owner, "all up")
            assert.are.same({}, L.failed)
            -- killed (SIGKILL) while nothing is in flight (a request on its way to a router that
            -- dies may have reached it: it is not sent again, as api_router's spec shows), then
            -- the load resumes at once, before the probes can have seen it: the first requests
            -- meet the refused port and go to the key's next router, bodies included
            t.rp[DEAD]:kill()
            assert(t.rp[DEAD]:wait_exit(5), "router did not die")
            assert.is_true(L.run(1.5) > 100, "load too light")
            assert.are.same({}, L.failed)
            assert_routes(L, function(key) return t.fallback(key, DEAD) end, "router " .. DEAD .. " dead")
            -- its keys were spread over both other routers
            local moved_to = {}
            for _, key in ipairs(KEYS) do
                if t.owner(key) == DEAD then moved_to[t.fallback(key, DEAD)] = true end
            end
            assert.are.same({ [1] = true, [3] = true }, moved_to)
            local log = t.tier:log()
            assert.matches("upstream " .. dead_addr .. " failed (connection refused), trying ", log, 1, true)
            -- detected: down in the admin view (probes, after the passive ejection)
            assert.is_true(util.wait_for(function()
                local _, view = t.tier_admin("backends/")
                return view.health[dead_addr].state == "down"
            end, 5), "the probes never said router " .. DEAD .. " is down")
            local _, view = t.tier_admin("backends/")
            assert.is_false(view.health[dead_addr].up)
            assert.is_true(view.health[t.raddr[1]].up and view.health[t.raddr[3]].up)
            -- after detection: the same, with no retry needed
            local retries = select(2, t.tier:log():gsub("trying", ""))
            assert.is_true(L.run(1) > 100, "load too light")
            assert.are.same({}, L.failed)
            assert_routes(L, function(key) return t.fallback(key, DEAD) end, "router " .. DEAD .. " detected")
            assert.are.equal(retries, select(2, t.tier:log():gsub("trying", "")))
            -- back on its port, with nothing counted yet: up after `rise` probes, and its keys
            -- come back to it
            t.start_router(DEAD)
            assert.is_true(util.wait_for(function()
                local _, v = t.tier_admin("backends/")
                return v.health[dead_addr].up
            end, 5), "router " .. DEAD .. " never came back")
            assert.is_true(L.run(1) > 100, "load too light")
            assert.are.same({}, L.failed)
            assert_routes(L, t.owner, "router " .. DEAD .. " back")
            local usage = t.usage(DEAD)
            assert.is_truthy(next(usage), "the restarted router counted nothing")
            for key in pairs(usage) do assert.are.equal(DEAD, t.owner(key), key) end
            L.finish()
        end, 60)
    end)
end)

-- Stand-in routers: handler servers in this loop that count every request but the tier's
-- probes, to show what the tier itself answers.
describe("examples/router_tier.lua, in front of stand-in routers", function()
    it("answers a request without a key itself (no router sees it); every router down is 503 at once", function()
        util.run(function()
            local hits, srv, addrs = { 0, 0, 0 }, {}, {}
            for i = 1, 3 do
                srv[i] = util.serve_handler(function(req)
                    if req:get_header("user-agent") == PROBE_UA then return 400, MISSING end
                    hits[i] = hits[i] + 1
                    return 200, "s" .. i
                end)
                addrs[i] = "--backend " .. srv[i].addr
            end
            local port = util.free_port()
            local url = "http://127.0.0.1:" .. port
            local conf = util.write_temp("tier.conf.lua", "return { " .. TIER_CONF .. " }")
            local tier = start_main(("--workers 2 --policy examples/router_tier.lua %s --config %s")
                :format(table.concat(addrs, " "), conf), port, 30)
            local ok, err = pcall(function()
                for _, c in ipairs({
                    { "/x" }, { "/x?apiKey=" }, { "/x?apikey=lower" },
                    { "/x", { headers = { ["x-api-key"] = "" } } },
                    { "/x", { method = "POST", body = "a=1", headers = { ["content-type"] = FORM } } },
                    { "/x", { method = "POST", body = '{"apiKey":"k"}', headers = { ["content-type"] = "application/json" } } },
                }) do
                    assert.are.same({ 400, MISSING }, { request(url .. c[1], c[2]) }, c[1])
                end
                assert.are.same({ 400, "apiKey param is too long.\n" },
                    { request(url .. "/x?apiKey=" .. ("k"):rep(257)) })
                assert.are.same({ 0, 0, 0 }, hits)
                -- with a key: one request, to one stand-in
                local status, body = request(url .. "/x?apiKey=k")
                assert.are.equal(200, status)
                assert.matches("^s%d$", body)
                assert.are.equal(1, hits[1] + hits[2] + hits[3])
                -- all gone: once the probes see it, 503 at once
                for i = 1, 3 do util.shut(srv[i]) end
                assert.is_true(util.wait_for(function()
                    local _, b = request(url .. "/admin/backends/")
                    local view = json.decode(b)
                    for _, h in pairs(view.health) do if h.up then return false end end
                    return true
                end, 5), "the routers were never all down")
                for _ = 1, 3 do
                    assert.are.same({ 503, "503 Service Unavailable\n" }, { request(url .. "/x?apiKey=k") })
                end
                assert.matches("no router for key k: no backend up", tier:log(), 1, true)
            end)
            local log = tier:log()
            stop_main(tier)
            for i = 1, 3 do pcall(util.shut, srv[i]) end
            if not ok then error(tostring(err) .. "\n--- tier's log:\n" .. log, 0) end
        end, 30)
    end)
end)
