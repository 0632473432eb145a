//! The chunked transfer coding (RFC 9112 §7.1), decoded strictly for both sides: request
//! bodies from clients and response bodies from upstreams. No mlua here.

use bytes::{Buf, Bytes, BytesMut};

/// A size line longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Chunk-extension bytes allowed in one message (hyper's limit): extensions carry nothing we
/// use, and without a cap they are an unmetered stream inside a metered body.
const MAX_CHUNK_EXT: usize = 16 * 1024;
/// Trailer section limits (hyper's): bytes and fields.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
const MAX_TRAILER_FIELDS: usize = 100;

/// A chunked body being decoded (RFC 9112 §7.1), strictly: every line ends in CRLF, no
/// control byte but HTAB appears in size lines or trailers (a bare LF or CR inside a chunk
/// extension is how one request hides inside another for a lenient front proxy), and
/// extensions and trailers have caps. `overhead` counts the framing bytes consumed (size
/// lines, extensions, CRLFs, trailers), so a body limit can count wire bytes, not only data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunked {
    pub state: Chunk,
    ext_bytes: usize,
    trailer_bytes: usize,
    trailer_fields: usize,
    pub overhead: u64,
    /// Bytes of the current, unfinished line already looked at: a line trickling in a byte at
    /// a time costs one scan, not one per byte (up to 16 KiB of trailers, squared).
    scanned: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: Chunk::Size,
            ext_bytes: 0,
            trailer_bytes: 0,
            trailer_fields: 0,
            overhead: 0,
            scanned: 0,
        }
    }
}

/// A byte that may not appear in a size line or trailer field (CTLs but HTAB; RFC 9110 §5.5).
fn is_ctl(c: u8) -> bool {
    (c < 0x20 && c != b'\t') || c == 0x7f
}

impl Chunked {
    /// Where the line at the start of `buf` ends (its CRLF), looking only at bytes an earlier
    /// call for the same line did not; `Ok(None)` until it ends. A control byte other than
    /// HTAB or CR is `bad` at once (a CR not followed by LF is caught when the line ends).
    fn line_end(&mut self, buf: &[u8], bad: &'static str) -> Result<Option<usize>, &'static str> {
        let from = self.scanned.min(buf.len());
        match buf[from..].windows(2).position(|w| w == b"\r\n") {
            Some(at) => {
                self.scanned = 0;
                Ok(Some(from + at))
            }
            None if buf[from..].iter().any(|&c| is_ctl(c) && c != b'\r') => Err(bad),
            None => {
                // A CR at the end may be the first half of the CRLF.
                self.scanned = buf.len().saturating_sub(1);
                Ok(None)
            }
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Decodes what `buf` holds, returning the next piece of data, `Ok(None)` when more input
    /// is needed, and moving to `Done` after the last chunk and trailers.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, &'static str> {
        loop {
            match self.state {
                Chunk::Size => {
                    let Some(end) = self.line_end(buf, "bad chunk size line")? else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err("chunk size line too long")
                        } else {
                            Ok(None)
                        };
                    };
                    let line = &buf[..end];
                    if line.iter().any(|&c| is_ctl(c)) {
                        return Err("bad chunk size line");
                    }
                    let hex_end = line
                        .iter()
                        .position(|c| !c.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    let digits = &line[..hex_end];
                    if digits.is_empty() || digits.len() > 15 {
                        return Err("bad chunk size");
                    }
                    let rest = &line[hex_end..];
                    let ext = rest.trim_ascii_start();
                    if !ext.is_empty() && ext[0] != b';' {
                        return Err("bad chunk size");
                    }
                    self.ext_bytes += rest.len();
                    if self.ext_bytes > MAX_CHUNK_EXT {
                        return Err("chunk extensions too large");
                    }
                    let size = digits.iter().fold(0u64, |n, &c| {
                        n * 16 + u64::from((c as char).to_digit(16).unwrap_or(0))
                    });
                    buf.advance(end + 2);
                    self.overhead += end as u64 + 2;
                    self.state = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (left as usize).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    };
                    return Ok(Some(data));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&c| c != b'\r') {
                            return Err("chunk not followed by crlf");
                        }
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk not followed by crlf");
                    }
                    buf.advance(2);
                    self.overhead += 2;
                    self.state = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some(end) = self.line_end(buf, "bad trailer field")? else {
                        return if self.trailer_bytes + buf.len() > MAX_TRAILER_BYTES {
                            Err("trailers too large")
                        } else {
                            Ok(None)
                        };
                    };
                    if end > 0 {
                        let line = &buf[..end];
                        let colon = line.iter().position(|&c| c == b':');
                        let name_ok =
                            colon.is_some_and(|i| i > 0 && line[..i].iter().all(|&c| is_token(c)));
                        if !name_ok || line.iter().any(|&c| is_ctl(c)) {
                            return Err("bad trailer field");
                        }
                        self.trailer_fields += 1;
                        if self.trailer_fields > MAX_TRAILER_FIELDS {
                            return Err("too many trailer fields");
                        }
                    }
                    self.trailer_bytes += end + 2;
                    if self.trailer_bytes > MAX_TRAILER_BYTES {
                        return Err("trailers too large");
                    }
                    buf.advance(end + 2);
                    self.overhead += end as u64 + 2;
                    if end == 0 {
                        self.state = Chunk::Done;
                    }
                }
                Chunk::Done => return Ok(None),
            }
        }
    }
}

