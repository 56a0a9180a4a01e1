//! A real Mosquitto 2 broker with the dynamic-security plugin, as a hub: a plain control
//! listener for the service's admin client and a TLS device listener (the gateway's
//! development certificate), both on free loopback ports. Its dynamic-security file is made by
//! `mosquitto_ctrl dynsec init` with the admin role also allowed to publish `devices/#` (the
//! retained desired properties).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN: &str = "dps-admin";
pub const ADMIN_PASSWORD: &str = "dps-admin-password";

pub struct Broker {
    child: Option<Child>,
    pub control_port: u16,
    /// The control listener again, over TLS (the gateway's certificate, for `localhost`).
    pub control_tls_port: u16,
    pub device_port: u16,
    /// With [`Broker::start_with_x509`]: the listener for certificate devices (the
    /// certificate's CN is the user name, and the client id).
    pub x509_port: Option<u16>,
    pub dir: tempfile::TempDir,
    certs: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn plugin() -> PathBuf {
    for dir in std::fs::read_dir("/usr/lib").unwrap().flatten() {
        let p = dir.path().join("mosquitto_dynamic_security.so");
        if p.exists() {
            return p;
        }
    }
    panic!("mosquitto_dynamic_security.so not found (apt-get install mosquitto)")
}

impl Broker {
    /// `certs`: the directory holding the gateway's `server-ecdsa.pem`, its key and `ca.pem`.
    pub fn start(certs: &Path) -> Broker {
        Self::start_with_x509(certs, None)
    }

    /// Also a listener that requires a client certificate issued by `device_ca_pem`.
    pub fn start_with_x509(certs: &Path, device_ca_pem: Option<&str>) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        init_dynsec(&dir.path().join("dynsec.json"));
        if let Some(pem) = device_ca_pem {
            std::fs::write(dir.path().join("device-ca.pem"), pem).unwrap();
        }
        let x509_port = device_ca_pem.map(|_| free_port());
        let mut b = Broker {
            child: None,
            control_port: free_port(),
            control_tls_port: free_port(),
            device_port: free_port(),
            x509_port,
            dir,
            certs: certs.to_path_buf(),
        };
        b.launch();
        b
    }

    fn launch(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nuser root\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n\
                 allow_anonymous false\nset_tcp_nodelay true\nplugin {plugin}\nplugin_opt_config_file {dynsec}\n\
                 listener {control} 127.0.0.1\nlistener {devices} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\ncafile {ca}\n\
                 listener {control_tls} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n",
                plugin = plugin().display(),
                dynsec = self.dir.path().join("dynsec.json").display(),
                control = self.control_port,
                devices = self.device_port,
                control_tls = self.control_tls_port,
                cert = self.certs.join("server-ecdsa.pem").display(),
                key = self.certs.join("server-ecdsa.key").display(),
                ca = self.certs.join("ca.pem").display(),
            ),
        )
        .unwrap();
        if let Some(port) = self.x509_port {
            let mut conf_text = std::fs::read_to_string(&conf).unwrap();
            conf_text.push_str(&format!(
                "listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\ncafile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                self.certs.join("server-ecdsa.pem").display(),
                self.certs.join("server-ecdsa.key").display(),
                self.dir.path().join("device-ca.pem").display(),
            ));
            std::fs::write(&conf, conf_text).unwrap();
        }
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().expect("mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.device_port)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", self.control_port)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", self.control_tls_port)).is_err()
        {
            assert!(Instant::now() < deadline, "mosquitto did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The linked hub definition for the service API.
    pub fn hub_json(&self, name: &str) -> serde_json::Value {
        serde_json::json!({
            "name": name, "kind": "mosquitto", "controlUrl": format!("mqtt://127.0.0.1:{}", self.control_port),
            "username": ADMIN, "password": ADMIN_PASSWORD,
        })
    }

    /// The same over TLS: `mqtts://localhost:…`, trusting `ca_pem`.
    pub fn hub_json_tls(&self, name: &str, ca_pem: &str) -> serde_json::Value {
        let mut h = self.hub_json(name);
        h["controlUrl"] = serde_json::json!(format!("mqtts://localhost:{}", self.control_tls_port));
        h["caCert"] = serde_json::json!(ca_pem);
        h
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it, replaces its dynamic-security file by a fresh one (only the admin client: every
    /// device is forgotten) and starts it again, as after a lost or corrupt file.
    pub fn lose_devices(&mut self) {
        self.stop();
        let file = self.dir.path().join("dynsec.json");
        std::fs::remove_file(&file).unwrap();
        init_dynsec(&file);
        self.launch();
    }

    /// Starts it again on the same ports and dynamic-security file.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

/// A dynamic-security file with the admin client only, its role also allowed to publish
/// `devices/#`.
fn init_dynsec(dynsec: &Path) {
    let st = Command::new("mosquitto_ctrl")
        .args(["dynsec", "init"])
        .arg(dynsec)
        .args([ADMIN, ADMIN_PASSWORD])
        .stdout(Stdio::null())
        .status()
        .expect("mosquitto_ctrl (apt-get install mosquitto)");
    assert!(st.success(), "mosquitto_ctrl dynsec init failed");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(dynsec).unwrap()).unwrap();
    let admin = v["roles"].as_array_mut().unwrap().iter_mut().find(|r| r["rolename"] == "admin").unwrap();
    admin["acls"].as_array_mut().unwrap().push(serde_json::json!({"acltype": "publishClientSend", "topic": "devices/#", "allow": true}));
    std::fs::write(dynsec, v.to_string()).unwrap();
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
