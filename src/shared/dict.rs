//! The Lua surface of `luaproxy.shared` (the store is `store.rs`).
//!
//! size: every hot method is here twice, as a C function and as the mlua method it falls
//! back to, side by side so the two keep answering alike.
//!
//! A dict object is what ngx_lua hands out too: a table `{ [1] = slot }` with one metatable of
//! methods per Lua state. The hot methods (`get`, `get_stale`, `set`, `add`, `replace`,
//! `safe_set`, `safe_add`, `incr`, `delete`) are plain C functions on the Lua stack: no
//! userdata borrow, no registry references for arguments, and a string value goes from the
//! store to Lua with one copy (`get` of a 32-byte value on Lua 5.4: 240 ns per call through
//! mlua's conversions, 82 ns this way; BENCHMARKS.md, "per call"). The rest go through mlua. On LuaJIT the hot methods are
//! replaced again, by FFI wrappers (`ffi.rs`), and these become their fallback.
//!
//! The raw functions follow two rules. Nothing with a destructor that matters is alive across
//! a Lua API call that can raise (only memory errors can): a lock guard never is, and a raise
//! at worst leaks a buffer. And misuse errors are raised only after every Rust value is
//! dropped (`raise`).

use crate::capi::{raise, RawResult};
use crate::shared::store::{
    self, ttl_secs, CachedResponse, Lease, Mode, Store, Val, ValRef, MAX_KEY_LEN,
};
use mlua::ffi;
use mlua::prelude::*;
use std::cell::Cell;
use std::os::raw::{c_char, c_int};
use std::time::Duration;

/// Nesting allowed in table values (deeper, or a cycle, is refused).
const MAX_TABLE_DEPTH: usize = 100;
const METATABLE_KEY: &str = "luaproxy.shared.DICT";

thread_local! {
    /// Where a string value is copied under the store's lock before Lua gets it. Taken
    /// out of the cell while in use, so a Lua error in between loses the buffer, nothing else.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

// ---------------------------------------------------------------------------------------
// Conversions shared with the mlua side and with luaproxy.cache

/// Validates a key: `Ok(bytes)`, or the ngx error string.
pub fn key_bytes(lua: &Lua, key: &LuaValue) -> LuaResult<Result<Vec<u8>, &'static str>> {
    let s = match key {
        LuaValue::String(s) => s.clone(),
        LuaValue::Integer(_) | LuaValue::Number(_) => match lua.coerce_string(key.clone())? {
            Some(s) => s,
            None => return Ok(Err("bad key type")),
        },
        LuaValue::Nil => return Ok(Err("nil key")),
        _ => return Ok(Err("bad key type")),
    };
    let b = s.as_bytes();
    Ok(if b.is_empty() {
        Err("empty key")
    } else if b.len() > MAX_KEY_LEN {
        Err("key too long")
    } else {
        Ok(b.to_vec())
    })
}

pub fn to_val(v: &LuaValue) -> LuaResult<Val> {
    to_val_depth(v, 0)
}

fn to_val_depth(v: &LuaValue, depth: usize) -> LuaResult<Val> {
    Ok(match v {
        LuaValue::String(s) => Val::Str(s.as_bytes().to_vec()),
        LuaValue::Integer(i) => Val::Int(*i),
        LuaValue::Number(n) => Val::Num(*n),
        LuaValue::Boolean(b) => Val::Bool(*b),
        LuaValue::Table(t) => {
            if depth >= MAX_TABLE_DEPTH {
                return Err(LuaError::runtime(TOO_DEEP));
            }
            let mut kv = Vec::new();
            for pair in t.pairs::<LuaValue, LuaValue>() {
                let (k, v) = pair?;
                if k.is_table() {
                    return Err(LuaError::runtime(BAD_TABLE_KEY));
                }
                kv.push((to_val_depth(&k, depth + 1)?, to_val_depth(&v, depth + 1)?));
            }
            Val::Table(kv)
        }
        other => return Err(LuaError::runtime(bad_type(other.type_name()))),
    })
}

