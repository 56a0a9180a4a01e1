//! Shards: one glommio executor per core, each with its own `SO_REUSEPORT` listeners, accept
//! loop and connections. A connection is owned by the task that accepted it, start to end.

use crate::enrollment_cache::{EnrollmentCache, Msg};
use crate::http::{self, ReadError, Response};
use crate::metrics::Metrics;
use crate::provisioning::Provisioning;
use crate::service::Service;
use crate::service_api::ServiceApi;
use dps_core::error::{ErrorKind, ServiceError};
use dps_core::time::UtcTime;
use futures::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use futures::FutureExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Nanoseconds on a monotonic clock since the process started (for rate limits).
pub fn mono_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn utc_now() -> UtcTime {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    UtcTime::from_unix_nanos(d.as_nanos() as i128)
}

pub struct ShardSpec {
    pub id: usize,
    pub cpu: Option<usize>,
    pub svc: Arc<Service>,
    pub tls: Arc<rustls::ServerConfig>,
    /// Benchmark: the MQTT listener only completes handshakes (config `handshake_only`).
    pub handshake_only: bool,
    pub https: SocketAddr,
    pub mqtt: SocketAddr,
    pub amqp: SocketAddr,
    /// The admin (metrics) listener; shard 0 only.
    pub admin: Option<SocketAddr>,
    pub stop: Arc<AtomicBool>,
    pub mesh: Option<MeshBuilder<Msg, Full>>,
    /// `WAIT` until every shard is bound, then `GO` (or `ABORT` when one failed).
    pub go: Arc<AtomicU8>,
}

pub const WAIT: u8 = 0;
pub const GO: u8 = 1;
pub const ABORT: u8 = 2;

/// The ports a shard bound.
#[derive(Debug, Clone, Copy)]
pub struct BoundPorts {
    pub https: u16,
    pub mqtt: u16,
    pub amqp: u16,
    pub admin: Option<u16>,
}

/// What a shard reports once its listeners are bound (or why they could not be).
pub type Bound = Result<BoundPorts, String>;

fn bind_error(what: &str, addr: SocketAddr, e: std::io::Error) -> String {
    let flag = what.to_ascii_lowercase();
    let hint = if addr.port() < 1024 {
        format!("ports below 1024 need root or CAP_NET_BIND_SERVICE (sudo setcap cap_net_bind_service=+ep $(which dps)); or choose another port with --{flag}-port")
    } else {
        format!("another process may hold it (ss -ltnp 'sport = :{}'); or choose another port with --{flag}-port", addr.port())
    };
    format!("cannot bind the {what} port {} on {}: {e}; {hint}", addr.port(), addr.ip())
}

pub fn spawn_shard(spec: ShardSpec, bound: std::sync::mpsc::Sender<Bound>) -> Result<glommio::ExecutorJoinHandle<()>, String> {
    let placement = match spec.cpu {
        Some(c) => Placement::Fixed(c),
        None => Placement::Unbound,
    };
    LocalExecutorBuilder::new(placement)
        .name(&format!("shard-{}", spec.id))
        // Network I/O does not use glommio's registered DMA buffers; keep the locked
        // reservation small so several shards fit under the default memlock limit.
        .io_memory(256 << 10)
        .spawn(move || shard_main(spec, bound))
        .map_err(|e| format!("cannot start shard: {e}"))
}

/// Everything a shard's connection tasks share.
struct Shard {
    id: usize,
    api: ServiceApi,
    prov: Provisioning,
    cache: Rc<EnrollmentCache>,
    metrics: Rc<Metrics>,
    svc: Arc<Service>,
    tls: Arc<rustls::ServerConfig>,
    handshake_only: bool,
    stop: Arc<AtomicBool>,
    limits: crate::config::Limits,
    conns: Cell<usize>,
}

#[derive(Clone, Copy, Debug)]
enum Listener {
    Https,
    Mqtt,
    Amqp,
}

