-- Settings for bench/idle.sh (issue #16, idle keep-alive connections): bench/luaproxy.conf.lua's
-- seed workload, with room for the benchmark's 10,000 idle clients (max_connections' default is
-- exactly 10,000, and the warm-up's connections may not be closed yet) and an idle timeout well
-- above the hold time.
return {
    listen = "127.0.0.1:8190",
    backends = { "127.0.0.1:9101", "127.0.0.1:9102" },
    api_key_header = "X-Api-Key",
    workers = 2,
    keepalive_requests = 1000000,
    keepalive_timeout = "300s",
    max_connections = 50000,
    log_level = "warn",
}
