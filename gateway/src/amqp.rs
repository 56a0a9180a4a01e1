//! DPS over AMQP 1.0 (spec device-protocol.md §4) on any byte stream (TLS on the AMQP port, or
//! a WebSocket with subprotocol `AMQPWSB10`): feeds the bytes to the sans-IO connection in
//! `dps_core::amqp_connection`, writes what it answers, and carries out its requests.

use crate::provisioning::{DeviceAuth, Provisioning};
use crate::server::{mono_nanos, utc_now};
use crate::stream::{ByteStream, End};
use dps_core::amqp_connection::{Connection, Credential, Event, Failure, Settings};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Largest frame either side may send.
pub const MAX_FRAME: u32 = 64 * 1024;

/// Serves one AMQP connection to its end. `client_certificate`: the TLS handshake carried one
/// (the X.509 path, no SASL layer).
pub async fn serve_amqp<S: ByteStream>(
    s: &mut S,
    protocol: &'static str,
    prov: &Provisioning,
    stop: &AtomicBool,
    limits: &crate::config::Limits,
    client_certificate: bool,
) -> End {
    let mut conn =
        Connection::new(Settings { max_frame: MAX_FRAME, max_message: limits.max_mqtt_packet_bytes, link_credit: 100, client_certificate });
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let mut chunk = vec![0u8; 16 * 1024];
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
            None => match crate::stream::read_before(s, &mut chunk, Instant::now() + idle, stop).await {
                Ok(0) => return End::Closed,
                Ok(n) => conn.receive(&chunk[..n]),
                Err(i) => return End::from(i),
            },
            Some(Event::Closed) => return End::Closed,
            // TPM attestation is not served yet: the mechanism is offered (C and Java need it
            // offered to start) and refused here with a SASL `auth` outcome.
            Some(Event::TpmKeys { .. }) => {
                let _ = conn.refuse("TPM attestation is not supported yet");
            }
            Some(Event::Invalid { delivery_id, error }) => {
                let body = dps_core::error::error_body(&error, "", utc_now());
                let _ = conn.answer(delivery_id, None, error.kind.status(), &body, None);
            }
            Some(Event::Request { delivery_id, request }) => {
                let Some(me) = conn.identity().cloned() else { continue };
                let token = match &me.credential {
                    Credential::SasToken(t) | Credential::TpmSasToken(t) => Some(t.as_str()),
                    // X.509 attestation is not served yet: without a token the request is
                    // refused with 401 like any unauthenticated device.
                    Credential::ClientCertificate => None,
                };
                let auth = DeviceAuth { id_scope: &me.id_scope, registration_id: &me.registration_id, token, protocol };
                let answer = match request.operation_type.as_deref() {
                    Some("iotdps-get-operationstatus") => {
                        prov.operation_status(auth, request.operation_id.as_deref().unwrap_or(""), utc_now(), mono_nanos()).await
                    }
                    _ => prov.register(auth, &request.body, utc_now(), mono_nanos()).await,
                };
                let _ = conn.answer(delivery_id, request.correlation_id, answer.status, &answer.body, answer.retry_after);
            }
        }
    }
}
