//! The driver of the core registration machine ([`dps_core::registration`]) for one shard: it
//! fetches what the machine needs (the individual enrollment from its owner's cache partition,
//! the registration state from the store, the shard's snapshot of groups and hubs), commits the
//! write the machine decides on, and records metrics and the log line. Every device transport
//! hands it a parsed [`DeviceRequest`] and renders the [`Reply`] it gets back.

use crate::clock::{mono_nanos, utc_now};
use crate::metrics::Metrics;
use crate::service::{new_etag, random_bytes, Service};
use crate::shard::enrollment_cache::EnrollmentCache;
use dps_core::error::{ErrorKind, ServiceError};
use dps_core::ids::printable;
use dps_core::model::*;
use dps_core::registration::admission::Limits;
use dps_core::registration::source_failures::SourceFailures;
use dps_core::registration::{
    quota_exhausted, Decision, Entropy, Facts, Fresh, Outcome, Registrar, RegistrationWrite, Reply, Settings, Snapshot,
};
use dps_core::request::{Credential, DeviceRequest, Operation};
use dps_core::tpm::book::Issued;
use dps_core::tpm::challenge::{Secrets, SECRETS_LEN};
use dps_core::tracking::TrackingIds;
use dps_storage::{Expect, Op, Record, Table, Txn, TxnError};
use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

/// The transport a request came over: names it in metrics and logs, and decides how a register
/// is answered (HTTPS: 202 and a poll; the others: the final state at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Mqtt,
    MqttWs,
    Amqp,
    AmqpWs,
    Https,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Mqtt => "mqtt",
            Via::MqttWs => "mqtt-ws",
            Via::Amqp => "amqp",
            Via::AmqpWs => "amqp-ws",
            Via::Https => "https",
        }
    }
}

/// The system's random source, drawn from only when the machine needs it.
struct SystemEntropy;

impl Entropy for SystemEntropy {
    fn fresh(&mut self) -> Fresh {
        Fresh { etag: new_etag(), nonce: u64::from_be_bytes(random_bytes::<8>()) }
    }
    fn tpm_secrets(&mut self) -> Secrets {
        Secrets::from_bytes(&random_bytes::<SECRETS_LEN>())
    }
}

/// At most this many open connections on a shard, its registration commits count as coming
/// from a lightly loaded caller ([`dps_storage::StoreService::commit_from_light_caller`]): the
/// others wait at most one fsync (tuning.md, "Inline commits at moderate load").
const LIGHT_LOAD_CONNECTIONS: usize = 4;

/// Seconds a device waits when the TPM challenge book is full.
const CHALLENGES_FULL_RETRY_SECS: u64 = 5;

pub struct Provisioning {
    svc: Arc<Service>,
    enrollments: Rc<EnrollmentCache>,
    metrics: Rc<Metrics>,
    tracking: Rc<TrackingIds>,
    registrar: RefCell<Registrar>,
    /// Failed attestations by source address (this shard's share of the budget).
    failures: RefCell<SourceFailures>,
    /// This shard's copy of the enrollment groups and linked hubs (few, read by every
    /// registration), valid while the service's config generation is unchanged.
    snapshot: RefCell<Option<Rc<Snapshot>>>,
    /// The shared store's config stamp the snapshot was read at (0 with a store of our own).
    snapshot_stamp: std::cell::Cell<u64>,
    shard: usize,
    /// The shard's open device connections: while they are few, its registrations commit on
    /// the shard itself when the store allows (`store.inline_commit_max_us`).
    open_connections: Rc<std::cell::Cell<usize>>,
}

impl Provisioning {
    pub fn new(
        svc: Arc<Service>,
        enrollments: Rc<EnrollmentCache>,
        metrics: Rc<Metrics>,
        tracking: Rc<TrackingIds>,
        shard: usize,
        open_connections: Rc<std::cell::Cell<usize>>,
    ) -> Self {
        let l = &svc.limits;
        // Each shard enforces its share of the service-wide rate; connections spread evenly
        // over SO_REUSEPORT listeners, so the sum is the configured rate.
        let share =
            if l.registrations_per_minute == 0 { 0.0 } else { (l.registrations_per_minute as f64 / svc.shards.max(1) as f64).max(1.0) };
        let settings = Settings {
            id_scope: svc.id_scope.clone(),
            limits: Limits { registrations_per_minute: share, polls_per_device: l.polls_per_device, poll_window_secs: l.poll_window_secs },
            max_registrations: l.max_registrations,
        };
        let registrar = RefCell::new(Registrar::new(settings, mono_nanos()));
        let failures = RefCell::new(SourceFailures::new(l.attestation_failures_per_source.div_ceil(svc.shards.max(1) as u64)));
        Provisioning {
            svc,
            enrollments,
            metrics,
            tracking,
            registrar,
            failures,
            snapshot: RefCell::new(None),
            snapshot_stamp: Default::default(),
            shard,
            open_connections,
        }
    }

