//! Shards: one glommio executor per core, each with its own `SO_REUSEPORT` listeners, accept
//! loop and connections. A connection is owned by the task that accepted it, start to end.

pub(crate) mod admin;
pub mod enrollment_cache;
pub mod mesh;
pub mod shared_challenges;
pub mod steering;

use crate::api::ServiceApi;
use crate::clock::mono_nanos;
use crate::metrics::Metrics;
use crate::provisioning::Provisioning;
use crate::service::Service;
use crate::transport::serve_tls;
use dps_core::tracking::TrackingIds;
use enrollment_cache::{EnrollmentCache, Lookup};
use futures::FutureExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use mesh::{Envelope, Mesh};
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct ShardSpec {
    pub id: usize,
    pub cpu: Option<usize>,
    pub svc: Arc<Service>,
    pub tls: crate::tls::TlsConfigs,
    /// Benchmark: the MQTT listener only completes handshakes (config `handshake_only`).
    pub handshake_only: bool,
    pub https: SocketAddr,
    pub mqtt: SocketAddr,
    pub amqp: SocketAddr,
    /// The admin (metrics) listener; shard 0 only.
    pub admin: Option<SocketAddr>,
    /// The web console's listener; shard 0 only.
    pub console: Option<SocketAddr>,
    pub stop: Arc<AtomicBool>,
    pub mesh: Option<MeshBuilder<Envelope<Request, Answer>, Full>>,
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
    pub console: Option<u16>,
}

/// What a shard reports once its listeners are bound (or why they could not be).
pub type Bound = Result<BoundPorts, String>;

pub(crate) fn bind_error(what: &str, addr: SocketAddr, e: std::io::Error) -> String {
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
    let mut builder = LocalExecutorBuilder::new(placement)
        .name(&format!("shard-{}", spec.id))
        // Network I/O does not use glommio's registered DMA buffers; keep the locked
        // reservation small so several shards fit under the default memlock limit.
        .io_memory(256 << 10);
    if spec.svc.limits.spin_before_park_us > 0 {
        builder = builder.spin_before_park(std::time::Duration::from_micros(spec.svc.limits.spin_before_park_us));
    }
    builder.spawn(move || shard_main(spec, bound)).map_err(|e| format!("cannot start shard: {e}"))
}

/// Everything a shard's connection tasks share.
pub(crate) struct Shard {
    pub id: usize,
    /// `id` as the `shard` label of this shard's metrics (written once, not per connection).
    pub id_label: String,
    pub api: ServiceApi,
    pub prov: Provisioning,
    pub cache: Rc<EnrollmentCache>,
    pub metrics: Rc<Metrics>,
    pub svc: Arc<Service>,
    pub tls: crate::tls::TlsConfigs,
    pub handshake_only: bool,
    pub stop: Arc<AtomicBool>,
    pub limits: crate::config::Limits,
    /// One tracking-id sequence for every answer this shard gives (device, service API, framing
    /// errors).
    pub tracking: Rc<TrackingIds>,
    /// Open connections (shared with `prov`, which commits inline while they are few).
    conns: Rc<Cell<usize>>,
    /// Open connections in the service API's reserve (`limits.service_api_connections_per_shard`).
    api_conns: Cell<usize>,
    /// Open connections by source address (only addresses under the per-source limit).
    by_source: std::cell::RefCell<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl Shard {
    /// Admits a connection from its source address under `limits.max_connections_per_source`
    /// (this shard's share of it; SO_REUSEPORT spreads one source's connections over the
    /// shards), and returns the address to release; None: refused.
    fn admit_source(&self, ip: std::net::IpAddr) -> Option<Option<std::net::IpAddr>> {
        let limit = self.limits.max_connections_per_source;
        if limit == 0 || self.limits.source_allow_list.contains(&ip) {
            return Some(None);
        }
        let share = limit.div_ceil(self.svc.shards.max(1));
        let mut by = self.by_source.borrow_mut();
        let n = by.entry(ip).or_default();
        if *n >= share {
            return None;
        }
        *n += 1;
        Some(Some(ip))
    }

    /// The count a connection is held in: the service API's reserve or the shard's own.
    fn pool(&self, api_only: bool) -> &Cell<usize> {
        if api_only {
            &self.api_conns
        } else {
            &self.conns
        }
    }

    fn release_source(&self, source: Option<std::net::IpAddr>) {
        let Some(ip) = source else { return };
        let mut by = self.by_source.borrow_mut();
        if let Some(n) = by.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                by.remove(&ip);
            }
        }
    }
}

