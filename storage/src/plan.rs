//! What one transaction does to the store, decided apart from any engine: its preconditions,
//! quotas, the by-group registration index and the per-class count changes. The fjall store
//! and the etcd store both apply what `plan` decides, so they agree on every rule.

use crate::record::{by_group_key, registration_group, Expect, Op, Record, Table, Txn, TxnError};
use crate::StoreError;
use std::collections::HashMap;

/// Writes in order: a value, or None for a delete.
pub(crate) type Staged = Vec<((Table, String), Option<Record>)>;

pub(crate) struct Plan {
    /// Each op's key's value before the transaction (the caller's answer).
    pub previous: Vec<Option<Record>>,
    pub staged: Staged,
    /// Count changes per (table, class), without the index table and without zeros.
    pub delta: HashMap<(Table, u8), i64>,
}

/// Plans `txn` against `current` (a key's value as the transaction starts) and `count` (records
/// of a class as it starts). Err(StoreError): a read failed; Ok(Err(_)): refused, nothing to write.
pub(crate) fn plan(
    txn: &Txn,
    mut current: impl FnMut(Table, &str) -> Result<Option<Record>, StoreError>,
    mut count: impl FnMut(Table, u8) -> Result<u64, StoreError>,
) -> Result<Result<Plan, TxnError>, StoreError> {
    let mut staged: Staged = Vec::new();
    let mut previous = Vec::with_capacity(txn.ops.len());
    let mut delta: HashMap<(Table, u8), i64> = HashMap::new();
    for op in &txn.ops {
        let (table, key) = match op {
            Op::Put { table, key, .. } | Op::Delete { table, key, .. } => (*table, key.as_str()),
        };
        // A key written earlier in the same transaction is seen as written.
        let now = match staged.iter().rev().find(|(k, _)| k.0 == table && k.1 == key) {
            Some((_, v)) => v.clone(),
            None => current(table, key)?,
        };
        let outcome: Result<Option<Record>, TxnError> = match op {
            Op::Put { record, expect, quota, .. } => match check(expect, now.as_ref()) {
                Err(e) => Err(e),
                Ok(()) => {
                    let grows_class = now.as_ref().is_none_or(|c| c.class != record.class);
                    let have = match (quota, grows_class) {
                        (Some(_), true) => count(table, record.class)? as i64 + delta.get(&(table, record.class)).copied().unwrap_or(0),
                        _ => 0,
                    };
                    match quota {
                        Some(q) if grows_class && have >= *q as i64 => Err(TxnError::QuotaExceeded),
                        _ => {
                            if let Some(c) = &now {
                                *delta.entry((table, c.class)).or_default() -= 1;
                            }
                            *delta.entry((table, record.class)).or_default() += 1;
                            Ok(Some(record.clone()))
                        }
                    }
                }
            },
            Op::Delete { expect, .. } => check(expect, now.as_ref()).map(|_| {
                if let Some(c) = &now {
                    *delta.entry((table, c.class)).or_default() -= 1;
                }
                None
            }),
        };
        match outcome {
            Ok(new) => {
                if table == Table::Registrations {
                    index_registration(&mut staged, key, now.as_ref(), new.as_ref());
                }
                previous.push(now);
                staged.push(((table, key.to_string()), new));
            }
            Err(e) => return Ok(Err(e)),
        }
    }
    delta.retain(|(t, _), d| *t != Table::RegistrationsByGroup && *d != 0);
    Ok(Ok(Plan { previous, staged, delta }))
}

/// The store owns the by-group index: a registration record written or deleted moves its entry
/// with it, so no caller can leave one behind.
fn index_registration(staged: &mut Staged, key: &str, old: Option<&Record>, new: Option<&Record>) {
    let (was, is) = (old.and_then(registration_group), new.and_then(registration_group));
    if was == is {
        return;
    }
    if let Some(g) = was {
        staged.push(((Table::RegistrationsByGroup, by_group_key(&g, key)), None));
    }
    if let Some(g) = is {
        staged
            .push(((Table::RegistrationsByGroup, by_group_key(&g, key)), Some(Record { etag: String::new(), class: 0, body: Vec::new() })));
    }
}

fn check(expect: &Expect, current: Option<&Record>) -> Result<(), TxnError> {
    match (expect, current) {
        (Expect::Any, _) => Ok(()),
        (Expect::Absent, None) => Ok(()),
        (Expect::Absent, Some(_)) => Err(TxnError::Conflict),
        (_, None) => Err(TxnError::NotFound),
        (Expect::Present, Some(_)) => Ok(()),
        (Expect::Etag(e), Some(r)) => {
            if dps_core::ids::etag_matches(e, &r.etag) {
                Ok(())
            } else {
                Err(TxnError::PreconditionFailed)
            }
        }
    }
}
