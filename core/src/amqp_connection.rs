//! The server side of one DPS AMQP connection, without I/O: bytes in ([`Connection::receive`]),
//! bytes out ([`Connection::take_output`]), and events for the host ([`Connection::poll`]).
//!
//! Phases: protocol header; SASL (PLAIN with a SAS token; the `TPM` mechanism's nonce
//! challenge, docs/device-protocol.md §4.4) or no SASL layer at all when the device presented
//! a TLS client certificate (X.509, §4.2); the AMQP header; then open, begin, the attach of the
//! device's two links at `{idScope}/registrations/{registrationId}`, link credit, request
//! transfers (possibly in several frames) and their dispositions, responses split to the peer's
//! max-frame-size, detach, end and close.

use crate::amqp::{self, reply, FRAME_AMQP, FRAME_SASL};
use crate::error::ServiceError;
pub use crate::request::Credential;
use crate::request::DeviceRequest;
use fe2o3_amqp_types::definitions::{Handle, Role};
use fe2o3_amqp_types::messaging::{MessageId, TargetArchetype};
use fe2o3_amqp_types::performatives::{Attach, Performative};

/// AMQP's smallest max-frame-size (AMQP 1.0 §2.7.1); a peer asking for less gets this.
pub const MIN_MAX_FRAME: u32 = 512;
/// Data bytes per TPM challenge segment: SASL frames come before `open`, so each frame must
/// fit the 512-byte minimum; the control byte counts two bits of sequence, so 4 segments at most.
pub const TPM_SEGMENT: usize = 400;
const TPM_MAX_SEGMENTS: usize = 4;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest frame we accept (and announce in `open`).
    pub max_frame: u32,
    /// Largest request message, reassembled.
    pub max_message: usize,
    /// Credit granted to the device's request link, topped up at half.
    pub link_credit: u32,
    /// The client certificate chain the TLS handshake carried (the X.509 path needs one).
    pub client_certificate: Option<crate::request::CertChain>,
    /// This instance's ID scope: SASL for another fails at once (outcome `auth`).
    pub id_scope: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id_scope: String,
    pub registration_id: String,
    pub credential: Credential,
}

#[derive(Debug, PartialEq)]
pub enum Event {
    /// A register or operation-status request; answer it with [`Connection::answer`].
    Request { delivery_id: u32, correlation_id: Option<MessageId>, request: DeviceRequest },
    /// A request that cannot be carried out; answer it with [`Connection::answer`] (the host
    /// renders the DPS error body, which carries a timestamp).
    Invalid { delivery_id: u32, error: ServiceError },
    /// The TPM mechanism's keys: answer with [`Connection::tpm_challenge`] (the
    /// authenticationKey blob) or [`Connection::refuse`].
    TpmKeys { endorsement_key: Vec<u8>, storage_root_key: Vec<u8> },
    /// The TPM mechanism's last response, a SAS token signed with the challenge's key: check
    /// it and answer with [`Connection::tpm_admit`] or [`Connection::refuse`].
    TpmAnswer { token: String },
    /// The device closed the connection; our close is in the output.
    Closed,
}

/// Why the connection must end (after the output is flushed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Malformed(String),
    Refused(&'static str),
}

#[derive(Debug)]
enum Phase {
    Header,
    SaslInit,
    TpmSrk { ek: Vec<u8> },
    TpmWaitingForHost,
    TpmSegments { rest: Vec<Vec<u8>> },
    TpmToken,
    TpmWaitingForVerdict,
    AmqpHeader,
    Open,
    Closed,
    Failed(Failure),
}

/// The device's request link: its handle, the credit it has left and its delivery count.
#[derive(Debug)]
struct RequestLink {
    handle: Handle,
    credit: u32,
    delivery_count: u32,
}

#[derive(Debug)]
pub struct Connection {
    settings: Settings,
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    identity: Option<Identity>,
    peer_max_frame: u32,
    channel: u16,
    response_link: Option<Handle>,
    request_link: Option<RequestLink>,
    next_outgoing: u32,
    next_incoming: u32,
    /// A transfer arriving in several frames: its delivery id and the bytes so far.
    partial: Option<(u32, Vec<u8>)>,
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

/// `0x00 ‖ idScope ‖ 0x00 ‖ registrationId ‖ 0x00 ‖ EK` (the EK may hold zero bytes itself).
fn parse_tpm_init(b: &[u8]) -> Option<(String, String, Vec<u8>)> {
    let mut parts = b.splitn(4, |c| *c == 0);
    if !parts.next()?.is_empty() {
        return None;
    }
    let scope = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let id = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let ek = parts.next()?.to_vec();
    (!scope.is_empty() && !id.is_empty() && !ek.is_empty()).then_some((scope, id, ek))
}

impl Connection {
    /// A connection with these settings; refused when `max_frame` is below the 512 bytes every
    /// AMQP peer must accept (AMQP 1.0 §2.7.1), since responses are split to it.
    pub fn new(settings: Settings) -> Result<Connection, String> {
        if settings.max_frame < MIN_MAX_FRAME {
            return Err(format!("max_frame {} is below the AMQP minimum of {MIN_MAX_FRAME}", settings.max_frame));
        }
        Ok(Connection {
            settings,
            phase: Phase::Header,
            input: Vec::new(),
            output: Vec::new(),
            identity: None,
            peer_max_frame: MIN_MAX_FRAME,
            channel: 0,
            response_link: None,
            request_link: None,
            next_outgoing: 0,
            next_incoming: 0,
            partial: None,
        })
    }

