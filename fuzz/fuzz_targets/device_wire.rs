#![no_main]
// MQTT usernames, request topics, operation ids and register bodies from devices.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dps_core::device::parse_registration_body(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = dps_core::device::parse_username(s);
        let _ = dps_core::device::parse_request_topic(s, data);
        let _ = dps_core::request::from_http("PUT", s, Some(s), data, None);
        if let Some(k) = dps_core::device::operation_registration_key(s) {
            assert_eq!(dps_core::device::operation_registration_key(&dps_core::device::operation_id(7, &k)), Some(k));
        }
    }
});
