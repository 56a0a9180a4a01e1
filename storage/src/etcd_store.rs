//! The store shared by several gateway nodes: etcd, through its v3 API (etcd-client). It runs
//! on the store threads only, driven by a small tokio runtime of its own; the shards never
//! see it. Keys are `{root}/t/{table}/{key}`, values sealed by the [`DataKey`] as on disk (so
//! secrets never leave the node in the clear); per-class counts are spread over 64 keys
//! `{root}/c/{table}/{class}/{nn}` (one count key would be a point every create collides on).
//!
//! A transaction is planned (`plan`) against the values it read, then written as one etcd
//! transaction whose compares say that none of those values, nor the counts it changes, moved
//! since they were read (mod revision, or version 0 for an absent key). When another node got
//! there first, the compares fail and the transaction is planned again on the new values: two
//! nodes racing for one registration id yield one record, the other sees `Conflict`.

use crate::crypt::DataKey;
use crate::plan::plan;
use crate::record::{Record, Table, Txn, TxnResult};
use crate::{Store, StoreError};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn as EtcdTxn, TxnOp};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

/// Where the etcd cluster is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this service instance (several instances may share a cluster).
    pub root: String,
    /// etcd authentication (name, password), when the cluster has it on.
    pub user: Option<(String, String)>,
    /// Per request.
    pub timeout: Duration,
    /// TLS to the members (`https://` endpoints).
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA the members' certificates chain to, and this node's client certificate
/// when the cluster checks them (`--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    /// Certificate chain and private key, PEM.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("EtcdTls").field("client_certificate", &self.client.is_some()).finish_non_exhaustive()
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            root: "/dps".into(),
            user: None,
            timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

impl EtcdConfig {
    /// The client options every connection to a member uses.
    fn connect_options(&self) -> ConnectOptions {
        let mut opts = ConnectOptions::new().with_timeout(self.timeout).with_connect_timeout(self.timeout);
        if let Some((name, password)) = &self.user {
            opts = opts.with_user(name.clone(), password.clone());
        }
        if let Some(t) = &self.tls {
            let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem));
            if let Some((cert, key)) = &t.client {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        opts
    }
}

/// Keys a count is spread over (one shard alone may go negative; their sum is the count).
const COUNT_SHARDS: u64 = 64;

fn count_shard(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish() % COUNT_SHARDS
}

