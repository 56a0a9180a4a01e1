#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! X.509 attestation against a real gateway over TLS with client certificates made by rcgen:
//! individual enrollments, groups enrolled by an intermediate or by a verified root CA (proof of
//! possession through the certificates API), over MQTT and the HTTPS device API.

mod common;
use common::certs::*;
use common::mqtt_client::{client_auth_config, MqttClient};
use common::*;
use serde_json::json;

fn server() -> TestServer {
    let mut cfg = test_config();
    cfg.linked_hubs.push(hub("hub-a.example"));
    cfg.limits.max_ca_certificates = 2;
    TestServer::start(cfg)
}

/// Registers over MQTT with a client certificate (no password); returns (status, body).
fn register_mqtt(s: &TestServer, id: &str, chain: &[Vec<u8>], key: &[u8]) -> (u16, serde_json::Value) {
    let mut c = MqttClient::open_with_certificate(s.ep.ports.mqtt, s.ep.ca_certificate.as_ref().unwrap(), chain, key);
    assert_eq!(c.connect(&s.ep.id_scope, id, id, ""), 0, "CONNECT without a password is accepted with a certificate");
    c.subscribe();
    let (status, _, body) = c.register("1", b"{}");
    (status, body)
}

#[test]
fn individual_x509_devices_over_mqtt_and_https() {
    let s = server();
    let (cert, key, pem) = device("x509-dev", None);
    let e = json!({"registrationId": "x509-dev", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}}});
    assert_eq!(s.send("PUT", "/enrollments/x509-dev", Some(e)).status().as_u16(), 200);
    let (status, body) = register_mqtt(&s, "x509-dev", std::slice::from_ref(&cert), &key);
    assert_eq!((status, body["status"].as_str()), (200, Some("assigned")), "{body}");
    let st = &body["registrationState"];
    assert_eq!(st["assignedHub"], "hub-a.example");
    assert!(st["x509"]["certificateInfo"]["subjectName"].as_str().unwrap().contains("x509-dev"), "{st}");
    assert!(st.get("symmetricKey").is_none());
    // The service API's registration state has no x509 member.
    let (_, reg) = status_json(s.send("GET", "/registrations/x509-dev", None));
    assert_eq!(reg["status"], "assigned");
    assert!(reg.get("x509").is_none() && reg.get("_x509").is_none(), "{reg}");

    // HTTPS: no Authorization header, the certificate is the credential.
    let ca = std::fs::read(s.ep.ca_certificate.as_ref().unwrap()).unwrap();
    let mut identity_pem = pem.clone().into_bytes();
    identity_pem.extend_from_slice(rustls_pki_pem("PRIVATE KEY", &key).as_bytes());
    let client = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&identity_pem).unwrap())
        .build()
        .unwrap();
    let base = format!("https://localhost:{}/{}/registrations/x509-dev", s.ep.ports.https, s.ep.id_scope);
    let r = client.put(format!("{base}/register?api-version=2019-03-31")).body("{}").send().unwrap();
    let (st, v) = status_json(r);
    assert_eq!((st, v["status"].as_str()), (202, Some("assigning")), "{v}");
    let op = v["operationId"].as_str().unwrap();
    let (st, v) = status_json(client.get(format!("{base}/operations/{op}?api-version=2019-03-31")).send().unwrap());
    assert_eq!((st, v["status"].as_str()), (200, Some("assigned")), "{v}");
    assert!(v["registrationState"]["x509"]["certificateInfo"].is_object());

    // Another certificate with the same CN: 401 on the response topic, not a TLS alert.
    let (other, other_key, _) = device("x509-dev", None);
    let (status, body) = register_mqtt(&s, "x509-dev", &[other], &other_key);
    assert_eq!((status, body["errorCode"].as_u64()), (401, Some(401002)), "{body}");
    // CN mismatch.
    let (someone, someone_key, _) = device("someone-else", None);
    let (status, _) = register_mqtt(&s, "x509-dev", &[someone], &someone_key);
    assert_eq!(status, 401);
    // No certificate and no password: refused at CONNACK.
    let mut c = MqttClient::open(s.ep.ports.mqtt, s.ep.ca_certificate.as_ref().unwrap());
    assert_eq!(c.connect(&s.ep.id_scope, "x509-dev", "x509-dev", ""), 5);
}

