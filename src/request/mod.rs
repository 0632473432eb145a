//! The request object a policy's handler receives, and the client body stream behind it.
//!
//! The body stays on the connection until the policy asks for it: `req:read_body()` buffers it (with the
//! size limit and idle timeout), `req:proxy()` streams it to the upstream without entering Lua.

use crate::h1::body::{BoxError, ReqBody};
use crate::h1::downstream::{BodyError, IncomingBody};
use crate::h1::headers::Headers;
use crate::h1::rules::Limits;
use crate::upstream::Response;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode, Uri, Version};
use mlua::prelude::*;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

/// A status the listener must answer with, whatever the policy returns (body too large, ...).
pub type Failure = Rc<Cell<Option<(StatusCode, &'static str)>>>;

/// What `req:proxy`'s exchange yields: a misuse error (raised in Lua), or the response or the
/// short error string `req:proxy` returns.
pub type Outcome = LuaResult<Result<Response, String>>;

/// A request's `req:proxy` call in progress, or finished but not yet handed to Lua (the fast
/// path of `fastproxy`). It lives in the request, so the request's end drops it, and with it
/// the upstream connection of an abandoned exchange.
#[derive(Default)]
pub enum ProxyCall {
    #[default]
    Idle,
    Running(Pin<Box<dyn std::future::Future<Output = Outcome>>>),
    Done(Outcome),
}

pub enum BodyState {
    Stream(IncomingBody),
    Buffered(Bytes),
    Taken,
    /// The handler has returned: the body (read or not) is gone.
    Ended,
}

pub struct ReqInner {
    pub method: RefCell<Method>,
    pub uri: RefCell<Uri>,
    /// `uri`'s path normalized (nginx's `$uri`) when that differs from it; `req:get_path()`
    /// returns it, `req:get_uri()` the target as sent.
    pub path: RefCell<Option<Bytes>>,
    pub version: Version,
    pub headers: RefCell<Headers>,
    pub peer: SocketAddr,
    /// `peer`'s address as text, made once per connection.
    pub peer_ip: Rc<str>,
    pub body: RefCell<BodyState>,
    /// Things that must live exactly as long as the request (least-connection leases, ...).
    pub guards: RefCell<Vec<Box<dyn Any>>>,
    pub failure: Failure,
    pub limits: Rc<Limits>,
    pub start: Instant,
    /// Each `req:proxy` exchange, in order, for the log phase and `req:get_upstream()`.
    pub attempts: RefCell<Vec<Rc<crate::upstream::Attempt>>>,
    /// `req:proxy`'s exchange on the fast path (see `fastproxy`). It holds this request, so
    /// the request's end drops it.
    pub proxy: RefCell<ProxyCall>,
    /// Made the first time something asks (`request_id`).
    id: Cell<Option<u128>>,
    /// `req:ctx()`'s table (ngx.ctx: the policy's per-request data), made on first use: its
    /// reference in the VM's registry (0: none yet). A registry slot rather than an mlua
    /// handle so the raw `req:ctx()` (object.rs) can push it; `release_ctx` frees it.
    pub ctx_ref: Cell<std::os::raw::c_int>,
}

thread_local! {
    /// A SplitMix64 state per thread, seeded from the kernel's random source.
    static ID_STATE: Cell<u64> = Cell::new({
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer it is given.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let fallback = Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
        if n == 8 { u64::from_ne_bytes(seed) } else { fallback }
    });
}

/// 128 random-looking bits: unique enough to find one request in a log (not a secret).
fn next_request_id() -> u128 {
    ID_STATE.with(|s| {
        let half = || {
            let x = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
            s.set(x);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        ((half() as u128) << 64) | half() as u128
    })
}

impl ReqInner {
    /// A request as its head arrived, its body still on the connection.
    pub fn new(
        head: crate::h1::downstream::RequestHead,
        body: IncomingBody,
        peer: SocketAddr,
        peer_ip: &Rc<str>,
        limits: &Rc<Limits>,
    ) -> ReqInner {
        ReqInner {
            method: RefCell::new(head.method),
            uri: RefCell::new(head.uri),
            path: RefCell::new(head.path),
            version: head.version,
            headers: RefCell::new(head.headers),
            peer,
            peer_ip: peer_ip.clone(),
            body: RefCell::new(BodyState::Stream(body)),
            guards: RefCell::new(Vec::new()),
            failure: Default::default(),
            limits: limits.clone(),
            start: crate::clock::now(),
            attempts: RefCell::new(Vec::new()),
            proxy: Default::default(),
            id: Cell::new(None),
            ctx_ref: Cell::new(0),
        }
    }

    /// This request's id, 32 hex digits (nginx's `$request_id`), made on first use so a
    /// request nobody asks about costs nothing.
    pub fn request_id(&self) -> String {
        let id = match self.id.get() {
            Some(id) => id,
            None => {
                let id = next_request_id();
                self.id.set(Some(id));
                id
            }
        };
        format!("{id:032x}")
    }

    /// `req:ctx()`'s table if the policy made it.
    pub fn ctx_table(&self, lua: &Lua) -> LuaResult<Option<LuaTable>> {
        let r = self.ctx_ref.get();
        if r == 0 {
            return Ok(None);
        }
        // SAFETY: exec_raw runs this protected on the VM's own stack; `r` is a live registry
        // reference of this VM (made by `ctx_or_new` or the raw `req:ctx()`).
        unsafe {
            lua.exec_raw::<LuaTable>((), |l| {
                mlua::ffi::lua_rawgeti(l, mlua::ffi::LUA_REGISTRYINDEX, r as _);
            })
        }
        .map(Some)
    }

    /// `req:ctx()`: the table, made (and referenced from the registry) on first use.
    pub fn ctx_or_new(&self, lua: &Lua) -> LuaResult<LuaTable> {
        if let Some(t) = self.ctx_table(lua)? {
            return Ok(t);
        }
        let t = lua.create_table()?;
        // SAFETY: protected raw stack work on the VM's own stack (the table pushed as the
        // argument is referenced, and its reference pushed back as an integer).
        let r = unsafe {
            lua.exec_raw::<i64>(&t, |l| {
                let r = mlua::ffi::luaL_ref(l, mlua::ffi::LUA_REGISTRYINDEX);
                mlua::ffi::lua_pushinteger(l, r as _);
            })
        }?;
        self.ctx_ref.set(r as std::os::raw::c_int);
        Ok(t)
    }

    /// Frees `req:ctx()`'s registry slot (its table goes with the next collection): called
    /// once the request is over, log phase included.
    pub fn release_ctx(&self, lua: &Lua) {
        let r = self.ctx_ref.replace(0);
        if r != 0 {
            // SAFETY: on the VM's stack between Lua calls, unprotected: luaL_unref only writes
            // two registry slots that exist (the reference's and the free list's), which
            // allocates nothing and so cannot raise; it leaves the stack as it found it.
            lua.exec_raw_lua(|raw| unsafe {
                mlua::ffi::luaL_unref(raw.state(), mlua::ffi::LUA_REGISTRYINDEX, r);
            });
        }
    }

    /// This request's id if something asked for it already (the log does not make one).
    pub fn request_id_if_made(&self) -> Option<String> {
        self.id.get().map(|id| format!("{id:032x}"))
    }

    /// Takes the body for forwarding: a stream if nobody read it, else the buffered bytes.
    pub fn take_body(&self) -> Result<ReqBody, &'static str> {
        let mut b = self.body.borrow_mut();
        match std::mem::replace(&mut *b, BodyState::Taken) {
            // No body at all (most GETs): sendable again, by a retry on a stale pooled
            // connection or by a second proxy call (the next backend after a failure).
            BodyState::Stream(inc) if inc.is_end_stream() => {
                *b = BodyState::Buffered(Bytes::new());
                Ok(ReqBody::Bytes(Bytes::new()))
            }
            BodyState::Stream(inc) => Ok(ReqBody::Stream(Box::pin(DownstreamBody::new(inc, self)))),
            BodyState::Buffered(bytes) => {
                // Keep the buffered copy: a retry or a second proxy call can send it again.
                *b = BodyState::Buffered(bytes.clone());
                Ok(ReqBody::Bytes(bytes))
            }
            BodyState::Taken => Err("request body was already streamed upstream"),
            BodyState::Ended => {
                *b = BodyState::Ended;
                Err("request has ended")
            }
        }
    }

    /// Reads the whole body into memory (once); later calls return the same bytes.
    pub async fn read_body(&self) -> Result<Bytes, &'static str> {
        let state = std::mem::replace(&mut *self.body.borrow_mut(), BodyState::Taken);
        match state {
            BodyState::Buffered(b) => {
                *self.body.borrow_mut() = BodyState::Buffered(b.clone());
                Ok(b)
            }
            BodyState::Taken => Err("request body was already streamed upstream"),
            BodyState::Ended => {
                *self.body.borrow_mut() = BodyState::Ended;
                Err("request has ended")
            }
            BodyState::Stream(inc) => {
                let mut body = DownstreamBody::new(inc, self);
                let mut buf = BytesMut::new();
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => {
                            if let Some(d) = f.data_ref() {
                                buf.extend_from_slice(d);
                            }
                        }
                        Err(_) => {
                            return Err(self
                                .failure
                                .get()
                                .map(|f| f.1)
                                .unwrap_or("client closed connection"));
                        }
                    }
                }
                let b = buf.freeze();
                *self.body.borrow_mut() = BodyState::Buffered(b.clone());
                Ok(b)
            }
        }
    }

    pub fn client_ip(&self) -> &str {
        &self.peer_ip
    }
}

