//! Test certificates made with rcgen: CAs (root or intermediate) and device certificates.
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub der: Vec<u8>,
    pub pem: String,
}

pub fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 12, 31);
    p
}

pub fn ca(cn: &str, parent: Option<&Ca>) -> Ca {
    let mut p = params(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let k = KeyPair::generate().unwrap();
    let cert = match parent {
        Some(parent) => p.signed_by(&k, &parent.issuer).unwrap(),
        None => p.self_signed(&k).unwrap(),
    };
    Ca { der: cert.der().to_vec(), pem: cert.pem(), issuer: Issuer::new(p, k) }
}

/// A device certificate (DER) and its PKCS#8 key.
pub fn device(cn: &str, parent: Option<&Ca>) -> (Vec<u8>, Vec<u8>, String) {
    let mut p = params(cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let k = KeyPair::generate().unwrap();
    let cert = match parent {
        Some(parent) => p.signed_by(&k, &parent.issuer).unwrap(),
        None => p.self_signed(&k).unwrap(),
    };
    (cert.der().to_vec(), k.serialize_der(), cert.pem())
}
