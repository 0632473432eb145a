//! `log_format` parsed once into text and variables, and rendered into a line per request.

use super::{Facts, Upstream, COMBINED, ROUTER};
use crate::h1::headers::Headers;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One variable of a format.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Var {
    RemoteAddr,
    RemotePort,
    RemoteUser,
    TimeLocal,
    TimeIso8601,
    Msec,
    Request,
    RequestMethod,
    RequestUri,
    Uri,
    Args,
    IsArgs,
    ServerProtocol,
    Host,
    Status,
    BodyBytesSent,
    BytesSent,
    RequestLength,
    RequestTime,
    UpstreamAddr,
    UpstreamStatus,
    UpstreamConnectTime,
    UpstreamHeaderTime,
    UpstreamResponseTime,
    RequestId,
    Pid,
    Connection,
    ConnectionRequests,
    /// A request field; the name lowercased, `-` spelled `_` (as nginx compares it).
    Http(Box<[u8]>),
    /// A response field, named the same way.
    SentHttp(Box<[u8]>),
    /// An index into `Format::ctx` (and `Facts::ctx`).
    Ctx(usize),
}

/// The built-in variables by name; `http_`, `sent_http_` and `ctx_` names are prefixes.
pub(super) const BUILTIN: &[(&str, Var)] = &[
    ("remote_addr", Var::RemoteAddr),
    ("remote_port", Var::RemotePort),
    ("remote_user", Var::RemoteUser),
    ("time_local", Var::TimeLocal),
    ("time_iso8601", Var::TimeIso8601),
    ("msec", Var::Msec),
    ("request", Var::Request),
    ("request_method", Var::RequestMethod),
    ("request_uri", Var::RequestUri),
    ("uri", Var::Uri),
    ("document_uri", Var::Uri),
    ("args", Var::Args),
    ("query_string", Var::Args),
    ("is_args", Var::IsArgs),
    ("server_protocol", Var::ServerProtocol),
    ("host", Var::Host),
    ("status", Var::Status),
    ("body_bytes_sent", Var::BodyBytesSent),
    ("bytes_sent", Var::BytesSent),
    ("request_length", Var::RequestLength),
    ("request_time", Var::RequestTime),
    ("upstream_addr", Var::UpstreamAddr),
    ("upstream_status", Var::UpstreamStatus),
    ("upstream_connect_time", Var::UpstreamConnectTime),
    ("upstream_header_time", Var::UpstreamHeaderTime),
    ("upstream_response_time", Var::UpstreamResponseTime),
    ("request_id", Var::RequestId),
    ("pid", Var::Pid),
    ("connection", Var::Connection),
    ("connection_requests", Var::ConnectionRequests),
];

#[derive(Clone, Debug, PartialEq)]
enum Seg {
    /// Format text, written as is (nginx escapes only variables' values).
    Lit(Box<[u8]>),
    Var(Var),
}

/// A `log_format` parsed once into text and variables; [`Format::render`] writes a line.
#[derive(Clone, Debug)]
pub struct Format {
    source: String,
    segs: Vec<Seg>,
    ctx: Vec<String>,
}

