#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Device provisioning over MQTT/TLS against an in-process gateway: the protocol to the byte,
//! attestation with individual and group symmetric keys, allocation, registration state, limits
//! and bad input.

mod common;
use common::mqtt_client::{device_token, MqttClient};
use common::*;
use serde_json::json;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const GROUP_KEY: &str = "Z3JvdXAta2V5LWdyb3VwLWtleS1ncm91cC1rZXktIQ==";

fn server_with_hubs(hubs: &[&str]) -> TestServer {
    let mut cfg = test_config();
    cfg.limits.service_operations_per_minute = 0;
    cfg.linked_hubs = hubs.iter().map(|h| hub(h)).collect();
    TestServer::start(cfg)
}

fn enroll(s: &TestServer, id: &str, extra: serde_json::Value) {
    let mut e =
        json!({"registrationId": id, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}});
    for (k, v) in extra.as_object().unwrap() {
        e[k] = v.clone();
    }
    let (st, v) = status_json(s.send("PUT", &format!("/enrollments/{id}"), Some(e)));
    assert_eq!(st, 200, "{v}");
}

fn group_key_for(id: &str) -> String {
    use base64::Engine;
    let g = base64::engine::general_purpose::STANDARD.decode(GROUP_KEY).unwrap();
    dps_core::sas::derive_device_key(&g, id)
}

fn connect(s: &TestServer, id: &str, key: &str) -> MqttClient {
    let mut c = MqttClient::open(s.ep.ports.mqtt, s.ep.ca_certificate.as_ref().unwrap());
    assert_eq!(c.connect(&s.ep.id_scope, id, id, &device_token(&s.ep.id_scope, id, key)), 0);
    c.subscribe();
    c
}

#[test]
fn individual_enrollment_is_assigned_and_recorded() {
    let s = server_with_hubs(&["hub-a.example"]);
    enroll(&s, "mqtt-dev-1", json!({"deviceId": "custom-device-id", "initialTwin": {"tags": {"a": 1}}}));
    let mut c = connect(&s, "mqtt-dev-1", KEY);
    let (status, topic, body) = c.register("abc%2D1", br#"{"payload": {"model": "x1"}, "registrationId": "mqtt-dev-1"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=abc%2D1", "rid echoed byte for byte");
    assert_eq!(body["status"], "assigned");
    let st = &body["registrationState"];
    assert_eq!(st["assignedHub"], "hub-a.example");
    assert_eq!(st["deviceId"], "custom-device-id");
    assert_eq!(st["substatus"], "initialAssignment");
    assert_eq!(st["registrationId"], "mqtt-dev-1");
    assert_eq!(st["payload"]["model"], "x1");
    assert!(st.get("_operationId").is_none() && st.get("_enrollmentGroupId").is_none());
    let op = body["operationId"].as_str().unwrap().to_string();

    // The operation resolves on a poll (over a new connection, possibly another shard).
    drop(c);
    let mut c = connect(&s, "mqtt-dev-1", KEY);
    let (status, _, polled) = c.poll("2", &op);
    assert_eq!(status, 200);
    assert_eq!(polled["operationId"], op.as_str());
    assert_eq!(polled["registrationState"]["assignedHub"], "hub-a.example");
    let (status, _, err) = c.poll("3", "1.0000000000000000.6e6f6e65");
    assert_eq!((status, err["errorCode"].as_u64()), (404, Some(404202)));

    // Recorded durably and visible through the service API.
    let (st, reg) = status_json(s.send("GET", "/registrations/mqtt-dev-1", None));
    assert_eq!(st, 200);
    assert_eq!(reg["status"], "assigned");
    assert_eq!(reg["assignedHub"], "hub-a.example");
    let (_, e) = status_json(s.send("GET", "/enrollments/mqtt-dev-1", None));
    assert_eq!(e["registrationState"]["deviceId"], "custom-device-id");
}

#[test]
fn group_enrollment_with_derived_keys_and_precedence() {
    let s = server_with_hubs(&["hub-a.example", "hub-b.example"]);
    let g = json!({"enrollmentGroupId": "grp", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}});
    assert_eq!(s.send("PUT", "/enrollmentGroups/grp", Some(g)).status().as_u16(), 200);
    for i in 0..6 {
        let id = format!("grp-dev-{i}");
        let mut c = connect(&s, &id, &group_key_for(&id));
        let (status, _, body) = c.register("1", b"");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "assigned");
        assert_eq!(body["registrationState"]["symmetricKey"]["enrollmentGroupId"], "grp");
        assert!(body["registrationState"]["assignedHub"].as_str().unwrap().starts_with("hub-"));
        // Hashed allocation is stable for a registration id.
        let (_, _, again) = c.register("2", b"");
        assert_eq!(again["registrationState"]["assignedHub"], body["registrationState"]["assignedHub"]);
    }
    let (_, regs) = status_json(s.send("POST", "/registrations/grp/query", None));
    assert_eq!(regs.as_array().unwrap().len(), 6);

    // The group key itself (not derived) is refused.
    let mut c = connect(&s, "grp-dev-x", GROUP_KEY);
    let (status, _, err) = c.register("1", b"");
    assert_eq!((status, err["errorCode"].as_u64()), (401, Some(401002)));

    // A disabled individual enrollment blocks a device its group would admit.
    enroll(&s, "grp-dev-0", json!({"provisioningStatus": "disabled"}));
    let mut c = connect(&s, "grp-dev-0", KEY);
    let (status, _, body) = c.register("1", b"");
    assert_eq!((status, body["status"].as_str()), (200, Some("disabled")));
    // ... and its group key no longer gets it in.
    let mut c = connect(&s, "grp-dev-0", &group_key_for("grp-dev-0"));
    assert_eq!(c.register("1", b"").0, 401);
}

