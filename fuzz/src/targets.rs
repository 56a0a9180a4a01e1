//! The fuzz targets' bodies, one function per target: libFuzzer drives them (`fuzz_targets/`,
//! `cargo +nightly fuzz run NAME`), and the workspace's tests replay the checked-in seeds
//! (`fuzz/seeds/NAME/`) through the very same functions on stable (`tests/tests/fuzz_replay.rs`),
//! so a crasher once found stays fixed.

use dps_core::model::{EnrollmentGroup, IndividualEnrollment};
use dps_core::time::UtcTime;

/// Arbitrary bytes into the AMQP connection state machine, fed in two pieces, with every event
/// answered: it must never panic, and its output must always be whole frames it can parse back.
pub fn amqp_connection(data: &[u8]) {
    use dps_core::amqp_connection::{Connection, Event, Settings};
    // The chain is only carried, never parsed, by the connection machine.
    let cert = data.first().is_some_and(|b| b & 1 == 1).then(|| std::sync::Arc::new(vec![data.to_vec()]));
    let Ok(mut c) =
        Connection::new(Settings { max_frame: 4096, max_message: 8192, link_credit: 2, client_certificate: cert, id_scope: "0ne1".into() })
    else {
        return;
    };
    let (a, b) = data.split_at(data.len() / 2);
    for piece in [a, b] {
        c.receive(piece);
        for _ in 0..64 {
            match c.poll() {
                Ok(Some(Event::Request { delivery_id, correlation_id, .. })) => {
                    let _ = c.answer(delivery_id, correlation_id, 200, "{\"status\":\"assigned\"}", None);
                }
                Ok(Some(Event::Invalid { delivery_id, .. })) => {
                    let _ = c.answer(delivery_id, None, 400, "{}", None);
                }
                Ok(Some(Event::TpmKeys { .. })) => {
                    let n = data.last().map_or(900, |b| usize::from(*b) * 8);
                    let _ = c.tpm_challenge(&vec![7u8; n]);
                }
                Ok(Some(Event::TpmAnswer { .. })) => {
                    // Admitted or refused, as the host's check of the token decides.
                    if data.len().is_multiple_of(2) {
                        let _ = c.tpm_admit(dps_core::request::Credential::None);
                    } else {
                        let _ = c.refuse("bad answer");
                    }
                }
                Ok(Some(Event::Closed)) | Ok(None) | Err(_) => break,
            }
        }
        let _ = c.take_output();
    }
}

/// MQTT usernames, request topics, operation ids and register bodies from devices.
pub fn device_wire(data: &[u8]) {
    let _ = dps_core::device::parse_registration_body(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = dps_core::device::parse_username(s);
        let _ = dps_core::device::parse_request_topic(s, data);
        let _ = dps_core::request::from_http("PUT", s, Some(s), data, None);
        if let Some(k) = dps_core::device::operation_registration_key(s) {
            assert_eq!(dps_core::device::operation_registration_key(&dps_core::device::operation_id(7, &k)), Some(k));
        }
    }
}

/// Enrollment bodies through parsing and validation, as the service API runs them.
pub fn enrollment_json(data: &[u8]) {
    use dps_core::model::{EnrollmentGroup, IndividualEnrollment};
    use dps_core::time::UtcTime;
    use dps_core::validate::{parse_input, prepare_enrollment, prepare_group};
    let now = UtcTime::from_unix_secs(1_700_000_000);
    let mut key = || "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_string();
    if let Ok(e) = parse_input::<IndividualEnrollment>(data) {
        if let Ok(e) = prepare_enrollment(e, None, None, now, &mut key) {
            let _ = serde_json::to_vec(&e);
        }
    }
    if let Ok(g) = parse_input::<EnrollmentGroup>(data) {
        let _ = prepare_group(g, None, None, now, &mut key);
    }
}

/// HTTP/1.1 request framing: any bytes, a small body limit; never panics, and a complete
/// request never claims more bytes than it was given.
pub fn http_request(data: &[u8]) {
    if let Ok(dps_gateway::transport::http::Parsed::Complete(_, used)) = dps_gateway::transport::http::parse_request(data, 4096) {
        assert!(used <= data.len());
    }
}

