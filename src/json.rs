//! `luaproxy.json`: a `cjson.safe`-compatible encoder and decoder that goes straight between
//! Lua values and JSON text (no intermediate tree). Bad input is `nil, err`, never an error.
//!
//! Chosen differences from lua-cjson 2.1 (tested in spec/json_spec.lua):
//! - numbers keep their Lua 5.4 subtype: `1` decodes to the integer 1 (cjson: 1.0); integers
//!   encode exactly (cjson: `%.14g`, so 2^53 became 9.007199254741e+15); floats encode in the
//!   shortest form that reads back to the same float (cjson: 14 significant digits);
//! - decoded arrays carry `json.array_mt`, so `[]` survives a decode/encode round trip as `[]`
//!   (cjson's `decode_array_with_array_mt(true)`).

use mlua::prelude::*;
use mlua::LuaSerdeExt;

const MAX_DEPTH: usize = 1000;
/// cjson's default `encode_sparse_array(false, 2, 10)`: an array whose highest index is over 10
/// and more than twice its element count is refused rather than padded with nulls.
const SPARSE_RATIO: usize = 2;
const SPARSE_SAFE: usize = 10;

struct Encoder {
    array_mt: Option<LuaTable>,
    out: Vec<u8>,
}

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

impl Encoder {
    fn value(&mut self, v: &LuaValue, depth: usize) -> Result<(), String> {
        match v {
            LuaValue::Nil => self.out.extend_from_slice(b"null"),
            LuaValue::LightUserData(p) if p.0.is_null() => self.out.extend_from_slice(b"null"),
            LuaValue::Boolean(b) => self
                .out
                .extend_from_slice(if *b { b"true" } else { b"false" }),
            LuaValue::Integer(i) => self.out.extend_from_slice(i.to_string().as_bytes()),
            LuaValue::Number(f) => float_into(&mut self.out, *f)?,
            LuaValue::String(s) => escape_into(&mut self.out, &s.as_bytes()),
            LuaValue::Table(t) => self.table(t, depth + 1)?,
            other => return Err(format!("cannot encode a {}", other.type_name())),
        }
        Ok(())
    }

