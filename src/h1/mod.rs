//! The wire layer: HTTP/1.1 as bytes on sockets, for both sides, with no mlua in it.
//!
//! `downstream` reads requests from clients and writes responses to them; `upstream` writes
//! requests to backends and reads their responses. Both build on `io` (reads, writes,
//! deadlines), `idle` (what a connection waiting for a request keeps: a waker slot, spare
//! read buffers), `chunked` (the transfer coding), `headers` (fields kept as raw lines of the
//! head) and `rules` (what a proxy must check and rewrite: request validation, hop-by-hop
//! fields, forwarding headers, path normalization, query strings, the limits a request
//! carries). Nothing here imports from the layers above.

pub mod body;
pub mod chunked;
pub mod downstream;
pub mod headers;
pub mod idle;
pub mod io;
pub mod rules;
pub mod stream;
pub mod upstream;
