//! The client side of HTTP/1.1: reading request heads and bodies off a client connection and
//! writing responses to it. No mlua in here; `server/conn.rs` runs the loop and the policy.
//!
//! hyper's server dispatcher ran every request through a service future, a body channel to
//! its `Incoming` and a boxed response future. Here the connection's task reads the socket
//! itself, as nginx does: the request body is read straight from the connection buffer when
//! the policy (or `req:proxy`) asks for it, and a response goes out in one write when its
//! body is ready. The framing rules of docs/architecture.md are enforced on the way in.
//!
//! size: the whole client side of one connection (heads with their checks, body framing,
//! responses, lingering close, the client-gone watch) in one place; about 200 of its lines
//! are tests.

use super::chunked::Chunked;
use super::headers::{field_at, Headers};
use super::idle::{put_spare, take_spare, HeadWaiter};
use super::io::{head_complete, io_reason, push_num, write_all_parts, IdleTimer, LazyDeadline};
use super::rules::{self, Limits, Reject};
use super::stream::Stream;
use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::{Method, StatusCode, Uri, Version};
use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;

/// An unread request body up to this size is read and dropped after the response so the
/// connection can carry the next request; a larger one closes the connection instead.
pub const MAX_DRAIN: u64 = 1024 * 1024;

/// How the current request's body is delimited, and how much of it is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLeft {
    Done,
    Length(u64),
    Chunked(Chunked),
}

/// One client connection: the socket, bytes read but not used yet, and where the current
/// request's body stands. Shared (`Rc<RefCell<..>>`) between the connection loop and the
/// request body the policy reads; never borrowed across an await.
pub struct DownstreamConn {
    pub stream: Stream,
    buf: BytesMut,
    body: BodyLeft,
    /// `Expect: 100-continue` not answered yet: sent when the body is first read.
    continue_pending: bool,
    /// Bytes of the interim 100 response still to write.
    continue_out: &'static [u8],
    /// Framing bytes of the current request's chunked body consumed so far (size lines,
    /// extensions, trailers): a body limit counts them with the data.
    framing_bytes: u64,
    /// Bytes of the current request taken from the stream: head, body and its framing,
    /// what a drain discarded (nginx's `$request_length`).
    consumed: u64,
    /// Bytes written to the client over the connection's life (`$bytes_sent` is the
    /// difference across one response).
    wrote: u64,
    /// Body bytes of the last response written (`$body_bytes_sent`).
    body_sent: u64,
}

pub type Shared = Rc<RefCell<DownstreamConn>>;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl DownstreamConn {
    pub fn new(stream: impl Into<Stream>) -> Shared {
        Rc::new(RefCell::new(DownstreamConn {
            stream: stream.into(),
            // taken when the first bytes arrive (`poll_fill_lazy`)
            buf: BytesMut::new(),
            body: BodyLeft::Done,
            continue_pending: false,
            continue_out: &[],
            framing_bytes: 0,
            consumed: 0,
            wrote: 0,
            body_sent: 0,
        }))
    }

    /// Bytes of the current request read so far: head, body, chunk framing.
    pub fn request_length(&self) -> u64 {
        self.consumed
    }

    /// Bytes read but not taken by any request (a rejected head's).
    pub fn unparsed(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Bytes written to the client since the connection opened.
    pub fn bytes_written(&self) -> u64 {
        self.wrote
    }

    /// Body bytes of the last response written (so far, if it failed midway).
    pub fn body_bytes_sent(&self) -> u64 {
        self.body_sent
    }

    /// Reads what the socket has into `buf`; `Ok(0)` is end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        super::io::poll_fill(&mut self.stream, &mut self.buf, cx)
    }

    /// `poll_fill` for a connection waiting for a request head: with nothing buffered, it
    /// waits for the socket to be readable holding no read buffer, takes one (16 KiB) only to
    /// read, and lets it go again if the read finds nothing. An idle keep-alive connection so
    /// costs no buffer memory, as nginx frees its client_header_buffer on an idle keep-alive
    /// connection (`ngx_http_set_keepalive`): with the buffer kept, 10,000 idle connections
    /// held 10,000 partly touched 16 KiB buffers (BENCHMARKS.md, "Idle connections").
    fn poll_fill_lazy(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if !self.buf.is_empty() {
            return self.poll_fill(cx);
        }
        if self.buf.capacity() == 0 {
            std::task::ready!(self.stream.poll_read_ready(cx))?;
            self.buf = take_spare();
        }
        let r = self.poll_fill(cx);
        if r.is_pending() {
            self.release_buf();
        }
        r
    }

    /// Lets the read buffer go when it holds nothing (the next read takes another).
    #[inline]
    fn release_buf(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            put_spare(std::mem::take(&mut self.buf));
        }
    }

    /// True when nothing of the current request's body is left on the wire.
    pub fn body_done(&self) -> bool {
        self.body == BodyLeft::Done
    }

    /// True when no byte of a next request has arrived yet.
    pub fn idle(&self) -> bool {
        self.buf.is_empty()
    }

    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.continue_pending {
            self.continue_pending = false;
            self.continue_out = CONTINUE;
        }
        while !self.continue_out.is_empty() {
            let n =
                std::task::ready!(Pin::new(&mut self.stream).poll_write(cx, self.continue_out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.continue_out = &self.continue_out[n..];
        }
        Poll::Ready(Ok(()))
    }
}

