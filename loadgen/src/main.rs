//! `loadgen`: simulated devices provisioning against a DPS endpoint (ours or any other).
//! Each device opens a new TLS connection (full handshake) and, over MQTT, CONNECTs with a SAS
//! token derived from an enrollment group key, subscribes, registers, and waits for its final
//! answer (polling while `assigning`); over HTTPS it PUTs register and polls the operation. Latency is measured from the device's start to its answer
//! into an hdrhistogram; errors are counted by kind.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use clap::Parser;
use hdrhistogram::Histogram;
use mqttbytes::v4::{self, Connect, Login, Packet, PubAck, Publish, Subscribe};
use mqttbytes::QoS;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Clone)]
#[command(about = "Provision simulated devices over MQTT/TLS and report latencies")]
struct Args {
    /// endpoint.json written by `dps serve` (ID scope, host, ports, CA, service connection string).
    #[arg(long)]
    endpoint: std::path::PathBuf,
    /// Devices to provision.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Devices in flight at once (each on its own connection).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Enrollment group whose derived keys the devices use; created (symmetric key) if missing.
    #[arg(long, default_value = "loadgen")]
    group: String,
    /// Prefix of registration ids: `{prefix}-{n}`.
    #[arg(long, default_value = "loadgen-dev")]
    prefix: String,
    /// Host to connect to (default: 127.0.0.1); TLS still verifies `hostName` from endpoint.json.
    #[arg(long, default_value = "127.0.0.1")]
    connect: String,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the result as one JSON line too.
    #[arg(long)]
    json: bool,
    /// Device transport: `mqtt` (TLS on the MQTT port) or `https` (device REST API; a new
    /// client, so a new TLS connection, per device).
    #[arg(long, default_value = "mqtt")]
    transport: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Endpoint {
    id_scope: String,
    host: String,
    mqtt_port: u16,
    https_port: u16,
    ca: std::path::PathBuf,
    service_cs: String,
}

fn read_endpoint(p: &std::path::Path) -> Result<Endpoint, BoxError> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p)?)?;
    let s = |k: &str| v[k].as_str().map(str::to_string).ok_or_else(|| format!("endpoint.json has no {k}"));
    let port = |k: &str| v["ports"][k].as_u64().map(|p| p as u16).ok_or_else(|| format!("endpoint.json has no ports.{k}"));
    Ok(Endpoint {
        id_scope: s("idScope")?,
        host: s("hostName")?,
        mqtt_port: port("mqtt")?,
        https_port: port("https")?,
        ca: s("caCertificate")?.into(),
        service_cs: s("serviceConnectionString")?,
    })
}

/// Creates the group if needed and returns its primary key, through the service API.
async fn group_key(ep: &Endpoint, connect: &str, group: &str) -> Result<Vec<u8>, BoxError> {
    let ca = std::fs::read(&ep.ca)?;
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .resolve(&ep.host, format!("{connect}:{}", ep.https_port).parse()?)
        .build()?;
    let cs = dps_core::model::parse_connection_string(&ep.service_cs).ok_or("bad service connection string")?;
    let se = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64 + 3600;
    let token = dps_core::sas::build(&cs.host_name, &B64.decode(&cs.key)?, se, Some(&cs.key_name));
    let base = format!("https://{}:{}", ep.host, ep.https_port);
    let body = serde_json::json!({"enrollmentGroupId": group, "attestation": {"type": "symmetricKey"}});
    let r = http
        .put(format!("{base}/enrollmentGroups/{group}?api-version=2021-10-01"))
        .header("Authorization", &token)
        .body(body.to_string())
        .send()
        .await?;
    if !(r.status().is_success() || r.status().as_u16() == 409) {
        return Err(format!("creating group {group}: {} {}", r.status(), r.text().await?).into());
    }
    let r = http
        .post(format!("{base}/enrollmentGroups/{group}/attestationmechanism?api-version=2021-10-01"))
        .header("Authorization", &token)
        .send()
        .await?;
    let v: serde_json::Value = r.json().await?;
    let k = v["symmetricKey"]["primaryKey"].as_str().ok_or("group has no symmetric key")?;
    Ok(B64.decode(k)?)
}

/// Verifies the server's chain once per distinct chain and name, then trusts that exact chain
/// again; the handshake signature (proof the server holds the key) is checked every time. A
/// fleet of devices each verifies the chain itself, but one simulator host need not spend its
/// share of the CPU on the same verification thousands of times.
#[derive(Debug)]
struct CachingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    verified: Mutex<std::collections::HashSet<(Vec<u8>, String)>>,
}

