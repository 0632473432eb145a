#![deny(unsafe_op_in_unsafe_fn)]
//! luaproxy: a Lua-scriptable HTTP reverse proxy. Rust moves bytes, Lua decides.
//!
//! This file only wires the bindings together; each binding lives in its own file.

pub mod accesslog;
pub mod alloc;
pub mod budget;
pub mod capi;
pub mod clock;
pub mod entry;
pub mod fastproxy;
pub mod h1;
pub mod hash;
pub mod headers_lua;
pub mod json;
pub mod kit;
pub mod log;
pub mod metrics;
pub mod proxy;
pub mod request;
pub mod runtime;
pub mod server;
pub mod settings;
pub mod shared;
pub mod signal;
pub mod units;
pub mod upstream;

use mlua::prelude::*;

/// Builds the `luaproxy` table. Worker threads call this for their own VMs too.
pub fn exports(lua: &Lua) -> LuaResult<LuaTable> {
    runtime::ignore_sigpipe();
    log::install_panic_hook();
    let t = lua.create_table()?;
    t.set("_VERSION", env!("CARGO_PKG_VERSION"))?;
    // The names `luaproxy.serve` takes as settings: `--config` checks keys against them.
    t.set("server_settings", settings::NAMES)?;
    runtime::register(lua, &t)?;
    log::register(lua, &t)?;
    hash::register(lua, &t)?;
    t.set("shared", shared::dict::register(lua)?)?;
    t.set("json", json::register(lua)?)?;
    t.set("cache", shared::cache::register(lua)?)?;
    t.set("http", upstream::register(lua)?)?;
    t.set("signal", signal::register(lua)?)?;
    t.set("metrics", metrics::lua::register(lua)?)?;
    server::register(lua, &t)?;
    // The Rust half of `luaproxy.test` (lua/luaproxy/test.lua): specs only.
    t.set("_kit", kit::register(lua)?)?;
    // Parts written in Lua (lua/luaproxy/*.lua) are reachable as fields too, loaded on first
    // use: `luaproxy.lock` is `require "luaproxy.lock"`.
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.load(
            r#"
            local LAZY = { lock = true, balancer = true, chash = true, health = true, ratelimit = true }
            return function(t, k)
                if LAZY[k] then
                    local m = require("luaproxy." .. k)
                    rawset(t, k, m)
                    return m
                end
            end
            "#,
        )
        .set_name("=luaproxy")
        .eval::<LuaFunction>()?,
    )?;
    t.set_metatable(Some(mt))?;
    Ok(t)
}

#[cfg(feature = "module")]
#[mlua::lua_module]
fn luaproxy(lua: &Lua) -> LuaResult<LuaTable> {
    exports(lua)
}

// glibc's per-thread arenas grow and shrink with mprotect on every request under load
// (measured: one mprotect per proxied request); mimalloc keeps freed pages per thread.
// Worker VMs allocate through mlua, which uses this allocator too.
#[global_allocator]
static GLOBAL: alloc::Alloc = alloc::Alloc;
