//! X.509 certificates in enrollments: PEM or base64 DER on input; the server fills in
//! `X509CertificateInfo` (docs/service-api.md §2.3).

use crate::model::X509CertificateInfo;
use crate::time::UtcTime;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::digest;
use x509_parser::prelude::*;

/// Decodes a certificate given as PEM or as base64 of its DER.
pub fn decode_certificate(text: &str) -> Result<Vec<u8>, String> {
    let t = text.trim();
    if t.starts_with("-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(t.as_bytes()).map_err(|e| format!("invalid PEM: {e}"))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!("PEM block is a {}, not a CERTIFICATE", pem.label));
        }
        Ok(pem.contents)
    } else {
        let compact: String = t.chars().filter(|c| !c.is_whitespace()).collect();
        B64.decode(compact).map_err(|_| "certificate is neither PEM nor base64 DER".to_string())
    }
}

fn hex_upper(b: &[u8]) -> String {
    crate::ids::hex(b).to_ascii_uppercase()
}

/// Parses the certificate and computes the info DPS reports.
pub fn certificate_info(text: &str) -> Result<X509CertificateInfo, String> {
    info_of_der(&decode_certificate(text)?)
}

/// The info DPS reports of a DER certificate.
pub fn info_of_der(der: &[u8]) -> Result<X509CertificateInfo, String> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| format!("invalid X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".to_string());
    }
    let time = |t: ASN1Time| UtcTime::from_unix_secs(t.timestamp());
    Ok(X509CertificateInfo {
        subject_name: cert.subject().to_string(),
        sha1_thumbprint: hex_upper(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref()),
        sha256_thumbprint: hex_upper(digest::digest(&digest::SHA256, der).as_ref()),
        issuer_name: cert.issuer().to_string(),
        not_before_utc: time(cert.validity().not_before),
        not_after_utc: time(cert.validity().not_after),
        serial_number: hex_upper(cert.raw_serial()),
        version: cert.version().0 as i32 + 1,
    })
}
