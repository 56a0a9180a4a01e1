//! Interop, steps 4–8 of the DPS flow end to end: the official Python device SDK provisions a
//! symmetric-key device through the gateway (on the SDK's port 8883) to a linked `mosquitto`
//! hub, a real Mosquitto 2 broker with its dynamic-security plugin; then the device logs in to
//! the broker with what it was given (paho-mqtt, the SDK's own MQTT client library).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../gateway/tests/common/mosquitto.rs"]
mod mosquitto;

use dps_tests::*;
use std::process::Command;

#[test]
fn a_python_sdk_device_lands_at_a_mosquitto_hub() {
    require_setup().unwrap();
    let _ports = lock_well_known_ports().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let running = dps_gateway::start(well_known_config(), dir.path()).unwrap();
    let ep = running.endpoint.clone();
    let ca = ep.ca_certificate.clone().unwrap();
    let broker = mosquitto::Broker::start(ca.parent().unwrap());
    service_put(&ep, "/linkedHubs/localhost", &broker.hub_json("localhost")).unwrap();
    let python = run(Command::new(interop_dir().join(".venv/bin/python"))
        .args(["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_hub_mosquitto.py"])
        .current_dir(interop_dir())
        .env("DPS_CS", &ep.service_connection_string)
        .env("DPS_SCOPE", &ep.id_scope)
        .env("DPS_CA", &ca)
        .env("DPS_HUB", "localhost")
        .env("DPS_BROKER_PORT", broker.device_port.to_string())
        .env("REQUESTS_CA_BUNDLE", &ca));
    running.shutdown().unwrap();
    assert!(python.status.success(), "the Python device did not land at its broker");
    assert!(String::from_utf8_lossy(&python.stdout).contains("1 passed"));
}
