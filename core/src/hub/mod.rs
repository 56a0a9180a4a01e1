//! Hub connectors: what a linked hub must hold for a device once the registration machine has
//! assigned it there (its identity, with the credential matching its attestation, and its twin),
//! the trait each hub kind implements, and the retry schedule. No I/O here: the gateway
//! implements and runs the connectors (`gateway/src/hubs/`); [`dynsec`] builds and reads
//! Mosquitto's commands.
//!
//! A registration to a hub with a connector is committed as `assigning` with its [`HubTask`];
//! the task runs; its result is committed with [`finish`] (`assigned`, or `failed` with the
//! error). The stored task makes a restart resume the work instead of losing it, and every step
//! of a task is idempotent, so running it twice creates nothing twice.

pub mod custom;
pub mod dynsec;

use crate::model::*;
use crate::time::UtcTime;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// DPS `errorCode` of a registration whose hub could not be reached before the deadline (ours;
/// the first three digits are the status, as devices compute it).
pub const HUB_UNREACHABLE_ERROR: i32 = 503201;
/// DPS `errorCode` of a registration the hub refused (a device id or credential it cannot take).
pub const HUB_REFUSED_ERROR: i32 = 400210;

/// The work a hub connector does for one registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubTask {
    /// The hub the device is assigned to, and its device id there.
    pub hub: String,
    pub device_id: String,
    pub auth: HubAuth,
    #[serde(default)]
    pub iot_edge: bool,
    /// The twin to write (initial, reset or migrated); None leaves the hub's twin as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<Twin>,
    /// Where the device was before, when reprovisioning moves it: removed there (two places
    /// when it moves again before an earlier move finished).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leave: Vec<HubDevice>,
}

/// A device at a hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubDevice {
    pub hub: String,
    pub device_id: String,
}

/// The credential the device uses at its hub, as DPS gives IoT Hub: its symmetric keys (derived
/// ones for a group device; for a TPM device the key its TPM imported), or its certificate's
/// thumbprints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum HubAuth {
    #[serde(rename = "sas", rename_all = "camelCase")]
    Sas { primary_key: String, secondary_key: String },
    #[serde(rename = "selfSigned", rename_all = "camelCase")]
    SelfSigned { primary_thumbprint: String, secondary_thumbprint: String },
}

/// The twin the service writes to a hub: tags and desired properties.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Value>,
}

impl Twin {
    /// An enrollment's `initialTwin` (`{"tags": .., "properties": {"desired": ..}}`).
    pub fn initial(initial_twin: Option<&Value>) -> Twin {
        let tags = initial_twin.and_then(|t| t.get("tags")).filter(|v| v.is_object()).cloned();
        let desired = initial_twin.and_then(|t| t.pointer("/properties/desired")).filter(|v| v.is_object()).cloned();
        Twin { tags, desired }
    }
}

/// Why a connector step did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubError {
    /// Worth retrying: the hub is unreachable, busy or timed out.
    Transient(String),
    /// This service already has as many steps in flight to the hub as it allows: wait a moment
    /// for a turn (not a failure of the hub, so it does not grow the backoff).
    Busy(String),
    /// The hub refused what was asked; retrying changes nothing.
    Refused(String),
}

impl HubError {
    pub fn message(&self) -> &str {
        match self {
            HubError::Transient(m) | HubError::Busy(m) | HubError::Refused(m) => m,
        }
    }
}

/// One linked hub's connector: one attempt of each step, blocking, with its own timeouts (the
/// gateway runs them on hub worker threads, never on a shard, and retries by [`Backoff`]).
/// Every step is idempotent: a retried or resumed task creates nothing twice.
pub trait HubConnector {
    /// Makes the hub hold the task's device: identity and credential, enabled, and its twin
    /// when the task carries one.
    fn assign(&self, task: &HubTask) -> Result<(), HubError>;
    /// Removes a device (reprovisioned to another hub).
    fn remove(&self, device_id: &str) -> Result<(), HubError>;
    /// Stops a device from connecting (its enrollment was disabled); a later assignment
    /// enables it again.
    fn disable(&self, device_id: &str) -> Result<(), HubError>;
}

/// Where a connector's control connection goes: `mqtt://host:port` or `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl ControlUrl {
    pub fn parse(url: &str) -> Option<ControlUrl> {
        let (tls, rest) = match url.split_once("://")? {
            ("mqtt", r) => (false, r),
            ("mqtts", r) => (true, r),
            _ => return None,
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty() && !host.contains('/')).then(|| ControlUrl { tls, host: host.to_string(), port })
    }
}

/// Retries of a task: exponential from `first_ms`, capped at `max_ms`, until `deadline_ms`
/// after the first attempt; `jitter` (0..1000, from the host's randomness) spreads retries of
/// many devices so a recovering hub is not hit by all of them at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first_ms: u64,
    pub max_ms: u64,
    pub deadline_ms: u64,
}