/// A request head as the policy sees it. Header values and the target are slices of one copy
/// of the head, so a finished request never pins the connection's read buffer.
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: Headers,
    /// The path normalized as nginx's `$uri` (`rules::normalize_path`), when it differs from
    /// the target's.
    pub path: Option<Bytes>,
    /// The client allows another request on this connection after this one.
    pub keep_alive: bool,
    framing: BodyLeft,
    expect_continue: bool,
}

/// A response on its way to the client: status, header fields (an upstream's pass through
/// as the raw lines they arrived as) and a body.
pub struct DownstreamResponse<B> {
    pub status: StatusCode,
    pub headers: Headers,
    pub body: B,
}

impl<B> DownstreamResponse<B> {
    /// A 200 with no header fields.
    pub fn new(body: B) -> Self {
        DownstreamResponse {
            status: StatusCode::OK,
            headers: Headers::default(),
            body,
        }
    }

    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> DownstreamResponse<C> {
        DownstreamResponse {
            status: self.status,
            headers: self.headers,
            body: f(self.body),
        }
    }
}

/// Why no request head came.
pub enum HeadError {
    /// The client closed (or reset) between requests, or the server is shutting down.
    Closed,
    /// No complete head within the header timeout.
    Timeout,
    /// A head we refuse: answer with this status and close.
    Bad(Reject),
}

fn bad(status: StatusCode, reason: &'static str) -> HeadError {
    HeadError::Bad(Reject { status, reason })
}

/// `METHOD target HTTP/d.d` with a version httparse does not take (HTTP/2.0 sent in
/// clear text, HTTP/1.2): 505 rather than 400, like nginx.
fn well_formed_other_version(buf: &[u8]) -> bool {
    let line = buf.split(|&c| c == b'\r').next().unwrap_or(buf);
    let mut parts = line.split(|&c| c == b' ');
    let (Some(m), Some(t), Some(v), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !m.is_empty()
        && m.iter().all(u8::is_ascii_uppercase)
        && !t.is_empty()
        && v.len() == 8
        && v.starts_with(b"HTTP/")
        && v[5].is_ascii_digit()
        && v[6] == b'.'
        && v[7].is_ascii_digit()
}

/// Parses a request head at the start of `buf`. `Ok(None)`: more bytes are needed.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(usize, RequestHead)>, HeadError> {
    // Uninitialized: zeroing the whole array was a 3 KB memset per parse.
    let mut hdrs = [const { std::mem::MaybeUninit::uninit() }; rules::MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut []);
    // A request line still open past max_line is refused before it grows further.
    if buf.len() > limits.max_line && !buf[..=limits.max_line].contains(&b'\n') {
        return Err(bad(StatusCode::URI_TOO_LONG, "request line too long"));
    }
    let n = match req.parse_with_uninit_headers(buf, &mut hdrs) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > limits.max_head {
                Err(bad(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request header section too large",
                ))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(bad(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many request headers",
            ))
        }
        Err(httparse::Error::Version) if well_formed_other_version(buf) => {
            return Err(bad(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "unsupported http version",
            ))
        }
        Err(_) => return Err(bad(StatusCode::BAD_REQUEST, "malformed request")),
    };
    if n > limits.max_head {
        return Err(bad(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header section too large",
        ));
    }
    if req.headers.len() > limits.max_headers {
        return Err(bad(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too many request headers",
        ));
    }
    // One copy of the head; everything below slices it.
    let head = Bytes::copy_from_slice(&buf[..n]);
    let base = buf.as_ptr() as usize;
    let part = |s: &[u8]| {
        let at = s.as_ptr() as usize - base;
        head.slice(at..at + s.len())
    };
    // Methods are case-sensitive (RFC 9110 §9.1): like nginx, only upper-case letters, `_`
    // and `-`, so `get` is not taken for GET by one hop and for something else by another.
    let method = req.method.unwrap_or("");
    if !method
        .bytes()
        .all(|c| c.is_ascii_uppercase() || c == b'_' || c == b'-')
    {
        return Err(bad(StatusCode::BAD_REQUEST, "malformed request"));
    }
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| bad(StatusCode::BAD_REQUEST, "malformed request"))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let target = req.path.unwrap_or("");
    // nginx's large_client_header_buffers: one buffer holds the request line (414) or one
    // header field (431, checked below).
    if method.as_str().len() + target.len() + 11 > limits.max_line {
        return Err(bad(StatusCode::URI_TOO_LONG, "request line too long"));
    }
    let mut authority = None;
    let uri = match Uri::from_maybe_shared(part(target.as_bytes())) {
        // Absolute-form: upstreams get origin-form, and the target's authority is the host
        // (RFC 9112 §3.2.2: a Host field that says otherwise is replaced).
        Ok(u) if u.scheme().is_some() => {
            if !matches!(u.scheme_str(), Some("http" | "https")) {
                return Err(bad(StatusCode::BAD_REQUEST, "bad request target"));
            }
            match u.authority().map(|a| a.as_str()) {
                Some(a) if rules::valid_host(a.as_bytes()) => {
                    authority = Some(Bytes::copy_from_slice(a.as_bytes()))
                }
                _ => return Err(bad(StatusCode::BAD_REQUEST, "bad request target")),
            }
            match u.path_and_query() {
                Some(pq) => Uri::try_from(pq.as_str()).unwrap_or(u),
                None => Uri::from_static("/"),
            }
        }
        Ok(u) => u,
        Err(_) => return Err(bad(StatusCode::BAD_REQUEST, "bad request target")),
    };
    // httparse let only token names and values without control characters through: the
    // fields stay raw lines of the copy (see `headers`).
    let mut at = Vec::with_capacity(req.headers.len());
    let mut facts = rules::HeadFacts::default();
    let mut too_long = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        too_long |= name.len() + h.value.len() + 2 > limits.max_line;
        if !limits.underscores_in_headers && name.contains(&b'_') {
            continue;
        }
        facts.note(name, h.value);
        at.push(field_at(buf, name, h.value));
    }
    if too_long {
        return Err(bad(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header field too large",
        ));
    }
    let mut headers = Headers::Raw { buf: head, at };
    facts.finish();
    rules::validate_request(&method, &uri, version, &facts, limits).map_err(HeadError::Bad)?;
    // The fields the client's `Connection` names are its hop-by-hop ones: gone before the
    // policy runs, so what the policy sets under those names is forwarded.
    for name in &facts.connection_named {
        headers.remove(name);
    }
    if let Some(a) = authority {
        let m = headers.map_mut();
        if let Ok(v) = hyper::header::HeaderValue::from_maybe_shared(a) {
            m.insert(hyper::header::HOST, v);
        }
    }
    let path = rules::normalize_path(uri.path().as_bytes())
        .map_err(|why| bad(StatusCode::BAD_REQUEST, why))?
        .map(Bytes::from);
    let framing = match facts.length {
        _ if facts.transfer_encodings > 0 => BodyLeft::Chunked(Chunked::default()),
        Some(Ok(0)) | None => BodyLeft::Done,
        Some(Ok(n)) => BodyLeft::Length(n),
        Some(Err(())) => return Err(bad(StatusCode::BAD_REQUEST, "invalid content-length")),
    };
    let keep_alive = if version == Version::HTTP_11 {
        !facts.connection_close
    } else {
        facts.connection_keep_alive && !facts.connection_close
    };
    let expect_continue =
        version == Version::HTTP_11 && framing != BodyLeft::Done && facts.expect_continue;
    Ok(Some((
        n,
        RequestHead {
            method,
            uri,
            path,
            version,
            headers,
            keep_alive,
            framing,
            expect_continue,
        },
    )))
}