#[test]
fn refusals_on_the_response_topic() {
    let s = server_with_hubs(&["hub-a.example"]);
    enroll(&s, "dev-ok", json!({}));
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ==";
    let mut c = connect(&s, "dev-ok", wrong);
    let (status, _, err) = c.register("1", b"");
    assert_eq!((status, err["errorCode"].as_u64()), (401, Some(401002)));
    assert!(err["trackingId"].is_string());
    // Unknown registration id.
    let mut c = connect(&s, "nobody", KEY);
    assert_eq!(c.register("1", b"").0, 401);
    // Unknown ID scope: refused at CONNACK (5), before any slot is spent on it.
    let mut c = MqttClient::open(s.ep.ports.mqtt, s.ep.ca_certificate.as_ref().unwrap());
    assert_eq!(c.connect("0ne00000000", "dev-ok", "dev-ok", &device_token("0ne00000000", "dev-ok", KEY)), 5);
    assert!(c.closed());
    // An expired token.
    let mut c = MqttClient::open(s.ep.ports.mqtt, s.ep.ca_certificate.as_ref().unwrap());
    let expired = {
        use base64::Engine;
        let k = base64::engine::general_purpose::STANDARD.decode(KEY).unwrap();
        dps_core::sas::build(&format!("{}/registrations/dev-ok", s.ep.id_scope), &k, 1000, Some("registration"))
    };
    assert_eq!(c.connect(&s.ep.id_scope, "dev-ok", "dev-ok", &expired), 0);
    c.subscribe();
    assert_eq!(c.register("1", b"").0, 401);
    // A registration id in the body that is not the device's.
    let mut c = connect(&s, "dev-ok", KEY);
    assert_eq!(c.register("1", br#"{"registrationId":"someone-else"}"#).0, 400);
    assert_eq!(c.register("2", b"{not json").0, 400);
    // A registration the service API disables is seen by the very next register.
    let (_, cur) = status_json(s.send("GET", "/enrollments/dev-ok", None));
    let mut upd = cur.clone();
    upd["provisioningStatus"] = json!("disabled");
    upd["attestation"] = json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}});
    let r = s.req("PUT", "/enrollments/dev-ok").header("If-Match", cur["etag"].as_str().unwrap()).body(upd.to_string()).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(c.register("3", b"").2["status"], "disabled");
}

#[test]
fn no_linked_hub_fails_with_400208() {
    let s = server_with_hubs(&[]);
    enroll(&s, "lonely", json!({}));
    let mut c = connect(&s, "lonely", KEY);
    let (status, _, body) = c.register("1", b"");
    assert_eq!(status, 200);
    assert_eq!(body["status"], "failed");
    assert_eq!(body["registrationState"]["errorCode"], 400208);
}

