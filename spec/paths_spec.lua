-- The luaproxy the specs test is the one spec/support/paths.lua names (this checkout's build
-- for the interpreter, or the rock in LUAPROXY_SPEC_TREE), in this process and in the
-- `lua main.lua` processes the specs start, never another one further down the paths (the
-- system-wide rock in /usr/local, which once stood in for a missing ./luaproxy.so).
require "luaproxy"
local paths = require "support.paths"
local util = require "support.util"

local function realpath(path)
    local out, code = util.sh("readlink -f '" .. path .. "'")
    assert(code == 0, out)
    return (out:gsub("\n$", ""))
end

-- The luaproxy.so files mapped into a process, from its /proc/PID/maps text.
local function mapped(maps)
    local files, seen = {}, {}
    for file in maps:gmatch("(/[^\n]*luaproxy[^/\n]*%.so)\n") do
        if not seen[file] then
            seen[file] = true
            files[#files + 1] = file
        end
    end
    return files
end

local WHERE = [[
local luaproxy = require "luaproxy"
assert(luaproxy.now)
io.write(package.searchpath("luaproxy", package.cpath), "\n",
    package.searchpath("luaproxy.balancer", package.path), "\n")
local f = assert(io.open("/proc/self/maps"))
io.write(f:read("*a"))
f:close()
]]

describe("the luaproxy under test", function()
    local module = realpath(paths.MODULE)

    it("is the named build, first on package.cpath, and the one loaded", function()
        assert.are.equal(paths.MODULE, package.searchpath("luaproxy", package.cpath))
        assert.are.same({ module }, mapped(util.read_file("/proc/self/maps")))
        if not paths.TREE then
            assert.are.equal(paths.ROOT, module:sub(1, #paths.ROOT))
        end
    end)

    it("comes with the Lua modules beside it (the checkout's lua/, or the tree's)", function()
        local dir = paths.TREE and (paths.TREE .. "/share/lua/") or (paths.ROOT .. "/lua/")
        local found = package.searchpath("luaproxy.balancer", package.path)
        assert.are.equal(dir, found:sub(1, #dir))
    end)

    it("is what a subprocess the specs start loads, whatever LUA_CPATH and LUA_CPATH_5_4 say", function()
        local script = util.write_temp("where.lua", WHERE)
        -- a user's environment that names the system-wide rock first
        local env = "LUA_CPATH='/usr/local/lib/lua/5.4/?.so;;' LUA_CPATH_5_4='/usr/local/lib/lua/5.4/?.so;;' "
            .. "LUA_PATH='/usr/local/share/lua/5.4/?.lua;;' LUA_PATH_5_4='/usr/local/share/lua/5.4/?.lua;;' "
        local out, code = util.sh(env .. util.lua_cmd(script, 20))
        assert.are.equal(0, code, out)
        local cfile, lfile = out:match("^([^\n]*)\n([^\n]*)\n")
        assert.are.equal(paths.MODULE, cfile)
        assert.are.equal(package.searchpath("luaproxy.balancer", package.path), lfile)
        assert.are.same({ module }, mapped(out))
    end)

    it("must exist: a checkout without a build stops the run instead of testing another", function()
        -- paths.lua in an empty checkout, with a luaproxy.so that works right there on the paths
        local root = realpath(util.write_temp("README", ""):match("^(.*)/"))
        os.execute("mkdir -p " .. root .. "/spec/support")
        local f = assert(io.open(root .. "/spec/support/paths.lua", "wb"))
        f:write(util.read_file(paths.ROOT .. "/spec/support/paths.lua"))
        f:close()
        local where = paths.MODULE:match("^(.*)/[^/]*$")
        local out, code = util.sh(("cd %s && env -u LUAPROXY_SPEC_TREE LUA_CPATH='%s/?.so;;' LUA_CPATH_5_4='%s/?.so;;' %s -e 'dofile(\"spec/support/paths.lua\")'")
            :format(root, where, where, paths.LUA))
        assert.are_not.equal(0, code, out)
        local expected = util.JIT and (root .. "/target/luajit/lib/luaproxy.so") or (root .. "/luaproxy.so")
        assert.matches("no luaproxy build to test at " .. expected .. ": build it", out, 1, true)
    end)
end)
