//! An in-process gateway on an ephemeral port with a fresh data dir, and a client that speaks
//! to it over real TLS with the generated CA.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_gateway::config::Config;
use dps_gateway::{Endpoint, Running};
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

pub mod mosquitto;
pub mod mqtt_client;

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
        self.running.take().unwrap().shutdown().unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_in(dir, cfg)
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
