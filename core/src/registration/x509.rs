//! X.509 attestation (docs/device-protocol.md §8): which enrollment admits a device by the
//! certificate chain it presented in the TLS handshake (which already proved it holds the
//! leaf's key). The leaf's subject CN is the registration id. An individual enrollment for the
//! id decides first (the leaf is its primary or secondary certificate, or chains to a CA it
//! references); otherwise the groups, by the first certificate of the chain above the leaf that
//! a group holds, then the next one up, ending with the issuer of the last one sent (usually
//! the root, which devices do not send). The first match wins, disabled or not. The path from
//! the leaf to the matched certificate is then validated by rustls-webpki: signatures, validity
//! periods, basic constraints, path length, key and extended key usage.

use super::state::Matched;
use crate::error::ServiceError;
use crate::model::*;
use crate::time::UtcTime;
use crate::x509::{decode_certificate, info_of_der};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::collections::HashMap;
use x509_parser::prelude::*;

/// Verified CA certificates (DER) by lower-case name, for `caReferences`.
pub type VerifiedCas = HashMap<String, Vec<u8>>;

/// The subject CN of a certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// The check that needs no enrollment: a leaf that parses and names the registration id.
pub fn check_leaf(chain: &[Vec<u8>], registration_id: &str) -> Result<(), ServiceError> {
    let leaf = chain.first().ok_or_else(|| ServiceError::unauthorized("no client certificate"))?;
    match common_name(leaf) {
        Some(cn) if cn.eq_ignore_ascii_case(registration_id) => Ok(()),
        Some(cn) => {
            Err(ServiceError::unauthorized(format!("the certificate's CN '{}' is not the registration id", crate::ids::printable(&cn))))
        }
        None => Err(ServiceError::unauthorized("the client certificate does not parse or has no CN")),
    }
}

/// The certificates an attestation names (decoded to DER), primary first.
fn certificates_of(certs: Option<&X509Certificates>) -> Vec<Vec<u8>> {
    let Some(c) = certs else { return Vec::new() };
    [c.primary.as_ref(), c.secondary.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|c| c.certificate.as_deref().and_then(|t| decode_certificate(t).ok()))
        .collect()
}

/// The verified CAs an attestation references (unverified or unknown names count as none).
fn referenced(refs: Option<&X509CaReferences>, cas: &VerifiedCas) -> Vec<Vec<u8>> {
    let Some(r) = refs else { return Vec::new() };
    [r.primary.as_deref(), r.secondary.as_deref()].into_iter().flatten().filter_map(|n| cas.get(&n.to_ascii_lowercase()).cloned()).collect()
}

/// Validates the path from the leaf, through what the device sent, to `anchor`.
fn verify_path(chain: &[Vec<u8>], anchor: &[u8], now: UtcTime) -> Result<(), ServiceError> {
    let leaf_der = CertificateDer::from(chain[0].as_slice());
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| ServiceError::unauthorized(format!("client certificate: {e}")))?;
    let anchor_der = CertificateDer::from(anchor);
    let anchors =
        [webpki::anchor_from_trusted_cert(&anchor_der).map_err(|e| ServiceError::unauthorized(format!("enrolled certificate: {e}")))?];
    let intermediates: Vec<CertificateDer<'_>> = chain[1..].iter().map(|c| CertificateDer::from(c.as_slice())).collect();
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.unix_secs().max(0) as u64));
    let path = leaf
        .verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &anchors, &intermediates, time, webpki::KeyUsage::client_auth(), None, None)
        .map_err(|e| ServiceError::unauthorized(format!("certificate chain: {e}")))?;
    // webpki checks the path length of the intermediates, not the enrolled certificate's own
    // (a trust anchor keeps no basic constraints); an operator who enrolls a CA limited to N
    // intermediates below it gets that limit.
    let below = path.intermediate_certificates().count();
    let limit = X509Certificate::from_der(anchor)
        .ok()
        .and_then(|(_, c)| c.basic_constraints().ok().flatten().and_then(|b| b.value.path_len_constraint));
    match limit {
        Some(n) if below > n as usize => {
            Err(ServiceError::unauthorized(format!("certificate chain: {below} intermediates below a CA allowing {n}")))
        }
        _ => Ok(()),
    }
}

