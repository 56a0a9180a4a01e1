//! The registration machine driven without sockets or a runtime: an in-memory "store" of
//! enrollments and states, a clock the test moves, and counted randomness.

use super::admission::Limits;
use super::*;
use crate::request::device_resource;
use crate::sas::{self, derive_device_key};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;

const SCOPE: &str = "0ne0000000A";
const SECOND: u64 = 1_000_000_000;
pub(super) const KEY_A: &[u8] = b"individual-key-A-individual-key-A";
pub(super) const KEY_B: &[u8] = b"individual-key-B-individual-key-B";
pub(super) const GROUP_1: &[u8] = b"group-one-key-group-one-key-group";
const GROUP_2: &[u8] = b"group-two-key-group-two-key-group";

/// Counted randomness: every draw differs from the last, and a run replays exactly.
#[derive(Default)]
pub(super) struct Counted {
    pub nonce: u64,
}

impl Entropy for Counted {
    fn fresh(&mut self) -> Fresh {
        self.nonce += 1;
        Fresh { etag: format!("\"etag-{}\"", self.nonce), nonce: self.nonce }
    }
    fn tpm_secrets(&mut self) -> crate::tpm::challenge::Secrets {
        self.nonce += 1;
        let n = self.nonce as u8;
        crate::tpm::challenge::Secrets::from_bytes(&std::array::from_fn(|i| n.wrapping_mul(31).wrapping_add(i as u8)))
    }
}

/// The host's part, in memory: enrollments, states, the groups and hubs, the HTTPS host's
/// challenge book, a clock the test moves.
pub(super) struct World {
    pub reg: Registrar,
    pub enrollments: HashMap<String, IndividualEnrollment>,
    pub states: HashMap<String, DeviceRegistrationState>,
    pub config: Snapshot,
    pub challenges: crate::tpm::book::ChallengeBook,
    /// Unix seconds.
    pub now: i64,
    pub mono: u64,
    pub entropy: Counted,
    /// Each commit: where, and the state stored.
    pub writes: Vec<(RegistrationWrite, DeviceRegistrationState)>,
}

pub(super) fn no_limits() -> Limits {
    Limits { registrations_per_minute: 0.0, polls_per_device: 0, poll_window_secs: 10 }
}

impl World {
    pub fn new(limits: Limits) -> World {
        let settings = Settings { id_scope: SCOPE.into(), limits, max_registrations: 1000 };
        World {
            reg: Registrar::new(settings, 0),
            enrollments: HashMap::new(),
            states: HashMap::new(),
            config: Snapshot { hubs: vec![hub("hub-a"), hub("hub-b")], ..Snapshot::default() },
            challenges: crate::tpm::book::ChallengeBook::new(100),
            now: 1_000_000,
            mono: 0,
            entropy: Counted::default(),
            writes: Vec::new(),
        }
    }

    pub fn enroll(&mut self, e: serde_json::Value) {
        let e: IndividualEnrollment = serde_json::from_value(e).unwrap();
        self.enrollments.insert(id_key(&e.registration_id), e);
    }

    pub fn group(&mut self, g: serde_json::Value) {
        self.config.groups.push(serde_json::from_value(g).unwrap());
    }

    pub fn run(&mut self, req: DeviceRequest) -> Outcome {
        let now = UtcTime::from_unix_secs(self.now);
        let p = match self.reg.begin(req, now) {
            Ok(p) => p,
            Err(e) => return Outcome::Refused(e),
        };
        assert_eq!(p.needs, Needs { enrollment: true, registration: true, config: true, challenge: p.needs.challenge });
        let key = p.key.clone();
        let challenge = if p.needs.challenge { self.challenges.take(&key, self.now) } else { None };
        let facts = Facts {
            enrollment: self.enrollments.get(&p.key),
            registration: self.states.get(&p.key),
            config: &self.config,
            challenge: challenge.as_ref(),
        };
        let d = self.reg.decide(p, facts, now, self.mono, &mut self.entropy);
        if let Decision::Answer(Outcome::Challenge { issued, .. }) = &d {
            self.challenges.remember(key, issued.clone(), self.now).unwrap();
        }
        match d {
            Decision::Answer(outcome) => outcome,
            Decision::Commit { write, operation_id, state } => {
                self.states.insert(write.key.clone(), state.clone());
                self.writes.push((write, state.clone()));
                Outcome::Operation { operation_id, state }
            }
        }
    }

