//! The upstream HTTP/1.1 client: per-worker keep-alive pools, timeouts, `req:proxy()` and
//! `luaproxy.http.request(_uri)`.
//!
//! Pools are per worker thread, not process-wide: a connection is registered with the reactor
//! of the runtime that opened it, so lending it to another worker would bounce every read and
//! write between threads. Each worker keeps at most `POOL_MAX_IDLE` idle connections per
//! upstream, dropped after `POOL_IDLE_TIMEOUT` (below nginx's 75 s keepalive_timeout).

use crate::h1::body::{empty, full, BoxBody, ReqBody};
use crate::h1::headers::Headers;
use crate::h1::io::io_reason;
use crate::h1::rules::Limits;
use crate::h1::upstream::{self as wire, Conn, Error, Head, OutHead, ResponseBody};
use crate::headers_lua::{apply_headers, headers_table, set_header};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode};
use mlua::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Per-call options. Defaults come from the server's settings (`proxy_*_timeout`,
/// `upstream_keepalive*`), or from `Limits::default()` outside a server.
#[derive(Clone, Debug)]
pub struct Options {
    pub connect_timeout: Duration,
    /// Time to the response head, and between two reads of the response body.
    pub read_timeout: Duration,
    /// Time the request may take to be written while the upstream takes no bytes.
    pub send_timeout: Duration,
    /// The most a response body read into memory (`res:read_body()`, `request_uri`) may be.
    pub max_body_size: u64,
    /// Idle connections kept per upstream in this worker, and for how long.
    pub keepalive: usize,
    pub keepalive_timeout: Duration,
}

/// A response body read into Lua is bounded by default: 16 MiB.
pub const DEFAULT_READ_LIMIT: u64 = 16 * 1024 * 1024;

impl Options {
    pub fn defaults(l: &Limits) -> Options {
        Options {
            connect_timeout: l.proxy_connect_timeout,
            read_timeout: l.proxy_read_timeout,
            send_timeout: l.proxy_send_timeout,
            max_body_size: DEFAULT_READ_LIMIT,
            keepalive: l.upstream_keepalive,
            keepalive_timeout: l.upstream_keepalive_timeout,
        }
    }

    /// `t`'s `connect_timeout`, `read_timeout`, `send_timeout` (seconds or "30s") and
    /// `max_body_size` (bytes or "16m") over `defaults`.
    pub fn from_lua(t: Option<&LuaTable>, defaults: &Limits) -> LuaResult<Options> {
        let mut o = Options::defaults(defaults);
        let Some(t) = t else { return Ok(o) };
        for (key, slot) in [
            ("connect_timeout", &mut o.connect_timeout),
            ("read_timeout", &mut o.read_timeout),
            ("send_timeout", &mut o.send_timeout),
        ] {
            let v: LuaValue = t.get(key)?;
            let d = match &v {
                LuaValue::Nil => continue,
                LuaValue::Integer(n) => crate::units::seconds(*n as f64),
                LuaValue::Number(n) => crate::units::seconds(*n),
                LuaValue::String(s) => crate::units::parse_duration(&s.to_str()?),
                _ => None,
            };
            *slot = d.filter(|d| !d.is_zero()).ok_or_else(|| {
                LuaError::runtime(format!(
                    "{key} must be a number of seconds > 0 or a duration such as \"30s\""
                ))
            })?;
        }
        let v: LuaValue = t.get("max_body_size")?;
        let size = match &v {
            LuaValue::Nil => Some(o.max_body_size),
            LuaValue::Integer(n) => u64::try_from(*n).ok(),
            LuaValue::Number(n) if n.fract() == 0.0 && *n >= 0.0 => Some(*n as u64),
            LuaValue::String(s) => crate::units::parse_size(&s.to_str()?),
            _ => None,
        };
        o.max_body_size = size.ok_or_else(|| {
            LuaError::runtime("max_body_size must be a number of bytes or a size such as \"16m\"")
        })?;
        Ok(o)
    }
}

/// One upstream attempt of a request, for the log phase (nginx's `$upstream_addr`,
/// `$upstream_status`, `$upstream_connect_time`, `$upstream_header_time`,
/// `$upstream_response_time`): stamped as the exchange goes, and at the end of the response
/// body (or when it is dropped unread, or when the exchange failed).
#[derive(Debug)]
pub struct Attempt {
    pub addr: Rc<str>,
    pub start: Instant,
    /// A connection was in hand: opened, or taken from the pool (nginx: 0 then).
    pub connected: Cell<Option<Instant>>,
    pub header: Cell<Option<Instant>>,
    pub end: Cell<Option<Instant>>,
    pub status: Cell<Option<u16>>,
}