    pub fn receive(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// What to write to the device now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// What the connection waits for from the device, for the log and metrics when the login
    /// deadline passes first: the step of the login the device stalled at.
    pub fn waiting_for(&self) -> &'static str {
        match self.phase {
            Phase::Header => "protocol-header",
            Phase::SaslInit => "sasl-init",
            Phase::TpmSrk { .. } => "tpm-srk",
            Phase::TpmSegments { .. } => "tpm-segment-ack",
            Phase::TpmToken => "tpm-token",
            Phase::TpmWaitingForHost | Phase::TpmWaitingForVerdict => "host",
            Phase::AmqpHeader => "amqp-header",
            Phase::Open => "open",
            Phase::Closed | Phase::Failed(_) => "nothing",
        }
    }

    /// True once the device is known and the connection is open: what a device must reach
    /// within the login deadline.
    pub fn logged_in(&self) -> bool {
        self.identity.is_some() && matches!(self.phase, Phase::Open)
    }

    /// The authenticated device (after SASL, or after the first attach on the X.509 path).
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The max-frame-size the device announced (at least 512), which our frames respect.
    pub fn peer_max_frame(&self) -> u32 {
        self.peer_max_frame
    }

    fn fail<T>(&mut self, f: Failure) -> Result<T, Failure> {
        self.phase = Phase::Failed(f.clone());
        Err(f)
    }

    fn write_frame(&mut self, kind: u8, channel: u16, body: &[u8]) {
        self.output.extend(amqp::encode_frame(kind, channel, body));
    }

    fn write_sasl(&mut self, body: Result<Vec<u8>, String>) -> Result<(), Failure> {
        match body {
            Ok(b) => {
                self.write_frame(FRAME_SASL, 0, &b);
                Ok(())
            }
            Err(e) => self.fail(Failure::Malformed(e)),
        }
    }

    fn write(&mut self, p: &Performative, payload: &[u8]) -> Result<(), Failure> {
        let channel = if matches!(p, Performative::Open(_) | Performative::Close(_)) { 0 } else { self.channel };
        match amqp::encode_performative(p) {
            Ok(mut body) => {
                body.extend_from_slice(payload);
                self.write_frame(FRAME_AMQP, channel, &body);
                Ok(())
            }
            Err(e) => self.fail(Failure::Malformed(e)),
        }
    }

    /// Ends the connection with an AMQP error (after `open`) and fails.
    fn close_with<T>(&mut self, condition: &str, why: String) -> Result<T, Failure> {
        self.write(&reply::close(Some((condition, why.clone()))), &[])?;
        self.fail(Failure::Malformed(why))
    }

    fn take_header(&mut self) -> Option<[u8; 8]> {
        if self.input.len() < 8 {
            return None;
        }
        let mut h = [0u8; 8];
        h.copy_from_slice(&self.input[..8]);
        self.input.drain(..8);
        Some(h)
    }

    fn take_frame(&mut self) -> Result<Option<amqp::Frame>, Failure> {
        match amqp::parse_frame(&self.input, self.settings.max_frame) {
            Ok(Some((f, used))) => {
                self.input.drain(..used);
                Ok(Some(f))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                let why = format!("bad frame: {e:?}");
                if matches!(self.phase, Phase::Open) {
                    self.close_with("amqp:connection:framing-error", why)
                } else {
                    self.fail(Failure::Malformed(why))
                }
            }
        }
    }

    /// A SASL frame's body, or a failure when the frame is of the other kind.
    fn take_sasl(&mut self) -> Result<Option<Vec<u8>>, Failure> {
        match self.take_frame()? {
            None => Ok(None),
            Some(f) if f.kind == FRAME_SASL => Ok(Some(f.body)),
            Some(_) => self.fail(Failure::Malformed("expected a SASL frame".into())),
        }
    }

