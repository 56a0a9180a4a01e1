//! CA certificates of the instance and their proof of possession (docs/service-api.md §4.5):
//! an operator uploads a CA certificate, asks for a verification code, and proves they hold the
//! CA's private key by uploading a certificate whose subject CN is that code, signed by the CA.
//! Only verified CAs back `caReferences` in enrollments. Shapes follow the ARM resource.

use crate::error::ServiceError;
use crate::time::UtcTime;
use crate::x509::{decode_certificate, info_of_der};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

/// A CA certificate as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCa {
    pub name: String,
    /// DER, base64.
    pub certificate: String,
    pub is_verified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
    pub created: UtcTime,
    pub updated: UtcTime,
}

/// `PUT /certificates/{name}` and `POST …/verify` bodies.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateBody {
    pub certificate: String,
    #[serde(default)]
    pub is_verified: Option<bool>,
}

impl StoredCa {
    /// A new or replaced CA certificate: it must parse and be a CA (basic constraints).
    pub fn prepare(name: &str, body: CertificateBody, previous: Option<&StoredCa>, now: UtcTime) -> Result<StoredCa, ServiceError> {
        let der = decode_certificate(&body.certificate).map_err(ServiceError::invalid)?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| ServiceError::invalid(format!("invalid X.509 certificate: {e}")))?;
        if !cert.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca) {
            return Err(ServiceError::invalid("the certificate is not a CA certificate (basic constraints)"));
        }
        let same = previous.filter(|p| B64.decode(&p.certificate).ok().as_deref() == Some(der.as_slice()));
        Ok(StoredCa {
            name: name.to_string(),
            certificate: B64.encode(&der),
            // Replacing the certificate drops a verification made for the old one.
            is_verified: body.is_verified.unwrap_or(false) || same.is_some_and(|p| p.is_verified),
            verification_code: same.and_then(|p| p.verification_code.clone()),
            created: previous.map_or(now, |p| p.created),
            updated: now,
        })
    }

    pub fn der(&self) -> Result<Vec<u8>, ServiceError> {
        B64.decode(&self.certificate)
            .map_err(|_| ServiceError::new(crate::error::ErrorKind::Internal, "a stored CA certificate does not decode"))
    }

    /// The ARM `CertificateResponse` (with the verification code when one is pending).
    pub fn response(&self, etag: &str) -> Result<serde_json::Value, ServiceError> {
        let info = info_of_der(&self.der()?).map_err(ServiceError::invalid)?;
        let mut properties = serde_json::json!({
            "subject": info.subject_name,
            "expiry": info.not_after_utc,
            "thumbprint": info.sha1_thumbprint,
            "isVerified": self.is_verified,
            "certificate": self.certificate,
            "created": self.created,
            "updated": self.updated,
        });
        if let Some(code) = &self.verification_code {
            properties["verificationCode"] = serde_json::Value::String(code.clone());
        }
        Ok(
            serde_json::json!({"name": self.name, "etag": etag, "type": "Microsoft.Devices/ProvisioningServices/Certificates", "properties": properties}),
        )
    }

    /// Checks the proof of possession: `pop` (PEM or base64) has the pending code as its subject
    /// CN, is signed by this CA's key and is currently valid.
    pub fn verify(&self, pop: &str, now: UtcTime) -> Result<(), ServiceError> {
        let code = self
            .verification_code
            .as_deref()
            .ok_or_else(|| ServiceError::invalid("no verification code was generated for this certificate"))?;
        let ca_der = self.der()?;
        let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| ServiceError::invalid(format!("stored CA: {e}")))?;
        let der = decode_certificate(pop).map_err(ServiceError::invalid)?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| ServiceError::invalid(format!("invalid X.509 certificate: {e}")))?;
        let cn = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("");
        if cn != code {
            return Err(ServiceError::invalid("the certificate's subject CN is not the verification code"));
        }
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| ServiceError::invalid("the certificate is not signed by this CA's key"))?;
        let t = now.unix_secs();
        if t < cert.validity().not_before.timestamp() || t > cert.validity().not_after.timestamp() {
            return Err(ServiceError::invalid("the verification certificate is not valid now"));
        }
        Ok(())
    }
}

/// A new verification code from random bytes (the host supplies them).
pub fn verification_code(random: [u8; 16]) -> String {
    random.iter().map(|b| format!("{b:02X}")).collect()
}
