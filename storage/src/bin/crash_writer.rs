//! Test helper for the crash-recovery test: commits a stream of writes through the
//! [`StoreService`] (many in flight at once, so group commit is exercised) and prints
//! `ack {n}` once write `n` is acknowledged. The test kills it with SIGKILL mid-stream.
//! Write `n` is one transaction of two puts (an enrollment and a registration state, whose
//! group the store also indexes), so a crash must keep or lose all three keys together.

use dps_storage::{DataKey, Expect, FjallStore, Op, Record, StoreService, StoreServiceConfig, Table, Txn};
use std::io::Write;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: crash_writer DIR")?;
    let store = FjallStore::open(std::path::Path::new(&dir), DataKey::new(&[7; 32]), 16 << 20)?;
    let (svc, _threads) = StoreService::start(Arc::new(store), &StoreServiceConfig::default());
    let mut out = std::io::stdout().lock();
    let mut n: u64 = 0;
    loop {
        let batch: Vec<Txn> = (n..n + 64)
            .map(|i| Txn {
                ops: vec![
                    Op::Put {
                        table: Table::Enrollments,
                        key: format!("dev{i:08}"),
                        record: Record {
                            etag: format!("\"{i}\""),
                            class: 0,
                            body: format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(200)).into_bytes(),
                        },
                        expect: Expect::Absent,
                        quota: None,
                    },
                    Op::Put {
                        table: Table::Registrations,
                        key: format!("dev{i:08}"),
                        record: Record {
                            etag: format!("\"r{i}\""),
                            class: 0,
                            body: format!("{{\"n\":{i},\"_enrollmentGroupId\":\"g{}\"}}", i % 7).into_bytes(),
                        },
                        expect: Expect::Absent,
                        quota: None,
                    },
                ],
            })
            .collect();
        let results = futures::executor::block_on(svc.commit_many(batch));
        for r in results {
            r?.map_err(|e| format!("write {n} refused: {e:?}"))?;
            writeln!(out, "ack {n}")?;
            n += 1;
        }
        out.flush()?;
    }
}
