#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The `dps` binary as an operator runs it: endpoint.json, clean shutdown on SIGTERM, a clear
//! error for a port that cannot be bound, and garbage on the wire that must not hurt a shard.

mod common;
use common::*;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for_endpoint(dir: &std::path::Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(t) = std::fs::read_to_string(dir.join("endpoint.json")) {
            return serde_json::from_str(&t).unwrap();
        }
        assert!(Instant::now() < deadline, "endpoint.json never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `dps serve` on `dir`, one shard, every port ephemeral on loopback.
fn serve_on_ephemeral_ports(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dps"));
    c.args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--https-port", "0", "--mqtt-port", "0", "--amqp-port", "0", "--shards", "1"])
        .env("DPS_PORTS__BIND", "127.0.0.1")
        .env("DPS_PORTS__ADMIN", "0")
        .env("DPS_PORTS__CONSOLE", "0");
    c
}

#[test]
fn serves_then_exits_zero_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dps"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--https-port", "0", "--shards", "2"])
        .env("DPS_PORTS__BIND", "127.0.0.1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let ep = wait_for_endpoint(dir.path());
    assert!(ep["idScope"].as_str().unwrap().starts_with("0ne"));
    assert_eq!(ep["idScope"].as_str().unwrap().len(), 11);
    assert!(ep["serviceConnectionString"].as_str().unwrap().contains("SharedAccessKeyName=provisioningserviceowner"));
    let port = ep["ports"]["https"].as_u64().unwrap();
    assert!(port > 0);
    // The data key is private to the owner.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.path().join("data.key")).unwrap().permissions().mode() & 0o777, 0o600);
    // So are the owner's key in endpoint.json, the data dir and the private keys (regression:
    // endpoint.json was 0644 in a 0755 dir).
    assert_eq!(std::fs::metadata(dir.path().join("endpoint.json")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777, 0o700);
    for f in std::fs::read_dir(dir.path().join("certs")).unwrap().flatten().filter(|f| f.path().extension().is_some_and(|e| e == "key")) {
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600, "{}", f.path().display());
    }

    send_signal(child.id(), "-TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "dps did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.contains("ID scope:") && out.contains(ep["idScope"].as_str().unwrap()), "{out}");
    // The owner's key is not printed (stdout lands in journald and container logs).
    let key = dps_core::model::parse_connection_string(ep["serviceConnectionString"].as_str().unwrap()).unwrap().key;
    assert!(!out.contains(&key) && out.contains("SharedAccessKey=<in endpoint.json>"), "{out}");
}

fn send_signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").arg(sig).arg(pid.to_string()).status().unwrap().success());
}

#[test]
fn busy_port_error_names_the_port_and_the_fix() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dps"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--https-port", &port.to_string()])
        .env("DPS_PORTS__BIND", "127.0.0.1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("HTTPS port {port}")) && err.contains("--https-port"), "{err}");
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("dps.toml");
    std::fs::write(&cfg, "[limits]\nmax_bulk_itemz = 5\n").unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_dps")).args(["serve", "--data-dir"]).arg(dir.path()).arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_bulk_itemz"));
}

#[test]
fn garbage_and_half_open_connections_do_not_hurt_the_shards() {
    let mut cfg = test_config();
    cfg.limits.handshake_timeout_secs = 1;
    let s = TestServer::start(cfg);
    let addr = format!("127.0.0.1:{}", s.ep.ports.https);
    // Plain-text garbage instead of a TLS ClientHello, and connections that say nothing.
    let mut idle = Vec::new();
    for i in 0..20 {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            let _ = c.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage");
        }
        idle.push(c);
    }
    // Garbage inside TLS: an invalid request head gets a 400 and the connection closes.
    let config = rustls_client(&s);
    let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(&addr).unwrap());
    tls.write_all(b"\x01\x02 not http at all\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = tls.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // Everyone else is still served.
    for i in 0..10 {
        assert_eq!(s.send("GET", &format!("/enrollments/x{i}"), None).status().as_u16(), 404);
    }
    // Half-open connections are dropped after the handshake timeout.
    std::thread::sleep(Duration::from_millis(1500));
    let mut closed = 0;
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 256];
        // A TLS alert may come first; closed means end of stream or a reset, not a timeout.
        loop {
            match c.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(closed, 20);
}

