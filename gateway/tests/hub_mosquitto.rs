#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The `mosquitto` hub connector against a real Mosquitto 2 broker with its dynamic-security
//! plugin: devices registered over the HTTPS device API land at the broker (their own client
//! and role, their key as the password, their desired properties retained), reprovisioning
//! moves them between brokers, a disabled enrollment cuts them off, a hub that is down leaves
//! the registration `assigning` and then `failed`, and a restarted service resumes the work.

mod common;
use common::mosquitto::Broker;
use common::mqtt_client::MqttClient;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

/// Polls here come every 100 ms, more often than a device's poll budget allows.
fn config() -> dps_gateway::config::Config {
    let mut c = test_config();
    c.limits.polls_per_device = 0;
    c
}

fn certs(s: &TestServer) -> std::path::PathBuf {
    s.ep.ca_certificate.as_ref().unwrap().parent().unwrap().to_path_buf()
}

fn enroll(s: &TestServer, id: &str, extra: Value) {
    s.put_enrollment(id, KEY, OTHER_KEY, extra);
}

fn link(s: &TestServer, broker: &Broker, name: &str) {
    let r = s.send("PUT", &format!("/linkedHubs/{name}"), Some(broker.hub_json(name)));
    let (st, v) = status_json(r);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["password"], "****", "the admin password is never returned");
}

/// Registers over HTTPS and polls until the state is final or `patience` ran out; returns the
/// last operation status (the first poll's when `patience` is zero).
fn register(s: &TestServer, id: &str, patience: Duration) -> Value {
    let op = https_register(s, id, KEY, "{}");
    poll(s, id, &op, patience)
}

fn poll(s: &TestServer, id: &str, op: &str, patience: Duration) -> Value {
    https_poll(s, id, KEY, op, patience)
}

fn device_at(broker: &Broker, ca: &std::path::Path, id: &str, password: &str) -> (MqttClient, Option<u8>) {
    let mut c = MqttClient::open(broker.device_port, ca);
    let code = c.connect_as(id, id, password);
    (c, code)
}

/// The retained desired properties a device receives when it subscribes.
fn desired_at(broker: &Broker, ca: &std::path::Path, id: &str, password: &str) -> Option<Value> {
    let (mut c, code) = device_at(broker, ca, id, password);
    assert_eq!(code, Some(0), "{id} connects to its broker");
    let mut got = Vec::new();
    assert!(c.subscribe_to(&format!("devices/{id}/twin/desired"), &mut got));
    // A retained message follows the SUBACK.
    if got.is_empty() {
        match c.read_within(Duration::from_millis(500)) {
            Some(Some(mqttbytes::v4::Packet::Publish(p))) => got.push(p),
            None => return None,
            other => panic!("expected the retained message, got {other:?}"),
        }
    }
    Some(serde_json::from_slice(&got[0].payload).unwrap())
}

