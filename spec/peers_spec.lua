-- luaproxy against independent HTTP implementations: Debian's nginx as the upstream (started
-- here with a generated config on a free 127.0.0.1 port, stopped after each spec), curl as the
-- client, and a raw-socket Python upstream for answers no sane server sends. The proxy runs as
-- a policy on a worker thread, so the blocking curl subprocess can reach it.
local luaproxy = require "luaproxy"
local util = require "support.util"

local NGINX = "/usr/sbin/nginx"
-- os.execute gives true on Lua 5.4, the exit status 0 on LuaJIT
local have_nginx = ({ [true] = true, [0] = true })[os.execute("test -x " .. NGINX)] or false

local PROXY = util.write_temp("peers_proxy.lua", [[
    local upstream
    return {
        init_worker = function(config) upstream = config.upstream end,
        handler = function(req)
            local res, err = req:proxy(upstream, { read_timeout = 5 })
            if not res then return err == "timeout" and 504 or 502, err end
            return res
        end,
    }
]])

-- fn(url) with a luaproxy proxy (1 worker, bodies up to 8 MiB) in front of `upstream`
local function with_proxy(upstream, fn)
    local proxy = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = PROXY, workers = 1,
        client_max_body_size = "8m", config = { upstream = upstream } })
    local ok, err = pcall(fn, "http://" .. proxy.addr)
    proxy:close()
    proxy:wait()
    assert(ok, err)
end

