-- A --config for examples/api_router.lua:
--   lua main.lua --policy examples/api_router.lua --config examples/api_router.conf.lua
-- (without backends here or --backend, main.lua starts its two demo backends)
return {
    -- backends = { "127.0.0.1:3000", "127.0.0.1:3001" },
    health_check = { path = "/health", interval = 2, timeout = 1, fall = 3, rise = 2,
                     valid_statuses = { 200, 302 } },
    max_fails = 1, fail_timeout = 10,         -- passive checks (nginx's defaults)
    rate_limit = { rate = 5, burst = 10 },    -- per API key, per second
    dicts = { api_usage = "10m" },            -- the per-key counters
    access_log = "stdout",                    -- or a file (SIGUSR1 reopens it), or "off"
    log_format = "router",                    -- client, API key, request, status, backend, times
    metrics_listen = "127.0.0.1:9145",        -- Prometheus: GET /metrics there
}
