#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Two gateway nodes on one 3-member etcd cluster are one service: the second joins the first's
//! instance (ID scope, policies, development CA), devices are provisioned through either, a
//! change made on one is obeyed on the other, and two nodes racing for one registration id
//! make one registration state.

mod common;

use common::etcd::{wait_for_progress, Cluster};
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
    // The tests register one device many times in a row.
    c.limits.polls_per_device = 0;
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

    // A group made on B admits its devices on A at once: the config stamp moved with the
    // change, and A reads it before using its copy of the groups (the change watch alone
    // leaves a window of milliseconds). Then the group is disabled and enabled again on B,
    // ten times over, each change obeyed by A's very next registration.
    let group = |status: &str| {
        json!({"enrollmentGroupId": "line-1", "provisioningStatus": status, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY2}}})
    };
    assert_eq!(b.send("PUT", "/enrollmentGroups/line-1", Some(group("enabled"))).status().as_u16(), 200);
    let device_key = dps_core::sas::derive_device_key(&base64_decode(KEY), "line-1-dev");
    let url = format!("https://localhost:{}/{}/registrations/line-1-dev/register?api-version=2019-03-31", a.ep.ports.https, a.ep.id_scope);
    let token = mqtt_client::device_token(&a.ep.id_scope, "line-1-dev", &device_key);
    let r = a.client.put(&url).header("Authorization", &token).body(r#"{"registrationId":"line-1-dev"}"#).send().unwrap();
    assert_eq!(r.status().as_u16(), 202, "A did not see the group just made on B");
    for round in 0..10 {
        for status in ["disabled", "enabled"] {
            let r = b.req("PUT", "/enrollmentGroups/line-1").header("If-Match", "*").body(group(status).to_string()).send().unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let expected = if status == "disabled" { "disabled" } else { "assigned" };
            let seen = register(&a, "line-1-dev", &device_key);
            assert_eq!(seen["status"], expected, "round {round}: the group {status} on B, A answered {seen}");
        }
    }

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

/// A device's HTTPS registration through `port`, start to end; its assignment (device id, hub)
/// or why not (the node unreachable or answering an error).
fn provision(client: &reqwest::blocking::Client, port: u16, scope: &str, id: &str, key: &str) -> Result<(String, String), String> {
    let token = mqtt_client::device_token(scope, id, key);
    let base = format!("https://localhost:{port}/{scope}/registrations/{id}");
    let r = client
        .put(format!("{base}/register?api-version=2019-03-31"))
        .header("Authorization", &token)
        .body(format!(r#"{{"registrationId":"{id}"}}"#))
        .send()
        .map_err(|e| e.to_string())?;
    if r.status().as_u16() != 202 {
        return Err(format!("register answered {}", r.status()));
    }
    let op: serde_json::Value = r.json().map_err(|e| e.to_string())?;
    let op = op["operationId"].as_str().ok_or("no operation id")?.to_string();
    for _ in 0..100 {
        let r = client
            .get(format!("{base}/operations/{op}?api-version=2019-03-31"))
            .header("Authorization", &token)
            .send()
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = r.json().map_err(|e| e.to_string())?;
        match v["status"].as_str() {
            Some("assigned") => {
                let s = &v["registrationState"];
                return Ok((s["deviceId"].as_str().unwrap_or("").into(), s["assignedHub"].as_str().unwrap_or("").into()));
            }
            Some("assigning") => std::thread::sleep(Duration::from_millis(50)),
            _ => return Err(format!("operation answered {v}")),
        }
    }
    Err("still assigning".into())
}

#[test]
fn an_etcd_member_and_a_node_lost_under_load_lose_nothing() {
    use common::process::Process;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut etcd = Cluster::start(3);
    let store = format!(
        "\n[store]\nkind = \"etcd\"\netcd_root = \"/lost\"\netcd_endpoints = [{}]\n",
        etcd.clients.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")
    );
    let root = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (root.path().join("a/data"), root.path().join("b/data"));
    std::fs::create_dir_all(dir_a.parent().unwrap()).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let a = Process::start_with(&dir_a, &store, &[]);
    std::fs::copy(dir_a.join("data.key"), dir_b.join("data.key")).unwrap();
    let b = Process::start_with(&dir_b, &store, &[]);
    let group = json!({"enrollmentGroupId": "fleet", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY2}}});
    let r = a.client.put(a.url("/enrollmentGroups/fleet")).header("Authorization", a.token()).json(&group).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let ports = [a.ep.ports.https, b.ep.ports.https];
    let scope = a.ep.id_scope.clone();
    let acked: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (acked, stop, scope, client) = (acked.clone(), stop.clone(), scope.clone(), a.client.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("dev-{t}-{i}");
                    let key = dps_core::sas::derive_device_key(&base64_decode(KEY), &id);
                    // The thread's own node first; when it fails, the other one (a device
                    // retrying through the balancer).
                    for attempt in 0..6 {
                        let port = ports[(t + attempt) % 2];
                        if let Ok((device, hub)) = provision(&client, port, &scope, &id, &key) {
                            acked.lock().unwrap().push((id.clone(), device, hub));
                            break;
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let provisioned = || acked.lock().unwrap().len();
    let before = wait_for_progress(provisioned, 10);
    etcd.kill(0);
    a.kill();
    wait_for_progress(provisioned, before + 10);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("provisioned {before} devices before the losses, {} in all", acked.len());
    assert!(before > 10, "{before} devices before the losses");
    assert!(acked.len() > before + 10, "devices went on being provisioned through the other node ({before} -> {})", acked.len());
    // Every acknowledged assignment is stored as it was answered, once.
    for (id, device, hub) in &acked {
        let r = b.client.get(b.url(&format!("/registrations/{id}"))).header("Authorization", b.token()).send().unwrap();
        let (st, v) = status_json(r);
        assert_eq!(st, 200, "{id}: {v}");
        assert_eq!(
            (v["status"].as_str(), v["deviceId"].as_str(), v["assignedHub"].as_str()),
            (Some("assigned"), Some(device.as_str()), Some(hub.as_str())),
            "{id}"
        );
    }
    let ids: std::collections::HashSet<&str> = acked.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids.len(), acked.len(), "a device was acknowledged twice");
}

#[test]
fn a_node_reaches_etcd_over_tls_with_its_client_certificate() {
    let etcd = Cluster::start_tls(3);
    let tls = etcd.tls.clone().unwrap();
    let files = tempfile::tempdir().unwrap();
    let (client_cert, client_key) = tls.client.clone().unwrap();
    for (name, pem) in [("ca.pem", &tls.ca_pem), ("node.pem", &client_cert), ("node.key", &client_key)] {
        std::fs::write(files.path().join(name), pem).unwrap();
    }
    let mut cfg = node_config(&etcd);
    cfg.store.etcd_ca_file = Some(files.path().join("ca.pem"));
    cfg.store.etcd_cert_file = Some(files.path().join("node.pem"));
    cfg.store.etcd_key_file = Some(files.path().join("node.key"));
    // A certificate without its key is a configuration error, named at start.
    let mut half = cfg.clone();
    half.store.etcd_key_file = None;
    let err = dps_gateway::start(half, tempfile::tempdir().unwrap().path()).err().unwrap();
    assert!(err.contains("etcd_cert_file and store.etcd_key_file go together"), "{err}");
    // Without the client certificate the cluster refuses the node, and start says where.
    let mut anonymous = cfg.clone();
    (anonymous.store.etcd_cert_file, anonymous.store.etcd_key_file) = (None, None);
    let err = dps_gateway::start(anonymous, tempfile::tempdir().unwrap().path()).err().unwrap();
    assert!(err.contains("cannot reach etcd"), "{err}");
    // With it: a device is enrolled and provisioned through the node.
    let node = TestServer::start(cfg);
    node.put_enrollment("tls-dev", KEY, KEY2, json!({}));
    assert_eq!(register(&node, "tls-dev", KEY)["status"], "assigned");
}

#[test]
fn hub_work_left_by_a_stopped_node_is_finished_by_another_nodes_poll() {
    // A registration's hub step (the device's identity at an Azure-IoT-Hub-like registry) keeps
    // failing on node A, which then goes away with the state `assigning` in etcd. The device
    // polls node B: B resumes the step from the stored state and answers `assigned`.
    let etcd = Cluster::start(1);
    let hub = common::fake_iothub::FakeIotHub::start("roaming.azure-devices.net");
    hub.unavailable.store(usize::MAX / 2, std::sync::atomic::Ordering::SeqCst);
    let cfg = || {
        let mut c = node_config(&etcd);
        c.limits.hub_retry_first_ms = 50;
        c.limits.hub_retry_max_ms = 100;
        c.limits.hub_deadline_secs = 60;
        c.limits.hub_wait_ms = 200;
        c
    };
    let a = TestServer::start(cfg());
    let dir_b = tempfile::tempdir().unwrap();
    std::fs::copy(a.dir.path().join("data.key"), dir_b.path().join("data.key")).unwrap();
    let b = TestServer::start_in(dir_b, cfg());
    let (st, v) = status_json(a.send("PUT", &format!("/linkedHubs/{}", hub.host), Some(hub.hub_json(true))));
    assert_eq!(st, 200, "{v}");
    a.put_enrollment("roamer", KEY, KEY2, json!({"iotHubs": [hub.host]}));
    let op = https_register(&a, "roamer", KEY, "{}");
    let pending = https_poll(&a, "roamer", KEY, &op, Duration::from_millis(500));
    assert_eq!(pending["status"], "assigning", "the hub is down, so A cannot finish: {pending}");
    drop(a);
    assert!(hub.device("roamer").is_none());
    // The hub is back; A is gone. The device polls B with the operation A gave it.
    hub.unavailable.store(0, std::sync::atomic::Ordering::SeqCst);
    let done = https_poll(&b, "roamer", KEY, &op, Duration::from_secs(20));
    assert_eq!(
        (done["status"].as_str(), done["registrationState"]["assignedHub"].as_str()),
        (Some("assigned"), Some(hub.host.as_str())),
        "{done}"
    );
    assert!(hub.device("roamer").is_some(), "B created the identity at the hub");
    let (_, state) = status_json(b.send("GET", "/registrations/roamer", None));
    assert_eq!(state["status"], "assigned", "{state}");
}