impl PartialEq for Format {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Default for Format {
    /// nginx's `combined`.
    fn default() -> Self {
        Format::parse(COMBINED).expect("COMBINED parses")
    }
}

fn name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

impl Format {
    /// Parses nginx's `log_format` syntax: text with `$name` and `${name}` variables (names
    /// are letters, digits and `_`, matched case-insensitively except a `$ctx_NAME`'s NAME,
    /// a Lua key). An unknown variable is an error naming it, here rather than at log time.
    /// `"combined"` and `"router"` stand for [`COMBINED`] and [`ROUTER`] (text with no
    /// variable at all would be a useless log).
    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "combined" => return Format::parse(COMBINED),
            "router" => return Format::parse(ROUTER),
            "" => return Err("empty format".into()),
            _ => {}
        }
        let b = s.as_bytes();
        let mut segs = Vec::new();
        let mut ctx: Vec<String> = Vec::new();
        let mut lit = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'$' {
                lit.push(b[i]);
                i += 1;
                continue;
            }
            let braced = b.get(i + 1) == Some(&b'{');
            let start = i + 1 + usize::from(braced);
            let mut end = start;
            while end < b.len() && name_char(b[end]) {
                end += 1;
            }
            let name = &s[start..end];
            if name.is_empty() {
                return Err(format!(
                    "'$' without a variable name at byte {} of the format",
                    i + 1
                ));
            }
            let shown = if braced {
                if b.get(end) != Some(&b'}') {
                    return Err(format!("missing '}}' after '${{{name}'"));
                }
                end += 1;
                format!("${{{name}}}")
            } else {
                format!("${name}")
            };
            let var = Format::variable(name, &mut ctx)
                .ok_or_else(|| format!("unknown variable '{shown}'"))?;
            if !lit.is_empty() {
                segs.push(Seg::Lit(std::mem::take(&mut lit).into()));
            }
            segs.push(Seg::Var(var));
            i = end;
        }
        if !lit.is_empty() {
            segs.push(Seg::Lit(lit.into()));
        }
        Ok(Format {
            source: s.to_string(),
            segs,
            ctx,
        })
    }

    fn variable(name: &str, ctx: &mut Vec<String>) -> Option<Var> {
        let lower = name.to_ascii_lowercase();
        if let Some((_, v)) = BUILTIN.iter().find(|(n, _)| *n == lower) {
            return Some(v.clone());
        }
        let field = |rest: &str| -> Option<Box<[u8]>> {
            (!rest.is_empty()).then(|| rest.as_bytes().into())
        };
        if let Some(rest) = lower.strip_prefix("sent_http_") {
            return field(rest).map(Var::SentHttp);
        }
        if let Some(rest) = lower.strip_prefix("http_") {
            return field(rest).map(Var::Http);
        }
        // nginx's $content_length / $content_type are the request's fields.
        if lower == "content_length" || lower == "content_type" {
            return Some(Var::Http(lower.as_bytes().into()));
        }
        if lower.starts_with("ctx_") && name.len() > 4 {
            // The Lua key keeps its case.
            let key = &name[4..];
            let i = match ctx.iter().position(|k| k == key) {
                Some(i) => i,
                None => {
                    ctx.push(key.to_string());
                    ctx.len() - 1
                }
            };
            return Some(Var::Ctx(i));
        }
        None
    }

    /// The format as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `ctx` keys the format uses (each once, in order of first use): the caller reads
    /// only these from the request's `ctx` table, into [`CtxValues`] in this order.
    pub fn ctx_names(&self) -> &[String] {
        &self.ctx
    }

    /// True when a variable reads the request's fields (`$http_*`, `$remote_user`, `$host`).
    pub fn uses_request_headers(&self) -> bool {
        self.segs
            .iter()
            .any(|s| matches!(s, Seg::Var(Var::Http(_) | Var::RemoteUser | Var::Host)))
    }

    /// True when the format uses the built-in variable `name` (without `$`, as
    /// `"request_id"`): for values that cost something to gather, such as a request id made
    /// on first use.
    pub fn uses(&self, name: &str) -> bool {
        let Some((_, var)) = BUILTIN.iter().find(|(n, _)| *n == name) else {
            return false;
        };
        self.segs
            .iter()
            .any(|s| matches!(s, Seg::Var(v) if v == var))
    }

    /// True when a variable reads the response's fields (`$sent_http_*`).
    pub fn uses_response_headers(&self) -> bool {
        self.segs
            .iter()
            .any(|s| matches!(s, Seg::Var(Var::SentHttp(_))))
    }

    /// Appends one line (ending in `\n`) for `f` to `out`. Values are escaped as nginx's
    /// `escape=default`: `"`, `\`, bytes below 0x20 and from 0x7f up become `\xHH`; a value
    /// that is absent prints `-`.
    pub fn render(&self, f: &Facts, out: &mut Vec<u8>) {
        let mut cached = None;
        for seg in &self.segs {
            match seg {
                Seg::Lit(t) => out.extend_from_slice(t),
                Seg::Var(v) => put_var(v, f, &mut cached, out),
            }
        }
        out.push(b'\n');
    }
}

/// The civil UTC time of `Facts::time`, worked out once per line.
#[derive(Clone, Copy)]
struct Clock {
    secs: u64,
    millis: u32,
    y: i64,
    mon: u32,
    d: u32,
}

