//! One simulated device's session, per transport: from the TCP connect to its final answer.

use crate::endpoint::Endpoint;
use crate::wire::{open_tls, Plain, Wire, Ws};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use mqttbytes::v4::{self, Connect, Login, Packet, PubAck, Publish, Subscribe};
use mqttbytes::QoS;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a device session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// DPS registration over MQTT on the MQTT port.
    Mqtt,
    /// DPS registration over MQTT in WebSocket frames on the HTTPS port.
    MqttWs,
    /// DPS registration through the HTTPS device API (register, then poll).
    Https,
    /// DPS registration over AMQP (fe2o3-amqp client) on the AMQP port.
    Amqp,
    /// DPS registration over AMQP in WebSocket frames (`AMQPWSB10`) on the HTTPS port.
    AmqpWs,
    /// Only a TLS handshake and close, on the MQTT port: the physical limit.
    TlsHandshake,
    /// The nearest plain-broker equivalent of a registration: CONNECT with username and
    /// password, SUBSCRIBE, PUBLISH to the subscribed topic, receive it (for Mosquitto).
    BrokerSession,
}

impl Transport {
    pub fn parse(s: &str) -> Option<Transport> {
        Some(match s {
            "mqtt" => Transport::Mqtt,
            "mqttws" | "mqtt-ws" => Transport::MqttWs,
            "https" | "http" => Transport::Https,
            "amqp" => Transport::Amqp,
            "amqpws" | "amqp-ws" => Transport::AmqpWs,
            "tls" | "handshake" => Transport::TlsHandshake,
            "broker" | "mosquitto" => Transport::BrokerSession,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::MqttWs => "mqttws",
            Transport::Https => "https",
            Transport::Amqp => "amqp",
            Transport::AmqpWs => "amqpws",
            Transport::TlsHandshake => "tls",
            Transport::BrokerSession => "broker",
        }
    }
}

/// Why a device did not end `assigned`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    Connect,
    Tls,
    WebSocket,
    ConnAck,
    Protocol,
    /// The server closed the connection (or it failed) before the exchange was over.
    Closed,
    /// An error status, with the DPS error code of the body when it had one.
    Status(u16, Option<u32>),
    /// A final answer other than `assigned`: `disabled`, `failed`, `unassigned` (or other).
    NotAssigned(&'static str),
    Timeout,
    /// The device's TPM could not activate the challenge (not built for its keys, or tampered).
    Tpm,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(s, Some(c)) => write!(f, "status {s} errorCode {c}"),
            Failure::Status(s, None) => write!(f, "status {s}"),
            Failure::NotAssigned(s) => write!(f, "final status {s}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// A final registration status other than `assigned`.
pub fn not_assigned(status: Option<&str>) -> Failure {
    Failure::NotAssigned(match status {
        Some("disabled") => "disabled",
        Some("failed") => "failed",
        Some("unassigned") => "unassigned",
        _ => "other",
    })
}

/// The status and DPS error code of an error answer.
fn status_failure(status: u16, body: &serde_json::Value) -> Failure {
    Failure::Status(status, body["errorCode"].as_u64().map(|c| c as u32))
}

/// The broker account a [`Transport::BrokerSession`] logs in with.
#[derive(Debug, Clone)]
pub struct BrokerLogin {
    pub username: String,
    pub password: String,
}

pub struct Session<'a> {
    pub ep: &'a Endpoint,
    pub tls: Arc<rustls::ClientConfig>,
    pub registration_id: &'a str,
    pub key: &'a [u8],
    /// An X.509 device: its TLS client certificate is its credential (no password, no SASL, no
    /// `Authorization`).
    pub x509: bool,
    pub broker: Option<&'a BrokerLogin>,
    pub seq: u32,
    /// The max-frame-size AMQP sessions announce.
    pub amqp_max_frame: u32,
    /// A TPM device (HTTPS and AMQP): its TPM answers the service's challenge and signs.
    pub tpm: Option<&'a crate::tpm_device::TpmHandle>,
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

impl Session<'_> {
    pub async fn run(&self, transport: Transport) -> Result<(), Failure> {
        match transport {
            Transport::Mqtt => {
                let opening = self.dps_opening()?;
                let s = self.tls_connect_with(self.ep.mqtt_port, &opening).await?;
                self.mqtt(&mut Plain(s), None).await
            }
            Transport::MqttWs => {
                let opening = self.dps_opening()?;
                let s = self.tls_connect(self.ep.https_port).await?;
                let mut ws = Ws::connect(s, &self.ep.host, "/$iothub/websocket", "mqtt", self.seq).await.map_err(|_| Failure::WebSocket)?;
                self.mqtt(&mut ws, Some(opening)).await
            }
            Transport::Https => self.https().await,
            Transport::Amqp => {
                let s = self.tls_connect(self.ep.amqp_port).await?;
                self.amqp(s).await
            }
            Transport::AmqpWs => {
                let s = self.tls_connect(self.ep.https_port).await?;
                let ws =
                    Ws::connect(s, &self.ep.host, "/$iothub/websocket", "AMQPWSB10", self.seq).await.map_err(|_| Failure::WebSocket)?;
                self.amqp(crate::wire::into_stream(ws)).await
            }
            Transport::TlsHandshake => self.handshake_only().await,
            Transport::BrokerSession => self.broker_session().await,
        }
    }

    async fn tls_connect(&self, port: u16) -> Result<Tls, Failure> {
        self.tls_connect_with(port, &[]).await
    }

    /// A new TLS session with `first` sent behind the client's Finished (see [`open_tls`]).
    async fn tls_connect_with(&self, port: u16, first: &[u8]) -> Result<Tls, Failure> {
        let tcp = tokio::net::TcpStream::connect((self.ep.connect.as_str(), port)).await.map_err(|_| Failure::Connect)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(self.ep.host.clone()).map_err(|_| Failure::Tls)?;
        open_tls(self.tls.clone(), name, tcp, first).await.map_err(|_| Failure::Tls)
    }

    fn token(&self) -> Result<String, Failure> {
        let se = expiry()?;
        let resource = format!("{}/registrations/{}", self.ep.id_scope, self.registration_id);
        Ok(dps_core::sas::build(&resource, self.key, se, Some("registration")))
    }

    /// The TPM-signed token for a challenge: the string-to-sign goes to the TPM, which
    /// activates the challenge and signs with the key it carried.
    async fn tpm_token(&self, tpm: &crate::tpm_device::TpmHandle, challenge: Vec<u8>) -> Result<String, Failure> {
        let (sr, se) = self.tpm_resource()?;
        let signature = tpm.activate_and_sign(challenge, format!("{sr}\n{se}").into_bytes()).await.map_err(|_| Failure::Tpm)?;
        Ok(tpm_token_of(&sr, se, &signature))
    }

    /// The encoded resource and expiry a TPM token signs.
    fn tpm_resource(&self) -> Result<(String, i64), Failure> {
        let resource = format!("{}/registrations/{}", self.ep.id_scope, self.registration_id);
        Ok((dps_core::sas::encode_resource(&resource), expiry()?))
    }

    /// Handshake, close_notify, then wait for the server's close: one full TLS session and
    /// nothing else.
    async fn handshake_only(&self) -> Result<(), Failure> {
        let mut s = self.tls_connect(self.ep.mqtt_port).await?;
        s.shutdown().await.map_err(|_| Failure::Protocol)?;
        let mut sink = [0u8; 1024];
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
    }

    /// CONNECT (client id = registration id), SUBSCRIBE to `filter` and a QoS 1 PUBLISH of
    /// `{"registrationId":…}` to `topic`, in one buffer: sent together, as a client that
    /// pipelines does.
    fn opening(&self, login: Login, filter: &str, topic: &str) -> Result<BytesMut, Failure> {
        let mut out = BytesMut::with_capacity(1024);
        let mut c = Connect::new(self.registration_id);
        c.keep_alive = 60;
        c.login = Some(login);
        c.write(&mut out).map_err(|_| Failure::Protocol)?;
        let mut sub = Subscribe::new(filter, QoS::AtLeastOnce);
        sub.pkid = 1;
        sub.write(&mut out).map_err(|_| Failure::Protocol)?;
        let mut p = Publish::new(topic, QoS::AtLeastOnce, format!("{{\"registrationId\":\"{}\"}}", self.registration_id));
        p.pkid = 2;
        p.write(&mut out).map_err(|_| Failure::Protocol)?;
        Ok(out)
    }

    /// The same flights as a DPS registration: the opening behind the handshake, the PUBACK,
    /// DISCONNECT and close_notify together at the end.
    async fn broker_session(&self) -> Result<(), Failure> {
        let login = self.broker.ok_or(Failure::Protocol)?;
        let topic = format!("loadgen/{}", self.registration_id);
        let login = Login::new(login.username.clone(), login.password.clone());
        let opening = self.opening(login, &topic, &topic)?;
        let mut w = Plain(self.tls_connect_with(self.ep.mqtt_port, &opening).await?);
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            match read_packet(&mut w, &mut buf).await? {
                Packet::ConnAck(a) if a.code != v4::ConnectReturnCode::Success => return Err(Failure::ConnAck),
                Packet::Publish(p) => {
                    let mut o = BytesMut::new();
                    PubAck::new(p.pkid).write(&mut o).map_err(|_| Failure::Protocol)?;
                    v4::Disconnect.write(&mut o).map_err(|_| Failure::Protocol)?;
                    w.finish(&o).await;
                    return Ok(());
                }
                _ => {}
            }
        }
    }

    async fn amqp<Io>(&self, stream: Io) -> Result<(), Failure>
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    {
        let dev = crate::amqp_device::AmqpDevice {
            host: &self.ep.host,
            id_scope: &self.ep.id_scope,
            registration_id: self.registration_id,
            token: if self.x509 || self.tpm.is_some() { None } else { Some(self.token()?) },
            max_frame: self.amqp_max_frame,
            tpm: match self.tpm {
                Some(t) => Some((t, self.tpm_resource()?)),
                None => None,
            },
        };
        dev.provision(stream).await
    }

    /// The DPS opening: CONNECT with the registration's login, SUBSCRIBE to the responses, the
    /// register request.
    fn dps_opening(&self) -> Result<BytesMut, Failure> {
        let id = self.registration_id;
        let password = if self.x509 { String::new() } else { self.token()? };
        let login =
            Login::new(format!("{}/registrations/{id}/api-version=2019-03-31&ClientVersion=dps-loadgen", self.ep.id_scope), password);
        self.opening(login, "$dps/registrations/res/#", "$dps/registrations/PUT/iotdps-register/?$rid=1")
    }

    /// CONNECT, SUBSCRIBE and the register request pipelined (as the SDKs' transports allow;
    /// `opening` if they are still to be sent, else they went with the handshake), then the
    /// answers; polls while `assigning`. The PUBACK of the final answer, the DISCONNECT and
    /// the close leave together, as in the broker session.
    async fn mqtt<W: Wire>(&self, w: &mut W, opening: Option<BytesMut>) -> Result<(), Failure> {
        if let Some(opening) = opening {
            w.send(&opening).await.map_err(|_| Failure::Protocol)?;
        }
        let mut buf = BytesMut::with_capacity(4096);
        let mut rid = 2u16;
        loop {
            match read_packet(w, &mut buf).await? {
                Packet::ConnAck(a) if a.code != v4::ConnectReturnCode::Success => return Err(Failure::ConnAck),
                Packet::Publish(p) => {
                    let mut ack = BytesMut::new();
                    PubAck::new(p.pkid).write(&mut ack).map_err(|_| Failure::Protocol)?;
                    let status: u16 = p.topic.split('/').nth(3).and_then(|x| x.parse().ok()).ok_or(Failure::Protocol)?;
                    let body: serde_json::Value = serde_json::from_slice(&p.payload).map_err(|_| Failure::Protocol)?;
                    let answer = (status, body["status"].as_str());
                    if answer == (200, Some("assigned")) {
                        v4::Disconnect.write(&mut ack).map_err(|_| Failure::Protocol)?;
                        w.finish(&ack).await;
                        return Ok(());
                    }
                    w.send(&ack).await.map_err(|_| Failure::Protocol)?;
                    match answer {
                        (200, st) => return Err(not_assigned(st)),
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
                            w.send(&o).await.map_err(|_| Failure::Protocol)?;
                        }
                        (st, _) => return Err(status_failure(st, &body)),
                    }
                }
                _ => {}
            }
        }
    }

