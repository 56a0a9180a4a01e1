//! Checks and completes enrollments written through the service API, so the store only ever
//! holds records a device can be attested against.

use crate::error::{ErrorKind, ServiceError};
use crate::ids::{printable, validate_id};
use crate::model::*;
use crate::time::UtcTime;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// Symmetric keys are 16..=64 bytes after base64 decoding (docs/service-api.md §2.3).
pub const MIN_KEY_BYTES: usize = 16;
pub const MAX_KEY_BYTES: usize = 64;
/// Length of keys the service generates when the caller omits them.
pub const GENERATED_KEY_BYTES: usize = 32;

/// Parses a JSON body into `T`, turning serde's message into a 400 that names the problem.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ServiceError> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ServiceError::new(ErrorKind::InvalidJson, format!("request body is not valid JSON: {e}")))?;
    strip_nulls(&mut v);
    from_value(v)
}

/// Drops the members the server sets (timestamps, registration state, certificate info), so a
/// client echoing back what it read (in any form) is not refused for them.
pub fn strip_read_only(v: &mut serde_json::Value) {
    if let Some(m) = v.as_object_mut() {
        for k in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "registrationState"] {
            m.remove(k);
        }
        if let Some(x) = m.get_mut("attestation").and_then(|a| a.get_mut("x509")).and_then(|x| x.as_object_mut()) {
            for certs in x.values_mut() {
                for which in ["primary", "secondary"] {
                    if let Some(c) = certs.get_mut(which).and_then(|c| c.as_object_mut()) {
                        c.remove("info");
                    }
                }
            }
        }
    }
}

/// Parses an enrollment or group from client input.
pub fn parse_input<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ServiceError> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ServiceError::new(ErrorKind::InvalidJson, format!("request body is not valid JSON: {e}")))?;
    strip_nulls(&mut v);
    strip_read_only(&mut v);
    from_value(v)
}

/// Parses one bulk item from client input.
pub fn input_from_value<T: serde::de::DeserializeOwned>(mut v: serde_json::Value) -> Result<T, ServiceError> {
    strip_nulls(&mut v);
    strip_read_only(&mut v);
    from_value(v)
}

pub fn from_value<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ServiceError> {
    serde_json::from_value(v).map_err(|e| ServiceError::invalid(format!("request body does not match the schema: {e}")))
}

/// Completes an attestation mechanism: generates missing symmetric keys with `random_key`, checks
/// key lengths, parses certificates and fills their info, parses TPM public keys.
pub fn complete_attestation(
    a: &mut AttestationMechanism,
    for_group: bool,
    random_key: &mut dyn FnMut() -> String,
) -> Result<(), ServiceError> {
    match a.kind {
        AttestationType::SymmetricKey => {
            let k = a.symmetric_key.get_or_insert_with(Default::default);
            for (name, slot) in [("primaryKey", &mut k.primary_key), ("secondaryKey", &mut k.secondary_key)] {
                match slot {
                    Some(s) if !s.is_empty() => check_key(name, s)?,
                    _ => *slot = Some(random_key()),
                }
            }
            a.tpm = None;
            a.x509 = None;
        }
        AttestationType::X509 => {
            let x = a.x509.as_mut().ok_or_else(|| ServiceError::invalid("attestation type x509 needs an x509 member"))?;
            let certs = if for_group {
                if x.client_certificates.is_some() {
                    return Err(ServiceError::invalid(
                        "enrollment groups take signingCertificates or caReferences, not clientCertificates",
                    ));
                }
                x.signing_certificates.as_mut()
            } else {
                if x.signing_certificates.is_some() {
                    return Err(ServiceError::invalid(
                        "individual enrollments take clientCertificates or caReferences, not signingCertificates",
                    ));
                }
                x.client_certificates.as_mut()
            };
            match (certs, &x.ca_references) {
                (Some(c), _) => {
                    let mut any = false;
                    for (slot, which) in [(c.primary.as_mut(), "primary"), (c.secondary.as_mut(), "secondary")] {
                        if let Some(cert) = slot {
                            let text =
                                cert.certificate.as_deref().filter(|t| !t.trim().is_empty()).ok_or_else(|| {
                                    ServiceError::invalid(format!("the {which} X.509 certificate has no certificate body"))
                                })?;
                            cert.info = Some(
                                crate::x509::certificate_info(text)
                                    .map_err(|e| ServiceError::invalid(format!("{which} certificate: {e}")))?,
                            );
                            any = true;
                        }
                    }
                    if !any {
                        return Err(ServiceError::invalid("x509 attestation needs a primary certificate"));
                    }
                }
                (None, Some(r)) if r.primary.is_some() || r.secondary.is_some() => {}
                _ => return Err(ServiceError::invalid("x509 attestation needs certificates or caReferences")),
            }
            a.tpm = None;
            a.symmetric_key = None;
        }
        AttestationType::Tpm => {
            if for_group {
                return Err(ServiceError::invalid("TPM attestation is only available for individual enrollments"));
            }
            let t = a.tpm.as_ref().ok_or_else(|| ServiceError::invalid("attestation type tpm needs a tpm member"))?;
            check_tpm_public("endorsementKey", &t.endorsement_key)?;
            if let Some(srk) = t.storage_root_key.as_deref().filter(|s| !s.is_empty()) {
                check_tpm_public("storageRootKey", srk)?;
            }
            a.x509 = None;
            a.symmetric_key = None;
        }
        AttestationType::None => {
            return Err(ServiceError::invalid("attestation type 'none' cannot be used for an enrollment"));
        }
    }
    Ok(())
}