#[test]
fn polling_limit_answers_429_with_retry_after() {
    let s = server_with_hubs(&["hub-a.example"]);
    enroll(&s, "poller", json!({}));
    let mut c = connect(&s, "poller", KEY);
    let (_, _, body) = c.register("1", b"");
    let op = body["operationId"].as_str().unwrap().to_string();
    let mut statuses = Vec::new();
    let mut topic429 = String::new();
    for i in 0..7 {
        let (st, topic, _) = c.poll(&i.to_string(), &op);
        if st == 429 {
            topic429 = topic;
        }
        statuses.push(st);
    }
    assert_eq!(&statuses[..5], &[200; 5]);
    assert_eq!(statuses[5], 429);
    let retry: u64 = topic429.split("retry-after=").nth(1).unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry));
}

#[test]
fn bad_connects_and_bad_packets() {
    let s = server_with_hubs(&["hub-a.example"]);
    enroll(&s, "dev-ok", json!({}));
    let ca = s.ep.ca_certificate.clone().unwrap();
    let port = s.ep.ports.mqtt;
    let token = device_token(&s.ep.id_scope, "dev-ok", KEY);
    // Client id differs from the registration id: CONNACK 2.
    assert_eq!(MqttClient::open(port, &ca).connect(&s.ep.id_scope, "dev-ok", "other", &token), 2);
    // A password that is not a SAS token: CONNACK 5.
    assert_eq!(MqttClient::open(port, &ca).connect(&s.ep.id_scope, "dev-ok", "dev-ok", "hunter2"), 5);
    // Garbage instead of CONNECT: closed.
    let mut c = MqttClient::open(port, &ca);
    c.write_raw(b"\xff\xff\xff\xff\xff garbage");
    assert!(c.closed());
    // A packet over 96 KB: closed before it is buffered.
    let mut c = connect(&s, "dev-ok", KEY);
    c.write_raw(&[0x32, 0xff, 0xff, 0xff, 0x7f]);
    assert!(c.closed());
    // Publish to a topic DPS does not serve: closed.
    let mut c = connect(&s, "dev-ok", KEY);
    let mut p = mqttbytes::v4::Publish::new("devices/dev-ok/messages/events/", mqttbytes::QoS::AtMostOnce, b"x".to_vec());
    p.pkid = 0;
    let mut out = bytes::BytesMut::new();
    p.write(&mut out).unwrap();
    c.write_raw(&out);
    assert!(c.closed());
    // QoS 2: closed.
    let mut c = connect(&s, "dev-ok", KEY);
    let mut p = mqttbytes::v4::Publish::new("$dps/registrations/PUT/iotdps-register/?$rid=1", mqttbytes::QoS::ExactlyOnce, b" ".to_vec());
    p.pkid = 9;
    let mut out = bytes::BytesMut::new();
    p.write(&mut out).unwrap();
    c.write_raw(&out);
    assert!(c.closed());
    // Everyone else is still served.
    let mut c = connect(&s, "dev-ok", KEY);
    assert_eq!(c.register("1", b"").0, 200);
}

