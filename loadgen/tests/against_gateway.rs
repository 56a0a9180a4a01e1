//! loadgen against a real gateway (in this process, real TLS on loopback): every transport and
//! mode ends with every device assigned, and resumption really resumes (the gateway's metrics
//! count the resumed handshakes), and TPM devices attest on a software TPM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use dps_loadgen::device::Transport;
use dps_loadgen::endpoint::Endpoint;
use dps_loadgen::identities::Identities;
use dps_loadgen::run::{run, Fleet, Plan};
use dps_loadgen::service::ServiceClient;
use dps_loadgen::swtpm::SoftTpm;
use dps_loadgen::tpm_device::TpmHandle;
use std::sync::Arc;
use std::time::Duration;

#[path = "../../storage/tests/common/etcd_cluster.rs"]
mod etcd_cluster;

fn config(handshake_only: bool) -> dps_gateway::config::Config {
    let mut c = dps_gateway::config::Config::loopback();
    c.shards = 2;
    c.handshake_only = handshake_only;
    c.limits.service_operations_per_minute = 0;
    c.limits.hub_latency_refresh_secs = 0;
    c.linked_hubs.push(dps_gateway::config::HubConfig {
        host_name: "hub-a.example.net".into(),
        connection_string: "HostName=hub-a.example.net;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5a2V5a2V5a2V5a2V5a2V5".into(),
        ..Default::default()
    });
    c
}

fn plan(transport: Transport, devices: usize) -> Plan {
    Plan { transport, devices, concurrency: 8, rate: None, resume: false, timeout: Duration::from_secs(20), progress: None }
}

