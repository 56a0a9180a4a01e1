//! Configuration: a TOML file with an environment overlay (`DPS_SECTION__KEY=value`, e.g.
//! `DPS_LIMITS__MAX_BULK_ITEMS=1000`), then command-line flags. Unknown keys are rejected with
//! their name. Every knob is listed in tuning.md with its default, unit and trade-off.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store, keys and generated certificates live.
    pub data_dir: Option<PathBuf>,
    /// ID scope of a new instance (`0ne` and 8 hex digits; default: random). A data dir keeps
    /// the scope it was made with: naming another one here is refused.
    pub id_scope: Option<String>,
    /// Host names devices and operators use to reach this service; the first one goes into the
    /// connection string and every one into the generated server certificate.
    pub host_names: Vec<String>,
    /// Shards (executors, one per core by default; 0 = one per available core, or one per
    /// entry of `cpus`).
    pub shards: usize,
    /// CPUs the shards are pinned to, shard i on `cpus[i]` (empty: shard i on CPU i when there
    /// are no more shards than cores, else unpinned).
    pub cpus: Vec<usize>,
    pub ports: Ports,
    pub tls: Tls,
    pub limits: Limits,
    pub store: StoreKnobs,
    pub linked_hubs: Vec<HubConfig>,
    /// Shared access policies besides `provisioningserviceowner`, e.g. read-only ones.
    pub access_policies: Vec<PolicyConfig>,
    /// Benchmark only: the MQTT listener completes TLS handshakes and nothing else (it waits
    /// for the client's close), to measure the handshake limit of the same shards.
    pub handshake_only: bool,
    /// `DPS_*` environment variables that were not configuration keys (warned about, skipped).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub key_name: String,
    /// base64 keys.
    pub primary_key: String,
    pub secondary_key: String,
    /// Comma-separated rights: ServiceConfig, EnrollmentRead, EnrollmentWrite, DeviceConnect,
    /// RegistrationStatusRead, RegistrationStatusWrite.
    pub rights: String,
}

impl Config {
    /// Every listener on 127.0.0.1 with an ephemeral port (tests, benchmarks, side-by-side
    /// instances); the ports chosen are in endpoint.json.
    pub fn loopback() -> Config {
        let ports = Ports { mqtt: 0, amqp: 0, https: 0, admin: 0, console: 0, ..Ports::default() };
        Config { ports, ..Config::default() }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: None,
            id_scope: None,
            host_names: vec!["localhost".to_string()],
            shards: 0,
            cpus: Vec::new(),
            ports: Ports::default(),
            tls: Tls::default(),
            limits: Limits::default(),
            store: StoreKnobs::default(),
            linked_hubs: Vec::new(),
            access_policies: Vec::new(),
            handshake_only: false,
            ignored_env: Vec::new(),
        }
    }
}

/// The defaults are the ports the official SDKs hard-code.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    pub mqtt: u16,
    pub amqp: u16,
    pub https: u16,
    /// Address the listeners bind to.
    pub bind: String,
    /// Admin (Prometheus `/metrics`) port, plain HTTP on `admin_bind`; 0 picks a free port.
    pub admin: u16,
    /// Address of the admin listener: loopback unless an operator opens it up.
    pub admin_bind: String,
    /// The web console's port (HTTPS, the server certificate, a shared access policy's key to
    /// log in) on `console_bind`; 0 picks a free port.
    pub console: u16,
    /// Address of the console listener: loopback unless an operator opens it up.
    pub console_bind: String,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            mqtt: 8883,
            amqp: 5671,
            https: 443,
            bind: "0.0.0.0".to_string(),
            admin: 9464,
            admin_bind: "127.0.0.1".to_string(),
            console: 9465,
            console_bind: "127.0.0.1".to_string(),
        }
    }
}

