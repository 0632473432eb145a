//! HTTP rules that hyper leaves to us: request validation, hop-by-hop headers, query strings.
//! Plain Rust with no Lua in sight, so `cargo test` covers all of it.

use super::headers::Headers;
use hyper::{Method, StatusCode, Version};
use std::time::Duration;

/// The most header fields a request may have (`max_headers`): the parser's array holds this.
pub const MAX_HEADERS_CAP: usize = 1024;

/// What every request of a server carries: the limits applied before the policy sees it
/// and the defaults its upstream exchanges use (`settings.rs` fills it from nginx-named
/// settings).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request body bytes on the wire; 0 = unlimited. Over it: 413.
    pub max_body: u64,
    /// Request line plus all header lines, in bytes. Over it: 431.
    pub max_head: usize,
    /// The request line (414 past it) or one header field (431).
    pub max_line: usize,
    /// Header fields in a request. Over it: 431.
    pub max_headers: usize,
    /// Silence allowed between two body reads. Over it: 408.
    pub body_timeout: Duration,
    /// Header fields whose names hold `_` are kept (nginx's `underscores_in_headers`);
    /// otherwise they are dropped as the head is read: `X_Real_IP` must not pass for
    /// `X-Real-IP` behind a server that maps both to one name.
    pub underscores_in_headers: bool,
    /// Clients whose `Forwarded`/`X-Forwarded-Host`/`X-Forwarded-Proto` are believed.
    pub trusted_ips: Vec<Cidr>,
    /// `req:proxy` defaults (per-call options win).
    pub proxy_connect_timeout: Duration,
    pub proxy_read_timeout: Duration,
    pub proxy_send_timeout: Duration,
    /// Idle upstream connections kept per upstream and worker, and for how long.
    pub upstream_keepalive: usize,
    pub upstream_keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 1024 * 1024,
            max_head: 32 * 1024,
            max_line: 8 * 1024,
            max_headers: 100,
            body_timeout: Duration::from_secs(60),
            underscores_in_headers: false,
            trusted_ips: Vec::new(),
            proxy_connect_timeout: Duration::from_secs(5),
            proxy_read_timeout: Duration::from_secs(60),
            proxy_send_timeout: Duration::from_secs(60),
            upstream_keepalive: 64,
            upstream_keepalive_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a request was refused before reaching the policy.
#[derive(Debug, PartialEq, Eq)]
pub struct Reject {
    pub status: StatusCode,
    pub reason: &'static str,
}

fn reject(status: StatusCode, reason: &'static str) -> Reject {
    Reject { status, reason }
}

/// What the checks and the framing need from a request's header lines, noted in the one pass
/// that builds the header map (no lookups afterwards).
#[derive(Default, Debug)]
pub struct HeadFacts<'a> {
    pub hosts: usize,
    pub host: &'a [u8],
    pub content_lengths: usize,
    pub content_length: Option<&'a [u8]>,
    pub transfer_encodings: usize,
    pub transfer_encoding: &'a [u8],
    pub connection_close: bool,
    pub connection_keep_alive: bool,
    pub expect_continue: bool,
    /// Field names `Connection` lists besides keep-alive and close (never Host or framing
    /// ones, which are ours to decide): those fields are the client's hop-by-hop ones.
    pub connection_named: Vec<&'a [u8]>,
    /// The declared body length once `finish` ran: `Some(Err)` when it is not a plain decimal
    /// number.
    pub length: Option<Result<u64, ()>>,
}

impl<'a> HeadFacts<'a> {
    pub fn note(&mut self, name: &[u8], value: &'a [u8]) {
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                self.hosts += 1;
                self.host = value;
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                self.content_lengths += 1;
                self.content_length = Some(value);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                self.transfer_encodings += 1;
                self.transfer_encoding = value;
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for t in value.split(|&c| c == b',').map(<[u8]>::trim_ascii) {
                    if t.eq_ignore_ascii_case(b"close") {
                        self.connection_close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        self.connection_keep_alive = true;
                    } else if !(t.is_empty()
                        || t.eq_ignore_ascii_case(b"host")
                        || t.eq_ignore_ascii_case(b"content-length")
                        || t.eq_ignore_ascii_case(b"transfer-encoding"))
                    {
                        self.connection_named.push(t);
                    }
                }
            }
            6 if name.eq_ignore_ascii_case(b"expect") => {
                self.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
    }