/// The client's request body with our limits: at most `max_body` bytes (413) and at most
/// `body_timeout` seconds of silence while we wait for the next piece (408). Malformed chunked
/// framing is an error too (400). The failure is recorded for the listener.
pub struct DownstreamBody {
    inner: IncomingBody,
    seen: u64,
    limit: u64,
    idle: crate::h1::io::IdleTimer,
    failure: Failure,
}

impl DownstreamBody {
    fn new(inner: IncomingBody, req: &ReqInner) -> DownstreamBody {
        let idle = req.limits.body_timeout;
        DownstreamBody {
            inner,
            seen: 0,
            limit: req.limits.max_body,
            idle: crate::h1::io::IdleTimer::new(idle),
            failure: req.failure.clone(),
        }
    }

    /// 413 once the body's bytes on the wire pass the limit: a chunked body's framing
    /// (extensions, trailers) is as much the client's to send as its data.
    fn over_limit(&self) -> Option<BoxError> {
        (self.limit > 0 && self.seen + self.inner.framing_bytes() > self.limit)
            .then(|| self.fail(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))
    }

    fn fail(&self, status: StatusCode, why: &'static str) -> BoxError {
        if self.failure.get().is_none() {
            self.failure.set(Some((status, why)));
        }
        why.into()
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.progress();
                this.seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                match this.over_limit() {
                    Some(e) => Poll::Ready(Some(Err(e))),
                    None => Poll::Ready(Some(Ok(frame))),
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let why = match e {
                    BodyError::Closed => "client closed connection",
                    BodyError::Malformed(_) => "malformed request body",
                };
                Poll::Ready(Some(Err(this.fail(StatusCode::BAD_REQUEST, why))))
            }
            // A trailer section ends a chunked body: it counts too.
            Poll::Ready(None) => this
                .over_limit()
                .map(|e| Poll::Ready(Some(Err(e))))
                .unwrap_or(Poll::Ready(None)),
            Poll::Pending => {
                if this.idle.expired(cx) {
                    let e = this.fail(StatusCode::REQUEST_TIMEOUT, "timeout");
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

mod object;
pub use object::{
    clear_live, install_metatable, live_at, request_object, request_of, Methods, NotARequest,
    Request, ENDED,
};
