#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
use dps_storage::{by_group_key, DataKey, Expect, FjallStore, Op, Record, Store, Table, Txn, TxnError};
use std::path::Path;

fn open(dir: &Path) -> FjallStore {
    FjallStore::open(dir, DataKey::new(&[3; 32]), 8 << 20).unwrap()
}

fn rec(etag: &str, class: u8, body: &str) -> Record {
    Record { etag: etag.into(), class, body: body.as_bytes().to_vec() }
}

fn put(t: Table, k: &str, r: Record, expect: Expect, quota: Option<u64>) -> Txn {
    Txn::one(Op::Put { table: t, key: k.into(), record: r, expect, quota })
}

#[test]
fn preconditions_within_and_across_groups() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let r = s
        .commit(vec![
            put(Table::Enrollments, "a", rec("\"1\"", 0, "one"), Expect::Absent, None),
            put(Table::Enrollments, "a", rec("\"2\"", 0, "two"), Expect::Absent, None),
            put(Table::Enrollments, "a", rec("\"3\"", 0, "three"), Expect::Etag("\"1\"".into()), None),
            put(Table::Enrollments, "b", rec("\"1\"", 0, "b"), Expect::Etag("*".into()), None),
            Txn::one(Op::Delete { table: Table::Enrollments, key: "zz".into(), expect: Expect::Present }),
        ])
        .unwrap();
    assert!(r[0].is_ok());
    assert_eq!(r[1], Err(TxnError::Conflict));
    assert_eq!(r[2].as_ref().unwrap()[0].as_ref().unwrap().body, b"one");
    assert_eq!(r[3], Err(TxnError::NotFound));
    assert_eq!(r[4], Err(TxnError::NotFound));
    assert_eq!(s.get(Table::Enrollments, "a").unwrap().unwrap().body, b"three");
    let r = s.commit(vec![put(Table::Enrollments, "a", rec("\"4\"", 0, "x"), Expect::Etag("\"1\"".into()), None)]).unwrap();
    assert_eq!(r[0], Err(TxnError::PreconditionFailed));
}

#[test]
fn failed_transaction_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let txn = Txn {
        ops: vec![
            Op::Put {
                table: Table::Registrations,
                key: "r1".into(),
                record: rec("\"1\"", 0, r#"{"_enrollmentGroupId":"g"}"#),
                expect: Expect::Any,
                quota: None,
            },
            Op::Delete { table: Table::Enrollments, key: "missing".into(), expect: Expect::Present },
        ],
    };
    assert_eq!(s.commit(vec![txn]).unwrap()[0], Err(TxnError::NotFound));
    assert!(s.get(Table::Registrations, "r1").unwrap().is_none());
    assert!(s.scan(Table::RegistrationsByGroup, &by_group_key("g", ""), None, 10).unwrap().is_empty());
    assert_eq!(s.count(Table::Registrations, 0), 0);
}

#[test]
fn the_store_keeps_the_by_group_index_with_the_registration_records() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let entries = |g: &str| -> Vec<String> {
        s.scan(Table::RegistrationsByGroup, &by_group_key(g, ""), None, 10).unwrap().into_iter().map(|(k, _)| k).collect()
    };
    let state = |g: Option<&str>| match g {
        Some(g) => format!(r#"{{"registrationId":"r1","status":"assigned","_enrollmentGroupId":"{g}"}}"#),
        None => r#"{"registrationId":"r1","status":"assigned"}"#.to_string(),
    };
    let write = |g: Option<&str>| put(Table::Registrations, "r1", rec("\"e\"", 0, &state(g)), Expect::Any, None);
    assert!(s.commit(vec![write(Some("G1"))]).unwrap()[0].is_ok());
    assert_eq!(entries("g1"), [by_group_key("g1", "r1")]);
    // Re-registered through another group: the entry moves; then through none: it goes.
    assert!(s.commit(vec![write(Some("g2"))]).unwrap()[0].is_ok());
    assert!(entries("g1").is_empty());
    assert_eq!(entries("g2").len(), 1);
    assert!(s.commit(vec![write(None)]).unwrap()[0].is_ok());
    assert!(entries("g2").is_empty());
    assert!(s.commit(vec![write(Some("g2"))]).unwrap()[0].is_ok());
    let del = Txn::one(Op::Delete { table: Table::Registrations, key: "r1".into(), expect: Expect::Present });
    assert!(s.commit(vec![del]).unwrap()[0].is_ok());
    assert!(entries("g2").is_empty(), "deleting the record drops its entry");
}

#[test]
fn quotas_and_counts_survive_reopen() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = open(d.path());
        let txns = (0..5).map(|i| put(Table::Groups, &format!("g{i}"), rec("\"e\"", 1, "g"), Expect::Absent, Some(3))).collect();
        let r = s.commit(txns).unwrap();
        assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 3);
        assert_eq!(r[3], Err(TxnError::QuotaExceeded));
        // Another class has its own count.
        assert!(s.commit(vec![put(Table::Groups, "x", rec("\"e\"", 2, "g"), Expect::Absent, Some(3))]).unwrap()[0].is_ok());
        // Updating an existing record does not count against the quota.
        assert!(s.commit(vec![put(Table::Groups, "g0", rec("\"f\"", 1, "g"), Expect::Any, Some(3))]).unwrap()[0].is_ok());
        assert!(s.commit(vec![Txn::one(Op::Delete { table: Table::Groups, key: "g1".into(), expect: Expect::Any })]).unwrap()[0].is_ok());
        assert_eq!(s.count(Table::Groups, 1), 2);
    }
    let s = open(d.path());
    assert_eq!(s.count(Table::Groups, 1), 2);
    assert_eq!(s.count(Table::Groups, 2), 1);
}

#[test]
fn scan_pages_by_prefix() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let txns = ["a1", "a2", "a3", "b1"].iter().map(|k| put(Table::Enrollments, k, rec("\"e\"", 0, k), Expect::Absent, None)).collect();
    s.commit(txns).unwrap();
    let p1 = s.scan(Table::Enrollments, "a", None, 2).unwrap();
    assert_eq!(p1.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a1", "a2"]);
    let p2 = s.scan(Table::Enrollments, "a", Some("a2"), 2).unwrap();
    assert_eq!(p2.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a3"]);
    assert_eq!(s.scan(Table::Enrollments, "", None, 10).unwrap().len(), 4);
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
