//! First start and every start: the data dir, the data key, the store, the instance record
//! (ID scope and access policies), linked hubs from the config and the TLS material.

use crate::config::Config;
use crate::service::{random_bytes, random_key, InstanceRecord, StoredPolicy};
use crate::tls::certs::{self, CertFiles};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::model::{HubKind, LinkedHub};
use dps_core::rights::Rights;
use dps_storage::{DataKey, EtcdConfig, EtcdStore, Expect, FjallStore, Op, Record, Store, Table, Txn, TxnError};
use std::path::Path;
use std::sync::Arc;

pub const OWNER_POLICY: &str = "provisioningserviceowner";

/// The data keys come from `DPS_DATA_KEY` or from `DIR/data.key` (created with mode 0600 on
/// first start): base64 of 32 bytes each, separated by commas or new lines. The first key
/// seals; the others only open values a rotation has not re-sealed yet.
pub fn data_key(dir: &Path, env_key: Option<String>) -> Result<DataKey, String> {
    let text = match env_key {
        Some(k) => k,
        None => {
            let path = dir.join(DATA_KEY_FILE);
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
            std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
        }
    };
    Ok(DataKey::ring(&parse_keys(&text)?))
}

pub const DATA_KEY_FILE: &str = "data.key";

fn parse_keys(text: &str) -> Result<Vec<[u8; 32]>, String> {
    let keys = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            let bytes = B64.decode(k).map_err(|_| "a data key is not base64".to_string())?;
            <[u8; 32]>::try_from(bytes).map_err(|_| "a data key must be 32 bytes".to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("no data key given".into());
    }
    Ok(keys)
}

/// What `dps rotate-data-key` did.
#[derive(Debug)]
pub struct Rotated {
    pub resealed: u64,
    /// The keys came from `DPS_DATA_KEY`, which should now hold its first key alone.
    pub from_env: bool,
}

/// Re-seals every stored value under a new data key, with the service stopped (the store's
/// lock refuses a running one). With `data.key`: a new key is generated and written first in
/// the file (before any value uses it), the store re-sealed, then the old keys removed; an
/// interrupted run leaves both keys in the file and can simply run again. With
/// `DPS_DATA_KEY`: the operator puts the new key first (`new,old`); everything is re-sealed
/// under it, and `DPS_DATA_KEY` can then hold the new key alone.
pub fn rotate_data_key(dir: &Path, env_key: Option<String>) -> Result<Rotated, String> {
    let store_dir = dir.join("store");
    if !store_dir.exists() {
        return Err(format!("no store in {}", dir.display()));
    }
    let (ring, file) = match env_key {
        Some(text) => {
            let keys = parse_keys(&text)?;
            if keys.len() < 2 {
                return Err("DPS_DATA_KEY holds one key: put the new key first and the old one after it (new,old)".into());
            }
            (keys, None)
        }
        None => {
            let path = dir.join(DATA_KEY_FILE);
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let mut keys = parse_keys(&text)?;
            keys.insert(0, key_with_an_id_of_its_own(&keys, random_bytes::<32>));
            (keys, Some(path))
        }
    };
    // The store's lock first: a running service must find data.key as it was.
    let store = FjallStore::open(&store_dir, DataKey::ring(&ring), 64 << 20).map_err(|e| match e {
        e if e.is_locked() => format!("the store in {} is in use: stop `dps serve` first", dir.display()),
        e => format!("cannot open the store in {}: {e}", dir.display()),
    })?;
    if file.is_some() {
        // Durable before any value is sealed under the new key.
        write_keys(dir, &ring)?;
    }
    let resealed = store.reseal().map_err(|e| format!("re-sealing stopped: {e}; run the command again to finish"))?;
    drop(store);
    if file.is_some() {
        write_keys(dir, &ring[..1])?;
    }
    Ok(Rotated { resealed, from_env: file.is_none() })
}

/// A new data key whose one-byte id no key in `keys` has, so the id alone tells which values
/// a rotation has re-sealed (the store checks by opening when ids collide, as they may with
/// keys from `DPS_DATA_KEY`).
fn key_with_an_id_of_its_own(keys: &[[u8; 32]], mut generate: impl FnMut() -> [u8; 32]) -> [u8; 32] {
    loop {
        let k = generate();
        if keys.iter().all(|old| DataKey::id_of(old) != DataKey::id_of(&k)) {
            return k;
        }
    }
}

/// Replaces `data.key` atomically (a new file, synced, renamed over the old, the directory
/// synced): a crash leaves the old file or the new one, never a torn one.
fn write_keys(dir: &Path, keys: &[[u8; 32]]) -> Result<(), String> {
    let text: String = keys.iter().map(|k| B64.encode(k) + "\n").collect();
    let tmp = dir.join(format!("{DATA_KEY_FILE}.new"));
    write_private(&tmp, text.as_bytes())?;
    let path = dir.join(DATA_KEY_FILE);
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// An ID scope as the SDKs take it: `0ne` and 8 hex digits, kept in DPS's upper case.
fn checked_id_scope(s: &str) -> Result<String, String> {
    let ok = s.len() == 11 && s[..3].eq_ignore_ascii_case("0ne") && s[3..].bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(format!("ID scope '{s}' must be 0ne and 8 hex digits, e.g. 0ne00000001"));
    }
    Ok(format!("0ne{}", s[3..].to_ascii_uppercase()))
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
    pub store: Arc<dyn Store>,
    /// Where the shared store is (`store.kind = "etcd"`), for the change watch.
    pub shared: Option<EtcdConfig>,
    pub instance: InstanceRecord,
    pub certs: CertFiles,
}

