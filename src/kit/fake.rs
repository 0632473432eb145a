//! Fake upstreams: what answers a connection the upstream client makes to an address a spec
//! registered with `t.upstream(addr, fn)`. The request arrives as the bytes the production
//! encoder wrote (through an in-memory pipe, `h1::stream`); it is parsed back here (httparse,
//! the chunked decoder of `h1::chunked`) into the table the spec's function sees, and its
//! answer is written back as an HTTP/1.1 response for the production client to read. So a
//! delay is a (virtual) wait the client's `read_timeout` meets as it would a slow server, and
//! a failure is what a socket would do: a reset, a refused connection, a body cut short.

use crate::h1::chunked::Chunked;
use crate::h1::io::poll_fill;
use crate::h1::stream::{Pipe, Stream};
use crate::runtime;
use bytes::{Bytes, BytesMut};
use mlua::prelude::*;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io::IoSlice;
use std::rc::{Rc, Weak};
use std::time::Duration;

/// Heads larger than this are not a request a policy's proxy would send.
const MAX_HEAD: usize = 256 * 1024;

/// The fake upstreams of one kit, by `host:port`.
pub struct Fakes {
    pub lua: Lua,
    handlers: RefCell<std::collections::HashMap<String, Fake>>,
    /// Errors raised by the spec's functions, reported by the kit call that ran them.
    pub errors: RefCell<Vec<String>>,
}

struct Fake {
    handler: LuaFunction,
    /// The connections it serves: closed when it is replaced or removed.
    conns: Vec<tokio::task::AbortHandle>,
}

impl Fakes {
    pub fn new(lua: &Lua) -> Rc<Fakes> {
        Rc::new(Fakes {
            lua: lua.clone(),
            handlers: RefCell::new(Default::default()),
            errors: RefCell::new(Vec::new()),
        })
    }

    /// Makes `addr` answer with `handler(req) -> answer` (see `serve`), or (`None`) refuse
    /// connections from now on. Connections it already holds are closed either way.
    pub fn set(self: &Rc<Fakes>, addr: &str, handler: Option<LuaFunction>) {
        let old = match handler {
            Some(h) => self.handlers.borrow_mut().insert(
                addr.to_string(),
                Fake {
                    handler: h,
                    conns: Vec::new(),
                },
            ),
            None => self.handlers.borrow_mut().remove(addr),
        };
        if let Some(old) = old {
            for c in old.conns {
                c.abort();
            }
        }
        let listener = self.handlers.borrow().contains_key(addr).then(|| {
            let me: Weak<Fakes> = Rc::downgrade(self);
            let addr = addr.to_string();
            Rc::new(move |pipe: Pipe| {
                if let Some(f) = me.upgrade() {
                    f.accept(&addr, pipe);
                }
            }) as crate::h1::stream::Listener
        });
        crate::h1::stream::listen_in_memory(addr, listener);
    }

    fn accept(self: &Rc<Fakes>, addr: &str, pipe: Pipe) {
        let mut handlers = self.handlers.borrow_mut();
        let Some(fake) = handlers.get_mut(addr) else {
            return;
        };
        fake.conns.retain(|c| !c.is_finished());
        let task = tokio::task::spawn_local(serve(
            Rc::downgrade(self),
            self.lua.clone(),
            fake.handler.clone(),
            pipe,
        ));
        fake.conns.push(task.abort_handle());
    }

    /// Forgets every fake upstream (their addresses refuse connections again).
    pub fn clear(&self) {
        for (addr, fake) in self.handlers.borrow_mut().drain() {
            crate::h1::stream::listen_in_memory(&addr, None);
            for c in fake.conns {
                c.abort();
            }
        }
    }
}

/// A request as read off the pipe.
struct Request {
    head: Bytes,
    method: String,
    target: String,
    headers: Vec<(String, Bytes)>,
    body: Bytes,
    close: bool,
}

