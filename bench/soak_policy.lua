-- bench/soak_policy.lua: the policy bench/soak runs (see the header of bench/soak).
--
--   /soak/loaded  -> 200 "<worker> <stamp>": when this worker last loaded the policy (the
--                    soak checks that the stamp changes after each SIGHUP)
--   /hostile...   -> proxied to the hostile upstream ($SOAK_HOSTILE), 1 s timeouts; its
--                    failures give 502/504, or a truncated body once the head was sent
--   /spin         -> `while true do end`: aborted by lua_budget (500), never ends without it
--   /alloc        -> allocates without bound: aborted by lua_memory_limit (500)
--   /error        -> raises a Lua error (500, logged with its traceback)
--   /read         -> reads the request body and answers its length
--   anything else -> least connection over the good backends (luaproxy.balancer, as in
--                    examples/least_conn.lua); 502/503/504 when that fails
--
-- Settings it reads: backends (the good ones). The hostile upstream comes from the environment
-- (SOAK_HOSTILE=host:port), as --config accepts no keys of a policy's own.

local luaproxy = require "luaproxy"
local balancer = require "luaproxy.balancer"

-- One stamp per load of this file in a worker: a reload gives a new one.
local LOADED = string.format("%.6f", luaproxy.now())
local HOSTILE = os.getenv("SOAK_HOSTILE")
local HOSTILE_OPTS = { connect_timeout = 1, send_timeout = 1, read_timeout = 1 }

local _M = {}

local bal

function _M.init_worker(config)
    local err
    bal, err = balancer.new{ backends = config.backends }
    if not bal then
        error("soak_policy: " .. err)
    end
end

local function spin()
    while true do end
end

local function alloc()
    local t = {}
    -- 1 MiB at a time: at the cap (32m in the soak) before lua_budget (200 ms) runs out.
    while true do t[#t + 1] = string.rep("x", 1024 * 1024) end
end

function _M.handler(req)
    local path = req:get_path()
    if path == "/soak/loaded" then
        return 200, tostring(luaproxy.worker.id()) .. " " .. LOADED .. "\n"
    elseif path:sub(1, 8) == "/hostile" then
        if not HOSTILE then
            return 500, "SOAK_HOSTILE not set\n"
        end
        local res, err = req:proxy(HOSTILE, HOSTILE_OPTS)
        if not res then
            return balancer.error_status(err)
        end
        return res
    elseif path == "/spin" then
        spin()
    elseif path == "/alloc" then
        alloc()
    elseif path == "/error" then
        error("soak: deliberate error from /error")
    elseif path == "/read" then
        local body, err = req:read_body()
        if not body then
            -- luaproxy answers the body's own error (413/408/400) whatever is returned here
            return 400, "read_body: " .. tostring(err) .. "\n"
        end
        return 200, tostring(#body) .. "\n"
    end

    local backend, err = bal:take(req)
    if not backend then
        luaproxy.log(luaproxy.ERR, "soak: no backend: ", err)
        return balancer.error_status(err)
    end
    local res
    res, err = req:proxy(backend)
    if not res then
        return balancer.error_status(err)
    end
    return res
end

return _M
