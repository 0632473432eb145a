//! A response head from an upstream, for a GET and for a HEAD: never a panic.
#![no_main]
use hyper::Method;
use libfuzzer_sys::fuzz_target;
use luaproxy::h1::upstream::parse_head;

fuzz_target!(|data: &[u8]| {
    let _ = parse_head(data, &Method::GET);
    let _ = parse_head(data, &Method::HEAD);
});
