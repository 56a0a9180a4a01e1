//! The registration machine: every device request, from every transport, is decided here,
//! without I/O. The host drives it in three steps:
//!
//! 1. [`Registrar::begin`] checks what needs no stored data (ID scope, registration id, SAS
//!    token syntax, resource and expiry, the register body, the operation id's shape) and says
//!    what it [`Needs`]: the individual enrollment, the registration state, the config snapshot.
//! 2. The host fetches those and calls [`Registrar::decide`], which attests the device against
//!    the enrollment list, spends rate budgets, computes the new registration state and returns
//!    a [`Decision`]: an [`Outcome`] to answer at once, or a registration state to commit
//!    first.
//! 3. The host commits that state; the operation in that state is the outcome once it is
//!    durable (if the commit fails, the host answers with the failure instead). Each transport
//!    renders the outcome its way.
//!
//! Time comes in as arguments (`now` for token expiry and timestamps, `mono` nanoseconds for
//! rate limits) and randomness as [`Fresh`], so tests replay any sequence exactly.

pub mod admission;
pub mod attest;
#[cfg(test)]
mod hub_tests;
mod outcome;
pub mod source_failures;
pub mod state;
#[cfg(test)]
mod tests;
pub mod tpm;
#[cfg(test)]
mod tpm_tests;
pub mod x509;
#[cfg(test)]
mod x509_tests;

pub use outcome::{Outcome, Reply, TPM_KEY_NAME};
pub use state::{Matched, NO_HUB_ERROR, UNSUPPORTED_POLICY_ERROR};

use crate::device::{operation_id, operation_registration_key, parse_registration_body, DeviceRegistration};
use crate::error::{ErrorKind, ServiceError};
use crate::ids::{id_key, printable, validate_id};
use crate::model::*;
use crate::request::{CertChain, Credential, DeviceRequest, Operation};
use crate::sas::SasToken;
use crate::time::UtcTime;
use crate::tpm::book::Issued;
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
    /// The TPM challenge issued to this registration id over HTTPS (taken: used once).
    pub challenge: bool,
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
    Tpm(TpmProof),
}

/// A TPM device's keys and its answer, if it has answered: the token, with the challenge when
/// the connection kept it (AMQP), or without (HTTPS: the host fetches it, [`Needs::challenge`]).
#[derive(Debug)]
struct TpmProof {
    endorsement_key: Vec<u8>,
    storage_root_key: Vec<u8>,
    answer: Option<(SasToken, Option<Issued>)>,
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
    /// The challenge the host took for [`Needs::challenge`].
    pub challenge: Option<&'a Issued>,
}

/// Randomness for a new registration state: its etag and the operation id's nonce.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub etag: String,
    pub nonce: u64,
}

/// Where the machine's randomness comes from; each is drawn only when it is used (polls,
/// lookups and refusals draw none).
pub trait Entropy {
    /// For a new registration state.
    fn fresh(&mut self) -> Fresh;
    /// For a TPM `authenticationKey`.
    fn tpm_secrets(&mut self) -> crate::tpm::challenge::Secrets;
}

/// Where and how a decided registration state is stored (create or replace; the store keeps its
/// by-group index).
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrationWrite {
    pub key: String,
    pub etag: String,
    /// Fail with a quota error when this creates a record beyond this many.
    pub quota: u64,
}