/// Operator-supplied certificates (when absent a development CA and server certificates are
/// generated in the data dir) and session resumption.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    pub ecdsa_cert: Option<PathBuf>,
    pub ecdsa_key: Option<PathBuf>,
    pub rsa_cert: Option<PathBuf>,
    pub rsa_key: Option<PathBuf>,
    /// CA certificate to advertise in endpoint.json.
    pub ca_cert: Option<PathBuf>,
    /// Sessions remembered for resumption (shared by all shards; 0 = none).
    pub session_cache_entries: usize,
    /// Resume from stateless, encrypted tickets instead of the session cache (no server memory
    /// per session; the ticket key rotates every 6 hours).
    pub stateless_tickets: bool,
    /// TLS 1.3 tickets sent after each full handshake (0 = no TLS 1.3 resumption).
    pub tickets_per_handshake: usize,
    /// Host names (also listed in `host_names`) that operators use for the service API only: a
    /// TLS handshake that names one of them (SNI) on the HTTPS port requests no client
    /// certificate. Every other handshake requests one, since X.509 devices need it.
    pub service_api_host_names: Vec<String>,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            ecdsa_cert: None,
            ecdsa_key: None,
            rsa_cert: None,
            rsa_key: None,
            ca_cert: None,
            session_cache_entries: 65_536,
            stateless_tickets: false,
            tickets_per_handshake: 1,
            service_api_host_names: Vec::new(),
        }
    }
}

