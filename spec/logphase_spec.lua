-- The log phase: a policy's log(info, ctx) runs once for every request, however it ended
-- (response sent, handler error, upstream refused, client gone, head rejected), with nginx's
-- variable names in `info`. Policy workers run on their own threads, so the spec's loop
-- (and the upstream it serves) keeps running while they log; what they log goes into a
-- shared dict the spec reads.
local luaproxy = require "luaproxy"
local util = require "support.util"

local POLICY = [[
local luaproxy = require "luaproxy"
local config = ...
local UP, CLOSED = config.up, config.closed
local seen = luaproxy.shared.logphase
local _M = {}
function _M.init_worker()
    if config.timer_error then
        luaproxy.timer.at(0, function() error("timer boom") end)
    end
end
function _M.handler(req)
    local path = req:get_path()
    local ctx = req:ctx()
    ctx.tag = path
    if path == "/plain" or path == "/logerr" then
        req:read_body()
        return 200, "hi\n"
    elseif path == "/proxy" or path == "/slow" then
        return req:proxy(UP)
    elseif path == "/refused" then
        local _, err = req:proxy(CLOSED)
        return 502, err
    elseif path == "/error" then
        error("boom")
    elseif path == "/async" then
        return 200, "async\n"
    end
    return 404, "no\n"
end
function _M.log(info, ctx)
    if ctx.tag == "/logerr" then error("log phase boom") end
    if ctx.tag == "/async" then luaproxy.sleep(0.05) end
    info.ctx_tag = ctx.tag
    seen:set(info.request_uri ~= "" and info.request_uri or "rejected", info)
    seen:incr("calls", 1, 0)
end
return _M
]]

local function policy_server(up, closed, timer_error)
    local path = util.write_temp("logphase_policy.lua", POLICY)
    return assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = path, workers = 2,
        config = { up = up, closed = closed, timer_error = timer_error } })
end

local function errors(phase)
    return tonumber(luaproxy.metrics.render():match('luaproxy_lua_errors_total{phase="' .. phase .. '"} (%d+)') or 0)
end

