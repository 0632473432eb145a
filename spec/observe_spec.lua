-- The router as an operator watches it: `lua main.lua` with examples/api_router.lua, its access
-- log in the router's format (reopened on SIGUSR1, as logrotate needs) and the Prometheus
-- endpoint on metrics_listen, read with a real Prometheus text parser (Python's
-- prometheus_client).
local luaproxy = require "luaproxy"
local util = require "support.util"

-- "name{label="v",...} value" per sample, as prometheus_client parses the text
local PYTHON = util.python_with("prometheus_client.parser")

local function parse_metrics(text)
    assert(PYTHON, "no python3 with prometheus_client (apt-get install python3-prometheus-client)")
    local path = util.write_temp("metrics.txt", text)
    local out, code = util.sh("timeout 20 " .. PYTHON .. " -c '" .. [[
import sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        print("%s %s{%s} %r" % (fam.type, s.name, labels, s.value))
]] .. "' " .. path)
    assert.are.equal(0, code, out)
    local samples = {}
    for kind, name, value in out:gmatch("(%S+) (%S+) (%S+)\n") do
        samples[name] = { kind = kind, value = tonumber(value) }
    end
    return samples
end

local LINE = '^(%S+) "([^"]*)" %[([^%]]+)%] "([^"]*)" (%d+) (%d+) (%d+) (%S+) ([%d.]+) (%S+)$'

local function lines(path)
    local t = {}
    for l in (util.read_file(path) or ""):gmatch("[^\n]+") do t[#t + 1] = l end
    return t
end

describe("the router's access log and metrics", function()
    it("logs each request in the router's format, reopens on SIGUSR1, and serves parseable metrics", function()
        util.run(function()
            local function backend(req)
                return 200, "backend " .. req:get_path() .. "\n"
            end
            local a, b = util.serve_handler(backend), util.serve_handler(backend)
            local port, mport = util.free_port(), util.free_port()
            local dir = util.write_temp("x", ""):match("^(.*)/")
            local access = dir .. "/access.log"
            local conf = util.write_temp("observe.conf.lua", ([[
                return { backends = { %q, %q }, workers = 2, access_log = %q, log_format = "router",
                         metrics_listen = "127.0.0.1:%d",
                         health_check = { path = "/health", interval = 1, timeout = 1 } }
            ]]):format(a.addr, b.addr, access, mport))
            local p = util.main(("--policy examples/api_router.lua --listen 127.0.0.1:%d --config %s")
                :format(port, conf), 40)
            local base = "http://127.0.0.1:" .. port
            assert.is_true(util.wait_for(function() return util.get(base .. "/admin/backends/") == 200 end, 10),
                p:log())

            for i = 1, 3 do
                assert.are.equal(200, (util.get(base .. "/q" .. i .. "?apiKey=key-" .. i)))
            end
            assert.are.equal(200, (util.get(base .. "/h", { headers = { ["X-Api-Key"] = "hdr key" } })))
            assert.are.equal(400, (util.get(base .. "/none")))
            assert.is_true(util.wait_for(function() return #lines(access) >= 6 end, 5), p:log())

            local byuri = {}
            for _, l in ipairs(lines(access)) do
                local addr, key, time, request, rlen, status, sent, up, rtime, urtime = l:match(LINE)
                assert.is_not_nil(addr, "not a router line: " .. l)
                assert.are.equal("127.0.0.1", addr)
                assert.matches("^%d%d/%a%a%a/%d%d%d%d:%d%d:%d%d:%d%d %+0000$", time)
                assert.is_true(tonumber(rlen) > 20 and tonumber(sent) > 20)
                assert.matches("^%d+%.%d%d%d$", rtime)
                byuri[request:match("^%S+ (%S+)")] = { key = key, status = tonumber(status), up = up, urtime = urtime }
            end
            for i = 1, 3 do
                local e = byuri["/q" .. i .. "?apiKey=key-" .. i]
                assert.are.equal("key-" .. i, e.key)
                assert.are.equal(200, e.status)
                assert.is_true(e.up == a.addr or e.up == b.addr)
                assert.matches("^%d+%.%d%d%d$", e.urtime)
            end
            assert.are.equal("hdr key", byuri["/h"].key)
            assert.are.same({ key = "-", status = 400, up = "-", urtime = "-" }, byuri["/none"])

            -- logrotate: move the file, SIGUSR1, and the next lines go to a new file
            assert.is_true(os.rename(access, access .. ".1"))
            p:signal("USR1")
            assert.is_true(util.wait_for(function() return p:log():find("access log reopened", 1, true) end, 5))
            assert.are.equal(200, (util.get(base .. "/after?apiKey=rotated")))
            assert.is_true(util.wait_for(function() return #lines(access) == 1 end, 5))
            assert.matches('"rotated"', lines(access)[1])
            assert.is_true(#lines(access .. ".1") >= 6)

            -- metrics, parsed by prometheus_client
            local mbase = "http://127.0.0.1:" .. mport
            assert.is_true(util.wait_for(function()
                local _, text = util.get(mbase .. "/metrics")
                return text and text:find("luaproxy_upstream_up", 1, true)
            end, 5))
            local status, text, res = util.get(mbase .. "/metrics")
            assert.are.equal(200, status)
            assert.are.equal(luaproxy.metrics.content_type, res.headers["content-type"])
            local m = parse_metrics(text)
            local function v(name) return m[name] and m[name].value or 0 end
            local ok = v('luaproxy_http_requests_total{status=200,upstream=' .. a.addr .. '}')
                + v('luaproxy_http_requests_total{status=200,upstream=' .. b.addr .. '}')
            assert.is_true(ok >= 4)
            assert.are.equal(1, v("luaproxy_http_requests_total{status=400,upstream=}"))
            assert.are.equal("counter", m["luaproxy_http_requests_total{status=400,upstream=}"].kind)
            local timed = v('luaproxy_upstream_response_time_seconds_count{upstream=' .. a.addr .. '}')
                + v('luaproxy_upstream_response_time_seconds_count{upstream=' .. b.addr .. '}')
            assert.are.equal(ok, timed)
            assert.are.equal("histogram", m['luaproxy_upstream_response_time_seconds_count{upstream=' .. a.addr .. '}'].kind)
            -- in flight while it rendered: the scrape itself
            assert.are.equal(1, m["luaproxy_http_requests_in_flight{}"].value)
            assert.is_true(m["luaproxy_http_connections{}"].value >= 0)
            assert.are.equal(1, v("luaproxy_upstream_up{upstream=" .. a.addr .. "}"))
            assert.are.equal(1, v("luaproxy_upstream_up{upstream=" .. b.addr .. "}"))
            assert.is_true(v("luaproxy_shared_dict_bytes{dict=api_usage,kind=capacity}") > 0)
            assert.is_true(v("luaproxy_shared_dict_bytes{dict=api_usage,kind=used}") > 0)
            -- the scrape port serves nothing else, and the proxy's port does not serve metrics
            assert.are.equal(404, (util.get(mbase .. "/")))
            assert.are.equal(400, (util.get(base .. "/metrics")))

            -- a backend gone: probes take it down, and the gauge says so
            util.shut(b)
            assert.is_true(util.wait_for(function()
                local _, t = util.get(mbase .. "/metrics")
                return t and t:find('luaproxy_upstream_up{upstream="' .. b.addr .. '"} 0', 1, true)
            end, 10))

            p:signal("TERM")
            assert.are.equal(0, p:wait_exit(10))
            util.shut(a)
        end, 40)
    end)
end)
