//! The service API as a client sees it: where it is (endpoint.json, a connection string, or
//! `DPS_CONNECTION_STRING`), a SAS token per request, JSON in and out, DPS errors as errors.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where the service is and who we are; the options every command takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnectOpts {
    /// endpoint.json of the service (written by `dps serve` into its data dir): host, port,
    /// connection string and CA in one file.
    #[arg(long, global = true, env = "DPS_ENDPOINT")]
    pub endpoint: Option<PathBuf>,
    /// Service connection string (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…); also
    /// from DPS_CONNECTION_STRING.
    #[arg(long, global = true, env = "DPS_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// PEM CA certificate the server's certificate chains to (default: endpoint.json's).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// HTTPS port of the service (default: endpoint.json's, else 443).
    #[arg(long, global = true)]
    pub port: Option<u16>,
}

/// A failure the CLI reports: a DPS error (status, code, message) or a local one.
#[derive(Debug)]
pub struct CliError {
    pub status: Option<u16>,
    pub code: Option<i64>,
    pub message: String,
}

impl CliError {
    pub fn local(message: impl Into<String>) -> CliError {
        CliError { status: None, code: None, message: message.into() }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.status, self.code) {
            (Some(s), Some(c)) => write!(f, "{s} (errorCode {c}): {}", self.message),
            (Some(s), None) => write!(f, "{s}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

pub struct Service {
    base: String,
    host: String,
    key_name: String,
    key: Vec<u8>,
    agent: ureq::Agent,
}

/// The api-version the CLI speaks.
const API: &str = dps_core::service_route::OWN_CLIENTS_API_VERSION;

impl Service {
    pub fn connect(o: &ConnectOpts) -> Result<Service, CliError> {
        let from_file: Option<crate::Endpoint> = match &o.endpoint {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| CliError::local(format!("cannot read {}: {e}", p.display())))?;
                Some(serde_json::from_str(&text).map_err(|e| CliError::local(format!("{} is not an endpoint.json: {e}", p.display())))?)
            }
            None => None,
        };
        let cs_text = match (&o.connection_string, &from_file) {
            (Some(c), _) => c.clone(),
            (None, Some(ep)) => ep.service_connection_string.clone(),
            (None, None) => {
                return Err(CliError::local(
                    "where is the service? give --endpoint DIR/endpoint.json, --connection-string or DPS_CONNECTION_STRING",
                ))
            }
        };
        let cs = dps_core::model::parse_connection_string(&cs_text)
            .ok_or_else(|| CliError::local("the connection string must hold HostName, SharedAccessKeyName and SharedAccessKey"))?;
        let key = B64.decode(cs.key.trim()).map_err(|_| CliError::local("SharedAccessKey is not base64"))?;
        let port = o.port.or(from_file.as_ref().map(|e| e.ports.https)).unwrap_or(443);
        let ca = match (o.ca.clone(), from_file.as_ref().and_then(|e| e.ca_certificate.clone())) {
            (Some(p), _) | (None, Some(p)) => {
                Some(std::fs::read_to_string(&p).map_err(|e| CliError::local(format!("cannot read {}: {e}", p.display())))?)
            }
            (None, None) => None,
        };
        let mut agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).redirects(0);
        if let Some(pem) = ca {
            agent = agent.tls_config(Arc::new(crate::tls::client_config(Some(&pem)).map_err(CliError::local)?));
        }
        Ok(Service {
            base: format!("https://{}:{port}", cs.host_name),
            host: cs.host_name,
            key_name: cs.key_name,
            key,
            agent: agent.build(),
        })
    }

    fn token(&self) -> String {
        let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0) + 3600;
        dps_core::sas::build(&self.host, &self.key, expiry, Some(&self.key_name))
    }

    /// One request; the answer's JSON (Null when empty) and headers asked for, or the DPS error.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<(Value, Option<String>), CliError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = self.agent.request(method, &format!("{}{path}{sep}api-version={API}", self.base)).set("Authorization", &self.token());
        let response =
            crate::hubs::http::send(r, headers, body).map_err(|t| CliError::local(format!("cannot reach {}: {t}", self.base)))?;
        let status = response.status();
        let continuation = response.header("x-ms-continuation").map(str::to_string);
        let mut text = String::new();
        response.into_reader().take(64 << 20).read_to_string(&mut text).map_err(|e| CliError::local(format!("reading the answer: {e}")))?;
        let v: Value = if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if status >= 400 {
            return Err(CliError {
                status: Some(status),
                code: v.get("errorCode").and_then(Value::as_i64),
                message: v.get("message").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_string),
            });
        }
        Ok((v, continuation))
    }

    /// Every item of a paged query (`x-ms-continuation`).
    pub fn query_all(&self, path: &str, body: &Value, mut each: impl FnMut(Value) -> Result<(), CliError>) -> Result<(), CliError> {
        let mut next: Option<String> = None;
        loop {
            let mut headers = vec![("x-ms-max-item-count", "1000")];
            if let Some(c) = &next {
                headers.push(("x-ms-continuation", c.as_str()));
            }
            let (page, cont) = self.call("POST", path, Some(body), &headers)?;
            for item in page.as_array().cloned().unwrap_or_default() {
                each(item)?;
            }
            match cont.filter(|c| !c.is_empty()) {
                Some(c) => next = Some(c),
                None => return Ok(()),
            }
        }
    }
}

/// A path segment for an id (ids may hold `:`, `.`, `-`, `_`, `@`… which go as they are).
pub fn seg(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}
