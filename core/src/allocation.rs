//! Choosing a linked hub for a device (docs/service-api.md §5).

use crate::model::{AllocationPolicy, LinkedHub};
use ring::digest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocationError {
    /// No linked hub can take the device (DPS code 400208).
    NoHub(String),
    /// The enrollment's policy cannot be served here.
    Unsupported(String),
}

/// Candidates: the enrollment's `iotHubs` (any of them, even with `applyAllocationPolicy` false,
/// since the enrollment names them) when given, else every linked hub that takes part in
/// allocation. Legacy `iotHubHostName` counts as a one-hub list.
pub fn candidates<'a>(linked: &'a [LinkedHub], iot_hubs: Option<&[String]>, legacy: Option<&str>) -> Vec<&'a LinkedHub> {
    let named: Vec<&str> = match (iot_hubs, legacy) {
        (Some(h), _) if !h.is_empty() => h.iter().map(String::as_str).collect(),
        (_, Some(l)) => vec![l],
        _ => Vec::new(),
    };
    let mut out: Vec<&LinkedHub> = if named.is_empty() {
        linked.iter().filter(|h| h.applies_allocation_policy()).collect()
    } else {
        linked.iter().filter(|h| named.iter().any(|n| n.eq_ignore_ascii_case(&h.name))).collect()
    };
    // By name, ignoring ASCII case, without a lowercased copy per comparison.
    out.sort_by(|a, b| a.name.bytes().map(|c| c.to_ascii_lowercase()).cmp(b.name.bytes().map(|c| c.to_ascii_lowercase())));
    out
}

/// Evenly weighted, deterministic per registration id: the same device lands on the same hub as
/// long as the candidates and weights do not change.
pub fn hashed<'a>(candidates: &[&'a LinkedHub], registration_id: &str) -> Option<&'a LinkedHub> {
    let total: u64 = candidates.iter().map(|h| u64::from(h.weight().max(1))).sum();
    if total == 0 {
        return None;
    }
    let d = digest::digest(&digest::SHA256, registration_id.to_ascii_lowercase().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    let mut point = u64::from_be_bytes(first) % total;
    for h in candidates {
        let w = u64::from(h.weight().max(1));
        if point < w {
            return Some(h);
        }
        point -= w;
    }
    None
}

/// Picks the hub for a device. `latency` gives the measured round-trip time to a hub by name,
/// for geoLatency; hubs without a measurement rank last, ties go to the weighted hash.
pub fn allocate(
    policy: AllocationPolicy,
    linked: &[LinkedHub],
    iot_hubs: Option<&[String]>,
    legacy: Option<&str>,
    registration_id: &str,
    latency: &dyn Fn(&str) -> Option<u64>,
) -> Result<String, AllocationError> {
    let c = candidates(linked, iot_hubs, legacy);
    if c.is_empty() {
        return Err(AllocationError::NoHub("no linked IoT hub is available for this enrollment".into()));
    }
    let chosen = match policy {
        AllocationPolicy::Hashed => hashed(&c, registration_id),
        AllocationPolicy::Static => {
            let named = iot_hubs.map_or(0, <[String]>::len).max(usize::from(legacy.is_some()));
            if named != 1 || c.len() != 1 {
                return Err(AllocationError::NoHub("static allocation needs exactly one linked hub on the enrollment".into()));
            }
            c.first().copied()
        }
        AllocationPolicy::GeoLatency => {
            let best = c.iter().filter_map(|h| latency(&h.name)).min();
            match best {
                Some(b) => {
                    let nearest: Vec<&LinkedHub> = c.iter().copied().filter(|h| latency(&h.name) == Some(b)).collect();
                    hashed(&nearest, registration_id)
                }
                None => hashed(&c, registration_id),
            }
        }
        AllocationPolicy::Custom => return Err(AllocationError::Unsupported("custom allocation is decided by its webhook".into())),
    };
    chosen.map(|h| h.name.clone()).ok_or_else(|| AllocationError::NoHub("no hub could be chosen".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str, weight: u32, apply: bool) -> LinkedHub {
        LinkedHub { name: name.into(), allocation_weight: Some(weight), apply_allocation_policy: Some(apply), ..LinkedHub::default() }
    }

    #[test]
    fn hashed_is_stable_and_weighted() {
        let hubs = vec![hub("a", 1, true), hub("b", 3, true)];
        let none = |_: &str| None;
        let mut counts = std::collections::HashMap::new();
        for i in 0..4000 {
            let id = format!("dev-{i}");
            let h = allocate(AllocationPolicy::Hashed, &hubs, None, None, &id, &none).unwrap();
            assert_eq!(h, allocate(AllocationPolicy::Hashed, &hubs, None, None, &id.to_uppercase(), &none).unwrap());
            *counts.entry(h).or_insert(0) += 1;
        }
        let b = counts["b"] as f64 / 4000.0;
        assert!((0.70..0.80).contains(&b), "weight 3 of 4 got {b}");
    }

    #[test]
    fn candidates_follow_the_enrollment_and_apply_flag() {
        let hubs = vec![hub("a", 1, true), hub("b", 1, false)];
        let none = |_: &str| None;
        for i in 0..50 {
            assert_eq!(allocate(AllocationPolicy::Hashed, &hubs, None, None, &format!("d{i}"), &none).unwrap(), "a");
        }
        let only_b = vec!["B".to_string()];
        assert_eq!(allocate(AllocationPolicy::Hashed, &hubs, Some(&only_b), None, "d", &none).unwrap(), "b");
        assert_eq!(allocate(AllocationPolicy::Static, &hubs, Some(&only_b), None, "d", &none).unwrap(), "b");
        assert!(matches!(allocate(AllocationPolicy::Static, &hubs, None, None, "d", &none), Err(AllocationError::NoHub(_))));
        assert!(matches!(allocate(AllocationPolicy::Hashed, &[], None, None, "d", &none), Err(AllocationError::NoHub(_))));
        assert_eq!(allocate(AllocationPolicy::Static, &hubs, None, Some("a"), "d", &none).unwrap(), "a");
    }

    #[test]
    fn candidates_are_in_name_order_whatever_the_case() {
        // The order decides which hub a hash lands on, so it must not depend on how an operator
        // wrote the names.
        let hubs = vec![hub("b-hub", 1, true), hub("C-hub", 1, true), hub("A-hub", 1, true), hub("a-Hub2", 1, true)];
        let names: Vec<&str> = candidates(&hubs, None, None).iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["A-hub", "a-Hub2", "b-hub", "C-hub"]);
    }

    #[test]
    fn geo_latency_prefers_the_nearest() {
        let hubs = vec![hub("far", 1, true), hub("near", 1, true), hub("unknown", 1, true)];
        let rtt = |n: &str| match n {
            "far" => Some(80),
            "near" => Some(5),
            _ => None,
        };
        for i in 0..50 {
            assert_eq!(allocate(AllocationPolicy::GeoLatency, &hubs, None, None, &format!("d{i}"), &rtt).unwrap(), "near");
        }
    }
}
