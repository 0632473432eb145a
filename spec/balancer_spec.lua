-- luaproxy.balancer without a server: the list in a shared dict, ties, leases' counters.
local luaproxy = require "luaproxy"
local balancer = require "luaproxy.balancer"

local n = 0
local function fresh(backends)
    n = n + 1
    return assert(balancer.new{ dict = "bal_spec_" .. n, backends = backends })
end

describe("luaproxy.balancer", function()
    it("validates addresses", function()
        assert.is_true(balancer.valid_addr("127.0.0.1:80"))
        assert.is_true(balancer.valid_addr("backend-1.local:8080"))
        assert.is_true(balancer.valid_addr("[::1]:80"))
        for _, bad in ipairs({ "x", "x:", ":80", "x:0", "x:65536", "a b:1", 42 }) do
            assert.is_false(balancer.valid_addr(bad), tostring(bad))
        end
    end)

    it("round-robins ties and prefers the least loaded", function()
        local bal = fresh({ "a:1", "b:2", "c:3" })
        local seen = {}
        for _ = 1, 3 do seen[bal:pick()] = true end
        assert.are.same({ ["a:1"] = true, ["b:2"] = true, ["c:3"] = true }, seen)
        bal.dict:set("conn:a:1", 5)
        bal.dict:set("conn:c:3", 2)
        for _ = 1, 5 do assert.are.equal("b:2", bal:pick()) end
    end)

    it("shares the list with a second balancer on the same dict (another worker)", function()
        local bal = fresh({ "a:1" })
        local other = assert(balancer.new{ dict = bal.dict_name or ("bal_spec_" .. n) })
        assert.are.same({ "a:1" }, other:backends())
        assert.is_true(bal:set_backends({ "b:2", "c:3" }))
        assert.are.same({ "b:2", "c:3" }, other:backends())
        assert.are.same({ ["b:2"] = 0, ["c:3"] = 0 }, other:counts())
    end)

    it("keeps a live count for a backend that stays in the list", function()
        local bal = fresh({ "a:1", "b:2" })
        bal.dict:incr("conn:a:1", 3)
        assert.is_true(bal:set_backends({ "a:1", "c:3" }))
        assert.are.equal(3, bal:counts()["a:1"])
    end)

    it("refuses bad lists and reports no backends", function()
        local bal = fresh({ "a:1" })
        local ok, err = bal:set_backends({ "a:1", "nope" })
        assert.is_nil(ok)
        assert.matches("bad backend address 'nope'", err, 1, true)
        assert.are.same({ "a:1" }, bal:backends())
        assert.is_true(bal:set_backends({}))
        local addr, perr = bal:pick()
        assert.is_nil(addr)
        assert.are.equal("no backends", perr)
    end)

    it("error_status: 503 when there was nothing to choose, 504 for a timeout, 502 otherwise", function()
        for err, want in pairs({
            ["no backends"] = { 503, "503 Service Unavailable\n" },
            ["no backend up"] = { 503, "503 Service Unavailable\n" },
            ["no other backend"] = { 503, "503 Service Unavailable\n" },
            ["timeout"] = { 504, "504 Gateway Timeout\n" },
            ["connection refused"] = { 502, "502 Bad Gateway\n" },
            ["connection reset by peer"] = { 502, "502 Bad Gateway\n" },
            ["upstream closed connection"] = { 502, "502 Bad Gateway\n" },
            ["could not resolve host 'x'"] = { 502, "502 Bad Gateway\n" },
            [""] = { 502, "502 Bad Gateway\n" },
        }) do
            assert.are.same(want, { balancer.error_status(err) }, err)
        end
        -- what take and pick return when they fail maps to 503
        local bal = fresh({ "a:1" })
        assert.is_true(bal:set_backends({}))
        assert.are.equal(503, (balancer.error_status(select(2, bal:pick()))))
        for _, bad in ipairs({ 42, true, {} }) do
            assert.has_error(function() balancer.error_status(bad) end, "balancer.error_status: err must be a string")
        end
        assert.has_error(function() balancer.error_status() end)
    end)

    it("keeps its counters in a shared dict every VM can see", function()
        local bal = fresh({ "a:1" })
        assert.are.equal(0, luaproxy.shared["bal_spec_" .. n]:get("conn:a:1"))
    end)
end)

