-- The listener with a handler on the spec's own VM: the request API, response shapes,
-- pipelining, and what is refused before the handler runs. Raw requests go through bash's
-- /dev/tcp so the bytes are exactly what a client sent.
local luaproxy = require "luaproxy"
local util = require "support.util"

-- Runs fn(srv, seen) with a server in a forked shell-friendly way: the raw clients are
-- blocking subprocesses, so the server runs in its own process (util.lua_cmd).
local function serve_in_process(handler_src, opts_src, fn)
    local port = util.run(util.free_port)
    local script = util.write_temp("srv.lua", ([[
        local luaproxy = require "luaproxy"
        luaproxy.set_log_level("crit")
        luaproxy.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:%d", handler = %s %s })
            luaproxy.sleep(8)
            srv:close()
        end)
    ]]):format(port, handler_src, opts_src or ""))
    os.execute(util.lua_cmd(script, 10) .. " & echo $! > " .. script .. ".pid")
    local pid = io.open(script .. ".pid"):read("l")
    local ok, err = pcall(function()
        assert(util.run(function()
            return util.wait_for(function() return util.get("http://127.0.0.1:" .. port .. "/ping") ~= nil end, 5)
        end), "server did not start")
        fn(port)
    end)
    os.execute("kill " .. pid .. " 2>/dev/null")
    assert(ok, err)
end

