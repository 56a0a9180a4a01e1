//! The store's rules, checked on any [`Store`]: the fjall store (tests/store.rs) and the etcd
//! store (tests/etcd.rs) must both keep them.
#![allow(dead_code)]

use dps_storage::{by_group_key, Expect, Op, Record, Store, Table, Txn, TxnError};

pub fn rec(etag: &str, class: u8, body: &str) -> Record {
    Record { etag: etag.into(), class, body: body.as_bytes().to_vec() }
}

pub fn put(t: Table, k: &str, r: Record, expect: Expect, quota: Option<u64>) -> Txn {
    Txn::one(Op::Put { table: t, key: k.into(), record: r, expect, quota })
}

/// Every rule, each on a new empty store from `fresh`.
pub fn all(fresh: &dyn Fn() -> Box<dyn Store>) {
    preconditions_within_and_across_groups(&*fresh());
    failed_transaction_leaves_nothing_behind(&*fresh());
    the_store_keeps_the_by_group_index_with_the_registration_records(&*fresh());
    scan_pages_by_prefix(&*fresh());
    quotas_and_counts(&*fresh());
}

pub fn quotas_and_counts(s: &dyn Store) {
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
    assert_eq!(s.count(Table::Groups, 2), 1);
}

pub fn preconditions_within_and_across_groups(s: &dyn Store) {
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

pub fn failed_transaction_leaves_nothing_behind(s: &dyn Store) {
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

pub fn the_store_keeps_the_by_group_index_with_the_registration_records(s: &dyn Store) {
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

pub fn scan_pages_by_prefix(s: &dyn Store) {
    let txns = ["a1", "a2", "a3", "b1"].iter().map(|k| put(Table::Enrollments, k, rec("\"e\"", 0, k), Expect::Absent, None)).collect();
    s.commit(txns).unwrap();
    let p1 = s.scan(Table::Enrollments, "a", None, 2).unwrap();
    assert_eq!(p1.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a1", "a2"]);
    let p2 = s.scan(Table::Enrollments, "a", Some("a2"), 2).unwrap();
    assert_eq!(p2.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a3"]);
    assert_eq!(s.scan(Table::Enrollments, "", None, 10).unwrap().len(), 4);
}
