-- luaproxy, built by cargo for the Lua LuaRocks targets: Lua 5.4, or LuaJIT 2.1 (see
-- rockspec/luajit.lua for Debian's). Two ways in:
--   make rock && luarocks --lua-version 5.4 install luaproxy-scm-1.src.rock
--       the source rock: this rockspec plus the archive below, whose crates are vendored, so
--       installing it needs cargo but no network
--   luarocks --lua-version 5.4 make rockspec/luaproxy-scm-1.rockspec      (in a checkout)
--       builds the working tree, offline too: run `cargo fetch --locked` first (`make install` does)
-- `luarocks test` then runs the busted suite (spec/run.lua) under the same interpreter.
rockspec_format = "3.0"
package = "luaproxy"
version = "scm-1"
source = {
   -- What `make rock` writes and packs: the checkout's tracked files plus vendor/ (`cargo
   -- vendor`) and the .cargo/config.toml that builds from it. `make rock` gives `luarocks
   -- pack` this path made absolute, as LuaRocks fetches a relative one from a temporary directory.
   url = "file://target/rock/luaproxy-scm-1.tar.gz",
   dir = "luaproxy",
}
description = {
   summary = "Lua-scriptable HTTP reverse proxy and load balancer (Rust core, Lua policy)",
   detailed = [[
      A reverse proxy whose routing policy is plain Lua: Rust (tokio, mlua) serves HTTP/1.1,
      proxies and streams bodies; `lua main.lua` runs it with a policy such as least
      connection, consistent hashing or an API-key router. OpenResty's names where they exist
      (ngx.shared.DICT as luaproxy.shared, lua-resty-lock, balancer helpers).
   ]],
   license = "MIT",
   labels = { "http", "proxy", "load-balancer" },
}
-- Lua 5.4 and LuaJIT (which LuaRocks calls 5.1); a dependency list cannot say "5.1 or 5.4",
-- so the build itself stops with a message on the PUC 5.1, 5.2 and 5.3 it admits.
dependencies = {
   "lua >= 5.1, < 5.5",
}
test = {
   type = "command",
   -- run with the interpreter LuaRocks targets (luajit under rockspec/luajit.lua), so the
   -- specs test the build for it; arguments after `luarocks test --` go to busted
   script = "spec/run.lua",
}
build = {
   type = "command",
   -- The mlua feature follows the interpreter: Lua 5.4 -> lua54, LuaJIT -> luajit, each in its
   -- own cargo target dir so switching costs no rebuild. The module is left where the specs of
   -- a checkout look for it (./luaproxy.so for 5.4, target/luajit/lib/luaproxy.so for LuaJIT:
   -- spec/support/paths.lua) and in target/install/ for the install below.
   -- Backticks, not $( ), because LuaRocks expands $(WORD) itself.
   build_command = [[
      feature=`"$(LUA)" -e 'if jit then io.write("luajit") elseif _VERSION == "Lua 5.4" then io.write("lua54") end'` &&
      if [ -z "$feature" ]; then
         echo "luaproxy builds for Lua 5.4 and LuaJIT, not for `"$(LUA)" -v 2>&1`" >&2; exit 1
      fi &&
      target="${CARGO_TARGET_DIR:-target}" && out=. &&
      if [ "$feature" = luajit ]; then target="$target/luajit" && out=target/luajit/lib; fi &&
      echo "luaproxy: cargo build with mlua feature $feature into $target" &&
      cargo build --release --locked --offline --no-default-features --features "$feature,module" --target-dir "$target" &&
      mkdir -p "$out" target/install &&
      cp "$target/release/libluaproxy.$(LIB_EXTENSION)" "$out/luaproxy.$(LIB_EXTENSION)" &&
      cp "$out/luaproxy.$(LIB_EXTENSION)" target/install/luaproxy.$(LIB_EXTENSION)
   ]],
   install = {
      lib = { ["luaproxy"] = "target/install/luaproxy.so" },
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
         ["luaproxy.test"] = "lua/luaproxy/test.lua",
      },
   },
}