impl Attempt {
    pub fn new(addr: Rc<str>) -> Attempt {
        Attempt {
            addr,
            start: crate::clock::now(),
            connected: Cell::new(None),
            header: Cell::new(None),
            end: Cell::new(None),
            status: Cell::new(None),
        }
    }

    /// Stamps the end, unless it was stamped already.
    pub fn ended(&self) {
        if self.end.get().is_none() {
            self.end.set(Some(crate::clock::now()));
        }
    }

    /// Seconds from the attempt's start to a stamp.
    pub fn since_start(&self, at: &Cell<Option<Instant>>) -> Option<Duration> {
        at.get().map(|t| t.saturating_duration_since(self.start))
    }
}

/// A proxied response's body that stamps its attempt's end when it ends, fails, or is
/// dropped unfinished.
struct Timed {
    inner: ResponseBody,
    at: Rc<Attempt>,
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = crate::h1::body::BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.at.ended();
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.at.ended();
    }
}

struct Idle {
    conn: Conn,
    /// When this idle connection is no longer worth keeping.
    until: Instant,
}

thread_local! {
    static POOL: RefCell<HashMap<Rc<str>, Vec<Idle>, ahash::RandomState>> =
        RefCell::new(HashMap::with_hasher(ahash::RandomState::new()));
}

/// An idle connection for `key` that is proven clean: nothing arrived on it since its last
/// response ended. Bytes on an idle connection (a response the upstream sent unasked, the
/// body of a HEAD/204/304 answer, more body than the head announced) would be read as the
/// answer to the next request, another client's: the connection is closed instead (nginx
/// closes an idle upstream connection on any read event; hyper fails "unexpected bytes on
/// an idle connection"). A connection the upstream closed meanwhile goes the same way.
fn pool_take(key: &str) -> Option<Conn> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if crate::clock::now() >= idle.until {
                continue;
            }
            match idle_state(&idle.conn) {
                Idleness::Clean => return Some(idle.conn),
                Idleness::Closed => {}
                Idleness::Stray => crate::log!(
                    WARN,
                    "upstream {key} sent bytes on an idle connection: closed it"
                ),
            }
        }
        None
    })
}

/// Closes every idle connection of this thread's pools (`luaproxy.test`'s reset: its fake
/// upstreams are gone).
pub fn clear_pool() {
    let idle = POOL.with(|p| std::mem::take(&mut *p.borrow_mut()));
    drop(idle);
}

fn pool_put(key: &Rc<str>, conn: Conn, keep: usize, idle: Duration) {
    if keep == 0 {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.entry(key.clone()).or_default();
        if list.len() >= keep {
            list.remove(0);
        }
        list.push(Idle {
            conn,
            until: crate::clock::now() + idle,
        });
    });
}

enum Idleness {
    Clean,
    Closed,
    Stray,
}

/// What an idle connection holds. `try_read` makes no syscall while the socket's readiness
/// is clear, and reads clear it when they drain the socket (`wire::poll_fill`); so a
/// clean connection is usually proven clean without one, from what the reactor has seen.
fn idle_state(conn: &Conn) -> Idleness {
    let mut probe = [0u8; 1];
    match conn.stream.try_read(&mut probe) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Idleness::Clean,
        Ok(n) if n > 0 => Idleness::Stray,
        _ => Idleness::Closed,
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    match tokio::net::lookup_host(addr).await {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| "could not resolve host".to_string()),
        Err(_) => Err(format!("could not resolve '{addr}'")),
    }
}

async fn connect(addr: &str, opts: &Options) -> Result<Conn, String> {
    // Under `luaproxy.test`: a pipe to a fake upstream, never the network.
    if let Some(r) = crate::h1::stream::connect_in_memory(addr) {
        return r
            .map(|p| Conn::new(crate::h1::stream::Stream::Mem(p)))
            .map_err(|kind| io_reason(&kind.into()));
    }
    let sa = crate::clock::timeout(opts.connect_timeout, resolve(addr))
        .await
        .map_err(|_| "timeout".to_string())??;
    let stream = crate::clock::timeout(opts.connect_timeout, tokio::net::TcpStream::connect(sa))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| io_reason(&e))?;
    let _ = stream.set_nodelay(true);
    Ok(Conn::new(stream))
}

