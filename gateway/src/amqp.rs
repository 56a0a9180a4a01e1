//! DPS over AMQP 1.0 (spec device-protocol.md §4) on any byte stream (TLS on the AMQP port, or
//! a WebSocket with subprotocol `AMQPWSB10`): SASL PLAIN, one session, the client's receiver
//! and sender links, requests settled Accepted (or Rejected with the DPS error) and answered on
//! the receiver link. Encoding and decoding live in `dps_core::amqp`.

use crate::provisioning::{DeviceAuth, Provisioning};
use crate::server::{mono_nanos, utc_now};
use crate::stream::{ByteStream, End};
use dps_core::amqp::{self, reply, FRAME_AMQP, FRAME_SASL};
use fe2o3_amqp_types::definitions::{Handle, Role};
use fe2o3_amqp_types::messaging::TargetArchetype;
use fe2o3_amqp_types::performatives::{Attach, Performative};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Largest frame either side may send.
const MAX_FRAME: u32 = 64 * 1024;

struct Conn<'a, S> {
    s: &'a mut S,
    buf: Vec<u8>,
}

impl<S: ByteStream> Conn<'_, S> {
    async fn fill(&mut self, want: usize, timeout: Duration, stop: &AtomicBool) -> Result<(), End> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 8192];
        while self.buf.len() < want {
            let n = crate::stream::read_before(self.s, &mut chunk, deadline, stop).await.map_err(End::from)?;
            if n == 0 {
                return Err(End::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }

    async fn header(&mut self, timeout: Duration, stop: &AtomicBool) -> Result<[u8; 8], End> {
        self.fill(8, timeout, stop).await?;
        let mut h = [0u8; 8];
        h.copy_from_slice(&self.buf[..8]);
        self.buf.drain(..8);
        Ok(h)
    }

    async fn frame(&mut self, timeout: Duration, stop: &AtomicBool) -> Result<amqp::Frame, End> {
        loop {
            match amqp::parse_frame(&self.buf, MAX_FRAME) {
                Ok(Some((f, used))) => {
                    self.buf.drain(..used);
                    return Ok(f);
                }
                Ok(None) => {
                    let want = self.buf.len() + 1;
                    self.fill(want, timeout, stop).await?;
                }
                Err(e) => return Err(End::Malformed(format!("{e:?}"))),
            }
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), End> {
        self.s.send(bytes).await.map_err(|_| End::Closed)
    }

    async fn send(&mut self, channel: u16, p: &Performative, payload: &[u8]) -> Result<(), End> {
        let mut body = amqp::encode_performative(p).map_err(End::Malformed)?;
        body.extend_from_slice(payload);
        self.send_raw(&amqp::encode_frame(FRAME_AMQP, channel, &body)).await
    }
}

fn address_of(a: &Attach) -> Option<String> {
    let addr = match a.role {
        // The client's receiver names its source, its sender its target.
        Role::Receiver => a.source.as_ref().and_then(|s| s.address.clone()),
        Role::Sender => match a.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.clone(),
            _ => None,
        },
    };
    addr.map(|a| a.to_string())
}

/// Serves one AMQP connection to its end.
pub async fn serve_amqp<S: ByteStream>(
    s: &mut S,
    protocol: &'static str,
    prov: &Provisioning,
    stop: &AtomicBool,
    limits: &crate::config::Limits,
) -> End {
    let mut c = Conn { s, buf: Vec::new() };
    match run(&mut c, protocol, prov, stop, limits).await {
        Ok(()) => End::Closed,
        Err(e) => e,
    }
}

async fn run<S: ByteStream>(
    c: &mut Conn<'_, S>,
    protocol: &'static str,
    prov: &Provisioning,
    stop: &AtomicBool,
    limits: &crate::config::Limits,
) -> Result<(), End> {
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    // SASL layer: symmetric-key devices use PLAIN (spec device-protocol.md §4.2, §4.3).
    let header = c.header(idle, stop).await?;
    if header != amqp::SASL_HEADER {
        // The plain AMQP header means X.509 (not served yet); anything else is not AMQP.
        c.send_raw(&amqp::SASL_HEADER).await?;
        return Err(End::Refused("no SASL layer (X.509 attestation is not supported yet)"));
    }
    c.send_raw(&amqp::SASL_HEADER).await?;
    let mechs = reply::sasl_mechanisms(&["PLAIN"]).map_err(End::Malformed)?;
    c.send_raw(&amqp::encode_frame(FRAME_SASL, 0, &mechs)).await?;
    let init = c.frame(idle, stop).await?;
    let (mechanism, response) = reply::sasl_init(&init.body).map_err(End::Malformed)?;
    let identity = (mechanism == "PLAIN").then(|| amqp::parse_plain(&response)).flatten().and_then(|(user, password)| {
        let u = dps_core::device::parse_username(&user)?;
        dps_core::sas::parse(&password).ok()?;
        Some((u, password))
    });
    let Some((user, password)) = identity else {
        let outcome = reply::sasl_outcome(false).map_err(End::Malformed)?;
        c.send_raw(&amqp::encode_frame(FRAME_SASL, 0, &outcome)).await?;
        return Err(End::Refused("SASL: not PLAIN with {idScope}/registrations/{id} and a SAS token"));
    };
    let outcome = reply::sasl_outcome(true).map_err(End::Malformed)?;
    c.send_raw(&amqp::encode_frame(FRAME_SASL, 0, &outcome)).await?;
    if c.header(idle, stop).await? != amqp::AMQP_HEADER {
        return Err(End::Malformed("expected the AMQP protocol header after SASL".into()));
    }
    c.send_raw(&amqp::AMQP_HEADER).await?;

    let mut channel = 0u16;
    let mut our_sender: Option<Handle> = None;
    let mut next_delivery: u32 = 0;
    let mut incoming: u32 = 0;
    // A transfer split over several frames (`more`), with its delivery id.
    let mut partial: Option<(u32, Vec<u8>)> = None;
    loop {
        let f = c.frame(idle, stop).await?;
        if f.body.is_empty() {
            continue; // heartbeat
        }
        let (p, payload) = amqp::decode_performative(&f.body).map_err(End::Malformed)?;
        match p {
            Performative::Open(_) => c.send(0, &reply::open("dps", MAX_FRAME), &[]).await?,
            Performative::Begin(_) => {
                channel = f.channel;
                c.send(channel, &reply::begin(f.channel), &[]).await?;
            }
            Performative::Attach(a) => {
                let matches = address_of(&a)
                    .and_then(|addr| amqp::link_address_identity(&addr))
                    .is_some_and(|(scope, id)| scope == user.id_scope && id.eq_ignore_ascii_case(&user.registration_id));
                c.send(channel, &reply::attach(&a), &[]).await?;
                if !matches {
                    let why = "the link address is not {idScope}/registrations/{registrationId} of the authenticated device".to_string();
                    c.send(channel, &reply::detach(&a.handle, Some(("amqp:unauthorized-access", why))), &[]).await?;
                    continue;
                }
                match a.role {
                    Role::Receiver => our_sender = Some(a.handle.clone()),
                    Role::Sender => {
                        let dc = a.initial_delivery_count.unwrap_or(0);
                        c.send(channel, &reply::credit(&a.handle, dc, 100, incoming, next_delivery), &[]).await?;
                    }
                }
            }
            Performative::Transfer(t) => {
                let id = match (&partial, t.delivery_id) {
                    (Some((id, _)), _) => *id,
                    (None, Some(id)) => id,
                    (None, None) => return Err(End::Malformed("transfer without a delivery id".into())),
                };
                let mut data = partial.take().map(|(_, d)| d).unwrap_or_default();
                data.extend_from_slice(payload);
                if data.len() > limits.max_mqtt_packet_bytes {
                    c.send(0, &reply::close(Some(("amqp:frame-size-too-small", "message over the size limit".into()))), &[]).await?;
                    return Err(End::Malformed("message over the size limit".into()));
                }
                if t.more {
                    partial = Some((id, data));
                    continue;
                }
                incoming = id.wrapping_add(1);
                let req = match amqp::parse_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        c.send(channel, &reply::settle(id, Some((400, e, None))), &[]).await?;
                        continue;
                    }
                };
                let auth =
                    DeviceAuth { id_scope: &user.id_scope, registration_id: &user.registration_id, token: Some(&password), protocol };
                let answer = match req.operation_type.as_deref() {
                    Some("iotdps-register") => prov.register(auth, &req.body, utc_now(), mono_nanos()).await,
                    Some("iotdps-get-operationstatus") => {
                        prov.operation_status(auth, req.operation_id.as_deref().unwrap_or(""), utc_now(), mono_nanos()).await
                    }
                    other => {
                        let why = format!("unknown iotdps-operation-type {other:?}");
                        c.send(channel, &reply::settle(id, Some((400, why, None))), &[]).await?;
                        continue;
                    }
                };
                if answer.status >= 300 {
                    // Failures settle the request Rejected, never as a response without status
                    // (Node would fail on it), spec device-protocol.md §4.9.
                    c.send(channel, &reply::settle(id, Some((answer.status, answer.body, answer.retry_after))), &[]).await?;
                    continue;
                }
                c.send(channel, &reply::settle(id, None), &[]).await?;
                let Some(h) = our_sender.clone() else { continue };
                let msg = amqp::encode_response(req.correlation_id, &answer.body, answer.retry_after).map_err(End::Malformed)?;
                c.send(channel, &reply::transfer(&h, next_delivery), &msg).await?;
                next_delivery = next_delivery.wrapping_add(1);
            }
            Performative::Flow(_) | Performative::Disposition(_) => {}
            Performative::Detach(d) => c.send(channel, &reply::detach(&d.handle, None), &[]).await?,
            Performative::End(_) => c.send(channel, &reply::end(), &[]).await?,
            Performative::Close(_) => {
                c.send(0, &reply::close(None), &[]).await?;
                return Ok(());
            }
        }
    }
}