impl rustls::client::danger::ServerCertVerifier for CachingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = end_entity.to_vec();
        for i in intermediates {
            chain.extend_from_slice(i);
        }
        let key = (chain, format!("{server_name:?}"));
        if self.verified.lock().map(|v| v.contains(&key)).unwrap_or(false) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if let Ok(mut v) = self.verified.lock() {
            v.insert(key);
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn tls_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = Arc::new(CachingVerifier { inner, verified: Mutex::new(Default::default()) });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // A new full handshake per device, as a fleet powering on would do.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Error kinds as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Connect,
    Tls,
    ConnAck,
    Protocol,
    Status(u16),
    NotAssigned,
    Timeout,
}

struct Device<'a> {
    ep: &'a Endpoint,
    connect: &'a str,
    tls: Arc<rustls::ClientConfig>,
    group_key: &'a [u8],
    ca_pem: &'a [u8],
}

async fn read_packet<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Result<Packet, Failure> {
    loop {
        match v4::read(buf, 1 << 20) {
            Ok(p) => return Ok(p),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return Err(Failure::Protocol),
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.map_err(|_| Failure::Protocol)?;
        if n == 0 {
            return Err(Failure::Protocol);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Device<'_> {
    fn token(&self, registration_id: &str) -> Result<String, Failure> {
        let key = B64.decode(dps_core::sas::derive_device_key(self.group_key, registration_id)).map_err(|_| Failure::Protocol)?;
        let se = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|_| Failure::Protocol)?.as_secs() as i64 + 3600;
        Ok(dps_core::sas::build(&format!("{}/registrations/{registration_id}", self.ep.id_scope), &key, se, Some("registration")))
    }

    /// The HTTPS device API: register (202), wait Retry-After, poll until final.
    async fn provision_https(&self, registration_id: &str) -> Result<(), Failure> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem).map_err(|_| Failure::Tls)?)
            .resolve(&self.ep.host, format!("{}:{}", self.connect, self.ep.https_port).parse().map_err(|_| Failure::Connect)?)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|_| Failure::Tls)?;
        let token = self.token(registration_id)?;
        let base = format!("https://{}:{}/{}/registrations/{registration_id}", self.ep.host, self.ep.https_port, self.ep.id_scope);
        let r = http
            .put(format!("{base}/register?api-version=2019-03-31"))
            .header("Authorization", &token)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(format!("{{\"registrationId\":\"{registration_id}\"}}"))
            .send()
            .await
            .map_err(|_| Failure::Connect)?;
        let mut status = r.status().as_u16();
        let mut retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(2u64);
        let mut body: serde_json::Value = r.json().await.map_err(|_| Failure::Protocol)?;
        loop {
            match (status, body["status"].as_str()) {
                (200, Some("assigned")) => return Ok(()),
                (200, _) => return Err(Failure::NotAssigned),
                (202, _) => {
                    tokio::time::sleep(Duration::from_secs(retry)).await;
                    let op = body["operationId"].as_str().ok_or(Failure::Protocol)?.to_string();
                    let r = http
                        .get(format!("{base}/operations/{op}?api-version=2019-03-31"))
                        .header("Authorization", &token)
                        .send()
                        .await
                        .map_err(|_| Failure::Connect)?;
                    status = r.status().as_u16();
                    retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(2);
                    body = r.json().await.map_err(|_| Failure::Protocol)?;
                }
                (st, _) => return Err(Failure::Status(st)),
            }
        }
    }

    async fn provision(&self, registration_id: &str) -> Result<(), Failure> {
        let tcp = tokio::net::TcpStream::connect((self.connect, self.ep.mqtt_port)).await.map_err(|_| Failure::Connect)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(self.ep.host.clone()).map_err(|_| Failure::Tls)?;
        let mut s = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.map_err(|_| Failure::Tls)?;
        let token = self.token(registration_id)?;
        let mut out = BytesMut::with_capacity(1024);
        let mut c = Connect::new(registration_id);
        c.keep_alive = 60;
        c.login = Some(Login::new(
            format!("{}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=dps-loadgen", self.ep.id_scope),
            token,
        ));
        c.write(&mut out).map_err(|_| Failure::Protocol)?;
        let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
        sub.pkid = 1;
        sub.write(&mut out).map_err(|_| Failure::Protocol)?;
        let mut reg = Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtLeastOnce,
            format!("{{\"registrationId\":\"{registration_id}\"}}"),
        );
        reg.pkid = 2;
        reg.write(&mut out).map_err(|_| Failure::Protocol)?;
        // Pipelined as the SDKs' transports allow: CONNECT, SUBSCRIBE and the register request.
        s.write_all(&out).await.map_err(|_| Failure::Protocol)?;
        let mut buf = BytesMut::with_capacity(4096);
        let mut rid = 2u16;
        loop {
            match read_packet(&mut s, &mut buf).await? {
                Packet::ConnAck(a) if a.code != v4::ConnectReturnCode::Success => return Err(Failure::ConnAck),
                Packet::Publish(p) => {
                    let mut ack = BytesMut::new();
                    PubAck::new(p.pkid).write(&mut ack).map_err(|_| Failure::Protocol)?;
                    s.write_all(&ack).await.map_err(|_| Failure::Protocol)?;
                    let status: u16 = p.topic.split('/').nth(3).and_then(|x| x.parse().ok()).ok_or(Failure::Protocol)?;
                    let body: serde_json::Value = serde_json::from_slice(&p.payload).map_err(|_| Failure::Protocol)?;
                    match (status, body["status"].as_str()) {
                        (200, Some("assigned")) => {
                            let mut d = BytesMut::new();
                            v4::Disconnect.write(&mut d).map_err(|_| Failure::Protocol)?;
                            let _ = s.write_all(&d).await;
                            let _ = s.shutdown().await;
                            return Ok(());
                        }
                        (200, _) => return Err(Failure::NotAssigned),
                        (202, _) => {
                            let retry = p.topic.split("retry-after=").nth(1).and_then(|x| x.parse().ok()).unwrap_or(2u64);
                            tokio::time::sleep(Duration::from_secs(retry)).await;
                            rid += 1;
                            let op = body["operationId"].as_str().ok_or(Failure::Protocol)?;
                            let mut q = Publish::new(
                                format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}"),
                                QoS::AtLeastOnce,
                                " ",
                            );
                            q.pkid = rid;
                            let mut o = BytesMut::new();
                            q.write(&mut o).map_err(|_| Failure::Protocol)?;
                            s.write_all(&o).await.map_err(|_| Failure::Protocol)?;
                        }
                        (st, _) => return Err(Failure::Status(st)),
                    }
                }
                _ => {}
            }
        }
    }
}