/// What one shard asks another.
pub enum Request {
    /// An individual enrollment from its owner's cache partition.
    Lookup(String),
    /// Forget these keys in the owner's partition.
    Invalidate(Vec<String>),
    /// The peer's metric series.
    Scrape,
    /// Take the TPM challenge of a registration key (at this time, unix seconds).
    TakeChallenge(String, i64),
    /// Keep a TPM challenge for a registration key.
    RememberChallenge(String, dps_core::tpm::book::Issued, i64),
}

pub enum Answer {
    Found(Lookup),
    Invalidated,
    Scraped(Vec<(String, i64)>),
    Challenge(Option<dps_core::tpm::book::Issued>),
    Remembered(Result<(), dps_core::tpm::book::Full>),
}

pub type ShardMesh = Mesh<Request, Answer>;

/// How a shard answers its peers.
fn serve_peers(cache: std::rc::Weak<EnrollmentCache>, metrics: Rc<Metrics>) -> mesh::Serve<Request, Answer> {
    Rc::new(move |req| {
        let (cache, metrics) = (cache.upgrade(), metrics.clone());
        Box::pin(async move {
            let Some(cache) = cache else { return Answer::Found(Err(dps_storage::StoreCallError::Closed)) };
            match req {
                Request::Lookup(key) => Answer::Found(cache.local_get(&key).await),
                Request::Invalidate(keys) => {
                    cache.local_invalidate(&keys);
                    Answer::Invalidated
                }
                Request::Scrape => Answer::Scraped(admin::snapshot(&metrics, cache.mesh())),
                Request::TakeChallenge(key, now) => Answer::Challenge(cache.local_take_challenge(&key, now)),
                Request::RememberChallenge(key, issued, now) => Answer::Remembered(cache.local_remember_challenge(key, issued, now)),
            }
        })
    })
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Listener {
    Https,
    Mqtt,
    Amqp,
}

/// A listening socket with SO_REUSEPORT (every shard has its own, the kernel spreads the
/// connections) and SO_REUSEADDR (a restart binds while connections of an earlier process
/// still sit in TIME_WAIT on the port; glommio's own `bind` sets only the first). With its
/// descriptor, which stays the listener's for the listener's life (glommio's listener does
/// not lend it; the light-load steering sets an option on it).
fn listen(addr: SocketAddr) -> std::io::Result<(TcpListener, RawFd)> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let sk = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.set_reuse_port(true)?;
    sk.bind(&addr.into())?;
    defer_accept(&sk, DEFER_ACCEPT_SECS)?;
    // The kernel caps the backlog at net.core.somaxconn (tuning.md).
    sk.listen(4096)?;
    let fd = sk.into_raw_fd();
    // SAFETY: `fd` is a bound, listening TCP socket that nothing else owns: `into_raw_fd`
    // released it from `sk`, and the listener takes ownership of it here.
    #[allow(unsafe_code)]
    Ok((unsafe { TcpListener::from_raw_fd(fd) }, fd))
}

/// How long the kernel holds a connection whose client has sent nothing before handing it to
/// an accept anyway (about; it counts SYN-ACK retransmissions). Every listener serves
/// protocols where the client speaks first (TLS, HTTP), so a connection is accepted with its
/// first bytes already there: the shard wakes once for the accept and the client's first
/// flight together instead of once for each (tuning.md, "One wake-up for the accept and the
/// ClientHello"). A silent connection waits in the kernel meanwhile, not in a connection slot;
/// once handed over, the handshake timeout applies as before. Short, so silent connections
/// do not pile up in the kernel's queue of half-open ones.
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// Sets TCP_DEFER_ACCEPT (Linux; socket2 has no setter for it).
fn defer_accept(sk: &socket2::Socket, secs: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    set_socket_option(sk.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, &secs)
}