    fn table(&mut self, t: &LuaTable, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("nesting deeper than 1000".into());
        }
        let marked = match (&self.array_mt, t.metatable()) {
            (Some(a), Some(m)) => a == &m,
            _ => false,
        };
        // One pass over the keys decides array or object, as cjson's lua_array_length does.
        let mut max = 0usize;
        let mut items = 0usize;
        let mut is_array = true;
        for pair in t.pairs::<LuaValue, LuaValue>() {
            let (k, _) = pair.map_err(|e| e.to_string())?;
            items += 1;
            let idx = match k {
                LuaValue::Integer(i) if i >= 1 => Some(i as usize),
                LuaValue::Number(f) if f >= 1.0 && f == f.trunc() && f < 9.0e15 => Some(f as usize),
                _ => None,
            };
            match idx {
                Some(i) => max = max.max(i),
                None => {
                    is_array = false;
                    break;
                }
            }
        }
        if is_array && (items > 0 || marked) {
            if max > SPARSE_SAFE && max > items * SPARSE_RATIO {
                return Err("excessively sparse array".into());
            }
            self.out.push(b'[');
            for i in 1..=max {
                if i > 1 {
                    self.out.push(b',');
                }
                let v: LuaValue = t.raw_get(i).map_err(|e| e.to_string())?;
                self.value(&v, depth)?;
            }
            self.out.push(b']');
            return Ok(());
        }
        self.out.push(b'{');
        let mut first = true;
        for pair in t.pairs::<LuaValue, LuaValue>() {
            let (k, v) = pair.map_err(|e| e.to_string())?;
            if !first {
                self.out.push(b',');
            }
            first = false;
            match &k {
                LuaValue::String(s) => escape_into(&mut self.out, &s.as_bytes()),
                LuaValue::Integer(i) => escape_into(&mut self.out, i.to_string().as_bytes()),
                LuaValue::Number(f) => {
                    let mut tmp = Vec::new();
                    float_into(&mut tmp, *f)?;
                    escape_into(&mut self.out, &tmp);
                }
                other => {
                    return Err(format!(
                        "cannot encode a table key of type {}",
                        other.type_name()
                    ))
                }
            }
            self.out.push(b':');
            self.value(&v, depth)?;
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// Encodes a Lua value as JSON text. Lua strings are bytes, and so is the result: bytes above
/// 0x7F pass through unchanged, as with cjson.
pub fn encode_value(lua: &Lua, v: &LuaValue) -> Result<Vec<u8>, String> {
    let mut enc = Encoder {
        array_mt: Some(lua.array_metatable()),
        out: Vec::with_capacity(128),
    };
    enc.value(v, 0)?;
    Ok(enc.out)
}

struct Decoder<'a> {
    lua: &'a Lua,
    s: &'a [u8],
    i: usize,
    array_mt: LuaTable,
}

type DResult<T> = Result<T, String>;

impl Decoder<'_> {
    fn err<T>(&self, what: &str) -> DResult<T> {
        Err(format!("{what} at character {}", self.i + 1))
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> DResult<LuaValue> {
        self.ws();
        match self.s.get(self.i) {
            None => self.err("unexpected end of input"),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => {
                let b = self.string()?;
                Ok(LuaValue::String(
                    self.lua.create_string(&b).map_err(|e| e.to_string())?,
                ))
            }
            Some(b't') => self.literal(b"true", LuaValue::Boolean(true)),
            Some(b'f') => self.literal(b"false", LuaValue::Boolean(false)),
            Some(b'n') => self.literal(b"null", LuaValue::NULL),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => self.err("unexpected character"),
        }
    }

    fn literal(&mut self, word: &[u8], v: LuaValue) -> DResult<LuaValue> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(v)
        } else {
            self.err("invalid literal")
        }
    }

    fn number(&mut self) -> DResult<LuaValue> {
        let start = self.i;
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let digits = |d: &mut Self| {
            let from = d.i;
            while let Some(b'0'..=b'9') = d.s.get(d.i) {
                d.i += 1;
            }
            d.i - from
        };
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.s[int_start] == b'0') {
            return self.err("invalid number");
        }
        let mut float = false;
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            float = true;
            if digits(self) == 0 {
                return self.err("invalid number");
            }
        }
        if let Some(b'e' | b'E') = self.s.get(self.i) {
            self.i += 1;
            float = true;
            if let Some(b'+' | b'-') = self.s.get(self.i) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return self.err("invalid number");
            }
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("x");
        if !float {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(LuaValue::Integer(i));
            }
        }
        match text.parse::<f64>() {
            Ok(f) => Ok(LuaValue::Number(f)),
            Err(_) => self.err("invalid number"),
        }
    }

    fn hex4(&mut self) -> DResult<u32> {
        let h = self
            .s
            .get(self.i..self.i + 4)
            .ok_or("truncated unicode escape")?;
        let s = std::str::from_utf8(h).map_err(|_| "invalid unicode escape")?;
        let v = u32::from_str_radix(s, 16)
            .map_err(|_| format!("invalid unicode escape at character {}", self.i + 1))?;
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> DResult<Vec<u8>> {
        self.i += 1; // opening quote
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else {
                return self.err("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return self.err("unterminated string");
                    };
                    self.i += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xD800..0xDC00).contains(&cp) {
                                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return self.err("lone surrogate in unicode escape");
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return self.err("invalid surrogate pair");
                                }
                                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                            } else if (0xDC00..0xE000).contains(&cp) {
                                return self.err("lone surrogate in unicode escape");
                            }
                            let ch = char::from_u32(cp).ok_or("invalid unicode escape")?;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return self.err("invalid escape"),
                    }
                }
                0..=0x1f => return self.err("control character in string"),
                c => out.push(c),
            }
        }
    }

    fn array(&mut self, depth: usize) -> DResult<LuaValue> {
        if depth > MAX_DEPTH {
            return self.err("nesting deeper than 1000");
        }
        self.i += 1;
        let t = self.lua.create_table().map_err(|e| e.to_string())?;
        t.set_metatable(Some(self.array_mt.clone()))
            .map_err(|e| e.to_string())?;
        self.ws();
        if self.s.get(self.i) == Some(&b']') {
            self.i += 1;
            return Ok(LuaValue::Table(t));
        }
        let mut n = 0;
        loop {
            let v = self.value(depth)?;
            n += 1;
            t.raw_set(n, v).map_err(|e| e.to_string())?;
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(LuaValue::Table(t));
                }
                _ => return self.err("expected ',' or ']'"),
            }
        }
    }

    fn object(&mut self, depth: usize) -> DResult<LuaValue> {
        if depth > MAX_DEPTH {
            return self.err("nesting deeper than 1000");
        }
        self.i += 1;
        let t = self.lua.create_table().map_err(|e| e.to_string())?;
        self.ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(LuaValue::Table(t));
        }
        loop {
            self.ws();
            if self.s.get(self.i) != Some(&b'"') {
                return self.err("expected a string key");
            }
            let k = self.string()?;
            self.ws();
            if self.s.get(self.i) != Some(&b':') {
                return self.err("expected ':'");
            }
            self.i += 1;
            let v = self.value(depth)?;
            t.raw_set(self.lua.create_string(&k).map_err(|e| e.to_string())?, v)
                .map_err(|e| e.to_string())?;
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(LuaValue::Table(t));
                }
                _ => return self.err("expected ',' or '}'"),
            }
        }
    }
}

/// Decodes JSON text into a Lua value.
pub fn decode_value(lua: &Lua, text: &[u8]) -> Result<LuaValue, String> {
    let mut d = Decoder {
        lua,
        s: text,
        i: 0,
        array_mt: lua.array_metatable(),
    };
    let v = d.value(0)?;
    d.ws();
    if d.i != text.len() {
        return d.err("trailing garbage");
    }
    Ok(v)
}

/// `text, err = luaproxy.json.encode(value)`
fn lua_encode(lua: &Lua, v: LuaValue) -> LuaResult<(Option<LuaString>, Option<String>)> {
    match encode_value(lua, &v) {
        Ok(s) => Ok((Some(lua.create_string(s)?), None)),
        Err(e) => Ok((None, Some(e))),
    }
}

/// `value, err = luaproxy.json.decode(text)`; JSON null decodes to `luaproxy.json.null`.
fn lua_decode(lua: &Lua, text: LuaValue) -> LuaResult<(LuaValue, Option<String>)> {
    let LuaValue::String(text) = text else {
        return Ok((
            LuaValue::Nil,
            Some(format!("expected a string, got a {}", text.type_name())),
        ));
    };
    match decode_value(lua, &text.as_bytes()) {
        Ok(v) => Ok((v, None)),
        Err(e) => Ok((LuaValue::Nil, Some(format!("invalid json: {e}")))),
    }
}

pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.set("encode", lua.create_function(lua_encode)?)?;
    t.set("decode", lua.create_function(lua_decode)?)?;
    t.set("null", lua.null())?;
    t.set("array_mt", lua.array_metatable())?;
    let empty = lua.create_table()?;
    empty.set_metatable(Some(lua.array_metatable()))?;
    t.set("empty_array", empty)?;
    Ok(t)
}
