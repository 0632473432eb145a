-- luaproxy.cli.parse: options, defaults and --config merging.
local cli = require "luaproxy.cli"
local util = require "support.util"

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

    it("--help wins", function()
        assert.is_true(cli.parse({ "--backend", "a:1", "--help" }).help)
    end)
end)