    pub fn register(&mut self, id: &str, key: &[u8]) -> Outcome {
        self.run(request(id, Credential::SasToken(token(id, key, self.now + 3600)), Operation::Register { body: b"{}".to_vec() }))
    }

    pub fn poll(&mut self, id: &str, key: &[u8], operation_id: &str) -> Outcome {
        let op = Operation::OperationStatus { operation_id: operation_id.into() };
        self.run(request(id, Credential::SasToken(token(id, key, self.now + 3600)), op))
    }

    fn lookup(&mut self, id: &str, key: &[u8]) -> Outcome {
        self.run(request(id, Credential::SasToken(token(id, key, self.now + 3600)), Operation::Lookup))
    }
}

pub(super) fn hub(name: &str) -> LinkedHub {
    LinkedHub { name: name.into(), ..LinkedHub::default() }
}

pub(super) fn b64(k: &[u8]) -> String {
    B64.encode(k)
}

pub(super) fn device_key(group_key: &[u8], id: &str) -> Vec<u8> {
    B64.decode(derive_device_key(group_key, id)).unwrap()
}

pub(super) fn token(id: &str, key: &[u8], expiry: i64) -> String {
    sas::build(&device_resource(SCOPE, id), key, expiry, Some("registration"))
}

pub(super) fn request(id: &str, credential: Credential, operation: Operation) -> DeviceRequest {
    DeviceRequest { id_scope: SCOPE.into(), registration_id: id.into(), credential, operation }
}

pub(super) fn individual(id: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut e = json!({"registrationId": id, "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": b64(KEY_A), "secondaryKey": b64(KEY_B)}}});
    e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    e
}

pub(super) fn sym_group(id: &str, key: &[u8], extra: serde_json::Value) -> serde_json::Value {
    let mut g = json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": b64(key), "secondaryKey": b64(b"unused-secondary-unused-secondary")}}});
    g.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    g
}

fn refused(o: &Outcome) -> (u16, u32) {
    let e = o.refusal().unwrap_or_else(|| panic!("not refused: {o:?}"));
    (e.kind.status(), e.kind.code())
}

pub(super) fn state(o: &Outcome) -> &DeviceRegistrationState {
    match o {
        Outcome::Operation { state, .. } | Outcome::Registration { state } => state,
        Outcome::Refused(e) => panic!("refused: {e}"),
        Outcome::Challenge { .. } => panic!("challenged"),
    }
}

pub(super) fn operation(o: &Outcome) -> String {
    match o {
        Outcome::Operation { operation_id, .. } => operation_id.clone(),
        other => panic!("not an operation: {other:?}"),
    }
}

