//! The challenges a service has issued over HTTPS and not yet seen answered. HTTPS devices
//! fetch the challenge with one request and answer it with the next (maybe over another
//! connection), so the service keeps K in between: one challenge per registration id (a newer
//! one replaces the older, whose tokens then fail), each for [`CHALLENGE_SECS`], used once,
//! and at most `capacity` of them, so no amount of asking grows memory without bound.

use std::collections::HashMap;

/// How long a device has to activate a challenge and answer it. A real TPM takes well under
/// a second for ActivateCredential, Import and HMAC; the rest is margin for slow devices.
pub const CHALLENGE_SECS: i64 = 300;

/// One issued challenge: the key the device must sign with, and the TPM it was built for.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub hmac_key: [u8; 32],
    /// The TPM2B_PUBLIC bytes of the device's endorsement key and storage root key.
    pub endorsement_key: Vec<u8>,
    pub storage_root_key: Vec<u8>,
    /// Unix seconds after which an answer is refused.
    pub expires_secs: i64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("expires_secs", &self.expires_secs).finish_non_exhaustive()
    }
}

/// The book is full of live challenges: the caller answers "busy, retry".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug)]
pub struct ChallengeBook {
    entries: HashMap<String, Issued>,
    capacity: usize,
}

impl ChallengeBook {
    pub fn new(capacity: usize) -> ChallengeBook {
        ChallengeBook { entries: HashMap::new(), capacity: capacity.max(1) }
    }

    /// Keeps a challenge for a registration key, replacing an older one for the same key.
    /// When the book is full, expired challenges are dropped first; live ones are never
    /// evicted (that would let anyone cancel other devices' challenges by asking for more).
    pub fn remember(&mut self, key: String, issued: Issued, now_secs: i64) -> Result<(), Full> {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, c| c.expires_secs > now_secs);
            if self.entries.len() >= self.capacity {
                return Err(Full);
            }
        }
        self.entries.insert(key, issued);
        Ok(())
    }

    /// The challenge for a registration key, removed: each is answered at most once.
    pub fn take(&mut self, key: &str, now_secs: i64) -> Option<Issued> {
        self.entries.remove(key).filter(|c| c.expires_secs > now_secs)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(k: u8, expires_secs: i64) -> Issued {
        Issued { hmac_key: [k; 32], endorsement_key: vec![k], storage_root_key: vec![k], expires_secs }
    }

    #[test]
    fn one_per_device_used_once_and_expiring() {
        let mut b = ChallengeBook::new(10);
        b.remember("a".into(), issued(1, 100), 0).unwrap();
        b.remember("a".into(), issued(2, 100), 0).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b.take("a", 50).map(|c| c.hmac_key[0]), Some(2), "the newer challenge replaced the older");
        assert_eq!(b.take("a", 50), None, "a challenge is answered once");
        b.remember("b".into(), issued(3, 100), 0).unwrap();
        assert_eq!(b.take("b", 100), None, "expired");
        assert!(b.is_empty());
    }

    #[test]
    fn full_book_drops_expired_and_refuses_rather_than_evicting_live_ones() {
        let mut b = ChallengeBook::new(2);
        b.remember("a".into(), issued(1, 10), 0).unwrap();
        b.remember("b".into(), issued(2, 100), 0).unwrap();
        b.remember("c".into(), issued(3, 100), 20).unwrap();
        assert_eq!(b.len(), 2, "the expired one made room");
        assert_eq!(b.remember("d".into(), issued(4, 100), 20), Err(Full));
        // Replacing a device's own challenge needs no room.
        b.remember("b".into(), issued(5, 100), 20).unwrap();
        assert_eq!(b.take("c", 20).map(|c| c.hmac_key[0]), Some(3), "live challenges survive a full book");
    }
}
