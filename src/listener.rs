//! `luaproxy.serve{...}`: the HTTP/1.1 listener and its workers.
//!
//! With `handler = fn`, requests run on the calling thread's loop and VM. With `policy = file`,
//! `workers` OS threads each create their own Lua VM, load the policy once and accept from the
//! same listening socket; nothing Lua crosses threads, only the socket and plain config data.

use crate::h1::body::{empty, full, BoxBody, BoxError};
use crate::h1::downstream::{self, ClientConn, HeadError, IncomingBody, RequestHead, Response};
use crate::h1::rules::Limits;
use crate::request::ReqInner;
use crate::runtime::{self, call_protected, LoopGuard};
use crate::settings::{self, Settings};
use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode, Version};
use mlua::prelude::*;
use mlua::LuaSerdeExt;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch, Notify};

/// What every connection of one worker needs.
struct Worker {
    lua: Lua,
    handler: LuaFunction,
    limits: Rc<Limits>,
    settings: Settings,
    /// Open connections of the whole server, against `max_connections`.
    cap: Arc<ConnCap>,
    /// This VM's light userdata metatable is the request one.
    req_meta: Cell<bool>,
    /// Requests handled, for pacing the collector steps.
    requests: Cell<u64>,
    /// This worker's place among the policy workers (none in handler mode).
    balance: Option<(Arc<Balance>, usize)>,
}

/// A freshly accepted connection on its way to another worker, already counted there.
type Handoff = (std::net::TcpStream, SocketAddr, OpenConn);

/// Open client connections per worker, and a way to hand a new one to another worker.
///
/// Each worker accepts on its own `SO_REUSEPORT` socket, and the kernel splits connections by
/// a hash of their addresses, blind to load: in one run of six the workers'
/// epoll sets held 125 and 88 sockets (client plus upstream), and that run did 7 % fewer
/// requests (BENCHMARKS.md, session 3). A worker that accepts while it holds two or
/// more connections more than the least-loaded worker passes the socket over (at accept time
/// only; nginx's workers likewise stop accepting when they hold more than their share).
struct Balance {
    open: Vec<std::sync::atomic::AtomicUsize>,
    handoff: Vec<tokio::sync::mpsc::UnboundedSender<Handoff>>,
}

impl Balance {
    /// The worker a connection accepted by `me` should go to instead, if any.
    fn elsewhere(&self, me: usize) -> Option<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let mine = self.open[me].load(Relaxed);
        let (j, least) = self
            .open
            .iter()
            .enumerate()
            .map(|(j, n)| (j, n.load(Relaxed)))
            .min_by_key(|&(_, n)| n)?;
        (j != me && least + 2 <= mine).then_some(j)
    }
}

/// Open client connections of one server (all its workers) against `max_connections`.
/// At the cap every worker stops accepting until a connection closes: new clients wait in
/// the listen backlog instead of costing memory and descriptors (and EMFILE never comes
/// from clients alone).
struct ConnCap {
    open: std::sync::atomic::AtomicUsize,
    max: usize,
    closed: Notify,
}

impl ConnCap {
    fn new(max: usize) -> Arc<ConnCap> {
        Arc::new(ConnCap {
            open: Default::default(),
            max,
            closed: Notify::new(),
        })
    }

    /// Waits until the server holds fewer than `max` connections.
    async fn room(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        loop {
            let closed = self.closed.notified();
            if self.open.load(Relaxed) < self.max {
                return;
            }
            closed.await;
        }
    }
}

/// Counts a connection as open on a worker and in the server while it lives; counted from
/// the moment it is accepted, since a burst of accepts runs before any connection task
/// starts.
struct OpenConn(Option<(Arc<Balance>, usize)>, Arc<ConnCap>);

