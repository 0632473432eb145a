//! The LuaJIT build's fast path for dict methods: `extern "C"` functions that LuaJIT's FFI
//! calls from compiled traces (a classic C API function is called from the interpreter:
//! `get` 56 ns per call that way, 20 ns this way; BENCHMARKS.md, "per call"). nginx's
//! `resty.core` reaches `ngx.shared.DICT` the same way.
//! `ffi.lua` wraps them as the `get`, `get_stale`, `set`, `add`, `replace`, `safe_set`,
//! `safe_add`, `incr` and `delete` methods; anything unusual (a table value, a number key, a
//! bad argument, an error to explain) is handed to the C API method, which gives the exact
//! ngx_lua result or error. Only strings, numbers and booleans travel through here.
//!
//! Return codes: `>= 0` as documented per function, `> 0` for an operational error (the
//! position of the error in `SetErr::ALL` plus one), `-1` for "ask the C API method".

use crate::shared::store::{self, Mode, SetErr, Val, ValRef};
use std::cell::Cell;
use std::time::Duration;

/// Results handed back through one caller-owned struct (see `ffi.lua`).
#[repr(C)]
pub struct Out {
    pub num: f64,
    pub str: *const u8,
    pub len: usize,
    pub flags: u32,
    pub stale: i32,
    pub forcible: i32,
}

const FALLBACK: i32 = -1;

/// An error's return code: its position in `SetErr::ALL` plus one.
fn code(e: SetErr) -> i32 {
    e as i32 + 1
}

thread_local! {
    /// A string value is copied here; the pointer handed out stays valid until the next call
    /// on this thread, and the Lua wrapper copies it into a Lua string at once.
    static BUF: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// # Safety
/// `key` points to `klen` readable bytes.
unsafe fn key<'a>(key: *const u8, klen: usize) -> Option<&'a [u8]> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if key.is_null() || klen == 0 || klen > store::MAX_KEY_LEN {
            return None;
        }
        Some(std::slice::from_raw_parts(key, klen))
    }
}

fn number(n: f64) -> Val {
    if n.fract() == 0.0 && n.abs() < 9.2e18 {
        Val::Int(n as i64)
    } else {
        Val::Num(n)
    }
}

fn ttl(t: f64) -> Option<Option<Duration>> {
    store::ttl_secs(t).ok()
}

/// `get`/`get_stale`: 0 missing, 1 string (`str`, `len`), 2 number (`num`), 3 boolean
/// (`num` 0 or 1); `flags` and `stale` filled.
///
/// # Safety
/// `key` points to `klen` readable bytes and `out` to a writable `Out`.
#[no_mangle]
pub unsafe extern "C" fn luaproxy_dict_get(
    slot: u32,
    key_ptr: *const u8,
    klen: usize,
    stale: i32,
    out: *mut Out,
) -> i32 {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let (Some(store), Some(k)) = (store::slot(slot as usize), key(key_ptr, klen)) else {
            return FALLBACK;
        };
        let out = &mut *out;
        let mut buf = BUF.take();
        buf.clear();
        let r = store.peek(k, stale != 0, |v, flags, expired| {
            out.flags = flags;
            out.stale = expired.is_some() as i32;
            match v {
                ValRef::Int(i) => {
                    out.num = i as f64;
                    2
                }
                ValRef::Val(Val::Num(n)) => {
                    out.num = *n;
                    2
                }
                ValRef::Val(Val::Bool(b)) => {
                    out.num = *b as i32 as f64;
                    3
                }
                ValRef::Val(Val::Str(s)) => {
                    buf.extend_from_slice(s);
                    1
                }
                ValRef::Val(_) => FALLBACK,
            }
        });
        out.str = buf.as_ptr();
        out.len = buf.len();
        BUF.set(buf);
        match r {
            Ok(Some(rc)) => rc,
            Ok(None) => 0,
            Err(_) => FALLBACK,
        }
    }
}

/// `set`/`add`/`replace` (`mode` 0/1/2), `force` 0 for the `safe_*` forms. `vtype`: 0 nil
/// (delete; `set` only), 1 string (`s`, `slen`), 2 number (`num`), 3 boolean (`num`).
/// 0 = stored (`forcible` filled).
///
/// # Safety
/// `key` and `s` point to `klen` and `slen` readable bytes, `out` to a writable `Out`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn luaproxy_dict_store(
    slot: u32,
    key_ptr: *const u8,
    klen: usize,
    vtype: i32,
    s: *const u8,
    slen: usize,
    num: f64,
    exptime: f64,
    flags: u32,
    mode: i32,
    force: i32,
    out: *mut Out,
) -> i32 {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let (Some(store), Some(k), Some(ttl)) =
            (store::slot(slot as usize), key(key_ptr, klen), ttl(exptime))
        else {
            return FALLBACK;
        };
        let mode = match mode {
            0 => Mode::Set,
            1 => Mode::Add,
            2 => Mode::Replace,
            _ => return FALLBACK,
        };
        let out = &mut *out;
        out.forcible = 0;
        let force = force != 0;
        let stored = match vtype {
            0 if mode == Mode::Set => {
                store.delete(k);
                return 0;
            }
            1 if !s.is_null() || slen == 0 => {
                let bytes = if slen == 0 {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(s, slen)
                };
                store.store_str(k, bytes, ttl, flags, mode, force)
            }
            2 => store.store(k, number(num), ttl, flags, mode, force),
            3 => store.store(k, Val::Bool(num != 0.0), ttl, flags, mode, force),
            _ => return FALLBACK,
        };
        match stored {
            Ok(forcible) => {
                out.forcible = forcible as i32;
                0
            }
            Err(e) => code(e),
        }
    }
}

