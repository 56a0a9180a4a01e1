//! Device registration, shared by every device transport: authenticate the device's SAS token
//! against the enrollment list, allocate a hub, store the registration state durably, and
//! answer with a `RegistrationOperationStatus` (spec device-protocol.md §2.3, §6).

use crate::enrollment_cache::EnrollmentCache;
use crate::metrics::Metrics;
use crate::service::{new_etag, random_bytes, Service};
use crate::service_api::by_group_key;
use dps_core::device::{
    operation_id, operation_registration_key, parse_registration_body, DeviceRegistrationResult, OperationStatus, SymmetricKeyResult,
};
use dps_core::error::{error_body, ErrorKind, ServiceError};
use dps_core::ids::{id_key, printable, validate_id};
use dps_core::model::*;
use dps_core::rate::TokenBucket;
use dps_core::registration::{decide, device_resource, signed_with_any, signed_with_group, Decision, Matched};
use dps_core::sas;
use dps_core::time::UtcTime;
use dps_storage::{Expect, Op, Record, StoreCallError, Table, Txn};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// Enrollment groups and linked hubs as of one config generation.
struct Config {
    generation: u64,
    groups: Vec<EnrollmentGroup>,
    hubs: Vec<LinkedHub>,
    /// Connect time to each hub (µs) by lower-case name, for geoLatency.
    latency: HashMap<String, u64>,
}

/// A device answer: status (HTTP status, or the MQTT response topic's status), JSON body and,
/// for throttling, when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReply {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<u64>,
}

/// Why a device request failed (logged with the exact check; the device sees the DPS error).
struct Refusal {
    err: ServiceError,
    why: String,
    retry_after: Option<u64>,
}

fn refuse(kind: ErrorKind, message: &str, why: impl Into<String>) -> Refusal {
    Refusal { err: ServiceError::new(kind, message), why: why.into(), retry_after: None }
}

fn unauthorized(why: impl Into<String>) -> Refusal {
    refuse(ErrorKind::Unauthorized, "Unauthorized", why)
}

impl From<StoreCallError> for Refusal {
    fn from(e: StoreCallError) -> Refusal {
        match e {
            StoreCallError::Busy => Refusal {
                err: ServiceError::new(ErrorKind::Throttled, "the service is busy; retry later"),
                why: "store queue full".into(),
                retry_after: Some(1),
            },
            other => refuse(ErrorKind::Internal, "internal error; the registration was not recorded", other.to_string()),
        }
    }
}

/// One shard's device registration front: its share of the service-wide registration rate and
/// the polling limits of the devices that talk to it.
pub struct Provisioning {
    svc: Arc<Service>,
    enrollments: Rc<EnrollmentCache>,
    metrics: Rc<Metrics>,
    /// This shard's copy of the enrollment groups and linked hubs (few, read by every
    /// registration), valid while the service's config generation is unchanged.
    cache: RefCell<Option<Rc<Config>>>,
    registrations: RefCell<Option<TokenBucket>>,
    polls: RefCell<HashMap<String, TokenBucket>>,
    shard: usize,
}

/// What a device presented to authenticate.
pub struct DeviceAuth<'a> {
    pub id_scope: &'a str,
    pub registration_id: &'a str,
    pub token: Option<&'a str>,
    /// For metrics: `mqtt`, `mqtt-ws`, `https`.
    pub protocol: &'static str,
}

impl Provisioning {
    pub fn new(svc: Arc<Service>, enrollments: Rc<EnrollmentCache>, metrics: Rc<Metrics>, shard: usize, now_nanos: u64) -> Provisioning {
        let per_min = svc.limits.registrations_per_minute;
        let registrations = (per_min > 0).then(|| {
            let share = (per_min as f64 / svc.shards.max(1) as f64).max(1.0);
            TokenBucket::new(share, 60.0, share, now_nanos)
        });
        Provisioning {
            svc,
            enrollments,
            metrics,
            cache: RefCell::new(None),
            registrations: RefCell::new(registrations),
            polls: RefCell::new(HashMap::new()),
            shard,
        }
    }