    /// Processes buffered input up to the next event; `Ok(None)` means more input is needed.
    pub fn poll(&mut self) -> Result<Option<Event>, Failure> {
        loop {
            match &mut self.phase {
                Phase::Failed(f) => return Err(f.clone()),
                Phase::Closed | Phase::TpmWaitingForHost | Phase::TpmWaitingForVerdict => return Ok(None),
                Phase::Header => {
                    let Some(h) = self.take_header() else { return Ok(None) };
                    if h == amqp::SASL_HEADER {
                        self.output.extend_from_slice(&amqp::SASL_HEADER);
                        // Node takes the first name it knows; C and Java need theirs offered.
                        self.write_sasl(reply::sasl_mechanisms(&["PLAIN", "TPM"]))?;
                        self.phase = Phase::SaslInit;
                    } else if h == amqp::AMQP_HEADER {
                        self.output.extend_from_slice(&amqp::AMQP_HEADER);
                        if self.settings.client_certificate.is_none() {
                            // Without SASL the device must be known by its certificate.
                            self.write(&reply::open("dps", self.settings.max_frame), &[])?;
                            let why = "no SASL layer and no TLS client certificate".to_string();
                            self.write(&reply::close(Some(("amqp:unauthorized-access", why))), &[])?;
                            return self.fail(Failure::Refused("no SASL layer and no TLS client certificate"));
                        }
                        self.phase = Phase::Open;
                    } else {
                        // Answer with the header we speak, then close (AMQP 1.0 §2.2).
                        self.output.extend_from_slice(&amqp::SASL_HEADER);
                        return self.fail(Failure::Malformed("not an AMQP 1.0 protocol header".into()));
                    }
                }
                Phase::SaslInit => {
                    let Some(body) = self.take_sasl()? else { return Ok(None) };
                    let (mechanism, response) = match reply::sasl_init(&body) {
                        Ok(x) => x,
                        Err(e) => return self.fail(Failure::Malformed(e)),
                    };
                    match mechanism.as_str() {
                        "PLAIN" => {
                            let identity = amqp::parse_plain(&response).and_then(|(user, password)| {
                                let u = crate::device::parse_username(&user)?;
                                crate::sas::parse(&password).ok()?;
                                Some(Identity {
                                    id_scope: u.id_scope,
                                    registration_id: u.registration_id,
                                    credential: Credential::SasToken(password),
                                })
                            });
                            let Some(identity) = identity else {
                                self.write_sasl(reply::sasl_outcome(false))?;
                                return self.fail(Failure::Refused("SASL PLAIN: not {idScope}/registrations/{id} with a SAS token"));
                            };
                            if identity.id_scope != self.settings.id_scope {
                                self.write_sasl(reply::sasl_outcome(false))?;
                                return self.fail(Failure::Refused("SASL PLAIN: unknown ID scope"));
                            }
                            self.identity = Some(identity);
                            self.write_sasl(reply::sasl_outcome(true))?;
                            self.phase = Phase::AmqpHeader;
                        }
                        "TPM" => {
                            let Some((id_scope, registration_id, ek)) = parse_tpm_init(&response) else {
                                self.write_sasl(reply::sasl_outcome(false))?;
                                return self.fail(Failure::Refused("SASL TPM: init is not \\0idScope\\0registrationId\\0EK"));
                            };
                            if id_scope != self.settings.id_scope {
                                self.write_sasl(reply::sasl_outcome(false))?;
                                return self.fail(Failure::Refused("SASL TPM: unknown ID scope"));
                            }
                            // The credential is set once the host has checked the answer.
                            self.identity = Some(Identity { id_scope, registration_id, credential: Credential::None });
                            self.write_sasl(reply::sasl_challenge(&[0]))?;
                            self.phase = Phase::TpmSrk { ek };
                        }
                        _ => {
                            self.write_sasl(reply::sasl_outcome(false))?;
                            return self.fail(Failure::Refused("SASL mechanism not offered"));
                        }
                    }
                }
                Phase::TpmSrk { ek } => {
                    let ek = std::mem::take(ek);
                    let Some(body) = self.take_sasl()? else {
                        self.phase = Phase::TpmSrk { ek };
                        return Ok(None);
                    };
                    match reply::sasl_response(&body) {
                        Ok(r) if r.len() > 1 && r[0] == 0 => {
                            self.phase = Phase::TpmWaitingForHost;
                            return Ok(Some(Event::TpmKeys { endorsement_key: ek, storage_root_key: r[1..].to_vec() }));
                        }
                        _ => {
                            self.write_sasl(reply::sasl_outcome(false))?;
                            return self.fail(Failure::Refused("SASL TPM: the response is not \\0SRK"));
                        }
                    }
                }
                Phase::TpmSegments { rest } => {
                    let mut rest = std::mem::take(rest);
                    let Some(body) = self.take_sasl()? else {
                        self.phase = Phase::TpmSegments { rest };
                        return Ok(None);
                    };
                    if !matches!(reply::sasl_response(&body).as_deref(), Ok([0])) {
                        self.write_sasl(reply::sasl_outcome(false))?;
                        return self.fail(Failure::Refused("SASL TPM: expected 0x00 after an interim segment"));
                    }
                    if rest.is_empty() {
                        return self.fail(Failure::Malformed("TPM segments ran out".into()));
                    }
                    let next = rest.remove(0);
                    self.write_sasl(reply::sasl_challenge(&next))?;
                    self.phase = if rest.is_empty() { Phase::TpmToken } else { Phase::TpmSegments { rest } };
                }
                Phase::TpmToken => {
                    let Some(body) = self.take_sasl()? else { return Ok(None) };
                    let token = match reply::sasl_response(&body) {
                        Ok(r) if r.len() > 1 && r[0] == 0 => String::from_utf8(r[1..].to_vec()).ok(),
                        _ => None,
                    };
                    match token {
                        Some(token) if crate::sas::parse(&token).is_ok() => {
                            self.phase = Phase::TpmWaitingForVerdict;
                            return Ok(Some(Event::TpmAnswer { token }));
                        }
                        _ => {
                            self.write_sasl(reply::sasl_outcome(false))?;
                            return self.fail(Failure::Refused("SASL TPM: the last response is not \\0 and a SAS token"));
                        }
                    }
                }
                Phase::AmqpHeader => {
                    let Some(h) = self.take_header() else { return Ok(None) };
                    if h != amqp::AMQP_HEADER {
                        self.output.extend_from_slice(&amqp::AMQP_HEADER);
                        return self.fail(Failure::Malformed("expected the AMQP protocol header after SASL".into()));
                    }
                    self.output.extend_from_slice(&amqp::AMQP_HEADER);
                    self.phase = Phase::Open;
                }
                Phase::Open => {
                    let Some(f) = self.take_frame()? else { return Ok(None) };
                    if f.kind != FRAME_AMQP {
                        return self.close_with("amqp:connection:framing-error", "a SASL frame after SASL".into());
                    }
                    if f.body.is_empty() {
                        continue; // heartbeat
                    }
                    let (p, payload) = match amqp::decode_performative(&f.body) {
                        Ok((p, payload)) => (p, payload.to_vec()),
                        Err(e) => return self.close_with("amqp:decode-error", e),
                    };
                    if let Some(event) = self.performative(f.channel, p, &payload)? {
                        return Ok(Some(event));
                    }
                }
            }
        }
    }

