-- luaproxy.metrics: counters, gauges and histograms registered by both worker VMs of a policy
-- server and updated by their handlers, read back through a real Prometheus text parser
-- (Python's prometheus_client, Debian's python3-prometheus-client) with exact sums; and the
-- misuse that raises.
local luaproxy = require "luaproxy"
local util = require "support.util"
local json = luaproxy.json
local metrics = luaproxy.metrics

-- Parses `text` with prometheus_client.parser; returns { [family] = { type = ..., samples =
-- { { name, labels, value }, ... } } }.
local PARSER = util.write_temp("parse_metrics.py", [[
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1], encoding="utf-8").read()):
    out[fam.name] = {"type": fam.type, "documentation": fam.documentation,
                     "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
print(json.dumps(out))
]])

-- `fn` must raise an error whose message holds `text`.
local function raises(text, fn)
    local ok, err = pcall(fn)
    assert.is_false(ok, "no error (wanted '" .. text .. "')")
    assert.matches(text, tostring(err), 1, true)
end

local PYTHON = util.python_with("prometheus_client.parser")

local function parse(text)
    assert(PYTHON, "no python3 with prometheus_client (apt-get install python3-prometheus-client)")
    local file = util.write_temp("metrics.txt", text)
    local out, code = util.sh("timeout 20 " .. PYTHON .. " " .. PARSER .. " " .. file)
    assert(code == 0, "prometheus_client could not parse the exposition:\n" .. out)
    return assert(json.decode(out))
end

-- The value of the sample `name` whose labels are exactly `labels` (nil if none).
local function value(fams, family, name, labels)
    local fam = fams[family]
    if not fam then return nil end
    for _, s in ipairs(fam.samples) do
        if s[1] == name then
            local same = true
            for k, v in pairs(labels or {}) do
                if s[2][k] ~= v then same = false end
            end
            for k in pairs(s[2]) do
                if (labels or {})[k] == nil then same = false end
            end
            if same then return s[3] end
        end
    end
    return nil
end

local POLICY = util.write_temp("metrics_policy.lua", [[
    local luaproxy = require "luaproxy"
    local m = luaproxy.metrics
    local requests, plain, latency, level, weird
    return {
        init_worker = function()
            -- every worker registers the same metrics: the second gets the first's
            requests = m.counter("spec_mx_requests_total", "Requests by status and worker.", { "status", "worker" })
            plain = m.counter("spec_mx_plain_total", "No labels.")
            latency = m.histogram("spec_mx_latency_seconds", "Latency.", { "route" }, { 0.25, 1, 2 })
            level = m.gauge("spec_mx_level", "A gauge per worker.", { "worker" })
            weird = m.counter("spec_mx_weird_total", "Escapes: back\\slash\nnewline.", { "v" })
            level:set(100, { tostring(luaproxy.worker.id()) })
        end,
        handler = function(req)
            local worker = tostring(luaproxy.worker.id())
            local status = req:get_header("x-status") or "200"
            requests:inc(1, { status, worker })
            plain:inc()
            plain:inc(0.5)
            latency:observe(tonumber(req:get_header("x-latency")), { req:get_path() })
            level:inc(-1, { worker })
            weird:inc(1, { 'a"b\\c\nd' })
            return 200, worker, { ["x-worker"] = worker }
        end,
    }
]])

