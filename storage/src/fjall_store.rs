//! The embedded store: one fjall database, a keyspace per [`Table`], values sealed by
//! [`DataKey`]. Commits hold a lock, so preconditions, quotas and counts are exact.

use crate::crypt::DataKey;
use crate::plan::plan;
use crate::record::{Record, Table, Txn, TxnResult};
use crate::{Store, StoreError};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

pub struct FjallStore {
    db: Database,
    spaces: HashMap<Table, Keyspace>,
    key: DataKey,
    /// Record counts per (table, class), persisted in `meta` under `count/{table}/{class}`.
    counts: Mutex<HashMap<(Table, u8), u64>>,
    /// Why writes stopped, once a journal write or fsync failed.
    stopped: std::sync::OnceLock<String>,
}

fn count_key(t: Table, class: u8) -> String {
    format!("count/{}/{class}", t.name())
}

impl FjallStore {
    /// Opens (or creates) the store in `dir` with the given data key.
    pub fn open(dir: &Path, key: DataKey, cache_bytes: u64) -> Result<FjallStore, StoreError> {
        let db = Database::builder(dir).cache_size(cache_bytes).open()?;
        let mut spaces = HashMap::new();
        for t in Table::ALL {
            spaces.insert(t, db.keyspace(t.name(), KeyspaceCreateOptions::default)?);
        }
        let mut counts = HashMap::new();
        // Counters are plain (unsealed) little-endian u64 values; they hold no secrets.
        for kv in spaces[&Table::Meta].prefix("count/") {
            let (k, v) = kv.into_inner()?;
            let k = String::from_utf8_lossy(&k).into_owned();
            let mut parts = k.split('/').skip(1);
            if let (Some(tname), Some(class)) = (parts.next(), parts.next().and_then(|c| c.parse::<u8>().ok())) {
                if let (Some(t), Ok(bytes)) = (Table::ALL.into_iter().find(|t| t.name() == tname), <[u8; 8]>::try_from(&v[..])) {
                    counts.insert((t, class), u64::from_le_bytes(bytes));
                }
            }
        }
        Ok(FjallStore { db, spaces, key, counts: Mutex::new(counts), stopped: std::sync::OnceLock::new() })
    }

    /// Re-seals every value not sealed under the current data key (and format), in batches
    /// that are each durable before the next; run offline (fjall's lock keeps the service out)
    /// by `dps rotate-data-key`. Returns how many values it re-sealed. Interrupted, it can
    /// run again: values already re-sealed are skipped.
    pub fn reseal(&self) -> Result<u64, StoreError> {
        const BATCH: usize = 1_000;
        let mut done = 0u64;
        for t in Table::ALL {
            if t == Table::RegistrationsByGroup {
                continue; // empty values, nothing sealed
            }
            let mut after: Option<Vec<u8>> = None;
            loop {
                let mut stale = Vec::new();
                let range = match &after {
                    Some(a) => self.space(t).range::<Vec<u8>, _>((std::ops::Bound::Excluded(a.clone()), std::ops::Bound::Unbounded)),
                    None => self.space(t).range::<Vec<u8>, _>(..),
                };
                let mut last = None;
                for kv in range {
                    let (k, v) = kv.into_inner()?;
                    last = Some(k.to_vec());
                    // Record counters in `meta` are plain numbers, not sealed values.
                    let key = String::from_utf8_lossy(&k).into_owned();
                    if (t == Table::Meta && k.starts_with(b"count/")) || self.key.is_current(t, &key, &v) {
                        continue;
                    }
                    let rec = self.key.open(t, &key, &v).ok_or_else(|| StoreError::Corrupt { table: t.name(), key: key.clone() })?;
                    stale.push((key, rec));
                    if stale.len() >= BATCH {
                        break;
                    }
                }
                if !stale.is_empty() {
                    let mut batch = self.db.batch();
                    for (key, rec) in &stale {
                        batch.insert(self.space(t), key.as_bytes(), self.key.seal(t, key, rec));
                    }
                    batch.commit()?;
                    self.db.persist(PersistMode::SyncAll)?;
                    done += stale.len() as u64;
                }
                match last {
                    Some(l) if stale.len() >= BATCH => after = Some(l),
                    _ => break,
                }
            }
        }
        Ok(done)
    }

