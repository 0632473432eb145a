-- Settings for bench/timeline.sh: examples/timeline_cache.lua in front of the benchmark's two
-- nginx backends (127.0.0.1:9121/9122), the example's defaults (id, text, created_at; 300 s).
return {
    listen = "127.0.0.1:8120",
    backends = { "127.0.0.1:9121", "127.0.0.1:9122" },
    policy = "examples/timeline_cache.lua",
    workers = 2,
    -- as the peer is configured (keepalive_requests 1000000): wrk's connections are never
    -- recycled in the middle of a run
    keepalive_requests = 1000000,
    log_level = "warn",
}
