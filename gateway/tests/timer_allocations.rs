//! What a pass of a shard's event loop allocates while many timers are pending (every device
//! connection keeps a deadline or two armed). glommio 0.9.0 found the due timers by splitting
//! its ordered map of timers at "now" on every pass (`BTreeMap::split_off`), which builds new
//! nodes for the pending part and frees the old ones even when no timer is due: a few
//! allocations per pass, several passes per registration (vendor/glommio/PATCHES.md). The
//! vendored copy takes the due timers off the front instead.
//!
//! Allocations are counted on the executor's thread only, by a counting global allocator (this
//! test binary's own).

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use glommio::{LocalExecutorBuilder, Placement};
use std::time::Duration;

/// Timers pending throughout, as on a shard with a thousand connections open.
const PENDING: usize = 1_000;
/// Short sleeps measured: each is at least one pass of the loop that parks and one that wakes.
const SLEEPS: u64 = 200;

#[test]
fn a_pass_of_the_event_loop_does_not_allocate_for_the_timers_still_pending() {
    // As the shards run (gateway/src/shard): fences on, preemption timers off.
    glommio::use_symmetric_sleep_fences(true);
    glommio::use_preempt_timers(false);
    let per_sleep = std::thread::spawn(|| {
        let ex = match LocalExecutorBuilder::new(Placement::Unbound).make() {
            Ok(ex) => ex,
            Err(e) => panic!("executor: {e}"),
        };
        ex.run(async {
            for _ in 0..PENDING {
                glommio::spawn_local(glommio::timer::sleep(Duration::from_secs(3_600))).detach();
            }
            // Let every pending timer register, and warm up what the loop keeps.
            for _ in 0..20 {
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            let before = counting_alloc::so_far();
            for _ in 0..SLEEPS {
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            (counting_alloc::so_far() - before) as f64 / SLEEPS as f64
        })
    })
    .join()
    .expect("executor thread");
    // A sleep itself allocates its timer (and now and then a map node); the rest was the split.
    assert!(per_sleep < 4.0, "{per_sleep:.1} allocations per short sleep with {PENDING} timers pending");
}
