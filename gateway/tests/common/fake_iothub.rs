//! `FakeIotHub`: a stand-in for Azure IoT Hub's registry REST API (which cannot run here),
//! following its published contract as far as the `azure-iothub` connector uses it:
//! api-version 2021-04-12 required; a SAS token for the hub's host name signed with the
//! policy's key, else 401; `PUT /devices/{id}` creates (409 when it exists and no `If-Match`;
//! 412 with `If-Match` when it does not), `GET` and `DELETE` (404 when missing) of
//! `/devices/{id}`, `PUT /twins/{id}` replaces tags and desired properties (404 without the
//! device). Plain HTTP on a loopback port, reached through the hub's `controlUrl`. It can be
//! told to answer 503 a number of times first.
#![allow(dead_code)]

use super::http_server::{serve, Request};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const KEY: &[u8] = b"fake-iothub-registry-write-key!!";

#[derive(Default)]
pub struct Registry {
    pub devices: HashMap<String, Value>,
    pub twins: HashMap<String, Value>,
    /// "METHOD path" of every authorised request.
    pub calls: Vec<String>,
}

pub struct FakeIotHub {
    pub host: String,
    pub port: u16,
    pub registry: Arc<Mutex<Registry>>,
    pub unavailable: Arc<AtomicUsize>,
}

impl FakeIotHub {
    pub fn start(host: &str) -> FakeIotHub {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let unavailable = Arc::new(AtomicUsize::new(0));
        let (reg, busy, h) = (registry.clone(), unavailable.clone(), host.to_string());
        let port = serve(move |r| handle(r, &h, &reg, &busy));
        FakeIotHub { host: host.to_string(), port, registry, unavailable }
    }

    pub fn connection_string(&self, key: &[u8]) -> String {
        use base64::Engine;
        format!(
            "HostName={};SharedAccessKeyName=registryReadWrite;SharedAccessKey={}",
            self.host,
            base64::engine::general_purpose::STANDARD.encode(key)
        )
    }

    /// The linked hub definition; `right_key` false signs with a key the hub does not know.
    pub fn hub_json(&self, right_key: bool) -> Value {
        let key: &[u8] = if right_key { KEY } else { b"not-the-registry-write-key-at-all" };
        json!({"name": self.host, "kind": "azure-iothub", "connectionString": self.connection_string(key),
            "controlUrl": format!("http://127.0.0.1:{}", self.port)})
    }

    pub fn device(&self, id: &str) -> Option<Value> {
        self.registry.lock().unwrap().devices.get(id).cloned()
    }

    pub fn twin(&self, id: &str) -> Option<Value> {
        self.registry.lock().unwrap().twins.get(id).cloned()
    }
}

fn error(status: u16, code: &str) -> (u16, String) {
    (status, json!({"Message": format!("ErrorCode:{code}")}).to_string())
}

fn handle(r: &Request, host: &str, registry: &Mutex<Registry>, unavailable: &AtomicUsize) -> (u16, String) {
    if !r.query.split('&').any(|p| p == "api-version=2021-04-12") {
        return error(400, "InvalidProtocolVersion");
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let authorised = r
        .header("authorization")
        .and_then(|t| dps_core::sas::parse(t).ok())
        .is_some_and(|t| t.check_scope(host, now).is_ok() && t.signed_with(KEY) && t.key_name.as_deref() == Some("registryReadWrite"));
    if !authorised {
        return error(401, "IotHubUnauthorizedAccess");
    }
    if unavailable.load(Ordering::SeqCst) > 0 {
        unavailable.fetch_sub(1, Ordering::SeqCst);
        return error(503, "ServiceUnavailable");
    }
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let mut reg = registry.lock().unwrap();
    reg.calls.push(format!("{} {}", r.method, r.path));
    let if_match = r.header("if-match").is_some();
    match (r.method.as_str(), r.path.strip_prefix("/devices/"), r.path.strip_prefix("/twins/")) {
        ("PUT", Some(id), _) => {
            let id = decode(id);
            let mut body = r.json();
            if body["deviceId"] != json!(id) {
                return error(400, "ArgumentInvalid");
            }
            match (reg.devices.contains_key(&id), if_match) {
                (true, false) => return error(409, "DeviceAlreadyExists"),
                (false, true) => return error(412, "PreconditionFailed"),
                _ => {}
            }
            body["etag"] = json!("\"fake\"");
            reg.devices.insert(id.clone(), body.clone());
            reg.twins.entry(id).or_insert_with(|| json!({"tags": {}, "properties": {"desired": {}}}));
            (200, body.to_string())
        }
        ("GET", Some(id), _) => match reg.devices.get(&decode(id)) {
            Some(d) => (200, d.to_string()),
            None => error(404, "DeviceNotFound"),
        },
        ("DELETE", Some(id), _) => {
            let id = decode(id);
            reg.twins.remove(&id);
            match reg.devices.remove(&id) {
                Some(_) => (204, String::new()),
                None => error(404, "DeviceNotFound"),
            }
        }
        ("PUT", _, Some(id)) => {
            let id = decode(id);
            if !reg.devices.contains_key(&id) {
                return error(404, "DeviceNotFound");
            }
            let body = r.json();
            let twin = json!({"tags": body["tags"], "properties": {"desired": body["properties"]["desired"]}});
            reg.twins.insert(id, twin.clone());
            (200, twin.to_string())
        }
        _ => error(404, "NotFound"),
    }
}
