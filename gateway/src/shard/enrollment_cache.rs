//! The shard-partitioned cache of individual enrollments (design.md "Processes and threads"):
//! each shard owns the enrollments whose registration id hashes to it and answers the other
//! shards over glommio's channel mesh; a miss reads the store. Service API writes invalidate
//! the owning partition before they are acknowledged, so the very next registration sees them.
//! Absence is cached too (group devices have no individual enrollment).

use crate::metrics::Metrics;
use dps_storage::{Record, StoreCallError, StoreService, Table};
use futures::channel::oneshot;
use glommio::channels::channel_mesh::{Receivers, Senders};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

/// The owner's answer, with the store's own error: a busy store stays "busy, retry" (503) at
/// the asking shard instead of becoming an internal error.
type Lookup = Result<Option<Record>, StoreCallError>;
/// One shard's metric series.
type Series = Vec<(String, i64)>;

/// Messages between shards: cache traffic, and metrics scrapes (the mesh is the only way
/// shards talk).
pub enum Msg {
    Lookup { key: String, from: usize, req: u64 },
    Found { req: u64, value: Lookup },
    Invalidate { keys: Vec<String>, from: usize, req: u64 },
    Invalidated { req: u64 },
    Scrape { from: usize, req: u64 },
    Scraped { req: u64, series: Series },
}

pub struct EnrollmentCache {
    me: usize,
    peers: usize,
    senders: Option<Senders<Msg>>,
    store: StoreService,
    entries: RefCell<HashMap<String, Option<Record>>>,
    /// Bumped by every invalidation of this partition; a store read that raced one is not cached.
    epoch: Cell<u64>,
    max_entries: usize,
    next_req: Cell<u64>,
    found: RefCell<HashMap<u64, oneshot::Sender<Lookup>>>,
    invalidated: RefCell<HashMap<u64, oneshot::Sender<()>>>,
    scraped: RefCell<HashMap<u64, oneshot::Sender<Series>>>,
    metrics: Rc<Metrics>,
}

/// The partition (mesh peer) that owns a registration key. SipHash with fixed keys, so every
/// shard computes the same owner.
pub fn owner_of(key: &str, peers: usize) -> usize {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    key.hash(&mut h);
    (h.finish() % peers.max(1) as u64) as usize
}

impl EnrollmentCache {
    /// `mesh`: this shard's senders and receivers (None with a single shard).
    pub fn start(
        store: StoreService,
        mesh: Option<(Senders<Msg>, Receivers<Msg>)>,
        max_entries: usize,
        metrics: Rc<Metrics>,
    ) -> Rc<EnrollmentCache> {
        let (me, peers, senders, receivers) = match mesh {
            Some((s, r)) => (s.peer_id(), s.nr_consumers(), Some(s), Some(r)),
            None => (0, 1, None, None),
        };
        let cache = Rc::new(EnrollmentCache {
            me,
            peers,
            senders,
            store,
            entries: RefCell::new(HashMap::new()),
            epoch: Cell::new(0),
            max_entries: max_entries.max(1),
            next_req: Cell::new(0),
            found: RefCell::new(HashMap::new()),
            invalidated: RefCell::new(HashMap::new()),
            scraped: RefCell::new(HashMap::new()),
            metrics,
        });
        if let Some(mut r) = receivers {
            for (_, stream) in r.streams() {
                let c = cache.clone();
                glommio::spawn_local(async move {
                    while let Some(m) = stream.recv().await {
                        c.clone().handle(m);
                    }
                })
                .detach();
            }
        }
        cache
    }

    fn req_id(&self) -> u64 {
        let n = self.next_req.get() + 1;
        self.next_req.set(n);
        n
    }

    /// The individual enrollment record for a registration key (None: not enrolled).
    pub async fn get(&self, key: &str) -> Result<Option<Record>, StoreCallError> {
        let owner = owner_of(key, self.peers);
        let Some(senders) = self.senders.as_ref().filter(|_| owner != self.me) else {
            return self.local_get(key).await;
        };
        self.metrics.inc("dps_cross_shard_lookups_total", &[("shard", &self.me.to_string())]);
        let req = self.req_id();
        let (tx, rx) = oneshot::channel();
        self.found.borrow_mut().insert(req, tx);
        if senders.send_to(owner, Msg::Lookup { key: key.to_string(), from: self.me, req }).await.is_err() {
            self.found.borrow_mut().remove(&req);
            return Err(StoreCallError::Closed);
        }
        rx.await.unwrap_or(Err(StoreCallError::Closed))
    }