/// TLS to etcd from the `[store]` files: none without a CA file; a client certificate needs
/// its key and the reverse.
fn etcd_tls(k: &crate::config::StoreKnobs) -> Result<Option<dps_storage::EtcdTls>, String> {
    let read = |p: &Path, what: &str| std::fs::read(p).map_err(|e| format!("store.{what} {}: {e}", p.display()));
    let client = match (&k.etcd_cert_file, &k.etcd_key_file) {
        (Some(c), Some(key)) => Some((read(c, "etcd_cert_file")?, read(key, "etcd_key_file")?)),
        (None, None) => None,
        _ => return Err("store.etcd_cert_file and store.etcd_key_file go together".into()),
    };
    match &k.etcd_ca_file {
        Some(ca) => Ok(Some(dps_storage::EtcdTls { ca_pem: read(ca, "etcd_ca_file")?, client })),
        None if client.is_some() => Err("a client certificate for etcd needs store.etcd_ca_file".into()),
        None => Ok(None),
    }
}

pub fn prepare(cfg: &Config, dir: &Path) -> Result<Prepared, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    // The data dir holds the data key, private keys and the owner's connection string.
    make_private(dir)?;
    let key = data_key(dir, std::env::var("DPS_DATA_KEY").ok())?;
    let (store, shared): (Arc<dyn Store>, Option<EtcdConfig>) = match cfg.store.kind.as_str() {
        "fjall" => {
            let s = FjallStore::open(&dir.join("store"), key, cfg.store.cache_mb << 20)
                .map_err(|e| format!("cannot open the store in {}: {e}", dir.display()))?;
            (Arc::new(s), None)
        }
        "etcd" => {
            let ec = EtcdConfig {
                endpoints: cfg.store.etcd_endpoints.clone(),
                root: cfg.store.etcd_root.clone(),
                user: cfg.store.etcd_user.clone().zip(cfg.store.etcd_password.clone()),
                tls: etcd_tls(&cfg.store)?,
                ..Default::default()
            };
            let s = EtcdStore::connect(&ec, key).map_err(|e| format!("cannot reach etcd at {}: {e}", ec.endpoints.join(", ")))?;
            (Arc::new(s), Some(ec))
        }
        other => return Err(format!("store.kind must be \"fjall\" or \"etcd\", not \"{other}\"")),
    };
    let instance = instance(&*store, cfg, dir)?;
    let store_ref = &*store;
    // Hubs named in the config are (re)written on every start; ones added through the API stay.
    let txns = config_hubs(cfg)?;
    for r in store_ref.commit(txns).map_err(|e| e.to_string())? {
        r.map_err(|e| format!("linked hubs from the config: {e:?}"))?;
    }
    // Nodes sharing a store share its development CA (devices trust one CA whichever node they
    // reach); each node makes its own server certificates under it.
    if shared.is_some() && cfg.tls.ecdsa_cert.is_none() && cfg.tls.rsa_cert.is_none() {
        share_dev_ca(store_ref, dir, cfg)?;
    }
    let certs = certs::ensure(dir, &cfg.tls, &cfg.host_names)?;
    Ok(Prepared { store, shared, instance, certs })
}

/// The instance record (ID scope, access policies): the store's, or a new one. Another node
/// making one at the same moment wins or loses by the create's precondition; the loser reads
/// the winner's.
fn instance(store: &dyn Store, cfg: &Config, dir: &Path) -> Result<InstanceRecord, String> {
    let wanted_scope = cfg.id_scope.as_deref().map(checked_id_scope).transpose()?;
    let unreadable = |e: dps_storage::StoreError| match e {
        dps_storage::StoreError::Corrupt { .. } => format!(
            "the store's values do not open with this data key: a node joining a shared store needs the data key of the \
             others (copy their data.key into {}, or set DPS_DATA_KEY)",
            dir.display()
        ),
        e => e.to_string(),
    };
    let existing = store.get(Table::Meta, "service").map_err(unreadable)?;
    let inst = match existing {
        Some(r) => {
            let inst: InstanceRecord = serde_json::from_slice(&r.body).map_err(|e| format!("instance record unreadable: {e}"))?;
            if let Some(w) = wanted_scope.filter(|w| *w != inst.id_scope) {
                return Err(format!("{} holds the instance with ID scope {}, not {w}", dir.display(), inst.id_scope));
            }
            inst
        }
        None => {
            let inst = InstanceRecord {
                id_scope: wanted_scope.unwrap_or_else(|| dps_core::ids::id_scope_from(random_bytes::<4>())),
                policies: vec![StoredPolicy {
                    key_name: OWNER_POLICY.into(),
                    primary_key: random_key(),
                    secondary_key: random_key(),
                    rights: Rights::ALL.render(),
                }],
            };
            match create_meta(store, "service", &inst)? {
                Ok(_) => {}
                // Another node of a shared store initialised it first: join that one.
                Err(TxnError::Conflict) => return instance(store, cfg, dir),
                Err(e) => return Err(format!("cannot initialise the instance: {e:?}")),
            }
            tracing::info!(id_scope = %inst.id_scope, "initialised a new service instance");
            inst
        }
    };
    Ok(inst)
}