fn rustls_client(s: &TestServer) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(s.ep.ca_certificate.as_ref().unwrap()).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// `DPS_LOG_FORMAT=json`: one JSON line per device and per service operation, with its outcome
/// and DPS error code, in the two categories; never a key or a token.
#[test]
fn operation_logs_are_json_lines_without_secrets() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let mut child =
        serve_on_ephemeral_ports(dir.path()).env("DPS_LOG_FORMAT", "json").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let ep = wait_for_endpoint(dir.path());
    let ca = std::fs::read(ep["caCertificate"].as_str().unwrap()).unwrap();
    let http = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", ep["ports"]["https"]);
    let cs = dps_core::model::parse_connection_string(ep["serviceConnectionString"].as_str().unwrap()).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let service_token = dps_core::sas::build(&cs.host_name, &b64.decode(&cs.key).unwrap(), 4_000_000_000, Some(&cs.key_name));
    let key = b64.encode(b"log-test-device-key-0123456789ab");
    let put = http
        .put(format!("{base}/enrollments/log-dev?api-version=2021-10-01"))
        .header("Authorization", &service_token)
        .body(format!(r#"{{"registrationId":"log-dev","attestation":{{"type":"symmetricKey","symmetricKey":{{"primaryKey":"{key}","secondaryKey":"{key}"}}}}}}"#))
        .send()
        .unwrap();
    assert_eq!(put.status().as_u16(), 200);
    let missing =
        http.get(format!("{base}/enrollments/nobody?api-version=2021-10-01")).header("Authorization", &service_token).send().unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let scope = ep["idScope"].as_str().unwrap();
    let register = |k: &[u8]| {
        let token = dps_core::sas::build(&format!("{scope}/registrations/log-dev"), k, 4_000_000_000, Some("registration"));
        let r = http
            .put(format!("{base}/{scope}/registrations/log-dev/register?api-version=2019-03-31"))
            .header("Authorization", &token)
            .body(r#"{"registrationId":"log-dev"}"#)
            .send()
            .unwrap();
        (r.status().as_u16(), token)
    };
    let (ok, good_token) = register(b"log-test-device-key-0123456789ab");
    assert_eq!(ok, 202);
    let (refused, bad_token) = register(b"not the key");
    assert_eq!(refused, 401);

    send_signal(child.id(), "-TERM");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<serde_json::Value> =
        err.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let find = |target: &str, f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().any(|l| l["target"] == target && f(&l["fields"]));
    assert!(find("service_operations", &|f| f["status"] == 200 && f["method"] == "PUT"), "{err}");
    assert!(find("service_operations", &|f| f["status"] == 404 && f["error_code"] == 404201), "{err}");
    assert!(
        find("device_operations", &|f| f["operation"] == "register"
            && f["registration_id"] == "log-dev"
            && f["registration_status"].is_string()),
        "{err}"
    );
    assert!(find("device_operations", &|f| f["status"] == 401 && f["error_code"] == 401002 && f["protocol"] == "https"), "{err}");
    for secret in [key.as_str(), cs.key.as_str(), good_token.as_str(), bad_token.as_str(), service_token.as_str()] {
        let sig = secret.rsplit("sig=").next().unwrap().split('&').next().unwrap();
        assert!(!err.contains(sig), "a secret is in the log");
    }
}

#[test]
fn a_second_instance_on_the_same_ports_is_refused() {
    // Regression: with SO_REUSEPORT a second gateway (another data dir: another CA and ID
    // scope) bound the same ports silently, and the kernel split the devices between the two.
    let first_dir = tempfile::tempdir().unwrap();
    let first = dps_gateway::start(common::test_config(), first_dir.path()).unwrap();
    let mut cfg = common::test_config();
    cfg.ports.mqtt = first.endpoint.ports.mqtt;
    let dir = tempfile::tempdir().unwrap();
    let err = dps_gateway::start(cfg, dir.path()).err().expect("the second instance must not start");
    assert!(err.contains(&format!("MQTT port {}", first.endpoint.ports.mqtt)), "{err}");
    first.shutdown().unwrap();
}

#[test]
fn a_restart_binds_past_connections_in_time_wait() {
    // Regression: the listeners set SO_REUSEPORT but not SO_REUSEADDR, so a port with a
    // connection of another process in TIME_WAIT (here: a plain listener that closed its
    // accepted connection first) refused the bind with "address in use".
    use std::io::Read;
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = other.local_addr().unwrap().port();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (accepted, _) = other.accept().unwrap();
    drop(accepted); // the server side closes first: its socket stays in TIME_WAIT on `port`
    assert_eq!(client.read(&mut [0u8; 1]).unwrap(), 0);
    drop(client);
    drop(other);
    let tables = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let time_wait = tables.lines().any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() > 3 && cols[1].ends_with(&format!(":{port:04X}")) && cols[3] == "06"
    });
    assert!(time_wait, "the test needs a TIME_WAIT socket on port {port}");
    let mut cfg = common::test_config();
    cfg.ports.mqtt = port;
    let dir = tempfile::tempdir().unwrap();
    let running = dps_gateway::start(cfg, dir.path()).unwrap_or_else(|e| panic!("bind past TIME_WAIT: {e}"));
    assert_eq!(running.endpoint.ports.mqtt, port);
    running.shutdown().unwrap();
}