const TOO_DEEP: &str = "bad value: table nested deeper than 100 (or a cycle)";
const BAD_TABLE_KEY: &str = "bad value: table keys must be strings, numbers or booleans";

fn bad_type(name: &str) -> String {
    format!("bad value type: {name} (strings, numbers, booleans and tables of them only)")
}

pub fn from_val(lua: &Lua, v: Val) -> LuaResult<LuaValue> {
    Ok(match v {
        Val::Str(s) => LuaValue::String(lua.create_string(&s)?),
        Val::Int(i) => LuaValue::Integer(i),
        Val::Num(n) => LuaValue::Number(n),
        Val::Bool(b) => LuaValue::Boolean(b),
        Val::Table(kv) => {
            let t = lua.create_table_with_capacity(0, kv.len())?;
            for (k, v) in kv {
                t.raw_set(from_val(lua, k)?, from_val(lua, v)?)?;
            }
            LuaValue::Table(t)
        }
        Val::Resp(r) => response_to_lua(lua, &r)?,
    })
}

/// A fresh `res` userdata for a cached response (body already read; replayable by returning
/// it from a handler).
pub fn response_to_lua(lua: &Lua, r: &std::sync::Arc<CachedResponse>) -> LuaResult<LuaValue> {
    Ok(LuaValue::UserData(lua.create_userdata(
        crate::upstream::Response::from_cached(r),
    )?))
}

pub fn ttl_arg(t: Option<f64>) -> LuaResult<Option<Duration>> {
    ttl_secs(t.unwrap_or(0.0)).map_err(LuaError::runtime)
}

pub fn capacity_arg(v: LuaValue) -> LuaResult<usize> {
    match v {
        LuaValue::Integer(n) if n > 0 => Ok(n as usize),
        LuaValue::Number(n) if n > 0.0 => Ok(n as usize),
        LuaValue::String(s) => store::parse_size(&s.to_str()?)
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                LuaError::runtime(format!(
                    "bad capacity '{}' (bytes, or like \"512k\" / \"10m\")",
                    s.to_string_lossy()
                ))
            }),
        _ => Err(LuaError::runtime(
            "capacity must be bytes or a size like \"10m\"",
        )),
    }
}

// ---------------------------------------------------------------------------------------
// The raw C functions

unsafe fn push_str(l: *mut ffi::lua_State, s: &str) {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        ffi::lua_pushlstring(l, s.as_ptr() as *const c_char, s.len());
    }
}

/// The store behind `self` (argument 1).
unsafe fn self_store(l: *mut ffi::lua_State, method: &str) -> Result<&'static Store, String> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if ffi::lua_type(l, 1) == ffi::LUA_TTABLE {
            ffi::lua_rawgeti(l, 1, 1);
            let mut isnum = 0;
            let i = ffi::lua_tointegerx(l, -1, &mut isnum);
            ffi::lua_pop(l, 1);
            if isnum != 0 && i >= 0 {
                if let Some(s) = store::slot(i as usize) {
                    return Ok(s);
                }
            }
        }
        Err(format!(
            "dict:{method}: not a dict (call it as dict:{method}(...))"
        ))
    }
}

/// The key at `idx`, borrowed from the Lua string on the stack; numbers are converted the way
/// Lua prints them (as ngx_lua does).
unsafe fn arg_key<'a>(l: *mut ffi::lua_State, idx: c_int) -> Result<&'a [u8], &'static str> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        match ffi::lua_type(l, idx) {
            ffi::LUA_TSTRING | ffi::LUA_TNUMBER => {
                let mut len = 0;
                let p = ffi::lua_tolstring(l, idx, &mut len);
                if len == 0 {
                    Err("empty key")
                } else if len > MAX_KEY_LEN {
                    Err("key too long")
                } else {
                    Ok(std::slice::from_raw_parts(p as *const u8, len))
                }
            }
            ffi::LUA_TNIL | ffi::LUA_TNONE => Err("nil key"),
            _ => Err("bad key type"),
        }
    }
}

