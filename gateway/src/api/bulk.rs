//! Bulk operations on enrollments and groups: each item succeeds or fails on its own, and the
//! answer says which were applied.

use super::*;
use crate::service::{new_etag, random_key};
use dps_core::ids::validate_id;
use dps_core::validate::{input_from_value, parse_json, prepare_enrollment, prepare_group};
use dps_storage::{Expect, Op, Txn};
use serde_json::Value;

impl ServiceApi {
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
        let results = self.svc.store.commit_many(txns).await;
        // Every item attempted leaves the caches, whatever the store said: items queued before
        // it refused the rest (busy) commit all the same.
        self.changed(table, ids.iter().map(|id| id_key(id)).collect()).await;
        for (id, r) in ids.iter().zip(results) {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(item_error(id, &txn_error(e, table, id))),
                // Not attempted: the item says so (503, retry), the others stand.
                Err(e) => errors.push(item_error(id, &ServiceError::from(e))),
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

    pub(super) async fn bulk_enrollments(&self, req: &Request, now: UtcTime) -> Handled {
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
    async fn bulk_enrollment_txn(&self, mode: BulkMode, v: Value, now: UtcTime) -> Result<Result<Txn, ServiceError>, ServiceError> {
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
            return Ok(Ok(Self::enrollment_delete(&key, expect)));
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

    pub(super) async fn bulk_groups(&self, req: &Request, now: UtcTime) -> Handled {
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

    async fn bulk_group_txn(&self, mode: BulkMode, v: Value, now: UtcTime) -> Result<Result<Txn, ServiceError>, ServiceError> {
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
}
