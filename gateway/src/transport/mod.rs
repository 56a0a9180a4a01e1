//! Device and operator transports: each connection is served by the task that accepted it,
//! from the TLS handshake to its end. The listener decides the protocol: HTTPS (device API,
//! service API and WebSocket upgrades to MQTT or AMQP), MQTT, AMQP.

pub mod amqp;
pub mod http;
pub mod https;
pub mod mqtt;
pub mod stream;
pub mod websocket;
pub mod write_deadline;

use crate::clock::{mono_nanos, utc_now};
use crate::provisioning::Via;
use crate::shard::{Listener, Shard};
use dps_core::error::{ErrorKind, ServiceError};
use dps_core::request::CertChain;
use futures::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use http::{ReadError, Response};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves one accepted connection. `api_only`: it holds a slot of the service API's reserve
/// (HTTPS only), so it is served the service API and nothing else.
/// `source`: the peer's address (failed attestations are bounded per source).
pub(crate) async fn serve_tls(stream: TcpStream, source: std::net::IpAddr, kind: Listener, api_only: bool, shard: &Shard) {
    let _ = stream.set_nodelay(true);
    // Every write of the connection, whatever the protocol, gives up when the peer stops reading.
    // The handshake's writes are held until the server waits for the client, so the session
    // ticket that ends a TLS 1.3 handshake leaves with the first answer (released below).
    let stream = write_deadline::WriteDeadline::new(stream, Duration::from_secs(shard.limits.write_timeout_secs.max(1))).holding();
    let handshake = Duration::from_secs(shard.limits.handshake_timeout_secs);
    let sid = &shard.id_label;
    let accept = async {
        Some(match (kind, &shard.tls.service_api) {
            // The HTTPS port picks its configuration by the host the client names (SNI): the
            // service API's own host names request no client certificate.
            (Listener::Https, Some(_)) => {
                match futures_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await {
                    Ok(start) => {
                        let hello = start.client_hello();
                        if api_only && !shard.tls.is_service_api_host(hello.server_name()) {
                            // The reserve is for the service API's host names only.
                            return None;
                        }
                        let cfg = shard.tls.for_https(hello.server_name());
                        start.into_stream(cfg).await
                    }
                    Err(e) => Err(e),
                }
            }
            _ => futures_rustls::TlsAcceptor::from(shard.tls.devices.clone()).accept(stream).await,
        })
    };
    // The handshake, each protocol's loop and the connection's own task are futures of several
    // KiB each; nested by value they made the spawned task ~21 KiB, copied whole several times
    // as it was spawned (a `perf probe` on memmove: ~130 KiB per connection). Boxed, each is
    // placed on the heap once and the task holds pointers.
    let accept = Box::pin(accept);
    let mut s = match glommio::timer::timeout(handshake, async { Ok(accept.await) }).await {
        Ok(None) => return,
        Ok(Some(Ok(s))) => s,
        Ok(Some(Err(e))) => {
            shard.metrics.inc("dps_tls_handshakes_total", &[("shard", sid), ("result", "failed")]);
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shard.metrics.inc("dps_tls_handshakes_total", &[("shard", sid), ("result", "timeout")]);
            return;
        }
    };
    s.get_mut().0.release();
    let result = match s.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "ok",
    };
    shard.metrics.inc("dps_tls_handshakes_total", &[("shard", sid), ("result", result)]);
    // The chain the client presented (the handshake proved it holds the leaf's key): an X.509
    // device's credential, judged against the enrollment list when it registers.
    let chain: Option<CertChain> =
        s.get_ref().1.peer_certificates().filter(|c| !c.is_empty()).map(|c| Arc::new(c.iter().map(|d| d.to_vec()).collect()));
    match kind {
        Listener::Https => {
            if let Some((req, leftover)) = Box::pin(serve_http(&mut s, shard, chain.as_ref(), source, api_only)).await {
                Box::pin(serve_websocket(&mut s, req, leftover, shard, chain, source)).await;
            }
        }
        Listener::Mqtt if shard.handshake_only => {
            // The benchmark's limit: nothing after the handshake but waiting for the close.
            use futures::io::AsyncReadExt;
            let mut sink = [0u8; 512];
            let idle = Duration::from_secs(shard.limits.idle_timeout_secs);
            let _ = glommio::timer::timeout(idle, async {
                while !matches!(s.read(&mut sink).await, Ok(0) | Err(_)) {}
                Ok(())
            })
            .await;
        }
        Listener::Mqtt => {
            let end = Box::pin(mqtt::serve_mqtt(&mut s, Via::Mqtt, &shard.prov, &shard.stop, &shard.limits, chain, source)).await;
            ended(shard, Via::Mqtt, &end, source);
        }
        Listener::Amqp => {
            let end = Box::pin(amqp::serve_amqp(&mut s, Via::Amqp, &shard.prov, &shard.stop, &shard.limits, chain, source)).await;
            ended(shard, Via::Amqp, &end, source);
        }
    }
    let _ = s.close().await;
}