/// Reads the next request head. Waiting for it ends `timeout` after the wait starts, or, with
/// `idle` (a kept-alive connection between requests), `idle` after it while no byte has come
/// and `timeout` after the first byte; `deadline` is the connection's timer for both. It also
/// ends when `shutdown` fires with no byte of a request read yet.
///
/// A plain function returning an `async` block, not an `async fn` (which keeps its arguments
/// twice): an idle keep-alive connection holds this future while it waits.
pub fn read_head<'a>(
    conn: &'a Shared,
    limits: &'a Limits,
    timeout: Duration,
    idle: Option<Duration>,
    deadline: &'a mut LazyDeadline,
    shutdown: &'a mut tokio::sync::watch::Receiver<bool>,
) -> impl Future<Output = Result<RequestHead, HeadError>> + 'a {
    let idle = idle.filter(|_| conn.borrow().buf.is_empty());
    // Between requests with nothing buffered: no read buffer while waiting.
    conn.borrow_mut().release_buf();
    let mut waiting_idle = idle.is_some();
    let mut give_up = crate::clock::now() + idle.unwrap_or(timeout);
    let mut stopping = false;
    let mut scanned = 0;
    let mut waiter = HeadWaiter(None);
    async move {
        loop {
            {
                let mut c = conn.borrow_mut();
                if !c.buf.is_empty() {
                    // The first look parses (a head usually arrives whole); after a partial one,
                    // only the blank line arriving or the size limit makes another parse worth it.
                    let ready = scanned == 0
                        || head_complete(&c.buf, scanned)
                        || c.buf.len() > limits.max_head;
                    scanned = c.buf.len();
                    if ready {
                        if let Some((n, head)) = parse_request(&c.buf, limits)? {
                            c.buf.advance(n);
                            c.consumed = n as u64;
                            c.body_sent = 0;
                            c.body = head.framing;
                            c.framing_bytes = 0;
                            c.continue_pending = head.expect_continue;
                            return Ok(head);
                        }
                    }
                } else if stopping {
                    return Err(HeadError::Closed);
                }
            }
            enum Woke {
                Read(io::Result<usize>),
                Timeout,
                Shutdown,
            }
            let woke = poll_fn(|cx| {
                if let Poll::Ready(r) = conn.borrow_mut().poll_fill_lazy(cx) {
                    return Poll::Ready(Woke::Read(r));
                }
                // The server stopping (or gone): `wake_head_waiters` wakes this wait for it.
                if !stopping && (*shutdown.borrow() || shutdown.has_changed().is_err()) {
                    return Poll::Ready(Woke::Shutdown);
                }
                if deadline.passed(give_up, cx) {
                    return Poll::Ready(Woke::Timeout);
                }
                if !stopping {
                    waiter.register(cx.waker());
                }
                Poll::Pending
            })
            .await;
            match woke {
                Woke::Read(Ok(0)) | Woke::Read(Err(_)) => {
                    let c = conn.borrow();
                    return Err(if c.buf.is_empty() {
                        HeadError::Closed
                    } else {
                        bad(StatusCode::BAD_REQUEST, "incomplete request head")
                    });
                }
                Woke::Read(Ok(_)) => {
                    if waiting_idle {
                        waiting_idle = false;
                        give_up = crate::clock::now() + timeout;
                    }
                }
                Woke::Timeout => return Err(HeadError::Timeout),
                Woke::Shutdown => stopping = true,
            }
        }
    }
}

