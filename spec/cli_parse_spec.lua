-- luaproxy.cli.parse: options, defaults and --config merging.
local cli = require "luaproxy.cli"
local util = require "support.util"

-- Each `setting = value` text, alone in a --config file, is refused: nil, a message containing
-- its `want`, exit code 1.
local function rejects_settings(cases)
    for text, want in pairs(cases) do
        local bad = util.write_temp("c.lua", "return { " .. text .. " }")
        local none, err, code = cli.parse({ "--config", bad })
        assert.is_nil(none)
        assert.matches(want, err, 1, true)
        assert.are.equal(1, code)
    end
end

describe("luaproxy.cli.parse", function()
    it("has defaults", function()
        local s = assert(cli.parse({}))
        assert.are.equal("127.0.0.1:8080", s.listen)
        assert.are.equal("examples/least_conn.lua", s.policy)
        assert.is_nil(s.backends)
    end)

    it("collects repeated --backend and accepts --opt=value", function()
        local s = assert(cli.parse({ "--backend", "a:1", "--backend=b:2", "--workers", "3" }))
        assert.are.same({ "a:1", "b:2" }, s.backends)
        assert.are.equal(3, s.workers)
    end)

    it("rejects bad values with one line", function()
        for _, argv in ipairs({ { "--workers", "0" }, { "--workers", "x" }, { "--backend", "nohost" },
                                 { "--listen" }, { "--what" } }) do
            local s, err = cli.parse(argv)
            assert.is_nil(s)
            assert.is_string(err)
            assert.is_nil(err:find("\n"))
        end
    end)

    it("merges --config, the command line winning", function()
        local conf = util.write_temp("c.lua", "return { listen = '127.0.0.1:1', workers = 4, backends = { 'x:1' } }")
        local s = assert(cli.parse({ "--config", conf, "--workers", "2" }))
        assert.are.equal("127.0.0.1:1", s.listen)
        assert.are.equal(2, s.workers)
        assert.are.same({ "x:1" }, s.backends)
    end)

    it("refuses unknown settings and missing files", function()
        local conf = util.write_temp("c.lua", "return { lisen = 'typo' }")
        local s, err = cli.parse({ "--config", conf })
        assert.is_nil(s)
        assert.matches("unknown setting 'lisen'", err, 1, true)
        s, err = cli.parse({ "--config", "/nonexistent.lua" })
        assert.is_nil(s)
        assert.matches("cannot read config file", err, 1, true)
    end)

    it("accepts examples/api_router.lua's settings, and checks their types", function()
        local conf = util.write_temp("c.lua", [[return {
            health_check = { path = "/health", interval = 2, timeout = 1, fall = 3, rise = 2, valid_statuses = { 200, 302 } },
            rate_limit = { rate = 10, burst = 20 }, max_fails = 3, fail_timeout = 30,
        }]])
        local s = assert(cli.parse({ "--config", conf }))
        assert.are.same({ path = "/health", interval = 2, timeout = 1, fall = 3, rise = 2, valid_statuses = { 200, 302 } },
            s.health_check)
        assert.are.same({ rate = 10, burst = 20 }, s.rate_limit)
        assert.are.equal(3, s.max_fails)
        assert.are.equal(30, s.fail_timeout)
        rejects_settings({
            ["health_check = true"] = "setting 'health_check' must be a table",
            ["rate_limit = 10"] = "setting 'rate_limit' must be a table",
            ["max_fails = '3'"] = "setting 'max_fails' must be a number",
            ["fail_timeout = '10s'"] = "setting 'fail_timeout' must be a number",
        })
    end)

    it("accepts examples/follow_redirects.lua's settings, and checks their types", function()
        local conf = util.write_temp("c.lua", "return { max_redirects = 3, redirect_hosts = { '127.0.0.1:9003' } }")
        local s = assert(cli.parse({ "--config", conf }))
        assert.are.equal(3, s.max_redirects)
        assert.are.same({ "127.0.0.1:9003" }, s.redirect_hosts)
        rejects_settings({
            ["max_redirects = '3'"] = "setting 'max_redirects' must be a number",
            ["redirect_hosts = '127.0.0.1:9003'"] = "setting 'redirect_hosts' must be a table",
        })
    end)

    it("accepts examples/timeline_cache.lua's settings, and checks their types", function()
        local conf = util.write_temp("c.lua", [[return {
            timeline_fields = { "id", "user.screen_name" }, timeline_path = "/tl/{user}.json",
            timeline_ttl = 60, timeline_timeout = 2, timeline_stale = 600, timeline_neg_ttl = 1,
            timeline_cache_size = "16m", timeline_lru_size = 0,
        }]])
        local s = assert(cli.parse({ "--config", conf }))
        assert.are.same({ "id", "user.screen_name" }, s.timeline_fields)
        assert.are.same({ "/tl/{user}.json", 60, 2, 600, 1, "16m", 0 }, { s.timeline_path, s.timeline_ttl,
            s.timeline_timeout, s.timeline_stale, s.timeline_neg_ttl, s.timeline_cache_size, s.timeline_lru_size })
        rejects_settings({
            ["timeline_fields = 'id'"] = "setting 'timeline_fields' must be a table",
            ["timeline_ttl = '300s'"] = "setting 'timeline_ttl' must be a number",
            ["timeline_path = 1"] = "setting 'timeline_path' must be a string",
        })
    end)

    it("--help wins", function()
        assert.is_true(cli.parse({ "--backend", "a:1", "--help" }).help)
    end)
end)
