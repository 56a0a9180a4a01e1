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
//!
//! And it can hold writes back until the connection is about to wait for its peer
//! ([`WriteDeadline::holding`]): TLS 1.3 ends the server's handshake with a session ticket,
//! which the TLS layer sends the moment the handshake completes, alone. Held, it leaves with
//! the first answer instead (a client that sent its first request along with its Finished
//! gets ticket and answer in one segment, one wake-up instead of two), or as soon as the
//! server would otherwise wait for the client.

use futures::io::{AsyncRead, AsyncWrite};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The most a vectored write gathers into one send (more than a handshake flight), and the
/// most that is held back.
const GATHER_MAX: usize = 16 * 1024;

pub struct WriteDeadline<S: AsyncWrite + Unpin> {
    inner: S,
    /// Where a vectored write's buffers are gathered; kept between writes.
    gathered: Vec<u8>,
    /// Taken (reported written) but not sent yet: they leave before anything written later,
    /// before a read waits for the peer, at a flush once no longer holding, or at the close.
    held: Vec<u8>,
    /// Writes are held instead of sent (until [`WriteDeadline::release`]).
    holding: bool,
    limit: Duration,
    /// When the pending write started waiting, and the timer that wakes us at its limit.
    stalled: Option<(Instant, glommio::timer::Timer)>,
}

