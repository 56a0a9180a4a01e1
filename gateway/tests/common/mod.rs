//! An in-process gateway on an ephemeral port with a fresh data dir, and a client that speaks
//! to it over real TLS with the generated CA.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_gateway::config::Config;
use dps_gateway::{Endpoint, Running};
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

pub mod certs;
#[path = "../../../storage/tests/common/etcd_cluster.rs"]
pub mod etcd;
pub mod fake_iothub;
pub mod http_server;
pub mod mosquitto;
pub mod mqtt_client;
pub mod process;

pub const API: &str = "api-version=2021-10-01";

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub running: Option<Running>,
    pub ep: Endpoint,
    pub client: Client,
    pub key_name: String,
    pub key: Vec<u8>,
}

pub fn test_config() -> Config {
    let mut c = Config::loopback();
    c.shards = 2;
    c
}

pub fn client_for(ep: &Endpoint) -> Client {
    let ca = std::fs::read(ep.ca_certificate.as_ref().unwrap()).unwrap();
    Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap()
}

impl TestServer {
    pub fn start(cfg: Config) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, cfg)
    }

    pub fn start_in(dir: tempfile::TempDir, cfg: Config) -> TestServer {
        let running = dps_gateway::start(cfg, dir.path()).unwrap();
        let ep = running.endpoint.clone();
        let cs = dps_core::model::parse_connection_string(&ep.service_connection_string).unwrap();
        TestServer { client: client_for(&ep), dir, running: Some(running), ep, key_name: cs.key_name, key: B64.decode(cs.key).unwrap() }
    }

    /// Stops the server and starts a new one on the same data dir.
    pub fn restart(mut self, cfg: Config) -> TestServer {
        if let Some(r) = self.running.take() {
            r.shutdown().unwrap();
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_in(dir, cfg)
    }

    /// Writes an individual symmetric-key enrollment (`extra` merged in), replacing one that
    /// exists (If-Match its etag).
    pub fn put_enrollment(&self, id: &str, primary: &str, secondary: &str, extra: Value) {
        let mut e = serde_json::json!({"registrationId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}}});
        e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let etag = self.send("GET", &format!("/enrollments/{id}"), None).headers().get("etag").map(|v| v.to_str().unwrap().to_string());
        let mut r = self.req("PUT", &format!("/enrollments/{id}")).body(e.to_string());
        if let Some(t) = etag {
            r = r.header("If-Match", t);
        }
        let r = r.send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
    }

    pub fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { "&" } else { "?" };
        format!("https://localhost:{}{path}{sep}{API}", self.ep.ports.https)
    }

    pub fn token(&self) -> String {
        token_for(&self.key_name, &self.key)
    }

    pub fn req(&self, method: &str, path: &str) -> RequestBuilder {
        self.client
            .request(method.parse().unwrap(), self.url(path))
            .header("Authorization", self.token())
            .header("Content-Type", "application/json; charset=utf-8")
    }

    pub fn send(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        let r = self.req(method, path);
        let r = match body {
            Some(b) => r.body(b.to_string()),
            None => r,
        };
        r.send().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.shutdown();
        }
    }
}

pub fn token_for(key_name: &str, key: &[u8]) -> String {
    let se = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 + 3600;
    dps_core::sas::build("localhost", key, se, Some(key_name))
}

/// Status and JSON body, asserting the content type.
pub fn status_json(r: Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let v = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")) };
    (status, v)
}

pub fn sym_enrollment(id: &str) -> Value {
    serde_json::json!({"registrationId": id, "attestation": {"type": "symmetricKey"}})
}

/// A registry-only linked hub.
pub fn hub(name: &str) -> dps_gateway::config::HubConfig {
    dps_gateway::config::HubConfig {
        host_name: name.into(),
        connection_string: format!("HostName={name};SharedAccessKeyName=iothubowner;SharedAccessKey=aHViLWtleQ=="),
        ..Default::default()
    }
}

/// A device's HTTPS register with `body`; asserts the `202` and returns its operation id.
pub fn https_register(s: &TestServer, id: &str, key: &str, body: &str) -> String {
    let url = format!("https://localhost:{}/{}/registrations/{id}/register?api-version=2019-03-31", s.ep.ports.https, s.ep.id_scope);
    let token = mqtt_client::device_token(&s.ep.id_scope, id, key);
    let (st, v) = status_json(s.client.put(url).header("Authorization", &token).body(body.to_string()).send().unwrap());
    assert_eq!(st, 202, "{v}");
    v["operationId"].as_str().unwrap().to_string()
}

/// Polls the operation every 100 ms until it is no longer `202 assigning` or `patience` ran
/// out; the last answer.
pub fn https_poll(s: &TestServer, id: &str, key: &str, op: &str, patience: std::time::Duration) -> Value {
    let url = format!("https://localhost:{}/{}/registrations/{id}/operations/{op}?api-version=2019-03-31", s.ep.ports.https, s.ep.id_scope);
    let token = mqtt_client::device_token(&s.ep.id_scope, id, key);
    let until = std::time::Instant::now() + patience;
    loop {
        let (st, v) = status_json(s.client.get(&url).header("Authorization", &token).send().unwrap());
        if st != 202 || std::time::Instant::now() > until {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A client TLS stream over TCP, as the raw-protocol tests use it.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS connection (trusting the server's CA, naming `localhost`) to one of its ports, with
/// a 10 s read timeout so a test never hangs on a server that stays silent.
pub fn open_tls(s: &TestServer, port: u16) -> TlsStream {
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(mqtt_client::tls_config(s.ep.ca_certificate.as_ref().unwrap()), "localhost".try_into().unwrap())
            .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// A connection that starts a TLS handshake and stalls: the first byte of a record, then
/// nothing. The listeners hand a connection over only once its client has sent something
/// (TCP_DEFER_ACCEPT), so a connection meant to hold a slot must say this much.
pub fn stalled_connection(port: u16) -> std::net::TcpStream {
    use std::io::Write;
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.write_all(&[0x16]).unwrap();
    tcp
}

/// Writes `bytes` one at a time, 300 ms apart, until a write fails (the server closed):
/// how long that took, or None if every byte went out.
pub fn trickle_until_closed(w: &mut impl std::io::Write, bytes: impl Iterator<Item = u8>) -> Option<std::time::Duration> {
    let t = std::time::Instant::now();
    for b in bytes {
        std::thread::sleep(std::time::Duration::from_millis(300));
        if w.write_all(&[b]).and_then(|_| w.flush()).is_err() {
            return Some(t.elapsed());
        }
    }
    None
}

/// A counter from a metrics scrape: the sum of its series that carry every label given (in any
/// order; none given: all its series); 0 while it has none.
pub fn counter(s: &TestServer, family: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::blocking::get(format!("http://127.0.0.1:{}/metrics", s.ep.ports.admin)).unwrap().text().unwrap();
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter_map(|l| l.strip_prefix(family)?.strip_prefix('{'))
        .filter_map(|l| l.split_once("} "))
        .filter(|(set, _)| {
            let set: Vec<&str> = set.split(',').collect();
            wanted.iter().all(|w| set.contains(&w.as_str()))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}