    /// The answer, logged: one `device_operations` line per operation (a successful register
    /// logs its own line, with the hub).
    fn reply(&self, r: Result<(u16, String), Refusal>, now: UtcTime, what: &str, a: &DeviceAuth<'_>) -> DeviceReply {
        match r {
            Ok((status, body)) => {
                if what != "register" {
                    tracing::info!(target: "device_operations", shard = self.shard, protocol = a.protocol, operation = what,
                        registration_id = %printable(a.registration_id), status, "ok");
                }
                DeviceReply { status, body, retry_after: None }
            }
            Err(f) => {
                tracing::info!(target: "device_operations", shard = self.shard, protocol = a.protocol, operation = what,
                    registration_id = %printable(a.registration_id), status = f.err.kind.status(), error_code = f.err.kind.code(), reason = %f.why, "refused");
                let tracking = format!("{:016x}", u64::from_be_bytes(random_bytes::<8>()));
                DeviceReply { status: f.err.kind.status(), body: error_body(&f.err, &tracking, now), retry_after: f.retry_after }
            }
        }
    }

    /// Checks scope, id syntax and token (signature checked later against the enrollment).
    fn check_token(&self, a: &DeviceAuth<'_>, now: UtcTime) -> Result<sas::SasToken, Refusal> {
        if a.id_scope != self.svc.id_scope {
            return Err(unauthorized(format!("unknown ID scope '{}'", printable(a.id_scope))));
        }
        validate_id("registrationId", a.registration_id).map_err(|e| Refusal { why: e.message.clone(), err: e, retry_after: None })?;
        let token = sas::parse(a.token.ok_or_else(|| unauthorized("no SAS token"))?).map_err(|e| unauthorized(e.reason()))?;
        token.check_scope(&device_resource(a.id_scope, a.registration_id), now.unix_secs()).map_err(|e| unauthorized(e.reason()))?;
        Ok(token)
    }

    /// Handles a register request.
    pub async fn register(&self, a: DeviceAuth<'_>, body: &[u8], now: UtcTime, mono: u64) -> DeviceReply {
        let r = self.register_inner(&a, body, now, mono).await;
        if let Err(f) = &r {
            let p = ("protocol", a.protocol);
            if f.err.kind == ErrorKind::Unauthorized {
                self.metrics.inc("dps_attestation_attempts_total", &[p, ("attestation", "symmetricKey"), ("status", "failure")]);
            }
            self.metrics.inc("dps_registration_attempts_total", &[p, ("status", "failure")]);
        }
        self.reply(r, now, "register", &a)
    }

