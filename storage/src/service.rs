//! Keeps blocking store work off the shards: reads go to a pool of reader threads, writes to
//! one writer thread that drains its queue into a single group commit (one fsync for many
//! writes) and answers each caller only once the commit is durable. Queues are bounded; a full
//! queue is reported at once so the caller can answer 503 instead of waiting.

use crate::queue::{bounded, Closer, Receiver, Sender, TrySendError};
use crate::record::{Table, Txn, TxnResult};
use crate::{Record, Store, StoreError};
use futures::channel::oneshot;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Knobs (documented in tuning.md).
#[derive(Debug, Clone)]
pub struct StoreServiceConfig {
    /// Reader threads. Default 2.
    pub readers: usize,
    /// Point reads (`get`, `get_many`) on the caller's thread instead of a reader's: no thread
    /// crossing and no wake-up of the caller, at the price of blocking it for a read that misses
    /// the caches (tuning.md). Scans always go to the readers.
    pub inline_point_reads: bool,
    /// Capacity of the read and write queues, in requests. Default 65,536.
    pub queue: usize,
    /// Most transactions in one group commit. Default 4,096.
    pub max_group: usize,
    /// Under load (the writer's last group held more than one write), how long the writer
    /// sleeps before taking its next group, in microseconds: the writes that arrive meanwhile
    /// share one fsync, and the writer is not woken for each. 0 (default) takes whatever has
    /// queued up while the previous fsync ran.
    pub linger_us: u64,
    /// A commit runs on the caller's thread when no other commit runs or waits, recent commits
    /// (fsync included) took at most this long, in microseconds, and either the store has been
    /// idle most of the time lately (`IDLE_PER_BUSY`) or the caller says its thread has little
    /// else to do ([`StoreService::commit_from_light_caller`]); 0 (default): always on the
    /// writer thread. At partial load that saves the writer's wake-up and the caller's
    /// (tuning.md); under load the writer's group commit takes over, and the caller never
    /// waits for an fsync that other commits could have shared.
    pub inline_commit_max_us: u64,
}

