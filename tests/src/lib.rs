//! Helpers for the interop tests: the official SDKs hard-code the DPS ports (443, 8883, 5671),
//! so an interop test runs one server on them at a time, under a machine-wide lock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use dps_loadgen::swtpm::SoftTpm;

/// Holds the lock on the well-known ports for as long as it lives.
pub struct PortsLock {
    _file: File,
}

pub fn lock_well_known_ports() -> Result<PortsLock, String> {
    let f = File::create(std::env::temp_dir().join("dps-interop-ports.lock")).map_err(|e| e.to_string())?;
    f.lock().map_err(|e| e.to_string())?;
    Ok(PortsLock { _file: f })
}

/// `tests/interop`, where the SDK packages are installed by `tests/interop/setup.sh`.
pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// Checks that setup.sh has run, with a message that says what to do otherwise.
pub fn require_setup() -> Result<(), String> {
    let d = interop_dir();
    for p in [
        "node_modules/azure-iot-provisioning-service",
        "node_modules/azure-iot-provisioning-device-mqtt",
        "node_modules/azure-iot-provisioning-device-amqp",
        "node_modules/azure-iot-security-x509",
        ".venv/bin/python",
    ] {
        if !d.join(p).exists() {
            return Err(format!(
                "{} is missing: run `bash tests/interop/setup.sh` first (installs the official SDKs from npm and PyPI)",
                d.join(p).display()
            ));
        }
    }
    Ok(())
}

/// Runs a command and returns its output, echoing it for the test log.
pub fn run(cmd: &mut Command) -> Output {
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    };
    println!("--- {cmd:?}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// A gateway on the ports the SDKs hard-code, serving `localhost`.
pub fn well_known_config() -> dps_gateway::config::Config {
    let mut c = dps_gateway::config::Config::default();
    c.ports.bind = "127.0.0.1".into();
    c.ports.admin = 0;
    c.ports.console = 0;
    c.shards = 2;
    c
}

/// Certificates for the X.509 interop tests, written as PEM files into `dir`:
/// - `{name}.pem` / `{name}.key` for every name in `individual` (self-signed, CN = name);
/// - the same for `by_intermediate` (leaf + `intermediate-a.pem` in the file, the chain the device
///   presents) and `by_root` (leaf + `intermediate-b.pem`);
/// - `intermediate-a.pem` (enrolled inline by a group) and `root.pem`, which is uploaded to the
///   running service as the verified CA certificate `interop-root` (groups reference it).
pub fn x509_fixtures(
    dir: &Path,
    ep: &dps_gateway::Endpoint,
    individual: &[&str],
    by_intermediate: &[&str],
    by_root: &[&str],
) -> Result<(), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let e = |e: rcgen::Error| e.to_string();
    let params = |cn: &str| -> Result<CertificateParams, String> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2049, 12, 31);
        Ok(p)
    };
    let ca = |cn: &str, parent: Option<&Issuer<'static, KeyPair>>| -> Result<(Issuer<'static, KeyPair>, String), String> {
        let mut p = params(cn)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        let k = KeyPair::generate().map_err(e)?;
        let cert = match parent {
            Some(parent) => p.signed_by(&k, parent).map_err(e)?,
            None => p.self_signed(&k).map_err(e)?,
        };
        Ok((Issuer::new(p, k), cert.pem()))
    };
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).map_err(|e| e.to_string());
    let device = |cn: &str, parent: Option<(&Issuer<'static, KeyPair>, &str)>| -> Result<(), String> {
        let mut p = params(cn)?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let k = KeyPair::generate().map_err(e)?;
        let pem = match parent {
            Some((issuer, chain)) => format!("{}{chain}", p.signed_by(&k, issuer).map_err(e)?.pem()),
            None => p.self_signed(&k).map_err(e)?.pem(),
        };
        write(&format!("{cn}.pem"), &pem)?;
        write(&format!("{cn}.key"), &k.serialize_pem())
    };
    let (root, root_pem) = ca("interop-root", None)?;
    let (inter_a, inter_a_pem) = ca("interop-intermediate-a", Some(&root))?;
    let (inter_b, inter_b_pem) = ca("interop-intermediate-b", Some(&root))?;
    write("root.pem", &root_pem)?;
    write("intermediate-a.pem", &inter_a_pem)?;
    for n in individual {
        device(n, None)?;
    }
    for n in by_intermediate {
        device(n, Some((&inter_a, &inter_a_pem)))?;
    }
    for n in by_root {
        device(n, Some((&inter_b, &inter_b_pem)))?;
    }
    upload_verified_ca(ep, "interop-root", &root_pem)
}

/// `PUT /certificates/{name}` with `isVerified: true` (verified on upload).
fn upload_verified_ca(ep: &dps_gateway::Endpoint, name: &str, pem: &str) -> Result<(), String> {
    service_put(ep, &format!("/certificates/{name}"), &serde_json::json!({"certificate": pem, "isVerified": true}))
}

/// A service API `PUT` as the owner policy (for resources the Azure SDKs do not manage, such as
/// CA certificates and linked hubs); Err unless it answered 200.
pub fn service_put(ep: &dps_gateway::Endpoint, path: &str, body: &serde_json::Value) -> Result<(), String> {
    use base64::Engine;
    let cs = dps_core::model::parse_connection_string(&ep.service_connection_string).ok_or("connection string")?;
    let key = base64::engine::general_purpose::STANDARD.decode(&cs.key).map_err(|e| e.to_string())?;
    let se = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs() as i64 + 3600;
    let token = dps_core::sas::build(&cs.host_name, &key, se, Some(&cs.key_name));
    let ca = std::fs::read(ep.ca_certificate.as_ref().ok_or("no CA")?).map_err(|e| e.to_string())?;
    let client = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).map_err(|e| e.to_string())?)
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .put(format!("https://localhost:{}{path}?api-version=2021-10-01", ep.ports.https))
        .header("Authorization", token)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .map_err(|e| e.to_string())?;
    if r.status().as_u16() != 200 {
        return Err(format!("PUT {path}: {} {}", r.status(), r.text().unwrap_or_default()));
    }
    Ok(())
}
