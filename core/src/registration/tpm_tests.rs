//! TPM attestation through the registration machine, with the HTTPS host's challenge book.
//! The device's side (activating the challenge in a TPM) runs against swtpm in the end-to-end
//! tests; here the "device" signs with K read from the issued challenge.

use super::tests::{no_limits, World};
use super::*;
use crate::request::TpmCredential;
use crate::sas;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;

const SCOPE: &str = "0ne0000000A";
const ID: &str = "tpm-dev-1";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The swtpm keys of the fixtures, and another TPM's (the test vector's).
fn keys() -> (Vec<u8>, Vec<u8>) {
    (fixture("ek.pub"), fixture("srk.pub"))
}

/// Another TPM's keys: the same structures around other moduli.
fn other_tpm() -> (Vec<u8>, Vec<u8>) {
    let (mut ek, mut srk) = keys();
    let (e, s) = (ek.len(), srk.len());
    ek[e - 1] ^= 0x55;
    srk[s - 1] ^= 0x55;
    (ek, srk)
}

fn world() -> World {
    let mut w = World::new(no_limits());
    w.enroll(json!({"registrationId": ID, "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(keys().0)}}}));
    w
}

fn body(ek: &[u8], srk: &[u8]) -> Vec<u8> {
    json!({"registrationId": ID, "tpm": {"endorsementKey": B64.encode(ek), "storageRootKey": B64.encode(srk)}}).to_string().into_bytes()
}

fn http(credential: Credential, operation: Operation) -> DeviceRequest {
    DeviceRequest { id_scope: SCOPE.into(), registration_id: ID.into(), credential, operation }
}

fn signed(key: &[u8], expiry: i64) -> String {
    sas::build(&crate::request::device_resource(SCOPE, ID), key, expiry, Some(TPM_KEY_NAME))
}

fn refused(o: &Outcome) -> (u16, u32) {
    let e = o.refusal().unwrap_or_else(|| panic!("not refused: {o:?}"));
    (e.kind.status(), e.kind.code())
}

/// The HTTPS device's first request: its keys, no token. Returns the blob and K.
fn ask(w: &mut World, ek: &[u8], srk: &[u8]) -> Result<(Vec<u8>, [u8; 32]), Box<Outcome>> {
    match w.run(http(Credential::None, Operation::Register { body: body(ek, srk) })) {
        Outcome::Challenge { authentication_key, issued } => Ok((authentication_key, issued.hmac_key)),
        other => Err(Box::new(other)),
    }
}

/// The HTTPS answer with a token signed by `key`, expiring `expires_in` seconds from now.
fn answer_signed(w: &mut World, key: &[u8], expires_in: i64) -> Outcome {
    let token = signed(key, w.now + expires_in);
    answer(w, token)
}

fn answer(w: &mut World, token: String) -> Outcome {
    let (ek, srk) = keys();
    w.run(http(Credential::SasToken(token), Operation::Register { body: body(&ek, &srk) }))
}

#[test]
fn https_challenge_then_signed_register_then_polls() {
    let mut w = world();
    let (ek, srk) = keys();
    let (blob, k) = ask(&mut w, &ek, &srk).unwrap();
    assert_eq!(blob.len(), 766);
    // Rendered as DPS does: 401 with the blob and the key name.
    let o = w.run(http(Credential::None, Operation::Register { body: body(&ek, &srk) }));
    let reply = o.reply("t", UtcTime::from_unix_secs(w.now));
    assert_eq!(reply.status, 401);
    let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(v["keyName"], "registration");
    assert_eq!(B64.decode(v["authenticationKey"].as_str().unwrap()).unwrap().len(), 766);
    assert!(w.writes.is_empty(), "a challenge writes nothing");
    // That second ask replaced the first challenge: a token signed with the first K fails.
    assert_eq!(refused(&answer_signed(&mut w, &k, 3600)), (401, 401002));

    let (_, k) = ask(&mut w, &ek, &srk).unwrap();
    let token = signed(&k, w.now + 3600);
    let o = answer(&mut w, token.clone());
    let Outcome::Operation { operation_id, state } = &o else { panic!("{o:?}") };
    assert_eq!(state.status, RegistrationStatus::Assigned);
    let secret = state.tpm.as_ref().unwrap();
    assert_eq!(B64.decode(&secret.hmac_key).unwrap(), k);
    let v: serde_json::Value = serde_json::from_str(&o.reply("t", UtcTime::from_unix_secs(w.now)).body).unwrap();
    let second = B64.decode(v["registrationState"]["tpm"]["authenticationKey"].as_str().unwrap()).unwrap();
    assert_eq!(second.len(), 766);
    assert_ne!(second, blob, "the second authenticationKey is wrapped afresh");
    assert!(v["registrationState"].get("symmetricKey").is_none() && v["registrationState"].get("_tpm").is_none(), "{v}");

    // Polls and lookups are signed with K.
    let poll = |t: String| http(Credential::SasToken(t), Operation::OperationStatus { operation_id: operation_id.clone() });
    assert!(matches!(w.run(poll(token.clone())), Outcome::Operation { .. }));
    assert!(matches!(w.run(http(Credential::SasToken(token.clone()), Operation::Lookup)), Outcome::Registration { .. }));
    assert_eq!(refused(&w.run(poll(signed(b"another key", w.now + 3600)))), (401, 401002));

    // A replayed answer finds no challenge: each is used once.
    assert_eq!(refused(&answer(&mut w, token.clone())), (401, 401002));

    // The enrollment's EK changed: the device's polls are no longer admitted.
    let other = other_tpm().0;
    w.enroll(json!({"registrationId": ID, "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(other)}}}));
    assert_eq!(refused(&w.run(poll(token))), (401, 401002));
}

#[test]
fn refusals() {
    let mut w = world();
    let (ek, srk) = keys();
    let (other_ek, other_srk) = other_tpm();
    // Another TPM under this registration id gets no challenge at all.
    assert_eq!(refused(&ask(&mut w, &other_ek, &other_srk).unwrap_err()), (401, 401002));
    // Keys that do not parse are the request's fault.
    assert_eq!(refused(&ask(&mut w, &ek[..100], &srk).unwrap_err()), (400, 400004));
    assert_eq!(refused(&ask(&mut w, &ek, &srk[1..]).unwrap_err()), (400, 400004));
    let not_b64 = json!({"tpm": {"endorsementKey": "!!", "storageRootKey": "AA=="}}).to_string().into_bytes();
    assert_eq!(refused(&w.run(http(Credential::None, Operation::Register { body: not_b64 }))), (400, 400004));
    // A tampered signature consumes the challenge and fails.
    let (_, k) = ask(&mut w, &ek, &srk).unwrap();
    let mut bad = k;
    bad[0] ^= 1;
    assert_eq!(refused(&answer_signed(&mut w, &bad, 3600)), (401, 401002));
    assert_eq!(refused(&answer_signed(&mut w, &k, 3600)), (401, 401002), "the challenge was used up");
    // An expired challenge.
    let (_, k) = ask(&mut w, &ek, &srk).unwrap();
    w.now += crate::tpm::book::CHALLENGE_SECS + 1;
    assert_eq!(refused(&answer_signed(&mut w, &k, 3600)), (401, 401002));
    // An expired token (its expiry judged on the injected clock).
    let (_, k) = ask(&mut w, &ek, &srk).unwrap();
    assert_eq!(refused(&answer_signed(&mut w, &k, -1)), (401, 401002));
    // TPM devices are not in groups, and a symmetric-key enrollment does not admit a TPM.
    let mut w = World::new(no_limits());
    assert_eq!(refused(&ask(&mut w, &ek, &srk).unwrap_err()), (401, 401002));
    w.enroll(json!({"registrationId": ID, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": B64.encode([7u8; 32])}}}));
    assert_eq!(refused(&ask(&mut w, &ek, &srk).unwrap_err()), (401, 401002));
    assert!(w.writes.is_empty());
}

#[test]
fn amqp_credentials_carry_their_challenge() {
    let mut w = world();
    let (ek, srk) = keys();
    let sasl = |answer| Credential::Tpm(Box::new(TpmCredential { endorsement_key: ek.clone(), storage_root_key: srk.clone(), answer }));
    // SASL asks through the same register path (no body: the keys come from SASL).
    let o = w.run(http(sasl(None), Operation::Register { body: Vec::new() }));
    let Outcome::Challenge { issued, .. } = o else { panic!("{o:?}") };
    w.challenges = crate::tpm::book::ChallengeBook::new(10); // the connection keeps it, not the book
    let now = UtcTime::from_unix_secs(w.now);
    let token = signed(&issued.hmac_key, w.now + 3600);
    tpm::verify_sasl_answer(&issued, &token, SCOPE, ID, now).unwrap();
    assert!(tpm::verify_sasl_answer(&issued, &signed(b"x", w.now + 3600), SCOPE, ID, now).is_err());
    assert!(tpm::verify_sasl_answer(&issued, &token, SCOPE, "another-id", now).is_err());
    let o = w.run(http(sasl(Some((token.clone(), issued.clone()))), Operation::Register { body: b"{}".to_vec() }));
    let Outcome::Operation { state, operation_id } = &o else { panic!("{o:?}") };
    assert_eq!(state.status, RegistrationStatus::Assigned);
    let poll = http(sasl(Some((token.clone(), issued.clone()))), Operation::OperationStatus { operation_id: operation_id.clone() });
    assert!(matches!(w.run(poll), Outcome::Operation { .. }));
    // A challenge issued for another endorsement key does not admit this one.
    let mut foreign = issued.clone();
    foreign.endorsement_key = other_tpm().0;
    let o = w.run(http(sasl(Some((signed(&foreign.hmac_key, w.now + 60), foreign))), Operation::Register { body: Vec::new() }));
    assert_eq!(refused(&o), (401, 401002));
    // Expired while the connection sat on it.
    w.now += crate::tpm::book::CHALLENGE_SECS + 1;
    let o = w.run(http(sasl(Some((signed(&issued.hmac_key, w.now + 60), issued))), Operation::Register { body: Vec::new() }));
    assert_eq!(refused(&o), (401, 401002));
}

/// The C SDK encodes the resource with lower-case `%2f`, Node and C# with `%2F`: the two sign
/// different bytes, and both verify (the token is checked over `sr` exactly as sent).
#[test]
fn both_encodings_of_the_resource_verify() {
    let mut w = world();
    let (ek, srk) = keys();
    for sep in ["%2f", "%2F"] {
        let (_, k) = ask(&mut w, &ek, &srk).unwrap();
        let sr = format!("{SCOPE}{sep}registrations{sep}{ID}");
        let se = w.now + 600;
        let sig = B64.encode(sas::sign(&k, &format!("{sr}\n{se}")));
        let sig = sig.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
        let token = format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn=registration");
        let o = answer(&mut w, token);
        assert!(matches!(o, Outcome::Operation { .. }), "{sep}: {o:?}");
    }
}

#[test]
fn disabled_enrollment_answers_disabled_after_the_proof() {
    let mut w = World::new(no_limits());
    let (ek, srk) = keys();
    w.enroll(json!({"registrationId": ID, "provisioningStatus": "disabled",
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(&ek)}}}));
    let (_, k) = ask(&mut w, &ek, &srk).unwrap();
    let o = answer_signed(&mut w, &k, 60);
    let Outcome::Operation { state, .. } = &o else { panic!("{o:?}") };
    assert_eq!(state.status, RegistrationStatus::Disabled);
}
