//! Symmetric-key attestation: which enrollment admits a device whose SAS token verified against
//! it (docs/service-api.md §6.1). An individual enrollment for the registration id takes
//! precedence over every group, even when it is disabled or uses another attestation type;
//! otherwise the first group whose derived device key signed the token.

use super::state::Matched;
use crate::error::ServiceError;
use crate::model::*;
use crate::sas::{derive_device_key, SasToken};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// True when the token was signed with one of the base64 keys.
pub fn signed_with_any(token: &SasToken, keys: [Option<&str>; 2]) -> bool {
    keys.into_iter().flatten().filter_map(|k| B64.decode(k).ok()).any(|k| token.signed_with(&k))
}

/// True when the token was signed with a device key derived from the group's keys.
pub fn signed_with_group(token: &SasToken, group: &EnrollmentGroup, registration_id: &str) -> bool {
    let Some(k) = &group.common.attestation.symmetric_key else { return false };
    [k.primary_key.as_deref(), k.secondary_key.as_deref()].into_iter().flatten().filter_map(|gk| B64.decode(gk).ok()).any(|gk| {
        let derived = derive_device_key(&gk, registration_id);
        B64.decode(derived).is_ok_and(|d| token.signed_with(&d))
    })
}

fn signed_with_individual(token: &SasToken, e: &IndividualEnrollment) -> Result<(), ServiceError> {
    match &e.common.attestation.symmetric_key {
        Some(k) if signed_with_any(token, [k.primary_key.as_deref(), k.secondary_key.as_deref()]) => Ok(()),
        Some(_) => Err(ServiceError::unauthorized("signature does not match the individual enrollment's keys")),
        None => Err(ServiceError::unauthorized("the individual enrollment does not use symmetric keys")),
    }
}

/// The enrollment that admits a registering device.
pub fn admitting<'a>(
    token: &SasToken,
    registration_id: &str,
    individual: Option<&'a IndividualEnrollment>,
    groups: &'a [EnrollmentGroup],
) -> Result<Matched<'a>, ServiceError> {
    if let Some(e) = individual {
        signed_with_individual(token, e)?;
        return Ok(Matched::Individual(e));
    }
    groups
        .iter()
        .filter(|g| g.common.attestation.kind == AttestationType::SymmetricKey)
        .find(|g| signed_with_group(token, g, registration_id))
        .map(Matched::Group)
        .ok_or_else(|| {
            ServiceError::unauthorized("no enrollment admits this device (no individual enrollment; no group key signs the token)")
        })
}

/// A device polling or looking up its registration must still hold a key of the enrollment
/// that admitted it (`group`: the state's enrollment group, None for an individual one).
pub fn still_admitted(
    token: &SasToken,
    registration_id: &str,
    group: Option<&str>,
    individual: Option<&IndividualEnrollment>,
    groups: &[EnrollmentGroup],
) -> Result<(), ServiceError> {
    let no_longer = || ServiceError::unauthorized("the token no longer matches the enrollment");
    match group {
        None => signed_with_individual(token, individual.ok_or_else(no_longer)?).map_err(|_| no_longer()),
        Some(id) => {
            let g = groups.iter().find(|g| g.enrollment_group_id.eq_ignore_ascii_case(id)).ok_or_else(no_longer)?;
            signed_with_group(token, g, registration_id).then_some(()).ok_or_else(no_longer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::device_resource;
    use crate::sas;

    #[test]
    fn group_device_keys() {
        let g: EnrollmentGroup = serde_json::from_value(serde_json::json!({"enrollmentGroupId":"g","attestation":{"type":"symmetricKey",
            "symmetricKey":{"primaryKey":"Z3JvdXAta2V5LWdyb3VwLWtleQ==","secondaryKey":"c2Vjb25kYXJ5LWtleS1zZWNvbmRhcnk="}}}))
        .unwrap();
        let derived = B64.decode(derive_device_key(&B64.decode("c2Vjb25kYXJ5LWtleS1zZWNvbmRhcnk=").unwrap(), "dev1")).unwrap();
        let t = sas::parse(&sas::build(&device_resource("0ne1", "dev1"), &derived, 99, Some("registration"))).unwrap();
        assert!(signed_with_group(&t, &g, "dev1"));
        assert!(!signed_with_group(&t, &g, "dev2"));
        let wrong = sas::parse(&sas::build(&device_resource("0ne1", "dev1"), b"other", 99, Some("registration"))).unwrap();
        assert!(!signed_with_group(&wrong, &g, "dev1"));
    }
}
