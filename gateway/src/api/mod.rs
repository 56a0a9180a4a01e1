//! The service (management) REST API: enrollments and enrollment groups, registration states,
//! bulk operations, queries and the linked-hub extension. Routing, validation and wire shapes
//! come from `dps-core`; this module authenticates, dispatches to one file per resource, talks
//! to the store and renders responses.

mod bulk;
mod certificates;
mod enrollments;
mod hubs;
mod query;
mod registrations;

use crate::metrics::Metrics;
use crate::service::Service;
use crate::shard::enrollment_cache::EnrollmentCache;
use crate::transport::http::{Request, Response};
use dps_core::error::{ErrorKind, ServiceError};
use dps_core::ids::{id_key, printable};
use dps_core::model::*;
use dps_core::rate::TokenBucket;
use dps_core::sas;
use dps_core::service_route::{check_api_version, Collection, Route};
use dps_core::time::UtcTime;
use dps_core::tracking::TrackingIds;
use dps_storage::{Record, Table, TxnError};
use serde::Serialize;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// Record classes, so the store can count enrollment groups per attestation type for quotas.
const CLASS_SYMMETRIC: u8 = 1;
const CLASS_X509: u8 = 2;

type Handled = Result<Response, ServiceError>;

/// One shard's instance of the API (its share of the operation rate).
pub struct ServiceApi {
    svc: Arc<Service>,
    cache: Rc<EnrollmentCache>,
    metrics: Rc<Metrics>,
    tracking: Rc<TrackingIds>,
    ops: RefCell<Option<TokenBucket>>,
}

fn json<T: Serialize>(status: u16, v: &T) -> Response {
    // Serialising our own model types cannot fail (no maps with non-string keys).
    Response::json(status, serde_json::to_string(v).unwrap_or_else(|_| "{}".into()))
}

fn not_found(table: Table, id: &str) -> ServiceError {
    let (kind, what) = match table {
        Table::Enrollments => (ErrorKind::EnrollmentNotFound, "individual enrollment"),
        Table::Groups => (ErrorKind::EnrollmentNotFound, "enrollment group"),
        Table::Hubs => (ErrorKind::HubNotFound, "linked hub"),
        Table::Certificates => (ErrorKind::CertificateNotFound, "CA certificate"),
        _ => (ErrorKind::RegistrationNotFound, "device registration"),
    };
    ServiceError::new(kind, format!("{what} '{}' not found", printable(id)))
}

fn txn_error(e: TxnError, table: Table, id: &str) -> ServiceError {
    match e {
        TxnError::NotFound => not_found(table, id),
        TxnError::Conflict => ServiceError::new(
            ErrorKind::Conflict,
            format!("'{}' already exists; send If-Match with its etag (or *) to update it", printable(id)),
        ),
        TxnError::PreconditionFailed => ServiceError::new(
            ErrorKind::PreconditionFailed,
            format!("the etag in If-Match does not match the current etag of '{}'", printable(id)),
        ),
        TxnError::QuotaExceeded => ServiceError::new(
            ErrorKind::QuotaExceeded,
            format!("creating '{}' would exceed the configured quota for {}", printable(id), table.name()),
        ),
    }
}

fn table_of(c: Collection) -> Table {
    match c {
        Collection::Enrollments => Table::Enrollments,
        Collection::Groups => Table::Groups,
    }
}

fn group_class(g: &EnrollmentGroup) -> u8 {
    match g.common.attestation.kind {
        AttestationType::X509 => CLASS_X509,
        _ => CLASS_SYMMETRIC,
    }
}

fn enrollment_view(mut e: IndividualEnrollment) -> IndividualEnrollment {
    e.common.attestation = e.common.attestation.without_secrets();
    e
}

fn group_view(mut g: EnrollmentGroup) -> EnrollmentGroup {
    g.common.attestation = g.common.attestation.without_secrets();
    g
}

fn registration_view(r: DeviceRegistrationState) -> DeviceRegistrationState {
    r.public()
}

/// The etag the caller names in If-Match, if any.
fn if_match(req: &Request) -> Option<String> {
    req.header("if-match").map(str::to_string).filter(|s| !s.is_empty())
}

impl ServiceApi {
    pub fn new(
        svc: Arc<Service>,
        cache: Rc<EnrollmentCache>,
        metrics: Rc<Metrics>,
        tracking: Rc<TrackingIds>,
        now_nanos: u64,
    ) -> ServiceApi {
        let per_min = svc.limits.service_operations_per_minute;
        // Each shard enforces its share of the service-wide rate; connections spread evenly
        // over SO_REUSEPORT listeners, so the sum is the configured rate.
        let ops = (per_min > 0).then(|| {
            let share = (per_min as f64 / svc.shards.max(1) as f64).max(1.0);
            TokenBucket::new(share, 60.0, share, now_nanos)
        });
        ServiceApi { svc, cache, metrics, tracking, ops: RefCell::new(ops) }
    }

    /// Answers one request; never fails (errors become DPS error bodies).
    pub async fn handle(&self, req: &Request, now: UtcTime, mono_nanos: u64) -> Response {
        let tracking = self.tracking.next();
        let resp = match self.dispatch(req, now, mono_nanos).await {
            Ok(r) => {
                tracing::info!(target: "service_operations", tracking_id = %tracking, method = %req.method, path = %printable(&req.path), status = r.status, "ok");
                r.header("x-ms-request-id", tracking)
            }
            Err(e) => {
                tracing::info!(target: "service_operations", tracking_id = %tracking, method = %req.method, path = %printable(&req.path),
                    status = e.kind.status(), error_code = e.kind.code(), reason = %e.detail(), "{}", e.message);
                Response::error(&e, &tracking, now)
            }
        };
        self.metrics.inc("dps_service_operations_total", &[("status", &resp.status.to_string())]);
        resp
    }

