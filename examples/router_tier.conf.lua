-- A --config for examples/router_tier.lua (the routers from --backend, or `backends` here):
--   lua main.lua --policy examples/router_tier.lua --config examples/router_tier.conf.lua \
--       --backend 127.0.0.1:8081 --backend 127.0.0.1:8082
return {
    -- backends = { "10.0.0.1:8080", "10.0.0.2:8080" },
    -- A router answers a request without an API key itself (400): a probe of the router
    -- alone, whichever host the tier runs on.
    health_check = { path = "/", interval = 2, timeout = 1, fall = 2, rise = 2,
                     valid_statuses = { 400 } },
    max_fails = 1, fail_timeout = 10,         -- passive checks (nginx's defaults)
}