#[test]
fn admission_checks_before_any_store_read() {
    let mut w = World::new(no_limits());
    w.enroll(individual("dev1", json!({})));
    let good = token("dev1", KEY_A, w.now + 60);
    let reg = |c: Credential| request("dev1", c, Operation::Register { body: Vec::new() });

    let mut other_scope = reg(Credential::SasToken(good.clone()));
    other_scope.id_scope = "0ne00000000".into();
    let o = w.run(other_scope);
    assert_eq!(refused(&o), (401, 401002));
    assert!(o.refusal().unwrap().detail().contains("unknown ID scope"));
    assert_eq!(o.refusal().unwrap().message, "Unauthorized", "the device is not told why");

    let bad_id = request("dev 1!", Credential::SasToken(good.clone()), Operation::Lookup);
    assert_eq!(refused(&w.run(bad_id)), (400, 400004));
    assert_eq!(refused(&w.run(reg(Credential::None))), (401, 401002));
    assert_eq!(refused(&w.run(reg(Credential::SasToken("SharedAccessSignature nonsense".into())))), (401, 401002));
    assert_eq!(refused(&w.run(reg(Credential::SasToken(token("dev2", KEY_A, w.now + 60))))), (401, 401002), "token for another id");
    let not_a_certificate = Credential::ClientCertificate(std::sync::Arc::new(vec![b"garbage".to_vec()]));
    assert_eq!(refused(&w.run(reg(not_a_certificate))), (401, 401002));
    assert_eq!(refused(&w.run(reg(Credential::ClientCertificate(std::sync::Arc::new(Vec::new()))))), (401, 401002));
    let tpm = crate::request::TpmCredential { endorsement_key: vec![1], storage_root_key: vec![2], answer: None };
    assert_eq!(refused(&w.run(reg(Credential::Tpm(Box::new(tpm))))), (400, 400004), "keys that do not parse");

    // Expiry is judged on the injected clock.
    assert!(w.run(reg(Credential::SasToken(good.clone()))).refusal().is_none());
    w.now += 61;
    let expired = w.run(reg(Credential::SasToken(good)));
    assert_eq!(refused(&expired), (401, 401002));

    let t = token("dev1", KEY_A, w.now + 60);
    let body = |b: &[u8]| request("dev1", Credential::SasToken(t.clone()), Operation::Register { body: b.to_vec() });
    assert_eq!(refused(&w.run(body(b"{"))), (400, 400001));
    assert_eq!(refused(&w.run(body(br#"{"registrationId":"dev2"}"#))), (400, 400004));
    assert!(w.run(body(br#"{"registrationId":"DEV1","payload":{"a":1}}"#)).refusal().is_none(), "ids are case-insensitive");
    assert!(w.run(body(b"  ")).refusal().is_none(), "a blank body is an empty registration");
}

#[test]
fn individual_enrollment_takes_precedence_over_groups() {
    let mut w = World::new(no_limits());
    w.group(sym_group("g1", GROUP_1, json!({})));
    w.enroll(individual("both", json!({})));
    // The group's derived key would sign, but the individual enrollment decides.
    assert_eq!(refused(&w.register("both", &device_key(GROUP_1, "both"))), (401, 401002));
    let s = state(&w.register("both", KEY_B)).clone();
    assert_eq!((s.status, s.enrollment_group_id), (RegistrationStatus::Assigned, None));

    // Disabled individual: the device is told `disabled`, and no group admits it instead.
    w.enroll(individual("off", json!({"provisioningStatus": "disabled"})));
    assert_eq!(state(&w.register("off", KEY_A)).status, RegistrationStatus::Disabled);
    assert_eq!(refused(&w.register("off", &device_key(GROUP_1, "off"))), (401, 401002));

    // An individual enrollment of another attestation type blocks its id too.
    w.enroll(json!({"registrationId": "x509dev", "attestation": {"type": "x509",
        "x509": {"caReferences": {"primary": "ca"}}}}));
    assert_eq!(refused(&w.register("x509dev", &device_key(GROUP_1, "x509dev"))), (401, 401002));
}

#[test]
fn groups_admit_by_derived_key_in_store_order() {
    let mut w = World::new(no_limits());
    w.group(json!({"enrollmentGroupId": "certs", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "ca"}}}}));
    w.group(sym_group("g1", GROUP_1, json!({})));
    w.group(sym_group("g2", GROUP_2, json!({"provisioningStatus": "disabled"})));
    let s = state(&w.register("d1", &device_key(GROUP_1, "d1"))).clone();
    assert_eq!((s.status, s.enrollment_group_id.as_deref()), (RegistrationStatus::Assigned, Some("g1")));
    let s = state(&w.register("d2", &device_key(GROUP_2, "d2"))).clone();
    assert_eq!((s.status, s.enrollment_group_id.as_deref(), s.assigned_hub), (RegistrationStatus::Disabled, Some("g2"), None));
    // A group key used directly (not derived for the id) signs nothing.
    assert_eq!(refused(&w.register("d3", GROUP_1)), (401, 401002));
    assert_eq!(refused(&w.register("d3", &device_key(GROUP_1, "other"))), (401, 401002));
    // The rendered result names the group, the public state does not carry internals.
    let r = w.lookup("d1", &device_key(GROUP_1, "d1")).reply("t", UtcTime::from_unix_secs(0));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["symmetricKey"]["enrollmentGroupId"], "g1");
    assert!(v.get("_enrollmentGroupId").is_none() && v.get("_operationId").is_none(), "{v}");
}

#[test]
fn allocation_policies() {
    let mut w = World::new(no_limits());
    w.config.hubs = vec![hub("hub-a"), hub("hub-b"), hub("hub-c")];
    w.config.latency = [("hub-b".to_string(), 900), ("hub-c".to_string(), 300)].into();
    // Hashed: deterministic per id, spread over the hubs.
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let id = format!("h{i}");
        w.enroll(individual(&id, json!({"allocationPolicy": "hashed"})));
        let a = state(&w.register(&id, KEY_A)).assigned_hub.clone().unwrap();
        assert_eq!(state(&w.register(&id, KEY_A)).assigned_hub.as_deref(), Some(a.as_str()));
        seen.insert(a);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    w.enroll(individual("s", json!({"allocationPolicy": "static", "iotHubs": ["HUB-B"]})));
    assert_eq!(state(&w.register("s", KEY_A)).assigned_hub.as_deref(), Some("hub-b"));
    w.enroll(individual("geo", json!({"allocationPolicy": "geoLatency"})));
    assert_eq!(state(&w.register("geo", KEY_A)).assigned_hub.as_deref(), Some("hub-c"));
    w.enroll(individual("custom", json!({"allocationPolicy": "custom"})));
    let s = state(&w.register("custom", KEY_A)).clone();
    assert_eq!((s.status, s.error_code), (RegistrationStatus::Failed, Some(UNSUPPORTED_POLICY_ERROR)));
    w.enroll(individual("nowhere", json!({"iotHubs": ["hub-z"]})));
    let s = state(&w.register("nowhere", KEY_A)).clone();
    assert_eq!((s.status, s.error_code), (RegistrationStatus::Failed, Some(NO_HUB_ERROR)));
    // A failed or disabled registration is still a final answer, 200 with the state.
    assert_eq!(w.register("nowhere", KEY_A).reply("t", UtcTime::from_unix_secs(0)).status, 200);
}

#[test]
fn reprovision_policies() {
    let mut w = World::new(no_limits());
    w.enroll(individual("d", json!({"iotHubs": ["hub-a"]})));
    let first = state(&w.register("d", KEY_A)).clone();
    assert_eq!((first.assigned_hub.as_deref(), first.substatus), (Some("hub-a"), Some(Substatus::InitialAssignment)));
    w.now += 10;
    let moves =
        |migrate: bool| json!({"iotHubs": ["hub-b"], "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": migrate}});
    w.enroll(individual("d", moves(true)));
    let s = state(&w.register("d", KEY_A)).clone();
    assert_eq!((s.assigned_hub.as_deref(), s.substatus), (Some("hub-b"), Some(Substatus::DeviceDataMigrated)));
    assert_eq!(s.created_date_time_utc, first.created_date_time_utc, "created time survives");
    assert!(s.last_updated_date_time_utc > first.last_updated_date_time_utc);
    w.enroll(individual(
        "d",
        json!({"iotHubs": ["hub-a"], "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}}),
    ));
    let s = state(&w.register("d", KEY_A)).clone();
    assert_eq!((s.assigned_hub.as_deref(), s.substatus), (Some("hub-a"), Some(Substatus::DeviceDataReset)));
    w.enroll(individual(
        "d",
        json!({"iotHubs": ["hub-b"], "reprovisionPolicy": {"updateHubAssignment": false, "migrateDeviceData": true}}),
    ));
    assert_eq!(state(&w.register("d", KEY_A)).assigned_hub.as_deref(), Some("hub-a"), "never moves");
    // No policy given: DPS's default moves and migrates.
    w.enroll(individual("d", json!({"iotHubs": ["hub-b"]})));
    assert_eq!(state(&w.register("d", KEY_A)).substatus, Some(Substatus::DeviceDataMigrated));
}

#[test]
fn the_write_carries_the_state_the_device_is_told() {
    let mut w = World::new(no_limits());
    w.enroll(individual("d", json!({"deviceId": "renamed"})));
    let o = w.register("d", KEY_A);
    let (write, stored) = w.writes.last().unwrap().clone();
    assert_eq!((write.key.as_str(), write.quota, write.etag.as_str()), ("d", 1000, "\"etag-1\""));
    assert_eq!(&stored, state(&o));
    assert_eq!(stored.operation_id.as_deref(), Some(operation(&o).as_str()));
    assert_eq!(stored.device_id.as_deref(), Some("renamed"));
    // Refusals and reads write nothing.
    let n = w.writes.len();
    w.register("d", b"wrong");
    w.poll("d", KEY_A, &operation(&o));
    w.lookup("d", KEY_A);
    assert_eq!(w.writes.len(), n);
    // HTTPS renders the register as 202 assigning with the same operation id.
    let r = o.http_register_reply("t", UtcTime::from_unix_secs(0));
    assert_eq!((r.status, r.retry_after), (202, Some(1)));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["operationId"], operation(&o));
}

#[test]
fn operation_status_and_lookup() {
    let mut w = World::new(no_limits());
    w.enroll(individual("d", json!({})));
    w.enroll(individual("e", json!({})));
    assert_eq!(refused(&w.lookup("d", KEY_A)), (404, 404202));
    let op = operation(&w.register("d", KEY_A));
    let polled = w.poll("d", KEY_A, &op);
    assert_eq!(operation(&polled), op);
    assert_eq!(polled.reply("t", UtcTime::from_unix_secs(0)).status, 200);
    assert_eq!(state(&w.lookup("d", KEY_B)).assigned_hub, state(&polled).assigned_hub);
    // Another device's operation, a stale one and garbage are all unknown.
    let other = operation(&w.register("e", KEY_A));
    assert_eq!(refused(&w.poll("d", KEY_A, &other)), (404, 404202));
    assert_eq!(refused(&w.poll("d", KEY_A, "garbage")), (404, 404202));
    let newer = operation(&w.register("d", KEY_A));
    assert_eq!(refused(&w.poll("d", KEY_A, &op)), (404, 404202));
    assert!(w.poll("d", KEY_A, &newer).refusal().is_none());
    // A poller must still hold a key of the enrollment that admitted it.
    assert_eq!(refused(&w.poll("d", b"not-a-key", &newer)), (401, 401002));
    w.enroll(json!({"registrationId": "d", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": b64(b"rotated-rotated-rotated-rotated"), "secondaryKey": b64(KEY_B)}}}));
    assert_eq!(refused(&w.poll("d", KEY_A, &newer)), (401, 401002));
    assert!(w.poll("d", KEY_B, &newer).refusal().is_none());
    w.enrollments.clear();
    assert_eq!(refused(&w.lookup("d", KEY_B)), (401, 401002), "enrollment deleted");
    // Group devices are checked against their group.
    w.group(sym_group("g1", GROUP_1, json!({})));
    let gk = device_key(GROUP_1, "gd");
    let gop = operation(&w.register("gd", &gk));
    assert!(w.poll("gd", &gk, &gop).refusal().is_none());
    w.config.groups.clear();
    assert_eq!(refused(&w.poll("gd", &gk, &gop)), (401, 401002), "group deleted");
}

#[test]
fn rate_limits_on_the_injected_clock_spent_only_after_the_signature() {
    let limits = Limits { registrations_per_minute: 2.0, polls_per_device: 5, poll_window_secs: 10 };
    let mut w = World::new(limits);
    w.enroll(individual("d", json!({})));
    // Failed attestations spend nothing.
    for _ in 0..10 {
        assert_eq!(refused(&w.register("d", b"wrong")), (401, 401002));
    }
    let op = operation(&w.register("d", KEY_A));
    assert!(w.register("d", KEY_A).refusal().is_none());
    let o = w.register("d", KEY_A);
    assert_eq!(refused(&o), (429, 429001));
    let r = o.reply("t", UtcTime::from_unix_secs(0));
    assert_eq!(r.retry_after, Some(30));
    assert!(r.body.contains("\"trackingId\":\"t\""));
    w.mono += 30 * SECOND;
    let op = {
        let o = w.register("d", KEY_A);
        assert!(o.refusal().is_none(), "a token refilled after 30 s");
        let _ = op;
        operation(&o)
    };
    // Polls: five per ten seconds per device, wrong keys spend none.
    for _ in 0..3 {
        assert_eq!(refused(&w.poll("d", b"wrong", &op)), (401, 401002));
    }
    for _ in 0..5 {
        assert!(w.poll("d", KEY_A, &op).refusal().is_none());
    }
    let o = w.poll("d", KEY_A, &op);
    assert_eq!(refused(&o), (429, 429001));
    assert_eq!(o.refusal().unwrap().retry_after, Some(2));
    w.mono += 2 * SECOND;
    assert!(w.poll("d", KEY_A, &op).refusal().is_none());
}
