//! Metrics: each shard counts into its own map (no sharing, no locks); a scrape of the admin
//! endpoint on shard 0 asks every other shard for its map over the channel mesh and sums them,
//! then renders the Prometheus text format. Series names follow the DPS metrics
//! (RegistrationAttempts, DeviceAssignments, AttestationAttempts, spec service-api.md §4.8)
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
    ("dps_store_commit_groups_total", "counter", "Group commits (one fsync each)."),
    ("dps_store_commit_transactions_total", "counter", "Transactions committed."),
    ("dps_store_commit_seconds_total", "counter", "Time spent committing, seconds."),
    ("dps_store_write_queue_depth", "gauge", "Writes waiting for the store writer."),
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
        for (k, v) in total.iter().filter(|(k, _)| k.as_str() == *name || k.starts_with(&format!("{name}{{"))) {
            out.push_str(&format!("{k} {v}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