    /// The HTTPS device API: register (202), wait Retry-After, poll until final. A new client,
    /// so a new connection, per device.
    async fn https(&self) -> Result<(), Failure> {
        let addr = format!("{}:{}", self.ep.connect, self.ep.https_port).parse().map_err(|_| Failure::Connect)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*self.tls).clone())
            .resolve(&self.ep.host, addr)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|_| Failure::Tls)?;
        let id = self.registration_id;
        let base = format!("https://{}:{}/{}/registrations/{id}", self.ep.host, self.ep.https_port, self.ep.id_scope);
        let register_body = match self.tpm {
            Some(t) => serde_json::json!({"registrationId": id, "tpm": {
                "endorsementKey": B64.encode(&t.endorsement_key), "storageRootKey": B64.encode(&t.storage_root_key)}}),
            None => serde_json::json!({ "registrationId": id }),
        }
        .to_string();
        let register = |token: &str| {
            let r = http.put(format!("{base}/register?api-version=2019-03-31"));
            let r = if token.is_empty() { r } else { r.header("Authorization", token) };
            r.header("Content-Type", "application/json; charset=utf-8").body(register_body.clone()).send()
        };
        let token = match self.tpm {
            // A TPM device first asks for its challenge (a 401 carrying it), then signs.
            Some(tpm) => {
                let r = register("").await.map_err(|_| Failure::Connect)?;
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.map_err(|_| Failure::Protocol)?;
                let challenge = match (status, body["authenticationKey"].as_str()) {
                    (401, Some(k)) => B64.decode(k).map_err(|_| Failure::Protocol)?,
                    _ => return Err(status_failure(status, &body)),
                };
                self.tpm_token(tpm, challenge).await?
            }
            None if self.x509 => String::new(),
            None => self.token()?,
        };
        let auth = |r: reqwest::RequestBuilder| if token.is_empty() { r } else { r.header("Authorization", &token) };
        let r = register(&token).await.map_err(|_| Failure::Connect)?;
        let retry_of = |r: &reqwest::Response| r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(2u64);
        let mut status = r.status().as_u16();
        let mut retry = retry_of(&r);
        let mut body: serde_json::Value = r.json().await.map_err(|_| Failure::Protocol)?;
        loop {
            match (status, body["status"].as_str()) {
                (200, Some("assigned")) => return self.tpm_assigned(&body).await,
                (200, st) => return Err(not_assigned(st)),
                (202, _) => {
                    tokio::time::sleep(Duration::from_secs(retry)).await;
                    let op = body["operationId"].as_str().ok_or(Failure::Protocol)?.to_string();
                    let r = auth(http.get(format!("{base}/operations/{op}?api-version=2019-03-31")))
                        .send()
                        .await
                        .map_err(|_| Failure::Connect)?;
                    status = r.status().as_u16();
                    retry = retry_of(&r);
                    body = r.json().await.map_err(|_| Failure::Protocol)?;
                }
                (st, _) => return Err(status_failure(st, &body)),
            }
        }
    }
}