unsafe fn opt_number(
    l: *mut ffi::lua_State,
    idx: c_int,
    what: &str,
) -> Result<Option<f64>, String> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        match ffi::lua_type(l, idx) {
            ffi::LUA_TNIL | ffi::LUA_TNONE => Ok(None),
            ffi::LUA_TNUMBER => Ok(Some(ffi::lua_tonumberx(l, idx, std::ptr::null_mut()))),
            _ => Err(format!("{what} must be a number")),
        }
    }
}

unsafe fn exptime_arg(l: *mut ffi::lua_State, idx: c_int) -> Result<Option<Duration>, String> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        match opt_number(l, idx, "exptime")? {
            None => Ok(None),
            Some(t) => ttl_secs(t).map_err(str::to_string),
        }
    }
}

/// The Lua value at `idx` as a store value (strings, numbers, booleans, tables of them).
unsafe fn raw_to_val(l: *mut ffi::lua_State, idx: c_int, depth: usize) -> Result<Val, String> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        Ok(match ffi::lua_type(l, idx) {
            ffi::LUA_TSTRING => {
                let mut len = 0;
                let p = ffi::lua_tolstring(l, idx, &mut len);
                Val::Str(std::slice::from_raw_parts(p as *const u8, len).to_vec())
            }
            ffi::LUA_TNUMBER => {
                if ffi::lua_isinteger(l, idx) != 0 {
                    Val::Int(ffi::lua_tointegerx(l, idx, std::ptr::null_mut()))
                } else {
                    Val::Num(ffi::lua_tonumberx(l, idx, std::ptr::null_mut()))
                }
            }
            ffi::LUA_TBOOLEAN => Val::Bool(ffi::lua_toboolean(l, idx) != 0),
            ffi::LUA_TTABLE => {
                if depth >= MAX_TABLE_DEPTH {
                    return Err(TOO_DEEP.into());
                }
                if ffi::lua_checkstack(l, 4) == 0 {
                    return Err("out of Lua stack".into());
                }
                let t = ffi::lua_absindex(l, idx);
                let mut kv = Vec::new();
                ffi::lua_pushnil(l);
                while ffi::lua_next(l, t) != 0 {
                    // raw_to_val reads a number key as a number: lua_tolstring would turn it into
                    // a string in place and confuse lua_next.
                    let k = match ffi::lua_type(l, -2) {
                        ffi::LUA_TSTRING | ffi::LUA_TNUMBER | ffi::LUA_TBOOLEAN => {
                            raw_to_val(l, -2, depth + 1)?
                        }
                        ffi::LUA_TTABLE => return Err(BAD_TABLE_KEY.into()),
                        t => return Err(bad_type(&type_name(l, t))),
                    };
                    let v = raw_to_val(l, -1, depth + 1)?;
                    ffi::lua_pop(l, 1);
                    kv.push((k, v));
                }
                Val::Table(kv)
            }
            t => return Err(bad_type(&type_name(l, t))),
        })
    }
}

unsafe fn type_name(l: *mut ffi::lua_State, t: c_int) -> String {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        std::ffi::CStr::from_ptr(ffi::lua_typename(l, t))
            .to_string_lossy()
            .into_owned()
    }
}

/// Pushes a value copied out of the store.
unsafe fn push_val(l: *mut ffi::lua_State, v: &Val) {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        match v {
            Val::Str(s) => {
                ffi::lua_pushlstring(l, s.as_ptr() as *const c_char, s.len());
            }
            Val::Int(i) => ffi::lua_pushinteger(l, *i as ffi::lua_Integer),
            Val::Num(n) => ffi::lua_pushnumber(l, *n),
            Val::Bool(b) => ffi::lua_pushboolean(l, *b as c_int),
            Val::Table(kv) => {
                ffi::luaL_checkstack(l, 3, std::ptr::null());
                ffi::lua_createtable(l, 0, kv.len() as c_int);
                for (k, v) in kv {
                    push_val(l, k);
                    push_val(l, v);
                    ffi::lua_rawset(l, -3);
                }
            }
            // Dicts never hold responses (only luaproxy.cache does).
            Val::Resp(_) => ffi::lua_pushnil(l),
        }
    }
}