impl OpenConn {
    fn new(b: Option<(&Arc<Balance>, usize)>, cap: &Arc<ConnCap>) -> OpenConn {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((b, i)) = b {
            b.open[i].fetch_add(1, Relaxed);
        }
        cap.open.fetch_add(1, Relaxed);
        OpenConn(b.map(|(b, i)| (b.clone(), i)), cap.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((b, i)) = &self.0 {
            b.open[*i].fetch_sub(1, Relaxed);
        }
        if self.1.open.fetch_sub(1, Relaxed) >= self.1.max {
            self.1.closed.notify_waiters();
        }
    }
}

/// The response body sent to the client: carries the request's guards (leases), so they are
/// released when the last byte is written or the client goes away, whichever comes first.
struct GuardedBody {
    inner: BoxBody,
    _guards: Vec<Box<dyn Any>>,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What finished requests leave for Lua's collector is mostly memory Lua cannot see: each
/// upstream response's state (and mlua's box of each finished async call, when a policy uses
/// one). Counting only the userdata's few bytes, the collector fell behind (no steps: 375 MB
/// after 16 s of wrk -c100; BENCHMARKS.md, session 3), so the worker steps it by this much...
const GC_STEP_KB: i32 = 1;
/// ... once every this many requests. Every 2nd request until `req:proxy` stopped leaving an
/// mlua future box per call; every 4th keeps RSS at 19-21 MB over 3 x 8 s of post5k at
/// wrk -c100 (as every 2nd did) and saves ~500 instructions per request.
const GC_STEP_EVERY: u64 = 4;

/// Ends a request when handling ends, even when the handling future is dropped first (client
/// abort): its guards (leases) and body go, and its id (the second field, once its Lua object
/// exists) leaves the live list, so later method calls get "request has ended".
struct DrainOnDrop(Rc<ReqInner>, Cell<i64>);

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        if self.1.get() != 0 {
            crate::request::clear_live(self.1.get());
        }
        self.0.guards.borrow_mut().clear();
        // A `req:proxy` exchange cut short (client gone) holds the request and an upstream
        // connection: both go now.
        drop(std::mem::take(&mut *self.0.proxy.borrow_mut()));
        *self.0.body.borrow_mut() = crate::request::BodyState::Ended;
    }
}

