#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Nothing acknowledged is lost: the gateway killed with SIGKILL under load, again and again;
//! a full disk; an fsync that fails. Each runs the `dps` binary in its own process.

mod common;
use common::mqtt_client::device_token;
use common::process::Process;
use common::status_json;
use rand::Rng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn enrollment(id: &str) -> Value {
    json!({"registrationId": id, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}})
}

/// PUT an enrollment; its etag once the service acknowledged it.
fn enroll(p: &Process, client: &reqwest::blocking::Client, token: &str, id: &str) -> Result<String, (u16, Value)> {
    let r = client.put(p.url(&format!("/enrollments/{id}"))).header("Authorization", token).body(enrollment(id).to_string()).send();
    let Ok(r) = r else { return Err((0, Value::Null)) };
    match status_json(r) {
        (200, v) => Ok(v["etag"].as_str().unwrap().to_string()),
        other => Err(other),
    }
}

/// Registers a device of the group over HTTPS and polls; its (hub, device id) once it is assigned.
fn provision(p: &Process, client: &reqwest::blocking::Client, id: &str) -> Option<(String, String)> {
    let base = format!("https://localhost:{}/{}/registrations/{id}", p.ep.ports.https, p.ep.id_scope);
    let key = dps_core::sas::derive_device_key(&base64::Engine::decode(&base64::engine::general_purpose::STANDARD, KEY).unwrap(), id);
    let token = device_token(&p.ep.id_scope, id, &key);
    let r = client.put(format!("{base}/register?api-version=2019-03-31")).header("Authorization", &token).body("{}").send().ok()?;
    let (st, v) = status_json(r);
    if st != 202 {
        return None;
    }
    let op = v["operationId"].as_str()?.to_string();
    for _ in 0..50 {
        let r = client.get(format!("{base}/operations/{op}?api-version=2019-03-31")).header("Authorization", &token).send().ok()?;
        let (st, v) = status_json(r);
        match (st, v["status"].as_str()) {
            (200, Some("assigned")) => {
                let s = &v["registrationState"];
                return Some((s["assignedHub"].as_str()?.to_string(), s["deviceId"].as_str()?.to_string()));
            }
            (200 | 202, Some("assigning")) => std::thread::sleep(Duration::from_millis(50)),
            _ => return None,
        }
    }
    None
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged enrollment writes: id and etag.
    enrolled: Vec<(String, String)>,
    /// `assigned` answers: registration id, hub, device id.
    assigned: Vec<(String, String, String)>,
}

