//! The `azure-iothub` connector: IoT Hub's registry REST API (api-version 2021-04-12),
//! authenticated with the linked hub's connection string (a SAS token for the hub host name,
//! signed with the policy's key; the policy needs RegistryWrite). What DPS does at a hub:
//!
//! - create the identity: `PUT /devices/{id}` without `If-Match` (`deviceId`, `status`
//!   enabled, `authentication` matching the attestation, `capabilities.iotEdge`); when it exists
//!   (409) the same `PUT` with `If-Match: "*"` updates it, so a repeat changes nothing;
//! - write the twin when there is one to write: `PUT /twins/{id}` (replaces tags and desired
//!   properties) with `If-Match: "*"`;
//! - remove: `DELETE /devices/{id}` with `If-Match: "*"` (404: already gone);
//! - disable: `GET /devices/{id}`, then the same identity with `status` disabled.
//!
//! The REST API is reached at `https://{HostName}` unless the hub's `controlUrl` names another
//! base (a proxy, or a test fake).

use super::http;
use super::webhook::{authentication, twin_json};
use base64::Engine;
use dps_core::hub::{HubConnector, HubError, HubTask};
use dps_core::model::{parse_connection_string, LinkedHub};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use std::time::Duration;

const API: &str = "api-version=2021-04-12";
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ANSWER: usize = 64 * 1024;

pub struct AzureIotHub {
    base: String,
    host: String,
    key_name: String,
    key: Vec<u8>,
}

impl AzureIotHub {
    pub fn new(hub: &LinkedHub) -> Result<AzureIotHub, HubError> {
        let refused = |m: &str| HubError::Refused(format!("hub {}: {m}", hub.name));
        let cs = parse_connection_string(&hub.connection_string).ok_or_else(|| refused("bad connection string"))?;
        let key =
            base64::engine::general_purpose::STANDARD.decode(&cs.key).map_err(|_| refused("the connection string's key is not base64"))?;
        let base = hub.control_url.clone().unwrap_or_else(|| format!("https://{}", cs.host_name));
        Ok(AzureIotHub { base: base.trim_end_matches('/').to_string(), host: cs.host_name, key_name: cs.key_name, key })
    }

    fn call(&self, method: &str, path: &str, if_match: bool, body: Option<&Value>) -> Result<(u16, Vec<u8>), HubError> {
        let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64) + 3600;
        let token = dps_core::sas::build(&self.host, &self.key, expiry, Some(&self.key_name));
        let mut headers = vec![("Authorization", token.as_str())];
        if if_match {
            headers.push(("If-Match", "\"*\""));
        }
        http::request(method, &format!("{}{path}?{API}", self.base), &headers, body, TIMEOUT, MAX_ANSWER)
    }

    fn what(&self, method: &str, path: &str) -> String {
        format!("{} {method} {path}", self.host)
    }
}

/// RFC 3986 unreserved characters stay as they are in a path segment; the rest is escaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn segment(id: &str) -> String {
    utf8_percent_encode(id, SEGMENT).to_string()
}

impl HubConnector for AzureIotHub {
    fn assign(&self, task: &HubTask) -> Result<(), HubError> {
        let path = format!("/devices/{}", segment(&task.device_id));
        let identity = json!({
            "deviceId": task.device_id, "status": "enabled",
            "authentication": authentication(&task.auth), "capabilities": {"iotEdge": task.iot_edge},
        });
        let (mut status, mut answer) = self.call("PUT", &path, false, Some(&identity))?;
        if status == 409 {
            (status, answer) = self.call("PUT", &path, true, Some(&identity))?;
        }
        http::judged(&self.what("PUT", &path), status, &answer)?;
        if let Some(t) = &task.twin {
            let path = format!("/twins/{}", segment(&task.device_id));
            let (status, answer) = self.call("PUT", &path, true, Some(&twin_json(t)))?;
            http::judged(&self.what("PUT", &path), status, &answer)?;
        }
        Ok(())
    }

    fn remove(&self, device_id: &str) -> Result<(), HubError> {
        let path = format!("/devices/{}", segment(device_id));
        match self.call("DELETE", &path, true, None)? {
            (404, _) => Ok(()),
            (status, answer) => http::judged(&self.what("DELETE", &path), status, &answer),
        }
    }

    fn disable(&self, device_id: &str) -> Result<(), HubError> {
        let path = format!("/devices/{}", segment(device_id));
        let (status, answer) = self.call("GET", &path, false, None)?;
        if status == 404 {
            return Ok(());
        }
        http::judged(&self.what("GET", &path), status, &answer)?;
        let mut identity: Value = serde_json::from_slice(&answer)
            .map_err(|_| HubError::Transient(format!("{}: the identity is not JSON", self.what("GET", &path))))?;
        identity["status"] = json!("disabled");
        let (status, answer) = self.call("PUT", &path, true, Some(&identity))?;
        http::judged(&self.what("PUT", &path), status, &answer)
    }
}
