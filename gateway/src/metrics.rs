//! Metrics: each shard counts into its own map (no sharing, no locks); a scrape of the admin
//! endpoint on shard 0 asks every other shard for its map over the channel mesh and sums them,
//! then renders the Prometheus text format. Series names follow the DPS metrics
//! (RegistrationAttempts, DeviceAssignments, AttestationAttempts, docs/service-api.md §4.8)
//! plus gateway internals.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// One shard's counters and gauges. Kept by their parts and found by a hash of them, so an
/// update formats nothing and allocates only the first time a series is seen (formatting
/// `name{labels}` on every update was ~25 allocations per registration); `snapshot` writes
/// the `name{labels}` keys.
#[derive(Default)]
pub struct Metrics {
    series: RefCell<HashMap<u64, Vec<Series>>>,
}

struct Series {
    name: String,
    labels: Vec<(String, String)>,
    value: i64,
}

impl Series {
    fn is(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name
            && self.labels.len() == labels.len()
            && self.labels.iter().zip(labels).all(|((k, v), (k2, v2))| k == k2 && v == v2)
    }
}

/// Series with equal parts hash alike (a fixed-key hasher: the map is the shard's own).
fn series_hash(name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    for (k, v) in labels {
        k.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

/// Label values are escaped as the text format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `name{k="v",…}`.
pub fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
    format!("{name}{{{}}}", l.join(","))
}

impl Metrics {
    fn update(&self, name: &str, labels: &[(&str, &str)], f: impl FnOnce(&mut i64)) {
        let mut map = self.series.borrow_mut();
        let bucket = map.entry(series_hash(name, labels)).or_default();
        match bucket.iter_mut().find(|s| s.is(name, labels)) {
            Some(s) => f(&mut s.value),
            None => {
                let mut value = 0;
                f(&mut value);
                let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                bucket.push(Series { name: name.to_string(), labels, value });
            }
        }
    }
    pub fn add(&self, name: &str, labels: &[(&str, &str)], by: i64) {
        self.update(name, labels, |v| *v += by);
    }
    pub fn inc(&self, name: &str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1);
    }
    /// Sets a gauge.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: i64) {
        self.update(name, labels, |v| *v = value);
    }
    /// Every series as `(name{labels}, value)`, in key order.
    pub fn snapshot(&self) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = self
            .series
            .borrow()
            .values()
            .flatten()
            .map(|s| {
                let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                (series(&s.name, &labels), s.value)
            })
            .collect();
        out.sort();
        out
    }
}

/// What each metric is, for the `# HELP`/`# TYPE` lines.
const CATALOGUE: &[(&str, &str, &str)] = &[
    ("dps_registration_attempts_total", "counter", "Device registrations attempted (DPS RegistrationAttempts), by protocol and status."),
    ("dps_device_assignments_total", "counter", "Devices assigned to a hub (DPS DeviceAssignments), by hub."),
    (
        "dps_attestation_attempts_total",
        "counter",
        "Device attestations attempted (DPS AttestationAttempts), by protocol, attestation type and status.",
    ),
    ("dps_service_operations_total", "counter", "Service API operations, by HTTP status."),
    ("dps_connections_accepted_total", "counter", "Connections accepted, by shard and listener."),
    ("dps_connections_open", "gauge", "Connections open, by shard."),
    (
        "dps_light_load_steering",
        "gauge",
        "1 while new connections all go to shard 0 (the shards are lightly busy), 0 while the kernel spreads them.",
    ),
    (
        "dps_login_timeouts_total",
        "counter",
        "Device connections closed at the login deadline (limits.login_timeout_secs), by protocol and the login step still awaited.",
    ),
    ("dps_tls_handshakes_total", "counter", "TLS handshakes, by shard and result (ok = full, resumed, failed, timeout)."),
    ("dps_cross_shard_lookups_total", "counter", "Enrollment lookups answered by another shard's cache partition, by shard."),
    (
        "dps_cross_shard_pending",
        "gauge",
        "Lookups a shard has sent to other shards and not yet had answered (the cross-shard queue), by shard.",
    ),
    ("dps_shard_stalls_total", "counter", "Times a shard's event loop ran more than 10 ms late (a task held the core), by shard."),
    ("dps_shard_stall_seconds_total", "counter", "Total lateness of those stalls, seconds, by shard."),
    ("dps_store_commit_groups_total", "counter", "Group commits (one fsync each)."),
    ("dps_store_commit_transactions_total", "counter", "Transactions committed."),
    (
        "dps_store_inline_commits_total",
        "counter",
        "Transactions committed on the shard that asked, not the writer thread (store.inline_commit_max_us).",
    ),
    ("dps_store_commit_seconds_total", "counter", "Time spent committing, seconds."),
    ("dps_store_commit_latency_seconds", "histogram", "Latency of a group commit (write and fsync)."),
    ("dps_store_write_queue_depth", "gauge", "Writes waiting for the store writer."),
    (
        "dps_store_writes_stopped",
        "gauge",
        "1 once a full disk or a failed fsync stopped the store's writes (reads go on; restart once fixed).",
    ),
];

