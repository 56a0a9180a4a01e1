//! The service (management) REST API: enrollments, enrollment groups, registration states and
//! the linked-hub extension (spec service-api.md §1). Routing, validation and wire shapes come
//! from `dps-core`; this module authenticates, talks to the store and renders responses.

use crate::enrollment_cache::EnrollmentCache;
use crate::http::{Request, Response};
use crate::metrics::Metrics;
use crate::service::{new_etag, random_key, Service};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use dps_core::error::{error_body, ErrorKind, ServiceError};
use dps_core::ids::{id_key, printable, validate_id};
use dps_core::model::*;
use dps_core::rate::TokenBucket;
use dps_core::sas;
use dps_core::service_route::{check_api_version, Collection, Route};
use dps_core::time::UtcTime;
use dps_core::validate::{input_from_value, parse_input, parse_json, prepare_enrollment, prepare_group, prepare_hub};
use dps_storage::{Expect, Op, Record, StoreCallError, Table, Txn, TxnError, TxnResult};
use serde::Serialize;
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

/// Record classes, so the store can count enrollment groups per attestation type for quotas.
const CLASS_SYMMETRIC: u8 = 1;
const CLASS_X509: u8 = 2;

/// A failed request: the error and, for throttling, when to retry.
struct Fail {
    err: ServiceError,
    retry_after: Option<u64>,
}

impl From<ServiceError> for Fail {
    fn from(err: ServiceError) -> Fail {
        Fail { err, retry_after: None }
    }
}

impl From<StoreCallError> for Fail {
    fn from(e: StoreCallError) -> Fail {
        match e {
            StoreCallError::Busy => {
                Fail { err: ServiceError::new(ErrorKind::Unavailable, "the store is overloaded; retry later"), retry_after: Some(1) }
            }
            StoreCallError::Failed(m) => {
                tracing::error!(error = %m, "store failure");
                ServiceError::new(ErrorKind::Internal, "the store failed; the operation was not applied").into()
            }
            StoreCallError::Closed => ServiceError::new(ErrorKind::Unavailable, "the service is shutting down").into(),
        }
    }
}

type Handled = Result<Response, Fail>;