local ECHO = [[function(req)
    local body = req:read_body()
    local args = req:get_uri_args()
    local h = req:get_headers()
    return 200, table.concat({ req:get_method(), req:get_path(), req:get_query() or "-",
        tostring(args.a), tostring(args.flag), h["x-multi"] and table.concat(type(h["x-multi"]) == "table" and h["x-multi"] or { h["x-multi"] }, "+") or "-",
        req:get_header("X-MULTI") or "-", req:get_remote_addr(), #body }, " ")
end]]

describe("listener", function()
    it("exposes method, path, query args, headers, body and client address", function()
        serve_in_process(ECHO, nil, function(port)
            local status, body = util.curl("http://127.0.0.1:" .. port .. "/p/q?a=1&flag&a=2",
                "-X PUT --data-binary 'hello' -H 'X-Multi: one' -H 'X-Multi: two'")
            assert.are.equal(200, status)
            assert.are.equal("PUT /p/q a=1&flag&a=2 table: true one+two one, two 127.0.0.1 5", body:gsub("table: 0x%x+", "table:"))
        end)
    end)

    it("answers pipelined requests in order on one connection", function()
        serve_in_process([[function(req) return 200, "path=" .. req:get_path() end]], nil, function(port)
            local out = util.raw(port, "GET /one HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nGET /two HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"
                .. "GET /three HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            local a, b, c = out:find("path=/one", 1, true), out:find("path=/two", 1, true), out:find("path=/three", 1, true)
            assert.is_truthy(a and b and c, out)
            assert.is_true(a < b and b < c)
        end)
    end)

    it("parses form posts", function()
        serve_in_process([[function(req)
            local args = req:get_post_args()
            return 200, args.apiKey .. "|" .. args.text
        end]], nil, function(port)
            local status, body = util.curl("http://127.0.0.1:" .. port .. "/", "--data 'apiKey=k%20y&text=a+b'")
            assert.are.equal(200, status)
            assert.are.equal("k y|a b", body)
        end)
    end)

    it("refuses malformed or unsafe requests before the handler, and keeps serving", function()
        serve_in_process([[function(req) return 200, "handler ran" end]], "; max_body_size = 1000, body_timeout = 0.3", function(port)
            local cases = {
                { "GET / HTTP/1.1\\r\\n\\r\\n", "400", "missing host" },
                { "GET / HTTP/1.1\\r\\nHost: a\\r\\nHost: b\\r\\n\\r\\n", "400", "duplicate host" },
                { "TRACE / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n", "405", "method not allowed" },
                { "POST / HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 5000\\r\\n\\r\\nxx", "413", "too large" },
                { "POST / HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 2\\r\\nContent-Length: 3\\r\\n\\r\\nxxx", "400", "duplicate content-length" },
                { "POST / HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 3\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n", "400", "both content-length and transfer-encoding" },
                { "POST / HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 1x\\r\\n\\r\\nx", "400", "invalid content-length" },
                { "GET / HTTP/2.0\\r\\nHost: a\\r\\n\\r\\n", "505", "unsupported http version" },
                { "GET / HTTP/1.1\\r\\nHost: a\\r\\nX: " .. ("v"):rep(40000) .. "\\r\\n\\r\\n", "431", "too large" },
                { "POST / HTTP/1.1\\r\\nHost: a\\r\\nTransfer-Encoding: gzip, chunked\\r\\n\\r\\n0\\r\\n\\r\\n", "501", "transfer-encoding" },
            }
            for _, c in ipairs(cases) do
                local out = util.raw(port, c[1])
                assert.matches("^HTTP/1.1 " .. c[2], out)
                assert.matches(c[3], out, 1, true)
                assert.matches("connection: close", out, 1, true)
                assert.is_nil(out:find("handler ran", 1, true), c[1])
            end
            assert.are.equal(200, (util.curl("http://127.0.0.1:" .. port .. "/")))
        end)
    end)

    it("408 for a body that stalls, 413 for a chunked body over the limit", function()
        serve_in_process([[function(req)
            local body, err = req:read_body()
            return 200, "read " .. tostring(body and #body) .. " " .. tostring(err)
        end]], "; max_body_size = 1000, body_timeout = 0.3", function(port)
            local out = util.raw(port, "POST / HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 10\\r\\n\\r\\nab", 2)
            assert.matches("^HTTP/1.1 408", out)
            local chunk = ("y"):rep(600)
            out = util.raw(port, "POST / HTTP/1.1\\r\\nHost: a\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n258\\r\\n"
                .. chunk .. "\\r\\n258\\r\\n" .. chunk .. "\\r\\n0\\r\\n\\r\\n", 2)
            assert.matches("^HTTP/1.1 413", out)
            assert.are.equal(200, (util.curl("http://127.0.0.1:" .. port .. "/", "--data small")))
        end)
    end)

    it("drains unread bodies, answers 100-continue, HEAD and HTTP/1.0 the way clients expect", function()
        serve_in_process([[function(req)
            if req:get_path() == "/read" then return 200, "got " .. #req:read_body() end
            return 200, "hello"
        end]], nil, function(port)
            -- bodies the handler never read are skipped: the next request on the connection is served
            local out = util.raw(port, "POST /a HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 3\\r\\n\\r\\nabc"
                .. "POST /b HTTP/1.1\\r\\nHost: x\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n2\\r\\nhi\\r\\n0\\r\\n\\r\\n"
                .. "POST /read HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 4\\r\\nConnection: close\\r\\n\\r\\nwxyz")
            local _, n = out:gsub("HTTP/1.1 200", "")
            assert.are.equal(3, n, out)
            assert.matches("got 4$", out)
            -- 100 Continue goes out only when the handler reads the body
            out = util.raw(port, "POST /read HTTP/1.1\\r\\nHost: x\\r\\nExpect: 100-continue\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\n",
                2, { 0.2, "ok" })
            assert.matches("^HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", out)
            assert.matches("got 2$", out)
            out = util.raw(port, "HEAD / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            assert.matches("content%-length: 5\r\n", out)
            assert.is_nil(out:find("hello", 1, true))
            out = util.raw(port, "GET / HTTP/1.0\\r\\n\\r\\n")
            assert.matches("connection: close\r\n", out)
            assert.matches("hello$", out)
            out = util.raw(port, "GET / HTTP/1.0\\r\\nConnection: keep-alive\\r\\n\\r\\nGET / HTTP/1.0\\r\\n\\r\\n")
            assert.matches("connection: keep%-alive\r\n", out)
            local _, m = out:gsub("hello", "")
            assert.are.equal(2, m, out)
        end)
    end)

    it("survives clients that hang up in the middle of a response", function()
        serve_in_process([[function(req)
            if req:get_path() == "/big" then return 200, string.rep("z", 8 * 1024 * 1024) end
            return 200, "still here"
        end]], nil, function(port)
            for _ = 1, 3 do
                util.sh("curl -s -m 5 http://127.0.0.1:" .. port .. "/big | head -c 10 > /dev/null")
            end
            local status, body = util.curl("http://127.0.0.1:" .. port .. "/")
            assert.are.equal(200, status)
            assert.are.equal("still here", body)
        end)
    end)

    it("a handler error is a 500 with a generic body; a table body is JSON", function()
        serve_in_process([[function(req)
            if req:get_path() == "/err" then error("internal detail") end
            if req:get_path() == "/bad" then return { status = "nope" } end
            return { status = 201, body = { ok = true, list = { 1, 2 } } }
        end]], nil, function(port)
            local status, body = util.curl("http://127.0.0.1:" .. port .. "/err")
            assert.are.equal(500, status)
            assert.is_nil(body:find("detail", 1, true))
            assert.are.equal(500, (util.curl("http://127.0.0.1:" .. port .. "/bad")))
            local out = util.sh("curl -s -i -m 5 http://127.0.0.1:" .. port .. "/json")
            assert.matches("HTTP/1.1 201", out, 1, true)
            assert.matches("content-type: application/json", out, 1, true)
            assert.matches('"list":[1,2]', out, 1, true)
        end)
    end)
end)

describe("serve errors", function()
    it("nil, err for an address in use, a bad address, a missing or broken policy", function()
        util.run(function()
            local a = assert(luaproxy.serve{ listen = "127.0.0.1:0", handler = function() return 200 end })
            local srv, err = luaproxy.serve{ listen = a.addr, handler = function() return 200 end }
            assert.is_nil(srv)
            assert.matches("address already in use", err, 1, true)
            a:close()
            srv, err = luaproxy.serve{ listen = "not an address", handler = print }
            assert.is_nil(srv)
            assert.matches("bad listen address", err, 1, true)
            srv, err = luaproxy.serve{ listen = "127.0.0.1:0", policy = "/nonexistent.lua", workers = 1 }
            assert.is_nil(srv)
            assert.matches("cannot read policy file '/nonexistent.lua'", err, 1, true)
            local broken = util.write_temp("broken.lua", "return {")
            srv, err = luaproxy.serve{ listen = "127.0.0.1:0", policy = broken, workers = 2 }
            assert.is_nil(srv)
            assert.matches(broken .. ":1:", err, 1, true)
            local failing = util.write_temp("init_fails.lua", "return { handler = print, init_worker = function() error('no config') end }")
            srv, err = luaproxy.serve{ listen = "127.0.0.1:0", policy = failing, workers = 2 }
            assert.is_nil(srv)
            assert.matches("no config", err, 1, true)
        end)
    end)

    it("raises on misuse", function()
        util.run(function()
            assert.has_error(function() luaproxy.serve{ handler = print } end)
            assert.has_error(function() luaproxy.serve{ listen = "127.0.0.1:0" } end)
            assert.has_error(function() luaproxy.serve{ listen = "127.0.0.1:0", policy = "x", workers = 0 } end)
        end)
    end)
end)

describe("idle connections", function()
    it("a connection left with an unread body after its response is closed after client_body_timeout", function()
        -- The handler answers without reading the 5000-byte body the client announced; the
        -- client then sends nothing more. Without our watchdog the server would hold this
        -- connection (and its loop) forever.
        serve_in_process([[function(req) return 200, "early" end]], "; client_body_timeout = 0.5", function(port)
            local t0 = luaproxy.now()
            local out = util.raw(port, "POST / HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 5000\\r\\n\\r\\nxx", 4)
            local took = luaproxy.now() - t0
            assert.matches("^HTTP/1.1 200", out)
            assert.is_true(took < 3, "connection held for " .. took .. " s")
        end)
    end)
end)

describe("workers", function()
    it("share 60 simultaneous connections about evenly, every one answered", function()
        -- Each worker accepts on its own SO_REUSEPORT socket; the kernel's split is blind, so a
        -- worker holding two more connections than another hands new ones over.
        local policy = util.write_temp("which_worker.lua", [[
            local luaproxy = require "luaproxy"
            return function(req)
                luaproxy.sleep(0.3)
                return 200, "w" .. luaproxy.worker.id() .. "\n"
            end
        ]])
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 2 })
            local urls = {}
            for i = 1, 60 do urls[i] = "http://127.0.0.1:" .. srv.port .. "/" .. i end
            local out = util.sh("curl -s -m 10 --parallel --parallel-immediate --parallel-max 60 "
                .. table.concat(urls, " "))
            srv:close()
            srv:wait()
            local _, w0 = out:gsub("w0\n", "")
            local _, w1 = out:gsub("w1\n", "")
            assert.are.equal(60, w0 + w1, out)
            assert.is_true(math.abs(w0 - w1) <= 4, "split " .. w0 .. "/" .. w1)
        end)
    end)
end)

describe("memory", function()
    it("stays flat under requests whose bodies the handler never reads", function()
        local function rss_kb()
            local f = assert(io.open("/proc/self/status"))
            local kb = tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
            f:close()
            return kb
        end
        local policy = util.write_temp("unread_body.lua", "return function(req) return 200, 'ok' end")
        local body = ("x"):rep(5120)
        local function hammer(port, n)
            local tasks = {}
            for t = 1, 8 do
                tasks[t] = luaproxy.spawn(function()
                    for _ = 1, n / 8 do
                        local res = assert(luaproxy.http.request_uri("http://127.0.0.1:" .. port .. "/",
                            { method = "POST", body = body }))
                        assert(res.status == 200)
                    end
                end)
            end
            for _, t in ipairs(tasks) do assert(t:wait()) end
        end
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 2 })
            hammer(srv.port, 4000)                 -- warm up pools and allocator
            collectgarbage()
            local before = rss_kb()
            hammer(srv.port, 40000)                -- unread 5 KB bodies: ~200 MB pinned before
            local grown = rss_kb() - before
            srv:close()
            srv:wait()
            assert.is_true(grown < 20 * 1024, "RSS grew by " .. grown .. " KB")
        end)
    end)
