//! The registration machine: every device request, from every transport, is decided here,
//! without I/O. The host drives it in three steps:
//!
//! 1. [`Registrar::begin`] checks what needs no stored data (ID scope, registration id, SAS
//!    token syntax, resource and expiry, the register body, the operation id's shape) and says
//!    what it [`Needs`]: the individual enrollment, the registration state, the config snapshot.
//! 2. The host fetches those and calls [`Registrar::decide`], which attests the device against
//!    the enrollment list, spends rate budgets, computes the new registration state and returns
//!    a [`Decision`]: the write to commit (if any) and the [`Outcome`].
//! 3. The host commits the write; the outcome holds once it is durable (if the commit fails,
//!    the host answers with the failure instead). Each transport renders the outcome its way.
//!
//! Time comes in as arguments (`now` for token expiry and timestamps, `mono` nanoseconds for
//! rate limits) and randomness as [`Fresh`], so tests replay any sequence exactly.

pub mod admission;
pub mod attest;
mod outcome;
pub mod state;
#[cfg(test)]
mod tests;
pub mod x509;
#[cfg(test)]
mod x509_tests;

pub use outcome::{Outcome, Reply};
pub use state::{Matched, NO_HUB_ERROR, UNSUPPORTED_POLICY_ERROR};

use crate::device::{operation_id, operation_registration_key, parse_registration_body, DeviceRegistration};
use crate::error::{ErrorKind, ServiceError};
use crate::ids::{id_key, printable, validate_id};
use crate::model::*;
use crate::request::{device_resource, CertChain, Credential, DeviceRequest, Operation};
use crate::sas::{self, SasToken};
use crate::time::UtcTime;
use admission::Admission;
use std::collections::HashMap;

/// Enrollment groups and linked hubs as of one config generation, shared by every request a
/// shard decides until the service API changes them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// In store order: the first group whose key signs a token admits it.
    pub groups: Vec<EnrollmentGroup>,
    pub hubs: Vec<LinkedHub>,
    /// Connect time to each hub (µs) by lower-case name, for geoLatency.
    pub latency: HashMap<String, u64>,
    /// Verified CA certificates, for X.509 `caReferences`.
    pub verified_cas: x509::VerifiedCas,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub id_scope: String,
    pub limits: admission::Limits,
    /// Registration states the store may hold (a quota on the write).
    pub max_registrations: u64,
}

/// What the machine needs before it can decide, all keyed by [`Pending::key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// The individual enrollment for the registration id.
    pub enrollment: bool,
    /// The stored registration state.
    pub registration: bool,
    /// The [`Snapshot`] of groups and hubs.
    pub config: bool,
}

/// A request that passed the checks needing no stored data.
#[derive(Debug)]
pub struct Pending {
    /// The store key of the registration id (enrollment and registration state).
    pub key: String,
    pub needs: Needs,
    registration_id: String,
    proof: Proof,
    step: Step,
}

/// What the device proved its identity with.
#[derive(Debug)]
enum Proof {
    Token(SasToken),
    Certificate(CertChain),
}

#[derive(Debug)]
enum Step {
    Register(DeviceRegistration),
    OperationStatus(String),
    Lookup,
}

/// What the host fetched for [`Pending::needs`] (None: not stored).
pub struct Facts<'a> {
    pub enrollment: Option<&'a IndividualEnrollment>,
    pub registration: Option<&'a DeviceRegistrationState>,
    pub config: &'a Snapshot,
}

/// Randomness for a new registration state: its etag and the operation id's nonce.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub etag: String,
    pub nonce: u64,
}

/// A registration state to store, create or replace (the store keeps its by-group index).
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrationWrite {
    pub key: String,
    pub etag: String,
    pub state: DeviceRegistrationState,
    /// Fail with a quota error when this creates a record beyond this many.
    pub quota: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub write: Option<RegistrationWrite>,
    pub outcome: Outcome,
}

impl Decision {
    fn answer(outcome: Outcome) -> Decision {
        Decision { write: None, outcome }
    }
}

/// One shard's registration machine: the instance's settings and the shard's rate budgets.
#[derive(Debug)]
pub struct Registrar {
    settings: Settings,
    admission: Admission,
}

impl Registrar {
    pub fn new(settings: Settings, mono: u64) -> Registrar {
        Registrar { admission: Admission::new(settings.limits, mono), settings }
    }

    /// The checks that need no stored data; a refusal here costs no store read.
    pub fn begin(&self, req: DeviceRequest, now: UtcTime) -> Result<Pending, ServiceError> {
        if req.id_scope != self.settings.id_scope {
            return Err(ServiceError::unauthorized(format!("unknown ID scope '{}'", printable(&req.id_scope))));
        }
        validate_id("registrationId", &req.registration_id)?;
        let proof = match req.credential {
            Credential::SasToken(t) => {
                let token = sas::parse(&t).map_err(|e| ServiceError::unauthorized(e.reason()))?;
                token
                    .check_scope(&device_resource(&req.id_scope, &req.registration_id), now.unix_secs())
                    .map_err(|e| ServiceError::unauthorized(e.reason()))?;
                Proof::Token(token)
            }
            Credential::ClientCertificate(chain) => {
                x509::check_leaf(&chain, &req.registration_id)?;
                Proof::Certificate(chain)
            }
            Credential::TpmSasToken(_) => return Err(ServiceError::unauthorized("TPM attestation is not served yet")),
            Credential::None => return Err(ServiceError::unauthorized("no SAS token")),
        };
        let key = id_key(&req.registration_id);
        let step = match req.operation {
            Operation::Register { body } => {
                let reg = parse_registration_body(&body)?;
                if let Some(id) = reg.registration_id.as_deref().filter(|id| !id.eq_ignore_ascii_case(&req.registration_id)) {
                    return Err(ServiceError::invalid("registrationId in the body differs from the one the device authenticated as")
                        .because(format!("body names '{}'", printable(id))));
                }
                Step::Register(reg)
            }
            Operation::OperationStatus { operation_id } => {
                // Operation ids name their registration: another device's is simply unknown.
                if operation_registration_key(&operation_id).as_deref() != Some(key.as_str()) {
                    return Err(operation_not_found(&operation_id));
                }
                Step::OperationStatus(operation_id)
            }
            Operation::Lookup => Step::Lookup,
        };
        // Every operation attests against the enrollment list (a poller must still hold a key
        // that admits it), so each needs the enrollment, the state and the groups.
        let needs = Needs { enrollment: true, registration: true, config: true };
        Ok(Pending { key, needs, registration_id: req.registration_id, proof, step })
    }

