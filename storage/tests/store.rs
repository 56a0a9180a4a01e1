#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
use dps_storage::{DataKey, Expect, FjallStore, Store, Table, Txn};
use std::path::Path;

fn open(dir: &Path) -> FjallStore {
    FjallStore::open(dir, DataKey::new(&[3; 32]), 8 << 20).unwrap()
}

#[path = "common/semantics.rs"]
mod semantics;
use semantics::{put, rec};

#[test]
fn the_store_rules() {
    let dirs = std::cell::RefCell::new(Vec::new());
    semantics::all(&|| {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        dirs.borrow_mut().push(d);
        Box::new(s)
    });
}

#[test]
fn quotas_and_counts_survive_reopen() {
    let d = tempfile::tempdir().unwrap();
    semantics::quotas_and_counts(&open(d.path()));
    let s = open(d.path());
    assert_eq!(s.count(Table::Groups, 1), 2);
    assert_eq!(s.count(Table::Groups, 2), 1);
}

#[test]
fn raw_files_do_not_contain_secrets() {
    let d = tempfile::tempdir().unwrap();
    let secret = "c2VjcmV0LWtleS1tYXRlcmlhbC1ub3QtdG8tbGVhaw==";
    {
        let s = open(d.path());
        let body = format!(r#"{{"attestation":{{"symmetricKey":{{"primaryKey":"{secret}"}}}}}}"#);
        s.commit(vec![put(Table::Enrollments, "dev", rec("\"e\"", 0, &body), Expect::Absent, None)]).unwrap();
        s.flush().unwrap();
        assert!(String::from_utf8(s.get(Table::Enrollments, "dev").unwrap().unwrap().body).unwrap().contains(secret));
    }
    let mut files = 0;
    let mut stack = vec![d.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                let bytes = std::fs::read(e.path()).unwrap();
                assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "secret found in {:?}", e.path());
                assert!(!bytes.windows(16).any(|w| w == &b"c2VjcmV0LWtleS1t"[..]), "part of the secret in {:?}", e.path());
            }
        }
    }
    assert!(files > 0);
}

#[test]
fn another_data_key_cannot_read() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = open(d.path());
        s.commit(vec![put(Table::Enrollments, "dev", rec("\"e\"", 0, "x"), Expect::Absent, None)]).unwrap();
    }
    let s = FjallStore::open(d.path(), DataKey::new(&[4; 32]), 8 << 20).unwrap();
    assert!(s.get(Table::Enrollments, "dev").is_err());
}

#[test]
fn reseal_moves_every_value_even_when_the_new_keys_id_is_the_old_ones() {
    // Regression: key ids are one byte and a rotation trusted them, so a new key whose id
    // matched the old key's (one in 256) re-sealed nothing, and the old key's removal then
    // left every value unreadable (a CI run of `dps rotate-data-key` said "Re-sealed 0").
    let old = [3; 32];
    let new = (0u8..=255)
        .map(|n| {
            let mut k = [9u8; 32];
            k[0] = n;
            k
        })
        .chain((0u8..=255).map(|n| [n; 32]))
        .find(|k| *k != old && DataKey::id_of(k) == DataKey::id_of(&old))
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    {
        let s = open(d.path());
        s.commit(vec![put(Table::Enrollments, "dev", rec("\"e\"", 0, "secret"), Expect::Absent, None)]).unwrap();
    }
    {
        let s = FjallStore::open(d.path(), DataKey::ring(&[new, old]), 8 << 20).unwrap();
        assert_eq!(s.reseal().unwrap(), 1);
        assert_eq!(s.reseal().unwrap(), 0);
    }
    let s = FjallStore::open(d.path(), DataKey::new(&new), 8 << 20).unwrap();
    assert_eq!(s.get(Table::Enrollments, "dev").unwrap().unwrap().body, b"secret");
}

#[test]
fn reseal_moves_every_value_to_the_new_key() {
    let d = tempfile::tempdir().unwrap();
    let (old, new) = ([3; 32], [4; 32]);
    {
        let s = open(d.path());
        // More than one re-seal batch in one table, and values in several tables.
        let txns: Vec<Txn> =
            (0..2_500).map(|i| put(Table::Registrations, &format!("r{i:05}"), rec("\"e\"", 1, "x"), Expect::Absent, None)).collect();
        s.commit(txns).unwrap();
        s.commit(vec![put(Table::Enrollments, "dev", rec("\"e\"", 0, "secret"), Expect::Absent, None)]).unwrap();
    }
    {
        let s = FjallStore::open(d.path(), DataKey::ring(&[new, old]), 8 << 20).unwrap();
        assert_eq!(s.get(Table::Enrollments, "dev").unwrap().unwrap().body, b"secret");
        assert_eq!(s.reseal().unwrap(), 2_501);
        assert_eq!(s.reseal().unwrap(), 0, "a second run finds nothing left");
        assert_eq!(s.count(Table::Registrations, 1), 2_500, "the counters are untouched");
    }
    // The old key can go: the new one alone reads everything.
    let s = FjallStore::open(d.path(), DataKey::new(&new), 8 << 20).unwrap();
    assert_eq!(s.get(Table::Enrollments, "dev").unwrap().unwrap().body, b"secret");
    assert_eq!(s.scan(Table::Registrations, "", None, usize::MAX).unwrap().len(), 2_500);
    drop(s);
    let s = FjallStore::open(d.path(), DataKey::new(&old), 8 << 20).unwrap();
    assert!(s.get(Table::Enrollments, "dev").is_err());
}
