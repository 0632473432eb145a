//! What a connection's bytes travel on: a TCP socket, or, under `luaproxy.test`, an in-memory
//! pipe to a fake upstream or a spec's client. Both sides' connections read and write through
//! [`Stream`], so the test kit runs the very code that serves sockets; a pipe costs the
//! socket path one branch per call.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

thread_local! {
    /// In-memory listeners of this thread by `host:port` (the test kit's fake upstreams):
    /// each is handed the server end of every connection made to its address.
    static LISTENERS: RefCell<std::collections::HashMap<String, Listener>> =
        RefCell::new(std::collections::HashMap::new());
}

/// What an in-memory listener does with a new connection's server end.
pub type Listener = Rc<dyn Fn(Pipe)>;

/// Makes `addr` answer connections from this thread with `accept` (`None`: nothing listens
/// there any more).
pub fn listen_in_memory(addr: &str, accept: Option<Listener>) {
    LISTENERS.with(|l| match accept {
        Some(a) => {
            l.borrow_mut().insert(addr.to_string(), a);
        }
        None => {
            l.borrow_mut().remove(addr);
        }
    });
}

/// Forgets every in-memory listener of this thread.
pub fn clear_listeners() {
    let gone = LISTENERS.with(|l| std::mem::take(&mut *l.borrow_mut()));
    drop(gone);
}

/// On a test kit's runtime, a connection to `addr`: the client end of a pipe to its in-memory
/// listener, or "refused" when there is none (a kit never touches the network). `None`
/// everywhere else: connect for real.
pub fn connect_in_memory(addr: &str) -> Option<Result<Pipe, io::ErrorKind>> {
    if !crate::clock::in_kit() {
        return None;
    }
    let accept = LISTENERS.with(|l| l.borrow().get(addr).cloned());
    Some(match accept {
        Some(accept) => {
            let (client, server) = pair();
            accept(server);
            Ok(client)
        }
        None => Err(io::ErrorKind::ConnectionRefused),
    })
}

pub enum Stream {
    Tcp(TcpStream),
    Mem(Pipe),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl Stream {
    /// Reads without waiting: `WouldBlock` when nothing is there (see `upstream::idle_state`).
    #[inline]
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(buf),
            Stream::Mem(p) => p.try_read(buf),
        }
    }

    /// Looks at what is there without taking it (`Ok(0)`: the peer closed).
    #[inline]
    pub fn poll_peek(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => s.poll_peek(cx, buf),
            Stream::Mem(p) => p.poll_peek(cx, buf),
        }
    }

    /// Ready once a read would not wait (bytes, the end, or an error are there), without
    /// reading: an idle connection waits with this and takes a read buffer only then.
    #[inline]
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Mem(p) => p.poll_read_ready(cx),
        }
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(on),
            Stream::Mem(_) => Ok(()),
        }
    }
}

