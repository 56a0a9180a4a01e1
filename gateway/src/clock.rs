//! The two clocks the gateway reads (core logic never does: it is handed `now`).

use dps_core::time::UtcTime;
use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds on a monotonic clock since the process started (for rate limits).
pub fn mono_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn utc_now() -> UtcTime {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    UtcTime::from_unix_nanos(d.as_nanos() as i128)
}
