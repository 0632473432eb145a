-- luaproxy.redirect and examples/follow_redirects.lua (#14 part 1). The resolver against RFC
-- 3986's own examples; the policy end to end: a real `lua main.lua --workers 2` (util.main) in
-- front of backends that are luaproxy handler servers in this spec's loop on 127.0.0.1 (they
-- record every request and answer redirects as the query asks), plus one server that is not a
-- backend. Clients are luaproxy.http (never following redirects itself) and the real curl in
-- the background. Every spec runs under util.run's deadline and main.lua under `timeout`.
local luaproxy = require "luaproxy"
local redirect = require "luaproxy.redirect"
local util = require "support.util"

local json = luaproxy.json

describe("luaproxy.redirect", function()
    local BASE = "http://a/b/c/d;p?q"

    it("resolves RFC 3986 section 5.4's normal and abnormal examples", function()
        local cases = {
            -- 5.4.1
            { "g:h", "g:h" }, { "g", "http://a/b/c/g" }, { "./g", "http://a/b/c/g" },
            { "g/", "http://a/b/c/g/" }, { "/g", "http://a/g" }, { "//g", "http://g" },
            { "?y", "http://a/b/c/d;p?y" }, { "g?y", "http://a/b/c/g?y" },
            { "#s", "http://a/b/c/d;p?q#s" }, { "g#s", "http://a/b/c/g#s" },
            { "g?y#s", "http://a/b/c/g?y#s" }, { ";x", "http://a/b/c/;x" },
            { "g;x", "http://a/b/c/g;x" }, { "g;x?y#s", "http://a/b/c/g;x?y#s" },
            { "", "http://a/b/c/d;p?q" }, { ".", "http://a/b/c/" }, { "./", "http://a/b/c/" },
            { "..", "http://a/b/" }, { "../", "http://a/b/" }, { "../g", "http://a/b/g" },
            { "../..", "http://a/" }, { "../../", "http://a/" }, { "../../g", "http://a/g" },
            -- 5.4.2
            { "../../../g", "http://a/g" }, { "../../../../g", "http://a/g" },
            { "/./g", "http://a/g" }, { "/../g", "http://a/g" }, { "g.", "http://a/b/c/g." },
            { ".g", "http://a/b/c/.g" }, { "g..", "http://a/b/c/g.." }, { "..g", "http://a/b/c/..g" },
            { "./../g", "http://a/b/g" }, { "./g/.", "http://a/b/c/g/" }, { "g/./h", "http://a/b/c/g/h" },
            { "g/../h", "http://a/b/c/h" }, { "g;x=1/./y", "http://a/b/c/g;x=1/y" },
            { "g;x=1/../y", "http://a/b/c/y" }, { "g?y/./x", "http://a/b/c/g?y/./x" },
            { "g?y/../x", "http://a/b/c/g?y/../x" }, { "g#s/./x", "http://a/b/c/g#s/./x" },
            { "g#s/../x", "http://a/b/c/g#s/../x" }, { "http:g", "http:g" },
        }
        for _, c in ipairs(cases) do
            assert.are.equal(c[2], redirect.resolve(BASE, c[1]), c[1])
        end
        -- a base without a path (5.2.3's first merge case)
        assert.are.equal("http://h:1/g", redirect.resolve("http://h:1", "g"))
        assert.are.equal("http://h:1?x", redirect.resolve("http://h:1", "?x"))
    end)

    it("remove_dot_segments: RFC 3986 section 5.2.4's examples", function()
        assert.are.equal("/a/g", redirect.remove_dot_segments("/a/b/c/./../../g"))
        assert.are.equal("mid/6", redirect.remove_dot_segments("mid/content=5/../6"))
        assert.are.equal("/", redirect.remove_dot_segments("/.."))
        assert.are.equal("", redirect.remove_dot_segments("../.."))
        assert.are.equal("/x/", redirect.remove_dot_segments("/x/y/.."))
    end)

    it("parse: absent components are nil, empty ones \"\"", function()
        assert.are.same({ scheme = "http", authority = "h:1", path = "/p", query = "", fragment = "" },
            redirect.parse("http://h:1/p?#"))
        assert.are.same({ path = "g" }, redirect.parse("g"))
        assert.are.same({ authority = "", path = "" }, redirect.parse("//"))
        assert.are.same({ path = "/a:b", query = "c" }, redirect.parse("/a:b?c"))
    end)

    it("is_redirect, and misuse raises", function()
        for _, s in ipairs({ 301, 302, 303, 307, 308 }) do assert.is_true(redirect.is_redirect(s)) end
        for _, s in ipairs({ 300, 304, 305, 306, 200, 404 }) do assert.is_false(redirect.is_redirect(s)) end
        assert.has_error(function() redirect.resolve(1, "x") end)
        assert.has_error(function() redirect.new{ max_redirects = -1 } end)
        assert.has_error(function() redirect.new{ max_redirects = 1.5 } end)
        assert.has_error(function() redirect.new{ hosts = "a:1" } end)
        assert.has_error(function() redirect.new{ hosts = { "nohost" } } end)
        assert.has_error(function() redirect.new():proxy({}, 5) end)
    end)
end)

-- %-encodes a query argument
local function enc(s)
    return (s:gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- A backend: records every request in st.seen; `?code=C&to=LOC[&pad=N]` answers C with that
-- Location (and a body of N bytes); /chain/N redirects to /chain/N-1 down to 0; /loop/a and
-- /loop/b redirect to each other; anything else echoes the request as JSON.
local function backend_handler(name, st)
    return function(req)
        local body = req:read_body() or ""
        local rec = { name = name, method = req:get_method(), uri = req:get_uri(), body = body,
            cl = req:get_header("content-length"), ct = req:get_header("content-type"),
            te = req:get_header("transfer-encoding"), host = req:get_header("host"),
            auth = req:get_header("authorization"), cookie = req:get_header("cookie"),
            xff = req:get_header("x-forwarded-for"), xfh = req:get_header("x-forwarded-host") }
        st.seen[#st.seen + 1] = rec
        local args = req:get_uri_args()
        if args.code then
            return tonumber(args.code), ("m"):rep(tonumber(args.pad) or 5), { location = args.to }
        end
        local path = req:get_path()
        local n = tonumber(path:match("^/chain/(%d+)$"))
        if n and n > 0 then
            return 302, "next", { location = "/chain/" .. (n - 1) }
        end
        if path == "/loop/a" then return 302, "to b", { location = "/loop/b" } end
        if path == "/loop/b" then
            return 301, "to a", { location = "http://" .. req:get_header("host") .. "/loop/a" }
        end
        return 200, json.encode(rec), { ["x-backend"] = name }
    end
end

-- status, body, headers of a request through luaproxy.http (bounded: 10 s)
local request = util.request

-- curl in the background (this loop keeps serving while it waits): status
local function curl(args)
    local base = util.write_temp("curl", "")
    local pid = util.start(("curl -s -m 8 -o %s.body -w '%%{http_code}' %s"):format(base, args), 10, base .. ".status")
    assert(util.wait_for(function() return not util.alive(pid) end, 10), "curl did not finish")
    return tonumber(util.read_file(base .. ".status"))
end

-- fn(t) with main.lua running the policy (2 workers) in front of b1 and b2; b3 is served too
-- but is not a backend. `conf` is Lua source for more fields of the --config table.
local function with_proxy(conf, fn, seconds)
    seconds = seconds or 30
    return util.run(function()
        local t = { st = {}, srv = {}, addr = {} }
        for i = 1, 3 do
            t.st[i] = { seen = {} }
            t.srv[i] = util.serve_handler(backend_handler("b" .. i, t.st[i]))
            t.addr[i] = t.srv[i].addr
        end
        t.port = util.free_port()
        t.host = "127.0.0.1:" .. t.port
        t.url = "http://" .. t.host
        conf = (conf or ""):gsub("B3", t.addr[3]):gsub("B2", t.addr[2])
        local conf_file = util.write_temp("redirect.conf.lua", "return { log_level = 'info', " .. conf .. " }")
        t.p = util.main(("--listen %s --workers 2 --policy examples/follow_redirects.lua --backend %s --backend %s --config %s")
            :format(t.host, t.addr[1], t.addr[2], conf_file), seconds + 5)
        -- every request the backends saw, in order, and the ones whose uri matches `pat`
        function t.seen(pat)
            local out = {}
            for i = 1, 3 do
                for _, r in ipairs(t.st[i].seen) do
                    if not pat or r.uri:find(pat, 1, true) then out[#out + 1] = r end
                end
            end
            return out
        end
        function t.clear()
            for i = 1, 3 do t.st[i].seen = {} end
        end
        local ok, err = pcall(function()
            assert(util.wait_for(function() return request(t.url .. "/up") == 200 end, 10),
                "main.lua did not start")
            t.clear()
            fn(t)
        end)
        t.p:signal("TERM")
        local code = t.p:wait_exit(5)
        if not code then t.p:kill() end
        for i = 1, 3 do pcall(util.shut, t.srv[i]) end
        if not ok then error(tostring(err) .. "\n--- main.lua's log:\n" .. t.p:log(), 0) end
        assert.are.equal(0, code, t.p:log())
    end, seconds)
end

-- The echo a final 200 carries, decoded.
local function echo(status, body)
    assert.are.equal(200, status, body)
    return assert(json.decode(body), body)
end

describe("examples/follow_redirects.lua", function()
    it("follows 301/302/303/307/308 for GET, POST, PUT and HEAD by the browsers' method and body rules", function()
        with_proxy(nil, function(t)
            local FORM = "application/x-www-form-urlencoded"
            local BODY = "hello=world&x=" .. ("y"):rep(300)
            -- status -> what the POST became
            local post_becomes = { [301] = "GET", [302] = "GET", [303] = "GET", [307] = "POST", [308] = "POST" }
            local n = 0
            for _, code in ipairs({ 301, 302, 303, 307, 308 }) do
                for _, method in ipairs({ "GET", "POST", "PUT" }) do
                    n = n + 1
                    local id = code .. method
                    local opts = { method = method }
                    if method ~= "GET" then
                        opts.body, opts.headers = BODY, { ["content-type"] = FORM }
                    end
                    local final = "/final/" .. id .. "?n=" .. n
                    local rec = echo(request(t.url .. "/start/" .. id .. "?code=" .. code .. "&to=" .. enc(final), opts))
                    local want
                    if method == "GET" then want = "GET"
                    elseif method == "POST" then want = post_becomes[code]
                    else want = code == 303 and "GET" or "PUT" end
                    assert.are.equal(final, rec.uri, id)
                    assert.are.equal(want, rec.method, id)
                    assert.are.equal(t.host, rec.host, id)     -- a relative Location: the client's Host
                    if want == "GET" then
                        assert.are.equal("", rec.body, id)
                        assert.is_nil(rec.cl, id)
                        assert.is_nil(rec.ct, id)
                    else
                        util.same_bytes(BODY, rec.body, id)
                        assert.are.equal(tostring(#BODY), rec.cl, id)
                        assert.are.equal(FORM, rec.ct, id)
                    end
                    assert.is_nil(rec.te, id)
                    assert.are.equal("127.0.0.1", rec.xff, id)
                    -- the first hop got the request as the client sent it
                    local first = t.seen("/start/" .. id)
                    assert.are.equal(1, #first, id)
                    assert.are.equal(method, first[1].method, id)
                    assert.are.equal(method == "GET" and "" or BODY, first[1].body, id)
                    -- both hops on the same backend
                    assert.are.equal(first[1].name, rec.name, id)
                end
                -- HEAD stays HEAD, even through a 303
                local status, body = request(t.url .. "/head?code=" .. code .. "&to=%2Fhead-final", { method = "HEAD" })
                assert.are.equal(200, status)
                assert.are.equal("", body)
                local seen = t.seen("/head-final")
                assert.are.equal("HEAD", seen[#seen].method)
            end
            -- as curl shows it: a POST answered 303 by the backend comes back as the GET's answer
            local s = curl("-d 'a=1' '" .. t.url .. "/form?code=303&to=%2Fthanks'")
            assert.are.equal(200, s)
            local seen = t.seen("/thanks")
            assert.are.same({ "GET", "" }, { seen[1].method, seen[1].body })
        end)
    end)

    it("resolves relative Locations against the URL requested; they stay on the backend that answered", function()
        with_proxy(nil, function(t)
            local b2 = t.addr[2]
            local cases = {
                { "../x", "/d1/x" },
                { "?q=1", "/d1/d2/start?q=1" },
                { "x/./y/../z?k=v", "/d1/d2/x/z?k=v" },
                { "/abs/../path", "/path" },
                { "../../../../top", "/top" },
                { "with space/é", "/d1/d2/with%20space/%C3%A9" },
                { "/pct%zz%4", "/pct%25zz%254" },
                -- absolute, naming the URL's own host: like a relative one
                { "http://" .. t.host .. "/own#frag", "/own" },
            }
            for i, c in ipairs(cases) do
                t.clear()
                local rec = echo(request(t.url .. "/d1/d2/start?code=302&to=" .. enc(c[1]) .. "&i=" .. i))
                assert.are.equal(c[2], rec.uri, c[1])
                assert.are.equal(t.host, rec.host, c[1])
                assert.are.equal(2, #t.seen(), c[1])
                assert.are.equal(t.seen()[1].name, rec.name, c[1])
            end
            -- a network-path reference and an absolute URL to a backend: that backend, its Host
            for _, loc in ipairs({ "//" .. b2 .. "/np?x=1", "http://" .. b2 .. "/abs" }) do
                t.clear()
                local rec = echo(request(t.url .. "/start?code=307&to=" .. enc(loc),
                    { method = "POST", body = "payload", headers = { authorization = "Basic eDp5", cookie = "s=1" } }))
                assert.are.equal("b2", rec.name, loc)
                assert.are.equal(loc:match("//[^/]+(/.*)$"), rec.uri, loc)
                assert.are.equal(b2, rec.host, loc)
                assert.are.same({ "POST", "payload", "7" }, { rec.method, rec.body, rec.cl })
                -- credentials are not sent to another host, and were sent to the first
                assert.is_nil(rec.auth, loc)
                assert.is_nil(rec.cookie, loc)
                assert.are.equal("Basic eDp5", t.seen("/start")[1].auth)
                assert.are.equal("s=1", t.seen("/start")[1].cookie)
            end
            -- the same after the method changed (the hop made with the HTTP client)
            t.clear()
            local rec = echo(request(t.url .. "/start?code=303&to=" .. enc("http://" .. b2 .. "/after-post"),
                { method = "POST", body = "payload", headers = { authorization = "Basic eDp5",
                    ["x-forwarded-for"] = "10.0.0.1", ["content-type"] = "text/plain" } }))
            assert.are.same({ "b2", "GET", "", b2 }, { rec.name, rec.method, rec.body, rec.host })
            assert.is_nil(rec.auth)
            assert.is_nil(rec.cl)
            assert.is_nil(rec.ct)
            assert.are.equal("10.0.0.1, 127.0.0.1", rec.xff)
            assert.are.equal(b2, rec.xfh)
            -- after all that, the request itself is as the client sent it: a retry-free keep-alive
            -- connection goes on with the next request normally
            assert.are.equal("/ok", echo(request(t.url .. "/ok")).uri)
        end)
    end)

    it("gives a Location to a host not allowed (or not http, or with userinfo) to the client unchanged", function()
        with_proxy(nil, function(t)
            local b1, b3 = t.addr[1], t.addr[3]
            for _, loc in ipairs({ "http://" .. b3 .. "/elsewhere", "//" .. b3 .. "/np",
                                   "https://" .. b1 .. "/tls", "http://user@" .. b1 .. "/ui",
                                   "http://127.0.0.1:0/p", "ftp://x/y" }) do
                t.clear()
                local status, body, headers = request(t.url .. "/start?code=302&pad=7&to=" .. enc(loc))
                assert.are.equal(302, status, loc)
                assert.are.equal(loc, headers.location, loc)
                assert.are.equal("mmmmmmm", body, loc)
                assert.are.equal(1, #t.seen(), loc)
            end
            assert.are.equal(0, #t.st[3].seen)
            -- mid-chain too: the 3xx that cannot be followed is the answer
            local status, _, headers = request(t.url .. "/start?code=301&to="
                .. enc("/second?code=308&to=" .. enc("http://" .. b3 .. "/x")))
            assert.are.equal(308, status)
            assert.are.equal("http://" .. b3 .. "/x", headers.location)
            assert.are.equal(0, #t.st[3].seen)
            -- not a redirect status, or no Location: as it came
            status = request(t.url .. "/start?code=300&to=%2Fx")
            assert.are.equal(300, status)
            status = request(t.url .. "/start?code=302")
            assert.are.equal(302, status)
        end)
    end)

    it("redirect_hosts replaces the backends as the allow list; max_redirects sets the limit", function()
        with_proxy("redirect_hosts = { 'B3' }, max_redirects = 2", function(t)
            local b2, b3 = t.addr[2], t.addr[3]
            local rec = echo(request(t.url .. "/start?code=302&to=" .. enc("http://" .. b3 .. "/listed")))
            assert.are.same({ "b3", "/listed", b3 }, { rec.name, rec.uri, rec.host })
            local status, _, headers = request(t.url .. "/start?code=302&to=" .. enc("http://" .. b2 .. "/backend"))
            assert.are.equal(302, status)
            assert.are.equal("http://" .. b2 .. "/backend", headers.location)
            assert.are.equal("/chain/0", echo(request(t.url .. "/chain/2")).uri)
            t.clear()
            assert.are.equal(508, (request(t.url .. "/chain/3")))
            assert.are.equal(3, #t.seen())
        end)
    end)

    it("follows exactly max_redirects hops (5 by default); one more, or a loop, is 508 with the chain in the log", function()
        with_proxy(nil, function(t)
            local rec = echo(request(t.url .. "/chain/5"))
            assert.are.equal("/chain/0", rec.uri)
            assert.are.equal(6, #t.seen())
            t.clear()
            local status, body = request(t.url .. "/chain/6")
            assert.are.same({ 508, "508 Loop Detected\n" }, { status, body })
            assert.are.equal(6, #t.seen())                      -- /chain/0 was not requested
            t.clear()
            status, body = request(t.url .. "/loop/a")
            assert.are.same({ 508, "508 Loop Detected\n" }, { status, body })
            assert.are.equal(2, #t.seen())
            -- a Location that is the URL itself
            status = request(t.url .. "/self?code=307&to=")
            assert.are.equal(508, status)
            -- a POST redirected (303) to its own URL is a GET there: no loop
            rec = echo(request(t.url .. "/prg?code=303&to=%2Fprg", { method = "POST", body = "x" }))
            assert.are.same({ "GET", "/prg" }, { rec.method, rec.uri })
            local H = "http://" .. t.host
            assert(util.wait_for(function() return t.p:log():find("redirect loop", 1, true) end, 5))
            local log = t.p:log()
            assert.matches("too many redirects (508): " .. H .. "/chain/6 -> " .. H .. "/chain/5 -> "
                .. H .. "/chain/4 -> " .. H .. "/chain/3 -> " .. H .. "/chain/2 -> " .. H .. "/chain/1 -> "
                .. H .. "/chain/0, client: 127.0.0.1, request: \"GET /chain/6\"", log, 1, true)
            assert.matches("redirect loop (508): " .. H .. "/loop/a -> " .. H .. "/loop/b -> " .. H
                .. "/loop/a, client: 127.0.0.1, request: \"GET /loop/a\"", log, 1, true)
            assert.matches("redirect loop (508): " .. H .. "/self?code=307&to= -> " .. H .. "/self?code=307&to=",
                log, 1, true)
            -- the log phase (log_level info) names the chain of a request that got its answer
            assert.matches("redirects: " .. H .. "/chain/5 -> " .. H .. "/chain/4 -> " .. H .. "/chain/3 -> "
                .. H .. "/chain/2 -> " .. H .. "/chain/1 -> " .. H .. "/chain/0", log, 1, true)
        end)
    end)

    it("reads the body first: past client_max_body_size 413 and nothing upstream; within it, replayed whole", function()
        with_proxy("client_max_body_size = '1k'", function(t)
            local big = ("z"):rep(2000)
            assert.are.equal(413, (request(t.url .. "/start?code=307&to=%2Fx", { method = "POST", body = big })))
            local file = util.write_temp("big.txt", big)
            local status = curl("-H 'Transfer-Encoding: chunked' --data-binary @" .. file
                .. " '" .. t.url .. "/start?code=307&to=%2Fx'")
            assert.are.equal(413, status)
            assert.are.equal(0, #t.seen())
            local body = util.random_bytes(900)
            file = util.write_temp("ok.bin", body)
            status = curl("-H 'Transfer-Encoding: chunked' --data-binary @" .. file
                .. " '" .. t.url .. "/start?code=308&to=%2Freplayed'")
            assert.are.equal(200, status)
            local seen = t.seen("/replayed")
            assert.are.equal(1, #seen)
            util.same_bytes(body, seen[1].body, "replayed body")
            assert.are.equal("900", seen[1].cl)
            assert.is_nil(seen[1].te)
            util.same_bytes(body, t.seen("/start")[1].body, "first body")
        end)
    end)

    it("discards intermediate 3xx bodies, small (connection reused) or large (closed)", function()
        with_proxy(nil, function(t)
            for i = 1, 20 do
                local pad = i % 5 == 0 and 200000 or 1000 * i
                local loc = "/hop2?code=307&pad=" .. pad .. "&to=" .. enc("/done/" .. i)
                local rec = echo(request(t.url .. "/hop1?code=302&pad=" .. pad .. "&to=" .. enc(loc)))
                assert.are.equal("/done/" .. i, rec.uri)
            end
            assert.are.equal(60, #t.seen())
        end)
    end)
end)
