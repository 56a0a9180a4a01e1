#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The HTTP hub connectors: `azure-iothub` against `FakeIotHub` (IoT Hub's registry REST API as
//! published; IoT Hub itself cannot run here) and `webhook` against a receiver that records
//! what it is sent: identities with the device's keys and capabilities, the initial twin,
//! idempotent repeats, moves between hubs with the twin migrated, disabling, retries while the
//! hub is busy, and a refusal when the hub refuses the service's key.

mod common;
use common::fake_iothub::FakeIotHub;
use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

fn server() -> TestServer {
    let mut cfg = test_config();
    cfg.limits.polls_per_device = 0;
    cfg.limits.hub_retry_first_ms = 50;
    cfg.limits.hub_retry_max_ms = 100;
    cfg.limits.hub_deadline_secs = 20;
    TestServer::start(cfg)
}

fn link(s: &TestServer, name: &str, body: Value) {
    let (st, v) = status_json(s.send("PUT", &format!("/linkedHubs/{name}"), Some(body)));
    assert_eq!(st, 200, "{v}");
}

fn enroll(s: &TestServer, id: &str, extra: Value) {
    s.put_enrollment(id, KEY, KEY2, extra);
}

fn register(s: &TestServer, id: &str) -> Value {
    let op = https_register(s, id, KEY, "{}");
    https_poll(s, id, KEY, &op, Duration::from_secs(30))
}

fn eventually(what: &str, ok: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < until, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn azure_iothub_identities_twins_moves_and_disabling() {
    let s = server();
    let (a, b) = (FakeIotHub::start("hub-a.azure-devices.net"), FakeIotHub::start("hub-b.azure-devices.net"));
    link(&s, &a.host, a.hub_json(true));
    link(&s, &b.host, b.hub_json(true));
    let twin = |v: i64| json!({"tags": {"v": v}, "properties": {"desired": {"v": v}}});
    enroll(&s, "az-dev", json!({"iotHubs": [a.host], "capabilities": {"iotEdge": true}, "initialTwin": twin(1)}));
    let v = register(&s, "az-dev");
    assert_eq!((v["status"].as_str(), v["registrationState"]["assignedHub"].as_str()), (Some("assigned"), Some(a.host.as_str())), "{v}");
    let d = a.device("az-dev").expect("the identity exists at the hub");
    assert_eq!(d["status"], "enabled");
    assert_eq!(d["authentication"], json!({"type": "sas", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY2}}));
    assert_eq!(d["capabilities"]["iotEdge"], true);
    assert_eq!(a.twin("az-dev"), Some(json!({"tags": {"v": 1}, "properties": {"desired": {"v": 1}}})));

    // A repeat (same hub, migrate: the hub's twin stays) updates the identity in place.
    assert_eq!(register(&s, "az-dev")["status"], "assigned");
    let calls = a.registry.lock().unwrap().calls.clone();
    assert_eq!(calls.iter().filter(|c| *c == "PUT /devices/az-dev").count(), 3, "create, then 409 and update: {calls:?}");
    assert_eq!(a.registry.lock().unwrap().devices.len(), 1);

    // Moved with migration while hub B is busy for a while: retried; B gets the twin written at
    // A (not the new initial twin), A loses the device.
    b.unavailable.store(3, std::sync::atomic::Ordering::SeqCst);
    enroll(&s, "az-dev", json!({"iotHubs": [b.host], "initialTwin": twin(2)}));
    let v = register(&s, "az-dev");
    assert_eq!(
        (v["registrationState"]["assignedHub"].as_str(), v["registrationState"]["substatus"].as_str()),
        (Some(b.host.as_str()), Some("deviceDataMigrated")),
        "{v}"
    );
    assert_eq!(b.twin("az-dev").unwrap()["properties"]["desired"], json!({"v": 1}));
    assert!(a.device("az-dev").is_none(), "removed from the hub it left");

    // Never reprovision: the device stays at B whatever the enrollment now names, its twin
    // untouched. Reset on the same hub: the twin is the initial one again (a factory reset).
    let policy = |update: bool, migrate: bool| json!({"updateHubAssignment": update, "migrateDeviceData": migrate});
    enroll(&s, "az-dev", json!({"iotHubs": [a.host], "initialTwin": twin(3), "reprovisionPolicy": policy(false, false)}));
    assert_eq!(register(&s, "az-dev")["registrationState"]["assignedHub"], json!(b.host));
    assert_eq!(b.twin("az-dev").unwrap()["properties"]["desired"], json!({"v": 1}));
    assert!(a.device("az-dev").is_none());
    enroll(&s, "az-dev", json!({"iotHubs": [b.host], "initialTwin": twin(4), "reprovisionPolicy": policy(true, false)}));
    assert_eq!(register(&s, "az-dev")["registrationState"]["substatus"], "deviceDataReset");
    assert_eq!(b.twin("az-dev").unwrap(), json!({"tags": {"v": 4}, "properties": {"desired": {"v": 4}}}));

    // Disabled: the identity at B is disabled.
    enroll(&s, "az-dev", json!({"iotHubs": [b.host], "provisioningStatus": "disabled"}));
    eventually("the identity is disabled at its hub", || b.device("az-dev").is_some_and(|d| d["status"] == "disabled"));
}