describe("luaproxy.metrics", function()
    it("is shared by the worker VMs of a policy server and parses with prometheus_client, sums exact", function()
        local N, served = 120, {}
        local LAT = { 0.125, 0.25, 0.5, 1.5, 4 }  -- exact in binary: the sum is exact too
        local sent_status, sent_lat, lat_sum = {}, {}, { ["/a"] = 0, ["/b"] = 0 }
        util.run(function()
            local srv = assert(luaproxy.serve{ listen = "127.0.0.1:0", policy = POLICY, workers = 2 })
            local tasks = {}
            for i = 1, N do
                local status = (i % 3 == 0) and "503" or "200"
                local path = (i % 2 == 0) and "/a" or "/b"
                local lat = LAT[i % #LAT + 1]
                sent_status[status] = (sent_status[status] or 0) + 1
                sent_lat[path] = sent_lat[path] or {}
                sent_lat[path][#sent_lat[path] + 1] = lat
                lat_sum[path] = lat_sum[path] + lat
                tasks[i] = luaproxy.spawn(util.get, "http://" .. srv.addr .. path,
                    { headers = { ["x-status"] = status, ["x-latency"] = tostring(lat) } })
            end
            for _, t in ipairs(tasks) do
                local ok, status, _, res = t:wait()
                assert.is_true(ok)
                assert.are.equal(200, status)
                served[res.headers["x-worker"]] = (served[res.headers["x-worker"]] or 0) + 1
            end
            srv:close()
            srv:wait()
        end, 30)
        assert.is_truthy(served["0"] and served["1"], "both workers should have served")

        local text = metrics.render()
        local fams = parse(text)

        -- requests by status and worker
        local fam = assert(fams.spec_mx_requests, "counter family missing:\n" .. text)
        assert.are.equal("counter", fam.type)
        assert.are.equal("Requests by status and worker.", fam.documentation)
        local by_status, by_worker = {}, {}
        for _, s in ipairs(fam.samples) do
            assert.are.equal("spec_mx_requests_total", s[1])
            by_status[s[2].status] = (by_status[s[2].status] or 0) + s[3]
            by_worker[s[2].worker] = (by_worker[s[2].worker] or 0) + s[3]
        end
        assert.are.same(sent_status, by_status)
        assert.are.equal(served["0"], by_worker["0"])
        assert.are.equal(served["1"], by_worker["1"])

        -- no labels, whole and fractional increments
        assert.are.equal(N * 1.5, value(fams, "spec_mx_plain", "spec_mx_plain_total"))

        -- histogram: cumulative buckets, +Inf = count, exact sum
        assert.are.equal("histogram", fams.spec_mx_latency_seconds.type)
        for _, path in ipairs{ "/a", "/b" } do
            local function le(bound)
                local n = 0
                for _, v in ipairs(sent_lat[path]) do
                    if v <= bound then n = n + 1 end
                end
                return n
            end
            local name = "spec_mx_latency_seconds"
            assert.are.equal(le(0.25), value(fams, name, name .. "_bucket", { route = path, le = "0.25" }))
            assert.are.equal(le(1), value(fams, name, name .. "_bucket", { route = path, le = "1" }))
            assert.are.equal(le(2), value(fams, name, name .. "_bucket", { route = path, le = "2" }))
            assert.are.equal(#sent_lat[path], value(fams, name, name .. "_bucket", { route = path, le = "+Inf" }))
            assert.are.equal(#sent_lat[path], value(fams, name, name .. "_count", { route = path }))
            assert.are.equal(lat_sum[path], value(fams, name, name .. "_sum", { route = path }))
        end

        -- a gauge per worker: set in init_worker, -1 per request
        assert.are.equal(100 - served["0"], value(fams, "spec_mx_level", "spec_mx_level", { worker = "0" }))
        assert.are.equal(100 - served["1"], value(fams, "spec_mx_level", "spec_mx_level", { worker = "1" }))

        -- escaping survives the parser both ways
        assert.are.equal(N, value(fams, "spec_mx_weird", "spec_mx_weird_total", { v = 'a"b\\c\nd' }))
        assert.are.equal("Escapes: back\\slash\nnewline.", fams.spec_mx_weird.documentation)

        -- the main VM sees the same metrics (re-registering gives the workers' counter)
        local labels = { status = "200", worker = "0" }
        local before = value(fams, "spec_mx_requests", "spec_mx_requests_total", labels)
        local c = metrics.counter("spec_mx_requests_total", "Requests by status and worker.", { "status", "worker" })
        c:inc(5, { "200", "0" })
        fams = parse(metrics.render())
        assert.are.equal(before + 5, value(fams, "spec_mx_requests", "spec_mx_requests_total", labels))
    end)

    it("renders every kind in text format 0.0.4, sorted, with escapes", function()
        local c = metrics.counter("spec_mx2_total", "A counter.", { "code", "method" })
        c:inc(1, { "200", "GET" })
        c:inc(2, { 200, "GET" })         -- numbers are label values as Lua prints them
        c:inc(nil, { "404", "POST" })
        local g = metrics.gauge("spec_mx2_gauge", "A gauge.")
        g:set(2.5)
        g:inc()
        g:inc(-4)
        local h = metrics.histogram("spec_mx2_hist", "A histogram.", nil, { 0.1, 1 })
        h:observe(0.0625)
        h:observe(1)
        h:observe(7)
        local text = metrics.render()
        assert.matches('# HELP spec_mx2_total A counter.\n# TYPE spec_mx2_total counter\n'
            .. 'spec_mx2_total{code="200",method="GET"} 3\nspec_mx2_total{code="404",method="POST"} 1\n', text, 1, true)
        assert.matches("# TYPE spec_mx2_gauge gauge\nspec_mx2_gauge -0.5\n", text, 1, true)
        assert.matches('# TYPE spec_mx2_hist histogram\nspec_mx2_hist_bucket{le="0.1"} 1\n'
            .. 'spec_mx2_hist_bucket{le="1"} 2\nspec_mx2_hist_bucket{le="+Inf"} 3\n'
            .. 'spec_mx2_hist_sum 8.0625\nspec_mx2_hist_count 3\n', text, 1, true)
        -- sorted by name
        assert.is_true(text:find("spec_mx2_gauge", 1, true) < text:find("spec_mx2_hist", 1, true))
        assert.is_true(text:find("spec_mx2_hist", 1, true) < text:find("spec_mx2_total", 1, true))
        assert.are.equal("text/plain; version=0.0.4; charset=utf-8", metrics.content_type)
        parse(text)
    end)

    it("returns the registered metric again, and refuses a conflicting one", function()
        local a = metrics.counter("spec_mx3_total", "x", { "k" })
        local b = metrics.counter("spec_mx3_total", "x", { "k" })
        a:inc(1, { "v" })
        b:inc(1, { "v" })
        assert.matches('spec_mx3_total{k="v"} 2\n', metrics.render(), 1, true)
        raises("luaproxy.metrics.gauge: metric 'spec_mx3_total' exists already as a counter with labels (k)",
            function() metrics.gauge("spec_mx3_total", "x", { "k" }) end)
        assert.has_error(function() metrics.counter("spec_mx3_total", "x", { "other" }) end)
        assert.has_error(function() metrics.counter("spec_mx3_total", "x") end)
        metrics.histogram("spec_mx3h", "x")
        assert.has_error(function() metrics.histogram("spec_mx3h", "x", nil, { 1, 2 }) end)
        raises("luaproxy.metrics.counter: metric 'spec_mx3h_count' would render 'spec_mx3h_count', which histogram 'spec_mx3h' renders",
            function() metrics.counter("spec_mx3h_count", "x") end)
        assert.are.equal("counter spec_mx3_total", tostring(a))
    end)

    it("del and reset remove series in every thread's view", function()
        local c = metrics.counter("spec_mx4_total", "x", { "k" })
        c:inc(1, { "a" })
        c:inc(1, { "b" })
        assert.is_true(c:del({ "a" }))
        assert.is_false(c:del({ "a" }))
        c:inc(1, { "b" })
        local text = metrics.render()
        assert.is_nil(text:find('spec_mx4_total{k="a"}', 1, true))
        assert.matches('spec_mx4_total{k="b"} 2\n', text, 1, true)
        c:inc(1, { "a" })   -- a fresh series, not the removed one
        assert.matches('spec_mx4_total{k="a"} 1\n', metrics.render(), 1, true)
        assert.is_true(c:reset())
        assert.is_nil(metrics.render():find('spec_mx4_total{', 1, true))
        c:inc(3, { "b" })
        assert.matches('spec_mx4_total{k="b"} 3\n', metrics.render(), 1, true)
    end)

    it("misuse raises", function()
        local c = metrics.counter("spec_mx5_total", "x", { "a", "b" })
        local g = metrics.gauge("spec_mx5_gauge", "x")
        local h = metrics.histogram("spec_mx5_hist", "x", { "a" })
        raises("counter:inc: counter 'spec_mx5_total': expected 2 label values (a, b), got 1",
            function() c:inc(1, { "x" }) end)
        raises("counter:inc: counter 'spec_mx5_total': expected 2 label values (a, b), got 0",
            function() c:inc(1) end)
        raises("got 3", function() c:inc(1, { "x", "y", "z" }) end)
        raises("counter:inc: value must be a finite number >= 0", function() c:inc(-1, { "x", "y" }) end)
        raises("counter:inc: value must be a finite number >= 0", function() c:inc(0 / 0, { "x", "y" }) end)
        raises("counter:inc: value must be a finite number >= 0", function() c:inc(math.huge, { "x", "y" }) end)
        raises("counter:inc: value must be a number", function() c:inc("1", { "x", "y" }) end)
        raises("counter:inc: label values must be a table", function() c:inc(1, "x") end)
        raises("counter:inc: label value #2 is a table (strings or numbers only)", function() c:inc(1, { "x", {} }) end)
        raises("counter:inc: not a counter (call it as counter:inc(...))", function() c.inc({}, 1) end)
        raises("counter:inc: not a counter (call it as counter:inc(...))", function() c.inc(g, 1) end)
        raises("gauge:set: value must be a number", function() g:set() end)
        raises("gauge:set: gauge 'spec_mx5_gauge': expected 0 label values (), got 1", function() g:set(1, { "extra" }) end)
        raises("histogram:observe: value must be a number", function() h:observe(nil, { "x" }) end)
        raises("histogram:observe: value must not be NaN", function() h:observe(0 / 0, { "x" }) end)
        raises("expected 1 label value (a), got 0", function() h:observe(1) end)
        assert.is_nil(c.observe)
        raises("luaproxy.metrics.counter: bad metric name 'bad-name' (letters, digits, '_' and ':', not starting with a digit)",
            function() metrics.counter("bad-name", "x") end)
        raises("bad metric name '1abc'", function() metrics.counter("1abc", "x") end)
        raises("luaproxy.metrics.counter: name must be a string, not a nil", function() metrics.counter(nil, "x") end)
        raises("luaproxy.metrics.counter: help must be a string, not a number", function() metrics.counter("ok_total", 5) end)
        raises("bad label name '__reserved'", function() metrics.counter("ok_total", "x", { "__reserved" }) end)
        raises("label 'a' given twice", function() metrics.counter("ok_total", "x", { "a", "a" }) end)
        raises("label_names must be a table of strings, not a string", function() metrics.counter("ok_total", "x", "a") end)
        raises("label_names: #1 is a number (strings only)", function() metrics.counter("ok_total", "x", { 1 }) end)
        raises("'le' is the bucket label of a histogram", function() metrics.histogram("ok_hist", "x", { "le" }) end)
        raises("buckets must be increasing", function() metrics.histogram("ok_hist", "x", nil, { 2, 1 }) end)
        raises("buckets: #1 is a string (numbers only)", function() metrics.histogram("ok_hist", "x", nil, { "1" }) end)
        raises("counter:del: counter 'spec_mx5_total': expected 2 label values (a, b), got 1", function() c:del({ "x" }) end)
        -- none of these registered anything
        assert.is_nil(metrics.render():find("ok_total", 1, true))
        assert.is_nil(metrics.render():find("ok_hist", 1, true))
    end)
end)
