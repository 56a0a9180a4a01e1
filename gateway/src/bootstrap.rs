//! First start and every start: the data dir, the data key, the store, the instance record
//! (ID scope and access policies), linked hubs from the config and the TLS material.

use crate::config::Config;
use crate::service::{random_bytes, random_key, InstanceRecord, StoredPolicy};
use crate::tls::certs::{self, CertFiles};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::model::{HubKind, LinkedHub};
use dps_core::rights::Rights;
use dps_storage::{DataKey, Expect, FjallStore, Op, Record, Store, Table, Txn};
use std::path::Path;

pub const OWNER_POLICY: &str = "provisioningserviceowner";

/// The data key comes from `DPS_DATA_KEY` (base64 of 32 bytes) or from `DIR/data.key`,
/// created with mode 0600 on first start.
pub fn data_key(dir: &Path, env_key: Option<String>) -> Result<DataKey, String> {
    let bytes: Vec<u8> = match env_key {
        Some(k) => B64.decode(k.trim()).map_err(|_| "DPS_DATA_KEY is not base64".to_string())?,
        None => {
            let path = dir.join("data.key");
            if !path.exists() {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                f.write_all(B64.encode(random_bytes::<32>()).as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                f.sync_all().map_err(|e| format!("cannot sync {}: {e}", path.display()))?;
            }
            // Also when the file was there already (copied by hand, restored from a backup).
            make_private(&path)?;
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            B64.decode(text.trim()).map_err(|_| format!("{} is not base64", path.display()))?
        }
    };
    let key: [u8; 32] = bytes.try_into().map_err(|_| "the data key must be 32 bytes".to_string())?;
    Ok(DataKey::new(&key))
}

/// Sets owner-only permissions (0600 on files, 0700 on directories), whatever they were.
pub fn make_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o700 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| format!("cannot restrict {}: {e}", path.display()))
}

/// Writes a file only its owner may read (a secret: keys, the owner connection string).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    make_private(path)?;
    f.write_all(data).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.sync_all().map_err(|e| format!("cannot sync {}: {e}", path.display()))
}

pub struct Prepared {
    pub store: FjallStore,
    pub instance: InstanceRecord,
    pub certs: CertFiles,
}

pub fn prepare(cfg: &Config, dir: &Path) -> Result<Prepared, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    // The data dir holds the data key, private keys and the owner's connection string.
    make_private(dir)?;
    let key = data_key(dir, std::env::var("DPS_DATA_KEY").ok())?;
    let store = FjallStore::open(&dir.join("store"), key, cfg.store.cache_mb << 20)
        .map_err(|e| format!("cannot open the store in {}: {e}", dir.display()))?;
    let instance = match store.get(Table::Meta, "service").map_err(|e| e.to_string())? {
        Some(r) => serde_json::from_slice(&r.body).map_err(|e| format!("instance record unreadable: {e}"))?,
        None => {
            let inst = InstanceRecord {
                id_scope: dps_core::ids::id_scope_from(random_bytes::<4>()),
                policies: vec![StoredPolicy {
                    key_name: OWNER_POLICY.into(),
                    primary_key: random_key(),
                    secondary_key: random_key(),
                    rights: Rights::ALL.render(),
                }],
            };
            let body = serde_json::to_vec(&inst).map_err(|e| e.to_string())?;
            let op = Op::Put {
                table: Table::Meta,
                key: "service".into(),
                record: Record { etag: crate::service::new_etag(), class: 0, body },
                expect: Expect::Absent,
                quota: None,
            };
            store
                .commit(vec![Txn::one(op)])
                .map_err(|e| e.to_string())?
                .remove(0)
                .map_err(|e| format!("cannot initialise the instance: {e:?}"))?;
            tracing::info!(id_scope = %inst.id_scope, "initialised a new service instance");
            inst
        }
    };
    // Hubs named in the config are (re)written on every start; ones added through the API stay.
    let mut txns = Vec::new();
    for h in &cfg.linked_hubs {
        let ca_cert = match &h.ca_cert {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("linked hub {}: ca_cert {}: {e}", h.host_name, p.display()))?),
            None => None,
        };
        let kind = match h.kind.as_deref() {
            Some(k) => Some(HubKind::parse(k).ok_or_else(|| format!("linked hub {}: unknown kind '{k}'", h.host_name))?),
            None => None,
        };
        let hub = LinkedHub {
            name: h.host_name.clone(),
            connection_string: h.connection_string.clone(),
            location: h.location.clone(),
            allocation_weight: h.allocation_weight,
            apply_allocation_policy: h.apply_allocation_policy,
            kind,
            control_url: h.control_url.clone(),
            username: h.username.clone(),
            password: h.password.clone(),
            ca_cert,
        };
        let hub = dps_core::validate::prepare_hub(hub, None).map_err(|e| format!("linked hub {}: {}", h.host_name, e.message))?;
        let body = serde_json::to_vec(&hub).map_err(|e| e.to_string())?;
        txns.push(Txn::one(Op::Put {
            table: Table::Hubs,
            key: dps_core::ids::id_key(&hub.name),
            record: Record { etag: crate::service::new_etag(), class: 0, body },
            expect: Expect::Any,
            quota: Some(cfg.limits.max_linked_hubs),
        }));
    }
    for r in store.commit(txns).map_err(|e| e.to_string())? {
        r.map_err(|e| format!("linked hubs from the config: {e:?}"))?;
    }
    let certs = certs::ensure(dir, &cfg.tls, &cfg.host_names)?;
    Ok(Prepared { store, instance, certs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn an_existing_data_key_file_is_made_private() {
        // Regression: only a newly created data.key was 0600; one copied in with 0644 stayed so.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.key");
        std::fs::write(&p, B64.encode([7u8; 32])).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        data_key(d.path(), None).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
