//! `luaproxy.json`: `encode` / `decode` with `cjson.safe` semantics (errors are `nil, err`).

use mlua::prelude::*;
use mlua::serde::{DeserializeOptions, SerializeOptions};
use mlua::LuaSerdeExt;

/// Encodes a Lua value as JSON text.
pub fn encode_value(lua: &Lua, v: &LuaValue) -> Result<String, String> {
    let opts = DeserializeOptions::new().deny_unsupported_types(true);
    let json: serde_json::Value = lua
        .from_value_with(v.clone(), opts)
        .map_err(|e| e.to_string())?;
    serde_json::to_string(&json).map_err(|e| e.to_string())
}

/// `text, err = luaproxy.json.encode(value)`
fn lua_encode(lua: &Lua, v: LuaValue) -> LuaResult<(Option<String>, Option<String>)> {
    match encode_value(lua, &v) {
        Ok(s) => Ok((Some(s), None)),
        Err(e) => Ok((None, Some(e))),
    }
}

/// `value, err = luaproxy.json.decode(text)`; JSON null decodes to `luaproxy.json.null`.
fn lua_decode(lua: &Lua, text: LuaString) -> LuaResult<(LuaValue, Option<String>)> {
    match serde_json::from_slice::<serde_json::Value>(&text.as_bytes()) {
        Ok(v) => {
            let opts = SerializeOptions::new()
                .serialize_none_to_null(true)
                .serialize_unit_to_null(true);
            Ok((lua.to_value_with(&v, opts)?, None))
        }
        Err(e) => Ok((LuaValue::Nil, Some(format!("invalid json: {e}")))),
    }
}

pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.set("encode", lua.create_function(lua_encode)?)?;
    t.set("decode", lua.create_function(lua_decode)?)?;
    t.set("null", lua.null())?;
    t.set("array_mt", lua.array_metatable())?;
    Ok(t)
}
