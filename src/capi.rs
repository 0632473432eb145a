//! Raw Lua C-API helpers, and the rules every piece of raw code in this crate keeps.
//!
//! mlua's safe API costs a protected call, a type check and value conversions per call; the
//! hot paths (request methods, dict methods, JSON, `req:proxy`) are plain C functions
//! instead. Their rules, stated once:
//! - A raw function runs only on the Lua state of the thread that owns it, inside a call
//!   Lua made (so the stack is its own), and leaves the stack balanced.
//! - Nothing with an important destructor (a borrow, an `Rc`, a lock) is alive across a Lua
//!   call that can raise: such calls (`lua_call`, allocation) come after those are dropped,
//!   or the code hands the work to the mlua function kept as the C closure's upvalue 1
//!   (`fallback`), which raises through mlua's protected machinery. A memory error at worst
//!   leaks a scratch buffer.
//! - Anything unusual (wrong argument count or types, a request that has ended, a value the
//!   fast path does not handle) goes to that fallback, so error messages live in one place.
//! - Every `unsafe` block says why it holds in a `SAFETY:` line.

use mlua::ffi;
use std::os::raw::{c_char, c_int};

/// Calls the mlua function kept as upvalue 1 of the running C function with this call's
/// arguments and returns what it returns: the slow path of the C fast paths.
///
/// # Safety
/// `l` must be the state of a running C closure whose upvalue 1 is a function.
pub unsafe fn fallback(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let n = ffi::lua_gettop(l);
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        ffi::lua_insert(l, 1);
        ffi::lua_call(l, n, ffi::LUA_MULTRET);
        ffi::lua_gettop(l)
    }
}

/// Pushes `b` as a Lua string (a copy; raises only on memory exhaustion).
///
/// # Safety
/// `l` must be a valid Lua state of this thread with room for one more stack slot.
pub unsafe fn push_bytes(l: *mut ffi::lua_State, b: &[u8]) {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        ffi::lua_pushlstring(l, b.as_ptr() as *const c_char, b.len());
    }
}

/// What a raw C function's body returns: its result count, or the message to raise.
pub type RawResult = Result<c_int, String>;

/// Raises `msg` as a Lua error (a longjmp: `msg` is copied to Lua and dropped first).
///
/// # Safety
/// `l` must be the state of a running C function, with nothing pending a destructor in the
/// caller's frames (capi.rs rules).
pub unsafe fn raise(l: *mut ffi::lua_State, msg: String) -> ! {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        ffi::lua_pushlstring(l, msg.as_ptr() as *const c_char, msg.len());
        drop(msg);
        ffi::lua_error(l)
    }
}
