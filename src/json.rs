//! `luaproxy.json`: a `cjson.safe`-compatible encoder and decoder that goes straight between
//! Lua values and JSON text with the Lua C API (no intermediate tree, no per-value registry
//! references). Bad input is `nil, err`, never an error.
//!
//! size: the encoder and the decoder walk the same raw Lua stack under the same rules
//! (capi.rs), and share the number and string handling; apart they would repeat it.
//!
//! Chosen differences from lua-cjson 2.1 (tested in spec/json_spec.lua):
//! - numbers keep their Lua 5.4 subtype: `1` decodes to the integer 1 (cjson: 1.0); integers
//!   encode exactly (cjson: `%.14g`, so 2^53 became 9.007199254741e+15); floats encode in the
//!   shortest form that reads back to the same float (cjson: 14 significant digits);
//! - decoded arrays carry `json.array_mt`, so `[]` survives a decode/encode round trip as `[]`
//!   (cjson's `decode_array_with_array_mt(true)`).

use mlua::ffi;
use mlua::prelude::*;
use mlua::LuaSerdeExt;

const MAX_DEPTH: usize = 1000;
/// cjson's default `encode_sparse_array(false, 2, 10)`: an array whose highest index is over 10
/// and more than twice its element count is refused rather than padded with nulls.
const SPARSE_RATIO: usize = 2;
const SPARSE_SAFE: usize = 10;

fn escape_into(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &c in s {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' => out.extend_from_slice(b"\\/"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            c => out.push(c),
        }
    }
    out.push(b'"');
}

fn float_into(out: &mut Vec<u8>, f: f64) -> Result<(), String> {
    if !f.is_finite() {
        return Err("cannot encode nan or inf".into());
    }
    if f == f.trunc() && f.abs() < 1e15 {
        // Integral floats print like integers (cjson does the same), keeping -0 as "-0".
        if f == 0.0 && f.is_sign_negative() {
            out.extend_from_slice(b"-0");
        } else {
            out.extend_from_slice(format!("{}", f as i64).as_bytes());
        }
        return Ok(());
    }
    let mut buf = ryu::Buffer::new();
    out.extend_from_slice(buf.format_finite(f).as_bytes());
    Ok(())
}

/// The encoder walks values with the C API inside one protected call (same reason as the
/// decoder: mlua's safe handles cost a registry reference per value read).
struct RawEncoder {
    /// Stack index of the array metatable.
    mt: std::os::raw::c_int,
    out: Vec<u8>,
    err: Option<String>,
}

impl RawEncoder {
    fn fail(&mut self, why: String) -> bool {
        if self.err.is_none() {
            self.err = Some(why);
        }
        false
    }

