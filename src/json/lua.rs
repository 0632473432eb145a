//! The Lua side of `luaproxy.json`: `encode`, `decode`, the setters and `new` as plain C
//! functions, as cjson's are (going through mlua's function call and protected call was most
//! of the time for a small object: small decode 0.82x cjson, encode 0.80x before, 1.1-1.4x
//! after; BENCHMARKS.md, JSON), and the module table they live in.
//!
//! Every function of a module instance has the same four upvalues: `array_mt`, the instance's
//! `Settings` (a plain userdata, so a call reads them with one copy and no lookup),
//! `empty_array_mt` and `empty_array`. Memory errors raised by Lua unwind past these functions
//! leaking only a buffer.

use super::decode::RawDecoder;
use super::encode::RawEncoder;
use super::settings::{Arg, Kind, Out, Settings, DEFAULT, SETTERS};
use crate::capi;
use mlua::ffi;
use std::os::raw::{c_int, c_void};

const UP_ARRAY_MT: c_int = 1;
const UP_SETTINGS: c_int = 2;
const UP_EMPTY_MT: c_int = 3;
const UP_EMPTY_ARRAY: c_int = 4;
const UPVALUES: c_int = 4;

/// Registry keys (their addresses) for what a VM keeps once: the `Settings` of its
/// `luaproxy.json` (what `encode_value` uses for response bodies), `empty_array_mt` and
/// `empty_array` (shared by every instance, as OpenResty's are).
static KEYS: [u8; 3] = [0; 3];
const SETTINGS_KEY: usize = 0;
const EMPTY_MT_KEY: usize = 1;
const EMPTY_ARRAY_KEY: usize = 2;

fn key(k: usize) -> *const c_void {
    &KEYS[k] as *const u8 as *const c_void
}

thread_local! {
    /// The encoder's output buffer, reused between calls (`encode_keep_buffer`). Taken out
    /// while in use, so a Lua memory error in between loses the buffer, nothing else.
    static ENCODE_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// # Safety
/// `l` is the state of a running C closure of this module (upvalue 2 is its `Settings`).
unsafe fn settings(l: *mut ffi::lua_State) -> *mut Settings {
    // SAFETY: per this function's contract.
    unsafe { ffi::lua_touserdata(l, ffi::lua_upvalueindex(UP_SETTINGS)) as *mut Settings }
}

/// `text, err = json.encode(value)`: JSON text, or `nil, err`.
unsafe extern "C-unwind" fn raw_encode(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let cfg = *settings(l);
        ffi::lua_settop(l, 1);
        let mut out = ENCODE_BUF.take();
        out.clear();
        let mt = ffi::lua_upvalueindex(UP_ARRAY_MT);
        let mut enc = RawEncoder::new(cfg, mt, ffi::lua_upvalueindex(UP_EMPTY_MT), out);
        enc.value(l, 1, 0);
        ffi::lua_settop(l, 0);
        let n = match &enc.err {
            None => {
                capi::push_bytes(l, &enc.out);
                1
            }
            Some(e) => {
                ffi::lua_pushnil(l);
                capi::push_bytes(l, e.as_bytes());
                2
            }
        };
        if cfg.keep_buffer && enc.out.capacity() <= 1 << 20 {
            ENCODE_BUF.set(std::mem::take(&mut enc.out));
        }
        n
    }
}

/// `value, err = json.decode(text)`: JSON null decodes to `json.null`; never raises.
unsafe extern "C-unwind" fn raw_decode(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        ffi::lua_settop(l, 1);
        let t = ffi::lua_type(l, 1);
        if t != ffi::LUA_TSTRING {
            let name = std::ffi::CStr::from_ptr(ffi::lua_typename(l, t)).to_string_lossy();
            let msg = format!("expected a string, got a {name}");
            ffi::lua_pushnil(l);
            capi::push_bytes(l, msg.as_bytes());
            return 2;
        }
        let cfg = *settings(l);
        let mut len = 0;
        let p = ffi::lua_tolstring(l, 1, &mut len);
        // The text stays on the stack (index 1) for as long as this slice is used.
        let text = std::slice::from_raw_parts(p as *const u8, len);
        let mut d = RawDecoder::new(text, &cfg, ffi::lua_upvalueindex(UP_ARRAY_MT));
        if d.document(l) {
            return 1;
        }
        ffi::lua_settop(l, 1);
        ffi::lua_pushnil(l);
        let (what, at) = d.err.take().unwrap_or(("invalid json".into(), 0));
        let msg = format!("invalid json: {what} at character {at}");
        capi::push_bytes(l, msg.as_bytes());
        2
    }
}

