-- examples/follow_redirects.lua under luaproxy.test: 301/302/303/307/308 followed by the
-- browsers' method and body rules, relative Locations kept on the backend that answered,
-- absolute ones only to allowed hosts, loops and too many hops as 508 with the chain logged,
-- and the log phase's chain. Fake backends redirect as their path says.
local luaproxy = require "luaproxy"
local t = require "luaproxy.test"

local json = luaproxy.json
local POLICY = "examples/follow_redirects.lua"
local A, B = "127.0.0.1:9001", "127.0.0.1:9002"
local HOST = "127.0.0.1:8080"
local FORM = { ["Content-Type"] = "application/x-www-form-urlencoded", Host = HOST }

-- /r/CODE?to=LOCATION redirects; /loop/a <-> /loop/b; /hop/N -> /hop/N-1 ... /hop/0;
-- anything else echoes what arrived (as JSON, with the backend's name).
local function backend(addr)
    return t.upstream(addr, function(req)
        local code = req.path:match("/r/(%d+)$")
        if code then return tonumber(code), "moved", { location = req.query.to } end
        if req.path == "/loop/a" then return 302, "", { location = "/loop/b" } end
        if req.path == "/loop/b" then return 301, "", { location = "http://" .. req.headers.host .. "/loop/a" } end
        local n = tonumber(req.path:match("^/hop/(%d+)$") or "")
        if n and n > 0 then return 302, "", { location = "/hop/" .. (n - 1) } end
        return 200, { at = addr, method = req.method, target = req.target, body = req.body,
            cl = req.headers["content-length"], host = req.headers.host }
    end)
end

local function echo(res)
    assert.are.equal(200, res.status, res.body)
    return json.decode(res.body)
end

describe("examples/follow_redirects.lua (kit)", function()
    after_each(function() t.reset() end)

    it("follows 301/302/303/307/308: 303 (and 301/302 after POST) become a bodiless GET, 307/308 resend", function()
        backend(A)
        local app = assert(t.load(POLICY, { backends = { A } }))
        local BODY = "hello=world&x=" .. ("y"):rep(300)
        local becomes = { [301] = "GET", [302] = "GET", [303] = "GET", [307] = "POST", [308] = "POST" }
        for _, code in ipairs({ 301, 302, 303, 307, 308 }) do
            local got = echo(app:request{ path = "/r/" .. code, query = { to = "/final/" .. code },
                headers = { Host = HOST } })
            assert.are.same({ "GET", "/final/" .. code, "" }, { got.method, got.target, got.body })
            got = echo(app:request{ method = "POST", path = "/r/" .. code, query = { to = "/final/" .. code },
                headers = FORM, body = BODY })
            assert.are.equal(becomes[code], got.method, code)
            assert.are.equal(got.method == "POST" and BODY or "", got.body, code)
            assert.are.equal(got.method == "POST" and tostring(#BODY) or nil, got.cl, code)
            assert.are.equal(HOST, got.host, "a relative Location keeps the client's Host")
        end
        local head = app:request{ method = "HEAD", path = "/r/303", query = { to = "/h" }, headers = { Host = HOST } }
        assert.are.equal(200, head.status)
        assert.are.equal("", head.body)
    end)

    it("relative Locations stay on the backend that answered; absolute ones go to allowed hosts only", function()
        local ups = { [A] = backend(A), [B] = backend(B) }
        local app = assert(t.load(POLICY, { backends = { A, B } }))
        for i = 1, 4 do
            local got = echo(app:request{ path = "/d1/d2/r/302", query = { to = "../x?i=" .. i }, headers = { Host = HOST } })
            assert.are.equal("/d1/d2/x?i=" .. i, got.target)
            -- the first hop's backend answered the second too
            local first = ups[got.at].requests[#ups[got.at].requests - 1]
            assert.are.equal("/d1/d2/r/302", first.path)
        end
        -- to the other backend (allowed: a backend)
        local got = echo(app:request{ path = "/r/307", query = { to = "http://" .. B .. "/there" }, headers = { Host = HOST } })
        assert.are.same({ B, "/there" }, { got.at, got.target })
        -- anywhere else: the client gets the redirect as it came
        local res = app:request{ path = "/r/302", query = { to = "http://example.com/" }, headers = { Host = HOST } }
        assert.are.equal(302, res.status)
        assert.are.equal("http://example.com/", res.headers.location)
        assert.are.equal("moved", res.body)
    end)

    it("a loop, or more than max_redirects hops, is 508 with the chain in the log", function()
        backend(A)
        local app = assert(t.load(POLICY, { backends = { A }, max_redirects = 3, log_level = "info" }))
        local res = app:request{ path = "/loop/a", headers = { Host = HOST } }
        assert.are.equal(508, res.status)
        assert.are.equal("508 Loop Detected\n", res.body)
        assert.is_truthy(app:log_text():find("redirect loop (508): http://127.0.0.1:8080/loop/a -> "
            .. "http://127.0.0.1:8080/loop/b -> http://127.0.0.1:8080/loop/a", 1, true))
        assert.are.equal("/hop/0", echo(app:request{ path = "/hop/3", headers = { Host = HOST } }).target)
        assert.are.equal(508, app:request{ path = "/hop/4", headers = { Host = HOST } }.status)
        -- the log phase: the chain of the request that was redirected
        local phases = app:logs("log")
        local chain = phases[#phases - 1].ctx.redirects
        assert.are.same({ "http://127.0.0.1:8080/hop/3", "http://127.0.0.1:8080/hop/2",
            "http://127.0.0.1:8080/hop/1", "http://127.0.0.1:8080/hop/0" }, chain)
        assert.is_truthy(app:log_text():find("redirects: http://127.0.0.1:8080/hop/3 -> ", 1, true))
    end)

    it("a body past client_max_body_size is 413 before anything goes upstream; a dead backend 502", function()
        local up = backend(A)
        local app = assert(t.load(POLICY, { backends = { A }, client_max_body_size = "1k" }))
        local res = app:request{ method = "POST", path = "/r/307", query = { to = "/x" }, headers = FORM,
            body = ("z"):rep(2000) }
        assert.are.equal(413, res.status)
        assert.are.equal(0, #up.requests)
        up:close()
        assert.are.equal(502, app:request{ path = "/r/302", query = { to = "/x" } }.status)
    end)
end)
