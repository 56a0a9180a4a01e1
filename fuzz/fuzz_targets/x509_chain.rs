#![no_main]
// A client certificate chain from a device: arbitrary bytes cut into certificates, checked
// against an individual enrollment and an X.509 group: no panic, whatever the DER says.
use dps_core::model::{EnrollmentGroup, IndividualEnrollment};
use dps_core::time::UtcTime;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let chain: Vec<Vec<u8>> = vec![data[..cut].to_vec(), data[cut..].to_vec()];
    let _ = dps_core::registration::x509::check_leaf(&chain, "dev-1");
    let b64 = |d: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(d)
    };
    let e: IndividualEnrollment = serde_json::from_value(serde_json::json!({"registrationId": "dev-1", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": b64(&chain[0])}}}}}))
    .unwrap_or_else(|_| panic!("enrollment shape"));
    let g: EnrollmentGroup = serde_json::from_value(serde_json::json!({"enrollmentGroupId": "g", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": b64(&chain[1])}}}}}))
    .unwrap_or_else(|_| panic!("group shape"));
    let now = UtcTime::from_unix_secs(1_900_000_000);
    let cas = Default::default();
    let _ = dps_core::registration::x509::admitting(&chain, Some(&e), &[], &cas, now);
    let _ = dps_core::registration::x509::admitting(&chain, None, std::slice::from_ref(&g), &cas, now);
});
