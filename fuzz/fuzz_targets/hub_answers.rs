#![no_main]
// The body and what it checks: `dps_fuzz::targets::hub_answers` (fuzz/src/targets.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| dps_fuzz::targets::hub_answers(data));
