//! Routing of the service (management) REST API: method and path to an operation and the right
//! it needs (docs/service-api.md §1.3, §3.1). Literal segments match case-insensitively (Node
//! calls `/enrollmentgroups/{id}/attestationmechanism` in lower case); ids are percent-decoded once.

use crate::error::{ErrorKind, ServiceError};
use crate::rights::Rights;
use percent_encoding::percent_decode_str;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    Enrollments,
    Groups,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Get(Collection, String),
    Put(Collection, String),
    Delete(Collection, String),
    AttestationMechanism(Collection, String),
    Query(Collection),
    Bulk(Collection),
    GetRegistration(String),
    DeleteRegistration(String),
    /// Registration states of one enrollment group.
    QueryRegistrations(String),
    ListHubs,
    GetHub(String),
    PutHub(String),
    DeleteHub(String),
    /// Our extension: give a hub again every device the service has assigned to it.
    ResyncHub(String),
    /// CA certificates with proof of possession (docs/service-api.md §4.5).
    ListCertificates,
    GetCertificate(String),
    PutCertificate(String),
    DeleteCertificate(String),
    GenerateVerificationCode(String),
    VerifyCertificate(String),
}

impl Route {
    pub fn parse(method: &str, path: &str) -> Result<Route, ServiceError> {
        let not_found = || ServiceError::new(ErrorKind::RouteNotFound, format!("no operation at {}", crate::ids::printable(path)));
        let bad_method =
            || ServiceError::new(ErrorKind::MethodNotAllowed, format!("{method} is not allowed on {}", crate::ids::printable(path)));
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let id = |s: &str| -> Result<String, ServiceError> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ServiceError::invalid("id is not valid UTF-8 after percent-decoding"))
        };
        let lit = |s: &str, want: &str| s.eq_ignore_ascii_case(want);
        let collection = match segs.first() {
            Some(s) if lit(s, "enrollments") => Some(Collection::Enrollments),
            Some(s) if lit(s, "enrollmentGroups") => Some(Collection::Groups),
            _ => None,
        };
        if let Some(c) = collection {
            return match (method, &segs[1..]) {
                ("POST", []) => Ok(Route::Bulk(c)),
                ("POST", [q]) if lit(q, "query") => Ok(Route::Query(c)),
                ("GET", [i]) => Ok(Route::Get(c, id(i)?)),
                ("PUT", [i]) => Ok(Route::Put(c, id(i)?)),
                ("DELETE", [i]) => Ok(Route::Delete(c, id(i)?)),
                ("POST", [i, a]) if lit(a, "attestationmechanism") => Ok(Route::AttestationMechanism(c, id(i)?)),
                (_, []) | (_, [_]) => Err(bad_method()),
                (_, [_, a]) if lit(a, "attestationmechanism") => Err(bad_method()),
                _ => Err(not_found()),
            };
        }
        match (method, segs.as_slice()) {
            ("GET", [r, i]) if lit(r, "registrations") => Ok(Route::GetRegistration(id(i)?)),
            ("DELETE", [r, i]) if lit(r, "registrations") => Ok(Route::DeleteRegistration(id(i)?)),
            ("POST", [r, i, q]) if lit(r, "registrations") && lit(q, "query") => Ok(Route::QueryRegistrations(id(i)?)),
            (_, [r, _]) if lit(r, "registrations") => Err(bad_method()),
            ("GET", [h]) if lit(h, "linkedHubs") => Ok(Route::ListHubs),
            ("GET", [h, n]) if lit(h, "linkedHubs") => Ok(Route::GetHub(id(n)?)),
            ("PUT", [h, n]) if lit(h, "linkedHubs") => Ok(Route::PutHub(id(n)?)),
            ("DELETE", [h, n]) if lit(h, "linkedHubs") => Ok(Route::DeleteHub(id(n)?)),
            ("POST", [h, n, r]) if lit(h, "linkedHubs") && lit(r, "resync") => Ok(Route::ResyncHub(id(n)?)),
            (_, [h, ..]) if lit(h, "linkedHubs") => Err(bad_method()),
            ("GET", [c]) if lit(c, "certificates") => Ok(Route::ListCertificates),
            ("GET", [c, n]) if lit(c, "certificates") => Ok(Route::GetCertificate(id(n)?)),
            ("PUT", [c, n]) if lit(c, "certificates") => Ok(Route::PutCertificate(id(n)?)),
            ("DELETE", [c, n]) if lit(c, "certificates") => Ok(Route::DeleteCertificate(id(n)?)),
            ("POST", [c, n, a]) if lit(c, "certificates") && lit(a, "generateVerificationCode") => {
                Ok(Route::GenerateVerificationCode(id(n)?))
            }
            ("POST", [c, n, a]) if lit(c, "certificates") && lit(a, "verify") => Ok(Route::VerifyCertificate(id(n)?)),
            (_, [c, ..]) if lit(c, "certificates") => Err(bad_method()),
            _ => Err(not_found()),
        }
    }

    /// The right a caller's policy must hold (docs/service-api.md §3.1 mapping).
    pub fn required_right(&self) -> Rights {
        match self {
            Route::Get(..) | Route::AttestationMechanism(..) | Route::Query(_) => Rights::ENROLLMENT_READ,
            Route::Put(..) | Route::Delete(..) | Route::Bulk(_) => Rights::ENROLLMENT_WRITE,
            Route::GetRegistration(_) | Route::QueryRegistrations(_) => Rights::REGISTRATION_STATUS_READ,
            Route::DeleteRegistration(_) => Rights::REGISTRATION_STATUS_WRITE,
            Route::ListHubs | Route::GetHub(_) | Route::PutHub(_) | Route::DeleteHub(_) | Route::ResyncHub(_) => Rights::SERVICE_CONFIG,
            Route::ListCertificates
            | Route::GetCertificate(_)
            | Route::PutCertificate(_)
            | Route::DeleteCertificate(_)
            | Route::GenerateVerificationCode(_)
            | Route::VerifyCertificate(_) => Rights::SERVICE_CONFIG,
        }
    }
}

