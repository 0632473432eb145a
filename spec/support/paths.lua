-- Which luaproxy the specs test, put first on package.path and package.cpath before any spec
-- runs (.busted loads this as its helper; spec/support/util.lua starts subprocesses with the
-- same paths and interpreter). busted's own `cpath = "./?.so"` was not enough: when
-- ./luaproxy.so was missing (a fresh checkout, a `make clean`), the search went on to the
-- system-wide rock (/usr/local/lib/lua/5.4/luaproxy.so), and the suite passed or failed for
-- whatever older build that was. Here the build under test is one named file, and a missing
-- one stops the run, saying how to build it:
--   Lua 5.4   ROOT/luaproxy.so                   (`make install`, or cargo build + cp: README)
--   LuaJIT    ROOT/target/luajit/lib/luaproxy.so (`make luajit`)
--   LUAPROXY_SPEC_TREE=DIR in the environment: the rock installed in the LuaRocks tree DIR
--             (`luarocks --tree DIR install ...`), its Lua modules too, instead of ROOT/lua/
-- ROOT is this checkout, as an absolute path, so the choice does not depend on the current
-- directory of a subprocess, nor on LUA_PATH, LUA_CPATH or LUA_CPATH_5_4.
local _M = {}

local JIT = rawget(_G, "jit") ~= nil
local VERSION = JIT and "5.1" or _VERSION:match("%d+%.%d+")

local function exists(path)
    local f = io.open(path, "rb")
    if f then f:close() end
    return f ~= nil
end

local function root()
    local src = debug.getinfo(1, "S").source:gsub("^@", "")
    local dir = src:match("^(.*)/spec/support/[^/]*$") or "."
    if dir:sub(1, 1) ~= "/" then
        local p = assert(io.popen("cd '" .. dir .. "' && pwd -P"))
        dir = p:read("l")
        p:close()
    end
    return dir
end

_M.ROOT = root()
_M.JIT = JIT
--- the interpreter the specs run under, and their subprocesses (`lua main.lua`) with it
_M.LUA = JIT and "luajit" or "lua" .. VERSION

local tree = os.getenv("LUAPROXY_SPEC_TREE")
local lua_dir
if tree and tree ~= "" then
    _M.TREE = tree
    _M.CPATH = tree .. "/lib/lua/" .. VERSION .. "/?.so"
    lua_dir = tree .. "/share/lua/" .. VERSION
    _M.HOW = "install the rock there: luarocks --tree " .. tree .. " install luaproxy-scm-1.src.rock"
elseif JIT then
    _M.CPATH = _M.ROOT .. "/target/luajit/lib/?.so"
    lua_dir = _M.ROOT .. "/lua"
    _M.HOW = "build it: make luajit"
else
    _M.CPATH = _M.ROOT .. "/?.so"
    lua_dir = _M.ROOT .. "/lua"
    _M.HOW = "build it: make install (or cargo build + cp, as in the README)"
end
_M.PATH = lua_dir .. "/?.lua;" .. lua_dir .. "/?/init.lua;" .. _M.ROOT .. "/spec/?.lua"
--- the file `require "luaproxy"` loads, in this process and in the subprocesses
_M.MODULE = _M.CPATH:gsub("%?", "luaproxy")

if not exists(_M.MODULE) then
    error(("no luaproxy build to test at %s: %s"):format(_M.MODULE, _M.HOW), 0)
end

if package.path:sub(1, #_M.PATH + 1) ~= _M.PATH .. ";" then
    package.path = _M.PATH .. ";" .. package.path
end
if package.cpath:sub(1, #_M.CPATH + 1) ~= _M.CPATH .. ";" then
    package.cpath = _M.CPATH .. ";" .. package.cpath
end

--- the shell words that give a subprocess this process's paths (the versioned variables too:
-- Lua 5.4 reads LUA_CPATH_5_4 before LUA_CPATH)
local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local env = { "LUA_PATH=" .. q(package.path), "LUA_CPATH=" .. q(package.cpath) }
if not JIT then
    local v = VERSION:gsub("%.", "_")
    env[#env + 1] = "LUA_PATH_" .. v .. "=" .. q(package.path)
    env[#env + 1] = "LUA_CPATH_" .. v .. "=" .. q(package.cpath)
end
_M.ENV = table.concat(env, " ")

-- busted runs this with dofile; specs reach it through spec/support/util.lua
package.loaded["support.paths"] = _M
return _M
