//! WebSockets on the HTTPS port (`/$iothub/websocket`): the upgrade and a [`ByteStream`] over
//! binary frames, so MQTT (subprotocol `mqtt`) runs on it unchanged.

use crate::transport::http::{Request, Response};
use crate::transport::stream::ByteStream;
use dps_core::websocket::{accept_key, encode_frame, parse_client_frame, FrameError, Opcode};
use std::io;

/// The subprotocols served, as clients spell them in lower case.
pub const MQTT: &str = "mqtt";
pub const AMQP: &str = "amqpwsb10";

/// Is this request a WebSocket upgrade?
pub fn is_upgrade(req: &Request) -> bool {
    req.method == "GET" && req.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

/// The 101 answer and the subprotocol chosen, or a 400 naming what is wrong. Any path is
/// accepted (C# and Java connect to `/`), and the subprotocol token is echoed exactly as the
/// client offered it (the C SDK offers `MQTT`), docs/device-protocol.md §3.1.
pub fn handshake(req: &Request, supported: &[&str]) -> Result<(Response, String), String> {
    let key = req.header("sec-websocket-key").ok_or("missing Sec-WebSocket-Key")?;
    if req.header("sec-websocket-version") != Some("13") {
        return Err("Sec-WebSocket-Version must be 13".into());
    }
    let offered = req.header("sec-websocket-protocol").unwrap_or("");
    let chosen = offered
        .split(',')
        .map(str::trim)
        .find(|p| supported.iter().any(|s| s.eq_ignore_ascii_case(p)))
        .ok_or_else(|| format!("no supported WebSocket subprotocol offered (supported: {})", supported.join(", ")))?;
    let resp = Response::new(101)
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Accept", accept_key(key))
        .header("Sec-WebSocket-Protocol", chosen);
    Ok((resp, chosen.to_ascii_lowercase()))
}

/// Binary messages of a WebSocket as a byte stream. Pings are answered, a close is echoed and
/// ends the stream, text frames and protocol errors end it too.
pub struct WsStream<'a, S> {
    inner: &'a mut S,
    /// Raw bytes received and not yet parsed into frames.
    raw: Vec<u8>,
    /// Payload bytes parsed and not yet handed out.
    data: Vec<u8>,
    closed: bool,
    max_frame: usize,
}

impl<'a, S: ByteStream> WsStream<'a, S> {
    /// `leftover`: bytes that arrived after the upgrade request.
    pub fn new(inner: &'a mut S, leftover: Vec<u8>, max_frame: usize) -> Self {
        WsStream { inner, raw: leftover, data: Vec::new(), closed: false, max_frame }
    }
}

impl<S: ByteStream> ByteStream for WsStream<'_, S> {
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.data.is_empty() {
                let n = buf.len().min(self.data.len());
                buf[..n].copy_from_slice(&self.data[..n]);
                self.data.drain(..n);
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            match parse_client_frame(&self.raw, self.max_frame) {
                Ok(Some((frame, used))) => {
                    self.raw.drain(..used);
                    match frame.opcode {
                        Opcode::Binary | Opcode::Continuation => self.data.extend_from_slice(&frame.payload),
                        Opcode::Ping => self.inner.send(&encode_frame(Opcode::Pong, &frame.payload)).await?,
                        Opcode::Pong => {}
                        Opcode::Close => {
                            self.closed = true;
                            let _ = self.inner.send(&encode_frame(Opcode::Close, frame.payload.get(..2).unwrap_or(&[]))).await;
                        }
                        Opcode::Text => {
                            self.closed = true;
                            // 1003: unsupported data; MQTT and AMQP are binary.
                            let _ = self.inner.send(&encode_frame(Opcode::Close, &1003u16.to_be_bytes())).await;
                        }
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    self.closed = true;
                    let code: u16 = if e == FrameError::TooLarge { 1009 } else { 1002 };
                    let _ = self.inner.send(&encode_frame(Opcode::Close, &code.to_be_bytes())).await;
                    return Ok(0);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.inner.read_some(&mut chunk).await?;
            if n == 0 {
                self.closed = true;
                return Ok(0);
            }
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.inner.send(&encode_frame(Opcode::Binary, data)).await
    }
}