    /// This instance's ID scope.
    pub fn id_scope(&self) -> &str {
        &self.svc.id_scope
    }

    /// Serves one device request from `source` to its answer.
    pub async fn handle(&self, req: DeviceRequest, via: Via, source: IpAddr) -> Reply {
        let operation = req.operation.name();
        let registration_id = printable(&req.registration_id);
        let http_register = via == Via::Https && matches!(req.operation, Operation::Register { .. });
        let attestation = match (&req.credential, &req.operation) {
            (Credential::ClientCertificate(_), _) => "x509",
            (Credential::Tpm(_), _) => "tpm",
            // HTTPS TPM devices name their keys in the register body.
            (_, Operation::Register { body }) if body.windows(5).any(|w| w == b"\"tpm\"") => "tpm",
            (Credential::SasToken(_) | Credential::None, _) => "symmetricKey",
        };
        let now = utc_now();
        let checked = if self.exempt(source) { Ok(()) } else { self.failures.borrow().check(source, mono_nanos()) };
        let decided = match checked {
            Ok(()) => self.decide(req, now).await,
            Err(e) => Err(e),
        };
        let outcome = decided.unwrap_or_else(Outcome::Refused);
        self.count_failure(&outcome, source);
        self.record(&outcome, operation, &registration_id, via, attestation);
        // Only error bodies carry a tracking id.
        let tracking = if outcome.refusal().is_some() { self.tracking.next() } else { String::new() };
        if http_register {
            outcome.http_register_reply(&tracking, now)
        } else {
            outcome.reply(&tracking, now)
        }
    }

    /// The AMQP SASL layer's TPM challenge for a device's keys: the blob to send and the
    /// challenge the connection keeps until the device answers. Any keys that parse are
    /// challenged; whether an enrollment admits the EK is decided when the register message
    /// arrives, and refused there with a Rejected outcome and the DPS error, as for a wrong
    /// symmetric key. A SASL `auth` outcome would leave Node's AMQP client hanging ("write after
    /// end", no callback), never failing.
    pub fn tpm_challenge(
        &self,
        registration_id: &str,
        endorsement_key: &[u8],
        storage_root_key: &[u8],
        via: Via,
    ) -> Result<(Vec<u8>, Issued), ServiceError> {
        let made = dps_core::registration::tpm::check_keys(endorsement_key, storage_root_key).and_then(|()| {
            dps_core::registration::tpm::challenge(endorsement_key, storage_root_key, SystemEntropy.tpm_secrets(), utc_now())
        });
        let outcome = match &made {
            Ok((authentication_key, issued)) => {
                Outcome::Challenge { authentication_key: authentication_key.clone(), issued: issued.clone() }
            }
            Err(e) => Outcome::Refused(e.clone()),
        };
        self.record(&outcome, "register", &printable(registration_id), via, "tpm");
        made
    }

    /// Logs and counts a TPM answer the AMQP SASL layer refused.
    pub fn refused_tpm_answer(&self, error: ServiceError, registration_id: &str, via: Via, source: IpAddr) {
        let outcome = Outcome::Refused(error);
        self.count_failure(&outcome, source);
        self.record(&outcome, "register", &printable(registration_id), via, "tpm");
    }

    /// Sources on the allow-list (factory lines behind NAT) have no failure budget.
    fn exempt(&self, source: IpAddr) -> bool {
        self.svc.limits.source_allow_list.contains(&source)
    }

    /// A refused credential spends one of its source's failures.
    fn count_failure(&self, outcome: &Outcome, source: IpAddr) {
        if !self.exempt(source) && outcome.refusal().is_some_and(|e| e.kind == ErrorKind::Unauthorized) {
            self.failures.borrow_mut().record(source, mono_nanos());
        }
    }

    /// Answers a request the transport could not even parse (logged like any refusal).
    pub fn refuse(&self, error: ServiceError, via: Via) -> Reply {
        let outcome = Outcome::Refused(error);
        self.record(&outcome, "invalid", "", via, "none");
        outcome.reply(&self.tracking.next(), utc_now())
    }

