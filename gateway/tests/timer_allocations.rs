//! What a pass of a shard's event loop allocates while many timers are pending (every device
//! connection keeps a deadline or two armed). glommio 0.9.0 found the due timers by splitting
//! its ordered map of timers at "now" on every pass (`BTreeMap::split_off`), which builds new
//! nodes for the pending part and frees the old ones even when no timer is due: a few
//! allocations per pass, several passes per registration (vendor/glommio/PATCHES.md). The
//! vendored copy takes the due timers off the front instead.
//!
//! Allocations are counted on the executor's thread only, by a counting global allocator (this
//! test binary's own).

// A global allocator is an unsafe trait; this one only counts and hands on to the system's.
#![allow(unsafe_code)]

use glommio::{LocalExecutorBuilder, Placement};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // `try_with`: the thread's locals may be gone while it exits.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

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
            COUNT.with(|c| c.set(0));
            COUNTING.with(|on| on.set(true));
            for _ in 0..SLEEPS {
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            COUNTING.with(|on| on.set(false));
            COUNT.with(|c| c.get()) as f64 / SLEEPS as f64
        })
    })
    .join()
    .expect("executor thread");
    // A sleep itself allocates its timer (and now and then a map node); the rest was the split.
    assert!(per_sleep < 4.0, "{per_sleep:.1} allocations per short sleep with {PENDING} timers pending");
}