impl Clock {
    fn of(t: SystemTime) -> Clock {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        // Civil-from-days (Howard Hinnant's algorithm), as log::timestamp.
        let z = (secs / 86_400) as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let mon = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = yoe + era * 400 + i64::from(mon <= 2);
        Clock {
            secs,
            millis: since.subsec_millis(),
            y,
            mon,
            d,
        }
    }
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut b = [0u8; 20];
    let mut i = b.len();
    loop {
        i -= 1;
        b[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&b[i..]);
}

/// `n` in exactly `width` digits (zero-padded; `n` must fit).
fn put_fixed(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut b = [b'0'; 8];
    let mut n = n;
    for i in (0..width).rev() {
        b[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&b[..width]);
}

/// Seconds with milliseconds, `1.234`, as nginx's `%T.%03M`.
fn put_secs(out: &mut Vec<u8>, d: Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    put_u64(out, ms / 1000);
    out.push(b'.');
    put_fixed(out, ms % 1000, 3);
}

fn needs_escape(b: u8) -> bool {
    // `|`, not `||`: no branches, so the scan over a whole value vectorizes.
    (b < 0x20) | (b == b'"') | (b == b'\\') | (b >= 0x7f)
}

/// nginx's `escape=default`.
fn put_escaped(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    // Almost every value has nothing to escape: one scan, one copy (the byte-by-byte loop
    // below was a quarter of a line's cost).
    if !s.iter().fold(false, |any, &b| any | needs_escape(b)) {
        out.extend_from_slice(s);
        return;
    }
    let mut from = 0;
    for (i, &b) in s.iter().enumerate() {
        if needs_escape(b) {
            out.extend_from_slice(&s[from..i]);
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]);
            from = i + 1;
        }
    }
    out.extend_from_slice(&s[from..]);
}

fn put_or_dash(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => put_escaped(out, s),
        None => out.push(b'-'),
    }
}

/// A field name as `$http_NAME` spells it: lowercase, `-` as `_`.
fn name_is(field: &[u8], var: &[u8]) -> bool {
    field.len() == var.len()
        && field.iter().zip(var).all(|(&a, &b)| {
            let a = if a == b'-' {
                b'_'
            } else {
                a.to_ascii_lowercase()
            };
            a == b
        })
}

/// Every field named `var`, joined as nginx (1.23+) joins repeated fields: `"; "` for
/// Cookie, `", "` for the rest; `-` when there is none.
fn put_field(out: &mut Vec<u8>, h: Option<&Headers>, var: &[u8]) {
    let sep: &[u8] = if var == b"cookie" { b"; " } else { b", " };
    let mut found = false;
    for (n, v) in h.into_iter().flat_map(|h| h.iter()) {
        if name_is(n, var) {
            if found {
                out.extend_from_slice(sep);
            }
            put_escaped(out, v);
            found = true;
        }
    }
    if !found {
        out.push(b'-');
    }
}

