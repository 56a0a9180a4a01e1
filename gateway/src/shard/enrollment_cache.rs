//! The shard-partitioned cache of individual enrollments: each shard owns the enrollments
//! whose registration id hashes to it and answers the other shards' lookups over the mesh; a
//! miss reads the store. When point reads run on the shard (`store.inline_point_reads`, the
//! default with fjall), another shard's key is read from the store directly instead: cheaper
//! than waking the owner. Service API writes invalidate the owning partition before they are
//! acknowledged, so the very next registration sees them. Absence is cached too (group devices
//! have no individual enrollment), bounded apart from the records: ids that name nothing are
//! anyone's to invent, and a flood of them must not push real enrollments out.
//!
//! The same partitions hold the TPM challenges issued over HTTPS (a device asks for its
//! challenge with one request and answers with the next, maybe over another connection and
//! so on another shard; the owner of its registration id keeps K in between). With a store
//! shared by several nodes the next request may reach another node: the challenges are kept
//! in the store then (`shared_challenges`).

use super::{Answer, Request, ShardMesh};
use crate::metrics::Metrics;
use dps_core::tpm::book::{ChallengeBook, Full, Issued};
use dps_storage::{Record, StoreCallError, StoreService, Table};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

/// The owner's answer, with the store's own error: a busy store stays "busy, retry" (503) at
/// the asking shard instead of becoming an internal error.
pub type Lookup = Result<Option<Record>, StoreCallError>;

pub struct EnrollmentCache {
    mesh: Rc<ShardMesh>,
    hash_key: (u64, u64),
    store: StoreService,
    entries: RefCell<Remembered>,
    /// False with `limits.enrollment_cache_entries = 0`: every lookup reads the store.
    caching: bool,
    /// Bumped by every invalidation of this partition; a store read that raced one is not cached.
    epoch: Cell<u64>,
    metrics: Rc<Metrics>,
    challenges: RefCell<ChallengeBook>,
    /// The store is shared by several nodes: TPM challenges are kept there, not in `challenges`.
    shared_store: bool,
}

/// The partition (mesh peer) that owns a registration key: SipHash keyed with the instance's
/// random `hash_key` (every shard of a process shares it, so they agree on the owner; a
/// stranger cannot choose ids that all land on one shard, as with fixed keys).
pub fn owner_of(key: &str, peers: usize, hash_key: (u64, u64)) -> usize {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(hash_key.0, hash_key.1);
    key.hash(&mut h);
    (h.finish() % peers.max(1) as u64) as usize
}

impl EnrollmentCache {
    pub fn new(
        mesh: Rc<ShardMesh>,
        hash_key: (u64, u64),
        store: StoreService,
        max_entries: usize,
        max_challenges: usize,
        shared_store: bool,
        metrics: Rc<Metrics>,
    ) -> EnrollmentCache {
        EnrollmentCache {
            mesh,
            hash_key,
            store,
            entries: RefCell::new(Remembered::new(max_entries)),
            caching: max_entries > 0,
            epoch: Cell::new(0),
            metrics,
            challenges: RefCell::new(ChallengeBook::new(max_challenges)),
            shared_store,
        }
    }

    pub fn mesh(&self) -> &Rc<ShardMesh> {
        &self.mesh
    }

    /// The individual enrollment record for a registration key (None: not enrolled).
    pub async fn get(&self, key: &str) -> Lookup {
        let owner = owner_of(key, self.mesh.peers(), self.hash_key);
        if owner == self.mesh.me() {
            return self.local_get(key).await;
        }
        if self.store.point_reads_inline() {
            // The store is the truth the owner's partition copies, and a point read on this
            // thread costs a few microseconds, while asking the owner wakes two sleeping shards
            // (the owner, then this one with its answer): about 100 µs of CPU each on a VM
            // (tuning.md). Group devices, which have no individual enrollment, ask on every
            // registration. So with point reads on the shard only the owner's own lookups use
            // its partition; a write acknowledged by the service API is in the store already.
            return self.store.get(Table::Enrollments, key).await;
        }
        self.metrics.inc("dps_cross_shard_lookups_total", &[("shard", &self.mesh.me().to_string())]);
        match self.mesh.call(owner, Request::Lookup(key.to_string())).await {
            Ok(Answer::Found(v)) => v,
            _ => Err(StoreCallError::Closed),
        }
    }

    /// This partition's answer: the cached record, or the store's.
    pub async fn local_get(&self, key: &str) -> Lookup {
        if !self.caching {
            // No cache (a store shared by several nodes: another node's write must be seen).
            return self.store.get(Table::Enrollments, key).await;
        }
        if let Some(v) = self.entries.borrow().get(key) {
            return Ok(v);
        }
        let epoch = self.epoch.get();
        let v = self.store.get(Table::Enrollments, key).await?;
        if self.epoch.get() == epoch {
            self.entries.borrow_mut().insert(key, v.clone());
        }
        Ok(v)
    }

    /// Takes the TPM challenge issued to a registration key (each is answered once).
    pub async fn take_challenge(&self, key: &str, now_secs: i64) -> Option<Issued> {
        if self.shared_store {
            return super::shared_challenges::take(&self.store, key, now_secs).await;
        }
        let owner = owner_of(key, self.mesh.peers(), self.hash_key);
        if owner == self.mesh.me() {
            return self.challenges.borrow_mut().take(key, now_secs);
        }
        match self.mesh.call(owner, Request::TakeChallenge(key.to_string(), now_secs)).await {
            Ok(Answer::Challenge(c)) => c,
            _ => None,
        }
    }

