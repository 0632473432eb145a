//! Harness for `tests/edge.rs`: a proxy running a Lua policy on its own thread, a recording
//! upstream with scripted behaviour, and a raw HTTP/1.1 client. Everything binds 127.0.0.1:0,
//! every wait is bounded, and nothing is shared between tests.

#![allow(dead_code)]

use mlua::prelude::*;
use std::cell::RefCell;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The policy most cases run: `/private` is refused, `/echo/` answers with what the policy
/// sees, everything else goes to the upstream with `X-Auth-User` set.
pub const DEFAULT_POLICY: &str = r#"
return function(req)
  local p = req:get_path()
  if p:sub(1, 9) == "/private/" or p == "/private" then return 403, "forbidden" end
  if p:sub(1, 6) == "/echo/" then return 200, "path=" .. p .. " uri=" .. req:get_uri() end
  req:set_header("X-Auth-User", "policy-user")
  local res, err = req:proxy("UPSTREAM")
  if not res then return err == "timeout" and 504 or 502, "upstream: " .. tostring(err) end
  return res
end
"#;

// ---------------------------------------------------------------------------------------
// Bytes for messages

/// Printable rendering of bytes for assertion messages (escaped, cut after `max` bytes).
pub fn show_n(b: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &c in b.iter().take(max) {
        match c {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    if b.len() > max {
        s.push_str(&format!("...({} bytes in all)", b.len()));
    }
    s
}

pub fn show(b: &[u8]) -> String {
    show_n(b, 600)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// End of a head: index just past the blank line (CRLF CRLF, or bare LF LF).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = find(buf, b"\r\n\r\n").map(|i| i + 4);
    let lf = find(buf, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Head lines (the first is the start line), CR stripped.
fn head_lines(head: &[u8]) -> Vec<Vec<u8>> {
    head.split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
        .filter(|l| !l.is_empty())
        .collect()
}

fn parse_fields(lines: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
    lines
        .iter()
        .map(|l| match l.iter().position(|&c| c == b':') {
            Some(i) => (
                String::from_utf8_lossy(&l[..i]).to_string(),
                l[i + 1..].trim_ascii().to_vec(),
            ),
            None => (String::from_utf8_lossy(l).to_string(), Vec::new()),
        })
        .collect()
}

/// Decodes a chunked body at the start of `buf`: `Ok(Some((data, consumed)))` when complete
/// (trailers included), `Ok(None)` when more bytes are needed.
pub fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[at..at + eol];
        let digits = line.split(|&c| c == b';').next().unwrap_or(b"");
        let size = std::str::from_utf8(digits.trim_ascii())
            .ok()
            .and_then(|d| u64::from_str_radix(d, 16).ok())
            .ok_or_else(|| format!("bad chunk size line {}", show(line)))?
            as usize;
        at += eol + 2;
        if size == 0 {
            // trailers up to the blank line
            loop {
                let Some(eol) = find(&buf[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some((out, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += size + 2;
    }
}

// ---------------------------------------------------------------------------------------
// What the upstream received

/// One request as the upstream read it.
#[derive(Clone)]
pub struct UpReq {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The head exactly as it arrived (request line to blank line).
    pub head: Vec<u8>,
    /// The body, de-chunked when it came chunked.
    pub body: Vec<u8>,
    pub chunked: bool,
}

impl UpReq {
    /// Every value of `name` (case-insensitive), as text.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).to_string())
            .collect()
    }
    pub fn line(&self) -> String {
        format!("{} {} {}", self.method, self.target, self.version)
    }
}

impl std::fmt::Debug for UpReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UpReq[head={} body({})={}]",
            show(&self.head),
            self.body.len(),
            show_n(&self.body, 120)
        )
    }
}

/// Parses one request at the start of `buf`: `Ok(None)` when incomplete.
pub fn parse_up_request(buf: &[u8]) -> Result<Option<(UpReq, usize)>, String> {
    let Some(end) = head_end(buf) else {
        return Ok(None);
    };
    let head = buf[..end].to_vec();
    let lines = head_lines(&head);
    let Some(first) = lines.first() else {
        return Err(format!("empty head: {}", show(&head)));
    };
    let parts: Vec<String> = String::from_utf8_lossy(first)
        .split(' ')
        .map(str::to_string)
        .collect();
    if parts.len() != 3 {
        return Err(format!("bad request line: {}", show(first)));
    }
    let headers = parse_fields(&lines[1..]);
    let te = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().ends_with(b"chunked")
    });
    let mut req = UpReq {
        method: parts[0].clone(),
        target: parts[1].clone(),
        version: parts[2].clone(),
        headers,
        head,
        body: Vec::new(),
        chunked: te,
    };
    if te {
        return match decode_chunked(&buf[end..])? {
            None => Ok(None),
            Some((data, used)) => {
                req.body = data;
                Ok(Some((req, end + used)))
            }
        };
    }
    let cl = req.values("content-length");
    let n = match cl.first() {
        None => 0,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("bad content-length {v:?}"))?,
    };
    if buf.len() < end + n {
        return Ok(None);
    }
    req.body = buf[end..end + n].to_vec();
    Ok(Some((req, end + n)))
}

/// Every request in `buf`, and the bytes left over that do not make a request.
pub fn parse_up_requests(mut buf: &[u8]) -> (Vec<UpReq>, Vec<u8>) {
    let mut out = Vec::new();
    while !buf.is_empty() {
        match parse_up_request(buf) {
            Ok(Some((r, n))) => {
                out.push(r);
                buf = &buf[n..];
            }
            _ => break,
        }
    }
    (out, buf.to_vec())
}

// ---------------------------------------------------------------------------------------
// Upstream

struct UpShared {
    all: Mutex<Vec<u8>>,
    per_conn: Mutex<Vec<Vec<u8>>>,
    accepted: AtomicUsize,
    stop: AtomicBool,
}

/// One upstream connection's view of the recording: every byte read through it is recorded
/// (in the upstream's log and the connection's own), then parsed from `pending`.
pub struct Recorder {
    shared: Arc<UpShared>,
    conn_no: usize,
    pending: RefCell<Vec<u8>>,
    deadline: Instant,
}

/// How long any upstream connection lives at most.
const UP_CONN_LIFE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

impl Recorder {
    fn record(&self, b: &[u8]) {
        self.shared.all.lock().unwrap().extend_from_slice(b);
        self.shared.per_conn.lock().unwrap()[self.conn_no].extend_from_slice(b);
        self.pending.borrow_mut().extend_from_slice(b);
    }

    pub fn stopped(&self) -> bool {
        self.shared.stop.load(SeqCst) || Instant::now() > self.deadline
    }

    /// One read (waiting at most until `until`): `Some(n)` bytes (0 = end of stream),
    /// `None` when nothing came in time or the upstream is stopping.
    pub fn fill(&self, s: &mut TcpStream, until: Instant) -> Option<usize> {
        let _ = s.set_read_timeout(Some(POLL));
        let mut b = [0u8; 64 * 1024];
        loop {
            if self.stopped() || Instant::now() >= until {
                return None;
            }
            match s.read(&mut b) {
                Ok(n) => {
                    self.record(&b[..n]);
                    return Some(n);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Some(0),
            }
        }
    }

    /// Reads the next whole request (head, and body by Content-Length or chunked). `None` at
    /// end of stream, on unparseable bytes, or when the upstream stops.
    pub fn read_request(&self, s: &mut TcpStream) -> Option<UpReq> {
        loop {
            {
                let mut p = self.pending.borrow_mut();
                if !p.is_empty() {
                    match parse_up_request(&p) {
                        Ok(Some((r, n))) => {
                            p.drain(..n);
                            return Some(r);
                        }
                        Ok(None) => {}
                        Err(_) => return None,
                    }
                }
            }
            match self.fill(s, self.deadline) {
                Some(0) | None => return None,
                Some(_) => {}
            }
        }
    }

    /// Reads (and records) whatever comes for `d`, or until end of stream.
    pub fn read_for(&self, s: &mut TcpStream, d: Duration) {
        let until = Instant::now() + d;
        while let Some(n) = self.fill(s, until) {
            if n == 0 {
                return;
            }
        }
    }

    /// Sleeps `d`, returning early when the upstream stops.
    pub fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() && Instant::now() < until {
            std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
        }
    }

    /// Keeps the connection open, recording what comes, until the peer closes or we stop.
    pub fn hold(&self, s: &mut TcpStream) {
        self.read_for(s, UP_CONN_LIFE);
    }
}

pub type Script = Arc<dyn Fn(&mut TcpStream, usize, &Recorder) + Send + Sync>;

/// A recording upstream on 127.0.0.1:0 answering as its script says; `conn_no` counts
/// accepted connections from 0.
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<UpShared>,
    thread: Option<JoinHandle<()>>,
}

