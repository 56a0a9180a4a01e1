#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The `dps` management commands against a running gateway: every command, the ways to say
//! where the service is, error exits, and export/import of 10,000 enrollments.

mod common;
use common::mqtt_client::device_token;
use common::*;
use serde_json::{json, Value};
use std::process::{Command, Output};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

struct Cli {
    endpoint: std::path::PathBuf,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dps"))
            .args(args)
            .arg("--endpoint")
            .arg(&self.endpoint)
            .env_remove("DPS_CONNECTION_STRING")
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed; its stdout as JSON (Null when empty).
    fn ok(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(out.status.success(), "dps {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        }
    }

    /// Runs a command that must fail; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "dps {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).unwrap()
    }
}

fn server() -> (TestServer, Cli) {
    let mut cfg = test_config();
    cfg.linked_hubs.push(hub("hub-a.example"));
    cfg.limits.service_operations_per_minute = 0;
    cfg.limits.max_bulk_items = 1_000;
    let s = TestServer::start(cfg);
    let endpoint = s.dir.path().join("endpoint.json");
    (s, Cli { endpoint })
}

#[test]
fn enrollments_groups_registrations_and_hubs() {
    let (s, cli) = server();
    // Enrollments: create, refuse a second create, show (keys hidden unless asked), list, update
    // (keys kept), a stale etag refused, delete.
    let v = cli.ok(&[
        "enrollment",
        "create",
        "--registration-id",
        "cli-1",
        "--primary-key",
        KEY,
        "--secondary-key",
        KEY2,
        "--iot-hubs",
        "hub-a.example",
        "--initial-twin",
        r#"{"tags": {"line": 7}}"#,
        "--device-id",
        "cli-device",
    ]);
    assert_eq!((v["registrationId"].as_str(), v["deviceId"].as_str()), (Some("cli-1"), Some("cli-device")), "{v}");
    assert!(!v.to_string().contains(KEY), "keys are hidden by default: {v}");
    assert!(cli.fails(&["enrollment", "create", "--registration-id", "cli-1"]).contains("409"));
    let v = cli.ok(&["enrollment", "show", "--registration-id", "cli-1", "--show-keys"]);
    assert_eq!(v["attestation"]["symmetricKey"]["primaryKey"], KEY, "{v}");
    assert_eq!(v["initialTwin"]["tags"]["line"], 7, "{v}");
    let list = cli.ok(&["enrollment", "list"]);
    assert!(list.as_array().unwrap().iter().any(|e| e["registrationId"] == "cli-1"), "{list}");
    let table = cli.run(&["enrollment", "list", "--output", "table"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("REGISTRATION ID") && table.contains("cli-1"), "{table}");
    let v = cli.ok(&["enrollment", "update", "--registration-id", "cli-1", "--provisioning-status", "disabled"]);
    assert_eq!(v["provisioningStatus"], "disabled", "{v}");
    let v = cli.ok(&["enrollment", "show", "--registration-id", "cli-1", "--show-keys"]);
    assert_eq!(v["attestation"]["symmetricKey"]["primaryKey"], KEY, "an update must not roll the keys: {v}");
    let err = cli.fails(&["enrollment", "update", "--registration-id", "cli-1", "--etag", "\"stale\"", "--provisioning-status", "enabled"]);
    assert!(err.contains("412"), "{err}");
    cli.ok(&["enrollment", "delete", "--registration-id", "cli-1"]);
    let err = cli.fails(&["enrollment", "show", "--registration-id", "cli-1"]);
    assert!(err.contains("404") && err.contains("errorCode 404201"), "{err}");

    // Groups, and a device of the group provisioned with the key the CLI computes.
    cli.ok(&["enrollment-group", "create", "--enrollment-id", "line-7", "--primary-key", KEY, "--secondary-key", KEY2]);
    let derived = cli.ok(&["enrollment-group", "compute-device-key", "--enrollment-id", "line-7", "--registration-id", "dev-7"]);
    let derived = derived.as_str().unwrap().trim().to_string();
    let offline = Command::new(env!("CARGO_BIN_EXE_dps"))
        .args(["enrollment-group", "compute-device-key", "--key", KEY, "--registration-id", "dev-7"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(offline.stdout).unwrap().trim(), derived, "the same key without asking the service");
    let base = format!("https://localhost:{}/{}/registrations/dev-7", s.ep.ports.https, s.ep.id_scope);
    let token = device_token(&s.ep.id_scope, "dev-7", &derived);
    let r = s.client.put(format!("{base}/register?api-version=2019-03-31")).header("Authorization", &token).body("{}").send().unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v = cli.ok(&["registration", "show", "--registration-id", "dev-7"]);
    assert_eq!(v["status"], "assigned", "{v}");
    let v = cli.ok(&["registration", "list", "--enrollment-id", "line-7"]);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let v = cli.ok(&["enrollment-group", "list"]);
    assert_eq!(v[0]["enrollmentGroupId"], "line-7", "{v}");
    let v = cli.ok(&[
        "enrollment-group",
        "update",
        "--enrollment-id",
        "line-7",
        "--allocation-policy",
        "static",
        "--iot-hubs",
        "hub-a.example",
    ]);
    assert_eq!(v["allocationPolicy"], "static", "{v}");
    assert_eq!(cli.ok(&["enrollment-group", "show", "--enrollment-id", "line-7"])["allocationPolicy"], "static");
    cli.ok(&["registration", "delete", "--registration-id", "dev-7"]);
    assert!(cli.fails(&["registration", "show", "--registration-id", "dev-7"]).contains("404"));
    cli.ok(&["enrollment-group", "delete", "--enrollment-id", "line-7"]);
    assert!(cli.fails(&["enrollment-group", "show", "--enrollment-id", "line-7"]).contains("404"));

    // Linked hubs.
    let cs = "HostName=hub-b.example;SharedAccessKeyName=iothubowner;SharedAccessKey=aHViLWtleQ==";
    let v = cli.ok(&["linked-hub", "add", "--hub-connection-string", cs, "--allocation-weight", "3"]);
    assert_eq!((v["name"].as_str(), v["allocationWeight"].as_u64()), (Some("hub-b.example"), Some(3)), "{v}");
    let v = cli.ok(&["linked-hub", "list"]);
    assert!(v.as_array().unwrap().iter().any(|h| h["name"] == "hub-b.example"), "{v}");
    assert!(!v.to_string().contains("aHViLWtleQ=="), "connection strings hidden: {v}");
    cli.ok(&["linked-hub", "remove", "--name", "hub-b.example"]);
    assert!(!cli.ok(&["linked-hub", "list"]).to_string().contains("hub-b.example"));

    // Where the service is: a connection string (flag or environment) with --ca and --port.
    let ca = s.ep.ca_certificate.clone().unwrap();
    let port = s.ep.ports.https.to_string();
    let by_string = |env: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dps"));
        c.args(["enrollment-group", "list", "--ca"]).arg(&ca).args(["--port", &port]);
        if env {
            c.env("DPS_CONNECTION_STRING", &s.ep.service_connection_string);
        } else {
            c.args(["--connection-string", &s.ep.service_connection_string]);
        }
        c.output().unwrap()
    };
    assert!(by_string(false).status.success());
    assert!(by_string(true).status.success());
    // Nothing said: a clear error; a wrong key: the service's 401.
    let out = Command::new(env!("CARGO_BIN_EXE_dps")).args(["enrollment", "list"]).env_remove("DPS_CONNECTION_STRING").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoint"));
    let wrong = s.ep.service_connection_string.rsplit_once("SharedAccessKey=").unwrap().0.to_string() + "SharedAccessKey=" + KEY;
    let out = Command::new(env!("CARGO_BIN_EXE_dps"))
        .args(["enrollment", "list", "--connection-string", &wrong, "--port", &port, "--ca"])
        .arg(&ca)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
    // Completions.
    let out = Command::new(env!("CARGO_BIN_EXE_dps")).args(["completions", "bash"]).output().unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("enrollment-group"));
}

