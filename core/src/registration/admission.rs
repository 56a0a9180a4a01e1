//! Rate limits on device operations: the service-wide registration rate (each shard holds its
//! share) and DPS's per-device limit on operation status polls. Budgets are spent only after
//! the device's signature verified, so an unauthenticated peer cannot spend a real device's.

use crate::error::ServiceError;
use crate::rate::TokenBucket;
use std::collections::HashMap;

/// Poll buckets held at most; past it, buckets that have refilled completely (they carry no
/// state worth keeping) are dropped first.
pub const MAX_POLL_BUCKETS: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// This shard's share of the registrations per minute (0: unlimited).
    pub registrations_per_minute: f64,
    /// Operation status polls a device may make per window (0: unlimited).
    pub polls_per_device: u64,
    pub poll_window_secs: u64,
}

#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    registrations: Option<TokenBucket>,
    polls: HashMap<String, TokenBucket>,
}

impl Admission {
    pub fn new(limits: Limits, mono: u64) -> Admission {
        let per_min = limits.registrations_per_minute;
        let registrations = (per_min > 0.0).then(|| TokenBucket::new(per_min.max(1.0), 60.0, per_min.max(1.0), mono));
        Admission { limits, registrations, polls: HashMap::new() }
    }

    pub fn take_registration(&mut self, mono: u64) -> Result<(), ServiceError> {
        match self.registrations.as_mut().map(|b| b.try_take(mono)) {
            Some(Err(wait)) => Err(ServiceError::throttled("registration rate limit exceeded", wait).because("service registration rate")),
            _ => Ok(()),
        }
    }

    /// DPS limits a device to 5 status polls per 10 s (configurable).
    pub fn take_poll(&mut self, key: &str, mono: u64) -> Result<(), ServiceError> {
        let l = self.limits;
        if l.polls_per_device == 0 {
            return Ok(());
        }
        let n = l.polls_per_device as f64;
        let window = l.poll_window_secs as f64;
        if self.polls.len() >= MAX_POLL_BUCKETS && !self.polls.contains_key(key) {
            self.polls.retain(|_, b| !b.is_full(mono));
            if self.polls.len() >= MAX_POLL_BUCKETS {
                // Every bucket is in use: a new device starts with a fresh one rather than being
                // refused for others' polling.
                self.polls.clear();
            }
        }
        let bucket = self.polls.entry(key.to_string()).or_insert_with(|| TokenBucket::new(n, window, n, mono));
        bucket
            .try_take(mono)
            .map_err(|wait| ServiceError::throttled("operation status polling limit exceeded", wait).because("device polling rate"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_full_poll_map_drops_refilled_buckets_not_active_ones() {
        // Regression: at 100,000 buckets the map was cleared wholesale, resetting the limit of
        // every device polling right then.
        let limits = Limits { registrations_per_minute: 0.0, polls_per_device: 2, poll_window_secs: 10 };
        let mut a = Admission::new(limits, 0);
        for i in 0..MAX_POLL_BUCKETS - 1 {
            a.take_poll(&format!("old-{i}"), 0).unwrap();
        }
        // One device spends its budget late, just before the map fills.
        let late = 20 * SECOND;
        a.take_poll("busy", late).unwrap();
        a.take_poll("busy", late).unwrap();
        assert!(a.take_poll("busy", late).is_err());
        // A new device arrives: the old buckets have refilled and go; the busy one stays.
        a.take_poll("new", late).unwrap();
        assert!(a.polls.len() < 10, "{}", a.polls.len());
        assert!(a.take_poll("busy", late).is_err(), "the busy device's limit survived");
    }
}
