#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The HTTPS device API on the HTTPS port, beside the service API.

mod common;
use common::mqtt_client::{device_token, tls_config};
use common::*;
use serde_json::json;
use std::io::{Read, Write};

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
        let mut tls = open_tls(&s, s.ep.ports.https);
        tls.write_all(b"PUT /x/registrations/y/register HTTP/1.1\r\nContent-Length: nope\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        assert!(out.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&out));
    }
    // The service API still answers on the same port.
    assert_eq!(s.send("GET", "/registrations/http-dev", None).status().as_u16(), 200);
}

#[test]
fn one_source_address_cannot_take_every_slot() {
    // Regression: connection slots were only capped per shard (50,000), shared by everybody:
    // one host holding idle connections starved every other device and the operators. Now one
    // source address holds at most `limits.max_connections_per_source`; the rest of its
    // connections are closed at accept, and others are served.
    let mut cfg = test_config();
    cfg.linked_hubs.push(hub("hub-a.example"));
    cfg.limits.max_connections_per_source = 200;
    let s = TestServer::start(cfg);
    let e = json!({"registrationId": "other-host", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}});
    assert_eq!(s.send("PUT", "/enrollments/other-host", Some(e)).status().as_u16(), 200);
    // 2,000 stalled connections (a handshake begun, then nothing) from 127.0.0.1 on the MQTT and HTTPS ports.
    let idle: Vec<std::net::TcpStream> = (0..2000)
        .map(|i| {
            let port = if i % 2 == 0 { s.ep.ports.mqtt } else { s.ep.ports.https };
            stalled_connection(port)
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let closed = idle
        .iter()
        .filter(|c| {
            use std::io::Read;
            // Closed by the server: end of stream, or a reset (it closed with the client's
            // first byte unread); admitted and stalled: the read times out.
            c.set_read_timeout(Some(std::time::Duration::from_millis(20))).unwrap();
            match (&**c).read(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        })
        .count();
    assert!(closed >= 1_700, "only {closed} of 2,000 connections from one source were refused");
    // A device on another address provisions, and the operators (a third address) are served.
    let from = |ip: [u8; 4]| {
        let ca = std::fs::read(s.ep.ca_certificate.as_ref().unwrap()).unwrap();
        reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .local_address(std::net::IpAddr::from(ip))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let device = from([127, 0, 0, 2]);
    let base = format!("https://localhost:{}/{}/registrations/other-host", s.ep.ports.https, s.ep.id_scope);
    let token = device_token(&s.ep.id_scope, "other-host", KEY);
    let started = std::time::Instant::now();
    let r = device.put(format!("{base}/register?api-version=2019-03-31")).header("Authorization", &token).body("{}").send().unwrap();
    let (st, v) = status_json(r);
    assert_eq!(st, 202, "{v}");
    let op = v["operationId"].as_str().unwrap();
    let r = device.get(format!("{base}/operations/{op}?api-version=2019-03-31")).header("Authorization", &token).send().unwrap();
    let (st, v) = status_json(r);
    assert_eq!((st, v["status"].as_str()), (200, Some("assigned")), "{v}");
    println!("provisioned from 127.0.0.2 in {:?} (including the 1 s Retry-After)", started.elapsed());
    let operator = from([127, 0, 0, 3]);
    let url = format!("https://localhost:{}/enrollments/other-host?{API}", s.ep.ports.https);
    assert_eq!(operator.get(url).header("Authorization", s.token()).send().unwrap().status().as_u16(), 200);
    drop(idle);
}

#[test]
fn the_service_api_keeps_connections_of_its_own() {
    // Regression: one connection budget per shard served devices and operators alike, so
    // connections filling the shard (from many addresses, past any per-source limit) locked
    // the operators out of the service API too. Now HTTPS connections over the budget go into
    // the service API's reserve, where a device request is answered 503 and a service API
    // request is served.
    let mut cfg = test_config();
    cfg.shards = 1;
    cfg.linked_hubs.push(hub("hub-a.example"));
    cfg.limits.max_connections_per_shard = 20;
    cfg.limits.service_api_connections_per_shard = 4;
    cfg.limits.max_connections_per_source = 0;
    let s = TestServer::start(cfg);
    let e = json!({"registrationId": "full-dev", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}});
    assert_eq!(s.send("PUT", "/enrollments/full-dev", Some(e)).status().as_u16(), 200);
    // Stalled connections take every device slot (the admin's client above has closed its own).
    let idle: Vec<std::net::TcpStream> = (0..20).map(|_| stalled_connection(s.ep.ports.mqtt)).collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let operator = client_from(&s, "127.0.0.3");
    let url = format!("https://localhost:{}/enrollments/full-dev?{API}", s.ep.ports.https);
    let r = operator.get(url).header("Authorization", s.token()).send().expect("the service API answers while the shard is full");
    assert_eq!(r.status().as_u16(), 200);
    // A device gets in only as far as the reserve, and is told to come back.
    let url = format!("https://localhost:{}/{}/registrations/full-dev/register?api-version=2019-03-31", s.ep.ports.https, s.ep.id_scope);
    let token = device_token(&s.ep.id_scope, "full-dev", KEY);
    let r = client_from(&s, "127.0.0.2").put(&url).header("Authorization", &token).body("{}").send().unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let (_, v) = status_json(r);
    assert_eq!(v["errorCode"], 503001, "{v}");
    // Once the device slots free up, the device is served.
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = client_from(&s, "127.0.0.2").put(&url).header("Authorization", &token).body("{}").send().unwrap();
    assert_eq!(r.status().as_u16(), 202);
}

#[test]
fn shutdown_lets_a_service_api_request_in_the_reserve_finish() {
    // Regression: the drain at shutdown waited for the device connections only, so a service
    // API request on a connection of the reserve (the shard full) was cut off mid-request.
    let mut cfg = test_config();
    cfg.shards = 1;
    cfg.limits.max_connections_per_shard = 8;
    cfg.limits.service_api_connections_per_shard = 2;
    cfg.limits.max_connections_per_source = 0;
    let mut s = TestServer::start(cfg);
    let idle: Vec<std::net::TcpStream> = (0..8).map(|_| stalled_connection(s.ep.ports.mqtt)).collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // An operator's request on a reserve connection, its body half sent.
    let ca = std::fs::read_to_string(s.ep.ca_certificate.as_ref().unwrap()).unwrap();
    let tls = std::sync::Arc::new(dps_gateway::tls::client_config(Some(&ca)).unwrap());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls, name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", s.ep.ports.https)).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut op = rustls::StreamOwned::new(conn, tcp);
    let body = sym_enrollment("drained-1").to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let head = format!(
        "PUT /enrollments/drained-1?{API} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        s.token(),
        body.len()
    );
    op.write_all(head.as_bytes()).unwrap();
    op.write_all(first.as_bytes()).unwrap();
    op.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Shutdown begins; the device connections go; the request is still being sent.
    let running = s.running.take().unwrap();
    let stopping = std::thread::spawn(move || running.shutdown());
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(800));
    op.write_all(rest.as_bytes()).unwrap();
    op.flush().unwrap();
    let mut answer = String::new();
    let _ = op.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "the request was cut off by the shutdown: {answer:?}");
    assert!(answer.contains("drained-1"), "{answer}");
    stopping.join().unwrap().unwrap();
}

