//! Lua values to JSON text, walking the values with the C API inside one call (mlua's safe
//! handles cost a registry reference per value read), under a module instance's `Settings`.

use super::settings::Settings;
use super::stack;
use super::text::{escape_into, float_into, int_into};
use mlua::ffi;
use std::os::raw::c_int;

pub struct RawEncoder {
    pub cfg: Settings,
    /// Stack indexes of `array_mt` and `empty_array_mt`.
    pub mt: c_int,
    pub empty_mt: c_int,
    pub out: Vec<u8>,
    pub err: Option<String>,
    stack: stack::Guard,
}

impl RawEncoder {
    pub fn new(cfg: Settings, mt: c_int, empty_mt: c_int, out: Vec<u8>) -> Self {
        RawEncoder {
            cfg,
            mt,
            empty_mt,
            out,
            err: None,
            stack: stack::Guard::default(),
        }
    }

    fn fail(&mut self, why: String) -> bool {
        if self.err.is_none() {
            self.err = Some(why);
        }
        false
    }

    /// Appends the number at `idx` (a key or a value).
    ///
    /// # Safety
    /// `idx` is a number on the stack of `l` (capi.rs rules).
    unsafe fn number(&mut self, l: *mut ffi::lua_State, idx: c_int) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            // LuaJIT has no integer subtype: an integral double prints as an integer only at
            // the default precision (shortest exact form); at a precision set lower it prints
            // as cjson on LuaJIT prints every number (`%.Ng`).
            let as_int = ffi::lua_isinteger(l, idx) != 0
                && (!cfg!(feature = "luajit") || self.cfg.precision >= 17);
            if as_int {
                int_into(
                    &mut self.out,
                    ffi::lua_tointegerx(l, idx, std::ptr::null_mut()),
                );
                return true;
            }
            let f = ffi::lua_tonumberx(l, idx, std::ptr::null_mut());
            float_into(
                &mut self.out,
                f,
                self.cfg.precision,
                self.cfg.encode_invalid,
            ) || self.fail("cannot encode nan or inf".into())
        }
    }

    /// Appends the value at the absolute index `idx`; false (with `err` set) on what JSON cannot
    /// hold. The stack is as it was either way.
    ///
    /// # Safety
    /// `l` is a Lua state of this thread inside a call Lua made, `idx` a valid absolute index,
    /// `mt`/`empty_mt` valid indexes (capi.rs rules).
    pub unsafe fn value(&mut self, l: *mut ffi::lua_State, idx: c_int, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            match ffi::lua_type(l, idx) {
                ffi::LUA_TNIL => self.out.extend_from_slice(b"null"),
                ffi::LUA_TBOOLEAN => {
                    let b = ffi::lua_toboolean(l, idx) != 0;
                    self.out
                        .extend_from_slice(if b { b"true" } else { b"false" });
                }
                ffi::LUA_TNUMBER => return self.number(l, idx),
                ffi::LUA_TSTRING => {
                    let mut len = 0usize;
                    let p = ffi::lua_tolstring(l, idx, &mut len);
                    let s = std::slice::from_raw_parts(p as *const u8, len);
                    escape_into(&mut self.out, s, self.cfg.escape_slash);
                }
                ffi::LUA_TLIGHTUSERDATA if ffi::lua_touserdata(l, idx).is_null() => {
                    self.out.extend_from_slice(b"null")
                }
                ffi::LUA_TTABLE => return self.table(l, idx, depth + 1),
                t => {
                    let name = std::ffi::CStr::from_ptr(ffi::lua_typename(l, t)).to_string_lossy();
                    return self.fail(format!("cannot encode a {name}"));
                }
            }
            true
        }
    }

    /// # Safety
    /// As `value`, with a table at `idx`.
    unsafe fn table(&mut self, l: *mut ffi::lua_State, idx: c_int, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if depth > self.cfg.encode_max_depth as usize {
                let max = self.cfg.encode_max_depth;
                return self.fail(format!("nesting deeper than {max}"));
            }
            if depth > stack::CHECKED_BEYOND && !self.stack.room() {
                return self.fail("nesting too deep for the c stack".into());
            }
            if ffi::lua_checkstack(l, 6) == 0 {
                return self.fail("nesting too deep for the lua stack".into());
            }
            let (mut marked, mut empty_marked) = (false, false);
            if ffi::lua_getmetatable(l, idx) != 0 {
                marked = ffi::lua_rawequal(l, -1, self.mt) != 0;
                empty_marked = !marked && ffi::lua_rawequal(l, -1, self.empty_mt) != 0;
                ffi::lua_pop(l, 1);
            }
            // One pass over the keys decides array or object, as cjson's lua_array_length
            // does. A table marked with array_mt is an array of its positive integer keys
            // whatever else it holds (OpenResty's array_mt).
            let (mut max, mut items, mut is_array) = (0usize, 0usize, true);
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, idx) != 0 {
                let index = if ffi::lua_type(l, -2) != ffi::LUA_TNUMBER {
                    None
                } else if ffi::lua_isinteger(l, -2) != 0 {
                    let i = ffi::lua_tointegerx(l, -2, std::ptr::null_mut());
                    (i >= 1).then_some(i as usize)
                } else {
                    let f = ffi::lua_tonumberx(l, -2, std::ptr::null_mut());
                    (f >= 1.0 && f == f.trunc() && f < 9.0e15).then_some(f as usize)
                };
                ffi::lua_pop(l, 1);
                match index {
                    Some(i) => {
                        max = max.max(i);
                        items += 1;
                    }
                    None if marked => {}
                    None => {
                        ffi::lua_pop(l, 1);
                        is_array = false;
                        break;
                    }
                }
            }
            if is_array && items == 0 {
                let array = marked || empty_marked || !self.cfg.empty_table_as_object;
                self.out
                    .extend_from_slice(if array { b"[]" } else { b"{}" });
                return true;
            }
            if is_array {
                let ratio = self.cfg.sparse_ratio as usize;
                let sparse = ratio > 0
                    && max > items.saturating_mul(ratio)
                    && max > self.cfg.sparse_safe as usize;
                if !sparse {
                    return self.array(l, idx, depth, max);
                }
                if !self.cfg.sparse_convert {
                    return self.fail("excessively sparse array".into());
                }
            }
            self.object(l, idx, depth)
        }
    }

    /// # Safety
    /// As `table`.
    unsafe fn array(&mut self, l: *mut ffi::lua_State, idx: c_int, depth: usize, n: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            self.out.push(b'[');
            for i in 1..=n {
                if i > 1 {
                    self.out.push(b',');
                }
                ffi::lua_rawgeti(l, idx, i as _);
                let ok = self.value(l, ffi::lua_gettop(l), depth);
                ffi::lua_pop(l, 1);
                if !ok {
                    return false;
                }
            }
            self.out.push(b']');
            true
        }
    }

    /// # Safety
    /// As `table`.
    unsafe fn object(&mut self, l: *mut ffi::lua_State, idx: c_int, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            self.out.push(b'{');
            let mut first = true;
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, idx) != 0 {
                if !first {
                    self.out.push(b',');
                }
                first = false;
                match ffi::lua_type(l, -2) {
                    ffi::LUA_TSTRING => {
                        let mut len = 0usize;
                        let p = ffi::lua_tolstring(l, -2, &mut len);
                        let s = std::slice::from_raw_parts(p as *const u8, len);
                        escape_into(&mut self.out, s, self.cfg.escape_slash);
                    }
                    ffi::LUA_TNUMBER => {
                        // Formatted here, not with lua_tolstring, which would turn the key
                        // into a string in place and break lua_next. Number text needs no
                        // escapes.
                        self.out.push(b'"');
                        if !self.number(l, -2) {
                            ffi::lua_pop(l, 2);
                            return false;
                        }
                        self.out.push(b'"');
                    }
                    t => {
                        let name = std::ffi::CStr::from_ptr(ffi::lua_typename(l, t))
                            .to_string_lossy()
                            .into_owned();
                        ffi::lua_pop(l, 2);
                        return self.fail(format!("cannot encode a table key of type {name}"));
                    }
                }
                self.out.push(b':');
                let ok = self.value(l, ffi::lua_gettop(l), depth);
                ffi::lua_pop(l, 1);
                if !ok {
                    ffi::lua_pop(l, 1);
                    return false;
                }
            }
            self.out.push(b'}');
            true
        }
    }
}