#[test]
fn rotate_data_key_reseals_the_store_under_a_new_key() {
    use dps_storage::{DataKey, FjallStore, Store, Table};
    let s = TestServer::start(common::test_config());
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let e = serde_json::json!({"registrationId": "rot-dev", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}});
    assert_eq!(s.send("PUT", "/enrollments/rot-dev", Some(e)).status().as_u16(), 200);
    let rotate =
        |dir: &std::path::Path| Command::new(env!("CARGO_BIN_EXE_dps")).args(["rotate-data-key", "--data-dir"]).arg(dir).output().unwrap();
    // While the service runs, the store is locked and the command says why.
    let out = rotate(s.dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop `dps serve` first"), "{out:?}");
    let untouched = std::fs::read_to_string(s.dir.path().join("data.key")).unwrap();
    assert_eq!(untouched.trim().lines().count(), 1, "a refused rotation leaves data.key alone");
    let mut s = s;
    s.running.take().unwrap().shutdown().unwrap();
    let dir = s.dir.path().to_path_buf();
    let old = std::fs::read_to_string(dir.join("data.key")).unwrap();
    let out = rotate(&dir);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("Re-sealed") && !said.contains("Re-sealed 0 "), "{said}");
    let new = std::fs::read_to_string(dir.join("data.key")).unwrap();
    assert_ne!(new.trim(), old.trim());
    assert_eq!(new.trim().lines().count(), 1, "the old key is gone from the file");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.join("data.key")).unwrap().permissions().mode() & 0o777, 0o600);
    // The old key opens nothing any more; the new one everything.
    let b64 = |t: &str| -> [u8; 32] {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(t.trim()).unwrap().try_into().unwrap()
    };
    {
        let store = FjallStore::open(&dir.join("store"), DataKey::new(&b64(&old)), 8 << 20).unwrap();
        assert!(store.get(Table::Enrollments, "rot-dev").is_err());
        assert!(store.get(Table::Meta, "service").is_err());
    }
    // And the service starts on it and serves what it held.
    let s = s.restart(common::test_config());
    let r = s.send("GET", "/enrollments/rot-dev", None);
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn ephemeral_instance_for_a_test_bench() {
    // `dps serve --ephemeral`: a fixed ID scope, enrollments from a file, and nothing left
    // behind on exit.
    let work = tempfile::tempdir().unwrap();
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let file = work.path().join("bench.jsonl");
    let lines: Vec<String> = (0..25)
        .map(|i| serde_json::json!({"registrationId": format!("bench-{i}"), "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    std::fs::write(work.path().join("dps.toml"), common::process::CONFIG).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dps"))
        .args(["serve", "--ephemeral", "--id-scope", "0ne00000001", "--enrollments"])
        .arg(&file)
        .arg("--config")
        .arg(work.path().join("dps.toml"))
        .args(["--https-port", "0", "--mqtt-port", "0", "--amqp-port", "0", "--shards", "1"])
        .env("DPS_PORTS__BIND", "127.0.0.1")
        .env("DPS_PORTS__ADMIN", "0")
        .env("DPS_PORTS__CONSOLE", "0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Ready once it says where its endpoint.json is (the enrollments exist by then).
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut said = String::new();
    let endpoint = loop {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "dps ended: {said}");
        said.push_str(&line);
        if let Some(p) = line.trim().strip_prefix("Details in ") {
            break std::path::PathBuf::from(p);
        }
    };
    assert!(said.contains("Created 25 enrollments"), "{said}");
    let data = endpoint.parent().unwrap().to_path_buf();
    assert!(data.starts_with(std::env::temp_dir()), "{}", data.display());
    let ep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&endpoint).unwrap()).unwrap();
    assert_eq!(ep["idScope"], "0ne00000001");
    // A device of the file provisions.
    let ep: dps_gateway::Endpoint = serde_json::from_value(ep).unwrap();
    let client = common::client_for(&ep);
    let base = format!("https://localhost:{}/0ne00000001/registrations/bench-7", ep.ports.https);
    let token = common::mqtt_client::device_token("0ne00000001", "bench-7", key);
    let r = client.put(format!("{base}/register?api-version=2019-03-31")).header("Authorization", &token).body("{}").send().unwrap();
    assert_eq!(r.status().as_u16(), 202);
    send_signal(child.id(), "-TERM");
    assert!(child.wait().unwrap().success());
    assert!(!data.exists(), "the ephemeral data dir is removed on exit");
}