#[test]
fn mqtt_over_websocket_on_the_https_port() {
    use base64::Engine;
    use std::io::{Read, Write};
    let s = server_with_hubs(&["hub-a.example"]);
    enroll(&s, "ws-dev", json!({}));
    let mut tls = open_tls(&s, s.ep.ports.https);
    // The C SDK offers the subprotocol in upper case; it must be echoed as offered.
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
    let req = format!(
        "GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: MQTT\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("Sec-WebSocket-Protocol: MQTT\r\n"), "{head}");
    assert!(head.contains(&format!("Sec-WebSocket-Accept: {}", dps_core::websocket::accept_key(&key))), "{head}");

    // MQTT packets inside masked binary frames, split across frames to check reassembly.
    let mask = [9u8, 8, 7, 6];
    let frame = |payload: &[u8]| {
        let mut f = vec![0x82u8];
        assert!(payload.len() < 126);
        f.push(0x80 | payload.len() as u8);
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    let mut connect = mqttbytes::v4::Connect::new("ws-dev");
    connect.login = Some(mqttbytes::v4::Login::new(
        format!("{}/registrations/ws-dev/api-version=2019-03-31", s.ep.id_scope),
        device_token(&s.ep.id_scope, "ws-dev", KEY),
    ));
    let mut out = bytes::BytesMut::new();
    connect.write(&mut out).unwrap();
    let mut sub = mqttbytes::v4::Subscribe::new("$dps/registrations/res/#", mqttbytes::QoS::AtLeastOnce);
    sub.pkid = 1;
    sub.write(&mut out).unwrap();
    let mut publish =
        mqttbytes::v4::Publish::new("$dps/registrations/PUT/iotdps-register/?$rid=1", mqttbytes::QoS::AtMostOnce, b" ".to_vec());
    publish.pkid = 0;
    publish.write(&mut out).unwrap();
    for chunk in out.chunks(100) {
        tls.write_all(&frame(chunk)).unwrap();
    }
    // A ping in between is answered with a pong.
    tls.write_all(&[0x89, 0x80, 1, 2, 3, 4]).unwrap();
    tls.flush().unwrap();
    // Read server frames until the response PUBLISH arrives.
    let mut mqtt = bytes::BytesMut::new();
    let mut pong = false;
    let mut done = false;
    while !(done && pong) {
        let mut h = [0u8; 2];
        tls.read_exact(&mut h).unwrap();
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                tls.read_exact(&mut l).unwrap();
                u16::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        tls.read_exact(&mut payload).unwrap();
        match h[0] & 0x0f {
            0x0a => pong = true,
            0x02 => mqtt.extend_from_slice(&payload),
            other => panic!("unexpected opcode {other}"),
        }
        while let Ok(p) = mqttbytes::v4::read(&mut mqtt, 1 << 20) {
            if let mqttbytes::v4::Packet::Publish(p) = p {
                assert_eq!(p.topic, "$dps/registrations/res/200/?$rid=1");
                let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(body["registrationState"]["assignedHub"], "hub-a.example");
                done = true;
            }
        }
    }
}

#[test]
fn websocket_upgrade_without_a_supported_subprotocol_is_refused() {
    let s = server_with_hubs(&[]);
    let r = s
        .client
        .get(format!("https://localhost:{}/$iothub/websocket", s.ep.ports.https))
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Protocol", "chat")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[test]
fn group_and_hub_changes_are_seen_by_the_very_next_registration() {
    let s = server_with_hubs(&[]);
    let id = "late-dev";
    // Both shards cache "no groups, no hubs" after these (a refused device's connection ends,
    // so each attempt is a new connection, landing on either shard).
    for rid in 0..4 {
        assert_eq!(connect(&s, id, &group_key_for(id)).register(&rid.to_string(), b"").0, 401);
    }
    let mut c = connect(&s, id, &group_key_for(id));
    let g = json!({"enrollmentGroupId": "late", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}});
    assert_eq!(s.send("PUT", "/enrollmentGroups/late", Some(g)).status().as_u16(), 200);
    let (st, _, body) = c.register("5", b"");
    assert_eq!((st, body["status"].as_str()), (200, Some("failed")), "admitted now, but no hub yet");
    let hub = json!({"connectionString": "HostName=hub-late.example;SharedAccessKeyName=o;SharedAccessKey=aHViLWtleQ=="});
    assert_eq!(s.send("PUT", "/linkedHubs/hub-late.example", Some(hub)).status().as_u16(), 200);
    let (_, _, body) = c.register("6", b"");
    assert_eq!(body["registrationState"]["assignedHub"], "hub-late.example");
    assert_eq!(s.send("DELETE", "/enrollmentGroups/late", None).status().as_u16(), 204);
    assert_eq!(c.register("7", b"").0, 401);
}

#[test]
fn geo_latency_sends_devices_to_the_measured_hub() {
    // "localhost" answers on the probe port; the other hub cannot be resolved, so it has no
    // measurement and ranks last.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = test_config();
    cfg.limits.service_operations_per_minute = 0;
    cfg.limits.hub_latency_port = probe.local_addr().unwrap().port();
    cfg.limits.hub_latency_refresh_secs = 1;
    cfg.linked_hubs = vec![hub("localhost"), hub("unreachable.invalid")];
    let s = TestServer::start(cfg);
    let g = json!({"enrollmentGroupId": "geo", "allocationPolicy": "geoLatency",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}});
    assert_eq!(s.send("PUT", "/enrollmentGroups/geo", Some(g)).status().as_u16(), 200);
    // Wait for the first measurement round.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut c = connect(&s, "geo-probe", &group_key_for("geo-probe"));
        if c.register("1", b"").2["registrationState"]["assignedHub"] == "localhost" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no latency measurement arrived");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for i in 0..20 {
        let id = format!("geo-dev-{i}");
        let mut c = connect(&s, &id, &group_key_for(&id));
        assert_eq!(c.register("1", b"").2["registrationState"]["assignedHub"], "localhost", "{id}");
    }
}

