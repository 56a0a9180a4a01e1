#![allow(clippy::unwrap_used)]
//! A shard counts into its metrics on every connection and registration: once a series
//! exists, updating it must not allocate (it used to format `name{labels}` each time, about
//! 25 allocations per registration). Its own test binary: the allocator here counts.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::allocations;
use dps_gateway::metrics::Metrics;

#[test]
fn updating_an_existing_series_allocates_nothing() {
    let m = Metrics::default();
    let labels = [("shard", "0"), ("listener", "mqtt")];
    assert!(allocations(|| m.inc("dps_connections_accepted_total", &labels)) > 0, "the first update creates the series");
    m.set("dps_connections_open", &[("shard", "0")], 1);
    let n = allocations(|| {
        for _ in 0..100 {
            m.inc("dps_connections_accepted_total", &labels);
            m.add("dps_connections_open", &[("shard", "0")], -1);
            m.set("dps_connections_open", &[("shard", "0")], 3);
        }
    });
    assert_eq!(n, 0, "allocations in 300 updates of existing series");
    // Series are told apart by every part, and counted where they belong.
    m.inc("dps_connections_accepted_total", &[("shard", "0"), ("listener", "amqp")]);
    m.inc("dps_connections_accepted_total", &[("shard", "1"), ("listener", "mqtt")]);
    assert_eq!(
        m.snapshot(),
        vec![
            ("dps_connections_accepted_total{shard=\"0\",listener=\"amqp\"}".to_string(), 1),
            ("dps_connections_accepted_total{shard=\"0\",listener=\"mqtt\"}".to_string(), 101),
            ("dps_connections_accepted_total{shard=\"1\",listener=\"mqtt\"}".to_string(), 1),
            ("dps_connections_open{shard=\"0\"}".to_string(), 3),
        ]
    );
}