/// Serves one connection: requests one after another until the client closes it, or an
/// answer ends it.
async fn serve(fakes: Weak<Fakes>, lua: Lua, handler: LuaFunction, pipe: Pipe) {
    let mut stream = Stream::Mem(pipe);
    let mut buf = BytesMut::new();
    loop {
        let req = match read_request(&mut stream, &mut buf).await {
            Some(r) => r,
            None => return,
        };
        let answer = match call(&lua, &handler, &req).await {
            Ok(a) => a,
            Err(e) => {
                if let Some(f) = fakes.upgrade() {
                    f.errors.borrow_mut().push(e);
                }
                Answer::error()
            }
        };
        if !answer.respond(&mut stream, &req).await {
            return;
        }
    }
}

/// Reads the next request; `None` when the client closed (or sent something that is not one).
async fn read_request(stream: &mut Stream, buf: &mut BytesMut) -> Option<Request> {
    let (n, method, target, headers) = loop {
        if !buf.is_empty() {
            let mut hdrs = [httparse::EMPTY_HEADER; 256];
            let mut req = httparse::Request::new(&mut hdrs);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, Bytes)> = req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), Bytes::copy_from_slice(h.value)))
                        .collect();
                    break (
                        n,
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("").to_string(),
                        headers,
                    );
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => return None,
            }
        }
        if fill(stream, buf).await == 0 {
            return None;
        }
    };
    let head = buf.split_to(n).freeze();
    let value = |name: &str| {
        headers
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let chunked = value("transfer-encoding").is_some_and(|v| {
        v.rsplit(|&c| c == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    });
    let close = value("connection").is_some_and(|v| {
        v.split(|&c| c == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    let body = if chunked {
        let mut state = Chunked::default();
        let mut out = BytesMut::new();
        loop {
            match state.decode(buf) {
                Ok(Some(d)) => out.extend_from_slice(&d),
                Ok(None) if state.is_done() => break,
                Ok(None) => {
                    if fill(stream, buf).await == 0 {
                        return None;
                    }
                }
                Err(_) => return None,
            }
        }
        out.freeze()
    } else {
        let len = value("content-length")
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < len {
            if fill(stream, buf).await == 0 {
                return None;
            }
        }
        buf.split_to(len).freeze()
    };
    Some(Request {
        head,
        method,
        target,
        headers,
        body,
        close,
    })
}

async fn fill(stream: &mut Stream, buf: &mut BytesMut) -> usize {
    poll_fn(|cx| poll_fill(stream, buf, cx)).await.unwrap_or(0)
}

/// `handler(req)`: the request as a table; the answer as the Lua side normalized it
/// (`lua/luaproxy/test.lua`): `{ status =, body =, headers = { {name, value}, ... },
/// delay =, fail = }`.
async fn call(lua: &Lua, handler: &LuaFunction, req: &Request) -> Result<Answer, String> {
    let t = request_table(lua, req).map_err(|e| e.to_string())?;
    let mut args = LuaMultiValue::new();
    args.push_back(LuaValue::Table(t));
    let mut out = runtime::call_protected(lua, handler.clone(), args).await?;
    match out.pop_front() {
        Some(LuaValue::Table(a)) => Answer::from_lua(&a).map_err(|e| e.to_string()),
        _ => Err("fake upstream: the answer is not a table".into()),
    }
}

fn request_table(lua: &Lua, req: &Request) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    let (path, args) = match req.target.split_once('?') {
        Some((p, a)) => (p, Some(a)),
        None => (req.target.as_str(), None),
    };
    t.set("method", req.method.as_str())?;
    t.set("target", req.target.as_str())?;
    t.set("path", path)?;
    t.set("args", args)?;
    t.set("head", lua.create_string(&req.head)?)?;
    t.set("body", lua.create_string(&req.body)?)?;
    let list = lua.create_table_with_capacity(req.headers.len(), 0)?;
    for (name, value) in &req.headers {
        let pair = lua.create_table_with_capacity(2, 0)?;
        pair.raw_push(name.as_str())?;
        pair.raw_push(lua.create_string(value)?)?;
        list.raw_push(pair)?;
    }
    t.set("header_list", list)?;
    Ok(t)
}

/// How a fake upstream answers one request.
struct Answer {
    status: u16,
    headers: Vec<(Bytes, Bytes)>,
    body: Bytes,
    delay: Duration,
    fail: Option<Fail>,
}

#[derive(Clone, Copy, PartialEq)]
enum Fail {
    Refused,
    Reset,
    Timeout,
    Truncated,
}

impl Answer {
    /// A spec's function that raised: a 500 (the error is reported by the kit call).
    fn error() -> Answer {
        Answer {
            status: 500,
            headers: Vec::new(),
            body: Bytes::from_static(b"fake upstream raised an error\n"),
            delay: Duration::ZERO,
            fail: None,
        }
    }

    fn from_lua(t: &LuaTable) -> LuaResult<Answer> {
        let status: u16 = t.get::<Option<u16>>("status")?.unwrap_or(200);
        let body = t
            .get::<Option<LuaString>>("body")?
            .map(|s| Bytes::copy_from_slice(&s.as_bytes()))
            .unwrap_or_default();
        let mut headers = Vec::new();
        if let Some(list) = t.get::<Option<LuaTable>>("headers")? {
            for pair in list.sequence_values::<LuaTable>() {
                let pair = pair?;
                let name: LuaString = pair.get(1)?;
                let value: LuaString = pair.get(2)?;
                headers.push((
                    Bytes::copy_from_slice(&name.as_bytes()),
                    Bytes::copy_from_slice(&value.as_bytes()),
                ));
            }
        }
        let delay = match t.get::<Option<f64>>("delay")? {
            Some(d) => crate::units::seconds(d)
                .ok_or_else(|| LuaError::runtime("delay must be a number of seconds >= 0"))?,
            None => Duration::ZERO,
        };
        let fail = match t.get::<Option<String>>("fail")?.as_deref() {
            None => None,
            Some("refused") => Some(Fail::Refused),
            Some("reset") => Some(Fail::Reset),
            Some("timeout") => Some(Fail::Timeout),
            Some("truncated") => Some(Fail::Truncated),
            Some(other) => {
                return Err(LuaError::runtime(format!(
                    "fail must be \"refused\", \"reset\", \"timeout\" or \"truncated\", got \"{other}\""
                )))
            }
        };
        Ok(Answer {
            status,
            headers,
            body,
            delay,
            fail,
        })
    }

    /// Writes the answer (after its delay). False: the connection is over.
    async fn respond(self, stream: &mut Stream, req: &Request) -> bool {
        let Stream::Mem(pipe) = &*stream else {
            return false;
        };
        match self.fail {
            Some(Fail::Refused) => {
                pipe.fail(std::io::ErrorKind::ConnectionRefused);
                return false;
            }
            Some(Fail::Reset) => {
                if !self.delay.is_zero() {
                    crate::clock::sleep(self.delay).await;
                }
                pipe.fail(std::io::ErrorKind::ConnectionReset);
                return false;
            }
            Some(Fail::Timeout) => {
                // Never answers: holds the connection until the client gives up on it.
                let mut buf = BytesMut::new();
                while fill(stream, &mut buf).await > 0 {
                    buf.clear();
                }
                return false;
            }
            _ => {}
        }
        if !self.delay.is_zero() {
            crate::clock::sleep(self.delay).await;
        }
        let bodiless = req.method == "HEAD" || matches!(self.status, 100..=199 | 204 | 304);
        let reason = hyper::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown");
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", self.status).into_bytes();
        let mut close = req.close;
        for (name, value) in &self.headers {
            if name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"transfer-encoding")
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"connection") && value.eq_ignore_ascii_case(b"close") {
                close = true;
            }
            head.extend_from_slice(name);
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        let truncated = self.fail == Some(Fail::Truncated);
        let mut body = self.body;
        if !matches!(self.status, 100..=199 | 204 | 304) {
            // A cut body announces more than it sends (at least one byte more).
            let announced = body.len() + usize::from(truncated && body.is_empty());
            head.extend_from_slice(format!("content-length: {announced}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        if bodiless {
            body.clear();
        } else if truncated {
            body.truncate(body.len() / 2);
        }
        if pipe
            .write(&[IoSlice::new(&head), IoSlice::new(&body)])
            .is_err()
        {
            return false;
        }
        if truncated || close {
            pipe.shutdown();
            return false;
        }
        true
    }
}
