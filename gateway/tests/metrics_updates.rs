#![allow(clippy::unwrap_used)]
// A counting global allocator is an unsafe trait impl forwarding to the system allocator;
// this test binary holds the only one.
#![allow(unsafe_code)]
//! A shard counts into its metrics on every connection and registration: once a series
//! exists, updating it must not allocate (it used to format `name{labels}` each time, about
//! 25 allocations per registration). Its own test binary: the allocator here counts.

use dps_gateway::metrics::Metrics;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(|n| n.get());
    f();
    ALLOCATIONS.with(|n| n.get()) - before
}

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