enum Got {
    Int(i64),
    Num(f64),
    Bool(bool),
    /// The bytes are in the scratch buffer.
    Str,
    Other(Val),
}

/// `value, flags = dict:get(key)`; `value, flags, stale = dict:get_stale(key)`
unsafe fn get_impl(l: *mut ffi::lua_State, stale: bool) -> RawResult {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let store = self_store(l, if stale { "get_stale" } else { "get" })?;
        let key = match arg_key(l, 2) {
            Ok(k) => k,
            Err(e) => {
                ffi::lua_pushnil(l);
                push_str(l, e);
                return Ok(2);
            }
        };
        let mut buf = SCRATCH.take();
        buf.clear();
        let found = store.peek(key, stale, |v, flags, expired| {
            let got = match v {
                ValRef::Int(i) => Got::Int(i),
                ValRef::Val(Val::Num(n)) => Got::Num(*n),
                ValRef::Val(Val::Bool(b)) => Got::Bool(*b),
                ValRef::Val(Val::Str(s)) => {
                    buf.extend_from_slice(s);
                    Got::Str
                }
                ValRef::Val(other) => Got::Other(other.clone()),
            };
            (got, flags, expired.is_some())
        });
        let n = match found {
            Ok(None) => {
                ffi::lua_pushnil(l);
                1
            }
            Err(e) => {
                ffi::lua_pushnil(l);
                push_str(l, e.as_str());
                2
            }
            Ok(Some((got, flags, expired))) => {
                match got {
                    Got::Int(i) => ffi::lua_pushinteger(l, i as ffi::lua_Integer),
                    Got::Num(n) => ffi::lua_pushnumber(l, n),
                    Got::Bool(b) => ffi::lua_pushboolean(l, b as c_int),
                    Got::Str => {
                        ffi::lua_pushlstring(l, buf.as_ptr() as *const c_char, buf.len());
                    }
                    Got::Other(v) => push_val(l, &v),
                }
                if stale {
                    push_flags(l, flags);
                    ffi::lua_pushboolean(l, expired as c_int);
                    3
                } else if flags != 0 {
                    push_flags(l, flags);
                    2
                } else {
                    1
                }
            }
        };
        SCRATCH.set(buf);
        Ok(n)
    }
}

unsafe fn push_flags(l: *mut ffi::lua_State, flags: u32) {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if flags == 0 {
            ffi::lua_pushnil(l);
        } else {
            ffi::lua_pushinteger(l, flags as ffi::lua_Integer);
        }
    }
}

/// `ok, err, forcible = dict:set|add|replace(key, value, exptime?, flags?)`; the `safe_*`
/// forms return `ok, err`.
unsafe fn store_impl(l: *mut ffi::lua_State, name: &str, mode: Mode, force: bool) -> RawResult {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let store = self_store(l, name)?;
        // ok, err, forcible; the safe_* forms return ok, err (as in ngx_lua).
        let ret = |l, ok: bool, err: Option<&str>, forcible: bool| {
            ffi::lua_pushboolean(l, ok as c_int);
            match err {
                Some(e) => push_str(l, e),
                None => ffi::lua_pushnil(l),
            }
            if force {
                ffi::lua_pushboolean(l, forcible as c_int);
                Ok(3)
            } else {
                Ok(2)
            }
        };
        let key = match arg_key(l, 2) {
            Ok(k) => k,
            Err(e) => return ret(l, false, Some(e), false),
        };
        let ttl = exptime_arg(l, 4).map_err(|e| format!("dict:{name}: {e}"))?;
        let flags = match opt_number(l, 5, "flags").map_err(|e| format!("dict:{name}: {e}"))? {
            None => 0,
            Some(f) if (0.0..=u32::MAX as f64).contains(&f) => f as u32,
            Some(_) => {
                return Err(format!(
                    "dict:{name}: flags must be a 32-bit unsigned number"
                ))
            }
        };
        if mode == Mode::Set && ffi::lua_type(l, 3) <= ffi::LUA_TNIL {
            store.delete(key);
            return ret(l, true, None, false);
        }
        let stored = if ffi::lua_type(l, 3) == ffi::LUA_TSTRING {
            let mut len = 0;
            let p = ffi::lua_tolstring(l, 3, &mut len);
            let bytes = std::slice::from_raw_parts(p as *const u8, len);
            store.store_str(key, bytes, ttl, flags, mode, force)
        } else {
            let v = raw_to_val(l, 3, 0).map_err(|e| format!("dict:{name}: {e}"))?;
            store.store(key, v, ttl, flags, mode, force)
        };
        match stored {
            Ok(forcible) => ret(l, true, None, forcible),
            Err(e) => ret(l, false, Some(e.as_str()), false),
        }
    }
}

