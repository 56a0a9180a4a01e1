//! A bound on how long a write may wait for the peer: a client that stops reading fills its
//! receive window and our send buffer, and every later write would wait for ever, pinning the
//! connection's task and slot. Wrapped around the TCP stream under TLS, it fails a write (and so
//! ends the connection) once writing has made no progress for the limit, whichever protocol is
//! writing. Reads pass through untouched.
//!
//! It also gathers a vectored write into one send: rustls hands over a handshake flight as
//! several records (ServerHello, ChangeCipherSpec, the encrypted rest), and glommio's stream
//! has no vectored write, so each record would leave in a syscall and a TCP segment of its own,
//! and the client would be woken for each.

use futures::io::{AsyncRead, AsyncWrite};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The most a vectored write gathers into one send (more than a handshake flight).
const GATHER_MAX: usize = 16 * 1024;

pub struct WriteDeadline<S> {
    inner: S,
    /// Where a vectored write's buffers are gathered; kept between writes.
    gathered: Vec<u8>,
    limit: Duration,
    /// When the pending write started waiting, and the timer that wakes us at its limit.
    stalled: Option<(Instant, glommio::timer::Timer)>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline { inner, gathered: Vec::new(), limit, stalled: None }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner operation is pending: keep waiting until the limit, then fail.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let (since, timer) = self.stalled.get_or_insert_with(|| (Instant::now(), glommio::timer::Timer::new(limit)));
        if since.elapsed() >= limit || Pin::new(timer).poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading")));
        }
        Poll::Pending
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(r, cx)
    }

    /// Gathers the buffers (up to `GATHER_MAX` bytes) and writes them with one `poll_write`.
    /// Nothing is kept for later: a pending or partial write reports what was written, and the
    /// caller offers the rest again, as with any write.
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        let r = match (nonempty.next(), nonempty.next()) {
            (None, _) => return Poll::Ready(Ok(0)),
            (Some(only), None) => Pin::new(&mut this.inner).poll_write(cx, only),
            _ => {
                this.gathered.clear();
                for b in bufs {
                    let room = GATHER_MAX - this.gathered.len();
                    this.gathered.extend_from_slice(&b[..b.len().min(room)]);
                    if this.gathered.len() == GATHER_MAX {
                        break;
                    }
                }
                Pin::new(&mut this.inner).poll_write(cx, &this.gathered)
            }
        };
        this.progress(r, cx)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(r, cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_close(cx);
        this.progress(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{WriteDeadline, GATHER_MAX};
    use futures::io::{AsyncWrite, AsyncWriteExt};
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    /// Records each write it is given; takes at most `cap` bytes of each.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        cap: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.cap);
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn wrapped(cap: usize) -> WriteDeadline<Recorder> {
        WriteDeadline::new(Recorder { writes: Vec::new(), cap }, Duration::from_secs(1))
    }

    #[test]
    fn a_vectored_write_leaves_in_one_send() {
        let mut w = wrapped(usize::MAX);
        let (a, b, c) = (vec![1u8; 127], vec![2u8; 6], vec![3u8; 1131]);
        let bufs = [io::IoSlice::new(&a), io::IoSlice::new(&[]), io::IoSlice::new(&b), io::IoSlice::new(&c)];
        let n = futures::executor::block_on(w.write_vectored(&bufs)).unwrap();
        assert_eq!(n, a.len() + b.len() + c.len());
        assert_eq!(w.inner.writes, vec![[a, b, c].concat()], "one write, the buffers in order");
    }

    #[test]
    fn a_partial_gathered_write_reports_what_was_taken() {
        // The peer's window takes 100 bytes: 100 are reported, the caller resends the rest.
        let mut w = wrapped(100);
        let (a, b) = (vec![1u8; 80], vec![2u8; 80]);
        let n = futures::executor::block_on(w.write_vectored(&[io::IoSlice::new(&a), io::IoSlice::new(&b)])).unwrap();
        assert_eq!(n, 100);
        assert_eq!(w.inner.writes[0], [&a[..], &b[..20]].concat());
        // More than GATHER_MAX is cut at it.
        let mut w = wrapped(usize::MAX);
        let big = vec![7u8; GATHER_MAX];
        let n = futures::executor::block_on(w.write_vectored(&[io::IoSlice::new(&big), io::IoSlice::new(&a)])).unwrap();
        assert_eq!(n, GATHER_MAX);
    }
}
