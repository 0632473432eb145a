-- luaproxy: `luarocks --lua-version 5.4 make rockspec/luaproxy-scm-1.rockspec` from the repository
-- root builds the Rust crate with cargo (offline: run `cargo fetch --locked` first; `make install`
-- does) and installs luaproxy.so plus the pure-Lua helpers under lua/.
rockspec_format = "3.0"
package = "luaproxy"
version = "scm-1"
source = {
   url = "git+file:///dev/null", -- placeholder: `luarocks make` builds the working tree
}
description = {
   summary = "Lua-scriptable HTTP reverse proxy and load balancer (Rust core, Lua policy)",
   license = "MIT",
}
dependencies = {
   "lua >= 5.1",
}
test = {
   type = "command",
   script = "/usr/bin/busted",
}
build = {
   type = "command",
   -- The mlua feature follows the interpreter LuaRocks targets: 5.4 -> lua54, LuaJIT -> luajit.
   -- Backticks, not $( ), because LuaRocks expands $(WORD) itself.
   build_command = [[
      feature=`"$(LUA)" -e 'if jit then io.write("luajit") else io.write("lua" .. _VERSION:sub(5):gsub("%.", "")) end'` &&
      echo "luaproxy: building with mlua feature $feature" &&
      cargo build --release --locked --offline --no-default-features --features "$feature,module" &&
      cp target/release/libluaproxy.$(LIB_EXTENSION) luaproxy.$(LIB_EXTENSION)
   ]],
   install = {
      lib = { ["luaproxy"] = "luaproxy.so" },
      lua = {
         ["luaproxy.admin"] = "lua/luaproxy/admin.lua",
         ["luaproxy.apikey"] = "lua/luaproxy/apikey.lua",
         ["luaproxy.balancer"] = "lua/luaproxy/balancer.lua",
         ["luaproxy.chash"] = "lua/luaproxy/chash.lua",
         ["luaproxy.cli"] = "lua/luaproxy/cli.lua",
         ["luaproxy.health"] = "lua/luaproxy/health.lua",
         ["luaproxy.lock"] = "lua/luaproxy/lock.lua",
         ["luaproxy.ratelimit"] = "lua/luaproxy/ratelimit.lua",
         ["luaproxy.redirect"] = "lua/luaproxy/redirect.lua",
      },
   },
}