impl Backoff {
    /// The wait before attempt `attempt + 1` (attempt 0 is the first), or None when the next
    /// attempt would start past the deadline (`elapsed_ms` since the first attempt).
    pub fn next_delay(&self, attempt: u32, elapsed_ms: u64, jitter: u16) -> Option<u64> {
        let base = self.first_ms.saturating_mul(1u64 << attempt.min(20)).min(self.max_ms);
        // 50 % to 100 % of the base.
        let delay = base / 2 + base / 2 * u64::from(jitter.min(1000)) / 1000;
        (elapsed_ms.saturating_add(delay) < self.deadline_ms).then_some(delay)
    }
}

/// The registration state once its hub task ended: `assigned`, or `failed` with the error the
/// device is told (the assignment is withdrawn: the device must not connect to a hub that does
/// not know it).
pub fn finish(mut state: DeviceRegistrationState, result: Result<(), HubError>, now: UtcTime, etag: String) -> DeviceRegistrationState {
    let task = state.hub_task.take();
    match result {
        Ok(()) => {
            state.status = RegistrationStatus::Assigned;
            if let Some(t) = task.and_then(|t| t.twin) {
                state.twin = Some(t);
            }
        }
        Err(e) => {
            let code = match e {
                HubError::Transient(_) | HubError::Busy(_) => HUB_UNREACHABLE_ERROR,
                HubError::Refused(_) => HUB_REFUSED_ERROR,
            };
            state.status = RegistrationStatus::Failed;
            state.error_code = Some(code);
            state.error_message = Some(format!("the IoT hub did not take the device: {}", e.message()));
            state.assigned_hub = None;
            state.device_id = None;
            state.substatus = None;
        }
    }
    state.last_updated_date_time_utc = Some(now);
    state.etag = Some(etag);
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls() {
        assert_eq!(ControlUrl::parse("mqtt://127.0.0.1:1883"), Some(ControlUrl { tls: false, host: "127.0.0.1".into(), port: 1883 }));
        assert_eq!(ControlUrl::parse("mqtts://broker.example"), Some(ControlUrl { tls: true, host: "broker.example".into(), port: 8883 }));
        assert_eq!(ControlUrl::parse("mqtt://[::1]:1884/"), Some(ControlUrl { tls: false, host: "::1".into(), port: 1884 }));
        for bad in ["http://x:1", "mqtt://", "mqtt://h:notaport", "127.0.0.1:1883", "mqtt://h/x:1"] {
            assert_eq!(ControlUrl::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn backoff_grows_caps_and_stops_at_the_deadline() {
        let b = Backoff { first_ms: 100, max_ms: 1000, deadline_ms: 3000 };
        assert_eq!(b.next_delay(0, 0, 1000), Some(100));
        assert_eq!(b.next_delay(0, 0, 0), Some(50));
        assert_eq!(b.next_delay(3, 0, 1000), Some(800));
        assert_eq!(b.next_delay(10, 0, 1000), Some(1000));
        assert_eq!(b.next_delay(40, 0, 1000), Some(1000));
        assert_eq!(b.next_delay(2, 2700, 1000), None);
    }

    #[test]
    fn initial_twin_members() {
        let t = Twin::initial(Some(&serde_json::json!({"tags":{"a":1},"properties":{"desired":{"b":2}}})));
        assert_eq!((t.tags, t.desired), (Some(serde_json::json!({"a":1})), Some(serde_json::json!({"b":2}))));
        assert_eq!(Twin::initial(None), Twin::default());
        assert_eq!(Twin::initial(Some(&serde_json::json!({"tags":5}))), Twin::default());
    }

    #[test]
    fn finish_assigns_or_fails_and_withdraws() {
        let task = HubTask {
            hub: "h".into(),
            device_id: "d".into(),
            auth: HubAuth::Sas { primary_key: "p".into(), secondary_key: "s".into() },
            iot_edge: false,
            twin: Some(Twin { tags: None, desired: Some(serde_json::json!({"x":1})) }),
            leave: Vec::new(),
        };
        let s: DeviceRegistrationState =
            serde_json::from_value(serde_json::json!({"registrationId":"d","status":"assigning","assignedHub":"h","deviceId":"d"}))
                .unwrap();
        let s = DeviceRegistrationState { hub_task: Some(task), ..s };
        let ok = finish(s.clone(), Ok(()), UtcTime::from_unix_secs(5), "\"e2\"".into());
        assert_eq!((ok.status, ok.hub_task.is_none(), ok.etag.as_deref()), (RegistrationStatus::Assigned, true, Some("\"e2\"")));
        assert_eq!(ok.twin.and_then(|t| t.desired), Some(serde_json::json!({"x":1})));
        let failed = finish(s, Err(HubError::Transient("down".into())), UtcTime::from_unix_secs(5), "\"e3\"".into());
        assert_eq!(
            (failed.status, failed.error_code, failed.assigned_hub),
            (RegistrationStatus::Failed, Some(HUB_UNREACHABLE_ERROR), None)
        );
        assert!(failed.error_message.unwrap().contains("down"));
    }
}
