-- examples/api_router.lua end to end: a real `lua main.lua --policy examples/api_router.lua
-- --workers 2` process (util.main) in front of backends that are luaproxy handler servers in
-- this spec's own loop on 127.0.0.1 (they record what reaches them, their /health answer can
-- be made to fail, and they can be closed and reopened on the same port). Clients are
-- luaproxy.http (util.get) and the real curl, run in the background so the backends in this
-- loop keep serving while it waits. Every spec runs under util.run's deadline and main.lua
-- under `timeout`.
local luaproxy = require "luaproxy"
local util = require "support.util"

local json = luaproxy.json

local MISSING = "Request is missing apiKey param.\n"
local FORM = "application/x-www-form-urlencoded"

-- A backend: st.healthy (default true) decides /health's answer (200 or 500); every other
-- request is counted in st.hits and recorded in st.seen (method, uri, body, content-length,
-- transfer-encoding).
local function backend_handler(name, st)
    return function(req)
        if req:get_path() == "/health" then
            st.probes = st.probes + 1
            if st.healthy then return 200, "ok" end
            return 500, "sick"
        end
        st.hits = st.hits + 1
        local body = req:read_body() or ""
        st.seen[#st.seen + 1] = { method = req:get_method(), uri = req:get_uri(), body = body,
            cl = req:get_header("content-length"), te = req:get_header("transfer-encoding") }
        return 200, name, { ["x-backend"] = name }
    end
end

local function open(name, st, port)
    return util.serve_handler(backend_handler(name, st), port)
end

local shut = util.shut

-- status, body, headers of a request through luaproxy.http (bounded: 5 s)
local function request(url, opts)
    return util.request(url, opts, 5)
end

-- curl in the background (this loop keeps running while it waits): status, body, headers
-- (lower-case names). `args` is a shell fragment; bounded to 10 s.
local function curl(args)
    local base = util.write_temp("curl", "")
    local pid = util.start(("curl -s -m 5 -D %s.head -o %s.body -w '%%{http_code}' %s"):format(base, base, args),
        10, base .. ".status")
    assert(util.wait_for(function() return not util.alive(pid) end, 10), "curl did not finish")
    local headers = {}
    for line in (util.read_file(base .. ".head") or ""):gmatch("[^\r\n]+") do
        local k, v = line:match("^([^:]+):%s*(.*)$")
        if k then headers[k:lower()] = v end
    end
    return tonumber(util.read_file(base .. ".status")), util.read_file(base .. ".body") or "", headers
end