/// One shard's instance of the API (its own rate bucket and tracking-id sequence).
pub struct ServiceApi {
    svc: Arc<Service>,
    cache: Rc<EnrollmentCache>,
    metrics: Rc<Metrics>,
    ops: RefCell<Option<TokenBucket>>,
    shard: usize,
    seq: Cell<u64>,
    boot: u32,
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

fn parse_stored<T: serde::de::DeserializeOwned>(r: &Record) -> Result<T, ServiceError> {
    serde_json::from_slice(&r.body).map_err(|e| {
        tracing::error!(error = %e, "stored record does not parse");
        ServiceError::new(ErrorKind::Internal, "a stored record could not be read")
    })
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
    pub fn new(svc: Arc<Service>, cache: Rc<EnrollmentCache>, metrics: Rc<Metrics>, shard: usize, now_nanos: u64) -> ServiceApi {
        let per_min = svc.limits.service_operations_per_minute;
        // Each shard enforces its share of the service-wide rate; connections spread evenly
        // over SO_REUSEPORT listeners, so the sum is the configured rate.
        let ops = (per_min > 0).then(|| {
            let share = (per_min as f64 / svc.shards.max(1) as f64).max(1.0);
            TokenBucket::new(share, 60.0, share, now_nanos)
        });
        let boot = u32::from_be_bytes(crate::service::random_bytes::<4>());
        ServiceApi { svc, cache, metrics, ops: RefCell::new(ops), shard, seq: Cell::new(0), boot }
    }

    fn tracking_id(&self) -> String {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        format!("{:08x}-{:04x}-{:012x}", self.boot, self.shard, n)
    }

    /// Answers one request; never fails (errors become DPS error bodies).
    pub async fn handle(&self, req: &Request, now: UtcTime, mono_nanos: u64) -> Response {
        let tracking = self.tracking_id();
        let resp = self.handle_inner(req, now, mono_nanos, tracking).await;
        self.metrics.inc("dps_service_operations_total", &[("status", &resp.status.to_string())]);
        resp
    }

    async fn handle_inner(&self, req: &Request, now: UtcTime, mono_nanos: u64, tracking: String) -> Response {
        let resp = match self.dispatch(req, now, mono_nanos).await {
            Ok(r) => r,
            Err(f) => {
                tracing::info!(target: "service_operations", tracking_id = %tracking, method = %req.method, path = %printable(&req.path), status = f.err.kind.status(), error_code = f.err.kind.code(), "{}", f.err.message);
                let mut r = Response::json(f.err.kind.status(), error_body(&f.err, &tracking, now))
                    .header("x-ms-error-code", f.err.kind.code().to_string());
                if let Some(s) = f.retry_after {
                    r = r.header("Retry-After", s.to_string());
                }
                return r.header("x-ms-request-id", tracking);
            }
        };
        tracing::info!(target: "service_operations", tracking_id = %tracking, method = %req.method, path = %printable(&req.path), status = resp.status, "ok");
        resp.header("x-ms-request-id", tracking)
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
            )
            .into());
        }
        check_api_version(req.query_param("api-version").as_deref())?;
        if let Some(bucket) = self.ops.borrow_mut().as_mut() {
            if let Err(wait) = bucket.try_take(mono) {
                return Err(Fail {
                    err: ServiceError::new(ErrorKind::Throttled, "service operation rate limit exceeded"),
                    retry_after: Some(wait),
                });
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
            Route::DeleteHub(name) => self.delete_hub(&name).await,
        }
    }

    /// Checks the SAS token (spec service-api.md §3.3) and returns the policy's rights.
    fn authenticate(&self, req: &Request, now: UtcTime) -> Result<dps_core::rights::Rights, ServiceError> {
        let unauthorized = |why: &str| {
            tracing::debug!(reason = why, "service API authentication failed");
            ServiceError::new(ErrorKind::Unauthorized, "Unauthorized")
        };
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

    async fn read<T: serde::de::DeserializeOwned>(&self, table: Table, id: &str) -> Result<Option<(Record, T)>, Fail> {
        match self.svc.store.get(table, &id_key(id)).await? {
            None => Ok(None),
            Some(r) => {
                let v = parse_stored(&r)?;
                Ok(Some((r, v)))
            }
        }
    }

    async fn get(&self, c: Collection, id: &str) -> Handled {
        let table = table_of(c);
        match c {
            Collection::Enrollments => {
                let (rec, mut e) = self.read::<IndividualEnrollment>(table, id).await?.ok_or_else(|| not_found(table, id))?;
                if let Some((_, r)) = self.read::<DeviceRegistrationState>(Table::Registrations, id).await? {
                    e.registration_state = Some(registration_view(r));
                }
                Ok(json(200, &enrollment_view(e)).header("ETag", rec.etag))
            }
            Collection::Groups => {
                let (r, g) = self.read::<EnrollmentGroup>(table, id).await?.ok_or_else(|| not_found(table, id))?;
                Ok(json(200, &group_view(g)).header("ETag", r.etag))
            }
        }
    }

    async fn put(&self, c: Collection, id: &str, req: &Request, now: UtcTime) -> Handled {
        let table = table_of(c);
        let if_match = if_match(req);
        let etag = new_etag();
        let limits = &self.svc.limits;
        let (record, view, key) = match c {
            Collection::Enrollments => {
                let e: IndividualEnrollment = parse_input(&req.body)?;
                let previous = match &if_match {
                    Some(_) => self.read::<IndividualEnrollment>(table, id).await?.map(|(_, p)| p),
                    None => None,
                };
                let mut e = prepare_enrollment(e, Some(id), previous.as_ref(), now, &mut random_key)?;
                e.common.etag = Some(etag.clone());
                let body = serde_json::to_vec(&e).map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?;
                let key = id_key(&e.registration_id);
                (Record { etag: etag.clone(), class: 0, body }, serde_json::to_value(enrollment_view(e)), key)
            }
            Collection::Groups => {
                let g: EnrollmentGroup = parse_input(&req.body)?;
                let previous = match &if_match {
                    Some(_) => self.read::<EnrollmentGroup>(table, id).await?.map(|(_, p)| p),
                    None => None,
                };
                let mut g = prepare_group(g, Some(id), previous.as_ref(), now, &mut random_key)?;
                g.common.etag = Some(etag.clone());
                let body = serde_json::to_vec(&g).map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?;
                let key = id_key(&g.enrollment_group_id);
                (Record { etag: etag.clone(), class: group_class(&g), body }, serde_json::to_value(group_view(g)), key)
            }
        };
        let quota = match (c, record.class) {
            (Collection::Enrollments, _) => limits.max_enrollments,
            (Collection::Groups, CLASS_X509) => limits.max_x509_groups,
            (Collection::Groups, _) => limits.max_symmetric_key_groups,
        };
        let expect = match if_match {
            Some(m) => Expect::Etag(m),
            // No If-Match means create-only (spec service-api.md §1.6).
            None => Expect::Absent,
        };
        let result = self.svc.store.commit(Txn::one(Op::Put { table, key: key.clone(), record, expect, quota: Some(quota) })).await?;
        result.map_err(|e| txn_error(e, table, id))?;
        self.changed(table, vec![key]).await;
        let view = view.map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?;
        Ok(json(200, &view).header("ETag", etag))
    }

    async fn delete(&self, c: Collection, id: &str, req: &Request) -> Handled {
        let table = table_of(c);
        let key = id_key(id);
        let expect = if_match(req).map(Expect::Etag).unwrap_or(Expect::Present);
        let txn = match c {
            Collection::Enrollments => self.enrollment_delete(&key, expect).await?,
            Collection::Groups => Txn::one(Op::Delete { table, key: key.clone(), expect }),
        };
        self.svc.store.commit(txn).await?.map_err(|e| txn_error(e, table, id))?;
        self.changed(table, vec![key]).await;
        Ok(Response::new(204))
    }

    /// Deleting an individual enrollment takes its registration state (and that state's group
    /// index entry) with it; a group's registration records stay until deleted one by one
    /// (spec service-api.md §6.3). Used by DELETE and by bulk delete.
    async fn enrollment_delete(&self, key: &str, expect: Expect) -> Result<Txn, Fail> {
        let mut ops = vec![Op::Delete { table: Table::Enrollments, key: key.to_string(), expect }];
        if let Some((_, r)) = self.read::<DeviceRegistrationState>(Table::Registrations, key).await? {
            ops.push(Op::Delete { table: Table::Registrations, key: key.to_string(), expect: Expect::Any });
            if let Some(g) = r.enrollment_group_id {
                ops.push(Op::Index { table: Table::RegistrationsByGroup, key: by_group_key(&g, key), present: false });
            }
        }
        Ok(Txn { ops })
    }

    /// Makes the shards' caches forget what changed, before the change is acknowledged:
    /// enrollments in their owners' partitions, groups and hubs through the config generation.
    async fn changed(&self, table: Table, keys: Vec<String>) {
        match table {
            Table::Enrollments => self.cache.invalidate(keys).await,
            Table::Groups | Table::Hubs => self.svc.bump_generation(),
            _ => {}
        }
    }

    async fn attestation(&self, c: Collection, id: &str) -> Handled {
        let table = table_of(c);
        let a = match c {
            Collection::Enrollments => self.read::<IndividualEnrollment>(table, id).await?.map(|(_, e)| e.common.attestation),
            Collection::Groups => self.read::<EnrollmentGroup>(table, id).await?.map(|(_, g)| g.common.attestation),
        };
        Ok(json(200, &a.ok_or_else(|| not_found(table, id))?))
    }

    /// Page size and start position from `x-ms-max-item-count` and `x-ms-continuation`.
    fn paging(&self, req: &Request) -> Result<(usize, Option<String>), ServiceError> {
        let l = &self.svc.limits;
        let size = match req.header("x-ms-max-item-count") {
            None => l.default_page_size,
            Some(v) => match v.trim().parse::<i64>() {
                Ok(n) if n > 0 => (n as usize).min(l.max_page_size),
                Ok(_) => l.default_page_size,
                Err(_) => return Err(ServiceError::invalid("x-ms-max-item-count must be an integer")),
            },
        };
        let after = match req.header("x-ms-continuation").filter(|v| !v.is_empty()) {
            None => None,
            Some(t) => Some(
                B64URL
                    .decode(t.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ServiceError::invalid("x-ms-continuation is not a token this service issued"))?,
            ),
        };
        Ok((size, after))
    }

    fn check_query_body(req: &Request) -> Result<(), ServiceError> {
        // Python sends no body for the registration query, others `{"query":"*"}`; DPS has no
        // query language, so any query string returns every item of the collection.
        if !req.body.iter().all(u8::is_ascii_whitespace) {
            parse_json::<QuerySpecification>(&req.body)?;
        }
        Ok(())
    }

    fn page_response(items: Vec<Value>, next: Option<String>, size: usize, item_type: &str) -> Response {
        let mut r = json(200, &items).header("x-ms-item-type", item_type).header("x-ms-max-item-count", size.to_string());
        // Never an empty continuation header on the last page: Node would loop forever.
        if let Some(k) = next {
            r = r.header("x-ms-continuation", B64URL.encode(k));
        }
        r
    }

    async fn query(&self, table: Table, req: &Request) -> Handled {
        Self::check_query_body(req)?;
        let (size, after) = self.paging(req)?;
        let mut rows = self.svc.store.scan(table, "", after.as_deref(), size + 1).await?;
        let next = (rows.len() > size).then(|| rows.truncate(size)).and_then(|_| rows.last().map(|(k, _)| k.clone()));
        let mut items = Vec::with_capacity(rows.len());
        for (_, r) in &rows {
            let v = if table == Table::Enrollments {
                serde_json::to_value(enrollment_view(parse_stored(r)?))
            } else {
                serde_json::to_value(group_view(parse_stored(r)?))
            };
            items.push(v.map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?);
        }
        let item_type = if table == Table::Enrollments { "enrollment" } else { "enrollmentGroup" };
        Ok(Self::page_response(items, next, size, item_type))
    }

    fn check_bulk_size(&self, n: usize) -> Result<(), ServiceError> {
        if n == 0 {
            return Err(ServiceError::invalid("a bulk operation needs at least one item"));
        }
        if n > self.svc.limits.max_bulk_items {
            return Err(ServiceError::new(
                ErrorKind::TooManyBulkItems,
                format!("a bulk operation takes at most {} items; this one has {n}", self.svc.limits.max_bulk_items),
            ));
        }
        Ok(())
    }

    /// Runs prepared per-item transactions and renders `BulkEnrollmentOperationResult`.
    async fn run_bulk(&self, table: Table, items: Vec<(String, Result<Txn, ServiceError>)>) -> Handled {
        let mut errors = Vec::new();
        let mut ids = Vec::new();
        let mut txns = Vec::new();
        let item_error = |id: &str, e: &ServiceError| BulkItemError {
            registration_id: (table == Table::Enrollments).then(|| id.to_string()),
            enrollment_group_id: (table == Table::Groups).then(|| id.to_string()),
            error_code: e.kind.code(),
            error_status: e.message.clone(),
        };
        for (id, t) in items {
            match t {
                Ok(t) => {
                    ids.push(id);
                    txns.push(t);
                }
                Err(e) => errors.push(item_error(&id, &e)),
            }
        }
        let results: Vec<TxnResult> = self.svc.store.commit_many(txns).await?;
        self.changed(table, ids.iter().map(|id| id_key(id)).collect()).await;
        for (id, r) in ids.iter().zip(results) {
            if let Err(e) = r {
                errors.push(item_error(id, &txn_error(e, table, id)));
            }
        }
        Ok(json(200, &BulkOperationResult { is_successful: errors.is_empty(), errors }))
    }

    fn bulk_expect(mode: BulkMode, etag: Option<&String>) -> Result<Expect, ServiceError> {
        Ok(match mode {
            BulkMode::Create => Expect::Absent,
            BulkMode::Update => Expect::Any,
            BulkMode::UpdateIfMatchETag => {
                Expect::Etag(etag.cloned().ok_or_else(|| ServiceError::invalid("updateIfMatchETag needs the item's etag"))?)
            }
            BulkMode::Delete => etag.cloned().map(Expect::Etag).unwrap_or(Expect::Present),
        })
    }

    fn item_id(v: &Value, field: &str) -> Result<String, ServiceError> {
        let id = v.get(field).and_then(Value::as_str).ok_or_else(|| ServiceError::invalid(format!("item has no {field}")))?;
        validate_id(field, id)?;
        Ok(id.to_string())
    }

    async fn bulk_enrollments(&self, req: &Request, now: UtcTime) -> Handled {
        let op: BulkEnrollmentOperation = parse_json(&req.body)?;
        self.check_bulk_size(op.enrollments.len())?;
        let mut items = Vec::with_capacity(op.enrollments.len());
        for v in op.enrollments {
            let id = v.get("registrationId").and_then(Value::as_str).unwrap_or("").to_string();
            let txn = self.bulk_enrollment_txn(op.mode, v, now).await?;
            items.push((id, txn));
        }
        self.run_bulk(Table::Enrollments, items).await
    }

    /// One item's transaction, or its own error (which does not fail the call).
    async fn bulk_enrollment_txn(&self, mode: BulkMode, v: Value, now: UtcTime) -> Result<Result<Txn, ServiceError>, Fail> {
        let id = match Self::item_id(&v, "registrationId") {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let key = id_key(&id);
        if mode == BulkMode::Delete {
            let etag = v.get("etag").and_then(Value::as_str).map(str::to_string);
            let expect = match Self::bulk_expect(mode, etag.as_ref()) {
                Ok(x) => x,
                Err(e) => return Ok(Err(e)),
            };
            return Ok(Ok(self.enrollment_delete(&key, expect).await?));
        }
        let e: IndividualEnrollment = match input_from_value(v) {
            Ok(e) => e,
            Err(e) => return Ok(Err(e)),
        };
        let expect = match Self::bulk_expect(mode, e.common.etag.as_ref()) {
            Ok(x) => x,
            Err(err) => return Ok(Err(err)),
        };
        let previous =
            if mode == BulkMode::Create { None } else { self.read::<IndividualEnrollment>(Table::Enrollments, &id).await?.map(|(_, p)| p) };
        let mut e = match prepare_enrollment(e, None, previous.as_ref(), now, &mut random_key) {
            Ok(e) => e,
            Err(err) => return Ok(Err(err)),
        };
        let etag = new_etag();
        e.common.etag = Some(etag.clone());
        let body = serde_json::to_vec(&e).map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?;
        Ok(Ok(Txn::one(Op::Put {
            table: Table::Enrollments,
            key,
            record: Record { etag, class: 0, body },
            expect,
            quota: Some(self.svc.limits.max_enrollments),
        })))
    }

    async fn bulk_groups(&self, req: &Request, now: UtcTime) -> Handled {
        let op: BulkEnrollmentGroupOperation = parse_json(&req.body)?;
        self.check_bulk_size(op.enrollment_groups.len())?;
        let mut items = Vec::with_capacity(op.enrollment_groups.len());
        for v in op.enrollment_groups {
            let id = v.get("enrollmentGroupId").and_then(Value::as_str).unwrap_or("").to_string();
            let txn = self.bulk_group_txn(op.mode, v, now).await?;
            items.push((id, txn));
        }
        self.run_bulk(Table::Groups, items).await
    }

    async fn bulk_group_txn(&self, mode: BulkMode, v: Value, now: UtcTime) -> Result<Result<Txn, ServiceError>, Fail> {
        let id = match Self::item_id(&v, "enrollmentGroupId") {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let key = id_key(&id);
        if mode == BulkMode::Delete {
            let etag = v.get("etag").and_then(Value::as_str).map(str::to_string);
            return Ok(Self::bulk_expect(mode, etag.as_ref()).map(|expect| Txn::one(Op::Delete { table: Table::Groups, key, expect })));
        }
        let g: EnrollmentGroup = match input_from_value(v) {
            Ok(g) => g,
            Err(e) => return Ok(Err(e)),
        };
        let expect = match Self::bulk_expect(mode, g.common.etag.as_ref()) {
            Ok(x) => x,
            Err(err) => return Ok(Err(err)),
        };
        let previous =
            if mode == BulkMode::Create { None } else { self.read::<EnrollmentGroup>(Table::Groups, &id).await?.map(|(_, p)| p) };
        let mut g = match prepare_group(g, None, previous.as_ref(), now, &mut random_key) {
            Ok(g) => g,
            Err(err) => return Ok(Err(err)),
        };
        let etag = new_etag();
        g.common.etag = Some(etag.clone());
        let class = group_class(&g);
        let quota = if class == CLASS_X509 { self.svc.limits.max_x509_groups } else { self.svc.limits.max_symmetric_key_groups };
        let body = serde_json::to_vec(&g).map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?;
        Ok(Ok(Txn::one(Op::Put { table: Table::Groups, key, record: Record { etag, class, body }, expect, quota: Some(quota) })))
    }

    async fn get_registration(&self, id: &str) -> Handled {
        let (rec, r) =
            self.read::<DeviceRegistrationState>(Table::Registrations, id).await?.ok_or_else(|| not_found(Table::Registrations, id))?;
        Ok(json(200, &registration_view(r)).header("ETag", rec.etag))
    }

    async fn delete_registration(&self, id: &str, req: &Request) -> Handled {
        let (rec, r) =
            self.read::<DeviceRegistrationState>(Table::Registrations, id).await?.ok_or_else(|| not_found(Table::Registrations, id))?;
        let key = id_key(id);
        // Without If-Match, delete the version just read, so its group index entry goes with it.
        let expect = Expect::Etag(if_match(req).unwrap_or(rec.etag));
        let mut ops = vec![Op::Delete { table: Table::Registrations, key: key.clone(), expect }];
        if let Some(g) = r.enrollment_group_id {
            ops.push(Op::Index { table: Table::RegistrationsByGroup, key: by_group_key(&g, &key), present: false });
        }
        self.svc.store.commit(Txn { ops }).await?.map_err(|e| txn_error(e, Table::Registrations, id))?;
        Ok(Response::new(204))
    }

    async fn query_registrations(&self, group: &str, req: &Request) -> Handled {
        Self::check_query_body(req)?;
        let (size, after) = self.paging(req)?;
        let prefix = by_group_key(group, "");
        let after_key = after.map(|a| format!("{prefix}{a}"));
        let mut rows = self.svc.store.scan(Table::RegistrationsByGroup, &prefix, after_key.as_deref(), size + 1).await?;
        let more = rows.len() > size;
        rows.truncate(size);
        let mut items = Vec::with_capacity(rows.len());
        let mut last = None;
        for (k, _) in rows {
            let reg_key = k[prefix.len()..].to_string();
            if let Some(r) = self.svc.store.get(Table::Registrations, &reg_key).await? {
                let state: DeviceRegistrationState = parse_stored(&r)?;
                items.push(
                    serde_json::to_value(registration_view(state))
                        .map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?,
                );
            }
            last = Some(reg_key);
        }
        Ok(Self::page_response(items, last.filter(|_| more), size, "deviceRegistration"))
    }

    async fn list_hubs(&self) -> Handled {
        let rows = self.svc.store.scan(Table::Hubs, "", None, usize::MAX).await?;
        let mut hubs = Vec::with_capacity(rows.len());
        for (_, r) in rows {
            hubs.push(parse_stored::<LinkedHub>(&r)?.redacted());
        }
        Ok(json(200, &hubs))
    }

    async fn get_hub(&self, name: &str) -> Handled {
        let (_, h) = self.read::<LinkedHub>(Table::Hubs, name).await?.ok_or_else(|| not_found(Table::Hubs, name))?;
        Ok(json(200, &h.redacted()))
    }

    async fn put_hub(&self, name: &str, req: &Request) -> Handled {
        let h = prepare_hub(parse_json(&req.body)?, Some(name))?;
        let body = serde_json::to_vec(&h).map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?;
        let op = Op::Put {
            table: Table::Hubs,
            key: id_key(&h.name),
            record: Record { etag: new_etag(), class: 0, body },
            expect: Expect::Any,
            quota: Some(self.svc.limits.max_linked_hubs),
        };
        self.svc.store.commit(Txn::one(op)).await?.map_err(|e| txn_error(e, Table::Hubs, name))?;
        self.changed(Table::Hubs, Vec::new()).await;
        Ok(json(200, &h.redacted()))
    }

    async fn delete_hub(&self, name: &str) -> Handled {
        let op = Op::Delete { table: Table::Hubs, key: id_key(name), expect: Expect::Present };
        self.svc.store.commit(Txn::one(op)).await?.map_err(|e| txn_error(e, Table::Hubs, name))?;
        self.changed(Table::Hubs, Vec::new()).await;
        Ok(Response::new(204))
    }
}

/// Key of the by-group registration index.
pub fn by_group_key(group: &str, registration_key: &str) -> String {
    format!("{}\u{0}{registration_key}", id_key(group))
}
