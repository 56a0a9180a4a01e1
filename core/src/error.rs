//! The catalogue of errors a request can end in, each mapped to its HTTP status and 6-digit DPS
//! error code (the first three digits are the status, as in every code DPS is known to send).
//! Only 401002, 404201, 404202, 400208 and 400209 are evidenced in public sources
//! (docs/service-api.md §1.7); the remaining numbers are ours and stable.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The body is not valid JSON or not of the expected shape.
    InvalidJson,
    /// A value failed validation (id syntax, key length, certificate, ...).
    InvalidArgument,
    /// `api-version` missing or not one we serve.
    InvalidApiVersion,
    /// Body id and path id differ.
    IdMismatch,
    /// Bulk call with more items than allowed.
    TooManyBulkItems,
    /// Missing, malformed, expired or wrongly signed credentials.
    Unauthorized,
    /// Valid credentials without the right the operation needs.
    Forbidden,
    /// A configured quota (enrollment count, group count, linked hubs) would be exceeded.
    QuotaExceeded,
    /// Individual enrollment or enrollment group not found.
    EnrollmentNotFound,
    /// Registration state not found.
    RegistrationNotFound,
    /// Linked hub not found.
    HubNotFound,
    /// CA certificate not found.
    CertificateNotFound,
    /// No such route.
    RouteNotFound,
    MethodNotAllowed,
    /// Create of something that already exists (PUT without If-Match).
    Conflict,
    /// If-Match did not match the stored etag.
    PreconditionFailed,
    /// Request body over the size limit.
    PayloadTooLarge,
    UnsupportedMediaType,
    /// A body was sent without a length.
    LengthRequired,
    Throttled,
    /// The store failed; nothing was acknowledged.
    Internal,
    /// The store queue is full: back off.
    Unavailable,
}

impl ErrorKind {
    pub fn status(&self) -> u16 {
        (self.code() / 1000) as u16
    }

    /// The DPS `errorCode`.
    pub fn code(&self) -> u32 {
        match self {
            ErrorKind::InvalidJson => 400001,
            ErrorKind::InvalidArgument => 400004,
            ErrorKind::InvalidApiVersion => 400005,
            ErrorKind::IdMismatch => 400006,
            ErrorKind::TooManyBulkItems => 400007,
            ErrorKind::Unauthorized => 401002,
            ErrorKind::Forbidden => 403001,
            // IoT Hub answers a quota overrun with 403002; DPS's code is unpublished, so we
            // follow the hub's convention, which every SDK surfaces as a typed 403 error.
            ErrorKind::QuotaExceeded => 403002,
            ErrorKind::EnrollmentNotFound => 404201,
            ErrorKind::RegistrationNotFound => 404202,
            ErrorKind::HubNotFound => 404203,
            ErrorKind::CertificateNotFound => 404204,
            ErrorKind::RouteNotFound => 404001,
            ErrorKind::MethodNotAllowed => 405001,
            ErrorKind::Conflict => 409201,
            ErrorKind::PreconditionFailed => 412002,
            ErrorKind::PayloadTooLarge => 413001,
            ErrorKind::UnsupportedMediaType => 415001,
            ErrorKind::LengthRequired => 411001,
            ErrorKind::Throttled => 429001,
            ErrorKind::Internal => 500001,
            ErrorKind::Unavailable => 503001,
        }
    }

    /// The name used in logs and in the `x-ms-error-code` header.
    pub fn name(&self) -> &'static str {
        match self {
            ErrorKind::InvalidJson => "InvalidJson",
            ErrorKind::InvalidArgument => "ArgumentInvalid",
            ErrorKind::InvalidApiVersion => "InvalidApiVersion",
            ErrorKind::IdMismatch => "IdMismatch",
            ErrorKind::TooManyBulkItems => "BulkOperationTooLarge",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::Forbidden => "Forbidden",
            ErrorKind::QuotaExceeded => "QuotaExceeded",
            ErrorKind::EnrollmentNotFound => "EnrollmentNotFound",
            ErrorKind::RegistrationNotFound => "DeviceRegistrationNotFound",
            ErrorKind::HubNotFound => "LinkedHubNotFound",
            ErrorKind::CertificateNotFound => "CertificateNotFound",
            ErrorKind::RouteNotFound => "NotFound",
            ErrorKind::MethodNotAllowed => "MethodNotAllowed",
            ErrorKind::Conflict => "Conflict",
            ErrorKind::PreconditionFailed => "PreconditionFailed",
            ErrorKind::PayloadTooLarge => "RequestEntityTooLarge",
            ErrorKind::UnsupportedMediaType => "UnsupportedMediaType",
            ErrorKind::LengthRequired => "LengthRequired",
            ErrorKind::Throttled => "Throttled",
            ErrorKind::Internal => "InternalServerError",
            ErrorKind::Unavailable => "ServiceUnavailable",
        }
    }
}

/// The one failure type: what went wrong (its kind maps to the status and DPS code), the
/// human message for the DPS error body, when to retry, and for logs only, the exact check
/// that failed (a device sees just "Unauthorized"; the operator's log says why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub kind: ErrorKind,
    pub message: String,
    /// Seconds after which a retry may succeed (throttling, a busy store): `Retry-After`.
    pub retry_after: Option<u64>,
    /// The detail for logs and metrics, never sent to the peer.
    pub reason: Option<String>,
}

impl ServiceError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ServiceError { kind, message: message.into(), retry_after: None, reason: None }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        ServiceError::new(ErrorKind::InvalidArgument, message)
    }
    /// A device or operator that failed authentication: the peer sees only "Unauthorized".
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        ServiceError::new(ErrorKind::Unauthorized, "Unauthorized").because(reason)
    }
    pub fn throttled(message: impl Into<String>, retry_after: u64) -> Self {
        ServiceError::new(ErrorKind::Throttled, message).retry_after(retry_after)
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
    /// What the logs say: the reason when there is one, else the message.
    pub fn detail(&self) -> &str {
        self.reason.as_deref().unwrap_or(&self.message)
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.kind.name(), self.kind.code(), self.message)
    }
}

impl std::error::Error for ServiceError {}

/// The DPS error body (`ProvisioningServiceErrorDetails`).
pub fn error_body(err: &ServiceError, tracking_id: &str, now: crate::time::UtcTime) -> String {
    serde_json::json!({
        "errorCode": err.kind.code(),
        "trackingId": tracking_id,
        "message": err.message,
        "timestampUtc": now.to_string(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_the_code_prefix() {
        for k in [ErrorKind::Unauthorized, ErrorKind::Conflict, ErrorKind::PayloadTooLarge] {
            assert_eq!(k.status() as u32, k.code() / 1000);
        }
        assert_eq!(ErrorKind::Unauthorized.status(), 401);
        assert_eq!(ErrorKind::EnrollmentNotFound.code(), 404201);
    }
}
