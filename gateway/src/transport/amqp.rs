//! DPS over AMQP 1.0 (docs/device-protocol.md §4) on any byte stream (TLS on the AMQP port, or
//! a WebSocket with subprotocol `AMQPWSB10`): feeds the bytes to the sans-IO connection in
//! `dps_core::amqp_connection`, writes what it answers, and carries out its requests.

use crate::provisioning::{Provisioning, Via};
use crate::transport::stream::{ByteStream, End};
use dps_core::amqp_connection::{Connection, Event, Failure, Settings};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

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
    // An absolute deadline for SASL and open: the per-read deadline alone lets a client that
    // sends a byte now and then hold the connection forever without ever logging in.
    let login_deadline = Instant::now() + Duration::from_secs(limits.login_timeout_secs);
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
            None => match crate::transport::stream::read_before(
                s,
                &mut chunk,
                if conn.logged_in() { Instant::now() + idle } else { (Instant::now() + idle).min(login_deadline) },
                stop,
            )
            .await
            {
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
                let reply = prov.refuse(error, via);
                let _ = conn.answer(delivery_id, None, reply.status, &reply.body, None);
            }
            Some(Event::Request { delivery_id, correlation_id, request }) => {
                let reply = prov.handle(request, via).await;
                let _ = conn.answer(delivery_id, correlation_id, reply.status, &reply.body, reply.retry_after);
            }
        }
    }
}