fn bad_arg(k: usize, n: usize, msg: &str) -> String {
    format!("bad argument #{n} to '{}' ({msg})", SETTERS[k].name())
}

/// `v1, v2, ... = json.<setting>(v1?, v2?, ...)`: sets the arguments that are not nil, returns
/// the values after (cjson's setters). Bad arguments raise with cjson's messages.
unsafe extern "C-unwind" fn raw_setter<const K: usize>(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    // Nothing with a destructor is alive where capi::raise is called.
    unsafe {
        let s = SETTERS[K];
        let arity = s.arity();
        if ffi::lua_gettop(l) as usize > arity {
            capi::raise(l, bad_arg(K, arity + 1, "found too many arguments"));
        }
        let mut args = [Arg::Nil; 3];
        for (i, arg) in args.iter_mut().enumerate().take(arity) {
            let idx = i as c_int + 1;
            let t = ffi::lua_type(l, idx);
            if t == ffi::LUA_TNIL || t == ffi::LUA_TNONE {
                continue;
            }
            let type_name = || {
                let name = std::ffi::CStr::from_ptr(ffi::lua_typename(l, t));
                name.to_string_lossy().into_owned()
            };
            *arg = match s.kind(i) {
                Some(Kind::Switch(_)) => match t {
                    ffi::LUA_TBOOLEAN => Arg::Bool(ffi::lua_toboolean(l, idx) != 0),
                    ffi::LUA_TSTRING | ffi::LUA_TNUMBER => {
                        let mut len = 0;
                        let p = ffi::lua_tolstring(l, idx, &mut len);
                        Arg::Str(std::slice::from_raw_parts(p as *const u8, len))
                    }
                    _ => {
                        let msg =
                            bad_arg(K, i + 1, &format!("string expected, got {}", type_name()));
                        capi::raise(l, msg)
                    }
                },
                // LuaJIT: Lua 5.1's luaL_checkint, as its cjson takes them: truncated.
                _ if cfg!(feature = "luajit") && ffi::lua_isnumber(l, idx) != 0 => {
                    Arg::Int(ffi::lua_tonumberx(l, idx, std::ptr::null_mut()) as i64)
                }
                _ => {
                    let mut isnum = 0;
                    let v = ffi::lua_tointegerx(l, idx, &mut isnum);
                    if isnum != 0 {
                        Arg::Int(v as i64)
                    } else if ffi::lua_isnumber(l, idx) != 0 {
                        capi::raise(l, bad_arg(K, i + 1, "number has no integer representation"))
                    } else {
                        let msg =
                            bad_arg(K, i + 1, &format!("number expected, got {}", type_name()));
                        capi::raise(l, msg)
                    }
                }
            };
        }
        let res = (*settings(l)).apply(s, &args[..arity]);
        let mut outs = [Out::Bool(false); 3];
        let n = match res {
            Ok(v) => {
                outs[..v.len()].copy_from_slice(&v);
                v.len()
            }
            Err((n, why)) => {
                let msg = bad_arg(K, n, &why);
                drop(why);
                capi::raise(l, msg)
            }
        };
        ffi::lua_settop(l, 0);
        for o in &outs[..n] {
            match *o {
                Out::Bool(b) => ffi::lua_pushboolean(l, b as c_int),
                Out::Int(i) => ffi::lua_pushinteger(l, i as _),
                Out::Str(s) => capi::push_bytes(l, s.as_bytes()),
            }
        }
        n as c_int
    }
}

const SETTER_FNS: [ffi::lua_CFunction; SETTERS.len()] = [
    raw_setter::<0>,
    raw_setter::<1>,
    raw_setter::<2>,
    raw_setter::<3>,
    raw_setter::<4>,
    raw_setter::<5>,
    raw_setter::<6>,
    raw_setter::<7>,
    raw_setter::<8>,
    raw_setter::<9>,
];

/// `json2 = json.new()`: a module table of its own, with default settings (cjson's `new`).
unsafe extern "C-unwind" fn raw_new(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        push_module(
            l,
            ffi::lua_upvalueindex(UP_ARRAY_MT),
            ffi::lua_upvalueindex(UP_EMPTY_MT),
            ffi::lua_upvalueindex(UP_EMPTY_ARRAY),
            false,
        );
        1
    }
}

/// Sets `t[name] = top value` (and pops it).
///
/// # Safety
/// `t` is an absolute index of a table, a value is on top (capi.rs rules).
unsafe fn set(l: *mut ffi::lua_State, t: c_int, name: &str) {
    // SAFETY: per this function's contract.
    unsafe {
        capi::push_bytes(l, name.as_bytes());
        ffi::lua_insert(l, -2);
        ffi::lua_rawset(l, t);
    }
}