/// A client from one loopback address, on a new connection per request.
fn client_from(s: &TestServer, source: &str) -> reqwest::blocking::Client {
    let ca = std::fs::read(s.ep.ca_certificate.as_ref().unwrap()).unwrap();
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

#[test]
fn failed_attestations_are_bounded_per_source_address() {
    // Regression: every guessed token cost a store read and its HMACs, without end. Now a
    // source that used up its failures is answered 429 before either, and only that source.
    let mut cfg = test_config();
    cfg.linked_hubs.push(hub("hub-a.example"));
    cfg.limits.attestation_failures_per_source = 4; // 2 per shard
    cfg.limits.source_allow_list = vec!["127.0.0.4".parse().unwrap()];
    let s = TestServer::start(cfg);
    let e = json!({"registrationId": "src-dev", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}});
    assert_eq!(s.send("PUT", "/enrollments/src-dev", Some(e)).status().as_u16(), 200);
    let url = format!("https://localhost:{}/{}/registrations/src-dev/register?api-version=2019-03-31", s.ep.ports.https, s.ep.id_scope);
    let wrong = device_token(&s.ep.id_scope, "src-dev", "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ==");
    let statuses = |source: &str, n: usize| -> Vec<(u16, Option<String>)> {
        let c = client_from(&s, source);
        (0..n)
            .map(|_| {
                let r = c.put(&url).header("Authorization", &wrong).body("{}").send().unwrap();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                (r.status().as_u16(), retry)
            })
            .collect()
    };
    let seen = statuses("127.0.0.2", 12);
    let refused = seen.iter().filter(|(st, _)| *st == 401).count();
    let throttled: Vec<_> = seen.iter().filter(|(st, _)| *st == 429).collect();
    assert!(refused <= 4, "{seen:?}");
    assert_eq!(refused + throttled.len(), 12, "{seen:?}");
    assert!(throttled.iter().all(|(_, retry)| retry.is_some()), "429 says when to retry: {seen:?}");
    // The genuine device from another address is served at once.
    let token = device_token(&s.ep.id_scope, "src-dev", KEY);
    let r = client_from(&s, "127.0.0.3").put(&url).header("Authorization", &token).body("{}").send().unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // A source on the allow-list (a factory line behind NAT) is never throttled.
    assert!(statuses("127.0.0.4", 12).iter().all(|(st, _)| *st == 401));
}

