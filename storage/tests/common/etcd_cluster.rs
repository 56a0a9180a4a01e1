//! A real etcd cluster on loopback (Debian's etcd-server), members started and killed by tests:
//! the store's own tests (tests/etcd.rs) and the gateway's scale-out tests include this file.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    members: Vec<Option<Child>>,
    pub clients: Vec<String>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let peers: Vec<String> = (0..n).map(|_| format!("http://127.0.0.1:{}", free_port())).collect();
        let clients: Vec<String> = (0..n).map(|_| format!("http://127.0.0.1:{}", free_port())).collect();
        let initial: Vec<String> = peers.iter().enumerate().map(|(i, p)| format!("m{i}={p}")).collect();
        let members = (0..n)
            .map(|i| {
                let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
                Some(
                    Command::new("etcd")
                        .args(["--name", &format!("m{i}"), "--data-dir"])
                        .arg(dir.path().join(format!("m{i}")))
                        .args(["--listen-client-urls", &clients[i], "--advertise-client-urls", &clients[i]])
                        .args(["--listen-peer-urls", &peers[i], "--initial-advertise-peer-urls", &peers[i]])
                        .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                        .args(["--initial-cluster-token", "dps-test"])
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .expect("etcd (apt-get install etcd-server; scripts/deps.sh does)"),
                )
            })
            .collect();
        let c = Cluster { members, clients, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        let cfg = dps_storage::EtcdConfig { endpoints: c.clients.clone(), root: "/probe".into(), ..Default::default() };
        while dps_storage::EtcdStore::connect(&cfg, dps_storage::DataKey::new(&[0; 32])).is_err() {
            assert!(Instant::now() < deadline, "the etcd cluster did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