async fn exchange(
    mut conn: Conn,
    key: &Rc<str>,
    method: &Method,
    head: &OutHead,
    body: &mut ReqBody,
    opts: &Options,
    at: Option<&Attempt>,
) -> Result<(Head, ResponseBody), Error> {
    conn.set_deadline(Some(opts.send_timeout));
    let io = async {
        match body {
            ReqBody::Bytes(b) => {
                let full = http_body_util::Full::new(b.clone());
                tokio::pin!(full);
                wire::write_request(&mut conn, head, full).await?;
            }
            ReqBody::Stream(s) => {
                wire::write_request(&mut conn, head, s.as_mut()).await?;
            }
        }
        conn.set_deadline(Some(opts.read_timeout));
        wire::read_head(&mut conn, method).await
    };
    let head = io.await?;
    if let Some(at) = at {
        at.header.set(Some(crate::clock::now()));
        at.status.set(Some(head.status.as_u16()));
    }
    // The body has its own idle timeout.
    conn.set_deadline(None);
    let key = key.clone();
    let (keep, idle) = (opts.keepalive, opts.keepalive_timeout);
    let body = ResponseBody::new(
        conn,
        &head,
        opts.read_timeout,
        Box::new(move |c| pool_put(&key, c, keep, idle)),
    );
    Ok((head, body))
}

/// Sends one request to `addr`, on a clean idle pooled connection when there is one. A
/// pooled connection the upstream closed while the request was on its way is retried on
/// another when that is safe: the body can be sent again, and the request was not sent or
/// is idempotent. `at` (a proxied request's attempt) gets the connect and header times.
pub(crate) async fn send(
    key: &Rc<str>,
    method: &Method,
    head: &OutHead,
    mut body: ReqBody,
    opts: &Options,
    at: Option<&Attempt>,
) -> Result<(Head, ResponseBody), String> {
    let replayable = matches!(body, ReqBody::Bytes(_));
    // RFC 9110 §9.2.2; like nginx, a request that may have reached the upstream is sent again
    // only if repeating it is harmless.
    let idempotent = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    while let Some(conn) = pool_take(key) {
        // A pooled connection is in hand at once (nginx logs 0 for it too): no clock read.
        if let Some(at) = at {
            at.connected.set(Some(at.start));
        }
        match exchange(conn, key, method, head, &mut body, opts, at).await {
            Ok(x) => return Ok(x),
            Err(Error::WriteFailed(_)) if replayable => continue,
            Err(Error::ClosedBeforeResponse) if replayable && idempotent => continue,
            Err(e) => return Err(e.reason()),
        }
    }
    let conn = connect(key, opts).await?;
    if let Some(at) = at {
        at.connected.set(Some(crate::clock::now()));
    }
    exchange(conn, key, method, head, &mut body, opts, at)
        .await
        .map_err(|e| e.reason())
}

pub enum ResBody {
    Stream(BoxBody),
    Read(Bytes),
    Taken,
}

/// An upstream response as Lua sees it: `res.status`, `res.reason`, `res.headers`, `res.body`
/// (after `res:read_body()`), in lua-resty-http's shape. Returned from a handler, it is sent
/// to the client with its body streamed.
pub struct Response {
    pub status: RefCell<StatusCode>,
    pub headers: RefCell<Headers>,
    pub body: RefCell<ResBody>,
    headers_table: RefCell<Option<LuaTable>>,
    /// The most `read_body` takes into memory (`max_body_size`).
    read_limit: u64,
}

impl Response {
    /// A response replayed from `luaproxy.cache`: its body is already read.
    pub fn from_cached(c: &crate::shared::store::CachedResponse) -> Response {
        Response {
            status: RefCell::new(StatusCode::from_u16(c.status).unwrap_or(StatusCode::OK)),
            headers: RefCell::new(c.headers.clone()),
            body: RefCell::new(ResBody::Read(c.body.clone())),
            headers_table: RefCell::new(None),
            read_limit: DEFAULT_READ_LIMIT,
        }
    }