/// A `tchar` of RFC 9110 §5.6.2.
fn is_token(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Chunked), &'static str> {
        let mut buf = BytesMut::from(input);
        let mut st = Chunked::default();
        let mut out = Vec::new();
        loop {
            match st.decode(&mut buf)? {
                Some(d) => out.extend_from_slice(&d),
                None => return Ok((out, st)),
            }
        }
    }

    #[test]
    fn chunked_decoding() {
        let whole = b"5;ext=1\r\nhello\r\n6 ; a=\"b c\"\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
        let (out, st) = decode_all(whole).unwrap();
        assert_eq!(out, b"hello world");
        assert!(st.is_done());
        assert_eq!(st.overhead as usize, whole.len() - 11);
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"0x5\r\n",
            b"\r\n",
            b"2;\nxx\r\n",
            b"2;a\rb\r\nxx\r\n",
            b"2;a\0\r\nxx\r\n",
            b"2\n",
            b"2 x\r\n",
            b"10000000000000000\r\n",
            b"0\r\nX-T: a\0b\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n folded: x\r\n\r\n",
        ] {
            assert!(
                decode_all(bad).is_err(),
                "{:?} should fail",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_extensions_and_trailers_have_caps() {
        let ext = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(4000));
        assert!(decode_all(ext.as_bytes()).is_ok());
        let many: String = (0..5)
            .map(|_| format!("1;{}\r\nx\r\n", "e".repeat(4000)))
            .collect();
        assert_eq!(
            decode_all(many.as_bytes()).unwrap_err(),
            "chunk extensions too large"
        );
        let fields: String = (0..101).map(|i| format!("t{i}: v\r\n")).collect();
        let body = format!("0\r\n{fields}\r\n");
        assert_eq!(
            decode_all(body.as_bytes()).unwrap_err(),
            "too many trailer fields"
        );
        let big = format!("0\r\nt: {}\r\n\r\n", "v".repeat(17 * 1024));
        assert_eq!(
            decode_all(big.as_bytes()).unwrap_err(),
            "trailers too large"
        );
        // Refused while still arriving, not only once its line ends.
        let partial = format!("0\r\nt: {}", "v".repeat(17 * 1024));
        assert_eq!(
            decode_all(partial.as_bytes()).unwrap_err(),
            "trailers too large"
        );
    }

    #[test]
    fn a_line_trickling_in_is_scanned_once() {
        let mut body = b"1\r\nx\r\n0\r\nt: ".to_vec();
        body.extend_from_slice(&[b'v'; 15000]);
        body.extend_from_slice(b"\r\n\r\n");
        let mut st = Chunked::default();
        let mut buf = BytesMut::new();
        let mut max_scanned_back = 0;
        for b in &body {
            buf.extend_from_slice(&[*b]);
            let before = st.scanned;
            while st.decode(&mut buf).unwrap().is_some() {}
            // Each call looks at the new byte and at most the one before it.
            max_scanned_back = max_scanned_back.max(buf.len().saturating_sub(before));
        }
        assert!(st.is_done());
        assert!(max_scanned_back <= 2, "{max_scanned_back}");
        // A bare CR inside the line is still refused once the line ends.
        let mut st = Chunked::default();
        let mut buf = BytesMut::new();
        let mut r = Ok(None);
        for b in b"0\r\nt: a\rb\r\n\r\n" {
            buf.extend_from_slice(&[*b]);
            r = st.decode(&mut buf);
            if r.is_err() {
                break;
            }
        }
        assert_eq!(r, Err("bad trailer field"));
    }

    #[test]
    fn chunked_decoding_across_reads() {
        let whole = b"3\r\nabc\r\n0\r\n\r\n";
        let mut buf = BytesMut::new();
        let mut st = Chunked::default();
        let mut out = Vec::new();
        for b in whole {
            buf.extend_from_slice(&[*b]);
            while let Some(d) = st.decode(&mut buf).unwrap() {
                out.extend_from_slice(&d);
            }
        }
        assert_eq!(out, b"abc");
        assert!(st.is_done());
    }
}