    async fn local_get(&self, key: &str) -> Result<Option<Record>, StoreCallError> {
        if let Some(v) = self.entries.borrow().get(key) {
            return Ok(v.clone());
        }
        let epoch = self.epoch.get();
        let v = self.store.get(Table::Enrollments, key).await?;
        if self.epoch.get() == epoch {
            let mut entries = self.entries.borrow_mut();
            if entries.len() >= self.max_entries {
                // Simple bound: start over; the store's block cache keeps misses cheap.
                entries.clear();
            }
            entries.insert(key.to_string(), v.clone());
        }
        Ok(v)
    }

    fn local_invalidate(&self, keys: &[String]) {
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
            by_owner.entry(owner_of(&k, self.peers)).or_default().push(k);
        }
        for (owner, keys) in by_owner {
            match self.senders.as_ref().filter(|_| owner != self.me) {
                None => self.local_invalidate(&keys),
                Some(senders) => {
                    let req = self.req_id();
                    let (tx, rx) = oneshot::channel();
                    self.invalidated.borrow_mut().insert(req, tx);
                    if senders.send_to(owner, Msg::Invalidate { keys, from: self.me, req }).await.is_ok() {
                        let _ = rx.await;
                    } else {
                        self.invalidated.borrow_mut().remove(&req);
                    }
                }
            }
        }
    }

    /// This shard's metrics, with the cross-shard queue as it is now.
    fn snapshot(&self) -> Series {
        self.metrics.set("dps_cross_shard_pending", &[("shard", &self.me.to_string())], self.found.borrow().len() as i64);
        self.metrics.snapshot()
    }

    /// Every shard's metrics: this one's and, over the mesh, the others'.
    pub async fn scrape_all(&self) -> Vec<Series> {
        let mut all = vec![self.snapshot()];
        let Some(senders) = &self.senders else { return all };
        for peer in (0..self.peers).filter(|p| *p != self.me) {
            let req = self.req_id();
            let (tx, rx) = oneshot::channel();
            self.scraped.borrow_mut().insert(req, tx);
            if senders.send_to(peer, Msg::Scrape { from: self.me, req }).await.is_ok() {
                if let Ok(series) = rx.await {
                    all.push(series);
                }
            } else {
                self.scraped.borrow_mut().remove(&req);
            }
        }
        all
    }

    fn handle(self: Rc<Self>, m: Msg) {
        match m {
            Msg::Scrape { from, req } => {
                let series = self.snapshot();
                glommio::spawn_local(async move {
                    if let Some(s) = &self.senders {
                        let _ = s.send_to(from, Msg::Scraped { req, series }).await;
                    }
                })
                .detach();
            }
            Msg::Scraped { req, series } => {
                if let Some(tx) = self.scraped.borrow_mut().remove(&req) {
                    let _ = tx.send(series);
                }
            }
            Msg::Lookup { key, from, req } => {
                glommio::spawn_local(async move {
                    let value = self.local_get(&key).await;
                    if let Some(s) = &self.senders {
                        let _ = s.send_to(from, Msg::Found { req, value }).await;
                    }
                })
                .detach();
            }
            Msg::Found { req, value } => {
                if let Some(tx) = self.found.borrow_mut().remove(&req) {
                    let _ = tx.send(value);
                }
            }
            Msg::Invalidate { keys, from, req } => {
                self.local_invalidate(&keys);
                glommio::spawn_local(async move {
                    if let Some(s) = &self.senders {
                        let _ = s.send_to(from, Msg::Invalidated { req }).await;
                    }
                })
                .detach();
            }
            Msg::Invalidated { req } => {
                if let Some(tx) = self.invalidated.borrow_mut().remove(&req) {
                    let _ = tx.send(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_and_agree() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let o = owner_of(&format!("dev-{i}"), 4);
            assert_eq!(o, owner_of(&format!("dev-{i}"), 4));
            counts[o] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(owner_of("x", 1), 0);
    }
}