fn main() -> Result<(), BoxError> {
    let a = Args::parse();
    let ep = read_endpoint(&a.endpoint)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(a.threads.max(1)).enable_all().build()?;
    let key = rt.block_on(group_key(&ep, &a.connect, &a.group))?;
    let tls = tls_config(&ep.ca)?;
    if !["mqtt", "https"].contains(&a.transport.as_str()) {
        return Err(format!("unknown transport '{}': mqtt or https", a.transport).into());
    }
    let ca_pem = Arc::new(std::fs::read(&ep.ca)?);
    let next = Arc::new(AtomicUsize::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let errors = Arc::new(Mutex::new(BTreeMap::<Failure, usize>::new()));
    let started = Instant::now();
    let ep = Arc::new(ep);
    let key = Arc::new(key);
    let progress_every = (a.devices / 10).max(1);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..a.concurrency {
            let (ep, key, tls, next, hist, errors, a, ca_pem) =
                (ep.clone(), key.clone(), tls.clone(), next.clone(), hist.clone(), errors.clone(), a.clone(), ca_pem.clone());
            tasks.push(tokio::spawn(async move {
                let dev = Device { ep: &ep, connect: &a.connect, tls, group_key: &key, ca_pem: &ca_pem };
                let mut local = Histogram::<u64>::new(3).ok();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.devices {
                        break;
                    }
                    let t = Instant::now();
                    let id = format!("{}-{i}", a.prefix);
                    let work = async {
                        if a.transport == "https" {
                            dev.provision_https(&id).await
                        } else {
                            dev.provision(&id).await
                        }
                    };
                    let r = tokio::time::timeout(Duration::from_secs(30), work).await.unwrap_or(Err(Failure::Timeout));
                    match r {
                        Ok(()) => {
                            if let Some(h) = local.as_mut() {
                                let _ = h.record(t.elapsed().as_micros() as u64);
                            }
                        }
                        Err(f) => {
                            if let Ok(mut e) = errors.lock() {
                                *e.entry(f).or_default() += 1;
                            }
                        }
                    }
                    if (i + 1) % progress_every == 0 {
                        eprintln!("progress: {} of {} devices started", i + 1, a.devices);
                    }
                }
                if let (Some(l), Ok(mut h)) = (local, hist.lock()) {
                    let _ = h.add(l);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let h = hist.lock().map_err(|_| "poisoned")?;
    let errs = errors.lock().map_err(|_| "poisoned")?;
    let ok = h.len();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!("{} provisioning: {} devices, concurrency {}, new TLS connection per device", a.transport, a.devices, a.concurrency);
    println!("| registrations/s | p50 ms | p99 ms | p99.9 ms | max ms | assigned | errors |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {ok} | {} |",
        ok as f64 / elapsed,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        errs.values().sum::<usize>()
    );
    for (k, v) in errs.iter() {
        println!("error {k:?}: {v}");
    }
    if a.json {
        let e: serde_json::Map<String, serde_json::Value> = errs.iter().map(|(k, v)| (format!("{k:?}"), (*v).into())).collect();
        println!(
            "{}",
            serde_json::json!({"transport": a.transport, "devices": a.devices, "concurrency": a.concurrency, "seconds": elapsed,
                "registrations_per_s": ok as f64 / elapsed, "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
                "max_ms": h.max() as f64 / 1000.0, "assigned": ok, "errors": e})
        );
    }
    Ok(())
}
