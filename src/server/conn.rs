//! One client connection: read a head, run the policy on it, write the response, and again
//! while the connection stays open; and what ends a request however it ends (leases, the
//! request object, an abandoned upstream exchange).

use crate::h1::body::{BoxBody, BoxError};
use crate::h1::downstream::{self, DownstreamConn, DownstreamResponse, HeadError, IncomingBody};
use crate::h1::rules::Limits;
use crate::request::ReqInner;
use crate::runtime;
use crate::settings::Settings;
use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode, Version};
use mlua::prelude::*;
use std::any::Any;
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{watch, Notify};

use super::logphase::{self, LogPhase};
use super::respond::{simple, to_response};

/// What every connection of one worker needs.
pub(super) struct Worker {
    pub(super) lua: Lua,
    pub(super) handler: LuaFunction,
    pub(super) limits: Rc<Limits>,
    pub(super) settings: Settings,
    /// Open connections of the whole server, against `max_connections`.
    pub(super) cap: Arc<ConnCap>,
    /// This VM's light userdata metatable is the request one.
    pub(super) req_meta: Cell<bool>,
    /// Requests handled, for pacing the collector steps.
    pub(super) requests: Cell<u64>,
    /// This worker's place among the policy workers (none in handler mode).
    pub(super) balance: Option<(Arc<Balance>, usize)>,
    /// This generation's life (`runtime::VmLife`): its timers and tasks watch it.
    pub(super) life: watch::Sender<u8>,
    /// The policy's log phase and the access log.
    pub(super) log: LogPhase,
}

/// The generation a worker thread serves new requests with; a reload replaces it.
pub(super) type Current = Rc<std::cell::RefCell<Rc<Worker>>>;

/// A freshly accepted connection on its way to another worker, already counted there.
pub(super) type Handoff = (std::net::TcpStream, SocketAddr, OpenConn);

/// Open client connections per worker, and a way to hand a new one to another worker.
///
/// Each worker accepts on its own `SO_REUSEPORT` socket, and the kernel splits connections by
/// a hash of their addresses, blind to load: in one run of six the workers'
/// epoll sets held 125 and 88 sockets (client plus upstream), and that run did 7 % fewer
/// requests (BENCHMARKS.md, session 3). A worker that accepts while it holds two or
/// more connections more than the least-loaded worker passes the socket over (at accept time
/// only; nginx's workers likewise stop accepting when they hold more than their share).
pub(super) struct Balance {
    pub(super) open: Vec<std::sync::atomic::AtomicUsize>,
    pub(super) handoff: Vec<tokio::sync::mpsc::UnboundedSender<Handoff>>,
}