/// Pushes a new module table with default settings; `remember` makes its settings the VM's
/// (what `encode_value` reads).
///
/// # Safety
/// The three indexes are absolute or upvalue indexes of `array_mt`, `empty_array_mt` and
/// `empty_array` (capi.rs rules).
unsafe fn push_module(
    l: *mut ffi::lua_State,
    array_mt: c_int,
    empty_mt: c_int,
    empty: c_int,
    remember: bool,
) {
    // SAFETY: per this function's contract; the userdata is written before anything reads it.
    unsafe {
        ffi::lua_createtable(l, 0, 20);
        let t = ffi::lua_gettop(l);
        let cfg = ffi::lua_newuserdata(l, std::mem::size_of::<Settings>()) as *mut Settings;
        cfg.write(DEFAULT);
        let c = ffi::lua_gettop(l);
        if remember {
            ffi::lua_pushvalue(l, c);
            ffi::lua_rawsetp(l, ffi::LUA_REGISTRYINDEX, key(SETTINGS_KEY));
        }
        let fns = [
            ("encode", raw_encode as ffi::lua_CFunction),
            ("decode", raw_decode),
            ("new", raw_new),
        ];
        let setters = SETTERS.iter().map(|s| s.name()).zip(SETTER_FNS);
        for (name, f) in fns.into_iter().chain(setters) {
            ffi::lua_pushvalue(l, array_mt);
            ffi::lua_pushvalue(l, c);
            ffi::lua_pushvalue(l, empty_mt);
            ffi::lua_pushvalue(l, empty);
            ffi::lua_pushcclosure(l, f, UPVALUES);
            set(l, t, name);
        }
        ffi::lua_pushlightuserdata(l, std::ptr::null_mut());
        set(l, t, "null");
        ffi::lua_pushvalue(l, array_mt);
        set(l, t, "array_mt");
        ffi::lua_pushvalue(l, empty_mt);
        set(l, t, "empty_array_mt");
        ffi::lua_pushvalue(l, empty);
        set(l, t, "empty_array");
        ffi::lua_settop(l, t);
    }
}

/// Replaces the `array_mt` at stack index 1 (the only value) with the VM's `luaproxy.json`.
///
/// # Safety
/// `array_mt` alone on the stack of `l` (capi.rs rules).
pub unsafe fn push_vm_module(l: *mut ffi::lua_State) {
    // SAFETY: per this function's contract.
    unsafe {
        if ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, key(EMPTY_MT_KEY)) != ffi::LUA_TTABLE {
            ffi::lua_pop(l, 1);
            ffi::lua_createtable(l, 0, 0);
            ffi::lua_pushvalue(l, -1);
            ffi::lua_rawsetp(l, ffi::LUA_REGISTRYINDEX, key(EMPTY_MT_KEY));
        }
        if ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, key(EMPTY_ARRAY_KEY)) != ffi::LUA_TTABLE {
            ffi::lua_pop(l, 1);
            ffi::lua_createtable(l, 0, 0);
            ffi::lua_pushvalue(l, 1);
            ffi::lua_setmetatable(l, -2);
            ffi::lua_pushvalue(l, -1);
            ffi::lua_rawsetp(l, ffi::LUA_REGISTRYINDEX, key(EMPTY_ARRAY_KEY));
        }
        push_module(l, 1, 2, 3, true);
        ffi::lua_replace(l, 1);
        ffi::lua_settop(l, 1);
    }
}

/// The VM's `luaproxy.json` settings (the defaults before it is registered).
///
/// # Safety
/// `l` is a Lua state of this thread with a free stack slot (capi.rs rules).
pub unsafe fn vm_settings(l: *mut ffi::lua_State) -> Settings {
    // SAFETY: per this function's contract; the registry key holds only our userdata.
    unsafe {
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, key(SETTINGS_KEY));
        let p = ffi::lua_touserdata(l, -1) as *const Settings;
        let cfg = if p.is_null() { DEFAULT } else { *p };
        ffi::lua_pop(l, 1);
        cfg
    }
}

/// Pushes the VM's `empty_array_mt` (nil before the module is registered).
///
/// # Safety
/// As `vm_settings`.
pub unsafe fn push_vm_empty_mt(l: *mut ffi::lua_State) {
    // SAFETY: per this function's contract.
    unsafe {
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, key(EMPTY_MT_KEY));
    }
}
