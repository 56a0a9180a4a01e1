#![no_main]
// SAS tokens from Authorization headers and MQTT passwords.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = dps_core::sas::parse(s) {
            let _ = t.check_scope("0ne00000001/registrations/dev", 1_700_000_000);
            let _ = t.signed_with(b"0123456789abcdef");
        }
    }
});
