-- Settings for the peer benchmark with the API router (bench/peers.sh with ROUTER=1): the same
-- backends and workload as bench/luaproxy.conf.lua, through examples/api_router.lua with what
-- an operator runs it with: its access log (router format, to a file) and the metrics endpoint.
return {
    listen = "127.0.0.1:8090",
    policy = "examples/api_router.lua",
    backends = { "127.0.0.1:9101", "127.0.0.1:9102" },
    api_key_header = "X-Api-Key",
    workers = 2,
    keepalive_requests = 1000000,
    log_level = "warn",
    access_log = "/tmp/luaproxy-bench-access.log",
    log_format = "router",
    metrics_listen = "127.0.0.1:9146",
}
