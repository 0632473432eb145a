//! Header fields and query/form arguments between Lua and Rust: a Lua value set as a field, a
//! Lua table applied to a header map, a header list turned into the `{ name = value |
//! {values} }` table lua-resty-http and ngx.req.get_headers return, decoded `k=v` pairs into
//! the table ngx.req.get_uri_args returns.

use crate::h1::headers::Headers;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use mlua::prelude::*;

pub fn header_name(name: &str) -> LuaResult<HeaderName> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| LuaError::runtime(format!("invalid header name '{name}'")))
}

fn header_value(lua_value: &LuaValue) -> LuaResult<Vec<HeaderValue>> {
    let one = |v: &LuaValue| -> LuaResult<HeaderValue> {
        let s = match v {
            LuaValue::String(s) => s.as_bytes().to_vec(),
            LuaValue::Integer(i) => i.to_string().into_bytes(),
            LuaValue::Number(n) => n.to_string().into_bytes(),
            _ => {
                return Err(LuaError::runtime(
                    "header value must be a string, a number or an array of them",
                ))
            }
        };
        HeaderValue::from_bytes(&s)
            .map_err(|_| LuaError::runtime("invalid header value (control characters)"))
    };
    match lua_value {
        LuaValue::Table(t) => t.sequence_values::<LuaValue>().map(|v| one(&v?)).collect(),
        v => Ok(vec![one(v)?]),
    }
}

/// Replaces header `name` with `value` (a string, number, list of them, or nil to remove).
pub fn set_header(map: &mut HeaderMap, name: &str, value: &LuaValue) -> LuaResult<()> {
    let name = header_name(name)?;
    let values = if value.is_nil() {
        Vec::new()
    } else {
        header_value(value)?
    };
    map.remove(&name);
    for v in values {
        map.append(name.clone(), v);
    }
    Ok(())
}

/// Applies a Lua headers table `{name = value | {values}}` to a header map.
pub fn apply_headers(map: &mut HeaderMap, t: &LuaTable) -> LuaResult<()> {
    for pair in t.pairs::<LuaString, LuaValue>() {
        let (k, v) = pair?;
        set_header(map, &k.to_str()?, &v)?;
    }
    Ok(())
}

/// Builds `{name = value}` with lowercase names; repeated headers become arrays (ngx style).
pub fn headers_table(lua: &Lua, headers: &Headers) -> LuaResult<LuaTable> {
    let t = lua.create_table_with_capacity(0, headers.len())?;
    let mut lower = Vec::new();
    for (name, value) in headers.iter() {
        lower.clear();
        lower.extend(name.iter().map(u8::to_ascii_lowercase));
        let key = lua.create_string(&lower)?;
        let value = lua.create_string(value)?;
        match t.raw_get::<LuaValue>(&key)? {
            LuaValue::Nil => t.raw_set(key, value)?,
            LuaValue::Table(arr) => arr.raw_push(value)?,
            first => t.raw_set(
                key,
                lua.create_sequence_from([first, LuaValue::String(value)])?,
            )?,
        }
    }
    Ok(t)
}

/// Joins repeated values the way a single header line would carry them.
pub fn header_joined(headers: &Headers, name: &[u8]) -> Option<Vec<u8>> {
    let mut it = headers.get_all(name);
    let first = it.next()?;
    let mut out = first.to_vec();
    let sep: &[u8] = if name.eq_ignore_ascii_case(b"cookie") {
        b"; "
    } else {
        b", "
    };
    for v in it {
        out.extend_from_slice(sep);
        out.extend_from_slice(v);
    }
    Some(out)
}

/// Turns decoded `k=v` pairs into a Lua table; repeated keys become arrays, bare keys `true`.
pub fn args_table(
    lua: &Lua,
    pairs: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    max: usize,
) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if max > 0 && i >= max {
            break;
        }
        let key = lua.create_string(&k)?;
        let val = match v {
            Some(v) => LuaValue::String(lua.create_string(&v)?),
            None => LuaValue::Boolean(true),
        };
        match t.raw_get::<LuaValue>(&key)? {
            LuaValue::Nil => t.raw_set(key, val)?,
            LuaValue::Table(arr) => arr.raw_push(val)?,
            prev => {
                let arr = lua.create_sequence_from([prev, val])?;
                t.raw_set(key, arr)?;
            }
        }
    }
    Ok(t)
}
