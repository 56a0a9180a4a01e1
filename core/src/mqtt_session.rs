//! The MQTT 3.1.1 session of a device, without I/O (docs/device-protocol.md §3): bytes in
//! ([`Session::receive`]), packets out ([`Session::take_output`]), device requests raised as
//! [`Event`]s and answered with [`Session::answer`]. The host only moves bytes and enforces the
//! read deadline the session names ([`Session::read_timeout_secs`]).
//!
//! Framing is mqttbytes', behind our own checks of the fixed header's first byte, so a packet
//! no client sends is refused before its body is waited for.

use crate::device::{parse_request_topic, parse_username, response_topic, RESPONSE_FILTER};
use crate::request::{CertChain, Credential, DeviceRequest};
use bytes::BytesMut;
use mqttbytes::v4::{self, ConnAck, Connect, ConnectReturnCode, Packet, PingResp, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck};
use mqttbytes::QoS;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Largest packet accepted (fixed header included).
    pub max_packet: usize,
    /// Read deadline before CONNECT, and for a client that asks for no keep-alive.
    pub idle_secs: u64,
    /// The client certificate chain the TLS handshake carried: an X.509 device's credential
    /// when its CONNECT has no password.
    pub client_certificate: Option<CertChain>,
    /// This instance's ID scope: a CONNECT for another is refused at once (CONNACK 5), so a
    /// stranger holds no connection slot waiting for a register that cannot succeed.
    pub id_scope: String,
    /// The largest keep-alive honoured: a client asking for more (up to 18 h in MQTT) is held
    /// to this, so an idle connection cannot pin a slot for hours.
    pub max_keep_alive_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A register or operation status request; answer it with [`Session::answer`] and its rid.
    Request { rid: String, request: DeviceRequest },
}

