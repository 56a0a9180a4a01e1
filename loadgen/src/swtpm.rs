//! A software TPM (Debian's `swtpm`) in a process of its own, for devices that attest with a
//! TPM: its state lives in a temporary directory, its command port on loopback speaks the TCP
//! framing that tss.js ("Linux TRM") and the TSS's `swtpm` TCTI use. Stopped when dropped.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SoftTpm {
    /// The command port (the control port is the next one).
    pub port: u16,
    child: Child,
    _state: tempfile::TempDir,
}

/// Two free consecutive ports: the TSS's `swtpm` TCTI finds the control port at port + 1.
fn free_ports() -> std::io::Result<(u16, u16)> {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0")?;
        let port = a.local_addr()?.port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok((port, port + 1));
        }
    }
    Err(std::io::Error::other("no two consecutive free ports"))
}

impl SoftTpm {
    /// Starts a fresh TPM (no keys yet; the first client creates its EK and SRK) and waits
    /// until it accepts connections.
    pub fn start() -> Result<SoftTpm, crate::BoxError> {
        let state = tempfile::tempdir()?;
        let (port, ctrl) = free_ports()?;
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2"])
            .args(["--server", &format!("type=tcp,port={port},bindaddr=127.0.0.1")])
            .args(["--ctrl", &format!("type=tcp,port={ctrl},bindaddr=127.0.0.1")])
            .args(["--tpmstate", &format!("dir={}", state.path().display())])
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start swtpm (Debian package `swtpm`): {e}"))?;
        let mut tpm = SoftTpm { port, child, _state: state };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || tpm.child.try_wait()?.is_some() {
                return Err(format!("swtpm did not start listening on port {port}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(tpm)
    }

    /// The TCTI string the TSS libraries take for this TPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for SoftTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
