//! The `dps` binary in a process of its own, for tests that kill it, restart it on the same
//! data dir, or run it under an `LD_PRELOAD` library.

use super::{client_for, token_for};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_gateway::Endpoint;
use reqwest::blocking::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One registry-only linked hub, so devices get assigned.
pub const CONFIG: &str = "[[linked_hubs]]\nhost_name = \"hub-a.example\"\nconnection_string = \"HostName=hub-a.example;SharedAccessKeyName=iothubowner;SharedAccessKey=aHViLWtleQ==\"\n";

pub struct Process {
    pub child: Child,
    pub dir: PathBuf,
    pub ep: Endpoint,
    pub client: Client,
    key_name: String,
    key: Vec<u8>,
}

impl Process {
    /// Starts `dps serve` on `dir` (ephemeral loopback ports, the config above) and waits for
    /// its endpoint.json; `env` is added to its environment. Its stderr goes to `dir/../dps.log`.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Process {
        Self::start_with(dir, "", env)
    }

    /// As `start`, with `extra` appended to the configuration file (say a `[store]` table).
    pub fn start_with(dir: &Path, extra: &str, env: &[(&str, &str)]) -> Process {
        let parent = dir.parent().unwrap();
        let config = parent.join("dps.toml");
        std::fs::write(&config, format!("{CONFIG}{extra}")).unwrap();
        let _ = std::fs::remove_file(dir.join("endpoint.json"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(parent.join("dps.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dps"));
        cmd.args(["serve", "--data-dir"])
            .arg(dir)
            .arg("--config")
            .arg(&config)
            .args(["--https-port", "0", "--mqtt-port", "0", "--amqp-port", "0", "--shards", "2"])
            .env("DPS_PORTS__BIND", "127.0.0.1")
            .env("DPS_PORTS__ADMIN", "0")
            .env("DPS_PORTS__CONSOLE", "0")
            .env("DPS_LIMITS__SERVICE_OPERATIONS_PER_MINUTE", "0")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let ep: Endpoint = loop {
            if let Ok(t) = std::fs::read_to_string(dir.join("endpoint.json")) {
                if let Ok(ep) = serde_json::from_str(&t) {
                    break ep;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "dps exited during start-up: {status:?}; log: {}",
                    std::fs::read_to_string(parent.join("dps.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "endpoint.json never appeared");
            std::thread::sleep(Duration::from_millis(20));
        };
        let cs = dps_core::model::parse_connection_string(&ep.service_connection_string).unwrap();
        Process { child, dir: dir.to_path_buf(), client: client_for(&ep), ep, key_name: cs.key_name, key: B64.decode(cs.key).unwrap() }
    }

    pub fn token(&self) -> String {
        token_for(&self.key_name, &self.key)
    }

    pub fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { "&" } else { "?" };
        format!("https://localhost:{}{path}{sep}{}", self.ep.ports.https, super::API)
    }

    /// The sum of a metric's series on the admin listener.
    pub fn metric(&self, name: &str) -> f64 {
        let text = reqwest::blocking::get(format!("http://127.0.0.1:{}/metrics", self.ep.ports.admin)).unwrap().text().unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// What the processes started on this data dir logged so far (their stderr, appended).
    pub fn log(&self) -> String {
        self.dir.parent().map(|d| std::fs::read_to_string(d.join("dps.log")).unwrap_or_default()).unwrap_or_default()
    }

    /// The end of [`log`](Self::log), for a failure's message.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Still running: neither exited nor a zombie (from /proc, so `&self` will do).
    pub fn running(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X']))
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
