#![no_main]
// TPM2B_PUBLIC endorsement and storage root keys from enrollments.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dps_core::tpm::parse_tpm2b_public(data);
});