/// PEM armour for a DER blob.
fn rustls_pki_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[test]
fn group_devices_by_intermediate_and_by_a_verified_root() {
    let s = server();
    let root = ca("x509-root", None);
    let inter = ca("x509-intermediate", Some(&root));
    let (dev, key, _) = device("group-dev-1", Some(&inter));
    let chain = vec![dev, inter.der.clone()];

    // Enrolled by a CA reference that is not verified yet: no enrollment admits the device.
    let g = json!({"enrollmentGroupId": "by-root", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root-ca"}}}});
    assert_eq!(s.send("PUT", "/enrollmentGroups/by-root", Some(g)).status().as_u16(), 200);
    let (st, v) = status_json(s.send("PUT", "/certificates/root-ca", Some(json!({"certificate": root.pem}))));
    assert_eq!((st, v["properties"]["isVerified"].as_bool()), (200, Some(false)), "{v}");
    assert_eq!(register_mqtt(&s, "group-dev-1", &chain, &key).0, 401);

    // Proof of possession: a certificate whose CN is the code, signed by the root's key.
    let (st, v) = status_json(s.send("POST", "/certificates/root-ca/generateVerificationCode", None));
    assert_eq!(st, 200, "{v}");
    let code = v["properties"]["verificationCode"].as_str().unwrap().to_string();
    let wrong = device("not-the-code", Some(&root)).2;
    let (st, v) = status_json(s.send("POST", "/certificates/root-ca/verify", Some(json!({"certificate": wrong}))));
    assert_eq!((st, v["errorCode"].as_u64()), (400, Some(400004)), "{v}");
    let by_other_key = device(&code, Some(&ca("x509-root", None))).2;
    let (st, _) = status_json(s.send("POST", "/certificates/root-ca/verify", Some(json!({"certificate": by_other_key}))));
    assert_eq!(st, 400, "signed by another key");
    let proof = device(&code, Some(&root)).2;
    let (st, v) = status_json(s.send("POST", "/certificates/root-ca/verify", Some(json!({"certificate": proof}))));
    assert_eq!((st, v["properties"]["isVerified"].as_bool()), (200, Some(true)), "{v}");

    // Now the root group admits the device presenting leaf + intermediate.
    let (status, body) = register_mqtt(&s, "group-dev-1", &chain, &key);
    assert_eq!((status, body["status"].as_str()), (200, Some("assigned")), "{body}");
    let x = &body["registrationState"]["x509"];
    assert_eq!(x["enrollmentGroupId"], "by-root");
    assert_eq!(x["signingCertificateInfo"]["subjectName"], "CN=x509-root");
    // A truncated chain (the leaf without the intermediate between it and the root) is refused.
    assert_eq!(register_mqtt(&s, "group-dev-1", &chain[..1], &key).0, 401);
    // A group enrolled by the intermediate (inline) comes first.
    let g = json!({"enrollmentGroupId": "by-intermediate", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": inter.pem}}}}});
    assert_eq!(s.send("PUT", "/enrollmentGroups/by-intermediate", Some(g)).status().as_u16(), 200);
    let (_, body) = register_mqtt(&s, "group-dev-1", &chain, &key);
    assert_eq!(body["registrationState"]["x509"]["enrollmentGroupId"], "by-intermediate", "{body}");
    // The leaf alone now reaches an enrolled certificate (its issuer) directly.
    assert_eq!(register_mqtt(&s, "group-dev-1", &chain[..1], &key).0, 200);
    // The by-group query sees the device.
    let (_, regs) = status_json(s.send("POST", "/registrations/by-intermediate/query", None));
    assert_eq!(regs.as_array().unwrap().len(), 1);

    // Listing, the quota (2 here), replacing without If-Match (409), deleting with a wrong etag.
    let (_, list) = status_json(s.send("GET", "/certificates", None));
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    assert_eq!(s.send("PUT", "/certificates/root-ca", Some(json!({"certificate": root.pem}))).status().as_u16(), 409);
    assert_eq!(s.send("PUT", "/certificates/second", Some(json!({"certificate": inter.pem}))).status().as_u16(), 200);
    let (st, v) = status_json(s.send("PUT", "/certificates/third", Some(json!({"certificate": inter.pem}))));
    assert_eq!((st, v["errorCode"].as_u64()), (403, Some(403002)), "{v}");
    let (st, v) = status_json(s.send("PUT", "/certificates/leaf", Some(json!({"certificate": device("x", None).2}))));
    assert_eq!(st, 400, "not a CA: {v}");
    let r = s.req("DELETE", "/certificates/root-ca").header("If-Match", "\"wrong\"").send().unwrap();
    assert_eq!(r.status().as_u16(), 412);
    assert_eq!(s.send("DELETE", "/certificates/root-ca", None).status().as_u16(), 204);
    let (st, v) = status_json(s.send("GET", "/certificates/root-ca", None));
    assert_eq!((st, v["errorCode"].as_u64()), (404, Some(404204)));
    // The certificates API needs the ServiceConfig right; devices of the root group are refused
    // once its CA is gone (the intermediate group still admits this one).
    assert_eq!(s.send("DELETE", "/enrollmentGroups/by-intermediate", None).status().as_u16(), 204);
    let (status, body) = register_mqtt(&s, "group-dev-1", &chain, &key);
    assert_eq!(status, 401, "{body}");
    let _ = client_auth_config;
}

#[test]
fn service_api_host_names_request_no_client_certificate() {
    // On the HTTPS port a handshake naming one of `tls.service_api_host_names` requests no
    // client certificate (the operators' host); every other handshake requests one. A client
    // holding a certificate therefore sends it only to the device host.
    let mut cfg = test_config();
    cfg.host_names = vec!["localhost".into(), "admin.localhost".into()];
    cfg.tls.service_api_host_names = vec!["admin.localhost".into()];
    cfg.linked_hubs.push(hub("hub-a.example"));
    let s = TestServer::start(cfg);
    let (cert, key, pem) = device("sni-dev", None);
    let e = json!({"registrationId": "sni-dev", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem.clone()}}}}});
    assert_eq!(s.send("PUT", "/enrollments/sni-dev", Some(e)).status().as_u16(), 200);
    let ca = std::fs::read(s.ep.ca_certificate.as_ref().unwrap()).unwrap();
    let mut identity_pem = pem.into_bytes();
    identity_pem.extend_from_slice(rustls_pki_pem("PRIVATE KEY", &key).as_bytes());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", s.ep.ports.https).parse().unwrap();
    let client = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&identity_pem).unwrap())
        .resolve("admin.localhost", addr)
        .build()
        .unwrap();
    let register = |host: &str| {
        let url = format!("https://{host}:{}/{}/registrations/sni-dev/register?api-version=2019-03-31", s.ep.ports.https, s.ep.id_scope);
        client.put(url).body("{}").send().unwrap().status().as_u16()
    };
    assert_eq!(register("localhost"), 202, "the device host asks for the certificate");
    assert_eq!(register("admin.localhost"), 401, "the service host does not: no credential arrives");
    // The service API answers on its host as on any other.
    let token = token_for(&s.key_name, &s.key);
    let r = client
        .get(format!("https://admin.localhost:{}/enrollments/sni-dev?{API}", s.ep.ports.https))
        .header("Authorization", token)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    drop(cert);
}
