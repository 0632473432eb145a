//! The format's tests: every variable, absent values, escaping, parse errors; and a rough
//! cost check (`render_cost`, ignored).

use super::format::BUILTIN;
use super::*;
use bytes::Bytes;

/// Raw fields, names as a client spells them.
fn raw(fields: &[(&str, &[u8])]) -> Headers {
    let mut buf = Vec::new();
    let mut at = Vec::new();
    for (n, v) in fields {
        let ns = buf.len();
        buf.extend_from_slice(n.as_bytes());
        buf.extend_from_slice(b": ");
        let vs = buf.len();
        buf.extend_from_slice(v);
        buf.extend_from_slice(b"\r\n");
        at.push([ns as u32, n.len() as u32, vs as u32, v.len() as u32]);
    }
    Headers::Raw {
        buf: Bytes::from(buf),
        at,
    }
}

fn line(fmt: &str, f: &Facts) -> String {
    let mut out = Vec::new();
    Format::parse(fmt).unwrap().render(f, &mut out);
    String::from_utf8(out).unwrap()
}

/// 01/Dec/2026:17:05:03.250 UTC.
fn when() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_796_144_703_250)
}

#[test]
fn every_variable() {
    let req = raw(&[
        ("Host", b"API.Example.com:8080"),
        ("User-Agent", b"curl/8.5"),
        ("X-Api-Key", b"k1"),
        ("Authorization", b"Basic YWxhZGRpbjpvcGVuc2VzYW1l"),
        ("Content-Length", b"5"),
        ("Content-Type", b"text/plain"),
    ]);
    let resp = raw(&[("Content-Type", b"application/json")]);
    let ups = [
        Upstream {
            addr: "10.0.0.1:80",
            status: Some(502),
            connect_time: Some(Duration::from_millis(1)),
            header_time: None,
            response_time: Some(Duration::from_millis(2)),
        },
        Upstream {
            addr: "10.0.0.2:80",
            status: Some(200),
            connect_time: Some(Duration::from_micros(500)),
            header_time: Some(Duration::from_millis(20)),
            response_time: Some(Duration::from_millis(1234)),
        },
    ];
    let mut ctx = CtxValues::new();
    ctx.push(Some(b"tenant-7"));
    let f = Facts {
        remote_addr: "192.0.2.9",
        remote_port: 54321,
        time: when(),
        method: "POST",
        request_uri: "/a%20b/c?x=1&y=2",
        uri: "/a b/c",
        protocol: "HTTP/1.1",
        status: 201,
        body_bytes_sent: 17,
        bytes_sent: 160,
        request_length: 230,
        request_time: Duration::from_micros(1_250_900),
        upstreams: &ups,
        request_id: "0123456789abcdef0123456789abcdef",
        connection: 42,
        connection_requests: 3,
        request_headers: Some(&req),
        response_headers: Some(&resp),
        ctx: &ctx,
    };
    let cases: &[(&str, &str)] = &[
        ("remote_addr", "192.0.2.9"),
        ("remote_port", "54321"),
        ("remote_user", "aladdin"),
        ("time_local", "01/Dec/2026:17:05:03 +0000"),
        ("time_iso8601", "2026-12-01T17:05:03+00:00"),
        ("msec", "1796144703.250"),
        ("request", "POST /a%20b/c?x=1&y=2 HTTP/1.1"),
        ("request_method", "POST"),
        ("request_uri", "/a%20b/c?x=1&y=2"),
        ("uri", "/a b/c"),
        ("document_uri", "/a b/c"),
        ("args", "x=1&y=2"),
        ("query_string", "x=1&y=2"),
        ("is_args", "?"),
        ("server_protocol", "HTTP/1.1"),
        ("host", "api.example.com"),
        ("status", "201"),
        ("body_bytes_sent", "17"),
        ("bytes_sent", "160"),
        ("request_length", "230"),
        ("request_time", "1.250"),
        ("upstream_addr", "10.0.0.1:80, 10.0.0.2:80"),
        ("upstream_status", "502, 200"),
        ("upstream_connect_time", "0.001, 0.000"),
        ("upstream_header_time", "-, 0.020"),
        ("upstream_response_time", "0.002, 1.234"),
        ("request_id", "0123456789abcdef0123456789abcdef"),
        ("pid", &std::process::id().to_string()),
        ("connection", "42"),
        ("connection_requests", "3"),
        ("content_length", "5"),
        ("content_type", "text/plain"),
        ("http_x_api_key", "k1"),
        ("HTTP_USER_AGENT", "curl/8.5"),
        ("sent_http_content_type", "application/json"),
        ("ctx_tenant", "tenant-7"),
    ];
    for (name, want) in cases {
        assert_eq!(
            line(&format!("${name}"), &f),
            format!("{want}\n"),
            "${name}"
        );
    }
    // Every built-in name is covered above.
    for (name, _) in BUILTIN {
        assert!(cases.iter().any(|(n, _)| n == name), "${name} untested");
    }
    assert_eq!(
        line(COMBINED, &f),
        "192.0.2.9 - aladdin [01/Dec/2026:17:05:03 +0000] \"POST /a%20b/c?x=1&y=2 HTTP/1.1\" \
         201 17 \"-\" \"curl/8.5\"\n"
    );
}

