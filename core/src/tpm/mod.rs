//! TPM attestation, service side (docs/tpm-attestation.md): the device's public keys as it
//! sends them ([`public`]), the `authenticationKey` challenge built for them ([`challenge`]),
//! and the challenges a service has issued and not yet seen answered ([`book`]).

pub mod book;
pub mod challenge;
pub mod public;
pub mod rsa_public;

pub use public::{parse_tpm2b_public, TpmKey, TpmPublic, ALG_SHA256};