    async fn register_inner(&self, a: &DeviceAuth<'_>, body: &[u8], now: UtcTime, mono: u64) -> Result<(u16, String), Refusal> {
        let token = self.check_token(a, now)?;
        let reg = parse_registration_body(body).map_err(|e| Refusal { why: e.message.clone(), err: e, retry_after: None })?;
        if let Some(id) = reg.registration_id.as_deref().filter(|id| !id.eq_ignore_ascii_case(a.registration_id)) {
            return Err(refuse(
                ErrorKind::InvalidArgument,
                "registrationId in the body differs from the one the device authenticated as",
                format!("body names '{}'", printable(id)),
            ));
        }
        if let Some(b) = self.registrations.borrow_mut().as_mut() {
            if let Err(wait) = b.try_take(mono) {
                return Err(Refusal {
                    err: ServiceError::new(ErrorKind::Throttled, "registration rate limit exceeded"),
                    why: "service registration rate".into(),
                    retry_after: Some(wait),
                });
            }
        }
        let store = &self.svc.store;
        let key = id_key(a.registration_id);
        // The enrollment comes from its owner's cache partition, groups and hubs from this
        // shard's snapshot; only the registration state is read from the store.
        let (enrollment, registration) = futures::join!(self.enrollments.get(&key), store.get(Table::Registrations, &key));
        let individual: Option<IndividualEnrollment> = enrollment?.map(|r| parse(&r)).transpose()?;
        let previous: Option<DeviceRegistrationState> = registration?.map(|r| parse(&r)).transpose()?;
        let config = self.config().await?;
        // An individual enrollment for the id takes precedence over any group, even when disabled.
        let matched = match &individual {
            Some(e) => {
                let keys = e.common.attestation.symmetric_key.as_ref().map(|k| [k.primary_key.as_deref(), k.secondary_key.as_deref()]);
                match keys {
                    Some(k) if signed_with_any(&token, k) => Matched::Individual(e),
                    Some(_) => return Err(unauthorized("signature does not match the individual enrollment's keys")),
                    None => return Err(unauthorized("the individual enrollment does not use symmetric keys")),
                }
            }
            None => {
                let g = config
                    .groups
                    .iter()
                    .filter(|g| g.common.attestation.kind == AttestationType::SymmetricKey)
                    .find(|g| signed_with_group(&token, g, a.registration_id))
                    .ok_or_else(|| {
                        unauthorized("no enrollment admits this device (no individual enrollment; no group key signs the token)")
                    })?;
                Matched::Group(g)
            }
        };
        let linked = &config.hubs;
        let etag = new_etag();
        let mut state = decide(Decision {
            matched,
            linked,
            previous: previous.as_ref(),
            registration_id: a.registration_id,
            payload: reg.payload,
            now,
            etag: etag.clone(),
            latency: &|hub: &str| config.latency.get(&hub.to_ascii_lowercase()).copied(),
        });
        let op = operation_id(u64::from_be_bytes(random_bytes::<8>()), &key);
        state.operation_id = Some(op.clone());
        let body = serde_json::to_vec(&state).map_err(|e| refuse(ErrorKind::Internal, "internal error", e.to_string()))?;
        let mut ops = vec![Op::Put {
            table: Table::Registrations,
            key: key.clone(),
            record: Record { etag, class: 0, body },
            expect: Expect::Any,
            quota: Some(self.svc.limits.max_registrations),
        }];
        let old_group = previous.as_ref().and_then(|p| p.enrollment_group_id.as_deref());
        let new_group = state.enrollment_group_id.as_deref();
        if let Some(g) = old_group.filter(|g| Some(*g) != new_group) {
            ops.push(Op::Index { table: Table::RegistrationsByGroup, key: by_group_key(g, &key), present: false });
        }
        if let Some(g) = new_group {
            ops.push(Op::Index { table: Table::RegistrationsByGroup, key: by_group_key(g, &key), present: true });
        }
        match store.commit(Txn { ops }).await? {
            Ok(_) => {}
            Err(dps_storage::TxnError::QuotaExceeded) => {
                return Err(refuse(ErrorKind::QuotaExceeded, "the registration quota is exhausted", "registration quota"))
            }
            Err(e) => return Err(refuse(ErrorKind::Internal, "internal error", format!("{e:?}"))),
        }
        let p = ("protocol", a.protocol);
        self.metrics.inc("dps_attestation_attempts_total", &[p, ("attestation", "symmetricKey"), ("status", "success")]);
        let outcome = if state.status == RegistrationStatus::Assigned { "success" } else { state.status.as_str() };
        self.metrics.inc("dps_registration_attempts_total", &[p, ("status", outcome)]);
        if let (RegistrationStatus::Assigned, Some(hub)) = (state.status, state.assigned_hub.as_deref()) {
            self.metrics.inc("dps_device_assignments_total", &[("hub", hub)]);
        }
        tracing::info!(target: "device_operations", shard = self.shard, protocol = a.protocol, operation = "register", registration_id = %printable(a.registration_id),
            registration_status = state.status.as_str(), hub = state.assigned_hub.as_deref().unwrap_or(""), "registered");
        // The state is final at once (registry-only hubs), so the register request itself is
        // answered 200 with it: every SDK treats a 200 with a terminal status as done, which
        // saves the fixed 2 s the Python SDK waits after a 202.
        Ok((200, render_status(&op, state)))
    }

    /// Handles a registration status lookup (HTTP `POST /{idScope}/registrations/{id}`).
    pub async fn lookup(&self, a: DeviceAuth<'_>, now: UtcTime) -> DeviceReply {
        let r = self.lookup_inner(&a, now).await;
        self.reply(r, now, "lookup", &a)
    }

    async fn lookup_inner(&self, a: &DeviceAuth<'_>, now: UtcTime) -> Result<(u16, String), Refusal> {
        let token = self.check_token(a, now)?;
        let state: DeviceRegistrationState = match self.svc.store.get(Table::Registrations, &id_key(a.registration_id)).await? {
            Some(r) => parse(&r)?,
            None => return Err(refuse(ErrorKind::RegistrationNotFound, "registration not found", "no registration state")),
        };
        self.still_admitted(&token, a.registration_id, state.enrollment_group_id.as_deref()).await?;
        let symmetric_key = Some(SymmetricKeyResult { enrollment_group_id: state.enrollment_group_id.clone() });
        let result = DeviceRegistrationResult { state: state.public(), symmetric_key };
        Ok((200, serde_json::to_string(&result).unwrap_or_else(|_| "{}".into())))
    }