fn check_key(name: &str, key: &str) -> Result<(), ServiceError> {
    let bytes = B64.decode(key.trim()).map_err(|_| ServiceError::invalid(format!("symmetricKey.{name} is not valid base64")))?;
    if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&bytes.len()) {
        return Err(ServiceError::invalid(format!(
            "symmetricKey.{name} decodes to {} bytes; it must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES}",
            bytes.len()
        )));
    }
    Ok(())
}

fn check_tpm_public(name: &str, b64: &str) -> Result<(), ServiceError> {
    let bytes = B64.decode(b64.trim()).map_err(|_| ServiceError::invalid(format!("tpm.{name} is not valid base64")))?;
    let key =
        crate::tpm::parse_tpm2b_public(&bytes).map_err(|e| ServiceError::invalid(format!("tpm.{name} is not a TPM2B_PUBLIC: {e}")))?;
    // Refused now rather than at every registration: a key the challenge cannot be built for
    // would never admit its device.
    crate::tpm::challenge::challengeable(&key).map_err(|e| ServiceError::invalid(format!("tpm.{name} cannot be challenged: {e}")))
}

/// Rules shared by enrollments and groups: reprovision policy, hubs, weights, custom allocation.
fn check_common(c: &EnrollmentCommon) -> Result<(), ServiceError> {
    if c.allocation_policy == Some(AllocationPolicy::Custom) && c.custom_allocation_definition.is_none() {
        return Err(ServiceError::invalid("allocationPolicy custom needs customAllocationDefinition"));
    }
    if let Some(d) = &c.custom_allocation_definition {
        let url = d.webhook_url.as_str();
        if !is_http_url(url) {
            return Err(ServiceError::invalid("customAllocationDefinition.webhookUrl must be an http:// or https:// URL"));
        }
    }
    if c.allocation_policy == Some(AllocationPolicy::Static) {
        let n = c.iot_hubs.as_ref().map_or(0, Vec::len)
            + usize::from(c.iot_hub_host_name.is_some() && c.iot_hubs.as_ref().is_none_or(Vec::is_empty));
        if n != 1 {
            return Err(ServiceError::invalid("allocationPolicy static needs exactly one hub in iotHubs"));
        }
    }
    if let Some(hubs) = &c.iot_hubs {
        if hubs.iter().any(|h| h.trim().is_empty()) {
            return Err(ServiceError::invalid("iotHubs holds an empty host name"));
        }
    }
    if let Some(t) = &c.initial_twin {
        if !t.is_object() {
            return Err(ServiceError::invalid("initialTwin must be an object"));
        }
    }
    Ok(())
}

