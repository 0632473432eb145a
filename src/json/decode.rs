//! JSON text to Lua values, built with the C API inside one call, as cjson does: going through
//! mlua's safe handles cost a registry reference per string and table (measured at ~0.4x
//! cjson's decode speed). Nothing with a destructor that matters is alive across a Lua API
//! call, so a memory error raised by Lua only leaks the scratch buffer.

use super::settings::Settings;
use super::stack;
use super::text::{parse_number, unescape, Number};
use mlua::ffi;
use std::borrow::Cow;
use std::os::raw::c_int;

pub struct RawDecoder<'a> {
    s: &'a [u8],
    i: usize,
    /// Stack index of `array_mt`, set on decoded arrays when `decode_array_mt` is on.
    mt: c_int,
    lenient: bool,
    array_mt: bool,
    max_depth: usize,
    pub err: Option<(Cow<'static, str>, usize)>,
    buf: Vec<u8>,
    stack: stack::Guard,
}

impl<'a> RawDecoder<'a> {
    pub fn new(s: &'a [u8], cfg: &Settings, mt: c_int) -> Self {
        RawDecoder {
            s,
            i: 0,
            mt,
            lenient: cfg.decode_invalid,
            array_mt: cfg.decode_array_mt,
            max_depth: cfg.decode_max_depth as usize,
            err: None,
            buf: Vec::new(),
            stack: stack::Guard::default(),
        }
    }

    fn fail(&mut self, what: impl Into<Cow<'static, str>>) -> bool {
        if self.err.is_none() {
            self.err = Some((what.into(), self.i + 1));
        }
        false
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    /// Pushes the whole text's value and returns true, or pushes nothing and returns false
    /// with `err` set.
    ///
    /// # Safety
    /// `l` is a Lua state of this thread inside a call Lua made, `mt` a valid index (capi.rs).
    pub unsafe fn document(&mut self, l: *mut ffi::lua_State) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if !self.value(l, 0) {
                return false;
            }
            self.ws();
            if self.i != self.s.len() {
                ffi::lua_pop(l, 1);
                return self.fail("trailing garbage");
            }
            true
        }
    }

    /// Pushes one value and returns true, or pushes nothing and returns false.
    ///
    /// # Safety
    /// As `document`.
    unsafe fn value(&mut self, l: *mut ffi::lua_State, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            self.ws();
            match self.s.get(self.i) {
                None => self.fail("unexpected end of input"),
                Some(b'{') => self.object(l, depth + 1),
                Some(b'[') => self.array(l, depth + 1),
                Some(b'"') => self.string(l),
                Some(b't') => self.literal(l, b"true"),
                Some(b'f') => self.literal(l, b"false"),
                Some(b'n') if !self.lenient || self.s[self.i..].starts_with(b"null") => {
                    self.literal(l, b"null")
                }
                Some(b'-' | b'0'..=b'9') => self.number(l),
                Some(b'+' | b'i' | b'I' | b'n' | b'N') if self.lenient => self.number(l),
                Some(_) => self.fail("unexpected character"),
            }
        }
    }

    /// # Safety
    /// As `document`.
    unsafe fn literal(&mut self, l: *mut ffi::lua_State, word: &[u8]) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if !self.s[self.i..].starts_with(word) {
                return self.fail("invalid literal");
            }
            self.i += word.len();
            match word[0] {
                b't' => ffi::lua_pushboolean(l, 1),
                b'f' => ffi::lua_pushboolean(l, 0),
                _ => ffi::lua_pushlightuserdata(l, std::ptr::null_mut()),
            }
            true
        }
    }

    /// # Safety
    /// As `document`.
    unsafe fn number(&mut self, l: *mut ffi::lua_State) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            match parse_number(&self.s[self.i..], self.lenient) {
                Ok((n, used)) => {
                    self.i += used;
                    match n {
                        Number::Int(i) => ffi::lua_pushinteger(l, i as _),
                        Number::Float(f) => ffi::lua_pushnumber(l, f),
                    }
                    true
                }
                Err(what) => self.fail(what),
            }
        }
    }

    /// # Safety
    /// As `document`.
    unsafe fn string(&mut self, l: *mut ffi::lua_State) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if let Err(what) = unescape(self.s, &mut self.i, &mut self.buf) {
                return self.fail(what);
            }
            ffi::lua_pushlstring(l, self.buf.as_ptr() as *const _, self.buf.len());
            true
        }
    }

    /// Opens a container: checks depth and stack room, skips the bracket, pushes a new table.
    ///
    /// # Safety
    /// As `document`.
    unsafe fn open(&mut self, l: *mut ffi::lua_State, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if depth > self.max_depth {
                let max = self.max_depth;
                return self.fail(format!("nesting deeper than {max}"));
            }
            if depth > stack::CHECKED_BEYOND && !self.stack.room() {
                return self.fail("nesting too deep for the c stack");
            }
            if ffi::lua_checkstack(l, 4) == 0 {
                return self.fail("nesting too deep for the lua stack");
            }
            self.i += 1;
            ffi::lua_createtable(l, 0, 0);
            true
        }
    }

    /// After an item: `Some(true)` at the closing bracket, `None` after a comma (more to come),
    /// `Some(false)` on anything else (the container is popped).
    ///
    /// # Safety
    /// As `document`, with the container on top.
    unsafe fn separator(
        &mut self,
        l: *mut ffi::lua_State,
        close: u8,
        msg: &'static str,
    ) -> Option<bool> {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => {
                    self.i += 1;
                    None
                }
                Some(&c) if c == close => {
                    self.i += 1;
                    Some(true)
                }
                _ => {
                    ffi::lua_pop(l, 1);
                    Some(self.fail(msg))
                }
            }
        }
    }

    /// # Safety
    /// As `document`.
    unsafe fn array(&mut self, l: *mut ffi::lua_State, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if !self.open(l, depth) {
                return false;
            }
            if self.array_mt {
                ffi::lua_pushvalue(l, self.mt);
                ffi::lua_setmetatable(l, -2);
            }
            self.ws();
            if self.s.get(self.i) == Some(&b']') {
                self.i += 1;
                return true;
            }
            let mut n = 0;
            loop {
                if !self.value(l, depth) {
                    ffi::lua_pop(l, 1);
                    return false;
                }
                n += 1;
                ffi::lua_rawseti(l, -2, n as _);
                if let Some(done) = self.separator(l, b']', "expected ',' or ']'") {
                    return done;
                }
            }
        }
    }

    /// # Safety
    /// As `document`.
    unsafe fn object(&mut self, l: *mut ffi::lua_State, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if !self.open(l, depth) {
                return false;
            }
            self.ws();
            if self.s.get(self.i) == Some(&b'}') {
                self.i += 1;
                return true;
            }
            loop {
                self.ws();
                let ok = self.s.get(self.i) == Some(&b'"') && self.string(l);
                if !ok {
                    ffi::lua_pop(l, 1);
                    return self.fail("expected a string key");
                }
                self.ws();
                if self.s.get(self.i) != Some(&b':') {
                    ffi::lua_pop(l, 2);
                    return self.fail("expected ':'");
                }
                self.i += 1;
                if !self.value(l, depth) {
                    ffi::lua_pop(l, 2);
                    return false;
                }
                ffi::lua_rawset(l, -3);
                if let Some(done) = self.separator(l, b'}', "expected ',' or '}'") {
                    return done;
                }
            }
        }
    }
}
