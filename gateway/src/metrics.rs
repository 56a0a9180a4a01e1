//! Metrics: each shard counts into its own map (no sharing, no locks); a scrape of the admin
//! endpoint on shard 0 asks every other shard for its map over the channel mesh and sums them,
//! then renders the Prometheus text format. Series names follow the DPS metrics
//! (RegistrationAttempts, DeviceAssignments, AttestationAttempts, docs/service-api.md §4.8)
//! plus gateway internals.

use std::cell::RefCell;
use std::collections::BTreeMap;

/// One shard's counters and gauges, keyed by `name{labels}`.
#[derive(Default)]
pub struct Metrics {
    series: RefCell<BTreeMap<String, i64>>,
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
    pub fn add(&self, name: &str, labels: &[(&str, &str)], by: i64) {
        *self.series.borrow_mut().entry(series(name, labels)).or_default() += by;
    }
    pub fn inc(&self, name: &str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1);
    }
    /// Sets a gauge.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: i64) {
        self.series.borrow_mut().insert(series(name, labels), value);
    }
    pub fn snapshot(&self) -> Vec<(String, i64)> {
        self.series.borrow().iter().map(|(k, v)| (k.clone(), *v)).collect()
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
    ("dps_tls_handshakes_total", "counter", "TLS handshakes, by shard and result (ok = full, resumed, failed, timeout)."),
    ("dps_cross_shard_lookups_total", "counter", "Enrollment lookups answered by another shard's cache partition, by shard."),
    (
        "dps_cross_shard_pending",
        "gauge",
        "Lookups a shard has sent to other shards and not yet had answered (the cross-shard queue), by shard.",
    ),
    ("dps_shard_stalls_total", "counter", "Times a shard's event loop ran more than 10 ms late (a task held the core), by shard."),
    ("dps_shard_stall_microseconds_total", "counter", "Total lateness of those stalls, microseconds, by shard."),
    ("dps_store_commit_groups_total", "counter", "Group commits (one fsync each)."),
    ("dps_store_commit_transactions_total", "counter", "Transactions committed."),
    ("dps_store_commit_seconds_total", "counter", "Time spent committing, seconds."),
    ("dps_store_commit_latency_seconds", "histogram", "Latency of a group commit (write and fsync)."),
    ("dps_store_write_queue_depth", "gauge", "Writes waiting for the store writer."),
    (
        "dps_store_writes_stopped",
        "gauge",
        "1 once a full disk or a failed fsync stopped the store's writes (reads go on; restart once fixed).",
    ),
];

/// Sums the shards' series and renders the Prometheus text format (0.0.4).
pub fn render(shards: Vec<Vec<(String, i64)>>, extra: Vec<(String, f64)>) -> String {
    let mut total: BTreeMap<String, f64> = BTreeMap::new();
    for s in shards {
        for (k, v) in s {
            *total.entry(k).or_default() += v as f64;
        }
    }
    for (k, v) in extra {
        *total.entry(k).or_default() += v;
    }
    let mut out = String::new();
    for (name, kind, help) in CATALOGUE {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        let belongs = |k: &str| {
            k == *name
                || k.starts_with(&format!("{name}{{"))
                || k.starts_with(&format!("{name}_bucket{{"))
                || k == format!("{name}_sum")
                || k == format!("{name}_count")
        };
        // Histogram buckets in increasing `le` with +Inf last, then _sum and _count (the text
        // format requires it; plain key order put `le="+Inf"` first).
        let mut series: Vec<(&String, &f64)> = total.iter().filter(|(k, _)| belongs(k)).collect();
        series.sort_by(|(a, _), (b, _)| {
            let rank = |k: &str| -> (u8, f64) {
                match k.split_once("le=\"") {
                    Some((_, rest)) => (0, rest.split('"').next().and_then(|le| le.parse::<f64>().ok()).unwrap_or(f64::INFINITY)),
                    None if k.ends_with("_sum") => (1, 0.0),
                    None if k.ends_with("_count") => (2, 0.0),
                    None => (0, 0.0),
                }
            };
            let (ra, rb) = (rank(a), rank(b));
            ra.0.cmp(&rb.0).then(ra.1.total_cmp(&rb.1)).then(a.cmp(b))
        });
        for (k, v) in series {
            out.push_str(&format!("{k} {v}\n"));
        }
    }
    out
}

