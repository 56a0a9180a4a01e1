//! Device-facing wire shapes shared by every transport (docs/device-protocol.md §3, §6): the
//! MQTT username, request/response topics, the register body and the operation status.

use crate::error::{ErrorKind, ServiceError};
use crate::model::RegistrationStatus;
use crate::request::{Operation, RegistrationPath};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// API version assumed when a client names none (docs/device-protocol.md §3.2).
pub const DEFAULT_DEVICE_API_VERSION: &str = "2019-03-31";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsername {
    pub id_scope: String,
    pub registration_id: String,
    pub api_version: String,
    pub client_version: Option<String>,
}

/// `{idScope}/registrations/{registrationId}/api-version=...&ClientVersion=...`: everything after
/// the third `/` is a query string (it may itself contain `/`).
pub fn parse_username(u: &str) -> Option<DeviceUsername> {
    let p = RegistrationPath::parse(u)?;
    let param = |name: &str| {
        p.rest.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            k.eq_ignore_ascii_case(name).then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
        })
    };
    Some(DeviceUsername {
        id_scope: p.id_scope.to_string(),
        registration_id: p.registration_id.to_string(),
        api_version: param("api-version").unwrap_or_else(|| DEFAULT_DEVICE_API_VERSION.to_string()),
        client_version: param("ClientVersion"),
    })
}

/// Parses `$dps/registrations/PUT/iotdps-register/?$rid={rid}` and
/// `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}` into the
/// request id and the operation (a register's body is the PUBLISH payload). The rid is kept
/// byte-for-byte (it is echoed back as received); the operation id is decoded.
pub fn parse_request_topic(topic: &str, payload: &[u8]) -> Option<(String, Operation)> {
    let (path, query) = topic.split_once('?')?;
    let param = |name: &str| query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_string()));
    let rid = param("$rid")?;
    let op = match path.trim_end_matches('/') {
        "$dps/registrations/PUT/iotdps-register" => Operation::Register { body: payload.to_vec() },
        "$dps/registrations/GET/iotdps-get-operationstatus" => {
            let op = param("operationId")?;
            Operation::OperationStatus { operation_id: percent_decode_str(&op).decode_utf8_lossy().into_owned() }
        }
        _ => return None,
    };
    Some((rid, op))
}

/// The filter every SDK subscribes to.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";

/// `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`, `$rid` first (C# and Python
/// parse it positionally).
pub fn response_topic(status: u16, rid: &str, retry_after: Option<u64>) -> String {
    match retry_after {
        Some(s) => format!("$dps/registrations/res/{status}/?$rid={rid}&retry-after={s}"),
        None => format!("$dps/registrations/res/{status}/?$rid={rid}"),
    }
}

/// The register body. Every field is optional: C# sends an empty body, Python `"payload": null`,
/// the C SDK repeats it on status queries (docs/device-protocol.md §3.5).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    #[serde(default)]
    pub registration_id: Option<String>,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
    pub tpm: Option<Value>,
}

/// Parses a register body; blank bodies are an empty registration.
pub fn parse_registration_body(body: &[u8]) -> Result<DeviceRegistration, ServiceError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DeviceRegistration::default());
    }
    serde_json::from_slice(body).map_err(|e| ServiceError::new(ErrorKind::InvalidJson, format!("register body is not valid JSON: {e}")))
}

/// `symmetricKey` member of a result: which group matched.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyResult<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<&'a str>,
}

/// `DeviceRegistrationResult`: the registration state plus attestation-specific members,
/// borrowed from the state they describe.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationResult<'a> {
    #[serde(flatten)]
    pub state: crate::model::PublicState<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyResult<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509: Option<&'a crate::model::X509RegistrationResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmRegistrationResult<'a>>,
}

/// `tpm` member of a result: the `authenticationKey` that carries the device's hub key.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TpmRegistrationResult<'a> {
    pub authentication_key: &'a str,
}

/// `RegistrationOperationStatus`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus<'a> {
    pub operation_id: &'a str,
    pub status: RegistrationStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationResult<'a>>,
}

/// Operation ids: `{version}.{nonce}.{hex registration id}`; only `[0-9a-z.]`, so they travel
/// unescaped in topics and paths, and any node can find the registration they belong to.
pub fn operation_id(nonce: u64, registration_key: &str) -> String {
    let mut op = format!("1.{nonce:016x}.");
    crate::ids::push_hex(&mut op, registration_key.as_bytes());
    op
}

/// The registration key an operation id names, if it is one of ours.
pub fn operation_registration_key(op: &str) -> Option<String> {
    let mut parts = op.split('.');
    if parts.next()? != "1" {
        return None;
    }
    let nonce = parts.next()?;
    let hex = parts.next()?;
    if parts.next().is_some() || nonce.len() != 16 || hex.len() % 2 != 0 || hex.is_empty() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_of_the_sdks() {
        let py = "0ne00000A0A/registrations/my-dev/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%283.11.7%3BLinux%29";
        let u = parse_username(py).unwrap();
        assert_eq!((u.id_scope.as_str(), u.registration_id.as_str(), u.api_version.as_str()), ("0ne00000A0A", "my-dev", "2019-03-31"));
        assert_eq!(u.client_version.as_deref(), Some("azure-iot-device-provisioning-py/2.14.0(3.11.7;Linux)"));
        let c = parse_username("0ne1/registrations/d/api-version=2021-06-01&ClientVersion=1.15.0").unwrap();
        assert_eq!(c.api_version, "2021-06-01");
        assert_eq!(parse_username("0ne1/registrations/d").unwrap().api_version, DEFAULT_DEVICE_API_VERSION);
        assert!(parse_username("0ne1/devices/d").is_none());
        assert!(parse_username("garbage").is_none());
    }

    #[test]
    fn topics() {
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=abc%2D1", b"{}"),
            Some(("abc%2D1".into(), Operation::Register { body: b"{}".to_vec() }))
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=1.00.6162", b""),
            Some(("2".into(), Operation::OperationStatus { operation_id: "1.00.6162".into() }))
        );
        assert_eq!(parse_request_topic("$dps/registrations/PUT/iotdps-register/", b""), None);
        assert_eq!(parse_request_topic("devices/x/messages/events/?$rid=1", b""), None);
        assert_eq!(response_topic(202, "7", Some(1)), "$dps/registrations/res/202/?$rid=7&retry-after=1");
    }

    #[test]
    fn operation_ids_round_trip() {
        let op = operation_id(0xdead_beef, "dev:1_a");
        assert!(op.bytes().all(|b| b.is_ascii_hexdigit() || b == b'.'));
        assert_eq!(operation_registration_key(&op).as_deref(), Some("dev:1_a"));
        for bad in ["", "1", "2.0000000000000000.61", "1.00.61", "1.0000000000000000.6", "1.0000000000000000.zz", "1.0000000000000000.61.x"]
        {
            assert_eq!(operation_registration_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn register_bodies() {
        assert!(parse_registration_body(b"").unwrap().registration_id.is_none());
        assert!(parse_registration_body(b" ").unwrap().payload.is_none());
        let r = parse_registration_body(br#"{"payload": null, "registrationId": "d"}"#).unwrap();
        assert_eq!(r.registration_id.as_deref(), Some("d"));
        assert!(parse_registration_body(b"{").is_err());
    }
}
