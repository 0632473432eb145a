-- Helpers shared by the specs: temp files, curl, subprocesses. Everything talks to 127.0.0.1
-- and every subprocess runs under `timeout`, so no spec can hang.
local paths = require "support.paths"
local luaproxy = require "luaproxy"

local _M = {}

local unpack = table.unpack or unpack -- LuaJIT: no table.unpack
local function pack(...) return { n = select("#", ...), ... } end

--- the interpreter the specs run under (lua5.4 or luajit), and whether it is LuaJIT
_M.LUA = paths.LUA
_M.JIT = paths.JIT

--- util.assert_number_type(kind, v, what?): `v` is a number of math.type `kind` ("integer" or
-- "float"). LuaJIT has no integer subtype (every number is a double): there `v` must be a
-- number, and for "integer" one with an integral value.
function _M.assert_number_type(kind, v, what)
    if math.type then
        assert(math.type(v) == kind, (what or "value") .. ": " .. kind .. " expected, got " .. tostring(math.type(v)))
    else
        assert(type(v) == "number", (what or "value") .. ": number expected, got " .. type(v))
        assert(kind ~= "integer" or v % 1 == 0, (what or "value") .. ": integral value expected, got " .. tostring(v))
    end
end

--- cmd = util.lua_cmd(args, seconds?): the shell command that runs `lua ARGS` with what the
-- specs' own process has: its interpreter, and the build under test first on the paths
-- (support/paths.lua); under `timeout seconds` if given
function _M.lua_cmd(args, seconds)
    return paths.ENV .. (seconds and (" timeout " .. seconds) or "") .. " " .. paths.LUA .. " " .. args
end

local TMP = os.getenv("TMPDIR") or "/tmp"

--- path = util.write_temp(name, text)
function _M.write_temp(name, text)
    local dir = TMP .. "/luaproxy-spec-" .. tostring(os.time()) .. "-" .. tostring(math.random(1e9))
    os.execute("mkdir -p " .. dir)
    local path = dir .. "/" .. name
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
    return path
end

--- out, code = util.sh(cmd): stdout+stderr and exit code of a shell command
function _M.sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1; echo \"__EXIT:$?\""))
    local out = p:read("a")
    p:close()
    local code = tonumber(out:match("__EXIT:(%d+)%s*$"))
    return out:gsub("__EXIT:%d+%s*$", ""), code
end

--- status, body = util.curl(url, args?): through the real curl binary (bounded to 5 s)
function _M.curl(url, args)
    local out = _M.sh("curl -s -m 5 -w '\\n__STATUS:%{http_code}' " .. (args or "") .. " '" .. url .. "'")
    local status = tonumber(out:match("__STATUS:(%d+)%s*$"))
    return status, out:gsub("\n__STATUS:%d+%s*$", "")
end

--- ... = util.run(fn, seconds?, ...): luaproxy.run(fn, ...) with a deadline (default 20 s).
-- A watchdog task stops the loop once `seconds` have passed (luaproxy.stop() drops every
-- pending task, servers included) and util.run then raises "spec deadline passed", so a
-- regression that hangs (a server that never stops, a request that never ends, an error that
-- does not abort) fails the spec instead of hanging busted. When fn returns, the loop is
-- stopped too: whatever fn left running (a request in flight on a closed handler server,
-- whose srv:wait() does not wait for it) is dropped rather than waited for without bound.
-- An error in fn is raised as luaproxy.run raises it. (A Lua loop that never yields cannot be
-- stopped this way; every subprocess the specs run is bounded by `timeout` instead.)
function _M.run(fn, seconds, ...)
    seconds = seconds or 20
    local expired = false
    local results = pack(luaproxy.run(function(...)
        local dog = luaproxy.spawn(function()
            luaproxy.sleep(seconds)
            expired = true
            luaproxy.stop()
        end)
        local r = pack(fn(...))
        dog:kill()
        luaproxy.stop()
        return unpack(r, 1, r.n)
    end, ...))
    if expired then
        error(("spec deadline passed: the loop was still running after %g s"):format(seconds), 2)
    end
    return unpack(results, 1, results.n)
end

--- pid = util.start(cmd, seconds, out?): runs the shell command `cmd` in the background under
-- `timeout` (so it dies after `seconds` whatever happens), stdout+stderr to the file `out`
-- (default /dev/null); returns the pid of `timeout`, which passes a TERM on to the command.
function _M.start(cmd, seconds, out)
    local p = assert(io.popen(("timeout -k 2 %d %s >%s 2>&1 </dev/null & echo $!")
        :format(math.ceil(seconds), cmd, out or "/dev/null")))
    local pid = tonumber(p:read("l"))
    p:close()
    return assert(pid, "could not start " .. cmd)
end

