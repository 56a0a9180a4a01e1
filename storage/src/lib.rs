//! Durable state of the service behind the [`Store`] trait, with a fjall implementation
//! ([`FjallStore`]) and the threads that keep blocking store work off the shards
//! ([`StoreService`]: readers plus one group-committing writer).

mod crypt;
mod etcd_store;
mod fjall_store;
mod plan;
mod queue;
mod record;
mod service;

pub use crypt::DataKey;
pub use etcd_store::{EtcdConfig, EtcdStore, EtcdTls};
pub use fjall_store::FjallStore;
pub use record::{by_group_key, Expect, Op, Record, Table, Txn, TxnError, TxnResult};
pub use service::{CommitStats, ServiceError as StoreCallError, StoreService, StoreServiceConfig, StoreThreads, COMMIT_BUCKETS_US};

/// A failure of the store itself (I/O, corruption, a key that does not decrypt). After one, the
/// write in flight was not acknowledged; callers answer 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(#[from] fjall::Error),
    #[error("record {table}/{key} is corrupt or was encrypted with another data key")]
    Corrupt { table: &'static str, key: String },
    /// A journal write or fsync failed (the disk full, or an I/O error): nothing of the write
    /// in flight became visible, and no write is taken from then on, since after a failed
    /// fsync the kernel may have dropped what it held (fjall's poisoned state). Reads go on.
    /// The service needs a restart (recovery from the journal) once the disk is fixed.
    #[error("writes are stopped: {0}")]
    WritesStopped(String),
    /// The shared store (etcd) did not answer, or refused.
    #[error("etcd: {0}")]
    Remote(String),
}

impl StoreError {
    /// Another process holds the store open (fjall's lock file).
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Engine(fjall::Error::Locked))
    }
}

/// The store interface: blocking calls, safe from many threads. Transactions passed to one
/// [`Store::commit`] become durable together (group commit) before it returns.
pub trait Store: Send + Sync + 'static {
    fn get(&self, table: Table, key: &str) -> Result<Option<Record>, StoreError>;
    /// Up to `limit` records whose key starts with `prefix`, in key order, after key `after`.
    fn scan(&self, table: Table, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, Record)>, StoreError>;
    /// Records of `table` with `class` (maintained exactly by commits).
    fn count(&self, table: Table, class: u8) -> u64;
    /// Applies the transactions in order; each is all-or-nothing and checks its preconditions
    /// against the state left by the ones before it. Everything that succeeded is durable on return.
    fn commit(&self, txns: Vec<Txn>) -> Result<Vec<TxnResult>, StoreError>;
    /// Makes every write durable (used at shutdown).
    fn flush(&self) -> Result<(), StoreError>;
    /// A number that grows whenever an enrollment group, linked hub or CA certificate changes,
    /// on any node sharing this store: a node compares it with the one its cached copies were
    /// read at. 0 for a store of this process alone, whose writes reach its caches directly.
    fn config_stamp(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// The tables whose records every registration reads from a node's cached copy (groups, linked
/// hubs, CA certificates): a change to any of them moves [`Store::config_stamp`].
pub const CONFIG_TABLES: [Table; 3] = [Table::Groups, Table::Hubs, Table::Certificates];
