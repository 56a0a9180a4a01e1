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
