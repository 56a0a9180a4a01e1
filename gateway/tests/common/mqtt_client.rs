//! A blocking MQTT 3.1.1 test client over rustls, speaking DPS like the SDKs do.
#![allow(dead_code)]

use bytes::BytesMut;
use mqttbytes::v4::{self, Connect, Login, Packet, PubAck, Publish, Subscribe};
use mqttbytes::QoS;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

pub struct MqttClient {
    pub tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: BytesMut,
    pkid: u16,
}

pub fn tls_config(ca_pem: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A client configuration that presents a certificate chain.
pub fn client_auth_config(ca_pem: &std::path::Path, chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = chain.iter().map(|c| rustls::pki_types::CertificateDer::from(c.clone())).collect();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key_pkcs8.to_vec().into());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap(),
    )
}

impl MqttClient {
    pub fn open(port: u16, ca: &std::path::Path) -> MqttClient {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ClientConnection::new(tls_config(ca), "localhost".try_into().unwrap()).unwrap();
        MqttClient { tls: rustls::StreamOwned::new(conn, tcp), buf: BytesMut::new(), pkid: 0 }
    }

    /// A connection that presents a client certificate chain (DER, leaf first) with its key.
    pub fn open_with_certificate(port: u16, ca: &std::path::Path, chain: &[Vec<u8>], key_pkcs8: &[u8]) -> MqttClient {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ClientConnection::new(client_auth_config(ca, chain, key_pkcs8), "localhost".try_into().unwrap()).unwrap();
        MqttClient { tls: rustls::StreamOwned::new(conn, tcp), buf: BytesMut::new(), pkid: 0 }
    }

    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).unwrap();
        self.tls.flush().unwrap();
    }

    fn send(&mut self, f: impl FnOnce(&mut BytesMut)) {
        let mut out = BytesMut::new();
        f(&mut out);
        self.write_raw(&out);
    }

    /// The next packet, or None when the server closed the connection.
    pub fn read(&mut self) -> Option<Packet> {
        self.read_within(Duration::from_secs(10)).unwrap_or_else(|| panic!("server did not answer"))
    }

    /// The next packet (inner None: the server closed the connection), or None when nothing
    /// came within `wait`.
    pub fn read_within(&mut self, wait: Duration) -> Option<Option<Packet>> {
        self.tls.get_ref().set_read_timeout(Some(wait)).unwrap();
        let mut chunk = [0u8; 4096];
        loop {
            match v4::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(Some(p)),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from server: {e:?}"),
            }
            match self.tls.read(&mut chunk) {
                Ok(0) => return Some(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => return None,
                Err(_) => return Some(None),
            }
        }
    }

    /// CONNECT with the DPS username; returns the CONNACK return code.
    pub fn connect(&mut self, scope: &str, registration_id: &str, client_id: &str, password: &str) -> u8 {
        let mut c = Connect::new(client_id);
        c.keep_alive = 60;
        c.login = Some(Login::new(
            format!("{scope}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=test%2F1.0"),
            password.to_string(),
        ));
        self.send(|b| {
            c.write(b).unwrap();
        });
        match self.read() {
            Some(Packet::ConnAck(a)) => {
                assert!(!a.session_present);
                a.code as u8
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// CONNECT with any user name (a device at a broker); returns the CONNACK return code, or
    /// None when the broker closed the connection instead.
    pub fn connect_as(&mut self, username: &str, client_id: &str, password: &str) -> Option<u8> {
        let mut c = Connect::new(client_id);
        c.keep_alive = 60;
        c.login = Some(Login::new(username, password));
        self.send(|b| {
            c.write(b).unwrap();
        });
        match self.read() {
            Some(Packet::ConnAck(a)) => Some(a.code as u8),
            None => None,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// SUBSCRIBE to one filter; true when granted (false also when the server closes the
    /// connection instead). Publishes that arrive first are kept in `received`.
    pub fn subscribe_to(&mut self, filter: &str, received: &mut Vec<Publish>) -> bool {
        self.pkid += 1;
        let mut s = Subscribe::new(filter, QoS::AtMostOnce);
        s.pkid = self.pkid;
        self.send(|b| {
            s.write(b).unwrap();
        });
        loop {
            match self.read() {
                Some(Packet::SubAck(a)) => {
                    assert_eq!(a.pkid, self.pkid);
                    return a.return_codes.iter().all(|c| matches!(c, mqttbytes::v4::SubscribeReasonCode::Success(_)));
                }
                Some(Packet::Publish(p)) => received.push(p),
                None => return false,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    pub fn subscribe(&mut self) {
        self.pkid += 1;
        let s = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
        let mut s = s;
        s.pkid = self.pkid;
        self.send(|b| {
            s.write(b).unwrap();
        });
        match self.read() {
            Some(Packet::SubAck(a)) => assert_eq!(a.pkid, self.pkid),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes a request (QoS 1) and returns (status, topic, JSON body) of the response.
    pub fn request(&mut self, topic: &str, body: &[u8]) -> (u16, String, serde_json::Value) {
        self.pkid += 1;
        let mut p = Publish::new(topic, QoS::AtLeastOnce, body.to_vec());
        p.pkid = self.pkid;
        self.send(|b| {
            p.write(b).unwrap();
        });
        match self.read() {
            Some(Packet::PubAck(a)) => assert_eq!(a.pkid, self.pkid, "PUBACK comes first"),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        match self.read() {
            Some(Packet::Publish(r)) => {
                assert_eq!(r.qos, QoS::AtLeastOnce);
                let pkid = r.pkid;
                self.send(|b| {
                    PubAck::new(pkid).write(b).unwrap();
                });
                let status: u16 = r.topic.strip_prefix("$dps/registrations/res/").unwrap().split('/').next().unwrap().parse().unwrap();
                let body =
                    serde_json::from_slice(&r.payload).unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", r.payload));
                (status, r.topic, body)
            }
            other => panic!("expected the response PUBLISH, got {other:?}"),
        }
    }

    pub fn register(&mut self, rid: &str, body: &[u8]) -> (u16, String, serde_json::Value) {
        self.request(&format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"), body)
    }

    pub fn poll(&mut self, rid: &str, operation_id: &str) -> (u16, String, serde_json::Value) {
        self.request(&format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}"), b" ")
    }

    /// True when the server closes the connection (without sending anything first).
    pub fn closed(&mut self) -> bool {
        self.read().is_none()
    }
}

pub fn device_token(scope: &str, registration_id: &str, key_b64: &str) -> String {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.decode(key_b64).unwrap();
    let se = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 + 3600;
    dps_core::sas::build(&format!("{scope}/registrations/{registration_id}"), &key, se, Some("registration"))
}
