//! X.509 attestation through the registration machine, with chains made by rcgen: every
//! refusal the issue names, and the matching order.

use super::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;
use std::sync::Arc;

const SCOPE: &str = "0ne0000000A";
/// 2030-01-01, inside the default validity of the test certificates.
const NOW: i64 = 1_893_456_000;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
}

fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 12, 31);
    p
}

fn key(alg: &'static rcgen::SignatureAlgorithm) -> KeyPair {
    if alg == &rcgen::PKCS_RSA_SHA256 {
        use rsa::pkcs8::EncodePrivateKey;
        let k = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let pem = k.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        return KeyPair::from_pkcs8_pem_and_sign_algo(&pem, alg).unwrap();
    }
    KeyPair::generate_for(alg).unwrap()
}

fn ca_with(cn: &str, parent: Option<&Ca>, tweak: impl FnOnce(&mut CertificateParams)) -> Ca {
    let mut p = params(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    tweak(&mut p);
    let k = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let der = match parent {
        Some(parent) => p.signed_by(&k, &parent.issuer).unwrap().der().to_vec(),
        None => p.self_signed(&k).unwrap().der().to_vec(),
    };
    Ca { issuer: Issuer::new(p, k), der }
}

fn ca(cn: &str, parent: Option<&Ca>) -> Ca {
    ca_with(cn, parent, |_| {})
}

fn leaf_with(
    cn: &str,
    parent: Option<&Ca>,
    alg: &'static rcgen::SignatureAlgorithm,
    tweak: impl FnOnce(&mut CertificateParams),
) -> Vec<u8> {
    let mut p = params(cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    tweak(&mut p);
    let k = key(alg);
    match parent {
        Some(parent) => p.signed_by(&k, &parent.issuer).unwrap().der().to_vec(),
        None => p.self_signed(&k).unwrap().der().to_vec(),
    }
}

fn leaf(cn: &str, parent: Option<&Ca>) -> Vec<u8> {
    leaf_with(cn, parent, &rcgen::PKCS_ECDSA_P256_SHA256, |_| {})
}

fn b64(der: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(der)
}

struct World {
    reg: Registrar,
    enrollment: Option<IndividualEnrollment>,
    config: Snapshot,
    state: Option<DeviceRegistrationState>,
}

impl World {
    fn new() -> World {
        let limits = admission::Limits { registrations_per_minute: 0.0, polls_per_device: 0, poll_window_secs: 10 };
        let reg = Registrar::new(Settings { id_scope: SCOPE.into(), limits, max_registrations: 100 }, 0);
        let hub = LinkedHub { name: "hub-a".into(), ..LinkedHub::default() };
        World { reg, enrollment: None, config: Snapshot { hubs: vec![hub], ..Snapshot::default() }, state: None }
    }

    fn individual(&mut self, x509: serde_json::Value, extra: serde_json::Value) {
        let mut e = json!({"registrationId": "dev-1", "attestation": {"type": "x509", "x509": x509}});
        e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        self.enrollment = Some(serde_json::from_value(e).unwrap());
    }

    fn group(&mut self, id: &str, x509: serde_json::Value, extra: serde_json::Value) {
        let mut g = json!({"enrollmentGroupId": id, "attestation": {"type": "x509", "x509": x509}});
        g.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        self.config.groups.push(serde_json::from_value(g).unwrap());
    }

    fn run(&mut self, chain: &[&[u8]], operation: Operation) -> Outcome {
        let chain: CertChain = Arc::new(chain.iter().map(|c| c.to_vec()).collect());
        let req = DeviceRequest {
            id_scope: SCOPE.into(),
            registration_id: "dev-1".into(),
            credential: Credential::ClientCertificate(chain),
            operation,
        };
        let now = UtcTime::from_unix_secs(NOW);
        let p = match self.reg.begin(req, now) {
            Ok(p) => p,
            Err(e) => return Outcome::Refused(e),
        };
        let facts =
            Facts { enrollment: self.enrollment.as_ref(), registration: self.state.as_ref(), config: &self.config, challenge: None };
        let d = self.reg.decide(p, facts, now, 0, &mut super::tests::Counted::default());
        match d {
            Decision::Answer(outcome) => outcome,
            Decision::Commit { operation_id, state, .. } => {
                self.state = Some(state.clone());
                Outcome::Operation { operation_id, state }
            }
        }
    }

    fn register(&mut self, chain: &[&[u8]]) -> Outcome {
        self.run(chain, Operation::Register { body: Vec::new() })
    }
}

fn refusal(o: &Outcome) -> String {
    let e = o.refusal().unwrap_or_else(|| panic!("not refused: {o:?}"));
    assert_eq!((e.kind.status(), e.kind.code()), (401, 401002), "{e:?}");
    e.detail().to_string()
}

fn assigned(o: &Outcome) -> &DeviceRegistrationState {
    match o {
        Outcome::Operation { state, .. } if state.status == RegistrationStatus::Assigned => state,
        other => panic!("not assigned: {other:?}"),
    }
}

#[test]
fn individual_enrollments_by_the_device_certificate() {
    let mut w = World::new();
    let mine = leaf("dev-1", None);
    let other = leaf("dev-1", None);
    w.individual(
        json!({"clientCertificates": {"primary": {"certificate": b64(&other)}, "secondary": {"certificate": b64(&mine)}}}),
        json!({}),
    );
    let o = w.register(&[&mine]);
    let s = assigned(&o);
    let x = s.x509.as_ref().unwrap();
    assert_eq!((x.enrollment_group_id.as_deref(), x.signing_certificate_info.is_none()), (None, true));
    assert!(x.certificate_info.subject_name.contains("dev-1"));
    // Rendered with `x509`, not `symmetricKey`.
    let v: serde_json::Value = serde_json::from_str(&o.reply("t", UtcTime::from_unix_secs(NOW)).body).unwrap();
    assert!(v["registrationState"]["x509"]["certificateInfo"]["sha256Thumbprint"].is_string(), "{v}");
    assert!(v["registrationState"].get("symmetricKey").is_none() && v["registrationState"].get("_x509").is_none(), "{v}");
    // A poll with the same certificate is answered; the lookup too.
    let Outcome::Operation { operation_id, .. } = o else { unreachable!() };
    assert!(w.run(&[&mine], Operation::OperationStatus { operation_id }).refusal().is_none());
    assert!(w.run(&[&mine], Operation::Lookup).refusal().is_none());
    // Another certificate with the same CN is not the enrolled one.
    assert!(refusal(&w.register(&[&leaf("dev-1", None)])).contains("not the individual enrollment's"));
    assert!(w.run(&[&leaf("dev-1", None)], Operation::Lookup).refusal().is_some());
}

#[test]
fn individual_certificate_refusals() {
    let mut w = World::new();
    let expired = leaf_with("dev-1", None, &rcgen::PKCS_ECDSA_P256_SHA256, |p| p.not_after = rcgen::date_time_ymd(2025, 1, 1));
    let early = leaf_with("dev-1", None, &rcgen::PKCS_ECDSA_P256_SHA256, |p| p.not_before = rcgen::date_time_ymd(2040, 1, 1));
    let a_ca = ca("dev-1", None).der;
    for (cert, why) in [(&expired, "expired"), (&early, "not valid yet"), (&a_ca, "a CA certificate")] {
        w.individual(json!({"clientCertificates": {"primary": {"certificate": b64(cert)}}}), json!({}));
        assert!(refusal(&w.register(&[cert])).contains(why), "{why}");
    }
    // The CN must be the registration id, before any enrollment is looked at.
    assert!(refusal(&w.register(&[&leaf("someone-else", None)])).contains("CN"));
    // An individual enrollment of another attestation type blocks the id for certificates.
    w.enrollment = Some(
        serde_json::from_value(json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": "AAAAAAAAAAAAAAAAAAAAAA==", "secondaryKey": "AAAAAAAAAAAAAAAAAAAAAA=="}}}))
        .unwrap(),
    );
    let root = ca("root", None);
    w.group("g", json!({"signingCertificates": {"primary": {"certificate": b64(&root.der)}}}), json!({}));
    assert!(refusal(&w.register(&[&leaf("dev-1", Some(&root))])).contains("does not use X.509"));
}

#[test]
fn groups_match_from_the_first_certificate_above_the_leaf() {
    let mut w = World::new();
    let root = ca("root", None);
    let inter = ca("intermediate", Some(&root));
    let dev = leaf("dev-1", Some(&inter));
    // Enrolled by the root only: the chain leaf + intermediate reaches it.
    w.group("by-root", json!({"signingCertificates": {"primary": {"certificate": b64(&root.der)}}}), json!({}));
    let o = w.register(&[&dev, &inter.der]);
    let x = assigned(&o).x509.clone().unwrap();
    assert_eq!(x.enrollment_group_id.as_deref(), Some("by-root"));
    assert_eq!(x.signing_certificate_info.unwrap().subject_name, "CN=root");
    assert_eq!(assigned(&o).enrollment_group_id.as_deref(), Some("by-root"));
    // A group holding the intermediate comes first: it is nearer the leaf.
    w.group("by-intermediate", json!({"signingCertificates": {"primary": {"certificate": b64(&inter.der)}}}), json!({}));
    let o = w.register(&[&dev, &inter.der]);
    assert_eq!(assigned(&o).enrollment_group_id.as_deref(), Some("by-intermediate"));
    // A poll still matched to the group that admitted it; when that group goes, it is refused.
    let Outcome::Operation { operation_id, .. } = o else { unreachable!() };
    assert!(w.run(&[&dev, &inter.der], Operation::OperationStatus { operation_id: operation_id.clone() }).refusal().is_none());
    w.config.groups.retain(|g| g.enrollment_group_id != "by-intermediate");
    assert!(refusal(&w.run(&[&dev, &inter.der], Operation::OperationStatus { operation_id })).contains("another enrollment"));
    // The first match decides even when disabled; an enabled group above it does not help.
    w.group(
        "off",
        json!({"signingCertificates": {"primary": {"certificate": b64(&inter.der)}}}),
        json!({"provisioningStatus": "disabled"}),
    );
    let o = w.register(&[&dev, &inter.der]);
    let Outcome::Operation { state, .. } = &o else { panic!("{o:?}") };
    assert_eq!((state.status, state.enrollment_group_id.as_deref()), (RegistrationStatus::Disabled, Some("off")));
}

#[test]
fn chain_refusals() {
    let mut w = World::new();
    let root = ca("root", None);
    let inter = ca("intermediate", Some(&root));
    w.group("g", json!({"signingCertificates": {"primary": {"certificate": b64(&root.der)}}}), json!({}));
    // Truncated: the intermediate is not sent and cannot be assumed.
    assert!(refusal(&w.register(&[&leaf("dev-1", Some(&inter))])).contains("no enrollment"));
    // Another CA.
    let other_root = ca("root", None);
    let other_inter = ca("intermediate", Some(&other_root));
    assert!(refusal(&w.register(&[&leaf("dev-1", Some(&other_inter)), &other_inter.der])).contains("no enrollment"));
    // An unknown self-signed certificate.
    assert!(refusal(&w.register(&[&leaf("dev-1", None)])).contains("no enrollment"));
    // Matched by presence (the group holds the intermediate) but then invalid on the path.
    w.group("by-inter", json!({"signingCertificates": {"primary": {"certificate": b64(&inter.der)}}}), json!({}));
    let expired = leaf_with("dev-1", Some(&inter), &rcgen::PKCS_ECDSA_P256_SHA256, |p| p.not_after = rcgen::date_time_ymd(2025, 1, 1));
    assert!(refusal(&w.register(&[&expired, &inter.der])).contains("Expired"));
    let early = leaf_with("dev-1", Some(&inter), &rcgen::PKCS_ECDSA_P256_SHA256, |p| p.not_before = rcgen::date_time_ymd(2040, 1, 1));
    assert!(refusal(&w.register(&[&early, &inter.der])).contains("NotValidYet"));
    let server_only = leaf_with("dev-1", Some(&inter), &rcgen::PKCS_ECDSA_P256_SHA256, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    assert!(w.register(&[&server_only, &inter.der]).refusal().is_some(), "a certificate not for client authentication");
    let device_ca = ca_with("dev-1", Some(&inter), |_| {});
    assert!(refusal(&w.register(&[&device_ca.der, &inter.der])).contains("CaUsedAsEndEntity"));
    // Path length: a root allowing no intermediate.
    let strict = ca_with("strict-root", None, |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
    let under = ca("under-strict", Some(&strict));
    w.group("strict", json!({"signingCertificates": {"primary": {"certificate": b64(&strict.der)}}}), json!({}));
    assert!(w.register(&[&leaf("dev-1", Some(&under)), &under.der]).refusal().is_some(), "path length 0 violated");
    // An expired intermediate.
    let old = ca_with("old-intermediate", Some(&root), |p| p.not_after = rcgen::date_time_ymd(2025, 1, 1));
    assert!(w.register(&[&leaf("dev-1", Some(&old)), &old.der]).refusal().is_some(), "expired intermediate");
}

#[test]
fn key_types_and_verified_ca_references() {
    let mut w = World::new();
    // RSA 2048 and P-384 leaves under a P-256 root.
    let root = ca("root", None);
    w.group("g", json!({"caReferences": {"primary": "my-root"}}), json!({}));
    let rsa = leaf_with("dev-1", Some(&root), &rcgen::PKCS_RSA_SHA256, |_| {});
    let p384 = leaf_with("dev-1", Some(&root), &rcgen::PKCS_ECDSA_P384_SHA384, |_| {});
    // Not verified (not in the snapshot): nothing matches.
    assert!(refusal(&w.register(&[&p384])).contains("no enrollment"));
    w.config.verified_cas.insert("my-root".into(), root.der.clone());
    for chain in [&rsa, &p384] {
        assert_eq!(assigned(&w.register(&[chain])).enrollment_group_id.as_deref(), Some("g"));
    }
    // An individual enrollment by a verified CA reference.
    w.individual(json!({"caReferences": {"primary": "MY-ROOT"}}), json!({}));
    let o = w.register(&[&p384]);
    assert_eq!(assigned(&o).enrollment_group_id, None);
    w.config.verified_cas.clear();
    assert!(refusal(&w.register(&[&p384])).contains("not the individual enrollment's"));
}
