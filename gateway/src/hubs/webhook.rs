//! The `webhook` connector: for platforms the service does not speak natively, each step is a
//! POST of JSON to the hub's `controlUrl`, which answers 2xx once done (408, 429 and 5xx are
//! retried; anything else refuses the step). Bodies:
//!
//! - `{"operation": "assign", "hub", "deviceId", "authentication", "capabilities": {"iotEdge"},
//!   "twin"?}` — `authentication` in IoT Hub's shape (`{"type": "sas", "symmetricKey":
//!   {"primaryKey", "secondaryKey"}}` or `{"type": "selfSigned", "x509Thumbprint": {…}}`), `twin`
//!   (`{"tags", "properties": {"desired"}}`) only when it is to be written;
//! - `{"operation": "remove", "hub", "deviceId"}`; `{"operation": "disable", "hub", "deviceId"}`.
//!
//! Every step may be repeated; the receiver must treat a repeat as done.

use super::http;
use dps_core::hub::{HubAuth, HubConnector, HubError, HubTask, Twin};
use dps_core::model::LinkedHub;
use serde_json::{json, Value};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct WebhookHub {
    hub: String,
    url: String,
}

impl WebhookHub {
    pub fn new(hub: &LinkedHub) -> Result<WebhookHub, HubError> {
        let url = hub.control_url.clone().ok_or_else(|| HubError::Refused(format!("hub {}: no controlUrl", hub.name)))?;
        Ok(WebhookHub { hub: hub.name.clone(), url })
    }

    fn post(&self, body: Value) -> Result<(), HubError> {
        let (status, answer) = http::post_json(&self.url, &body, TIMEOUT, 4096)?;
        http::judged(&format!("webhook {}", http::redact(&self.url)), status, &answer)
    }
}

/// A device's credential in IoT Hub's `authentication` shape.
pub fn authentication(auth: &HubAuth) -> Value {
    match auth {
        HubAuth::Sas { primary_key, secondary_key } => {
            json!({"type": "sas", "symmetricKey": {"primaryKey": primary_key, "secondaryKey": secondary_key}})
        }
        HubAuth::SelfSigned { primary_thumbprint, secondary_thumbprint } => {
            json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": primary_thumbprint, "secondaryThumbprint": secondary_thumbprint}})
        }
    }
}

/// A twin in IoT Hub's shape.
pub fn twin_json(t: &Twin) -> Value {
    json!({"tags": t.tags.clone().unwrap_or_else(|| json!({})), "properties": {"desired": t.desired.clone().unwrap_or_else(|| json!({}))}})
}

impl HubConnector for WebhookHub {
    fn assign(&self, task: &HubTask) -> Result<(), HubError> {
        let mut body = json!({
            "operation": "assign", "hub": self.hub, "deviceId": task.device_id,
            "authentication": authentication(&task.auth), "capabilities": {"iotEdge": task.iot_edge},
        });
        if let Some(t) = &task.twin {
            body["twin"] = twin_json(t);
        }
        self.post(body)
    }

    fn remove(&self, device_id: &str) -> Result<(), HubError> {
        self.post(json!({"operation": "remove", "hub": self.hub, "deviceId": device_id}))
    }

    fn disable(&self, device_id: &str) -> Result<(), HubError> {
        self.post(json!({"operation": "disable", "hub": self.hub, "deviceId": device_id}))
    }
}