    unsafe fn value(
        &mut self,
        l: *mut ffi::lua_State,
        idx: std::os::raw::c_int,
        depth: usize,
    ) -> bool {
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
                ffi::LUA_TNUMBER => {
                    if ffi::lua_isinteger(l, idx) != 0 {
                        let i = ffi::lua_tointegerx(l, idx, std::ptr::null_mut());
                        self.out.extend_from_slice(i.to_string().as_bytes());
                    } else if let Err(e) = float_into(
                        &mut self.out,
                        ffi::lua_tonumberx(l, idx, std::ptr::null_mut()),
                    ) {
                        return self.fail(e);
                    }
                }
                ffi::LUA_TSTRING => {
                    let mut len = 0usize;
                    let p = ffi::lua_tolstring(l, idx, &mut len);
                    escape_into(
                        &mut self.out,
                        std::slice::from_raw_parts(p as *const u8, len),
                    );
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

    unsafe fn table(
        &mut self,
        l: *mut ffi::lua_State,
        idx: std::os::raw::c_int,
        depth: usize,
    ) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if depth > MAX_DEPTH {
                return self.fail("nesting deeper than 1000".into());
            }
            if ffi::lua_checkstack(l, 6) == 0 {
                return self.fail("nesting too deep for the lua stack".into());
            }
            let mut marked = false;
            if ffi::lua_getmetatable(l, idx) != 0 {
                marked = ffi::lua_rawequal(l, -1, self.mt) != 0;
                ffi::lua_pop(l, 1);
            }
            // One pass over the keys decides array or object, as cjson's lua_array_length does.
            let (mut max, mut items, mut is_array) = (0usize, 0usize, true);
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, idx) != 0 {
                items += 1;
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
                    Some(i) => max = max.max(i),
                    None => {
                        ffi::lua_pop(l, 1);
                        is_array = false;
                        break;
                    }
                }
            }
            if is_array && (items > 0 || marked) {
                if max > SPARSE_SAFE && max > items * SPARSE_RATIO {
                    return self.fail("excessively sparse array".into());
                }
                self.out.push(b'[');
                for i in 1..=max {
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
                return true;
            }
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
                        escape_into(
                            &mut self.out,
                            std::slice::from_raw_parts(p as *const u8, len),
                        );
                    }
                    ffi::LUA_TNUMBER => {
                        // Format a number key without lua_tolstring, which would turn the key
                        // into a string in place and break lua_next.
                        let mut tmp = Vec::new();
                        if ffi::lua_isinteger(l, -2) != 0 {
                            tmp.extend_from_slice(
                                ffi::lua_tointegerx(l, -2, std::ptr::null_mut())
                                    .to_string()
                                    .as_bytes(),
                            );
                        } else if let Err(e) =
                            float_into(&mut tmp, ffi::lua_tonumberx(l, -2, std::ptr::null_mut()))
                        {
                            ffi::lua_pop(l, 2);
                            return self.fail(e);
                        }
                        escape_into(&mut self.out, &tmp);
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

/// Encodes a Lua value as JSON text. Lua strings are bytes, and so is the result: bytes above
/// 0x7F pass through unchanged, as with cjson.
pub fn encode_value(lua: &Lua, v: &LuaValue) -> Result<Vec<u8>, String> {
    let mut enc = RawEncoder {
        mt: 1,
        out: Vec::with_capacity(256),
        err: None,
    };
    // SAFETY: the closure works on the stack exec_raw hands it (the metatable and the
    // value), following capi.rs's rules; nothing with a destructor is held across a raise.
    let res: LuaResult<()> = unsafe {
        lua.exec_raw((lua.array_metatable(), v.clone()), |l| {
            enc.mt = ffi::lua_gettop(l) - 1;
            let top = ffi::lua_gettop(l);
            enc.value(l, top, 0);
            ffi::lua_settop(l, enc.mt - 1);
        })
    };
    res.map_err(|e| e.to_string())?;
    match enc.err {
        Some(e) => Err(e),
        None => Ok(enc.out),
    }
}

/// The decoder builds Lua values with the C API inside one protected call, as cjson does:
/// going through mlua's safe handles cost a registry reference per string and table (measured
/// at ~0.4x cjson's decode speed). Nothing with a destructor that matters is alive across a Lua
/// API call, so a memory error raised by Lua only leaks the scratch buffer.
struct RawDecoder<'a> {
    s: &'a [u8],
    i: usize,
    /// Stack index of the array metatable.
    mt: std::os::raw::c_int,
    err: Option<(&'static str, usize)>,
    buf: Vec<u8>,
}

impl RawDecoder<'_> {
    fn fail(&mut self, what: &'static str) -> bool {
        if self.err.is_none() {
            self.err = Some((what, self.i + 1));
        }
        false
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    /// Pushes one value and returns true, or pushes nothing and returns false.
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
                Some(b'n') => self.literal(l, b"null"),
                Some(b'-' | b'0'..=b'9') => self.number(l),
                Some(_) => self.fail("unexpected character"),
            }
        }
    }

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

    fn digits(&mut self) -> usize {
        let from = self.i;
        while let Some(b'0'..=b'9') = self.s.get(self.i) {
            self.i += 1;
        }
        self.i - from
    }

    unsafe fn number(&mut self, l: *mut ffi::lua_State) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            let start = self.i;
            if self.s.get(self.i) == Some(&b'-') {
                self.i += 1;
            }
            let int_start = self.i;
            let n = self.digits();
            if n == 0 || (n > 1 && self.s[int_start] == b'0') {
                return self.fail("invalid number");
            }
            let mut float = false;
            if self.s.get(self.i) == Some(&b'.') {
                self.i += 1;
                float = true;
                if self.digits() == 0 {
                    return self.fail("invalid number");
                }
            }
            if let Some(b'e' | b'E') = self.s.get(self.i) {
                self.i += 1;
                float = true;
                if let Some(b'+' | b'-') = self.s.get(self.i) {
                    self.i += 1;
                }
                if self.digits() == 0 {
                    return self.fail("invalid number");
                }
            }
            // Only ASCII digits, signs, '.' and exponents were accepted above.
            let text = std::str::from_utf8_unchecked(&self.s[start..self.i]);
            if !float {
                if let Ok(i) = text.parse::<i64>() {
                    ffi::lua_pushinteger(l, i as _);
                    return true;
                }
            }
            match text.parse::<f64>() {
                Ok(f) => {
                    ffi::lua_pushnumber(l, f);
                    true
                }
                Err(_) => self.fail("invalid number"),
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        let mut v = 0u32;
        for &c in h {
            v = v * 16 + (c as char).to_digit(16)?;
        }
        self.i += 4;
        Some(v)
    }

    /// Decodes the string at `self.i` into `self.buf` (escapes resolved).
    fn string_bytes(&mut self) -> bool {
        self.i += 1;
        self.buf.clear();
        loop {
            // Copy a run of plain bytes at once.
            let run = self.s[self.i..]
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(self.s.len() - self.i);
            self.buf.extend_from_slice(&self.s[self.i..self.i + run]);
            self.i += run;
            let Some(&c) = self.s.get(self.i) else {
                return self.fail("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => return true,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return self.fail("unterminated string");
                    };
                    self.i += 1;
                    match e {
                        b'"' => self.buf.push(b'"'),
                        b'\\' => self.buf.push(b'\\'),
                        b'/' => self.buf.push(b'/'),
                        b'b' => self.buf.push(0x08),
                        b'f' => self.buf.push(0x0c),
                        b'n' => self.buf.push(b'\n'),
                        b'r' => self.buf.push(b'\r'),
                        b't' => self.buf.push(b'\t'),
                        b'u' => {
                            let Some(mut cp) = self.hex4() else {
                                return self.fail("invalid unicode escape");
                            };
                            if (0xD800..0xDC00).contains(&cp) {
                                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return self.fail("lone surrogate in unicode escape");
                                }
                                self.i += 2;
                                match self.hex4() {
                                    Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                                    }
                                    _ => return self.fail("invalid surrogate pair"),
                                }
                            } else if (0xDC00..0xE000).contains(&cp) {
                                return self.fail("lone surrogate in unicode escape");
                            }
                            let Some(ch) = char::from_u32(cp) else {
                                return self.fail("invalid unicode escape");
                            };
                            let mut tmp = [0u8; 4];
                            self.buf
                                .extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                        }
                        _ => return self.fail("invalid escape"),
                    }
                }
                _ => return self.fail("control character in string"),
            }
        }
    }

    unsafe fn string(&mut self, l: *mut ffi::lua_State) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if !self.string_bytes() {
                return false;
            }
            ffi::lua_pushlstring(l, self.buf.as_ptr() as *const _, self.buf.len());
            true
        }
    }

    /// Opens a container: checks depth and stack room, skips the bracket, pushes a new table.
    unsafe fn open(&mut self, l: *mut ffi::lua_State, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if depth > MAX_DEPTH {
                return self.fail("nesting deeper than 1000");
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

    unsafe fn array(&mut self, l: *mut ffi::lua_State, depth: usize) -> bool {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if !self.open(l, depth) {
                return false;
            }
            ffi::lua_pushvalue(l, self.mt);
            ffi::lua_setmetatable(l, -2);
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

/// Decodes JSON text into a Lua value: `Ok(value)` or `Err("what at character N")`.
pub fn decode_value(lua: &Lua, text: &[u8]) -> LuaResult<Result<LuaValue, String>> {
    let mut err = None;
    // SAFETY: as in `encode_value`: raw stack work inside exec_raw under capi.rs's rules.
    let v: LuaValue = unsafe {
        lua.exec_raw(lua.array_metatable(), |l| {
            let mut d = RawDecoder {
                s: text,
                i: 0,
                mt: ffi::lua_gettop(l),
                err: None,
                buf: Vec::new(),
            };
            let ok = d.value(l, 0) && {
                d.ws();
                d.i == text.len() || d.fail("trailing garbage")
            };
            if !ok {
                ffi::lua_settop(l, d.mt);
                ffi::lua_pushnil(l);
                err = d.err;
            }
            ffi::lua_remove(l, d.mt);
        })?
    };
    Ok(match err {
        None => Ok(v),
        Some((what, at)) => Err(format!("{what} at character {at}")),
    })
}

thread_local! {
    /// The encoder's output buffer, reused between calls. Taken out while in use, so a Lua
    /// memory error in between loses the buffer, nothing else.
    static ENCODE_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

// `encode` and `decode` are plain C functions, as cjson's are: going through mlua's function
// call and protected call were most of the time for a small object (small decode 0.82x cjson,
// encode 0.80x before, 1.1-1.4x after; BENCHMARKS.md, JSON). Upvalue 1 is the array
// metatable. Memory errors raised by Lua unwind past them leaking only a buffer.

/// `text, err = luaproxy.json.encode(value)`
unsafe extern "C-unwind" fn raw_encode(l: *mut ffi::lua_State) -> std::os::raw::c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        ffi::lua_settop(l, 1);
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        let mut out = ENCODE_BUF.take();
        out.clear();
        let mut enc = RawEncoder {
            mt: 2,
            out,
            err: None,
        };
        enc.value(l, 1, 0);
        ffi::lua_settop(l, 0);
        let n = match &enc.err {
            None => {
                ffi::lua_pushlstring(l, enc.out.as_ptr() as *const _, enc.out.len());
                1
            }
            Some(e) => {
                ffi::lua_pushnil(l);
                ffi::lua_pushlstring(l, e.as_ptr() as *const _, e.len());
                2
            }
        };
        if enc.out.capacity() <= 1 << 20 {
            ENCODE_BUF.set(std::mem::take(&mut enc.out));
        }
        n
    }
}

/// `value, err = luaproxy.json.decode(text)`; JSON null decodes to `luaproxy.json.null`.
unsafe extern "C-unwind" fn raw_decode(l: *mut ffi::lua_State) -> std::os::raw::c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        ffi::lua_settop(l, 1);
        let t = ffi::lua_type(l, 1);
        if t != ffi::LUA_TSTRING {
            let name = std::ffi::CStr::from_ptr(ffi::lua_typename(l, t)).to_string_lossy();
            let msg = format!("expected a string, got a {name}");
            ffi::lua_pushnil(l);
            ffi::lua_pushlstring(l, msg.as_ptr() as *const _, msg.len());
            return 2;
        }
        let mut len = 0;
        let p = ffi::lua_tolstring(l, 1, &mut len);
        // The text stays on the stack (index 1) for as long as this slice is used.
        let text = std::slice::from_raw_parts(p as *const u8, len);
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        let mut d = RawDecoder {
            s: text,
            i: 0,
            mt: 2,
            err: None,
            buf: Vec::new(),
        };
        let ok = d.value(l, 0) && {
            d.ws();
            d.i == text.len() || d.fail("trailing garbage")
        };
        if ok {
            return 1;
        }
        ffi::lua_settop(l, 2);
        ffi::lua_pushnil(l);
        let (what, at) = d.err.unwrap_or(("invalid json", 0));
        let msg = format!("invalid json: {what} at character {at}");
        ffi::lua_pushlstring(l, msg.as_ptr() as *const _, msg.len());
        2
    }
}

/// A C closure over `f` with the array metatable as its upvalue.
fn c_closure(lua: &Lua, f: ffi::lua_CFunction) -> LuaResult<LuaFunction> {
    // SAFETY: pushes the upvalue and makes the closure, nothing else.
    unsafe {
        lua.exec_raw(lua.array_metatable(), |l| {
            ffi::lua_pushcclosure(l, f, 1);
        })
    }
}

pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.set("encode", c_closure(lua, raw_encode)?)?;
    t.set("decode", c_closure(lua, raw_decode)?)?;
    t.set("null", lua.null())?;
    t.set("array_mt", lua.array_metatable())?;
    let empty = lua.create_table()?;
    empty.set_metatable(Some(lua.array_metatable()))?;
    t.set("empty_array", empty)?;
    Ok(t)
}
