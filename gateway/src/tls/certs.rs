//! Server certificates. On first start (and whenever the configured host names change) a
//! development CA (ECDSA P-256) signs two server certificates for the host names: ECDSA P-256
//! and RSA-2048, because some DPS clients only offer ECDHE-RSA suites. Operators can point the
//! config at their own files instead.

use crate::config::Tls;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};

pub struct CertFiles {
    pub ca_cert: Option<PathBuf>,
    pub ecdsa: Option<(PathBuf, PathBuf)>,
    pub rsa: Option<(PathBuf, PathBuf)>,
}

fn write_private(path: &Path, data: &str) -> Result<(), String> {
    crate::bootstrap::write_private(path, data.as_bytes())
}

fn write_public(path: &Path, data: &str) -> Result<(), String> {
    std::fs::write(path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn err(what: &str) -> impl Fn(rcgen::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Returns the certificate files to serve, generating the development ones when needed.
pub fn ensure(data_dir: &Path, tls: &Tls, host_names: &[String]) -> Result<CertFiles, String> {
    if tls.ecdsa_cert.is_some() || tls.rsa_cert.is_some() {
        let pair = |c: &Option<PathBuf>, k: &Option<PathBuf>, what: &str| -> Result<Option<(PathBuf, PathBuf)>, String> {
            match (c, k) {
                (Some(c), Some(k)) => Ok(Some((c.clone(), k.clone()))),
                (None, None) => Ok(None),
                _ => Err(format!("tls.{what}_cert and tls.{what}_key must be given together")),
            }
        };
        return Ok(CertFiles {
            ca_cert: tls.ca_cert.clone(),
            ecdsa: pair(&tls.ecdsa_cert, &tls.ecdsa_key, "ecdsa")?,
            rsa: pair(&tls.rsa_cert, &tls.rsa_key, "rsa")?,
        });
    }
    let dir = data_dir.join("certs");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    if !ca_cert.exists() || !ca_key.exists() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err("CA key"))?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("CA parameters"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "DPS development CA");
        dn.push(DnType::OrganizationName, "self-hosted device provisioning service");
        p.distinguished_name = dn;
        // It signs server certificates directly (no intermediates: path length 0), for five
        // years. No name constraints: the host names may change (the server certificates are
        // then made anew), while devices keep trusting the same CA.
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(CA_DAYS);
        let cert = p.self_signed(&key).map_err(err("CA certificate"))?;
        write_private(&ca_key, &key.serialize_pem())?;
        write_public(&ca_cert, &cert.pem())?;
        let _ = std::fs::remove_file(dir.join("hosts"));
    }
    let hosts_file = dir.join("hosts");
    let wanted = host_names.join("\n");
    let ecdsa = (dir.join("server-ecdsa.pem"), dir.join("server-ecdsa.key"));
    let rsa = (dir.join("server-rsa.pem"), dir.join("server-rsa.key"));
    let current = std::fs::read_to_string(&hosts_file).ok();
    let stale = [&ecdsa.0, &rsa.0].iter().any(|c| expires_within(c, RENEW_DAYS));
    if current.as_deref() != Some(wanted.as_str()) || !ecdsa.0.exists() || !rsa.0.exists() || stale {
        let ca_key_pem = std::fs::read_to_string(&ca_key).map_err(|e| format!("cannot read {}: {e}", ca_key.display()))?;
        let ca_cert_pem = std::fs::read_to_string(&ca_cert).map_err(|e| format!("cannot read {}: {e}", ca_cert.display()))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(err("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).map_err(err("CA certificate"))?;
        let ecdsa_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err("server key"))?;
        let rsa_pem = generate_rsa_pkcs8()?;
        let rsa_key = KeyPair::from_pkcs8_pem_and_sign_algo(&rsa_pem, &rcgen::PKCS_RSA_SHA256).map_err(err("RSA server key"))?;
        for (key, (cert_path, key_path)) in [(&ecdsa_key, &ecdsa), (&rsa_key, &rsa)] {
            let cert = server_params(host_names)?.signed_by(key, &issuer).map_err(err("server certificate"))?;
            write_private(key_path, &key.serialize_pem())?;
            write_public(cert_path, &format!("{}{}", cert.pem(), ca_cert_pem))?;
        }
        write_public(&hosts_file, &wanted)?;
    }
    Ok(CertFiles { ca_cert: Some(ca_cert), ecdsa: Some(ecdsa), rsa: Some(rsa) })
}

fn server_params(host_names: &[String]) -> Result<CertificateParams, String> {
    let mut names: Vec<String> = host_names.to_vec();
    for extra in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_string());
        }
    }
    let mut p = CertificateParams::new(names).map_err(err("server parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host_names.first().cloned().unwrap_or_else(|| "localhost".into()));
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(SERVER_DAYS);
    Ok(p)
}

/// Validity of the development CA, of the server certificates it signs, and how long before
/// their expiry a start makes the server certificates anew.
const CA_DAYS: i64 = 5 * 365;
const SERVER_DAYS: i64 = 397;
const RENEW_DAYS: i64 = 30;

/// True when the first certificate in the PEM file expires within `days` (or does not parse).
fn expires_within(path: &Path, days: i64) -> bool {
    let Ok(pem) = std::fs::read(path) else { return true };
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(&pem) else { return true };
    let Ok(cert) = block.parse_x509() else { return true };
    cert.validity().not_after.timestamp() < (time::OffsetDateTime::now_utc() + time::Duration::days(days)).unix_timestamp()
}

fn generate_rsa_pkcs8() -> Result<String, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).map_err(|e| format!("RSA key generation: {e}"))?;
    key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).map(|p| p.to_string()).map_err(|e| format!("RSA key encoding: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_development_ca_is_constrained_and_short_lived() {
        // Regression: the CA had no path-length constraint and was valid to 2049.
        let d = tempfile::tempdir().unwrap();
        let files = ensure(d.path(), &crate::config::Tls::default(), &["localhost".to_string()]).unwrap();
        let pem = std::fs::read(files.ca_cert.unwrap()).unwrap();
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let ca = block.parse_x509().unwrap();
        let bc = ca.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(ca.validity().not_after.timestamp() <= now + (CA_DAYS + 1) * 86_400);
        let server = files.ecdsa.unwrap().0;
        assert!(!expires_within(&server, RENEW_DAYS));
        assert!(expires_within(&server, SERVER_DAYS + 1), "a server certificate lives about 13 months");
    }
}
