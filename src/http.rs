//! HTTP rules that hyper leaves to us: request validation, hop-by-hop headers, query strings.
//! Plain Rust with no Lua in sight, so `cargo test` covers all of it.

use crate::headers::Headers;
use hyper::{Method, StatusCode, Version};

/// Limits applied to every request before the policy sees it.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request body bytes; 0 = unlimited. Over it: 413.
    pub max_body: u64,
    /// Request line plus all header lines, in bytes. Over it: 431.
    pub max_head: usize,
    /// Seconds of silence allowed between two body reads. Over it: 408.
    pub body_timeout: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 1024 * 1024,
            max_head: 32 * 1024,
            body_timeout: 60.0,
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
                    self.connection_close |= t.eq_ignore_ascii_case(b"close");
                    self.connection_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
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

/// What forwarding a request needs from its header fields, read in one pass over them.
#[derive(Debug, Default, PartialEq)]
pub struct Forwarding<'a> {
    /// The request names a Host.
    pub has_host: bool,
    /// The headers `Connection` names (to be dropped with it), never Host or Content-Length:
    /// framing is ours to decide. The usual tokens (`keep-alive`, `close`) name nothing.
    pub named: Vec<&'a [u8]>,
    /// The `X-Forwarded-For` value to send: the client's own list with `client_ip`
    /// appended, or just the address.
    pub xff: Vec<u8>,
}

pub fn forwarding<'a>(headers: &'a Headers, client_ip: &str) -> Forwarding<'a> {
    let mut f = Forwarding {
        xff: Vec::with_capacity(client_ip.len() + 32),
        ..Default::default()
    };
    for (name, v) in headers.iter() {
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => f.has_host = true,
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for t in v.split(|&c| c == b',') {
                    let t = t.trim_ascii();
                    if !(t.is_empty()
                        || t.eq_ignore_ascii_case(b"keep-alive")
                        || t.eq_ignore_ascii_case(b"close")
                        || t.eq_ignore_ascii_case(b"host")
                        || t.eq_ignore_ascii_case(b"content-length"))
                    {
                        f.named.push(t);
                    }
                }
            }
            15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                let v = v.trim_ascii();
                if !v.is_empty() {
                    f.xff.extend_from_slice(v);
                    f.xff.extend_from_slice(b", ");
                }
            }
            _ => {}
        }
    }
    f.xff.extend_from_slice(client_ip.as_bytes());
    f
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
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
    fn forwarding_reads_connection_host_and_xff_in_one_pass() {
        let mut h = Headers::default();
        let f = forwarding(&h, "127.0.0.1");
        assert_eq!((f.has_host, f.named.len()), (false, 0));
        assert_eq!(f.xff, b"127.0.0.1");
        let m = h.map_mut();
        m.insert(
            "connection",
            HeaderValue::from_static("x-secret, host, keep-alive, close, Content-Length"),
        );
        m.insert("host", HeaderValue::from_static("a"));
        m.append("x-forwarded-for", HeaderValue::from_static(" 10.0.0.1 "));
        m.append("x-forwarded-for", HeaderValue::from_static(""));
        m.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        let f = forwarding(&h, "127.0.0.2");
        assert!(f.has_host);
        assert_eq!(f.named, vec![&b"x-secret"[..]]);
        assert_eq!(f.xff, b"10.0.0.1, 10.0.0.2, 127.0.0.2");
        assert!(is_hop_by_hop(b"Connection") && is_hop_by_hop(b"te"));
        assert!(is_hop_by_hop(b"keep-alive") && is_hop_by_hop(b"Transfer-Encoding"));
        assert!(!is_hop_by_hop(b"host") && !is_hop_by_hop(b"x-connection"));
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