/// A leaf enrolled as itself: the same certificate, currently valid, not a CA.
fn check_enrolled_leaf(leaf: &[u8], now: UtcTime) -> Result<(), ServiceError> {
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| ServiceError::unauthorized(format!("client certificate: {e}")))?;
    let t = now.unix_secs();
    let validity = cert.validity();
    if t < validity.not_before.timestamp() {
        return Err(ServiceError::unauthorized("client certificate: not valid yet"));
    }
    if t > validity.not_after.timestamp() {
        return Err(ServiceError::unauthorized("client certificate: expired"));
    }
    if cert.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca) {
        return Err(ServiceError::unauthorized("client certificate: a CA certificate used by a device"));
    }
    Ok(())
}

/// What admitted an X.509 device, and what its registration state reports.
pub struct Admitted<'a> {
    pub matched: Matched<'a>,
    pub result: X509RegistrationResult,
}

fn result(chain: &[Vec<u8>], group: Option<&str>, signer: Option<&[u8]>) -> Result<X509RegistrationResult, ServiceError> {
    let info = |der: &[u8]| info_of_der(der).map_err(|e| ServiceError::unauthorized(format!("certificate: {e}")));
    Ok(X509RegistrationResult {
        certificate_info: info(&chain[0])?,
        enrollment_group_id: group.map(str::to_string),
        signing_certificate_info: signer.map(info).transpose()?,
    })
}

/// The enrollment that admits a device presenting `chain` (see the module's order).
pub fn admitting<'a>(
    chain: &[Vec<u8>],
    individual: Option<&'a IndividualEnrollment>,
    groups: &'a [EnrollmentGroup],
    cas: &VerifiedCas,
    now: UtcTime,
) -> Result<Admitted<'a>, ServiceError> {
    if chain.is_empty() {
        return Err(ServiceError::unauthorized("no client certificate"));
    }
    if let Some(e) = individual {
        let a = &e.common.attestation;
        let x = a.x509.as_ref().filter(|_| a.kind == AttestationType::X509);
        let Some(x) = x else { return Err(ServiceError::unauthorized("the individual enrollment does not use X.509")) };
        if certificates_of(x.client_certificates.as_ref()).iter().any(|c| *c == chain[0]) {
            check_enrolled_leaf(&chain[0], now)?;
            return Ok(Admitted { matched: Matched::Individual(e), result: result(chain, None, None)? });
        }
        let cas_of = referenced(x.ca_references.as_ref(), cas);
        if cas_of.is_empty() {
            return Err(ServiceError::unauthorized("the client certificate is not the individual enrollment's"));
        }
        let mut last = None;
        for ca in &cas_of {
            match verify_path(chain, ca, now) {
                Ok(()) => return Ok(Admitted { matched: Matched::Individual(e), result: result(chain, None, None)? }),
                Err(err) => last = Some(err),
            }
        }
        return Err(last.unwrap_or_else(|| ServiceError::unauthorized("no referenced CA signs the chain")));
    }
    // Each X.509 group with the certificates that stand for it.
    let candidates: Vec<(&EnrollmentGroup, Vec<Vec<u8>>)> = groups
        .iter()
        .filter(|g| g.common.attestation.kind == AttestationType::X509)
        .filter_map(|g| {
            let x = g.common.attestation.x509.as_ref()?;
            let mut certs = certificates_of(x.signing_certificates.as_ref());
            certs.extend(referenced(x.ca_references.as_ref(), cas));
            (!certs.is_empty()).then_some((g, certs))
        })
        .collect();
    // The first presented certificate above the leaf that a group holds...
    let by_presence = chain[1..].iter().find_map(|c| candidates.iter().find(|(_, certs)| certs.contains(c)).map(|(g, _)| (*g, c.clone())));
    let (group, anchor) = match by_presence {
        // The path from the leaf to it must still validate.
        Some((group, anchor)) => {
            verify_path(chain, &anchor, now)?;
            (group, anchor)
        }
        // ...else the group whose certificate issued the last one sent: found by validating the
        // path to it, so it is not validated twice.
        None => candidates
            .iter()
            .find_map(|(g, certs)| certs.iter().find(|ca| verify_path(chain, ca, now).is_ok()).map(|ca| (*g, ca.clone())))
            .ok_or_else(|| ServiceError::unauthorized("no enrollment holds a certificate of the presented chain"))?,
    };
    Ok(Admitted { matched: Matched::Group(group), result: result(chain, Some(&group.enrollment_group_id), Some(&anchor))? })
}