    /// Reads the declared length, after the last `note`.
    pub fn finish(&mut self) {
        self.length = self.content_length.map(|b| {
            let b = b.trim_ascii();
            if b.is_empty() || b.len() > 18 || !b.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            Ok(b.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
        });
    }
}

/// Checks what a proxy must not forward (see docs/architecture.md). The head's size limit is
/// checked by the parser, on the bytes as they came.
pub fn validate_request(
    method: &Method,
    uri: &hyper::Uri,
    version: Version,
    facts: &HeadFacts,
    limits: &Limits,
) -> Result<(), Reject> {
    if *method == Method::TRACE || *method == Method::CONNECT {
        return Err(reject(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"));
    }
    let path = uri.path();
    if !(path.starts_with('/') || path == "*" && *method == Method::OPTIONS) {
        return Err(reject(StatusCode::BAD_REQUEST, "bad request target"));
    }
    match facts.hosts {
        0 if version == Version::HTTP_11 => {
            return Err(reject(StatusCode::BAD_REQUEST, "missing host header"));
        }
        0 => {}
        1 if !valid_host(facts.host) => {
            return Err(reject(StatusCode::BAD_REQUEST, "invalid host header"));
        }
        1 => {}
        _ => return Err(reject(StatusCode::BAD_REQUEST, "duplicate host header")),
    }
    if facts.content_lengths > 1 {
        return Err(reject(StatusCode::BAD_REQUEST, "duplicate content-length"));
    }
    if facts.transfer_encodings > 1 {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "duplicate transfer-encoding",
        ));
    }
    if facts.transfer_encodings == 1
        && !facts
            .transfer_encoding
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
    {
        return Err(reject(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported transfer-encoding",
        ));
    }
    if facts.transfer_encodings == 1 && facts.content_lengths == 1 {
        // Request smuggling territory: refuse rather than pick one (nginx does the same).
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "both content-length and transfer-encoding",
        ));
    }
    if facts.transfer_encodings == 1 && version == Version::HTTP_10 {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "transfer-encoding in an http/1.0 request",
        ));
    }
    match facts.length {
        Some(Err(())) => return Err(reject(StatusCode::BAD_REQUEST, "invalid content-length")),
        Some(Ok(n)) if limits.max_body > 0 && n > limits.max_body => {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            ));
        }
        _ => {}
    }
    Ok(())
}

/// `host[:port]` with a reg-name, IPv4 or bracketed IPv6 host (RFC 9110 §7.2, RFC 3986).
pub fn valid_host(h: &[u8]) -> bool {
    if h.is_empty() || h.len() > 255 {
        return false;
    }
    let (host, port) = if h[0] == b'[' {
        match h.iter().position(|&c| c == b']') {
            Some(end) => {
                let inner = &h[1..end];
                if inner.is_empty()
                    || !inner
                        .iter()
                        .all(|c| c.is_ascii_hexdigit() || *c == b':' || *c == b'.')
                {
                    return false;
                }
                (&h[..=end], &h[end + 1..])
            }
            None => return false,
        }
    } else {
        match h.iter().position(|&c| c == b':') {
            Some(i) => (&h[..i], &h[i..]),
            None => (h, &h[h.len()..]),
        }
    };
    if host.is_empty() {
        return false;
    }
    if host[0] != b'['
        && !host
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(c))
    {
        return false;
    }
    match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// The fixed hop-by-hop header names (RFC 9110 §7.6.1), case-insensitively. The length
/// picks the candidates, so most names cost one compare.
pub fn is_hop_by_hop(n: &[u8]) -> bool {
    match n.len() {
        2 => n.eq_ignore_ascii_case(b"te"),
        7 => n.eq_ignore_ascii_case(b"trailer") || n.eq_ignore_ascii_case(b"upgrade"),
        10 => n.eq_ignore_ascii_case(b"connection") || n.eq_ignore_ascii_case(b"keep-alive"),
        16 => n.eq_ignore_ascii_case(b"proxy-connection"),
        17 => n.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => false,
    }
}