fn parse_count(v: &[u8]) -> i64 {
    std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Planning again after a lost race: a handful of tries is plenty unless one key is hot.
const MAX_ATTEMPTS: usize = 32;

pub struct EtcdStore {
    rt: tokio::runtime::Runtime,
    /// One client per member: a request that cannot reach its member goes to the next one.
    clients: Vec<Client>,
    /// The member requests go to first (the last one that answered).
    current: std::sync::atomic::AtomicUsize,
    root: String,
    key: DataKey,
}

fn etcd(e: etcd_client::Error) -> StoreError {
    StoreError::Remote(e.to_string())
}

/// Whether a failed request surely never reached etcd (no connection to the member), so
/// sending it to another member cannot apply it twice.
fn not_sent(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("tcp connect error") || text.contains("Connection refused") || text.contains("error trying to connect")
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

impl EtcdStore {
    pub fn connect(cfg: &EtcdConfig, key: DataKey) -> Result<EtcdStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Remote(format!("cannot start the etcd client runtime: {e}")))?;
        let opts = cfg.connect_options();
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Remote("no etcd endpoints configured".into()));
        }
        let clients = cfg
            .endpoints
            .iter()
            .map(|e| rt.block_on(Client::connect([e], Some(opts.clone()))).map_err(etcd))
            .collect::<Result<Vec<_>, _>>()?;
        let store = EtcdStore { rt, clients, current: 0.into(), root: cfg.root.trim_end_matches('/').to_string(), key };
        // Reach the cluster now: a wrong endpoint is a start-up error, not a first request's.
        store.read_raw(&store.count_key(Table::Meta, 0, 0))?;
        Ok(store)
    }

    fn data_key(&self, t: Table, key: &str) -> Vec<u8> {
        format!("{}/t/{}/{key}", self.root, t.name()).into_bytes()
    }

    /// One of the `COUNT_SHARDS` keys a (table, class) count is spread over.
    fn count_key(&self, t: Table, class: u8, shard: u64) -> Vec<u8> {
        format!("{}/c/{}/{class}/{shard:02}", self.root, t.name()).into_bytes()
    }

    /// Rewritten by every transaction that changes a config table: its mod revision is the
    /// config stamp.
    fn config_stamp_key(&self) -> Vec<u8> {
        format!("{}/config-stamp", self.root).into_bytes()
    }

    fn count_prefix(&self, t: Table, class: u8) -> Vec<u8> {
        format!("{}/c/{}/{class}/", self.root, t.name()).into_bytes()
    }

    /// Runs `call` against the current member; when it cannot connect to it (a member down, so
    /// the request never left this node and trying another is safe), against the next ones.
    /// Any other failure is the caller's: a request that may have been applied is not repeated.
    fn request<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(etcd_client::KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.clients.len();
        let start = self.current.load(Relaxed);
        let mut last = None;
        for attempt in 0..2 * n {
            let i = (start + attempt) % n;
            match self.rt.block_on(call(self.clients[i].kv_client())) {
                Ok(v) => {
                    self.current.store(i, Relaxed);
                    return Ok(v);
                }
                Err(e) if not_sent(&e) => {
                    last = Some(e);
                    if attempt + 1 == n {
                        // Every member refused once: give a restarting one a moment.
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                Err(e) => return Err(etcd(e)),
            }
        }
        Err(last.map_or_else(|| StoreError::Remote("no etcd member answered".into()), etcd))
    }

    /// A key's value and mod revision (0: absent).
    fn read_raw(&self, k: &[u8]) -> Result<(Option<Vec<u8>>, i64), StoreError> {
        let r = self.request(|mut kv| {
            let k = k.to_vec();
            async move { kv.get(k, None).await }
        })?;
        Ok(match r.kvs().first() {
            Some(v) => (Some(v.value().to_vec()), v.mod_revision()),
            None => (None, 0),
        })
    }

    fn open(&self, table: Table, key: &str, v: &[u8]) -> Result<Record, StoreError> {
        if table == Table::RegistrationsByGroup {
            return Ok(Record { etag: String::new(), class: 0, body: Vec::new() });
        }
        self.key.open(table, key, v).ok_or_else(|| StoreError::Corrupt { table: table.name(), key: key.to_string() })
    }

    fn read(&self, table: Table, key: &str) -> Result<(Option<Record>, i64), StoreError> {
        let (v, rev) = self.read_raw(&self.data_key(table, key))?;
        Ok((v.map(|v| self.open(table, key, &v)).transpose()?, rev))
    }

    /// One count shard's value and mod revision.
    fn read_count_shard(&self, k: &[u8]) -> Result<(i64, i64), StoreError> {
        let (v, rev) = self.read_raw(k)?;
        Ok((v.as_deref().map_or(0, parse_count), rev))
    }

    /// A (table, class) count: the sum of its shards.
    fn read_count(&self, t: Table, class: u8) -> Result<u64, StoreError> {
        let prefix = self.count_prefix(t, class);
        let r = self.request(|mut kv| {
            let (start, end) = (prefix.clone(), prefix_end(&prefix));
            async move { kv.get(start, Some(GetOptions::new().with_range(end))).await }
        })?;
        Ok(r.kvs().iter().map(|kv| parse_count(kv.value())).sum::<i64>().max(0) as u64)
    }

    /// One transaction, planned and written until it wins or is refused.
    fn commit_one(&self, txn: &Txn) -> Result<TxnResult, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            // What the plan read, with the revision each was read at.
            let seen: RefCell<HashMap<Vec<u8>, i64>> = RefCell::default();
            // Quotas read the whole count without pinning it: two nodes creating at the same
            // moment may pass a quota by the creates in flight (pinning every shard would make
            // all creates collide again).
            let planned = plan(
                txn,
                |t, k| {
                    let (v, rev) = self.read(t, k)?;
                    seen.borrow_mut().insert(self.data_key(t, k), rev);
                    Ok(v)
                },
                |t, c| self.read_count(t, c),
            )?;
            let mut seen = seen.into_inner();
            let p = match planned {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            let mut ops = Vec::new();
            for ((table, key), value) in &p.staged {
                let k = self.data_key(*table, key);
                ops.push(match value {
                    Some(_) if *table == Table::RegistrationsByGroup => TxnOp::put(k, Vec::new(), None),
                    Some(r) => TxnOp::put(k, self.key.seal(*table, key, r), None),
                    None => TxnOp::delete(k, None),
                });
            }
            // Each count change goes to one shard of the count, picked by the transaction's first
            // key, and pins only that shard: creates of different records rarely meet there.
            let shard = txn.ops.first().map_or(0, |op| match op {
                crate::record::Op::Put { key, .. } | crate::record::Op::Delete { key, .. } => count_shard(key),
            });
            for ((t, class), d) in &p.delta {
                let k = self.count_key(*t, *class, shard);
                let (n, rev) = self.read_count_shard(&k)?;
                seen.insert(k.clone(), rev);
                ops.push(TxnOp::put(k, (n + d).to_string(), None));
            }
            if ops.is_empty() {
                return Ok(Ok(p.previous));
            }
            if p.staged.iter().any(|((t, _), _)| crate::CONFIG_TABLES.contains(t)) {
                ops.push(TxnOp::put(self.config_stamp_key(), Vec::new(), None));
            }
            let compares: Vec<Compare> = seen
                .into_iter()
                .map(|(k, rev)| match rev {
                    0 => Compare::version(k, CompareOp::Equal, 0),
                    r => Compare::mod_revision(k, CompareOp::Equal, r),
                })
                .collect();
            let txn = EtcdTxn::new().when(compares).and_then(ops);
            let r = self.request(|mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })?;
            if r.succeeded() {
                return Ok(Ok(p.previous));
            }
        }
        Err(StoreError::Remote(format!("a transaction lost {MAX_ATTEMPTS} races in a row for the same keys")))
    }
}