impl Default for StoreServiceConfig {
    fn default() -> Self {
        StoreServiceConfig { readers: 2, inline_point_reads: false, queue: 65_536, max_group: 4_096, linger_us: 0, inline_commit_max_us: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("store queue is full")]
    Busy,
    #[error("store failed: {0}")]
    Failed(String),
    /// The store takes no more writes (a full disk, a failed fsync); reads go on.
    #[error("store writes stopped: {0}")]
    WritesStopped(String),
    #[error("store is shut down")]
    Closed,
}

/// The one mapping from a store call's failure to what a client is told, device or operator.
/// A full queue and a shutdown are both "unavailable, retry": every SDK retries a 503 with
/// `Retry-After` (Python and Node treat any status of 429 and above as retryable), and neither
/// applied anything. A failed store is a 500: the write in flight was not acknowledged.
impl From<ServiceError> for dps_core::error::ServiceError {
    fn from(e: ServiceError) -> Self {
        use dps_core::error::{ErrorKind, ServiceError as Failure};
        match e {
            ServiceError::Busy => {
                Failure::new(ErrorKind::Unavailable, "the service is busy; retry later").retry_after(1).because("store queue full")
            }
            ServiceError::Closed => {
                Failure::new(ErrorKind::Unavailable, "the service is shutting down; retry later").retry_after(1).because("store closed")
            }
            // Every SDK retries a 503; the operator sees why in the message, the log and the
            // `dps_store_writes_stopped` metric.
            ServiceError::WritesStopped(why) => Failure::new(
                ErrorKind::Unavailable,
                format!("the service cannot store anything now ({why}); nothing was applied; retry later"),
            )
            .retry_after(30)
            .because(format!("store writes stopped: {why}")),
            ServiceError::Failed(m) => {
                Failure::new(ErrorKind::Internal, "the store failed; the operation was not applied").because(format!("store failure: {m}"))
            }
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, ServiceError>>;

enum Read {
    Get(Table, String, Reply<Option<Record>>),
    GetMany(Vec<(Table, String)>, Reply<Vec<Option<Record>>>),
    Scan(Table, String, Option<String>, usize, Reply<Vec<(String, Record)>>),
    ConfigStamp(Reply<u64>),
}

struct Write {
    txn: Txn,
    reply: Reply<TxnResult>,
}

/// Upper bounds (µs) of the commit latency histogram's buckets; the last bucket is unbounded.
pub const COMMIT_BUCKETS_US: [u64; 11] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];

/// Commit statistics for metrics and benchmarks.
#[derive(Default)]
pub struct CommitStats {
    pub groups: AtomicU64,
    pub txns: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Group commits by latency: `buckets[i]` counts those ≤ `COMMIT_BUCKETS_US[i]` and above the
    /// previous bound; the last counts the rest (not cumulative).
    pub buckets: [AtomicU64; COMMIT_BUCKETS_US.len() + 1],
    /// Set once the store stopped taking writes.
    pub writes_stopped: AtomicBool,
    /// Commits made on the caller's thread (`inline_commit_max_us`), transactions.
    pub inline_txns: AtomicU64,
    /// Moving averages (µs) of recent commit latencies, what an inline commit would block
    /// for, and of the idle time before each commit. Updated under the commit lock.
    recent_micros: AtomicU64,
    recent_idle_micros: AtomicU64,
    /// When the last commit ended (µs since `epoch`).
    last_end_micros: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

/// An inline commit needs the store to have been idle at least this many times as long as it
/// was committing, lately: with one shard under load its commits come back to back, and
/// committing each inline would make every one wait for its own fsync where the writer's
/// group commit shares one (measured in tuning.md: 1 shard fell from 2,846 to 1,519
/// registrations/s before this rule).
const IDLE_PER_BUSY: u64 = 8;

/// Idle times longer than this count as this long: one quiet minute must not keep commits
/// inline through the burst that follows.
const IDLE_CAP_MICROS: u64 = 10_000;

impl CommitStats {
    fn now_micros(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_micros() as u64
    }

    /// Called as a commit starts (under the commit lock): the idle time since the last.
    fn starting(&self) {
        let last_end = self.last_end_micros.load(Ordering::Relaxed);
        let idle = self.now_micros().saturating_sub(last_end).min(IDLE_CAP_MICROS);
        // Before the first commit the store was idle all along.
        let old = if last_end == 0 { IDLE_CAP_MICROS } else { self.recent_idle_micros.load(Ordering::Relaxed) };
        self.recent_idle_micros.store((old * 7 + idle) / 8, Ordering::Relaxed);
    }

    fn record(&self, micros: u64) {
        let i = COMMIT_BUCKETS_US.iter().position(|b| micros <= *b).unwrap_or(COMMIT_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.commit_micros.fetch_add(micros, Ordering::Relaxed);
        let old = self.recent_micros.load(Ordering::Relaxed);
        self.recent_micros.store((old * 7 + micros) / 8, Ordering::Relaxed);
        self.last_end_micros.store(self.now_micros(), Ordering::Relaxed);
    }

    /// Whether recent commits were quick (at most `max_us`).
    fn quick(&self, max_us: u64) -> bool {
        self.recent_micros.load(Ordering::Relaxed) <= max_us
    }

    /// Whether the store was mostly idle lately.
    fn idle(&self) -> bool {
        self.recent_idle_micros.load(Ordering::Relaxed) >= self.recent_micros.load(Ordering::Relaxed) * IDLE_PER_BUSY
    }
}

/// A cloneable handle; every method returns a future that any executor can await.
#[derive(Clone)]
pub struct StoreService {
    /// Weak: the store belongs to its threads, so a handle that outlives them (a task that was
    /// never dropped) cannot keep the database open and locked.
    store: std::sync::Weak<dyn Store>,
    reads: Sender<Read>,
    writes: Sender<Write>,
    inline_point_reads: bool,
    inline_commit_max_us: u64,
    /// Held by whoever commits (the writer thread, or a caller committing inline): a commit
    /// checks its preconditions and applies them as one step.
    commit_lock: Arc<std::sync::Mutex<()>>,
    pub stats: Arc<CommitStats>,
}

pub struct StoreThreads {
    handles: Vec<JoinHandle<()>>,
    store: Arc<dyn Store>,
    /// The threads sleep on their queues until a request comes or these close them (no
    /// periodic wake-up to look at a flag: each cost an idle gateway a wake-up per thread
    /// every 50 ms).
    closing: (Closer<Read>, Closer<Write>),
}

impl StoreThreads {
    /// Stops the threads once their queues are empty (queued writes are still committed and
    /// acknowledged), waits for them, flushes and closes the store. Handles still held then get
    /// `Closed`.
    pub fn join(self) -> Result<(), StoreError> {
        self.closing.0.close();
        self.closing.1.close();
        for h in self.handles {
            let _ = h.join();
        }
        self.store.flush()
    }
}

impl StoreService {
    pub fn start(store: Arc<dyn Store>, cfg: &StoreServiceConfig) -> (StoreService, StoreThreads) {
        let (rtx, rrx) = bounded::<Read>(cfg.queue);
        let (wtx, wrx) = bounded::<Write>(cfg.queue);
        let stats = Arc::new(CommitStats::default());
        let closing = (rtx.closer(), wtx.closer());
        let mut handles = Vec::new();
        for i in 0..cfg.readers.max(1) {
            let (s, rx) = (store.clone(), rrx.clone());
            handles.push(spawn(format!("store-read-{i}"), move || reader(s, rx)));
        }
        let commit_lock = Arc::new(std::sync::Mutex::new(()));
        {
            let (s, st, max, linger) = (store.clone(), stats.clone(), cfg.max_group.max(1), Duration::from_micros(cfg.linger_us));
            let lock = commit_lock.clone();
            handles.push(spawn("store-write".into(), move || writer(s, wrx, st, max, linger, &lock)));
        }
        let service = StoreService {
            store: Arc::downgrade(&store),
            reads: rtx,
            writes: wtx,
            inline_point_reads: cfg.inline_point_reads,
            inline_commit_max_us: cfg.inline_commit_max_us,
            commit_lock,
            stats,
        };
        (service, StoreThreads { handles, store, closing })
    }

    fn send<T, M>(tx: &Sender<M>, make: impl FnOnce(Reply<T>) -> M) -> Result<oneshot::Receiver<Result<T, ServiceError>>, ServiceError> {
        let (reply, rx) = oneshot::channel();
        match tx.try_send(make(reply)) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full) => Err(ServiceError::Busy),
            Err(TrySendError::Disconnected) => Err(ServiceError::Closed),
        }
    }

    async fn wait<T>(rx: oneshot::Receiver<Result<T, ServiceError>>) -> Result<T, ServiceError> {
        rx.await.unwrap_or(Err(ServiceError::Closed))
    }

    /// Whether point reads run on the caller's thread (no thread crossing, no wake-up).
    pub fn point_reads_inline(&self) -> bool {
        self.inline_point_reads
    }

    pub async fn get(&self, table: Table, key: &str) -> Result<Option<Record>, ServiceError> {
        if self.inline_point_reads {
            let store = self.store.upgrade().ok_or(ServiceError::Closed)?;
            return store.get(table, key).map_err(|e| ServiceError::Failed(e.to_string()));
        }
        let rx = Self::send(&self.reads, |r| Read::Get(table, key.to_string(), r))?;
        Self::wait(rx).await
    }

    /// Several point reads in one trip to a reader thread.
    pub async fn get_many(&self, keys: Vec<(Table, String)>) -> Result<Vec<Option<Record>>, ServiceError> {
        if self.inline_point_reads {
            let store = self.store.upgrade().ok_or(ServiceError::Closed)?;
            return keys.iter().map(|(t, k)| store.get(*t, k).map_err(|e| ServiceError::Failed(e.to_string()))).collect();
        }
        let rx = Self::send(&self.reads, |r| Read::GetMany(keys, r))?;
        Self::wait(rx).await
    }

    pub async fn scan(&self, table: Table, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, Record)>, ServiceError> {
        let rx = Self::send(&self.reads, |r| Read::Scan(table, prefix.to_string(), after.map(str::to_string), limit, r))?;
        Self::wait(rx).await
    }

    /// The store's [`Store::config_stamp`].
    pub async fn config_stamp(&self) -> Result<u64, ServiceError> {
        let rx = Self::send(&self.reads, Read::ConfigStamp)?;
        Self::wait(rx).await
    }

    /// Commits one transaction; resolves once it is durable (or refused by its preconditions).
    pub async fn commit(&self, txn: Txn) -> Result<TxnResult, ServiceError> {
        self.commit_as(txn, false).await
    }

    /// [`commit`](Self::commit) for a caller whose thread has little else to do now (the
    /// gateway: a shard with a few connections open). Blocking it for one quick commit delays
    /// nobody much, so the commit may run on it even while the store is busy with other
    /// callers' commits; a caller under load must use `commit`, or its commits would each wait
    /// for an fsync of their own where the writer's group commit shares one.
    pub async fn commit_from_light_caller(&self, txn: Txn) -> Result<TxnResult, ServiceError> {
        self.commit_as(txn, true).await
    }

    async fn commit_as(&self, txn: Txn, light_caller: bool) -> Result<TxnResult, ServiceError> {
        let txn = match self.commit_inline(txn, light_caller) {
            Ok(result) => return result,
            Err(txn) => txn,
        };
        let rx = Self::send(&self.writes, |reply| Write { txn, reply })?;
        Self::wait(rx).await
    }

    /// Commits on this thread when that is cheap and fair (`inline_commit_max_us`): nothing
    /// queued for the writer, no commit running, recent commits quick, and the store mostly
    /// idle or the caller lightly loaded. Otherwise gives the transaction back for the
    /// writer's queue.
    fn commit_inline(&self, txn: Txn, light_caller: bool) -> Result<Result<TxnResult, ServiceError>, Txn> {
        let fair = light_caller || self.stats.idle();
        if self.inline_commit_max_us == 0 || !self.stats.quick(self.inline_commit_max_us) || !fair || !self.writes.is_empty() {
            return Err(txn);
        }
        let Some(store) = self.store.upgrade() else { return Err(txn) };
        let Ok(_held) = self.commit_lock.try_lock() else { return Err(txn) };
        self.stats.inline_txns.fetch_add(1, Ordering::Relaxed);
        let mut results = commit_group(store.as_ref(), vec![txn], &self.stats);
        Ok(results.pop().unwrap_or(Err(ServiceError::Closed)))
    }

    /// Commits several transactions, each independent, and answers for each: its result, or why
    /// it was not attempted (the queue filled part-way, or the store stopped). Items queued
    /// before a refusal still commit, so the caller learns exactly what was applied.
    pub async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<TxnResult, ServiceError>> {
        let mut pending = Vec::with_capacity(txns.len());
        for txn in txns {
            pending.push(Self::send(&self.writes, |reply| Write { txn, reply }));
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Ok(rx) => Self::wait(rx).await,
                Err(e) => Err(e),
            });
        }
        out
    }