#[test]
fn a_client_that_stops_reading_is_closed_after_the_write_timeout() {
    // Regression: no write had a timeout, so a client that pipelines requests and never reads
    // the answers pinned its connection's task (and slot) for ever. Now a write that makes no
    // progress for `limits.write_timeout_secs` ends the connection.
    use std::io::{Read, Write};
    let mut cfg = test_config();
    cfg.limits.write_timeout_secs = 1;
    let s = TestServer::start(cfg);
    let tcp = std::net::TcpStream::connect(("127.0.0.1", s.ep.ports.https)).unwrap();
    tcp.set_write_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(tls_config(s.ep.ca_certificate.as_ref().unwrap()), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // Enough answers (~250 bytes each) to fill both sides' socket buffers many times over.
    let request = b"GET /no/such/thing HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let batch: Vec<u8> = request.iter().copied().cycle().take(request.len() * 1000).collect();
    let mut sent = 0;
    for _ in 0..100 {
        if tls.write_all(&batch).is_err() {
            break;
        }
        sent += 1000;
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Now read: the server gave up on the connection, so the answers stop short of the requests
    // and the stream ends (without the timeout it would answer all of them and then wait).
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let ended = loop {
        match tls.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break Err(e),
            Err(_) => break Ok(()), // reset or an unclean TLS end: closed by the server
        }
    };
    let answers = out.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
    assert!(ended.is_ok(), "the connection was still open after {answers} answers to {sent} requests");
    assert!(answers < sent, "{answers} answers to {sent} requests");
}

#[test]
fn a_refused_credential_ends_the_https_connection() {
    // Regression: after a 401 the connection stayed open for the next request, so a client
    // without a valid credential could keep its slot by guessing now and then. Now a refused
    // credential is answered with `Connection: close` and the connection ends; a TPM challenge
    // (also a 401) keeps it, since the device answers it next.
    let s = server();
    let e = json!({"registrationId": "close-dev", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}});
    assert_eq!(s.send("PUT", "/enrollments/close-dev", Some(e)).status().as_u16(), 200);
    let open = || open_tls(&s, s.ep.ports.https);
    let request = |token: &str| {
        format!(
            "PUT /{}/registrations/close-dev/register?api-version=2019-03-31 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}",
            s.ep.id_scope
        )
    };
    // The wrong key: one 401 with Connection: close, then the end of the stream.
    let wrong = device_token(&s.ep.id_scope, "close-dev", "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ==");
    let mut tls = open();
    tls.write_all(request(&wrong).as_bytes()).unwrap();
    let mut out = Vec::new();
    let end = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert!(end.is_ok() || !matches!(end.as_ref().unwrap_err().kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    // The genuine device keeps its connection: two requests on one.
    let good = device_token(&s.ep.id_scope, "close-dev", KEY);
    let mut tls = open();
    tls.write_all(request(&good).as_bytes()).unwrap();
    tls.write_all(request(&good).as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while seen.windows(9).filter(|w| w == b"HTTP/1.1 ").count() < 2 {
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert_eq!(text.matches("HTTP/1.1 202").count(), 2, "{text}");
    assert!(!text.to_ascii_lowercase().contains("connection: close"), "{text}");
}

#[test]
fn a_request_head_trickled_byte_by_byte_is_closed_at_the_idle_deadline() {
    // A client sending its request head a byte at a time must not hold the connection longer
    // than `limits.idle_timeout_secs` in all, however steadily the bytes come.
    let mut cfg = test_config();
    cfg.limits.idle_timeout_secs = 2;
    let s = TestServer::start(cfg);
    let mut tls = open_tls(&s, s.ep.ports.https);
    let head = format!("GET /{} HTTP/1.1\r\nHost: localhost\r\n", "a".repeat(200));
    let closed = trickle_until_closed(&mut tls, head.bytes().take(40));
    let closed = closed.unwrap_or_else(|| panic!("the connection outlived 40 trickled bytes (12 s) past a 2 s deadline"));
    assert!(closed < std::time::Duration::from_secs(11), "trickled for {closed:?}");
}