/// Limits; defaults follow the DPS limits table (docs/service-api.md §4.6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body, bytes. DPS: 96 KB.
    pub max_body_bytes: usize,
    /// Items per bulk call. DPS documents 10.
    pub max_bulk_items: usize,
    pub max_enrollments: u64,
    pub max_symmetric_key_groups: u64,
    pub max_x509_groups: u64,
    pub max_linked_hubs: u64,
    /// CA certificates the instance holds (DPS: 25).
    pub max_ca_certificates: u64,
    /// Service API operations per minute for the whole service (0 = unlimited). DPS: 1,000.
    pub service_operations_per_minute: u64,
    /// Page size when the caller does not send `x-ms-max-item-count`.
    pub default_page_size: usize,
    pub max_page_size: usize,
    /// Open connections per shard; further connections are closed at accept, except on the
    /// HTTPS port while the service API's reserve has room.
    pub max_connections_per_shard: usize,
    /// HTTPS connections per shard kept for the service API beyond `max_connections_per_shard`:
    /// when devices (or anyone) fill the shard, operators still get in. A connection admitted
    /// into this reserve is served service API requests only; a device request on it gets 503
    /// with Retry-After.
    pub service_api_connections_per_shard: usize,
    /// Connections one source address may hold at once (each shard admits its share); 0 = no
    /// limit. A factory line behind one NAT address goes into `source_allow_list`.
    pub max_connections_per_source: usize,
    /// Source addresses exempt from `max_connections_per_source` (e.g. a factory's NAT).
    pub source_allow_list: Vec<std::net::IpAddr>,
    /// Seconds a connection may sit idle (or take to send a request head) before it is closed.
    pub idle_timeout_secs: u64,
    /// Seconds allowed for a TLS handshake.
    pub handshake_timeout_secs: u64,
    /// After the TLS handshake, a device must be logged in within this (MQTT: CONNECT
    /// accepted; AMQP: SASL done and the connection open), however it trickles its bytes.
    pub login_timeout_secs: u64,
    /// Seconds a connection stays open after its device's credential was refused (401): long
    /// enough for the SDK to read the answer and hang up itself (the Node SDK never reports the
    /// refusal if the connection ends right behind it), short enough that refused devices do
    /// not hold slots. MQTT and AMQP; an HTTPS connection is closed with the 401.
    pub refused_close_secs: u64,
    /// The largest MQTT keep-alive honoured (s); the read deadline is 1.5 times it.
    pub max_keep_alive_secs: u64,
    /// Registration states kept (DPS quota).
    pub max_registrations: u64,
    /// Device registrations per minute for the whole service (0 = unlimited, the default).
    pub registrations_per_minute: u64,
    /// Operation status polls a device may make per `poll_window_secs` (DPS: 5 per 10 s).
    pub polls_per_device: u64,
    pub poll_window_secs: u64,
    /// Largest MQTT packet, bytes (DPS: 96 KB).
    pub max_mqtt_packet_bytes: usize,
    /// How often the connect time to each linked hub is measured for geoLatency (0 = never).
    pub hub_latency_refresh_secs: u64,
    /// Port the hub latency probe connects to (IoT Hub: 443).
    pub hub_latency_port: u16,
    /// Individual enrollments (and absences) each shard's cache partition holds.
    pub enrollment_cache_entries: usize,
    /// TPM challenges issued over HTTPS and not yet answered, service-wide (each shard holds
    /// its share; one per registration id at most, each valid 5 minutes). When full, new
    /// challenges are refused with 503 and a retry-after until older ones expire.
    pub max_tpm_challenges: usize,
    /// Hub worker threads: they run the hub connectors' steps (each mostly waits on its hub),
    /// so this bounds the requests in flight to all hubs together.
    pub hub_workers: usize,
    /// Hub steps waiting for a worker; past it a step counts as a transient failure and is
    /// retried after a backoff.
    pub hub_queue: usize,
    /// Steps in flight to one hub (or custom allocation webhook) at most; past it a step is
    /// retried after the backoff, so a slow hub cannot hold every worker.
    pub hub_concurrency: usize,
    /// How long a device's register (or poll) waits for its hub to take it before it is
    /// answered `assigning` and polls (ms). Within it, the device gets `assigned` at once.
    pub hub_wait_ms: u64,
    /// Retries of a hub step: the first after `hub_retry_first_ms`, doubling up to
    /// `hub_retry_max_ms`; after `hub_deadline_secs` the registration is `failed` (503201).
    pub hub_retry_first_ms: u64,
    pub hub_retry_max_ms: u64,
    pub hub_deadline_secs: u64,
    /// How long a custom allocation webhook may take to answer one request (s); a timeout is
    /// retried like an unreachable hub.
    pub custom_allocation_timeout_secs: u64,
    /// A shard with nothing to do keeps polling this long (µs) before it parks (0: parks at
    /// once). Spinning trades idle CPU for fewer parks (tuning.md).
    pub spin_before_park_us: u64,
    /// A shard about to park orders its "asleep" flag against wakers with a fence on each
    /// side (true), or with glommio's process-wide membarrier, an interrupt to every CPU
    /// running a thread of the service at each park (false; upstream glommio). tuning.md has
    /// the measurements.
    pub park_with_fences: bool,
    /// Shards arm glommio's preemption timers on every pass of their event loop (upstream
    /// behaviour). Off (the default): a shard runs one task queue, so there is nothing to
    /// preempt for, and each arm and cancel costs a submission and a timer reprogramming
    /// (tuning.md, "Partial load").
    pub preempt_timers: bool,
    /// While the shards together are lightly busy, new connections all go to shard 0 (a BPF
    /// program on the listeners); once it is busy, the kernel spreads them again (tuning.md,
    /// "Light load on one shard"). Off: always spread.
    pub steer_light_load: bool,
    /// Refused device credentials (401) allowed per source address per minute, service-wide
    /// (each shard holds its share); past it the source is answered 429 before any store read
    /// until its budget refills. 0: no bound. Sources in `source_allow_list` are exempt.
    pub attestation_failures_per_source: u64,
    /// Seconds a write may wait for the peer to read before the connection is closed (a client
    /// that stops reading would otherwise hold its connection's task and slot for ever).
    pub write_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 96 * 1024,
            max_bulk_items: 10,
            max_enrollments: 1_000_000,
            max_symmetric_key_groups: 100,
            max_x509_groups: 100,
            max_linked_hubs: 50,
            max_ca_certificates: 25,
            service_operations_per_minute: 1_000,
            default_page_size: 100,
            max_page_size: 1_000,
            max_connections_per_shard: 50_000,
            service_api_connections_per_shard: 256,
            max_connections_per_source: 1_000,
            source_allow_list: Vec::new(),
            idle_timeout_secs: 60,
            handshake_timeout_secs: 10,
            login_timeout_secs: 20,
            refused_close_secs: 5,
            max_keep_alive_secs: 300,
            max_registrations: 1_000_000,
            registrations_per_minute: 0,
            polls_per_device: 5,
            poll_window_secs: 10,
            max_mqtt_packet_bytes: 96 * 1024,
            hub_latency_refresh_secs: 60,
            hub_latency_port: 443,
            enrollment_cache_entries: 200_000,
            max_tpm_challenges: 100_000,
            hub_workers: 8,
            hub_queue: 4096,
            hub_concurrency: 4,
            hub_wait_ms: 3000,
            hub_retry_first_ms: 200,
            hub_retry_max_ms: 5000,
            hub_deadline_secs: 120,
            custom_allocation_timeout_secs: 30,
            spin_before_park_us: 0,
            park_with_fences: true,
            preempt_timers: false,
            steer_light_load: true,
            attestation_failures_per_source: 120,
            write_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreKnobs {
    pub readers: usize,
    /// Point reads on the shard itself instead of a reader thread (tuning.md): on by default
    /// with fjall (one crossing and two wake-ups fewer per registration); never with etcd,
    /// whose reads are network round trips.
    pub inline_point_reads: bool,
    pub queue: usize,
    pub max_group: usize,
    /// Under load (the last group commit held more than one write), the store writer sleeps
    /// this long (µs) before its next group, so more writes share one fsync. Default 2,000:
    /// less CPU per registration at saturation, no wait at light load (tuning.md).
    pub linger_us: u64,
    /// A commit runs on the shard that asks for it, instead of the writer thread, when nothing
    /// else is being committed and recent commits took at most this long (µs; 0: never). On by
    /// default with fjall (tuning.md); never with etcd, whose commits are network round trips.
    pub inline_commit_max_us: u64,
    /// fjall block cache, MiB.
    pub cache_mb: u64,
    /// `fjall` (embedded, one node: the default) or `etcd` (state shared by several nodes).
    pub kind: String,
    /// etcd client URLs (`kind = "etcd"`).
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this instance in etcd; nodes with the same endpoints and root are one
    /// instance.
    pub etcd_root: String,
    /// etcd authentication, when the cluster has it on.
    pub etcd_user: Option<String>,
    pub etcd_password: Option<String>,
    /// TLS to etcd (`https://` endpoints): the CA file the members' certificates chain to.
    pub etcd_ca_file: Option<std::path::PathBuf>,
    /// This node's client certificate and key (PEM files), for a cluster that checks them.
    pub etcd_cert_file: Option<std::path::PathBuf>,
    pub etcd_key_file: Option<std::path::PathBuf>,
}

