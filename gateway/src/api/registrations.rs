//! Registration states: GET, DELETE and the query by enrollment group.

use super::*;
use dps_storage::{Expect, Op, Txn};

impl ServiceApi {
    pub(super) async fn get_registration(&self, id: &str) -> Handled {
        let (rec, r) =
            self.read::<DeviceRegistrationState>(Table::Registrations, id).await?.ok_or_else(|| not_found(Table::Registrations, id))?;
        Ok(json(200, &registration_view(r)).header("ETag", rec.etag))
    }

    pub(super) async fn delete_registration(&self, id: &str, req: &Request) -> Handled {
        // The store drops the state's group index entry with it.
        let expect = if_match(req).map(Expect::Etag).unwrap_or(Expect::Present);
        let op = Op::Delete { table: Table::Registrations, key: id_key(id), expect };
        self.svc.store.commit(Txn::one(op)).await?.map_err(|e| txn_error(e, Table::Registrations, id))?;
        Ok(Response::new(204))
    }

    pub(super) async fn query_registrations(&self, group: &str, req: &Request) -> Handled {
        Self::check_query_body(req)?;
        let (size, after) = self.paging(req)?;
        let mut keys = self.svc.group_registrations(group, after.as_deref(), size + 1).await?;
        let more = keys.len() > size;
        keys.truncate(size);
        let mut items = Vec::with_capacity(keys.len());
        let mut last = None;
        for reg_key in keys {
            if let Some(r) = self.svc.store.get(Table::Registrations, &reg_key).await? {
                let state: DeviceRegistrationState = r.parse()?;
                items.push(
                    serde_json::to_value(registration_view(state))
                        .map_err(|_| ServiceError::new(ErrorKind::Internal, "serialisation failed"))?,
                );
            }
            last = Some(reg_key);
        }
        Ok(Self::page_response(items, last.filter(|_| more), size, "deviceRegistration"))
    }
}
