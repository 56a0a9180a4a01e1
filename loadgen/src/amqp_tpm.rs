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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
        self.io.write_all(&encode_frame(FRAME_SASL, 0, &bytes)).await.map_err(|_| Failure::Protocol)
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
    io.write_all(&SASL_HEADER).await.map_err(|_| Failure::Protocol)?;
    let mut f = Frames { io, buf: Vec::new() };
    if f.read_exact_bytes(8).await? != SASL_HEADER {
        return Err(Failure::Protocol);
    }
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

    /// A stream that yields `bytes` and then ends (writes are accepted and dropped).
    fn tokio_test_io(bytes: &[u8]) -> tokio::io::Join<std::io::Cursor<Vec<u8>>, tokio::io::Sink> {
        tokio::io::join(std::io::Cursor::new(bytes.to_vec()), tokio::io::sink())
    }
}