    fn performative(&mut self, channel: u16, p: Performative, payload: &[u8]) -> Result<Option<Event>, Failure> {
        match p {
            Performative::Open(o) => {
                self.peer_max_frame = o.max_frame_size.0.clamp(MIN_MAX_FRAME, self.settings.max_frame);
                self.write(&reply::open("dps", self.settings.max_frame), &[])?;
            }
            Performative::Begin(_) => {
                self.channel = channel;
                self.write(&reply::begin(channel), &[])?;
            }
            Performative::Attach(a) => self.attach(a)?,
            Performative::Transfer(t) => {
                let id = match (&self.partial, t.delivery_id) {
                    (Some((id, _)), _) => *id,
                    (None, Some(id)) => id,
                    (None, None) => return self.close_with("amqp:session:errant-link", "transfer without a delivery id".into()),
                };
                let mut data = self.partial.take().map(|(_, d)| d).unwrap_or_default();
                data.extend_from_slice(payload);
                if data.len() > self.settings.max_message {
                    let why = format!("message over {} bytes", self.settings.max_message);
                    if let Some(l) = &self.request_link {
                        let h = l.handle.clone();
                        self.write(&reply::detach(&h, Some(("amqp:link:message-size-exceeded", why.clone()))), &[])?;
                    }
                    return self.close_with("amqp:link:message-size-exceeded", why);
                }
                if t.more {
                    self.partial = Some((id, data));
                    return Ok(None);
                }
                self.next_incoming = id.wrapping_add(1);
                self.spend_credit()?;
                let Some(me) = self.identity.clone() else {
                    return self.close_with("amqp:unauthorized-access", "a transfer before the device is known".into());
                };
                return Ok(Some(match amqp::parse_request(&data) {
                    Ok(m) => Event::Request {
                        delivery_id: id,
                        correlation_id: m.correlation_id,
                        request: DeviceRequest {
                            id_scope: me.id_scope,
                            registration_id: me.registration_id,
                            credential: me.credential,
                            operation: m.operation,
                        },
                    },
                    Err(e) => Event::Invalid { delivery_id: id, error: ServiceError::invalid(e) },
                }));
            }
            Performative::Flow(_) | Performative::Disposition(_) => {}
            Performative::Detach(d) => {
                if self.request_link.as_ref().is_some_and(|l| l.handle == d.handle) {
                    self.request_link = None;
                }
                if self.response_link.as_ref() == Some(&d.handle) {
                    self.response_link = None;
                }
                self.write(&reply::detach(&d.handle, None), &[])?;
            }
            Performative::End(_) => self.write(&reply::end(), &[])?,
            Performative::Close(_) => {
                self.write(&reply::close(None), &[])?;
                self.phase = Phase::Closed;
                return Ok(Some(Event::Closed));
            }
        }
        Ok(None)
    }

    fn attach(&mut self, a: Attach) -> Result<(), Failure> {
        let named = address_of(&a).and_then(|addr| amqp::link_address_identity(&addr));
        if let (None, Some(chain)) = (&self.identity, &self.settings.client_certificate) {
            // The X.509 path: the device names itself in the link address; the host checks
            // the certificate against that registration.
            if let Some((id_scope, registration_id)) = &named {
                self.identity = Some(Identity {
                    id_scope: id_scope.clone(),
                    registration_id: registration_id.clone(),
                    credential: Credential::ClientCertificate(chain.clone()),
                });
            }
        }
        let matches = match (&named, &self.identity) {
            (Some((scope, id)), Some(me)) => *scope == me.id_scope && id.eq_ignore_ascii_case(&me.registration_id),
            _ => false,
        };
        self.write(&reply::attach(&a), &[])?;
        if !matches {
            let why = "the link address is not {idScope}/registrations/{registrationId} of the authenticated device".to_string();
            return self.write(&reply::detach(&a.handle, Some(("amqp:unauthorized-access", why))), &[]);
        }
        match a.role {
            Role::Receiver => self.response_link = Some(a.handle),
            Role::Sender => {
                let link = RequestLink {
                    handle: a.handle,
                    credit: self.settings.link_credit,
                    delivery_count: a.initial_delivery_count.unwrap_or(0),
                };
                let flow = reply::credit(&link.handle, link.delivery_count, link.credit, self.next_incoming, self.next_outgoing);
                self.request_link = Some(link);
                self.write(&flow, &[])?;
            }
        }
        Ok(())
    }

    /// One delivery received on the request link: its credit drops; at half, it is topped up.
    fn spend_credit(&mut self) -> Result<(), Failure> {
        let full = self.settings.link_credit;
        let Some(l) = self.request_link.as_mut() else { return Ok(()) };
        l.credit = l.credit.saturating_sub(1);
        l.delivery_count = l.delivery_count.wrapping_add(1);
        if l.credit < full / 2 {
            l.credit = full;
            let flow = reply::credit(&l.handle, l.delivery_count, full, self.next_incoming, self.next_outgoing);
            self.write(&flow, &[])?;
        }
        Ok(())
    }

    /// Answers request `delivery_id`: a failure (status ≥ 300) settles it Rejected with the DPS
    /// error (docs/device-protocol.md §4.9); success settles it Accepted and sends the response
    /// on the device's receiver link, in as many frames as its max-frame-size needs.
    pub fn answer(
        &mut self,
        delivery_id: u32,
        correlation_id: Option<MessageId>,
        status: u16,
        body: &str,
        retry_after: Option<u64>,
    ) -> Result<(), Failure> {
        if status >= 300 {
            return self.write(&reply::settle(delivery_id, Some((status, body.to_string(), retry_after))), &[]);
        }
        self.write(&reply::settle(delivery_id, None), &[])?;
        let Some(handle) = self.response_link.clone() else { return Ok(()) };
        let msg = match amqp::encode_response(correlation_id, body, retry_after) {
            Ok(m) => m,
            Err(e) => return self.fail(Failure::Malformed(e)),
        };
        let id = self.next_outgoing;
        self.next_outgoing = id.wrapping_add(1);
        let overhead = amqp::encode_performative(&reply::transfer(&handle, id, true)).map_or(64, |b| b.len()) + 8;
        let room = (self.peer_max_frame as usize).saturating_sub(overhead).max(1);
        let chunks: Vec<&[u8]> = msg.chunks(room).collect();
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.iter().enumerate() {
            self.write(&reply::transfer(&handle, id, i < last), chunk)?;
        }
        Ok(())
    }

