//! A lean HTTP/1.1 client connection for upstreams, with no mlua in it.
//!
//! hyper's client runs every connection as its own task and passes requests, responses and
//! body chunks through channels. Here the request future that owns a connection writes and
//! reads the socket itself, as nginx and Pingora do (an A/B in the peer harness showed no
//! throughput difference within this box's noise), and the response framing rules of docs/architecture.md are enforced on the way in.

use super::body::BoxError;
use super::chunked::Chunked;
use super::headers::{field_at, Headers};
use super::io::{
    head_complete, io_reason, poll_fill, push_num, write_all_parts, IdleTimer, LazyDeadline,
    READ_CHUNK,
};
use super::rules;
use super::stream::Stream;
use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::{Method, StatusCode, Uri};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;

/// Response heads larger than this are refused (502), like nginx's proxy_buffer_size error.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// An open upstream connection and the bytes already read from it.
pub struct Conn {
    pub stream: Stream,
    pub buf: BytesMut,
    /// When the exchange in progress gives up waiting (`Error::Timeout`).
    deadline: Option<std::time::Instant>,
    /// Kept with the connection: an exchange that never waits long does not touch the timer
    /// wheel (a `tokio::time::timeout` per exchange registered and removed an entry each time).
    timer: LazyDeadline,
}

impl Conn {
    pub fn new(stream: impl Into<Stream>) -> Conn {
        Conn {
            stream: stream.into(),
            buf: BytesMut::with_capacity(READ_CHUNK),
            deadline: None,
            timer: LazyDeadline::default(),
        }
    }

    /// Waits on this connection from now on fail once `after` has passed; `None` clears it.
    pub fn set_deadline(&mut self, after: Option<Duration>) {
        self.deadline = after.map(|d| crate::clock::now() + d);
    }

    /// Called when an operation would wait: true once the deadline has passed.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.is_some_and(|d| self.timer.passed(d, cx))
    }

    /// Reads more bytes into `buf`; `Ok(0)` is end of stream.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_fill(&mut self.stream, &mut self.buf, cx)
    }
}

/// Why an exchange failed, as the short lowercase reasons Lua sees.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Error {
    Timeout,
    /// The connection closed or reset before any response byte: safe to retry elsewhere
    /// when the request can be sent again.
    ClosedBeforeResponse,
    /// Sending the request failed: the upstream saw at most part of it.
    WriteFailed(String),
    Io(String),
    Invalid(&'static str),
    RequestBody(String),
}

