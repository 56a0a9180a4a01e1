//! DPS over AMQP 1.0 (docs/device-protocol.md §4) on any byte stream (TLS on the AMQP port, or
//! a WebSocket with subprotocol `AMQPWSB10`): feeds the bytes to the sans-IO connection in
//! `dps_core::amqp_connection`, writes what it answers, and carries out its requests.

use crate::provisioning::{Provisioning, Via};
use crate::transport::stream::{ByteStream, End, Interrupted, ReadDeadlines};
use dps_core::amqp_connection::{Connection, Event, Failure, Settings};
use dps_core::registration::tpm::verify_sasl_answer;
use dps_core::request::{Credential, TpmCredential};
use dps_core::tpm::book::Issued;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Largest frame either side may send.
pub const MAX_FRAME: u32 = 64 * 1024;

/// Serves one AMQP connection to its end. `client_certificate`: the chain the TLS handshake carried
/// (the X.509 path, no SASL layer).
pub async fn serve_amqp<S: ByteStream>(
    s: &mut S,
    via: Via,
    prov: &Provisioning,
    stop: &AtomicBool,
    limits: &crate::config::Limits,
    client_certificate: Option<dps_core::request::CertChain>,
    source: std::net::IpAddr,
) -> End {
    let settings = Settings {
        max_frame: MAX_FRAME,
        max_message: limits.max_mqtt_packet_bytes,
        link_credit: 100,
        client_certificate,
        id_scope: prov.id_scope().to_string(),
    };
    let mut conn = match Connection::new(settings) {
        Ok(c) => c,
        Err(e) => return End::Malformed(e),
    };
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    // SASL and open must end by the login deadline.
    let mut deadlines = ReadDeadlines::new(Duration::from_secs(limits.login_timeout_secs));
    let mut chunk = vec![0u8; 16 * 1024];
    // The TPM mechanism's keys and the challenge sent for them, until the device answers.
    let mut tpm: Option<(Vec<u8>, Vec<u8>, Issued)> = None;
    loop {
        let event = conn.poll();
        let out = conn.take_output();
        if !out.is_empty() && s.send(&out).await.is_err() {
            return End::Closed;
        }
        let event = match event {
            Ok(e) => e,
            Err(Failure::Malformed(m)) => return End::Malformed(m),
            Err(Failure::Refused(r)) => return End::Refused(r),
        };
        match event {
            None => match crate::transport::stream::read_before(s, &mut chunk, deadlines.next(idle, conn.logged_in()), stop).await {
                Ok(0) => return End::Closed,
                Ok(n) => conn.receive(&chunk[..n]),
                Err(Interrupted::Timeout) if !conn.logged_in() => {
                    let registration_id = conn.identity().map(|i| i.registration_id.clone());
                    return End::LoginTimeout { waiting_for: conn.waiting_for(), registration_id };
                }
                Err(i) => return End::from(i),
            },
            Some(Event::Closed) => return End::Closed,
            Some(Event::TpmKeys { endorsement_key, storage_root_key }) => {
                let id = conn.identity().map(|i| i.registration_id.clone()).unwrap_or_default();
                match prov.tpm_challenge(&id, &endorsement_key, &storage_root_key, via) {
                    Ok((blob, issued)) => {
                        tpm = Some((endorsement_key, storage_root_key, issued));
                        let _ = conn.tpm_challenge(&blob);
                    }
                    Err(_) => {
                        let _ = conn.refuse("TPM attestation refused");
                    }
                }
            }
            Some(Event::TpmAnswer { token }) => {
                let identity = conn.identity().map(|i| (i.id_scope.clone(), i.registration_id.clone()));
                let verdict = match (tpm.take(), identity) {
                    (Some((endorsement_key, storage_root_key, issued)), Some((scope, id))) => {
                        match verify_sasl_answer(&issued, &token, &scope, &id, crate::clock::utc_now()) {
                            Ok(()) => Ok(TpmCredential { endorsement_key, storage_root_key, answer: Some((token, issued)) }),
                            Err(e) => Err((e, id)),
                        }
                    }
                    _ => Err((dps_core::error::ServiceError::unauthorized("a TPM answer without a challenge"), String::new())),
                };
                match verdict {
                    Ok(credential) => {
                        let _ = conn.tpm_admit(Credential::Tpm(Box::new(credential)));
                    }
                    Err((e, id)) => {
                        prov.refused_tpm_answer(e, &id, via, source);
                        let _ = conn.refuse("TPM answer refused");
                    }
                }
            }
            Some(Event::Invalid { delivery_id, error }) => {
                let reply = prov.refuse(error, via);
                let _ = conn.answer(delivery_id, None, reply.status, &reply.body, None);
            }
            Some(Event::Request { delivery_id, correlation_id, request }) => {
                let reply = prov.handle(request, via, source).await;
                let _ = conn.answer(delivery_id, correlation_id, reply.status, &reply.body, reply.retry_after);
                if reply.credential_refused {
                    deadlines.refused(Duration::from_secs(limits.refused_close_secs));
                }
            }
        }
    }
}