    async fn decide(&self, req: DeviceRequest, now: dps_core::time::UtcTime) -> Result<Outcome, ServiceError> {
        let pending = self.registrar.borrow().begin(req, now)?;
        let (needs, key) = (pending.needs, pending.key.clone());
        let store = &self.svc.store;
        // The records are KiB each: boxed as they are parsed, the joined futures and this
        // function's state hold pointers, not copies moved at every step (tuning.md, "Copies of
        // large futures").
        let enrollment = async {
            match needs.enrollment {
                true => self.enrollments.get(&key).await?.map(|r| r.parse::<IndividualEnrollment>().map(Box::new)).transpose(),
                false => Ok(None),
            }
        };
        let registration = async {
            match needs.registration {
                true => {
                    store.get(Table::Registrations, &key).await?.map(|r| r.parse::<DeviceRegistrationState>().map(Box::new)).transpose()
                }
                false => Ok(None),
            }
        };
        let snapshot = async {
            match needs.config {
                true => self.snapshot().await,
                false => Ok(Rc::new(Snapshot::default())),
            }
        };
        let challenge = async {
            match needs.challenge {
                true => self.enrollments.take_challenge(&key, now.unix_secs()).await,
                false => None,
            }
        };
        let (enrollment, registration, snapshot, challenge) = futures::join!(enrollment, registration, snapshot, challenge);
        let (enrollment, registration, snapshot): (Option<Box<IndividualEnrollment>>, Option<Box<DeviceRegistrationState>>, _) =
            (enrollment?, registration?, snapshot?);
        let facts = Facts {
            enrollment: enrollment.as_deref(),
            registration: registration.as_deref(),
            config: &snapshot,
            challenge: challenge.as_ref(),
        };
        // The machine's borrow ends here, before the commit's await (other requests on this
        // shard decide meanwhile).
        let decision = self.registrar.borrow_mut().decide(pending, facts, now, mono_nanos(), &mut SystemEntropy);
        let outcome = match decision {
            Decision::Answer(outcome) => outcome,
            Decision::Commit { write, operation_id, state } => {
                self.commit(write, &state).await?;
                Outcome::Operation { operation_id, state }
            }
        };
        // A registration whose hub must first take the device: start (or, after a restart,
        // resume) the hub task, and wait a little for it so the device is usually answered
        // `assigned` at once instead of polling.
        let outcome = match outcome {
            Outcome::Operation { operation_id, state } if state.has_pending_work() => {
                let state = self.hub_task(&key, state, &snapshot.hubs).await;
                Outcome::Operation { operation_id, state }
            }
            other => other,
        };
        // A challenge waits for the device's next request (HTTPS, maybe over another connection
        // and shard) with the owner of its registration id, where that request takes it.
        if let Outcome::Challenge { issued, .. } = &outcome {
            self.enrollments.remember_challenge(&key, issued.clone(), now.unix_secs()).await.map_err(|_| {
                ServiceError::new(ErrorKind::Unavailable, "too many TPM challenges outstanding").retry_after(CHALLENGES_FULL_RETRY_SECS)
            })?;
        }
        Ok(outcome)
    }

    /// Starts the hub task of an `assigning` state unless it already runs in this process, and
    /// waits up to `hub_wait_ms` for its end: the state then, or the one given.
    async fn hub_task(&self, key: &str, state: DeviceRegistrationState, hubs: &[LinkedHub]) -> DeviceRegistrationState {
        let Some(claim) = crate::hubs::run::claim(&self.svc, key) else { return state };
        let running = glommio::spawn_local(crate::hubs::run::run(claim, hubs.to_vec(), state.clone())).detach();
        let wait = glommio::timer::sleep(std::time::Duration::from_millis(self.svc.limits.hub_wait_ms));
        match futures::future::select(running, std::pin::pin!(wait)).await {
            futures::future::Either::Left((Some(Ok(done)), _)) => done,
            futures::future::Either::Left((Some(Err(e)), _)) => {
                tracing::warn!(registration_key = key, error = %e.detail(), "hub task ended without a commit");
                state
            }
            _ => state,
        }
    }

