//! Helpers for the interop tests: the official SDKs hard-code the DPS ports (443, 8883, 5671),
//! so an interop test runs one server on them at a time, under a machine-wide lock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Holds the lock on the well-known ports for as long as it lives.
pub struct PortsLock {
    _file: File,
}

pub fn lock_well_known_ports() -> Result<PortsLock, String> {
    let f = File::create(std::env::temp_dir().join("dps-interop-ports.lock")).map_err(|e| e.to_string())?;
    f.lock().map_err(|e| e.to_string())?;
    Ok(PortsLock { _file: f })
}

/// `tests/interop`, where the SDK packages are installed by `tests/interop/setup.sh`.
pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// Checks that setup.sh has run, with a message that says what to do otherwise.
pub fn require_setup() -> Result<(), String> {
    let d = interop_dir();
    for p in [
        "node_modules/azure-iot-provisioning-service",
        "node_modules/azure-iot-provisioning-device-mqtt",
        "node_modules/azure-iot-provisioning-device-amqp",
        ".venv/bin/python",
    ] {
        if !d.join(p).exists() {
            return Err(format!(
                "{} is missing: run `bash tests/interop/setup.sh` first (installs the official SDKs from npm and PyPI)",
                d.join(p).display()
            ));
        }
    }
    Ok(())
}

/// Runs a command and returns its output, echoing it for the test log.
pub fn run(cmd: &mut Command) -> Output {
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    };
    println!("--- {cmd:?}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// A gateway on the ports the SDKs hard-code, serving `localhost`.
pub fn well_known_config() -> dps_gateway::config::Config {
    let mut c = dps_gateway::config::Config::default();
    c.ports.bind = "127.0.0.1".into();
    c.ports.admin = 0;
    c.shards = 2;
    c
}
