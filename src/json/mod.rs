//! `luaproxy.json`: a `cjson.safe`-compatible encoder and decoder that goes straight between
//! Lua values and JSON text with the Lua C API (no intermediate tree, no per-value registry
//! references). Bad input is `nil, err`, never an error. cjson's settings (`encode_sparse_array`,
//! `decode_max_depth`, ..., OpenResty's additions) are per module instance: each VM's
//! `luaproxy.json` has its own, and `json.new()` makes another.
//!
//! - `settings.rs`: the settings, their defaults and argument rules (no Lua);
//! - `text.rs`: string escapes and numbers, both ways (no Lua);
//! - `encode.rs`, `decode.rs`: the walks over Lua values and JSON text (raw C API);
//! - `lua.rs`: the C functions Lua calls and the module table.
//!
//! Chosen differences from lua-cjson 2.1 (tested in spec/json_spec.lua and
//! spec/json_settings_spec.lua):
//! - numbers keep their Lua 5.4 subtype: `1` decodes to the integer 1 (cjson: 1.0); integers
//!   encode exactly (cjson: `%.14g`, so 2^53 became 9.007199254741e+15); floats encode in the
//!   shortest form that reads back to the same float (`encode_number_precision` 17, the
//!   default; 1 to 16 print as cjson does);
//! - decoded arrays carry `json.array_mt` (`decode_array_with_array_mt` defaults to true), so
//!   `[]` survives a decode/encode round trip as `[]`;
//! - `decode_invalid_numbers` defaults to false (RFC 8259 numbers only).

mod decode;
mod encode;
mod lua;
mod settings;
mod stack;
mod text;

use mlua::ffi;
use mlua::prelude::*;

/// Encodes a Lua value as JSON text with the settings of this VM's `luaproxy.json`. Lua
/// strings are bytes, and so is the result: bytes above 0x7F pass through unchanged, as with
/// cjson.
pub fn encode_value(lua: &Lua, v: &LuaValue) -> Result<Vec<u8>, String> {
    let mut res = Err(String::new());
    // SAFETY: the closure works on the stack exec_raw hands it (the metatable and the
    // value), following capi.rs's rules; nothing with a destructor is held across a raise.
    let called: LuaResult<()> = unsafe {
        lua.exec_raw((lua.array_metatable(), v.clone()), |l| {
            let cfg = lua::vm_settings(l);
            lua::push_vm_empty_mt(l);
            let mut enc = encode::RawEncoder::new(cfg, 1, 3, Vec::with_capacity(256));
            enc.value(l, 2, 0);
            ffi::lua_settop(l, 0);
            res = match enc.err.take() {
                Some(e) => Err(e),
                None => Ok(std::mem::take(&mut enc.out)),
            };
        })
    };
    called.map_err(|e| e.to_string())?;
    res
}

/// Decodes JSON text into a Lua value with the settings of this VM's `luaproxy.json`:
/// `Ok(value)` or `Err("what at character N")`.
pub fn decode_value(lua: &Lua, text: &[u8]) -> LuaResult<Result<LuaValue, String>> {
    let mut err = None;
    // SAFETY: as in `encode_value`: raw stack work inside exec_raw under capi.rs's rules.
    let v: LuaValue = unsafe {
        lua.exec_raw(lua.array_metatable(), |l| {
            let cfg = lua::vm_settings(l);
            let mut d = decode::RawDecoder::new(text, &cfg, 1);
            if !d.document(l) {
                ffi::lua_settop(l, 1);
                ffi::lua_pushnil(l);
                err = d.err.take();
            }
            ffi::lua_remove(l, 1);
        })?
    };
    Ok(match err {
        None => Ok(v),
        Some((what, at)) => Err(format!("{what} at character {at}")),
    })
}

/// Builds this VM's `luaproxy.json`.
pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    // SAFETY: push_vm_module works on the one value exec_raw hands it (capi.rs rules).
    unsafe { lua.exec_raw(lua.array_metatable(), |l| lua::push_vm_module(l)) }
}