    async fn dispatch(&self, req: &Request, now: UtcTime, mono: u64) -> Handled {
        let rights = self.authenticate(req, now)?;
        let route = Route::parse(&req.method, &req.path)?;
        if !rights.contains(route.required_right()) {
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                format!(
                    "the access policy lacks the {} right this operation needs",
                    dps_core::rights::Rights::name_of(route.required_right())
                ),
            ));
        }
        check_api_version(req.query_param("api-version").as_deref())?;
        if let Some(bucket) = self.ops.borrow_mut().as_mut() {
            if let Err(wait) = bucket.try_take(mono) {
                return Err(ServiceError::throttled("service operation rate limit exceeded", wait));
            }
        }
        match route {
            Route::Get(c, id) => self.get(c, &id).await,
            Route::Put(c, id) => self.put(c, &id, req, now).await,
            Route::Delete(c, id) => self.delete(c, &id, req).await,
            Route::AttestationMechanism(c, id) => self.attestation(c, &id).await,
            Route::Query(c) => self.query(table_of(c), req).await,
            Route::Bulk(Collection::Enrollments) => self.bulk_enrollments(req, now).await,
            Route::Bulk(Collection::Groups) => self.bulk_groups(req, now).await,
            Route::GetRegistration(id) => self.get_registration(&id).await,
            Route::DeleteRegistration(id) => self.delete_registration(&id, req).await,
            Route::QueryRegistrations(group) => self.query_registrations(&group, req).await,
            Route::ListHubs => self.list_hubs().await,
            Route::GetHub(name) => self.get_hub(&name).await,
            Route::PutHub(name) => self.put_hub(&name, req).await,
            Route::ResyncHub(name) => self.resync_hub(&name).await,
            Route::DeleteHub(name) => self.delete_hub(&name).await,
            Route::ListCertificates => self.list_certificates().await,
            Route::GetCertificate(name) => self.get_certificate(&name).await,
            Route::PutCertificate(name) => self.put_certificate(&name, req, now).await,
            Route::DeleteCertificate(name) => self.delete_certificate(&name, req).await,
            Route::GenerateVerificationCode(name) => self.generate_verification_code(&name, req, now).await,
            Route::VerifyCertificate(name) => self.verify_certificate(&name, req, now).await,
        }
    }

    /// Checks the SAS token (docs/service-api.md §3.3) and returns the policy's rights.
    fn authenticate(&self, req: &Request, now: UtcTime) -> Result<dps_core::rights::Rights, ServiceError> {
        let unauthorized = |why: &str| ServiceError::unauthorized(why);
        let header = req.header("authorization").ok_or_else(|| unauthorized("no Authorization header"))?;
        let token = sas::parse(header).map_err(|e| unauthorized(e.reason()))?;
        let now_secs = now.unix_secs();
        // The token's resource must cover one of our host names.
        let scopes: Vec<_> = self.svc.host_names.iter().map(|h| token.check_scope(h, now_secs)).collect();
        if !scopes.iter().any(Result::is_ok) {
            let reason = scopes.into_iter().find_map(Result::err).map_or("no host name", |e| e.reason());
            return Err(unauthorized(reason));
        }
        let name = token.key_name.as_deref().ok_or_else(|| unauthorized("token names no policy (skn)"))?;
        let policy =
            self.svc.policies.iter().find(|p| p.key_name.eq_ignore_ascii_case(name)).ok_or_else(|| unauthorized("unknown policy"))?;
        if !(token.signed_with(&policy.primary) || token.signed_with(&policy.secondary)) {
            return Err(unauthorized("signature does not match"));
        }
        Ok(policy.rights)
    }

    /// The console's login: the key (base64) when it is one of policy `name`'s keys, checked
    /// the way a service API call is (a token signed with it must authenticate).
    pub(crate) fn check_policy_key(&self, name: &str, key_b64: &str, now: UtcTime) -> Result<Vec<u8>, ServiceError> {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD
            .decode(key_b64.trim())
            .map_err(|_| ServiceError::unauthorized("the key is not base64"))?;
        let host = self.svc.host_names.first().ok_or_else(|| ServiceError::unauthorized("no host name"))?;
        let token = sas::build(host, &key, now.unix_secs() + 60, Some(name));
        let probe = Request {
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![("authorization".into(), token)],
            body: Vec::new(),
            close: false,
        };
        self.authenticate(&probe, now).map(|_| key)
    }

    async fn read<T: serde::de::DeserializeOwned>(&self, table: Table, id: &str) -> Result<Option<(Record, T)>, ServiceError> {
        match self.svc.store.get(table, &id_key(id)).await? {
            None => Ok(None),
            Some(r) => {
                let v = r.parse()?;
                Ok(Some((r, v)))
            }
        }
    }

    /// Makes the shards' caches forget what changed, before the change is acknowledged:
    /// enrollments in their owners' partitions, groups and hubs through the config generation.
    async fn changed(&self, table: Table, keys: Vec<String>) {
        match table {
            Table::Enrollments => self.cache.invalidate(keys).await,
            Table::Groups | Table::Hubs | Table::Certificates => self.svc.bump_generation(),
            _ => {}
        }
    }
}

/// A CA certificate's name: like an id (letters, digits, `-._:`), at most 128 characters.
fn check_name(name: &str) -> Result<(), ServiceError> {
    dps_core::ids::validate_id("certificate name", name)
}