/// `newval, err, forcible = dict:incr(key, n, init?, init_ttl?)`
unsafe fn incr_impl(l: *mut ffi::lua_State) -> RawResult {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let store = self_store(l, "incr")?;
        let key = match arg_key(l, 2) {
            Ok(k) => k,
            Err(e) => {
                ffi::lua_pushnil(l);
                push_str(l, e);
                ffi::lua_pushboolean(l, 0);
                return Ok(3);
            }
        };
        let (nf, ni) = match ffi::lua_type(l, 3) {
            ffi::LUA_TNUMBER if ffi::lua_isinteger(l, 3) != 0 => {
                let i = ffi::lua_tointegerx(l, 3, std::ptr::null_mut());
                (i as f64, Some(i))
            }
            ffi::LUA_TNUMBER => (ffi::lua_tonumberx(l, 3, std::ptr::null_mut()), None),
            _ => return Err("dict:incr: n must be a number".into()),
        };
        let init = match ffi::lua_type(l, 4) {
            ffi::LUA_TNIL | ffi::LUA_TNONE => None,
            ffi::LUA_TNUMBER => Some(raw_to_val(l, 4, 0)?),
            _ => return Err("dict:incr: init must be a number".into()),
        };
        let ttl = match opt_number(l, 5, "init_ttl")? {
            None => None,
            Some(t) => ttl_secs(t).map_err(|e| format!("dict:incr: {e}"))?,
        };
        match store.incr(key, nf, ni, init, ttl) {
            Ok((v, forcible)) => {
                push_val(l, &v);
                ffi::lua_pushnil(l);
                ffi::lua_pushboolean(l, forcible as c_int);
            }
            Err(e) => {
                ffi::lua_pushnil(l);
                push_str(l, e.as_str());
                ffi::lua_pushboolean(l, 0);
            }
        }
        Ok(3)
    }
}

/// `ok = dict:delete(key)`
unsafe fn delete_impl(l: *mut ffi::lua_State) -> RawResult {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let store = self_store(l, "delete")?;
        if let Ok(k) = arg_key(l, 2) {
            store.delete(k);
        }
        ffi::lua_pushboolean(l, 1);
        Ok(1)
    }
}

macro_rules! raw_fn {
    ($name:ident, $body:expr) => {
        unsafe extern "C-unwind" fn $name(l: *mut ffi::lua_State) -> c_int {
            // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
            // of capi.rs for C functions Lua calls) is what every operation below relies on.
            unsafe {
                let r: RawResult = $body(l);
                match r {
                    Ok(n) => n,
                    Err(msg) => raise(l, msg),
                }
            }
        }
    };
}

raw_fn!(raw_get, |l| get_impl(l, false));
raw_fn!(raw_get_stale, |l| get_impl(l, true));
raw_fn!(raw_set, |l| store_impl(l, "set", Mode::Set, true));
raw_fn!(raw_add, |l| store_impl(l, "add", Mode::Add, true));
raw_fn!(raw_replace, |l| store_impl(
    l,
    "replace",
    Mode::Replace,
    true
));
raw_fn!(raw_safe_set, |l| store_impl(
    l,
    "safe_set",
    Mode::Set,
    false
));
raw_fn!(raw_safe_add, |l| store_impl(
    l,
    "safe_add",
    Mode::Add,
    false
));
raw_fn!(raw_incr, incr_impl);
raw_fn!(raw_delete, delete_impl);

// ---------------------------------------------------------------------------------------
// The methods that go through mlua

