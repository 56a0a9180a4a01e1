#![allow(clippy::unwrap_used)]
//! The store service's commit paths: on the writer thread, or on the caller's thread when the
//! store is idle and quick (`inline_commit_max_us`).

use dps_storage::{DataKey, Expect, FjallStore, Op, Record, StoreService, StoreServiceConfig, Table, Txn};
use futures::executor::block_on;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

fn service(dir: &std::path::Path, inline_commit_max_us: u64) -> (StoreService, dps_storage::StoreThreads) {
    let store = FjallStore::open(dir, DataKey::new(&[5; 32]), 8 << 20).unwrap();
    StoreService::start(Arc::new(store), &StoreServiceConfig { inline_commit_max_us, ..StoreServiceConfig::default() })
}

fn put(key: &str, body: &str, etag: &str, expect: Expect) -> Txn {
    let record = Record { etag: etag.into(), class: 0, body: body.as_bytes().to_vec() };
    Txn::one(Op::Put { table: Table::Registrations, key: key.into(), record, expect, quota: None })
}

/// Commits puts `k0`…`k{n-1}`, each after `pause`; then (transactions, of them inline).
fn commit_keys(svc: &StoreService, n: usize, pause: std::time::Duration) -> (u64, u64) {
    for i in 0..n {
        std::thread::sleep(pause);
        block_on(svc.commit(put(&format!("k{i}"), "v", &format!("e{i}"), Expect::Any))).unwrap().unwrap();
    }
    (svc.stats.txns.load(Relaxed), svc.stats.inline_txns.load(Relaxed))
}

#[test]
fn commits_run_inline_only_when_enabled_and_quick() {
    use std::time::Duration;
    // Off: every commit goes through the writer thread.
    let d = tempfile::tempdir().unwrap();
    let (svc, threads) = service(d.path(), 0);
    assert_eq!(commit_keys(&svc, 5, Duration::ZERO), (5, 0));
    drop(svc);
    threads.join().unwrap();

    // On, one caller at a time: each commit runs on the caller's thread, durably (read back
    // after a reopen).
    let d = tempfile::tempdir().unwrap();
    let (svc, threads) = service(d.path(), 10_000_000);
    assert_eq!(commit_keys(&svc, 5, Duration::from_millis(10)), (5, 5));
    // Preconditions hold on this path too.
    let stale = block_on(svc.commit(put("k0", "w", "x", Expect::Etag("nope".into())))).unwrap();
    assert_eq!(stale, Err(dps_storage::TxnError::PreconditionFailed));
    assert_eq!((svc.stats.txns.load(Relaxed), svc.stats.inline_txns.load(Relaxed)), (6, 6));
    drop(svc);
    threads.join().unwrap();
    let (svc, threads) = service(d.path(), 0);
    for i in 0..5 {
        assert_eq!(block_on(svc.get(Table::Registrations, &format!("k{i}"))).unwrap().unwrap().body, b"v");
    }
    drop(svc);
    threads.join().unwrap();

    // On, but commits come back to back (one shard under load): the store is busy more than
    // an eighth of the time, and they go to the writer thread, whose group commit can share
    // an fsync between shards, once the idle average has caught up with the load.
    let d = tempfile::tempdir().unwrap();
    let (svc, threads) = service(d.path(), 10_000_000);
    let (_, inline) = commit_keys(&svc, 200, Duration::ZERO);
    assert!(inline > 0 && inline < 60, "{inline} of 200 back-to-back commits inline");
    drop(svc);
    threads.join().unwrap();

    // On, but commits take longer than allowed (1 µs: an fsync never does): after the first,
    // whose latency is not known yet, they go back to the writer thread.
    let d = tempfile::tempdir().unwrap();
    let (svc, threads) = service(d.path(), 1);
    assert_eq!(commit_keys(&svc, 5, Duration::ZERO), (5, 1));
    drop(svc);
    threads.join().unwrap();
}

/// A caller that says its thread has little else to do commits on it even when commits come
/// back to back (the store busy): the same 200 commits that mostly went to the writer above
/// all run inline. Still never while recent commits were slow, nor with inline commits off.
#[test]
fn a_lightly_loaded_caller_commits_inline_while_the_store_is_busy() {
    let light = |svc: &StoreService, n: usize| {
        for i in 0..n {
            block_on(svc.commit_from_light_caller(put(&format!("k{i}"), "v", &format!("e{i}"), Expect::Any))).unwrap().unwrap();
        }
        (svc.stats.txns.load(Relaxed), svc.stats.inline_txns.load(Relaxed))
    };
    let d = tempfile::tempdir().unwrap();
    let (svc, threads) = service(d.path(), 10_000_000);
    assert_eq!(light(&svc, 200), (200, 200));
    drop(svc);
    threads.join().unwrap();

    let d = tempfile::tempdir().unwrap();
    let (svc, threads) = service(d.path(), 1);
    assert_eq!(light(&svc, 5), (5, 1), "after the first, commits are known to take over 1 µs");
    drop(svc);
    threads.join().unwrap();

    let d = tempfile::tempdir().unwrap();
    let (svc, threads) = service(d.path(), 0);
    assert_eq!(light(&svc, 5), (5, 0));
    drop(svc);
    threads.join().unwrap();
}

/// Callers on several threads, some committing inline and some through the writer: a
/// compare-and-swap counter counts every increment it acknowledged exactly once.
#[test]
fn inline_and_writer_commits_are_one_serial_order() {
    let d = tempfile::tempdir().unwrap();
    let (svc, threads) = service(d.path(), 10_000_000);
    block_on(svc.commit(put("n", "0", "e0", Expect::Absent))).unwrap().unwrap();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let svc = svc.clone();
            std::thread::spawn(move || {
                let mut acknowledged = 0;
                for i in 0..50 {
                    loop {
                        let cur = block_on(svc.get(Table::Registrations, "n")).unwrap().unwrap();
                        let n: u64 = String::from_utf8(cur.body).unwrap().parse().unwrap();
                        let next = put("n", &(n + 1).to_string(), &format!("e{w}-{i}"), Expect::Etag(cur.etag));
                        if block_on(svc.commit(next)).unwrap().is_ok() {
                            acknowledged += 1;
                            break;
                        }
                    }
                }
                acknowledged
            })
        })
        .collect();
    let acknowledged: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let last = block_on(svc.get(Table::Registrations, "n")).unwrap().unwrap();
    assert_eq!(acknowledged, 200);
    assert_eq!(String::from_utf8(last.body).unwrap(), "200");
    assert!(svc.stats.inline_txns.load(Relaxed) > 0);
    drop(svc);
    threads.join().unwrap();
}
