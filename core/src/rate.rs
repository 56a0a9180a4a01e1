//! A token bucket for rate limits (service operations per minute, device registrations, device
//! polling). Time is passed in as nanoseconds from any fixed origin.

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_nano: f64,
    tokens: f64,
    last: u64,
}

impl TokenBucket {
    /// `rate` tokens every `period_secs`, holding at most `burst`.
    pub fn new(rate: f64, period_secs: f64, burst: f64, now: u64) -> TokenBucket {
        TokenBucket { capacity: burst, per_nano: rate / (period_secs * 1e9), tokens: burst, last: now }
    }

    fn refill(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.last) as f64;
        self.tokens = (self.tokens + elapsed * self.per_nano).min(self.capacity);
        self.last = self.last.max(now);
    }

    /// True when the bucket would be back at its burst by `now` (it then carries no state).
    pub fn is_full(&self, now: u64) -> bool {
        let elapsed = now.saturating_sub(self.last) as f64;
        self.tokens + elapsed * self.per_nano >= self.capacity
    }

    /// Whole seconds until a token is available (None: one is), taking nothing.
    pub fn wait(&self, now: u64) -> Option<u64> {
        let elapsed = now.saturating_sub(self.last) as f64;
        let tokens = (self.tokens + elapsed * self.per_nano).min(self.capacity);
        (tokens < 1.0).then(|| ((((1.0 - tokens) / self.per_nano) / 1e9).ceil() as u64).max(1))
    }

    /// Takes a token, or says how many whole seconds until one is available.
    pub fn try_take(&mut self, now: u64) -> Result<(), u64> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_nanos = (1.0 - self.tokens) / self.per_nano;
            Err(((wait_nanos / 1e9).ceil() as u64).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let s = 1_000_000_000u64;
        let mut b = TokenBucket::new(5.0, 10.0, 5.0, 0);
        for _ in 0..5 {
            assert!(b.try_take(0).is_ok());
        }
        assert_eq!(b.try_take(0), Err(2));
        assert!(b.try_take(2 * s).is_ok());
        assert!(b.try_take(2 * s).is_err());
        // Never more than the burst, however long idle.
        for _ in 0..5 {
            assert!(b.try_take(1000 * s).is_ok());
        }
        assert!(b.try_take(1000 * s).is_err());
    }
}