impl<S: AsyncWrite + Unpin> WriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline { inner, gathered: Vec::new(), held: Vec::new(), holding: false, limit, stalled: None }
    }

    /// Holds what is written (up to `GATHER_MAX` bytes) until a read would wait for the
    /// peer, or until [`release`](Self::release). A flush does not send held bytes: the TLS
    /// layer flushes its ticket as the handshake ends, and holding it is the point.
    pub fn holding(mut self) -> WriteDeadline<S> {
        self.holding = true;
        self
    }

    /// Stops holding: what is held leaves with the next write (in the same send), or before
    /// the next read waits, or at the next flush or the close.
    pub fn release(&mut self) {
        self.holding = false;
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

    /// While holding, takes `bufs` into `held`, as long as they fit; else sends them.
    fn write_bufs(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.holding && self.held.len() + total <= GATHER_MAX {
            for b in bufs {
                self.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(total));
        }
        self.send(cx, bufs)
    }

    /// Sends what is held and then as much of `bufs` as one send takes (up to `GATHER_MAX`
    /// in all); how many bytes of `bufs` were sent (held ones were counted when taken).
    fn send(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        loop {
            let held = self.held.len();
            let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
            let r = match (held, nonempty.next(), nonempty.next()) {
                (0, None, _) => return Poll::Ready(Ok(0)),
                (0, Some(only), None) => Pin::new(&mut self.inner).poll_write(cx, only),
                _ => {
                    self.gathered.clear();
                    self.gathered.extend_from_slice(&self.held);
                    for b in bufs {
                        let room = GATHER_MAX.saturating_sub(self.gathered.len());
                        self.gathered.extend_from_slice(&b[..b.len().min(room)]);
                    }
                    Pin::new(&mut self.inner).poll_write(cx, &self.gathered)
                }
            };
            match r {
                // Part of the held bytes only: the rest is offered again at once (a full
                // socket buffer answers Pending and wakes us when there is room).
                Poll::Ready(Ok(n)) if held > 0 && n > 0 && n < held => {
                    self.held.drain(..n);
                }
                Poll::Ready(Ok(n)) if held > 0 && n >= held => {
                    self.held.clear();
                    self.stalled = None;
                    if n > held || total == 0 {
                        return Poll::Ready(Ok(n - held));
                    }
                }
                other => return self.progress(other, cx),
            }
        }
    }

    /// Sends everything held.
    fn send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send(cx, &[]) {
            Poll::Ready(Ok(_)) if !self.held.is_empty() => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(r) => Poll::Ready(r.map(|_| ())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WriteDeadline<S> {
    /// A read that would wait first sends what is held: the peer may be waiting for it.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending if !this.held.is_empty() => match this.send_held(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
            r => r,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().write_bufs(cx, &[io::IoSlice::new(buf)])
    }

    /// Gathers the buffers (with what is held; up to `GATHER_MAX` bytes) and writes them with
    /// one `poll_write`. A pending or partial write reports what was written, and the caller
    /// offers the rest again, as with any write.
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.get_mut().write_bufs(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.holding {
            std::task::ready!(this.send_held(cx))?;
        }
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(r, cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.send_held(cx))?;
        let r = Pin::new(&mut this.inner).poll_close(cx);
        this.progress(r, cx)
    }
}

/// Dropped with bytes still held (a failed handshake's alert, a task ended by its timeout):
/// one try to send them without waiting, as a close would have.
impl<S: AsyncWrite + Unpin> Drop for WriteDeadline<S> {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            let _ = Pin::new(&mut self.inner).poll_write(&mut cx, &self.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{WriteDeadline, GATHER_MAX};
    use futures::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    /// Records each write it is given; takes at most `cap` bytes of each. Reads: what is
    /// queued in `incoming`, else they would wait.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        cap: usize,
        incoming: Vec<Vec<u8>>,
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

    impl AsyncRead for Recorder {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
            if self.incoming.is_empty() {
                return Poll::Pending;
            }
            let next = self.incoming.remove(0);
            buf[..next.len()].copy_from_slice(&next);
            Poll::Ready(Ok(next.len()))
        }
    }

    fn wrapped(cap: usize) -> WriteDeadline<Recorder> {
        WriteDeadline::new(Recorder { writes: Vec::new(), cap, incoming: Vec::new() }, Duration::from_secs(1))
    }

    /// Polls one read once: Some(n) if it completed, None if it would wait.
    fn read_once(w: &mut WriteDeadline<Recorder>) -> Option<usize> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut buf = [0u8; 64];
        match Pin::new(w).poll_read(&mut cx, &mut buf) {
            Poll::Ready(r) => Some(r.unwrap()),
            Poll::Pending => None,
        }
    }

    /// A TLS 1.3 server's connection: its flight leaves when it waits for the client's
    /// Finished; the ticket written as the handshake ends (and flushed) is held while the
    /// client's first request is read, and leaves in one send with the answer.
    #[test]
    fn the_ticket_leaves_with_the_first_answer() {
        let mut w = wrapped(usize::MAX).holding();
        let (hello, rest) = (vec![1u8; 127], vec![2u8; 1200]);
        futures::executor::block_on(w.write_vectored(&[io::IoSlice::new(&hello), io::IoSlice::new(&rest)])).unwrap();
        assert!(w.inner.writes.is_empty(), "held while the server has not waited");
        assert_eq!(read_once(&mut w), None);
        assert_eq!(w.inner.writes, vec![[hello, rest].concat()], "sent in one write before waiting");
        // The client's Finished and first request arrive; the ticket is written and flushed.
        w.inner.incoming.push(vec![3u8; 40]);
        assert_eq!(read_once(&mut w), Some(40));
        let ticket = vec![4u8; 90];
        futures::executor::block_on(async {
            w.write_all(&ticket).await.unwrap();
            w.flush().await.unwrap();
        });
        assert_eq!(w.inner.writes.len(), 1, "the ticket is held across the flush");
        w.release();
        w.inner.incoming.push(vec![5u8; 30]);
        assert_eq!(read_once(&mut w), Some(30), "a read that need not wait sends nothing");
        let answer = vec![6u8; 300];
        futures::executor::block_on(w.write_all(&answer)).unwrap();
        assert_eq!(w.inner.writes.len(), 2);
        assert_eq!(w.inner.writes[1], [ticket, answer].concat(), "ticket and answer in one send");
        // Released: writes go straight out.
        futures::executor::block_on(w.write_all(&[7u8; 10])).unwrap();
        assert_eq!(w.inner.writes.len(), 3);
    }

    #[test]
    fn held_bytes_leave_at_a_flush_after_release_at_the_close_and_when_dropped() {
        let mut w = wrapped(usize::MAX).holding();
        futures::executor::block_on(w.write_all(&[1u8; 10])).unwrap();
        w.release();
        futures::executor::block_on(w.flush()).unwrap();
        assert_eq!(w.inner.writes, vec![vec![1u8; 10]]);

        let mut w = wrapped(usize::MAX).holding();
        futures::executor::block_on(w.write_all(&[2u8; 10])).unwrap();
        futures::executor::block_on(w.close()).unwrap();
        assert_eq!(w.inner.writes, vec![vec![2u8; 10]], "a close sends what is held");

        // A failed handshake's alert, the task dropped: one send on the way out.
        let sent = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        struct Shared(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);
        impl AsyncWrite for Shared {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                self.0.borrow_mut().extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let mut w = WriteDeadline::new(Shared(sent.clone()), Duration::from_secs(1)).holding();
        futures::executor::block_on(w.write_all(&[3u8; 7])).unwrap();
        drop(w);
        assert_eq!(*sent.borrow(), vec![3u8; 7]);
    }

    /// The peer's window takes part of what is held: the rest is offered again, and the
    /// bytes arrive whole and in order.
    #[test]
    fn held_bytes_sent_in_parts_arrive_whole() {
        let mut w = wrapped(100).holding();
        let (a, b) = (vec![1u8; 150], vec![2u8; 120]);
        futures::executor::block_on(w.write_all(&a)).unwrap();
        w.release();
        futures::executor::block_on(w.write_all(&b)).unwrap();
        assert!(w.inner.writes.iter().all(|x| x.len() <= 100));
        assert_eq!(w.inner.writes.concat(), [a, b].concat());
        // More than GATHER_MAX is not held.
        let mut w = wrapped(usize::MAX).holding();
        futures::executor::block_on(w.write_all(&vec![9u8; GATHER_MAX + 1])).unwrap();
        assert_eq!(w.inner.writes.concat().len(), GATHER_MAX + 1);
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