impl Default for StoreKnobs {
    fn default() -> Self {
        let d = dps_storage::StoreServiceConfig::default();
        StoreKnobs {
            readers: d.readers,
            inline_point_reads: true,
            queue: d.queue,
            max_group: d.max_group,
            linger_us: 2_000,
            inline_commit_max_us: 1_000,
            cache_mb: 64,
            kind: "fjall".into(),
            etcd_endpoints: Vec::new(),
            etcd_root: "/dps".into(),
            etcd_user: None,
            etcd_password: None,
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// What devices are told and connect to.
    pub host_name: String,
    /// `registry-only` (the default: the assignment is only recorded) or `mosquitto`.
    #[serde(default)]
    pub kind: Option<String>,
    /// The hub's shared access policy (`registry-only`).
    #[serde(default)]
    pub connection_string: String,
    /// `mosquitto`: where the dynamic-security commands go, `mqtt://host:port` or `mqtts://…`.
    #[serde(default)]
    pub control_url: Option<String>,
    /// `mosquitto`: the dynamic-security admin client the service logs in as.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// `mosquitto` over `mqtts`: a PEM file with the CA the broker's certificate chains to.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub allocation_weight: Option<u32>,
    #[serde(default)]
    pub apply_allocation_policy: Option<bool>,
    #[serde(default)]
    pub location: Option<String>,
}

/// Environment variables with the `DPS_` prefix that are not configuration keys.
const RESERVED_ENV: &[&str] = &["DPS_DATA_KEY", "DPS_LOG", "DPS_LOG_FORMAT"];
/// Top-level keys an environment variable may set (`DPS_SHARDS=2`).
const TOP_LEVEL_ENV: &[&str] = &["data_dir", "host_names", "shards", "cpus", "handshake_only"];
/// Sections an environment variable may set a key of (`DPS_LIMITS__MAX_BULK_ITEMS=1000`).
const SECTIONS_ENV: &[&str] = &["ports", "tls", "limits", "store"];

/// Where a `DPS_*` variable goes in the configuration, or None when it is not of our shape.
/// Scripts commonly export their own `DPS_HOST` or `DPS_URL`: such a variable is not ours and
/// is skipped with a warning, never a reason to refuse to start. A variable that names one of
/// our sections (`DPS_LIMITS__…`) is ours, so an unknown key in it is refused as a typo.
fn env_path(var: &str) -> Option<Vec<String>> {
    let rest = var.strip_prefix("DPS_")?;
    let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
    match path.as_slice() {
        [key] if TOP_LEVEL_ENV.contains(&key.as_str()) => Some(path),
        [section, key] if SECTIONS_ENV.contains(&section.as_str()) && !key.is_empty() => Some(path),
        _ => None,
    }
}

impl Config {
    /// Reads the file (if any), applies `DPS_*` variables from `env`, and checks the result.
    pub fn load(file: Option<&std::path::Path>, env: impl Iterator<Item = (String, String)>) -> Result<Config, String> {
        let mut table: toml::Table = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read config {}: {e}", p.display()))?;
                text.parse().map_err(|e| format!("config {}: {e}", p.display()))?
            }
            None => toml::Table::new(),
        };
        let mut ignored = Vec::new();
        for (k, v) in env {
            if !k.starts_with("DPS_") || RESERVED_ENV.contains(&k.as_str()) {
                continue;
            }
            let Some(path) = env_path(&k) else {
                tracing::warn!(variable = %k, "ignoring environment variable: not a configuration key (DPS_<SECTION>__<KEY> or a top-level key)");
                ignored.push(k);
                continue;
            };
            let mut t = &mut table;
            for seg in &path[..path.len() - 1] {
                let entry = t.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                t = entry.as_table_mut().ok_or_else(|| format!("environment variable {k}: '{seg}' is not a section"))?;
            }
            t.insert(path[path.len() - 1].clone(), env_value(&v));
        }
        let mut cfg: Config =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| format!("configuration: {}", e.message()))?;
        cfg.check()?;
        cfg.ignored_env = ignored;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        if self.host_names.is_empty() {
            return Err("host_names must name at least one host".into());
        }
        for n in &self.tls.service_api_host_names {
            if !self.host_names.iter().any(|h| h.eq_ignore_ascii_case(n)) {
                return Err(format!("tls.service_api_host_names: '{n}' must also be in host_names (the server certificate names them)"));
            }
        }
        let l = &self.limits;
        if l.max_body_bytes < 1024 {
            return Err("limits.max_body_bytes must be at least 1024".into());
        }
        if l.max_bulk_items == 0 || l.default_page_size == 0 || l.max_page_size < l.default_page_size {
            return Err("limits: max_bulk_items and default_page_size must be positive, max_page_size >= default_page_size".into());
        }
        Ok(())
    }
}