impl Ledger {
    /// Every entry is there and as acknowledged: all enrollments and the group's registration
    /// states read page by page (a GET per entry would make the rounds slower and slower).
    fn check(&self, p: &Process) {
        let token = p.token();
        let all = |path: &str| -> std::collections::HashMap<String, Value> {
            let mut out = std::collections::HashMap::new();
            let mut next: Option<String> = None;
            loop {
                let mut r = p.client.post(p.url(path)).header("Authorization", &token).header("x-ms-max-item-count", "1000");
                if let Some(c) = &next {
                    r = r.header("x-ms-continuation", c);
                }
                let r = r.body(r#"{"query":"*"}"#);
                let fetch = || -> reqwest::Result<(Option<String>, u16, String)> {
                    let r = r.try_clone().unwrap().send()?;
                    let cont = r.headers().get("x-ms-continuation").map(|v| v.to_str().unwrap().to_string());
                    Ok((cont, r.status().as_u16(), r.text()?))
                };
                // A connection reset is not what this test looks for (something acknowledged
                // and lost): the read is tried once more, on a new connection. But the gateway
                // must still run, and the test ends by checking its log holds no panic (a shard
                // that died would reset its connections).
                let (cont, st, text) = fetch().unwrap_or_else(|e| {
                    assert!(p.running(), "the gateway is gone: {e}\n{}", p.log_tail());
                    println!("{path}: {e}; tried again");
                    fetch().unwrap_or_else(|e| panic!("{path}: {e}\n{}", p.log_tail()))
                });
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
                assert_eq!(st, 200, "{v}");
                for item in v.as_array().unwrap() {
                    out.insert(item["registrationId"].as_str().unwrap().to_string(), item.clone());
                }
                match cont.filter(|c| !c.is_empty()) {
                    Some(c) => next = Some(c),
                    None => return out,
                }
            }
        };
        let enrollments = all("/enrollments/query");
        for (id, etag) in &self.enrolled {
            let e = enrollments.get(id).unwrap_or_else(|| panic!("acknowledged enrollment {id} lost"));
            assert_eq!(e["etag"].as_str(), Some(etag.as_str()), "enrollment {id} is not as acknowledged");
        }
        let states = all(&format!("/registrations/{GROUP}/query"));
        for (id, hub, device) in &self.assigned {
            let v = states.get(id).unwrap_or_else(|| panic!("assigned registration {id} lost"));
            assert_eq!(
                (v["status"].as_str(), v["assignedHub"].as_str(), v["deviceId"].as_str()),
                (Some("assigned"), Some(hub.as_str()), Some(device.as_str())),
                "registration {id} is not as answered"
            );
        }
    }
}

/// The enrollment group the load's devices belong to.
const GROUP: &str = "kill-group";

/// Rounds of: start the gateway on the same data dir, check the ledger, provision under load
/// from several threads (enrollment writes and device registrations), SIGKILL at a random
/// moment. `DPS_KILL_ROUNDS` sets the rounds (10 by default; tuning.md records 100).
#[test]
fn sigkill_under_load_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("DPS_KILL_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("data");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut rng = rand::thread_rng();
    for round in 0..rounds {
        let p = Arc::new(Process::start(&dir, &[]));
        if round == 0 {
            let g = json!({"enrollmentGroupId": GROUP, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}});
            let r = p
                .client
                .put(p.url(&format!("/enrollmentGroups/{GROUP}")))
                .header("Authorization", p.token())
                .body(g.to_string())
                .send()
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
        ledger.lock().unwrap().check(&p);
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (p, ledger, stop) = (p.clone(), ledger.clone(), stop.clone());
                std::thread::spawn(move || {
                    let (client, token) = (p.client.clone(), p.token());
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("k{round}-{t}-{i}");
                        i += 1;
                        if let Ok(etag) = enroll(&p, &client, &token, &id) {
                            ledger.lock().unwrap().enrolled.push((id.clone(), etag));
                        }
                        let device = format!("d-{id}");
                        if let Some((hub, device_id)) = provision(&p, &client, &device) {
                            ledger.lock().unwrap().assigned.push((device, hub, device_id));
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1_500)));
        // SIGKILL while the workers are mid-request; they stop at their next failure.
        let killed = std::process::Command::new("kill").args(["-9", &p.child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        drop(p); // reaps the process
    }
    let p = Process::start(&dir, &[]);
    let l = ledger.lock().unwrap();
    l.check(&p);
    println!("{rounds} SIGKILLs: {} acknowledged enrollments and {} assignments, all present", l.enrolled.len(), l.assigned.len());
    let log = p.log();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "a gateway panicked:\n{}", panics.join("\n"));
    assert!(l.enrolled.len() >= rounds && !l.assigned.is_empty(), "too little load to mean anything");
}

/// A tmpfs mounted on a directory for the test's life (needs root, as the interop tests do).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status();
        assert!(ok.is_ok_and(|s| s.success()), "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `path` with a file until a write fails.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_is_503_and_loses_nothing_acknowledged() {
    // Regression: a write failing for a full disk was a 500 "store failed", and the next write
    // tried again as if nothing had happened. Now the service answers 503 (retry later) saying
    // the disk is full, takes no more writes until restarted, keeps serving reads, and after a
    // restart on the freed disk has everything it acknowledged.
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("disk");
    let _tmpfs = Tmpfs::mount(&mnt, "48m");
    // The log goes to the same full disk (`mnt/dps.log`). Regression: tracing reported a failed
    // log write with eprintln!, which panics when stderr cannot be written: the shard that
    // logged died and its connections hung.
    let dir = mnt.join("data");
    let p = Process::start(&dir, &[]);
    let token = p.token();
    let mut ledger = Ledger::default();
    for i in 0..5 {
        let id = format!("before-full-{i}");
        ledger.enrolled.push((id.clone(), enroll(&p, &p.client, &token, &id).unwrap()));
    }
    fill(&mnt.join("filler"));
    let mut refused = None;
    for i in 0..2_000 {
        let id = format!("while-full-{i}");
        match enroll(&p, &p.client, &token, &id) {
            Ok(etag) => ledger.enrolled.push((id, etag)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let (st, v) = refused.expect("a write on a full disk must fail");
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["errorCode"], 503001, "{v}");
    assert!(v["message"].as_str().unwrap().contains("disk is full"), "{v}");
    // Reads go on; writes stay stopped, also once there is room again (until a restart).
    ledger.check(&p);
    assert_eq!(p.metric("dps_store_writes_stopped"), 1.0);
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let (st, v) = enroll(&p, &p.client, &token, "after-free").unwrap_err();
    assert_eq!(st, 503, "{v}");
    p.kill();
    let p = Process::start(&dir, &[]);
    ledger.check(&p);
    enroll(&p, &p.client, &p.token(), "after-restart").unwrap();
    drop(p);
}

/// A preloaded library whose fsync and fdatasync fail with EIO while a flag file exists.
fn failing_fsync_library(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("failfsync.c");
    std::fs::write(
        &src,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
static int failing(void) {
    const char *flag = getenv("FAIL_FSYNC_WHILE");
    return flag && access(flag, F_OK) == 0;
}
int fsync(int fd) {
    static int (*real)(int);
    if (failing()) { errno = EIO; return -1; }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (failing()) { errno = EIO; return -1; }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
"#,
    )
    .unwrap();
    let lib = dir.join("libfailfsync.so");
    let cc = std::process::Command::new("cc").args(["-shared", "-fPIC", "-O2", "-o"]).arg(&lib).arg(&src).arg("-ldl").status();
    assert!(cc.is_ok_and(|s| s.success()), "a C compiler is needed (scripts/deps.sh)");
    lib
}

#[test]
fn a_failed_fsync_stops_writes_and_says_so() {
    // Regression: after a failed fsync the write was answered 500 but had already reached
    // fjall's memtables, so it was readable (not acknowledged, maybe not on disk), and the
    // next writes were tried as if nothing had happened. Now the sync runs before the write
    // becomes visible: a failed one leaves nothing readable, every later write is refused with
    // 503 saying why, the metric and the log say so, and reads go on.
    let base = tempfile::tempdir().unwrap();
    let lib = failing_fsync_library(base.path());
    let flag = base.path().join("fail-now");
    let dir = base.path().join("data");
    let env = [("LD_PRELOAD", lib.to_str().unwrap()), ("FAIL_FSYNC_WHILE", flag.to_str().unwrap())];
    let p = Process::start(&dir, &env);
    let token = p.token();
    let mut ledger = Ledger::default();
    ledger.enrolled.push(("synced".into(), enroll(&p, &p.client, &token, "synced").unwrap()));
    std::fs::write(&flag, b"").unwrap();
    let (st, v) = enroll(&p, &p.client, &token, "unsynced").unwrap_err();
    assert_eq!(st, 503, "{v}");
    assert!(v["message"].as_str().unwrap().contains("fsync failed"), "{v}");
    std::fs::remove_file(&flag).unwrap();
    // Not visible, although fjall had the batch in hand.
    let r = p.client.get(p.url("/enrollments/unsynced")).header("Authorization", &token).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // Stopped for good: the disk may have dropped what it held.
    let (st, _) = enroll(&p, &p.client, &token, "later").unwrap_err();
    assert_eq!(st, 503);
    assert_eq!(p.metric("dps_store_writes_stopped"), 1.0);
    ledger.check(&p);
    p.kill();
    let log = std::fs::read_to_string(base.path().join("dps.log")).unwrap();
    assert!(log.contains("store writes stopped"), "{log}");
    let p = Process::start(&dir, &[]);
    ledger.check(&p);
    let r = p.client.get(p.url("/enrollments/later")).header("Authorization", &p.token()).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    enroll(&p, &p.client, &p.token(), "after-restart").unwrap();
}
