//! Interop: the official service SDKs (Node `azure-iot-provisioning-service`, Python
//! `azure-iot-deviceprovisioning`) drive the service API of a real gateway on port 443.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dps_tests::*;
use std::process::Command;

#[test]
fn official_service_sdks_manage_enrollments() {
    require_setup().unwrap();
    let _ports = lock_well_known_ports().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let running = dps_gateway::start(well_known_config(), dir.path()).unwrap();
    assert_eq!(running.endpoint.ports.https, 443);
    let cs = running.endpoint.service_connection_string.clone();
    let ca = running.endpoint.ca_certificate.clone().unwrap();

    let node = run(Command::new("node")
        // Run the file itself (node:test reports TAP); under `node --test` the SDK's pending
        // requests are not awaited by Node 20's runner.
        .arg("service_node.test.js")
        .current_dir(interop_dir())
        .env("DPS_CS", &cs)
        .env("NODE_EXTRA_CA_CERTS", &ca));
    let python = run(Command::new(interop_dir().join(".venv/bin/python"))
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_service_python.py"])
        .current_dir(interop_dir())
        .env("DPS_CS", &cs)
        .env("REQUESTS_CA_BUNDLE", &ca)
        .env_remove("SSL_CERT_FILE"));
    running.shutdown().unwrap();
    assert!(node.status.success(), "Node service SDK interop failed");
    assert!(String::from_utf8_lossy(&node.stdout).contains("# pass 3"), "all three Node tests ran");
    assert!(python.status.success(), "Python service SDK interop failed");
    assert!(String::from_utf8_lossy(&python.stdout).contains("3 passed"), "all three Python tests ran");
}