/// The api-version our own clients (the CLI, the web console) send: the newest stable one.
pub const OWN_CLIENTS_API_VERSION: &str = "2021-10-01";

/// The api-versions the official clients send (docs/service-api.md §1.2); any other is refused.
pub const API_VERSIONS: &[&str] = &[
    "2017-08-31-preview",
    "2017-11-15",
    "2018-04-01",
    "2018-09-01-preview",
    "2018-11-01",
    "2019-01-15",
    "2019-03-31",
    "2021-06-01",
    "2021-10-01",
    "2021-11-01-preview",
    "2025-07-01-preview",
];

pub fn check_api_version(v: Option<&str>) -> Result<(), ServiceError> {
    match v {
        None => Err(ServiceError::new(ErrorKind::InvalidApiVersion, "the api-version query parameter is required")),
        Some(v) if API_VERSIONS.contains(&v) => Ok(()),
        Some(v) => Err(ServiceError::new(
            ErrorKind::InvalidApiVersion,
            format!("api-version '{}' is not supported; supported: {}", crate::ids::printable(v), API_VERSIONS.join(", ")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_clients_speak_a_version_we_take() {
        assert!(check_api_version(Some(OWN_CLIENTS_API_VERSION)).is_ok());
    }

    #[test]
    fn routes() {
        use Collection::*;
        assert_eq!(Route::parse("PUT", "/enrollments/dev%2D1").unwrap(), Route::Put(Enrollments, "dev-1".into()));
        assert_eq!(
            Route::parse("POST", "/enrollmentgroups/g/attestationmechanism").unwrap(),
            Route::AttestationMechanism(Groups, "g".into())
        );
        assert_eq!(Route::parse("POST", "/enrollmentGroups/query").unwrap(), Route::Query(Groups));
        assert_eq!(Route::parse("POST", "/enrollments").unwrap(), Route::Bulk(Enrollments));
        assert_eq!(Route::parse("POST", "/registrations/g1/query").unwrap(), Route::QueryRegistrations("g1".into()));
        assert_eq!(Route::parse("PATCH", "/enrollments/x").unwrap_err().kind, ErrorKind::MethodNotAllowed);
        assert_eq!(Route::parse("GET", "/nothing").unwrap_err().kind, ErrorKind::RouteNotFound);
        assert_eq!(Route::parse("GET", "/enrollments/a/b/c").unwrap_err().kind, ErrorKind::RouteNotFound);
        assert_eq!(Route::parse("GET", "/enrollments/%ff").unwrap_err().kind, ErrorKind::InvalidArgument);
        assert_eq!(Route::parse("DELETE", "/registrations/r").unwrap().required_right(), Rights::REGISTRATION_STATUS_WRITE);
    }

    #[test]
    fn api_versions() {
        assert!(check_api_version(Some("2021-10-01")).is_ok());
        assert_eq!(check_api_version(None).unwrap_err().kind, ErrorKind::InvalidApiVersion);
        assert!(check_api_version(Some("1999-01-01")).is_err());
    }
}
