//! Tracking ids: every error body (device or service API) and every service API answer
//! (`x-ms-request-id`) carries one, so an operator can find the log line a client reports.
//! `{boot:08x}-{shard:04x}-{sequence:012x}`: unique per process start, shard and request,
//! without coordination between shards.

use std::cell::Cell;

#[derive(Debug)]
pub struct TrackingIds {
    boot: u32,
    shard: u16,
    next: Cell<u64>,
}

impl TrackingIds {
    /// `boot`: random per process start (the host supplies it; core reads no randomness).
    pub fn new(boot: u32, shard: usize) -> TrackingIds {
        TrackingIds { boot, shard: shard as u16, next: Cell::new(0) }
    }

    pub fn next(&self) -> String {
        let n = self.next.get() + 1;
        self.next.set(n);
        format!("{:08x}-{:04x}-{:012x}", self.boot, self.shard, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_per_shard_and_request() {
        let a = TrackingIds::new(0xabcd, 1);
        let b = TrackingIds::new(0xabcd, 2);
        assert_eq!(a.next(), "0000abcd-0001-000000000001");
        assert_eq!(a.next(), "0000abcd-0001-000000000002");
        assert_eq!(b.next(), "0000abcd-0002-000000000001");
    }
}
