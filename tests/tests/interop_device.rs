//! Interop: the official Python device SDK (`azure-iot-device`) provisions individual and group
//! enrollment devices over MQTT and MQTT over WebSockets against a real gateway on the ports the SDK hard-codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dps_tests::*;
use std::process::Command;

#[test]
fn official_python_device_sdk_provisions_devices() {
    require_setup().unwrap();
    let _ports = lock_well_known_ports().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = well_known_config();
    cfg.linked_hubs.push(dps_gateway::config::HubConfig {
        host_name: "hub-a.example".into(),
        connection_string: "HostName=hub-a.example;SharedAccessKeyName=iothubowner;SharedAccessKey=aHViLWtleQ==".into(),
        allocation_weight: None,
        apply_allocation_policy: None,
        location: None,
    });
    let running = dps_gateway::start(cfg, dir.path()).unwrap();
    assert_eq!((running.endpoint.ports.mqtt, running.endpoint.ports.https), (8883, 443));
    let ep = running.endpoint.clone();
    let python = run(Command::new(interop_dir().join(".venv/bin/python"))
        .args(["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_device_python.py"])
        .current_dir(interop_dir())
        .env("DPS_CS", &ep.service_connection_string)
        .env("DPS_SCOPE", &ep.id_scope)
        .env("DPS_CA", ep.ca_certificate.as_ref().unwrap())
        .env("DPS_HUB", "hub-a.example")
        .env("DPS_TRANSPORTS", "mqtt,websockets")
        .env("REQUESTS_CA_BUNDLE", ep.ca_certificate.as_ref().unwrap()));
    running.shutdown().unwrap();
    assert!(python.status.success(), "Python device SDK interop failed");
    assert!(String::from_utf8_lossy(&python.stdout).contains("6 passed"), "all Python device tests ran");
}
