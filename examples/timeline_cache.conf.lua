-- A --config for examples/timeline_cache.lua:
--   lua main.lua --policy examples/timeline_cache.lua --config examples/timeline_cache.conf.lua
-- (the backends must serve GET /timeline/<user> as a JSON array: the demo backends do not)
return {
    backends = { "127.0.0.1:9001" },
    timeline_fields = { "id", "text", "created_at", "user.screen_name" },
    timeline_path = "/timeline/{user}",   -- e.g. "/1.1/statuses/user_timeline.json?screen_name={user}"
    timeline_ttl = 300,                   -- seconds served from the cache
    timeline_timeout = 10,                -- upstream connect/send/read
    timeline_stale = 86400,               -- serve a copy this old past expiry when the upstream fails
    timeline_neg_ttl = 5,                 -- after a failed refresh, serve the stale copy this long
    timeline_cache_size = "64m",
}