describe("the log phase", function()
    local seen = luaproxy.shared.logphase or assert(luaproxy.shared.new("logphase", "1m"))
    before_each(function() seen:flush_all() end)

    it("gets nginx's variables for a response, a proxied one, an error, a refusal and an abort", function()
        util.run(function()
            local up = util.serve_handler(function(req)
                if req:get_path() == "/slow" then luaproxy.sleep(3) end
                luaproxy.sleep(0.05)
                return 200, string.rep("u", 1000)
            end)
            local closed = util.free_port()
            local srv = policy_server(up.addr, "127.0.0.1:" .. closed)
            local base = "http://" .. srv.addr

            assert.are.equal(200, (util.get(base .. "/proxy")))
            assert.are.equal(502, (util.get(base .. "/refused")))
            assert.are.equal(500, (util.get(base .. "/error")))
            -- the client gives up while the upstream still thinks: nginx's 499
            assert.is_nil(util.get(base .. "/slow", { read_timeout = 0.3 }))
            assert.is_true(util.wait_for(function() return seen:get("calls") == 4 end, 5))

            local p = seen:get("/proxy")
            assert.are.equal(200, p.status)
            assert.are.equal("GET /proxy HTTP/1.1", p.request)
            assert.are.equal("GET", p.request_method)
            assert.are.equal("/proxy", p.uri)
            assert.are.equal("HTTP/1.1", p.server_protocol)
            assert.are.equal("127.0.0.1", p.remote_addr)
            assert.are.equal(1000, p.body_bytes_sent)
            assert.is_true(p.bytes_sent > 1000)
            assert.is_true(p.request_length > 20)
            assert.is_true(p.request_time >= 0.05)
            assert.are.equal(up.addr, p.upstream_addr)
            assert.are.equal(200, p.upstream_status)
            assert.is_true(p.upstream_connect_time <= p.upstream_header_time)
            assert.is_true(p.upstream_header_time >= 0.05)
            assert.is_true(p.upstream_header_time <= p.upstream_response_time)
            assert.is_true(p.upstream_response_time <= p.request_time)
            assert.are.equal(1, #p.upstreams)
            assert.are.equal(up.addr, p.upstreams[1].addr)
            assert.matches("^%x+$", p.request_id)
            assert.are.equal(32, #p.request_id)
            assert.are.equal("/proxy", p.ctx_tag)

            local r = seen:get("/refused")
            assert.are.equal(502, r.status)
            assert.are.equal("127.0.0.1:" .. closed, r.upstream_addr)
            assert.is_nil(r.upstream_status)
            assert.is_nil(r.upstream_header_time)
            assert.are.equal("number", type(r.upstream_response_time))

            local e = seen:get("/error")
            assert.are.equal(500, e.status)
            assert.is_nil(e.upstream_addr)
            assert.are.equal("/error", e.ctx_tag)

            local s = seen:get("/slow")
            assert.are.equal(499, s.status)
            assert.are.equal(0, s.body_bytes_sent)
            assert.are.equal(up.addr, s.upstream_addr)
            assert.is_nil(s.upstream_status)
            assert.is_true(s.upstream_response_time >= 0.2)
            util.shut(srv)
            util.shut(up)
        end, 20)
    end)

    it("counts request bytes exactly, runs for rejected heads, may wait, and survives its own errors", function()
        util.run(function()
            local timer_errors = errors("timer")
            local srv = policy_server("127.0.0.1:9", "127.0.0.1:9", true)
            local port = srv.port
            local head = "POST /plain HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\n"
            local out = util.raw(port, head:gsub("\r\n", "\\r\\n") .. "abcdef")
            assert.matches("^HTTP/1.1 200", out)
            assert.matches("^HTTP/1.1 400", util.raw(port, "GARBAGE\\r\\n\\r\\n"))
            assert.matches("^HTTP/1.1 200", util.raw(port, "GET /async HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n"))
            local before = errors("log")
            assert.matches("^HTTP/1.1 200", util.raw(port, "GET /logerr HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n"))
            assert.is_true(util.wait_for(function() return seen:get("calls") == 3 end, 5))

            local p = seen:get("/plain")
            assert.are.equal(#head + 6, p.request_length)
            assert.are.equal(3, p.body_bytes_sent)
            assert.are.equal("POST /plain HTTP/1.1", p.request)

            local bad = seen:get("rejected")
            assert.are.equal(400, bad.status)
            assert.are.equal("", bad.request)
            -- what had arrived when the line was refused: the line at least, the blank line maybe
            assert.is_true(bad.request_length >= #"GARBAGE\r\n" and bad.request_length <= #"GARBAGE\r\n\r\n")
            assert.is_nil(bad.ctx_tag)
            assert.is_nil(bad.upstream_addr)

            -- the log phase slept before it wrote: it went on after the response
            assert.are.equal(200, seen:get("/async").status)

            assert.is_true(util.wait_for(function() return errors("log") == before + 1 end, 5))
            -- each worker's init_worker timer failed once
            assert.are.equal(timer_errors + 2, errors("timer"))
            util.shut(srv)
        end, 20)
    end)

    it("access log: $ctx_NAME prints strings, numbers as Lua prints them, booleans, and - for the rest", function()
        util.run(function()
            local dir = util.write_temp("x", ""):match("^(.*)/")
            local path = util.write_temp("ctx_policy.lua", [[
                return { handler = function(req)
                    local ctx = req:ctx()
                    ctx.s, ctx.i, ctx.f, ctx.b, ctx.t = "a \"b\"", 42, 0.5, true, {}
                    if req:get_path() == "/big" then ctx.i, ctx.f = -7, 1e100 end
                    return 200, "ok"
                end }
            ]])
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = path, workers = 1,
                access_log = dir .. "/ctx.log", log_format = "$ctx_s|$ctx_i|$ctx_f|$ctx_b|$ctx_t|$ctx_none|$status" })
            assert.are.equal(200, (util.get("http://" .. srv.addr .. "/")))
            assert.are.equal(200, (util.get("http://" .. srv.addr .. "/big")))
            util.shut(srv) -- the buffered lines are written when the worker goes
            assert.are.equal('a \\x22b\\x22|42|0.5|true|-|-|200\na \\x22b\\x22|-7|1e+100|true|-|-|200\n',
                util.read_file(dir .. "/ctx.log"))
        end, 20)
    end)
end)