/// An environment value as TOML: integers, booleans and arrays as such, anything else a string.
fn env_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = v.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if v.starts_with('[') {
        if let Ok(t) = format!("x = {v}").parse::<toml::Table>() {
            if let Some(x) = t.get("x") {
                return x.clone();
            }
        }
    }
    toml::Value::String(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overlay_and_unknown_keys() {
        let env = vec![("DPS_LIMITS__MAX_BULK_ITEMS".to_string(), "1000".to_string()), ("DPS_HOST_NAMES".into(), "[\"a\", \"b\"]".into())];
        let c = Config::load(None, env.into_iter()).unwrap();
        assert_eq!(c.limits.max_bulk_items, 1000);
        assert_eq!((c.tls.session_cache_entries, c.tls.tickets_per_handshake, c.tls.stateless_tickets), (65_536, 1, false));
        let tuned = vec![("DPS_CPUS".to_string(), "[2, 3]".to_string()), ("DPS_TLS__STATELESS_TICKETS".into(), "true".into())];
        let t = Config::load(None, tuned.into_iter()).unwrap();
        assert_eq!((t.cpus, t.tls.stateless_tickets), (vec![2, 3], true));
        assert_eq!(c.host_names, ["a", "b"]);
        let err = Config::load(None, vec![("DPS_LIMITS__MAX_BULK".to_string(), "1".to_string())].into_iter()).unwrap_err();
        assert!(err.contains("max_bulk"), "{err}");
    }

    #[test]
    fn service_api_host_names_must_be_host_names() {
        let env = |v: &str| vec![("DPS_TLS__SERVICE_API_HOST_NAMES".to_string(), v.to_string())].into_iter();
        let err = Config::load(None, env("[\"elsewhere.example\"]")).unwrap_err();
        assert!(err.contains("elsewhere.example"), "{err}");
        assert_eq!(Config::load(None, env("[\"LOCALHOST\"]")).unwrap().tls.service_api_host_names, ["LOCALHOST"]);
    }

    #[test]
    fn unrelated_dps_variables_are_skipped_not_fatal() {
        // Regression: DPS_HOST (common in scripts) became a config key and refused the start.
        let env = [("DPS_HOST", "example.net"), ("DPS_URL", "https://x"), ("DPS_A__B__C", "1"), ("DPS_SHARDS", "3"), ("DPS_", "")];
        let c = Config::load(None, env.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.ignored_env, ["DPS_HOST", "DPS_URL", "DPS_A__B__C", "DPS_"]);
    }

    #[test]
    fn file_with_hubs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "[ports]\nhttps = 8443\n[[linked_hubs]]\nhost_name = \"h\"\nconnection_string = \"x\"\nbogus = 1\n").unwrap();
        let err = Config::load(Some(&p), std::iter::empty()).unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }
}
