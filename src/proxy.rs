//! The exchange between a request and an upstream: `req:proxy` forwards what the policy left
//! of the client's request (hop-by-hop fields out, forwarding fields in, the body streamed or
//! sent from memory) through the upstream client and its pools.

use crate::h1::rules;
use crate::h1::upstream as wire;
use crate::request::{Outcome, ReqInner};
use crate::upstream::{authority, make_timed_response, send, Attempt, Options};
use mlua::prelude::*;
use std::rc::Rc;

/// `res, err = req:proxy(addr, opts?)`: sends the request (method, path, query, headers as
/// the policy left them, hop-by-hop headers removed, forwarding headers set) to `addr`
/// ("host:port") and returns the response with its body still streaming. `opts`:
/// `connect_timeout`, `send_timeout`, `read_timeout` (defaults: the server's `proxy_*`
/// settings) and `max_body_size` (see `upstream::Options`). `err` is a short string:
/// "connection refused", "timeout", "upstream closed connection", ...
pub async fn proxy_request(
    lua: &Lua,
    inner: Rc<ReqInner>,
    addr: String,
    opts: Options,
) -> LuaResult<(Option<LuaAnyUserData>, Option<String>)> {
    match proxy_exchange(inner, addr, opts).await? {
        Ok(r) => Ok((Some(lua.create_userdata(r)?), None)),
        Err(e) => Ok((None, Some(e))),
    }
}

/// A header value as the pieces it is written from.
type Parts<'a> = &'a [&'a [u8]];

/// The exchange behind `req:proxy` (see `proxy_request`): `Err` for misuse, else the response
/// or the short error string.
pub async fn proxy_exchange(inner: Rc<ReqInner>, addr: String, opts: Options) -> Outcome {
    let key: Rc<str> = Rc::from(authority(&addr));
    if key.is_empty() {
        return Err(LuaError::runtime("req:proxy: address must be 'host:port'"));
    }
    let at = Rc::new(Attempt::new(key.clone()));
    inner.attempts.borrow_mut().push(at.clone());
    let body = match inner.take_body() {
        Ok(b) => b,
        Err(e) => {
            at.ended();
            return Ok(Err(e.to_string()));
        }
    };
    let method = inner.method.borrow().clone();
    let out = {
        let headers = inner.headers.borrow();
        let ip = inner.client_ip();
        let trusted = inner
            .limits
            .trusted_ips
            .iter()
            .any(|c| c.contains(inner.peer.ip()));
        let fwd = rules::forwarding(&headers, trusted);
        let forwarded = fwd.forwarded_parts(ip);
        // The fields the proxy writes itself; the client's fields of these names are not sent.
        let candidates: [(bool, &[u8], Parts); 6] = [
            (true, b"x-forwarded-for", &[&fwd.xff_prefix, ip.as_bytes()]),
            (true, b"x-real-ip", &[ip.as_bytes()]),
            (true, b"forwarded", &forwarded),
            (!fwd.keep_proto, b"x-forwarded-proto", &[b"http"]),
            (
                !fwd.keep_host,
                b"x-forwarded-host",
                // Without a Host of its own, the request goes out with `addr` as its Host.
                &[fwd.host.unwrap_or(key.as_bytes())],
            ),
            (fwd.host.is_none(), b"host", &[key.as_bytes()]),
        ];
        let mut extra: [(&[u8], Parts); 6] = [(b"", &[]); 6];
        let mut k = 0;
        for (on, name, value) in candidates {
            if on {
                extra[k] = (name, value);
                k += 1;
            }
        }
        let ours = &extra[..k];
        wire::encode_request(
            &method,
            &inner.uri.borrow(),
            &headers,
            // Expect is answered here (100 Continue), never passed on.
            |n| {
                rules::is_hop_by_hop(n)
                    || n.eq_ignore_ascii_case(b"expect")
                    || ours.iter().any(|(name, _)| n.eq_ignore_ascii_case(name))
            },
            ours,
            body.length(),
        )
    };
    match send(&key, &method, &out, body, &opts, Some(&at)).await {
        Ok((head, body)) => Ok(Ok(make_timed_response(head, body, opts.max_body_size, at))),
        Err(e) => {
            at.ended();
            // A failure of the client's own body (too large, too slow) is the client's fault;
            // the listener answers with the recorded status, and the log names the cause.
            let e = match inner.failure.get() {
                Some((_, why)) => why.to_string(),
                None => e,
            };
            crate::log!(
                ERR,
                "upstream {key} failed: {e}, client: {}, request: \"{} {}\"",
                inner.client_ip(),
                inner.method.borrow(),
                inner.uri.borrow(),
            );
            Ok(Err(e))
        }
    }
}

/// Adds `req:proxy(addr, opts?)` (mlua's async method: the fast path of `fastproxy` wraps it
/// and falls back to it for options, tasks and ended requests).
pub fn add_methods(m: &mut crate::request::Methods) {
    m.add_async_method(
        "proxy",
        |lua, this, (addr, opts): (String, Option<LuaTable>)| async move {
            crate::runtime::check_loop("req:proxy")?;
            let opts = Options::from_lua(opts.as_ref(), &this.0.limits)?;
            // Boxed: mlua keeps a finished call's future until Lua collects it, so the
            // exchange's state (kilobytes) must not live inline in it.
            Box::pin(proxy_request(&lua, this.0.clone(), addr, opts)).await
        },
    );
}
