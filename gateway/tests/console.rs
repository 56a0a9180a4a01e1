#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The web console end to end: `dps serve` in a process of its own, headless Chromium driven by
//! Playwright (tests/interop/console_chromium.js) logging in with the owner policy, using every
//! page, and a screenshot per page; this test checks what the pages did through the service API
//! and that each screenshot is a real picture.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use serde_json::Value;
use std::process::Command;

const GROUP_KEY: &str = "bGluZS03LXByaW1hcnkta2V5LTAxMjM0NTY3ODk=";

fn server() -> TestServer {
    let mut cfg = test_config();
    cfg.linked_hubs.push(hub("hub-a.example"));
    TestServer::start(cfg)
}

fn owner(s: &TestServer) -> (String, String) {
    let cs = dps_core::model::parse_connection_string(&s.ep.service_connection_string).unwrap();
    (cs.key_name, cs.key)
}

fn interop_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop")
}

/// Width and height from a PNG's IHDR, when the bytes are a PNG.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let sig = b"\x89PNG\r\n\x1a\n";
    if bytes.len() < 24 || &bytes[..8] != sig || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

#[test]
fn the_console_in_headless_chromium() {
    let root = tempfile::tempdir().unwrap();
    let p = server();
    // Something to show: an enrollment, a group with two provisioned devices, one refused
    // attestation (the live page's failure count).
    assert_eq!(p.send("PUT", "/enrollments/sensor-1", Some(sym_enrollment("sensor-1"))).status(), 200);
    let group = serde_json::json!({"enrollmentGroupId": "line-7", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": "bGluZS03LXNlY29uZGFyeS1rZXktMDEyMzQ1Njc4OQ=="}}});
    assert_eq!(p.send("PUT", "/enrollmentGroups/line-7", Some(group)).status(), 200);
    for d in ["line-7-dev-1", "line-7-dev-2"] {
        let key = dps_core::sas::derive_device_key(&B64.decode(GROUP_KEY).unwrap(), d);
        let op = https_register(&p, d, &key, &format!("{{\"registrationId\":\"{d}\"}}"));
        let done = https_poll(&p, d, &key, &op, std::time::Duration::from_secs(20));
        assert_eq!(done["status"], "assigned", "{done}");
    }
    let url = format!("https://localhost:{}/{}/registrations/intruder-1/register?api-version=2019-03-31", p.ep.ports.https, p.ep.id_scope);
    let token = mqtt_client::device_token(&p.ep.id_scope, "intruder-1", "d3Jvbmcta2V5LXdyb25nLWtleQ==");
    let r = p.client.put(url).header("Authorization", token).body("{\"registrationId\":\"intruder-1\"}").send().unwrap();
    assert_eq!(r.status(), 401);

    let (policy, key) = owner(&p);
    // CONSOLE_SHOTS_DIR keeps the screenshots for a person to look at (CI sets it).
    let shots = std::env::var("CONSOLE_SHOTS_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| root.path().join("shots"));
    std::fs::create_dir_all(&shots).unwrap();
    let url = format!("https://127.0.0.1:{}/", p.ep.ports.console);
    let out = Command::new("node")
        .arg("console_chromium.js")
        .current_dir(interop_dir())
        .env("CONSOLE_URL", &url)
        .env("CONSOLE_POLICY", &policy)
        .env("CONSOLE_KEY", &key)
        .env("SHOTS", &shots)
        .env("ID_SCOPE", &p.ep.id_scope)
        .env("DEVICE_PORT", p.ep.ports.https.to_string())
        .env("CA_CERT", p.ep.ca_certificate.as_ref().unwrap())
        .output()
        .expect("node runs (tests/interop/setup.sh installs playwright-core; apt chromium)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser run failed:\n{stdout}\n{stderr}");
    // Every step the script checked on the page, reported one per line.
    for step in [
        "login-refused-with-wrong-key",
        "logged-in",
        "enrollments-listed",
        "enrollment-created",
        "enrollment-disabled",
        "keys-shown",
        "search-filters",
        "groups-listed",
        "registrations-listed",
        "hubs-listed",
        "live-charts",
        "logged-out",
    ] {
        assert!(stdout.lines().any(|l| l == format!("ok {step}")), "step {step} not reported:\n{stdout}\n{stderr}");
    }

    // What the pages did, seen through the service API.
    let get = |path: &str| status_json(p.send("GET", path, None)).1;
    let created = get("/enrollments/console-made-1");
    assert_eq!(created["registrationId"], "console-made-1");
    assert_eq!(created["attestation"]["type"], "symmetricKey");
    let disabled = get("/enrollments/sensor-1");
    assert_eq!(disabled["provisioningStatus"], "disabled", "the Disable button changed the stored enrollment");

    // A screenshot per page, each a real PNG of the viewport's size.
    for page in ["login", "enrollments", "groups", "registrations", "hubs", "live"] {
        let bytes = std::fs::read(shots.join(format!("{page}.png"))).unwrap_or_else(|e| panic!("no screenshot of {page}: {e}"));
        let (w, h) = png_size(&bytes).unwrap_or_else(|| panic!("{page}.png is not a PNG"));
        assert!(w >= 800 && h >= 600, "{page}.png is {w}x{h}");
        assert!(bytes.len() > 5_000, "{page}.png is nearly empty ({} bytes)", bytes.len());
    }
}

#[test]
fn the_console_refuses_calls_without_a_session_or_its_header() {
    let p = server();
    let base = format!("https://127.0.0.1:{}", p.ep.ports.console);
    let c = &p.client;
    // The page itself is public (it holds no data) and forbids inline script and framing.
    let page = c.get(format!("{base}/")).send().unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    // No session: nothing.
    let r = c.get(format!("{base}/api/enrollments/x")).header("x-dps-console", "1").send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(c.get(format!("{base}/stats")).header("x-dps-console", "1").send().unwrap().status(), 401);
    // A wrong key, an unknown policy, a key that is not base64: 401, no cookie.
    let (policy, key) = owner(&p);
    for (pol, k) in [(policy.as_str(), "d3Jvbmcta2V5"), ("nobody", key.as_str()), (policy.as_str(), "%%%")] {
        let r = c.post(format!("{base}/login")).json(&serde_json::json!({"policy": pol, "key": k})).send().unwrap();
        assert_eq!(r.status(), 401, "{pol}");
        assert!(r.headers().get("set-cookie").is_none());
    }
    let r = c.post(format!("{base}/login")).json(&serde_json::json!({"policy": policy, "key": key})).send().unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Secure"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_string();
    // With the session but without the console's header (a cross-site form post): 403.
    let r =
        c.post(format!("{base}/api/enrollments/query")).header("cookie", &session).json(&serde_json::json!({"query": "*"})).send().unwrap();
    assert_eq!(r.status(), 403);
    // With both: the service API answers as the policy.
    let r = c
        .post(format!("{base}/api/enrollments/query"))
        .header("cookie", &session)
        .header("x-dps-console", "1")
        .json(&serde_json::json!({"query": "*"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().unwrap();
    assert!(list.as_array().unwrap().is_empty());
    // Logged out, the session is gone.
    let r = c.post(format!("{base}/logout")).header("cookie", &session).header("x-dps-console", "1").send().unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(format!("{base}/stats")).header("cookie", &session).header("x-dps-console", "1").send().unwrap();
    assert_eq!(r.status(), 401);
}
