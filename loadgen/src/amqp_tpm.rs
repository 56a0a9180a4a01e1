//! The client side of AMQP's SASL `TPM` mechanism (docs/tpm-attestation.md), which no AMQP
//! library speaks: run on the stream before the AMQP client opens the connection without SASL
//! of its own. Init with the scope, registration id and EK; the SRK after the first one-byte
//! challenge; the `authenticationKey` in control-byte segments, each acknowledged with `00`;
//! the token signed by the TPM after the last; then the outcome.

use crate::device::Failure;
use crate::tpm_device::TpmHandle;
use dps_core::amqp::{encode_frame, parse_frame, FRAME_SASL, SASL_HEADER};
use fe2o3_amqp_types::primitives::{Binary, Symbol};
use fe2o3_amqp_types::sasl::{SaslChallenge, SaslInit, SaslOutcome, SaslResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

struct Frames<'a, Io> {
    io: &'a mut Io,
    buf: Vec<u8>,
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Frames<'_, Io> {
    async fn read_exact_bytes(&mut self, n: usize) -> Result<Vec<u8>, Failure> {
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            let got = self.io.read(&mut chunk).await.map_err(|_| Failure::Closed)?;
            if got == 0 {
                return Err(Failure::Closed);
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Sends the SASL protocol header and reads the server's.
    async fn start(&mut self) -> Result<(), Failure> {
        crate::wire::send_all(self.io, &SASL_HEADER).await.map_err(|_| Failure::Protocol)?;
        if self.read_exact_bytes(8).await? != SASL_HEADER {
            return Err(Failure::Protocol);
        }
        Ok(())
    }

    /// The body of the next SASL frame.
    async fn next(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            if let Some((f, used)) = parse_frame(&self.buf, 64 * 1024).map_err(|_| Failure::Protocol)? {
                self.buf.drain(..used);
                if f.kind != FRAME_SASL {
                    return Err(Failure::Protocol);
                }
                return Ok(f.body.to_vec());
            }
            let mut chunk = [0u8; 4096];
            let got = self.io.read(&mut chunk).await.map_err(|_| Failure::Closed)?;
            if got == 0 {
                return Err(Failure::Closed);
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }

    async fn send<T: serde::Serialize>(&mut self, body: &T) -> Result<(), Failure> {
        let bytes = serde_amqp::to_vec(body).map_err(|_| Failure::Protocol)?;
        crate::wire::send_all(self.io, &encode_frame(FRAME_SASL, 0, &bytes)).await.map_err(|_| Failure::Protocol)
    }

    /// A challenge's bytes, or the refusal when the server ended SASL with an outcome.
    async fn challenge(&mut self) -> Result<Vec<u8>, Failure> {
        let body = self.next().await?;
        match serde_amqp::from_slice::<SaslChallenge>(&body) {
            Ok(c) => Ok(c.challenge.to_vec()),
            Err(_) => Err(Failure::Status(401, None)),
        }
    }
}

/// Runs the TPM mechanism to its outcome. `token_for` turns the TPM's HMAC of the
/// string-to-sign into the SAS token (the caller knows the resource and expiry it chose).
pub async fn sasl_tpm<Io: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io,
    id_scope: &str,
    registration_id: &str,
    tpm: &TpmHandle,
    string_to_sign: &str,
    token_for: impl FnOnce(&[u8]) -> String,
) -> Result<(), Failure> {
    let mut f = Frames { io, buf: Vec::new() };
    f.start().await?;
    f.next().await?; // sasl-mechanisms
    let mut init = vec![0u8];
    init.extend_from_slice(id_scope.as_bytes());
    init.push(0);
    init.extend_from_slice(registration_id.as_bytes());
    init.push(0);
    init.extend_from_slice(&tpm.endorsement_key);
    let init = SaslInit { mechanism: Symbol::from("TPM"), initial_response: Some(Binary::from(init)), hostname: None };
    f.send(&init).await?;
    if f.challenge().await? != [0] {
        return Err(Failure::Protocol);
    }
    let mut srk = vec![0u8];
    srk.extend_from_slice(&tpm.storage_root_key);
    f.send(&SaslResponse { response: Binary::from(srk) }).await?;
    let mut blob = Vec::new();
    for expected in 0u8..4 {
        let segment = f.challenge().await?;
        let (&control, data) = segment.split_first().ok_or(Failure::Protocol)?;
        if control & 0x80 == 0 || control & 0x03 != expected {
            return Err(Failure::Protocol);
        }
        blob.extend_from_slice(data);
        if control & 0x40 != 0 {
            let signature = tpm.activate_and_sign(blob, string_to_sign.as_bytes().to_vec()).await.map_err(|_| Failure::Tpm)?;
            let mut answer = vec![0u8];
            answer.extend_from_slice(token_for(&signature).as_bytes());
            f.send(&SaslResponse { response: Binary::from(answer) }).await?;
            let outcome: SaslOutcome = serde_amqp::from_slice(&f.next().await?).map_err(|_| Failure::Protocol)?;
            return match outcome.code {
                fe2o3_amqp_types::sasl::SaslCode::Ok => Ok(()),
                _ => Err(Failure::Status(401, None)),
            };
        }
        f.send(&SaslResponse { response: Binary::from(vec![0u8]) }).await?;
    }
    Err(Failure::Protocol)
}

#[cfg(test)]
mod tests {
    use super::Frames;
    use crate::device::Failure;

    #[tokio::test]
    async fn a_server_that_hangs_up_mid_sasl_is_told_apart_from_a_protocol_error() {
        // Half a SASL frame, then the end of the stream.
        let mut io = tokio_test_io(&[0, 0, 0, 20, 2, 1]);
        let mut f = Frames { io: &mut io, buf: Vec::new() };
        assert!(matches!(f.next().await, Err(Failure::Closed)));
        // A frame of another type: a protocol error.
        let mut io = tokio_test_io(&[0, 0, 0, 8, 2, 0, 0, 0]);
        let mut f = Frames { io: &mut io, buf: Vec::new() };
        assert!(matches!(f.next().await, Err(Failure::Protocol)));
    }

    /// The header and each SASL frame leave before the device waits for the server's answer,
    /// even on a writer that keeps what is written until a flush (tokio-rustls does, once the
    /// task's cooperative budget is spent; the device then waited for an answer to a frame the
    /// server never got, until the server's login deadline closed the connection).
    #[tokio::test]
    async fn every_sasl_frame_leaves_before_the_device_waits_for_the_answer() {
        use dps_core::amqp::{encode_frame, FRAME_SASL, SASL_HEADER};
        use fe2o3_amqp_types::primitives::Binary;
        use fe2o3_amqp_types::sasl::{SaslChallenge, SaslResponse};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let mut io = crate::held_writes::HeldWrites::new(ours);
        let response = SaslResponse { response: Binary::from(vec![0u8, 7, 7]) };
        let expected = encode_frame(FRAME_SASL, 0, &serde_amqp::to_vec(&response).unwrap());
        let device = async {
            let mut f = Frames { io: &mut io, buf: Vec::new() };
            f.start().await.unwrap();
            f.send(&response).await.unwrap();
            f.challenge().await.unwrap()
        };
        let server = async {
            let mut header = [0u8; 8];
            theirs.read_exact(&mut header).await.unwrap();
            assert_eq!(header, SASL_HEADER);
            theirs.write_all(&SASL_HEADER).await.unwrap();
            let mut frame = vec![0u8; expected.len()];
            theirs.read_exact(&mut frame).await.unwrap();
            assert_eq!(frame, expected);
            let challenge = SaslChallenge { challenge: Binary::from(vec![9u8]) };
            theirs.write_all(&encode_frame(FRAME_SASL, 0, &serde_amqp::to_vec(&challenge).unwrap())).await.unwrap();
        };
        let both = async { tokio::join!(device, server).0 };
        let challenge = tokio::time::timeout(std::time::Duration::from_secs(10), both).await.expect("a frame was held back");
        assert_eq!(challenge, [9]);
    }

    /// A stream that yields `bytes` and then ends (writes are accepted and dropped).
    fn tokio_test_io(bytes: &[u8]) -> tokio::io::Join<std::io::Cursor<Vec<u8>>, tokio::io::Sink> {
        tokio::io::join(std::io::Cursor::new(bytes.to_vec()), tokio::io::sink())
    }
}
