//! Header fields as a request or response carries them. A parsed head keeps its fields as
//! the raw lines of one copy of the head (offsets into it, names spelled as the peer sent
//! them): building that costs a few stores per field where a `HeaderMap` hashes, validates
//! again and allocates, and forwarding it is a copy of each line. The first edit turns the
//! fields into a `HeaderMap`; most requests and responses are never edited.
//! Plain Rust with no Lua in sight, so `cargo test` covers all of it.

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Header fields, raw or as a map. Names compare case-insensitively either way.
#[derive(Clone, Debug)]
pub enum Headers {
    /// `buf` and, per field, `[name start, name length, value start, value length]` in it.
    /// Names and values were checked by the parser (tokens; no control characters).
    Raw {
        buf: Bytes,
        at: Vec<[u32; 4]>,
    },
    Map(HeaderMap),
}

impl Default for Headers {
    fn default() -> Self {
        Headers::Map(HeaderMap::new())
    }
}

/// The same fields in the same order (names compared case-insensitively).
impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other.iter())
                .all(|((n1, v1), (n2, v2))| n1.eq_ignore_ascii_case(n2) && v1 == v2)
    }
}

impl From<HeaderMap> for Headers {
    fn from(m: HeaderMap) -> Self {
        Headers::Map(m)
    }
}

/// Offsets of `name` and `value`, both slices of `buf`, for `Headers::Raw`.
pub fn field_at(buf: &[u8], name: &[u8], value: &[u8]) -> [u32; 4] {
    let base = buf.as_ptr() as usize;
    [
        (name.as_ptr() as usize - base) as u32,
        name.len() as u32,
        (value.as_ptr() as usize - base) as u32,
        value.len() as u32,
    ]
}

/// Fields in order, as `(name, value)` bytes (map names are lowercase).
pub enum Iter<'a> {
    Raw(&'a [u8], std::slice::Iter<'a, [u32; 4]>),
    Map(header::Iter<'a, HeaderValue>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Raw(buf, it) => it.next().map(|&[n, nl, v, vl]| {
                (
                    &buf[n as usize..(n + nl) as usize],
                    &buf[v as usize..(v + vl) as usize],
                )
            }),
            Iter::Map(it) => it
                .next()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        }
    }
}

impl Headers {
    pub fn iter(&self) -> Iter<'_> {
        match self {
            Headers::Raw { buf, at } => Iter::Raw(buf, at.iter()),
            Headers::Map(m) => Iter::Map(m.iter()),
        }
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        match self {
            Headers::Raw { at, .. } => at.len(),
            Headers::Map(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn contains(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    /// The fields as a map, for editing (raw fields are converted once).
    pub fn map_mut(&mut self) -> &mut HeaderMap {
        if let Headers::Raw { buf, at } = self {
            let mut m = HeaderMap::with_capacity(at.len());
            for &[n, nl, v, vl] in at.iter() {
                let name = HeaderName::from_bytes(&buf[n as usize..(n + nl) as usize]);
                let value =
                    HeaderValue::from_maybe_shared(buf.slice(v as usize..(v + vl) as usize));
                // The parser let only valid names and values through.
                if let (Ok(name), Ok(value)) = (name, value) {
                    m.append(name, value);
                }
            }
            *self = Headers::Map(m);
        }
        match self {
            Headers::Map(m) => m,
            Headers::Raw { .. } => unreachable!("converted above"),
        }
    }

    /// Removes every field named `name`.
    pub fn remove(&mut self, name: &[u8]) {
        match self {
            Headers::Raw { buf, at } => at.retain(|&[n, nl, _, _]| {
                !buf[n as usize..(n + nl) as usize].eq_ignore_ascii_case(name)
            }),
            Headers::Map(m) => {
                if let Ok(name) = std::str::from_utf8(name) {
                    m.remove(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &'static [u8]) -> Headers {
        let buf = Bytes::from_static(text);
        let mut at = Vec::new();
        for line in text.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            let colon = line.iter().position(|&c| c == b':').unwrap();
            at.push(field_at(
                &buf,
                &line[..colon],
                line[colon + 1..].trim_ascii(),
            ));
        }
        Headers::Raw { buf, at }
    }

    #[test]
    fn raw_lookups_ignore_case_and_keep_order() {
        let h = raw(b"Host: a\nX-Api-Key: k1\nx-api-key: k2\nAccept: */*\n");
        assert_eq!(h.len(), 4);
        assert_eq!(h.get(b"x-API-key"), Some(&b"k1"[..]));
        assert_eq!(h.get_all(b"X-Api-Key").collect::<Vec<_>>(), [b"k1", b"k2"]);
        assert!(h.contains(b"HOST"));
        assert!(!h.contains(b"cookie"));
        let names: Vec<_> = h.iter().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"Host"[..], b"X-Api-Key", b"x-api-key", b"Accept"]);
    }

    #[test]
    fn editing_converts_once_and_keeps_every_field() {
        let mut h = raw(b"Host: a\nX-Api-Key: k1\nX-Api-Key: k2\n");
        h.map_mut()
            .insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(matches!(h, Headers::Map(_)));
        assert_eq!(h.len(), 4);
        assert_eq!(h.get_all(b"x-api-key").collect::<Vec<_>>(), [b"k1", b"k2"]);
        assert_eq!(h.get(b"Accept"), Some(&b"*/*"[..]));
        h.remove(b"X-API-KEY");
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn raw_remove_drops_every_spelling() {
        let mut h = raw(b"Cookie: a\ncookie: b\nHost: x\n");
        h.remove(b"COOKIE");
        assert!(matches!(h, Headers::Raw { .. }));
        assert_eq!(h.len(), 1);
        assert_eq!(h.get(b"host"), Some(&b"x"[..]));
    }
}
