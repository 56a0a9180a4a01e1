#![no_main]
// Enrollment bodies through parsing and validation, as the service API runs them.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use dps_core::model::{EnrollmentGroup, IndividualEnrollment};
    use dps_core::time::UtcTime;
    use dps_core::validate::{parse_input, prepare_enrollment, prepare_group};
    let now = UtcTime::from_unix_secs(1_700_000_000);
    let mut key = || "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_string();
    if let Ok(e) = parse_input::<IndividualEnrollment>(data) {
        if let Ok(e) = prepare_enrollment(e, None, None, now, &mut key) {
            let _ = serde_json::to_vec(&e);
        }
    }
    if let Ok(g) = parse_input::<EnrollmentGroup>(data) {
        let _ = prepare_group(g, None, None, now, &mut key);
    }
});