/// The store behind a dict table.
fn store_of(method: &str, this: &LuaValue) -> LuaResult<&'static Store> {
    if let LuaValue::Table(t) = this {
        if let Ok(i) = t.raw_get::<i64>(1) {
            if let Some(s) = store::slot(i as usize) {
                return Ok(s);
            }
        }
    }
    Err(LuaError::runtime(format!(
        "dict:{method}: not a dict (call it as dict:{method}(...))"
    )))
}

type Ret2 = (LuaValue, Option<&'static str>);

fn method<A, R, F>(lua: &Lua, methods: &LuaTable, name: &'static str, f: F) -> LuaResult<()>
where
    A: FromLuaMulti,
    R: IntoLuaMulti,
    F: Fn(&Lua, &'static Store, A) -> LuaResult<R> + 'static,
{
    methods.raw_set(
        name,
        lua.create_function(move |lua, (this, args): (LuaValue, A)| {
            f(lua, store_of(name, &this)?, args)
        })?,
    )
}

fn err2(e: &'static str) -> LuaResult<Ret2> {
    Ok((LuaValue::Nil, Some(e)))
}

fn methods(lua: &Lua) -> LuaResult<LuaTable> {
    let m = lua.create_table()?;
    for (name, f) in [
        ("get", raw_get as ffi::lua_CFunction),
        ("get_stale", raw_get_stale),
        ("set", raw_set),
        ("add", raw_add),
        ("replace", raw_replace),
        ("safe_set", raw_safe_set),
        ("safe_add", raw_safe_add),
        ("incr", raw_incr),
        ("delete", raw_delete),
    ] {
        // SAFETY: the functions above keep to the rules in this file's header.
        m.raw_set(name, unsafe { lua.create_c_function(f)? })?;
    }
    // ttl, err = dict:ttl(key): seconds left (0 = never expires); nil, "not found"
    method(lua, &m, "ttl", |lua, s, key: LuaValue| {
        match key_bytes(lua, &key)? {
            Err(e) => err2(e),
            Ok(k) => match s.ttl(&k) {
                Ok(t) => Ok((LuaValue::Number(t), None)),
                Err(e) => err2(e.as_str()),
            },
        }
    })?;
    // ok, err = dict:expire(key, exptime): 0 = never expires; nil, "not found"
    method(
        lua,
        &m,
        "expire",
        |lua, s, (key, exptime): (LuaValue, f64)| {
            let ttl = ttl_arg(Some(exptime))?;
            match key_bytes(lua, &key)? {
                Err(e) => err2(e),
                Ok(k) => match s.expire(&k, ttl) {
                    Ok(()) => Ok((LuaValue::Boolean(true), None)),
                    Err(e) => err2(e.as_str()),
                },
            }
        },
    )?;
    // n = dict:flush_expired(max?): removes expired entries (0 or nil = all), returns the count
    method(lua, &m, "flush_expired", |_, s, max: Option<usize>| {
        Ok(s.flush_expired(max.unwrap_or(0)))
    })?;
    // ok, err = dict:cas(key, old, new, exptime?): `new` only if the value is still `old`
    // (nil = absent); false, "changed" otherwise
    method(
        lua,
        &m,
        "cas",
        |lua, s, (key, old, new, exptime): (LuaValue, LuaValue, LuaValue, Option<f64>)| {
            let old = if old.is_nil() {
                None
            } else {
                Some(to_val(&old)?)
            };
            let new = to_val(&new)?;
            let ttl = ttl_arg(exptime)?;
            Ok(match key_bytes(lua, &key)? {
                Err(e) => (false, Some(e)),
                Ok(k) => match s.cas(&k, old.as_ref(), new, ttl) {
                    Ok(()) => (true, None),
                    Err(e) => (false, Some(e.as_str())),
                },
            })
        },
    )?;
    // len, err = dict:lpush(key, value) / dict:rpush(key, value)
    for (name, front) in [("lpush", true), ("rpush", false)] {
        method(
            lua,
            &m,
            name,
            move |lua, s, (key, v): (LuaValue, LuaValue)| {
                let v = to_val(&v)?;
                match key_bytes(lua, &key)? {
                    Err(e) => err2(e),
                    Ok(k) => match s.push(&k, v, front) {
                        Ok((n, _)) => Ok((LuaValue::Integer(n as i64), None)),
                        Err(e) => err2(e.as_str()),
                    },
                }
            },
        )?;
    }
    // value, err = dict:lpop(key) / dict:rpop(key): nil when the list is empty or missing
    for (name, front) in [("lpop", true), ("rpop", false)] {
        method(
            lua,
            &m,
            name,
            move |lua, s, key: LuaValue| match key_bytes(lua, &key)? {
                Err(e) => err2(e),
                Ok(k) => match s.pop(&k, front) {
                    Ok(Some(v)) => Ok((from_val(lua, v)?, None)),
                    Ok(None) => Ok((LuaValue::Nil, None)),
                    Err(e) => err2(e.as_str()),
                },
            },
        )?;
    }
    // len, err = dict:llen(key): 0 when missing
    method(lua, &m, "llen", |lua, s, key: LuaValue| {
        match key_bytes(lua, &key)? {
            Err(e) => err2(e),
            Ok(k) => match s.llen(&k) {
                Ok(n) => Ok((LuaValue::Integer(n as i64), None)),
                Err(e) => err2(e.as_str()),
            },
        }
    })?;
    // keys = dict:get_keys(max?)  (default 1024, 0 = all)
    method(lua, &m, "get_keys", |lua, s, max: Option<usize>| {
        let keys = s.keys(max.unwrap_or(1024));
        let t = lua.create_table_with_capacity(keys.len(), 0)?;
        for (i, k) in keys.iter().enumerate() {
            t.raw_set(i + 1, lua.create_string(&**k)?)?;
        }
        Ok(t)
    })?;
    // ok = dict:flush_all()
    method(lua, &m, "flush_all", |_, s, ()| {
        s.flush_all();
        Ok(true)
    })?;
    // bytes = dict:capacity()
    method(lua, &m, "capacity", |_, s, ()| Ok(s.capacity))?;
    // bytes = dict:free_space()
    method(lua, &m, "free_space", |_, s, ()| Ok(s.free_space()))?;
    // newval, err = dict:lease(key, req): incr(key, 1) now, and -1 automatically when the
    // request ends however it ends (response sent, error, client abort). The C function
    // `raw_lease` serves requests being handled and falls back to this.
    method(
        lua,
        &m,
        "lease",
        |lua, s, (key, req): (LuaValue, LuaValue)| {
            let req = match crate::request::request_of(&req) {
                Err(_) => {
                    return Err(LuaError::runtime(
                        "dict:lease: argument #2 must be a request",
                    ))
                }
                Ok(None) => return err2("request has ended"),
                Ok(Some(r)) => r,
            };
            let k = match key_bytes(lua, &key)? {
                Err(e) => return err2(e),
                Ok(k) => k,
            };
            match s.incr(&k, 1.0, Some(1), None, None) {
                Ok((v, _)) => {
                    req.guards
                        .borrow_mut()
                        .push(Box::new(Lease { store: s, key: k }));
                    Ok((from_val(lua, v)?, None))
                }
                Err(e) => err2(e.as_str()),
            }
        },
    )?;
    // SAFETY: stack work on the methods table; `raw_lease` keeps to this file's rules.
    unsafe {
        lua.exec_raw::<()>(&m, |l| {
            ffi::lua_getfield(l, -1, c"lease".as_ptr());
            ffi::lua_pushcclosure(l, raw_lease, 1);
            ffi::lua_setfield(l, -2, c"lease".as_ptr());
        })?;
    }
    Ok(m)
}

/// `newval, err = dict:lease(key, req)` for a request being handled; anything else goes to
/// the mlua method (upvalue 1), which checks and explains.
unsafe extern "C-unwind" fn raw_lease(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let fast = (|| {
            let store = self_store(l, "lease").ok()?;
            let key = arg_key(l, 2).ok()?;
            let req = crate::request::live_at(l, 3)?;
            Some((store, key, req))
        })();
        let Some((store, key, req)) = fast else {
            return crate::capi::fallback(l);
        };
        let r = store.incr(key, 1.0, Some(1), None, None);
        if let Ok((v, _)) = &r {
            let lease = Lease {
                store,
                key: key.to_vec(),
            };
            req.guards.borrow_mut().push(Box::new(lease));
            drop(req);
            push_val(l, v);
            ffi::lua_pushnil(l);
        } else {
            drop(req);
            ffi::lua_pushnil(l);
            push_str(l, r.err().map_or("", |e| e.as_str()));
        }
        2
    }
}

/// The per-state metatable of dict objects.
fn metatable(lua: &Lua) -> LuaResult<LuaTable> {
    if let Ok(mt) = lua.named_registry_value::<LuaTable>(METATABLE_KEY) {
        return Ok(mt);
    }
    let mt = lua.create_table()?;
    let m = methods(lua)?;
    crate::shared::ffi::install(lua, &m)?;
    mt.raw_set("__index", m)?;
    mt.raw_set("__name", METATABLE_KEY)?;
    lua.set_named_registry_value(METATABLE_KEY, &mt)?;
    Ok(mt)
}

/// The Lua object of a dict: `{ [1] = slot }` with the dict metatable.
fn dict_object(lua: &Lua, store: &Store) -> LuaResult<LuaTable> {
    let t = lua.create_table_with_capacity(1, 0)?;
    t.raw_set(1, store.slot)?;
    t.set_metatable(Some(metatable(lua)?))?;
    Ok(t)
}

pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let shared = lua.create_table()?;
    let shared2 = shared.clone();
    // dict, err = luaproxy.shared.new(name, capacity); then luaproxy.shared[name] in every VM
    shared.raw_set(
        "new",
        lua.create_function(move |lua, (name, capacity): (String, LuaValue)| {
            if name.is_empty() || name == "new" || name == "open" {
                return Err(LuaError::runtime(
                    "luaproxy.shared.new: name must not be empty, \"new\" or \"open\"",
                ));
            }
            match store::create(&name, capacity_arg(capacity)?) {
                Ok(d) => {
                    let obj = dict_object(lua, &d)?;
                    shared2.raw_set(name, &obj)?;
                    Ok((Some(obj), None))
                }
                Err(e) => Ok((None, Some(e))),
            }
        })?,
    )?;
    let shared3 = shared.clone();
    // dict, err = luaproxy.shared.open(name, capacity): the dict of that name, whatever its
    // capacity, or a new one (what a module that keeps its state in a dict of its own wants:
    // every worker's init opens it, the first creates it)
    shared.raw_set(
        "open",
        lua.create_function(move |lua, (name, capacity): (String, LuaValue)| {
            if name.is_empty() || name == "new" || name == "open" {
                return Err(LuaError::runtime(
                    "luaproxy.shared.open: name must not be empty, \"new\" or \"open\"",
                ));
            }
            let capacity = capacity_arg(capacity)?;
            let made = match store::find(&name) {
                Some(d) => Ok(d),
                // Another worker may create it between the two calls: then find it.
                None => store::create(&name, capacity).or_else(|e| store::find(&name).ok_or(e)),
            };
            match made {
                Ok(d) => {
                    let obj = dict_object(lua, &d)?;
                    shared3.raw_set(name, &obj)?;
                    Ok((Some(obj), None))
                }
                Err(e) => Ok((None, Some(e))),
            }
        })?,
    )?;
    let mt = lua.create_table()?;
    // A dict created by another VM (or before this one existed) is looked up once, then kept.
    mt.raw_set(
        "__index",
        lua.create_function(|lua, (t, name): (LuaTable, LuaValue)| {
            let LuaValue::String(name) = name else {
                return Ok(None);
            };
            let Some(store) = store::find(&name.to_str()?) else {
                return Ok(None);
            };
            let obj = dict_object(lua, &store)?;
            t.raw_set(name, &obj)?;
            Ok(Some(obj))
        })?,
    )?;
    shared.set_metatable(Some(mt))?;
    Ok(shared)
}