    /// Attests, spends the rate budgets, and decides. `fresh` is called only when a new
    /// registration state is made (a register that passed attestation), so polls, lookups and
    /// refusals draw no randomness.
    pub fn decide(&mut self, p: Pending, facts: Facts<'_>, now: UtcTime, mono: u64, fresh: impl FnOnce() -> Fresh) -> Decision {
        match self.try_decide(p, facts, now, mono, fresh) {
            Ok(d) => d,
            Err(e) => Decision::answer(Outcome::Refused(e)),
        }
    }

    fn try_decide(
        &mut self,
        p: Pending,
        facts: Facts<'_>,
        now: UtcTime,
        mono: u64,
        fresh: impl FnOnce() -> Fresh,
    ) -> Result<Decision, ServiceError> {
        match p.step {
            Step::Register(reg) => {
                let (matched, x509) = admitting(&p.proof, &p.registration_id, &facts, now)?;
                self.admission.take_registration(mono)?;
                let fresh = fresh();
                let config = facts.config;
                let mut state = state::next_state(state::StateInputs {
                    matched,
                    linked: &config.hubs,
                    previous: facts.registration,
                    registration_id: &p.registration_id,
                    payload: reg.payload,
                    now,
                    etag: fresh.etag.clone(),
                    latency: &|hub: &str| config.latency.get(&hub.to_ascii_lowercase()).copied(),
                });
                state.x509 = x509;
                let operation_id = operation_id(fresh.nonce, &p.key);
                state.operation_id = Some(operation_id.clone());
                let write =
                    RegistrationWrite { key: p.key, etag: fresh.etag, state: state.clone(), quota: self.settings.max_registrations };
                Ok(Decision { write: Some(write), outcome: Outcome::Operation { operation_id, state } })
            }
            Step::OperationStatus(operation_id) => {
                let state = facts
                    .registration
                    .filter(|s| s.operation_id.as_deref() == Some(operation_id.as_str()))
                    .ok_or_else(|| operation_not_found(&operation_id))?;
                still_admitted(&p.proof, &p.registration_id, state, &facts, now)?;
                self.admission.take_poll(&p.key, mono)?;
                Ok(Decision::answer(Outcome::Operation { operation_id, state: state.clone() }))
            }
            Step::Lookup => {
                let state = facts.registration.ok_or_else(|| {
                    ServiceError::new(ErrorKind::RegistrationNotFound, "registration not found").because("no registration state")
                })?;
                still_admitted(&p.proof, &p.registration_id, state, &facts, now)?;
                Ok(Decision::answer(Outcome::Registration { state: state.clone() }))
            }
        }
    }
}

/// The enrollment that admits a registering device, by what it proved, and for X.509 what its
/// registration state reports.
fn admitting<'a>(
    proof: &Proof,
    registration_id: &str,
    facts: &Facts<'a>,
    now: UtcTime,
) -> Result<(Matched<'a>, Option<X509RegistrationResult>), ServiceError> {
    match proof {
        Proof::Token(t) => Ok((attest::admitting(t, registration_id, facts.enrollment, &facts.config.groups)?, None)),
        Proof::Certificate(chain) => {
            let a = x509::admitting(chain, facts.enrollment, &facts.config.groups, &facts.config.verified_cas, now)?;
            Ok((a.matched, Some(a.result)))
        }
    }
}

/// A device polling or looking up its registration must still be admitted by the enrollment
/// that admitted it.
fn still_admitted(
    proof: &Proof,
    registration_id: &str,
    state: &DeviceRegistrationState,
    facts: &Facts<'_>,
    now: UtcTime,
) -> Result<(), ServiceError> {
    let group = state.enrollment_group_id.as_deref();
    match proof {
        Proof::Token(t) => attest::still_admitted(t, registration_id, group, facts.enrollment, &facts.config.groups),
        Proof::Certificate(chain) => {
            let a = x509::admitting(chain, facts.enrollment, &facts.config.groups, &facts.config.verified_cas, now)
                .map_err(|e| ServiceError::unauthorized(format!("the certificate no longer matches the enrollment: {}", e.detail())))?;
            let same = match (a.matched, group) {
                (Matched::Individual(_), None) => true,
                (Matched::Group(g), Some(id)) => g.enrollment_group_id.eq_ignore_ascii_case(id),
                _ => false,
            };
            same.then_some(()).ok_or_else(|| ServiceError::unauthorized("the certificate now matches another enrollment"))
        }
    }
}

fn operation_not_found(operation_id: &str) -> ServiceError {
    ServiceError::new(ErrorKind::RegistrationNotFound, "operation not found")
        .because(format!("unknown operation '{}'", printable(operation_id)))
}

/// The answer when a decided write could not be committed because the quota is exhausted.
pub fn quota_exhausted() -> ServiceError {
    ServiceError::new(ErrorKind::QuotaExceeded, "the registration quota is exhausted").because("registration quota")
}
