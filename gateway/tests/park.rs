//! The vendored glommio's park path as the shards run it (fences on, preemption timers off; see
//! vendor/glommio/PATCHES.md): an executor keeps one poll linking its latency ring armed and
//! keeps its timer armed while the next deadline stays the same. These tests check that a sleeping
//! executor still wakes for everything it must: a timer that became earlier than the armed one,
//! a message from another thread, and a run of timers with nothing else to wake it.
//!
//! The time bounds are liveness bounds, far from the expected times: a missed wake-up shows as
//! the armed 5 s timer (or the watchdog) firing instead.

const PREEMPT_TIMERS: bool = false;

include!("common/park_cases.rs");