impl Session<'_> {
    /// A TPM device imports the `authenticationKey` of its assigned result (its hub key), as
    /// the SDKs do; one without it is a protocol failure.
    async fn tpm_assigned(&self, result: &serde_json::Value) -> Result<(), Failure> {
        let Some(tpm) = self.tpm else { return Ok(()) };
        let key = result["registrationState"]["tpm"]["authenticationKey"].as_str().ok_or(Failure::Protocol)?;
        tpm.activate(B64.decode(key).map_err(|_| Failure::Protocol)?).await.map_err(|_| Failure::Tpm)
    }
}

/// Unix seconds an hour from now (the Node SDK's token lifetime).
fn expiry() -> Result<i64, Failure> {
    Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|_| Failure::Protocol)?.as_secs() as i64 + 3600)
}

/// `SharedAccessSignature sr=…&sig=…&se=…&skn=registration` around a TPM's HMAC.
pub fn tpm_token_of(encoded_resource: &str, expiry: i64, signature: &[u8]) -> String {
    let sig = dps_core::sas::encode_resource(&B64.encode(signature));
    format!("SharedAccessSignature sr={encoded_resource}&sig={sig}&se={expiry}&skn=registration")
}

async fn read_packet<W: Wire>(w: &mut W, buf: &mut BytesMut) -> Result<Packet, Failure> {
    loop {
        match v4::read(buf, 1 << 20) {
            Ok(p) => return Ok(p),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return Err(Failure::Protocol),
        }
        if w.recv(buf).await.map_err(|_| Failure::Protocol)? == 0 {
            return Err(Failure::Protocol);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// A wire that plays the server's packets back and notes what the device writes.
    struct Scripted {
        incoming: BytesMut,
        sends: Vec<Vec<u8>>,
        finished: Option<Vec<u8>>,
        closes: usize,
    }

    impl Wire for Scripted {
        async fn send(&mut self, b: &[u8]) -> io::Result<()> {
            self.sends.push(b.to_vec());
            Ok(())
        }
        async fn recv(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
            let n = self.incoming.len();
            buf.extend_from_slice(&self.incoming.split());
            Ok(n)
        }
        async fn close(&mut self) {
            self.closes += 1;
        }
        async fn finish(&mut self, last: &[u8]) {
            self.finished = Some(last.to_vec());
        }
    }

    /// The final answer's PUBACK and the DISCONNECT are the device's last bytes, handed over
    /// in one piece to go out with the close (they were two sends and a close).
    #[tokio::test]
    async fn the_assigned_answer_is_acknowledged_and_left_in_one_piece() {
        let mut incoming = BytesMut::new();
        v4::ConnAck::new(v4::ConnectReturnCode::Success, false).write(&mut incoming).unwrap();
        let mut answer = Publish::new(
            "$dps/registrations/res/200/?$rid=1",
            QoS::AtLeastOnce,
            r#"{"operationId":"op","status":"assigned","registrationState":{"assignedHub":"h","deviceId":"d"}}"#,
        );
        answer.pkid = 7;
        answer.write(&mut incoming).unwrap();
        let ep = Endpoint {
            id_scope: "0ne00000001".into(),
            host: "localhost".into(),
            connect: "127.0.0.1".into(),
            mqtt_port: 0,
            amqp_port: 0,
            https_port: 0,
            ca: "unused".into(),
            service_cs: String::new(),
        };
        let roots = rustls::RootCertStore::empty();
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let session = Session {
            ep: &ep,
            tls,
            registration_id: "dev-1",
            key: b"key",
            x509: false,
            broker: None,
            seq: 0,
            amqp_max_frame: 0,
            tpm: None,
        };
        let mut w = Scripted { incoming, sends: Vec::new(), finished: None, closes: 0 };
        session.mqtt(&mut w, None).await.unwrap();
        let mut expected = BytesMut::new();
        PubAck::new(7).write(&mut expected).unwrap();
        v4::Disconnect.write(&mut expected).unwrap();
        assert!(w.sends.is_empty(), "sent apart: {:?}", w.sends);
        assert_eq!(w.closes, 0);
        assert_eq!(w.finished.as_deref(), Some(&expected[..]));
    }
}