impl Store for EtcdStore {
    fn get(&self, table: Table, key: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.read(table, key)?.0)
    }

    fn scan(&self, table: Table, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, Record)>, StoreError> {
        let base = self.data_key(table, "");
        let full_prefix = self.data_key(table, prefix);
        let start = match after {
            Some(a) if a >= prefix => self.data_key(table, &format!("{a}\u{0}")),
            _ => full_prefix.clone(),
        };
        let mut opts = GetOptions::new().with_range(prefix_end(&full_prefix));
        if limit < i64::MAX as usize {
            opts = opts.with_limit(limit as i64);
        }
        let r = self.request(|mut kv| {
            let (start, opts) = (start.clone(), opts.clone());
            async move { kv.get(start, Some(opts)).await }
        })?;
        r.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(&kv.key()[base.len()..]).into_owned();
                let rec = self.open(table, &key, kv.value())?;
                Ok((key, rec))
            })
            .collect()
    }

    fn count(&self, table: Table, class: u8) -> u64 {
        self.read_count(table, class).unwrap_or(0)
    }

    /// Each transaction is its own etcd transaction, durable (committed by a quorum) when it
    /// returns; the group shares no atomicity beyond that, which no caller relies on.
    fn commit(&self, txns: Vec<Txn>) -> Result<Vec<TxnResult>, StoreError> {
        txns.iter().map(|t| self.commit_one(t)).collect()
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The mod revision of the stamp key: moved in the same etcd transaction as the config
    /// change, so a node that reads it after the change was acknowledged sees it moved.
    fn config_stamp(&self) -> Result<u64, StoreError> {
        Ok(self.read_raw(&self.config_stamp_key())?.1.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_ends() {
        assert_eq!(super::prefix_end(b"/dps/t/a"), b"/dps/t/b");
        assert_eq!(super::prefix_end(b"a\xff"), b"b");
        assert_eq!(super::prefix_end(b"\xff"), vec![0]);
    }
}