/// One sample's value: counts are integers, durations seconds.
#[derive(Debug, Clone, Copy)]
enum Value {
    Int(i64),
    Float(f64),
}

/// A scrape: every shard's series summed (name → label set → value), the store's, and the store's
/// commit latency histogram; encoded by prometheus-client, so the exposition is valid by
/// construction.
#[derive(Debug, Default)]
struct Scrape {
    series: BTreeMap<String, BTreeMap<Vec<(String, String)>, Value>>,
    /// Sum (seconds) and per-bucket counts (upper bound in seconds; the last +Inf).
    commit_latency: (f64, Vec<(f64, u64)>),
}

impl Scrape {
    fn add(&mut self, series: &str, v: Value) {
        let (name, labels) = split_series(series);
        // Our internal durations are integer microseconds; the exposition's unit is the second.
        let (name, v) = match (name.strip_suffix("_microseconds_total"), v) {
            (Some(base), Value::Int(us)) => (format!("{base}_seconds_total"), Value::Float(us as f64 / 1e6)),
            _ => (name, v),
        };
        let slot = self.series.entry(name).or_default().entry(labels).or_insert(Value::Int(0));
        *slot = match (*slot, v) {
            (Value::Int(a), Value::Int(b)) => Value::Int(a + b),
            (Value::Int(a), Value::Float(b)) => Value::Float(a as f64 + b),
            (Value::Float(a), Value::Int(b)) => Value::Float(a + b as f64),
            (Value::Float(a), Value::Float(b)) => Value::Float(a + b),
        };
    }
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::NoLabelSet;
        use prometheus_client::metrics::MetricType;
        let empty = BTreeMap::new();
        for (name, kind, help) in CATALOGUE {
            let samples = self.series.get(*name).unwrap_or(&empty);
            match *kind {
                "counter" => {
                    // OpenMetrics names the counter family without its `_total` sample suffix.
                    let family = name.strip_suffix("_total").unwrap_or(name);
                    let mut m = enc.encode_descriptor(family, help, None, MetricType::Counter)?;
                    for (labels, v) in samples {
                        sample(&mut m, labels, |e| match v {
                            Value::Int(i) => e.encode_counter::<NoLabelSet, _, u64>(&(*i).max(0).unsigned_abs(), None),
                            Value::Float(x) => e.encode_counter::<NoLabelSet, _, u64>(&x.max(0.0), None),
                        })?;
                    }
                }
                "gauge" => {
                    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
                    for (labels, v) in samples {
                        sample(&mut m, labels, |e| match v {
                            Value::Int(i) => e.encode_gauge(i),
                            Value::Float(x) => e.encode_gauge(x),
                        })?;
                    }
                }
                _ => {
                    let (sum, buckets) = &self.commit_latency;
                    let count = buckets.iter().map(|(_, c)| c).sum();
                    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
                    m.encode_histogram::<NoLabelSet>(*sum, count, buckets, None)?;
                }
            }
        }
        Ok(())
    }
}

/// One sample: bare without labels (`name 1`, not `name{} 1`), else in its label set.
/// prometheus-client (0.23) writes label values as given, so they are escaped here.
fn sample(
    m: &mut prometheus_client::encoding::MetricEncoder,
    labels: &[(String, String)],
    write: impl FnOnce(&mut prometheus_client::encoding::MetricEncoder) -> std::fmt::Result,
) -> std::fmt::Result {
    if labels.is_empty() {
        return write(m);
    }
    let escaped: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.clone(), esc(v))).collect();
    write(&mut m.encode_family(&escaped)?)
}

/// `name{k="v",…}` (as `series` writes it) back into its name and labels.
fn split_series(s: &str) -> (String, Vec<(String, String)>) {
    let Some((name, rest)) = s.split_once('{') else { return (s.to_string(), Vec::new()) };
    let mut labels = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    (name.to_string(), labels)
}

/// The store's commit statistics and write queue, for a scrape.
pub struct StoreView {
    pub groups: u64,
    pub txns: u64,
    pub inline_txns: u64,
    pub commit_seconds: f64,
    pub queued: usize,
    pub writes_stopped: bool,
    /// Per-bucket commit counts (upper bound in seconds; the last bucket +Inf).
    pub buckets: Vec<(f64, u64)>,
}

impl StoreView {
    pub fn read(stats: &dps_storage::CommitStats, queued: usize) -> StoreView {
        use std::sync::atomic::Ordering::Relaxed;
        let buckets = stats
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (dps_storage::COMMIT_BUCKETS_US.get(i).map_or(f64::MAX, |us| *us as f64 / 1e6), b.load(Relaxed)))
            .collect();
        StoreView {
            groups: stats.groups.load(Relaxed),
            txns: stats.txns.load(Relaxed),
            inline_txns: stats.inline_txns.load(Relaxed),
            commit_seconds: stats.commit_micros.load(Relaxed) as f64 / 1e6,
            queued,
            writes_stopped: stats.writes_stopped.load(Relaxed),
            buckets,
        }
    }
}

