//! The `dps` gateway: configuration, start-up, shards, TLS, HTTP and the service API.

pub mod api;
pub mod bootstrap;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod hubs;
pub mod latency;
pub mod listening;
pub mod metrics;
pub mod provisioning;
pub mod service;
pub mod shard;
pub mod tls;
pub mod transport;

use config::Config;
use serde::Serialize;
use service::{Policy, Service};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What `DIR/endpoint.json` holds once every listener is bound.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub id_scope: String,
    pub host_name: String,
    pub service_connection_string: String,
    pub ca_certificate: Option<PathBuf>,
    pub ports: Ports,
}

impl Endpoint {
    /// The service connection string with its key masked, for places others may read (stdout
    /// ends up in journald and container logs); the whole one is in endpoint.json.
    pub fn masked_connection_string(&self) -> String {
        match self.service_connection_string.split_once("SharedAccessKey=") {
            Some((head, _)) => format!("{head}SharedAccessKey=<in endpoint.json>"),
            None => self.service_connection_string.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Ports {
    pub mqtt: u16,
    pub amqp: u16,
    pub https: u16,
    /// Prometheus metrics (plain HTTP, loopback by default).
    pub admin: u16,
    /// The web console (HTTPS, loopback by default); absent in endpoint.json files written
    /// before it existed.
    #[serde(default)]
    pub console: u16,
}

pub struct Running {
    pub endpoint: Endpoint,
    stop: Arc<AtomicBool>,
    /// The plain threads' stop (hub workers, the latency probe): dropped to stop them. They
    /// sleep on it beside their work, so an idle one never wakes to look at `stop`.
    stop_threads: crossbeam_channel::Sender<()>,
    shards: Vec<glommio::ExecutorJoinHandle<()>>,
    latency: Option<std::thread::JoinHandle<()>>,
    hub_workers: Vec<std::thread::JoinHandle<()>>,
    threads: dps_storage::StoreThreads,
}

impl Running {
    /// Stops accepting, lets connections drain, stops the store threads and flushes the store.
    pub fn shutdown(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.shards {
            let _ = s.join();
        }
        drop(self.stop_threads);
        // The latency thread stops at once (or when a probe in flight ends); it holds the
        // store, which must be closed before this returns.
        if let Some(l) = self.latency {
            let _ = l.join();
        }
        // Hub workers stop at once, or when the step in hand ends (10 s at most).
        for w in self.hub_workers {
            let _ = w.join();
        }
        self.threads.join().map_err(|e| format!("final store flush failed: {e}"))
    }
}

/// Starts the service; returns once every listener is bound and `endpoint.json` is written.
pub fn start(mut cfg: Config, data_dir: &Path) -> Result<Running, String> {
    let prepared = bootstrap::prepare(&cfg, data_dir)?;
    let tls = tls::server_configs(&prepared.certs, &cfg.tls)?;
    let mut policies = prepared.instance.policies.iter().map(Policy::from_stored).collect::<Result<Vec<_>, _>>()?;
    for p in &cfg.access_policies {
        let stored = service::StoredPolicy {
            key_name: p.key_name.clone(),
            primary_key: p.primary_key.clone(),
            secondary_key: p.secondary_key.clone(),
            rights: p.rights.clone(),
        };
        if policies.iter().any(|q| q.key_name.eq_ignore_ascii_case(&p.key_name)) {
            return Err(format!("access policy {} is defined twice", p.key_name));
        }
        policies.push(Policy::from_stored(&stored)?);
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cfg.shards == 0 {
        cfg.shards = if cfg.cpus.is_empty() { cores } else { cfg.cpus.len() };
    }
    if !cfg.cpus.is_empty() && cfg.cpus.len() < cfg.shards {
        return Err(format!("cpus lists {} CPUs for {} shards; list one per shard", cfg.cpus.len(), cfg.shards));
    }
    let store_cfg = dps_storage::StoreServiceConfig {
        readers: cfg.store.readers,
        // A read from etcd is a network round trip: never on a shard.
        inline_point_reads: cfg.store.inline_point_reads && prepared.shared.is_none(),
        queue: cfg.store.queue,
        max_group: cfg.store.max_group,
        linger_us: cfg.store.linger_us,
        // A commit to etcd is a network round trip: never on a shard.
        inline_commit_max_us: if prepared.shared.is_none() { cfg.store.inline_commit_max_us } else { 0 },
    };
    if prepared.shared.is_some() && cfg.limits.enrollment_cache_entries > 0 {
        // Another node's write must be seen by the next registration here: with a shared store
        // enrollments are read through, and the copies of groups, hubs and CAs are checked
        // against the store's config stamp before each use (`Provisioning::snapshot`).
        tracing::info!("shared store: the enrollment cache is off");
        cfg.limits.enrollment_cache_entries = 0;
    }
    let (store, threads) = dps_storage::StoreService::start(prepared.store.clone(), &store_cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_threads, threads_stop) = crossbeam_channel::bounded::<()>(0);
    let boot = u32::from_be_bytes(service::random_bytes::<4>());
    let knobs = hubs::workers::Knobs {
        threads: cfg.limits.hub_workers,
        queue: cfg.limits.hub_queue,
        per_hub: cfg.limits.hub_concurrency,
        instance: boot,
        webhook_timeout: std::time::Duration::from_secs(cfg.limits.custom_allocation_timeout_secs.max(1)),
    };
    let (hub_workers, hub_threads) =
        hubs::workers::HubWorkers::start(knobs, threads_stop.clone()).map_err(|e| format!("cannot start the hub workers: {e}"))?;
    let svc = Arc::new(Service {
        config_generation: std::sync::atomic::AtomicU64::new(0),
        hub_latency: Default::default(),
        id_scope: prepared.instance.id_scope.clone(),
        host_names: cfg.host_names.clone(),
        policies,
        store,
        limits: cfg.limits.clone(),
        shards: cfg.shards,
        boot,
        shard_hash_key: (u64::from_be_bytes(service::random_bytes::<8>()), u64::from_be_bytes(service::random_bytes::<8>())),
        hub_workers,
        hub_tasks: Default::default(),
        shared_store: prepared.shared.is_some(),
        steering: shard::steering::Steering::new(
            cfg.shards,
            cfg.limits.steer_light_load,
            &[cfg.limits.max_connections_per_shard, cfg.limits.max_connections_per_source.div_ceil(cfg.shards.max(1))],
        ),
    });
    let ip: std::net::IpAddr = cfg.ports.bind.parse().map_err(|_| format!("ports.bind '{}' is not an IP address", cfg.ports.bind))?;
    let mut https = SocketAddr::new(ip, cfg.ports.https);
    let mut mqtt = SocketAddr::new(ip, cfg.ports.mqtt);
    let mut amqp = SocketAddr::new(ip, cfg.ports.amqp);
    let admin_ip: std::net::IpAddr =
        cfg.ports.admin_bind.parse().map_err(|_| format!("ports.admin_bind '{}' is not an IP address", cfg.ports.admin_bind))?;
    let mut admin = SocketAddr::new(admin_ip, cfg.ports.admin);
    let console_ip: std::net::IpAddr =
        cfg.ports.console_bind.parse().map_err(|_| format!("ports.console_bind '{}' is not an IP address", cfg.ports.console_bind))?;
    let mut console = SocketAddr::new(console_ip, cfg.ports.console);
    // The shards bind with SO_REUSEPORT, which would let this instance share a port with
    // another `dps serve` of the same user without a word: the kernel would then split devices
    // between two instances (two CAs, two ID scopes). So a listener already there is refused.
    // (A test bind cannot tell: connections of an earlier run in TIME_WAIT would fail it.)
    for (what, addr) in [("HTTPS", https), ("MQTT", mqtt), ("AMQP", amqp), ("admin", admin), ("console", console)] {
        if addr.port() != 0 && listening::someone_listens(addr) {
            let busy = std::io::Error::new(std::io::ErrorKind::AddrInUse, "another process already listens on it");
            return Err(shard::bind_error(what, addr, busy));
        }
    }
    // Process-wide and before any executor starts (vendor/glommio/PATCHES.md).
    glommio::use_symmetric_sleep_fences(cfg.limits.park_with_fences);
    glommio::use_preempt_timers(cfg.limits.preempt_timers);
    let mut shards = Vec::new();
    // The enrollment cache's channel mesh; shards join it once every shard is bound (`go`), so
    // a shard that fails to bind cannot leave the others waiting for it.
    let mesh = (cfg.shards > 1).then(|| glommio::channels::channel_mesh::MeshBuilder::full(cfg.shards, 1024));
    let go = Arc::new(std::sync::atomic::AtomicU8::new(shard::WAIT));
    let fail = |shards: Vec<glommio::ExecutorJoinHandle<()>>, stop: &AtomicBool, msg: String| {
        go.store(shard::ABORT, Ordering::Release);
        stop.store(true, Ordering::Relaxed);
        for s in shards {
            let _ = s.join();
        }
        Err(msg)
    };
    // Shard 0 binds first, so an ephemeral port (0) becomes one port every shard shares.
    for id in 0..cfg.shards {
        let (tx, rx) = std::sync::mpsc::channel();
        let spec = shard::ShardSpec {
            id,
            cpu: if cfg.cpus.is_empty() { (cfg.shards <= cores).then_some(id) } else { cfg.cpus.get(id).copied() },
            svc: svc.clone(),
            tls: tls.clone(),
            handshake_only: cfg.handshake_only,
            https,
            mqtt,
            amqp,
            admin: (id == 0).then_some(admin),
            console: (id == 0).then_some(console),
            stop: stop.clone(),
            mesh: mesh.clone(),
            go: go.clone(),
        };
        match shard::spawn_shard(spec, tx) {
            Ok(h) => shards.push(h),
            Err(e) => return fail(shards, &stop, e),
        }
        match rx.recv() {
            Ok(Ok(ports)) => {
                https.set_port(ports.https);
                mqtt.set_port(ports.mqtt);
                amqp.set_port(ports.amqp);
                if let Some(a) = ports.admin {
                    admin.set_port(a);
                }
                if let Some(c) = ports.console {
                    console.set_port(c);
                }
            }
            Ok(Err(e)) => return fail(shards, &stop, e),
            Err(_) => return fail(shards, &stop, format!("shard {id} ended during start-up")),
        }
    }
    go.store(shard::GO, Ordering::Release);
    let owner = prepared.instance.policies.iter().find(|p| p.key_name == bootstrap::OWNER_POLICY).or(prepared.instance.policies.first());
    let host = cfg.host_names[0].clone();
    let endpoint = Endpoint {
        id_scope: svc.id_scope.clone(),
        service_connection_string: owner
            .map(|p| {
                dps_core::model::ConnectionString { host_name: host.clone(), key_name: p.key_name.clone(), key: p.primary_key.clone() }
                    .render()
            })
            .unwrap_or_default(),
        host_name: host,
        ca_certificate: prepared.certs.ca_cert.clone(),
        ports: Ports { mqtt: mqtt.port(), amqp: amqp.port(), https: https.port(), admin: admin.port(), console: console.port() },
    };
    let text = serde_json::to_string_pretty(&endpoint).map_err(|e| e.to_string())?;
    // endpoint.json holds the owner's key: private, like the data key.
    let tmp = data_dir.join("endpoint.json.tmp");
    bootstrap::write_private(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, data_dir.join("endpoint.json")).map_err(|e| format!("cannot write endpoint.json: {e}"))?;
    let latency = match cfg.limits.hub_latency_refresh_secs {
        0 => None,
        secs => Some(
            latency::spawn(svc.clone(), cfg.limits.hub_latency_port, std::time::Duration::from_secs(secs), threads_stop)
                .map_err(|e| format!("cannot start the hub latency thread: {e}"))?,
        ),
    };
    Ok(Running { endpoint, stop, stop_threads, shards, latency, hub_workers: hub_threads, threads })
}