/// What forwarding a request needs from its header fields, read in one pass over them. The
/// values to send are given as parts the encoder copies straight into the head: no value is
/// built separately unless the client sent one to extend.
#[derive(Debug, Default, PartialEq)]
pub struct Forwarding<'a> {
    /// The Host value, if the request names one (for `X-Forwarded-Host` and `Forwarded`).
    pub host: Option<&'a [u8]>,
    /// The client's own `X-Forwarded-For` list followed by `", "` (empty when it sent none):
    /// the client IP is appended to it (nginx's `$proxy_add_x_forwarded_for`: the last entry
    /// is the one to trust).
    pub xff_prefix: Vec<u8>,
    /// A trusted client's own `Forwarded` elements followed by `", "` (else empty).
    pub forwarded_prefix: Vec<u8>,
    /// A trusted client's `X-Forwarded-Proto`/`-Host` are kept (else ours replace them).
    pub keep_proto: bool,
    pub keep_host: bool,
}

/// Reads what forwarding needs. `trusted`: the client is a proxy whose `Forwarded` and
/// `X-Forwarded-Host/-Proto` are believed (`trusted_ips`); anyone else's are replaced.
pub fn forwarding<'a>(headers: &'a Headers, trusted: bool) -> Forwarding<'a> {
    let mut f = Forwarding::default();
    for (name, v) in headers.iter() {
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => f.host = Some(v),
            9 if trusted && name.eq_ignore_ascii_case(b"forwarded") => {
                let v = v.trim_ascii();
                if !v.is_empty() {
                    f.forwarded_prefix.extend_from_slice(v);
                    f.forwarded_prefix.extend_from_slice(b", ");
                }
            }
            15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                let v = v.trim_ascii();
                if !v.is_empty() {
                    f.xff_prefix.extend_from_slice(v);
                    f.xff_prefix.extend_from_slice(b", ");
                }
            }
            16 if trusted && name.eq_ignore_ascii_case(b"x-forwarded-host") => f.keep_host = true,
            17 if trusted && name.eq_ignore_ascii_case(b"x-forwarded-proto") => f.keep_proto = true,
            _ => {}
        }
    }
    f
}

impl<'a> Forwarding<'a> {
    /// Our `Forwarded` value, `for=IP;host="HOST";proto=http` (RFC 7239; an IPv6 address and
    /// the host quoted), after a trusted client's own elements, as parts.
    pub fn forwarded_parts(&'a self, client_ip: &'a str) -> [&'a [u8]; 8] {
        let v6 = client_ip.contains(':');
        let host = self
            .host
            .filter(|h| h.iter().all(|&c| c != b'"' && c != b'\\'));
        [
            &self.forwarded_prefix,
            if v6 { b"for=\"[" } else { b"for=" },
            client_ip.as_bytes(),
            if v6 { b"]\"" } else { b"" },
            if host.is_some() { b";host=\"" } else { b"" },
            host.unwrap_or_default(),
            if host.is_some() { b"\"" } else { b"" },
            b";proto=http",
        ]
    }
}

