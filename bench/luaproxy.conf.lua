-- Settings for the peer benchmark: the seed workload (least connection over the harness's two
-- nginx backends, X-Api-Key required else 400). Used by bench/peers.sh.
return {
    listen = "127.0.0.1:8090",
    backends = { "127.0.0.1:9101", "127.0.0.1:9102" },
    api_key_header = "X-Api-Key",
    workers = 2,
    -- as the harness configures the peers (keepalive_requests 1000000): wrk's connections are
    -- never recycled in the middle of a run
    keepalive_requests = 1000000,
    log_level = "warn",
}
