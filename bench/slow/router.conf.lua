-- luaproxy with the API router (examples/api_router.lua) for bench/slow.sh, as
-- bench/router.conf.lua runs it (access log in router format, metrics endpoint), pointed at
-- the slow bench's backends (9201 fast, 9202 slow).
return {
    listen = "127.0.0.1:8192",
    policy = "examples/api_router.lua",
    backends = { "127.0.0.1:9201", "127.0.0.1:9202" },
    api_key_header = "X-Api-Key",
    workers = 2,
    keepalive_requests = 1000000,
    log_level = "warn",
    access_log = "/tmp/luaproxy-slow-bench-access.log",
    log_format = "router",
    metrics_listen = "127.0.0.1:9247",
}
