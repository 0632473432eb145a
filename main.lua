-- main.lua: the luaproxy program. `lua main.lua --help` lists the options.
--
-- With no --backend it starts two demo backends (served by luaproxy itself on 127.0.0.1:9001
-- and :9002) and the least-connection proxy on 127.0.0.1:8080 in front of them.

local luaproxy = require "luaproxy"
local cli = require "luaproxy.cli"

local DEMO_PORTS = { 9001, 9002 }
-- After a second TERM/QUIT/INT, how long stopping may take before the process exits anyway.
local STUCK_EXIT_AFTER = 5

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

local function resolve_policy(path)
    if not file_exists(path) and file_exists(script_dir() .. "/" .. path) then
        path = script_dir() .. "/" .. path
    end
    if not file_exists(path) then
        return nil, "cannot read policy file '" .. path .. "'"
    end
    return path
end

-- Shared dicts declared in the config exist before any worker loads the policy. A reload
-- adds the new ones; a dict that exists keeps its contents and its size.
local function make_dicts(settings)
    for name, size in pairs(settings.dicts or {}) do
        if not rawget(luaproxy.shared, name) and not luaproxy.shared[name] then
            local dict, derr = luaproxy.shared.new(name, size)
            if not dict then
                return nil, "dict '" .. tostring(name) .. "': " .. derr
            end
        end
    end
    return true
end

-- What luaproxy.serve (and srv:reload) get from the settings: the policy, its config table
-- (every setting, with the backends in use) and the server settings.
local function server_opts(settings, policy, backends)
    local config = {}
    for k, v in pairs(settings) do config[k] = v end
    config.backends = backends
    local opts = { policy = policy, config = config }
    for _, k in ipairs(cli.SERVER_SETTINGS) do opts[k] = settings[k] end
    return opts
end

-- SIGHUP: read the command line's config file again and reload the policy in every worker.
-- A reload that fails leaves the old policy serving, and says why in one line.
local function reload(srv, first, backends)
    local settings, err = cli.parse(arg or {})
    local policy
    if settings then
        policy, err = resolve_policy(settings.policy)
    end
    if policy then
        for _, k in ipairs({ "listen", "workers", "metrics_listen" }) do
            if settings[k] ~= first[k] then
                luaproxy.log(luaproxy.WARN, "reload: '", k, "' changes only with a restart; keeping ",
                    tostring(first[k]))
            end
        end
        if settings.log_level then luaproxy.set_log_level(settings.log_level) end
        local ok, derr = make_dicts(settings)
        if ok then
            -- A bad setting value raises (as at start-up); it must not end this loop.
            local called, ok2, rerr = pcall(srv.reload, srv,
                server_opts(settings, policy, settings.backends or backends))
            if called and ok2 then
                luaproxy.log(luaproxy.NOTICE, "reloaded: policy ", policy)
                return true
            end
            err = called and rerr or tostring(ok2):match("^[^\n]*"):gsub("^srv:reload: ", "")
        else
            err = derr
        end
    end
    luaproxy.log(luaproxy.ERR, "reload failed, the old policy keeps serving: ", tostring(err))
    return false
end

-- metrics_listen: Prometheus's scrape endpoint, GET /metrics, on a listener of its own (so the
-- proxy's port never exposes it), served by this thread.
local function metrics_server(addr)
    return luaproxy.serve{ listen = addr, handler = function(req)
        if req:get_path() ~= "/metrics" then
            return 404, "not found\n", { ["content-type"] = "text/plain" }
        end
        local method = req:get_method()
        if method ~= "GET" and method ~= "HEAD" then
            return 405, "method not allowed\n", { ["content-type"] = "text/plain", allow = "GET, HEAD" }
        end
        return 200, luaproxy.metrics.render(), { ["content-type"] = luaproxy.metrics.content_type }
    end }
end

-- HUP reloads; USR1 reopens the access log (after logrotate moved it); TERM, QUIT and INT stop gracefully (no new connections, requests in flight
-- finish within shutdown_timeout, then exit 0); a second TERM, QUIT or INT stops at once
-- (exit 0), and if a worker cannot stop (stuck in code the budget cannot reach), exit 1 after
-- STUCK_EXIT_AFTER seconds.
local function handle_signals(sig, srv, settings, backends, state)
    local stopping = false
    while true do
        local name = sig:wait()
        if name == "HUP" then
            if not stopping then reload(srv, settings, backends) end
        elseif name == "USR1" then
            local ok, err = srv:reopen_logs()
            if ok then
                luaproxy.log(luaproxy.NOTICE, "SIGUSR1: access log reopened")
            else
                luaproxy.log(luaproxy.ERR, "SIGUSR1: cannot reopen the access log, still writing to the old file: ", err)
            end
        elseif not stopping then
            stopping = true
            luaproxy.log(luaproxy.NOTICE, "SIG", name, ": stopping; requests in flight may finish")
            srv:close()
        else
            luaproxy.log(luaproxy.NOTICE, "SIG", name, " again: stopping now")
            srv:close(0)
            -- A worker stuck where lua_budget cannot reach (a loop LuaJIT compiled, a long C
            -- call) never gets back to its loop to stop: do not wait for it forever.
            state.exit_timer = luaproxy.timer.at(STUCK_EXIT_AFTER, function()
                luaproxy.log(luaproxy.CRIT, "a worker did not stop within ", STUCK_EXIT_AFTER,
                    " s (stuck in Lua or C code): exiting without it")
                os.exit(1)
            end)
        end
    end
end

local function main(settings)
    if settings.log_level then luaproxy.set_log_level(settings.log_level) end
    -- Before any server starts: workers accept as soon as each is ready, before
    -- luaproxy.serve returns, and a TERM then must be kept for handle_signals, not end the
    -- process with the signal's default action.
    local sig = luaproxy.signal.listen("HUP", "TERM", "QUIT", "INT", "USR1")

    local policy, perr = resolve_policy(settings.policy)
    if not policy then
        return nil, perr
    end
    local ok, derr = make_dicts(settings)
    if not ok then
        return nil, derr
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

    local opts = server_opts(settings, policy, backends)
    opts.listen, opts.workers = settings.listen, settings.workers
    local srv, err = luaproxy.serve(opts)
    if not srv then
        for _, s in ipairs(demos) do s:close() end
        return nil, err
    end

    local metrics_addr
    if settings.metrics_listen then
        local msrv, merr = metrics_server(settings.metrics_listen)
        if not msrv then
            srv:close(0)
            srv:wait()
            for _, s in ipairs(demos) do s:close() end
            return nil, "metrics_listen: " .. merr
        end
        demos[#demos + 1] = msrv
        metrics_addr = msrv.addr
    end

    io.stdout:write("luaproxy listening on http://", srv.addr, "/ (policy ", policy, ", ",
        settings.workers or luaproxy.worker.cpus(), " workers) -> ", table.concat(backends, ", "), "\n")
    if metrics_addr then
        io.stdout:write("metrics at http://", metrics_addr, "/metrics\n")
    end
    if not settings.backends then
        io.stdout:write("try:  curl http://", srv.addr, "/    (run it twice: both demo backends answer)\n")
    end
    io.stdout:flush()
    local state = {}
    local signals = luaproxy.spawn(handle_signals, sig, srv, settings, backends, state)
    srv:wait()
    signals:kill()
    if state.exit_timer then state.exit_timer:cancel() end
    for _, s in ipairs(demos) do s:close() end
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
    -- One line here too: a failing init_worker's error comes with its traceback.
    io.stderr:write("luaproxy: ", (tostring(rerr):match("^[^\n]*")), "\n")
    os.exit(1)
end
