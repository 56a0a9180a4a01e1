#![no_main]
// HTTP/1.1 request framing: any bytes, a small body limit; never panics, and a complete
// request never claims more bytes than it was given.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(dps_gateway::transport::http::Parsed::Complete(_, used)) = dps_gateway::transport::http::parse_request(data, 4096) {
        assert!(used <= data.len());
    }
});