    /// A copy fit for `luaproxy.cache`; the body must have been read (`res:read_body()`).
    pub fn to_cached(&self) -> Result<crate::shared::store::CachedResponse, &'static str> {
        match &*self.body.borrow() {
            ResBody::Read(b) => Ok(crate::shared::store::CachedResponse {
                status: self.status.borrow().as_u16(),
                headers: self.headers.borrow().clone(),
                body: b.clone(),
            }),
            ResBody::Stream(_) => Err("response body not read yet (call res:read_body() first)"),
            ResBody::Taken => Err("response body was already sent"),
        }
    }

    pub fn take_body(&self) -> BoxBody {
        match std::mem::replace(&mut *self.body.borrow_mut(), ResBody::Taken) {
            ResBody::Stream(b) => b,
            ResBody::Read(b) => full(b),
            ResBody::Taken => empty(),
        }
    }

    async fn read_body(&self) -> Result<Bytes, String> {
        let state = std::mem::replace(&mut *self.body.borrow_mut(), ResBody::Taken);
        match state {
            ResBody::Read(b) => {
                *self.body.borrow_mut() = ResBody::Read(b.clone());
                Ok(b)
            }
            ResBody::Taken => Err("response body was already sent".into()),
            ResBody::Stream(mut body) => {
                // Bounded: an upstream's body enters Lua memory only up to `read_limit`;
                // past it the body (and its connection) is dropped.
                if body.size_hint().lower() > self.read_limit {
                    return Err("response body too large".into());
                }
                let mut buf = bytes::BytesMut::new();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| e.to_string())?;
                    if let Some(d) = frame.data_ref() {
                        if (buf.len() + d.len()) as u64 > self.read_limit {
                            return Err("response body too large".into());
                        }
                        buf.extend_from_slice(d);
                    }
                }
                let b = buf.freeze();
                *self.body.borrow_mut() = ResBody::Read(b.clone());
                Ok(b)
            }
        }
    }
}

impl LuaUserData for Response {
    fn add_fields<F: LuaUserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("status", |_, this| Ok(this.status.borrow().as_u16()));
        f.add_field_method_get("reason", |_, this| {
            Ok(this
                .status
                .borrow()
                .canonical_reason()
                .unwrap_or("")
                .to_string())
        });
        f.add_field_method_get("headers", |lua, this| {
            if let Some(t) = &*this.headers_table.borrow() {
                return Ok(t.clone());
            }
            let t = headers_table(lua, &this.headers.borrow())?;
            *this.headers_table.borrow_mut() = Some(t.clone());
            Ok(t)
        });
        f.add_field_method_get("body", |lua, this| match &*this.body.borrow() {
            ResBody::Read(b) => Ok(Some(lua.create_string(b)?)),
            _ => Ok(None),
        });
    }

    fn add_methods<M: LuaUserDataMethods<Self>>(m: &mut M) {
        // body, err = res:read_body()
        m.add_async_method("read_body", |lua, this, ()| async move {
            crate::runtime::check_loop("res:read_body")?;
            match this.read_body().await {
                Ok(b) => Ok((Some(lua.create_string(&b)?), None)),
                Err(e) => Ok((None, Some(e))),
            }
        });
        // res:set_status(code) -> true (what the client will get: a final status, 200-999)
        m.add_method("set_status", |_, this, code: i64| {
            let s = u16::try_from(code)
                .ok()
                .filter(|c| (200..=999).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| {
                    LuaError::runtime(format!("res:set_status: invalid status {code} (200-999)"))
                })?;
            *this.status.borrow_mut() = s;
            Ok(true)
        });
        // res:set_header(name, value | {values} | nil) -> true
        m.add_method(
            "set_header",
            |_, this, (name, value): (String, LuaValue)| {
                set_header(this.headers.borrow_mut().map_mut(), &name, &value)?;
                *this.headers_table.borrow_mut() = None;
                Ok(true)
            },
        );
    }
}

/// The head's hop-by-hop headers were left out when it was parsed (`wire::parse_head`).
pub(crate) fn make_response(head: Head, body: ResponseBody, read_limit: u64) -> Response {
    make_response_boxed(head, Box::pin(body), read_limit)
}

/// `make_response` for a proxied request: the body stamps `at`'s end.
pub(crate) fn make_timed_response(
    head: Head,
    body: ResponseBody,
    read_limit: u64,
    at: Rc<Attempt>,
) -> Response {
    make_response_boxed(head, Box::pin(Timed { inner: body, at }), read_limit)
}

fn make_response_boxed(head: Head, body: BoxBody, read_limit: u64) -> Response {
    Response {
        status: RefCell::new(head.status),
        headers: RefCell::new(head.headers),
        body: RefCell::new(ResBody::Stream(body)),
        headers_table: RefCell::new(None),
        read_limit,
    }
}

/// Strips an optional `http://` and any path: `req:proxy` takes `host:port`.
pub(crate) fn authority(addr: &str) -> &str {
    let a = addr.strip_prefix("http://").unwrap_or(addr);
    a.split('/').next().unwrap_or(a)
}

/// Parses `http://host[:port]/path?query` into (authority, path-and-query).
fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| "only http:// urls are supported".to_string())?;
    let (auth, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if auth.is_empty() {
        return Err("url has no host".into());
    }
    let auth = if auth.contains(':') && !auth.ends_with(']') {
        auth.to_string()
    } else {
        format!("{auth}:80")
    };
    Ok((auth, path))
}

