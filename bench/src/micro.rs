//! The hot path's pieces, for microbenchmarks: [`HotPath`] holds the fixtures and one method per
//! piece. `dps-bench` times them itself (a table row each, [`run`]); `cargo bench -p dps-bench`
//! runs the same methods under criterion (`benches/hot_path.rs`).

use bytes::{Bytes, BytesMut};
use dps_storage::{Expect, Op, Record, Store, Table, Txn};
use std::hint::black_box;
use std::time::{Duration, Instant};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const GROUP_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const RESOURCE: &str = "0ne00000001/registrations/device-000042";

pub struct HotPath {
    device_key: Vec<u8>,
    token: String,
    /// CONNECT, SUBSCRIBE and PUBLISH as a device pipelines them.
    wire: Bytes,
    /// The assigned registration the answer renders.
    assigned: dps_core::registration::Outcome,
    store: dps_storage::FjallStore,
    _dir: tempfile::TempDir,
    next: u64,
}

fn mqtt_err(e: mqttbytes::Error) -> BoxError {
    format!("{e:?}").into()
}

impl HotPath {
    pub fn new() -> Result<HotPath, BoxError> {
        use base64::Engine;
        let device_key = base64::engine::general_purpose::STANDARD.decode(dps_core::sas::derive_device_key(GROUP_KEY, "device-000042"))?;
        let token = dps_core::sas::build(RESOURCE, &device_key, 4_000_000_000, Some("registration"));
        let mut wire = BytesMut::new();
        let mut c = mqttbytes::v4::Connect::new("device-000042");
        c.login = Some(mqttbytes::v4::Login::new(format!("{RESOURCE}/api-version=2019-03-31&ClientVersion=bench"), token.clone()));
        c.write(&mut wire).map_err(mqtt_err)?;
        mqttbytes::v4::Subscribe::new("$dps/registrations/res/#", mqttbytes::QoS::AtLeastOnce).write(&mut wire).map_err(mqtt_err)?;
        let mut p = mqttbytes::v4::Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            mqttbytes::QoS::AtLeastOnce,
            "{\"registrationId\":\"device-000042\"}",
        );
        p.pkid = 2;
        p.write(&mut wire).map_err(mqtt_err)?;
        let state: dps_core::model::DeviceRegistrationState = serde_json::from_value(serde_json::json!({
            "registrationId": "device-000042", "createdDateTimeUtc": "2026-11-26T12:00:00.0000000Z",
            "assignedHub": "hub-a.example.net", "deviceId": "device-000042", "status": "assigned", "substatus": "initialAssignment",
            "lastUpdatedDateTimeUtc": "2026-11-26T12:00:00.0000000Z", "etag": "\"0a1b2c3d\"", "_enrollmentGroupId": "bench"}))?;
        let assigned =
            dps_core::registration::Outcome::Operation { operation_id: dps_core::device::operation_id(42, "device-000042"), state };
        let dir = tempfile::tempdir()?;
        let store = dps_storage::FjallStore::open(dir.path(), dps_storage::DataKey::new(&[7u8; 32]), 64 << 20)?;
        let mut h = HotPath { device_key, token, wire: wire.freeze(), assigned, store, _dir: dir, next: 0 };
        // Records for the reads.
        h.store_put_group(1_000);
        Ok(h)
    }

    /// A device's SAS token: parse, scope and expiry check, HMAC-SHA256 verify.
    pub fn sas_verify(&self) -> bool {
        match dps_core::sas::parse(black_box(&self.token)) {
            Ok(t) => t.check_scope(RESOURCE, 1_000_000_000).is_ok() && t.signed_with(&self.device_key),
            Err(_) => false,
        }
    }

    /// A group device's key: HMAC-SHA256 of its id with the group key, base64.
    pub fn derive_key(&self) -> String {
        dps_core::sas::derive_device_key(GROUP_KEY, black_box("device-000042"))
    }

    /// Decodes the three packets a device pipelines.
    pub fn mqtt_decode(&self) -> usize {
        let mut b = BytesMut::from(&self.wire[..]);
        (0..3).filter(|_| mqttbytes::v4::read(&mut b, 1 << 20).is_ok()).count()
    }

    /// The assigned answer: JSON rendering and the MQTT PUBLISH around it.
    pub fn render_response(&self) -> usize {
        let body = black_box(&self.assigned).reply("", dps_core::time::UtcTime::from_unix_secs(0)).body;
        let topic = dps_core::device::response_topic(200, "1", None);
        let mut b = BytesMut::with_capacity(body.len() + 64);
        let mut publish = mqttbytes::v4::Publish::new(topic, mqttbytes::QoS::AtLeastOnce, body);
        // QoS 1 needs a packet id (0 is refused, and nothing is written).
        publish.pkid = 1;
        publish.write(&mut b).unwrap_or(0)
    }

    fn put(i: u64) -> Op {
        let record = Record { etag: format!("\"{i:08x}\""), class: 0, body: vec![b'x'; 400] };
        Op::Put { table: Table::Registrations, key: format!("device-{i:09}"), record, expect: Expect::Any, quota: None }
    }

    /// `n` registration-sized records committed as one group (one fsync).
    pub fn store_put_group(&mut self, n: u64) -> bool {
        let txns = (self.next..self.next + n).map(|i| Txn::one(Self::put(i))).collect();
        self.next += n;
        self.store.commit(txns).is_ok()
    }

    /// A read of a cached record: lookup and AES-256-GCM open.
    pub fn store_get(&self, i: u64) -> bool {
        let key = format!("device-{:09}", i % self.next.max(1));
        matches!(self.store.get(Table::Registrations, &key), Ok(Some(_)))
    }
}

