//! Test helper for the crash-recovery test: commits a stream of writes through the
//! [`StoreService`] (many in flight at once, so group commit is exercised) and prints
//! `ack {n} {inline commits so far}` once write `n` is acknowledged. The test kills it with SIGKILL mid-stream.
//! Write `n` is one transaction of two puts (an enrollment and a registration state, whose
//! group the store also indexes), so a crash must keep or lose all three keys together.

use dps_storage::{DataKey, Expect, FjallStore, Op, Record, StoreService, StoreServiceConfig, Table, Txn};
use std::io::Write;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: crash_writer DIR [inline]")?;
    // `inline`: one transaction at a time, each committed on this thread (the path a shard
    // takes when the store is idle, `inline_commit_max_us`); otherwise 64 at a time through
    // the writer thread's group commit.
    let inline = std::env::args().nth(2).as_deref() == Some("inline");
    let store = FjallStore::open(std::path::Path::new(&dir), DataKey::new(&[7; 32]), 16 << 20)?;
    let cfg = StoreServiceConfig { inline_commit_max_us: if inline { u64::MAX } else { 0 }, ..StoreServiceConfig::default() };
    let (svc, _threads) = StoreService::start(Arc::new(store), &cfg);
    let mut out = std::io::stdout().lock();
    let mut n: u64 = 0;
    loop {
        let batch = if inline { 1 } else { 64 };
        let results = match inline {
            true => {
                // A pause, as a shard's commits at partial load have: back-to-back commits
                // go to the writer's group commit instead.
                std::thread::sleep(std::time::Duration::from_millis(10));
                vec![futures::executor::block_on(svc.commit(write(n)))]
            }
            false => futures::executor::block_on(svc.commit_many((n..n + batch).map(write).collect())),
        };
        for r in results {
            r?.map_err(|e| format!("write {n} refused: {e:?}"))?;
            // With the count of inline commits so far, so the test knows the path was taken.
            writeln!(out, "ack {n} {}", svc.stats.inline_txns.load(std::sync::atomic::Ordering::Relaxed))?;
            n += 1;
        }
        out.flush()?;
    }
}

/// Write `i`: an enrollment and a registration state (which the store indexes by group).
fn write(i: u64) -> Txn {
    let put = |table, etag: String, body: String| Op::Put {
        table,
        key: format!("dev{i:08}"),
        record: Record { etag, class: 0, body: body.into_bytes() },
        expect: Expect::Absent,
        quota: None,
    };
    Txn {
        ops: vec![
            put(Table::Enrollments, format!("\"{i}\""), format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(200))),
            put(Table::Registrations, format!("\"r{i}\""), format!("{{\"n\":{i},\"_enrollmentGroupId\":\"g{}\"}}", i % 7)),
        ],
    }
}