/// The user name of `Authorization: Basic ...` (nginx's `$remote_user`).
fn basic_user(h: Option<&Headers>) -> Option<Vec<u8>> {
    let v = h?.get(b"authorization")?;
    if v.len() < 6 || !v[..6].eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let b64 = v[6..].trim_ascii();
    let mut out = Vec::with_capacity(b64.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in b64.iter().take_while(|&&c| c != b'=') {
        let d = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(d);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // nginx: no user when there is no ':' or nothing before it.
    let user = out.iter().position(|&c| c == b':').filter(|&n| n > 0)?;
    out.truncate(user);
    Some(out)
}

/// `$host`: the Host field without its port (or trailing dot), lowercased.
fn put_host(out: &mut Vec<u8>, h: Option<&Headers>) {
    let Some(v) = h.and_then(|h| h.get(b"host")) else {
        out.push(b'-');
        return;
    };
    let end = if v.first() == Some(&b'[') {
        v.iter().position(|&c| c == b']').map_or(v.len(), |i| i + 1)
    } else {
        v.iter().position(|&c| c == b':').unwrap_or(v.len())
    };
    let host = &v[..end];
    let host = host.strip_suffix(b".").unwrap_or(host);
    for &c in host {
        // Lowercased before escaping, so an escape's hex digits stay uppercase.
        put_escaped(out, &[c.to_ascii_lowercase()]);
    }
}

/// `HH:MM:SS` of `s` seconds into the day.
fn put_hms(out: &mut Vec<u8>, s: u64) {
    put_fixed(out, s / 3600, 2);
    out.push(b':');
    put_fixed(out, s / 60 % 60, 2);
    out.push(b':');
    put_fixed(out, s % 60, 2);
}

/// One `$upstream_*` value per attempt, joined by `", "`; `-` with no attempts.
fn put_upstreams(out: &mut Vec<u8>, ups: &[Upstream], each: impl Fn(&mut Vec<u8>, &Upstream)) {
    if ups.is_empty() {
        out.push(b'-');
    }
    for (i, u) in ups.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        each(out, u);
    }
}

fn put_opt_secs(out: &mut Vec<u8>, d: Option<Duration>) {
    match d {
        Some(d) => put_secs(out, d),
        None => out.push(b'-'),
    }
}

fn pid() -> u32 {
    // getpid is a system call; the process never forks after loading us.
    static PID: OnceLock<u32> = OnceLock::new();
    *PID.get_or_init(std::process::id)
}

fn put_var(v: &Var, f: &Facts, cached: &mut Option<Clock>, out: &mut Vec<u8>) {
    // Worked out on the first time variable of the line only.
    let mut clock = || *cached.get_or_insert_with(|| Clock::of(f.time));
    match v {
        Var::RemoteAddr => put_escaped(out, f.remote_addr.as_bytes()),
        Var::RemotePort => put_u64(out, f.remote_port.into()),
        Var::RemoteUser => put_or_dash(out, basic_user(f.request_headers).as_deref()),
        Var::TimeLocal => {
            // 01/Dec/2026:17:05:03 +0000
            let c = clock();
            let s = c.secs % 86_400;
            put_fixed(out, c.d.into(), 2);
            out.push(b'/');
            out.extend_from_slice(MONTHS[(c.mon - 1) as usize]);
            out.push(b'/');
            put_fixed(out, c.y as u64, 4);
            out.push(b':');
            put_hms(out, s);
            out.extend_from_slice(b" +0000");
        }
        Var::TimeIso8601 => {
            // 2026-12-01T17:05:03+00:00
            let c = clock();
            let s = c.secs % 86_400;
            put_fixed(out, c.y as u64, 4);
            out.push(b'-');
            put_fixed(out, c.mon.into(), 2);
            out.push(b'-');
            put_fixed(out, c.d.into(), 2);
            out.push(b'T');
            put_hms(out, s);
            out.extend_from_slice(b"+00:00");
        }
        Var::Msec => {
            let c = clock();
            put_u64(out, c.secs);
            out.push(b'.');
            put_fixed(out, c.millis.into(), 3);
        }
        // A head rejected before its request line was parsed has none.
        Var::Request if f.method.is_empty() => out.push(b'-'),
        Var::Request => {
            put_escaped(out, f.method.as_bytes());
            out.push(b' ');
            put_escaped(out, f.request_uri.as_bytes());
            out.push(b' ');
            put_escaped(out, f.protocol.as_bytes());
        }
        Var::RequestMethod => put_escaped(out, f.method.as_bytes()),
        Var::RequestUri => put_escaped(out, f.request_uri.as_bytes()),
        Var::Uri => put_escaped(out, f.uri.as_bytes()),
        Var::Args => put_or_dash(
            out,
            f.request_uri.split_once('?').map(|(_, q)| q.as_bytes()),
        ),
        Var::IsArgs => {
            if f.request_uri.contains('?') {
                out.push(b'?');
            }
        }
        Var::ServerProtocol => put_escaped(out, f.protocol.as_bytes()),
        Var::Host => put_host(out, f.request_headers),
        Var::Status => put_fixed(out, f.status.min(999).into(), 3),
        Var::BodyBytesSent => put_u64(out, f.body_bytes_sent),
        Var::BytesSent => put_u64(out, f.bytes_sent),
        Var::RequestLength => put_u64(out, f.request_length),
        Var::RequestTime => put_secs(out, f.request_time),
        Var::UpstreamAddr => {
            put_upstreams(out, f.upstreams, |o, u| put_escaped(o, u.addr.as_bytes()))
        }
        Var::UpstreamStatus => put_upstreams(out, f.upstreams, |o, u| match u.status {
            Some(s) => put_u64(o, s.into()),
            None => o.push(b'-'),
        }),
        Var::UpstreamConnectTime => {
            put_upstreams(out, f.upstreams, |o, u| put_opt_secs(o, u.connect_time))
        }
        Var::UpstreamHeaderTime => {
            put_upstreams(out, f.upstreams, |o, u| put_opt_secs(o, u.header_time))
        }
        Var::UpstreamResponseTime => {
            put_upstreams(out, f.upstreams, |o, u| put_opt_secs(o, u.response_time))
        }
        Var::RequestId => put_escaped(out, f.request_id.as_bytes()),
        Var::Pid => put_u64(out, pid().into()),
        Var::Connection => put_u64(out, f.connection),
        Var::ConnectionRequests => put_u64(out, f.connection_requests),
        Var::Http(name) => put_field(out, f.request_headers, name),
        Var::SentHttp(name) => put_field(out, f.response_headers, name),
        Var::Ctx(i) => put_or_dash(out, f.ctx.get(*i)),
    }
}
