//! Property tests for the parsers that face the network: the request head, the response head,
//! the chunked decoder and the JSON decoder. Arbitrary bytes never panic them, and valid
//! inputs come back as they went in, whole or split across reads.

use bytes::BytesMut;
use hyper::Method;
use luaproxy::h1::chunked::Chunked;
use luaproxy::h1::downstream::{parse_request, HeadError};
use luaproxy::h1::rules::Limits;
use luaproxy::h1::upstream::parse_head;
use mlua::prelude::*;
use proptest::prelude::*;

fn from(set: &'static [u8], len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(set), len)
        .prop_map(|v| String::from_utf8(v).unwrap())
}

const TCHAR: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$&'*+.^`|~";
const VCHAR: &[u8] = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789-_.,;:=/\"()[]{}?@\t";
const PCHAR: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_.~!$&'()*+,;=:@";

/// Feeds `bytes` to a chunked decoder in the pieces `cuts` makes, collecting the data.
fn decode_in_pieces(
    bytes: &[u8],
    cuts: &[usize],
) -> Result<(Vec<u8>, Chunked, usize), &'static str> {
    let mut st = Chunked::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    ends.push(bytes.len());
    ends.sort_unstable();
    for end in ends {
        if end > at {
            buf.extend_from_slice(&bytes[at..end]);
            at = end;
        }
        while let Some(d) = st.decode(&mut buf)? {
            out.extend_from_slice(&d);
        }
    }
    Ok((out, st, buf.len()))
}