#[test]
fn router_line() {
    let req = raw(&[("X-Api-Key", b"k1")]);
    let ups = [Upstream {
        addr: "127.0.0.1:9001",
        status: Some(200),
        response_time: Some(Duration::from_millis(3)),
        ..Default::default()
    }];
    let fmt = Format::parse(ROUTER).unwrap();
    assert_eq!(fmt.ctx_names(), ["api_key"]);
    let mut ctx = CtxValues::new();
    ctx.push(Some(b"k1"));
    let f = Facts {
        remote_addr: "127.0.0.1",
        time: when(),
        method: "GET",
        request_uri: "/v1/x",
        protocol: "HTTP/1.1",
        status: 200,
        bytes_sent: 180,
        request_length: 95,
        request_time: Duration::from_millis(4),
        upstreams: &ups,
        request_headers: Some(&req),
        ctx: &ctx,
        ..Default::default()
    };
    let mut out = Vec::new();
    fmt.render(&f, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "127.0.0.1 \"k1\" [01/Dec/2026:17:05:03 +0000] \"GET /v1/x HTTP/1.1\" 95 200 180 \
         127.0.0.1:9001 0.004 0.003\n"
    );
}

#[test]
fn absent_values_print_a_dash() {
    let f = Facts::default();
    for name in [
        "remote_user",
        "args",
        "host",
        "upstream_addr",
        "upstream_status",
        "upstream_connect_time",
        "upstream_header_time",
        "upstream_response_time",
        "http_referer",
        "sent_http_etag",
        "ctx_api_key",
        "content_type",
    ] {
        assert_eq!(line(&format!("${name}"), &f), "-\n", "${name}");
    }
    // An attempt without a status or times (connect refused) prints dashes in its place.
    let ups = [
        Upstream {
            addr: "10.0.0.1:80",
            ..Default::default()
        },
        Upstream {
            addr: "10.0.0.2:80",
            status: Some(200),
            connect_time: Some(Duration::from_millis(1)),
            header_time: Some(Duration::from_millis(2)),
            response_time: Some(Duration::from_millis(3)),
        },
    ];
    let f = Facts {
        upstreams: &ups,
        ..Default::default()
    };
    assert_eq!(
        line(
            "$upstream_status|$upstream_connect_time|$upstream_header_time",
            &f
        ),
        "-, 200|-, 0.001|-, 0.002\n"
    );
    // Present but empty is empty, as nginx: `?` with no query, and an empty field.
    let req = raw(&[("Referer", b"")]);
    let f = Facts {
        request_uri: "/p?",
        request_headers: Some(&req),
        ..Default::default()
    };
    assert_eq!(line("[$args][$http_referer][$is_args]", &f), "[][][?]\n");
    // No '?' at all: no args, and $is_args is empty.
    let f = Facts {
        request_uri: "/p",
        ..Default::default()
    };
    assert_eq!(line("[$args][$is_args]", &f), "[-][]\n");
    // A Basic value without ':' or with an empty user, or not Basic at all: no user.
    for v in [
        &b"Basic YWxhZGRpbg=="[..],
        b"Basic Om9wZW4=",
        b"Bearer abc",
        b"Basic *",
    ] {
        let req = raw(&[("Authorization", v)]);
        let f = Facts {
            request_headers: Some(&req),
            ..Default::default()
        };
        assert_eq!(line("$remote_user", &f), "-\n", "{v:?}");
    }
}

