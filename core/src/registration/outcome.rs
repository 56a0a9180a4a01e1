//! The one result of a device request, and its rendering: a status (the HTTP status, the MQTT
//! response topic's status, or the AMQP settlement), a JSON body and, when throttled, a
//! retry-after. Each transport carries the [`Reply`] its own way.

use crate::device::{DeviceRegistrationResult, OperationStatus, SymmetricKeyResult, TpmRegistrationResult};
use crate::error::{error_body, ServiceError};
use crate::model::{DeviceRegistrationState, RegistrationStatus};
use crate::time::UtcTime;
use crate::tpm::book::Issued;

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A register or an operation status poll: the operation and the state it is in.
    Operation { operation_id: String, state: DeviceRegistrationState },
    /// A registration lookup (HTTPS only).
    Registration { state: DeviceRegistrationState },
    /// A TPM device must first prove it holds its keys: the `authenticationKey` blob for it
    /// and the challenge to remember until it answers (HTTPS: 401 with the blob; AMQP: SASL
    /// challenge segments).
    Challenge { authentication_key: Vec<u8>, issued: Issued },
    /// Refused, with the error the device is told.
    Refused(ServiceError),
}

/// The key name a TPM device signs its token under (`skn`); the SDKs echo what they are told.
pub const TPM_KEY_NAME: &str = "registration";

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<u64>,
    /// The device's credential was refused (401): the connection that carried it has nothing
    /// more to do here, so the transport closes it soon after the answer.
    pub credential_refused: bool,
}

/// Seconds a device waits before polling an operation that is not final yet. The C SDK raises
/// smaller values to 1; the Python SDK waits 2 s after a 202 whatever it is told.
pub const POLL_AFTER_SECS: u64 = 1;

/// The state with its attestation's member: `x509` for a certificate, `tpm` for a TPM, else
/// `symmetricKey`.
fn result(state: &DeviceRegistrationState) -> DeviceRegistrationResult<'_> {
    let x509 = state.x509.as_ref();
    let tpm = state.tpm.as_ref().map(|t| TpmRegistrationResult { authentication_key: &t.authentication_key });
    let symmetric_key =
        (x509.is_none() && tpm.is_none()).then_some(SymmetricKeyResult { enrollment_group_id: state.enrollment_group_id.as_deref() });
    DeviceRegistrationResult { state: state.public_view(), symmetric_key, x509, tpm }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    // Our own model types always serialise (no maps with non-string keys).
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

impl Outcome {
    /// The answer on MQTT and AMQP, and to HTTPS polls and lookups. A final state is answered
    /// 200 at once, also to the register request: every SDK treats a 200 with a terminal
    /// status as done, which saves the 2 s the Python SDK waits after a 202.
    pub fn reply(&self, tracking_id: &str, now: UtcTime) -> Reply {
        match self {
            Outcome::Operation { operation_id, state } => {
                let status = OperationStatus { operation_id, status: state.status, registration_state: Some(result(state)) };
                let done = !matches!(state.status, RegistrationStatus::Assigning | RegistrationStatus::Unassigned);
                let (code, retry_after) = if done { (200, None) } else { (202, Some(POLL_AFTER_SECS)) };
                Reply { status: code, body: json(&status), retry_after, credential_refused: false }
            }
            Outcome::Registration { state } => {
                Reply { status: 200, body: json(&result(state)), retry_after: None, credential_refused: false }
            }
            Outcome::Challenge { authentication_key, .. } => {
                use base64::Engine;
                let key = base64::engine::general_purpose::STANDARD.encode(authentication_key);
                Reply {
                    status: 401,
                    body: serde_json::json!({"authenticationKey": key, "keyName": TPM_KEY_NAME}).to_string(),
                    retry_after: None,
                    // A challenge: the device answers it, maybe on this connection.
                    credential_refused: false,
                }
            }
            Outcome::Refused(e) => Reply {
                status: e.kind.status(),
                body: error_body(e, tracking_id, now),
                retry_after: e.retry_after,
                credential_refused: e.kind == crate::error::ErrorKind::Unauthorized,
            },
        }
    }

    /// The answer to an HTTPS register: 202 `assigning` with the operation id, whatever the
    /// state (C# and the IoT Edge identity service accept nothing else); the device then polls
    /// the operation.
    pub fn http_register_reply(&self, tracking_id: &str, now: UtcTime) -> Reply {
        match self {
            Outcome::Operation { operation_id, .. } => Reply {
                status: 202,
                body: serde_json::json!({"operationId": operation_id, "status": "assigning"}).to_string(),
                retry_after: Some(POLL_AFTER_SECS),
                credential_refused: false,
            },
            other => other.reply(tracking_id, now),
        }
    }

    /// The error, when refused.
    pub fn refusal(&self) -> Option<&ServiceError> {
        match self {
            Outcome::Refused(e) => Some(e),
            _ => None,
        }
    }
}