/// A head's fields as (lowercase name, value) pairs, in order.
fn field_pairs(h: &luaproxy::h1::headers::Headers) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| {
            (
                String::from_utf8_lossy(n).to_ascii_lowercase(),
                String::from_utf8_lossy(v).to_string(),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn request_heads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_request(&bytes, &Limits::default());
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        head.extend_from_slice(&bytes);
        let _ = parse_request(&head, &Limits::default());
    }

    #[test]
    fn valid_request_heads_round_trip(
        method in prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        segs in prop::collection::vec(from(PCHAR, 1..12), 1..5),
        fields in prop::collection::vec((from(TCHAR, 1..20), from(VCHAR, 0..40)), 0..20),
    ) {
        // A ".." segment can climb above the root, which is refused (a rule of its own,
        // tested in tests/edge.rs): this test is about heads that are valid.
        let segs: Vec<String> = segs
            .into_iter()
            .map(|s| if s == "." || s == ".." { "dot".to_string() } else { s })
            .collect();
        let path = format!("/{}", segs.join("/"));
        let mut raw = format!("{method} {path}?q=1 HTTP/1.1\r\nHost: a.example\r\n");
        let mut want = vec![("host".to_string(), "a.example".to_string())];
        for (name, value) in &fields {
            let lower = name.to_ascii_lowercase();
            if ["host", "content-length", "transfer-encoding", "connection", "expect"].contains(&lower.as_str()) {
                continue;
            }
            raw.push_str(&format!("{name}: {value}\r\n"));
            want.push((lower, value.trim().to_string()));
        }
        raw.push_str("\r\n");
        let (n, head) = match parse_request(raw.as_bytes(), &Limits::default()) {
            Ok(Some(h)) => h,
            Ok(None) => panic!("partial: {raw:?}"),
            Err(HeadError::Bad(r)) => panic!("refused {r:?}: {raw:?}"),
            Err(_) => panic!("error: {raw:?}"),
        };
        prop_assert_eq!(n, raw.len());
        prop_assert_eq!(head.method.as_str(), method);
        prop_assert_eq!(head.uri.path(), path.as_str());
        prop_assert_eq!(head.uri.query(), Some("q=1"));
        let got = field_pairs(&head.headers);
        prop_assert_eq!(got, want);
        // Every prefix is "more bytes needed", never an error or a wrong head.
        for cut in [1, raw.len() / 2, raw.len() - 1] {
            prop_assert!(matches!(parse_request(&raw.as_bytes()[..cut], &Limits::default()), Ok(None)));
        }
    }

    #[test]
    fn response_heads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_head(&bytes, &Method::GET);
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        head.extend_from_slice(&bytes);
        let _ = parse_head(&head, &Method::HEAD);
    }

    #[test]
    fn valid_response_heads_round_trip(
        status in 200u16..600,
        len in 0u64..1_000_000,
        fields in prop::collection::vec((from(TCHAR, 1..20), from(VCHAR, 0..40)), 0..20),
    ) {
        let mut raw = format!("HTTP/1.1 {status} X\r\nContent-Length: {len}\r\n");
        let mut want = vec![("content-length".to_string(), len.to_string())];
        for (name, value) in &fields {
            let lower = name.to_ascii_lowercase();
            if ["content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
                "upgrade", "proxy-connection"].contains(&lower.as_str()) {
                continue;
            }
            raw.push_str(&format!("{name}: {value}\r\n"));
            want.push((lower, value.trim().to_string()));
        }
        raw.push_str("\r\n");
        let (n, head) = parse_head(raw.as_bytes(), &Method::GET).unwrap().unwrap();
        prop_assert_eq!(n, raw.len());
        prop_assert_eq!(head.status.as_u16(), status);
        let got = field_pairs(&head.headers);
        prop_assert_eq!(got, want);
    }

    #[test]
    fn chunked_decoding_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = decode_in_pieces(&bytes, &cuts);
    }

    #[test]
    fn chunked_bodies_round_trip_in_any_pieces(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..12),
        ext in prop::sample::select(vec!["", ";a=1", ";name=\"quoted value\"", " ;x"]),
        trailers in prop::collection::vec((from(TCHAR, 1..10), from(VCHAR, 0..20)), 0..4),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        upper in any::<bool>(),
    ) {
        let mut wire = Vec::new();
        for c in &chunks {
            let size = if upper { format!("{:X}", c.len()) } else { format!("{:x}", c.len()) };
            wire.extend_from_slice(format!("{size}{ext}\r\n").as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n");
        for (n, v) in &trailers {
            wire.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        let data: Vec<u8> = chunks.concat();
        let (out, st, left) = decode_in_pieces(&wire, &cuts).unwrap();
        prop_assert!(st.is_done());
        prop_assert_eq!(left, 0);
        prop_assert_eq!(st.overhead as usize, wire.len() - data.len());
        prop_assert_eq!(out, data);
    }
}

fn lua() -> Lua {
    let lua = Lua::new();
    let t = luaproxy::exports(&lua).unwrap();
    lua.register_module("luaproxy", t).unwrap();
    lua
}

/// A JSON document built from a seed: nested arrays/objects of strings, integers, floats,
/// booleans and null.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i32>().prop_map(|i| i.to_string()),
        (-1e6f64..1e6).prop_map(|f| format!("{f:?}")),
        from(VCHAR, 0..12).prop_map(|s| format!("{:?}", s.replace(['\\', '"'], ""))),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((from(TCHAR, 1..8), inner), 1..6).prop_map(|v| {
                let mut seen = std::collections::HashSet::new();
                let fields: Vec<String> = v
                    .into_iter()
                    .filter(|(k, _)| seen.insert(k.clone()))
                    .map(|(k, x)| format!("{k:?}:{x}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn json_decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let lua = lua();
        let r = luaproxy::json::decode_value(&lua, &bytes);
        prop_assert!(r.is_ok(), "decode raised instead of returning nil, err");
    }

    #[test]
    fn json_documents_round_trip(doc in json_value()) {
        let lua = lua();
        let v = luaproxy::json::decode_value(&lua, doc.as_bytes()).unwrap().unwrap();
        let text = luaproxy::json::encode_value(&lua, &v).unwrap();
        // Object key order is Lua's table order: compare as JSON values (serde_json's view).
        let want: serde_json::Value = serde_json::from_str(&doc).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&text).unwrap();
        prop_assert_eq!(got, want, "{} -> {}", doc, String::from_utf8_lossy(&text));
    }
}
