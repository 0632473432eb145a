-- Helpers shared by the specs: temp files, curl, subprocesses. Everything talks to 127.0.0.1
-- and every subprocess runs under `timeout`, so no spec can hang.
local luaproxy = require "luaproxy"

local _M = {}

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

return _M
