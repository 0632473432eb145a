//! Socket helpers both sides of the wire share: reading into a buffer, vectored writes,
//! deadlines that touch the timer wheel only when something waits, and the short error
//! reasons Lua sees. No mlua here.

use bytes::BytesMut;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// What a connection reads into at once: its read buffer's size, and the growth step.
pub(super) const READ_CHUNK: usize = 16 * 1024;

/// Reads what `stream` has into `buf` (growing it by `READ_CHUNK` when nearly full);
/// `Ok(0)` is end of stream. Shared by both sides' connections.
///
/// Through tokio's `poll_read`, not `try_read`: a read that does not fill the space offered
/// clears the socket's readiness (the kernel buffer is drained), so a later `try_read` on an
/// idle connection costs no syscall unless the reactor saw bytes arrive meanwhile (that is
/// how the pool proves a connection clean, `upstream::pool_take`); and every read draws on
/// the task's cooperative budget, so a peer whose bytes never run out cannot keep the
/// worker from its other connections.
#[inline]
pub fn poll_fill<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    let mut space = tokio::io::ReadBuf::uninit(buf.spare_capacity_mut());
    std::task::ready!(tokio::io::AsyncRead::poll_read(
        Pin::new(stream),
        cx,
        &mut space
    ))?;
    let n = space.filled().len();
    // SAFETY: the read initialized the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// True when `buf` holds the blank line that ends a head, looking only at bytes from `from`
/// on (minus the three a terminator can straddle). Heads are parsed only once this holds, so
/// a head trickling in byte by byte costs one scan, not one full parse per read (which was
/// quadratic: a 32 KiB head sent a byte at a time meant 32k parses of up to 32 KiB each).
pub fn head_complete(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(3);
    buf[start.min(buf.len())..]
        .windows(2)
        .enumerate()
        .any(|(i, w)| {
            w[0] == b'\n'
                && (w[1] == b'\n' || (w[1] == b'\r' && buf.get(start + i + 2) == Some(&b'\n')))
        })
}

pub fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset by peer".into(),
        BrokenPipe => "upstream closed connection".into(),
        TimedOut => "timeout".into(),
        AddrNotAvailable => "address not available".into(),
        _ => e.to_string().to_lowercase(),
    }
}

/// Appends `n` in base `radix` (10 or 16, lowercase): lengths and chunk sizes on the wire.
pub fn push_num(out: &mut impl bytes::BufMut, mut n: u64, radix: u64) {
    let mut b = [0u8; 20];
    let mut i = b.len();
    loop {
        i -= 1;
        let d = (n % radix) as u8;
        b[i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        n /= radix;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&b[i..]);
}

/// Writes all of `parts`, in order, with as few vectored writes as the socket takes; `write`
/// makes one attempt (`Pending` when the socket is full). Both sides' connections send
/// through here.
pub async fn write_all_parts(
    parts: &mut [&[u8]],
    mut write: impl FnMut(&mut Context<'_>, &[IoSlice<'_>]) -> Poll<io::Result<usize>>,
) -> io::Result<()> {
    let mut first = 0;
    loop {
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
        if first == parts.len() {
            return Ok(());
        }
        let n = poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); 64];
            let mut k = 0;
            for p in parts[first..].iter().filter(|p| !p.is_empty()).take(64) {
                slices[k] = IoSlice::new(p);
                k += 1;
            }
            write(cx, &slices[..k])
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut n = n;
        while n > 0 {
            let len = parts[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                parts[first] = &parts[first][n..];
                n = 0;
            }
        }
    }
}

/// A deadline checked only when something would wait, with one timer kept across uses: the
/// timer is moved only when it fires before the deadline in force (or is set after it), so
/// a busy connection whose deadline moves on every request does not touch the timer wheel
/// each time.
#[derive(Default)]
pub struct LazyDeadline {
    timer: Option<Pin<Box<crate::clock::Sleep>>>,
}

impl LazyDeadline {
    /// True once `at` has passed; otherwise the timer is registered with `cx`.
    pub fn passed(&mut self, at: std::time::Instant, cx: &mut Context<'_>) -> bool {
        let t = self
            .timer
            .get_or_insert_with(|| Box::pin(crate::clock::sleep_until(at)));
        if t.deadline() > at {
            t.as_mut().reset(at);
        }
        loop {
            if t.as_mut().poll(cx).is_pending() {
                return false;
            }
            if crate::clock::now() >= at {
                return true;
            }
            t.as_mut().reset(at);
        }
    }
}

/// An idle deadline for a body stream: armed when a read starts waiting, cleared by progress.
/// The timer is made (and registered with the timer wheel) only if a read actually has to
/// wait: most bodies of a proxied request are there when they are read (making it for each
/// of a request's bodies up front was 2-3 allocations and clock reads per request).
pub struct IdleTimer {
    idle: Duration,
    timer: Option<Pin<Box<crate::clock::Sleep>>>,
    waiting: bool,
}

impl IdleTimer {
    #[inline]
    pub fn new(idle: Duration) -> IdleTimer {
        IdleTimer {
            idle,
            timer: None,
            waiting: false,
        }
    }

    /// Data arrived: the next wait starts a fresh period.
    pub fn progress(&mut self) {
        self.waiting = false;
    }

    /// Called when a read returned `Pending`: true once `idle` has passed without progress.
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            let deadline = crate::clock::now() + self.idle;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(crate::clock::sleep_until(deadline))),
            }
        }
        let t = self.timer.as_mut().expect("made above");
        t.as_mut().poll(cx).is_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_is_found_across_reads() {
        let head = b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n";
        assert!(!head_complete(&head[..head.len() - 1], 0));
        for from in 0..head.len() {
            assert!(head_complete(head, from), "from {from}");
        }
        assert!(head_complete(b"GET / HTTP/1.0\n\n", 14));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n", 0));
    }
}