async fn client_request(
    lua: &Lua,
    url: String,
    params: Option<LuaTable>,
    read_all: bool,
) -> LuaResult<(Option<LuaAnyUserData>, Option<String>)> {
    let (auth, path) = match split_url(&url) {
        Ok(v) => v,
        Err(e) => {
            return Err(LuaError::runtime(format!(
                "luaproxy.http.request: {e}: '{url}'"
            )))
        }
    };
    let opts = Options::from_lua(params.as_ref(), &Limits::default())?;
    let mut method = Method::GET;
    let mut headers = HeaderMap::new();
    let mut body = ReqBody::Bytes(Bytes::new());
    if let Some(p) = &params {
        if let Some(m) = p.get::<Option<String>>("method")? {
            method = Method::from_bytes(m.as_bytes())
                .map_err(|_| LuaError::runtime(format!("invalid method '{m}'")))?;
        }
        if let Some(h) = p.get::<Option<LuaTable>>("headers")? {
            apply_headers(&mut headers, &h)?;
        }
        if let Some(b) = p.get::<Option<LuaString>>("body")? {
            body = ReqBody::Bytes(Bytes::copy_from_slice(&b.as_bytes()));
        }
    }
    if !headers.contains_key(header::HOST) {
        let host = auth.strip_suffix(":80").unwrap_or(&auth);
        headers.insert(
            header::HOST,
            HeaderValue::from_str(host).map_err(|_| LuaError::runtime("invalid host in url"))?,
        );
    }
    let uri: hyper::Uri = path
        .parse()
        .map_err(|_| LuaError::runtime(format!("invalid path in url '{url}'")))?;
    let key: Rc<str> = Rc::from(auth.as_str());
    let out = wire::encode_request(
        &method,
        &uri,
        &Headers::Map(headers),
        |_| false,
        &[],
        body.length(),
    );
    match send(&key, &method, &out, body, &opts, None).await {
        Ok((head, body)) => {
            let r = make_response(head, body, opts.max_body_size);
            let mut held = 2;
            if read_all {
                match r.read_body().await {
                    Ok(b) => held += (b.len() / 1024) as i32,
                    Err(e) => return Ok((None, Some(e))),
                }
            }
            let ud = lua.create_userdata(r)?;
            crate::runtime::gc_pressure(lua, held);
            Ok((Some(ud), None))
        }
        Err(e) => Ok((None, Some(e))),
    }
}

/// `res, err = luaproxy.http.request(url, params?)`: `params` = `{ method, headers, body,
/// connect_timeout, read_timeout }`. The body is read on demand with `res:read_body()`.
async fn lua_request(
    lua: Lua,
    (url, params): (String, Option<LuaTable>),
) -> LuaResult<(Option<LuaAnyUserData>, Option<String>)> {
    client_request(&lua, url, params, false).await
}

/// `res, err = luaproxy.http.request_uri(url, params?)`: like `request`, with the whole body
/// already in `res.body` (lua-resty-http's `request_uri`).
async fn lua_request_uri(
    lua: Lua,
    (url, params): (String, Option<LuaTable>),
) -> LuaResult<(Option<LuaAnyUserData>, Option<String>)> {
    client_request(&lua, url, params, true).await
}

pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.set(
        "request",
        lua.create_async_function(|lua, args: (String, Option<LuaTable>)| {
            let ok = crate::runtime::check_loop("luaproxy.http.request");
            async move {
                ok?;
                lua_request(lua, args).await
            }
        })?,
    )?;
    t.set(
        "request_uri",
        lua.create_async_function(|lua, args: (String, Option<LuaTable>)| {
            let ok = crate::runtime::check_loop("luaproxy.http.request_uri");
            async move {
                ok?;
                lua_request_uri(lua, args).await
            }
        })?,
    )?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            split_url("http://a:1/x?y").unwrap(),
            ("a:1".into(), "/x?y".into())
        );
        assert_eq!(split_url("http://a").unwrap(), ("a:80".into(), "/".into()));
        assert_eq!(
            split_url("http://a?q=1").unwrap(),
            ("a:80".into(), "/?q=1".into())
        );
        assert!(split_url("https://a").is_err());
        assert!(split_url("http:///x").is_err());
    }

    #[test]
    fn authority_strips_scheme_and_path() {
        assert_eq!(authority("http://h:1/p"), "h:1");
        assert_eq!(authority("h:1"), "h:1");
    }
}