#[test]
fn values_are_escaped_as_nginx_default() {
    let req = raw(&[("User-Agent", b"a\"b\\c\x7f\xc3\xa9\td")]);
    let f = Facts {
        request_uri: "/x\"y\\z\u{1}",
        request_headers: Some(&req),
        ..Default::default()
    };
    assert_eq!(
        line("\"$request_uri\" \"$http_user_agent\"", &f),
        "\"/x\\x22y\\x5Cz\\x01\" \"a\\x22b\\x5Cc\\x7F\\xC3\\xA9\\x09d\"\n"
    );
    let mut ctx = CtxValues::new();
    ctx.push(Some(b"line\nbreak"));
    let f = Facts {
        ctx: &ctx,
        ..Default::default()
    };
    // The format's own text is written as is; only the value is escaped.
    assert_eq!(line("\"$ctx_v\"\t", &f), "\"line\\x0Abreak\"\t\n");
}

#[test]
fn braced_names_and_text_around_them() {
    let f = Facts {
        status: 200,
        uri: "/u",
        ..Default::default()
    };
    assert_eq!(line("${status}ok$status.${uri}x", &f), "200ok200./ux\n");
    assert_eq!(line("a$status-b", &f), "a200-b\n");
    assert_eq!(line("${STATUS}", &f), "200\n");
    assert_eq!(line("no variables", &f), "no variables\n");
    // Status 0 (nothing was sent) prints three digits, as nginx's %03ui.
    assert_eq!(line("$status", &Facts::default()), "000\n");
}

#[test]
fn bad_formats_name_the_problem() {
    let e = |s: &str| Format::parse(s).unwrap_err();
    assert_eq!(e("$remote_addr $foo"), "unknown variable '$foo'");
    assert_eq!(e("x ${foo}x"), "unknown variable '${foo}'");
    assert_eq!(e("$http_"), "unknown variable '$http_'");
    assert_eq!(e("$ctx_"), "unknown variable '$ctx_'");
    assert_eq!(
        e("a $ b"),
        "'$' without a variable name at byte 3 of the format"
    );
    assert_eq!(
        e("end$"),
        "'$' without a variable name at byte 4 of the format"
    );
    assert_eq!(e("${status"), "missing '}' after '${status'");
    assert_eq!(
        e("${}"),
        "'$' without a variable name at byte 1 of the format"
    );
    assert_eq!(e(""), "empty format");
}

#[test]
fn presets_and_defaults() {
    assert_eq!(Format::default().source(), COMBINED);
    assert_eq!(Format::parse("combined").unwrap().source(), COMBINED);
    assert_eq!(Format::parse("router").unwrap().source(), ROUTER);
    let c = Format::default();
    assert!(c.uses_request_headers() && !c.uses_response_headers());
    assert!(c.ctx_names().is_empty());
    assert!(c.uses("status") && c.uses("time_local") && !c.uses("request_id"));
    assert!(!c.uses("http_referer"), "only built-in names");
    let r = Format::parse(ROUTER).unwrap();
    assert!(r.uses("upstream_response_time") && !r.uses("remote_user"));
    let s = Format::parse("$status $sent_http_etag").unwrap();
    assert!(!s.uses_request_headers() && s.uses_response_headers());
}

#[test]
fn ctx_names_are_listed_once_in_order() {
    let fmt = Format::parse("$ctx_a ${ctx_Tenant} $ctx_a $CTX_b $status").unwrap();
    assert_eq!(fmt.ctx_names(), ["a", "Tenant", "b"]);
    let mut ctx = CtxValues::new();
    ctx.push(Some(b"1"));
    ctx.push(None);
    ctx.push(Some(b"3"));
    let f = Facts {
        status: 204,
        ctx: &ctx,
        ..Default::default()
    };
    let mut out = Vec::new();
    fmt.render(&f, &mut out);
    assert_eq!(out, b"1 - 1 3 204\n");
    // Refilled for the next request.
    ctx.clear();
    ctx.push(Some(b"x"));
    let f = Facts {
        status: 204,
        ctx: &ctx,
        ..Default::default()
    };
    out.clear();
    fmt.render(&f, &mut out);
    assert_eq!(out, b"x - x - 204\n");
}

