//! A device's byte pipe: a TLS stream as is, or WebSocket binary frames over it (client side:
//! masked frames out, server frames in, pings answered).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub trait Wire {
    async fn send(&mut self, b: &[u8]) -> io::Result<()>;
    /// Appends what arrives to `buf`; 0 means the peer closed.
    async fn recv(&mut self, buf: &mut BytesMut) -> io::Result<usize>;
    async fn close(&mut self);
}

pub struct Plain<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for Plain<S> {
    async fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.0.write_all(b).await
    }
    async fn recv(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let n = self.0.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

pub struct Ws<S> {
    inner: S,
    raw: BytesMut,
    mask: u32,
}

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    /// The opening handshake on `path` asking for `protocol`; fails unless the server answers 101
    /// with that subprotocol.
    pub async fn connect(mut inner: S, host: &str, path: &str, protocol: &str, seed: u32) -> io::Result<Ws<S>> {
        let key = B64.encode(seed.wrapping_mul(2_654_435_761).to_be_bytes().repeat(4));
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        );
        inner.write_all(req.as_bytes()).await?;
        let mut raw = BytesMut::new();
        let end = loop {
            if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if raw.len() > 16384 {
                return Err(bad("WebSocket answer head too large"));
            }
            let mut chunk = [0u8; 2048];
            let n = inner.read(&mut chunk).await?;
            if n == 0 {
                return Err(bad("closed during the WebSocket handshake"));
            }
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 101") || !head.contains(&format!("sec-websocket-protocol: {}", protocol.to_ascii_lowercase())) {
            return Err(bad("WebSocket upgrade refused"));
        }
        let _ = raw.split_to(end);
        Ok(Ws { inner, raw, mask: seed | 1 })
    }

    async fn frame(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut f = Vec::with_capacity(payload.len() + 14);
        f.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = self.mask.to_be_bytes();
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.inner.write_all(&f).await
    }

    /// One complete server frame from `raw`, if there is one: (fin, opcode, payload).
    fn take_frame(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        let r = &self.raw;
        if r.len() < 2 {
            return Ok(None);
        }
        if r[1] & 0x80 != 0 {
            return Err(bad("server frames must not be masked"));
        }
        let (len, at) = match r[1] & 0x7f {
            126 if r.len() >= 4 => (u16::from_be_bytes([r[2], r[3]]) as usize, 4),
            127 if r.len() >= 10 => (u64::from_be_bytes([r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]]) as usize, 10),
            126 | 127 => return Ok(None),
            n => (n as usize, 2),
        };
        if len > 1 << 20 {
            return Err(bad("WebSocket frame too large"));
        }
        if r.len() < at + len {
            return Ok(None);
        }
        let opcode = r[0] & 0x0f;
        let frame = self.raw.split_to(at + len);
        Ok(Some((opcode, frame[at..].to_vec())))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for Ws<S> {
    async fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.frame(0x2, b).await
    }
    async fn recv(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            match self.take_frame()? {
                Some((0x0..=0x2, payload)) if !payload.is_empty() => {
                    buf.extend_from_slice(&payload);
                    return Ok(payload.len());
                }
                Some((0x8, _)) => return Ok(0),
                Some((0x9, payload)) => self.frame(0xA, &payload).await?,
                Some(_) => {}
                None => {
                    let mut chunk = [0u8; 4096];
                    let n = self.inner.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(0);
                    }
                    self.raw.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }
    async fn close(&mut self) {
        let _ = self.frame(0x8, &[0x03, 0xe8]).await;
        let _ = self.inner.shutdown().await;
    }
}

/// A WebSocket as a byte stream, for clients that want `AsyncRead + AsyncWrite` (fe2o3-amqp):
/// a task moves bytes between one end of an in-memory pipe and the WebSocket.
pub fn into_stream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(mut ws: Ws<S>) -> tokio::io::DuplexStream {
    let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut up = vec![0u8; 16 * 1024];
        let mut down = BytesMut::with_capacity(16 * 1024);
        loop {
            tokio::select! {
                n = theirs.read(&mut up) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => if ws.send(&up[..n]).await.is_err() { break },
                },
                n = ws.recv(&mut down) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if theirs.write_all(&down).await.is_err() { break }
                        down.clear();
                    }
                },
            }
        }
        ws.close().await;
    });
    ours
}