/// `setsockopt` with a value of plain C type `T` (an int, a struct the option takes).
pub(crate) fn set_socket_option<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` is a live `T` for the whole call, passed with its size; the kernel only
    // reads it (and copies what it keeps). A descriptor that is not an open socket makes the
    // call fail (EBADF, ENOTSOCK), nothing worse.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn shard_main(spec: ShardSpec, bound: std::sync::mpsc::Sender<Bound>) {
    spec.svc.steering.register_this_thread(spec.id);
    let bind = |what: &str, addr: SocketAddr| listen(addr).map_err(|e| bind_error(what, addr, e));
    let admin = spec.admin.map(|a| bind("admin", a).map(|(l, _)| l)).transpose();
    let console = spec.console.map(|a| bind("console", a).map(|(l, _)| l)).transpose();
    let (https, mqtt, amqp, admin, console) =
        match (bind("HTTPS", spec.https), bind("MQTT", spec.mqtt), bind("AMQP", spec.amqp), admin, console) {
            (Ok(h), Ok(m), Ok(q), Ok(a), Ok(c)) => (h, m, q, a, c),
            (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), ..) | (_, _, _, Err(e), _) | (.., Err(e)) => {
                let _ = bound.send(Err(e));
                return;
            }
        };
    let port = |l: &TcpListener, fallback: u16| l.local_addr().map(|a| a.port()).unwrap_or(fallback);
    let ports = BoundPorts {
        https: port(&https.0, spec.https.port()),
        mqtt: port(&mqtt.0, spec.mqtt.port()),
        amqp: port(&amqp.0, spec.amqp.port()),
        admin: admin.as_ref().map(|l| port(l, 0)),
        console: console.as_ref().map(|l| port(l, 0)),
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
    let (store, entries) = (spec.svc.store.clone(), spec.svc.limits.enrollment_cache_entries);
    // The cache serves the mesh's calls and makes them: built together, the handler holding the
    // cache weakly.
    let cache = Rc::new_cyclic(|cache| {
        let mesh = Mesh::start(mesh, serve_peers(cache.clone(), metrics.clone()));
        let challenges = spec.svc.limits.max_tpm_challenges.div_ceil(spec.svc.shards.max(1));
        EnrollmentCache::new(mesh, spec.svc.shard_hash_key, store, entries, challenges, spec.svc.shared_store, metrics.clone())
    });
    let tracking = Rc::new(TrackingIds::new(spec.svc.boot, spec.id));
    let conns = Rc::new(Cell::new(0));
    let shard = Rc::new(Shard {
        id: spec.id,
        id_label: spec.id.to_string(),
        api: ServiceApi::new(spec.svc.clone(), cache.clone(), metrics.clone(), tracking.clone(), mono_nanos()),
        prov: Provisioning::new(spec.svc.clone(), cache.clone(), metrics.clone(), tracking.clone(), spec.id, conns.clone()),
        tracking,
        cache,
        metrics,
        svc: spec.svc.clone(),
        tls: spec.tls.clone(),
        handshake_only: spec.handshake_only,
        stop: spec.stop.clone(),
        limits: spec.svc.limits.clone(),
        conns,
        api_conns: Cell::new(0),
        by_source: Default::default(),
    });
    tracing::info!(shard = spec.id, https = ports.https, mqtt = ports.mqtt, amqp = ports.amqp, "shard serving");
    let a = glommio::spawn_local(accept_loop(https, Listener::Https, shard.clone()));
    let b = glommio::spawn_local(accept_loop(mqtt, Listener::Mqtt, shard.clone()));
    let q = glommio::spawn_local(accept_loop(amqp, Listener::Amqp, shard.clone()));
    let c = admin.map(|l| glommio::spawn_local(admin::admin_loop(l, shard.clone())));
    let w = console.map(|l| glommio::spawn_local(crate::console::console_loop(l, shard.clone())));
    glommio::spawn_local(watch_stalls(shard.clone())).detach();
    if shard.id == 0 && shard.svc.steering.enabled() {
        glommio::spawn_local(measure_load(shard.clone())).detach();
    }
    a.await;
    b.await;
    q.await;
    if let Some(c) = c {
        c.await;
    }
    if let Some(w) = w {
        w.await;
    }
    // Drain: connections finish their current request and close, those of the service API's
    // reserve too; give them a few seconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while shard.conns.get() + shard.api_conns.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(shard = spec.id, "shard stopped");
}

/// Counts the times this shard's event loop ran late: while the shard serves connections, a
/// timer due every 10 ms that fires more than 10 ms late means some task kept the core that
/// long. An idle shard looks every 500 ms only: each wake-up of a parked shard costs CPU (about
/// 100 µs on the VMs measured, tuning.md), and an idle shard has nothing to stall on.
async fn watch_stalls(shard: Rc<Shard>) {
    const SERVING: Duration = Duration::from_millis(10);
    const IDLE: Duration = Duration::from_millis(500);
    let sid = shard.id.to_string();
    while !shard.stop.load(Ordering::Relaxed) {
        let period = if shard.conns.get() + shard.api_conns.get() > 0 { SERVING } else { IDLE };
        let t = Instant::now();
        glommio::timer::sleep(period).await;
        let late = t.elapsed().saturating_sub(period);
        if late > SERVING {
            shard.metrics.inc("dps_shard_stalls_total", &[("shard", &sid)]);
            shard.metrics.add("dps_shard_stall_microseconds_total", &[("shard", &sid)], late.as_micros() as i64);
        }
    }
}

/// Shard 0 measures every shard's CPU each period and decides whether new connections all
/// come to it (steering.rs).
async fn measure_load(shard: Rc<Shard>) {
    let steering = &shard.svc.steering;
    // A server starts idle, so steered (the accept loops, polled before this task, have
    // attached the program by now).
    shard.metrics.set("dps_light_load_steering", &[], i64::from(steering.light()));
    let (mut before, mut at) = (steering.cpu_nanos(), Instant::now());
    while !shard.stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(steering::PERIOD).await;
        let (now, t) = (steering.cpu_nanos(), Instant::now());
        let busy = steering::busy(&before, &now, t.duration_since(at).as_nanos() as u64);
        let next = steering::decide(steering.light(), &busy);
        if next != steering.light() {
            tracing::debug!(?busy, to_shard_0 = next, "light-load steering changed");
            shard.metrics.set("dps_light_load_steering", &[], i64::from(next));
            steering.set_light(next);
        }
        (before, at) = (now, t);
    }
}

/// How often a pending accept looks at the stop flag: each look wakes the parked shard, so not
/// often; shutdown waits for it at most this long.
const STOP_CHECK: Duration = Duration::from_millis(500);

type PendingAccept<'l> = Pin<Box<dyn Future<Output = glommio::Result<TcpStream, ()>> + 'l>>;

/// Accepts connections until `stop`. The pending accept is never cancelled while serving: an
/// io_uring accept dropped mid-flight can take a connection from the backlog that nobody then
/// serves, so the stop flag is checked beside it, not by abandoning it.
pub(crate) async fn next_connection<'l>(
    listener: &'l TcpListener,
    pending: &mut Option<PendingAccept<'l>>,
    stop: &AtomicBool,
) -> Option<glommio::Result<TcpStream, ()>> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let accept = pending.get_or_insert_with(|| Box::pin(listener.accept()));
        match futures::future::select(accept.as_mut(), glommio::timer::sleep(STOP_CHECK).boxed_local()).await {
            futures::future::Either::Left((r, _)) => {
                *pending = None;
                return Some(r);
            }
            futures::future::Either::Right(_) => continue,
        }
    }
}

async fn accept_loop((listener, fd): (TcpListener, RawFd), kind: Listener, shard: Rc<Shard>) {
    let mut pending = None;
    // Shard 0 applies the light-load steering to its listener's group (steering.rs): the
    // program it last attached (or tried to: a failure is logged and tried again at the next
    // change of decision, not at every accept).
    let mut steered: Option<u32> = None;
    let steers = shard.id == 0 && shard.svc.steering.enabled();
    loop {
        if steers {
            let want = if shard.svc.steering.steer(shard.conns.get()) { 0 } else { steering::SPREAD };
            if steered != Some(want) {
                if let Err(e) = steering::attach(fd, want) {
                    tracing::warn!(error = %e, "cannot steer new connections (limits.steer_light_load); the kernel spreads them");
                }
                steered = Some(want);
            }
        }
        let Some(accepted) = next_connection(&listener, &mut pending, &shard.stop).await else { break };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // The shard full, an HTTPS connection may still take a slot of the service API's
        // reserve, where it is served the service API only.
        let api_only = shard.conns.get() >= shard.limits.max_connections_per_shard;
        if api_only && !(matches!(kind, Listener::Https) && shard.api_conns.get() < shard.limits.service_api_connections_per_shard) {
            shard.metrics.inc("dps_connections_refused_total", &[("shard", &shard.id_label), ("reason", "shard_full")]);
            drop(stream);
            continue;
        }
        // Read once (a system call): the per-source limits here and in the connection use it.
        let Ok(peer) = stream.peer_addr().map(|a| a.ip()) else { continue };
        let Some(source) = shard.admit_source(peer) else {
            shard.metrics.inc("dps_connections_refused_total", &[("shard", &shard.id_label), ("reason", "per_source_limit")]);
            drop(stream);
            continue;
        };
        let pool = shard.pool(api_only);
        pool.set(pool.get() + 1);
        let listener = match kind {
            Listener::Https => "https",
            Listener::Mqtt => "mqtt",
            Listener::Amqp => "amqp",
        };
        shard.metrics.inc("dps_connections_accepted_total", &[("shard", &shard.id_label), ("listener", listener)]);
        shard.metrics.add("dps_connections_open", &[("shard", &shard.id_label)], 1);
        let shard = shard.clone();
        // Boxed here, the task's future is moved through glommio's spawn as a pointer.
        glommio::spawn_local(Box::pin(async move {
            serve_tls(stream, peer, kind, api_only, &shard).await;
            shard.release_source(source);
            let pool = shard.pool(api_only);
            pool.set(pool.get() - 1);
            shard.metrics.add("dps_connections_open", &[("shard", &shard.id_label)], -1);
        }))
        .detach();
    }
}
