-- examples/timeline_cache.lua end to end: a real `lua main.lua --policy
-- examples/timeline_cache.lua --workers 2` process (util.main) in front of a backend that is a
-- luaproxy handler server in this spec's own loop on 127.0.0.1. The backend counts its fetches
-- and can be made slow, broken or closed and reopened on its port. Clients are luaproxy.http
-- requests from the same loop. Every spec runs under util.run's deadline and main.lua under
-- `timeout`.
local luaproxy = require "luaproxy"
local util = require "support.util"

local json = luaproxy.json

local TIMELINE = json.encode({
    { id = 1, text = "first", created_at = "Thu Mar 17 10:00:00 +0000 2011", source = "web",
      user = { screen_name = "alice", id = 7 } },
    { id = 2, text = "second", created_at = "Thu Mar 17 11:00:00 +0000 2011", retweets = 3 },
})
local FILTERED = '[{"id":1,"text":"first","created_at":"Thu Mar 17 10:00:00 +0000 2011"},'
    .. '{"id":2,"text":"second","created_at":"Thu Mar 17 11:00:00 +0000 2011"}]'

-- The backend: every request is a fetch (st.fetches, st.uris); it answers st.status with
-- st.body after st.delay seconds.
local function backend_handler(st)
    return function(req)
        st.fetches = st.fetches + 1
        st.uris[#st.uris + 1] = req:get_uri()
        if st.delay > 0 then luaproxy.sleep(st.delay) end
        return st.status, st.body, { ["content-type"] = "application/json" }
    end
end

-- status, body, headers through luaproxy.http (bounded: 10 s)
local request = util.request

-- The example itself, with each answer saying which worker gave it (X-Worker).
local WORKER_TAGGED = [[
local luaproxy = require "luaproxy"
local policy = dofile("examples/timeline_cache.lua")
local handler = policy.handler
return { init_worker = policy.init_worker, handler = function(req)
    local status, body, headers = handler(req)
    headers = headers or {}
    headers["x-worker"] = tostring(luaproxy.worker.id())
    return status, body, headers
end }
]]

-- fn(t) with main.lua (2 workers) running the policy (default: the example) in front of one
-- backend; `conf` is Lua source for more fields of the --config table.
local function with_timeline(conf, fn, seconds, policy, extra_backend)
    seconds = seconds or 30
    policy = policy or "examples/timeline_cache.lua"
    return util.run(function()
        local t = { st = { fetches = 0, uris = {}, status = 200, body = TIMELINE, delay = 0 } }
        t.srv = util.serve_handler(backend_handler(t.st))
        local port = util.free_port()
        local conf_file = util.write_temp("timeline.conf.lua", "return { " .. (conf or "") .. " }")
        local backends = "--backend " .. t.srv.addr
        if extra_backend then backends = "--backend " .. extra_backend .. " " .. backends end
        t.p = util.main(("--listen 127.0.0.1:%d --workers 2 --policy %s %s --config %s")
            :format(port, policy, backends, conf_file), seconds + 20)
        t.url = "http://127.0.0.1:" .. port
        function t.get(path, opts) return request(t.url .. path, opts) end
        function t.close_backend() util.shut(t.srv) end
        function t.reopen_backend() t.srv = util.serve_handler(backend_handler(t.st), t.srv.port) end
        local ok, err = pcall(function()
            -- its start-up line, not just an answer: a worker may serve while another is still
            -- starting, and a TERM before main.lua listens for signals would kill it (exit 143)
            assert(util.wait_for(function() return t.p:log():find("luaproxy listening", 1, true) end, 10),
                "main.lua did not start")
            assert.are.equal(404, (t.get("/")))
            fn(t)
        end)
        t.p:signal("TERM")
        -- generous: on a loaded machine a graceful stop can take a while
        local code = t.p:wait_exit(15)
        if not code then t.p:kill() end
        pcall(util.shut, t.srv)
        if not ok then error(tostring(err) .. "\n--- main.lua's log:\n" .. t.p:log(), 0) end
        assert.are.equal(0, code, "exit status " .. tostring(code) .. "; main.lua's log:\n" .. t.p:log())
        -- whatever the upstream sent, the policy never raised
        assert.is_nil(t.p:log():find("error in policy", 1, true), t.p:log())
    end, seconds)
end

local function error_of(body)
    local doc = json.decode(body or "")
    return type(doc) == "table" and doc.error or nil
end

describe("examples/timeline_cache.lua", function()
    it("keeps only the configured fields: nested, missing, null, non-object items, exact numbers", function()
        local conf = [[timeline_fields = { "id", "text", "user.screen_name", "user.missing", "geo.lat", "created_at" },
            timeline_path = "/api/statuses/{user}.json?count=50"]]
        -- the largest integer a double holds exactly on LuaJIT (no 64-bit integers there)
        local big = util.JIT and "9007199254740991" or "12345678901234567"
        with_timeline(conf, function(t)
            t.st.body = ([=[[
                {"id": 1, "text": "a", "created_at": "c1", "extra": {"x": 1},
                 "user": {"screen_name": "bob", "id": 7, "followers": 3}, "geo": null},
                {"id": BIG, "text": "caf\u00e9 \"q\"", "user": "not an object", "geo": [1, 2]},
                42, "str", null, [1, 2], true,
                {"created_at": "c3", "text": null, "user": {}, "geo": {"lat": 1.5, "lon": 2}},
                {"id": {"nested": [1, {"deep": true}]}},
                {}
            ]]=]):gsub("BIG", big)
            local status, body, headers = t.get("/timeline/a%20b")
            assert.are.equal(200, status, body)
            assert.are.equal(
                '[{"id":1,"text":"a","user":{"screen_name":"bob"},"created_at":"c1"},'
                .. '{"id":' .. big .. ',"text":"caf\xc3\xa9 \\"q\\""},'
                .. '{"text":null,"user":{},"geo":{"lat":1.5},"created_at":"c3"},'
                .. '{"id":{"nested":[1,{"deep":true}]}},'
                .. '{}]', body)
            assert.are.equal("application/json", headers["content-type"])
            assert.are.equal("MISS", headers["x-cache"])
            -- the template, with the user %-encoded again
            assert.are.same({ "/api/statuses/a%20b.json?count=50" }, t.st.uris)

            -- an upstream array with no object in it, and an empty one
            t.st.body = '[1, "x", null]'
            status, body = t.get("/timeline/nobody")
            assert.are.same({ 200, "[]" }, { status, body })
            t.st.body = '[]'
            status, body = t.get("/timeline/empty")
            assert.are.same({ 200, "[]" }, { status, body })
        end)
    end)

    it("serves the default fields and answers other paths with 404 and other methods with 405, as JSON", function()
        with_timeline(nil, function(t)
            local status, body, headers = t.get("/timeline/alice?ignored=1")
            assert.are.same({ 200, FILTERED }, { status, body })
            assert.are.same({ "/timeline/alice" }, t.st.uris)
            for _, path in ipairs({ "/", "/timeline", "/timeline/", "/timeline/a/b", "/timelines/a", "/timeline/"
                    .. ("x"):rep(300) }) do
                status, body, headers = t.get(path)
                assert.are.equal(404, status, path)
                assert.are.equal("not found", error_of(body), path)
                assert.are.equal("application/json", headers["content-type"])
            end
            for _, method in ipairs({ "POST", "PUT", "DELETE", "OPTIONS", "PATCH" }) do
                status, body, headers = t.get("/timeline/alice", { method = method, body = method == "POST" and "x" or nil })
                assert.are.equal(405, status, method)
                assert.are.equal("GET, HEAD", headers["allow"])
                assert.are.equal("method not allowed", error_of(body))
            end
            -- HEAD: the GET's headers and length, no body
            local res = assert(luaproxy.http.request_uri(t.url .. "/timeline/alice", { method = "HEAD" }))
            assert.are.same({ 200, "", tostring(#FILTERED), "HIT" },
                { res.status, res.body, res.headers["content-length"], res.headers["x-cache"] })
            assert.are.equal(1, t.st.fetches)
        end)
    end)

    it("200 concurrent clients on 2 workers cause exactly one upstream fetch", function()
        with_timeline(nil, function(t)
            t.st.delay = 1 -- every client arrives while the one fetch is running
            local N = 200
            local results, tasks = {}, {}
            for i = 1, N do
                tasks[i] = luaproxy.spawn(function()
                    local status, body, headers = t.get("/timeline/alice")
                    results[i] = { status = status, body = body, cache = headers and headers["x-cache"],
                        etag = headers and headers["etag"], worker = headers and headers["x-worker"] }
                end)
            end
            for i = 1, N do tasks[i]:wait() end
            local how, workers = {}, {}
            for i = 1, N do
                local r = results[i]
                assert.are.same({ 200, FILTERED }, { r.status, r.body }, "client " .. i)
                assert.are.equal(results[1].etag, r.etag)
                how[r.cache] = (how[r.cache] or 0) + 1
                workers[r.worker] = (workers[r.worker] or 0) + 1
            end
            -- both workers served some of them (open connections are spread across workers)
            assert.is_true((workers["0"] or 0) > 0 and (workers["1"] or 0) > 0, json.encode(workers))
            assert.are.equal(1, t.st.fetches)
            assert.are.equal(1, how.MISS)
            assert.is_true((how.SHARED or 0) >= 1, "no client waited for the fetch: " .. json.encode(how))
            assert.are.equal(N, (how.MISS or 0) + (how.SHARED or 0) + (how.HIT or 0), json.encode(how))
            -- and the next ones come from the cache
            t.st.delay = 0
            for _ = 1, 20 do
                local status, body, headers = t.get("/timeline/alice")
                assert.are.same({ 200, FILTERED, "HIT" }, { status, body, headers["x-cache"] })
            end
            assert.are.equal(1, t.st.fetches)
            -- another user is another key: one more fetch
            assert.are.equal(200, (t.get("/timeline/bob")))
            assert.are.equal(2, t.st.fetches)
        end, 40, util.write_temp("tagged.lua", WORKER_TAGGED))
    end)

    it("serves a stale copy when the upstream is down, fails with 5xx or times out; 502/504 without one", function()
        local conf = "timeline_ttl = 1, timeline_neg_ttl = 1, timeline_timeout = 0.5"
        with_timeline(conf, function(t)
            local status, body, headers = t.get("/timeline/alice")
            assert.are.same({ 200, FILTERED, "MISS" }, { status, body, headers["x-cache"] })
            local etag = headers["etag"]
            local function is_stale(what)
                local s, b, h = t.get("/timeline/alice")
                assert.are.same({ 200, FILTERED, "STALE", '110 - "Response is Stale"', "public, max-age=0", etag },
                    { s, b, h["x-cache"], h["warning"], h["cache-control"], h["etag"] }, what)
            end

            -- refused
            t.close_backend()
            luaproxy.sleep(1.2)
            is_stale("backend closed")
            status, body, headers = t.get("/timeline/bob")
            assert.are.equal(502, status)
            assert.are.equal("application/json", headers["content-type"])
            assert.are.equal("upstream failed", error_of(body))

            -- a 5xx: asked once the failure is 1 s old, not before
            t.st.status, t.st.body = 503, "busy"
            t.reopen_backend()
            luaproxy.sleep(1.2)
            local before = t.st.fetches
            is_stale("backend answering 503")
            assert.are.equal(before + 1, t.st.fetches)
            is_stale("within timeline_neg_ttl")
            assert.are.equal(before + 1, t.st.fetches)
            status, body = t.get("/timeline/carol")
            assert.are.same({ 502, "upstream answered 503" }, { status, error_of(body) })

            -- a timeout
            t.st.status, t.st.body, t.st.delay = 200, TIMELINE, 3
            luaproxy.sleep(1.2)
            is_stale("backend too slow")
            status, body = t.get("/timeline/dave")
            assert.are.same({ 504, "upstream timed out" }, { status, error_of(body) })

            -- back to health: fresh again, with the new content
            t.st.delay = 0
            t.st.body = json.encode({ { id = 3, text = "third", created_at = "now", more = 1 } })
            luaproxy.sleep(1.2)
            status, body, headers = t.get("/timeline/alice")
            assert.are.same({ 200, '[{"id":3,"text":"third","created_at":"now"}]', "MISS" },
                { status, body, headers["x-cache"] })
            assert.are_not.equal(etag, headers["etag"])
            assert.is_nil(headers["warning"])
        end)
    end)

    it("answers 502 for an upstream answer that is not a JSON array, and caches nothing", function()
        with_timeline(nil, function(t)
            local cases = {
                { "not json", "upstream answer is not JSON" },
                { "", "upstream answer is not JSON" },
                { '[{"id": 1}', "upstream answer is not JSON" },
                { '{"id": 1, "text": "an object"}', "upstream answer is not a JSON array" },
                { '"a string"', "upstream answer is not a JSON array" },
                { "null", "upstream answer is not a JSON array" },
                { "42", "upstream answer is not a JSON array" },
            }
            for i, c in ipairs(cases) do
                t.st.body = c[1]
                for round = 1, 2 do -- the second asks the upstream again
                    local status, body, headers = t.get("/timeline/bad")
                    assert.are.same({ 502, c[2], "application/json" }, { status, error_of(body), headers["content-type"] },
                        ("%q, round %d"):format(c[1], round))
                end
                assert.are.equal(2 * i, t.st.fetches)
            end
            -- other statuses: 404 passes through, the rest are 502
            t.st.body = TIMELINE
            t.st.status = 404
            local status, body = t.get("/timeline/gone")
            assert.are.same({ 404, "no timeline for this user" }, { status, error_of(body) })
            t.st.status = 500
            status, body = t.get("/timeline/gone")
            assert.are.same({ 502, "upstream answered 500" }, { status, error_of(body) })
            -- a good answer is cached at once
            t.st.status = 200
            local n = t.st.fetches
            for _ = 1, 2 do
                status, body = t.get("/timeline/bad")
                assert.are.same({ 200, FILTERED }, { status, body })
            end
            assert.are.equal(n + 1, t.st.fetches)
        end)
    end)

    it("retries a refused connection on another backend", function()
        local dead = "127.0.0.1:" .. util.run(util.free_port)
        with_timeline(nil, function(t)
            for u = 1, 6 do
                local status, body = t.get("/timeline/u" .. u)
                assert.are.same({ 200, FILTERED }, { status, body })
            end
            assert.are.equal(6, t.st.fetches)
            assert.matches("upstream " .. dead .. " failed (connection refused), trying " .. t.srv.addr,
                t.p:log(), 1, true)
        end, nil, nil, dead)
    end)

    it("gives the same answers and fetches with a tiny per-worker table or none", function()
        for _, size in ipairs({ 0, 2 }) do
            with_timeline("timeline_lru_size = " .. size, function(t)
                for round = 1, 4 do
                    for u = 1, 5 do
                        local status, body, headers = t.get("/timeline/u" .. u)
                        assert.are.same({ 200, FILTERED }, { status, body }, "size " .. size)
                        assert.are.equal(round == 1 and "MISS" or "HIT", headers["x-cache"])
                    end
                end
                assert.are.equal(5, t.st.fetches)
            end)
        end
    end)

    it("sends Cache-Control with the seconds left and a strong ETag; If-None-Match gets 304", function()
        with_timeline("timeline_ttl = 120", function(t)
            local status, body, headers = t.get("/timeline/alice")
            assert.are.same({ 200, FILTERED }, { status, body })
            local etag = headers["etag"]
            assert.matches('^"%x+"$', etag)
            local left = tonumber(headers["cache-control"]:match("^public, max%-age=(%d+)$"))
            assert.is_true(left ~= nil and left > 0 and left <= 120, headers["cache-control"])
            local function cond(inm, method)
                local res = assert(luaproxy.http.request_uri(t.url .. "/timeline/alice",
                    { method = method, headers = { ["if-none-match"] = inm } }))
                return res.status, res.body, res.headers
            end
            for _, inm in ipairs({ etag, "W/" .. etag, '"other", ' .. etag, '"a","b",' .. etag .. ' , "c"',
                    "*", " * ", "W/\"other\",W/" .. etag }) do
                status, body, headers = cond(inm)
                assert.are.same({ 304, "", etag }, { status, body, headers["etag"] }, inm)
                assert.matches("^public, max%-age=%d+$", headers["cache-control"])
                assert.is_nil(headers["content-length"])
                status = cond(inm, "HEAD")
                assert.are.equal(304, status, "HEAD " .. inm)
            end
            -- a near miss is no match
            for _, inm in ipairs({ '"other"', etag:sub(1, -2) .. '0"', etag:sub(2, -2), '"other" ' .. etag,
                    "W/", "", "**", ("x"):rep(100) }) do
                status, body = cond(inm)
                assert.are.same({ 200, FILTERED }, { status, body }, inm)
            end
            assert.are.equal(1, t.st.fetches)
        end)
    end)
end)

describe("timeline_cache.none_match", function()
    local none_match = dofile("examples/timeline_cache.lua").none_match
    it("compares entity tags weakly, in lists, with *", function()
        local e = '"abc"'
        for _, h in ipairs({ '"abc"', 'W/"abc"', '"x", "abc"', '"x",W/"abc"', '  "x" ,  "abc"  ', '*', '"abc", "x"',
                ',"abc"', '"x",,"abc"' }) do
            assert.is_true(none_match(h, e), h)
        end
        for _, h in ipairs({ '"abcd"', '"ab"', 'abc', '"x" "abc"', 'w/"abc"', '"x", abc', '"abc', '* , "x"', '' }) do
            assert.is_false(none_match(h, e), h)
        end
    end)
end)
