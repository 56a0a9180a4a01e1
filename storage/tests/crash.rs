#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Kills a writer process with SIGKILL in the middle of a stream of writes and checks that every
//! acknowledged write is present and intact after restart.

use dps_storage::{DataKey, FjallStore, Store, Table};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn acknowledged_writes_survive_sigkill() {
    for round in 0..3 {
        let d = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_writer")).arg(d.path()).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked: Option<u64> = None;
        let kill_after = 2_000 + round * 1_500;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let n: u64 = line.strip_prefix("ack ").unwrap().parse().unwrap();
            acked = Some(n);
            if n >= kill_after {
                break;
            }
        }
        // SIGKILL: no destructors, no flush.
        child.kill().unwrap();
        child.wait().unwrap();
        let acked = acked.expect("the writer acknowledged something");
        let s = FjallStore::open(d.path(), DataKey::new(&[7; 32]), 16 << 20).unwrap();
        for i in 0..=acked {
            let r = s.get(Table::Enrollments, &format!("dev{i:08}")).unwrap().unwrap_or_else(|| panic!("acknowledged write {i} lost"));
            assert_eq!(r.etag, format!("\"{i}\""));
            assert!(String::from_utf8(r.body).unwrap().starts_with(&format!("{{\"n\":{i},")));
        }
        // Everything present, acknowledged or not, decrypts and is whole.
        let all = s.scan(Table::Enrollments, "", None, usize::MAX).unwrap();
        assert!(all.len() as u64 > acked);
        for (k, r) in all {
            let n: u64 = k.strip_prefix("dev").unwrap().parse().unwrap();
            assert_eq!(r.etag, format!("\"{n}\""));
        }
        assert!(s.count(Table::Enrollments, 0) as u64 > acked);
    }
}
