//! The HTTPS device API on the HTTPS port, told apart from the service API by its path
//! (`/{idScope}/registrations/{registrationId}/...`, parsed by `dps_core::request::from_http`).

use crate::provisioning::{Provisioning, Via};
use crate::transport::http::{Request, Response};

/// Whether a request is for the device API (by its path, as `handle` decides).
pub fn is_device_request(req: &Request) -> bool {
    dps_core::request::from_http(&req.method, &req.path, None, &[], None).is_some()
}

/// A device API answer, and whether the connection ends with it.
pub struct DeviceAnswer {
    pub response: Response,
    /// The device's credential was refused: the answer says `Connection: close`, so a refused
    /// client cannot keep the connection (the SDKs open a new one for their next request).
    pub close: bool,
}

/// Answers a device API request, or None when the path is not one.
pub async fn handle(
    prov: &Provisioning,
    req: &Request,
    chain: Option<&dps_core::request::CertChain>,
    source: std::net::IpAddr,
) -> Option<DeviceAnswer> {
    let request = dps_core::request::from_http(&req.method, &req.path, req.header("authorization"), &req.body, chain)?;
    let reply = prov.handle(request, Via::Https, source).await;
    let mut r = Response::json(reply.status, reply.body);
    if let Some(s) = reply.retry_after {
        r = r.header("Retry-After", s.to_string());
    }
    Some(DeviceAnswer { response: r, close: reply.credential_refused })
}
