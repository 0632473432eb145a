-- examples/timeline_cache.lua under luaproxy.test: the filter, the 300 s cache with max-age
-- counting down on the virtual clock, ETag and 304, one fetch for ten clients at once, a stale
-- copy when the refresh fails (and no new attempt within timeline_neg_ttl), and the failures
-- without one (502, 504 at timeline_timeout, 404, 405).
local luaproxy = require "luaproxy"
local t = require "luaproxy.test"

local json = luaproxy.json
local POLICY = "examples/timeline_cache.lua"
local A = "127.0.0.1:9001"
local CONFIG = { backends = { A }, timeline_fields = { "id", "text", "user.screen_name" } }

local ITEMS = {
    { id = 1, text = "hello", secret = "x", user = { screen_name = "ann", email = "a@x" } },
    { id = 2, text = "world", user = "not an object" },
    "not an item",
}

-- The timeline backend: `state.mode` says how it answers.
local function backend(state)
    return t.upstream(A, function(req)
        local m = state.mode
        if m == "refused" or m == "timeout" then return { fail = m } end
        if m == "500" then return 500, "oops" end
        if m == "notjson" then return 200, "<html>" end
        if m == "404" then return 404, "no such user" end
        return { status = 200, body = json.encode(ITEMS), delay = state.delay }
    end)
end

describe("examples/timeline_cache.lua (kit)", function()
    after_each(function() t.reset() end)

    it("filters, caches for 300 s with max-age counting down, and answers If-None-Match with 304", function()
        local up = backend({})
        local app = assert(t.load(POLICY, CONFIG))
        local res = app:request{ path = "/timeline/ann" }
        assert.are.equal(200, res.status)
        assert.are.equal("MISS", res.headers["x-cache"])
        assert.are.same({ { id = 1, text = "hello", user = { screen_name = "ann" } }, { id = 2, text = "world" } },
            json.decode(res.body))
        assert.are.equal("public, max-age=300", res.headers["cache-control"])
        local etag = res.headers.etag
        assert.are.equal("/timeline/ann", up.requests[1].path)

        t.clock:advance(100)
        res = app:request{ path = "/timeline/ann", query = { ignored = "1" } }
        assert.are.same({ "HIT", "public, max-age=200", etag },
            { res.headers["x-cache"], res.headers["cache-control"], res.headers.etag })
        res = app:request{ path = "/timeline/ann", headers = { ["If-None-Match"] = 'W/"x", ' .. etag } }
        assert.are.equal(304, res.status)
        assert.are.equal("", res.body)
        assert.are.equal(1, #up.requests)

        t.clock:advance(200)
        res = app:request{ path = "/timeline/ann" }
        assert.are.equal("MISS", res.headers["x-cache"])
        assert.are.equal(2, #up.requests, "fetched again once the 300 s were up")
    end)

    it("ten clients at once for one user: one fetch, one MISS and nine SHARED", function()
        local up = backend({ delay = 2 })
        local app = assert(t.load(POLICY, CONFIG))
        local reqs = {}
        for i = 1, 10 do reqs[i] = { path = "/timeline/bob" } end
        local how = {}
        for _, r in ipairs(app:requests(reqs)) do
            assert.are.equal(200, r.status)
            how[r.headers["x-cache"]] = (how[r.headers["x-cache"]] or 0) + 1
        end
        assert.are.same({ MISS = 1, SHARED = 9 }, how)
        assert.are.equal(1, #up.requests)
    end)

    it("a failed refresh serves the stale copy with a Warning, and asks again only after timeline_neg_ttl", function()
        local state = {}
        local up = backend(state)
        local app = assert(t.load(POLICY, CONFIG))
        assert.are.equal(200, app:request{ path = "/timeline/ann" }.status)
        t.clock:advance(301)
        state.mode = "refused"
        local res = app:request{ path = "/timeline/ann" }
        assert.are.equal(200, res.status)
        assert.are.same({ "STALE", "public, max-age=0", '110 - "Response is Stale"' },
            { res.headers["x-cache"], res.headers["cache-control"], res.headers.warning })
        local asked = #up.requests
        t.clock:advance(4)
        assert.are.equal("STALE", app:request{ path = "/timeline/ann" }.headers["x-cache"])
        assert.are.equal(asked, #up.requests, "within timeline_neg_ttl (5 s) the upstream is left alone")
        state.mode = nil
        t.clock:advance(2)
        assert.are.equal("MISS", app:request{ path = "/timeline/ann" }.headers["x-cache"])
    end)

    it("without a stale copy: 502 for a 5xx or non-JSON, 504 at timeline_timeout, 404, 405", function()
        local state = { mode = "500" }
        backend(state)
        local app = assert(t.load(POLICY, CONFIG))
        local res = app:request{ path = "/timeline/a" }
        assert.are.equal(502, res.status)
        assert.are.same({ error = "upstream answered 500" }, json.decode(res.body))
        state.mode = "notjson"
        assert.are.equal(502, app:request{ path = "/timeline/b" }.status)
        state.mode = "timeout"
        local t0 = luaproxy.now()
        assert.are.equal(504, app:request{ path = "/timeline/c" }.status)
        assert.are.equal(10, luaproxy.now() - t0, "timeline_timeout's 10 s")
        state.mode = "404"
        assert.are.equal(404, app:request{ path = "/timeline/d" }.status)
        assert.are.equal(404, app:request{ path = "/elsewhere" }.status)
        res = app:request{ method = "POST", path = "/timeline/e", body = "x" }
        assert.are.equal(405, res.status)
        assert.are.equal("GET, HEAD", res.headers.allow)
    end)
end)
