-- redirect_backends.lua: two demo backends that answer with redirects, to try
-- examples/follow_redirects.lua against (the README's tour does).
--
--   /old            301 -> /new
--   /login (POST)   303 -> /home         (post/redirect/get)
--   /upload (POST)  307 -> /store        (the body goes along)
--   /other          302 -> the other backend's /new, absolute
--   /away           302 -> http://example.com/ (not a backend: the client gets the 302)
--   /loop           302 -> /loop2, which redirects back to /loop
--   anything else   200 "<backend> got <METHOD> <uri> (<n> body bytes)"
--
-- Run:  lua examples/redirect_backends.lua      (127.0.0.1:9001 and 127.0.0.1:9002; Ctrl-C stops)

local luaproxy = require "luaproxy"

local PORTS = { 9001, 9002 }

local function backend(me, other)
    local routes = {
        ["/old"] = { 301, "/new" },
        ["/login"] = { 303, "/home" },
        ["/upload"] = { 307, "/store" },
        ["/other"] = { 302, "http://" .. other .. "/new" },
        ["/away"] = { 302, "http://example.com/" },
        ["/loop"] = { 302, "/loop2" },
        ["/loop2"] = { 302, "/loop" },
    }
    return function(req)
        local body = req:read_body() or ""
        local r = routes[req:get_path()]
        if r then
            return r[1], "see " .. r[2] .. "\n", { location = r[2] }
        end
        return 200, ("%s got %s %s (%d body bytes)\n"):format(me, req:get_method(), req:get_uri(), #body)
    end
end

luaproxy.run(function()
    local addrs = { "127.0.0.1:" .. PORTS[1], "127.0.0.1:" .. PORTS[2] }
    local servers = {}
    for i, addr in ipairs(addrs) do
        servers[i] = assert(luaproxy.serve{ listen = addr, handler = backend(addr, addrs[3 - i]) })
        print("redirecting demo backend on http://" .. servers[i].addr .. "/")
    end
    io.stdout:flush()
    for _, srv in ipairs(servers) do srv:wait() end
end)
