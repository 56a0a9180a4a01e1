//! DPS over MQTT 3.1.1 (spec device-protocol.md §3), on any byte stream (TLS on the MQTT port,
//! or a WebSocket on the HTTPS port). Framing by mqttbytes, size-capped before a packet is
//! buffered; registration logic in [`Provisioning`].

use crate::provisioning::{DeviceAuth, Provisioning};
use crate::server::{mono_nanos, utc_now};
use crate::stream::{ByteStream, End};
use bytes::BytesMut;
use dps_core::device::{parse_request_topic, parse_username, response_topic, TopicRequest, RESPONSE_FILTER};
use mqttbytes::v4::{self, ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck};
use mqttbytes::QoS;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

struct Conn<'a, S> {
    s: &'a mut S,
    buf: BytesMut,
    /// Packets queued for the device, written together before the next wait for input: a
    /// client that pipelines CONNECT, SUBSCRIBE and PUBLISH gets CONNACK, SUBACK, PUBACK and the
    /// response in one TLS record and one write, in order.
    out: BytesMut,
    max: usize,
    next_pkid: u16,
}

impl<S: ByteStream> Conn<'_, S> {
    /// Next packet, waiting at most `timeout` for it; checks `stop` every 250 ms.
    async fn next(&mut self, timeout: Duration, stop: &AtomicBool) -> Result<Packet, End> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            match v4::read(&mut self.buf, self.max) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(_)) => return Err(End::TooLarge),
                Err(e) => return Err(End::Malformed(format!("{e:?}"))),
            }
            self.flush().await?;
            let n = crate::stream::read_before(self.s, &mut chunk, deadline, stop).await.map_err(End::from)?;
            if n == 0 {
                return Err(End::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Queues a packet (written at the next wait for input, or by [`Conn::send`]).
    fn queue(&mut self, write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>) -> Result<(), End> {
        write(&mut self.out).map(|_| ()).map_err(|e| End::Malformed(format!("encode: {e:?}")))
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = self.out.split();
        self.s.send(&out).await.map_err(|_| End::Closed)
    }

    /// Queues a packet and writes everything queued now.
    async fn send(&mut self, write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>) -> Result<(), End> {
        self.queue(write)?;
        self.flush().await
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }
}

/// Serves one MQTT connection to its end.
pub async fn serve_mqtt<S: ByteStream>(
    s: &mut S,
    protocol: &'static str,
    prov: &Provisioning,
    stop: &AtomicBool,
    limits: &crate::config::Limits,
) -> End {
    let mut c =
        Conn { s, buf: BytesMut::with_capacity(4096), out: BytesMut::with_capacity(1024), max: limits.max_mqtt_packet_bytes, next_pkid: 0 };
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let connect = match c.next(idle, stop).await {
        Ok(Packet::Connect(connect)) => connect,
        Ok(_) => return End::ProtocolViolation("first packet is not CONNECT"),
        Err(e) => return e,
    };
    let refuse = |code| move |b: &mut BytesMut| ConnAck::new(code, false).write(b);
    let Some(login) = connect.login else {
        // No username: X.509 devices connect like this; X.509 attestation is not served yet.
        let _ = c.send(refuse(ConnectReturnCode::NotAuthorized)).await;
        return End::Refused("no username (X.509 attestation is not supported yet)");
    };
    let Some(user) = parse_username(&login.username) else {
        let _ = c.send(refuse(ConnectReturnCode::BadUserNamePassword)).await;
        return End::Refused("username is not {idScope}/registrations/{registrationId}/...");
    };
    // Every SDK uses the registration id as the client id.
    if user.registration_id != connect.client_id {
        let _ = c.send(refuse(ConnectReturnCode::BadClientId)).await;
        return End::Refused("client id differs from the registration id");
    }
    // An unusable credential is refused at CONNACK; a well-formed token is checked against the
    // enrollment list when the device registers, and failures answer 401 on the response topic
    // (spec device-protocol.md §3.3).
    if dps_core::sas::parse(&login.password).is_err() {
        let _ = c.send(refuse(ConnectReturnCode::NotAuthorized)).await;
        return End::Refused("password is not a SAS token");
    }
    // Session present is always 0: DPS sessions are not persistent and C# aborts otherwise.
    if let Err(e) = c.queue(|b| ConnAck::new(ConnectReturnCode::Success, false).write(b)) {
        return e;
    }
    let keep_alive = match connect.keep_alive {
        0 => idle,
        k => Duration::from_millis(u64::from(k) * 1500),
    };
    let auth = || DeviceAuth { id_scope: &user.id_scope, registration_id: &user.registration_id, token: Some(&login.password), protocol };
    loop {
        let packet = match c.next(keep_alive, stop).await {
            Ok(p) => p,
            Err(e) => return e,
        };
        let sent = match packet {
            Packet::Subscribe(sub) => {
                let codes = sub
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path == RESPONSE_FILTER {
                            SubscribeReasonCode::Success(QoS::AtLeastOnce)
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                c.queue(|b| SubAck::new(sub.pkid, codes).write(b))
            }
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    return End::ProtocolViolation("QoS 2 publish");
                }
                let Some(req) = parse_request_topic(&p.topic) else {
                    return End::ProtocolViolation("publish to a topic DPS does not serve");
                };
                if p.qos == QoS::AtLeastOnce {
                    // C# needs the PUBACK before the response (spec device-protocol.md §3.6).
                    if let Err(e) = c.queue(|b| PubAck::new(p.pkid).write(b)) {
                        return e;
                    }
                }
                let (rid, reply) = match req {
                    TopicRequest::Register { rid } => (rid, prov.register(auth(), &p.payload, utc_now(), mono_nanos()).await),
                    TopicRequest::OperationStatus { rid, operation_id } => {
                        (rid, prov.operation_status(auth(), &operation_id, utc_now(), mono_nanos()).await)
                    }
                };
                let mut out =
                    Publish::new(response_topic(reply.status, &rid, reply.retry_after), QoS::AtLeastOnce, reply.body.into_bytes());
                out.pkid = c.pkid();
                c.queue(|b| out.write(b))
            }
            Packet::PubAck(_) => Ok(()),
            Packet::PingReq => c.queue(|b| PingResp.write(b)),
            Packet::Unsubscribe(u) => c.queue(|b| UnsubAck::new(u.pkid).write(b)),
            Packet::Disconnect => {
                // Answers to what came before the DISCONNECT still go out.
                let _ = c.flush().await;
                return End::Disconnect;
            }
            Packet::Connect(_) => return End::ProtocolViolation("second CONNECT"),
            _ => return End::ProtocolViolation("packet a client does not send"),
        };
        if let Err(e) = sent {
            return e;
        }
    }
}