/// Logs how a device connection ended; a login deadline that passed is counted by the step
/// the device had not taken (`dps_login_timeouts_total`) and logged at info: a fleet whose
/// devices stall at one step (a slow TPM, a lost packet) shows it there.
fn ended(shard: &Shard, via: Via, end: &stream::End, source: std::net::IpAddr) {
    if let stream::End::LoginTimeout { waiting_for, registration_id } = end {
        shard.metrics.inc("dps_login_timeouts_total", &[("protocol", via.name()), ("waiting_for", waiting_for)]);
        let id = registration_id.as_deref().unwrap_or("");
        tracing::info!(shard = shard.id, protocol = via.name(), waiting_for, registration_id = id, %source, "login deadline passed; connection closed");
    } else {
        tracing::debug!(shard = shard.id, protocol = via.name(), ?end, "device connection ended");
    }
}

/// Reads and discards what the client is still sending (e.g. the rest of an oversized body),
/// for at most 2 s and 4 MiB, so it can read the error answer instead of seeing a reset.
async fn linger<S: AsyncRead + Unpin>(s: &mut S) {
    use futures::io::AsyncReadExt;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut left = 4usize << 20;
    let mut chunk = [0u8; 16384];
    while left > 0 {
        let Some(remaining) = deadline.checked_duration_since(Instant::now()) else { return };
        match glommio::timer::timeout(remaining, async { Ok(s.read(&mut chunk).await) }).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// Answers a WebSocket upgrade and runs the device protocol it asks for.
async fn serve_websocket<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    req: http::Request,
    leftover: Vec<u8>,
    shard: &Shard,
    client_certificate: Option<CertChain>,
    source: std::net::IpAddr,
) {
    match websocket::handshake(&req, &[websocket::MQTT, websocket::AMQP]) {
        Ok((resp, protocol)) => {
            if http::write_response(s, &resp, false).await.is_err() {
                return;
            }
            let mut ws = websocket::WsStream::new(s, leftover, shard.limits.max_mqtt_packet_bytes + 16);
            if protocol == websocket::AMQP {
                let end = amqp::serve_amqp(&mut ws, Via::AmqpWs, &shard.prov, &shard.stop, &shard.limits, client_certificate, source).await;
                ended(shard, Via::AmqpWs, &end, source);
            } else {
                let end = mqtt::serve_mqtt(&mut ws, Via::MqttWs, &shard.prov, &shard.stop, &shard.limits, client_certificate, source).await;
                ended(shard, Via::MqttWs, &end, source);
            }
        }
        Err(why) => {
            let err = ServiceError::invalid(format!("WebSocket upgrade refused: {why}"));
            let _ = http::write_response(s, &Response::error(&err, &shard.tracking.next(), utc_now()), true).await;
        }
    }
}

/// Request/response loop on an established (TLS) stream. Returns a WebSocket upgrade request
/// (and the bytes that followed it) for the caller to serve.
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    shard: &Shard,
    chain: Option<&CertChain>,
    source: std::net::IpAddr,
    api_only: bool,
) -> Option<(http::Request, Vec<u8>)> {
    let (stop, limits) = (&shard.stop, &shard.limits);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let mut buf = Vec::new();
    loop {
        // Wait for the next request in short slices, so an idle keep-alive connection notices
        // shutdown; reading is cancellation-safe (http::read_request consumes nothing early).
        let deadline = Instant::now() + idle;
        let read = loop {
            if stop.load(Ordering::Relaxed) && buf.is_empty() {
                return None;
            }
            match glommio::timer::timeout(Duration::from_millis(250), async {
                Ok(http::read_request(s, &mut buf, limits.max_body_bytes).await)
            })
            .await
            {
                Ok(r) => break r,
                Err(_) if Instant::now() >= deadline => return None,
                Err(_) => continue,
            }
        };
        let req = match read {
            Ok(r) => r,
            Err(e) => {
                let err = match e {
                    ReadError::Closed | ReadError::Io => return None,
                    ReadError::BodyTooLarge => {
                        ServiceError::new(ErrorKind::PayloadTooLarge, format!("request body exceeds {} bytes", limits.max_body_bytes))
                    }
                    ReadError::HeadTooLarge => ServiceError::invalid("request head too large"),
                    ReadError::Malformed(m) => ServiceError::invalid(format!("malformed HTTP request: {m}")),
                };
                let resp = Response::error(&err, &shard.tracking.next(), utc_now());
                if http::write_response(s, &resp, true).await.is_ok() {
                    linger(s).await;
                }
                return None;
            }
        };
        let device = websocket::is_upgrade(&req) || https::is_device_request(&req);
        if api_only && device {
            // A connection in the service API's reserve: the device connections are full.
            let err = ServiceError::new(ErrorKind::Unavailable, "the device connections are full; retry later");
            let resp = Response::error(&err, &shard.tracking.next(), utc_now()).header("Retry-After", "5");
            let _ = http::write_response(s, &resp, true).await;
            return None;
        }
        if websocket::is_upgrade(&req) {
            return Some((req, std::mem::take(&mut buf)));
        }
        let (resp, refused) = match https::handle(&shard.prov, &req, chain, source).await {
            Some(answer) => (answer.response, answer.close),
            None => (shard.api.handle(&req, utc_now(), mono_nanos()).await, false),
        };
        let close = req.close || refused || stop.load(Ordering::Relaxed);
        if http::write_response(s, &resp, close).await.is_err() || close {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioning::Provisioning;
    use dps_core::request::DeviceRequest;
    use std::net::Ipv4Addr;

    /// The size of what `make` returns, found from its type without calling it.
    fn size_of_return<A, F>(_make: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's task and a registration's future are moved whole as they start (spawn,
    /// `Box::pin`, a timeout's wrapper): nested by value they were 21.5 KiB and 12.5 KiB, and a
    /// `perf probe` on memmove counted ~350 KiB copied per registration. Boxing the handshake,
    /// the protocol loops and the records `decide` parses keeps them small.
    #[test]
    fn connection_and_registration_futures_stay_small() {
        let connection = size_of_return(|(stream, shard): (TcpStream, &'static Shard)| {
            serve_tls(stream, Ipv4Addr::LOCALHOST.into(), Listener::Mqtt, false, shard)
        });
        let registration =
            size_of_return(|(p, req): (&'static Provisioning, DeviceRequest)| p.handle(req, Via::Mqtt, Ipv4Addr::LOCALHOST.into()));
        assert!(connection <= 4096, "a connection's future is {connection} bytes");
        assert!(registration <= 8192, "a registration's future is {registration} bytes");
    }
}
