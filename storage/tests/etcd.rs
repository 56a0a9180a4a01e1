#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The etcd store against a real etcd cluster (Debian's etcd-server; three members on loopback,
//! started here): the store's rules, two nodes racing, secrets sealed, a member lost under load.

#[path = "common/etcd_cluster.rs"]
mod etcd_cluster;
#[path = "common/semantics.rs"]
mod semantics;

use dps_storage::{by_group_key, DataKey, EtcdConfig, EtcdStore, Expect, Op, Record, Store, Table, Txn, TxnError};
use etcd_cluster::{wait_for_progress, Cluster};
use semantics::{put, rec};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn config(c: &Cluster, root: &str) -> EtcdConfig {
    EtcdConfig { endpoints: c.clients.clone(), root: root.into(), ..Default::default() }
}

fn store(c: &Cluster, root: &str) -> Result<EtcdStore, dps_storage::StoreError> {
    EtcdStore::connect(&config(c, root), DataKey::new(&[7; 32]))
}

fn unique_root(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("/test-{}-{what}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[test]
fn the_store_rules_hold_on_etcd() {
    // Each test has a cluster of its own (a static one would outlive the test process).
    let c = Cluster::start(3);
    semantics::all(&|| Box::new(store(&c, &unique_root("rules")).unwrap()));
}

#[test]
fn two_nodes_racing_for_one_registration_id_make_one_record() {
    let root = unique_root("race");
    let c = Cluster::start(3);
    let (a, b) = (Arc::new(store(&c, &root).unwrap()), Arc::new(store(&c, &root).unwrap()));
    const IDS: usize = 60;
    let wins = Arc::new(AtomicUsize::new(0));
    let conflicts = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let node: Arc<EtcdStore> = if t % 2 == 0 { a.clone() } else { b.clone() };
            let (wins, conflicts) = (wins.clone(), conflicts.clone());
            std::thread::spawn(move || {
                for i in 0..IDS {
                    let body = format!(r#"{{"registrationId":"dev-{i}","_enrollmentGroupId":"g","by":{t}}}"#);
                    let txn = put(Table::Registrations, &format!("dev-{i}"), rec(&format!("\"{t}\""), 0, &body), Expect::Absent, None);
                    match node.commit(vec![txn]).unwrap().remove(0) {
                        Ok(_) => wins.fetch_add(1, Ordering::Relaxed),
                        Err(TxnError::Conflict) => conflicts.fetch_add(1, Ordering::Relaxed),
                        Err(e) => panic!("{e:?}"),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(wins.load(Ordering::Relaxed), IDS, "one create per registration id");
    assert_eq!(conflicts.load(Ordering::Relaxed), 7 * IDS);
    assert_eq!(a.count(Table::Registrations, 0), IDS as u64, "the count is exact across nodes");
    assert_eq!(b.scan(Table::RegistrationsByGroup, &by_group_key("g", ""), None, 1000).unwrap().len(), IDS);
    // An update under If-Match: of two nodes holding the same etag, one wins.
    let etag = a.get(Table::Registrations, "dev-0").unwrap().unwrap().etag;
    let upd = |who: &str| put(Table::Registrations, "dev-0", rec(&format!("\"{who}\""), 0, "{}"), Expect::Etag(etag.clone()), None);
    assert!(a.commit(vec![upd("a")]).unwrap()[0].is_ok());
    assert_eq!(b.commit(vec![upd("b")]).unwrap()[0], Err(TxnError::PreconditionFailed));
}

#[test]
fn values_leave_the_node_sealed() {
    let root = unique_root("sealed");
    let c = Cluster::start(3);
    let s = store(&c, &root).unwrap();
    let secret = "c2VjcmV0LXByaW1hcnkta2V5LW9mLXRoZS1lbnJvbGxtZW50";
    assert!(s.commit(vec![put(Table::Enrollments, "e1", rec("\"1\"", 0, secret), Expect::Absent, None)]).unwrap()[0].is_ok());
    // What etcd holds, read past the store.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let raw = rt.block_on(async {
        let mut client = etcd_client::Client::connect(&c.clients, None).await.unwrap();
        client.get(format!("{root}/t/enrollments/e1"), None).await.unwrap().kvs()[0].value().to_vec()
    });
    assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()), "the body is in etcd in the clear");
    // Another data key opens nothing.
    let other = EtcdStore::connect(&config(&c, &root), DataKey::new(&[8; 32])).unwrap();
    assert!(other.get(Table::Enrollments, "e1").is_err());
    assert_eq!(s.get(Table::Enrollments, "e1").unwrap().unwrap().body, secret.as_bytes());
}

#[test]
fn a_member_lost_under_load_loses_nothing_acknowledged() {
    let root = unique_root("lost");
    let mut c = Cluster::start(3);
    let store = Arc::new(store(&c, &root).unwrap());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (store, acked, stop) = (store.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{w}-{i}");
                    let record = Record { etag: format!("\"{i}\""), class: 0, body: key.clone().into_bytes() };
                    let txn =
                        Txn::one(Op::Put { table: Table::Enrollments, key: key.clone(), record, expect: Expect::Absent, quota: None });
                    // A write may fail while the cluster fails over; only acknowledged ones count.
                    if let Ok(r) = store.commit(vec![txn]) {
                        assert!(r[0].is_ok(), "{key}: {:?}", r[0]);
                        acked.lock().unwrap().push(key);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let before = acked.lock().unwrap().len();
    c.kill(0);
    // Writes must go on with two members of three.
    wait_for_progress(|| acked.lock().unwrap().len(), before + 20);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > before + 20, "writes went on with two members of three ({before} -> {})", acked.len());
    // Everything acknowledged is there, read through the surviving members.
    let survivors = EtcdConfig { endpoints: c.clients[1..].to_vec(), root: root.clone(), ..Default::default() };
    let reader = EtcdStore::connect(&survivors, DataKey::new(&[7; 32])).unwrap();
    for key in &acked {
        let r = reader.get(Table::Enrollments, key).unwrap();
        assert_eq!(r.map(|r| r.body), Some(key.clone().into_bytes()), "{key} was acknowledged and is gone");
    }
    // A write whose answer was lost with the member may be there unacknowledged (at most one per
    // writer); the count matches what is there either way.
    let present = reader.scan(Table::Enrollments, "", None, usize::MAX).unwrap().len();
    assert!(present >= acked.len() && present <= acked.len() + 4, "{present} records, {} acknowledged", acked.len());
    assert_eq!(reader.count(Table::Enrollments, 0), present as u64);
}

#[test]
fn many_writers_creating_distinct_records_do_not_collide() {
    // Regression: every create also rewrote one count key per table and class, which each
    // transaction pinned by its revision; with dozens of writers nearly every attempt lost that
    // race, and creates failed after their retries (500s under load). Counts are now spread
    // over many keys.
    let c = Cluster::start(3);
    let root = unique_root("busy");
    let stores: Vec<Arc<EtcdStore>> = (0..4).map(|_| Arc::new(store(&c, &root).unwrap())).collect();
    let failures = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..48)
        .map(|t| {
            let (store, failures) = (stores[t % stores.len()].clone(), failures.clone());
            std::thread::spawn(move || {
                for i in 0..25 {
                    let body = format!(r#"{{"registrationId":"d-{t}-{i}","_enrollmentGroupId":"g"}}"#);
                    let txn = put(Table::Registrations, &format!("d-{t}-{i}"), rec("\"e\"", 0, &body), Expect::Absent, Some(1_000_000));
                    match store.commit(vec![txn]) {
                        Ok(r) if r[0].is_ok() => {}
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "creates of distinct records failed");
    assert_eq!(stores[0].count(Table::Registrations, 0), 48 * 25);
}

#[test]
fn tls_with_client_certificates() {
    let c = Cluster::start_tls(3);
    let key = || DataKey::new(&[7; 32]);
    // The store's rules hold over TLS, with this node's client certificate.
    semantics::all(&|| Box::new(EtcdStore::connect(&c.config(&unique_root("tls")), key()).unwrap()));
    // The members check client certificates: without one, nothing is served.
    let mut no_certificate = c.config("/tls");
    no_certificate.tls.as_mut().unwrap().client = None;
    no_certificate.timeout = Duration::from_secs(2);
    assert!(EtcdStore::connect(&no_certificate, key()).is_err(), "served a client without a certificate");
    // A member whose certificate does not chain to the configured CA is not trusted.
    let mut other_ca = c.config("/tls");
    let mut stranger = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    stranger.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    other_ca.tls.as_mut().unwrap().ca_pem = stranger.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem().into_bytes();
    other_ca.timeout = Duration::from_secs(2);
    assert!(EtcdStore::connect(&other_ca, key()).is_err(), "trusted a member of another CA");
    // Plain text to a TLS member gets nothing.
    let mut plain = c.config("/tls");
    plain.tls = None;
    plain.endpoints = plain.endpoints.iter().map(|e| e.replace("https://", "http://")).collect();
    plain.timeout = Duration::from_secs(2);
    assert!(EtcdStore::connect(&plain, key()).is_err(), "a TLS member answered plain text");
}

#[test]
fn the_config_stamp_moves_with_groups_hubs_and_certificates_only() {
    let root = unique_root("stamp");
    let c = Cluster::start(1);
    let (a, b) = (store(&c, &root).unwrap(), store(&c, &root).unwrap());
    let mut last = b.config_stamp().unwrap();
    for (i, table) in [Table::Enrollments, Table::Groups, Table::Registrations, Table::Hubs, Table::Certificates].into_iter().enumerate() {
        let txn = put(table, &format!("k{i}"), rec("\"1\"", 0, "{}"), Expect::Absent, None);
        assert!(a.commit(vec![txn]).unwrap()[0].is_ok());
        // Read on the other node, after the write was acknowledged.
        let now = b.config_stamp().unwrap();
        assert_eq!(now > last, dps_storage::CONFIG_TABLES.contains(&table), "{table:?}: {last} -> {now}");
        last = now;
    }
    // A delete moves it too.
    assert!(
        a.commit(vec![Txn { ops: vec![Op::Delete { table: Table::Groups, key: "k1".into(), expect: Expect::Any }] }]).unwrap()[0].is_ok()
    );
    assert!(b.config_stamp().unwrap() > last);
}

#[test]
fn etcd_authentication_is_used_when_configured() {
    let c = Cluster::start(1);
    // Authentication turned on as an operator would: a root user, then a user of our own whose
    // role may read and write the instance's prefix only.
    let root = "/auth-dps";
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut admin = etcd_client::Client::connect(&c.clients, None).await.unwrap();
        let _ = admin.role_add("root").await;
        admin.user_add("root", "root-password", None).await.unwrap();
        admin.user_grant_role("root", "root").await.unwrap();
        admin.role_add("dps").await.unwrap();
        admin.role_grant_permission("dps", etcd_client::Permission::read_write(format!("{root}/")).with_prefix()).await.unwrap();
        admin.user_add("dps", "dps-password", None).await.unwrap();
        admin.user_grant_role("dps", "dps").await.unwrap();
        admin.auth_enable().await.unwrap();
    });
    let with_user = |user: Option<(&str, &str)>, root: &str| {
        let cfg =
            EtcdConfig { user: user.map(|(u, p)| (u.to_string(), p.to_string())), timeout: Duration::from_secs(3), ..config(&c, root) };
        EtcdStore::connect(&cfg, DataKey::new(&[7; 32]))
    };
    let s = with_user(Some(("dps", "dps-password")), root).unwrap();
    assert!(s.commit(vec![put(Table::Enrollments, "e1", rec("\"1\"", 0, "{}"), Expect::Absent, None)]).unwrap()[0].is_ok());
    assert!(s.get(Table::Enrollments, "e1").unwrap().is_some());
    assert!(with_user(None, root).is_err(), "served without credentials");
    assert!(with_user(Some(("dps", "wrong")), root).is_err(), "served with a wrong password");
    assert!(with_user(Some(("dps", "dps-password")), "/someone-else").is_err(), "served outside the role's prefix");
}