/// On an update, secrets the caller left out are the stored ones. GET and query hide symmetric
/// keys and certificate bodies (as DPS does), so the official SDKs' update flow (get, change a
/// field, createOrUpdate with the etag) sends them back empty; generating new ones there would
/// lock out every device of the enrollment. New keys are generated only on create, or when the
/// attestation type changes.
fn keep_stored_secrets(a: &mut AttestationMechanism, previous: Option<&AttestationMechanism>) {
    let Some(p) = previous.filter(|p| p.kind == a.kind) else { return };
    if let (AttestationType::SymmetricKey, Some(pk)) = (a.kind, p.symmetric_key.as_ref()) {
        let k = a.symmetric_key.get_or_insert_with(Default::default);
        for (slot, stored) in [(&mut k.primary_key, &pk.primary_key), (&mut k.secondary_key, &pk.secondary_key)] {
            if slot.as_deref().is_none_or(str::is_empty) {
                slot.clone_from(stored);
            }
        }
    }
    if let (Some(x), Some(px)) = (a.x509.as_mut(), p.x509.as_ref()) {
        let pairs = [
            (x.client_certificates.as_mut(), px.client_certificates.as_ref()),
            (x.signing_certificates.as_mut(), px.signing_certificates.as_ref()),
        ];
        for (certs, stored) in pairs {
            let (Some(certs), Some(stored)) = (certs, stored) else { continue };
            for (slot, old) in [(certs.primary.as_mut(), stored.primary.as_ref()), (certs.secondary.as_mut(), stored.secondary.as_ref())] {
                if let (Some(c), Some(old)) = (slot, old) {
                    if c.certificate.as_deref().is_none_or(|t| t.trim().is_empty()) {
                        c.certificate.clone_from(&old.certificate);
                    }
                }
            }
        }
    }
}

/// Validates and completes an individual enrollment for storage. `path_id` is the id from the
/// URL (None for bulk items); `previous` supplies the creation time on update.
pub fn prepare_enrollment(
    mut e: IndividualEnrollment,
    path_id: Option<&str>,
    previous: Option<&IndividualEnrollment>,
    now: UtcTime,
    random_key: &mut dyn FnMut() -> String,
) -> Result<IndividualEnrollment, ServiceError> {
    validate_id("registrationId", &e.registration_id)?;
    if let Some(p) = path_id {
        if !p.eq_ignore_ascii_case(&e.registration_id) {
            return Err(ServiceError::new(
                ErrorKind::IdMismatch,
                format!("registrationId '{}' in the body differs from '{}' in the path", printable(&e.registration_id), printable(p)),
            ));
        }
    }
    if let Some(d) = &e.device_id {
        if d.is_empty() || d.len() > 128 || d.chars().any(|c| c.is_control()) {
            return Err(ServiceError::invalid("deviceId must be 1 to 128 printable characters"));
        }
    }
    keep_stored_secrets(&mut e.common.attestation, previous.map(|p| &p.common.attestation));
    complete_attestation(&mut e.common.attestation, false, random_key)?;
    check_common(&e.common)?;
    e.registration_state = None;
    e.common.created_date_time_utc = Some(previous.and_then(|p| p.common.created_date_time_utc).unwrap_or(now));
    e.common.last_updated_date_time_utc = Some(now);
    e.common.provisioning_status.get_or_insert(ProvisioningStatus::Enabled);
    e.common.capabilities.get_or_insert_with(Default::default);
    Ok(e)
}

pub fn prepare_group(
    mut g: EnrollmentGroup,
    path_id: Option<&str>,
    previous: Option<&EnrollmentGroup>,
    now: UtcTime,
    random_key: &mut dyn FnMut() -> String,
) -> Result<EnrollmentGroup, ServiceError> {
    validate_id("enrollmentGroupId", &g.enrollment_group_id)?;
    if let Some(p) = path_id {
        if !p.eq_ignore_ascii_case(&g.enrollment_group_id) {
            return Err(ServiceError::new(
                ErrorKind::IdMismatch,
                format!(
                    "enrollmentGroupId '{}' in the body differs from '{}' in the path",
                    printable(&g.enrollment_group_id),
                    printable(p)
                ),
            ));
        }
    }
    keep_stored_secrets(&mut g.common.attestation, previous.map(|p| &p.common.attestation));
    complete_attestation(&mut g.common.attestation, true, random_key)?;
    check_common(&g.common)?;
    g.common.created_date_time_utc = Some(previous.and_then(|p| p.common.created_date_time_utc).unwrap_or(now));
    g.common.last_updated_date_time_utc = Some(now);
    g.common.provisioning_status.get_or_insert(ProvisioningStatus::Enabled);
    g.common.capabilities.get_or_insert_with(Default::default);
    Ok(g)
}

fn is_http_url(url: &str) -> bool {
    (url.starts_with("https://") || url.starts_with("http://")) && url.len() <= 2048
}