/// What the machine decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Answer with this; nothing to store.
    Answer(Outcome),
    /// Store `state` as `write` says, then answer `Outcome::Operation` with this operation id
    /// and that state: the device is told exactly what was stored.
    Commit { write: RegistrationWrite, operation_id: String, state: DeviceRegistrationState },
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
        // An HTTPS register with a `tpm` member is a TPM device's: without a token it asks for
        // a challenge, with one it answers it.
        let mut body = match &req.operation {
            Operation::Register { body } => Some(parse_registration_body(body)),
            Operation::OperationStatus { .. } | Operation::Lookup => None,
        };
        let tpm_keys = match body.as_ref().and_then(|b| b.as_ref().ok()).and_then(|b| b.tpm.as_ref()) {
            Some(t) => Some(tpm::keys_from_body(t)?),
            None => None,
        };
        let token = |t: &str| parse_token(t, &req.id_scope, &req.registration_id, now);
        let proof = match (req.credential, tpm_keys) {
            (Credential::Tpm(c), _) => {
                let answer = match c.answer {
                    Some((t, issued)) => Some((token(&t)?, Some(issued))),
                    None => None,
                };
                Proof::Tpm(TpmProof { endorsement_key: c.endorsement_key, storage_root_key: c.storage_root_key, answer })
            }
            (Credential::SasToken(t), Some((endorsement_key, storage_root_key))) => {
                Proof::Tpm(TpmProof { endorsement_key, storage_root_key, answer: Some((token(&t)?, None)) })
            }
            (Credential::None, Some((endorsement_key, storage_root_key))) => {
                Proof::Tpm(TpmProof { endorsement_key, storage_root_key, answer: None })
            }
            (Credential::SasToken(t), None) => Proof::Token(token(&t)?),
            (Credential::ClientCertificate(chain), _) => {
                x509::check_leaf(&chain, &req.registration_id)?;
                Proof::Certificate(chain)
            }
            (Credential::None, None) => return Err(ServiceError::unauthorized("no SAS token")),
        };
        if let Proof::Tpm(t) = &proof {
            tpm::check_keys(&t.endorsement_key, &t.storage_root_key)?;
        }
        let key = id_key(&req.registration_id);
        let step = match req.operation {
            Operation::Register { .. } => {
                let reg = body.take().unwrap_or_else(|| Ok(DeviceRegistration::default()))?;
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
        let challenge = matches!((&proof, &step), (Proof::Tpm(TpmProof { answer: Some((_, None)), .. }), Step::Register(_)));
        let needs = Needs { enrollment: true, registration: true, config: true, challenge };
        Ok(Pending { key, needs, registration_id: req.registration_id, proof, step })
    }

    /// Attests, spends the rate budgets, and decides.
    pub fn decide(&mut self, p: Pending, facts: Facts<'_>, now: UtcTime, mono: u64, entropy: &mut impl Entropy) -> Decision {
        match self.try_decide(p, facts, now, mono, entropy) {
            Ok(d) => d,
            Err(e) => Decision::Answer(Outcome::Refused(e)),
        }
    }

    fn try_decide(
        &mut self,
        p: Pending,
        facts: Facts<'_>,
        now: UtcTime,
        mono: u64,
        entropy: &mut impl Entropy,
    ) -> Result<Decision, ServiceError> {
        match p.step {
            Step::Register(reg) => {
                let (matched, x509, tpm) = match &p.proof {
                    Proof::Tpm(t) => {
                        let e = tpm::enrollment_for(&t.endorsement_key, facts.enrollment)?;
                        let Some((token, kept)) = &t.answer else {
                            let (authentication_key, issued) =
                                tpm::challenge(&t.endorsement_key, &t.storage_root_key, entropy.tpm_secrets(), now)?;
                            return Ok(Decision::Answer(Outcome::Challenge { authentication_key, issued }));
                        };
                        let issued = kept.as_ref().or(facts.challenge).ok_or_else(|| {
                            ServiceError::unauthorized("no TPM challenge is outstanding for this device (used, expired or never issued)")
                        })?;
                        tpm::verify_answer(issued, token, &t.endorsement_key, now)?;
                        (Matched::Individual(e), None, Some(tpm::registration_secret(issued, entropy.tpm_secrets())?))
                    }
                    _ => {
                        let (matched, x509) = admitting(&p.proof, &p.registration_id, &facts, now)?;
                        (matched, x509, None)
                    }
                };
                self.admission.take_registration(mono)?;
                let fresh = entropy.fresh();
                let config = facts.config;
                let auth = state::hub_auth(matched, &p.registration_id, x509.as_ref(), tpm.as_ref());
                let attestation = match (&p.proof, &x509) {
                    (Proof::Tpm(t), _) => {
                        use base64::Engine;
                        let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
                        ("tpm", serde_json::json!({"endorsementKey": b64(&t.endorsement_key), "storageRootKey": b64(&t.storage_root_key)}))
                    }
                    (_, Some(x)) => ("x509", serde_json::to_value(x).unwrap_or_default()),
                    _ => ("symmetricKey", serde_json::json!({})),
                };
                let mut state = state::next_state(state::StateInputs {
                    matched,
                    linked: &config.hubs,
                    previous: facts.registration,
                    registration_id: &p.registration_id,
                    payload: reg.payload,
                    now,
                    etag: fresh.etag.clone(),
                    latency: &|hub: &str| config.latency.get(&hub.to_ascii_lowercase()).copied(),
                    auth,
                    attestation,
                });
                state.x509 = x509;
                state.tpm = tpm;
                let operation_id = operation_id(fresh.nonce, &p.key);
                state.operation_id = Some(operation_id.clone());
                let write = RegistrationWrite { key: p.key, etag: fresh.etag, quota: self.settings.max_registrations };
                Ok(Decision::Commit { write, operation_id, state })
            }
            Step::OperationStatus(operation_id) => {
                let state = facts
                    .registration
                    .filter(|s| s.operation_id.as_deref() == Some(operation_id.as_str()))
                    .ok_or_else(|| operation_not_found(&operation_id))?;
                still_admitted(&p.proof, &p.registration_id, state, &facts, now)?;
                self.admission.take_poll(&p.key, mono)?;
                Ok(Decision::Answer(Outcome::Operation { operation_id, state: state.clone() }))
            }
            Step::Lookup => {
                let state = facts.registration.ok_or_else(|| {
                    ServiceError::new(ErrorKind::RegistrationNotFound, "registration not found").because("no registration state")
                })?;
                still_admitted(&p.proof, &p.registration_id, state, &facts, now)?;
                Ok(Decision::Answer(Outcome::Registration { state: state.clone() }))
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
        Proof::Tpm(_) => Err(ServiceError::unauthorized("a TPM device registers through its challenge")),
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
    if let Some(secret) = &state.tpm {
        return match proof {
            Proof::Token(t) | Proof::Tpm(TpmProof { answer: Some((t, _)), .. }) => tpm::still_admitted(t, secret, facts.enrollment),
            _ => Err(ServiceError::unauthorized("a TPM device signs with its TPM key")),
        };
    }
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
        Proof::Tpm(_) => Err(ServiceError::unauthorized("the registration is not a TPM device's")),
    }
}

/// A device's SAS token: its syntax, its resource (this device) and its expiry; the signature
/// is checked later, against the key of whatever enrollment or challenge it claims.
pub fn parse_token(token: &str, id_scope: &str, registration_id: &str, now: UtcTime) -> Result<SasToken, ServiceError> {
    let t = crate::sas::parse(token).map_err(|e| ServiceError::unauthorized(e.reason()))?;
    t.check_scope(&crate::request::device_resource(id_scope, registration_id), now.unix_secs())
        .map_err(|e| ServiceError::unauthorized(e.reason()))?;
    Ok(t)
}

fn operation_not_found(operation_id: &str) -> ServiceError {
    ServiceError::new(ErrorKind::RegistrationNotFound, "operation not found")
        .because(format!("unknown operation '{}'", printable(operation_id)))
}

/// The answer when a decided write could not be committed because the quota is exhausted.
pub fn quota_exhausted() -> ServiceError {
    ServiceError::new(ErrorKind::QuotaExceeded, "the registration quota is exhausted").because("registration quota")
}