/// Sums the shards' series, adds the store's, and renders the OpenMetrics text format.
pub fn render(shards: Vec<Vec<(String, i64)>>, store: Option<StoreView>) -> String {
    let mut scrape = Scrape::default();
    for (k, v) in shards.into_iter().flatten() {
        scrape.add(&k, Value::Int(v));
    }
    if let Some(st) = store {
        let int = |v: u64| Value::Int(i64::try_from(v).unwrap_or(i64::MAX));
        scrape.add("dps_store_commit_groups_total", int(st.groups));
        scrape.add("dps_store_commit_transactions_total", int(st.txns));
        scrape.add("dps_store_inline_commits_total", int(st.inline_txns));
        scrape.add("dps_store_commit_seconds_total", Value::Float(st.commit_seconds));
        scrape.add("dps_store_write_queue_depth", int(st.queued as u64));
        // 1 once a full disk or a failed fsync stopped the store's writes (until a restart).
        scrape.add("dps_store_writes_stopped", Value::Int(i64::from(st.writes_stopped)));
        scrape.commit_latency = (st.commit_seconds, st.buckets);
    }
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    // Writing into a String cannot fail; an error here would be the encoder's own.
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        tracing::error!("metrics encoding failed");
    }
    out
}

/// The content type of `render`'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grafana_dashboard_asks_for_metrics_that_exist() {
        let dash: serde_json::Value = serde_json::from_str(include_str!("../../packaging/grafana-dashboard.json")).unwrap();
        let mut seen = 0;
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                let mut rest = expr;
                while let Some(at) = rest.find("dps_") {
                    let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    let family = ["_bucket", "_sum", "_count"].iter().fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
                    assert!(
                        CATALOGUE.iter().any(|(m, _, _)| *m == family),
                        "{} asks for {name}, which the service does not export",
                        p["title"]
                    );
                    seen += 1;
                    rest = &rest[at + name.len()..];
                }
            }
        }
        assert!(seen >= 13, "{seen}");
    }

    #[test]
    fn merge_and_render() {
        let a = Metrics::default();
        a.inc("dps_registration_attempts_total", &[("protocol", "mqtt"), ("status", "success")]);
        a.inc("dps_registration_attempts_total", &[("protocol", "mqtt"), ("status", "success")]);
        a.add("dps_shard_stall_microseconds_total", &[("shard", "0")], 1_500_000);
        let b = Metrics::default();
        b.inc("dps_registration_attempts_total", &[("protocol", "mqtt"), ("status", "success")]);
        b.inc("dps_device_assignments_total", &[("hub", "h\"1")]);
        b.set("dps_connections_open", &[("shard", "1")], 7);
        let text = render(vec![a.snapshot(), b.snapshot()], Some(StoreView::read(&dps_storage::CommitStats::default(), 4)));
        assert!(text.contains("dps_registration_attempts_total{protocol=\"mqtt\",status=\"success\"} 3\n"), "{text}");
        assert!(text.contains("# TYPE dps_registration_attempts counter\n"), "{text}");
        assert!(text.contains("dps_device_assignments_total{hub=\"h\\\"1\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE dps_connections_open gauge\ndps_connections_open{shard=\"1\"} 7\n"), "{text}");
        assert!(text.contains("dps_store_write_queue_depth 4\n"), "{text}");
        assert!(text.contains("dps_shard_stall_seconds_total{shard=\"0\"} 1.5\n"), "microseconds exposed as seconds: {text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn series_names_split_back_into_labels() {
        let s = series("m_total", &[("a", "x,y"), ("b", "q\"u\\o\nte")]);
        assert_eq!(split_series(&s), ("m_total".to_string(), vec![("a".into(), "x,y".into()), ("b".into(), "q\"u\\o\nte".into())]));
        assert_eq!(split_series("plain"), ("plain".to_string(), vec![]));
    }

    #[test]
    fn histogram_buckets_in_order_with_inf_last() {
        // Regression: series were written in key order, which put le="+Inf" before
        // le="0.0001" (a text format Prometheus refuses).
        let stats = dps_storage::CommitStats::default();
        let text = render(vec![], Some(StoreView::read(&stats, 0)));
        let family: Vec<&str> = text.lines().filter(|l| l.starts_with("dps_store_commit_latency_seconds_bucket")).collect();
        let les: Vec<f64> = family
            .iter()
            .filter_map(|l| l.split_once("le=\"").map(|(_, r)| r.split('"').next().unwrap()))
            .map(|le| if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() })
            .collect();
        assert_eq!(les.len(), dps_storage::COMMIT_BUCKETS_US.len() + 1, "{text}");
        assert!(les.windows(2).all(|w| w[0] < w[1]), "buckets out of order: {family:?}");
        assert_eq!(les.last(), Some(&f64::INFINITY));
    }
}
