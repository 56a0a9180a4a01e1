//! The byte stream the device protocols run on: a TLS stream, or a WebSocket carried by one.

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::io;

#[allow(async_fn_in_trait)] // used on one thread (glommio); the futures need not be Send
pub trait ByteStream {
    /// Reads some bytes; 0 at end of stream. Cancellation-safe: a cancelled read loses nothing.
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `data` and flushes.
    async fn send(&mut self, data: &[u8]) -> io::Result<()>;
}

impl<T: AsyncRead + AsyncWrite + Unpin> ByteStream for T {
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf).await
    }
    async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await?;
        self.flush().await
    }
}

/// How a device connection (MQTT or AMQP) ended, for the logs.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Closed,
    Disconnect,
    Timeout,
    Shutdown,
    TooLarge,
    Malformed(String),
    Refused(&'static str),
    ProtocolViolation(&'static str),
}

impl From<Interrupted> for End {
    fn from(i: Interrupted) -> End {
        match i {
            Interrupted::Timeout => End::Timeout,
            Interrupted::Shutdown => End::Shutdown,
            Interrupted::Io => End::Closed,
        }
    }
}

/// Why [`read_before`] returned no bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Interrupted {
    Timeout,
    Shutdown,
    Io,
}

/// Reads some bytes, giving up at `deadline` or once `stop` is set (checked every 250 ms;
/// reads are cancellation-safe, so nothing is lost between slices).
pub async fn read_before<S: ByteStream>(
    s: &mut S,
    buf: &mut [u8],
    deadline: std::time::Instant,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<usize, Interrupted> {
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Interrupted::Shutdown);
        }
        if std::time::Instant::now() >= deadline {
            return Err(Interrupted::Timeout);
        }
        if let Ok(r) = glommio::timer::timeout(std::time::Duration::from_millis(250), async { Ok(s.read_some(buf).await) }).await {
            return r.map_err(|_| Interrupted::Io);
        }
    }
}
