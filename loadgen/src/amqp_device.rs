//! A device session over AMQP with the fe2o3-amqp client (on this tokio runtime): an AMQP
//! implementation written by someone else checks the gateway from the other side. SASL PLAIN
//! with the SAS token, one session, a receiver and a sender link at
//! `{idScope}/registrations/{registrationId}`, the register request (then polls while
//! `assigning`), as the official SDKs do (docs/device-protocol.md §4).

use crate::device::Failure;
use fe2o3_amqp::connection::Connection;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::Session;
use fe2o3_amqp_types::messaging::{ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Value};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

pub struct AmqpDevice<'a> {
    pub host: &'a str,
    pub id_scope: &'a str,
    pub registration_id: &'a str,
    /// The SAS token (SASL PLAIN); None for an X.509 device, which opens without SASL and is
    /// known by its TLS client certificate.
    pub token: Option<String>,
    /// The max-frame-size announced in `open`.
    pub max_frame: u32,
    /// A TPM device: its TPM, and the encoded resource and expiry its token signs. SASL runs
    /// the `TPM` mechanism before the AMQP client opens the connection.
    pub tpm: Option<(&'a crate::tpm_device::TpmHandle, (String, i64))>,
}

fn request(operation: &str, operation_id: Option<&str>, rid: u64, body: &str) -> Message<Data> {
    let mut app = OrderedMap::new();
    app.insert("iotdps-operation-type".to_string(), SimpleValue::String(operation.to_string()));
    if let Some(op) = operation_id {
        app.insert("iotdps-operation-id".to_string(), SimpleValue::String(op.to_string()));
    }
    Message::builder()
        .properties(Properties { correlation_id: Some(MessageId::String(format!("loadgen-{rid}"))), ..Default::default() })
        .application_properties(ApplicationProperties(app))
        .data(Binary::from(body.as_bytes().to_vec()))
        .build()
}

/// The status and DPS error code a Rejected outcome carries (the description is the DPS error
/// JSON, docs/device-protocol.md §4.9).
fn rejected(description: Option<&str>) -> Failure {
    let v: serde_json::Value = description.and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
    let code = v["errorCode"].as_u64().map(|c| c as u32);
    Failure::Status(code.map_or(0, |c| (c / 1000) as u16), code)
}

impl AmqpDevice<'_> {
    pub async fn provision<Io>(&self, mut stream: Io) -> Result<(), Failure>
    where
        Io: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    {
        let user = format!("{}/registrations/{}", self.id_scope, self.registration_id);
        let builder =
            Connection::builder().container_id(self.registration_id).scheme("amqp").hostname(self.host).max_frame_size(self.max_frame);
        if let Some((tpm, (sr, se))) = &self.tpm {
            let to_sign = format!("{sr}\n{se}");
            let token_for = |sig: &[u8]| crate::device::tpm_token_of(sr, *se, sig);
            crate::amqp_tpm::sasl_tpm(&mut stream, self.id_scope, self.registration_id, tpm, &to_sign, token_for).await?;
        }
        let opened = match &self.token {
            Some(t) => {
                builder.sasl_profile(SaslProfile::Plain { username: user.clone(), password: t.clone() }).open_with_stream(stream).await
            }
            None => builder.open_with_stream(stream).await,
        };
        let mut conn = opened.map_err(|e| match e {
            fe2o3_amqp::connection::OpenError::SaslError { .. } => Failure::Status(401, None),
            _ => Failure::Protocol,
        })?;
        let result = self.exchange(&mut conn, &user).await;
        let _ = conn.close().await;
        result
    }

    async fn exchange(&self, conn: &mut fe2o3_amqp::connection::ConnectionHandle<()>, address: &str) -> Result<(), Failure> {
        let mut session = Session::begin(conn).await.map_err(|_| Failure::Protocol)?;
        let mut receiver = Receiver::attach(&mut session, "dps-receiver", address).await.map_err(|_| Failure::Protocol)?;
        let mut sender = Sender::attach(&mut session, "dps-sender", address).await.map_err(|_| Failure::Protocol)?;
        let body = format!("{{\"registrationId\":\"{}\"}}", self.registration_id);
        let mut msg = request("iotdps-register", None, 1, &body);
        let mut rid = 1;
        let outcome = loop {
            match sender.send(msg).await.map_err(|_| Failure::Protocol)? {
                Outcome::Accepted(_) => {}
                Outcome::Rejected(r) => break Err(rejected(r.error.as_ref().and_then(|e| e.description.as_deref()))),
                _ => break Err(Failure::Protocol),
            }
            let delivery = receiver.recv::<Body<Value>>().await.map_err(|_| Failure::Protocol)?;
            let _ = receiver.accept(&delivery).await;
            let json: Vec<u8> = match delivery.body() {
                Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
                _ => return Err(Failure::Protocol),
            };
            let v: serde_json::Value = serde_json::from_slice(&json).map_err(|_| Failure::Protocol)?;
            match v["status"].as_str() {
                Some("assigned") => match &self.tpm {
                    // The hub key the SDKs import from the assigned result.
                    Some((tpm, _)) => {
                        let key = v["registrationState"]["tpm"]["authenticationKey"].as_str().ok_or(Failure::Protocol)?;
                        use base64::Engine;
                        let blob = base64::engine::general_purpose::STANDARD.decode(key).map_err(|_| Failure::Protocol)?;
                        break tpm.activate(blob).await.map_err(|_| Failure::Tpm);
                    }
                    None => break Ok(()),
                },
                Some("assigning" | "unassigned") if v["operationId"].is_string() && rid < 20 => {
                    let retry = delivery
                        .message()
                        .application_properties
                        .as_ref()
                        .and_then(|a| match a.0.get("retry-after") {
                            Some(SimpleValue::String(s)) => s.parse().ok(),
                            _ => None,
                        })
                        .unwrap_or(2u64);
                    tokio::time::sleep(Duration::from_secs(retry)).await;
                    rid += 1;
                    msg = request("iotdps-get-operationstatus", v["operationId"].as_str(), rid, "");
                }
                st => break Err(crate::device::not_assigned(st)),
            }
        };
        let _ = sender.close().await;
        let _ = receiver.close().await;
        let _ = session.end().await;
        outcome
    }
}
