//! WebSocket framing (RFC 6455) for MQTT and AMQP over WebSockets: the opening handshake's
//! accept key, and frames parsed from a buffer without consuming it until complete.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::digest;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    B64.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{}{GUID}", key.trim()).as_bytes()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: Opcode,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Reserved bits, unknown opcode, unmasked client frame, fragmented or long control frame.
    Protocol(&'static str),
    TooLarge,
}

/// Parses one client frame from the front of `buf`: `Ok(None)` when more bytes are needed,
/// else the frame and the bytes it used. Client frames must be masked (RFC 6455 §5.1).
pub fn parse_client_frame(buf: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let opcode = match b0 & 0x0f {
        0 => Opcode::Continuation,
        1 => Opcode::Text,
        2 => Opcode::Binary,
        8 => Opcode::Close,
        9 => Opcode::Ping,
        10 => Opcode::Pong,
        _ => return Err(FrameError::Protocol("unknown opcode")),
    };
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frame not masked"));
    }
    let (len, mut pos) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let control = matches!(opcode, Opcode::Close | Opcode::Ping | Opcode::Pong);
    if control && (!fin || len > 125) {
        return Err(FrameError::Protocol("fragmented or oversized control frame"));
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooLarge);
    }
    let len = len as usize;
    let Some(mask) = buf.get(pos..pos + 4) else { return Ok(None) };
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    pos += 4;
    let Some(data) = buf.get(pos..pos + len) else { return Ok(None) };
    let payload = data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    Ok(Some((Frame { fin, opcode, payload }, pos + len)))
}

/// A server frame (unmasked, FIN set).
pub fn encode_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let code = match opcode {
        Opcode::Continuation => 0,
        Opcode::Text => 1,
        Opcode::Binary => 2,
        Opcode::Close => 8,
        Opcode::Ping => 9,
        Opcode::Pong => 10,
    };
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | code);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn frames_parse_incrementally() {
        let f = masked(2, &[9u8; 300]);
        for n in 0..f.len() {
            assert_eq!(parse_client_frame(&f[..n], 1000), Ok(None), "prefix {n}");
        }
        let (frame, used) = parse_client_frame(&f, 1000).unwrap().unwrap();
        assert_eq!((frame.opcode, frame.payload.len(), used), (Opcode::Binary, 300, f.len()));
        assert_eq!(frame.payload, vec![9u8; 300]);
    }

    #[test]
    fn bad_frames() {
        assert_eq!(parse_client_frame(&[0x82, 0x01, 0x00], 10), Err(FrameError::Protocol("client frame not masked")));
        assert_eq!(parse_client_frame(&masked(3, b"x"), 10), Err(FrameError::Protocol("unknown opcode")));
        assert_eq!(parse_client_frame(&masked(2, &[0; 20]), 10), Err(FrameError::TooLarge));
        let mut ping = masked(9, b"x");
        ping[0] &= 0x7f;
        assert!(parse_client_frame(&ping, 10).is_err());
        assert_eq!(encode_frame(Opcode::Binary, b"ab"), vec![0x82, 2, b'a', b'b']);
        assert_eq!(encode_frame(Opcode::Binary, &[0; 200])[..4], [0x82, 126, 0, 200]);
    }
}
