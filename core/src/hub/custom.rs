//! Custom allocation: the Azure Functions webhook contract (docs/hub-connectors.md). A
//! registration under `allocationPolicy: custom` is committed `assigning` with the
//! [`CustomCall`] to make; the host POSTs its body to the enrollment's `webhookUrl` and hands
//! the answer to [`resolve`], which places the device at the hub the webhook chose (or fails
//! the registration with 400207, DPS's code for a failed custom allocation).
//!
//! Request: `individualEnrollment` or `enrollmentGroup` (without secrets),
//! `deviceRuntimeContext` (`registrationId`, `currentIotHubHostName` and `currentDeviceId` when
//! the device is assigned, its attestation, the device's `payload`), `linkedHubs` (the
//! enrollment's hubs, else every linked hub that takes part in allocation; only the current hub
//! when the policy never reprovisions). Response: `iotHubHostName` (one of `linkedHubs`),
//! optional `initialTwin` and `payload` (returned to the device).

use super::Twin;
use crate::allocation::{candidates, AllocationError};
use crate::model::*;
use crate::registration::state::{place, Matched, Placement, StateInputs};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// DPS's `errorCode` for a failed custom allocation (as the C SDK's tests show it).
pub const CUSTOM_ALLOCATION_FAILED: i32 = 400207;
/// Largest webhook answer read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A webhook call still to make, stored with the `assigning` registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomCall {
    pub webhook_url: String,
    /// The `AllocationRequest` JSON.
    pub body: Value,
    pub linked_hubs: Vec<String>,
    pub placement: Placement,
}

/// The call for a device admitted by an enrollment with the custom policy.
pub fn call(d: &StateInputs<'_>, p: &Placement) -> Result<CustomCall, AllocationError> {
    let common = d.matched.common();
    let def = common
        .custom_allocation_definition
        .as_ref()
        .ok_or_else(|| AllocationError::Unsupported("allocationPolicy custom needs customAllocationDefinition".into()))?;
    let linked_hubs: Vec<String> = match &p.previous {
        Some(prev) if !p.policy.update_hub_assignment => vec![prev.hub.clone()],
        _ => candidates(d.linked, common.iot_hubs.as_deref(), common.iot_hub_host_name.as_deref()).iter().map(|h| h.name.clone()).collect(),
    };
    if linked_hubs.is_empty() {
        return Err(AllocationError::NoHub("no linked IoT hub is available for this enrollment".into()));
    }
    let mut context = json!({ "registrationId": d.registration_id });
    context[d.attestation.0] = d.attestation.1.clone();
    if let Some(prev) = &p.previous {
        context["currentIotHubHostName"] = json!(prev.hub);
        context["currentDeviceId"] = json!(prev.device_id);
    }
    if let Some(payload) = &d.payload {
        context["payload"] = payload.clone();
    }
    let mut body = json!({ "deviceRuntimeContext": context, "linkedHubs": linked_hubs });
    let enrollment = match d.matched {
        Matched::Individual(e) => {
            let mut e = e.clone();
            e.common.attestation = e.common.attestation.without_secrets();
            e.registration_state = None;
            ("individualEnrollment", serde_json::to_value(e))
        }
        Matched::Group(g) => {
            let mut g = g.clone();
            g.common.attestation = g.common.attestation.without_secrets();
            ("enrollmentGroup", serde_json::to_value(g))
        }
    };
    body[enrollment.0] = enrollment.1.map_err(|e| AllocationError::Unsupported(e.to_string()))?;
    Ok(CustomCall { webhook_url: def.webhook_url.clone(), body, linked_hubs, placement: p.clone() })
}

/// Whether an HTTP status from the webhook is worth asking again (busy or failing server).
pub fn retryable(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// What the webhook decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocated {
    /// The hub, spelled as in `linkedHubs`.
    pub hub: String,
    pub initial_twin: Option<Twin>,
    pub payload: Option<Value>,
}

/// Reads the webhook's answer: a 2xx with a JSON object naming one of `linkedHubs`
/// (`iotHubHostName`, any case: the docs' table spells it `iotHubHostname`).
pub fn read_answer(call: &CustomCall, status: u16, body: &[u8]) -> Result<Allocated, String> {
    if !(200..300).contains(&status) {
        return Err(format!("Custom allocation failed with status code: {status}"));
    }
    if body.len() > MAX_RESPONSE_BYTES {
        return Err("Custom allocation failed: the webhook's answer is too large".into());
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| "Custom allocation failed: the webhook's answer is not JSON".to_string())?;
    let obj = v.as_object().ok_or("Custom allocation failed: the webhook's answer is not a JSON object")?;
    let member = |name: &str| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
    let named =
        member("iotHubHostName").and_then(Value::as_str).ok_or("Custom allocation failed: the webhook's answer names no iotHubHostName")?;
    let hub = call
        .linked_hubs
        .iter()
        .find(|h| h.eq_ignore_ascii_case(named))
        .ok_or_else(|| format!("Custom allocation failed: '{}' is not one of the linked hubs offered", crate::ids::printable(named)))?;
    let initial_twin = member("initialTwin").filter(|t| t.is_object()).map(|t| Twin::initial(Some(t)));
    let payload = member("payload").filter(|p| !p.is_null()).cloned();
    Ok(Allocated { hub: hub.clone(), initial_twin, payload })
}

/// The registration once the webhook answered (`Err`: the failure the device is told). The
/// webhook's initial twin counts on a first assignment, and when a reset moves the device to
/// another hub; otherwise the enrollment's rules stand. Its payload goes to the device.
pub fn resolve(mut state: DeviceRegistrationState, answer: Result<Allocated, String>, linked: &[LinkedHub]) -> DeviceRegistrationState {
    let Some(call) = state.custom_allocation.take() else { return state };
    match answer {
        Ok(a) => {
            let mut p = call.placement;
            let moved = p.previous.as_ref().is_some_and(|prev| !prev.hub.eq_ignore_ascii_case(&a.hub));
            let reset = p.policy.update_hub_assignment && !p.policy.migrate_device_data;
            if let Some(t) = a.initial_twin.filter(|_| p.previous.is_none() || (moved && reset)) {
                p.initial_twin = t;
            }
            state.status = RegistrationStatus::Assigned;
            place(&mut state, a.hub, &p, linked);
            state.payload = a.payload;
        }
        Err(message) => {
            state.status = RegistrationStatus::Failed;
            state.error_code = Some(CUSTOM_ALLOCATION_FAILED);
            state.error_message = Some(message);
            state.assigned_hub = None;
            state.device_id = None;
            state.substatus = None;
        }
    }
    state
}