    /// A failed journal write or fsync: fjall is poisoned and takes no more writes; so says
    /// every later commit, with the first cause.
    fn stop_writes(&self, e: fjall::Error) -> StoreError {
        let why = match &e {
            fjall::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull || io.kind() == std::io::ErrorKind::QuotaExceeded => {
                format!("the disk is full ({io})")
            }
            e => format!("a journal write or fsync failed ({e})"),
        };
        let why = self.stopped.get_or_init(|| {
            tracing::error!(cause = %why, "store writes stopped; reads go on; restart the service once the disk is fixed");
            why
        });
        StoreError::WritesStopped(why.clone())
    }

    /// Why writes stopped, if they did.
    pub fn writes_stopped(&self) -> Option<&str> {
        self.stopped.get().map(String::as_str)
    }

    fn space(&self, t: Table) -> &Keyspace {
        // Every table gets its keyspace in `open`.
        &self.spaces[&t]
    }

    fn read(&self, t: Table, key: &str) -> Result<Option<Record>, StoreError> {
        match self.space(t).get(key)? {
            None => Ok(None),
            Some(v) if t == Table::RegistrationsByGroup => {
                let _ = v;
                Ok(Some(Record { etag: String::new(), class: 0, body: Vec::new() }))
            }
            Some(v) => self.key.open(t, key, &v).map(Some).ok_or_else(|| StoreError::Corrupt { table: t.name(), key: key.to_string() }),
        }
    }
}

impl Store for FjallStore {
    fn get(&self, table: Table, key: &str) -> Result<Option<Record>, StoreError> {
        self.read(table, key)
    }

    fn scan(&self, table: Table, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, Record)>, StoreError> {
        let mut out = Vec::new();
        let start = match after {
            Some(a) if a >= prefix => format!("{a}\u{0}"),
            _ => prefix.to_string(),
        };
        for kv in self.space(table).range(start.as_bytes()..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv.into_inner()?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            let rec = if table == Table::RegistrationsByGroup {
                Record { etag: String::new(), class: 0, body: Vec::new() }
            } else {
                self.key.open(table, &key, &v).ok_or_else(|| StoreError::Corrupt { table: table.name(), key: key.clone() })?
            };
            out.push((key, rec));
        }
        Ok(out)
    }

    fn count(&self, table: Table, class: u8) -> u64 {
        self.counts.lock().map(|c| c.get(&(table, class)).copied().unwrap_or(0)).unwrap_or(0)
    }

    fn commit(&self, txns: Vec<Txn>) -> Result<Vec<TxnResult>, StoreError> {
        let mut counts = match self.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(why) = self.stopped.get() {
            return Err(StoreError::WritesStopped(why.clone()));
        }
        // Values written earlier in this group, so later transactions see them.
        let mut overlay: HashMap<(Table, String), Option<Record>> = HashMap::new();
        let mut new_counts = counts.clone();
        // Synced inside the commit, before the batch reaches the memtables: if the sync fails,
        // nothing of it becomes readable (a persist after the commit would leave it visible).
        // fdatasync, not fsync: fjall sizes each journal file in full when it creates it (and
        // syncs it then), so an append changes no size, and fdatasync writes what reading the
        // data back needs (the data, a newly allocated block) but skips the inode's
        // modification time, a second block write and device round trip per commit with fsync
        // (tuning.md, "Commits without the inode write").
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        let mut results = Vec::with_capacity(txns.len());
        for txn in txns {
            let read = |t: Table, k: &str| match overlay.get(&(t, k.to_string())) {
                Some(v) => Ok(v.clone()),
                None => self.read(t, k),
            };
            let planned = plan(&txn, read, |t, c| Ok(new_counts.get(&(t, c)).copied().unwrap_or(0)))?;
            let p = match planned {
                Ok(p) => p,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            for ((table, key), value) in p.staged {
                match &value {
                    Some(_) if table == Table::RegistrationsByGroup => batch.insert(self.space(table), key.as_bytes(), &[][..]),
                    Some(r) => batch.insert(self.space(table), key.as_bytes(), self.key.seal(table, &key, r)),
                    None => batch.remove(self.space(table), key.as_bytes()),
                }
                overlay.insert((table, key), value);
            }
            for ((t, class), d) in p.delta {
                let c = new_counts.entry((t, class)).or_default();
                *c = (*c as i64 + d).max(0) as u64;
                batch.insert(self.space(Table::Meta), count_key(t, class).as_bytes(), c.to_le_bytes().to_vec());
            }
            results.push(Ok(p.previous));
        }
        if !batch.is_empty() {
            batch.commit().map_err(|e| self.stop_writes(e))?;
        }
        *counts = new_counts;
        Ok(results)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }
}