    /// Keeps a TPM challenge at its owner until the device answers it.
    pub async fn remember_challenge(&self, key: &str, issued: Issued, now_secs: i64) -> Result<(), Full> {
        if self.shared_store {
            // A store that cannot take it is "busy, retry" to the device, like a full book.
            return super::shared_challenges::remember(&self.store, key, &issued).await.map_err(|e| {
                tracing::warn!(error = %e, "cannot keep a TPM challenge in the shared store");
                Full
            });
        }
        let owner = owner_of(key, self.mesh.peers(), self.hash_key);
        if owner == self.mesh.me() {
            return self.local_remember_challenge(key.to_string(), issued, now_secs);
        }
        match self.mesh.call(owner, Request::RememberChallenge(key.to_string(), issued, now_secs)).await {
            Ok(Answer::Remembered(r)) => r,
            _ => Err(Full),
        }
    }

    pub fn local_take_challenge(&self, key: &str, now_secs: i64) -> Option<Issued> {
        self.challenges.borrow_mut().take(key, now_secs)
    }

    pub fn local_remember_challenge(&self, key: String, issued: Issued, now_secs: i64) -> Result<(), Full> {
        self.challenges.borrow_mut().remember(key, issued, now_secs)
    }

    pub fn local_invalidate(&self, keys: &[String]) {
        self.epoch.set(self.epoch.get() + 1);
        let mut entries = self.entries.borrow_mut();
        for k in keys {
            entries.remove(k);
        }
    }

    /// Drops the keys from their owners' partitions; returns once every owner has done so.
    pub async fn invalidate(&self, keys: Vec<String>) {
        let mut by_owner: HashMap<usize, Vec<String>> = HashMap::new();
        for k in keys {
            by_owner.entry(owner_of(&k, self.mesh.peers(), self.hash_key)).or_default().push(k);
        }
        for (owner, keys) in by_owner {
            if owner == self.mesh.me() {
                self.local_invalidate(&keys);
            } else if self.mesh.call(owner, Request::Invalidate(keys)).await.is_err() {
                tracing::warn!(shard = self.mesh.me(), owner, "a shard did not confirm an enrollment cache invalidation");
            }
        }
    }
}

/// What a partition remembers: records, and ids known to have none, each bounded on its own
/// (absences to a quarter of the records' bound). A full side starts over; the store's block
/// cache keeps the misses that follow cheap.
struct Remembered {
    present: HashMap<String, Record>,
    absent: std::collections::HashSet<String>,
    max_present: usize,
    max_absent: usize,
}

impl Remembered {
    fn new(max_entries: usize) -> Remembered {
        let max_present = max_entries.max(1);
        Remembered { present: HashMap::new(), absent: Default::default(), max_present, max_absent: (max_present / 4).max(1) }
    }

    /// Some(None): known to have no record; None: not remembered.
    fn get(&self, key: &str) -> Option<Option<Record>> {
        match self.present.get(key) {
            Some(r) => Some(Some(r.clone())),
            None => self.absent.contains(key).then_some(None),
        }
    }

    fn insert(&mut self, key: &str, v: Option<Record>) {
        match v {
            Some(r) => {
                if self.present.len() >= self.max_present {
                    self.present.clear();
                }
                self.absent.remove(key);
                self.present.insert(key.to_string(), r);
            }
            None => {
                if self.absent.len() >= self.max_absent {
                    self.absent.clear();
                }
                self.present.remove(key);
                self.absent.insert(key.to_string());
            }
        }
    }

    fn remove(&mut self, key: &str) {
        self.present.remove(key);
        self.absent.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_unknown_ids_does_not_push_out_enrollments() {
        // Regression: absences shared the bound with records, so random registration ids filled
        // the partition and cleared it, real enrollments included.
        let mut r = Remembered::new(100);
        let record = |i: u8| Record { etag: format!("e{i}"), class: 0, body: vec![i] };
        for i in 0..50u8 {
            r.insert(&format!("dev-{i}"), Some(record(i)));
        }
        for i in 0..10_000 {
            r.insert(&format!("random-{i}"), None);
        }
        for i in 0..50u8 {
            assert_eq!(r.get(&format!("dev-{i}")).and_then(|v| v.map(|rec| rec.body)), Some(vec![i]), "dev-{i} survived");
        }
        assert!(r.absent.len() <= 25);
        assert_eq!(r.get("random-9999"), Some(None), "recent absences are remembered");
        assert_eq!(r.get("never-seen"), None);
        // An enrollment created for a remembered absence replaces it, and removal forgets both.
        r.insert("random-9999", Some(record(7)));
        assert!(matches!(r.get("random-9999"), Some(Some(_))));
        r.remove("random-9999");
        assert_eq!(r.get("random-9999"), None);
    }

    #[test]
    fn owners_spread_and_agree() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let o = owner_of(&format!("dev-{i}"), 4, (1, 2));
            assert_eq!(o, owner_of(&format!("dev-{i}"), 4, (1, 2)));
            counts[o] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(owner_of("x", 1, (1, 2)), 0);
        // Regression: with fixed keys anyone could compute ids that all land on one shard;
        // under another instance's key the same ids spread differently.
        let moved = (0..1000).filter(|i| owner_of(&format!("dev-{i}"), 4, (1, 2)) != owner_of(&format!("dev-{i}"), 4, (3, 4))).count();
        assert!(moved > 500, "{moved}");
    }
}