describe("bal:proxy", function()
    -- the upstream is a real server, and the request objects need one too
    it("sends an idempotent request a backend closed without answering to another; never a POST", function()
        local luaproxy = require "luaproxy"
        local util = require "support.util"
        util.run(function()
            local mute = util.python_upstream("mute", 20)
            local good_got = {}
            local good = util.serve_handler(function(req)
                good_got[#good_got + 1] = req:get_method()
                return 200, "good"
            end)
            local dict = luaproxy.shared.bal_retry or assert(luaproxy.shared.new("bal_retry", "1m"))
            dict:flush_all()
            local bal = assert(balancer.new{ dict = "bal_retry", backends = { mute.addr, good.addr } })
            local front = util.serve_handler(function(req)
                if req:get_method() == "POST" then req:read_body() end
                local res, err = bal:proxy(req)
                if not res then return 502, err end
                return res
            end)
            local base = "http://" .. front.addr .. "/x"
            for _ = 1, 4 do
                local status, body = util.get(base)
                assert.are.same({ 200, "good" }, { status, body })
            end
            local muted = #mute.log()
            assert.is_true(muted >= 1, "no GET reached the mute backend")
            assert.are.equal(4, #good_got)
            local refused = 0
            for _ = 1, 4 do
                local status, body = util.get(base, { method = "POST", body = "once" })
                if status == 502 then
                    assert.are.equal("upstream closed connection", body)
                    refused = refused + 1
                else
                    assert.are.equal(200, status)
                end
            end
            assert.is_true(refused >= 1, "no POST reached the mute backend")
            assert.are.equal(muted + refused, #mute.log())
            assert.are.equal(4 + 4 - refused, #good_got)
            util.shut(front)
            util.shut(good)
            mute.stop()
        end, 20)
    end)

    it("is_retryable: connect errors always; a closed or reset connection for idempotent methods", function()
        assert.is_true(balancer.is_retryable("connection refused", "POST"))
        assert.is_true(balancer.is_retryable("upstream closed connection", "GET"))
        assert.is_true(balancer.is_retryable("connection reset by peer", "PUT"))
        assert.is_false(balancer.is_retryable("upstream closed connection", "POST"))
        assert.is_false(balancer.is_retryable("connection reset by peer", "PATCH"))
        assert.is_false(balancer.is_retryable("timeout", "GET"))
        assert.is_false(balancer.is_retryable(nil, "GET"))
    end)
end)

describe("luaproxy.balancer, chash mode", function()
    local m = 0
    local function fresh(backends, extra)
        m = m + 1
        local opts = { dict = "bal_chash_spec_" .. m, backends = backends, mode = "chash" }
        for k, v in pairs(extra or {}) do opts[k] = v end
        return assert(balancer.new(opts))
    end
    local NODES = {}
    for i = 1, 10 do NODES[i] = "10.0.0." .. i .. ":80" end

    it("maps a key as luaproxy.chash does, in every balancer on the list", function()
        local bal = fresh(NODES)
        local ring = require("luaproxy.chash").new(NODES)
        local other = assert(balancer.new{ dict = "bal_chash_spec_" .. m, mode = "chash" })
        for i = 1, 200 do
            local key = "key-" .. i
            assert.are.equal(ring:find(key), bal:pick{ key = key })
            assert.are.equal(ring:find(key), other:pick{ key = key })
        end
    end)

    it("follows a list change, moving only the removed node's keys", function()
        local bal = fresh(NODES)
        local before = {}
        for i = 1, 2000 do before[i] = bal:pick{ key = "k" .. i } end
        local fewer = {}
        for i = 1, 9 do fewer[i] = NODES[i] end
        assert.is_true(bal:set_backends(fewer))
        for i = 1, 2000 do
            local now = bal:pick{ key = "k" .. i }
            if before[i] ~= NODES[10] then assert.are.equal(before[i], now) end
            assert.are_not.equal(NODES[10], now)
        end
    end)

    it("finds a node for every key whenever one is usable, however few, the same in every balancer", function()
        local THREE = { "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80" }
        local down = {}
        local hc = { is_up = function(_, addr) return not down[addr] end }
        local bal = fresh(THREE, { health = hc })
        local other = assert(balancer.new{ dict = "bal_chash_spec_" .. m, mode = "chash", health = hc })
        local ring = require("luaproxy.chash").new(THREE)
        -- one of three up: the key's node and its rehashes all miss for about 6% of keys
        for up = 1, 3 do
            down = {}
            for i, addr in ipairs(THREE) do down[addr] = i ~= up end
            local missed = 0
            for i = 1, 2000 do
                local key = "k" .. i
                local hit = false
                for r = 0, 6 do
                    if ring:find(r == 0 and key or key .. "#" .. r) == THREE[up] then hit = true; break end
                end
                if not hit then missed = missed + 1 end
                assert.are.equal(THREE[up], bal:pick{ key = key }, key)
                assert.are.equal(THREE[up], other:pick{ key = key }, key)
            end
            assert.is_true(missed > 40, "only " .. missed .. " keys missed by every rehash: the test proves nothing")
        end
        -- two up: keys whose rehashes all meet the down node spread over both others
        down = { [THREE[1]] = true }
        local got = {}
        for i = 1, 2000 do
            local addr = bal:pick{ key = "k" .. i }
            assert.are_not.equal(THREE[1], addr)
            assert.are.equal(addr, other:pick{ key = "k" .. i })
            got[addr] = (got[addr] or 0) + 1
        end
        assert.is_true(got[THREE[2]] > 600 and got[THREE[3]] > 600)
        -- the one usable node excluded: "no other backend"; none up: "no backend up"
        down = { [THREE[1]] = true, [THREE[2]] = true }
        assert.are.same({ nil, "no other backend" }, { bal:pick{ key = "x", exclude = { [THREE[3]] = true } } })
        down[THREE[3]] = true
        assert.are.same({ nil, "no backend up" }, { bal:pick{ key = "x" } })
    end)

    it("skips excluded and down nodes the same way everywhere; needs a key", function()
        local down = { [NODES[3]] = true }
        local hc = { is_up = function(_, addr) return not down[addr] end }
        local bal = fresh(NODES, { health = hc })
        for i = 1, 500 do
            local key = "x" .. i
            local a = bal:pick{ key = key }
            assert.are_not.equal(NODES[3], a)
            local b = bal:pick{ key = key, exclude = { [a] = true } }
            assert.is_truthy(b)
            assert.are_not.equal(a, b)
            assert.are.equal(a, bal:pick{ key = key })
        end
        for _, addr in ipairs(NODES) do down[addr] = true end
        assert.are.same({ nil, "no backend up" }, { bal:pick{ key = "x" } })
        assert.has_error(function() bal:pick() end)
        assert.has_error(function() balancer.new{ mode = "random" } end)
        local empty = fresh({ "10.9.9.9:80" })
        assert.is_true(empty:set_backends({}))
        assert.are.same({ nil, "no backends" }, { empty:pick{ key = "x" } })
    end)
end)
