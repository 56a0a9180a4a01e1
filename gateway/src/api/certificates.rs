//! CA certificates with proof of possession (this service's take on the ARM resource):
//! `GET /certificates`, `GET/PUT/DELETE /certificates/{name}`,
//! `POST /certificates/{name}/generateVerificationCode`, `POST /certificates/{name}/verify`.
//! Writes with `If-Match` compare etags; a change reaches the shards' snapshots (verified CAs
//! back `caReferences`) through the config generation before it is acknowledged.

use super::*;
use crate::service::{new_etag, random_bytes};
use dps_core::ca::{verification_code, CertificateBody, StoredCa};
use dps_core::validate::parse_json;
use dps_storage::{Expect, Op, Txn};

impl ServiceApi {
    pub(super) async fn list_certificates(&self) -> Handled {
        let rows = self.svc.store.scan(Table::Certificates, "", None, usize::MAX).await?;
        let mut value = Vec::with_capacity(rows.len());
        for (_, r) in rows {
            value.push(r.parse::<StoredCa>()?.response(&r.etag)?);
        }
        Ok(json(200, &serde_json::json!({ "value": value })))
    }

    pub(super) async fn get_certificate(&self, name: &str) -> Handled {
        let (r, ca) = self.read::<StoredCa>(Table::Certificates, name).await?.ok_or_else(|| not_found(Table::Certificates, name))?;
        Ok(json(200, &ca.response(&r.etag)?).header("ETag", r.etag))
    }

    /// Writes `ca` under `expect` and answers with it.
    async fn store_certificate(&self, ca: StoredCa, expect: Expect) -> Handled {
        let etag = new_etag();
        let body = serde_json::to_vec(&ca).map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?;
        let record = Record { etag: etag.clone(), class: 0, body };
        let quota = Some(self.svc.limits.max_ca_certificates);
        let op = Op::Put { table: Table::Certificates, key: id_key(&ca.name), record, expect, quota };
        self.svc.store.commit(Txn::one(op)).await?.map_err(|e| txn_error(e, Table::Certificates, &ca.name))?;
        self.changed(Table::Certificates, Vec::new()).await;
        Ok(json(200, &ca.response(&etag)?).header("ETag", etag))
    }

    pub(super) async fn put_certificate(&self, name: &str, req: &Request, now: UtcTime) -> Handled {
        crate::api::check_name(name)?;
        let body: CertificateBody = parse_json(&req.body)?;
        let (previous, expect) = match if_match(req) {
            Some(m) => (self.read::<StoredCa>(Table::Certificates, name).await?.map(|(_, c)| c), Expect::Etag(m)),
            // No If-Match creates only, as for enrollments.
            None => (None, Expect::Absent),
        };
        self.store_certificate(StoredCa::prepare(name, body, previous.as_ref(), now)?, expect).await
    }

    pub(super) async fn delete_certificate(&self, name: &str, req: &Request) -> Handled {
        let expect = if_match(req).map(Expect::Etag).unwrap_or(Expect::Present);
        let op = Op::Delete { table: Table::Certificates, key: id_key(name), expect };
        self.svc.store.commit(Txn::one(op)).await?.map_err(|e| txn_error(e, Table::Certificates, name))?;
        self.changed(Table::Certificates, Vec::new()).await;
        Ok(Response::new(204))
    }

    /// The stored CA and the precondition for writing it back: the caller's If-Match, or the
    /// etag just read (so a concurrent change is not overwritten).
    async fn current(&self, name: &str, req: &Request) -> Result<(StoredCa, Expect), ServiceError> {
        let (r, ca) = self.read::<StoredCa>(Table::Certificates, name).await?.ok_or_else(|| not_found(Table::Certificates, name))?;
        Ok((ca, Expect::Etag(if_match(req).unwrap_or(r.etag))))
    }

    pub(super) async fn generate_verification_code(&self, name: &str, req: &Request, now: UtcTime) -> Handled {
        let (mut ca, expect) = self.current(name, req).await?;
        ca.verification_code = Some(verification_code(random_bytes::<16>()));
        ca.updated = now;
        self.store_certificate(ca, expect).await
    }

    pub(super) async fn verify_certificate(&self, name: &str, req: &Request, now: UtcTime) -> Handled {
        let (mut ca, expect) = self.current(name, req).await?;
        let body: CertificateBody = parse_json(&req.body)?;
        ca.verify(&body.certificate, now)?;
        ca.is_verified = true;
        ca.verification_code = None;
        ca.updated = now;
        self.store_certificate(ca, expect).await
    }
}
