//! JSON text into Lua values: any bytes give a value or `nil, err`, never a raise or a panic;
//! what decoded encodes again, or says why not (a number too large for a double decodes to
//! infinity, as in cjson, and infinity does not encode).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mlua::Lua;

thread_local! {
    static LUA: Lua = {
        let lua = Lua::new();
        let t = luaproxy::exports(&lua).unwrap();
        lua.register_module("luaproxy", t).unwrap();
        lua
    };
}

fuzz_target!(|data: &[u8]| {
    LUA.with(|lua| {
        let v = luaproxy::json::decode_value(lua, data).expect("decode raised");
        if let Ok(v) = v {
            let _ = luaproxy::json::encode_value(lua, &v);
        }
    });
});