/// Checks a linked hub definition; fills `name` from the connection string.
pub fn prepare_hub(mut h: LinkedHub, path_name: Option<&str>) -> Result<LinkedHub, ServiceError> {
    match h.kind() {
        HubKind::Webhook => {
            if !is_http_url(h.control_url.as_deref().unwrap_or_default()) {
                return Err(ServiceError::invalid("a webhook hub needs controlUrl http://… or https://…"));
            }
        }
        HubKind::RegistryOnly | HubKind::AzureIotHub => {
            if h.control_url.as_deref().is_some_and(|u| !is_http_url(u)) {
                return Err(ServiceError::invalid("controlUrl of an IoT hub must be http://… or https://…"));
            }
            let cs = parse_connection_string(&h.connection_string)
                .ok_or_else(|| ServiceError::invalid("connectionString must hold HostName, SharedAccessKeyName and SharedAccessKey"))?;
            if B64.decode(&cs.key).is_err() {
                return Err(ServiceError::invalid("the connection string's SharedAccessKey is not base64"));
            }
            if h.name.is_empty() {
                h.name = cs.host_name.clone();
            }
            if !h.name.eq_ignore_ascii_case(&cs.host_name) {
                return Err(ServiceError::invalid("name differs from the connection string's HostName"));
            }
        }
        HubKind::Mosquitto => {
            let url = h.control_url.as_deref().unwrap_or_default();
            crate::hub::ControlUrl::parse(url)
                .ok_or_else(|| ServiceError::invalid("a mosquitto hub needs controlUrl mqtt://host:port or mqtts://host:port"))?;
            if h.username.as_deref().unwrap_or_default().is_empty() || h.password.is_none() {
                return Err(ServiceError::invalid("a mosquitto hub needs the username and password of a dynamic-security admin client"));
            }
        }
    }
    if h.name.is_empty() {
        return Err(ServiceError::invalid("a linked hub needs a name (the host name devices are told)"));
    }
    if let Some(p) = path_name {
        if !p.eq_ignore_ascii_case(&h.name) {
            return Err(ServiceError::new(ErrorKind::IdMismatch, "hub name in the body differs from the path"));
        }
    }
    if let Some(w) = h.allocation_weight {
        if !(1..=1000).contains(&w) {
            return Err(ServiceError::invalid("allocationWeight must be 1 to 1000"));
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keygen() -> impl FnMut() -> String {
        || B64.encode([9u8; GENERATED_KEY_BYTES])
    }

    fn enrollment(j: &str) -> IndividualEnrollment {
        parse_input(j.as_bytes()).unwrap()
    }

    #[test]
    fn read_only_members_are_dropped() {
        let e = enrollment(
            r#"{"registrationId":"d1","attestation":{"type":"x509","x509":{"clientCertificates":{"primary":{"certificate":"x","info":{"bogus":1}}}}},
            "createdDateTimeUtc":"garbage","registrationState":{"x":1}}"#,
        );
        assert_eq!(e.common.created_date_time_utc, None);
        assert!(e.registration_state.is_none());
    }

    #[test]
    fn an_update_without_secrets_keeps_the_stored_ones() {
        // Regression: GET hides keys, so GET -> modify -> PUT arrived without them and new keys
        // were generated, locking out every device of the enrollment.
        let now = UtcTime::from_unix_secs(5);
        let created = prepare_enrollment(
            enrollment(r#"{"registrationId":"d1","attestation":{"type":"symmetricKey"}}"#),
            Some("d1"),
            None,
            now,
            &mut keygen(),
        )
        .unwrap();
        let view = serde_json::to_string(&IndividualEnrollment {
            common: EnrollmentCommon { attestation: created.common.attestation.without_secrets(), ..created.common.clone() },
            ..created.clone()
        })
        .unwrap();
        let mut edited = enrollment(&view);
        edited.device_id = Some("renamed".into());
        let mut fresh = || B64.encode([7u8; GENERATED_KEY_BYTES]);
        let updated = prepare_enrollment(edited, Some("d1"), Some(&created), now, &mut fresh).unwrap();
        assert_eq!(updated.common.attestation.symmetric_key, created.common.attestation.symmetric_key);
        assert_eq!(updated.device_id.as_deref(), Some("renamed"));
        // Keys given on the update replace the stored ones; a new type starts afresh.
        let given = enrollment(
            r#"{"registrationId":"d1","attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}}"#,
        );
        let k = prepare_enrollment(given, None, Some(&created), now, &mut fresh).unwrap().common.attestation.symmetric_key.unwrap();
        assert_eq!(k.primary_key.as_deref(), Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="));
        assert_eq!(k.secondary_key, created.common.attestation.symmetric_key.as_ref().unwrap().secondary_key);
        // Groups too.
        let g = |j: &str| -> EnrollmentGroup { parse_input(j.as_bytes()).unwrap() };
        let made =
            prepare_group(g(r#"{"enrollmentGroupId":"g","attestation":{"type":"symmetricKey"}}"#), None, None, now, &mut keygen()).unwrap();
        let again = prepare_group(
            g(r#"{"enrollmentGroupId":"g","attestation":{"type":"symmetricKey","symmetricKey":{}}}"#),
            None,
            Some(&made),
            now,
            &mut fresh,
        )
        .unwrap();
        assert_eq!(again.common.attestation.symmetric_key, made.common.attestation.symmetric_key);
    }

    #[test]
    fn symmetric_keys_generated_and_checked() {
        let e = enrollment(r#"{"registrationId":"d1","attestation":{"type":"symmetricKey"}}"#);
        let out = prepare_enrollment(e, Some("D1"), None, UtcTime::from_unix_secs(5), &mut keygen()).unwrap();
        let k = out.common.attestation.symmetric_key.unwrap();
        assert_eq!(B64.decode(k.primary_key.unwrap()).unwrap().len(), 32);
        assert_eq!(out.common.provisioning_status, Some(ProvisioningStatus::Enabled));
        assert_eq!(out.common.created_date_time_utc, Some(UtcTime::from_unix_secs(5)));

        let short = enrollment(r#"{"registrationId":"d1","attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"AAAA"}}}"#);
        let err = prepare_enrollment(short, None, None, UtcTime::from_unix_secs(5), &mut keygen()).unwrap_err();
        assert!(err.message.contains("3 bytes"), "{}", err.message);
    }

    #[test]
    fn path_and_body_ids_must_agree() {
        let e = enrollment(r#"{"registrationId":"d1","attestation":{"type":"symmetricKey"}}"#);
        let err = prepare_enrollment(e, Some("d2"), None, UtcTime::from_unix_secs(5), &mut keygen()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::IdMismatch);
    }

    #[test]
    fn tpm_endorsement_key_is_parsed() {
        let ek = B64.encode(std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ek.pub")).unwrap());
        let ok = enrollment(&format!(r#"{{"registrationId":"t1","attestation":{{"type":"tpm","tpm":{{"endorsementKey":"{ek}"}}}}}}"#));
        assert!(prepare_enrollment(ok, None, None, UtcTime::from_unix_secs(5), &mut keygen()).is_ok());
        let bad = enrollment(r#"{"registrationId":"t1","attestation":{"type":"tpm","tpm":{"endorsementKey":"AAEC"}}}"#);
        assert!(prepare_enrollment(bad, None, None, UtcTime::from_unix_secs(5), &mut keygen()).is_err());
        // A well-formed key the challenge cannot use (a 1024-bit modulus here) is refused at once.
        let mut short = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ek.pub")).unwrap();
        let at = short.len() - 258; // keyBits, exponent, then the TPM2B modulus: truncate to 128 bytes
        short.truncate(at + 128 + 2);
        short[at - 6..at - 4].copy_from_slice(&1024u16.to_be_bytes());
        short[at..at + 2].copy_from_slice(&128u16.to_be_bytes());
        let size = (short.len() - 2) as u16;
        short[..2].copy_from_slice(&size.to_be_bytes());
        assert!(crate::tpm::parse_tpm2b_public(&short).is_ok(), "still a well-formed TPM2B_PUBLIC");
        let e = enrollment(&format!(
            r#"{{"registrationId":"t1","attestation":{{"type":"tpm","tpm":{{"endorsementKey":"{}"}}}}}}"#,
            B64.encode(&short)
        ));
        let err = prepare_enrollment(e, None, None, UtcTime::from_unix_secs(5), &mut keygen()).unwrap_err();
        assert!(err.message.contains("cannot be challenged"), "{err:?}");
    }

    #[test]
    fn static_needs_one_hub() {
        let e =
            enrollment(r#"{"registrationId":"d1","attestation":{"type":"symmetricKey"},"allocationPolicy":"static","iotHubs":["a","b"]}"#);
        assert!(prepare_enrollment(e, None, None, UtcTime::from_unix_secs(5), &mut keygen()).is_err());
    }

    #[test]
    fn bad_json_is_invalid_json() {
        assert_eq!(parse_json::<IndividualEnrollment>(b"{").unwrap_err().kind, ErrorKind::InvalidJson);
        assert_eq!(parse_json::<IndividualEnrollment>(b"{}").unwrap_err().kind, ErrorKind::InvalidArgument);
    }
}