    /// The TPM mechanism's challenge: the authenticationKey blob, in segments of at most
    /// [`TPM_SEGMENT`] bytes (at most four).
    pub fn tpm_challenge(&mut self, blob: &[u8]) -> Result<(), Failure> {
        if !matches!(self.phase, Phase::TpmWaitingForHost) {
            return self.fail(Failure::Malformed("TPM challenge outside the TPM exchange".into()));
        }
        let n = blob.len().div_ceil(TPM_SEGMENT);
        if n == 0 {
            self.write_sasl(reply::sasl_outcome(false))?;
            return self.fail(Failure::Refused("SASL TPM: the challenge is empty"));
        }
        if n > TPM_MAX_SEGMENTS {
            self.write_sasl(reply::sasl_outcome(false))?;
            return self.fail(Failure::Refused("SASL TPM: the challenge needs more than four segments"));
        }
        let mut segments: Vec<Vec<u8>> = blob
            .chunks(TPM_SEGMENT)
            .enumerate()
            .map(|(seq, data)| {
                let control = if seq + 1 == n { 0xC0 } else { 0x80 } | seq as u8;
                let mut s = vec![control];
                s.extend_from_slice(data);
                s
            })
            .collect();
        let rest = segments.split_off(1);
        for first in segments {
            self.write_sasl(reply::sasl_challenge(&first))?;
        }
        self.phase = if rest.is_empty() { Phase::TpmToken } else { Phase::TpmSegments { rest } };
        Ok(())
    }

    /// The host checked the TPM answer: the device is in, with this credential.
    pub fn tpm_admit(&mut self, credential: Credential) -> Result<(), Failure> {
        let (Phase::TpmWaitingForVerdict, Some(id)) = (&self.phase, self.identity.as_mut()) else {
            return self.fail(Failure::Malformed("TPM verdict outside the TPM exchange".into()));
        };
        id.credential = credential;
        self.write_sasl(reply::sasl_outcome(true))?;
        self.phase = Phase::AmqpHeader;
        Ok(())
    }