#[test]
fn a_hub_that_refuses_the_service_key_fails_the_registration_with_400210() {
    let s = server();
    let hub = FakeIotHub::start("locked.azure-devices.net");
    link(&s, &hub.host, hub.hub_json(false));
    enroll(&s, "locked-out", json!({"iotHubs": [hub.host]}));
    let v = register(&s, "locked-out");
    assert_eq!((v["status"].as_str(), v["registrationState"]["errorCode"].as_u64()), (Some("failed"), Some(400210)), "{v}");
    assert!(v["registrationState"]["errorMessage"].as_str().unwrap().contains("401"), "{v}");
}

#[test]
fn the_webhook_connector_posts_each_step() {
    let s = server();
    let seen = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sink = seen.clone();
    let port = common::http_server::serve(move |r| {
        sink.lock().unwrap().push(r.json());
        (200, "{}".into())
    });
    link(
        &s,
        "platform.example",
        json!({"name": "platform.example", "kind": "webhook", "controlUrl": format!("http://127.0.0.1:{port}/hooks/dps")}),
    );
    enroll(&s, "hooked", json!({"iotHubs": ["platform.example"], "initialTwin": {"properties": {"desired": {"mode": "eco"}}}}));
    assert_eq!(register(&s, "hooked")["status"], "assigned");
    let assign = seen.lock().unwrap()[0].clone();
    assert_eq!(
        assign,
        json!({"operation": "assign", "hub": "platform.example", "deviceId": "hooked",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY2}},
            "capabilities": {"iotEdge": false}, "twin": {"tags": {}, "properties": {"desired": {"mode": "eco"}}}})
    );
    enroll(&s, "hooked", json!({"iotHubs": ["platform.example"], "provisioningStatus": "disabled"}));
    eventually("the webhook is told to disable", || {
        seen.lock().unwrap().iter().any(|v| v["operation"] == "disable" && v["deviceId"] == "hooked")
    });
}

#[test]
fn rolled_keys_reach_the_hub() {
    let s = server();
    let hub = FakeIotHub::start("keys.azure-devices.net");
    link(&s, &hub.host, hub.hub_json(true));
    let keys_at_hub = |id: &str| hub.device(id).map(|d| d["authentication"]["symmetricKey"].clone());

    // An individual enrollment: the keys swapped through the service API (the SDK's update).
    enroll(&s, "rolled", json!({"iotHubs": [hub.host]}));
    assert_eq!(register(&s, "rolled")["status"], "assigned");
    let e = json!({"registrationId": "rolled", "iotHubs": [hub.host],
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY2, "secondaryKey": KEY}}});
    let etag = s.send("GET", "/enrollments/rolled", None).headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(s.req("PUT", "/enrollments/rolled").header("If-Match", etag).body(e.to_string()).send().unwrap().status().as_u16(), 200);
    eventually("the hub has the rolled keys", || keys_at_hub("rolled") == Some(json!({"primaryKey": KEY2, "secondaryKey": KEY})));

    // A group: its devices' derived keys change with the group key.
    let g = |primary: &str| {
        json!({"enrollmentGroupId": "rolled-group", "iotHubs": [hub.host],
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": primary, "secondaryKey": KEY2}}})
    };
    assert_eq!(s.send("PUT", "/enrollmentGroups/rolled-group", Some(g(KEY))).status().as_u16(), 200);
    let derived = |group_key: &str| {
        use base64::Engine;
        dps_core::sas::derive_device_key(&base64::engine::general_purpose::STANDARD.decode(group_key).unwrap(), "member")
    };
    let op = https_register(&s, "member", &derived(KEY), "{}");
    assert_eq!(https_poll(&s, "member", &derived(KEY), &op, Duration::from_secs(30))["status"], "assigned");
    assert_eq!(keys_at_hub("member").unwrap()["primaryKey"], json!(derived(KEY)));
    let etag = s.send("GET", "/enrollmentGroups/rolled-group", None).headers()["etag"].to_str().unwrap().to_string();
    let r = s.req("PUT", "/enrollmentGroups/rolled-group").header("If-Match", etag).body(g(KEY2).to_string()).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    eventually("the hub has the member's new derived key", || {
        keys_at_hub("member").is_some_and(|k| k["primaryKey"] == json!(derived(KEY2)))
    });
}
