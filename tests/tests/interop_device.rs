//! Interop: the official Python device SDK (`azure-iot-device`, MQTT and MQTT over WebSockets)
//! and Node device SDK (`azure-iot-provisioning-device` with its MQTT, MQTT-over-WebSockets,
//! AMQP, AMQP-over-WebSockets and HTTP transports) provision individual and group enrollment devices
//! against a real gateway on the ports the SDK hard-codes: symmetric keys on every transport, X.509
//! (Python over MQTT and MQTT/WebSockets; Node `azure-iot-security-x509` over all five transports)
//! for an individual enrollment, a group enrolled by an intermediate and one by a verified root,
//! and TPM (Node `azure-iot-security-tpm` on a software TPM, over HTTP and AMQP).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dps_tests::*;
use std::process::Command;

#[test]
fn official_device_sdks_provision_devices() {
    require_setup().unwrap();
    let _ports = lock_well_known_ports().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = well_known_config();
    // A refused device's connection is closed 1 s after its answer (5 s by default); the SDKs'
    // wrong-key tests then wait past that, so a close behind a refusal is seen by every SDK.
    cfg.limits.refused_close_secs = 1;
    cfg.linked_hubs.push(dps_gateway::config::HubConfig {
        host_name: "hub-a.example".into(),
        connection_string: "HostName=hub-a.example;SharedAccessKeyName=iothubowner;SharedAccessKey=aHViLWtleQ==".into(),
        ..Default::default()
    });
    let running = dps_gateway::start(cfg, dir.path()).unwrap();
    assert_eq!((running.endpoint.ports.mqtt, running.endpoint.ports.https), (8883, 443));
    let ep = running.endpoint.clone();
    let certs = tempfile::tempdir().unwrap();
    let node_x509 = |kind: &str| ["mqtt", "mqttws", "amqp", "amqpws", "http"].map(|t| format!("node-x509-{kind}-{t}"));
    let py_x509 = |kind: &str| ["mqtt", "websockets"].map(|t| format!("py-x509-{kind}-{t}"));
    let names = |kind: &str| -> Vec<String> { node_x509(kind).into_iter().chain(py_x509(kind)).collect() };
    let (ind, int, root) = (names("ind"), names("int"), names("root"));
    let (ind, int, root): (Vec<&str>, Vec<&str>, Vec<&str>) =
        (ind.iter().map(String::as_str).collect(), int.iter().map(String::as_str).collect(), root.iter().map(String::as_str).collect());
    x509_fixtures(certs.path(), &ep, &ind, &int, &root).unwrap();
    let python = run(Command::new(interop_dir().join(".venv/bin/python"))
        .args(["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_device_python.py"])
        .current_dir(interop_dir())
        .env("DPS_CS", &ep.service_connection_string)
        .env("DPS_SCOPE", &ep.id_scope)
        .env("DPS_CA", ep.ca_certificate.as_ref().unwrap())
        .env("DPS_HUB", "hub-a.example")
        .env("DPS_TRANSPORTS", "mqtt,websockets")
        .env("DPS_X509_DIR", certs.path())
        .env("REQUESTS_CA_BUNDLE", ep.ca_certificate.as_ref().unwrap()));
    // Two software TPMs: the device's, and another one that tries its registration id.
    let (tpm, other_tpm) = (SoftTpm::start().unwrap(), SoftTpm::start().unwrap());
    let node = run(Command::new("node")
        .arg("device_node.test.js")
        .current_dir(interop_dir())
        .env("DPS_CS", &ep.service_connection_string)
        .env("DPS_SCOPE", &ep.id_scope)
        .env("DPS_HUB", "hub-a.example")
        .env("DPS_X509_DIR", certs.path())
        .env("DPS_SWTPM_PORTS", format!("{},{}", tpm.port, other_tpm.port))
        .env("NODE_EXTRA_CA_CERTS", ep.ca_certificate.as_ref().unwrap()));
    running.shutdown().unwrap();
    assert!(node.status.success(), "Node device SDK interop failed");
    assert!(String::from_utf8_lossy(&node.stdout).contains("# pass 29"), "all Node device tests ran");
    assert!(python.status.success(), "Python device SDK interop failed");
    assert!(String::from_utf8_lossy(&python.stdout).contains("9 passed"), "all Python device tests ran");
}
