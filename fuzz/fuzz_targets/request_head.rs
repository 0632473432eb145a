//! A request head from a client: any bytes give a head, "more bytes", or a refusal; never a
//! panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use luaproxy::h1::downstream::parse_request;
use luaproxy::h1::rules::Limits;

fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data, &Limits::default());
});