/// Runs `handling` (the policy's work on a request) unless the client goes away first:
/// `None` when the client closed or reset its connection while nothing of it was left to read
/// (the request and its body were in, no pipelined bytes waiting). A client that is still
/// sending its body is not watched until the body is in, and one that has pipelined its next
/// request not at all: those bytes are not ours to read here, and a peek would only see them.
/// The handling is polled first, so a request answered at once never looks at the socket.
///
/// A future of its own rather than an `async fn`: that moved `handling` (the policy's whole
/// request future) twice more before polling it, which was most of the memory copying a
/// request cost.
pub fn unless_client_gone<F: Future>(conn: &Shared, handling: F) -> UnlessClientGone<'_, F> {
    UnlessClientGone {
        conn,
        handling,
        watching: true,
    }
}

/// See `unless_client_gone`.
pub struct UnlessClientGone<'a, F> {
    conn: &'a Shared,
    handling: F,
    watching: bool,
}

impl<F: Future> Future for UnlessClientGone<'_, F> {
    type Output = Option<F::Output>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        // SAFETY: `handling` is never moved out of a pinned `UnlessClientGone` (nothing takes
        // it by value; the struct is Unpin only when `F` is), so pinning projects to it; the
        // other fields are plain data, used unpinned.
        let (handling, conn, watching) = unsafe {
            let this = self.get_unchecked_mut();
            (
                Pin::new_unchecked(&mut this.handling),
                this.conn,
                &mut this.watching,
            )
        };
        if let Poll::Ready(out) = handling.poll(cx) {
            return Poll::Ready(Some(out));
        }
        if *watching {
            let c = conn.borrow();
            // Still sending its body, or its next request is buffered: nothing to watch now.
            if c.buf.is_empty() && c.body == BodyLeft::Done {
                let mut one = [0u8; 1];
                let mut peek = tokio::io::ReadBuf::new(&mut one);
                match c.stream.poll_peek(cx, &mut peek) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                    // Bytes of a next request: the socket stays readable, so peeking again
                    // would find them again; watching ends here.
                    Poll::Ready(Ok(_)) => *watching = false,
                    Poll::Pending => {}
                }
            }
        }
        Poll::Pending
    }
}

/// Why reading a request body stopped short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The client closed or reset the connection before the body ended.
    Closed,
    /// Broken chunked framing.
    Malformed(&'static str),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Closed => f.write_str("client closed connection"),
            BodyError::Malformed(_) => f.write_str("malformed request body"),
        }
    }
}

impl std::error::Error for BodyError {}

/// The current request's body, read from the connection on demand. Limits and timeouts are
/// the caller's (`request::DownstreamBody`).
pub struct IncomingBody {
    conn: Shared,
}

impl IncomingBody {
    pub fn new(conn: Shared) -> IncomingBody {
        IncomingBody { conn }
    }

    /// Framing bytes (chunk size lines, extensions, trailers) read so far with the data.
    pub fn framing_bytes(&self) -> u64 {
        self.conn.borrow().framing_bytes
    }
}

