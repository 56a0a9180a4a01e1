#![no_main]
// A TPM device's endorsement and storage root keys as a peer sends them (HTTPS body, AMQP
// SASL), from arbitrary bytes: parsed, and when both parse, a challenge built for them:
// no panic, whatever the structures, moduli or exponents say.
use dps_core::tpm::challenge::{authentication_key, Secrets};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The EK is as long as its own size field says; the rest is the SRK.
    let cut = match data {
        [a, b, ..] => (usize::from(u16::from_be_bytes([*a, *b])) + 2).min(data.len()),
        _ => 0,
    };
    let (ek, srk) = data.split_at(cut);
    let _ = dps_core::tpm::parse_tpm2b_public(data);
    if dps_core::registration::tpm::check_keys(ek, srk).is_ok() {
        let (Ok(ek), Ok(srk)) = (dps_core::tpm::parse_tpm2b_public(ek), dps_core::tpm::parse_tpm2b_public(srk)) else { return };
        let s = Secrets {
            hmac_key: [1; 32],
            obfuscation: [2; 32],
            inner_wrap_key: [3; 16],
            dup_seed: [4; 32],
            dup_oaep_seed: [5; 32],
            cred_seed: [6; 32],
            cred_oaep_seed: [7; 32],
        };
        let _ = authentication_key(&ek, &srk, &s);
    }
});
