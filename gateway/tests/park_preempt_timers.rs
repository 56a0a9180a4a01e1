//! The park tests of `park.rs` with glommio's preemption timers on (`limits.preempt_timers =
//! true`, upstream's behaviour): the kept link poll and the link submitted with the wait apply
//! there too, while the timer is cancelled and re-armed on every pass as upstream does.

const PREEMPT_TIMERS: bool = true;

include!("common/park_cases.rs");