fn simple(status: StatusCode, body: &str) -> Response<BoxBody> {
    let mut r = Response::new(full(Bytes::from(format!("{body}\n"))));
    r.status = status;
    r.headers
        .map_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Converts what a handler returned into a response:
/// an upstream `res`; `{status=, headers=, body=}`; or `status, body?, headers?`.
/// A table body is sent as JSON.
fn to_response(lua: &Lua, mut values: LuaMultiValue) -> Result<Response<BoxBody>, String> {
    let first = values.pop_front().unwrap_or(LuaValue::Nil);
    let (status, body, headers) = match first {
        LuaValue::UserData(ud) => {
            let res = ud
                .borrow::<crate::upstream::Response>()
                .map_err(|_| "handler returned a userdata that is not a response".to_string())?;
            return Ok(Response {
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
    Ok(Response {
        status,
        headers: map.into(),
        body,
    })
}

async fn handle(
    w: &Worker,
    head: RequestHead,
    body: IncomingBody,
    peer: SocketAddr,
    peer_ip: &Rc<str>,
) -> Response<GuardedBody> {
    let inner = Rc::new(ReqInner {
        method: RefCell::new(head.method),
        uri: RefCell::new(head.uri),
        path: RefCell::new(head.path),
        version: head.version,
        headers: RefCell::new(head.headers),
        peer,
        peer_ip: peer_ip.clone(),
        body: RefCell::new(crate::request::BodyState::Stream(body)),
        guards: RefCell::new(Vec::new()),
        failure: Default::default(),
        limits: w.limits.clone(),
        start: Instant::now(),
        upstream: RefCell::new(None),
        proxy: Default::default(),
    });
    let drain = DrainOnDrop(inner.clone(), Cell::new(0));
    let ready = w.req_meta.get() || {
        let r = crate::request::install_metatable(&w.lua, |m| {
            crate::proxy::add_methods(m);
            crate::fastproxy::install(m.lua, &m.t)
        })
        .map_err(|e| e.to_string());
        w.req_meta.set(r.is_ok());
        r.is_ok()
    };
    let result = match ready {
        true => {
            let (obj, id) = crate::request::request_object(&inner);
            drain.1.set(id);
            let mut args = LuaMultiValue::new();
            args.push_back(obj);
            crate::fastproxy::driving(call_protected(&w.lua, w.handler.clone(), args)).await
        }
        false => Err("cannot set up request objects".to_string()),
    };
    let mut resp = match result.and_then(|v| to_response(&w.lua, v)) {
        Ok(r) => r,
        Err(msg) => {
            crate::log::log(
                crate::log::ERR,
                &format!(
                    "policy error: {msg}, client: {}, request: \"{} {}\"",
                    peer.ip(),
                    inner.method.borrow(),
                    inner.uri.borrow()
                ),
            );
            simple(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error",
            )
        }
    };
    if let Some((status, why)) = inner.failure.get() {
        crate::log::log(
            crate::log::INFO,
            &format!(
                "request from {} failed: {why} ({})",
                peer.ip(),
                status.as_u16()
            ),
        );
        resp = simple(status, why);
        resp.headers
            .map_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let guards = std::mem::take(&mut *inner.guards.borrow_mut());
    // Off the live list before the collector may free the request object (and its address
    // be reused by another).
    drop(drain);
    let n = w.requests.get().wrapping_add(1);
    w.requests.set(n);
    if n.is_multiple_of(GC_STEP_EVERY) {
        runtime::gc_pressure(&w.lua, GC_STEP_KB);
    }
    resp.map(|b| GuardedBody {
        inner: b,
        _guards: guards,
    })
}

/// How long a connection we close keeps reading (and discarding) what the client still sends,
/// like nginx's lingering close.
const LINGER: Duration = Duration::from_secs(2);

/// Serves one client connection: head, policy, response, and again while the connection
/// stays open. Requests on one connection run one after another (pipelined ones wait in the
/// read buffer).
async fn serve_conn(
    w: Rc<Worker>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    _open: OpenConn,
) {
    let _ = stream.set_nodelay(true);
    let conn = ClientConn::new(stream);
    let peer_ip: Rc<str> = Rc::from(peer.ip().to_string());
    let mut head_deadline = crate::h1::io::LazyDeadline::default();
    let send_timeout = w.settings.send_timeout;
    let mut served = 0usize;
    loop {
        // The first head is due within client_header_timeout of the accept; a kept-alive
        // connection may then idle for keepalive_timeout before its next head begins.
        let idle = (served > 0).then_some(w.settings.keepalive_timeout);
        let head = match downstream::read_head(
            &conn,
            &w.limits,
            w.settings.client_header_timeout,
            idle,
            &mut head_deadline,
            &mut shutdown,
        )
        .await
        {
            Ok(h) => h,
            Err(HeadError::Closed) => return,
            Err(HeadError::Timeout) => {
                crate::log::log(
                    crate::log::DEBUG,
                    &format!("closing idle connection from {peer}"),
                );
                return;
            }
            Err(HeadError::Bad(r)) => {
                crate::log::log(
                    crate::log::INFO,
                    &format!(
                        "rejected request from {}: {} ({})",
                        peer.ip(),
                        r.reason,
                        r.status.as_u16()
                    ),
                );
                // The rest of the stream cannot be trusted to be framed correctly.
                let mut resp = simple(r.status, r.reason);
                let (m, v) = (Method::GET, Version::HTTP_11);
                if downstream::write_response(
                    &conn,
                    &mut resp,
                    &m,
                    v,
                    false,
                    send_timeout,
                    &mut || {},
                )
                .await
                .is_ok()
                {
                    downstream::linger_close(&conn, LINGER).await;
                }
                return;
            }
        };
        served += 1;
        let (method, version) = (head.method.clone(), head.version);
        let at_limit = w.settings.keepalive_requests > 0 && served >= w.settings.keepalive_requests;
        let mut keep = head.keep_alive
            && !at_limit
            && !w.settings.keepalive_timeout.is_zero()
            && !*shutdown.borrow();
        let request_line = (method.clone(), head.uri.clone());
        let handled = handle(&w, head, IncomingBody::new(conn.clone()), peer, &peer_ip);
        let Some(mut resp) = downstream::unless_client_gone(&conn, handled).await else {
            // Dropping the handling ends the request: its leases are released and its
            // upstream exchange (and connection) dropped, as nginx does for a client abort
            // (its 499) unless proxy_ignore_client_abort is on.
            crate::log::log(
                crate::log::INFO,
                &format!(
                    "client {} closed the connection while \"{} {}\" was handled (499)",
                    peer.ip(),
                    request_line.0,
                    request_line.1
                ),
            );
            return;
        };
        let mut guards = std::mem::take(&mut resp.body._guards);
        let written = downstream::write_response(
            &conn,
            &mut resp,
            &method,
            version,
            keep,
            send_timeout,
            &mut || guards.clear(),
        )
        .await;
        drop(guards);
        // The request's leases end with its last byte written (or with the failed write).
        drop(resp);
        match written {
            Ok(k) => keep = k,
            Err(e) => {
                crate::log::log(crate::log::DEBUG, &format!("connection from {peer}: {e}"));
                return;
            }
        }
        let clean = conn.borrow().body_done()
            || (keep && downstream::drain_body(&conn, w.limits.body_timeout).await);
        if !keep || !clean {
            if !clean || !conn.borrow().idle() {
                // The client may still be sending: closing with unread bytes would send a
                // reset, which can destroy the response on its way.
                downstream::linger_close(&conn, LINGER).await;
            }
            return;
        }
        // Let the worker's other connections go first, as nginx posts a keep-alive
        // connection's next read behind the events already waiting. On loopback the
        // upstream's answer and the client's next request are often in the sockets before
        // this task asks, so without a yield one connection ran request after request while
        // the others waited (wrk -c100: p99 12-15 ms, against 5-8 ms with the yield and the
        // same req/s).
        tokio::task::yield_now().await;
    }
}

async fn accept_loop(
    w: Rc<Worker>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
    mut handed: Option<tokio::sync::mpsc::UnboundedReceiver<Handoff>>,
) {
    loop {
        w.cap.room().await;
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let open = match &w.balance {
                        Some((b, me)) => match b.elsewhere(*me) {
                            Some(j) => {
                                if let Ok(s) = stream.into_std() {
                                    let _ = b.handoff[j].send((s, peer, OpenConn::new(Some((b, j)), &w.cap)));
                                }
                                continue;
                            }
                            None => OpenConn::new(Some((b, *me)), &w.cap),
                        },
                        None => OpenConn::new(None, &w.cap),
                    };
                    tokio::task::spawn_local(serve_conn(w.clone(), stream, peer, shutdown.clone(), open));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning or dying.
                    crate::log::log(crate::log::ERR, &format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some((s, peer, open)) = async { match handed.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            } } => {
                if let Ok(stream) = tokio::net::TcpStream::from_std(s) {
                    tokio::task::spawn_local(serve_conn(w.clone(), stream, peer, shutdown.clone(), open));
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Settings that cross from the calling thread to the workers (plain data only).
#[derive(Clone)]
struct WorkerSpec {
    policy: String,
    config: serde_json::Value,
    package_path: Option<String>,
    package_cpath: Option<String>,
    settings: Settings,
    cap: Arc<ConnCap>,
}

/// Loads the policy into a fresh VM: the file must return a handler function or a table
/// with `handler` (and optionally `init_worker(config)`).
async fn load_policy(lua: &Lua, spec: &WorkerSpec) -> Result<LuaFunction, String> {
    let package: LuaTable = lua.globals().get("package").map_err(|e| e.to_string())?;
    if let Some(p) = &spec.package_path {
        package.set("path", p.as_str()).map_err(|e| e.to_string())?;
    }
    if let Some(p) = &spec.package_cpath {
        package
            .set("cpath", p.as_str())
            .map_err(|e| e.to_string())?;
    }
    let code = std::fs::read(&spec.policy).map_err(|e| {
        format!(
            "cannot read policy file '{}': {}",
            spec.policy,
            e.to_string().to_lowercase()
        )
    })?;
    let chunk = lua
        .load(code)
        .set_name(format!("@{}", spec.policy))
        .into_function()
        .map_err(|e| match e {
            LuaError::SyntaxError { message, .. } => message,
            e => e.to_string(),
        })?;
    let config = lua.to_value(&spec.config).map_err(|e| e.to_string())?;
    let mut args = LuaMultiValue::new();
    args.push_back(config.clone());
    let mut ret = call_protected(lua, chunk, args).await?;
    let (handler, init) = match ret.pop_front() {
        Some(LuaValue::Function(f)) => (f, None),
        Some(LuaValue::Table(t)) => {
            let h: Option<LuaFunction> = t.get("handler").ok().flatten();
            let i: Option<LuaFunction> = t.get("init_worker").ok().flatten();
            match h {
                Some(h) => (h, i),
                None => {
                    return Err(format!(
                        "policy '{}' returned a table without a handler function",
                        spec.policy
                    ))
                }
            }
        }
        _ => {
            return Err(format!(
                "policy '{}' must return a handler function or a table with one",
                spec.policy
            ))
        }
    };
    if let Some(init) = init {
        let mut args = LuaMultiValue::new();
        args.push_back(config);
        call_protected(lua, init, args)
            .await
            .map_err(|e| format!("policy init_worker failed: {e}"))?;
    }
    Ok(handler)
}

#[cfg(feature = "luajit")]
fn jit_libs() -> LuaStdLib {
    LuaStdLib::FFI | LuaStdLib::JIT
}

#[cfg(not(feature = "luajit"))]
fn jit_libs() -> LuaStdLib {
    LuaStdLib::NONE
}

fn worker_thread(
    id: usize,
    std_listener: StdListener,
    spec: WorkerSpec,
    ready: oneshot::Sender<Result<(), String>>,
    shutdown: watch::Receiver<bool>,
    exited: Arc<Notify>,
    balance: (Arc<Balance>, tokio::sync::mpsc::UnboundedReceiver<Handoff>),
) {
    runtime::set_worker_id(id);
    let (balance, handed) = balance;
    let rt = match runtime::new_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {id}: {e}")));
            return;
        }
    };
    // SAFETY: unsafe_new lets policies `require` C modules (lua-cjson, ...) exactly like the
    // main program can; the VM never leaves this thread. On LuaJIT the `ffi` library is
    // opened too: OpenResty-style policies use it, and so do the dict methods.
    let lua = unsafe {
        Lua::unsafe_new_with(
            LuaStdLib::ALL_SAFE | LuaStdLib::DEBUG | jit_libs(),
            LuaOptions::new().thread_pool_size(256),
        )
    };
    let guard = LoopGuard::enter();
    let local = tokio::task::LocalSet::new();
    let main = local.spawn_local(async move {
        let setup = async {
            let t = crate::exports(&lua).map_err(|e| e.to_string())?;
            lua.register_module("luaproxy", t)
                .map_err(|e| e.to_string())?;
            let handler = load_policy(&lua, &spec).await?;
            let listener =
                tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
            Ok::<_, String>((handler, listener))
        };
        match setup.await {
            Err(e) => {
                let _ = ready.send(Err(e));
            }
            Ok((handler, listener)) => {
                let _ = ready.send(Ok(()));
                let w = Rc::new(Worker {
                    lua: lua.clone(),
                    handler,
                    limits: Rc::new(spec.settings.limits.clone()),
                    settings: spec.settings.clone(),
                    cap: spec.cap.clone(),
                    requests: Cell::new(0),
                    req_meta: Cell::new(false),
                    balance: Some((balance, id)),
                });
                accept_loop(w, listener, shutdown, Some(handed)).await;
            }
        }
    });
    runtime::drive(&rt, local, main, &guard.0);
    drop(guard);
    exited.notify_waiters();
}

/// A running server: `srv.addr`, `srv.port`, `srv:close()`, `srv:wait()`.
pub struct Server {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    threads: RefCell<Vec<std::thread::JoinHandle<()>>>,
    local_done: Rc<Notify>,
    local_running: Rc<std::cell::Cell<bool>>,
    exited: Arc<Notify>,
}

impl LuaUserData for Server {
    fn add_fields<F: LuaUserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("addr", |_, this| Ok(this.addr.to_string()));
        f.add_field_method_get("port", |_, this| Ok(this.addr.port()));
    }

    fn add_methods<M: LuaUserDataMethods<Self>>(m: &mut M) {
        // srv:close() -> true: stop accepting; in-flight requests finish, idle connections close.
        m.add_method("close", |_, this, ()| {
            let _ = this.shutdown.send(true);
            Ok(true)
        });
        // srv:wait() -> true once every worker has stopped (after close, or never).
        m.add_async_method("wait", |_, this, ()| async move {
            runtime::check_loop("srv:wait")?;
            loop {
                let notified = this.exited.notified();
                let local_notified = this.local_done.notified();
                let threads_done = this.threads.borrow().iter().all(|t| t.is_finished());
                if threads_done && !this.local_running.get() {
                    break;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = local_notified => {}
                    // Belt and braces: a notify_waiters sent between the check and the await.
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            for t in this.threads.borrow_mut().drain(..) {
                let _ = t.join();
            }
            Ok(true)
        });
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s2 = if let Some(port) = s.strip_prefix("*:") {
        format!("0.0.0.0:{port}")
    } else if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
        format!("127.0.0.1:{s}")
    } else {
        s.to_string()
    };
    s2.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("bad listen address '{s}' (expected host:port)"))
}

/// Binds one listening socket. Workers each get their own socket on the same port
/// (SO_REUSEPORT): with one shared socket, whichever thread wakes first takes most connections
/// and one core saturates while the other idles (measured: 12k-18k req/s run to run, against
/// a steady figure with REUSEPORT). What the kernel's split leaves uneven, `Balance` evens.
fn bind(addr: SocketAddr, reuse_port: bool) -> Result<StdListener, String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| e.to_string())?;
    sock.set_reuse_address(true).map_err(|e| e.to_string())?;
    if reuse_port {
        sock.set_reuse_port(true).map_err(|e| e.to_string())?;
    }
    sock.bind(&addr.into())
        .map_err(|e| format!("cannot listen on {addr}: {}", e.to_string().to_lowercase()))?;
    sock.listen(1024).map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(sock.into())
}

/// The keys of `luaproxy.serve{...}` that are not settings.
const SERVE_KEYS: &[&str] = &["listen", "handler", "policy", "workers", "config"];

/// Reads the settings in `opts` (every key but `SERVE_KEYS`), in nginx's names and forms.
fn settings_from(opts: &LuaTable) -> LuaResult<Settings> {
    let mut s = Settings::default();
    let err = |e: String| LuaError::runtime(format!("luaproxy.serve: {e}"));
    for pair in opts.pairs::<LuaValue, LuaValue>() {
        let (k, v) = pair?;
        let key = match &k {
            LuaValue::String(k) => k.to_str()?.to_string(),
            other => return Err(err(format!("bad option name ({})", other.type_name()))),
        };
        if SERVE_KEYS.contains(&key.as_str()) {
            continue;
        }
        let value = match v {
            LuaValue::Integer(n) => settings::Value::Num(n as f64),
            LuaValue::Number(n) => settings::Value::Num(n),
            LuaValue::String(s) => settings::Value::Str(s.to_str()?.to_string()),
            LuaValue::Boolean(b) => settings::Value::Bool(b),
            LuaValue::Table(t) => settings::Value::List(
                t.sequence_values::<String>()
                    .collect::<LuaResult<_>>()
                    .map_err(|_| err(format!("setting '{key}': expected a list of strings")))?,
            ),
            other => {
                return Err(err(format!(
                    "setting '{key}': bad value (a {})",
                    other.type_name()
                )))
            }
        };
        s.set(&key, &value).map_err(err)?;
    }
    Ok(s)
}

/// `srv, err = luaproxy.serve{ listen = "127.0.0.1:8080", handler = fn | policy = "file.lua",
/// workers = N, config = {...}, <settings> }`: the settings are `settings::NAMES`, with
/// nginx's names, units and defaults (docs/api.md). Returns once every worker is
/// listening; `nil, err` when the address is bad or taken, or the policy fails to load.
/// An unknown setting or a bad value raises an error naming it.
async fn lua_serve(lua: Lua, opts: LuaTable) -> LuaResult<(Option<Server>, Option<String>)> {
    let listen: String = opts
        .get::<Option<String>>("listen")?
        .ok_or_else(|| LuaError::runtime("luaproxy.serve: 'listen' (host:port) is required"))?;
    let handler: Option<LuaFunction> = opts.get("handler")?;
    let policy: Option<String> = opts.get("policy")?;
    if handler.is_some() == policy.is_some() {
        return Err(LuaError::runtime(
            "luaproxy.serve: give exactly one of 'handler' (a function) or 'policy' (a file)",
        ));
    }
    let workers: usize = match opts.get::<Option<i64>>("workers")? {
        None => runtime::default_workers(),
        Some(n) if (1..=1024).contains(&n) => n as usize,
        Some(n) => {
            return Err(LuaError::runtime(format!(
                "luaproxy.serve: workers must be 1..1024, got {n}"
            )))
        }
    };
    let settings = settings_from(&opts)?;
    runtime::raise_nofile_limit();
    let config_value: LuaValue = opts.get("config")?;
    let config: serde_json::Value = if config_value.is_nil() {
        serde_json::Value::Object(Default::default())
    } else {
        lua.from_value(config_value).map_err(|e| {
            LuaError::runtime(format!("luaproxy.serve: config must be plain data: {e}"))
        })?
    };

    let addr = match parse_listen(&listen) {
        Ok(a) => a,
        Err(e) => return Ok((None, Some(e))),
    };
    let std_listener = match bind(addr, policy.is_some()) {
        Ok(l) => l,
        Err(e) => return Ok((None, Some(e))),
    };
    let addr = std_listener.local_addr().unwrap_or(addr);
    let (tx, rx) = watch::channel(false);
    let exited = Arc::new(Notify::new());
    let server = Server {
        addr,
        shutdown: tx,
        threads: RefCell::new(Vec::new()),
        local_done: Rc::new(Notify::new()),
        local_running: Rc::new(std::cell::Cell::new(false)),
        exited: exited.clone(),
    };

    if let Some(handler) = handler {
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .map_err(|e| LuaError::runtime(format!("luaproxy.serve: {e}")))?;
        let w = Rc::new(Worker {
            lua: lua.clone(),
            handler,
            limits: Rc::new(settings.limits.clone()),
            cap: ConnCap::new(settings.max_connections),
            settings,
            requests: Cell::new(0),
            req_meta: Cell::new(false),
            balance: None,
        });
        let (done, running) = (server.local_done.clone(), server.local_running.clone());
        running.set(true);
        tokio::task::spawn_local(async move {
            accept_loop(w, listener, rx, None).await;
            running.set(false);
            done.notify_waiters();
        });
        return Ok((Some(server), None));
    }

    let package: LuaTable = lua.globals().get("package")?;
    let spec = WorkerSpec {
        policy: policy.unwrap_or_default(),
        config,
        package_path: package.get("path")?,
        package_cpath: package.get("cpath")?,
        cap: ConnCap::new(settings.max_connections),
        settings,
    };
    let mut readies = Vec::new();
    let mut sockets = vec![std_listener];
    for _ in 1..workers {
        match bind(addr, true) {
            Ok(l) => sockets.push(l),
            Err(e) => return Ok((None, Some(e))),
        }
    }
    let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..sockets.len())
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let balance = Arc::new(Balance {
        open: (0..sockets.len())
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect(),
        handoff: senders,
    });
    for (id, l) in sockets.into_iter().enumerate() {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (spec, rx, exited) = (spec.clone(), rx.clone(), exited.clone());
        let bal = (balance.clone(), receivers.remove(0));
        let t = std::thread::Builder::new()
            .name(format!("luaproxy-w{id}"))
            .spawn(move || worker_thread(id, l, spec, ready_tx, rx, exited, bal))
            .map_err(|e| LuaError::runtime(format!("luaproxy.serve: cannot start worker: {e}")))?;
        server.threads.borrow_mut().push(t);
        readies.push(ready_rx);
    }
    let mut first_err = None;
    for r in readies {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("worker exited during start-up".into());
            }
        }
    }
    if let Some(e) = first_err {
        let _ = server.shutdown.send(true);
        for t in server.threads.borrow_mut().drain(..) {
            let _ = t.join();
        }
        return Ok((None, Some(e)));
    }
    Ok((Some(server), None))
}

pub fn register(lua: &Lua, t: &LuaTable) -> LuaResult<()> {
    t.set(
        "serve",
        lua.create_async_function(|lua, opts: LuaTable| {
            let ok = runtime::check_loop("luaproxy.serve");
            async move {
                ok?;
                lua_serve(lua, opts).await
            }
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_connections_go_to_a_worker_holding_two_fewer() {
        let b = Balance {
            open: [5, 4, 3]
                .iter()
                .map(|&n| std::sync::atomic::AtomicUsize::new(n))
                .collect(),
            handoff: (0..3)
                .map(|_| tokio::sync::mpsc::unbounded_channel().0)
                .collect(),
        };
        assert_eq!(b.elsewhere(0), Some(2));
        assert_eq!(b.elsewhere(1), None);
        assert_eq!(b.elsewhere(2), None);
    }
}
