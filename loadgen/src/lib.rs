//! `dps-loadgen`: simulated devices provisioning against a DPS endpoint (ours or any other),
//! reporting latencies; also drives the benchmark's reference loads (bare TLS handshakes and
//! Mosquitto sessions). The `loadgen` binary is its command line.

pub mod amqp_device;
mod amqp_tpm;
pub mod device;
pub mod endpoint;
#[cfg(test)]
mod held_writes;
pub mod identities;
pub mod report;
pub mod run;
pub mod service;
pub mod swtpm;
pub mod tls;
pub mod tpm_device;
mod wire;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