#[test]
fn fields_match_as_nginx_names_them() {
    let req = raw(&[
        ("X-Forwarded-For", b"1.1.1.1"),
        ("cookie", b"a=1"),
        ("x-forwarded-for", b"2.2.2.2"),
        ("Cookie", b"b=2"),
        ("Host", b"[::1]:8080"),
    ]);
    let f = Facts {
        request_headers: Some(&req),
        ..Default::default()
    };
    assert_eq!(
        line("$http_x_forwarded_for|$http_cookie|$host", &f),
        "1.1.1.1, 2.2.2.2|a=1; b=2|[::1]\n"
    );
    let req = raw(&[("Host", b"Example.ORG.")]);
    let f = Facts {
        request_headers: Some(&req),
        ..Default::default()
    };
    assert_eq!(line("$host", &f), "example.org\n");
    let req = raw(&[("Host", b"EX\xc3\xa9.com")]);
    let f = Facts {
        request_headers: Some(&req),
        ..Default::default()
    };
    assert_eq!(line("$host", &f), "ex\\xC3\\xA9.com\n");
    // A map (fields a policy edited) works the same.
    let mut m = hyper::HeaderMap::new();
    m.insert("x-api-key", hyper::header::HeaderValue::from_static("k9"));
    let h = Headers::Map(m);
    let f = Facts {
        response_headers: Some(&h),
        request_headers: Some(&h),
        ..Default::default()
    };
    assert_eq!(line("$http_x_api_key $sent_http_x_api_key", &f), "k9 k9\n");
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Not a test: the cost of one router line.
/// `cargo test --release ... accesslog::tests::render_cost -- --ignored --nocapture`
#[test]
#[ignore]
fn render_cost() {
    let req = raw(&[
        ("Host", b"127.0.0.1:8080"),
        ("User-Agent", b"wrk"),
        ("Accept", b"*/*"),
        ("X-Api-Key", b"key-0123456789"),
        ("Content-Length", b"5000"),
    ]);
    let ups = [Upstream {
        addr: "127.0.0.1:9001",
        status: Some(200),
        connect_time: Some(Duration::from_micros(80)),
        header_time: Some(Duration::from_micros(900)),
        response_time: Some(Duration::from_micros(950)),
    }];
    let mut ctx = CtxValues::new();
    let fixed = SystemTime::now();
    for (name, fmt) in [("router", ROUTER), ("combined", COMBINED)] {
        let fmt = Format::parse(fmt).unwrap();
        // Best of 5 runs of 1e6 lines in this thread's CPU time (the machine may be busy:
        // wall time would count other processes' turns), with the clock read per line as
        // the caller will, and with one fixed time (the render alone).
        for read_clock in [true, false] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let mut out = Vec::with_capacity(FLUSH_AT + 4096);
                let n = 1_000_000u32;
                let t = thread_cpu_ns();
                for i in 0..n {
                    ctx.clear();
                    for _ in fmt.ctx_names() {
                        ctx.push(Some(b"key-0123456789"));
                    }
                    let f = Facts {
                        remote_addr: "127.0.0.1",
                        remote_port: 40000,
                        time: if read_clock { SystemTime::now() } else { fixed },
                        method: "POST",
                        request_uri: "/api/v1/items?id=17",
                        uri: "/api/v1/items",
                        protocol: "HTTP/1.1",
                        status: 200,
                        body_bytes_sent: 120,
                        bytes_sent: 260,
                        request_length: 5110,
                        request_time: Duration::from_micros(1100 + u64::from(i % 7)),
                        upstreams: &ups,
                        request_headers: Some(&req),
                        ctx: &ctx,
                        ..Default::default()
                    };
                    fmt.render(&f, &mut out);
                    if out.len() >= FLUSH_AT {
                        out.clear();
                    }
                }
                best = best.min((thread_cpu_ns() - t) as f64 / f64::from(n));
            }
            let what = if read_clock {
                "with SystemTime::now"
            } else {
                "render only"
            };
            println!("{name}: {best:.0} ns per line ({what})");
        }
    }
}