-- fn(ngx) with nginx serving on 127.0.0.1: ngx.addr, ngx.dir, ngx.access() (access log lines:
-- `$connection $connection_requests "$request" $status $request_length $body_bytes_sent`).
-- /ping answers pong; /dav/ takes PUT (stored under ngx.dir/www/dav/) and serves GET; a POST
-- to /upload is stored whole in a file (client_body_in_file_only) whose path is the answer.
local function with_nginx(fn)
    local port = util.free_port()
    local dir = util.write_temp("nginx.conf", ""):match("^(.*)/")
    os.execute("mkdir -p " .. dir .. "/www/dav " .. dir .. "/tmp")
    local conf = ([[
daemon off;
master_process off;
worker_processes 1;
pid DIR/nginx.pid;
error_log DIR/error.log warn;
events { worker_connections 256; }
http {
    log_format peers '$connection $connection_requests "$request" $status $request_length $body_bytes_sent';
    access_log DIR/access.log peers;
    client_body_temp_path DIR/tmp/body;
    proxy_temp_path DIR/tmp/proxy;
    fastcgi_temp_path DIR/tmp/fastcgi;
    uwsgi_temp_path DIR/tmp/uwsgi;
    scgi_temp_path DIR/tmp/scgi;
    keepalive_timeout 60s;
    keepalive_requests 1000;
    client_max_body_size 8m;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:PORT;
        root DIR/www;
        location = /ping { return 200 "pong\n"; }
        location /dav/ { dav_methods PUT DELETE; create_full_put_path on; }
        location = /upload {
            client_body_in_file_only on;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Body-File $request_body_file;
            proxy_pass http://127.0.0.1:PORT/stored;
        }
        location = /stored { return 200 "$http_x_body_file"; }
        location / { return 200 "nginx $uri\n"; }
    }
}
]]):gsub("DIR", dir):gsub("PORT", tostring(port))
    local f = assert(io.open(dir .. "/nginx.conf", "w"))
    f:write(conf)
    f:close()
    local pid = util.start(("%s -p %s/ -c %s/nginx.conf -e %s/error.log"):format(NGINX, dir, dir, dir), 60,
        dir .. "/nginx.out")
    local stopped = false
    local function stop_nginx()
        if not stopped then stopped = true; util.stop(pid) end
    end
    finally(stop_nginx)   -- also when util.run's deadline drops the code below
    local ok, err = pcall(function()
        local addr = "127.0.0.1:" .. port
        assert(util.wait_for(function() return util.get("http://" .. addr .. "/ping") == 200 end, 5),
            "nginx did not start: " .. tostring(util.read_file(dir .. "/error.log")))
        fn({
            addr = addr,
            dir = dir,
            access = function()
                local lines = {}
                for line in (util.read_file(dir .. "/access.log") or ""):gmatch("[^\n]+") do
                    lines[#lines + 1] = line
                end
                return lines
            end,
        })
    end)
    stop_nginx()
    assert(ok, err)
end

describe("nginx as the upstream", function()
    local function nginx_it(name, fn)
        it(name, function()
            if not have_nginx then
                pending("nginx is not installed (" .. NGINX .. " missing): apt-get install -y nginx")
                return
            end
            util.run(function() with_nginx(fn) end, 30)
        end)
    end

    nginx_it("a 1 MiB POST through luaproxy reaches nginx byte for byte (curl; Content-Length and chunked)", function(ngx)
        with_proxy(ngx.addr, function(url)
            local data = util.random_bytes(1024 * 1024)
            local src = util.write_temp("post.bin", data)
            for _, framing in ipairs{ "", "-H 'Transfer-Encoding: chunked'" } do
                local status, stored = util.curl_bytes(url .. "/upload", framing .. " --data-binary @" .. src)
                assert.are.equal(200, status, framing)
                assert.are.equal(ngx.dir .. "/tmp/body/", stored:match("^(.*/)%d+$"))
                util.same_bytes(data, util.read_file(stored), "the body nginx stored " .. framing)
            end
            -- and through luaproxy's own client
            local status, stored = util.get(url .. "/upload", { method = "POST", body = data })
            assert.are.equal(200, status)
            util.same_bytes(data, util.read_file(stored), "the body nginx stored (luaproxy client)")
        end)
    end)

    nginx_it("1 MiB PUT to nginx's WebDAV and read back through luaproxy byte for byte", function(ngx)
        with_proxy(ngx.addr, function(url)
            local data = util.random_bytes(1024 * 1024)
            local status = util.get(url .. "/dav/blob.bin", { method = "PUT", body = data })
            assert.are.equal(201, status)
            util.same_bytes(data, util.read_file(ngx.dir .. "/www/dav/blob.bin"), "the file nginx wrote")
            local body
            status, body = util.get(url .. "/dav/blob.bin")
            assert.are.equal(200, status)
            util.same_bytes(data, body, "GET through luaproxy's client")
            status, body = util.curl_bytes(url .. "/dav/blob.bin")
            assert.are.equal(200, status)
            util.same_bytes(data, body, "GET through curl")
        end)
    end)

    nginx_it("keeps one upstream connection alive across 50 requests (nginx's access log)", function(ngx)
        with_proxy(ngx.addr, function(url)
            for i = 1, 50 do
                local status, body = util.get(url .. "/ka/" .. i)
                assert.are.equal(200, status)
                assert.are.equal("nginx /ka/" .. i .. "\n", body)
            end
            local lines
            assert(util.wait_for(function()
                lines = {}
                for _, line in ipairs(ngx.access()) do
                    if line:find('"GET /ka/', 1, true) then lines[#lines + 1] = line end
                end
                return #lines == 50
            end, 3), "nginx logged " .. #lines .. " of 50 requests")
            local conns, n = {}, 0
            for i, line in ipairs(lines) do
                local conn, reqs, path = line:match('^(%d+) (%d+) "GET (%S+) HTTP/1.1" 200')
                assert.is_truthy(conn, line)
                assert.are.equal("/ka/" .. i, path)
                assert.are.equal(i, tonumber(reqs), line)     -- the i-th request on its connection
                if not conns[conn] then conns[conn], n = true, n + 1 end
            end
            assert.are.equal(1, n, table.concat(lines, "\n"))
        end)
    end)
end)

describe("a hostile upstream (Python, raw socket)", function()
    it("answers 502 for a response with a bad Content-Length, and goes on serving", function()
        util.run(function()
            local up = util.python_upstream("hostile")
            finally(up.stop)
            with_proxy(up.addr, function(url)
                for _, path in ipairs{ "/cl-dup", "/cl-alpha", "/cl-plus", "/cl-neg", "/cl-huge", "/cl-list", "/cl-te" } do
                    local status, body = util.curl_bytes(url .. path)
                    assert.are.equal(502, status, path .. ": " .. tostring(body))
                    assert.matches("^invalid upstream response", body)
                    status, body = util.get(url .. "/ok")
                    assert.are.equal(200, status, "after " .. path)
                    assert.are.equal("hello", body)
                end
            end)
            assert.are.equal(14, #up.log())
        end, 20)
    end)
end)
