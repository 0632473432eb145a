//! State every worker shares, in Rust: the dict store (`store.rs`, no mlua), its Lua surface
//! (`dict.rs`: `luaproxy.shared`, the `ngx.shared.DICT` API, `dict:lease`), the LuaJIT FFI
//! entry points (`ffi.rs`), and the response/value cache with single-flight (`cache.rs`).
//! Imports point down: cache -> dict -> ffi -> store.

pub mod cache;
pub mod dict;
pub mod ffi;
pub mod store;