impl Balance {
    /// The worker a connection accepted by `me` should go to instead, if any.
    pub(super) fn elsewhere(&self, me: usize) -> Option<usize> {
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
pub(super) struct ConnCap {
    pub(super) open: std::sync::atomic::AtomicUsize,
    pub(super) max: std::sync::atomic::AtomicUsize,
    pub(super) closed: Notify,
    /// Set when the server begins to stop (beside the shutdown channel, which wakes waiters:
    /// this is what a response checks, for the price of a load).
    pub(super) stopping: std::sync::atomic::AtomicBool,
}

impl ConnCap {
    pub(super) fn new(max: usize) -> Arc<ConnCap> {
        Arc::new(ConnCap {
            open: Default::default(),
            max: max.into(),
            closed: Notify::new(),
            stopping: false.into(),
        })
    }

    /// A reload's new `max_connections`.
    pub(super) fn set_max(&self, max: usize) {
        self.max.store(max, std::sync::atomic::Ordering::Relaxed);
        self.closed.notify_waiters();
    }

    /// True while the server holds fewer than `max` connections.
    pub(super) fn has_room(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.open.load(Relaxed) < self.max.load(Relaxed)
    }

    /// Waits until `has_room`.
    pub(super) async fn room(&self) {
        loop {
            let closed = self.closed.notified();
            if self.has_room() {
                return;
            }
            closed.await;
        }
    }
}

/// Counts a connection as open on a worker and in the server while it lives; counted from
/// the moment it is accepted, since a burst of accepts runs before any connection task
/// starts.
pub(super) struct OpenConn(Option<(Arc<Balance>, usize)>, Arc<ConnCap>);

impl OpenConn {
    pub(super) fn new(b: Option<(&Arc<Balance>, usize)>, cap: &Arc<ConnCap>) -> OpenConn {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((b, i)) = b {
            b.open[i].fetch_add(1, Relaxed);
        }
        cap.open.fetch_add(1, Relaxed);
        crate::metrics::builtin::CONNECTION_COUNT.add(1);
        OpenConn(b.map(|(b, i)| (b.clone(), i)), cap.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((b, i)) = &self.0 {
            b.open[*i].fetch_sub(1, Relaxed);
        }
        crate::metrics::builtin::CONNECTION_COUNT.add(-1);
        if self.1.open.fetch_sub(1, Relaxed) >= self.1.max.load(Relaxed) {
            self.1.closed.notify_waiters();
        }
    }
}

/// The response body sent to the client: carries the request's guards (leases), so they are
/// released when the last byte is written or the client goes away, whichever comes first.
pub(super) struct GuardedBody {
    pub(super) inner: BoxBody,
    pub(super) _guards: Vec<Box<dyn Any>>,
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
pub(super) const GC_STEP_KB: i32 = 1;
/// ... once every this many requests. Every 2nd request until `req:proxy` stopped leaving an
/// mlua future box per call; every 4th keeps RSS at 19-21 MB over 3 x 8 s of post5k at
/// wrk -c100 (as every 2nd did) and saves ~500 instructions per request.
pub(super) const GC_STEP_EVERY: u64 = 4;

/// Ends a request when handling ends, even when the handling future is dropped first (client
/// abort): its guards (leases) and body go, and its id (the second field, once its Lua object
/// exists) leaves the live list, so later method calls get "request has ended". Its `ctx`
/// stays for the log phase (the connection releases it after that).
pub(super) struct DrainOnDrop(Rc<ReqInner>, Cell<i64>);

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

/// How a handled request left the connection: its response, and whether the connection
/// must close after it (a panic while handling it: its state cannot be trusted).
pub(super) struct Handled {
    resp: DownstreamResponse<GuardedBody>,
    close: bool,
}

pub(super) async fn handle(w: &Worker, inner: Rc<ReqInner>) -> Handled {
    let peer = inner.peer;
    let drain = DrainOnDrop(inner.clone(), Cell::new(0));
    let panics = crate::log::panics();
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
            let budget = w.settings.lua_budget;
            let call = runtime::call_protected_budgeted(&w.lua, w.handler.clone(), args, budget);
            crate::fastproxy::driving(call).await
        }
        false => Err("cannot set up request objects".to_string()),
    };
    let mut close = false;
    let mut resp = match result.and_then(|v| to_response(&w.lua, v)) {
        Ok(r) => r,
        Err(msg) => {
            // Logged once, here, with its traceback; the client gets a plain 500 and the id
            // to quote.
            let id = inner.request_id();
            let panicked = crate::log::panics() != panics;
            let limit = w.settings.lua_memory_limit;
            let what = if panicked {
                close = true;
                "internal error (panic) in".to_string()
            } else if limit > 0 && msg.starts_with("not enough memory") {
                // What the dead coroutine held is garbage now: give it back (to the VM, and
                // to the system) before the next request meets the cap.
                w.lua.gc_collect().ok();
                crate::alloc::release_free_memory();
                format!(
                    "lua_memory_limit ({}) reached by",
                    crate::units::show_size(limit)
                )
            } else if msg.starts_with(crate::budget::EXCEEDED) {
                // A runaway call often leaves a heap of garbage (a loop that allocated): the
                // collector would take its time over it; this is rare, so now.
                w.lua.gc_collect().ok();
                crate::alloc::release_free_memory();
                "error in".to_string()
            } else {
                "error in".to_string()
            };
            crate::metrics::builtin::lua_error("handler");
            crate::log!(
                ERR,
                "{what} policy: {msg}, client: {}, request: \"{} {}\", request_id: {id}",
                peer.ip(),
                inner.method.borrow(),
                inner.uri.borrow(),
            );
            let mut r = simple(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error",
            );
            if let Ok(v) = HeaderValue::from_str(&id) {
                r.headers.map_mut().insert("x-request-id", v);
            }
            r
        }
    };
    if let Some((status, why)) = inner.failure.get() {
        crate::log!(
            INFO,
            "request from {} failed: {why} ({})",
            peer.ip(),
            status.as_u16(),
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
    Handled {
        resp: resp.map(|b| GuardedBody {
            inner: b,
            _guards: guards,
        }),
        close,
    }
}

/// How long a connection we close keeps reading (and discarding) what the client still sends,
/// like nginx's lingering close.
pub(super) const LINGER: Duration = Duration::from_secs(2);

/// Serves one client connection (`serve_conn_inner`); a panic in it ends only this
/// connection, and is logged.
pub(super) fn serve_conn(
    cur: Current,
    stream: crate::h1::stream::Stream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    open: OpenConn,
) -> impl Future<Output = ()> {
    Caught {
        fut: serve_conn_inner(cur, stream, peer, shutdown, open),
        peer,
    }
}

/// A connection's future with its panics caught. A struct, not an `async` wrapper: that kept
/// its arguments a second time beside the pinned inner future, in every connection's task.
struct Caught<F> {
    fut: F,
    peer: SocketAddr,
}

impl<F: Future<Output = ()>> Future for Caught<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `fut` is never moved out of a pinned `Caught` (nothing takes it by value, and
        // `Caught` is Unpin only when `F` is), so a pinned `Caught` pins its `fut`.
        let (fut, peer) = unsafe {
            let this = self.get_unchecked_mut();
            (Pin::new_unchecked(&mut this.fut), this.peer)
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(p) => p,
            Err(_) => {
                crate::log!(
                    ERR,
                    "internal error (panic) on the connection from {peer}: connection closed"
                );
                Poll::Ready(())
            }
        }
    }
}

/// Serves one client connection: head, policy, response, and again while the connection
/// stays open. Requests on one connection run one after another (pipelined ones wait in the
/// read buffer); each runs on the generation serving when its head arrived.
///
/// This future is what an idle keep-alive connection costs while it waits (with its
/// `DownstreamConn`, whose read buffer is let go meanwhile): everything a request needs
/// beyond its head lives in `serve_request`'s future, boxed per request and gone when the
/// request ends. Inline, the largest of those states sized every connection's task at 10 KB
/// (BENCHMARKS.md, "Idle connections"); `conn_future_stays_small` keeps it small. An `async`
/// block rather than an `async fn`, which would keep its arguments twice.
fn serve_conn_inner(
    cur: Current,
    stream: crate::h1::stream::Stream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    open: OpenConn,
) -> impl Future<Output = ()> {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let _ = stream.set_nodelay(true);
    let mut c = ConnState {
        conn: DownstreamConn::new(stream),
        peer,
        peer_ip: Rc::from(peer.ip().to_string()),
        serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
        served: 0,
        _open: open,
    };
    async move {
        let mut head_deadline = crate::h1::io::LazyDeadline::default();
        loop {
            let w = cur.borrow().clone();
            // The first head is due within client_header_timeout of the accept; a kept-alive
            // connection may then idle for keepalive_timeout before its next head begins.
            let idle = (c.served > 0).then_some(w.settings.keepalive_timeout);
            // The head (300 bytes) goes into the request's boxed future inside this block, so
            // it is not kept in this future's state (and so in every idle connection's).
            let next = {
                let got = downstream::read_head(
                    &c.conn,
                    &w.limits,
                    w.settings.client_header_timeout,
                    idle,
                    &mut head_deadline,
                    &mut shutdown,
                )
                .await;
                match got {
                    Ok(head) => {
                        c.served += 1;
                        Next::Serve(Box::pin(serve_request(&w, &c, head)))
                    }
                    Err(HeadError::Closed) => return,
                    Err(HeadError::Timeout) => {
                        crate::log!(DEBUG, "closing idle connection from {}", c.peer);
                        return;
                    }
                    Err(HeadError::Bad(r)) => Next::Reject(Box::pin(reject(&w, &c, r))),
                }
            };
            match next {
                Next::Serve(request) => {
                    if !request.await {
                        return;
                    }
                }
                Next::Reject(rejected) => return rejected.await,
            }
            // Let the worker's other connections go first, as nginx posts a keep-alive
            // connection's next read behind the events already waiting. On loopback the
            // upstream's answer and the client's next request are often in the sockets before
            // this task asks, so without a yield one connection ran request after request
            // while the others waited (wrk -c100: p99 12-15 ms, against 5-8 ms with the yield
            // and the same req/s).
            tokio::task::yield_now().await;
        }
    }
}

/// What a connection does with the head it read.
enum Next<S, R> {
    Serve(S),
    Reject(R),
}

/// What a connection keeps between its requests.
struct ConnState {
    conn: downstream::Shared,
    peer: SocketAddr,
    peer_ip: Rc<str>,
    /// The connection's number in the process (`$connection`).
    serial: u64,
    /// Requests whose head was read, this one included.
    served: usize,
    _open: OpenConn,
}

/// Answers a head we refuse, logs it and closes the connection.
async fn reject(w: &Worker, c: &ConnState, r: crate::h1::rules::Reject) {
    let (conn, peer) = (&c.conn, c.peer);
    crate::log!(
        INFO,
        "rejected request from {}: {} ({})",
        peer.ip(),
        r.reason,
        r.status.as_u16(),
    );
    // The rest of the stream cannot be trusted to be framed correctly.
    let mut resp = simple(r.status, r.reason);
    let (m, v) = (Method::GET, Version::HTTP_11);
    let (wrote, got) = {
        let c = conn.borrow();
        (c.bytes_written(), c.unparsed())
    };
    let ok = downstream::write_response(
        conn,
        &mut resp,
        &m,
        v,
        false,
        w.settings.send_timeout,
        &mut || {},
    )
    .await
    .is_ok();
    let (body_sent, sent) = {
        let c = conn.borrow();
        (c.body_bytes_sent(), c.bytes_written() - wrote)
    };
    let pending = logphase::ended(
        &w.lua,
        &w.log,
        &logphase::Ended {
            req: None,
            method: "",
            target: "",
            version: v,
            // the head's first byte is not timed: a rejection costs ~0 anyway
            start: crate::clock::now(),
            status: r.status.as_u16(),
            body_bytes_sent: body_sent,
            bytes_sent: sent,
            request_length: got,
            peer,
            peer_ip: &c.peer_ip,
            response_headers: Some(&resp.headers),
            connection: c.serial,
            connection_requests: c.served as u64 + 1,
        },
    );
    logphase::finish(pending).await;
    if ok {
        downstream::linger_close(conn, LINGER).await;
    }
}

/// One request, from its head to the last byte of its response (and its log phase). True:
/// the connection stays open for the next one. The head goes into the request object before
/// the future is made: held in it, it was kept twice, in every state (the future is copied
/// into its box whole).
fn serve_request<'a>(
    w: &'a Worker,
    c: &'a ConnState,
    head: downstream::RequestHead,
) -> impl Future<Output = bool> + 'a {
    let flight = InFlight::new();
    let (method, version) = (head.method.clone(), head.version);
    let served = c.served;
    let at_limit = w.settings.keepalive_requests > 0 && served >= w.settings.keepalive_requests;
    let wants_keep = head.keep_alive && !at_limit && !w.settings.keepalive_timeout.is_zero();
    let request_line = (method.clone(), head.uri.clone());
    let inner = Rc::new(ReqInner::new(
        head,
        IncomingBody::new(c.conn.clone()),
        c.peer,
        &c.peer_ip,
        &w.limits,
    ));
    async move {
        let (conn, peer, peer_ip) = (&c.conn, c.peer, &c.peer_ip);
        let send_timeout = w.settings.send_timeout;
        // What the log phase needs of a request however it ends.
        let ended = |status: u16, resp_headers: Option<&crate::h1::headers::Headers>, wrote| {
            let cn = conn.borrow();
            let target = request_line.1.path_and_query().map_or("", |p| p.as_str());
            logphase::ended(
                &w.lua,
                &w.log,
                &logphase::Ended {
                    req: Some(&inner),
                    method: request_line.0.as_str(),
                    target,
                    version,
                    start: inner.start,
                    status,
                    body_bytes_sent: cn.body_bytes_sent(),
                    bytes_sent: cn.bytes_written() - wrote,
                    request_length: cn.request_length(),
                    peer,
                    peer_ip,
                    response_headers: resp_headers,
                    connection: c.serial,
                    connection_requests: served as u64,
                },
            )
        };
        let handled = handle(w, inner.clone());
        let Some(Handled { mut resp, close }) = downstream::unless_client_gone(conn, handled).await
        else {
            // Dropping the handling ends the request: its leases are released and its
            // upstream exchange (and connection) dropped, as nginx does for a client abort
            // (its 499) unless proxy_ignore_client_abort is on.
            crate::log!(
                INFO,
                "client {} closed the connection while \"{} {}\" was handled (499)",
                peer.ip(),
                request_line.0,
                request_line.1
            );
            let wrote = conn.borrow().bytes_written();
            drop(flight);
            logphase::finish(ended(499, None, wrote)).await;
            inner.release_ctx(&w.lua);
            return false;
        };
        if runtime::panic_requested() {
            panic!("luaproxy._panic(\"connection\") was called");
        }
        // A server that began to stop while this request ran says so on its response
        // (`Connection: close`) and closes once it is written.
        let stopping = w.cap.stopping.load(std::sync::atomic::Ordering::Relaxed);
        let mut keep = wants_keep && !close && !stopping;
        let mut guards = std::mem::take(&mut resp.body._guards);
        let wrote = conn.borrow().bytes_written();
        let written = downstream::write_response(
            conn,
            &mut resp,
            &method,
            version,
            keep,
            send_timeout,
            &mut || guards.clear(),
        )
        .await;
        drop(guards);
        let status = resp.status.as_u16();
        let resp_headers = std::mem::take(&mut resp.headers);
        // The request's leases end with its last byte written (or with the failed write).
        drop(resp);
        let failed = written.is_err();
        let clean = match written {
            Ok(k) => {
                keep = k;
                conn.borrow().body_done()
                    || (keep && downstream::drain_body(conn, w.limits.body_timeout).await)
            }
            Err(e @ downstream::WriteError::Body { .. }) => {
                // nginx: "upstream prematurely closed connection while reading upstream".
                crate::log!(
                    ERR,
                    "{e}, client: {}, request: \"{} {}\"; connection closed",
                    peer.ip(),
                    request_line.0,
                    request_line.1
                );
                keep = false;
                true
            }
            Err(e) => {
                crate::log!(DEBUG, "connection from {peer}: {e}");
                keep = false;
                true
            }
        };
        drop(flight);
        logphase::finish(ended(status, Some(&resp_headers), wrote)).await;
        inner.release_ctx(&w.lua);
        drop(inner);
        if failed {
            return false;
        }
        if !keep || !clean {
            if !clean || !conn.borrow().idle() {
                // The client may still be sending: closing with unread bytes would send a
                // reset, which can destroy the response on its way.
                downstream::linger_close(conn, LINGER).await;
            }
            return false;
        }
        true
    }
}

/// A request being handled, in `luaproxy_http_requests_in_flight`.
struct InFlight;

impl InFlight {
    fn new() -> InFlight {
        crate::metrics::builtin::IN_FLIGHT_COUNT.add(1);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::metrics::builtin::IN_FLIGHT_COUNT.add(-1);
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns: a future's, without making one.
    fn output_size<A, B, C, D, E, R>(_: impl FnOnce(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every open connection's task holds this future for the connection's life, idle ones
    /// included; a request's state belongs in `serve_request`'s boxed future. 10,096 bytes
    /// before that split (a 4 KiB scratch array of the lingering close, inline twice). Up to
    /// 344 bytes, tokio's task cell (168 bytes more, in steps of 128) takes 512 bytes.
    #[test]
    fn conn_future_stays_small() {
        let size = output_size(super::serve_conn);
        assert!(size <= 344, "the connection future is {size} bytes");
    }
}