impl Body for IncomingBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut c = self.conn.borrow_mut();
        loop {
            if !c.buf.is_empty() {
                let DownstreamConn {
                    buf,
                    body,
                    framing_bytes,
                    consumed,
                    ..
                } = &mut *c;
                match body {
                    BodyLeft::Done => return Poll::Ready(None),
                    BodyLeft::Length(left) => {
                        let take = (*left).min(buf.len() as u64) as usize;
                        let data = buf.split_to(take).freeze();
                        *consumed += take as u64;
                        *left -= take as u64;
                        if *left == 0 {
                            *body = BodyLeft::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    BodyLeft::Chunked(state) => {
                        let before = buf.len();
                        let r = state.decode(buf);
                        *consumed += (before - buf.len()) as u64;
                        *framing_bytes = state.overhead;
                        match r {
                            Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                            Ok(None) if state.is_done() => {
                                *body = BodyLeft::Done;
                                return Poll::Ready(None);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                // The stream cannot be parsed past this point.
                                *body = BodyLeft::Done;
                                return Poll::Ready(Some(Err(BodyError::Malformed(e))));
                            }
                        }
                    }
                }
            } else if c.body == BodyLeft::Done {
                return Poll::Ready(None);
            }
            if std::task::ready!(c.poll_continue(cx)).is_err() {
                return Poll::Ready(Some(Err(BodyError::Closed)));
            }
            match std::task::ready!(c.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(Some(Err(BodyError::Closed))),
                Ok(_) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.borrow().body == BodyLeft::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.conn.borrow().body {
            BodyLeft::Done => SizeHint::with_exact(0),
            BodyLeft::Length(n) => SizeHint::with_exact(n),
            BodyLeft::Chunked(_) => SizeHint::default(),
        }
    }
}

/// Reads and drops what is left of an unread request body (at most `MAX_DRAIN` bytes, each
/// wait at most `idle`), so the connection can serve the next request. False: close instead.
pub async fn drain_body(conn: &Shared, idle: Duration) -> bool {
    if let BodyLeft::Length(n) = conn.borrow().body {
        if n > MAX_DRAIN {
            return false;
        }
    }
    // The client was told nothing about continuing: it will not send the body.
    if std::mem::take(&mut conn.borrow_mut().continue_pending) {
        conn.borrow_mut().body = BodyLeft::Done;
        return false;
    }
    let mut body = IncomingBody::new(conn.clone());
    let mut timer = IdleTimer::new(idle);
    let mut seen = 0u64;
    poll_fn(|cx| loop {
        match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(None) => return Poll::Ready(true),
            Poll::Ready(Some(Ok(f))) => {
                timer.progress();
                seen += f.data_ref().map_or(0, |d| d.len() as u64);
                if seen > MAX_DRAIN {
                    return Poll::Ready(false);
                }
            }
            Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
            Poll::Pending => {
                return if timer.expired(cx) {
                    Poll::Ready(false)
                } else {
                    Poll::Pending
                }
            }
        }
    })
    .await
}

thread_local! {
    static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

/// The `Date` header value, formatted once per second per thread.
fn http_date(out: &mut Vec<u8>) {
    let now = crate::clock::system_now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(d.1.as_bytes());
    });
}

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length,
    Chunked,
    UntilClose,
}