#[test]
fn a_device_lands_at_its_broker_and_is_cut_off_when_disabled() {
    let s = TestServer::start(config());
    let broker = Broker::start(&certs(&s));
    link(&s, &broker, "localhost");
    let ca = s.ep.ca_certificate.clone().unwrap();
    enroll(
        &s,
        "hub-dev",
        json!({"iotHubs": ["localhost"], "initialTwin": {"tags": {"site": "a"}, "properties": {"desired": {"fw": "1.2"}}}}),
    );
    let v = register(&s, "hub-dev", Duration::from_secs(20));
    assert_eq!(v["status"], "assigned", "{v}");
    assert_eq!(
        (v["registrationState"]["assignedHub"].as_str(), v["registrationState"]["deviceId"].as_str()),
        (Some("localhost"), Some("hub-dev"))
    );
    let (st, reg) = status_json(s.send("GET", "/registrations/hub-dev", None));
    assert_eq!((st, reg["status"].as_str()), (200, Some("assigned")));
    assert!(reg.get("_hubTask").is_none() && reg.get("_twin").is_none(), "{reg}");

    // The device logs in with its key, reads its desired properties, and only its topics.
    assert_eq!(desired_at(&broker, &ca, "hub-dev", KEY), Some(json!({"fw": "1.2"})));
    let (mut dev, code) = device_at(&broker, &ca, "hub-dev", KEY);
    assert_eq!(code, Some(0));
    let mut got = Vec::new();
    assert!(dev.subscribe_to("devices/hub-dev/commands", &mut got));
    assert!(!dev.subscribe_to("devices/someone-else/#", &mut got), "another device's topics are refused");
    assert_ne!(device_at(&broker, &ca, "hub-dev", OTHER_KEY).1, Some(0), "a wrong password is refused");

    // Registering again (same hub, default policy) creates nothing twice and keeps it working.
    assert_eq!(register(&s, "hub-dev", Duration::from_secs(20))["status"], "assigned");
    let (mut dev, code) = device_at(&broker, &ca, "hub-dev", KEY);
    assert_eq!(code, Some(0));

    // Disabling the enrollment cuts the device off (in the background, within seconds): its
    // connection ends and its login is refused.
    enroll(&s, "hub-dev", json!({"iotHubs": ["localhost"], "provisioningStatus": "disabled"}));
    assert!(matches!(dev.read_within(Duration::from_secs(10)), Some(None)), "the connected device is disconnected");
    let until = Instant::now() + Duration::from_secs(10);
    while device_at(&broker, &ca, "hub-dev", KEY).1 == Some(0) {
        assert!(Instant::now() < until, "a disabled device can still log in");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Enabled again, it registers again and is back.
    enroll(&s, "hub-dev", json!({"iotHubs": ["localhost"]}));
    assert_eq!(register(&s, "hub-dev", Duration::from_secs(20))["status"], "assigned");
    assert_eq!(device_at(&broker, &ca, "hub-dev", KEY).1, Some(0));
}

#[test]
fn reprovisioning_moves_the_device_between_brokers() {
    let s = TestServer::start(config());
    let (a, b) = (Broker::start(&certs(&s)), Broker::start(&certs(&s)));
    link(&s, &a, "broker-a.test");
    link(&s, &b, "broker-b.test");
    let ca = s.ep.ca_certificate.clone().unwrap();
    let twin = |v: i64| json!({"tags": {"v": v}, "properties": {"desired": {"v": v}}});
    enroll(&s, "mover", json!({"iotHubs": ["broker-a.test"], "initialTwin": twin(1)}));
    assert_eq!(register(&s, "mover", Duration::from_secs(20))["registrationState"]["assignedHub"], "broker-a.test");
    assert_eq!(desired_at(&a, &ca, "mover", KEY), Some(json!({"v": 1})));

    // Move with migration: broker B gets the twin written at A (not the new initial twin);
    // A no longer knows the device.
    let policy = |migrate: bool| json!({"updateHubAssignment": true, "migrateDeviceData": migrate});
    enroll(&s, "mover", json!({"iotHubs": ["broker-b.test"], "initialTwin": twin(2), "reprovisionPolicy": policy(true)}));
    let v = register(&s, "mover", Duration::from_secs(20));
    assert_eq!(
        (v["registrationState"]["assignedHub"].as_str(), v["registrationState"]["substatus"].as_str()),
        (Some("broker-b.test"), Some("deviceDataMigrated"))
    );
    assert_eq!(desired_at(&b, &ca, "mover", KEY), Some(json!({"v": 1})));
    assert_ne!(device_at(&a, &ca, "mover", KEY).1, Some(0), "removed from the hub it left");

    // Move back with a reset: A gets the enrollment's initial twin.
    enroll(&s, "mover", json!({"iotHubs": ["broker-a.test"], "initialTwin": twin(3), "reprovisionPolicy": policy(false)}));
    let v = register(&s, "mover", Duration::from_secs(20));
    assert_eq!(v["registrationState"]["substatus"], "deviceDataReset");
    assert_eq!(desired_at(&a, &ca, "mover", KEY), Some(json!({"v": 3})));
    assert_ne!(device_at(&b, &ca, "mover", KEY).1, Some(0));
}

#[test]
fn a_hub_that_stays_down_fails_the_registration_and_a_restart_resumes_the_work() {
    let mut cfg = config();
    cfg.limits.hub_wait_ms = 300;
    cfg.limits.hub_retry_first_ms = 50;
    cfg.limits.hub_retry_max_ms = 200;
    cfg.limits.hub_deadline_secs = 2;
    let s = TestServer::start(cfg.clone());
    let mut broker = Broker::start(&certs(&s));
    link(&s, &broker, "localhost");
    broker.stop();
    let ca = s.ep.ca_certificate.clone().unwrap();

    // Down for longer than the deadline: assigning while retried, then failed with 503201.
    enroll(&s, "waits", json!({"iotHubs": ["localhost"]}));
    let first = register(&s, "waits", Duration::from_millis(0));
    assert_eq!(first["status"], "assigning", "{first}");
    let v = poll(&s, "waits", first["operationId"].as_str().unwrap(), Duration::from_secs(20));
    assert_eq!((v["status"].as_str(), v["registrationState"]["errorCode"].as_u64()), (Some("failed"), Some(503201)), "{v}");
    assert!(v["registrationState"].get("assignedHub").is_none(), "{v}");

    // Down when the service stops: the stored task is resumed by the restarted service when
    // the device polls, once the hub is back.
    cfg.limits.hub_deadline_secs = 120;
    let s = s.restart(cfg.clone());
    enroll(&s, "resumes", json!({"iotHubs": ["localhost"]}));
    let first = register(&s, "resumes", Duration::from_millis(0));
    assert_eq!(first["status"], "assigning");
    let s = s.restart(cfg);
    broker.restart();
    let v = poll(&s, "resumes", first["operationId"].as_str().unwrap(), Duration::from_secs(20));
    assert_eq!(v["status"], "assigned", "{v}");
    assert_eq!(device_at(&broker, &ca, "resumes", KEY).1, Some(0));
}

#[test]
fn hub_definitions_are_validated() {
    let s = TestServer::start(test_config());
    for bad in [
        json!({"name": "m", "kind": "mosquitto", "controlUrl": "http://x:1", "username": "u", "password": "p"}),
        json!({"name": "m", "kind": "mosquitto", "controlUrl": "mqtt://127.0.0.1:1883"}),
        json!({"name": "m", "kind": "carrier-pigeon", "controlUrl": "mqtt://127.0.0.1:1883"}),
    ] {
        let (st, v) = status_json(s.send("PUT", "/linkedHubs/m", Some(bad.clone())));
        assert_eq!(st, 400, "{bad} → {v}");
    }
}

#[test]
fn an_x509_device_logs_in_to_its_broker_with_its_certificate() {
    use common::certs::{ca, device};
    let s = TestServer::start(config());
    let device_ca = ca("hub devices CA", None);
    let (cert, key, pem) = device("x509-hub-dev", Some(&device_ca));
    let broker = Broker::start_with_x509(&certs(&s), Some(&device_ca.pem));
    link(&s, &broker, "localhost");
    let ca_path = s.ep.ca_certificate.clone().unwrap();
    let e = json!({"registrationId": "x509-hub-dev", "iotHubs": ["localhost"],
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}}});
    assert_eq!(s.send("PUT", "/enrollments/x509-hub-dev", Some(e)).status().as_u16(), 200);
    let mut c = MqttClient::open_with_certificate(s.ep.ports.mqtt, &ca_path, std::slice::from_ref(&cert), &key);
    assert_eq!(c.connect(&s.ep.id_scope, "x509-hub-dev", "x509-hub-dev", ""), 0);
    c.subscribe();
    let (status, _, body) = c.register("1", b"{}");
    assert_eq!((status, body["status"].as_str()), (200, Some("assigned")), "{body}");

    // At the broker: logged in by the certificate alone, its own topics only.
    let login = || {
        let mut d = MqttClient::open_with_certificate(broker.x509_port.unwrap(), &ca_path, std::slice::from_ref(&cert), &key);
        assert_eq!(d.connect_as("", "x509-hub-dev", ""), Some(0));
        d
    };
    let mut d = login();
    let mut got = Vec::new();
    assert!(d.subscribe_to("devices/x509-hub-dev/commands", &mut got));
    assert!(!d.subscribe_to("devices/someone-else/#", &mut got));

    // Disabled: a certificate client is not stopped by disableClient; without its role it can
    // no longer use any topic.
    let e = json!({"registrationId": "x509-hub-dev", "iotHubs": ["localhost"], "provisioningStatus": "disabled",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}}});
    let etag = s.send("GET", "/enrollments/x509-hub-dev", None).headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(
        s.req("PUT", "/enrollments/x509-hub-dev").header("If-Match", etag).body(e.to_string()).send().unwrap().status().as_u16(),
        200
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let mut d = MqttClient::open_with_certificate(broker.x509_port.unwrap(), &ca_path, std::slice::from_ref(&cert), &key);
        let refused = match d.connect_as("", "x509-hub-dev", "") {
            Some(0) => !d.subscribe_to("devices/x509-hub-dev/commands", &mut got),
            _ => true,
        };
        if refused {
            break;
        }
        assert!(Instant::now() < until, "a disabled certificate device still uses its topics");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_broker_that_lost_its_devices_is_given_them_again() {
    let s = TestServer::start(config());
    let mut broker = Broker::start(&certs(&s));
    link(&s, &broker, "localhost");
    let ca = s.ep.ca_certificate.clone().unwrap();
    let ids = ["resync-1", "resync-2", "resync-3"];
    for id in ids {
        enroll(&s, id, json!({"iotHubs": ["localhost"], "initialTwin": {"properties": {"desired": {"id": id}}}}));
        assert_eq!(register(&s, id, Duration::from_secs(20))["status"], "assigned");
    }
    broker.lose_devices();
    assert_ne!(device_at(&broker, &ca, "resync-1", KEY).1, Some(0), "the broker forgot its devices");
    let r = s.send("POST", "/linkedHubs/localhost/resync", None);
    assert_eq!(r.status().as_u16(), 202);
    for id in ids {
        let until = Instant::now() + Duration::from_secs(20);
        while device_at(&broker, &ca, id, KEY).1 != Some(0) {
            assert!(Instant::now() < until, "{id} was not given back to the broker");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(desired_at(&broker, &ca, id, KEY), Some(json!({"id": id})), "and its desired properties");
    }
    assert_eq!(s.send("POST", "/linkedHubs/nowhere/resync", None).status().as_u16(), 404);
}

#[test]
fn the_control_connection_can_be_tls_and_checks_the_broker() {
    let s = TestServer::start(config());
    let broker = Broker::start(&certs(&s));
    let ca = s.ep.ca_certificate.clone().unwrap();
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    link(&s, &broker, "localhost");
    let r = s.send("PUT", "/linkedHubs/localhost", Some(broker.hub_json_tls("localhost", &ca_pem)));
    assert_eq!(r.status().as_u16(), 200);
    enroll(&s, "over-tls", json!({"iotHubs": ["localhost"], "initialTwin": {"properties": {"desired": {"tls": true}}}}));
    assert_eq!(register(&s, "over-tls", Duration::from_secs(20))["status"], "assigned");
    assert_eq!(desired_at(&broker, &ca, "over-tls", KEY), Some(json!({"tls": true})));

    // A broker whose certificate the configured CA did not sign is refused: failed, 400210.
    let other_ca = common::certs::ca("some other CA", None);
    let r = s.send("PUT", "/linkedHubs/localhost", Some(broker.hub_json_tls("localhost", &other_ca.pem)));
    assert_eq!(r.status().as_u16(), 200);
    enroll(&s, "untrusted", json!({"iotHubs": ["localhost"]}));
    let v = register(&s, "untrusted", Duration::from_secs(20));
    assert_eq!(v["status"], "failed", "{v}");
    assert_ne!(device_at(&broker, &ca, "untrusted", KEY).1, Some(0));
}
