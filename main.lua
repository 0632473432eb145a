-- main.lua: the luaproxy program. `lua main.lua --help` lists the options.
--
-- With no --backend it starts two demo backends (served by luaproxy itself on 127.0.0.1:9001
-- and :9002) and the least-connection proxy on 127.0.0.1:8080 in front of them.

local luaproxy = require "luaproxy"
local cli = require "luaproxy.cli"

local DEMO_PORTS = { 9001, 9002 }

local function script_dir()
    local src = arg and arg[0] or ""
    return src:match("^(.*)/[^/]*$") or "."
end

local function file_exists(path)
    local f = io.open(path, "rb")
    if f then f:close() return true end
    return false
end

local function demo_backend(port)
    local name = "127.0.0.1:" .. port
    return function(req)
        local body = req:read_body() or ""
        return 200, "hello from demo backend " .. name .. " (" .. req:get_method() .. " "
            .. req:get_uri() .. ", " .. #body .. " body bytes)\n",
            { ["x-backend"] = name, ["content-type"] = "text/plain" }
    end
end

local function main(settings)
    if settings.log_level then luaproxy.set_log_level(settings.log_level) end

    local policy = settings.policy
    if not file_exists(policy) and file_exists(script_dir() .. "/" .. policy) then
        policy = script_dir() .. "/" .. policy
    end
    if not file_exists(policy) then
        return nil, "cannot read policy file '" .. settings.policy .. "'"
    end

    -- Shared dicts declared in the config exist before any worker loads the policy.
    for name, size in pairs(settings.dicts or {}) do
        local dict, derr = luaproxy.shared.new(name, size)
        if not dict then
            return nil, "dict '" .. tostring(name) .. "': " .. derr
        end
    end

    local demos = {}
    local backends = settings.backends
    if not backends then
        backends = {}
        for i, port in ipairs(settings.demo_ports or DEMO_PORTS) do
            local srv, err = luaproxy.serve{ listen = "127.0.0.1:" .. port, handler = demo_backend(port) }
            if not srv then
                for _, s in ipairs(demos) do s:close() end
                return nil, "demo backend: " .. err
            end
            demos[i] = srv
            backends[i] = srv.addr
        end
    end

    local config = {}
    for k, v in pairs(settings) do config[k] = v end
    config.backends = backends

    local opts = { listen = settings.listen, policy = policy, workers = settings.workers, config = config }
    for _, k in ipairs(cli.SERVER_SETTINGS) do opts[k] = settings[k] end
    local srv, err = luaproxy.serve(opts)
    if not srv then
        for _, s in ipairs(demos) do s:close() end
        return nil, err
    end

    io.stdout:write("luaproxy listening on http://", srv.addr, "/ (policy ", policy, ", ",
        settings.workers or luaproxy.worker.cpus(), " workers) -> ", table.concat(backends, ", "), "\n")
    if #demos > 0 then
        io.stdout:write("try:  curl http://", srv.addr, "/    (run it twice: both demo backends answer)\n")
    end
    io.stdout:flush()
    srv:wait()
    return true
end

local settings, err, code = cli.parse(arg or {})
if not settings then
    io.stderr:write("luaproxy: ", err, "\n")
    os.exit(code or 2)
end
if settings.help then
    io.stdout:write(cli.USAGE)
    os.exit(0)
end

local ok, perr, rerr = pcall(luaproxy.run, main, settings)
if not ok then
    -- One line: the message without its traceback or the error wrappers' prefixes.
    local msg = tostring(perr):match("^[^\n]*"):gsub("runtime error: ", ""):gsub("^luaproxy%.serve: ", "")
    io.stderr:write("luaproxy: ", msg, "\n")
    os.exit(1)
elseif not perr then
    io.stderr:write("luaproxy: ", tostring(rerr), "\n")
    os.exit(1)
end
