//! Which devices exist and what each proves its identity with: ids `{prefix}-{n}` with keys
//! derived from an enrollment group's key, individual enrollments read from a CSV file
//! (`registrationId,base64 primary key` per line; a header line and blank lines are skipped),
//! or X.509 devices whose leaf certificates are made on the fly by a test CA.

use crate::BoxError;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

pub enum Identities {
    Group {
        prefix: String,
        key: Vec<u8>,
    },
    Individual(Vec<(String, Vec<u8>)>),
    /// Devices `{prefix}-{n}` of an X.509 group enrolled by `ca`.
    X509 {
        prefix: String,
        ca: std::sync::Arc<TestCa>,
    },
}

/// A device certificate (DER) and its PKCS#8 key.
pub type DeviceCertificate = (Vec<u8>, Vec<u8>);

/// A CA that signs device certificates (ECDSA P-256, CN = registration id, client auth).
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl TestCa {
    pub fn new(cn: &str) -> Result<TestCa, BoxError> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate()?;
        let pem = p.self_signed(&key)?.pem();
        Ok(TestCa { issuer: rcgen::Issuer::new(p, key), pem })
    }

    /// A device certificate (DER) and its PKCS#8 key, made now.
    pub fn device(&self, registration_id: &str) -> Result<DeviceCertificate, BoxError> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(rcgen::DnType::CommonName, registration_id);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }
}

impl Identities {
    pub fn read_csv(text: &str) -> Result<Identities, BoxError> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (n == 0 && line.to_ascii_lowercase().starts_with("registrationid")) {
                continue;
            }
            let (id, key) = line.split_once(',').ok_or_else(|| format!("CSV line {}: expected registrationId,primaryKey", n + 1))?;
            let key = B64.decode(key.trim()).map_err(|e| format!("CSV line {}: key is not base64: {e}", n + 1))?;
            out.push((id.trim().to_string(), key));
        }
        if out.is_empty() {
            return Err("the CSV holds no devices".into());
        }
        Ok(Identities::Individual(out))
    }

    /// Device `i`: its registration id and its symmetric key.
    pub fn device(&self, i: usize) -> (String, Vec<u8>) {
        match self {
            Identities::Group { prefix, key } => {
                // The raw bytes of the derived key (`derive_device_key` is their base64).
                let id = format!("{prefix}-{i}");
                let k = dps_core::sas::sign(key, &id);
                (id, k)
            }
            Identities::Individual(v) => v[i % v.len()].clone(),
            Identities::X509 { prefix, .. } => (format!("{prefix}-{i}"), Vec::new()),
        }
    }

    /// Device `i`'s certificate and key, for X.509 devices.
    pub fn certificate(&self, i: usize) -> Option<Result<DeviceCertificate, BoxError>> {
        match self {
            Identities::X509 { prefix, ca } => Some(ca.device(&format!("{prefix}-{i}"))),
            _ => None,
        }
    }

    pub fn count(&self) -> Option<usize> {
        match self {
            Identities::Group { .. } | Identities::X509 { .. } => None,
            Identities::Individual(v) => Some(v.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_header_and_bad_lines() {
        let ids = Identities::read_csv("registrationId,primaryKey\ndev-1,AAEC\n\ndev-2, AwQF \n").unwrap();
        assert_eq!(ids.count(), Some(2));
        assert_eq!(ids.device(1), ("dev-2".to_string(), vec![3, 4, 5]));
        assert!(Identities::read_csv("dev-1\n").is_err());
        assert!(Identities::read_csv("dev-1,@@@\n").is_err());
        assert!(Identities::read_csv("").is_err());
    }

    #[test]
    fn group_keys_are_derived() {
        let ids = Identities::Group { prefix: "d".into(), key: b"group-key".to_vec() };
        let (id, key) = ids.device(7);
        assert_eq!(id, "d-7");
        assert_eq!(B64.encode(key), dps_core::sas::derive_device_key(b"group-key", "d-7"));
    }
}
