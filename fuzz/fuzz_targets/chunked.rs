//! A chunked body, fed in two pieces split where the first byte says: never a panic, and the
//! framing bytes counted never exceed the bytes consumed.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use luaproxy::h1::chunked::Chunked;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let cut = (cut as usize).min(rest.len());
    let mut st = Chunked::default();
    let mut buf = BytesMut::new();
    let mut data_len = 0u64;
    for piece in [&rest[..cut], &rest[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match st.decode(&mut buf) {
                Ok(Some(d)) => data_len += d.len() as u64,
                Ok(None) | Err(_) => break,
            }
        }
    }
    let consumed = (rest.len() - buf.len()) as u64;
    assert!(st.overhead + data_len <= consumed);
});