async fn shard_main(spec: ShardSpec, bound: std::sync::mpsc::Sender<Bound>) {
    let bind = |what: &str, addr: SocketAddr| TcpListener::bind(addr).map_err(|e| bind_error(what, addr, e.into()));
    let admin = spec.admin.map(|a| bind("admin", a)).transpose();
    let (https, mqtt, amqp, admin) = match (bind("HTTPS", spec.https), bind("MQTT", spec.mqtt), bind("AMQP", spec.amqp), admin) {
        (Ok(h), Ok(m), Ok(q), Ok(a)) => (h, m, q, a),
        (Err(e), _, _, _) | (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
            let _ = bound.send(Err(e));
            return;
        }
    };
    let port = |l: &TcpListener, fallback: u16| l.local_addr().map(|a| a.port()).unwrap_or(fallback);
    let ports = BoundPorts {
        https: port(&https, spec.https.port()),
        mqtt: port(&mqtt, spec.mqtt.port()),
        amqp: port(&amqp, spec.amqp.port()),
        admin: admin.as_ref().map(|l| port(l, 0)),
    };
    let _ = bound.send(Ok(ports));
    loop {
        match spec.go.load(Ordering::Acquire) {
            GO => break,
            ABORT => return,
            _ => glommio::timer::sleep(Duration::from_millis(5)).await,
        }
    }
    let mesh = match spec.mesh {
        Some(m) => match m.join().await {
            Ok(j) => Some(j),
            Err(_) => {
                tracing::error!(shard = spec.id, "cannot join the shard channel mesh");
                return;
            }
        },
        None => None,
    };
    let metrics = Rc::new(Metrics::default());
    let cache = EnrollmentCache::start(spec.svc.store.clone(), mesh, spec.svc.limits.enrollment_cache_entries, metrics.clone());
    let shard = Rc::new(Shard {
        id: spec.id,
        api: ServiceApi::new(spec.svc.clone(), cache.clone(), metrics.clone(), spec.id, mono_nanos()),
        prov: Provisioning::new(spec.svc.clone(), cache.clone(), metrics.clone(), spec.id, mono_nanos()),
        cache,
        metrics,
        svc: spec.svc.clone(),
        tls: spec.tls.clone(),
        handshake_only: spec.handshake_only,
        stop: spec.stop.clone(),
        limits: spec.svc.limits.clone(),
        conns: Cell::new(0),
    });
    tracing::info!(shard = spec.id, https = ports.https, mqtt = ports.mqtt, amqp = ports.amqp, "shard serving");
    let a = glommio::spawn_local(accept_loop(https, Listener::Https, shard.clone()));
    let b = glommio::spawn_local(accept_loop(mqtt, Listener::Mqtt, shard.clone()));
    let q = glommio::spawn_local(accept_loop(amqp, Listener::Amqp, shard.clone()));
    let c = admin.map(|l| glommio::spawn_local(admin_loop(l, shard.clone())));
    glommio::spawn_local(watch_stalls(shard.clone())).detach();
    a.await;
    b.await;
    q.await;
    if let Some(c) = c {
        c.await;
    }
    // Drain: connections finish their current request and close; give them a few seconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while shard.conns.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(shard = spec.id, "shard stopped");
}

/// Counts the times this shard's event loop ran late: a timer due every 10 ms that fires more
/// than 10 ms late means some task kept the core that long.
async fn watch_stalls(shard: Rc<Shard>) {
    let period = Duration::from_millis(10);
    let sid = shard.id.to_string();
    while !shard.stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        glommio::timer::sleep(period).await;
        let late = t.elapsed().saturating_sub(period);
        if late > period {
            shard.metrics.inc("dps_shard_stalls_total", &[("shard", &sid)]);
            shard.metrics.add("dps_shard_stall_microseconds_total", &[("shard", &sid)], late.as_micros() as i64);
        }
    }
}

type PendingAccept<'l> = Pin<Box<dyn Future<Output = glommio::Result<TcpStream, ()>> + 'l>>;

/// Accepts connections until `stop`. The pending accept is never cancelled while serving: an
/// io_uring accept dropped mid-flight can take a connection from the backlog that nobody then
/// serves, so the stop flag is checked beside it, not by abandoning it.
async fn next_connection<'l>(
    listener: &'l TcpListener,
    pending: &mut Option<PendingAccept<'l>>,
    stop: &AtomicBool,
) -> Option<glommio::Result<TcpStream, ()>> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let accept = pending.get_or_insert_with(|| Box::pin(listener.accept()));
        match futures::future::select(accept.as_mut(), glommio::timer::sleep(Duration::from_millis(200)).boxed_local()).await {
            futures::future::Either::Left((r, _)) => {
                *pending = None;
                return Some(r);
            }
            futures::future::Either::Right(_) => continue,
        }
    }
}

async fn accept_loop(listener: TcpListener, kind: Listener, shard: Rc<Shard>) {
    let mut pending = None;
    while let Some(accepted) = next_connection(&listener, &mut pending, &shard.stop).await {
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shard.conns.get() >= shard.limits.max_connections_per_shard {
            drop(stream);
            continue;
        }
        shard.conns.set(shard.conns.get() + 1);
        let sid = shard.id.to_string();
        let listener = match kind {
            Listener::Https => "https",
            Listener::Mqtt => "mqtt",
            Listener::Amqp => "amqp",
        };
        shard.metrics.inc("dps_connections_accepted_total", &[("shard", &sid), ("listener", listener)]);
        shard.metrics.add("dps_connections_open", &[("shard", &sid)], 1);
        let shard = shard.clone();
        glommio::spawn_local(async move {
            serve_tls(stream, kind, &shard).await;
            shard.conns.set(shard.conns.get() - 1);
            shard.metrics.add("dps_connections_open", &[("shard", &sid)], -1);
        })
        .detach();
    }
}

