//! `luaproxy.crc32(s)` and `luaproxy.hash32(s)`: 32-bit hashes of byte strings for Lua code
//! that must map a key the same way in every process and on every VM (`lua/luaproxy/chash.lua`).
//! Results are integers 0..2^32-1, exact in Lua 5.4 and in LuaJIT's doubles alike, so the Lua
//! side needs no 5.4-only integer operators. No seeds, no per-process state. The Lua functions
//! are C functions (they are the hot half of `ring:find`), with mlua functions behind them for
//! errors, as capi.rs describes.

use mlua::ffi;
use mlua::prelude::*;
use std::os::raw::c_int;

/// The zlib/IEEE CRC-32 table (reflected polynomial 0xEDB88320), built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// zlib's `crc32(0, s, len)`: what nginx's `ngx_crc32_long` and `ngx.crc32_long` give.
pub fn crc32(s: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in s {
        c = CRC_TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(s: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in s {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// A well-mixed 32-bit hash: FNV-1a 64 of the bytes, through MurmurHash3's fmix64, high 32
/// bits. FNV-1a alone (and CRC-32, which is linear) leaves strings that differ only in their
/// last characters ("node#1", "node#2") close together or in regular patterns; the finalizer
/// spreads them over the whole range, which is what ring points need.
pub fn hash32(s: &[u8]) -> u32 {
    (fmix64(fnv1a64(s)) >> 32) as u32
}

/// A string argument; anything else (numbers included: no coercion) raises.
fn string_arg(name: &str, v: LuaValue) -> LuaResult<LuaString> {
    match v {
        LuaValue::String(s) => Ok(s),
        other => Err(LuaError::runtime(format!(
            "bad argument #1 to 'luaproxy.{name}' (string expected, got {})",
            other.type_name()
        ))),
    }
}

/// `n = luaproxy.crc32(s)`: zlib's CRC-32 of the string `s`, an integer 0..2^32-1 (as
/// `ngx.crc32_long`). Raises unless `s` is a string.
fn lua_crc32(_: &Lua, v: LuaValue) -> LuaResult<i64> {
    let s = string_arg("crc32", v)?;
    Ok(crc32(&s.as_bytes()) as i64)
}

/// `n = luaproxy.hash32(s)`: `hash32` above of the string `s` (FNV-1a 64, MurmurHash3's
/// fmix64, high 32 bits), an integer 0..2^32-1. Raises unless `s` is a string.
fn lua_hash32(_: &Lua, v: LuaValue) -> LuaResult<i64> {
    let s = string_arg("hash32", v)?;
    Ok(hash32(&s.as_bytes()) as i64)
}

// The Lua functions are plain C functions over the mlua ones above (upvalue 1, their fallback
// for anything but one string argument, so the error messages live there): through mlua's
// call machinery hash32 cost 105 ns per call on Lua 5.4, half of a ring:find (bench/chash.lua).

/// `n = luaproxy.crc32(s)` / `luaproxy.hash32(s)` for one string argument.
///
/// # Safety
/// Called by Lua only, as a C closure whose upvalue 1 is the mlua function of the same name.
unsafe fn raw(l: *mut ffi::lua_State, f: fn(&[u8]) -> u32) -> c_int {
    // SAFETY: the raw-code rules of capi.rs; the string stays on the stack (index 1) while
    // its bytes are read, and nothing here can raise before the push.
    unsafe {
        if ffi::lua_gettop(l) != 1 || ffi::lua_type(l, 1) != ffi::LUA_TSTRING {
            return crate::capi::fallback(l);
        }
        let mut len = 0;
        let p = ffi::lua_tolstring(l, 1, &mut len);
        let h = f(std::slice::from_raw_parts(p as *const u8, len));
        ffi::lua_pushinteger(l, h as ffi::lua_Integer);
        1
    }
}

unsafe extern "C-unwind" fn raw_crc32(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: Lua calls this as the C closure `register` made.
    unsafe { raw(l, crc32) }
}

unsafe extern "C-unwind" fn raw_hash32(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: Lua calls this as the C closure `register` made.
    unsafe { raw(l, hash32) }
}

pub fn register(lua: &Lua, t: &LuaTable) -> LuaResult<()> {
    let fns: [(&std::ffi::CStr, ffi::lua_CFunction, LuaFunction); 2] = [
        (c"crc32", raw_crc32, lua.create_function(lua_crc32)?),
        (c"hash32", raw_hash32, lua.create_function(lua_hash32)?),
    ];
    for (name, f, slow) in fns {
        // SAFETY: pushes the upvalue and makes the closure, nothing else.
        let fast: LuaFunction = unsafe {
            lua.exec_raw(slow, |l| {
                ffi::lua_pushcclosure(l, f, 1);
            })?
        };
        t.set(name.to_str().expect("ascii name"), fast)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        // The CRC-32 check value (the "123456789" test vector every CRC catalogue gives).
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn fnv1a64_matches_its_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fmix64_is_murmur3s_finalizer() {
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        assert_eq!(fmix64(2), 0x3abf_2a20_6506_83e7);
        // A bijection: distinct inputs stay distinct, and one flipped bit changes about half
        // of the output bits.
        let a = fmix64(1);
        let b = fmix64(2);
        assert_ne!(a, b);
        let flips = (a ^ b).count_ones();
        assert!((16..=48).contains(&flips), "{flips} bits differ");
    }

    #[test]
    fn hash32_is_pinned() {
        // Rings in different processes and releases must agree: these values never change.
        // (Computed independently, with a few lines of Python, when this was written.)
        assert_eq!(hash32(b""), 0xEFD0_1F60);
        assert_eq!(hash32(b"123456789"), 0xC75E_35EC);
        assert_eq!(hash32(b"10.0.0.1:80#0"), 0xD988_28FA);
    }

    #[test]
    fn lua_functions_give_the_same_integers_and_raise_on_misuse() {
        let lua = Lua::new();
        let t = lua.create_table().unwrap();
        register(&lua, &t).unwrap();
        lua.globals().set("h", t).unwrap();
        let got: (i64, i64, i64, i64) = lua
            .load(r#"return h.crc32("123456789"), h.hash32("123456789"), h.hash32("\0\255"), h.hash32("", "extra")"#)
            .eval()
            .unwrap();
        assert_eq!(
            got,
            (
                0xCBF4_3926,
                0xC75E_35EC,
                hash32(b"\0\xff") as i64,
                hash32(b"") as i64
            )
        );
        for (call, what) in [
            (
                "h.crc32(1)",
                "luaproxy.crc32' (string expected, got integer)",
            ),
            ("h.hash32()", "luaproxy.hash32' (string expected, got nil)"),
            (
                "h.hash32({})",
                "luaproxy.hash32' (string expected, got table)",
            ),
        ] {
            let err = lua.load(call).exec().unwrap_err().to_string();
            assert!(err.contains(what), "{call}: {err}");
        }
    }

    #[test]
    fn hash32_spreads_near_keys() {
        // "k0".."k9999" into 16 buckets by the top 4 bits: each within 15 % of the mean 625.
        let mut buckets = [0u32; 16];
        for i in 0..10_000 {
            buckets[(hash32(format!("k{i}").as_bytes()) >> 28) as usize] += 1;
        }
        for (i, &n) in buckets.iter().enumerate() {
            assert!((531..=719).contains(&n), "bucket {i}: {n}");
        }
    }
}
