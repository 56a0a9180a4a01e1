//! The peer: Mosquitto 2 (Debian package) with the gateway's ECDSA server certificate, TLS 1.2
//! and 1.3 as ours, a password file (PBKDF2-SHA512, mosquitto_passwd's default) and no
//! persistence, listening on a free loopback port.

use crate::BoxError;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    child: Child,
    pub port: u16,
}

pub const USER: &str = "loadgen";
pub const PASSWORD: &str = "bench-password";

impl Mosquitto {
    pub fn start(certs: &Path, work: &Path) -> Result<Mosquitto, BoxError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let passwd = work.join("mosquitto.passwd");
        let st = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg("-c")
            .arg(&passwd)
            .args([USER, PASSWORD])
            .status()
            .map_err(|e| format!("mosquitto_passwd: {e} (apt-get install mosquitto)"))?;
        if !st.success() {
            return Err("mosquitto_passwd failed".into());
        }
        let conf = work.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nuser root\npersistence false\nlog_dest stderr\nlog_type error\n\
                 allow_anonymous false\npassword_file {}\nmax_inflight_messages 20\nset_tcp_nodelay true\n\
                 listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\ncafile {}\n",
                passwd.display(),
                certs.join("server-ecdsa.pem").display(),
                certs.join("server-ecdsa.key").display(),
                certs.join("ca.pem").display(),
            ),
        )?;
        let child = Command::new(binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("mosquitto: {e} (apt-get install mosquitto)"))?;
        let mut m = Mosquitto { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || m.child.try_wait()?.is_some() {
                return Err("mosquitto did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Mosquitto's version line (`mosquitto -h` prints it first).
    pub fn version() -> String {
        Command::new(binary())
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
            .unwrap_or_else(|| "mosquitto".into())
    }
}

/// Debian installs the broker in /usr/sbin, which is not on every user's PATH.
fn binary() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
