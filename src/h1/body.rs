//! Bodies as both sides pass them around: one boxed body type and one error type for the
//! whole crate, and a request body as a sender holds it. No mlua here.

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use std::pin::Pin;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies stay on the worker thread that made them, so they need not be `Send`.
pub type BoxBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>;

pub fn full(b: Bytes) -> BoxBody {
    Box::pin(http_body_util::Full::new(b).map_err(|never| match never {}))
}

pub fn empty() -> BoxBody {
    Box::pin(http_body_util::Empty::new().map_err(|never| match never {}))
}

/// The request body as the sender has it: bytes can be sent again on another connection,
/// a stream only once.
pub enum ReqBody {
    Bytes(Bytes),
    Stream(BoxBody),
}

impl ReqBody {
    /// Its length when known up front (`None`: sent chunked).
    pub fn length(&self) -> Option<u64> {
        match self {
            ReqBody::Bytes(b) => Some(b.len() as u64),
            ReqBody::Stream(s) => s.size_hint().exact(),
        }
    }
}