#[test]
fn a_data_dir_keeps_its_id_scope() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config();
    cfg.id_scope = Some("0ne0000abcd".into());
    let first = dps_gateway::start(cfg.clone(), dir.path()).unwrap();
    assert_eq!(first.endpoint.id_scope, "0ne0000ABCD");
    first.shutdown().unwrap();
    cfg.id_scope = Some("0ne00000002".into());
    let err = dps_gateway::start(cfg.clone(), dir.path()).err().expect("another scope on the same data dir");
    assert!(err.contains("0ne0000ABCD"), "{err}");
    cfg.id_scope = Some("0ne123".into());
    assert!(dps_gateway::start(cfg, tempfile::tempdir().unwrap().path()).err().unwrap().contains("8 hex digits"));
}

/// Times each thread of `pid` has been scheduled in, by thread name (`/proc/PID/task/*/schedstat`,
/// third field).
fn runs_by_thread(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let (Ok(name), Ok(stat)) =
            (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("schedstat")))
        else {
            continue;
        };
        let runs = stat.split_whitespace().nth(2).unwrap().parse().unwrap();
        out.push((name.trim().to_string(), runs));
    }
    out.sort();
    out
}

#[test]
fn an_idle_service_keeps_its_plain_threads_asleep() {
    // Regression: the store threads woke every 50 ms and the hub workers every 200 ms to look
    // at a stop flag (and the latency probe every 100 ms): an idle gateway spent ~7 ms of CPU
    // a second on them, and each registration at partial load paid its share. They now sleep
    // on their queues until work or the stop comes.
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve_on_ephemeral_ports(dir.path()).stdout(Stdio::null()).spawn().unwrap();
    wait_for_endpoint(dir.path());
    std::thread::sleep(Duration::from_millis(500));
    let before = runs_by_thread(child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let after = runs_by_thread(child.id());
    let plain = |n: &str| n.starts_with("store-") || n.starts_with("hub-");
    let watched: Vec<_> = before.iter().filter(|(n, _)| plain(n)).collect();
    assert!(watched.len() >= 4, "the store and hub threads are there: {before:?}");
    for (name, runs) in watched {
        let later = after.iter().find(|(n, _)| n == name).map_or(*runs, |(_, r)| *r);
        assert!(later <= runs + 1, "{name} woke {} times in 1.5 s of idleness", later - runs);
    }
    send_signal(child.id(), "-TERM");
    assert!(child.wait().unwrap().success(), "a clean exit with the threads stopped by the close");
}
