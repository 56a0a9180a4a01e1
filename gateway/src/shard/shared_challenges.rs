//! TPM challenges kept in a store several nodes share (etcd). Over HTTPS a TPM device fetches
//! its challenge with one request and answers with the next, and behind a balancer the two may
//! reach different nodes, so the issuing node's memory is not enough. One record per
//! registration key (a newer challenge replaces the older, whose answers then fail), sealed
//! like every record (it holds K), and taken by a delete that names the etag it read: across
//! all nodes an answer is accepted once. A challenge is only issued to the endorsement key the
//! device's individual enrollment names, so the table holds at most one record per TPM
//! enrollment; no other bound is needed.

use crate::service::new_etag;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::tpm::book::Issued;
use dps_storage::{Expect, Op, Record, StoreCallError, StoreService, Table, Txn};

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    hmac_key: String,
    endorsement_key: String,
    storage_root_key: String,
    expires_secs: i64,
}

impl Stored {
    fn of(i: &Issued) -> Stored {
        Stored {
            hmac_key: B64.encode(i.hmac_key),
            endorsement_key: B64.encode(&i.endorsement_key),
            storage_root_key: B64.encode(&i.storage_root_key),
            expires_secs: i.expires_secs,
        }
    }

    fn issued(&self) -> Option<Issued> {
        Some(Issued {
            hmac_key: B64.decode(&self.hmac_key).ok()?.try_into().ok()?,
            endorsement_key: B64.decode(&self.endorsement_key).ok()?,
            storage_root_key: B64.decode(&self.storage_root_key).ok()?,
            expires_secs: self.expires_secs,
        })
    }
}

/// Keeps the challenge until the device answers it (on any node), replacing an older one.
pub async fn remember(store: &StoreService, key: &str, issued: &Issued) -> Result<(), StoreCallError> {
    let body = serde_json::to_vec(&Stored::of(issued)).map_err(|e| StoreCallError::Failed(e.to_string()))?;
    let record = Record { etag: new_etag(), class: 0, body };
    let put = Op::Put { table: Table::Challenges, key: key.to_string(), record, expect: Expect::Any, quota: None };
    match store.commit(Txn::one(put)).await? {
        Ok(_) => Ok(()),
        Err(e) => Err(StoreCallError::Failed(format!("{e:?}"))),
    }
}

/// Takes the challenge issued to a registration key, if one is there, unexpired and not taken
/// by another request first (then None: the answer is refused, as a replay is).
pub async fn take(store: &StoreService, key: &str, now_secs: i64) -> Option<Issued> {
    let found = match store.get(Table::Challenges, key).await {
        Ok(r) => r?,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a TPM challenge from the shared store");
            return None;
        }
    };
    let delete = Op::Delete { table: Table::Challenges, key: key.to_string(), expect: Expect::Etag(found.etag.clone()) };
    if !matches!(store.commit(Txn::one(delete)).await, Ok(Ok(_))) {
        return None;
    }
    let stored: Stored = serde_json::from_slice(&found.body).ok()?;
    stored.issued().filter(|c| c.expires_secs > now_secs)
}