/// Writes the head of `resp` for a request with `method`/`version` into `out`, choosing the
/// body framing; returns it and whether the connection can stay open afterwards.
fn encode_head<B: Body>(
    out: &mut Vec<u8>,
    resp: &DownstreamResponse<B>,
    method: &Method,
    version: Version,
    keep_alive: bool,
) -> (Out, bool) {
    let status = resp.status;
    let code = status.as_u16();
    let no_body_status = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = resp.body.size_hint().exact();
    let mut keep = keep_alive;
    let out_mode = if no_body_status || *method == Method::HEAD {
        Out::None
    } else if exact.is_some() {
        Out::Length
    } else if version == Version::HTTP_11 {
        Out::Chunked
    } else {
        keep = false;
        Out::UntilClose
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    let mut has_cl = false;
    for (name, value) in resp.headers.iter() {
        if name.eq_ignore_ascii_case(b"connection") {
            // A response that asks to close (ours after a refused body, or a policy's) ends
            // the connection; the line itself is ours to write, below.
            if value
                .split(|&c| c == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep = false;
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            // A HEAD or 304 answer may state the length of what it did not send; otherwise
            // the length is the body's own, below.
            if out_mode != Out::None || code == 204 || status.is_informational() {
                continue;
            }
            has_cl = true;
        }
        if name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    match out_mode {
        Out::Length => {
            out.extend_from_slice(b"content-length: ");
            push_num(out, exact.unwrap_or(0), 10);
            out.extend_from_slice(b"\r\n");
        }
        Out::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Out::None if *method == Method::HEAD && !has_cl && !no_body_status => {
            if let Some(n) = exact.filter(|n| *n > 0) {
                out.extend_from_slice(b"content-length: ");
                push_num(out, n, 10);
                out.extend_from_slice(b"\r\n");
            }
        }
        _ => {}
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (out_mode, keep)
}

/// Writes every byte of `parts` (in order) with as few syscalls as the socket allows; each
/// wait for the socket is bounded by `timer`.
async fn write_parts(conn: &Shared, parts: &mut [&[u8]], timer: &mut IdleTimer) -> io::Result<()> {
    write_all_parts(parts, |cx, slices| {
        let mut c = conn.borrow_mut();
        match Pin::new(&mut c.stream).poll_write_vectored(cx, slices) {
            Poll::Ready(r) => {
                timer.progress();
                if let Ok(n) = r {
                    c.wrote += n as u64;
                }
                Poll::Ready(r)
            }
            Poll::Pending if timer.expired(cx) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "timeout")))
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Why a response could not be written whole (the connection must be closed either way).
#[derive(Debug)]
pub enum WriteError {
    /// The client went away or stalled for `send_timeout`.
    Client(String),
    /// The body failed midway (an upstream that cut its response short, ...): the client
    /// cannot tell a cut body from a whole one unless the connection closes.
    Body { sent: u64, why: String },
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Client(why) => f.write_str(why),
            WriteError::Body { sent, why } => {
                write!(f, "response body failed after {sent} bytes: {why}")
            }
        }
    }
}

/// Writes `resp` to the client. `Ok(true)`: the connection may carry another request.
/// `done` runs once the body is complete, before its last bytes are written: what it releases
/// (least-connection leases) is released before the client can see the response end and
/// ask for anything else.
pub async fn write_response<B>(
    conn: &Shared,
    resp: &mut DownstreamResponse<B>,
    method: &Method,
    version: Version,
    keep_alive: bool,
    send_timeout: Duration,
    done: &mut dyn FnMut(),
) -> Result<bool, WriteError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let client = |e: std::io::Error| WriteError::Client(io_reason(&e).to_string());
    let mut head = Vec::with_capacity(256);
    let (mode, keep) = encode_head(&mut head, resp, method, version, keep_alive);
    let mut timer = IdleTimer::new(send_timeout);
    let body = &mut resp.body;
    conn.borrow_mut().body_sent = 0;
    if mode == Out::None {
        done();
        write_parts(conn, &mut [&head], &mut timer)
            .await
            .map_err(client)?;
        return Ok(keep);
    }
    let exact = body.size_hint().exact();
    let mut pending_head = Some(head);
    let mut sent: u64 = 0;
    let tail: &[u8] = if mode == Out::Chunked {
        b"0\r\n\r\n"
    } else {
        b""
    };
    loop {
        // What the body has ready now goes out with the head in one write; wait only after.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if let Some(h) = pending_head.take() {
                    write_parts(conn, &mut [&h], &mut timer)
                        .await
                        .map_err(client)?;
                }
                poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
            }
        };
        match frame {
            None => {
                done();
                let h = pending_head.take().unwrap_or_default();
                write_parts(conn, &mut [&h, tail], &mut timer)
                    .await
                    .map_err(client)?;
                break;
            }
            Some(Err(e)) => {
                return Err(WriteError::Body {
                    sent,
                    why: e.to_string(),
                })
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                let last = body.is_end_stream();
                if last {
                    done();
                }
                let end: &[u8] = if last { tail } else { b"" };
                let h = pending_head.take().unwrap_or_default();
                let r = if mode == Out::Chunked {
                    let mut size = Vec::with_capacity(20);
                    push_num(&mut size, data.len() as u64, 16);
                    size.extend_from_slice(b"\r\n");
                    let parts = &mut [&h[..], &size, &data, b"\r\n", end];
                    write_parts(conn, parts, &mut timer).await
                } else {
                    write_parts(conn, &mut [&h, &data, end], &mut timer).await
                };
                r.map_err(client)?;
                conn.borrow_mut().body_sent = sent;
                if last {
                    break;
                }
            }
        }
    }
    if mode == Out::Length && Some(sent) != exact {
        // The head promised another length: the client would misread the next response.
        return Err(WriteError::Body {
            sent,
            why: "shorter than its Content-Length".into(),
        });
    }
    Ok(keep)
}