#[test]
fn enrollment_changes_reach_every_shard_partition() {
    let s = server_with_hubs(&["hub-a.example"]);
    let new_key = "bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleSE=";
    for i in 0..8 {
        enroll(&s, &format!("part-{i}"), json!({}));
    }
    // Warm every partition through connections that land on both shards.
    for i in 0..8 {
        for _ in 0..3 {
            assert_eq!(connect(&s, &format!("part-{i}"), KEY).register("1", b"").0, 200);
        }
    }
    // Re-key every enrollment with updateIfMatchETag-free bulk update; then old keys fail and
    // new ones work, on whichever shard the device lands.
    let items: Vec<_> = (0..8)
        .map(|i| json!({"registrationId": format!("part-{i}"), "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": new_key, "secondaryKey": new_key}}}))
        .collect();
    let (st, v) = status_json(s.send("POST", "/enrollments", Some(json!({"mode": "update", "enrollments": items}))));
    assert_eq!((st, v["isSuccessful"].as_bool()), (200, Some(true)));
    for i in 0..8 {
        for _ in 0..3 {
            assert_eq!(connect(&s, &format!("part-{i}"), KEY).register("1", b"").0, 401, "old key of part-{i}");
            assert_eq!(connect(&s, &format!("part-{i}"), new_key).register("1", b"").0, 200, "new key of part-{i}");
        }
    }
    // Deleting an enrollment is seen at once too.
    assert_eq!(s.send("DELETE", "/enrollments/part-3", None).status().as_u16(), 204);
    for _ in 0..3 {
        assert_eq!(connect(&s, "part-3", new_key).register("1", b"").0, 401);
    }
}

#[test]
fn registration_rate_limit_answers_429() {
    let mut cfg = test_config();
    cfg.shards = 1;
    cfg.limits.service_operations_per_minute = 0;
    cfg.limits.registrations_per_minute = 3;
    cfg.linked_hubs = vec![hub("hub-a.example")];
    let s = TestServer::start(cfg);
    enroll(&s, "rated", json!({}));
    let mut c = connect(&s, "rated", KEY);
    let statuses: Vec<u16> = (0..5).map(|i| c.register(&i.to_string(), b"").0).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let (_, topic, body) = c.register("9", b"");
    assert!(topic.contains("&retry-after="), "{topic}");
    assert_eq!(body["errorCode"], 429001);
}

