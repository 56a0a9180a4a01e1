//! The embedded store: one fjall database, a keyspace per [`Table`], values sealed by
//! [`DataKey`]. Commits hold a lock, so preconditions, quotas and counts are exact.

use crate::crypt::DataKey;
use crate::record::{by_group_key, registration_group, Expect, Op, Record, Table, Txn, TxnError, TxnResult};
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
                    if (t == Table::Meta && k.starts_with(b"count/")) || self.key.is_current(&v) {
                        continue;
                    }
                    let key = String::from_utf8_lossy(&k).into_owned();
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

type Staged = Vec<((Table, String), Option<Record>)>;

/// The store owns the by-group index: a registration record written or deleted moves its entry
/// with it, so no caller can leave one behind.
fn index_registration(staged: &mut Staged, key: &str, old: Option<&Record>, new: Option<&Record>) {
    let (was, is) = (old.and_then(registration_group), new.and_then(registration_group));
    if was == is {
        return;
    }
    if let Some(g) = was {
        staged.push(((Table::RegistrationsByGroup, by_group_key(&g, key)), None));
    }
    if let Some(g) = is {
        staged
            .push(((Table::RegistrationsByGroup, by_group_key(&g, key)), Some(Record { etag: String::new(), class: 0, body: Vec::new() })));
    }
}

fn check(expect: &Expect, current: Option<&Record>) -> Result<(), TxnError> {
    match (expect, current) {
        (Expect::Any, _) => Ok(()),
        (Expect::Absent, None) => Ok(()),
        (Expect::Absent, Some(_)) => Err(TxnError::Conflict),
        (_, None) => Err(TxnError::NotFound),
        (Expect::Present, Some(_)) => Ok(()),
        (Expect::Etag(e), Some(r)) => {
            if dps_core::ids::etag_matches(e, &r.etag) {
                Ok(())
            } else {
                Err(TxnError::PreconditionFailed)
            }
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
        // Synced inside the commit, before the batch reaches the memtables: if the fsync fails,
        // nothing of it becomes readable (a persist after the commit would leave it visible).
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        let mut results = Vec::with_capacity(txns.len());
        for txn in txns {
            let mut staged: Staged = Vec::new();
            let mut previous = Vec::with_capacity(txn.ops.len());
            let mut delta: HashMap<(Table, u8), i64> = HashMap::new();
            let mut failed = None;
            for op in &txn.ops {
                let (table, key) = match op {
                    Op::Put { table, key, .. } | Op::Delete { table, key, .. } => (*table, key.clone()),
                };
                let current = match staged.iter().rev().find(|(k, _)| k.0 == table && k.1 == key) {
                    Some((_, v)) => v.clone(),
                    None => match overlay.get(&(table, key.clone())) {
                        Some(v) => v.clone(),
                        None => self.read(table, &key)?,
                    },
                };
                let outcome = match op {
                    Op::Put { record, expect, quota, .. } => check(expect, current.as_ref()).and_then(|_| {
                        let grows_class = current.as_ref().is_none_or(|c| c.class != record.class);
                        if let (Some(q), true) = (quota, grows_class) {
                            let have = new_counts.get(&(table, record.class)).copied().unwrap_or(0) as i64
                                + delta.get(&(table, record.class)).copied().unwrap_or(0);
                            if have >= *q as i64 {
                                return Err(TxnError::QuotaExceeded);
                            }
                        }
                        if let Some(c) = &current {
                            *delta.entry((table, c.class)).or_default() -= 1;
                        }
                        *delta.entry((table, record.class)).or_default() += 1;
                        Ok(Some(record.clone()))
                    }),
                    Op::Delete { expect, .. } => check(expect, current.as_ref()).map(|_| {
                        if let Some(c) = &current {
                            *delta.entry((table, c.class)).or_default() -= 1;
                        }
                        None
                    }),
                };
                match outcome {
                    Ok(new) => {
                        if table == Table::Registrations {
                            index_registration(&mut staged, &key, current.as_ref(), new.as_ref());
                        }
                        previous.push(current);
                        staged.push(((table, key), new));
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                results.push(Err(e));
                continue;
            }
            for ((table, key), value) in staged {
                match &value {
                    Some(_) if table == Table::RegistrationsByGroup => batch.insert(self.space(table), key.as_bytes(), &[][..]),
                    Some(r) => batch.insert(self.space(table), key.as_bytes(), self.key.seal(table, &key, r)),
                    None => batch.remove(self.space(table), key.as_bytes()),
                }
                overlay.insert((table, key), value);
            }
            for ((t, class), d) in delta {
                if t == Table::RegistrationsByGroup || d == 0 {
                    continue;
                }
                let c = new_counts.entry((t, class)).or_default();
                *c = (*c as i64 + d).max(0) as u64;
                batch.insert(self.space(Table::Meta), count_key(t, class).as_bytes(), c.to_le_bytes().to_vec());
            }
            results.push(Ok(previous));
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
