//! HTTP rules that hyper leaves to us: request validation, hop-by-hop headers, query strings.
//! Plain Rust with no Lua in sight, so `cargo test` covers all of it.

use hyper::header::{self, HeaderMap, HeaderName};
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

/// Checks what hyper accepts but a proxy must not forward (see docs/architecture.md).
pub fn validate_request(
    method: &Method,
    uri: &hyper::Uri,
    version: Version,
    headers: &HeaderMap,
    limits: &Limits,
) -> Result<(), Reject> {
    if *method == Method::TRACE || *method == Method::CONNECT {
        return Err(reject(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"));
    }
    let path = uri.path();
    if !(path.starts_with('/') || path == "*" && *method == Method::OPTIONS) {
        return Err(reject(StatusCode::BAD_REQUEST, "bad request target"));
    }
    // Lengths only: this runs on every request, so no formatting of the URI.
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len() + 8);
    let mut head = target + method.as_str().len() + 12;
    for (name, value) in headers {
        head += name.as_str().len() + value.len() + 4;
    }
    if head > limits.max_head {
        return Err(reject(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header section too large",
        ));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => {
            return Err(reject(StatusCode::BAD_REQUEST, "missing host header"));
        }
        (Some(_), Some(_)) => return Err(reject(StatusCode::BAD_REQUEST, "duplicate host header")),
        (Some(h), None) if !valid_host(h.as_bytes()) => {
            return Err(reject(StatusCode::BAD_REQUEST, "invalid host header"));
        }
        _ => {}
    }
    if headers.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        return Err(reject(StatusCode::BAD_REQUEST, "duplicate content-length"));
    }
    let mut tes = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(te) = tes.next() {
        if tes.next().is_some() {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "duplicate transfer-encoding",
            ));
        }
        if !te.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(reject(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported transfer-encoding",
            ));
        }
    }
    if limits.max_body > 0 {
        if let Some(cl) = content_length(headers) {
            if cl > limits.max_body {
                return Err(reject(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large",
                ));
            }
        }
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

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The fixed hop-by-hop headers (RFC 9110 §7.6.1). Standard names compare as enum values,
/// so this is a few integer compares per header, not string compares.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The headers `Connection` names (to be dropped with it), never Host or Content-Length:
/// framing is ours to decide. The usual tokens (`keep-alive`, `close`) name nothing extra.
pub fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        for t in v.as_bytes().split(|&c| c == b',') {
            let t = t.trim_ascii();
            if t.is_empty()
                || t.eq_ignore_ascii_case(b"keep-alive")
                || t.eq_ignore_ascii_case(b"close")
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t) {
                if n != header::HOST && n != header::CONTENT_LENGTH {
                    out.push(n);
                }
            }
        }
    }
    out
}

/// Removes hop-by-hop headers: `Connection`, every header it names, and the fixed list.
/// One pass over the names first, since most messages carry none of these.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    for n in connection_named(headers) {
        headers.remove(n);
    }
    for n in [
        &header::CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
    ] {
        headers.remove(n);
    }
}

/// The `X-Forwarded-For` value for a request from `client_ip`: the client's own list with
/// the address appended, or just the address.
pub fn forwarded_for(headers: &HeaderMap, client_ip: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(client_ip.len() + 32);
    let mut first = true;
    for v in headers.get_all(&X_FORWARDED_FOR) {
        let v = v.as_bytes().trim_ascii();
        if v.is_empty() {
            continue;
        }
        if !first {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v);
        first = false;
    }
    if !first {
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip.as_bytes());
    out
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
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        validate_request(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            &uri.parse().unwrap(),
            Version::HTTP_11,
            &h,
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
        let big = "v".repeat(40 * 1024);
        assert_eq!(
            req("GET", "/", &[h, ("x-big", &big)]).unwrap_err().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("x-secret, host, keep-alive"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("host", HeaderValue::from_static("a"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["host", "x-keep"]);
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for(&h, "127.0.0.1"), b"127.0.0.1");
        h.append("x-forwarded-for", HeaderValue::from_static(" 10.0.0.1 "));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        assert_eq!(
            forwarded_for(&h, "127.0.0.2"),
            b"10.0.0.1, 10.0.0.2, 127.0.0.2"
        );
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