/// An address block (`10.0.0.0/8`, `::1`, `127.0.0.1`): `trusted_ips`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let net: std::net::IpAddr = addr.trim_matches(|c| c == '[' || c == ']').parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Cidr { net, bits })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        let ip = match ip {
            V6(v6) if self.net.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => V4(v4),
                None => return false,
            },
            ip => ip,
        };
        let (a, b, width) = match (self.net, ip) {
            (V4(n), V4(i)) => (u128::from(u32::from(n)), u128::from(u32::from(i)), 32),
            (V6(n), V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = width - u32::from(self.bits);
        shift >= width || (a >> shift) == (b >> shift)
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Why a request path cannot be normalized (each a 400).
pub const BAD_ESCAPE: &str = "bad percent-encoding in path";
pub const ENCODED_NUL: &str = "encoded nul in path";
pub const ABOVE_ROOT: &str = "path above the root";

/// The path a policy matches on, as nginx's `$uri` is made from `$request_uri`: `%XX`
/// escapes decoded (`%2F` too: nginx matches locations on it), `.` and `..` segments
/// resolved, runs of `/` merged. `Ok(None)` when `path` is already in that form (the usual
/// case, found in one scan). A path that climbs above the root, a bad escape or an encoded
/// NUL is refused: what such a path means depends on who decodes it, and a policy's
/// prefix rules must not be passed by spelling a path another way (`/%61dmin`, `//admin`,
/// `/x/../admin`).
pub fn normalize_path(path: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    let plain = !path.contains(&b'%')
        && !path
            .windows(2)
            .any(|w| w[0] == b'/' && (w[1] == b'/' || w[1] == b'.'));
    if plain {
        return Ok(None);
    }
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' {
            let h = |j: usize| path.get(j).copied().and_then(hex);
            let (Some(a), Some(b)) = (h(i + 1), h(i + 2)) else {
                return Err(BAD_ESCAPE);
            };
            let c = a * 16 + b;
            if c == 0 {
                return Err(ENCODED_NUL);
            }
            decoded.push(c);
            i += 3;
        } else {
            decoded.push(path[i]);
            i += 1;
        }
    }
    let mut segs: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split(|&c| c == b'/').skip(1) {
        trailing = true;
        match seg {
            b"" | b"." => {}
            b".." => {
                if segs.pop().is_none() {
                    return Err(ABOVE_ROOT);
                }
            }
            s => {
                segs.push(s);
                trailing = false;
            }
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for s in &segs {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if trailing || segs.is_empty() {
        out.push(b'/');
    }
    Ok(if out == path { None } else { Some(out) })
}

/// Decodes `%XX` escapes and `+` as space; invalid escapes stay as they are (like ngx).
pub fn url_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(a), Some(b)) => {
                    out.push(a * 16 + b);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// Splits `a=1&b&c=x%20y` into decoded pairs; a key with no `=` has no value (`b` -> None).
pub fn parse_query(q: &[u8]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    q.split(|&c| c == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|&c| c == b'=') {
            Some(i) => (url_decode(&p[..i]), Some(url_decode(&p[i + 1..]))),
            None => (url_decode(p), None),
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Result<(), Reject> {
        let mut facts = HeadFacts::default();
        for (k, v) in headers {
            facts.note(k.as_bytes(), v.as_bytes());
        }
        facts.finish();
        validate_request(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            &uri.parse().unwrap(),
            Version::HTTP_11,
            &facts,
            &Limits::default(),
        )
    }

    #[test]
    fn host_rules() {
        assert!(req("GET", "/", &[("host", "a.example:80")]).is_ok());
        assert_eq!(
            req("GET", "/", &[]).unwrap_err().reason,
            "missing host header"
        );
        assert_eq!(
            req("GET", "/", &[("host", "a"), ("host", "b")])
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert!(req("GET", "/", &[("host", "a b")]).is_err());
        assert!(req("GET", "/", &[("host", "[::1]:8080")]).is_ok());
        assert!(req("GET", "/", &[("host", "x:99999x")]).is_err());
    }

    #[test]
    fn methods_framing_and_sizes() {
        let h = ("host", "x");
        assert_eq!(
            req("TRACE", "/", &[h]).unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            req(
                "POST",
                "/",
                &[h, ("content-length", "5"), ("content-length", "5")]
            )
            .unwrap_err()
            .reason,
            "duplicate content-length"
        );
        assert_eq!(
            req("POST", "/", &[h, ("transfer-encoding", "gzip, chunked")])
                .unwrap_err()
                .status,
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            req("POST", "/", &[h, ("content-length", "2000000")])
                .unwrap_err()
                .status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            req(
                "POST",
                "/",
                &[h, ("content-length", "1"), ("transfer-encoding", "chunked")]
            )
            .unwrap_err()
            .reason,
            "both content-length and transfer-encoding"
        );
        assert_eq!(
            req("POST", "/", &[h, ("content-length", "0x1")])
                .unwrap_err()
                .reason,
            "invalid content-length"
        );
    }

    #[test]
    fn forwarding_reads_host_xff_and_forwarded_in_one_pass() {
        let joined = |f: &Forwarding, ip: &str| f.forwarded_parts(ip).concat();
        let mut h = Headers::default();
        let f = forwarding(&h, false);
        assert!(f.host.is_none() && f.xff_prefix.is_empty());
        assert_eq!(joined(&f, "127.0.0.1"), b"for=127.0.0.1;proto=http");
        let m = h.map_mut();
        m.insert("host", HeaderValue::from_static("a:8080"));
        m.append("x-forwarded-for", HeaderValue::from_static(" 10.0.0.1 "));
        m.append("x-forwarded-for", HeaderValue::from_static(""));
        m.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        m.append("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        m.append("x-forwarded-proto", HeaderValue::from_static("https"));
        let f = forwarding(&h, false);
        assert!(!f.keep_proto && !f.keep_host);
        assert_eq!(f.host, Some(&b"a:8080"[..]));
        assert_eq!(f.xff_prefix, b"10.0.0.1, 10.0.0.2, ");
        assert_eq!(
            joined(&f, "127.0.0.2"),
            b"for=127.0.0.2;host=\"a:8080\";proto=http"
        );
        let f = forwarding(&h, true);
        assert!(f.keep_proto && !f.keep_host);
        assert_eq!(
            joined(&f, "::1"),
            &b"for=6.6.6.6, for=\"[::1]\";host=\"a:8080\";proto=http"[..]
        );
        assert!(is_hop_by_hop(b"Connection") && is_hop_by_hop(b"te"));
        assert!(is_hop_by_hop(b"keep-alive") && is_hop_by_hop(b"Transfer-Encoding"));
        assert!(!is_hop_by_hop(b"host") && !is_hop_by_hop(b"x-connection"));
    }

    #[test]
    fn address_blocks() {
        let c = |s: &str| Cidr::parse(s).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!c("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(c("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(c("::1").contains(ip("::1")));
        assert!(c("fd00::/8").contains(ip("fd12::1")));
        assert!(c("127.0.0.0/8").contains(ip("::ffff:127.0.0.9")));
        assert!(!c("::1").contains(ip("127.0.0.1")));
        for bad in ["10.0.0.0/33", "x", "1.2.3.4/", "::1/129"] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn paths_normalize_like_nginx_uri() {
        let n = |p: &str| {
            normalize_path(p.as_bytes())
                .map(|o| String::from_utf8(o.unwrap_or_else(|| p.as_bytes().to_vec())).unwrap())
        };
        assert_eq!(n("/a/b"), Ok("/a/b".into()));
        assert_eq!(normalize_path(b"/a/b.c/d-e_f~"), Ok(None));
        assert_eq!(n("/%70rivate/x"), Ok("/private/x".into()));
        assert_eq!(n("//private//x"), Ok("/private/x".into()));
        assert_eq!(n("/public/../private/x"), Ok("/private/x".into()));
        assert_eq!(n("/public/./../private/x"), Ok("/private/x".into()));
        assert_eq!(n("/public/%2e%2E/private"), Ok("/private".into()));
        assert_eq!(n("/a%2Fb"), Ok("/a/b".into()));
        assert_eq!(n("/a/b/"), Ok("/a/b/".into()));
        assert_eq!(n("/a/."), Ok("/a/".into()));
        assert_eq!(n("/a/b/.."), Ok("/a/".into()));
        assert_eq!(n("/a/.."), Ok("/".into()));
        assert_eq!(n("/.hidden/x"), Ok("/.hidden/x".into()));
        assert_eq!(n("/..x/y"), Ok("/..x/y".into()));
        assert_eq!(n("/echo/%41/./b//c"), Ok("/echo/A/b/c".into()));
        assert_eq!(n("/../x"), Err(ABOVE_ROOT));
        assert_eq!(n("/%2e%2e/x"), Err(ABOVE_ROOT));
        assert_eq!(n("/a/../../x"), Err(ABOVE_ROOT));
        assert_eq!(n("/a%00b"), Err(ENCODED_NUL));
        assert_eq!(n("/%zz"), Err(BAD_ESCAPE));
        assert_eq!(n("/a%4"), Err(BAD_ESCAPE));
    }

    #[test]
    fn query_parsing() {
        let q = parse_query(b"a=1&b&c=x%20y+z&&=v&d=%zz&e=%4");
        let s: Vec<(String, Option<String>)> = q
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k).unwrap(),
                    v.map(|v| String::from_utf8(v).unwrap()),
                )
            })
            .collect();
        assert_eq!(
            s,
            vec![
                ("a".into(), Some("1".into())),
                ("b".into(), None),
                ("c".into(), Some("x y z".into())),
                ("d".into(), Some("%zz".into())),
                ("e".into(), Some("%4".into())),
            ]
        );
    }
}
