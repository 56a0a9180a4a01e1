//! Blocking HTTP(S) for hub work, on the hub worker threads only: custom allocation webhooks,
//! the `webhook` and `azure-iothub` connectors. ureq on rustls (ring), trusting the public web
//! PKI roots (webhooks are usually hosted functions; IoT Hub has a public certificate).

use dps_core::hub::HubError;
use std::io::Read;
use std::sync::OnceLock;
use std::time::Duration;

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| ureq::AgentBuilder::new().redirects(0).build())
}

/// POSTs `body` as JSON; see [`request`].
pub fn post_json(url: &str, body: &serde_json::Value, timeout: Duration, max: usize) -> Result<(u16, Vec<u8>), HubError> {
    request("POST", url, &[], Some(body), timeout, max)
}

/// One request with a JSON body (or none); the status and at most `max` bytes of the answer's
/// body. Failing to connect, TLS errors and timeouts are transient (retried); an HTTP status is
/// the caller's to judge.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
    timeout: Duration,
    max: usize,
) -> Result<(u16, Vec<u8>), HubError> {
    let response = send(agent().request(method, url).timeout(timeout), headers, body)
        .map_err(|t| HubError::Transient(format!("{}: {t}", redact(url))))?;
    let status = response.status();
    let mut out = Vec::new();
    response
        .into_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| HubError::Transient(format!("{}: reading the answer: {e}", redact(url))))?;
    Ok((status, out))
}

/// Sends a request with these headers and a JSON body (or none); any HTTP status is an
/// answer, only a failure to get one (connect, TLS, timeout) is an error, told in words.
pub fn send(mut r: ureq::Request, headers: &[(&str, &str)], body: Option<&serde_json::Value>) -> Result<ureq::Response, String> {
    for (k, v) in headers {
        r = r.set(k, v);
    }
    let sent = match body {
        Some(b) => r.set("Content-Type", "application/json; charset=utf-8").send_string(&b.to_string()),
        None => r.call(),
    };
    match sent {
        Ok(r) | Err(ureq::Error::Status(_, r)) => Ok(r),
        Err(ureq::Error::Transport(t)) => Err(t.to_string()),
    }
}

/// A URL for the logs: no query (an Azure Function's `?code=` key is a secret).
pub fn redact(url: &str) -> &str {
    url.split_once('?').map_or(url, |(u, _)| u)
}

/// How a connector judges an HTTP status: 2xx done, 408/429/5xx transient, the rest refused.
pub fn judged(what: &str, status: u16, body: &[u8]) -> Result<(), HubError> {
    match status {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(HubError::Transient(format!("{what}: HTTP {status}"))),
        _ => Err(HubError::Refused(format!("{what}: HTTP {status} {}", String::from_utf8_lossy(&body[..body.len().min(200)])))),
    }
}
