//! Blocking HTTP(S) for hub work, on the hub worker threads only: custom allocation webhooks.
//! ureq on rustls (ring), trusting the public web PKI roots, since webhooks are usually
//! hosted functions.

use dps_core::hub::HubError;
use std::io::Read;
use std::sync::OnceLock;
use std::time::Duration;

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| ureq::AgentBuilder::new().redirects(0).build())
}

/// POSTs `body` as JSON; the status and at most `max` bytes of the answer's body. Failing to
/// connect, TLS errors and timeouts are transient (retried); an HTTP status is the caller's to
/// judge.
pub fn post_json(url: &str, body: &serde_json::Value, timeout: Duration, max: usize) -> Result<(u16, Vec<u8>), HubError> {
    let sent = agent().post(url).timeout(timeout).set("Content-Type", "application/json; charset=utf-8").send_string(&body.to_string());
    let response = match sent {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(HubError::Transient(format!("{}: {t}", redact(url)))),
    };
    let status = response.status();
    let mut out = Vec::new();
    response
        .into_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| HubError::Transient(format!("{}: reading the answer: {e}", redact(url))))?;
    Ok((status, out))
}

/// A URL for the logs: no query (an Azure Function's `?code=` key is a secret).
pub fn redact(url: &str) -> &str {
    url.split_once('?').map_or(url, |(u, _)| u)
}
