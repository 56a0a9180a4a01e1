//! Failed attestations per source address. Every refused credential (401) spends a token of
//! its source's bucket; a source with none left is refused at once, before any store read or
//! signature check, until the bucket refills. A peer spraying guessed tokens or registration
//! ids thus costs the service a map lookup per request instead of a store read and, with many
//! groups, hundreds of HMACs, while devices behind other addresses are untouched. Factory lines
//! behind one NAT address belong on the allow-list (`limits.source_allow_list`).

use crate::error::ServiceError;
use crate::rate::TokenBucket;
use std::collections::HashMap;
use std::net::IpAddr;

/// Sources tracked at most; past it, buckets that have refilled (no failures worth keeping)
/// are dropped first, then the oldest state is given up wholesale rather than refusing a new
/// source for others' failures.
pub const MAX_SOURCES: usize = 100_000;

#[derive(Debug)]
pub struct SourceFailures {
    per_minute: f64,
    buckets: HashMap<IpAddr, TokenBucket>,
}

impl SourceFailures {
    /// `per_minute` failures allowed per source (also the burst); 0 turns the bound off.
    pub fn new(per_minute: u64) -> SourceFailures {
        SourceFailures { per_minute: per_minute as f64, buckets: HashMap::new() }
    }

    /// Refuses a source that has used up its failures (429 with the seconds until one refills).
    pub fn check(&self, source: IpAddr, mono: u64) -> Result<(), ServiceError> {
        match self.buckets.get(&source).and_then(|b| b.wait(mono)) {
            Some(wait) => Err(ServiceError::throttled("too many failed attestations from this address", wait)
                .because(format!("failed attestations from {source}"))),
            None => Ok(()),
        }
    }

    /// Spends one of the source's failures.
    pub fn record(&mut self, source: IpAddr, mono: u64) {
        if self.per_minute <= 0.0 {
            return;
        }
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&source) {
            self.buckets.retain(|_, b| !b.is_full(mono));
            if self.buckets.len() >= MAX_SOURCES {
                self.buckets.clear();
            }
        }
        let n = self.per_minute;
        let _ = self.buckets.entry(source).or_insert_with(|| TokenBucket::new(n, 60.0, n, mono)).try_take(mono);
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_source_out_of_failures_is_refused_until_it_refills_and_others_are_not() {
        let bad: IpAddr = "127.0.0.2".parse().unwrap();
        let good: IpAddr = "127.0.0.3".parse().unwrap();
        let mut f = SourceFailures::new(3);
        for _ in 0..3 {
            f.check(bad, 0).unwrap();
            f.record(bad, 0);
        }
        let e = f.check(bad, 0).unwrap_err();
        assert_eq!((e.kind.status(), e.kind.code(), e.retry_after), (429, 429001, Some(20)));
        f.check(good, 0).unwrap();
        // One failure refills every 20 s.
        f.check(bad, 20 * SECOND).unwrap();
        // Off: nothing is tracked.
        let mut off = SourceFailures::new(0);
        for _ in 0..100 {
            off.record(bad, 0);
        }
        off.check(bad, 0).unwrap();
        assert_eq!(off.tracked(), 0);
    }

    #[test]
    fn a_full_map_keeps_the_sources_still_failing() {
        let mut f = SourceFailures::new(2);
        for i in 0..MAX_SOURCES as u32 - 1 {
            f.record(IpAddr::from(std::net::Ipv4Addr::from(i)), 0);
        }
        let busy: IpAddr = "10.0.0.1".parse().unwrap();
        let late = 120 * SECOND;
        f.record(busy, late);
        f.record(busy, late);
        f.record("10.0.0.2".parse().unwrap(), late);
        assert!(f.tracked() < 10, "{}", f.tracked());
        assert!(f.check(busy, late).is_err(), "the failing source's state survived");
    }
}