/// `incr(key, n, init?, init_ttl?)`: 0 = done, the new value in `num`, `forcible` filled.
///
/// # Safety
/// `key` points to `klen` readable bytes and `out` to a writable `Out`.
#[no_mangle]
pub unsafe extern "C" fn luaproxy_dict_incr(
    slot: u32,
    key_ptr: *const u8,
    klen: usize,
    n: f64,
    has_init: i32,
    init: f64,
    init_ttl: f64,
    out: *mut Out,
) -> i32 {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let (Some(store), Some(k), Some(ttl)) = (
            store::slot(slot as usize),
            key(key_ptr, klen),
            ttl(init_ttl),
        ) else {
            return FALLBACK;
        };
        let n_int = match number(n) {
            Val::Int(i) => Some(i),
            _ => None,
        };
        let init = (has_init != 0).then(|| number(init));
        let out = &mut *out;
        match store.incr(k, n, n_int, init, ttl) {
            Ok((v, forcible)) => {
                out.num = match v {
                    Val::Int(i) => i as f64,
                    Val::Num(f) => f,
                    _ => return FALLBACK,
                };
                out.forcible = forcible as i32;
                0
            }
            Err(e) => code(e),
        }
    }
}

/// `delete(key)`: 0 = done.
///
/// # Safety
/// `key` points to `klen` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn luaproxy_dict_delete(slot: u32, key_ptr: *const u8, klen: usize) -> i32 {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let (Some(store), Some(k)) = (store::slot(slot as usize), key(key_ptr, klen)) else {
            return FALLBACK;
        };
        store.delete(k);
        0
    }
}

/// Replaces the hot methods in `methods` with FFI wrappers when running on LuaJIT.
#[cfg(feature = "luajit")]
pub fn install(lua: &mlua::Lua, methods: &mlua::Table) -> mlua::Result<()> {
    use mlua::LightUserData;
    let ptrs = lua.create_table()?;
    let p = |f: *const ()| LightUserData(f as *mut std::ffi::c_void);
    ptrs.raw_set("get", p(luaproxy_dict_get as *const ()))?;
    ptrs.raw_set("store", p(luaproxy_dict_store as *const ()))?;
    ptrs.raw_set("incr", p(luaproxy_dict_incr as *const ()))?;
    ptrs.raw_set("delete", p(luaproxy_dict_delete as *const ()))?;
    let errors = lua.create_sequence_from(SetErr::ALL.iter().map(SetErr::as_str))?;
    lua.load(include_str!("ffi.lua"))
        .set_name("=luaproxy.shared.ffi")
        .call::<()>((methods, ptrs, errors))
}

#[cfg(not(feature = "luajit"))]
pub fn install(_: &mlua::Lua, _: &mlua::Table) -> mlua::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_store_incr_delete_through_the_c_abi() {
        let d = store::create("ffi_test", 1 << 20).unwrap();
        let slot = d.slot as u32;
        let mut out = Out {
            num: 0.0,
            str: std::ptr::null(),
            len: 0,
            flags: 0,
            stale: 0,
            forcible: 0,
        };
        let k = b"key";
        // SAFETY: the pointers and lengths name live local buffers; `out` outlives the calls.
        unsafe {
            let v = b"value";
            let rc = luaproxy_dict_store(
                slot,
                k.as_ptr(),
                3,
                1,
                v.as_ptr(),
                5,
                0.0,
                0.0,
                7,
                0,
                1,
                &mut out,
            );
            assert_eq!(rc, 0);
            assert_eq!(luaproxy_dict_get(slot, k.as_ptr(), 3, 0, &mut out), 1);
            assert_eq!(std::slice::from_raw_parts(out.str, out.len), b"value");
            assert_eq!(out.flags, 7);
            // add on a live key: "exists" (code 2)
            let rc = luaproxy_dict_store(
                slot,
                k.as_ptr(),
                3,
                2,
                std::ptr::null(),
                0,
                1.0,
                0.0,
                0,
                1,
                1,
                &mut out,
            );
            assert_eq!(SetErr::ALL[rc as usize - 1], SetErr::Exists);
            let c = b"n";
            assert_eq!(
                luaproxy_dict_incr(slot, c.as_ptr(), 1, 1.0, 0, 0.0, 0.0, &mut out),
                3
            );
            assert_eq!(
                luaproxy_dict_incr(slot, c.as_ptr(), 1, 2.0, 1, 40.0, 0.0, &mut out),
                0
            );
            assert_eq!(out.num, 42.0);
            assert_eq!(d.get(b"n").unwrap().unwrap().0, Val::Int(42));
            assert_eq!(
                luaproxy_dict_incr(slot, k.as_ptr(), 3, 1.0, 0, 0.0, 0.0, &mut out),
                4
            );
            assert_eq!(luaproxy_dict_delete(slot, k.as_ptr(), 3), 0);
            assert_eq!(luaproxy_dict_get(slot, k.as_ptr(), 3, 0, &mut out), 0);
            // what the C API method must explain: empty key, negative exptime, unknown slot
            assert_eq!(
                luaproxy_dict_get(slot, k.as_ptr(), 0, 0, &mut out),
                FALLBACK
            );
            let rc = luaproxy_dict_store(
                slot,
                k.as_ptr(),
                3,
                2,
                std::ptr::null(),
                0,
                1.0,
                -1.0,
                0,
                0,
                1,
                &mut out,
            );
            assert_eq!(rc, FALLBACK);
            assert_eq!(
                luaproxy_dict_get(4000, k.as_ptr(), 3, 0, &mut out),
                FALLBACK
            );
        }
    }
}
