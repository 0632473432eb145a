-- luaproxy for bench/slow.sh (issue #16, slow backends): least connection (the default policy,
-- examples/least_conn.lua) over the slow bench's backends, 9201 fast and 9202 slow, X-Api-Key
-- required else 400. The LuaJIT build runs it too, with --listen 127.0.0.1:8193.
-- max_connections (10000 by default) already lets the 2000 clients in; the upstream pool's
-- `upstream_keepalive` (64) caps only idle connections kept, not connections open, so nothing
-- queues behind the slow backend.
return {
    listen = "127.0.0.1:8191",
    backends = { "127.0.0.1:9201", "127.0.0.1:9202" },
    api_key_header = "X-Api-Key",
    workers = 2,
    keepalive_requests = 1000000,
    log_level = "warn",
}
