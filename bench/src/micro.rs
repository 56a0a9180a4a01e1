//! Microbenchmarks of the hot path's pieces, timed in this process: each runs for a fixed
//! wall-clock budget and reports nanoseconds per operation (the median of five slices).

use crate::BoxError;
use bytes::BytesMut;
use dps_storage::{Expect, Op, Record, Store, Table, Txn};
use std::hint::black_box;
use std::time::{Duration, Instant};

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

pub fn run(budget: Duration) -> Result<Vec<(String, f64)>, BoxError> {
    let mut out = Vec::new();
    let group_key = b"0123456789abcdef0123456789abcdef";
    let device_key = base64_decode(&dps_core::sas::derive_device_key(group_key, "device-000042"))?;
    let resource = "0ne00000001/registrations/device-000042";
    let token = dps_core::sas::build(resource, &device_key, 4_000_000_000, Some("registration"));

    out.push((
        "SAS token parse + scope + HMAC verify".into(),
        time(budget, || {
            let t = dps_core::sas::parse(black_box(&token));
            if let Ok(t) = t {
                black_box(t.check_scope(resource, 1_000_000_000).is_ok() && t.signed_with(&device_key));
            }
        }),
    ));
    out.push((
        "group key derivation (HMAC-SHA256 + base64)".into(),
        time(budget, || {
            black_box(dps_core::sas::derive_device_key(group_key, black_box("device-000042")));
        }),
    ));

    // The three packets a device pipelines, and the response the gateway writes.
    let mut wire = BytesMut::new();
    let mut c = mqttbytes::v4::Connect::new("device-000042");
    c.login = Some(mqttbytes::v4::Login::new(format!("{resource}/api-version=2019-03-31&ClientVersion=bench"), token.clone()));
    c.write(&mut wire).map_err(|e| format!("{e:?}"))?;
    mqttbytes::v4::Subscribe::new("$dps/registrations/res/#", mqttbytes::QoS::AtLeastOnce)
        .write(&mut wire)
        .map_err(|e| format!("{e:?}"))?;
    let mut p = mqttbytes::v4::Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        mqttbytes::QoS::AtLeastOnce,
        "{\"registrationId\":\"device-000042\"}",
    );
    p.pkid = 2;
    p.write(&mut wire).map_err(|e| format!("{e:?}"))?;
    let wire = wire.freeze();
    out.push((
        "MQTT decode CONNECT + SUBSCRIBE + PUBLISH".into(),
        time(budget, || {
            let mut b = BytesMut::from(&wire[..]);
            for _ in 0..3 {
                black_box(mqttbytes::v4::read(&mut b, 1 << 20).is_ok());
            }
        }),
    ));

    let state: dps_core::model::DeviceRegistrationState = serde_json::from_value(serde_json::json!({
        "registrationId": "device-000042", "createdDateTimeUtc": "2026-11-26T12:00:00.0000000Z",
        "assignedHub": "hub-a.example.net", "deviceId": "device-000042", "status": "assigned", "substatus": "initialAssignment",
        "lastUpdatedDateTimeUtc": "2026-11-26T12:00:00.0000000Z", "etag": "\"0a1b2c3d\""}))?;
    let status = dps_core::device::OperationStatus {
        operation_id: dps_core::device::operation_id(42, "device-000042"),
        status: dps_core::model::RegistrationStatus::Assigned,
        registration_state: Some(dps_core::device::DeviceRegistrationResult {
            state,
            symmetric_key: Some(dps_core::device::SymmetricKeyResult { enrollment_group_id: Some("bench".into()) }),
        }),
    };
    out.push((
        "response JSON + MQTT PUBLISH encode".into(),
        time(budget, || {
            let body = serde_json::to_vec(black_box(&status)).unwrap_or_default();
            let topic = dps_core::device::response_topic(200, "1", None);
            let mut b = BytesMut::with_capacity(body.len() + 64);
            let _ = mqttbytes::v4::Publish::new(topic, mqttbytes::QoS::AtLeastOnce, body).write(&mut b);
            black_box(b);
        }),
    ));

    let dir = tempfile::tempdir()?;
    let store = dps_storage::FjallStore::open(dir.path(), dps_storage::DataKey::new(&[7u8; 32]), 64 << 20)?;
    let record = |i: u64| Record { etag: format!("\"{i:08x}\""), class: 0, body: vec![b'x'; 400] };
    let put = |i: u64| Op::Put {
        table: Table::Registrations,
        key: format!("device-{i:09}"),
        record: record(i),
        expect: Expect::Any,
        quota: None,
    };
    let mut i = 0u64;
    out.push((
        "store put, one transaction per commit (fsync)".into(),
        time(budget, || {
            i += 1;
            black_box(store.commit(vec![Txn::one(put(i))]).is_ok());
        }),
    ));
    let mut j = 1_000_000u64;
    out.push((
        "store put, per transaction in groups of 256 (one fsync each)".into(),
        time(budget, || {
            let txns = (0..256).map(|k| Txn::one(put(j + k))).collect();
            j += 256;
            black_box(store.commit(txns).is_ok());
        }) / 256.0,
    ));
    let mut k = 0u64;
    out.push((
        "store get (AES-GCM open), cached".into(),
        time(budget, || {
            k = (k + 7919) % i.max(1);
            black_box(store.get(Table::Registrations, &format!("device-{:09}", k + 1)).ok());
        }),
    ));
    Ok(out)
}

fn base64_decode(s: &str) -> Result<Vec<u8>, BoxError> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(s)?)
}