async fn serve_tls(stream: TcpStream, kind: Listener, shard: &Shard) {
    let _ = stream.set_nodelay(true);
    let acceptor = futures_rustls::TlsAcceptor::from(shard.tls.clone());
    let handshake = Duration::from_secs(shard.limits.handshake_timeout_secs);
    let sid = shard.id.to_string();
    let mut s = match glommio::timer::timeout(handshake, async { Ok(acceptor.accept(stream).await) }).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shard.metrics.inc("dps_tls_handshakes_total", &[("shard", &sid), ("result", "failed")]);
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shard.metrics.inc("dps_tls_handshakes_total", &[("shard", &sid), ("result", "timeout")]);
            return;
        }
    };
    let result = match s.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "ok",
    };
    shard.metrics.inc("dps_tls_handshakes_total", &[("shard", &sid), ("result", result)]);
    // The X.509 path (AMQP without SASL) needs to know whether the client presented one.
    let cert = s.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
    match kind {
        Listener::Https => {
            if let Some((req, leftover)) = serve_http(&mut s, &shard.api, &shard.prov, &shard.stop, &shard.limits).await {
                serve_websocket(&mut s, req, leftover, shard, cert).await;
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
            let end = crate::mqtt::serve_mqtt(&mut s, "mqtt", &shard.prov, &shard.stop, &shard.limits).await;
            tracing::debug!(shard = shard.id, ?end, "MQTT connection ended");
        }
        Listener::Amqp => {
            let end = crate::amqp::serve_amqp(&mut s, "amqp", &shard.prov, &shard.stop, &shard.limits, cert).await;
            tracing::debug!(shard = shard.id, ?end, "AMQP connection ended");
        }
    }
    let _ = s.close().await;
}

/// The admin listener (shard 0): plain HTTP, `GET /metrics` in the Prometheus text format.
async fn admin_loop(listener: TcpListener, shard: Rc<Shard>) {
    let mut pending = None;
    while let Some(accepted) = next_connection(&listener, &mut pending, &shard.stop).await {
        let Ok(mut stream) = accepted else { continue };
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let mut buf = Vec::new();
            let read =
                glommio::timer::timeout(Duration::from_secs(5), async { Ok(http::read_request(&mut stream, &mut buf, 0).await) }).await;
            let resp = match read {
                Ok(Ok(req)) if req.method == "GET" && req.path == "/metrics" => {
                    let extra = crate::metrics::store_series(&shard.svc.store.stats, shard.svc.store.queued_writes());
                    let text = crate::metrics::render(shard.cache.scrape_all().await, extra);
                    let mut r = Response::new(200).header("Content-Type", "text/plain; version=0.0.4");
                    r.body = text.into_bytes();
                    r
                }
                Ok(Ok(_)) => Response::new(404),
                _ => return,
            };
            let _ = http::write_response(&mut stream, &resp, true).await;
            let _ = stream.close().await;
        })
        .detach();
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
    client_certificate: bool,
) {
    match crate::ws::handshake(&req, &[crate::ws::MQTT, crate::ws::AMQP]) {
        Ok((resp, protocol)) => {
            if http::write_response(s, &resp, false).await.is_err() {
                return;
            }
            let mut ws = crate::ws::WsStream::new(s, leftover, shard.limits.max_mqtt_packet_bytes + 16);
            if protocol == crate::ws::AMQP {
                let end = crate::amqp::serve_amqp(&mut ws, "amqp-ws", &shard.prov, &shard.stop, &shard.limits, client_certificate).await;
                tracing::debug!(shard = shard.id, ?end, "AMQP over WebSocket ended");
            } else {
                let end = crate::mqtt::serve_mqtt(&mut ws, "mqtt-ws", &shard.prov, &shard.stop, &shard.limits).await;
                tracing::debug!(shard = shard.id, ?end, "MQTT over WebSocket ended");
            }
        }
        Err(why) => {
            let err = ServiceError::invalid(format!("WebSocket upgrade refused: {why}"));
            let resp = Response::json(400, dps_core::error::error_body(&err, "", utc_now()));
            let _ = http::write_response(s, &resp, true).await;
        }
    }
}

/// Request/response loop on an established (TLS) stream. Returns a WebSocket upgrade request
/// (and the bytes that followed it) for the caller to serve.
pub async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    api: &ServiceApi,
    prov: &Provisioning,
    stop: &AtomicBool,
    limits: &crate::config::Limits,
) -> Option<(http::Request, Vec<u8>)> {
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
                let body = dps_core::error::error_body(&err, "", utc_now());
                let resp = Response::json(err.kind.status(), body).header("x-ms-error-code", err.kind.code().to_string());
                if http::write_response(s, &resp, true).await.is_ok() {
                    linger(s).await;
                }
                return None;
            }
        };
        if crate::ws::is_upgrade(&req) {
            return Some((req, std::mem::take(&mut buf)));
        }
        let resp = match crate::device_http::handle(prov, &req, utc_now(), mono_nanos()).await {
            Some(r) => r,
            None => api.handle(&req, utc_now(), mono_nanos()).await,
        };
        let close = req.close || stop.load(Ordering::Relaxed);
        if http::write_response(s, &resp, close).await.is_err() || close {
            return None;
        }
    }
}
