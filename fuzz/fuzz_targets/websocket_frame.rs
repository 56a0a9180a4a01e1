#![no_main]
// WebSocket client frames; a parsed frame never uses more bytes than given.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = dps_core::websocket::parse_client_frame(data, 1024) {
        assert!(used <= data.len());
    }
});