end)

describe("after the handler returns", function()
    it("the request is gone: its methods and dict:lease give nil, \"request has ended\"", function()
        local d = luaproxy.shared.new("listener_spec_ended", "64k")
        local policy = util.write_temp("ended.lua", [[
            local luaproxy = require "luaproxy"
            return function(req)
                luaproxy.spawn(function()
                    luaproxy.sleep(0.05)
                    local body, err = req:read_body()
                    local h, herr = req:get_header("host")
                    local n, lerr = luaproxy.shared.listener_spec_ended:lease("c", req)
                    luaproxy.shared.listener_spec_ended:set("late", table.concat({ tostring(body), tostring(err),
                        tostring(h), tostring(herr), tostring(n), tostring(lerr),
                        tostring(luaproxy.shared.listener_spec_ended:get("c")), type(req) }, " "))
                end)
                return 200, "ok"
            end
        ]])
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = policy, workers = 1 })
            local res = assert(luaproxy.http.request_uri("http://127.0.0.1:" .. srv.port .. "/",
                { method = "POST", body = "unread" }))
            assert.are.equal(200, res.status)
            assert.is_true(util.wait_for(function() return d:get("late") end, 2))
            srv:close()
            srv:wait()
        end)
        assert.are.equal("nil request has ended nil request has ended nil request has ended nil userdata", d:get("late"))
    end)