/// The sum over shards of `name` series carrying `label`.
fn metric(admin: u16, name: &str, label: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn every_transport_and_mode_assigns_every_device() {
    let dir = tempfile::tempdir().unwrap();
    let gw = dps_gateway::start(config(false), dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ep = Endpoint::read(&dir.path().join("endpoint.json"), "127.0.0.1").unwrap();
    let service = ServiceClient::new(&ep).unwrap();
    let key = rt.block_on(service.group_key("lg")).unwrap();
    let fleet = |prefix: &str| Arc::new(Fleet::new(ep.clone(), Identities::Group { prefix: prefix.into(), key: key.clone() }).unwrap());
    for (t, n) in [(Transport::Mqtt, 40), (Transport::MqttWs, 20), (Transport::Https, 4), (Transport::Amqp, 20), (Transport::AmqpWs, 20)] {
        let r = rt.block_on(run(fleet(t.name()), plan(t, n))).unwrap();
        assert_eq!((r.assigned, r.error_count()), (n as u64, 0), "{}: {:?}", t.name(), r.errors);
    }
    // AMQP devices announcing the smallest max-frame-size get the response in several frames.
    let small = Fleet {
        amqp_max_frame: 512,
        ..Fleet::new(ep.clone(), Identities::Group { prefix: "amqp-small".into(), key: key.clone() }).unwrap()
    };
    let r = rt.block_on(run(Arc::new(small), plan(Transport::Amqp, 4))).unwrap();
    assert_eq!((r.assigned, r.error_count()), (4, 0), "{:?}", r.errors);

    // Open loop: 30 devices at 200/s take at least the 145 ms of their schedule.
    let r = rt.block_on(run(fleet("open"), Plan { rate: Some(200.0), ..plan(Transport::Mqtt, 30) })).unwrap();
    assert_eq!((r.assigned, r.error_count()), (30, 0), "{:?}", r.errors);
    assert!(r.seconds >= 0.145, "{}", r.seconds);

    // Resumption: the measured pass resumes every device's own session.
    let before = metric(gw.endpoint.ports.admin, "dps_tls_handshakes_total", "result=\"resumed\"");
    let r = rt.block_on(run(fleet("resume"), Plan { resume: true, ..plan(Transport::Mqtt, 20) })).unwrap();
    assert_eq!((r.assigned, r.error_count()), (20, 0), "{:?}", r.errors);
    let resumed = metric(gw.endpoint.ports.admin, "dps_tls_handshakes_total", "result=\"resumed\"") - before;
    assert_eq!(resumed, 20.0);

    // Individual enrollments from a CSV, created through the bulk API; a second creation is a
    // no-op, and a device the CSV names with a wrong key is refused with 401002.
    let csv = "registrationId,primaryKey\ncsv-1,AAECAwQFBgcICQoLDA0ODw==\ncsv-2,EBESExQVFhcYGRobHB0eHw==\n";
    let Identities::Individual(devices) = Identities::read_csv(csv).unwrap() else { unreachable!() };
    assert_eq!(rt.block_on(service.create_individual(&devices, 10)).unwrap(), 2);
    assert_eq!(rt.block_on(service.create_individual(&devices, 10)).unwrap(), 0);
    let f = Arc::new(Fleet::new(ep.clone(), Identities::Individual(devices.clone())).unwrap());
    let r = rt.block_on(run(f, plan(Transport::Mqtt, 2))).unwrap();
    assert_eq!((r.assigned, r.error_count()), (2, 0), "{:?}", r.errors);
    let wrong = vec![("csv-1".to_string(), b"not the enrolled key".to_vec())];
    let f = Arc::new(Fleet::new(ep.clone(), Identities::Individual(wrong)).unwrap());
    let r = rt.block_on(run(f, plan(Transport::Mqtt, 1))).unwrap();
    assert_eq!(r.errors.get("status 401 errorCode 401002"), Some(&1), "{:?}", r.errors);
    let json = r.json();
    assert_eq!(json["settings"]["transport"], "mqtt");
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    gw.shutdown().unwrap();
}

#[test]
fn handshake_only_gateway_completes_handshakes_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let gw = dps_gateway::start(config(true), dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ep = Endpoint::read(&dir.path().join("endpoint.json"), "127.0.0.1").unwrap();
    let fleet = |ids| Arc::new(Fleet::new(ep.clone(), ids).unwrap());
    let r = rt.block_on(run(fleet(Identities::Group { prefix: "h".into(), key: vec![] }), plan(Transport::TlsHandshake, 30))).unwrap();
    assert_eq!((r.assigned, r.error_count()), (30, 0), "{:?}", r.errors);
    // A registration gets no MQTT answer there.
    let r = rt
        .block_on(run(
            fleet(Identities::Group { prefix: "h".into(), key: vec![1; 32] }),
            Plan { timeout: Duration::from_secs(2), ..plan(Transport::Mqtt, 1) },
        ))
        .unwrap();
    assert_eq!(r.assigned, 0);
    assert_eq!(metric(gw.endpoint.ports.admin, "dps_tls_handshakes_total", "result=\"ok\""), 31.0);
    gw.shutdown().unwrap();
}

/// Wrong key and unknown ID scope, over every device transport: refused with 401 and DPS error
/// code 401002 (an unknown ID scope already at MQTT's CONNACK and AMQP's SASL outcome); a
/// disabled enrollment ends with the final status `disabled`
/// (docs/device-protocol.md §2.3: 200 with status disabled). None is assigned.
#[test]
fn refusals_on_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let gw = dps_gateway::start(config(false), dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ep = Endpoint::read(&dir.path().join("endpoint.json"), "127.0.0.1").unwrap();
    let service = ServiceClient::new(&ep).unwrap();
    let key = b"0123456789abcdef0123456789abcdef".to_vec();
    let b64 = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    for (id, status) in [("enabled-dev", "enabled"), ("disabled-dev", "disabled")] {
        let body = format!(
            r#"{{"registrationId":"{id}","provisioningStatus":"{status}","attestation":{{"type":"symmetricKey","symmetricKey":{{"primaryKey":"{b64}","secondaryKey":"{b64}"}}}}}}"#
        );
        let (st, text) = rt.block_on(service.call(reqwest::Method::PUT, &format!("/enrollments/{id}"), Some(body))).unwrap();
        assert_eq!(st, 200, "{text}");
    }
    let mut unknown_scope = ep.clone();
    unknown_scope.id_scope = "0ne00000000".into();
    const REFUSED: &str = "status 401 errorCode 401002";
    let same = |_: Transport| REFUSED;
    let scope_refusal = |t: Transport| match t {
        Transport::Mqtt | Transport::MqttWs => "ConnAck",
        Transport::Amqp | Transport::AmqpWs => "status 401",
        _ => REFUSED,
    };
    let disabled = |_: Transport| "final status disabled";
    type Expect = dyn Fn(Transport) -> &'static str;
    let cases: [(&str, &Expect, Endpoint, Identities); 3] = [
        ("wrong key", &same, ep.clone(), Identities::Individual(vec![("enabled-dev".into(), b"some other key material".to_vec())])),
        ("disabled enrollment", &disabled, ep.clone(), Identities::Individual(vec![("disabled-dev".into(), key.clone())])),
        ("unknown ID scope", &scope_refusal, unknown_scope, Identities::Individual(vec![("enabled-dev".into(), key.clone())])),
    ];
    for (what, expected, ep, ids) in cases {
        let fleet = Arc::new(Fleet::new(ep, ids).unwrap());
        for t in [Transport::Mqtt, Transport::MqttWs, Transport::Https, Transport::Amqp, Transport::AmqpWs] {
            let r = rt.block_on(run(fleet.clone(), plan(t, 1))).unwrap();
            assert_eq!(r.assigned, 0, "{what} over {}", t.name());
            assert_eq!(r.errors.get(expected(t)), Some(&1), "{what} over {}: {:?}", t.name(), r.errors);
        }
    }
    // The control: the enabled device with its key is assigned on every transport.
    let ok = Arc::new(Fleet::new(ep.clone(), Identities::Individual(vec![("enabled-dev".into(), key)])).unwrap());
    for t in [Transport::Mqtt, Transport::MqttWs, Transport::Https, Transport::Amqp, Transport::AmqpWs] {
        let r = rt.block_on(run(ok.clone(), plan(t, 1))).unwrap();
        assert_eq!((r.assigned, r.error_count()), (1, 0), "{}: {:?}", t.name(), r.errors);
    }
    gw.shutdown().unwrap();
}

/// With `tls.stateless_tickets` the devices resume from tickets; with no tickets sent, nobody
/// resumes (every handshake is full).
#[test]
fn resumption_follows_the_ticket_knobs() {
    for (stateless, tickets, expect_resumed) in [(true, 1, 10.0), (false, 0, 0.0)] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(false);
        c.tls.stateless_tickets = stateless;
        c.tls.tickets_per_handshake = tickets;
        let gw = dps_gateway::start(c, dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let ep = Endpoint::read(&dir.path().join("endpoint.json"), "127.0.0.1").unwrap();
        let key = rt.block_on(ServiceClient::new(&ep).unwrap().group_key("lg")).unwrap();
        let fleet = Arc::new(Fleet::new(ep.clone(), Identities::Group { prefix: "t".into(), key }).unwrap());
        // Counted around the run only: the service API client (reqwest) may resume a session of
        // its own when it opens a second connection.
        let before = metric(gw.endpoint.ports.admin, "dps_tls_handshakes_total", "result=\"resumed\"");
        let r = rt.block_on(run(fleet, Plan { resume: true, ..plan(Transport::Mqtt, 10) })).unwrap();
        assert_eq!((r.assigned, r.error_count()), (10, 0), "{:?}", r.errors);
        let resumed = metric(gw.endpoint.ports.admin, "dps_tls_handshakes_total", "result=\"resumed\"") - before;
        assert_eq!(resumed, expect_resumed, "stateless {stateless}");
        gw.shutdown().unwrap();
    }
}

#[test]
fn x509_devices_on_every_transport() {
    // Leaf certificates made per device by a test CA that the service holds as verified and an
    // X.509 group references; the credential is the TLS client certificate alone.
    let dir = tempfile::tempdir().unwrap();
    let gw = dps_gateway::start(config(false), dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ep = Endpoint::read(&dir.path().join("endpoint.json"), "127.0.0.1").unwrap();
    let ca = Arc::new(dps_loadgen::identities::TestCa::new("loadgen test CA").unwrap());
    rt.block_on(ServiceClient::new(&ep).unwrap().x509_group("lg-x509", &ca.pem)).unwrap();
    for (t, n) in [(Transport::Mqtt, 20), (Transport::MqttWs, 10), (Transport::Https, 4), (Transport::Amqp, 10), (Transport::AmqpWs, 10)] {
        let fleet = Arc::new(Fleet::new(ep.clone(), Identities::X509 { prefix: format!("x509-{}", t.name()), ca: ca.clone() }).unwrap());
        let r = rt.block_on(run(fleet, plan(t, n))).unwrap();
        assert_eq!((r.assigned, r.error_count()), (n as u64, 0), "{}: {:?}", t.name(), r.errors);
    }
    // Devices of another CA are refused with 401002.
    let other = Arc::new(dps_loadgen::identities::TestCa::new("loadgen test CA").unwrap());
    let fleet = Arc::new(Fleet::new(ep.clone(), Identities::X509 { prefix: "x509-stranger".into(), ca: other }).unwrap());
    let r = rt.block_on(run(fleet, plan(Transport::Mqtt, 3))).unwrap();
    assert_eq!(r.assigned, 0);
    assert_eq!(r.errors.iter().find(|(k, _)| k.contains("401002")).map(|(_, v)| *v), Some(3), "{:?}", r.errors);
    gw.shutdown().unwrap();
}

/// Identities for TPM devices: registration ids only (the TPM is the credential).
fn tpm_ids(ids: &[String]) -> Identities {
    Identities::Individual(ids.iter().map(|id| (id.clone(), Vec::new())).collect())
}

/// A gateway, a client runtime, and two software TPMs opened through the TSS: the device's and
/// a stranger's.
struct TpmWorld {
    gw: dps_gateway::Running,
    rt: tokio::runtime::Runtime,
    ep: Endpoint,
    service: ServiceClient,
    device: TpmHandle,
    stranger: TpmHandle,
    _tpms: (SoftTpm, SoftTpm),
    _dir: tempfile::TempDir,
}

impl TpmWorld {
    fn start() -> TpmWorld {
        let dir = tempfile::tempdir().unwrap();
        let gw = dps_gateway::start(config(false), dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let ep = Endpoint::read(&dir.path().join("endpoint.json"), "127.0.0.1").unwrap();
        let service = ServiceClient::new(&ep).unwrap();
        let tpms = (SoftTpm::start().unwrap(), SoftTpm::start().unwrap());
        let (device, stranger) = (TpmHandle::open(&tpms.0.tcti()).unwrap(), TpmHandle::open(&tpms.1.tcti()).unwrap());
        TpmWorld { gw, rt, ep, service, device, stranger, _tpms: tpms, _dir: dir }
    }
}

#[test]
fn tpm_devices_on_a_software_tpm_over_https_and_amqp() {
    // A real TPM (swtpm) through the TSS: the EK and SRK made with the SDKs' templates, every
    // challenge activated, imported and signed inside it, and the assigned result's second
    // authenticationKey imported as the SDKs do.
    let t = TpmWorld::start();
    let (rt, ep, service, device, stranger) = (&t.rt, &t.ep, &t.service, &t.device, &t.stranger);
    assert_eq!((device.endorsement_key.len(), device.storage_root_key.len()), (316, 284), "the SDK templates' sizes");
    assert_ne!(device.endorsement_key, stranger.endorsement_key);
    let ids: Vec<String> = (0..8).map(|i| format!("tpm-{i}")).collect();
    assert_eq!(rt.block_on(service.create_tpm_individual(&ids, &device.endorsement_key, 10)).unwrap(), 8);
    for (t, range) in [(Transport::Https, 0..3), (Transport::Amqp, 3..8)] {
        let n = range.len();
        let fleet = Fleet { tpm: Some(device.clone()), ..Fleet::new(ep.clone(), tpm_ids(&ids[range])).unwrap() };
        let r = rt.block_on(run(Arc::new(fleet), plan(t, n))).unwrap();
        assert_eq!((r.assigned, r.error_count()), (n as u64, 0), "{}: {:?}", t.name(), r.errors);
    }
    let (st, body) = rt.block_on(service.call(reqwest::Method::GET, "/registrations/tpm-0", None)).unwrap();
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"assigned\"") && !body.contains("_tpm") && !body.contains("hmacKey"), "{body}");
    // Another TPM under the same registration ids: HTTPS gets no challenge (401002); over AMQP it
    // proves its own keys in SASL and its register is rejected with 401002.
    for t in [Transport::Https, Transport::Amqp] {
        let fleet = Fleet { tpm: Some(stranger.clone()), ..Fleet::new(ep.clone(), tpm_ids(&ids[..2])).unwrap() };
        let r = rt.block_on(run(Arc::new(fleet), plan(t, 2))).unwrap();
        assert_eq!(r.assigned, 0);
        assert_eq!(r.errors.get("status 401 errorCode 401002"), Some(&2), "{}: {:?}", t.name(), r.errors);
    }
    t.gw.shutdown().unwrap();
}

#[test]
fn tpm_challenges_refuse_tampering_other_keys_and_replays() {
    let t = TpmWorld::start();
    let (rt, ep, service, device, stranger) = (&t.rt, &t.ep, &t.service, &t.device, &t.stranger);
    let id = "tpm-neg";
    rt.block_on(service.create_tpm_individual(&[id.to_string()], &device.endorsement_key, 10)).unwrap();
    let tls = dps_loadgen::tls::client_config(&ep.ca).unwrap();
    let addr = format!("127.0.0.1:{}", ep.https_port).parse().unwrap();
    let http = reqwest::Client::builder().use_preconfigured_tls((*tls).clone()).resolve(&ep.host, addr).build().unwrap();
    let url = format!("https://{}:{}/{}/registrations/{id}/register?api-version=2019-03-31", ep.host, ep.https_port, ep.id_scope);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let put = |ek: &[u8], srk: &[u8], token: Option<&str>| {
        let body = serde_json::json!({"registrationId": id, "tpm": {"endorsementKey": b64(ek), "storageRootKey": b64(srk)}}).to_string();
        let mut r = http.put(&url).header("Content-Type", "application/json").body(body);
        if let Some(t) = token {
            r = r.header("Authorization", t);
        }
        rt.block_on(async {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        })
    };
    let challenge = |ek: &[u8], srk: &[u8]| {
        let (st, v) = put(ek, srk, None);
        assert_eq!(st, 401, "{v}");
        assert_eq!(v["keyName"], "registration");
        base64::engine::general_purpose::STANDARD.decode(v["authenticationKey"].as_str().unwrap()).unwrap()
    };
    let resource = dps_core::sas::encode_resource(&format!("{}/registrations/{id}", ep.id_scope));
    let se = 4_000_000_000i64;
    let to_sign = format!("{resource}\n{se}").into_bytes();
    let sign = |blob: Vec<u8>| rt.block_on(device.activate_and_sign(blob, to_sign.clone()));
    let (ek, srk) = (device.endorsement_key.clone(), device.storage_root_key.clone());

    // A tampered blob: the TPM refuses it (credential, duplicate or identity public changed).
    for at in [10, 400, 740] {
        let mut blob = challenge(&ek, &srk);
        blob[at] ^= 0x01;
        assert!(sign(blob).is_err(), "a blob tampered at byte {at} was activated");
    }
    // A challenge built for another TPM's SRK cannot be imported by this TPM.
    assert!(sign(challenge(&ek, &stranger.storage_root_key)).is_err());
    // Another TPM's EK gets no challenge at all.
    let (st, v) = put(&stranger.endorsement_key, &stranger.storage_root_key, None);
    assert_eq!((st, v["errorCode"].as_u64()), (401, Some(401002)), "{v}");
    assert!(v.get("authenticationKey").is_none());
    // An EK that does not parse.
    let (st, v) = put(&ek[..100], &srk, None);
    assert_eq!((st, v["errorCode"].as_u64()), (400, Some(400004)), "{v}");

    // The genuine device: challenge, sign, register (202); the same answer replayed is refused.
    let signature = sign(challenge(&ek, &srk)).unwrap();
    let token = dps_loadgen::device::tpm_token_of(&resource, se, &signature);
    let (st, v) = put(&ek, &srk, Some(&token));
    assert_eq!(st, 202, "{v}");
    let (st, v) = put(&ek, &srk, Some(&token));
    assert_eq!((st, v["errorCode"].as_u64()), (401, Some(401002)), "replayed: {v}");
    // A token signed with a superseded challenge's key: the newer challenge replaced it.
    let first = sign(challenge(&ek, &srk)).unwrap();
    let _newer = challenge(&ek, &srk);
    let (st, _) = put(&ek, &srk, Some(&dps_loadgen::device::tpm_token_of(&resource, se, &first)));
    assert_eq!(st, 401);
    t.gw.shutdown().unwrap();
}

/// Regression: a device refused over AMQP kept its connection (and a slot) until it went idle,
/// though its SASL credential can only be refused again on that connection. Now the gateway
/// closes it `limits.refused_close_secs` after the Rejected answer: a second register on the
/// same connection then fails instead of being answered.
#[test]
fn a_refused_amqp_device_is_disconnected_after_its_answer() {
    use fe2o3_amqp::link::{Receiver, Sender};
    use fe2o3_amqp::session::Session;
    use fe2o3_amqp_types::messaging::{ApplicationProperties, Message, Outcome};
    use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue};
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(false);
    c.limits.refused_close_secs = 1;
    let gw = dps_gateway::start(c, dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ep = Endpoint::read(&dir.path().join("endpoint.json"), "127.0.0.1").unwrap();
    let service = ServiceClient::new(&ep).unwrap();
    let b64 = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let body = format!(
        r#"{{"registrationId":"amqp-refused","attestation":{{"type":"symmetricKey","symmetricKey":{{"primaryKey":"{b64}","secondaryKey":"{b64}"}}}}}}"#
    );
    let (st, text) = rt.block_on(service.call(reqwest::Method::PUT, "/enrollments/amqp-refused", Some(body))).unwrap();
    assert_eq!(st, 200, "{text}");
    let register = || {
        let mut app = OrderedMap::new();
        app.insert("iotdps-operation-type".to_string(), SimpleValue::String("iotdps-register".into()));
        Message::builder()
            .application_properties(ApplicationProperties(app))
            .data(Binary::from(br#"{"registrationId":"amqp-refused"}"#.to_vec()))
            .build()
    };
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect((ep.connect.as_str(), ep.amqp_port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(ep.host.clone()).unwrap();
        let tls = dps_loadgen::tls::client_config(&ep.ca).unwrap();
        let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
        let address = format!("{}/registrations/amqp-refused", ep.id_scope);
        // A token signed with a key the enrollment does not have.
        let se = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 + 3600;
        let token = dps_core::sas::build(&address, b"some other key material", se, Some("registration"));
        let mut conn = fe2o3_amqp::Connection::builder()
            .container_id("amqp-refused")
            .scheme("amqp")
            .hostname(ep.host.as_str())
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain { username: address.clone(), password: token })
            .open_with_stream(stream)
            .await
            .unwrap();
        let mut session = Session::begin(&mut conn).await.unwrap();
        let _receiver = Receiver::attach(&mut session, "dps-receiver", address.as_str()).await.unwrap();
        let mut sender = Sender::attach(&mut session, "dps-sender", address.as_str()).await.unwrap();
        let first = sender.send(register()).await.unwrap();
        assert!(matches!(first, Outcome::Rejected(_)), "the wrong key is refused: {first:?}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let second = tokio::time::timeout(Duration::from_secs(10), sender.send(register())).await.unwrap();
        assert!(second.is_err(), "the connection was closed after the refusal, yet a second register was answered: {second:?}");
    });
    gw.shutdown().unwrap();
}

/// Two nodes on one etcd cluster: a TPM device over HTTPS fetches its challenge from one and
/// answers on the other (behind a balancer the two requests may go anywhere). Regression: the
/// challenge lived in the issuing node's memory, so the answer on the other node was refused.
#[test]
fn a_tpm_challenge_issued_by_one_node_is_answered_on_another() {
    let etcd = etcd_cluster::Cluster::start(1);
    let node_config = || {
        let mut c = config(false);
        c.store.kind = "etcd".into();
        c.store.etcd_endpoints = etcd.clients.clone();
        c
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = dps_gateway::start(node_config(), dir_a.path()).unwrap();
    std::fs::copy(dir_a.path().join("data.key"), dir_b.path().join("data.key")).unwrap();
    let b = dps_gateway::start(node_config(), dir_b.path()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ep_a = Endpoint::read(&dir_a.path().join("endpoint.json"), "127.0.0.1").unwrap();
    let ep_b = Endpoint::read(&dir_b.path().join("endpoint.json"), "127.0.0.1").unwrap();
    assert_eq!(ep_a.id_scope, ep_b.id_scope, "one instance");
    let tpm = SoftTpm::start().unwrap();
    let device = TpmHandle::open(&tpm.tcti()).unwrap();
    let id = "tpm-roaming";
    rt.block_on(ServiceClient::new(&ep_a).unwrap().create_tpm_individual(&[id.to_string()], &device.endorsement_key, 10)).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let body = serde_json::json!({"registrationId": id, "tpm": {"endorsementKey": b64(&device.endorsement_key), "storageRootKey": b64(&device.storage_root_key)}}).to_string();
    let put = |ep: &Endpoint, token: Option<&str>| {
        let tls = dps_loadgen::tls::client_config(&ep.ca).unwrap();
        let addr = format!("127.0.0.1:{}", ep.https_port).parse().unwrap();
        let http = reqwest::Client::builder().use_preconfigured_tls((*tls).clone()).resolve(&ep.host, addr).build().unwrap();
        let url = format!("https://{}:{}/{}/registrations/{id}/register?api-version=2019-03-31", ep.host, ep.https_port, ep.id_scope);
        let mut r = http.put(url).header("Content-Type", "application/json").body(body.clone());
        if let Some(t) = token {
            r = r.header("Authorization", t);
        }
        rt.block_on(async {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        })
    };
    // The challenge from A.
    let (st, v) = put(&ep_a, None);
    assert_eq!(st, 401, "{v}");
    let blob = base64::engine::general_purpose::STANDARD.decode(v["authenticationKey"].as_str().unwrap()).unwrap();
    let resource = dps_core::sas::encode_resource(&format!("{}/registrations/{id}", ep_a.id_scope));
    let se = 4_000_000_000i64;
    let signature = rt.block_on(device.activate_and_sign(blob, format!("{resource}\n{se}").into_bytes())).unwrap();
    let token = dps_loadgen::device::tpm_token_of(&resource, se, &signature);
    // The answer on B: admitted.
    let (st, v) = put(&ep_b, Some(&token));
    assert_eq!(st, 202, "the answer on the other node: {v}");
    // The same answer replayed on A finds the challenge taken (once across all nodes).
    let (st, v) = put(&ep_a, Some(&token));
    assert_eq!((st, v["errorCode"].as_u64()), (401, Some(401002)), "replayed on the issuing node: {v}");
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}