impl Error {
    pub fn reason(&self) -> String {
        match self {
            Error::Timeout => "timeout".into(),
            Error::ClosedBeforeResponse => "upstream closed connection".into(),
            Error::Io(s) | Error::WriteFailed(s) => s.clone(),
            Error::Invalid(s) => format!("invalid upstream response: {s}"),
            Error::RequestBody(s) => s.clone(),
        }
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

pub struct Head {
    pub status: StatusCode,
    pub headers: Headers,
    pub framing: Framing,
    /// The connection may carry another request once this body is read to its end.
    pub reusable: bool,
}

/// Parses a response head from `buf`. `Ok(None)` means more bytes are needed.
pub fn parse_head(buf: &[u8], method: &Method) -> Result<Option<(usize, Head)>, Error> {
    // Uninitialized: zeroing the whole array was a 4 KB memset per parse.
    let mut hdrs = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut hdrs);
    let n = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Err(Error::Invalid("header too large"))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Invalid("too many headers")),
        Err(_) => return Err(Error::Invalid("malformed head")),
    };
    if n > MAX_HEAD {
        return Err(Error::Invalid("header too large"));
    }
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("bad status"))?;
    let version11 = res.version == Some(1);
    // What framing and reuse depend on, read off the raw lines in one pass.
    let mut cl: Option<&[u8]> = None;
    let mut cl_count = 0;
    let mut te_last: Option<&[u8]> = None;
    let mut close = false;
    let mut named: Vec<&[u8]> = Vec::new();
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            cl_count += 1;
            cl = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if let Some(t) = h
                .value
                .rsplit(|&c| c == b',')
                .map(<[u8]>::trim_ascii)
                .find(|t| !t.is_empty())
            {
                te_last = Some(t);
            } else if te_last.is_none() {
                te_last = Some(b"");
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in h.value.split(|&c| c == b',').map(<[u8]>::trim_ascii) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") {
                    named.push(t);
                }
            }
        }
    }
    let cl = match (cl, cl_count) {
        (None, _) => None,
        (Some(v), 1) => Some(
            std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Error::Invalid("bad content-length"))?,
        ),
        _ => return Err(Error::Invalid("duplicate content-length")),
    };
    let te = te_last.is_some();
    if te && cl.is_some() {
        // Response splitting territory: refuse rather than guess (nginx does the same).
        return Err(Error::Invalid("both content-length and transfer-encoding"));
    }
    // One copy of the head, values sliced from it: a response kept in a cache does not pin
    // the connection's read buffer, and there is one allocation instead of one per value.
    // Hop-by-hop headers (RFC 9110 §7.6.1) and those `Connection` names never enter the map.
    let copy = Bytes::copy_from_slice(&buf[..n]);
    let mut at = Vec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let raw = h.name.as_bytes();
        if rules::is_hop_by_hop(raw) || named.iter().any(|t| t.eq_ignore_ascii_case(raw)) {
            // Framing stays ours: Connection cannot hide Content-Length.
            if !raw.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
        }
        at.push(field_at(buf, raw, h.value));
    }
    let headers = Headers::Raw { buf: copy, at };
    let mut reusable = version11 && !close;
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        // Any bytes such a response carries anyway would poison the next exchange.
        if cl.is_some_and(|n| n > 0) && *method != Method::HEAD {
            reusable = false;
        }
        Framing::None
    } else if let Some(last) = te_last {
        if last.eq_ignore_ascii_case(b"chunked") && version11 {
            Framing::Chunked
        } else {
            reusable = false;
            Framing::UntilClose
        }
    } else if let Some(n) = cl {
        Framing::Length(n)
    } else {
        reusable = false;
        Framing::UntilClose
    };
    Ok(Some((
        n,
        Head {
            status,
            headers,
            framing,
            reusable,
        },
    )))
}

/// A request head ready for the wire, with the framing it promised: encoded once, so a
/// retry on another connection sends the same bytes.
pub struct OutHead {
    pub bytes: Bytes,
    /// Body bytes the head announced (`None`: chunked).
    pub length: Option<u64>,
}