/// The store's commit statistics as series: counters and the latency histogram (cumulative
/// buckets in seconds, as Prometheus wants them).
pub fn store_series(stats: &dps_storage::CommitStats, queued: usize) -> Vec<(String, f64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let name = "dps_store_commit_latency_seconds";
    let mut out = vec![
        ("dps_store_commit_groups_total".to_string(), stats.groups.load(Relaxed) as f64),
        ("dps_store_commit_transactions_total".to_string(), stats.txns.load(Relaxed) as f64),
        ("dps_store_commit_seconds_total".to_string(), stats.commit_micros.load(Relaxed) as f64 / 1e6),
        ("dps_store_write_queue_depth".to_string(), queued as f64),
        // 1 once a full disk or a failed fsync stopped the store's writes (until a restart).
        ("dps_store_writes_stopped".to_string(), if stats.writes_stopped.load(Relaxed) { 1.0 } else { 0.0 }),
        (format!("{name}_sum"), stats.commit_micros.load(Relaxed) as f64 / 1e6),
    ];
    let mut cumulative = 0u64;
    for (i, bucket) in stats.buckets.iter().enumerate() {
        cumulative += bucket.load(Relaxed);
        let le = dps_storage::COMMIT_BUCKETS_US.get(i).map_or("+Inf".to_string(), |us| (*us as f64 / 1e6).to_string());
        out.push((series(&format!("{name}_bucket"), &[("le", &le)]), cumulative as f64));
    }
    out.push((format!("{name}_count"), cumulative as f64));
    out
}

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
        assert!(seen >= 12, "{seen}");
    }

    #[test]
    fn merge_and_render() {
        let a = Metrics::default();
        a.inc("dps_registration_attempts_total", &[("protocol", "mqtt"), ("status", "success")]);
        a.inc("dps_registration_attempts_total", &[("protocol", "mqtt"), ("status", "success")]);
        let b = Metrics::default();
        b.inc("dps_registration_attempts_total", &[("protocol", "mqtt"), ("status", "success")]);
        b.inc("dps_device_assignments_total", &[("hub", "h\"1")]);
        let text = render(vec![a.snapshot(), b.snapshot()], vec![("dps_store_commit_groups_total".into(), 4.0)]);
        assert!(text.contains("dps_registration_attempts_total{protocol=\"mqtt\",status=\"success\"} 3\n"), "{text}");
        assert!(text.contains("dps_device_assignments_total{hub=\"h\\\"1\"} 1\n"));
        assert!(text.contains("# TYPE dps_connections_open gauge\n"));
        assert!(text.contains("dps_store_commit_groups_total 4\n"));
        let hist = vec![
            ("dps_store_commit_latency_seconds_bucket{le=\"0.001\"}".to_string(), 2.0),
            ("dps_store_commit_latency_seconds_count".to_string(), 3.0),
        ];
        let text = render(vec![], hist);
        assert!(
            text.contains("# TYPE dps_store_commit_latency_seconds histogram\ndps_store_commit_latency_seconds_bucket{le=\"0.001\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("dps_store_commit_latency_seconds_count 3\n"));
    }

    #[test]
    fn histogram_buckets_in_order_with_inf_last() {
        // Regression: series were written in key order, which puts le="+Inf" before
        // le="0.0001" (a text format Prometheus refuses) and _count before _sum.
        let stats = dps_storage::CommitStats::default();
        let text = render(vec![], store_series(&stats, 0));
        let family: Vec<&str> = text.lines().filter(|l| l.starts_with("dps_store_commit_latency_seconds")).collect();
        let les: Vec<f64> = family
            .iter()
            .filter_map(|l| l.split_once("le=\"").map(|(_, r)| r.split('"').next().unwrap()))
            .map(|le| if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() })
            .collect();
        assert_eq!(les.len(), dps_storage::COMMIT_BUCKETS_US.len() + 1, "{text}");
        assert!(les.windows(2).all(|w| w[0] < w[1]), "buckets out of order: {family:?}");
        assert!(family[family.len() - 2].starts_with("dps_store_commit_latency_seconds_sum"), "{family:?}");
        assert!(family[family.len() - 1].starts_with("dps_store_commit_latency_seconds_count"), "{family:?}");
    }
}
