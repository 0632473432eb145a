-- luaproxy.cli: command-line and --config parsing for main.lua.
-- parse(argv) returns a settings table, or nil and a one-line error; it never exits.

local _M = { _VERSION = "0.1.0" }

local USAGE = [[
usage: lua main.lua [options]

  --listen ADDR     address to serve on (default 127.0.0.1:8080)
  --backend ADDR    upstream host:port; repeat for more (default: two demo
                    backends on 127.0.0.1:9001 and 127.0.0.1:9002)
  --workers N       worker threads, each with its own Lua VM (default: CPUs)
  --policy FILE     Lua policy file (default examples/least_conn.lua)
  --config FILE     Lua file returning a table of settings; options given on
                    the command line win
  --help            show this help
]]

_M.USAGE = USAGE

local DEFAULTS = {
    listen = "127.0.0.1:8080",
    policy = "examples/least_conn.lua",
}

-- Server settings, with nginx's names, as luaproxy.serve knows them (src/settings.rs): main.lua
-- passes them on, and luaproxy.serve checks their values (sizes as 1048576 or "1m", durations
-- as 30 or "30s") and names the key of a bad one.
local SERVER_SETTINGS = require("luaproxy").server_settings
_M.SERVER_SETTINGS = SERVER_SETTINGS

local IS_SERVER_SETTING = {}
for _, k in ipairs(SERVER_SETTINGS) do IS_SERVER_SETTING[k] = true end

-- The program's and the policies' settings, with the Lua type each must have.
local SETTING_TYPES = {
    listen = "string", backends = "table", workers = "number", policy = "string",
    api_key_header = "string", log_level = "string", demo_ports = "table", dicts = "table",
    metrics_listen = "string",
    -- examples/api_router.lua's and examples/router_tier.lua's (their contents are checked
    -- by luaproxy.health and luaproxy.ratelimit when the policy starts)
    health_check = "table", rate_limit = "table", max_fails = "number", fail_timeout = "number",
    -- examples/follow_redirects.lua's (checked by luaproxy.redirect when the policy starts)
    max_redirects = "number", redirect_hosts = "table",
    -- examples/timeline_cache.lua's (their values are checked when the policy starts)
    timeline_fields = "table", timeline_path = "string", timeline_ttl = "number",
    timeline_timeout = "number", timeline_stale = "number", timeline_neg_ttl = "number",
    timeline_cache_size = "string", timeline_lru_size = "number",
}

local function load_config(path)
    local chunk, err = loadfile(path, "t", {})
    if not chunk then
        if err:find("No such file", 1, true) or err:find("cannot open", 1, true) then
            return nil, "cannot read config file '" .. path .. "'"
        end
        return nil, "config file " .. err
    end
    local ok, conf = pcall(chunk)
    if not ok then
        return nil, "config file " .. tostring(conf)
    end
    if type(conf) ~= "table" then
        return nil, "config file '" .. path .. "' must return a table"
    end
    for k, v in pairs(conf) do
        local want = SETTING_TYPES[k]
        if IS_SERVER_SETTING[k] then
            local t = type(v)
            if t ~= "number" and t ~= "string" and t ~= "boolean" and t ~= "table" then
                return nil, "config file '" .. path .. "': setting '" .. k .. "' has a bad value (a " .. t .. ")"
            end
        elseif not want then
            return nil, "config file '" .. path .. "': unknown setting '" .. tostring(k) .. "'"
        elseif type(v) ~= want then
            return nil, "config file '" .. path .. "': setting '" .. k .. "' must be a " .. want
        end
    end
    return conf
end

local function is_int(s)
    return s and s:match("^%d+$") ~= nil
end

--- settings, err, code = cli.parse(argv)
-- `settings.help` is true when --help was given. `err` is one line, fit for stderr; `code` is
-- the exit status it deserves: 2 for a usage mistake, 1 for a config file that cannot be used.
function _M.parse(argv)
    local cli = { backends = {} }
    local config_path
    local i = 1
    while i <= #argv do
        local a = argv[i]
        local name, inline = a:match("^(%-%-[%w-]+)=(.*)$")
        name = name or a
        local function value()
            if inline then return inline end
            i = i + 1
            return argv[i]
        end
        if name == "--help" or name == "-h" then
            return { help = true }
        elseif name == "--listen" then
            cli.listen = value()
            if not cli.listen then return nil, "--listen needs an address" end
        elseif name == "--backend" then
            local b = value()
            if not b then return nil, "--backend needs host:port" end
            cli.backends[#cli.backends + 1] = b
        elseif name == "--workers" then
            local n = value()
            if not is_int(n) or tonumber(n) < 1 or tonumber(n) > 1024 then
                return nil, "--workers needs a number from 1 to 1024"
            end
            cli.workers = tonumber(n)
        elseif name == "--policy" then
            cli.policy = value()
            if not cli.policy then return nil, "--policy needs a file" end
        elseif name == "--config" then
            config_path = value()
            if not config_path then return nil, "--config needs a file" end
        else
            return nil, "unknown option '" .. a .. "' (try --help)"
        end
        i = i + 1
    end

    local settings = {}
    if config_path then
        local conf, err = load_config(config_path)
        if not conf then return nil, err, 1 end
        for k, v in pairs(conf) do settings[k] = v end
    end
    for k, v in pairs(cli) do
        if k ~= "backends" or #v > 0 then settings[k] = v end
    end
    for k, v in pairs(DEFAULTS) do
        if settings[k] == nil then settings[k] = v end
    end
    if settings.backends then
        for _, b in ipairs(settings.backends) do
            if type(b) ~= "string" or not b:match("^[%w%.%-]+:%d+$") and not b:match("^%[[%x:%.]+%]:%d+$") then
                return nil, "bad backend address '" .. tostring(b) .. "' (expected host:port)", config_path and 1 or 2
            end
        end
        if #settings.backends == 0 then settings.backends = nil end
    end
    return settings
end

--- obj = cli.make(policy, what, new, opts): new(opts) for a policy's init_worker, or an error
-- naming the config setting(s) `what` behind a bad option ("api_router: bad backends: ...")
-- and no traceback, so main.lua's one-line start-up error says what to fix
function _M.make(policy, what, new, opts)
    local ok, obj, err = pcall(new, opts)
    if not ok then
        error(policy .. ": bad " .. what .. ": " .. tostring(obj):gsub("^[^:]*:%d+: ", ""), 0)
    end
    if not obj then error(policy .. ": " .. tostring(err), 0) end
    return obj
end

return _M