    /// The shard's groups and hubs, reloaded when the service API changed them.
    async fn config(&self) -> Result<Rc<Config>, Refusal> {
        let generation = self.svc.generation();
        if let Some(c) = self.cache.borrow().as_ref().filter(|c| c.generation == generation) {
            return Ok(c.clone());
        }
        let store = &self.svc.store;
        let groups = store.scan(Table::Groups, "", None, usize::MAX).await?.iter().map(|(_, r)| parse(r)).collect::<Result<_, _>>()?;
        let hubs = store.scan(Table::Hubs, "", None, usize::MAX).await?.iter().map(|(_, r)| parse(r)).collect::<Result<_, _>>()?;
        let latency = self.svc.hub_latency.read().map(|m| m.clone()).unwrap_or_default();
        let c = Rc::new(Config { generation, groups, hubs, latency });
        *self.cache.borrow_mut() = Some(c.clone());
        Ok(c)
    }

    /// Handles an operation status poll.
    pub async fn operation_status(&self, a: DeviceAuth<'_>, operation: &str, now: UtcTime, mono: u64) -> DeviceReply {
        let r = self.status_inner(&a, operation, now, mono).await;
        self.reply(r, now, "operation_status", &a)
    }

    async fn status_inner(&self, a: &DeviceAuth<'_>, operation: &str, now: UtcTime, mono: u64) -> Result<(u16, String), Refusal> {
        let token = self.check_token(a, now)?;
        let key = id_key(a.registration_id);
        self.check_poll_rate(&key, mono)?;
        let not_found =
            || refuse(ErrorKind::RegistrationNotFound, "operation not found", format!("unknown operation '{}'", printable(operation)));
        if operation_registration_key(operation).as_deref() != Some(key.as_str()) {
            return Err(not_found());
        }
        let state: DeviceRegistrationState = match self.svc.store.get(Table::Registrations, &key).await? {
            Some(r) => parse(&r)?,
            None => return Err(not_found()),
        };
        if state.operation_id.as_deref() != Some(operation) {
            return Err(not_found());
        }
        // The poller must still hold a key that admits it.
        self.still_admitted(&token, a.registration_id, state.enrollment_group_id.as_deref()).await?;
        Ok((200, render_status(operation, state)))
    }

    async fn still_admitted(&self, token: &sas::SasToken, registration_id: &str, group: Option<&str>) -> Result<(), Refusal> {
        let store = &self.svc.store;
        let ok = match group {
            None => match self.enrollments.get(&id_key(registration_id)).await? {
                Some(r) => {
                    let e: IndividualEnrollment = parse(&r)?;
                    e.common
                        .attestation
                        .symmetric_key
                        .as_ref()
                        .is_some_and(|k| signed_with_any(token, [k.primary_key.as_deref(), k.secondary_key.as_deref()]))
                }
                None => false,
            },
            Some(g) => match store.get(Table::Groups, &id_key(g)).await? {
                Some(r) => signed_with_group(token, &parse(&r)?, registration_id),
                None => false,
            },
        };
        if ok {
            Ok(())
        } else {
            Err(unauthorized("the token no longer matches the enrollment"))
        }
    }

    /// DPS limits a device to 5 status polls per 10 s (configurable).
    fn check_poll_rate(&self, key: &str, mono: u64) -> Result<(), Refusal> {
        let l = &self.svc.limits;
        if l.polls_per_device == 0 {
            return Ok(());
        }
        let mut polls = self.polls.borrow_mut();
        if polls.len() > 100_000 {
            // Buckets that have refilled completely carry no state worth keeping.
            polls.clear();
        }
        let n = l.polls_per_device as f64;
        let bucket = polls.entry(key.to_string()).or_insert_with(|| TokenBucket::new(n, l.poll_window_secs as f64, n, mono));
        bucket.try_take(mono).map_err(|wait| Refusal {
            err: ServiceError::new(ErrorKind::Throttled, "operation status polling limit exceeded"),
            why: "device polling rate".into(),
            retry_after: Some(wait),
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(r: &Record) -> Result<T, Refusal> {
    serde_json::from_slice(&r.body).map_err(|e| refuse(ErrorKind::Internal, "internal error", format!("stored record does not parse: {e}")))
}

/// `RegistrationOperationStatus` JSON for a state.
pub fn render_status(operation: &str, state: DeviceRegistrationState) -> String {
    let symmetric_key = Some(SymmetricKeyResult { enrollment_group_id: state.enrollment_group_id.clone() });
    let status = OperationStatus {
        operation_id: operation.to_string(),
        status: state.status,
        registration_state: Some(DeviceRegistrationResult { state: state.public(), symmetric_key }),
    };
    serde_json::to_string(&status).unwrap_or_else(|_| "{}".into())
}
