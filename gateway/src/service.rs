//! What every shard shares: the instance identity (ID scope, host names, access policies), the
//! store handle and the limits. Immutable after start-up, so shards read it without locks.

use crate::config::Limits;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::rights::Rights;
use dps_storage::StoreService;
use serde::{Deserialize, Serialize};

/// A shared access policy as stored (keys base64, as in connection strings).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredPolicy {
    pub key_name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: String,
}

/// The instance record kept in the store's `meta` table under `service`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRecord {
    pub id_scope: String,
    pub policies: Vec<StoredPolicy>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub key_name: String,
    pub primary: Vec<u8>,
    pub secondary: Vec<u8>,
    pub rights: Rights,
}

impl Policy {
    pub fn from_stored(p: &StoredPolicy) -> Result<Policy, String> {
        let key = |k: &str| B64.decode(k).map_err(|_| format!("policy {}: key is not base64", p.key_name));
        Ok(Policy {
            key_name: p.key_name.clone(),
            primary: key(&p.primary_key)?,
            secondary: key(&p.secondary_key)?,
            rights: Rights::parse(&p.rights).ok_or_else(|| format!("policy {}: unknown rights '{}'", p.key_name, p.rights))?,
        })
    }
}

pub struct Service {
    /// Bumped after every committed change to enrollment groups or linked hubs, so shards know
    /// their cached copies are stale before the change is acknowledged to the operator.
    pub config_generation: std::sync::atomic::AtomicU64,
    /// Measured connect time (µs) to each linked hub by lower-case name (see `latency`); read by
    /// shards only when they refresh their config snapshot.
    pub hub_latency: std::sync::RwLock<std::collections::HashMap<String, u64>>,
    pub id_scope: String,
    pub host_names: Vec<String>,
    pub policies: Vec<Policy>,
    pub store: StoreService,
    pub limits: Limits,
    pub shards: usize,
    /// Random per process start: the first part of every tracking id.
    pub boot: u32,
    /// Random per process start: the key of the hash that assigns enrollments to shards.
    pub shard_hash_key: (u64, u64),
    /// The threads hub connector steps run on.
    pub hub_workers: crate::hubs::workers::HubWorkers,
    /// Registration keys whose hub task runs in this process (`hubs::run::claim`).
    pub hub_tasks: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The store is shared with other nodes (etcd): their changes to groups, hubs and CA
    /// certificates are found by the store's config stamp, read before every use of a copy.
    pub shared_store: bool,
    /// Light load on one shard: the shards' CPU clocks and shard 0's decision.
    pub steering: crate::shard::steering::Steering,
}

impl Service {
    /// Registration keys of a group's devices (`group`: the group id), in key order, after
    /// `after`, at most `limit`: one page of the store's by-group index.
    pub async fn group_registrations(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, dps_storage::StoreCallError> {
        let prefix = dps_storage::by_group_key(group, "");
        let after = after.map(|a| format!("{prefix}{a}"));
        let rows = self.store.scan(dps_storage::Table::RegistrationsByGroup, &prefix, after.as_deref(), limit).await?;
        Ok(rows.into_iter().filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_string)).collect())
    }

    pub fn generation(&self) -> u64 {
        self.config_generation.load(std::sync::atomic::Ordering::Acquire)
    }
    pub fn bump_generation(&self) {
        self.config_generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Random bytes from the thread's CSPRNG (`rand`'s ChaCha12, seeded and periodically reseeded
/// from the system source): the same quality as a `getrandom` call each time, without a
/// syscall per draw (a registration draws a few; tuning.md).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    b
}

/// rustls's random source (server randoms, session ids, ticket values): [`random_bytes`]'s.
/// The key exchange and signature nonces stay with ring's own system source.
#[derive(Debug)]
pub struct ThreadRandom;

impl rustls::crypto::SecureRandom for ThreadRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        rand::RngCore::try_fill_bytes(&mut rand::thread_rng(), buf).map_err(|_| rustls::crypto::GetRandomFailed)
    }
}

/// A new base64 symmetric key of the length DPS generates.
pub fn random_key() -> String {
    B64.encode(random_bytes::<{ dps_core::validate::GENERATED_KEY_BYTES }>())
}

pub fn new_etag() -> String {
    dps_core::ids::etag_from(random_bytes::<16>())
}
