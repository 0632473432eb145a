-- luaproxy.cache: shared LRU/TTL caches with single-flight fetches and stale-while-revalidate.
-- Real upstreams on 127.0.0.1 (luaproxy itself), real worker threads, short real TTLs.
local luaproxy = require "luaproxy"
local util = require "support.util"

local n = 0
local function cache(capacity)
    n = n + 1
    return assert(luaproxy.cache.new("cache_spec_" .. n, { capacity = capacity or "1m" }))
end

local function sleep(s)
    luaproxy.run(luaproxy.sleep, s)
end

describe("luaproxy.cache", function()
    it("new returns the same cache for the same name; luaproxy.cache[name] reaches it", function()
        local c = cache("1m")
        assert.are.equal(1024 * 1024, c:capacity())
        assert.is_true(c:set("k", "v"))
        assert.are.equal("v", luaproxy.cache["cache_spec_" .. n]:get("k"))
        assert.are.equal("v", luaproxy.cache.new("cache_spec_" .. n, { capacity = "1m" }):get("k"))
        local none, err = luaproxy.cache.new("cache_spec_" .. n, { capacity = "2m" })
        assert.is_nil(none)
        assert.matches("exists with capacity", err)
        assert.are.equal(64 * 1024 * 1024, luaproxy.cache.new("cache_spec_default"):capacity())
        assert.has_error(function() luaproxy.cache.new("") end)
        assert.has_error(function() luaproxy.cache.new("x", { capacity = "lots" }) end)
    end)

    it("get/set/delete/flush_all; values copied in and out", function()
        local c = cache()
        local t = { a = 1, list = { "x", "y" }, ok = true }
        assert.is_true(c:set("t", t))
        assert.is_true(c:set("i", 42))
        assert.is_true(c:set("f", 0.5))
        assert.is_true(c:set("b", false))
        local got = c:get("t")
        assert.are.same(t, got)
        got.a = 2
        assert.are.equal(1, c:get("t").a)
        util.assert_number_type("integer", c:get("i"))
        assert.are.equal(0.5, c:get("f"))
        assert.is_false(c:get("b"))
        assert.is_true(c:delete("i"))
        assert.is_nil(c:get("i"))
        assert.is_true(c:set("f", nil))
        assert.is_nil(c:get("f"))
        assert.is_true(c:flush_all())
        assert.are.same({}, { c:get("t") })
        assert.has_error(function() c:set("fn", print) end)
        assert.has_error(function() c:set("", 1) end)
        assert.has_error(function() c:set("k", 1, -1) end)
    end)

    it("expires by TTL and hands the stale value back as a second result until evicted", function()
        local c = cache()
        assert.is_true(c:set("k", "old", 0.05))
        assert.are.same({ "old", nil }, { c:get("k") })
        sleep(0.1)
        assert.are.same({ nil, "old" }, { c:get("k") })
        assert.is_true(c:set("k", "new"))
        assert.are.same({ "new", nil }, { c:get("k") })
    end)

    it("evicts least recently used entries by bytes", function()
        local c = cache(16 * 1024)
        local v = ("v"):rep(200)
        for i = 1, 20 do assert.is_true(c:set("k" .. i, v)) end
        assert.is_truthy(c:get("k1"))                        -- k1 becomes the most recent
        for i = 21, 200 do assert.is_true(c:set("k" .. i, v)) end
        assert.is_truthy(c:get("k200"))
        assert.is_nil(c:get("k2"))
        assert.is_nil(c:get("k100"))
        assert.is_true(c:free_space() < 400)
        assert.are.same({ nil, "no memory" }, { c:set("huge", ("h"):rep(20 * 1024)) })
    end)

    it("is shared by every worker: a worker reads what the main program set, and back", function()
        local c = assert(luaproxy.cache.new("cache_spec_workers", { capacity = "1m" }))
        c:set("from_main", { hello = "workers" })
        local policy = util.write_temp("cache_workers.lua", [[
            local luaproxy = require "luaproxy"
            local c = luaproxy.cache.cache_spec_workers
            return function(req)
                c:set("from_worker_" .. luaproxy.worker.id(), "seen")
                return 200, c:get("from_main").hello
            end
        ]])
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 2 })
            local status, body = util.get("http://127.0.0.1:" .. srv.port .. "/")
            srv:close()
            srv:wait()
            assert.are.equal(200, status)
            assert.are.equal("workers", body)
        end)
        local seen = 0
        for id = 0, 2 do
            if c:get("from_worker_" .. id) == "seen" then seen = seen + 1 end
        end
        assert.are.equal(1, seen)
    end)

    it("stores upstream responses and replays them from a handler", function()
        local hits = assert(luaproxy.shared.new("cache_spec_hits", "64k"))
        hits:flush_all()
        local backend_policy = util.write_temp("cache_backend.lua", [[
            local luaproxy = require "luaproxy"
            return function(req)
                luaproxy.shared.cache_spec_hits:incr("n", 1, 0)
                return 201, "body " .. req:get_path(), { ["X-Backend"] = "b1" }
            end
        ]])
        local proxy_policy = util.write_temp("cache_proxy.lua", [[
            local luaproxy = require "luaproxy"
            local c = luaproxy.cache.new("cache_spec_responses")
            return function(req)
                local backend = req:get_header("X-Upstream")
                local res, err = c:get_or_fetch(req:get_path(), 60, function(path)
                    return luaproxy.http.request_uri("http://" .. backend .. path)
                end)
                if not res then return 502, err end
                return res
            end
        ]])
        util.run(function()
            local be = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = backend_policy, workers = 1 })
            local px = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = proxy_policy, workers = 2 })
            local url = "http://127.0.0.1:" .. px.port .. "/thing"
            local hdr = { headers = { ["X-Upstream"] = "127.0.0.1:" .. be.port } }
            for _ = 1, 3 do
                local status, body, res = util.get(url, hdr)
                assert.are.equal(201, status)
                assert.are.equal("body /thing", body)
                assert.are.equal("b1", res.headers["x-backend"])
            end
            -- the same response object, cached from the main program
            local c = luaproxy.cache.new("cache_spec_responses")
            local res = c:get("/thing")
            assert.are.equal(201, res.status)
            assert.are.equal("body /thing", res.body)
            -- a response whose body was not read cannot be cached
            local c2 = cache()
            local r = assert(luaproxy.http.request("http://127.0.0.1:" .. be.port .. "/s"))
            local ok, err = pcall(c2.set, c2, "r", r)
            assert.is_false(ok)
            assert.matches("read_body", tostring(err))
            assert.are.equal("body /s", r:read_body())
            assert.is_true(c2:set("r", r))
            assert.are.equal("body /s", c2:get("r").body)
            be:close(); px:close(); be:wait(); px:wait()
        end)
        assert.are.equal(2, hits:get("n"))   -- one fetch for /thing, one for /s
    end)

    it("single-flight: 200 concurrent requests for one cold key make one upstream fetch", function()
        local hits = assert(luaproxy.shared.new("cache_spec_sf_hits", "64k"))
        local backend_policy = util.write_temp("sf_backend.lua", [[
            local luaproxy = require "luaproxy"
            return function(req)
                luaproxy.shared.cache_spec_sf_hits:incr("n", 1, 0)
                luaproxy.sleep(0.3)
                return 200, "fetched"
            end
        ]])
        local proxy_policy = util.write_temp("sf_proxy.lua", [[
            local luaproxy = require "luaproxy"
            local c = luaproxy.cache.new("cache_spec_sf")
            return function(req)
                local v, err = c:get_or_fetch("cold", 60, function()
                    local res, err = luaproxy.http.request_uri("http://" .. req:get_header("X-Upstream") .. "/")
                    if not res then return nil, err end
                    return res.body
                end)
                return v and 200 or 502, v or err
            end
        ]])
        util.run(function()
            local be = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = backend_policy, workers = 1 })
            local px = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = proxy_policy, workers = 2 })
            local hdr = { headers = { ["X-Upstream"] = "127.0.0.1:" .. be.port } }
            local tasks = {}
            for i = 1, 200 do
                tasks[i] = luaproxy.spawn(util.get, "http://127.0.0.1:" .. px.port .. "/", hdr)
            end
            local ok200 = 0
            for _, t in ipairs(tasks) do
                local ok, status, body = t:wait()
                if ok and status == 200 and body == "fetched" then ok200 = ok200 + 1 end
            end
            be:close(); px:close(); be:wait(); px:wait()
            assert.are.equal(200, ok200)
        end)
        assert.are.equal(1, hits:get("n"))
    end)

    it("a failing fetch gives nil, err to every waiter and is not cached, unless neg_ttl", function()
        local c = cache()
        local fetches = 0
        local function failing()
            fetches = fetches + 1
            luaproxy.sleep(0.1)
            return nil, "boom"
        end
        luaproxy.run(function()
            local tasks = {}
            for i = 1, 10 do tasks[i] = luaproxy.spawn(c.get_or_fetch, c, "k", 10, failing) end
            for _, t in ipairs(tasks) do
                assert.are.same({ true, nil, "boom" }, { t:wait() })
            end
            assert.are.equal(1, fetches)
            assert.are.same({ nil, "boom" }, { c:get_or_fetch("k", 10, failing) })
            assert.are.equal(2, fetches)
            -- remembered for neg_ttl
            assert.are.same({ nil, "boom" }, { c:get_or_fetch("k", 10, failing, { neg_ttl = 0.2 }) })
            assert.are.same({ nil, "boom" }, { c:get_or_fetch("k", 10, failing, { neg_ttl = 0.2 }) })
            assert.are.equal(3, fetches)
            assert.is_nil(c:get("k"))
            luaproxy.sleep(0.25)
            assert.are.same({ "v", nil, "miss" }, { c:get_or_fetch("k", 10, function() return "v" end) })
            -- a Lua error in fetch_fn is a failure too, with its message
            local v, err = c:get_or_fetch("e", 10, function() error("fetch exploded") end)
            assert.is_nil(v)
            assert.matches("fetch exploded", err)
            assert.are.same({ nil, "fetch returned nil" }, { c:get_or_fetch("z", 10, function() end) })
        end)
    end)

    it("hit, miss and shared say where a value came from; fetch_fn may set its own ttl", function()
        local c = cache()
        luaproxy.run(function()
            local slow = function(key) luaproxy.sleep(0.05) return "v:" .. key, nil, 0.05 end
            local waiter = luaproxy.spawn(function()
                luaproxy.sleep(0.01)
                return c:get_or_fetch("a", 60, slow)
            end)
            assert.are.same({ "v:a", nil, "miss" }, { c:get_or_fetch("a", 60, slow) })
            assert.are.same({ true, "v:a", nil, "shared" }, { waiter:wait() })
            assert.are.same({ "v:a", nil, "hit" }, { c:get_or_fetch("a", 60, slow) })
            luaproxy.sleep(0.1)                                   -- the returned ttl (0.05) won
            assert.are.same({ nil, "v:a" }, { c:get("a") })
        end)
    end)

    it("stale-while-revalidate: an expired value is served at once while one refresh runs", function()
        local c = cache()
        local fetches = 0
        local function fetch()
            fetches = fetches + 1
            luaproxy.sleep(0.3)
            return "v" .. fetches
        end
        luaproxy.run(function()
            assert.are.same({ "v1", nil, "miss" }, { c:get_or_fetch("k", 0.05, fetch, { stale = 5 }) })
            luaproxy.sleep(0.08)
            local t0 = luaproxy.now()
            for _ = 1, 5 do
                assert.are.same({ "v1", nil, "stale" }, { c:get_or_fetch("k", 0.05, fetch, { stale = 5 }) })
            end
            assert.is_true(luaproxy.now() - t0 < 0.2)             -- nobody waited for the refresh (0.3 s)
            assert.is_true(util.wait_for(function() return c:get("k") == "v2" end, 2))
            assert.are.equal(2, fetches)
            -- past the stale window the caller waits for a fresh value
            luaproxy.sleep(0.08)
            assert.are.same({ "v3", nil, "miss" }, { c:get_or_fetch("k", 0.05, fetch, { stale = 0.01 }) })
        end)
    end)

    it("a failed background refresh keeps the stale value, even with neg_ttl", function()
        local c = cache()
        local fail = false
        local function fetch()
            if fail then return nil, "upstream down" end
            return "v1"
        end
        local opts = { stale = 5, neg_ttl = 5 }
        luaproxy.run(function()
            assert.are.same({ "v1", nil, "miss" }, { c:get_or_fetch("k", 0.05, fetch, opts) })
            luaproxy.sleep(0.08)
            fail = true
            assert.are.same({ "v1", nil, "stale" }, { c:get_or_fetch("k", 0.05, fetch, opts) })
            luaproxy.sleep(0.05)                                  -- the refresh has failed
            assert.are.same({ nil, "v1" }, { c:get("k") })
            assert.are.same({ "v1", nil, "stale" }, { c:get_or_fetch("k", 0.05, fetch, opts) })
            -- timeout = 0: do not wait for someone else's fetch at all
            luaproxy.spawn(c.get_or_fetch, c, "slow", 10, function() luaproxy.sleep(0.2) return 1 end)
            luaproxy.sleep(0.01)
            assert.are.same({ nil, "timeout" }, { c:get_or_fetch("slow", 10, error, { timeout = 0 }) })
        end)
    end)

    it("a fetcher that is killed hands the key to a waiter", function()
        local c = cache()
        local fetches = 0
        local function fetch()
            fetches = fetches + 1
            luaproxy.sleep(0.2)
            return "v" .. fetches
        end
        luaproxy.run(function()
            local owner = luaproxy.spawn(c.get_or_fetch, c, "k", 10, fetch)
            luaproxy.sleep(0.05)
            local waiter = luaproxy.spawn(c.get_or_fetch, c, "k", 10, fetch)
            luaproxy.sleep(0.05)
            owner:kill()
            assert.are.same({ true, "v2", nil, "miss" }, { waiter:wait() })
            assert.are.equal(2, fetches)
        end)
    end)

    it("waiting gives up after opts.timeout; misuse raises; async use needs the loop", function()
        local c = cache()
        luaproxy.run(function()
            luaproxy.spawn(c.get_or_fetch, c, "slow", 10, function() luaproxy.sleep(0.5) return 1 end)
            luaproxy.sleep(0.01)
            assert.are.same({ nil, "timeout" }, { c:get_or_fetch("slow", 10, error, { timeout = 0.05 }) })
        end)
        assert.has_error(function() c:get_or_fetch("k", 10, function() end) end, nil)
        local ok, err = pcall(c.get_or_fetch, c, "k", 10, function() end)
        assert.is_false(ok)
        assert.matches("luaproxy.run", tostring(err))
        assert.has_error(function() c:get_or_fetch("k", 10, "not a function") end)
    end)
end)