    /// Refuses the device: a SASL `auth` outcome during SASL, else a close with
    /// `amqp:unauthorized-access`.
    pub fn refuse(&mut self, why: &'static str) -> Result<(), Failure> {
        match self.phase {
            Phase::Open => self.write(&reply::close(Some(("amqp:unauthorized-access", why.to_string()))), &[])?,
            _ => self.write_sasl(reply::sasl_outcome(false))?,
        }
        self.fail(Failure::Refused(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::definitions::{ReceiverSettleMode, SenderSettleMode};
    use fe2o3_amqp_types::messaging::{ApplicationProperties, Data, Properties, Source, Target};
    use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Symbol};
    use fe2o3_amqp_types::sasl::{SaslInit, SaslResponse};

    const SCOPE: &str = "0ne0000000A";
    const ID: &str = "dev-1";

    fn settings(client_certificate: bool) -> Settings {
        let chain = client_certificate.then(|| std::sync::Arc::new(vec![vec![0x30, 0x00]]));
        Settings { max_frame: 64 * 1024, max_message: 4096, link_credit: 4, client_certificate: chain, id_scope: SCOPE.into() }
    }

    fn token() -> String {
        crate::sas::build(&format!("{SCOPE}/registrations/{ID}"), b"key", 4_000_000_000, Some("registration"))
    }

    fn sasl_init(mechanism: &str, response: &[u8]) -> Vec<u8> {
        let i = SaslInit { mechanism: Symbol::from(mechanism), initial_response: Some(Binary::from(response.to_vec())), hostname: None };
        amqp::encode_frame(FRAME_SASL, 0, &serde_amqp::to_vec(&i).unwrap())
    }

    fn sasl_response(response: &[u8]) -> Vec<u8> {
        let r = SaslResponse { response: Binary::from(response.to_vec()) };
        amqp::encode_frame(FRAME_SASL, 0, &serde_amqp::to_vec(&r).unwrap())
    }

    fn frame(p: &Performative, payload: &[u8]) -> Vec<u8> {
        let mut body = amqp::encode_performative(p).unwrap();
        body.extend_from_slice(payload);
        amqp::encode_frame(FRAME_AMQP, 0, &body)
    }

    fn client_attach(role: Role, handle: u32, address: &str) -> Performative {
        Performative::Attach(Attach {
            name: format!("link-{handle}"),
            handle: Handle(handle),
            role,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::builder().address(address.to_string()).build())),
            target: Some(Box::new(TargetArchetype::Target(Target::builder().address(address.to_string()).build()))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    fn request_payload(operation: &str, body: &[u8]) -> Vec<u8> {
        let mut map = OrderedMap::new();
        map.insert("iotdps-operation-type".to_string(), SimpleValue::String(operation.into()));
        let props = Properties { correlation_id: Some(MessageId::String("c-1".into())), ..Default::default() };
        let mut payload = serde_amqp::to_vec(&props).unwrap();
        payload.extend(serde_amqp::to_vec(&ApplicationProperties(map)).unwrap());
        payload.extend(serde_amqp::to_vec(&Data(Binary::from(body.to_vec()))).unwrap());
        payload
    }

    /// The frames (and their performatives) in `out`, after `skip` header bytes.
    fn performatives(out: &[u8], skip: usize) -> Vec<(Performative, Vec<u8>, usize)> {
        let mut at = skip;
        let mut all = Vec::new();
        while at < out.len() {
            let (f, used) = amqp::parse_frame(&out[at..], 1 << 20).unwrap().unwrap();
            let (p, payload) = amqp::decode_performative(&f.body).unwrap();
            all.push((p, payload.to_vec(), used));
            at += used;
        }
        all
    }

    /// SASL PLAIN through attach of both links, with `max_frame` announced; returns the connection.
    fn opened(max_frame: u32) -> Connection {
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::SASL_HEADER);
        assert_eq!(c.poll(), Ok(None));
        let out = c.take_output();
        assert_eq!(&out[..8], &amqp::SASL_HEADER);
        assert!(out.windows(5).any(|w| w == b"PLAIN") && out.windows(3).any(|w| w == b"TPM"), "both mechanisms offered");
        let mut plain = vec![0u8];
        plain.extend_from_slice(format!("{SCOPE}/registrations/{ID}").as_bytes());
        plain.push(0);
        plain.extend_from_slice(token().as_bytes());
        c.receive(&sasl_init("PLAIN", &plain));
        c.receive(&amqp::AMQP_HEADER);
        c.receive(&frame(&reply::open("client", max_frame), &[]));
        c.receive(&frame(&reply::begin(0), &[]));
        let addr = format!("{SCOPE}/registrations/{ID}");
        c.receive(&frame(&client_attach(Role::Receiver, 0, &addr), &[]));
        c.receive(&frame(&client_attach(Role::Sender, 1, &addr), &[]));
        assert_eq!(c.poll(), Ok(None));
        assert_eq!(c.identity().map(|i| (i.id_scope.as_str(), i.registration_id.as_str())), Some((SCOPE, ID)));
        assert_eq!(c.peer_max_frame(), max_frame.max(MIN_MAX_FRAME));
        let out = c.take_output();
        // SASL outcome frame, AMQP header, then open, begin, two attaches and a flow.
        let (outcome, used) = amqp::parse_frame(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(outcome.kind, FRAME_SASL);
        assert_eq!(&out[used..used + 8], &amqp::AMQP_HEADER);
        let ps = performatives(&out, used + 8);
        assert!(matches!(ps[0].0, Performative::Open(_)));
        assert!(matches!(ps[1].0, Performative::Begin(_)));
        assert!(matches!(ps[2].0, Performative::Attach(_)) && matches!(ps[3].0, Performative::Attach(_)));
        assert!(matches!(&ps[4].0, Performative::Flow(f) if f.link_credit == Some(4)));
        c
    }

    #[test]
    fn responses_are_split_to_the_peer_max_frame_size() {
        let mut c = opened(100); // below the minimum: 512 applies
        c.receive(&frame(&reply::transfer(&Handle(1), 0, false), &request_payload("iotdps-register", b"{}")));
        let Ok(Some(Event::Request { delivery_id: 0, correlation_id, request })) = c.poll() else { panic!("no request") };
        assert_eq!(correlation_id, Some(MessageId::String("c-1".into())));
        assert_eq!((request.registration_id.as_str(), request.credential), (ID, Credential::SasToken(token())));
        let body = format!("{{\"status\":\"assigned\",\"pad\":\"{}\"}}", "x".repeat(1500));
        c.answer(0, correlation_id, 200, &body, None).unwrap();
        let out = c.take_output();
        let ps = performatives(&out, 0);
        assert!(matches!(&ps[0].0, Performative::Disposition(d) if d.settled && d.first == 0));
        let transfers: Vec<_> = ps[1..].iter().collect();
        assert!(transfers.len() >= 4, "1.5 KB in 512-byte frames");
        let mut message = Vec::new();
        for (i, (p, payload, size)) in transfers.iter().enumerate() {
            assert!(*size <= 512, "frame of {size} bytes");
            let Performative::Transfer(t) = p else { panic!("{p:?}") };
            assert_eq!(t.more, i + 1 < transfers.len());
            message.extend_from_slice(payload);
        }
        let back = amqp::read_sections(&message).unwrap();
        assert_eq!(back.body, body.as_bytes());
        assert_eq!(back.correlation_id, Some(MessageId::String("c-1".into())));

        // A failure is settled Rejected with the DPS error as description; no response transfer.
        c.receive(&frame(&reply::transfer(&Handle(1), 1, false), &request_payload("iotdps-register", b"{}")));
        assert!(matches!(c.poll(), Ok(Some(Event::Request { delivery_id: 1, .. }))));
        c.answer(1, None, 401, "{\"errorCode\":401002}", None).unwrap();
        let ps = performatives(&c.take_output(), 0);
        assert_eq!(ps.len(), 1);
        let Performative::Disposition(d) = &ps[0].0 else { panic!() };
        let Some(fe2o3_amqp_types::messaging::DeliveryState::Rejected(r)) = &d.state else { panic!("{d:?}") };
        assert_eq!(r.error.as_ref().and_then(|e| e.description.as_deref()), Some("{\"errorCode\":401002}"));
    }

    #[test]
    fn multi_frame_requests_credit_and_close() {
        let mut c = opened(64 * 1024);
        let payload = request_payload("iotdps-register", &vec![b' '; 600]);
        let (a, b) = payload.split_at(300);
        c.receive(&frame(&reply::transfer(&Handle(1), 0, true), a));
        c.receive(&frame(&reply::transfer(&Handle(1), 0, false), b));
        let Ok(Some(Event::Request { delivery_id: 0, request, .. })) = c.poll() else { panic!() };
        assert!(matches!(request.operation, crate::request::Operation::Register { body } if body.len() == 600));
        // Unknown operation types and undecodable messages come back as Invalid.
        c.receive(&frame(&reply::transfer(&Handle(1), 1, false), &request_payload("iotdps-delete", b"{}")));
        assert!(matches!(c.poll(), Ok(Some(Event::Invalid { delivery_id: 1, .. }))));
        c.receive(&frame(&reply::transfer(&Handle(1), 2, false), &[0x00, 0x53]));
        assert!(matches!(c.poll(), Ok(Some(Event::Invalid { delivery_id: 2, .. }))));
        // Credit 4, topped up once it falls below half (after the third delivery).
        let flows = performatives(&c.take_output(), 0).iter().filter(|(p, _, _)| matches!(p, Performative::Flow(_))).count();
        assert_eq!(flows, 1);
        c.receive(&frame(&reply::close(None), &[]));
        assert_eq!(c.poll(), Ok(Some(Event::Closed)));
        assert!(matches!(performatives(&c.take_output(), 0)[0].0, Performative::Close(_)));
    }

    #[test]
    fn oversized_messages_and_frames_end_the_connection() {
        let mut c = opened(64 * 1024);
        let chunk = vec![0u8; 3000];
        c.receive(&frame(&reply::transfer(&Handle(1), 0, true), &chunk));
        c.receive(&frame(&reply::transfer(&Handle(1), 0, true), &chunk));
        assert!(matches!(c.poll(), Err(Failure::Malformed(_))));
        let out = c.take_output();
        let ps = performatives(&out, 0);
        assert!(matches!(&ps[0].0, Performative::Detach(d) if d.error.is_some()));
        assert!(matches!(&ps[1].0, Performative::Close(cl) if cl.error.is_some()));
        let condition = b"amqp:link:message-size-exceeded";
        assert!(out.windows(condition.len()).any(|w| w == condition));

        let mut c = opened(64 * 1024);
        let mut huge = amqp::encode_frame(FRAME_AMQP, 0, &vec![0u8; 70 * 1024]);
        huge.truncate(100);
        c.receive(&huge);
        assert!(matches!(c.poll(), Err(Failure::Malformed(_))));
        let out = c.take_output();
        assert!(out.windows(29).any(|w| w == b"amqp:connection:framing-error"));
    }

    #[test]
    fn headers_without_sasl() {
        // Not AMQP: our header back, then the end.
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(b"GET / HTTP/1.1\r\n");
        assert!(matches!(c.poll(), Err(Failure::Malformed(_))));
        assert_eq!(c.take_output(), amqp::SASL_HEADER);

        // No SASL and no client certificate: refused after open, with an AMQP error.
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::AMQP_HEADER);
        assert!(matches!(c.poll(), Err(Failure::Refused(_))));
        let out = c.take_output();
        let ps = performatives(&out, 8);
        assert!(matches!(&ps[1].0, Performative::Close(cl) if cl.error.is_some()));

        // X.509: the certificate's device names itself in the link address.
        let mut c = Connection::new(settings(true)).unwrap();
        c.receive(&amqp::AMQP_HEADER);
        c.receive(&frame(&reply::open("client", 4096), &[]));
        c.receive(&frame(&reply::begin(0), &[]));
        c.receive(&frame(&client_attach(Role::Receiver, 0, &format!("amqps://host/{SCOPE}/registrations/{ID}")), &[]));
        assert_eq!(c.poll(), Ok(None));
        let me = c.identity().unwrap();
        assert_eq!((me.id_scope.as_str(), me.registration_id.as_str()), (SCOPE, ID));
        assert!(matches!(&me.credential, Credential::ClientCertificate(c) if **c == [vec![0x30, 0x00]]));
        // A second link for another device is detached with an error.
        c.take_output();
        c.receive(&frame(&client_attach(Role::Sender, 1, &format!("{SCOPE}/registrations/other")), &[]));
        assert_eq!(c.poll(), Ok(None));
        let ps = performatives(&c.take_output(), 0);
        assert!(matches!(&ps[1].0, Performative::Detach(d) if d.error.is_some()));
    }

    fn challenge_of(out: &[u8]) -> Vec<u8> {
        let (f, _) = amqp::parse_frame(out, 1 << 20).unwrap().unwrap();
        let c: fe2o3_amqp_types::sasl::SaslChallenge = serde_amqp::from_slice(&f.body).unwrap();
        c.challenge.to_vec()
    }

    #[test]
    fn tpm_mechanism_segments_the_challenge() {
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::SASL_HEADER);
        let mut init = vec![0u8];
        init.extend_from_slice(format!("{SCOPE}\0{ID}\0").as_bytes());
        init.extend_from_slice(&[1, 0, 2, 0]); // an EK with zero bytes in it
        c.receive(&sasl_init("TPM", &init));
        assert_eq!(c.poll(), Ok(None));
        let out = c.take_output();
        let (_, used) = amqp::parse_frame(&out[8..], 1 << 20).unwrap().unwrap();
        assert_eq!(challenge_of(&out[8 + used..]), vec![0]);
        c.receive(&sasl_response(&[0, 9, 9, 9]));
        assert_eq!(c.poll(), Ok(Some(Event::TpmKeys { endorsement_key: vec![1, 0, 2, 0], storage_root_key: vec![9, 9, 9] })));
        let blob: Vec<u8> = (0..900u32).map(|i| i as u8).collect();
        c.tpm_challenge(&blob).unwrap();
        let mut got = Vec::new();
        for (n, control) in [0x80u8, 0x81, 0xC2].into_iter().enumerate() {
            if n > 0 {
                c.receive(&sasl_response(&[0]));
                assert_eq!(c.poll(), Ok(None));
            }
            let seg = challenge_of(&c.take_output());
            assert_eq!(seg[0], control);
            assert!(seg.len() <= TPM_SEGMENT + 1);
            got.extend_from_slice(&seg[1..]);
        }
        assert_eq!(got, blob);
        let mut last = vec![0u8];
        last.extend_from_slice(token().as_bytes());
        c.receive(&sasl_response(&last));
        c.receive(&amqp::AMQP_HEADER);
        assert_eq!(c.poll(), Ok(Some(Event::TpmAnswer { token: token() })));
        assert_eq!(c.poll(), Ok(None), "nothing goes on until the host has checked the answer");
        assert!(c.take_output().is_empty(), "no SASL outcome before the verdict");
        let credential = Credential::Tpm(Box::new(crate::request::TpmCredential {
            endorsement_key: vec![1, 0, 2, 0],
            storage_root_key: vec![9, 9, 9],
            answer: None,
        }));
        c.tpm_admit(credential.clone()).unwrap();
        assert_eq!(c.poll(), Ok(None));
        assert_eq!(c.identity().map(|i| i.credential.clone()), Some(credential));
        assert!(c.take_output().starts_with(&[0, 0, 0]), "the outcome and the AMQP header went out");

        // A refused answer gets the `auth` outcome.
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::SASL_HEADER);
        c.receive(&sasl_init("TPM", &init));
        c.receive(&sasl_response(&[0, 9]));
        assert!(matches!(c.poll(), Ok(Some(Event::TpmKeys { .. }))));
        c.tpm_challenge(&[1, 2, 3]).unwrap();
        c.receive(&sasl_response(&last));
        assert!(matches!(c.poll(), Ok(Some(Event::TpmAnswer { .. }))));
        c.take_output();
        assert_eq!(c.refuse("bad signature"), Err(Failure::Refused("bad signature")));
        assert!(!c.take_output().is_empty(), "the auth outcome");

        // A blob needing five segments cannot be sent (two bits of sequence number).
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::SASL_HEADER);
        c.receive(&sasl_init("TPM", &init));
        c.receive(&sasl_response(&[0, 9]));
        assert!(matches!(c.poll(), Ok(Some(Event::TpmKeys { .. }))));
        assert!(matches!(c.tpm_challenge(&vec![0u8; 4 * TPM_SEGMENT + 1]), Err(Failure::Refused(_))));
        // Regression: an empty challenge panicked (segments.remove(0) on no segments).
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::SASL_HEADER);
        c.receive(&sasl_init("TPM", &init));
        c.receive(&sasl_response(&[0, 9]));
        assert!(matches!(c.poll(), Ok(Some(Event::TpmKeys { .. }))));
        assert!(matches!(c.tpm_challenge(&[]), Err(Failure::Refused(_))));
        // And the host may refuse the keys outright.
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::SASL_HEADER);
        c.receive(&sasl_init("TPM", &init));
        c.receive(&sasl_response(&[0, 9]));
        assert!(matches!(c.poll(), Ok(Some(Event::TpmKeys { .. }))));
        assert!(matches!(c.refuse("no"), Err(Failure::Refused("no"))));
        assert_eq!(c.poll(), Err(Failure::Refused("no")));
    }

    /// Each step of a TPM login names what it waits for next (the login deadline's log and
    /// metric say where a device stalled).
    #[test]
    fn the_awaited_login_step_is_named_at_every_phase() {
        let mut c = Connection::new(settings(false)).unwrap();
        assert_eq!(c.waiting_for(), "protocol-header");
        c.receive(&amqp::SASL_HEADER[..4]);
        assert_eq!(c.poll(), Ok(None));
        assert_eq!(c.waiting_for(), "protocol-header", "half a header");
        c.receive(&amqp::SASL_HEADER[4..]);
        assert_eq!(c.poll(), Ok(None));
        assert_eq!(c.waiting_for(), "sasl-init");
        let mut init = vec![0u8];
        init.extend_from_slice(format!("{SCOPE}\0{ID}\0").as_bytes());
        init.extend_from_slice(&[1, 2]);
        c.receive(&sasl_init("TPM", &init));
        assert_eq!(c.poll(), Ok(None));
        assert_eq!(c.waiting_for(), "tpm-srk");
        c.receive(&sasl_response(&[0, 9]));
        assert!(matches!(c.poll(), Ok(Some(Event::TpmKeys { .. }))));
        assert_eq!(c.waiting_for(), "host", "the host makes the challenge");
        c.tpm_challenge(&vec![7u8; TPM_SEGMENT + 1]).unwrap();
        assert_eq!(c.waiting_for(), "tpm-segment-ack");
        c.receive(&sasl_response(&[0]));
        assert_eq!(c.poll(), Ok(None));
        assert_eq!(c.waiting_for(), "tpm-token");
        let mut last = vec![0u8];
        last.extend_from_slice(token().as_bytes());
        c.receive(&sasl_response(&last));
        assert!(matches!(c.poll(), Ok(Some(Event::TpmAnswer { .. }))));
        assert_eq!(c.waiting_for(), "host", "the host checks the answer");
        let credential = Credential::Tpm(Box::new(crate::request::TpmCredential {
            endorsement_key: vec![1, 2],
            storage_root_key: vec![9],
            answer: None,
        }));
        c.tpm_admit(credential).unwrap();
        assert_eq!(c.poll(), Ok(None));
        assert_eq!(c.waiting_for(), "amqp-header");
        assert!(!c.logged_in());
        c.receive(&amqp::AMQP_HEADER);
        assert_eq!(c.poll(), Ok(None));
        assert!(c.logged_in(), "past the login: the deadline no longer applies");
    }

    #[test]
    fn a_max_frame_below_the_amqp_minimum_is_refused() {
        // Regression: max_frame < 512 made `clamp` panic on the peer's open.
        let small = Settings { max_frame: 511, ..settings(false) };
        assert!(Connection::new(small).is_err());
        assert!(Connection::new(Settings { max_frame: MIN_MAX_FRAME, ..settings(false) }).is_ok());
    }

    #[test]
    fn sasl_for_another_id_scope_fails_at_once() {
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::SASL_HEADER);
        let mut plain = vec![0u8];
        plain.extend_from_slice(format!("0ne99999999/registrations/{ID}").as_bytes());
        plain.push(0);
        plain.extend_from_slice(crate::sas::build(&format!("0ne99999999/registrations/{ID}"), b"key", 4_000_000_000, None).as_bytes());
        c.receive(&sasl_init("PLAIN", &plain));
        assert_eq!(c.poll(), Err(Failure::Refused("SASL PLAIN: unknown ID scope")));
        let mut c = Connection::new(settings(false)).unwrap();
        c.receive(&amqp::SASL_HEADER);
        c.receive(&sasl_init("TPM", b"\x000ne99999999\x00dev-1\x00\x01\x02"));
        assert_eq!(c.poll(), Err(Failure::Refused("SASL TPM: unknown ID scope")));
    }
}
