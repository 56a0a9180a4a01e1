//! TPM attestation (docs/tpm-attestation.md). A TPM device is admitted only by an individual
//! enrollment whose endorsement key is its own (TPM devices are never in groups). It first
//! gets a challenge built for its endorsement and storage root keys, then answers with a SAS
//! token signed by the key only its TPM could import; that key then signs its polls, and a
//! second `authenticationKey` around it is what the device keeps for its hub.

use crate::error::{ErrorKind, ServiceError};
use crate::model::*;
use crate::sas::SasToken;
use crate::time::UtcTime;
use crate::tpm::book::{Issued, CHALLENGE_SECS};
use crate::tpm::challenge::{authentication_key, Secrets};
use crate::tpm::{parse_tpm2b_public, TpmKey, TpmPublic};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// The `tpm` member of an HTTPS register body: both keys, base64 of TPM2B_PUBLIC.
pub fn keys_from_body(tpm: &serde_json::Value) -> Result<(Vec<u8>, Vec<u8>), ServiceError> {
    let field = |name: &str| -> Result<Vec<u8>, ServiceError> {
        let s = tpm.get(name).and_then(|v| v.as_str()).ok_or_else(|| ServiceError::invalid(format!("tpm.{name} is missing")))?;
        B64.decode(s.trim()).map_err(|_| ServiceError::invalid(format!("tpm.{name} is not valid base64")))
    };
    Ok((field("endorsementKey")?, field("storageRootKey")?))
}

fn parse(what: &str, bytes: &[u8]) -> Result<TpmPublic, ServiceError> {
    parse_tpm2b_public(bytes).map_err(|e| ServiceError::invalid(format!("the {what} is not a TPM2B_PUBLIC: {e}")))
}

/// Both keys must parse (checked before any store read).
pub fn check_keys(endorsement_key: &[u8], storage_root_key: &[u8]) -> Result<(), ServiceError> {
    parse("endorsement key", endorsement_key)?;
    parse("storage root key", storage_root_key).map(|_| ())
}

/// Two endorsement keys are the same TPM's when their public key material is equal (the
/// attributes around it may differ between templates; the key is what identifies the TPM).
fn same_key(a: &TpmPublic, b: &TpmPublic) -> bool {
    let norm = |k: &TpmKey| match k {
        TpmKey::Rsa { key_bits, exponent, modulus } => (1u8, *key_bits, if *exponent == 0 { 65537 } else { *exponent }, modulus.clone()),
        TpmKey::Ecc { curve, x, y } => (2, *curve, 0, [x.as_slice(), y.as_slice()].concat()),
    };
    norm(&a.key) == norm(&b.key)
}

/// The individual enrollment that admits a TPM device with this endorsement key.
pub fn enrollment_for<'a>(
    endorsement_key: &[u8],
    individual: Option<&'a IndividualEnrollment>,
) -> Result<&'a IndividualEnrollment, ServiceError> {
    let e = individual
        .ok_or_else(|| ServiceError::unauthorized("no individual enrollment for this registration id (TPM devices are not in groups)"))?;
    let enrolled = match (&e.common.attestation.kind, &e.common.attestation.tpm) {
        (AttestationType::Tpm, Some(t)) => t,
        _ => return Err(ServiceError::unauthorized("the individual enrollment does not use TPM attestation")),
    };
    let enrolled = B64
        .decode(enrolled.endorsement_key.trim())
        .ok()
        .and_then(|b| parse_tpm2b_public(&b).ok())
        .ok_or_else(|| ServiceError::new(ErrorKind::Internal, "internal error").because("stored endorsement key does not parse"))?;
    let device = parse("endorsement key", endorsement_key)?;
    if !same_key(&enrolled, &device) {
        return Err(ServiceError::unauthorized("the endorsement key is not the enrolled one"));
    }
    Ok(e)
}

/// A new challenge for the device's keys, valid for [`CHALLENGE_SECS`].
pub fn challenge(
    endorsement_key: &[u8],
    storage_root_key: &[u8],
    secrets: Secrets,
    now: UtcTime,
) -> Result<(Vec<u8>, Issued), ServiceError> {
    let ek = parse("endorsement key", endorsement_key)?;
    let srk = parse("storage root key", storage_root_key)?;
    let blob = authentication_key(&ek, &srk, &secrets).map_err(ServiceError::invalid)?;
    let issued = Issued {
        hmac_key: secrets.hmac_key,
        endorsement_key: endorsement_key.to_vec(),
        storage_root_key: storage_root_key.to_vec(),
        expires_secs: now.unix_secs() + CHALLENGE_SECS,
    };
    Ok((blob, issued))
}

/// The device answered `issued`: in time, from the TPM it was built for, signed with its key.
pub fn verify_answer(issued: &Issued, token: &SasToken, endorsement_key: &[u8], now: UtcTime) -> Result<(), ServiceError> {
    if issued.expires_secs <= now.unix_secs() {
        return Err(ServiceError::unauthorized("the TPM challenge expired: ask for a new one"));
    }
    if issued.endorsement_key != endorsement_key {
        return Err(ServiceError::unauthorized("the challenge was issued for another endorsement key"));
    }
    if !token.signed_with(&issued.hmac_key) {
        return Err(ServiceError::unauthorized("the token is not signed with the key of the TPM challenge"));
    }
    Ok(())
}

/// The AMQP SASL layer's check of the device's last response, before the outcome is sent.
pub fn verify_sasl_answer(issued: &Issued, token: &str, id_scope: &str, registration_id: &str, now: UtcTime) -> Result<(), ServiceError> {
    let t = super::parse_token(token, id_scope, registration_id, now)?;
    verify_answer(issued, &t, &issued.endorsement_key, now)
}

/// What the registration keeps: K, the endorsement key, and a second `authenticationKey`
/// around the same K (fresh wrapping), which the SDKs import as the key they use at the hub.
pub fn registration_secret(issued: &Issued, mut secrets: Secrets) -> Result<TpmRegistrationSecret, ServiceError> {
    let ek = parse("endorsement key", &issued.endorsement_key)?;
    let srk = parse("storage root key", &issued.storage_root_key)?;
    secrets.hmac_key = issued.hmac_key;
    let blob = authentication_key(&ek, &srk, &secrets).map_err(ServiceError::invalid)?;
    Ok(TpmRegistrationSecret {
        hmac_key: B64.encode(issued.hmac_key),
        endorsement_key: B64.encode(&issued.endorsement_key),
        authentication_key: B64.encode(blob),
    })
}

/// A TPM device polling or looking up its registration signs with the key it registered
/// with, and its individual enrollment must still name its endorsement key.
pub fn still_admitted(
    token: &SasToken,
    secret: &TpmRegistrationSecret,
    individual: Option<&IndividualEnrollment>,
) -> Result<(), ServiceError> {
    let key =
        B64.decode(&secret.hmac_key).map_err(|_| ServiceError::new(ErrorKind::Internal, "internal error").because("stored TPM key"))?;
    if !token.signed_with(&key) {
        return Err(ServiceError::unauthorized("the token is not signed with the device's TPM key"));
    }
    let ek = B64.decode(&secret.endorsement_key).map_err(|_| ServiceError::new(ErrorKind::Internal, "internal error"))?;
    enrollment_for(&ek, individual).map(|_| ()).map_err(|e| ServiceError::unauthorized(format!("no longer admitted: {}", e.detail())))
}