/// Encodes a request head: the request line, `headers` except framing ones and those `skip`
/// names, then `extra` (each value the concatenation of its parts), then the framing for a
/// body of `length` bytes (`None`: unknown, sent chunked). A bodiless GET/HEAD/DELETE/OPTIONS
/// gets no Content-Length at all.
pub fn encode_request(
    method: &Method,
    uri: &Uri,
    headers: &Headers,
    skip: impl Fn(&[u8]) -> bool,
    extra: &[(&[u8], &[&[u8]])],
    length: Option<u64>,
) -> OutHead {
    let mut out = BytesMut::with_capacity(512);
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(
        uri.path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers.iter() {
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || skip(name)
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    for (name, parts) in extra {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        for p in *parts {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    ) && length == Some(0)
        && !headers.contains(b"content-length");
    match length {
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Some(_) if bodiless => {}
        Some(n) => {
            out.extend_from_slice(b"content-length: ");
            push_num(&mut out, n, 10);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    OutHead {
        bytes: out.freeze(),
        length,
    }
}

/// Writes the request head and body. What the body has ready leaves in the same `writev` as
/// the head (no copy of the body); more is waited for only after that is flushed.
pub async fn write_request<B>(
    conn: &mut Conn,
    head: &OutHead,
    mut body: Pin<&mut B>,
) -> Result<(), Error>
where
    B: Body<Data = Bytes> + ?Sized,
    B::Error: std::fmt::Display,
{
    let chunked = head.length.is_none();
    let mut queue: Vec<Bytes> = Vec::with_capacity(4);
    queue.push(head.bytes.clone());
    let mut queued = head.bytes.len();
    let mut sent: u64 = 0;
    if !body.is_end_stream() {
        loop {
            let next = poll_fn(|cx| {
                Poll::Ready(match body.as_mut().poll_frame(cx) {
                    Poll::Ready(f) => Some(f),
                    Poll::Pending => None,
                })
            })
            .await;
            let frame = match next {
                Some(f) => f,
                None => {
                    flush(conn, &mut queue).await?;
                    queued = 0;
                    poll_fn(|cx| body.as_mut().poll_frame(cx)).await
                }
            };
            match frame {
                None => break,
                Some(Err(e)) => return Err(Error::RequestBody(e.to_string())),
                Some(Ok(f)) => {
                    let Ok(data) = f.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    queued += data.len();
                    if chunked {
                        let mut line = BytesMut::with_capacity(20);
                        push_num(&mut line, data.len() as u64, 16);
                        line.extend_from_slice(b"\r\n");
                        queue.push(line.freeze());
                        queue.push(data);
                        queue.push(Bytes::from_static(b"\r\n"));
                    } else {
                        queue.push(data);
                    }
                    // Whatever of the body has already arrived is queued (up to 64 KiB) before
                    // the first write: a body that fails its checks (size, framing) while it
                    // is all in hand sends the upstream nothing. `flush` writes long queues in
                    // groups of 64 buffers.
                    if queued >= 64 * 1024 || queue.len() >= 1024 {
                        flush(conn, &mut queue).await?;
                        queued = 0;
                    }
                }
            }
        }
    }
    if let Some(n) = head.length {
        if sent != n {
            return Err(Error::RequestBody("request body length mismatch".into()));
        }
    }
    if chunked {
        queue.push(Bytes::from_static(b"0\r\n\r\n"));
    }
    flush(conn, &mut queue).await
}

/// Writes every queued buffer, in order, with as few `writev`s as the socket takes.
async fn flush(conn: &mut Conn, queue: &mut Vec<Bytes>) -> Result<(), Error> {
    let timed_out = std::cell::Cell::new(false);
    let mut r = Ok(());
    for group in queue.chunks(64) {
        let mut parts: [&[u8]; 64] = [&[]; 64];
        for (p, b) in parts.iter_mut().zip(group) {
            *p = b;
        }
        r = write_all_parts(&mut parts[..group.len()], |cx, slices| {
            match Pin::new(&mut conn.stream).poll_write_vectored(cx, slices) {
                Poll::Pending if conn.deadline_passed(cx) => {
                    timed_out.set(true);
                    Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
                }
                r => r,
            }
        })
        .await;
        if r.is_err() {
            break;
        }
    }
    queue.clear();
    match r {
        Ok(()) => Ok(()),
        Err(_) if timed_out.get() => Err(Error::Timeout),
        Err(e) if e.kind() == io::ErrorKind::WriteZero => {
            Err(Error::WriteFailed("upstream closed connection".into()))
        }
        Err(e) => Err(Error::WriteFailed(io_reason(&e))),
    }
}

/// Interim (1xx) responses skipped before a final one; more is a broken or hostile upstream
/// keeping the exchange busy without answering.
const MAX_INTERIM: usize = 32;

/// Reads a response head (skipping 100 Continue and other 1xx heads, at most `MAX_INTERIM`).
/// The deadline is checked on every pass, not only when the socket would block: an upstream
/// whose bytes never run out cannot hold the exchange past it.
pub async fn read_head(conn: &mut Conn, method: &Method) -> Result<Head, Error> {
    let mut got_any = !conn.buf.is_empty();
    let mut scanned = 0;
    let mut interim = 0;
    loop {
        let ready = !conn.buf.is_empty()
            && (scanned == 0 || head_complete(&conn.buf, scanned) || conn.buf.len() > MAX_HEAD);
        scanned = conn.buf.len();
        if ready {
            if let Some((n, head)) = parse_head(&conn.buf, method)? {
                conn.buf.advance(n);
                scanned = 0;
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(Error::Invalid("too many 1xx responses"));
                    }
                    continue;
                }
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Error::Invalid("unexpected 101 switching protocols"));
                }
                return Ok(head);
            }
        }
        let n = poll_fn(|cx| match conn.poll_fill(cx) {
            Poll::Ready(r) => Poll::Ready(r.map_err(|e| {
                if !got_any && matches!(e.kind(), io::ErrorKind::ConnectionReset) {
                    Error::ClosedBeforeResponse
                } else {
                    Error::Io(io_reason(&e))
                }
            })),
            Poll::Pending if conn.deadline_passed(cx) => Poll::Ready(Err(Error::Timeout)),
            Poll::Pending => Poll::Pending,
        })
        .await?;
        if n == 0 {
            return Err(if got_any {
                Error::Invalid("truncated head")
            } else {
                Error::ClosedBeforeResponse
            });
        }
        got_any = true;
        // Bytes keep coming without a head that ends: the deadline still holds.
        if conn.deadline.is_some_and(|d| crate::clock::now() >= d) {
            return Err(Error::Timeout);
        }
    }
}
/// Where a finished connection goes: back to its pool if it is clean.
pub type Release = Box<dyn FnOnce(Conn)>;

enum BodyMode {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// A response body read straight from the upstream socket. At a clean end the connection is
/// handed to `release`; dropped early, the connection is closed.
pub struct ResponseBody {
    conn: Option<Conn>,
    mode: BodyMode,
    reusable: bool,
    release: Option<Release>,
    idle: IdleTimer,
    done: bool,
}

impl ResponseBody {
    pub fn new(conn: Conn, head: &Head, idle: Duration, release: Release) -> ResponseBody {
        let mode = match head.framing {
            Framing::None => BodyMode::Length(0),
            Framing::Length(n) => BodyMode::Length(n),
            Framing::Chunked => BodyMode::Chunked(Chunked::default()),
            Framing::UntilClose => BodyMode::UntilClose,
        };
        let mut b = ResponseBody {
            conn: Some(conn),
            mode,
            reusable: head.reusable,
            release: Some(release),
            idle: IdleTimer::new(idle),
            done: false,
        };
        if matches!(b.mode, BodyMode::Length(0)) {
            b.finish();
        }
        b
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(conn) = self.conn.take() {
            // Leftover bytes after a complete body mean the upstream broke framing.
            if self.reusable && conn.buf.is_empty() {
                if let Some(r) = self.release.take() {
                    r(conn);
                }
            }
        }
    }

    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.done = true;
        Poll::Ready(Some(Err(why.into())))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Serve what is buffered first.
            if !conn.buf.is_empty() {
                match &mut this.mode {
                    BodyMode::Length(left) => {
                        let take = (*left).min(conn.buf.len() as u64) as usize;
                        let data = conn.buf.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        this.idle.progress();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    BodyMode::UntilClose => {
                        let data = conn.buf.split().freeze();
                        this.idle.progress();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    BodyMode::Chunked(state) => match state.decode(&mut conn.buf) {
                        Ok(Some(data)) => {
                            this.idle.progress();
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(None) if state.is_done() => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(None) => {}
                        Err(e) => return this.fail(format!("invalid upstream response: {e}")),
                    },
                }
            }
            let conn = this.conn.as_mut().expect("checked above");
            match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    if matches!(this.mode, BodyMode::UntilClose) {
                        this.conn = None;
                        this.done = true;
                        return Poll::Ready(None);
                    }
                    return this.fail("upstream closed connection before the body ended".into());
                }
                Poll::Ready(Ok(_)) => {
                    this.idle.progress();
                    continue;
                }
                Poll::Ready(Err(e)) => return this.fail(io_reason(&e)),
                Poll::Pending => {
                    if this.idle.expired(cx) {
                        return this.fail("timeout".into());
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.mode {
            BodyMode::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<(usize, Head)>, Error> {
        parse_head(raw.as_bytes(), &Method::GET)
    }

    #[test]
    fn framing_from_headers() {
        let (n, h) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(n, 38);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.reusable);
        let (_, h) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let (_, h) = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.reusable);
        let (_, h) = head("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.reusable);
        let (_, h) = head("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::None);
        assert!(!h.reusable);
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
    }

    #[test]
    fn hop_by_hop_headers_stay_out() {
        let (_, h) = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n\
             X-Secret: 1\r\nUpgrade: h2c\r\nX-Keep: 2\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let names: Vec<_> = h.headers.iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec![&b"X-Keep"[..], b"Content-Length"]);
        assert!(h.reusable);
        let (_, h) = head("HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.reusable);
    }

    #[test]
    fn refuses_ambiguous_framing() {
        assert!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
                .is_err()
        );
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n").is_err());
        assert!(head("SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let big = format!("HTTP/1.1 200 OK\r\nX: {}\r\n", "a".repeat(MAX_HEAD + 10));
        assert!(head(&big).is_err());
    }
}