end)

describe("out of file descriptors", function()
    it("EMFILE on accept is logged and retried, never a spin or a crash; the server serves once descriptors free", function()
        -- A server in its own process with 40 descriptors: python opens 60 connections to it.
        local port = util.run(util.free_port)
        local script = util.write_temp("emfile.lua", ([[
            local lp = require "luaproxy"
            lp.run(function()
                local srv = assert(lp.serve{ listen = "127.0.0.1:%d", handler = function() return 200, "ok" end })
                lp.sleep(8)
                srv:close()
            end)
        ]]):format(port))
        local log = script .. ".log"
        local pid = util.start("bash -c \"ulimit -n 40; exec env " .. util.lua_cmd(script) .. "\"", 10, log)
        local ok, err = pcall(function()
            util.run(function()
                assert(util.wait_for(function() return util.get("http://127.0.0.1:" .. port .. "/") == 200 end, 5))
            end)
            local out, code = util.sh("timeout 20 python3 -c '" .. ([[
import socket, time
socks = [socket.create_connection(("127.0.0.1", %d), timeout=2) for i in range(60)]
time.sleep(1)
for s in socks: s.close()
time.sleep(0.3)
s = socket.create_connection(("127.0.0.1", %d), timeout=2)
s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
s.settimeout(3)
print(s.recv(100).split(b"\r\n")[0].decode())
]]):format(port, port) .. "'")
            assert.are.equal(0, code, out)
            assert.matches("HTTP/1.1 200 OK", out)
            assert.is_true(util.alive(pid), "the server died")
            local lines = util.read_file(log) or ""
            local n = select(2, lines:gsub("accept failed: Too many open files", ""))
            -- Retried every 100 ms while descriptors are short: a handful of lines, not a spin.
            assert.is_true(n >= 1 and n <= 40, n .. " accept failures logged:\n" .. lines:sub(1, 500))
        end)
        util.stop(pid)
        assert(ok, err)
    end)
end)

describe("req:ctx()", function()
    it("is one table per request, the same on every call, kept across yields, gone with the request", function()
        util.run(function()
            local kept
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", handler = function(req)
                local ctx = req:ctx()
                ctx.n = (ctx.n or 0) + 1
                ctx.path = req:get_path()
                luaproxy.sleep(0.05) -- the other requests run meanwhile
                if req:get_path() == "/keep" then kept = req end
                if req:get_path() == "/ended" then
                    local t, err = kept:ctx()
                    return 200, tostring(t) .. " " .. tostring(err)
                end
                return 200, ("%s %d %s"):format(ctx.path, ctx.n, tostring(req:ctx() == ctx))
            end })
            local base = "http://" .. srv.addr
            local tasks = {}
            for i = 1, 5 do
                tasks[i] = luaproxy.spawn(function() return util.get(base .. "/r" .. i) end)
            end
            for i = 1, 5 do
                local _, status, body = tasks[i]:wait()
                assert.are.equal(200, status)
                assert.are.equal("/r" .. i .. " 1 true", body)
            end
            assert.are.equal(200, (util.get(base .. "/keep")))
            local _, body = util.get(base .. "/ended")
            assert.are.equal("nil request has ended", body)
            srv:close()
        end, 10)
    end)
end)