#[test]
fn silent_mqtt_connections_are_closed() {
    let mut cfg = test_config();
    cfg.limits.handshake_timeout_secs = 1;
    cfg.limits.idle_timeout_secs = 1;
    let s = TestServer::start(cfg);
    // No TLS handshake at all.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", s.ep.ports.mqtt)).unwrap();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    use std::io::Read;
    assert!(matches!(raw.read(&mut b), Ok(0) | Err(_)));
    // TLS but no CONNECT: closed after the idle timeout.
    let mut c = MqttClient::open(s.ep.ports.mqtt, s.ep.ca_certificate.as_ref().unwrap());
    let t = std::time::Instant::now();
    assert!(c.closed());
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

/// The listeners defer the accept until the client's first bytes arrive (TCP_DEFER_ACCEPT),
/// so the shard wakes once for the connection and its ClientHello: a connection that has
/// sent nothing is not handed to the gateway yet; its first bytes hand it over.
#[test]
fn a_connection_is_accepted_with_its_first_bytes() {
    let s = TestServer::start(test_config());
    let accepted = || counter(&s, "dps_connections_accepted_total", &[]);
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", s.ep.ports.mqtt)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(accepted(), 0.0, "a silent connection waits in the kernel");
    use std::io::Write;
    raw.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    let t = std::time::Instant::now();
    while accepted() < 1.0 {
        assert!(t.elapsed() < std::time::Duration::from_millis(500), "accepted as its first bytes came");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_flood_of_requests_is_answered_in_order_and_others_are_served() {
    let s = server_with_hubs(&["hub-a.example"]);
    enroll(&s, "flooder", json!({}));
    enroll(&s, "bystander", json!({}));
    let mut c = connect(&s, "flooder", KEY);
    let mut out = bytes::BytesMut::new();
    for i in 1..=200u16 {
        let mut p = mqttbytes::v4::Publish::new(
            format!("$dps/registrations/PUT/iotdps-register/?$rid={i}"),
            mqttbytes::QoS::AtLeastOnce,
            b" ".to_vec(),
        );
        p.pkid = i;
        p.write(&mut out).unwrap();
    }
    c.write_raw(&out);
    let mut responses = 0;
    let mut acks = 0;
    while responses < 200 {
        match c.read() {
            Some(mqttbytes::v4::Packet::PubAck(_)) => acks += 1,
            Some(mqttbytes::v4::Packet::Publish(p)) => {
                responses += 1;
                assert_eq!(p.topic, format!("$dps/registrations/res/200/?$rid={responses}"), "answers in request order");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acks, 200);
    let mut other = connect(&s, "bystander", KEY);
    assert_eq!(other.register("1", b"").0, 200);
}

/// With point reads on the shard (fjall's default) an enrollment owned by the other shard is
/// read from the store, not asked of its owner (two shard wake-ups saved per registration),
/// and a key rolled through the service API is obeyed at once either way. The same traffic
/// with point reads on the reader threads does ask the owners, so the count can fail.
#[test]
fn enrollment_lookups_read_the_store_instead_of_waking_the_owner() {
    const OTHER: &str = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXkhIQ==";
    for inline in [true, false] {
        let mut cfg = test_config();
        cfg.limits.service_operations_per_minute = 0;
        cfg.store.inline_point_reads = inline;
        cfg.linked_hubs = vec![hub("hub-a.example")];
        let s = TestServer::start(cfg);
        // 16 devices, each registering twice: with two shards, some land away from their owner.
        for i in 0..16 {
            let id = format!("spread-{i}");
            enroll(&s, &id, json!({}));
            for n in 0..2 {
                assert_eq!(connect(&s, &id, KEY).register(&n.to_string(), b"").0, 200, "{id}");
            }
            // The key rolled: the old one is refused and the new one taken on the next
            // registration, whichever shard it reaches.
            s.put_enrollment(&id, OTHER, OTHER, json!({}));
            for n in 2..4 {
                assert_eq!(connect(&s, &id, KEY).register(&n.to_string(), b"").0, 401, "{id}: old key after the roll");
                assert_eq!(connect(&s, &id, OTHER).register(&n.to_string(), b"").0, 200, "{id}: new key after the roll");
            }
        }
        let hops = counter(&s, "dps_cross_shard_lookups_total", &[]);
        match inline {
            true => assert_eq!(hops, 0.0, "no lookup asked another shard"),
            false => assert!(hops > 0.0, "without point reads on the shard, owners are asked"),
        }
    }
}

#[test]
fn metrics_are_merged_across_shards() {
    let s = server_with_hubs(&["hub-a.example"]);
    enroll(&s, "metered", json!({}));
    for i in 0..4 {
        assert_eq!(connect(&s, "metered", KEY).register(&i.to_string(), b"").0, 200);
    }
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ==";
    assert_eq!(connect(&s, "metered", wrong).register("1", b"").0, 401);
    let text = reqwest::blocking::get(format!("http://127.0.0.1:{}/metrics", s.ep.ports.admin)).unwrap().text().unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
    };
    assert_eq!(value("dps_registration_attempts_total{protocol=\"mqtt\",status=\"success\"}"), 4.0);
    assert_eq!(value("dps_registration_attempts_total{protocol=\"mqtt\",status=\"failure\"}"), 1.0);
    assert_eq!(value("dps_attestation_attempts_total{protocol=\"mqtt\",attestation=\"symmetricKey\",status=\"failure\"}"), 1.0);
    assert_eq!(value("dps_device_assignments_total{hub=\"hub-a.example\"}"), 4.0);
    assert!(value("dps_store_commit_groups_total") >= 1.0);
    // The commit latency histogram: cumulative buckets ending in +Inf, which equals the count.
    let groups = value("dps_store_commit_groups_total");
    assert_eq!(value("dps_store_commit_latency_seconds_bucket{le=\"+Inf\"}"), groups);
    assert_eq!(value("dps_store_commit_latency_seconds_count"), groups);
    assert!(value("dps_store_commit_latency_seconds_bucket{le=\"0.25\"}") <= groups);
    // Both shards report their cross-shard queue (idle now) and the stall counters exist.
    assert_eq!(value("dps_cross_shard_pending{shard=\"0\"}"), 0.0);
    assert_eq!(value("dps_cross_shard_pending{shard=\"1\"}"), 0.0);
    assert!(text.contains("# TYPE dps_shard_stalls counter"));
    // Valid exposition (OpenMetrics, as prometheus-client writes it), checked twice:
    // (1) by the OpenMetrics parser of Prometheus's Python client, which is strict about the
    // format (families, suffixes, escapes, `# EOF`); (2) by `promtool check metrics`
    // (scripts/deps.sh installs it), which parses the classic text format and lints names,
    // units and types. Its one complaint that is a format difference, not a defect: a counter's
    // HELP is on its family name (`# HELP x`, samples `x_total`), as OpenMetrics puts it.
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/interop/.venv/bin/python");
    let script = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
                  fams = list(p(sys.stdin.read()))\nprint(len(fams))";
    let parsed = pipe(python, &["-c", script], &text);
    assert!(parsed.status.success(), "OpenMetrics parser: {}", String::from_utf8_lossy(&parsed.stderr));
    let families: usize = String::from_utf8_lossy(&parsed.stdout).trim().parse().unwrap();
    assert_eq!(families, text.lines().filter(|l| l.starts_with("# TYPE ")).count(), "every family parsed");
    let checked = pipe("promtool", &["check", "metrics"], &text);
    let problems = String::from_utf8_lossy(&checked.stdout).to_string() + &String::from_utf8_lossy(&checked.stderr);
    for line in problems.lines().filter(|l| !l.trim().is_empty()) {
        let family_help = line
            .strip_suffix(" no help text")
            .and_then(|m| m.strip_suffix("_total"))
            .is_some_and(|family| text.contains(&format!("# HELP {family} ")));
        assert!(family_help, "promtool check metrics: {line}\n{problems}");
    }
    // Connections were spread over both shards, and each shard's counts are in the sum.
    let accepted: f64 = text
        .lines()
        .filter(|l| l.starts_with("dps_connections_accepted_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(accepted >= 5.0, "{text}");
    assert!(text.contains("# TYPE dps_connections_open gauge"));
    assert_eq!(reqwest::blocking::get(format!("http://127.0.0.1:{}/other", s.ep.ports.admin)).unwrap().status().as_u16(), 404);
}

#[test]
fn a_pipelined_registration_is_answered_in_one_tls_record() {
    // Regression: the session's answers (CONNACK, SUBACK, PUBACK) were written before the
    // request was carried out, and the response after it: two TLS records and two writes per
    // registration where one does, 15% of the throughput in `dps-bench`. Read the raw TCP bytes
    // and count the records that carry MQTT data.
    // Regression too: the session ticket that ends a TLS 1.3 handshake left alone, as soon as
    // the handshake completed, waking the client once more. The client here sends its Finished
    // and the MQTT opening in one write, as loadgen does; the ticket, CONNACK, SUBACK, PUBACK
    // and the response must come in one TCP read.
    use std::io::{Read, Write};
    let s = server_with_hubs(&["hub-a.example"]);
    enroll(&s, "pipelined", json!({}));
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", s.ep.ports.mqtt)).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut tls = rustls::ClientConnection::new(
        common::mqtt_client::tls_config(s.ep.ca_certificate.as_ref().unwrap()),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    // ClientHello out, the server's flight in; the Finished stays queued for the opening.
    tls.write_tls(&mut tcp).unwrap();
    while tls.is_handshaking() {
        tls.read_tls(&mut tcp).unwrap();
        tls.process_new_packets().unwrap();
    }
    let mut wire = bytes::BytesMut::new();
    let user = format!("{}/registrations/pipelined/api-version=2019-03-31", s.ep.id_scope);
    let mut c = mqttbytes::v4::Connect::new("pipelined");
    c.login = Some(mqttbytes::v4::Login::new(user, device_token(&s.ep.id_scope, "pipelined", KEY)));
    c.write(&mut wire).unwrap();
    mqttbytes::v4::Subscribe::new("$dps/registrations/res/#", mqttbytes::QoS::AtLeastOnce).write(&mut wire).unwrap();
    let mut p = mqttbytes::v4::Publish::new("$dps/registrations/PUT/iotdps-register/?$rid=1", mqttbytes::QoS::AtLeastOnce, "{}");
    p.pkid = 2;
    p.write(&mut wire).unwrap();
    tls.writer().write_all(&wire).unwrap();
    let mut flight = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut flight).unwrap();
    }
    tcp.write_all(&flight).unwrap();
    // Raw records until the response has arrived; each is handed to rustls alone.
    let (mut raw, mut plain, mut records_with_data, mut reads) = (Vec::new(), Vec::new(), 0, 0);
    let mut chunk = [0u8; 16384];
    let mut packets = Vec::new();
    while !packets.iter().any(|p| matches!(p, mqttbytes::v4::Packet::Publish(_))) {
        let n = tcp.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the response");
        reads += 1;
        raw.extend_from_slice(&chunk[..n]);
        while raw.len() >= 5 && raw.len() >= 5 + usize::from(u16::from_be_bytes([raw[3], raw[4]])) {
            let len = 5 + usize::from(u16::from_be_bytes([raw[3], raw[4]]));
            let record: Vec<u8> = raw.drain(..len).collect();
            tls.read_tls(&mut &record[..]).unwrap();
            tls.process_new_packets().unwrap();
            let before = plain.len();
            let _ = tls.reader().read_to_end(&mut plain);
            if plain.len() > before {
                records_with_data += 1;
            }
        }
        let mut buf = bytes::BytesMut::from(&plain[..]);
        packets.clear();
        while let Ok(p) = mqttbytes::v4::read(&mut buf, 1 << 20) {
            packets.push(p);
        }
    }
    let kinds: Vec<&str> = packets
        .iter()
        .map(|p| match p {
            mqttbytes::v4::Packet::ConnAck(_) => "CONNACK",
            mqttbytes::v4::Packet::SubAck(_) => "SUBACK",
            mqttbytes::v4::Packet::PubAck(_) => "PUBACK",
            mqttbytes::v4::Packet::Publish(_) => "PUBLISH",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["CONNACK", "SUBACK", "PUBACK", "PUBLISH"]);
    assert_eq!(records_with_data, 1, "CONNACK, SUBACK, PUBACK and the response in one TLS record");
    assert_eq!(reads, 1, "the session ticket came apart from the answer");
}

#[test]
fn a_client_that_trickles_bytes_is_closed_at_the_login_deadline() {
    // Regression: each byte reset the read deadline, so a client sending one byte now and then
    // held its connection (and a slot) forever without ever sending a whole CONNECT.
    let mut cfg = test_config();
    cfg.limits.login_timeout_secs = 2;
    cfg.limits.idle_timeout_secs = 60;
    let s = TestServer::start(cfg);
    let mut c = MqttClient::open(s.ep.ports.mqtt, s.ep.ca_certificate.as_ref().unwrap());
    // A CONNECT announcing 100 bytes, fed a byte every 300 ms.
    c.write_raw(&[0x10, 100]);
    let closed = trickle_until_closed(&mut c.tls, std::iter::repeat_n(0, 26));
    let closed = closed.unwrap_or_else(|| panic!("still open after 8 s of trickling"));
    assert!(closed < std::time::Duration::from_secs(6), "closed at the 2 s login deadline, not later: {closed:?}");
    assert_eq!(counter(&s, "dps_login_timeouts_total", &[("protocol", "mqtt"), ("waiting_for", "connect")]), 1.0);
}

/// Runs `program args` with `input` on its stdin; its output.
fn pipe(program: &str, args: &[&str], input: &str) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/deps.sh and tests/interop/setup.sh install it)"));
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_refused_device_is_disconnected_shortly_after_its_answer() {
    // Regression: a device whose key was refused kept its connection (and a slot) for as long
    // as its keep-alive asked (up to 450 s), though its credential, sent in CONNECT, can only be
    // refused again on that connection.
    let mut cfg = test_config();
    cfg.limits.refused_close_secs = 1;
    cfg.limits.idle_timeout_secs = 60;
    cfg.linked_hubs = vec![hub("hub-a.example")];
    let s = TestServer::start(cfg);
    enroll(&s, "refused", json!({}));
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ==";
    let mut c = connect(&s, "refused", wrong);
    let t = std::time::Instant::now();
    assert_eq!(c.register("1", b"").0, 401, "the refusal is answered first");
    match c.read_within(std::time::Duration::from_secs(10)) {
        Some(None) => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
    let waited = t.elapsed();
    assert!(waited >= std::time::Duration::from_millis(900), "not at once: the SDK must read the answer first ({waited:?})");
    assert!(waited < std::time::Duration::from_secs(5), "closed about 1 s after the refusal, not at the keep-alive ({waited:?})");
    // An accepted device keeps its connection past that time (it may poll on it).
    let mut ok = connect(&s, "refused", KEY);
    assert_eq!(ok.register("1", b"").0, 200);
    assert!(ok.read_within(std::time::Duration::from_secs(2)).is_none(), "an accepted device's connection stays open");
}
