//! Where the devices connect: read from the `endpoint.json` that `dps serve` writes, or filled in
//! by the caller (the benchmark points it at Mosquitto or at a bare TLS listener).

use crate::BoxError;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub id_scope: String,
    /// The name TLS verifies (and the SAS resource's host for the service API).
    pub host: String,
    /// The address actually connected to.
    pub connect: String,
    pub mqtt_port: u16,
    pub amqp_port: u16,
    pub https_port: u16,
    pub ca: PathBuf,
    pub service_cs: String,
}

impl Endpoint {
    pub fn read(p: &Path, connect: &str) -> Result<Endpoint, BoxError> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?)?;
        let s = |k: &str| v[k].as_str().map(str::to_string).ok_or_else(|| format!("endpoint.json has no {k}"));
        let port = |k: &str| v["ports"][k].as_u64().map(|p| p as u16).ok_or_else(|| format!("endpoint.json has no ports.{k}"));
        Ok(Endpoint {
            id_scope: s("idScope")?,
            host: s("hostName")?,
            connect: connect.to_string(),
            mqtt_port: port("mqtt")?,
            amqp_port: port("amqp")?,
            https_port: port("https")?,
            ca: s("caCertificate")?.into(),
            service_cs: s("serviceConnectionString")?,
        })
    }
}