/// Writes `bufs` with sendmsg(2) where tokio would use writev(2): on a socket both send the
/// same bytes, but writev passes through the VFS layer first (`vfs_writev`: the file-level
/// write checks and fsnotify hooks, 1.7 % of the proxy's CPU in a perf profile of post5k),
/// which sendmsg skips. MSG_NOSIGNAL: a peer that closed gives EPIPE, never SIGPIPE (the host
/// program, `lua`, leaves SIGPIPE's default, which ends the process).
fn poll_sendmsg(
    s: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    use std::os::fd::AsRawFd;
    loop {
        std::task::ready!(s.poll_write_ready(cx))?;
        let sent = s.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: an all-zero msghdr is valid (no address, no control data); its iovec
            // array is `bufs` (IoSlice is guaranteed ABI-compatible with iovec on Unix), read by
            // the kernel during this call only.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
                libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Mem(p) => p.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Mem(p) => Poll::Ready(p.write(&[IoSlice::new(buf)])),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => poll_sendmsg(s, cx, bufs),
            Stream::Mem(p) => Poll::Ready(p.write(bufs)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Mem(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Mem(p) => {
                p.shutdown();
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// One direction of a pipe: bytes written and not yet read, and how it ended.
#[derive(Default)]
struct Lane {
    data: std::collections::VecDeque<u8>,
    /// The writer is done (shut down or dropped): reads return 0 once `data` is empty.
    eof: bool,
    /// The reader is gone: writes fail as they do to a closed socket.
    reader_gone: bool,
    /// What reads fail with instead of returning data or 0 (a reset, a refused connection).
    error: Option<io::ErrorKind>,
    /// The reader waiting for bytes.
    waker: Option<Waker>,
}

impl Lane {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// One end of an in-memory connection (single-threaded: both ends stay on the thread that
/// made them). Writes never wait; reads wait for the other end's writes. Its methods are
/// kept out of line (`#[cold]`): the socket path must not grow by them where it is inlined.
pub struct Pipe {
    rx: Rc<RefCell<Lane>>,
    tx: Rc<RefCell<Lane>>,
}

/// Two connected ends.
pub fn pair() -> (Pipe, Pipe) {
    let a = Rc::new(RefCell::new(Lane::default()));
    let b = Rc::new(RefCell::new(Lane::default()));
    (
        Pipe {
            rx: a.clone(),
            tx: b.clone(),
        },
        Pipe { rx: b, tx: a },
    )
}

impl Pipe {
    fn take(lane: &mut Lane, out: &mut [u8]) -> usize {
        let n = out.len().min(lane.data.len());
        for (o, b) in out.iter_mut().zip(lane.data.drain(..n)) {
            *o = b;
        }
        n
    }

    /// `Some` when a read can finish now: bytes, the end, or an error.
    fn ready(lane: &Lane) -> Option<io::Result<()>> {
        if !lane.data.is_empty() {
            return Some(Ok(()));
        }
        if let Some(kind) = lane.error {
            return Some(Err(kind.into()));
        }
        lane.eof.then_some(Ok(()))
    }

    #[cold]
    #[inline(never)]
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = std::task::ready!(self.poll_peek(cx, buf))?;
        self.rx.borrow_mut().data.drain(..n);
        Poll::Ready(Ok(()))
    }

    #[cold]
    #[inline(never)]
    fn poll_peek(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<usize>> {
        let mut lane = self.rx.borrow_mut();
        match Self::ready(&lane) {
            None => {
                lane.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Some(Err(e)) => Poll::Ready(Err(e)),
            Some(Ok(())) => {
                let n = lane.data.len().min(buf.remaining());
                let (a, b) = lane.data.as_slices();
                let from_a = n.min(a.len());
                buf.put_slice(&a[..from_a]);
                buf.put_slice(&b[..n - from_a]);
                Poll::Ready(Ok(n))
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut lane = self.rx.borrow_mut();
        if Self::ready(&lane).is_some() {
            return Poll::Ready(Ok(()));
        }
        lane.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    #[cold]
    #[inline(never)]
    fn try_read(&self, out: &mut [u8]) -> io::Result<usize> {
        let mut lane = self.rx.borrow_mut();
        match Self::ready(&lane) {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(Err(e)) => Err(e),
            Some(Ok(())) => Ok(Self::take(&mut lane, out)),
        }
    }

    /// Appends `bufs` for the other end to read.
    #[cold]
    #[inline(never)]
    pub fn write(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut lane = self.tx.borrow_mut();
        if lane.reader_gone || lane.eof {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut n = 0;
        for b in bufs {
            lane.data.extend(b.iter());
            n += b.len();
        }
        lane.wake();
        Ok(n)
    }

    /// No more bytes from this end: the other end reads them to the end, then 0.
    #[cold]
    #[inline(never)]
    pub fn shutdown(&self) {
        let mut lane = self.tx.borrow_mut();
        lane.eof = true;
        lane.wake();
    }

    /// The other end's reads fail with `kind` from now on, bytes not yet read included
    /// (`ConnectionReset`: a reset; `ConnectionRefused`: nothing was listening).
    pub fn fail(&self, kind: io::ErrorKind) {
        let mut lane = self.tx.borrow_mut();
        lane.data.clear();
        lane.error = Some(kind);
        lane.wake();
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.shutdown();
        let mut lane = self.rx.borrow_mut();
        lane.reader_gone = true;
        lane.data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[test]
    fn bytes_cross_and_ends_are_seen() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = pair();
            let mut a = Stream::Mem(a);
            let mut b = Stream::Mem(b);
            let mut one = [0u8; 1];
            assert_eq!(
                b.try_read(&mut one).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            tokio::io::AsyncWriteExt::write_all(&mut a, b"hello")
                .await
                .unwrap();
            let mut buf = [0u8; 16];
            let mut rb = ReadBuf::new(&mut buf);
            poll_fn(|cx| Pin::new(&mut b).poll_read(cx, &mut rb))
                .await
                .unwrap();
            assert_eq!(rb.filled(), b"hello");
            drop(a);
            let mut rb = ReadBuf::new(&mut buf);
            poll_fn(|cx| Pin::new(&mut b).poll_read(cx, &mut rb))
                .await
                .unwrap();
            assert!(rb.filled().is_empty());
            assert_eq!(
                b.try_read(&mut one).unwrap(),
                0,
                "a closed pipe reads as the end"
            );
            let err = poll_fn(|cx| Pin::new(&mut b).poll_write(cx, b"x")).await;
            assert_eq!(err.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        });
    }

    #[test]
    fn a_failed_end_fails_reads() {
        let (a, b) = pair();
        a.write(&[IoSlice::new(b"lost")]).unwrap();
        a.fail(io::ErrorKind::ConnectionReset);
        let mut buf = [0u8; 4];
        assert_eq!(
            b.try_read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
    }
}
