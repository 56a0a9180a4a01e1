#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Custom allocation through a webhook that follows the Azure Functions contract: the request
//! the service sends, the hub and payload it takes from the answer, retries while the webhook
//! is busy, and 400207 when it refuses or stays unreachable.

mod common;
use common::*;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A webhook on a loopback port: answers each POST with the next scripted (status, body)
/// (the last one repeats) and keeps the request bodies.
struct Webhook {
    port: u16,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl Webhook {
    fn start(script: Vec<(u16, Value)>) -> Webhook {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let port = common::http_server::serve(move |r| {
            let mut seen = seen.lock().unwrap();
            seen.push(r.json());
            let (status, answer) = script[(seen.len() - 1).min(script.len() - 1)].clone();
            (status, answer.to_string())
        });
        Webhook { port, requests }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/allocate?code=secret", self.port)
    }
}

fn server(deadline_secs: u64) -> TestServer {
    let mut cfg = test_config();
    cfg.linked_hubs.push(hub("hub-a.example"));
    cfg.linked_hubs.push(hub("hub-b.example"));
    cfg.limits.polls_per_device = 0;
    cfg.limits.hub_retry_first_ms = 50;
    cfg.limits.hub_retry_max_ms = 100;
    cfg.limits.hub_deadline_secs = deadline_secs;
    TestServer::start(cfg)
}

fn enroll(s: &TestServer, id: &str, url: &str) {
    let e = json!({"registrationId": id, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}},
        "allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
        "initialTwin": {"properties": {"desired": {"from": "enrollment"}}}});
    assert_eq!(s.send("PUT", &format!("/enrollments/{id}"), Some(e)).status().as_u16(), 200);
}

/// Registers over HTTPS with a payload and polls to a final state.
fn register(s: &TestServer, id: &str) -> Value {
    let op = https_register(s, id, KEY, &json!({"registrationId": id, "payload": {"modelId": "thermostat;1"}}).to_string());
    https_poll(s, id, KEY, &op, Duration::from_secs(20))
}

#[test]
fn the_webhook_chooses_the_hub_and_its_payload_reaches_the_device() {
    let hook = Webhook::start(vec![(200, json!({"iotHubHostName": "hub-b.example", "payload": {"region": "north"}}))]);
    let s = server(10);
    enroll(&s, "custom-dev", &hook.url());
    let v = register(&s, "custom-dev");
    assert_eq!(v["status"], "assigned", "{v}");
    assert_eq!(v["registrationState"]["assignedHub"], "hub-b.example");
    assert_eq!(v["registrationState"]["payload"], json!({"region": "north"}));
    let sent = hook.requests.lock().unwrap()[0].clone();
    assert_eq!(sent["linkedHubs"], json!(["hub-a.example", "hub-b.example"]));
    assert_eq!(sent["deviceRuntimeContext"]["registrationId"], "custom-dev");
    assert_eq!(sent["deviceRuntimeContext"]["payload"], json!({"modelId": "thermostat;1"}));
    assert_eq!(sent["deviceRuntimeContext"]["symmetricKey"], json!({}));
    assert_eq!(sent["individualEnrollment"]["registrationId"], "custom-dev");
    assert!(sent.to_string().find(KEY).is_none(), "no key goes to the webhook");
    // The state the service API shows carries the webhook's payload, not the pending call.
    let (_, reg) = status_json(s.send("GET", "/registrations/custom-dev", None));
    assert_eq!((reg["payload"].clone(), reg.get("_customAllocation")), (json!({"region": "north"}), None));
    // Registering again asks again, now naming where the device is.
    register(&s, "custom-dev");
    let again = hook.requests.lock().unwrap()[1].clone();
    assert_eq!(again["deviceRuntimeContext"]["currentIotHubHostName"], "hub-b.example");
    assert_eq!(again["deviceRuntimeContext"]["currentDeviceId"], "custom-dev");
}

#[test]
fn a_busy_webhook_is_asked_again_and_a_refusing_one_fails_the_registration() {
    let busy = Webhook::start(vec![(503, json!({})), (500, json!({})), (200, json!({"iotHubHostName": "HUB-A.example"}))]);
    let s = server(10);
    enroll(&s, "retried", &busy.url());
    let v = register(&s, "retried");
    assert_eq!((v["status"].as_str(), v["registrationState"]["assignedHub"].as_str()), (Some("assigned"), Some("hub-a.example")), "{v}");
    assert_eq!(busy.requests.lock().unwrap().len(), 3);

    for (answer, says) in [
        ((400, json!({"error": "no"})), "Custom allocation failed with status code: 400"),
        ((200, json!({"iotHubHostName": "elsewhere.example"})), "not one of the linked hubs"),
    ] {
        let hook = Webhook::start(vec![answer]);
        enroll(&s, "refused", &hook.url());
        let v = register(&s, "refused");
        assert_eq!((v["status"].as_str(), v["registrationState"]["errorCode"].as_u64()), (Some("failed"), Some(400207)), "{v}");
        assert!(v["registrationState"]["errorMessage"].as_str().unwrap().contains(says), "{v}");
        assert_eq!(s.send("DELETE", "/enrollments/refused", None).status().as_u16(), 204);
    }
}

#[test]
fn an_unreachable_webhook_fails_the_registration_after_the_deadline() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s = server(1);
    enroll(&s, "unreachable", &format!("http://127.0.0.1:{closed}/api/allocate"));
    let v = register(&s, "unreachable");
    assert_eq!((v["status"].as_str(), v["registrationState"]["errorCode"].as_u64()), (Some("failed"), Some(400207)), "{v}");
}
