//! What the console's live charts read: the counters of every shard summed, in a few totals.

use std::collections::BTreeMap;

/// Totals from the shards' metric series (`name{labels}` → value): registrations and their
/// failures, attestation failures, devices assigned per hub, open connections.
pub fn summary(shards: &[Vec<(String, i64)>], now: u64) -> serde_json::Value {
    let (mut registrations, mut failed, mut attestation_failures, mut open) = (0i64, 0i64, 0i64, 0i64);
    let mut by_hub: BTreeMap<String, i64> = BTreeMap::new();
    for (series, value) in shards.iter().flatten() {
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let failure = labels.contains("status=\"failure\"");
        match name {
            "dps_registration_attempts_total" => {
                registrations += value;
                if failure {
                    failed += value;
                }
            }
            "dps_attestation_attempts_total" if failure => attestation_failures += value,
            "dps_device_assignments_total" => {
                if let Some(hub) = label(labels, "hub") {
                    *by_hub.entry(hub).or_default() += value;
                }
            }
            "dps_connections_open" => open += value,
            _ => {}
        }
    }
    serde_json::json!({
        "time": now,
        "registrations": registrations,
        "registrationFailures": failed,
        "attestationFailures": attestation_failures,
        "connectionsOpen": open,
        "assignmentsByHub": by_hub,
    })
}

/// A label's value in `k="v",…}` (the text format's escapes undone).
fn label(labels: &str, key: &str) -> Option<String> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let mut out = String::new();
    let mut chars = labels[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::series;

    #[test]
    fn totals_sum_every_shard() {
        let one = vec![
            (series("dps_registration_attempts_total", &[("protocol", "mqtt"), ("status", "success")]), 5),
            (series("dps_registration_attempts_total", &[("protocol", "amqp"), ("status", "failure")]), 2),
            (series("dps_attestation_attempts_total", &[("protocol", "amqp"), ("attestation", "x509"), ("status", "failure")]), 2),
            (series("dps_attestation_attempts_total", &[("protocol", "mqtt"), ("attestation", "x509"), ("status", "success")]), 5),
            (series("dps_device_assignments_total", &[("hub", "hub-\"a\".example")]), 4),
            (series("dps_connections_open", &[("shard", "0")]), 3),
        ];
        let two = vec![
            (series("dps_registration_attempts_total", &[("protocol", "mqtt"), ("status", "success")]), 1),
            (series("dps_device_assignments_total", &[("hub", "hub-\"a\".example")]), 1),
            (series("dps_device_assignments_total", &[("hub", "hub-b")]), 7),
        ];
        let s = summary(&[one, two], 42);
        assert_eq!(s["registrations"], 8);
        assert_eq!(s["registrationFailures"], 2);
        assert_eq!(s["attestationFailures"], 2);
        assert_eq!(s["connectionsOpen"], 3);
        assert_eq!(s["assignmentsByHub"]["hub-\"a\".example"], 5);
        assert_eq!(s["assignmentsByHub"]["hub-b"], 7);
        assert_eq!(s["time"], 42);
    }
}