--- p = util.main(args, seconds): `lua main.lua ARGS` of this checkout as a user runs it (under
-- the specs' interpreter, with the build under test: util.lua_cmd), in
-- the background under `timeout` (killed after `seconds` whatever happens). `p.pid` is lua's
-- own pid (signals go straight to it: p:signal("HUP")), `p:log()` what it printed so far,
-- `p:status()` its exit status once it has exited (nil while it runs; 124: timed out).
function _M.main(args, seconds)
    local dir = _M.write_temp("main.pid", ""):match("^(.*)/")
    local pidfile, log, status = dir .. "/main.pid", dir .. "/main.log", dir .. "/main.status"
    os.execute(("(%s timeout -k 2 %d sh -c 'echo $$ >%s; exec %s main.lua %s' >%s 2>&1 </dev/null; echo $? >%s) &")
        :format(paths.ENV, math.ceil(seconds), pidfile, paths.LUA, args, log, status))
    local pid
    for _ = 1, 250 do
        pid = tonumber(_M.read_file(pidfile) or "")
        if pid then break end
        os.execute("sleep 0.02")
    end
    local p = { pid = assert(pid, "main.lua did not start") }
    function p.signal(_, sig) os.execute("kill -" .. sig .. " " .. p.pid .. " 2>/dev/null") end
    function p.log() return _M.read_file(log) or "" end
    function p.status() return tonumber(_M.read_file(status) or "") end
    --- code = p:wait_exit(seconds): the exit status, or nil if still running after `seconds`
    function p.wait_exit(_, secs)
        for _ = 1, math.ceil((secs or 5) / 0.02) do
            local code = p.status()
            if code then return code end
            os.execute("sleep 0.02")
        end
        return p.status()
    end
    function p.kill() os.execute("kill -9 " .. p.pid .. " 2>/dev/null") end
    return p
end

--- alive = util.alive(pid): running (a zombie nobody reaped does not count: the processes
-- util.start starts are orphans, and PID 1 of a container may never reap them)
function _M.alive(pid)
    local stat = _M.read_file("/proc/" .. pid .. "/stat")
    return stat ~= nil and stat:match("%) (%a)") ~= "Z"
end

--- util.stop(pid): TERM the process util.start started and wait (up to 3 s, then KILL) for it.
function _M.stop(pid)
    os.execute("kill " .. pid .. " 2>/dev/null")
    for _ = 1, 150 do
        if not _M.alive(pid) then return true end
        os.execute("sleep 0.02")
    end
    os.execute("kill -9 " .. pid .. " 2>/dev/null")
    return false
end

--- text = util.read_file(path) (nil if missing)
function _M.read_file(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local text = f:read("a")
    f:close()
    return text
end

--- s = util.random_bytes(n): n bytes, every value 0..255 possible
function _M.random_bytes(n)
    local parts, chunk = {}, {}
    for i = 1, n do
        chunk[#chunk + 1] = math.random(0, 255)
        if #chunk == 4096 or i == n then
            parts[#parts + 1] = string.char(unpack(chunk))
            chunk = {}
        end
    end
    return table.concat(parts)
end

--- pos = util.first_difference(a, b): nil when equal, else the first differing byte (1-based)
function _M.first_difference(a, b)
    if a == b then return nil end
    for i = 1, math.min(#a, #b) do
        if a:byte(i) ~= b:byte(i) then return i end
    end
    return math.min(#a, #b) + 1
end

--- up = util.python_upstream(mode, seconds?, data?): spec/support/upstream.py in the
-- background (see its modes), bounded by `timeout`. `up.addr`, `up.port`, `up.log()` (the
-- lines it logged, one per request or event), `up.stop()` (may be called again). Async: call
-- it inside the loop. Stop it from the spec's finally (busted keeps only the last finally a
-- spec registers: one finally must stop everything).
function _M.python_upstream(mode, seconds, data)
    local dir = _M.write_temp("upstream.ready", "")
    dir = dir:match("^(.*)/")
    local log, ready = dir .. "/upstream.log", dir .. "/upstream.port"
    local data_arg = ""
    if data then
        local data_file = dir .. "/upstream.data"
        local f = assert(io.open(data_file, "wb"))
        f:write(data)
        f:close()
        data_arg = " " .. data_file
    end
    local pid = _M.start(("python3 spec/support/upstream.py %s %s %s%s"):format(mode, ready, log, data_arg),
        seconds or 20, dir .. "/upstream.out")
    local port
    _M.wait_for(function()
        port = tonumber(_M.read_file(ready) or "")
        return port or not _M.alive(pid)
    end, 5)
    if not port then
        _M.stop(pid)
        error("python upstream did not start: " .. tostring(_M.read_file(dir .. "/upstream.out")))
    end
    local up = { port = port, addr = "127.0.0.1:" .. port, pid = pid }
    function up.log()
        local lines = {}
        for line in (_M.read_file(log) or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
        return lines
    end
    local stopped = false
    function up.stop()
        if not stopped then stopped = true; _M.stop(pid) end
    end
    return up
end

--- status, bytes = util.curl_bytes(url, args?): curl into a file (so bytes stay bytes),
-- bounded to 10 s; `args` as for curl (e.g. "--data-binary @file")
function _M.curl_bytes(url, args)
    local dst = _M.write_temp("curl.out", "")
    local out, code = _M.sh("curl -s -m 10 -o " .. dst .. " -w '%{http_code}' " .. (args or "") .. " " .. url)
    if code ~= 0 then error("curl failed (" .. tostring(code) .. "): " .. out, 2) end
    return tonumber(out), _M.read_file(dst)
end

--- util.same_bytes(expected, got, what): raises, naming the first differing byte, unless equal
function _M.same_bytes(expected, got, what)
    local at = _M.first_difference(expected, got or "")
    if at then
        error(("%s: %d bytes expected, %d got, first difference at byte %d")
            :format(what, #expected, got and #got or -1, at), 2)
    end
end

--- srv = util.serve_handler(handler, port?): a handler server on 127.0.0.1:port (0: any);
-- a port that was ours a moment ago (a backend closed and reopened) gets a few tries while the
-- kernel hands it back, then the error is raised. Async: call it inside the loop.
function _M.serve_handler(handler, port)
    local srv, err
    for _ = 1, 50 do
        srv, err = luaproxy.serve{ listen = "127.0.0.1:" .. (port or 0), handler = handler }
        if srv then return srv end
        luaproxy.sleep(0.05)
    end
    error("cannot listen on 127.0.0.1:" .. tostring(port) .. ": " .. tostring(err), 2)
end

--- util.shut(srv): stop a server now (requests in flight dropped) and wait until it has.
function _M.shut(srv)
    srv:close(0)
    srv:wait()
end

--- py = util.python_with(module): the first Python that imports `module` ("python3", then
-- /usr/bin/python3: a pyenv `python3` first on PATH may not see Debian's python3-* packages),
-- or nil
function _M.python_with(module)
    for _, py in ipairs{ "python3", "/usr/bin/python3" } do
        local _, code = _M.sh(py .. " -c 'import " .. module .. "'")
        if code == 0 then return py end
    end
    return nil
end

--- port = util.free_port(): bind port 0, note the port, close it
function _M.free_port()
    local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", handler = function() return 200 end })
    local port = srv.port
    srv:close()
    srv:wait()
    return port
end

--- ok = util.wait_for(fn, seconds): poll fn() every 20 ms until it is truthy
function _M.wait_for(fn, seconds)
    local deadline = luaproxy.now() + (seconds or 5)
    while luaproxy.now() < deadline do
        if fn() then return true end
        luaproxy.sleep(0.02)
    end
    return fn()
end

--- util.get(url, opts?) -> status, body (nil, err on failure), via the luaproxy client
function _M.get(url, opts)
    local res, err = luaproxy.http.request_uri(url, opts)
    if not res then return nil, err end
    return res.status, res.body, res
end

--- status, body, headers = util.request(url, opts?, seconds?): through the luaproxy client,
-- the body read, bounded by a read timeout (`seconds`, default 10, unless opts sets one);
-- nil, err on failure
function _M.request(url, opts, seconds)
    opts = opts or {}
    opts.read_timeout = opts.read_timeout or seconds or 10
    local res, err = luaproxy.http.request_uri(url, opts)
    if not res then return nil, err end
    return res.status, res.body, res.headers
end

--- text = util.raw(port, payload, seconds?): send raw bytes over one TCP connection (bash's
-- /dev/tcp), then read until the server closes or `seconds` (default 2) pass.
-- `payload` may hold \r\n escapes as printf understands them.
function _M.raw(port, payload, seconds, pause_then)
    local script = "exec 3<>/dev/tcp/127.0.0.1/" .. port .. "; printf '" .. payload .. "' >&3; "
    if pause_then then
        script = script .. "sleep " .. pause_then[1] .. "; printf '" .. pause_then[2] .. "' >&3; "
    end
    script = script .. "timeout " .. (seconds or 2) .. " cat <&3"
    local p = assert(io.popen("bash -c \"" .. script .. "\" 2>&1"))
    local out = p:read("a")
    p:close()
    return out
end

--- opts = util.form(body, headers?): request options for a POST of an
-- application/x-www-form-urlencoded `body` (a Content-Type in `headers` wins)
function _M.form(body, headers)
    headers = headers or {}
    headers["content-type"] = headers["content-type"] or "application/x-www-form-urlencoded"
    return { method = "POST", body = body, headers = headers }
end

return _M
