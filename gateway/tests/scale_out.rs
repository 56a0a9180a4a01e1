#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Two gateway nodes on one 3-member etcd cluster are one service: the second joins the first's
//! instance (ID scope, policies, development CA), devices are provisioned through either, a
//! change made on one is obeyed on the other, and two nodes racing for one registration id
//! make one registration state.

mod common;

use common::etcd::Cluster;
use common::*;
use serde_json::json;
use std::time::Duration;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

fn node_config(etcd: &Cluster) -> dps_gateway::config::Config {
    let mut c = test_config();
    c.store.kind = "etcd".into();
    c.store.etcd_endpoints = etcd.clients.clone();
    c.store.etcd_root = "/scale-out".into();
    c.linked_hubs.push(hub("hub-a.example"));
    c
}

fn register(node: &TestServer, id: &str, key: &str) -> serde_json::Value {
    let op = https_register(node, id, key, &format!(r#"{{"registrationId":"{id}"}}"#));
    https_poll(node, id, key, &op, Duration::from_secs(20))
}

#[test]
fn two_nodes_on_one_etcd_cluster_are_one_service() {
    let etcd = Cluster::start(3);
    let a = TestServer::start(node_config(&etcd));
    // The second node gets the first's data key (as an operator copies data.key).
    let dir_b = tempfile::tempdir().unwrap();
    std::fs::copy(a.dir.path().join("data.key"), dir_b.path().join("data.key")).unwrap();
    let b = TestServer::start_in(dir_b, node_config(&etcd));

    // One instance: scope, owner policy, CA.
    assert_eq!(a.ep.id_scope, b.ep.id_scope);
    assert_eq!(a.ep.service_connection_string, b.ep.service_connection_string);
    let ca = |n: &TestServer| std::fs::read(n.ep.ca_certificate.as_ref().unwrap()).unwrap();
    assert_eq!(ca(&a), ca(&b), "devices trust one CA whichever node they reach");

    // Enrolled on A, provisioned through B; the state is read on A.
    a.put_enrollment("dev-1", KEY, KEY2, json!({}));
    let done = register(&b, "dev-1", KEY);
    assert_eq!(done["status"], "assigned", "{done}");
    let (st, state) = status_json(a.send("GET", "/registrations/dev-1", None));
    assert_eq!((st, state["status"].as_str()), (200, Some("assigned")), "{state}");

    // Disabled on B: A obeys at once (enrollments are read through with a shared store).
    b.put_enrollment("dev-1", KEY, KEY2, json!({"provisioningStatus": "disabled"}));
    assert_eq!(register(&a, "dev-1", KEY)["status"], "disabled");
    // Enabled on A: B obeys at once.
    a.put_enrollment("dev-1", KEY, KEY2, json!({"provisioningStatus": "enabled"}));
    assert_eq!(register(&b, "dev-1", KEY)["status"], "assigned");

    // A group made on B admits its devices on A, once A's change watch has seen it (ms).
    let group = json!({"enrollmentGroupId": "line-1", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY2}}});
    assert_eq!(b.send("PUT", "/enrollmentGroups/line-1", Some(group)).status().as_u16(), 200);
    let device_key = dps_core::sas::derive_device_key(&base64_decode(KEY), "line-1-dev");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let admitted = loop {
        let url =
            format!("https://localhost:{}/{}/registrations/line-1-dev/register?api-version=2019-03-31", a.ep.ports.https, a.ep.id_scope);
        let token = mqtt_client::device_token(&a.ep.id_scope, "line-1-dev", &device_key);
        let r = a.client.put(url).header("Authorization", token).body(r#"{"registrationId":"line-1-dev"}"#).send().unwrap();
        if r.status().as_u16() == 202 || std::time::Instant::now() > deadline {
            break r.status().as_u16();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(admitted, 202, "A never saw the group made on B");

    // Racing: both nodes register the same new device at once, many times over; one state.
    a.put_enrollment("racer", KEY, KEY2, json!({}));
    let threads: Vec<_> = [&a, &b]
        .iter()
        .flat_map(|n| {
            let (port, scope, ca) = (n.ep.ports.https, n.ep.id_scope.clone(), n.ep.ca_certificate.clone().unwrap());
            (0..3).map(move |_| {
                let (scope, ca) = (scope.clone(), ca.clone());
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .use_rustls_tls()
                        .tls_built_in_root_certs(false)
                        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
                        .build()
                        .unwrap();
                    let url = format!("https://localhost:{port}/{scope}/registrations/racer/register?api-version=2019-03-31");
                    let token = mqtt_client::device_token(&scope, "racer", KEY);
                    client.put(url).header("Authorization", token).body(r#"{"registrationId":"racer"}"#).send().unwrap().status().as_u16()
                })
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 202 || *s == 429), "{statuses:?}");
    let after_a = register(&a, "racer", KEY);
    let after_b = register(&b, "racer", KEY);
    assert_eq!(after_a["status"], "assigned", "{after_a}");
    assert_eq!(after_a["registrationState"]["deviceId"], after_b["registrationState"]["deviceId"]);
    assert_eq!(after_a["registrationState"]["assignedHub"], after_b["registrationState"]["assignedHub"]);
    let (_, list) = status_json(a.send("GET", "/registrations/racer", None));
    assert_eq!(list["registrationId"], "racer");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
