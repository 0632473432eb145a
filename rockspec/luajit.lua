-- LuaRocks settings that point Lua 5.1 at Debian's LuaJIT (packages luajit2, libluajit2-5.1-dev):
--   LUAROCKS_CONFIG_5_1=rockspec/luajit.lua luarocks --lua-version 5.1 --tree DIR install luaproxy-scm-1.src.rock
-- LuaRocks' own 5.1 is PUC Lua 5.1 (lua5.1, which busted's packages bring along), on which
-- luaproxy does not build; `luarocks test` runs the specs with `lua_interpreter`.
lua_interpreter = "luajit"
variables = {
   LUA_DIR = "/usr",
   LUA_BINDIR = "/usr/bin",
   LUA_INCDIR = "/usr/include/luajit-2.1",
}