/// How a session ended. Anything queued (a refusing CONNACK, answers before a DISCONNECT) is
/// still in [`Session::take_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Disconnect,
    TooLarge,
    Malformed(String),
    Refused(&'static str),
    ProtocolViolation(&'static str),
}

/// Who the device said it is at CONNECT.
#[derive(Debug, Clone)]
struct Identity {
    id_scope: String,
    registration_id: String,
    credential: Credential,
}

#[derive(Debug)]
pub struct Session {
    settings: Settings,
    input: BytesMut,
    output: BytesMut,
    identity: Option<Identity>,
    keep_alive_secs: u16,
    next_pkid: u16,
    ended: Option<Ended>,
}

const CONNECT: u8 = 1;

impl Session {
    pub fn new(settings: Settings) -> Session {
        Session {
            settings,
            input: BytesMut::with_capacity(4096),
            output: BytesMut::with_capacity(1024),
            identity: None,
            keep_alive_secs: 0,
            next_pkid: 0,
            ended: None,
        }
    }

    pub fn receive(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// What to write to the device now: everything queued since the last call, so a client
    /// that pipelines CONNECT, SUBSCRIBE and PUBLISH gets CONNACK, SUBACK, PUBACK and the
    /// response in one write, in order.
    pub fn take_output(&mut self) -> BytesMut {
        self.output.split()
    }

    /// The longest the host waits for the next bytes: 1.5 × the keep-alive the client asked
    /// for (MQTT 3.1.1 §3.1.2.10), or the idle timeout before CONNECT and without keep-alive.
    pub fn read_timeout_secs(&self) -> u64 {
        match self.keep_alive_secs {
            0 => self.settings.idle_secs,
            k => u64::from(k).min(self.settings.max_keep_alive_secs) * 3 / 2,
        }
    }

    /// True once CONNECT was accepted: what a device must reach within the login deadline.
    pub fn connected(&self) -> bool {
        self.identity.is_some()
    }

    fn end(&mut self, why: Ended) -> Result<Option<Event>, Ended> {
        self.ended = Some(why.clone());
        Err(why)
    }

    fn queue(&mut self, write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>) -> Result<(), Ended> {
        write(&mut self.output).map(|_| ()).map_err(|e| Ended::Malformed(format!("encode: {e:?}")))
    }

    /// Handles buffered packets until one raises an event, more bytes are needed (`Ok(None)`)
    /// or the session ends.
    pub fn poll(&mut self) -> Result<Option<Event>, Ended> {
        loop {
            if let Some(e) = &self.ended {
                return Err(e.clone());
            }
            // The packet type is in the first byte: refuse what no client sends before waiting
            // for a body its remaining length may claim to be megabytes long.
            if let Some(first) = self.input.first().map(|b| b >> 4) {
                if first == 0 || first == 15 {
                    return self.end(Ended::ProtocolViolation("reserved packet type"));
                }
                if self.identity.is_none() && first != CONNECT {
                    return self.end(Ended::ProtocolViolation("first packet is not CONNECT"));
                }
            }
            let packet = match v4::read(&mut self.input, self.settings.max_packet) {
                Ok(p) => p,
                Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(_)) => return self.end(Ended::TooLarge),
                Err(e) => return self.end(Ended::Malformed(format!("{e:?}"))),
            };
            let step = match packet {
                Packet::Connect(c) if self.identity.is_none() => self.connect(c),
                Packet::Connect(_) => Err(Ended::ProtocolViolation("second CONNECT")),
                Packet::Subscribe(sub) => {
                    // Only the response topic filter is served (QoS 1); anything else fails.
                    let codes = sub
                        .filters
                        .iter()
                        .map(|f| match f.path == RESPONSE_FILTER {
                            true => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                            false => SubscribeReasonCode::Failure,
                        })
                        .collect();
                    self.queue(|b| SubAck::new(sub.pkid, codes).write(b))
                }
                Packet::Publish(p) => return self.publish(p),
                Packet::PubAck(_) => Ok(()),
                Packet::PingReq => self.queue(|b| PingResp.write(b)),
                Packet::Unsubscribe(u) => self.queue(|b| UnsubAck::new(u.pkid).write(b)),
                Packet::Disconnect => Err(Ended::Disconnect),
                _ => Err(Ended::ProtocolViolation("packet a client does not send")),
            };
            if let Err(e) = step {
                return self.end(e);
            }
        }
    }

    /// CONNECT rules (docs/device-protocol.md §3.2). An unusable credential is refused at
    /// CONNACK; a well-formed token is judged against the enrollment list when the device
    /// registers, and a failure there answers 401 on the response topic (§3.3).
    fn connect(&mut self, c: Connect) -> Result<(), Ended> {
        let refuse = |s: &mut Self, code: ConnectReturnCode, why: &'static str| {
            s.queue(|b| ConnAck::new(code, false).write(b))?;
            Err(Ended::Refused(why))
        };
        let Some(login) = c.login else {
            // Every SDK sends a username, X.509 devices too (without a password).
            return refuse(self, ConnectReturnCode::NotAuthorized, "no username");
        };
        let Some(user) = parse_username(&login.username) else {
            return refuse(self, ConnectReturnCode::BadUserNamePassword, "username is not {idScope}/registrations/{registrationId}/...");
        };
        // Every SDK uses the registration id as the client id.
        if user.registration_id != c.client_id {
            return refuse(self, ConnectReturnCode::BadClientId, "client id differs from the registration id");
        }
        if user.id_scope != self.settings.id_scope {
            return refuse(self, ConnectReturnCode::NotAuthorized, "unknown ID scope");
        }
        let credential = match (login.password.is_empty(), &self.settings.client_certificate) {
            // X.509: no password; the certificate is judged when the device registers.
            (true, Some(chain)) => Credential::ClientCertificate(chain.clone()),
            (true, None) => return refuse(self, ConnectReturnCode::NotAuthorized, "neither a password nor a client certificate"),
            (false, _) if crate::sas::parse(&login.password).is_err() => {
                return refuse(self, ConnectReturnCode::NotAuthorized, "password is not a SAS token")
            }
            (false, _) => Credential::SasToken(login.password),
        };
        // Session present is always 0: DPS sessions are not persistent and C# aborts otherwise.
        self.queue(|b| ConnAck::new(ConnectReturnCode::Success, false).write(b))?;
        self.keep_alive_secs = c.keep_alive;
        self.identity = Some(Identity { id_scope: user.id_scope, registration_id: user.registration_id, credential });
        Ok(())
    }

    fn publish(&mut self, p: Publish) -> Result<Option<Event>, Ended> {
        if p.qos == QoS::ExactlyOnce {
            return self.end(Ended::ProtocolViolation("QoS 2 publish"));
        }
        let Some((rid, operation)) = parse_request_topic(&p.topic, &p.payload) else {
            return self.end(Ended::ProtocolViolation("publish to a topic DPS does not serve"));
        };
        if p.qos == QoS::AtLeastOnce {
            // C# needs the PUBACK before the response (docs/device-protocol.md §3.6).
            if let Err(e) = self.queue(|b| PubAck::new(p.pkid).write(b)) {
                return self.end(e);
            }
        }
        let Some(me) = self.identity.clone() else {
            return self.end(Ended::ProtocolViolation("publish before CONNECT"));
        };
        let request = DeviceRequest { id_scope: me.id_scope, registration_id: me.registration_id, credential: me.credential, operation };
        Ok(Some(Event::Request { rid, request }))
    }

    /// Answers the request `rid` on the response topic (QoS 1).
    pub fn answer(&mut self, rid: &str, status: u16, body: &str, retry_after: Option<u64>) -> Result<(), Ended> {
        let mut out = Publish::new(response_topic(status, rid, retry_after), QoS::AtLeastOnce, body.as_bytes().to_vec());
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        out.pkid = self.next_pkid;
        self.queue(|b| out.write(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Operation;
    use mqttbytes::v4::{Disconnect, Login, PingReq, Subscribe};

    const USER: &str = "0ne1/registrations/dev-1/api-version=2019-03-31&ClientVersion=test";

    fn settings() -> Settings {
        Settings { max_packet: 4096, idle_secs: 60, client_certificate: None, id_scope: "0ne1".into(), max_keep_alive_secs: 300 }
    }

    fn token() -> String {
        crate::sas::build("0ne1/registrations/dev-1", b"key", 4_000_000_000, Some("registration"))
    }

    fn connect(client_id: &str, login: Option<(&str, &str)>, keep_alive: u16) -> BytesMut {
        let mut c = Connect::new(client_id);
        c.keep_alive = keep_alive;
        c.login = login.map(|(u, p)| Login::new(u, p));
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        b
    }

    fn publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> BytesMut {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        b
    }

    fn packets(mut out: BytesMut) -> Vec<Packet> {
        let mut v = Vec::new();
        while !out.is_empty() {
            v.push(v4::read(&mut out, 1 << 20).unwrap());
        }
        v
    }

    fn connected(keep_alive: u16) -> Session {
        let mut s = Session::new(settings());
        s.receive(&connect("dev-1", Some((USER, &token())), keep_alive));
        assert_eq!(s.poll(), Ok(None));
        assert!(matches!(packets(s.take_output())[..], [Packet::ConnAck(ConnAck { code: ConnectReturnCode::Success, .. })]));
        s
    }

    #[test]
    fn a_pipelined_registration() {
        let mut s = Session::new(settings());
        let mut wire = connect("dev-1", Some((USER, &token())), 60);
        let mut sub = BytesMut::new();
        Subscribe::new(RESPONSE_FILTER, QoS::AtLeastOnce).write(&mut sub).unwrap();
        wire.extend_from_slice(&sub);
        wire.extend_from_slice(&publish("$dps/registrations/PUT/iotdps-register/?$rid=7", QoS::AtLeastOnce, 9, b"{}"));
        // Byte by byte: the session asks for more until a request is whole.
        let mut event = None;
        for b in wire.iter() {
            s.receive(&[*b]);
            if let Some(e) = s.poll().unwrap() {
                event = Some(e);
            }
        }
        let Some(Event::Request { rid, request }) = event else { panic!("no request") };
        assert_eq!(rid, "7");
        assert_eq!((request.id_scope.as_str(), request.registration_id.as_str()), ("0ne1", "dev-1"));
        assert_eq!(request.credential, Credential::SasToken(token()));
        assert_eq!(request.operation, Operation::Register { body: b"{}".to_vec() });
        s.answer(&rid, 200, "{\"status\":\"assigned\"}", None).unwrap();
        let out = packets(s.take_output());
        assert!(matches!(out[0], Packet::ConnAck(_)));
        assert!(matches!(&out[1], Packet::SubAck(a) if a.return_codes == [SubscribeReasonCode::Success(QoS::AtLeastOnce)]));
        assert!(matches!(&out[2], Packet::PubAck(a) if a.pkid == 9), "PUBACK before the response");
        let Packet::Publish(r) = &out[3] else { panic!("{:?}", out[3]) };
        assert_eq!((r.topic.as_str(), r.qos, r.pkid), ("$dps/registrations/res/200/?$rid=7", QoS::AtLeastOnce, 1));
        assert_eq!(s.read_timeout_secs(), 90, "1.5 x keep-alive");
        assert!(s.connected());
        // A keep-alive above the cap is held to it (regression: up to ~27 h was trusted).
        let mut s = Session::new(settings());
        s.receive(&connect("dev-1", Some((USER, &token())), u16::MAX));
        assert_eq!(s.poll(), Ok(None));
        assert_eq!(s.read_timeout_secs(), 450);
    }

    #[test]
    fn packets_no_client_sends_end_the_session_before_their_body_arrives() {
        // Regression: a reserved type (0x00) with a long remaining length was held open until
        // the idle timeout, waiting for a body.
        for first in [&[0x00u8, 0xFF, 0x1F][..], &[0x00, 0xFF, 0xFF, 0x7F], &[0xF0, 0xFF, 0x1F]] {
            let mut s = Session::new(settings());
            s.receive(first);
            assert_eq!(s.poll(), Err(Ended::ProtocolViolation("reserved packet type")), "{first:?}");
        }
        let mut s = Session::new(settings());
        s.receive(&[0x30, 0xFF, 0x7F]);
        assert_eq!(s.poll(), Err(Ended::ProtocolViolation("first packet is not CONNECT")));
        let mut s = connected(0);
        s.receive(&[0x00, 0xFF, 0x7F]);
        assert_eq!(s.poll(), Err(Ended::ProtocolViolation("reserved packet type")));
        assert_eq!(s.poll(), Err(Ended::ProtocolViolation("reserved packet type")), "ended stays ended");
        // Over the size cap: refused from the fixed header alone.
        let mut s = Session::new(settings());
        s.receive(&[0x10, 0xFF, 0xFF, 0x03]);
        assert_eq!(s.poll(), Err(Ended::TooLarge));
    }

    #[test]
    fn connect_rules() {
        let t = token();
        type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, ConnectReturnCode);
        let foreign = "0ne2/registrations/dev-1/api-version=2019-03-31";
        let cases: [Case; 6] = [
            ("dev-1", Some((foreign, &t)), ConnectReturnCode::NotAuthorized),
            ("dev-1", None, ConnectReturnCode::NotAuthorized),
            ("dev-1", Some((USER, "")), ConnectReturnCode::NotAuthorized),
            ("dev-1", Some(("garbage", &t)), ConnectReturnCode::BadUserNamePassword),
            ("someone-else", Some((USER, &t)), ConnectReturnCode::BadClientId),
            ("dev-1", Some((USER, "not a token")), ConnectReturnCode::NotAuthorized),
        ];
        for (client, login, code) in cases {
            let mut s = Session::new(settings());
            s.receive(&connect(client, login, 0));
            assert!(matches!(s.poll(), Err(Ended::Refused(_))));
            assert!(matches!(&packets(s.take_output())[..], [Packet::ConnAck(a)] if a.code == code), "{code:?}");
        }
        // No password: an X.509 device, admitted to registration only with a client certificate.
        let chain: CertChain = std::sync::Arc::new(vec![vec![0x30, 0x00]]);
        let mut s = Session::new(Settings { client_certificate: Some(chain.clone()), ..settings() });
        s.receive(&connect("dev-1", Some((USER, "")), 0));
        assert_eq!(s.poll(), Ok(None));
        s.receive(&publish("$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::AtLeastOnce, 1, b""));
        let Ok(Some(Event::Request { request, .. })) = s.poll() else { panic!() };
        assert_eq!(request.credential, Credential::ClientCertificate(chain));
        let mut s = connected(0);
        assert_eq!(s.read_timeout_secs(), 60, "no keep-alive: the idle timeout");
        s.receive(&connect("dev-1", Some((USER, &t)), 0));
        assert_eq!(s.poll(), Err(Ended::ProtocolViolation("second CONNECT")));
    }

    #[test]
    fn publishes_subscriptions_and_the_rest() {
        let mut s = connected(30);
        let mut sub = BytesMut::new();
        Subscribe::new("devices/#", QoS::AtLeastOnce).write(&mut sub).unwrap();
        s.receive(&sub);
        let mut ping = BytesMut::new();
        PingReq.write(&mut ping).unwrap();
        s.receive(&ping);
        let poll = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=1.0.x";
        s.receive(&publish(poll, QoS::AtMostOnce, 0, b""));
        let Ok(Some(Event::Request { rid, request })) = s.poll() else { panic!() };
        assert_eq!((rid.as_str(), request.operation), ("2", Operation::OperationStatus { operation_id: "1.0.x".into() }));
        let out = packets(s.take_output());
        assert!(matches!(&out[0], Packet::SubAck(a) if a.return_codes == [SubscribeReasonCode::Failure]));
        assert!(matches!(out[1], Packet::PingResp));
        assert_eq!(out.len(), 2, "QoS 0: no PUBACK");
        s.answer("2", 429, "{}", Some(3)).unwrap();
        let Packet::Publish(r) = &packets(s.take_output())[0] else { panic!() };
        assert_eq!(r.topic, "$dps/registrations/res/429/?$rid=2&retry-after=3");

        s.receive(&publish("devices/dev-1/messages/events/?$rid=1", QoS::AtLeastOnce, 3, b""));
        assert_eq!(s.poll(), Err(Ended::ProtocolViolation("publish to a topic DPS does not serve")));
        let mut s = connected(0);
        s.receive(&publish("$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::ExactlyOnce, 3, b""));
        assert_eq!(s.poll(), Err(Ended::ProtocolViolation("QoS 2 publish")));
        let mut s = connected(0);
        let mut d = BytesMut::new();
        Disconnect.write(&mut d).unwrap();
        s.receive(&d);
        assert_eq!(s.poll(), Err(Ended::Disconnect));
    }
}
