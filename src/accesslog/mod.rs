//! The access log: nginx's `log_format` variables rendered from what a finished request knows
//! ([`Facts`], plain data the connection loop fills), and per-worker buffered [`Writer`]s to a
//! file or stdout. No Lua here, so `cargo test` covers all of it.
//!
//! Times are UTC (`$time_local` always says `+0000`): a worker thread has no cheap, safe way
//! to read the local zone, and log tooling reads the offset from the line anyway.
//!
//! `mod.rs`: what a request hands over ([`Facts`]); `format.rs`: `log_format` parsed and
//! rendered; `writer.rs`: buffers and the file.

use crate::h1::headers::Headers;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod format;
mod writer;

pub use format::Format;
pub use writer::{Target, Writer};

/// nginx's predefined `combined` format, the default `log_format`.
pub const COMBINED: &str = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent""#;

/// The router's line: client address, API key, time, request line, request length, status,
/// bytes sent (head and body), backend, request time, upstream response time. The key is
/// `$ctx_api_key` (what the policy checked and put in `ctx.api_key`) rather than a
/// `$http_...` field, because the key's header name is itself a setting (`api_key_header`);
/// it is quoted, since a header value may hold spaces.
pub const ROUTER: &str = r#"$remote_addr "$ctx_api_key" [$time_local] "$request" $request_length $status $bytes_sent $upstream_addr $request_time $upstream_response_time"#;

/// A writer's buffer is written out once it holds this much (and on [`Writer::flush`]).
pub const FLUSH_AT: usize = 64 * 1024;

/// One upstream attempt of a request. nginx lists every attempt in `$upstream_*`, joined by
/// `", "`, and prints `-` for a value an attempt does not have (no status when the connect
/// failed, no header time when no head came).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Upstream<'a> {
    /// `host:port` as the policy named it.
    pub addr: &'a str,
    pub status: Option<u16>,
    pub connect_time: Option<Duration>,
    pub header_time: Option<Duration>,
    pub response_time: Option<Duration>,
}

/// The values of the `$ctx_NAME` variables a format uses, in [`Format::ctx_names`] order.
/// One per worker, cleared and refilled per request: the values share one buffer, so filling
/// it allocates nothing once it has grown.
#[derive(Debug, Default)]
pub struct CtxValues {
    buf: Vec<u8>,
    at: Vec<Option<(usize, usize)>>,
}

impl CtxValues {
    /// No values (every `$ctx_NAME` prints `-`).
    pub const fn new() -> CtxValues {
        CtxValues {
            buf: Vec::new(),
            at: Vec::new(),
        }
    }

    /// Forgets the last request's values.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.at.clear();
    }

    /// Appends the value of the next name of [`Format::ctx_names`]; `None` (nil in `ctx`)
    /// prints `-`.
    pub fn push(&mut self, v: Option<&[u8]>) {
        let at = v.map(|v| {
            self.buf.extend_from_slice(v);
            (self.buf.len() - v.len(), self.buf.len())
        });
        self.at.push(at);
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        let (a, b) = (*self.at.get(i)?)?;
        Some(&self.buf[a..b])
    }
}

static NO_CTX: CtxValues = CtxValues::new();

/// Everything one finished request knows, as plain data for [`Format::render`]. Strings are
/// borrowed from the request; `Default` gives empty strings, zeros, no headers, no upstream
/// and no ctx values.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// `$remote_addr`: the client's IP address, as text.
    pub remote_addr: &'a str,
    /// `$remote_port`.
    pub remote_port: u16,
    /// `$time_local`, `$time_iso8601`, `$msec`: when the line is logged (the request's end,
    /// as nginx). Printed in UTC.
    pub time: SystemTime,
    /// `$request_method`.
    pub method: &'a str,
    /// `$request_uri`: the request target as the client sent it (path and query).
    pub request_uri: &'a str,
    /// `$uri`: the normalized path (`req:get_path()`), without the query.
    pub uri: &'a str,
    /// `$server_protocol`: `"HTTP/1.1"` or `"HTTP/1.0"`.
    pub protocol: &'a str,
    /// `$status`: the status sent (nginx logs a client gone before the response as 499).
    pub status: u16,
    /// `$body_bytes_sent`: response body bytes written to the client.
    pub body_bytes_sent: u64,
    /// `$bytes_sent`: head and body bytes written to the client.
    pub bytes_sent: u64,
    /// `$request_length`: request line, head and body bytes read.
    pub request_length: u64,
    /// `$request_time`: from the request's first byte to the log line.
    pub request_time: Duration,
    /// `$upstream_*`: each upstream attempt, in order; empty when none was made (`-`).
    pub upstreams: &'a [Upstream<'a>],
    /// `$request_id`.
    pub request_id: &'a str,
    /// `$connection`: the connection's serial number.
    pub connection: u64,
    /// `$connection_requests`: requests so far on this connection, this one included.
    pub connection_requests: u64,
    /// `$http_NAME`, `$remote_user`, `$host`: the request's fields.
    pub request_headers: Option<&'a Headers>,
    /// `$sent_http_NAME`: the response's fields (those in its `Headers`; framing fields the
    /// connection adds while writing, such as Content-Length or Connection, are not there).
    pub response_headers: Option<&'a Headers>,
    /// `$ctx_NAME`: values in [`Format::ctx_names`] order.
    pub ctx: &'a CtxValues,
}

impl Default for Facts<'_> {
    fn default() -> Self {
        Facts {
            remote_addr: "",
            remote_port: 0,
            time: UNIX_EPOCH,
            method: "",
            request_uri: "",
            uri: "",
            protocol: "",
            status: 0,
            body_bytes_sent: 0,
            bytes_sent: 0,
            request_length: 0,
            request_time: Duration::ZERO,
            upstreams: &[],
            request_id: "",
            connection: 0,
            connection_requests: 0,
            request_headers: None,
            response_headers: None,
            ctx: &NO_CTX,
        }
    }
}

#[cfg(test)]
mod tests;