    /// Makes the decided registration state durable; the outcome holds only once it is.
    async fn commit(&self, w: RegistrationWrite, state: &DeviceRegistrationState) -> Result<(), ServiceError> {
        let body =
            serde_json::to_vec(state).map_err(|e| ServiceError::new(ErrorKind::Internal, "internal error").because(e.to_string()))?;
        let record = Record { etag: w.etag, class: 0, body };
        let op = Op::Put { table: Table::Registrations, key: w.key, record, expect: Expect::Any, quota: Some(w.quota) };
        // A shard with a few connections open has little to do while an fsync blocks it, so it
        // may commit itself even when the store is busy with other shards' commits; with more
        // open, only when the store is mostly idle (the writer's group commit shares fsyncs).
        let txn = Txn::one(op);
        let committed = if self.open_connections.get() <= LIGHT_LOAD_CONNECTIONS {
            self.svc.store.commit_from_light_caller(txn).await?
        } else {
            self.svc.store.commit(txn).await?
        };
        match committed {
            Ok(_) => Ok(()),
            Err(TxnError::QuotaExceeded) => Err(quota_exhausted()),
            Err(e) => Err(ServiceError::new(ErrorKind::Internal, "internal error").because(format!("registration write: {e:?}"))),
        }
    }

    /// The shard's groups and hubs, reloaded when the service API changed them.
    async fn snapshot(&self) -> Result<Rc<Snapshot>, ServiceError> {
        let generation = self.svc.generation();
        let store = &self.svc.store;
        // With a shared store, another node may have changed a group a moment ago and told its
        // operator so: the stamp is read first, so a snapshot is never older than it.
        let stamp = if self.svc.shared_store { store.config_stamp().await? } else { 0 };
        if let Some(c) = self.snapshot.borrow().as_ref().filter(|c| c.generation == generation && self.snapshot_stamp.get() == stamp) {
            return Ok(c.clone());
        }
        let groups = store.scan(Table::Groups, "", None, usize::MAX).await?.iter().map(|(_, r)| r.parse()).collect::<Result<_, _>>()?;
        let hubs = store.scan(Table::Hubs, "", None, usize::MAX).await?.iter().map(|(_, r)| r.parse()).collect::<Result<_, _>>()?;
        let mut verified_cas = std::collections::HashMap::new();
        for (_, r) in store.scan(Table::Certificates, "", None, usize::MAX).await? {
            let ca: dps_core::ca::StoredCa = r.parse()?;
            if ca.is_verified {
                verified_cas.insert(ca.name.to_ascii_lowercase(), ca.der()?);
            }
        }
        let latency = self.svc.hub_latency.read().map(|m| m.clone()).unwrap_or_default();
        let c = Rc::new(Snapshot { generation, groups, hubs, latency, verified_cas });
        *self.snapshot.borrow_mut() = Some(c.clone());
        self.snapshot_stamp.set(stamp);
        Ok(c)
    }

    /// Metrics and the one `device_operations` log line of a request.
    fn record(&self, outcome: &Outcome, operation: &'static str, registration_id: &str, via: Via, attestation: &'static str) {
        let protocol = ("protocol", via.name());
        let register = operation == "register";
        match outcome {
            Outcome::Refused(e) => {
                if register {
                    if e.kind == ErrorKind::Unauthorized {
                        self.metrics
                            .inc("dps_attestation_attempts_total", &[protocol, ("attestation", attestation), ("status", "failure")]);
                    }
                    self.metrics.inc("dps_registration_attempts_total", &[protocol, ("status", "failure")]);
                }
                tracing::info!(target: "device_operations", shard = self.shard, protocol = via.name(), operation, registration_id,
                    status = e.kind.status(), error_code = e.kind.code(), reason = %e.detail(), "refused");
            }
            Outcome::Operation { state, .. } if register => {
                self.metrics.inc("dps_attestation_attempts_total", &[protocol, ("attestation", attestation), ("status", "success")]);
                let status = if state.status == RegistrationStatus::Assigned { "success" } else { state.status.as_str() };
                self.metrics.inc("dps_registration_attempts_total", &[protocol, ("status", status)]);
                if let (RegistrationStatus::Assigned, Some(hub)) = (state.status, state.assigned_hub.as_deref()) {
                    self.metrics.inc("dps_device_assignments_total", &[("hub", hub)]);
                }
                tracing::info!(target: "device_operations", shard = self.shard, protocol = via.name(), operation, registration_id,
                    registration_status = state.status.as_str(), hub = state.assigned_hub.as_deref().unwrap_or(""), "registered");
            }
            Outcome::Challenge { .. } => {
                self.metrics.inc("dps_tpm_challenges_total", &[protocol]);
                tracing::info!(target: "device_operations", shard = self.shard, protocol = via.name(), operation, registration_id, status = 401u16, "challenged");
            }
            Outcome::Operation { .. } | Outcome::Registration { .. } => {
                tracing::info!(target: "device_operations", shard = self.shard, protocol = via.name(), operation, registration_id, status = 200u16, "ok");
            }
        }
    }
}
