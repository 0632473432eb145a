-- bench/timeline.sh's second luaproxy: examples/timeline_cache.lua without its per-worker
-- table (timeline_lru_size = 0), so every hit is a copy out of the shared cache, as the
-- nginx peer's lua_shared_dict-only server does.
return {
    listen = "127.0.0.1:8123",
    backends = { "127.0.0.1:9121", "127.0.0.1:9122" },
    policy = "examples/timeline_cache.lua",
    workers = 2,
    timeline_lru_size = 0,
    keepalive_requests = 1000000,
    log_level = "warn",
}
