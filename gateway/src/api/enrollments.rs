//! Individual enrollments and enrollment groups: GET, PUT (create, or update with If-Match),
//! DELETE and the attestation mechanism with its secrets.

use super::*;
use crate::hubs::run::{Enrollment, Refresh};
use crate::service::{new_etag, random_key};
use dps_core::validate::{parse_input, prepare_enrollment, prepare_group};
use dps_storage::{Expect, Op, Txn};

impl ServiceApi {
    pub(super) async fn get(&self, c: Collection, id: &str) -> Handled {
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

    pub(super) async fn put(&self, c: Collection, id: &str, req: &Request, now: UtcTime) -> Handled {
        let table = table_of(c);
        let if_match = if_match(req);
        let etag = new_etag();
        let limits = &self.svc.limits;
        let (record, view, key, refresh) = match c {
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
                let rolled = previous.is_some_and(|p| p.common.attestation.symmetric_key != e.common.attestation.symmetric_key);
                let refresh = refresh_of(&e.common, rolled, || Enrollment::Individual(Box::new(e.clone())));
                (Record { etag: etag.clone(), class: 0, body }, serde_json::to_value(enrollment_view(e)), key, refresh)
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
                let rolled = previous.is_some_and(|p| p.common.attestation.symmetric_key != g.common.attestation.symmetric_key);
                let refresh = refresh_of(&g.common, rolled, || Enrollment::Group(Box::new(g.clone())));
                (Record { etag: etag.clone(), class: group_class(&g), body }, serde_json::to_value(group_view(g)), key, refresh)
            }
        };
        let quota = match (c, record.class) {
            (Collection::Enrollments, _) => limits.max_enrollments,
            (Collection::Groups, CLASS_X509) => limits.max_x509_groups,
            (Collection::Groups, _) => limits.max_symmetric_key_groups,
        };
        let expect = match if_match {
            Some(m) => Expect::Etag(m),
            // No If-Match means create-only (docs/service-api.md §1.6).
            None => Expect::Absent,
        };
        let result = self.svc.store.commit(Txn::one(Op::Put { table, key: key.clone(), record, expect, quota: Some(quota) })).await?;
        result.map_err(|e| txn_error(e, table, id))?;
        self.changed(table, vec![key.clone()]).await;
        if let Some(r) = refresh {
            self.refresh_at_hubs(c, key, r).await?;
        }
        let view = view.map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?;
        Ok(json(200, &view).header("ETag", etag))
    }

    pub(super) async fn delete(&self, c: Collection, id: &str, req: &Request) -> Handled {
        let table = table_of(c);
        let key = id_key(id);
        let expect = if_match(req).map(Expect::Etag).unwrap_or(Expect::Present);
        let txn = match c {
            Collection::Enrollments => Self::enrollment_delete(&key, expect),
            Collection::Groups => Txn::one(Op::Delete { table, key: key.clone(), expect }),
        };
        self.svc.store.commit(txn).await?.map_err(|e| txn_error(e, table, id))?;
        self.changed(table, vec![key]).await;
        Ok(Response::new(204))
    }

    /// A disabled enrollment's devices are cut off at their hubs, a rolled key reaches them
    /// there, in the background (the registration keys are read here: one for an individual
    /// enrollment, the group's index for a group).
    async fn refresh_at_hubs(&self, c: Collection, key: String, refresh: Refresh) -> Result<(), ServiceError> {
        let devices = match c {
            Collection::Enrollments => crate::hubs::run::Devices::One(key),
            Collection::Groups => crate::hubs::run::Devices::Group(key),
        };
        glommio::spawn_local(crate::hubs::run::refresh_devices(self.svc.clone(), devices, refresh)).detach();
        Ok(())
    }

    /// Deleting an individual enrollment takes its registration state with it (the store drops
    /// that state's group index entry); a group's registration records stay until deleted one
    /// by one. Used by DELETE and by bulk delete.
    pub(super) fn enrollment_delete(key: &str, expect: Expect) -> Txn {
        Txn {
            ops: vec![
                Op::Delete { table: Table::Enrollments, key: key.to_string(), expect },
                Op::Delete { table: Table::Registrations, key: key.to_string(), expect: Expect::Any },
            ],
        }
    }

    /// The attestation mechanism with its secrets (keys, certificate bodies).
    pub(super) async fn attestation(&self, c: Collection, id: &str) -> Handled {
        let table = table_of(c);
        let a = match c {
            Collection::Enrollments => self.read::<IndividualEnrollment>(table, id).await?.map(|(_, e)| e.common.attestation),
            Collection::Groups => self.read::<EnrollmentGroup>(table, id).await?.map(|(_, g)| g.common.attestation),
        };
        Ok(json(200, &a.ok_or_else(|| not_found(table, id))?))
    }
}

/// What an enrollment write changes at its devices' hubs: disabled, they are cut off; with its
/// symmetric keys rolled, the hubs get the new ones.
fn refresh_of(common: &EnrollmentCommon, rolled: bool, enrollment: impl FnOnce() -> Enrollment) -> Option<Refresh> {
    match (common.is_enabled(), rolled) {
        (false, _) => Some(Refresh::Disable),
        (true, true) => Some(Refresh::Rekey(enrollment())),
        (true, false) => None,
    }
}
