//! What a handler returns, turned into a response (and the plain ones the server writes
//! itself).

use crate::h1::body::{empty, full, BoxBody};
use crate::h1::downstream::DownstreamResponse;
use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::StatusCode;
use mlua::prelude::*;

pub(super) fn simple(status: StatusCode, body: &str) -> DownstreamResponse<BoxBody> {
    let mut r = DownstreamResponse::new(full(Bytes::from(format!("{body}\n"))));
    r.status = status;
    r.headers
        .map_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Converts what a handler returned into a response:
/// an upstream `res`; `{status=, headers=, body=}`; or `status, body?, headers?`.
/// A table body is sent as JSON.
pub(super) fn to_response(
    lua: &Lua,
    mut values: LuaMultiValue,
) -> Result<DownstreamResponse<BoxBody>, String> {
    let first = values.pop_front().unwrap_or(LuaValue::Nil);
    let (status, body, headers) = match first {
        LuaValue::UserData(ud) => {
            let res = ud
                .borrow::<crate::upstream::Response>()
                .map_err(|_| "handler returned a userdata that is not a response".to_string())?;
            return Ok(DownstreamResponse {
                status: *res.status.borrow(),
                headers: std::mem::take(&mut *res.headers.borrow_mut()),
                body: res.take_body(),
            });
        }
        LuaValue::Table(t) => {
            let status: Option<LuaValue> = t.get("status").map_err(|e| e.to_string())?;
            let body: LuaValue = t.get("body").map_err(|e| e.to_string())?;
            let headers: Option<LuaTable> = t.get("headers").map_err(|e| e.to_string())?;
            (status.unwrap_or(LuaValue::Integer(200)), body, headers)
        }
        v @ (LuaValue::Integer(_) | LuaValue::Number(_)) => {
            let body = values.pop_front().unwrap_or(LuaValue::Nil);
            let headers = match values.pop_front() {
                Some(LuaValue::Table(t)) => Some(t),
                _ => None,
            };
            (v, body, headers)
        }
        LuaValue::Nil => return Err("handler returned no response".into()),
        other => {
            return Err(format!(
                "handler returned a {}, not a response",
                other.type_name()
            ))
        }
    };
    let code = match status {
        LuaValue::Integer(n) => n,
        LuaValue::Number(n) if n.fract() == 0.0 => n as i64,
        _ => return Err("response status must be an integer".into()),
    };
    let status = u16::try_from(code)
        .ok()
        .filter(|c| (200..=999).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("invalid response status {code}"))?;
    let mut map = hyper::HeaderMap::new();
    if let Some(h) = headers {
        crate::headers_lua::apply_headers(&mut map, &h).map_err(|e| e.to_string())?;
    }
    let body = match body {
        LuaValue::Nil => empty(),
        LuaValue::String(s) => full(Bytes::copy_from_slice(&s.as_bytes())),
        LuaValue::Table(_) => {
            let text =
                crate::json::encode_value(lua, &body).map_err(|e| format!("response body: {e}"))?;
            if !map.contains_key(header::CONTENT_TYPE) {
                map.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            full(Bytes::from(text))
        }
        LuaValue::Integer(_) | LuaValue::Number(_) => {
            full(Bytes::from(body.to_string().map_err(|e| e.to_string())?))
        }
        other => {
            return Err(format!(
                "response body must be a string or a table, not a {}",
                other.type_name()
            ))
        }
    };
    Ok(DownstreamResponse {
        status,
        headers: map.into(),
        body,
    })
}