/// The well-behaved answer: names the request it answers.
pub fn ok_body(r: &UpReq) -> String {
    format!("ok {} {} {}", r.method, r.target, r.body.len())
}

pub fn answer_ok(s: &mut TcpStream, r: &UpReq) -> bool {
    let body = ok_body(r);
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).is_ok()
}

/// Answers every request on the connection as `Upstream::ok` does.
pub fn serve_ok(s: &mut TcpStream, rec: &Recorder) {
    while let Some(r) = rec.read_request(s) {
        if !answer_ok(s, &r) {
            return;
        }
    }
}

impl Upstream {
    pub fn new(
        script: impl Fn(&mut TcpStream, usize, &Recorder) + Send + Sync + 'static,
    ) -> Upstream {
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").expect("upstream bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(UpShared {
            all: Mutex::new(Vec::new()),
            per_conn: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("edge-upstream".into())
            .spawn(move || {
                let give_up = Instant::now() + Duration::from_secs(60);
                let mut conns: Vec<JoinHandle<()>> = Vec::new();
                while !sh.stop.load(SeqCst) && Instant::now() < give_up {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_nodelay(true);
                            let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                            let n = sh.accepted.fetch_add(1, SeqCst);
                            sh.per_conn.lock().unwrap().push(Vec::new());
                            let (sh2, script) = (sh.clone(), script.clone());
                            conns.push(std::thread::spawn(move || {
                                let rec = Recorder {
                                    shared: sh2,
                                    conn_no: n,
                                    pending: RefCell::new(Vec::new()),
                                    deadline: Instant::now() + UP_CONN_LIFE,
                                };
                                script(&mut s, n, &rec);
                                // Whatever is already waiting is recorded too.
                                let _ = s.set_nonblocking(true);
                                let mut b = [0u8; 64 * 1024];
                                while let Ok(n) = s.read(&mut b) {
                                    if n == 0 {
                                        break;
                                    }
                                    rec.record(&b[..n]);
                                }
                            }));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                let until = Instant::now() + Duration::from_secs(5);
                for c in conns {
                    while !c.is_finished() && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if c.is_finished() {
                        let _ = c.join();
                    }
                }
            })
            .unwrap();
        Upstream {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// Answers every request `200 OK` with `ok <method> <target> <body bytes>`, keep-alive.
    pub fn ok() -> Upstream {
        Upstream::new(|s, _, rec| serve_ok(s, rec))
    }

    /// Every byte received so far, on all connections, in arrival order.
    pub fn bytes(&self) -> Vec<u8> {
        self.shared.all.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.shared.all.lock().unwrap().len()
    }

    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(SeqCst)
    }

    /// The requests received, connection by connection, and any bytes that do not parse.
    pub fn requests(&self) -> (Vec<UpReq>, Vec<u8>) {
        let mut all = Vec::new();
        let mut rest = Vec::new();
        for c in self.shared.per_conn.lock().unwrap().iter() {
            let (r, left) = parse_up_requests(c);
            all.extend(r);
            rest.extend(left);
        }
        (all, rest)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let until = Instant::now() + Duration::from_secs(8);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                eprintln!("edge: upstream thread did not stop within 8 s (left behind)");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Proxy

/// A luaproxy server in handler mode on its own thread and Lua VM.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

fn run_proxy(
    policy: &str,
    opts: &str,
    tx: mpsc::Sender<Result<String, String>>,
    stop: Arc<AtomicBool>,
) -> LuaResult<()> {
    let lua = Lua::new();
    let t = luaproxy::exports(&lua)?;
    lua.register_module("luaproxy", t)?;
    let dir = env!("CARGO_MANIFEST_DIR");
    let package: LuaTable = lua.globals().get("package")?;
    let path: String = package.get("path")?;
    package.set(
        "path",
        format!("{dir}/lua/?.lua;{dir}/lua/?/init.lua;lua/?.lua;lua/?/init.lua;{path}"),
    )?;
    let report = lua.create_function(move |_, (addr, err): (Option<String>, Option<String>)| {
        let _ = tx.send(match addr {
            Some(a) => Ok(a),
            None => Err(err.unwrap_or_else(|| "no address".into())),
        });
        Ok(())
    })?;
    let should_stop = lua.create_function(move |_, ()| Ok(stop.load(SeqCst)))?;
    lua.globals().set("report", report)?;
    lua.globals().set("should_stop", should_stop)?;
    let chunk = format!(
        r#"
        local POLICY = ...
        local lp = require "luaproxy"
        if not os.getenv("EDGE_LOG") then lp.set_log_level("crit") end
        local function merge(a, b) for k, v in pairs(b) do a[k] = v end return a end
        lp.run(function()
          local handler = assert(load(POLICY, "=policy"))()
          local srv, err = lp.serve(merge({{ listen = "127.0.0.1:0", handler = handler }}, {opts}))
          if not srv then report(nil, tostring(err)) return end
          report(srv.addr)
          while not should_stop() do lp.sleep(0.01) end
          srv:close(); srv:wait()
          lp.stop() -- drop connections still waiting on a hostile upstream
        end)
        "#
    );
    lua.load(chunk).set_name("=edge-harness").call::<()>(policy)
}

impl Proxy {
    /// Starts `policy` (Lua source returning a handler) with `opts` (a Lua table constructor
    /// merged into the `luaproxy.serve` options). Panics if it does not start within 10 s.
    pub fn start(policy: &str, opts: &str) -> Proxy {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, o, st, tx2) = (
            policy.to_string(),
            opts.to_string(),
            stop.clone(),
            tx.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("edge-proxy".into())
            .spawn(move || {
                let r = run_proxy(&p, &o, tx2, st).map_err(|e| e.to_string());
                if let Err(e) = &r {
                    let _ = tx.send(Err(e.clone()));
                }
                r
            })
            .unwrap();
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(a)) => a.parse().expect("proxy address"),
            Ok(Err(e)) => panic!("proxy did not start with opts {opts}: {e}"),
            Err(_) => panic!("proxy did not report its address within 10 s"),
        };
        Proxy {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// The default policy proxying to `up`, with `opts`.
    pub fn default_for(up: &Upstream, opts: &str) -> Proxy {
        Proxy::start(
            &DEFAULT_POLICY.replace("UPSTREAM", &up.addr.to_string()),
            opts,
        )
    }

    /// `policy` with `UPSTREAM` replaced by `up`'s address.
    pub fn policy_for(policy: &str, up: &Upstream, opts: &str) -> Proxy {
        Proxy::start(&policy.replace("UPSTREAM", &up.addr.to_string()), opts)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        let Some(t) = self.thread.take() else { return };
        let until = Instant::now() + Duration::from_secs(10);
        while !t.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !t.is_finished() {
            if std::thread::panicking() {
                eprintln!("edge: proxy thread did not stop within 10 s (left behind)");
                return;
            }
            panic!("proxy thread did not stop within 10 s of being asked to (srv:close/wait/stop hung)");
        }
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("edge: proxy loop ended with an error: {e}"),
            Err(_) => eprintln!("edge: proxy thread panicked"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw client

/// One response as the client read it.
#[derive(Default, Clone)]
pub struct Reply {
    /// 0 when no final response came.
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server closed the connection after this response (EOF or reset seen).
    pub closed: bool,
    /// The body ended early (end of stream before the framing said it ends).
    pub truncated: bool,
    /// Interim (1xx) statuses seen before the final one.
    pub interim: Vec<u16>,
    /// Everything read for this response.
    pub raw: Vec<u8>,
    /// Bytes that came after the response (while waiting to see whether it closes).
    pub extra: Vec<u8>,
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Reply[status={} closed={} truncated={} interim={:?} body({})={} raw={}",
            self.status,
            self.closed,
            self.truncated,
            self.interim,
            self.body.len(),
            show_n(&self.body, 200),
            show_n(&self.raw, 400)
        )?;
        if !self.extra.is_empty() {
            write!(f, " extra={}", show_n(&self.extra, 200))?;
        }
        if let Some(e) = &self.error {
            write!(f, " error={e}")?;
        }
        write!(f, " after {:?}]", self.elapsed)
    }
}

pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to proxy");
        let _ = s.set_nodelay(true);
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        Client {
            s,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Writes all of `b` in one call; a failure (the server may have answered and closed
    /// already) is returned, not raised.
    pub fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    /// Reads more into `buf`; false on timeout, end of stream or error (`eof` set for the
    /// last two).
    fn fill(&mut self, until: Instant) -> bool {
        if self.eof {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = self
            .s
            .set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let mut b = [0u8; 64 * 1024];
        match self.s.read(&mut b) {
            Ok(0) => {
                self.eof = true;
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(_) => {
                self.eof = true;
                false
            }
        }
    }

    /// Reads one final response (skipping and noting 1xx ones) within `timeout`. `head_req`:
    /// the request was HEAD, so the response has no body.
    pub fn read_reply(&mut self, head_req: bool, timeout: Duration) -> Reply {
        let t0 = Instant::now();
        let until = t0 + timeout;
        let mut r = Reply::default();
        let start_len = self.buf.len();
        let _ = start_len;
        loop {
            // head
            let end = loop {
                if let Some(e) = head_end(&self.buf) {
                    break Some(e);
                }
                if !self.fill(until) {
                    break None;
                }
            };
            let Some(end) = end else {
                r.raw.extend_from_slice(&self.buf);
                r.error = Some(if self.eof {
                    format!(
                        "connection closed before a complete response head ({} bytes)",
                        self.buf.len()
                    )
                } else {
                    format!("no complete response head within {timeout:?}")
                });
                self.buf.clear();
                r.closed = self.eof;
                r.elapsed = t0.elapsed();
                return r;
            };
            let head: Vec<u8> = self.buf.drain(..end).collect();
            r.raw.extend_from_slice(&head);
            let lines = head_lines(&head);
            let first =
                String::from_utf8_lossy(lines.first().map(|l| &l[..]).unwrap_or(b"")).to_string();
            let status = first
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0);
            if !first.starts_with("HTTP/1.") || status == 0 {
                r.error = Some(format!("bad status line {first:?}"));
                r.elapsed = t0.elapsed();
                return r;
            }
            if (100..200).contains(&status) && status != 101 {
                r.interim.push(status);
                continue;
            }
            r.status = status;
            r.headers = parse_fields(&lines[1..])
                .into_iter()
                .map(|(n, v)| (n, String::from_utf8_lossy(&v).to_string()))
                .collect();
            break;
        }
        let chunked = r
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let cl = r
            .header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok());
        if head_req || r.status == 204 || r.status == 304 || r.status == 101 {
            // no body
        } else if chunked {
            loop {
                match decode_chunked(&self.buf) {
                    Ok(Some((data, used))) => {
                        r.raw.extend(self.buf.drain(..used));
                        r.body = data;
                        break;
                    }
                    Ok(None) => {
                        if !self.fill(until) {
                            r.truncated = true;
                            r.body = partial_chunked(&self.buf);
                            r.raw.append(&mut self.buf);
                            if !self.eof {
                                r.error = Some("chunked body did not end in time".into());
                            }
                            break;
                        }
                    }
                    Err(e) => {
                        r.truncated = true;
                        r.body = partial_chunked(&self.buf);
                        r.raw.append(&mut self.buf);
                        r.error = Some(format!("broken chunked framing from the proxy: {e}"));
                        break;
                    }
                }
            }
        } else if let Some(n) = cl {
            while self.buf.len() < n {
                if !self.fill(until) {
                    break;
                }
            }
            let take = n.min(self.buf.len());
            r.body = self.buf.drain(..take).collect();
            r.raw.extend_from_slice(&r.body);
            if take < n {
                r.truncated = true;
                if !self.eof {
                    r.error = Some(format!("body: {take} of {n} bytes within {timeout:?}"));
                }
            }
        } else {
            while self.fill(until) {}
            r.body = std::mem::take(&mut self.buf);
            r.raw.extend_from_slice(&r.body);
            if !self.eof {
                r.error = Some("close-delimited body did not end in time".into());
            }
        }
        r.closed = self.eof;
        r.elapsed = t0.elapsed();
        r
    }

    /// Waits up to `d` for the server to close: true on end of stream or reset. Bytes that
    /// arrive meanwhile are returned too.
    pub fn closed_within(&mut self, d: Duration) -> (bool, Vec<u8>) {
        let until = Instant::now() + d;
        let before = self.buf.len();
        while self.fill(until) {}
        (self.eof, self.buf[before..].to_vec())
    }
}

fn partial_chunked(buf: &[u8]) -> Vec<u8> {
    // Best effort: the data of the complete chunks at the start of `buf`.
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(eol) = find(&buf[at..], b"\r\n") {
        let size = std::str::from_utf8(&buf[at..at + eol])
            .ok()
            .and_then(|d| usize::from_str_radix(d.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size else { break };
        at += eol + 2;
        if size == 0 || buf.len() < at + size {
            out.extend_from_slice(&buf[at.min(buf.len())..buf.len().min(at + size)]);
            break;
        }
        out.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
        if at > buf.len() {
            break;
        }
    }
    out
}

pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

fn is_head(req: &[u8]) -> bool {
    req.starts_with(b"HEAD ")
}

/// Sends `bytes` on a new connection, reads one response and waits (up to 2 s) to see
/// whether the server closes the connection after it.
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> Reply {
    exchange_with(addr, bytes, READ_TIMEOUT, Some(CLOSE_WAIT))
}

/// Like `exchange`, without waiting to see whether the connection closes.
pub fn exchange_quick(addr: SocketAddr, bytes: &[u8]) -> Reply {
    exchange_with(addr, bytes, READ_TIMEOUT, None)
}

pub fn exchange_with(
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
    close_wait: Option<Duration>,
) -> Reply {
    let mut c = Client::connect(addr);
    let sent = c.send(bytes);
    let mut r = c.read_reply(is_head(bytes), timeout);
    if let (Err(e), 0) = (&sent, r.status) {
        r.error = Some(format!(
            "{} (writing the request failed: {e})",
            r.error.clone().unwrap_or_default()
        ));
    }
    if let (Some(d), false) = (close_wait, r.closed) {
        let (closed, extra) = c.closed_within(d);
        r.closed = closed;
        r.extra = extra;
    }
    r
}

/// Sends each request on one connection, one after the other, reading each response (and
/// stopping once the server closes). With `check_close_last`, waits up to 2 s to see whether
/// the connection closes after the last response read.
pub fn exchange_many(addr: SocketAddr, reqs: &[&[u8]], check_close_last: bool) -> Vec<Reply> {
    let mut c = Client::connect(addr);
    let mut out: Vec<Reply> = Vec::new();
    for req in reqs {
        let _ = c.send(req);
        let r = c.read_reply(is_head(req), READ_TIMEOUT);
        let stop = r.closed || r.status == 0;
        out.push(r);
        if stop {
            break;
        }
    }
    if let Some(last) = out.last_mut() {
        if check_close_last && !last.closed {
            let (closed, extra) = c.closed_within(CLOSE_WAIT);
            last.closed = closed;
            last.extra = extra;
        }
    }
    out
}

/// Sends all `reqs` in one write (pipelined) and reads `reqs.len()` responses in order.
pub fn exchange_pipelined(addr: SocketAddr, reqs: &[&[u8]]) -> Vec<Reply> {
    let mut c = Client::connect(addr);
    let _ = c.send(&reqs.concat());
    reqs.iter()
        .map(|r| c.read_reply(is_head(r), READ_TIMEOUT))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Checks shared by the cases

/// The request every "still serves others" check sends.
pub const GOOD: &[u8] = b"GET /after-check HTTP/1.1\r\nHost: good.example\r\n\r\n";

/// A good request on a new connection gets the upstream's 200, and the upstream's recording
/// from `mark` on holds exactly that request.
pub fn still_serves(up: &Upstream, px: &Proxy, mark: usize) -> Result<(), String> {
    let r = exchange_quick(px.addr, GOOD);
    if r.status != 200 || r.body_str() != "ok GET /after-check 0" {
        return Err(format!("a good request afterwards was not served: {r:?}"));
    }
    std::thread::sleep(Duration::from_millis(30));
    let all = up.bytes();
    let after = &all[mark.min(all.len())..];
    let (reqs, rest) = parse_up_requests(after);
    if reqs.len() != 1 || !rest.is_empty() || reqs[0].line() != "GET /after-check HTTP/1.1" {
        return Err(format!(
            "after the good request the upstream recording (from byte {mark}) is not exactly that request: {}",
            show(after)
        ));
    }
    Ok(())
}

/// A good request on a new connection still gets the upstream's 200 (the recording is not
/// checked: the case itself sent things upstream).
pub fn still_serves_loose(px: &Proxy) -> Result<(), String> {
    let r = exchange_quick(px.addr, GOOD);
    if r.status != 200 || r.body_str() != "ok GET /after-check 0" {
        return Err(format!("a good request afterwards was not served: {r:?}"));
    }
    Ok(())
}

fn finish(errs: Vec<String>, r: &Reply) -> Result<(), String> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\n      reply: {r:?}", errs.join("; ")))
    }
}

/// The four checks of a rejected request: exact status, connection closed, zero bytes
/// upstream, and the proxy still serves a good request (and only that reaches the upstream).
pub fn check_reject(up: &Upstream, px: &Proxy, req: &[u8], want: u16) -> Result<(), String> {
    let r = exchange(px.addr, req);
    let mut errs = Vec::new();
    if !r.closed {
        errs.push("connection not closed after the reject".into());
    }
    nothing_went_upstream(up, px, &r, want, errs)
}

/// A request the policy refuses (403): status, nothing upstream, the proxy still serves.
pub fn check_denied(up: &Upstream, px: &Proxy, req: &[u8], want: u16) -> Result<(), String> {
    let r = exchange_quick(px.addr, req);
    std::thread::sleep(Duration::from_millis(20));
    nothing_went_upstream(up, px, &r, want, Vec::new())
}

/// The checks both kinds of refusal share: the status, zero bytes upstream, and a good
/// request served afterwards.
fn nothing_went_upstream(
    up: &Upstream,
    px: &Proxy,
    r: &Reply,
    want: u16,
    mut errs: Vec<String>,
) -> Result<(), String> {
    if r.status != want {
        errs.insert(0, format!("status {} (want {want})", r.status));
    }
    let got = up.bytes();
    if !got.is_empty() {
        errs.push(format!(
            "{} bytes reached the upstream: {}",
            got.len(),
            show_n(&got, 300)
        ));
    }
    if let Err(e) = still_serves(up, px, got.len()) {
        errs.push(e);
    }
    finish(errs, r)
}

// ---------------------------------------------------------------------------------------
// Tables

pub type RowFn = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// Runs the rows of a table in parallel (8 at a time), each with its own proxy and upstream,
/// and fails naming every row that failed. `EDGE_ROW=substring` runs only matching rows.
pub fn run_table(table: &str, rows: Vec<(&'static str, RowFn)>) {
    let filter = std::env::var("EDGE_ROW").ok();
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|(n, _)| filter.as_deref().is_none_or(|f| n.contains(f)))
        .collect();
    let mut results: Vec<(&'static str, Result<(), String>, Duration)> = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let batch: Vec<_> = rows.by_ref().take(8).collect();
        std::thread::scope(|sc| {
            let hs: Vec<_> = batch
                .into_iter()
                .map(|(name, f)| {
                    (
                        name,
                        sc.spawn(move || {
                            let t0 = Instant::now();
                            (f(), t0.elapsed())
                        }),
                    )
                })
                .collect();
            for (name, h) in hs {
                match h.join() {
                    Ok((r, d)) => results.push((name, r, d)),
                    Err(p) => {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        results.push((name, Err(format!("panicked: {msg}")), Duration::ZERO))
                    }
                }
            }
        });
    }
    let mut failed = Vec::new();
    for (name, r, d) in &results {
        match r {
            Ok(()) => println!("[edge] {table}::{name}: PASS ({d:.2?})"),
            Err(e) => {
                println!("[edge] {table}::{name}: FAIL ({d:.2?}): {e}");
                failed.push(format!("  row `{name}`: {e}"));
            }
        }
    }
    if !failed.is_empty() {
        panic!(
            "{table}: {} of {} rows failed:\n{}",
            failed.len(),
            results.len(),
            failed.join("\n")
        );
    }
}

/// A row that starts an ok upstream and the default policy with `opts`, and runs
/// `check_reject` on `req`.
pub fn reject_row(
    name: &'static str,
    opts: &'static str,
    req: Vec<u8>,
    want: u16,
) -> (&'static str, RowFn) {
    (
        name,
        Box::new(move || {
            let up = Upstream::ok();
            let px = Proxy::default_for(&up, opts);
            check_reject(&up, &px, &req, want)
        }),
    )
}

/// A row the policy itself must refuse (`check_denied`).
pub fn denied_row(name: &'static str, req: Vec<u8>, want: u16) -> (&'static str, RowFn) {
    (
        name,
        Box::new(move || {
            let up = Upstream::ok();
            let px = Proxy::default_for(&up, "{}");
            check_denied(&up, &px, &req, want)
        }),
    )
}

/// Tiny deterministic PRNG (xorshift64*) for test bodies.
pub fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}