/// Arbitrary bytes into the MQTT session machine, fed in two pieces, every request answered: it
/// must never panic, and everything it writes must parse back as MQTT packets.
pub fn mqtt_session(data: &[u8]) {
    use dps_core::mqtt_session::{Event, Session, Settings};
    let mut s = Session::new(Settings {
        max_packet: 4096,
        idle_secs: 60,
        client_certificate: None,
        id_scope: "0ne1".into(),
        max_keep_alive_secs: 300,
    });
    let (a, b) = data.split_at(data.len() / 2);
    for piece in [a, b] {
        s.receive(piece);
        for _ in 0..64 {
            match s.poll() {
                Ok(Some(Event::Request { rid, .. })) => {
                    let _ = s.answer(&rid, 200, "{\"status\":\"assigned\"}", None);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let mut out = s.take_output();
        while !out.is_empty() {
            if mqttbytes::v4::read(&mut out, 1 << 20).is_err() {
                panic!("the session wrote something that is not MQTT");
            }
        }
    }
}

/// SAS tokens from Authorization headers and MQTT passwords.
pub fn sas_token(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = dps_core::sas::parse(s) {
            let _ = t.check_scope("0ne00000001/registrations/dev", 1_700_000_000);
            let _ = t.signed_with(b"0123456789abcdef");
        }
    }
}

/// A TPM device's endorsement and storage root keys as a peer sends them (HTTPS body, AMQP
/// SASL), from arbitrary bytes: parsed, and when both parse, a challenge built for them:
/// no panic, whatever the structures, moduli or exponents say.
pub fn tpm_public(data: &[u8]) {
    use dps_core::tpm::challenge::{authentication_key, Secrets};
    // The EK is as long as its own size field says; the rest is the SRK.
    let cut = match data {
        [a, b, ..] => (usize::from(u16::from_be_bytes([*a, *b])) + 2).min(data.len()),
        _ => 0,
    };
    let (ek, srk) = data.split_at(cut);
    let _ = dps_core::tpm::parse_tpm2b_public(data);
    if dps_core::registration::tpm::check_keys(ek, srk).is_ok() {
        let (Ok(ek), Ok(srk)) = (dps_core::tpm::parse_tpm2b_public(ek), dps_core::tpm::parse_tpm2b_public(srk)) else { return };
        let s = Secrets::from_bytes(&std::array::from_fn(|i| i as u8));
        let _ = authentication_key(&ek, &srk, &s);
    }
}

/// WebSocket client frames; a parsed frame never uses more bytes than given.
pub fn websocket_frame(data: &[u8]) {
    if let Ok(Some((_, used))) = dps_core::websocket::parse_client_frame(data, 1024) {
        assert!(used <= data.len());
    }
}

/// A client certificate chain from a device: arbitrary bytes cut into certificates, checked
/// against an individual enrollment and an X.509 group: no panic, whatever the DER says.
pub fn x509_chain(data: &[u8]) {
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let chain: Vec<Vec<u8>> = vec![data[..cut].to_vec(), data[cut..].to_vec()];
    let _ = dps_core::registration::x509::check_leaf(&chain, "dev-1");
    let b64 = |d: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(d)
    };
    let e: IndividualEnrollment = serde_json::from_value(serde_json::json!({"registrationId": "dev-1", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": b64(&chain[0])}}}}}))
    .unwrap_or_else(|_| panic!("enrollment shape"));
    let g: EnrollmentGroup = serde_json::from_value(serde_json::json!({"enrollmentGroupId": "g", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": b64(&chain[1])}}}}}))
    .unwrap_or_else(|_| panic!("group shape"));
    let now = UtcTime::from_unix_secs(1_900_000_000);
    let cas = Default::default();
    let _ = dps_core::registration::x509::admitting(&chain, Some(&e), &[], &cas, now);
    let _ = dps_core::registration::x509::admitting(&chain, None, std::slice::from_ref(&g), &cas, now);
}

/// What hubs and webhooks answer: a Mosquitto dynamic-security response message, and a custom
/// allocation webhook's answer (read, then resolved into a registration state). Never panics;
/// an accepted answer names one of the hubs offered.
pub fn hub_answers(data: &[u8]) {
    use dps_core::hub::custom::{read_answer, resolve, CustomCall};
    use dps_core::hub::dynsec;
    use dps_core::model::{DeviceRegistrationState, LinkedHub, ReprovisionPolicy};
    use dps_core::registration::state::Placement;
    for a in dynsec::answers(data) {
        let _ = dynsec::prefix_of(&a.correlation);
    }
    let call = CustomCall {
        webhook_url: "https://fn.example/api".into(),
        body: serde_json::json!({}),
        linked_hubs: vec!["hub-a".into(), "HUB-B".into()],
        placement: Placement {
            device_id: "d".into(),
            auth: None,
            iot_edge: false,
            initial_twin: Default::default(),
            previous: None,
            previous_substatus: None,
            policy: ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: true },
            unfinished: None,
        },
    };
    let status = data.first().map_or(200, |b| 150 + u16::from(*b));
    let answer = read_answer(&call, status, data);
    if let Ok(a) = &answer {
        assert!(call.linked_hubs.contains(&a.hub), "an accepted answer names a hub offered");
    }
    let Ok(state) = serde_json::from_value::<DeviceRegistrationState>(serde_json::json!({"registrationId": "d", "status": "assigning"}))
    else {
        return;
    };
    let state = DeviceRegistrationState { custom_allocation: Some(call), ..state };
    let hubs = [LinkedHub { name: "hub-a".into(), ..LinkedHub::default() }];
    let _ = resolve(state, answer, &hubs);
}