    pub fn count(&self, table: Table, class: u8) -> u64 {
        self.store.upgrade().map_or(0, |s| s.count(table, class))
    }

    pub fn queued_writes(&self) -> usize {
        self.writes.len()
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    // Failing to start a thread at start-up is fatal; there is nothing to serve without it.
    #[allow(clippy::expect_used)]
    std::thread::Builder::new().name(name).spawn(f).expect("spawn store thread")
}

fn reader(store: Arc<dyn Store>, rx: Receiver<Read>) {
    let fail = |e: StoreError| ServiceError::Failed(e.to_string());
    // Until the queue is closed and empty, or every sender is gone.
    while let Ok(req) = rx.recv() {
        match req {
            Read::Get(t, k, reply) => {
                let _ = reply.send(store.get(t, &k).map_err(fail));
            }
            Read::GetMany(keys, reply) => {
                let r: Result<Vec<_>, _> = keys.iter().map(|(t, k)| store.get(*t, k)).collect();
                let _ = reply.send(r.map_err(fail));
            }
            Read::Scan(t, p, after, limit, reply) => {
                let _ = reply.send(store.scan(t, &p, after.as_deref(), limit).map_err(fail));
            }
            Read::ConfigStamp(reply) => {
                let _ = reply.send(store.config_stamp().map_err(fail));
            }
        }
    }
}

fn writer(
    store: Arc<dyn Store>,
    rx: Receiver<Write>,
    stats: Arc<CommitStats>,
    max_group: usize,
    linger: Duration,
    commit_lock: &std::sync::Mutex<()>,
) {
    let mut last_group = 0;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        // Lingering only after a group with company keeps a lone write (light load) from
        // waiting for nothing. The writer sleeps, not waits on its queue: a wait would be
        // woken by every write that arrives (tuning.md, "Group commits under load").
        if !linger.is_zero() && last_group > 1 {
            std::thread::sleep(linger);
        }
        rx.drain_into(&mut group, max_group - 1);
        last_group = group.len();
        let (txns, replies): (Vec<Txn>, Vec<Reply<TxnResult>>) = group.into_iter().map(|w| (w.txn, w.reply)).unzip();
        // A panic under the lock leaves nothing half-done in it (the store's commit is one
        // step), so a poisoned lock is still usable.
        let results = {
            let _held = commit_lock.lock().unwrap_or_else(|p| p.into_inner());
            commit_group(store.as_ref(), txns, &stats)
        };
        for (reply, r) in replies.into_iter().zip(results) {
            let _ = reply.send(r);
        }
    }
}

/// Commits a group (the caller holds the commit lock); each transaction's answer.
fn commit_group(store: &dyn Store, txns: Vec<Txn>, stats: &CommitStats) -> Vec<Result<TxnResult, ServiceError>> {
    stats.starting();
    let started = Instant::now();
    let n = txns.len();
    match store.commit(txns) {
        Ok(results) => {
            stats.groups.fetch_add(1, Ordering::Relaxed);
            stats.txns.fetch_add(n as u64, Ordering::Relaxed);
            stats.record(started.elapsed().as_micros() as u64);
            results.into_iter().map(Ok).collect()
        }
        Err(StoreError::WritesStopped(why)) => {
            stats.writes_stopped.store(true, Ordering::Relaxed);
            vec![Err(ServiceError::WritesStopped(why)); n]
        }
        Err(e) => {
            tracing::error!(error = %e, "group commit failed; {n} writes not acknowledged");
            vec![Err(ServiceError::Failed(e.to_string())); n]
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{DataKey, Expect, FjallStore, Op};
    use std::time::Duration;

    fn put(key: &str) -> (Write, oneshot::Receiver<Result<TxnResult, ServiceError>>) {
        let record = Record { etag: format!("e-{key}"), class: 0, body: b"v".to_vec() };
        let txn = Txn::one(Op::Put { table: Table::Registrations, key: key.into(), record, expect: Expect::Any, quota: None });
        let (reply, rx) = oneshot::channel();
        (Write { txn, reply }, rx)
    }

    fn committed(done: oneshot::Receiver<Result<TxnResult, ServiceError>>) {
        futures::executor::block_on(done).unwrap().unwrap().unwrap();
    }

    /// After a group with company the writer lingers, and a write arriving meanwhile shares
    /// the next group's commit; after a lone write it does not, and the next write is committed
    /// at once, alone (the one arriving 50 ms behind it gets a group of its own).
    #[test]
    fn the_writer_lingers_only_under_load() {
        let d = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FjallStore::open(d.path(), DataKey::new(&[5; 32]), 8 << 20).unwrap());
        let (tx, rx) = bounded::<Write>(64);
        let stats = Arc::new(CommitStats::default());
        let send = |key: &str| {
            let (w, done) = put(key);
            tx.try_send(w).map_err(|_| "full").unwrap();
            done
        };
        // Two writes, the second 50 ms behind the first; both committed.
        let apart = |a: &str, b: &str| {
            let first = send(a);
            std::thread::sleep(Duration::from_millis(50));
            let second = send(b);
            committed(first);
            committed(second);
        };
        let groups = || stats.groups.load(Ordering::Relaxed);
        // Three writes queued before the writer starts: one group of three.
        let first: Vec<_> = ["a", "b", "c"].into_iter().map(send).collect();
        let writer_thread = {
            let (store, stats) = (store.clone(), stats.clone());
            std::thread::spawn(move || writer(store, rx, stats, 64, Duration::from_millis(300), &std::sync::Mutex::new(())))
        };
        for done in first {
            committed(done);
        }
        assert_eq!(groups(), 1);
        // Under load: the writer lingers 300 ms, so `e`, 50 ms behind `d`, shares its group.
        apart("d", "e");
        assert_eq!(groups(), 2, "a write arriving during the linger shares the group");
        // A lone write (still after a group of two: lingers, then commits alone)…
        committed(send("f"));
        assert_eq!(groups(), 3);
        // …after which the writer does not linger: `g` is committed before `h` arrives.
        apart("g", "h");
        assert_eq!((groups(), stats.txns.load(Ordering::Relaxed)), (5, 8), "no linger after a lone write");
        drop(tx);
        writer_thread.join().unwrap();
    }
}
