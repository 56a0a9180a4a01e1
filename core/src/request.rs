//! One device request, whatever carried it. Each transport parses the peer's bytes once into a
//! [`DeviceRequest`] (MQTT: username, password and topic; AMQP: SASL, link address and message;
//! HTTPS: path, `Authorization` and body), and the registration machine takes it from there.

use percent_encoding::percent_decode_str;
use std::sync::Arc;

/// The certificate chain a device presented in its TLS handshake (which proved it holds the
/// leaf's key): DER, leaf first, as sent.
pub type CertChain = Arc<Vec<Vec<u8>>>;

/// What the device presented to prove who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A SAS token (MQTT password, SASL PLAIN password, HTTP `Authorization`).
    SasToken(String),
    /// The TPM mechanism of AMQP's SASL layer: the device's keys and, once it answered the
    /// challenge the connection sent, what it signed.
    Tpm(Box<TpmCredential>),
    /// No token: the TLS client certificate chain the handshake carried.
    ClientCertificate(CertChain),
    /// Nothing at all (an HTTP request without `Authorization`).
    None,
}

/// A TPM device's endorsement key and storage root key (TPM2B_PUBLIC bytes as sent) and, when
/// it has answered, its SAS token with the challenge it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmCredential {
    pub endorsement_key: Vec<u8>,
    pub storage_root_key: Vec<u8>,
    pub answer: Option<(String, crate::tpm::book::Issued)>,
}

/// The three device operations (docs/device-protocol.md §3.4, §4.7, §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `iotdps-register`, with the JSON body as sent (may be empty).
    Register { body: Vec<u8> },
    /// `iotdps-get-operationstatus` for an operation id.
    OperationStatus { operation_id: String },
    /// HTTP `POST /{idScope}/registrations/{registrationId}`: the registration state.
    Lookup,
}

impl Operation {
    /// The name used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Register { .. } => "register",
            Operation::OperationStatus { .. } => "operation_status",
            Operation::Lookup => "lookup",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    pub id_scope: String,
    pub registration_id: String,
    pub credential: Credential,
    pub operation: Operation,
}

/// `{idScope}/registrations/{registrationId}[/{rest}]`: the shape of the MQTT username, the
/// AMQP link address and SASL user, the HTTP device path and the SAS token's resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationPath<'a> {
    pub id_scope: &'a str,
    pub registration_id: &'a str,
    /// What follows the registration id's `/` (empty when nothing does).
    pub rest: &'a str,
}

impl<'a> RegistrationPath<'a> {
    pub fn parse(s: &'a str) -> Option<RegistrationPath<'a>> {
        let mut parts = s.splitn(3, '/');
        let id_scope = parts.next()?;
        let (registrations, tail) = (parts.next()?, parts.next().unwrap_or(""));
        if !registrations.eq_ignore_ascii_case("registrations") {
            return None;
        }
        let (registration_id, rest) = tail.split_once('/').unwrap_or((tail, ""));
        (!id_scope.is_empty() && !registration_id.is_empty()).then_some(RegistrationPath { id_scope, registration_id, rest })
    }
}

/// The resource a device's SAS token must be for.
pub fn device_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

/// The HTTPS device API (docs/device-protocol.md §5): `PUT …/register`, `GET
/// …/operations/{operationId}`, `POST /{idScope}/registrations/{registrationId}`. None when the
/// request is not one of them (it is then the service API's). Without `Authorization`, the
/// TLS client certificate is the credential (X.509 devices send no header).
pub fn from_http(method: &str, path: &str, authorization: Option<&str>, body: &[u8], chain: Option<&CertChain>) -> Option<DeviceRequest> {
    let p = RegistrationPath::parse(path.trim_matches('/'))?;
    // Service API collections never sit in the first segment of a device path.
    if ["enrollments", "enrollmentgroups", "registrations", "linkedhubs"].iter().any(|c| p.id_scope.eq_ignore_ascii_case(c)) {
        return None;
    }
    let dec = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let rest: Vec<&str> = if p.rest.is_empty() { Vec::new() } else { p.rest.split('/').collect() };
    let operation = match (method, rest.as_slice()) {
        ("PUT", [r]) if r.eq_ignore_ascii_case("register") => Operation::Register { body: body.to_vec() },
        ("GET", [o, op]) if o.eq_ignore_ascii_case("operations") => Operation::OperationStatus { operation_id: dec(op) },
        ("POST", []) => Operation::Lookup,
        _ => return None,
    };
    let credential = match (authorization, chain) {
        (Some(t), _) => Credential::SasToken(t.to_string()),
        (None, Some(c)) => Credential::ClientCertificate(c.clone()),
        (None, None) => Credential::None,
    };
    Some(DeviceRequest { id_scope: dec(p.id_scope), registration_id: dec(p.registration_id), credential, operation })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_paths() {
        let p = RegistrationPath::parse("0ne1/registrations/dev/api-version=1/x").unwrap();
        assert_eq!((p.id_scope, p.registration_id, p.rest), ("0ne1", "dev", "api-version=1/x"));
        assert_eq!(RegistrationPath::parse("0ne1/Registrations/dev").map(|p| p.rest), Some(""));
        for bad in ["", "0ne1", "0ne1/registrations", "0ne1/registrations/", "/registrations/d", "0ne1/devices/d"] {
            assert_eq!(RegistrationPath::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn http_routes() {
        let r = from_http("PUT", "/0ne1/registrations/dev/register", Some("SharedAccessSignature x"), b"{}", None).unwrap();
        assert_eq!(r.operation, Operation::Register { body: b"{}".to_vec() });
        assert_eq!(r.credential, Credential::SasToken("SharedAccessSignature x".into()));
        let r = from_http("GET", "/0ne1/registrations/d%2D1/operations/1.00.64", None, b"", None).unwrap();
        assert_eq!((r.registration_id.as_str(), r.credential), ("d-1", Credential::None));
        assert_eq!(r.operation, Operation::OperationStatus { operation_id: "1.00.64".into() });
        assert_eq!(from_http("POST", "/0ne1/registrations/dev", None, b"", None).unwrap().operation, Operation::Lookup);
        assert_eq!(from_http("POST", "/registrations/grp/query", None, b"", None), None);
        assert_eq!(from_http("GET", "/enrollments/x", None, b"", None), None);
        assert_eq!(from_http("DELETE", "/0ne1/registrations/dev/register", None, b"", None), None);
        assert_eq!(from_http("PUT", "/0ne1/registrations/dev/register/x", None, b"", None), None);
        let chain: CertChain = Arc::new(vec![vec![1, 2, 3]]);
        let r = from_http("PUT", "/0ne1/registrations/dev/register", None, b"", Some(&chain)).unwrap();
        assert_eq!(r.credential, Credential::ClientCertificate(chain.clone()));
        let r = from_http("PUT", "/0ne1/registrations/dev/register", Some("SharedAccessSignature x"), b"", Some(&chain)).unwrap();
        assert!(matches!(r.credential, Credential::SasToken(_)), "a token, when sent, is the credential");
    }
}
