//! The HTTPS device API (spec device-protocol.md §5) on the HTTPS port, told apart from the
//! service API by its path: `/{idScope}/registrations/{registrationId}/...`.

use crate::http::{Request, Response};
use crate::provisioning::{DeviceAuth, DeviceReply, Provisioning};
use dps_core::time::UtcTime;
use percent_encoding::percent_decode_str;

#[derive(Debug, PartialEq, Eq)]
enum DeviceRoute {
    Register,
    OperationStatus(String),
    Lookup,
}

/// `Some((idScope, registrationId, route))` for a device API path.
fn route(req: &Request) -> Option<(String, String, DeviceRoute)> {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let dec = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    if segs.len() < 3 || !segs[1].eq_ignore_ascii_case("registrations") {
        return None;
    }
    // Service API collections never sit in the first segment of a device path.
    if ["enrollments", "enrollmentgroups", "registrations", "linkedhubs"].iter().any(|c| segs[0].eq_ignore_ascii_case(c)) {
        return None;
    }
    let r = match (req.method.as_str(), &segs[3..]) {
        ("PUT", [r]) if r.eq_ignore_ascii_case("register") => DeviceRoute::Register,
        ("GET", [o, op]) if o.eq_ignore_ascii_case("operations") => DeviceRoute::OperationStatus(dec(op)),
        ("POST", []) => DeviceRoute::Lookup,
        _ => return None,
    };
    Some((dec(segs[0]), dec(segs[2]), r))
}

fn to_response(reply: DeviceReply) -> Response {
    let mut r = Response::json(reply.status, reply.body);
    if let Some(s) = reply.retry_after {
        r = r.header("Retry-After", s.to_string());
    }
    r
}

/// Answers a device API request, or None when the path is not one.
pub async fn handle(prov: &Provisioning, req: &Request, now: UtcTime, mono: u64) -> Option<Response> {
    let (scope, registration_id, route) = route(req)?;
    let auth = DeviceAuth { id_scope: &scope, registration_id: &registration_id, token: req.header("authorization"), protocol: "https" };
    Some(match route {
        DeviceRoute::Register => {
            let reply = prov.register(auth, &req.body, now, mono).await;
            if reply.status != 200 {
                return Some(to_response(reply));
            }
            // Over HTTP the register answer must be 202 `assigning` (C# and the IoT Edge
            // identity service accept nothing else); the device polls the operation, which
            // is already final, after Retry-After (1 s: the C SDK raises smaller values to 1).
            let op =
                serde_json::from_str::<serde_json::Value>(&reply.body).ok().and_then(|v| v["operationId"].as_str().map(str::to_string));
            let body = serde_json::json!({"operationId": op, "status": "assigning"}).to_string();
            Response::json(202, body).header("Retry-After", "1")
        }
        DeviceRoute::OperationStatus(op) => to_response(prov.operation_status(auth, &op, now, mono).await),
        DeviceRoute::Lookup => to_response(prov.lookup(auth, now).await),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str) -> Request {
        Request { method: method.into(), path: path.into(), query: String::new(), headers: vec![], body: vec![], close: false }
    }

    #[test]
    fn routes() {
        assert_eq!(route(&req("PUT", "/0ne1/registrations/dev/register")), Some(("0ne1".into(), "dev".into(), DeviceRoute::Register)));
        assert_eq!(
            route(&req("GET", "/0ne1/registrations/dev/operations/1.00.64")),
            Some(("0ne1".into(), "dev".into(), DeviceRoute::OperationStatus("1.00.64".into())))
        );
        assert_eq!(route(&req("POST", "/0ne1/registrations/dev")), Some(("0ne1".into(), "dev".into(), DeviceRoute::Lookup)));
        assert_eq!(route(&req("POST", "/registrations/grp/query")), None);
        assert_eq!(route(&req("GET", "/enrollments/x")), None);
        assert_eq!(route(&req("DELETE", "/0ne1/registrations/dev/register")), None);
    }
}
