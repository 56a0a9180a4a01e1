#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The HTTPS device API on the HTTPS port, beside the service API.

mod common;
use common::mqtt_client::{device_token, tls_config};
use common::*;
use serde_json::json;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn server() -> TestServer {
    let mut cfg = test_config();
    cfg.linked_hubs.push(hub("hub-a.example"));
    TestServer::start(cfg)
}

#[test]
fn register_poll_and_lookup_over_https() {
    let s = server();
    let e = json!({"registrationId": "http-dev", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}});
    assert_eq!(s.send("PUT", "/enrollments/http-dev", Some(e)).status().as_u16(), 200);
    let base = format!("https://localhost:{}/{}/registrations/http-dev", s.ep.ports.https, s.ep.id_scope);
    let token = device_token(&s.ep.id_scope, "http-dev", KEY);
    let r = s
        .client
        .put(format!("{base}/register?api-version=2019-03-31"))
        .header("Authorization", &token)
        .header("Content-Type", "application/json; charset=utf-8")
        .body(r#"{"registrationId":"http-dev"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "C# and AIS accept only 202 for register");
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(r.headers()["content-type"].to_str().unwrap().contains("application/json"));
    let (_, v) = status_json(r);
    assert_eq!(v["status"], "assigning");
    let op = v["operationId"].as_str().unwrap().to_string();

    let r = s.client.get(format!("{base}/operations/{op}?api-version=2019-03-31")).header("Authorization", &token).send().unwrap();
    let (st, v) = status_json(r);
    assert_eq!((st, v["status"].as_str()), (200, Some("assigned")));
    assert_eq!(v["registrationState"]["assignedHub"], "hub-a.example");

    let r = s.client.post(format!("{base}?api-version=2019-03-31")).header("Authorization", &token).body("{}").send().unwrap();
    let (st, v) = status_json(r);
    assert_eq!((st, v["assignedHub"].as_str(), v["status"].as_str()), (200, Some("hub-a.example"), Some("assigned")));

    // Refusals: wrong key, no token, unknown ID scope.
    let wrong = device_token(&s.ep.id_scope, "http-dev", "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ==");
    let r = s.client.put(format!("{base}/register?api-version=2019-03-31")).header("Authorization", wrong).body("{}").send().unwrap();
    let (st, v) = status_json(r);
    assert_eq!((st, v["errorCode"].as_u64()), (401, Some(401002)));
    let r = s.client.put(format!("{base}/register?api-version=2019-03-31")).body("{}").send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let other = format!("https://localhost:{}/0ne00000000/registrations/http-dev/register?api-version=2019-03-31", s.ep.ports.https);
    let r = s.client.put(other).header("Authorization", device_token("0ne00000000", "http-dev", KEY)).body("{}").send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Malformed body.
    let r = s.client.put(format!("{base}/register?api-version=2019-03-31")).header("Authorization", &token).body("{nope").send().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // An oversized register body: 413 with the DPS error code, not a reset.
    let big = format!("{{\"registrationId\":\"http-dev\",\"payload\":\"{}\"}}", "x".repeat(200 * 1024));
    let r = s.client.put(format!("{base}/register?api-version=2019-03-31")).header("Authorization", &token).body(big).send().unwrap();
    let (st, v) = status_json(r);
    assert_eq!((st, v["errorCode"].as_u64()), (413, Some(413001)));
    // A malformed request head: 400.
    {
        use std::io::{Read, Write};
        let tcp = std::net::TcpStream::connect(("127.0.0.1", s.ep.ports.https)).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let conn =
            rustls::ClientConnection::new(tls_config(s.ep.ca_certificate.as_ref().unwrap()), "localhost".try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(b"PUT /x/registrations/y/register HTTP/1.1\r\nContent-Length: nope\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        assert!(out.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&out));
    }
    // The service API still answers on the same port.
    assert_eq!(s.send("GET", "/registrations/http-dev", None).status().as_u16(), 200);
}
