//! DPS over MQTT 3.1.1 on any byte stream (TLS on the MQTT port, or a WebSocket on the HTTPS
//! port): feeds the bytes to the sans-IO session in `dps_core::mqtt_session`, writes what it
//! answers, and hands its requests to the registration driver.

use crate::provisioning::{Provisioning, Via};
use crate::transport::stream::{read_before, ByteStream, End, Interrupted, ReadDeadlines};
use dps_core::mqtt_session::{Ended, Event, Session, Settings};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

impl From<Ended> for End {
    fn from(e: Ended) -> End {
        match e {
            Ended::Disconnect => End::Disconnect,
            Ended::TooLarge => End::TooLarge,
            Ended::Malformed(m) => End::Malformed(m),
            Ended::Refused(r) => End::Refused(r),
            Ended::ProtocolViolation(v) => End::ProtocolViolation(v),
        }
    }
}

/// Serves one MQTT connection to its end.
pub async fn serve_mqtt<S: ByteStream>(
    s: &mut S,
    via: Via,
    prov: &Provisioning,
    stop: &AtomicBool,
    limits: &crate::config::Limits,
    client_certificate: Option<dps_core::request::CertChain>,
    source: std::net::IpAddr,
) -> End {
    let settings = Settings {
        max_packet: limits.max_mqtt_packet_bytes,
        idle_secs: limits.idle_timeout_secs,
        client_certificate,
        id_scope: prov.id_scope().to_string(),
        max_keep_alive_secs: limits.max_keep_alive_secs,
    };
    // CONNECT must come by the login deadline.
    let mut deadlines = ReadDeadlines::new(Duration::from_secs(limits.login_timeout_secs));
    let mut session = Session::new(settings);
    let mut chunk = [0u8; 4096];
    loop {
        match session.poll() {
            Ok(Some(Event::Request { rid, request })) => {
                let reply = prov.handle(request, via, source).await;
                if let Err(e) = session.answer(&rid, reply.status, &reply.body, reply.retry_after) {
                    return e.into();
                }
                if reply.credential_refused {
                    deadlines.refused(Duration::from_secs(limits.refused_close_secs));
                }
            }
            // Everything queued goes out in one write just before the next wait for input (or
            // the end): a pipelining client gets CONNACK, SUBACK, PUBACK and the response in one
            // TLS record. Also when the session just ended (a refusing CONNACK, answers before
            // a DISCONNECT).
            Err(e) => {
                let out = session.take_output();
                if !out.is_empty() {
                    let _ = s.send(&out).await;
                }
                return e.into();
            }
            Ok(None) => {
                let out = session.take_output();
                if !out.is_empty() && s.send(&out).await.is_err() {
                    return End::Closed;
                }
                let deadline = deadlines.next(Duration::from_secs(session.read_timeout_secs()), session.connected());
                match read_before(s, &mut chunk, deadline, stop).await {
                    Ok(0) => return End::Closed,
                    Ok(n) => session.receive(&chunk[..n]),
                    Err(Interrupted::Timeout) if !session.connected() => {
                        return End::LoginTimeout { waiting_for: "connect", registration_id: None }
                    }
                    Err(i) => return End::from(i),
                }
            }
        }
    }
}