/// Closes the connection the way nginx's lingering close does: our side is shut, and what the
/// client still sends is read and dropped for up to `linger`, so the last response is not
/// destroyed by a reset (closing with unread bytes sends one; seen: a 501 for a refused body
/// lost about one time in three on loopback).
pub async fn linger_close(conn: &Shared, linger: Duration) {
    let shut = poll_fn(|cx| Pin::new(&mut conn.borrow_mut().stream).poll_shutdown(cx)).await;
    if shut.is_err() {
        return;
    }
    // On the heap: in the future, 4 KiB (twice, with the timeout's copy) would size every
    // connection's task for this rare last step.
    let mut scratch = vec![0u8; 4096];
    let _ = crate::clock::timeout(linger, async {
        loop {
            let r = poll_fn(|cx| {
                let mut c = conn.borrow_mut();
                let mut rb = tokio::io::ReadBuf::new(&mut scratch);
                match tokio::io::AsyncRead::poll_read(Pin::new(&mut c.stream), cx, &mut rb) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            if !matches!(r, Ok(n) if n > 0) {
                return;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn parse(raw: &str) -> Result<Option<(usize, RequestHead)>, HeadError> {
        parse_request(raw.as_bytes(), &Limits::default())
    }

    fn reason(raw: &str) -> (u16, &'static str) {
        match parse(raw) {
            Err(HeadError::Bad(r)) => (r.status.as_u16(), r.reason),
            Ok(Some(_)) => (0, "accepted"),
            Ok(None) => (0, "partial"),
            Err(_) => (0, "other"),
        }
    }

    /// Between requests a connection holds no read buffer; it takes one for the first byte
    /// of the next head, keeps it while the head is partial, and parses the head whole.
    #[test]
    fn an_idle_connection_holds_no_read_buffer() {
        use std::future::Future;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, server) = super::super::stream::pair();
            let conn = DownstreamConn::new(Stream::Mem(server));
            assert_eq!(conn.borrow().buf.capacity(), 0, "no buffer before any byte");
            let (stop, mut shutdown) = tokio::sync::watch::channel(false);
            let mut deadline = LazyDeadline::default();
            let limits = Limits::default();
            let t = Duration::from_secs(5);
            client
                .write(&[std::io::IoSlice::new(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")])
                .unwrap();
            let head = read_head(&conn, &limits, t, None, &mut deadline, &mut shutdown);
            assert_eq!(head.await.ok().unwrap().uri.path(), "/a");
            let mut next = Box::pin(read_head(
                &conn,
                &limits,
                t,
                Some(t),
                &mut deadline,
                &mut shutdown,
            ));
            async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
                poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
            }
            assert!(poll_once(&mut next).await.is_pending());
            assert_eq!(conn.borrow().buf.capacity(), 0, "idle with a buffer");
            client.write(&[std::io::IoSlice::new(b"G")]).unwrap();
            assert!(poll_once(&mut next).await.is_pending());
            assert!(
                conn.borrow().buf.capacity() > 0,
                "a partial head lost its bytes"
            );
            client
                .write(&[std::io::IoSlice::new(b"ET /b HTTP/1.1\r\nHost: x\r\n\r\n")])
                .unwrap();
            match poll_once(&mut next).await {
                Poll::Ready(h) => assert_eq!(h.ok().unwrap().uri.path(), "/b"),
                Poll::Pending => panic!("the whole head did not parse"),
            }
            drop(next);
            // A stopping server wakes the idle wait, which then ends.
            let mut next = Box::pin(read_head(
                &conn,
                &limits,
                t,
                Some(t),
                &mut deadline,
                &mut shutdown,
            ));
            struct Count(std::sync::atomic::AtomicUsize);
            impl std::task::Wake for Count {
                fn wake(self: std::sync::Arc<Self>) {
                    self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let count = std::sync::Arc::new(Count(0.into()));
            let waker = std::task::Waker::from(count.clone());
            let mut cx = Context::from_waker(&waker);
            assert!(next.as_mut().poll(&mut cx).is_pending());
            stop.send_replace(true);
            super::super::idle::wake_head_waiters();
            let woken = count.0.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(
                woken, 1,
                "a stopping server did not wake an idle connection"
            );
            assert!(next.as_mut().poll(&mut cx).is_ready());
        });
    }

    #[test]
    fn heads_and_framing() {
        let (n, h) = parse("POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(n, 52);
        assert_eq!(h.uri.path(), "/a");
        assert_eq!(h.uri.query(), Some("b=1"));
        assert_eq!(h.framing, BodyLeft::Length(5));
        assert!(h.keep_alive);
        let (_, h) = parse("GET http://x/p?q HTTP/1.0\r\nHost: x\r\n\r\n")
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(h.uri.to_string(), "/p?q");
        assert!(!h.keep_alive);
        assert_eq!(h.framing, BodyLeft::Done);
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
    }

    #[test]
    fn refuses_ambiguous_or_broken_heads() {
        assert_eq!(
            reason("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"),
            (400, "duplicate content-length")
        );
        assert_eq!(
            reason("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (400, "both content-length and transfer-encoding")
        );
        assert_eq!(
            reason("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            (400, "invalid content-length")
        );
        assert_eq!(
            reason("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (400, "transfer-encoding in an http/1.0 request")
        );
        assert_eq!(
            reason("GET / HTTP/1.1\r\n\r\n"),
            (400, "missing host header")
        );
        assert_eq!(reason("GE T / HTTP/1.1\r\n\r\n").0, 400);
        assert_eq!(reason("GET / HTTP/2.0\r\nHost: a\r\n\r\n").0, 505);
        let many: String = (0..120).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            reason(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")).0,
            431
        );
        let big = "v".repeat(40 * 1024);
        assert_eq!(reason(&format!("GET / HTTP/1.1\r\nX: {big}")).0, 431);
    }

    #[test]
    fn head_rewrites_before_the_policy() {
        let head = |raw: &str| parse(raw).ok().flatten().unwrap().1;
        let names = |h: &RequestHead| -> Vec<String> {
            h.headers
                .iter()
                .map(|(n, v)| {
                    format!(
                        "{}={}",
                        String::from_utf8_lossy(n),
                        String::from_utf8_lossy(v)
                    )
                })
                .collect()
        };
        // Fields the client's Connection names go; Host and framing never do.
        let h = head(
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Auth, Host, Content-Length\r\n\
             X-Auth: me\r\nContent-Length: 2\r\n\r\nok",
        );
        assert_eq!(
            names(&h),
            [
                "Host=a",
                "Connection=keep-alive, X-Auth, Host, Content-Length",
                "Content-Length=2"
            ]
        );
        assert_eq!(h.framing, BodyLeft::Length(2));
        // Underscored names are dropped unless allowed.
        let h = head("GET / HTTP/1.1\r\nHost: a\r\nX_Real_IP: 6.6.6.6\r\n\r\n");
        assert_eq!(names(&h), ["Host=a"]);
        let allow = Limits {
            underscores_in_headers: true,
            ..Default::default()
        };
        let (_, h) = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nX_Real_IP: 1\r\n\r\n", &allow)
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(names(&h), ["Host=a", "X_Real_IP=1"]);
        // An absolute-form target's authority replaces Host.
        let h = head("GET http://target.example:81/x?y HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(names(&h), ["host=target.example:81"]);
        assert_eq!(h.uri.to_string(), "/x?y");
        // The normalized path rides along when it differs.
        assert_eq!(
            head("GET /a//b/../c HTTP/1.1\r\nHost: a\r\n\r\n")
                .path
                .as_deref(),
            Some(&b"/a/c"[..])
        );
        assert_eq!(head("GET /a/c HTTP/1.1\r\nHost: a\r\n\r\n").path, None);
    }

    #[test]
    fn line_and_path_limits() {
        let long = "a".repeat(9000);
        assert_eq!(
            reason(&format!("GET /{long} HTTP/1.1\r\nHost: a\r\n\r\n")).0,
            414
        );
        assert_eq!(reason(&format!("GET /{long}")).0, 414);
        assert_eq!(
            reason(&format!("GET / HTTP/1.1\r\nHost: a\r\nX: {long}\r\n\r\n")),
            (431, "request header field too large")
        );
        assert_eq!(
            reason("GET /../x HTTP/1.1\r\nHost: a\r\n\r\n"),
            (400, "path above the root")
        );
        assert_eq!(
            reason("GET /a%00 HTTP/1.1\r\nHost: a\r\n\r\n"),
            (400, "encoded nul in path")
        );
        assert_eq!(reason("GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n").0, 400);
        assert_eq!(
            reason("GET http://a@b/x HTTP/1.1\r\nHost: a\r\n\r\n").0,
            400
        );
        let few = Limits {
            max_headers: 2,
            ..Default::default()
        };
        let r = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n", &few);
        assert!(matches!(r, Err(HeadError::Bad(Reject { status, .. })) if status.as_u16() == 431));
    }

    #[test]
    fn response_heads() {
        let resp = |status: u16, body: &'static str| {
            let mut r = DownstreamResponse::new(http_body_util::Full::new(Bytes::from(body)));
            r.status = StatusCode::from_u16(status).unwrap();
            let h = r.headers.map_mut();
            h.insert("content-length", HeaderValue::from_static("999"));
            h.insert("connection", HeaderValue::from_static("upgrade"));
            r
        };
        let head = |r: &DownstreamResponse<_>, m: Method, v: Version, keep: bool| {
            let mut out = Vec::new();
            let (mode, keep) = encode_head(&mut out, r, &m, v, keep);
            (String::from_utf8(out).unwrap(), mode, keep)
        };
        let (h, mode, keep) = head(&resp(200, "hello"), Method::GET, Version::HTTP_11, true);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        assert!(
            h.contains("content-length: 5\r\n") && !h.contains("999"),
            "{h}"
        );
        assert!(!h.contains("upgrade") && h.contains("date: "), "{h}");
        assert_eq!((mode, keep), (Out::Length, true));
        let (h, mode, _) = head(&resp(200, "hello"), Method::HEAD, Version::HTTP_11, true);
        assert!(h.contains("content-length: 999\r\n"), "{h}");
        assert_eq!(mode, Out::None);
        let (h, _, keep) = head(&resp(204, ""), Method::GET, Version::HTTP_10, true);
        assert!(
            !h.contains("content-length") && h.contains("connection: keep-alive"),
            "{h}"
        );
        assert!(keep);
        let (h, _, keep) = head(&resp(200, "x"), Method::GET, Version::HTTP_11, false);
        assert!(h.contains("connection: close\r\n") && !keep, "{h}");
        // A response asking to close closes a connection the client would keep.
        let mut r = resp(200, "x");
        r.headers
            .map_mut()
            .insert("connection", HeaderValue::from_static("keep-alive, Close"));
        let (h, _, keep) = head(&r, Method::GET, Version::HTTP_11, true);
        assert!(h.contains("connection: close\r\n") && !keep, "{h}");
        assert!(!h.contains("keep-alive"), "{h}");
    }
}
