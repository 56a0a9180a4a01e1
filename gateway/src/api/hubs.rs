//! The linked-hub extension: `GET/PUT/DELETE /linkedHubs[/{hostName}]`.

use super::*;
use crate::service::new_etag;
use dps_core::validate::{parse_json, prepare_hub};
use dps_storage::{Expect, Op, Txn};

impl ServiceApi {
    pub(super) async fn list_hubs(&self) -> Handled {
        let rows = self.svc.store.scan(Table::Hubs, "", None, usize::MAX).await?;
        let mut hubs = Vec::with_capacity(rows.len());
        for (_, r) in rows {
            hubs.push(r.parse::<LinkedHub>()?.redacted());
        }
        Ok(json(200, &hubs))
    }

    pub(super) async fn get_hub(&self, name: &str) -> Handled {
        let (_, h) = self.read::<LinkedHub>(Table::Hubs, name).await?.ok_or_else(|| not_found(Table::Hubs, name))?;
        Ok(json(200, &h.redacted()))
    }

    pub(super) async fn put_hub(&self, name: &str, req: &Request) -> Handled {
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

    /// `POST /linkedHubs/{name}/resync`: every device assigned to the hub is given to it again
    /// (identity, credential, the twin last written), in the background; for a hub that lost
    /// its state (say a Mosquitto broker whose dynamic-security file was lost). Answers 202.
    pub(super) async fn resync_hub(&self, name: &str) -> Handled {
        let (_, h) = self.read::<LinkedHub>(Table::Hubs, name).await?.ok_or_else(|| not_found(Table::Hubs, name))?;
        glommio::spawn_local(crate::hubs::run::resync_hub(self.svc.clone(), h.clone())).detach();
        Ok(json(202, &serde_json::json!({"hub": h.name, "status": "resyncing"})))
    }

    pub(super) async fn delete_hub(&self, name: &str) -> Handled {
        let op = Op::Delete { table: Table::Hubs, key: id_key(name), expect: Expect::Present };
        self.svc.store.commit(Txn::one(op)).await?.map_err(|e| txn_error(e, Table::Hubs, name))?;
        self.changed(Table::Hubs, Vec::new()).await;
        Ok(Response::new(204))
    }
}
