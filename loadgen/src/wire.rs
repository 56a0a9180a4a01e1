//! A device's byte pipe: a TLS stream as is, or WebSocket binary frames over it (client side:
//! masked frames out, server frames in, pings answered).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use std::io::{self, Write};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

pub trait Wire {
    async fn send(&mut self, b: &[u8]) -> io::Result<()>;
    /// Appends what arrives to `buf`; 0 means the peer closed.
    async fn recv(&mut self, buf: &mut BytesMut) -> io::Result<usize>;
    async fn close(&mut self);
    /// Sends `last` and closes, in as few writes as the wire allows.
    async fn finish(&mut self, last: &[u8]) {
        let _ = self.send(last).await;
        self.close().await;
    }
}

/// A device's TLS session over `io`, with `first` queued before the handshake: rustls keeps
/// what is written before the handshake ends and sends it right behind the client's Finished,
/// in the same write, so the server reads the handshake's end and the first request at once
/// (a client that pipelines; the official SDKs wait for the handshake, then send).
pub async fn open_tls<IO: AsyncRead + AsyncWrite + Unpin>(
    cfg: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
    io: IO,
    first: &[u8],
) -> io::Result<TlsStream<IO>> {
    let mut queued = Ok(());
    let s = tokio_rustls::TlsConnector::from(cfg)
        .connect_with(name, io, |conn| {
            if !first.is_empty() {
                queued = conn.writer().write_all(first);
            }
        })
        .await?;
    queued.map(|_| s)
}

/// Writes `b` and flushes: a written message must leave now, since the device waits for the
/// answer. `write_all` alone may leave it in the TLS session: tokio-rustls reports a write
/// done once the plaintext is in the session, even when the socket refused the record (as
/// tokio does once the task has spent its cooperative budget), and only a flush or a later
/// write sends it; the device then waits for an answer to bytes the server never got.
pub async fn send_all<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> io::Result<()> {
    w.write_all(b).await?;
    w.flush().await
}

/// A TLS stream as is.
pub struct Plain<IO>(pub TlsStream<IO>);

impl<IO: AsyncRead + AsyncWrite + Unpin> Wire for Plain<IO> {
    async fn send(&mut self, b: &[u8]) -> io::Result<()> {
        send_all(&mut self.0, b).await
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
    /// `last` is only encrypted into the session's send queue; the shutdown then writes it
    /// together with the close_notify (one gathered write, one TCP segment), so the server
    /// reads the end of the session at once instead of waking for each part.
    async fn finish(&mut self, last: &[u8]) {
        if self.0.get_mut().1.writer().write_all(last).is_err() {
            return;
        }
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
        send_all(&mut inner, req.as_bytes()).await?;
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
        send_all(&mut self.inner, &f).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    /// A client transport that notes the size of every write: one write here is one `writev`,
    /// so one TCP segment, on a socket.
    struct Counted<S> {
        inner: S,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = r {
                self.writes.lock().unwrap().push(n);
            }
            r
        }
        // Gathered, as a socket's writev: all the slices in one write.
        fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &all)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The client's flights of a pipelining session: ClientHello; Finished with the opening;
    /// the last bytes with the close_notify. Three writes, where connecting first and sending
    /// after (Finished, opening) and sending the last bytes before closing (last bytes,
    /// close_notify) took five; the server reads each part whole and sees a clean close.
    #[tokio::test]
    async fn a_session_leaves_in_three_flights() {
        tokio::time::timeout(std::time::Duration::from_secs(10), three_flights()).await.expect("the session did not finish");
    }

    /// A message sent on a TLS session or a WebSocket reaches the server before the device
    /// waits for the answer, even on a transport that keeps what is written until a flush
    /// (see [`send_all`]).
    #[tokio::test]
    async fn a_message_leaves_before_the_device_waits_for_the_answer() {
        let exchange = async {
            let (server, client) = configs();
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let serve = tokio::spawn(async move {
                let mut s = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(theirs).await.unwrap();
                let mut got = [0u8; 5];
                s.read_exact(&mut got).await.unwrap();
                s.write_all(b"answer").await.unwrap();
                s.flush().await.unwrap();
                got
            });
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let io = crate::held_writes::HeldWrites::new(ours);
            let mut w = Plain(open_tls(Arc::new(client), name, io, b"").await.unwrap());
            w.send(b"hello").await.unwrap();
            let mut buf = BytesMut::new();
            while buf.len() < 6 {
                assert!(w.recv(&mut buf).await.unwrap() > 0);
            }
            assert_eq!(serve.await.unwrap(), *b"hello");

            // A WebSocket: the upgrade request, then a frame.
            let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
            let serve = tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    theirs.read_exact(&mut b).await.unwrap();
                    head.push(b[0]);
                }
                theirs.write_all(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").await.unwrap();
                let mut frame = [0u8; 2 + 4 + 2];
                theirs.read_exact(&mut frame).await.unwrap();
                theirs.write_all(&[0x82, 2, b'o', b'k']).await.unwrap();
                frame
            });
            let mut ws =
                Ws::connect(crate::held_writes::HeldWrites::new(ours), "localhost", "/$iothub/websocket", "mqtt", 1).await.unwrap();
            ws.send(b"hi").await.unwrap();
            let mut buf = BytesMut::new();
            assert_eq!(ws.recv(&mut buf).await.unwrap(), 2);
            assert_eq!(&buf[..], b"ok");
            let frame = serve.await.unwrap();
            assert_eq!(frame[0], 0x82, "a final binary frame");
            assert_eq!(frame[1], 0x80 | 2, "masked, two bytes");
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), exchange).await.expect("a message was held back");
    }

    /// A server and a client configuration that trusts it (a self-signed `localhost`).
    fn configs() -> (rustls::ServerConfig, rustls::ClientConfig) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, client)
    }

    async fn three_flights() {
        let (server, client) = configs();
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let serve = tokio::spawn(async move {
            let mut s = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(theirs).await.unwrap();
            let mut got = vec![0u8; 7];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"opening");
            s.write_all(b"answer").await.unwrap();
            // To the close_notify: a close without one is an error here.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            rest
        });
        let writes = Arc::new(Mutex::new(Vec::new()));
        let io = Counted { inner: ours, writes: writes.clone() };
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = open_tls(Arc::new(client), name, io, b"opening").await.unwrap();
        let mut w = Plain(tls);
        let mut buf = BytesMut::new();
        while buf.len() < 6 {
            assert!(w.recv(&mut buf).await.unwrap() > 0);
        }
        assert_eq!(&buf[..], b"answer");
        w.finish(b"last").await;
        assert_eq!(serve.await.unwrap(), b"last");
        let writes = writes.lock().unwrap().clone();
        assert_eq!(writes.len(), 3, "the client's writes: {writes:?}");
    }
}