/// The linked hubs of the config file, as writes.
fn config_hubs(cfg: &Config) -> Result<Vec<Txn>, String> {
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
    Ok(txns)
}

/// The development CA of a shared store, in this node's data dir: the store's when it has one
/// (written over a CA this node made alone, whose server certificates are then made anew);
/// otherwise this node's, published for the others (the first node to publish wins).
fn share_dev_ca(store: &dyn Store, dir: &Path, cfg: &Config) -> Result<(), String> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct SharedCa {
        cert: String,
        key: String,
    }
    let certs_dir = dir.join("certs");
    for _ in 0..2 {
        if let Some(r) = store.get(Table::Meta, "dev-ca").map_err(|e| e.to_string())? {
            let ca: SharedCa = serde_json::from_slice(&r.body).map_err(|e| format!("shared CA record unreadable: {e}"))?;
            std::fs::create_dir_all(&certs_dir).map_err(|e| format!("cannot create {}: {e}", certs_dir.display()))?;
            if std::fs::read_to_string(certs_dir.join("ca.pem")).ok().as_deref() != Some(ca.cert.as_str()) {
                write_private(&certs_dir.join("ca.key"), ca.key.as_bytes())?;
                std::fs::write(certs_dir.join("ca.pem"), &ca.cert).map_err(|e| format!("cannot write the CA: {e}"))?;
                // Server certificates of another CA are made anew.
                let _ = std::fs::remove_file(certs_dir.join("hosts"));
            }
            return Ok(());
        }
        let files = certs::ensure(dir, &cfg.tls, &cfg.host_names)?;
        let read = |p: Option<&Path>| -> Result<String, String> {
            let p = p.ok_or("no CA file")?;
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let ca = SharedCa { cert: read(files.ca_cert.as_deref())?, key: read(Some(&certs_dir.join("ca.key")))? };
        match create_meta(store, "dev-ca", &ca)? {
            Ok(_) => return Ok(()),
            Err(TxnError::Conflict) => continue, // another node published first: take its CA
            Err(e) => return Err(format!("cannot publish the development CA: {e:?}")),
        }
    }
    Err("the development CA of the shared store could not be settled".into())
}

/// Creates the `Meta` record `key` unless it exists: the store's answer (a `Conflict` when
/// another node of a shared store created it first).
fn create_meta<T: serde::Serialize>(store: &dyn Store, key: &str, value: &T) -> Result<dps_storage::TxnResult, String> {
    let body = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    let record = Record { etag: crate::service::new_etag(), class: 0, body };
    let op = Op::Put { table: Table::Meta, key: key.into(), record, expect: Expect::Absent, quota: None };
    Ok(store.commit(vec![Txn::one(op)]).map_err(|e| e.to_string())?.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_rotation_key_never_shares_an_id_with_the_keys_it_replaces() {
        let old = [3u8; 32];
        assert_ne!(DataKey::id_of(&[200u8; 32]), DataKey::id_of(&old));
        // The generator's first key has the old key's id (it is the old key): it is passed over
        // for the next.
        let mut offered = [old, [200u8; 32]].into_iter();
        let mut calls = 0;
        let k = key_with_an_id_of_its_own(&[old], || {
            calls += 1;
            offered.next().unwrap()
        });
        assert_eq!((k, calls), ([200u8; 32], 2));
        assert_ne!(DataKey::id_of(&k), DataKey::id_of(&old));
    }

    #[test]
    fn keys_from_the_environment() {
        let (a, b) = (B64.encode([1u8; 32]), B64.encode([2u8; 32]));
        let d = tempfile::tempdir().unwrap();
        assert!(data_key(d.path(), Some(format!("{a}, {b}"))).is_ok());
        assert!(data_key(d.path(), Some(format!("{a},AAAA"))).unwrap_err().contains("32 bytes"));
        assert!(data_key(d.path(), Some(" ".into())).is_err());
        // Rotating from the environment needs the new key given first.
        std::fs::create_dir(d.path().join("store")).unwrap();
        assert!(rotate_data_key(d.path(), Some(a.clone())).unwrap_err().contains("new,old"));
        let r = rotate_data_key(d.path(), Some(format!("{b},{a}"))).unwrap();
        assert!(r.from_env);
        assert!(!d.path().join(DATA_KEY_FILE).exists(), "keys from the environment are never written");
    }

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
