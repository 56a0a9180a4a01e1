//! A real etcd cluster on loopback (Debian's etcd-server), members started and killed by tests:
//! the store's own tests (tests/etcd.rs) and the gateway's scale-out tests include this file.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    members: Vec<Option<Child>>,
    pub clients: Vec<String>,
    dir: tempfile::TempDir,
    /// A cluster started with `start_tls`: the CA and a client certificate it accepts.
    pub tls: Option<dps_storage::EtcdTls>,
}

/// Certificates for a TLS cluster made with rcgen: a CA, the members' server certificate (for
/// 127.0.0.1) and a client certificate, written as PEM files into `dir`.
fn tls_files(dir: &std::path::Path) -> dps_storage::EtcdTls {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![usage];
        let k = KeyPair::generate().unwrap();
        (p.signed_by(&k, &issuer).unwrap().pem(), k.serialize_pem())
    };
    let (server, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], ExtendedKeyUsagePurpose::ServerAuth);
    let (client, client_key) = leaf(vec!["dps-node".into()], ExtendedKeyUsagePurpose::ClientAuth);
    for (name, pem) in [("ca.pem", ca_cert.pem()), ("server.pem", server), ("server.key", server_key)] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    dps_storage::EtcdTls { ca_pem: ca_cert.pem().into_bytes(), client: Some((client.into_bytes(), client_key.into_bytes())) }
}

/// Waits until `count()` exceeds `past`, 30 s at most; the count then. For the failover tests:
/// how soon work resumes after a member is lost depends on the election and the clients'
/// failover, which on a loaded machine (CI runs other tests' clusters beside them) outlasted a
/// fixed 2.5 s wait once; the bound is far past etcd's election timeout.
pub fn wait_for_progress(count: impl Fn() -> usize, past: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() <= past && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    count()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, false)
    }

    /// Members that speak TLS to clients and accept only clients with a certificate of the
    /// cluster's CA (`--client-cert-auth`).
    pub fn start_tls(n: usize) -> Cluster {
        Cluster::start_with(n, true)
    }

    /// A store configuration for this cluster under `root` (with its TLS, if any).
    pub fn config(&self, root: &str) -> dps_storage::EtcdConfig {
        dps_storage::EtcdConfig { endpoints: self.clients.clone(), root: root.into(), tls: self.tls.clone(), ..Default::default() }
    }

    /// Starts a cluster; a start that does not come up (a port picked for it was taken by
    /// another test between `free_port` and etcd's bind) is dropped and tried again on new ports.
    fn start_with(n: usize, tls: bool) -> Cluster {
        let mut logs = String::new();
        for _ in 0..3 {
            match Cluster::try_start(n, tls) {
                Ok(c) => return c,
                Err(why) => logs.push_str(&why),
            }
        }
        panic!("the etcd cluster did not come up in three tries:\n{logs}");
    }

    fn try_start(n: usize, tls: bool) -> Result<Cluster, String> {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls.then(|| tls_files(dir.path()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let peers: Vec<String> = (0..n).map(|_| format!("http://127.0.0.1:{}", free_port())).collect();
        let clients: Vec<String> = (0..n).map(|_| format!("{scheme}://127.0.0.1:{}", free_port())).collect();
        let initial: Vec<String> = peers.iter().enumerate().map(|(i, p)| format!("m{i}={p}")).collect();
        let members = (0..n)
            .map(|i| {
                let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
                let mut etcd = Command::new("etcd");
                if tls.is_some() {
                    etcd.arg("--cert-file").arg(dir.path().join("server.pem"));
                    etcd.arg("--key-file").arg(dir.path().join("server.key"));
                    etcd.arg("--trusted-ca-file").arg(dir.path().join("ca.pem"));
                    etcd.arg("--client-cert-auth");
                }
                Some(
                    etcd.args(["--name", &format!("m{i}"), "--data-dir"])
                        .arg(dir.path().join(format!("m{i}")))
                        .args(["--listen-client-urls", &clients[i], "--advertise-client-urls", &clients[i]])
                        .args(["--listen-peer-urls", &peers[i], "--initial-advertise-peer-urls", &peers[i]])
                        .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                        // Unique per cluster: a member of another test's cluster must never join.
                        .args(["--initial-cluster-token", &dir.path().display().to_string()])
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .expect("etcd (apt-get install etcd-server; scripts/deps.sh does)"),
                )
            })
            .collect();
        let c = Cluster { members, clients, dir, tls };
        let deadline = Instant::now() + Duration::from_secs(30);
        let cfg = c.config("/probe");
        while dps_storage::EtcdStore::connect(&cfg, dps_storage::DataKey::new(&[0; 32])).is_err() {
            if Instant::now() >= deadline {
                let logs: Vec<String> = (0..n)
                    .map(|i| {
                        let log = std::fs::read_to_string(c.dir.path().join(format!("m{i}.log"))).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(5).collect();
                        format!("m{i}: {}", tail.into_iter().rev().collect::<Vec<_>>().join("\n    "))
                    })
                    .collect();
                return Err(logs.join("\n") + "\n");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(c)
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
