//! The function every protected call runs first in its coroutine (`runtime::protected_call`):
//! `ok, ... = entry(f, ...)` is `xpcall(f, handler, ...)` after telling `budget.rs` which
//! coroutine this is.

#[cfg(not(feature = "luajit"))]
mod imp {
    use mlua::ffi;
    use mlua::prelude::*;
    use std::os::raw::c_int;

    /// One C function with the handler as upvalue 1. A Lua wrapper calling a C `mark` and
    /// then `xpcall` cost a Lua call frame and a C call more per request (~250
    /// instructions: callgrind, post5k); this is what `xpcall` does inside, with the mark.
    pub fn make(lua: &Lua, handler: LuaFunction) -> LuaResult<LuaFunction> {
        // SAFETY: the closure is built on the stack exec_raw hands over (the handler on it).
        unsafe { lua.exec_raw(handler, |l| ffi::lua_pushcclosure(l, entry, 1)) }
    }

    unsafe extern "C-unwind" fn entry(l: *mut ffi::lua_State) -> c_int {
        // SAFETY: a C function Lua calls (capi.rs rules), with `f` and its arguments on the
        // stack; lua_pcallk with a continuation may yield, as xpcall's own code does.
        unsafe {
            crate::budget::mark(l);
            let n = ffi::lua_gettop(l);
            ffi::luaL_checkstack(l, 1, std::ptr::null());
            ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
            ffi::lua_rotate(l, 1, 1);
            let status = ffi::lua_pcallk(l, n - 1, ffi::LUA_MULTRET, 1, 0, Some(cont));
            finish(l, status)
        }
    }

    unsafe extern "C-unwind" fn cont(
        l: *mut ffi::lua_State,
        status: c_int,
        _: ffi::lua_KContext,
    ) -> c_int {
        // SAFETY: Lua resumes the call here after a yield inside it (capi.rs rules).
        unsafe { finish(l, status) }
    }

    /// The handler's slot becomes the status: `true, results...` or `false, message`.
    unsafe fn finish(l: *mut ffi::lua_State, status: c_int) -> c_int {
        // SAFETY: the stack is [handler, results...] as lua_pcallk left it.
        unsafe {
            let ok = status == ffi::LUA_OK || status == ffi::LUA_YIELD;
            ffi::lua_pushboolean(l, ok as c_int);
            ffi::lua_replace(l, 1);
            ffi::lua_gettop(l)
        }
    }
}

/// LuaJIT cannot yield across a `lua_pcall` made from C: a Lua wrapper calls `mark`, then
/// `xpcall`, which LuaJIT lets yield.
#[cfg(feature = "luajit")]
mod imp {
    use mlua::prelude::*;

    pub fn make(lua: &Lua, handler: LuaFunction) -> LuaResult<LuaFunction> {
        // SAFETY: `mark` keeps the raw-code rules of capi.rs (it only records its state).
        let mark = unsafe { lua.create_c_function(crate::budget::mark)? };
        lua.load(
            r#"
            local mark, handler = ...
            local xpcall = xpcall
            return function(f, ...) mark() return xpcall(f, handler, ...) end
            "#,
        )
        .set_name("=luaproxy")
        .call((mark, handler))
    }
}

pub use imp::make;