/// Runs `f` repeatedly for about `budget`; the median of five slices, in ns per call.
fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    let mut slices = Vec::new();
    for _ in 0..5 {
        let (mut n, t) = (0u64, Instant::now());
        while t.elapsed() < budget / 5 {
            for _ in 0..16 {
                f();
            }
            n += 16;
        }
        slices.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    slices.sort_by(f64::total_cmp);
    slices[2]
}

/// Every piece timed for about `budget`: (name, ns per operation).
pub fn run(budget: Duration) -> Result<Vec<(String, f64)>, BoxError> {
    let mut h = HotPath::new()?;
    let mut out = vec![
        ("SAS token parse + scope + HMAC verify".to_string(), time(budget, || assert!(h.sas_verify()))),
        ("group key derivation (HMAC-SHA256 + base64)".to_string(), time(budget, || drop(black_box(h.derive_key())))),
        ("MQTT decode CONNECT + SUBSCRIBE + PUBLISH".to_string(), time(budget, || assert_eq!(h.mqtt_decode(), 3))),
        (
            "response JSON + MQTT PUBLISH encode".to_string(),
            time(budget, || {
                black_box(h.render_response());
            }),
        ),
    ];
    let mut k = 0u64;
    out.push((
        "store get (AES-GCM open), cached".into(),
        time(budget, || {
            k += 7919;
            assert!(h.store_get(k));
        }),
    ));
    // A TPM registration builds two of these (the challenge, and the authenticationKey of
    // the assigned result): their RSA-2048 public-key operations are its crypto floor.
    let ek = dps_core::tpm::parse_tpm2b_public(include_bytes!("../../core/tests/fixtures/ek.pub"))?;
    let srk = dps_core::tpm::parse_tpm2b_public(include_bytes!("../../core/tests/fixtures/srk.pub"))?;
    let secrets = dps_core::tpm::challenge::Secrets::from_bytes(&std::array::from_fn(|i| i as u8));
    out.push((
        "TPM authenticationKey (2 RSA-2048 OAEP encryptions, KDFa, AES-CFB, HMAC)".into(),
        time(budget, || assert!(dps_core::tpm::challenge::authentication_key(&ek, &srk, &secrets).is_ok_and(|b| b.len() == 766))),
    ));
    out.push(("store put, one transaction per commit (fsync)".into(), time(budget, || assert!(h.store_put_group(1)))));
    out.push((
        "store put, per transaction in groups of 256 (one fsync each)".into(),
        time(budget, || assert!(h.store_put_group(256))) / 256.0,
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timed answer is the device API's own rendering of an assigned symmetric-key
    /// registration, inside an MQTT PUBLISH.
    #[test]
    fn the_rendered_answer_is_the_assigned_registration() {
        let h = HotPath::new().unwrap();
        let body = h.assigned.reply("", dps_core::time::UtcTime::from_unix_secs(0)).body;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "assigned");
        assert_eq!(v["registrationState"]["assignedHub"], "hub-a.example.net");
        assert_eq!(v["registrationState"]["symmetricKey"]["enrollmentGroupId"], "bench");
        assert!(v["registrationState"].get("_enrollmentGroupId").is_none(), "internal members stay out");
        assert!(h.render_response() > body.len(), "the PUBLISH carries the body");
    }
}