-- fn(t) with main.lua running the router (2 workers) in front of `n` backends (2); `conf` is
-- Lua source for more fields of the --config table.
local function with_router(conf, fn, seconds, n)
    seconds = seconds or 30
    return util.run(function()
        local t = { st = {}, srv = {}, addr = {} }
        for i = 1, n or 2 do
            t.st[i] = { healthy = true, hits = 0, probes = 0, seen = {} }
            t.srv[i] = open("b" .. i, t.st[i])
            t.addr[i] = t.srv[i].addr
        end
        local port = util.free_port()
        local conf_file = util.write_temp("router.conf.lua", "return { " .. (conf or "") .. " }")
        local backends = {}
        for i = 1, math.min(2, #t.addr) do backends[i] = "--backend " .. t.addr[i] end
        t.p = util.main(("--listen 127.0.0.1:%d --workers 2 --policy examples/api_router.lua %s --config %s")
            :format(port, table.concat(backends, " "), conf_file), seconds + 5)
        t.url = "http://127.0.0.1:" .. port
        function t.hits()
            local sum = 0
            for i = 1, #t.st do sum = sum + t.st[i].hits end
            return sum
        end
        function t.admin(path, opts)
            local status, body = request(t.url .. "/admin/" .. path, opts)
            return status, body and json.decode(body)
        end
        function t.reopen(i)
            t.srv[i] = open("b" .. i, t.st[i], t.srv[i].port)
        end
        local ok, err = pcall(function()
            assert(util.wait_for(function() return request(t.url .. "/admin/usage/") == 200 end, 5),
                "main.lua did not start")
            fn(t)
        end)
        t.p:signal("TERM")
        local code = t.p:wait_exit(5)
        if not code then t.p:kill() end
        for i = 1, #t.srv do pcall(shut, t.srv[i]) end
        if not ok then error(tostring(err) .. "\n--- main.lua's log:\n" .. t.p:log(), 0) end
        assert.are.equal(0, code, t.p:log())
    end, seconds)
end

-- `tasks` coroutines sending requests (make(i, j) -> path, opts) until L.finish():
-- L.total, L.ok, L.failed (a list of "status body"), L.failed_at (when each failure came).
local function load(t, tasks, make)
    local L = { stop = false, total = 0, ok = 0, failed = {}, failed_at = {}, running = {} }
    for i = 1, tasks do
        L.running[i] = luaproxy.spawn(function()
            local j = 0
            while not L.stop do
                j = j + 1
                local path, opts = make(i, j)
                local status, body = request(t.url .. path, opts)
                L.total = L.total + 1
                if status == 200 then
                    L.ok = L.ok + 1
                else
                    L.failed[#L.failed + 1] = tostring(status) .. " " .. tostring(body)
                    L.failed_at[#L.failed_at + 1] = luaproxy.now()
                end
            end
        end)
    end
    function L.finish()
        L.stop = true
        for _, task in ipairs(L.running) do task:wait() end
        return L
    end
    return L
end

local function get_with_key(i, j)
    return "/load?task=" .. i .. "&n=" .. j, { headers = { ["x-api-key"] = "load" } }
end

local form = util.form

describe("examples/api_router.lua", function()
    it("a request without an API key gets 400 with the original's text, whatever the source, and nothing goes upstream", function()
        with_router(nil, function(t)
            local cases = {
                { "/x" },
                { "/x?apikey=lower&APIKEY=upper&other=1" },      -- names are case-sensitive
                { "/x?apiKey=" },                                  -- empty
                { "/x?apiKey" },                                   -- no value
                { "/x", { headers = { ["x-api-key"] = "" } } },
                { "/x", form("a=1&b=2") },
                { "/x", form("apiKey=&a=1") },
                { "/x", form("apiKey") },
                { "/x", form("") },
                -- only a form body counts: the same text as JSON, or a form sent as text/plain
                { "/x", { method = "POST", body = '{"apiKey":"k"}', headers = { ["content-type"] = "application/json" } } },
                { "/x", { method = "POST", body = "apiKey=k", headers = { ["content-type"] = "text/plain" } } },
            }
            for _, c in ipairs(cases) do
                local status, body = request(t.url .. c[1], c[2])
                assert.are.same({ 400, MISSING }, { status, body }, c[1] .. " " .. tostring(c[2] and c[2].body))
            end
            -- as curl shows it
            local status, body = curl("'" .. t.url .. "/x?a=1'")
            assert.are.same({ 400, MISSING }, { status, body })
            status, body = curl("-d 'a=1&b=2' '" .. t.url .. "/x'")
            assert.are.same({ 400, MISSING }, { status, body })
            assert.are.equal(0, t.hits())
            local _, usage = t.admin("usage/")
            assert.are.same({}, usage)
        end)
    end)

    it("takes the key from a form body, else the query, else X-Api-Key; each is accepted and counted", function()
        with_router(nil, function(t)
            local function ok(path, opts)
                local status, body = request(t.url .. path, opts)
                assert.are.equal(200, status, path .. ": " .. tostring(body))
                assert.matches("^b%d$", body)
            end
            local hdr = { ["x-api-key"] = "from-header" }
            -- all three given: the body wins
            ok("/a?apiKey=from-query", form("x=1&apiKey=from-body&y=2", { ["x-api-key"] = "from-header" }))
            -- a form without it: the query; no query: the header
            ok("/a?apiKey=from-query", form("x=1", { ["x-api-key"] = "from-header" }))
            ok("/a", { headers = hdr })
            ok("/a?apiKey=", { headers = hdr })                 -- an empty query value falls through
            ok("/a", { method = "POST", body = "{}", headers = { ["content-type"] = "application/json",
                ["x-api-key"] = "from-header" } })
            -- decoded as nginx decodes arguments; the first of repeated values
            ok("/a?x=1&api%4Bey=esc%20aped")
            ok("/a", form("apiKey=first+one&apiKey=second"))
            ok("/a", form("apiKey=caps", { ["content-type"] = "Application/X-WWW-Form-URLEncoded; charset=UTF-8" }))
            ok("/a?apiKey=q%26k%3D1")
            local status, usage = t.admin("usage/")
            assert.are.equal(200, status)
            assert.are.same({ ["from-body"] = 1, ["from-query"] = 1, ["from-header"] = 3, ["esc aped"] = 1,
                ["first one"] = 1, caps = 1, ["q&k=1"] = 1 }, usage)
            assert.are.equal(9, t.hits())
            -- a key over 256 bytes is refused, and not counted
            status = request(t.url .. "/a?apiKey=" .. ("k"):rep(257))
            assert.are.equal(400, status)
            assert.are.equal(9, t.hits())
        end)
    end)

    it("forwards a form body byte for byte with the Content-Length it came with", function()
        with_router(nil, function(t)
            local bodies = {
                "apiKey=k1&x=%25%26%3D%2B+plus&empty=&flag&&trailing%",
                "apiKey=k2%zz&%=&=v&&&a=%E2%82%AC&b=%ff%00&c=%2",
                "%61piKey=k3&apiKey=%6B%65%79",                   -- both spell apiKey: the first counts
                "&&apiKey=k4&&",
                "apiKey=k5&bin=" .. util.random_bytes(200000),      -- any bytes, '&', '%' and NUL included
            }
            local keys = { "k1", "k2%zz", "k3", "k4", "k5" }
            for i, body in ipairs(bodies) do
                local before = t.hits()
                local status = request(t.url .. "/submit?v=" .. i, form(body))
                assert.are.equal(200, status)
                assert.are.equal(before + 1, t.hits())
                local seen
                for b = 1, 2 do
                    local s = t.st[b].seen
                    if s[#s] and s[#s].uri == "/submit?v=" .. i then seen = s[#s] end
                end
                assert.is_truthy(seen, "request " .. i .. " not seen")
                assert.are.equal("POST", seen.method)
                util.same_bytes(body, seen.body, "body " .. i)
                assert.are.equal(tostring(#body), seen.cl)
            end
            -- a chunked form (curl): the same bytes, now with their Content-Length
            local file = util.write_temp("form.txt", "apiKey=chunky&x=%25%%26&y=a+b")
            local status = curl("-H 'Transfer-Encoding: chunked' -H 'Content-Type: " .. FORM .. "' --data-binary @"
                .. file .. " '" .. t.url .. "/chunked'")
            assert.are.equal(200, status)
            local seen
            for b = 1, 2 do
                for _, s in ipairs(t.st[b].seen) do
                    if s.uri == "/chunked" then seen = s end
                end
            end
            util.same_bytes("apiKey=chunky&x=%25%%26&y=a+b", seen.body, "chunked body")
            assert.are.equal("29", seen.cl)
            assert.is_nil(seen.te)
            -- a large one from curl asking `Expect: 100-continue` first: it waits for our 100
            local big = "apiKey=expect&data=" .. util.random_bytes(60000)
            file = util.write_temp("big.txt", big)
            local headers
            status, _, headers = curl("--trace-ascii " .. file .. ".trace --expect100-timeout 4 "
                .. "-H 'Expect: 100-continue' -H 'Content-Type: " .. FORM .. "' --data-binary @" .. file
                .. " '" .. t.url .. "/expect'")
            assert.are.equal(200, status)
            assert.matches("HTTP/1.1 100 Continue", util.read_file(file .. ".trace"), 1, true)
            assert.is_truthy(headers["x-backend"])
            seen = nil
            for b = 1, 2 do
                for _, s in ipairs(t.st[b].seen) do
                    if s.uri == "/expect" then seen = s end
                end
            end
            util.same_bytes(big, seen.body, "body sent after 100 Continue")
            assert.are.equal(tostring(#big), seen.cl)
            local _, usage = t.admin("usage/")
            for _, k in ipairs(keys) do assert.are.equal(1, usage[k], k) end
            assert.are.equal(1, usage.chunky)
            assert.are.equal(1, usage.expect)
        end)
    end)

    it("a form body over client_max_body_size gets 413 and nothing goes upstream", function()
        with_router("client_max_body_size = '1k'", function(t)
            local status = request(t.url .. "/big", form("apiKey=k&x=" .. ("a"):rep(2000)))
            assert.are.equal(413, status)
            assert.are.equal(0, t.hits())
            assert.are.equal(200, (request(t.url .. "/small", form("apiKey=k&x=1"))))
        end)
    end)

    it("admin: 200 from 127.0.0.1 with each backend's health and requests in flight, 403 from 127.0.0.2", function()
        with_router("health_check = { path = '/health', interval = 0.2, timeout = 0.5, fall = 2, rise = 2 }", function(t)
            local status, view = t.admin("backends/")
            assert.are.equal(200, status)
            assert.are.same({ t.addr[1], t.addr[2] }, view.backends)
            for i = 1, 2 do
                assert.are.equal(0, view.inflight[t.addr[i]])
                assert.is_true(view.health[t.addr[i]].up)
                assert.are.equal("up", view.health[t.addr[i]].state)
            end
            -- curl from 127.0.0.1 and from 127.0.0.2 (--interface binds the client address)
            local body
            status, body = curl("'" .. t.url .. "/admin/backends/'")
            assert.are.equal(200, status)
            assert.are.same({ t.addr[1], t.addr[2] }, json.decode(body).backends)
            status, body = curl("'" .. t.url .. "/admin/usage/'")
            assert.are.same({ 200, "{}" }, { status, body })
            for _, path in ipairs({ "backends/", "usage/", "set_backends/" }) do
                status, body = curl("--interface 127.0.0.2 -d '[\"127.0.0.1:9\"]' '" .. t.url .. "/admin/" .. path .. "'")
                assert.are.equal(403, status, path)
                assert.matches("only open to 127.0.0.1", body, 1, true)
                status, body = curl("--interface 127.0.0.2 '" .. t.url .. "/admin/" .. path .. "'")
                assert.are.equal(403, status, path)
            end
            _, view = t.admin("backends/")
            assert.are.same({ t.addr[1], t.addr[2] }, view.backends)
            -- a client on 127.0.0.2 with a key is served as usual
            status, body = curl("--interface 127.0.0.2 '" .. t.url .. "/x?apiKey=remote'")
            assert.are.equal(200, status, body)
            local usage
            status, usage = t.admin("usage/")
            assert.are.same({ remote = 1 }, usage)
            assert.are.equal(404, (t.admin("nothing/")))
        end)
    end)

    it("backends added and removed through the admin endpoint under load: no request fails", function()
        with_router(nil, function(t)
            local a1, a2, a3 = t.addr[1], t.addr[2], t.addr[3]
            local L = load(t, 8, function(i, j)
                if j % 2 == 0 then return "/load", form("apiKey=form-" .. i .. "&n=" .. j) end
                return get_with_key(i, j)
            end)
            local function set(list)
                local status, body = t.admin("set_backends/", { method = "POST", body = json.encode(list) })
                assert.are.equal(200, status)
                assert.are.same(list, body.backends)
            end
            -- each phase: after the switch settles, only the listed backends get requests
            local function phase(list)
                set(list)
                luaproxy.sleep(0.2)                     -- requests already under way finish
                local before = { t.st[1].hits, t.st[2].hits, t.st[3].hits }
                local total0 = L.total
                luaproxy.sleep(0.5)
                assert.is_true(L.total - total0 > 50, "load too light: " .. (L.total - total0))
                local listed = {}
                for _, a in ipairs(list) do listed[a] = true end
                for i, a in ipairs({ a1, a2, a3 }) do
                    local got = t.st[i].hits - before[i]
                    if listed[a] then
                        assert.is_true(got > 0, "b" .. i .. " listed but got nothing")
                    else
                        assert.are.equal(0, got, "b" .. i .. " not listed but got requests")
                    end
                end
            end
            luaproxy.sleep(0.3)
            phase({ a1 })
            phase({ a1, a2, a3 })
            phase({ a3 })
            phase({ a2, a1 })
            L.finish()
            assert.are.same({}, L.failed)
            assert.are.equal(L.total, L.ok)
            -- every request was counted once, under its key
            local _, usage = t.admin("usage/")
            local counted = 0
            for _, n in pairs(usage) do counted = counted + n end
            assert.are.equal(L.total, counted)
            assert.are.equal(L.total, t.hits())
            local _, view = t.admin("backends/")
            for _, a in ipairs({ a1, a2 }) do assert.are.equal(0, view.inflight[a]) end
        end, 30, 3)
    end)

    it("counts requests per key exactly across both workers", function()
        with_router(nil, function(t)
            local N, TASKS = 600, 12
            local sent = { alpha = 0, beta = 0, ["gamma key"] = 0 }
            local names = { "alpha", "beta", "gamma key" }
            local next_i, statuses = 0, {}
            local tasks = {}
            for k = 1, TASKS do
                tasks[k] = luaproxy.spawn(function()
                    while next_i < N do
                        next_i = next_i + 1
                        local i = next_i
                        local key = names[i % 3 + 1]
                        sent[key] = sent[key] + 1
                        local path, opts
                        if i % 3 == 0 then
                            path, opts = "/u", form("apiKey=" .. key:gsub(" ", "+"))
                        elseif i % 3 == 1 then
                            path = "/u?apiKey=" .. key:gsub(" ", "%%20")
                        else
                            path, opts = "/u", { headers = { ["x-api-key"] = key } }
                        end
                        -- every 10th on a new connection: the two workers share them out
                        if i % 10 == 0 then
                            opts = opts or {}
                            opts.headers = opts.headers or {}
                            opts.headers.connection = "close"
                        end
                        local status = request(t.url .. path, opts)
                        statuses[status or "failed"] = (statuses[status or "failed"] or 0) + 1
                    end
                end)
            end
            for _, task in ipairs(tasks) do assert.is_true((task:wait())) end
            assert.are.same({ [200] = N }, statuses)
            local _, usage = t.admin("usage/")
            assert.are.same(sent, usage)
            assert.are.equal(N, t.hits())
        end)
    end)

    it("rate_limit: 429 with Retry-After past rate + burst per key, shared by both workers", function()
        with_router("rate_limit = { rate = 1, burst = 3 }", function(t)
            local function burst(key, n)
                local tasks, out = {}, { [200] = 0, [429] = 0 }
                for i = 1, n do
                    tasks[i] = luaproxy.spawn(function()
                        -- new connections, so both workers answer some
                        local status, body, headers = request(t.url .. "/r?apiKey=" .. key,
                            { headers = { connection = "close" } })
                        out[status] = (out[status] or 0) + 1
                        if status == 429 then
                            assert.are.equal("1", headers["retry-after"])
                            assert.are.equal("429 Too Many Requests\n", body)
                        end
                    end)
                end
                for _, task in ipairs(tasks) do
                    local ok, err = task:wait()
                    assert(ok, err)
                end
                return out
            end
            local t0 = luaproxy.now()
            local a = burst("A", 12)
            local b = burst("B", 2)
            assert.is_true(luaproxy.now() - t0 < 0.9, "the bursts took too long to test exactly")
            -- 1 + burst at once, whichever worker got them
            assert.are.same({ [200] = 4, [429] = 8 }, a)
            assert.are.same({ [200] = 2, [429] = 0 }, b)
            assert.are.equal(6, t.hits())
            -- rejected requests are not counted as usage
            local _, usage = t.admin("usage/")
            assert.are.same({ A = 4, B = 2 }, usage)
            -- as curl sees it
            local status, _, headers = curl("-i '" .. t.url .. "/r?apiKey=A'")
            assert.are.equal(429, status)
            assert.are.equal("1", headers["retry-after"])
            -- one more per second
            luaproxy.sleep(1.2)
            assert.are.equal(200, (request(t.url .. "/r?apiKey=A")))
            assert.are.equal(429, (request(t.url .. "/r?apiKey=A")))
        end)
    end)

    -- A request that was on its way to the backend when it died may fail (502: it may have
    -- reached it, so it is not sent again); one that meets the refused port is retried on the
    -- other. Once the checks have seen it, no request goes there and none fails.
    it("health: a backend killed under load gets no requests once detected, none fails, and it gets traffic when it comes back", function()
        with_router("health_check = { path = '/health', interval = 0.2, timeout = 0.5, fall = 2, rise = 2, "
            .. "valid_statuses = { 200, 302 } }, max_fails = 1, fail_timeout = 30", function(t)
            local a1 = t.addr[1]
            local function state()
                local _, view = t.admin("backends/")
                return view.health[a1]
            end
            local L = load(t, 6, get_with_key)
            luaproxy.sleep(0.5)
            assert.is_true(t.st[1].hits > 0 and t.st[2].hits > 0, "both backends get traffic")
            -- killed: its connections dropped at once, its port refuses
            local t_kill = luaproxy.now()
            shut(t.srv[1])
            assert.is_true(util.wait_for(function() return state().state == "down" end, 3),
                "b1 never detected as down by probes")
            local t_detect, failed_before = luaproxy.now(), #L.failed
            -- at most the requests in flight when it died (one per client task) failed, then
            for i = 1, failed_before do
                assert.matches("^502 ", L.failed[i])
                assert.is_true(L.failed_at[i] >= t_kill and L.failed_at[i] <= t_detect)
            end
            assert.is_true(failed_before <= 6, failed_before .. " failed")
            -- back on its port, but failing its health check: still down, gets nothing
            t.st[1].healthy = false
            t.reopen(1)
            local hits1, total0 = t.st[1].hits, L.total
            luaproxy.sleep(1)
            assert.are.equal("down", state().state)
            assert.are.equal(hits1, t.st[1].hits)
            assert.is_true(L.total - total0 > 100, "load too light: " .. (L.total - total0))
            -- healthy again: up after `rise` probes, then traffic
            t.st[1].healthy = true
            assert.is_true(util.wait_for(function() return state().up end, 3), "b1 never came back")
            assert.is_true(util.wait_for(function() return t.st[1].hits > hits1 + 20 end, 3),
                "b1 gets no traffic after coming back")
            L.finish()
            -- nothing failed after detection
            assert.are.equal(failed_before, #L.failed, L.failed[#L.failed])
            assert.are.equal(L.total, L.ok + failed_before)
        end, 30)
    end)

    it("health: every backend down gives 503 at once; one back, it serves", function()
        with_router("health_check = { path = '/health', interval = 0.2, timeout = 0.3, fall = 2, rise = 1 }, "
            .. "max_fails = 1, fail_timeout = 30", function(t)
            shut(t.srv[1])
            shut(t.srv[2])
            assert.is_true(util.wait_for(function()
                local _, view = t.admin("backends/")
                return not view.health[t.addr[1]].up and not view.health[t.addr[2]].up
            end, 5), "not both down")
            for _ = 1, 5 do
                local t0 = luaproxy.now()
                local status, body = request(t.url .. "/x?apiKey=k")
                assert.are.same({ 503, "503 Service Unavailable\n" }, { status, body })
                assert.is_true(luaproxy.now() - t0 < 0.3)
            end
            t.reopen(2)
            assert.is_true(util.wait_for(function() return request(t.url .. "/x?apiKey=k") == 200 end, 5),
                "b2 never served again")
            local status, body = request(t.url .. "/x?apiKey=k")
            assert.are.same({ 200, "b2" }, { status, body })
            assert.matches("no backend up", t.p:log(), 1, true)
        end)
    end)

    it("a refused connection is retried on another backend, form bodies included", function()
        with_router("max_fails = 0", function(t)
            local dead = "127.0.0.1:" .. util.free_port()
            local status = t.admin("set_backends/", { method = "POST", body = json.encode({ dead, t.addr[1] }) })
            assert.are.equal(200, status)
            for i = 1, 6 do
                local opts = i % 2 == 0 and form("apiKey=k&i=" .. i) or { headers = { ["x-api-key"] = "k" } }
                local st, body = request(t.url .. "/x", opts)
                assert.are.same({ 200, "b1" }, { st, body })
            end
            assert.are.equal(6, t.st[1].hits)
            assert.matches("trying " .. t.addr[1], t.p:log(), 1, true)
        end)
    end)

    it("a bad rate_limit or health_check in --config stops main.lua with one line", function()
        local ENV = util.lua_cmd("main.lua --listen 127.0.0.1:0 "
            .. "--policy examples/api_router.lua --backend 127.0.0.1:9 --config ", 10)
        for conf, want in pairs({
            ["rate_limit = { rate = 0 }"] = "bad rate_limit: ratelimit.new: rate must be a positive number",
            ["health_check = { interval = -1 }"] = "check.interval must be a positive number",
            ["fail_timeout = 0"] = "fail_timeout must be a positive number",
            ["rate_limit = 5"] = "setting 'rate_limit' must be a table",
            ["max_fails = 'x'"] = "setting 'max_fails' must be a number",
        }) do
            local out, code = util.sh(ENV .. util.write_temp("bad.conf.lua", "return { " .. conf .. " }"))
            assert.are.equal(1, code, out)
            assert.matches(want, out, 1, true)
            local lines = 0
            for _ in out:gmatch("[^\n]+") do lines = lines + 1 end
            assert.are.equal(1, lines, out)
        end
    end)
end)