#[test]
fn export_and_import_ten_thousand_enrollments() {
    let (_s, cli) = server();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleet.jsonl");
    let mut lines: Vec<String> = (0..10_000)
        .map(|i| {
            json!({"registrationId": format!("fleet-{i:05}"), "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY2}}, "provisioningStatus": "enabled"})
            .to_string()
        })
        .collect();
    lines.push(json!({"enrollmentGroupId": "fleet-group", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY2, "secondaryKey": KEY}}}).to_string());
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = cli.run(&["import", "--file", file.to_str().unwrap(), "--batch", "200"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 10001 records"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.path().join("fleet.jsonl.import-progress").exists(), "done: no progress file left");
    assert_eq!(cli.ok(&["enrollment", "list"]).as_array().unwrap().len(), 10_000);
    // Export: every record, with its keys, in a private file.
    let exported = dir.path().join("export.jsonl");
    let out = cli.run(&["export", "--file", exported.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&exported).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&exported).unwrap();
    let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 10_001);
    assert!(records.iter().filter(|r| r["registrationId"].is_string()).all(|r| r["attestation"]["symmetricKey"]["primaryKey"] == KEY));
    let group = records.iter().find(|r| r["enrollmentGroupId"] == "fleet-group").unwrap();
    assert_eq!(group["attestation"]["symmetricKey"]["primaryKey"], KEY2);
    // Into another instance: the same fleet, the same keys.
    let (_t, other) = server();
    let out = other.run(&["import", "--file", exported.to_str().unwrap(), "--batch", "200"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = other.ok(&["enrollment", "show", "--registration-id", "fleet-04321", "--show-keys"]);
    assert_eq!(v["attestation"]["symmetricKey"]["secondaryKey"], KEY2, "{v}");
    // Interrupted: the progress file says how far it got, and the next run continues there.
    std::fs::write(dir.path().join("export.jsonl.import-progress"), "9990").unwrap();
    let out = other.run(&["import", "--file", exported.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 11 records (9990 skipped"), "{}", String::from_utf8_lossy(&out.stderr));
    // A record the service refuses makes the import fail, naming it; a line that is not JSON too.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"registrationId\": \"bad id with spaces\", \"attestation\": {\"type\": \"symmetricKey\"}}\n").unwrap();
    let err = other.fails(&["import", "--file", bad.to_str().unwrap()]);
    assert!(err.contains("1 records refused") && err.contains("bad id with spaces"), "{err}");
    std::fs::write(&bad, "not json\n").unwrap();
    assert!(other.fails(&["import", "--file", bad.to_str().unwrap(), "--restart"]).contains("line 1"));
}

#[test]
fn certificates_upload_prove_possession_list_and_delete() {
    use common::certs::{ca, device};
    let (_s, cli) = server();
    let dir = tempfile::tempdir().unwrap();
    let root = ca("cli-root", None);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &root.pem).unwrap();
    let ca_path = ca_file.to_str().unwrap();

    let v = cli.ok(&["certificate", "create", "--certificate-name", "factory-ca", "--path", ca_path]);
    assert_eq!((v["name"].as_str(), v["properties"]["isVerified"].as_bool()), (Some("factory-ca"), Some(false)), "{v}");
    assert_eq!(v["properties"]["subject"], "CN=cli-root", "{v}");
    assert!(cli.fails(&["certificate", "create", "--certificate-name", "factory-ca", "--path", ca_path]).contains("409"));
    // Not a CA: refused with the service's reason.
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&leaf, device("leaf", Some(&root)).2).unwrap();
    let err = cli.fails(&["certificate", "create", "--certificate-name", "leaf", "--path", leaf.to_str().unwrap()]);
    assert!(err.contains("400") && err.contains("not a CA"), "{err}");
    let missing = cli.fails(&["certificate", "create", "--certificate-name", "x", "--path", "/nonexistent/ca.pem"]);
    assert!(missing.contains("cannot read /nonexistent/ca.pem"), "{missing}");

    // Proof of possession: a code, a certificate the CA signed with that code as its CN.
    let v = cli.ok(&["certificate", "generate-verification-code", "--certificate-name", "factory-ca"]);
    let code = v["properties"]["verificationCode"].as_str().unwrap().to_string();
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(&wrong, device("not-the-code", Some(&root)).2).unwrap();
    let err = cli.fails(&["certificate", "verify", "--certificate-name", "factory-ca", "--path", wrong.to_str().unwrap()]);
    assert!(err.contains("400"), "{err}");
    let proof = dir.path().join("proof.pem");
    std::fs::write(&proof, device(&code, Some(&root)).2).unwrap();
    let v = cli.ok(&["certificate", "verify", "--certificate-name", "factory-ca", "--path", proof.to_str().unwrap()]);
    assert_eq!(v["properties"]["isVerified"], true, "{v}");

    // Uploaded as verified (the operator vouches), listed, shown as a table.
    let other = ca("cli-other", None);
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, &other.pem).unwrap();
    let v = cli.ok(&["certificate", "create", "--certificate-name", "other-ca", "--path", other_file.to_str().unwrap(), "--verified"]);
    assert_eq!(v["properties"]["isVerified"], true, "{v}");
    let list = cli.ok(&["certificate", "list"]);
    let names: Vec<&str> = list.as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["factory-ca", "other-ca"], "{list}");
    let table = String::from_utf8(cli.run(&["certificate", "list", "--output", "table"]).stdout).unwrap();
    assert!(table.starts_with("NAME") && table.contains("CN=cli-other") && table.contains("true"), "{table}");

    // Update under If-Match: a stale etag is refused; the current one replaces the file and
    // drops the verification made for the old one.
    let etag = cli.ok(&["certificate", "show", "--certificate-name", "factory-ca"])["etag"].as_str().unwrap().to_string();
    let err = cli.fails(&[
        "certificate",
        "update",
        "--certificate-name",
        "factory-ca",
        "--path",
        other_file.to_str().unwrap(),
        "--etag",
        "\"stale\"",
    ]);
    assert!(err.contains("412"), "{err}");
    let v = cli.ok(&["certificate", "update", "--certificate-name", "factory-ca", "--path", other_file.to_str().unwrap(), "--etag", &etag]);
    assert_eq!((v["properties"]["subject"].as_str(), v["properties"]["isVerified"].as_bool()), (Some("CN=cli-other"), Some(false)), "{v}");

    cli.ok(&["certificate", "delete", "--certificate-name", "factory-ca"]);
    let err = cli.fails(&["certificate", "show", "--certificate-name", "factory-ca"]);
    assert!(err.contains("404"), "{err}");
    assert_eq!(cli.ok(&["certificate", "list"]).as_array().unwrap().len(), 1);
}
