//! AMQP 1.0 for DPS (docs/device-protocol.md §4): protocol headers, frames, SASL PLAIN, and
//! the request/response messages, encoded with fe2o3-amqp's types and serde_amqp. Pure: the
//! gateway's connection task feeds bytes in and writes what these functions produce.

use crate::request::Operation;
use fe2o3_amqp_types::messaging::{ApplicationProperties, Data, MessageId, Properties};
use fe2o3_amqp_types::performatives::Performative;
use fe2o3_amqp_types::primitives::{Binary, SimpleValue};
use serde_amqp::Value;

/// `AMQP\x03\x01\x00\x00`: SASL layer first (symmetric keys and TPM).
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// `AMQP\x00\x01\x00\x00`: no SASL (X.509 devices authenticate with the TLS certificate).
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

pub const FRAME_AMQP: u8 = 0;
pub const FRAME_SASL: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
    /// Empty for a heartbeat.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    TooLarge(u32),
    Malformed(&'static str),
}

/// One frame from the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse_frame(buf: &[u8], max_frame: u32) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let doff = buf[4] as usize * 4;
    if size < 8 || doff < 8 || doff > size as usize {
        return Err(FrameError::Malformed("bad frame size or data offset"));
    }
    if size > max_frame {
        return Err(FrameError::TooLarge(size));
    }
    let kind = buf[5];
    if kind > FRAME_SASL {
        return Err(FrameError::Malformed("unknown frame type"));
    }
    if buf.len() < size as usize {
        return Ok(None);
    }
    let channel = u16::from_be_bytes([buf[6], buf[7]]);
    Ok(Some((Frame { kind, channel, body: buf[doff..size as usize].to_vec() }, size as usize)))
}

pub fn encode_frame(kind: u8, channel: u16, body: &[u8]) -> Vec<u8> {
    let size = (8 + body.len()) as u32;
    let mut out = Vec::with_capacity(size as usize);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&[2, kind]);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Length of the one encoded AMQP value at the front of `b` (described values included), if it
/// and everything nested in it is well formed: every size, length and count fits inside what
/// contains it, and nesting is at most 32 deep. serde_amqp allocates what a length prefix
/// claims before it checks that the bytes are there (found by fuzzing: an 84-byte input asked for
/// 4 GiB), so no peer bytes reach it without passing here first.
pub fn value_len(b: &[u8]) -> Option<usize> {
    checked(b, 0)
}

const MAX_DEPTH: u32 = 32;

fn checked(b: &[u8], depth: u32) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    match *b.first()? {
        0x00 => {
            let d = checked(b.get(1..)?, depth + 1)?;
            let v = checked(b.get(1 + d..)?, depth + 1)?;
            Some(1 + d + v)
        }
        code => Some(1 + bare(code, b.get(1..)?, depth)?),
    }
}

fn u32_at(b: &[u8]) -> Option<usize> {
    let n = b.get(..4)?;
    Some(u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
}

/// `n` bytes, if `b` has them.
fn take(b: &[u8], n: usize) -> Option<usize> {
    (n <= b.len()).then_some(n)
}

/// Length of a value's encoding after its constructor `code`.
fn bare(code: u8, b: &[u8], depth: u32) -> Option<usize> {
    match code {
        0x40..=0x4f => Some(0),
        0x50..=0x5f => take(b, 1),
        0x60..=0x6f => take(b, 2),
        0x70..=0x7f => take(b, 4),
        0x80..=0x8f => take(b, 8),
        0x90..=0x9f => take(b, 16),
        0xa0..=0xaf => take(b, 1 + *b.first()? as usize),
        0xb0..=0xbf => take(b, 4usize.checked_add(u32_at(b)?)?),
        // list8 / map8: size, count, items.
        0xc0 | 0xc1 => {
            let size = *b.first()? as usize;
            let body = b.get(1..1 + size)?;
            items(body.get(1..)?, *body.first()? as usize, depth)?;
            Some(1 + size)
        }
        0xd0 | 0xd1 => {
            let size = u32_at(b)?;
            let body = b.get(4..4usize.checked_add(size)?)?;
            items(body.get(4..)?, u32_at(body)?, depth)?;
            Some(4 + size)
        }
        // array8 / array32: size, count, one constructor, the elements without theirs.
        0xe0 => {
            let size = *b.first()? as usize;
            let body = b.get(1..1 + size)?;
            array(body.get(1..)?, *body.first()? as usize, depth)?;
            Some(1 + size)
        }
        0xf0 => {
            let size = u32_at(b)?;
            let body = b.get(4..4usize.checked_add(size)?)?;
            array(body.get(4..)?, u32_at(body)?, depth)?;
            Some(4 + size)
        }
        _ => None,
    }
}

/// `count` complete values in `b` (a count larger than the bytes cannot be honest).
fn items(mut b: &[u8], count: usize, depth: u32) -> Option<()> {
    if count > b.len() {
        return None;
    }
    for _ in 0..count {
        let n = checked(b, depth + 1)?;
        b = b.get(n..)?;
    }
    Some(())
}

fn array(b: &[u8], count: usize, depth: u32) -> Option<()> {
    if count > b.len() || depth >= MAX_DEPTH {
        return None;
    }
    let (code, mut rest) = match *b.first()? {
        0x00 => {
            let d = checked(b.get(1..)?, depth + 1)?;
            (*b.get(1 + d)?, b.get(2 + d..)?)
        }
        c => (c, b.get(1..)?),
    };
    for _ in 0..count {
        let n = bare(code, rest, depth + 1)?;
        rest = rest.get(n..)?;
    }
    Some(())
}

/// Decodes one value whose bytes [`value_len`] has already measured and checked; never call it
/// on unchecked peer bytes.
fn decode_checked<'de, T: serde::Deserialize<'de>>(b: &'de [u8]) -> Result<T, String> {
    serde_amqp::from_slice(b).map_err(|e| e.to_string())
}

/// Decodes peer bytes that must hold exactly one value, checking them first.
fn from_peer<'de, T: serde::Deserialize<'de>>(b: &'de [u8]) -> Result<T, String> {
    match value_len(b) {
        Some(n) if n == b.len() => decode_checked(b),
        _ => Err("malformed or truncated AMQP value".into()),
    }
}

/// A frame body split into the performative and what follows it (a transfer's payload).
pub fn decode_performative(body: &[u8]) -> Result<(Performative, &[u8]), String> {
    let n = value_len(body).ok_or("truncated performative")?;
    let p = decode_checked(&body[..n]).map_err(|e| format!("invalid performative: {e}"))?;
    Ok((p, &body[n..]))
}

pub fn encode_performative(p: &Performative) -> Result<Vec<u8>, String> {
    serde_amqp::to_vec(p).map_err(|e| e.to_string())
}

/// SASL PLAIN initial response `\0authcid\0password` (no authzid): (username, password).
pub fn parse_plain(initial_response: &[u8]) -> Option<(String, String)> {
    let mut parts = initial_response.splitn(3, |b| *b == 0);
    let _authzid = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let pass = std::str::from_utf8(parts.next()?).ok()?.to_string();
    Some((user, pass))
}

/// A DPS request message (docs/device-protocol.md §4.7): the operation it asks for and the
/// correlation id its response must carry.
#[derive(Debug, Clone, PartialEq)]
pub struct DpsRequest {
    pub correlation_id: Option<MessageId>,
    pub operation: Operation,
}

fn descriptor_code(section: &[u8]) -> Option<u64> {
    // 0x00, then the descriptor: smallulong (0x53 n) or ulong (0x80 8 bytes).
    match section.get(1)? {
        0x53 => section.get(2).map(|c| u64::from(*c)),
        0x80 => section.get(2..10).map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
        _ => None,
    }
}

fn as_string(v: &SimpleValue) -> Option<String> {
    match v {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// What DPS reads from a message's sections.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sections {
    pub correlation_id: Option<MessageId>,
    pub operation_type: Option<String>,
    pub operation_id: Option<String>,
    /// Data sections concatenated (C# sends an amqp-value string on polls: ignored).
    pub body: Vec<u8>,
}

/// Reads the sections of a transfer payload.
pub fn read_sections(mut payload: &[u8]) -> Result<Sections, String> {
    let mut m = Sections::default();
    while !payload.is_empty() {
        let n = value_len(payload).ok_or("truncated message section")?;
        let section = &payload[..n];
        match descriptor_code(section) {
            Some(0x73) => {
                let p: Properties = decode_checked(section).map_err(|e| format!("properties: {e}"))?;
                m.correlation_id = p.correlation_id;
            }
            Some(0x74) => {
                let a: ApplicationProperties = decode_checked(section).map_err(|e| format!("application-properties: {e}"))?;
                m.operation_type = a.0.get("iotdps-operation-type").and_then(as_string);
                m.operation_id = a.0.get("iotdps-operation-id").and_then(as_string);
            }
            Some(0x75) => {
                let d: Data = decode_checked(section).map_err(|e| format!("data: {e}"))?;
                m.body.extend_from_slice(d.0.as_ref());
            }
            // header, annotations, amqp-sequence, amqp-value, footer: nothing DPS needs.
            _ => {}
        }
        payload = &payload[n..];
    }
    Ok(m)
}

/// A request message: `iotdps-operation-type` says which operation; a register's body is the
/// data sections.
pub fn parse_request(payload: &[u8]) -> Result<DpsRequest, String> {
    let m = read_sections(payload)?;
    let operation = match m.operation_type.as_deref() {
        Some("iotdps-register") => Operation::Register { body: m.body },
        Some("iotdps-get-operationstatus") => Operation::OperationStatus { operation_id: m.operation_id.unwrap_or_default() },
        other => return Err(format!("unknown iotdps-operation-type {other:?}")),
    };
    Ok(DpsRequest { correlation_id: m.correlation_id, operation })
}

/// A response message: properties (correlation id), application properties (retry-after,
/// spelled both ways since C# looks up `Retry-After` exactly) and one data section with the
/// JSON (docs/device-protocol.md §4.8).
pub fn encode_response(correlation_id: Option<MessageId>, json: &str, retry_after: Option<u64>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let props = Properties { correlation_id, ..Default::default() };
    out.extend(serde_amqp::to_vec(&props).map_err(|e| e.to_string())?);
    if let Some(s) = retry_after {
        let mut map = fe2o3_amqp_types::primitives::OrderedMap::new();
        map.insert("retry-after".to_string(), SimpleValue::String(s.to_string()));
        map.insert("Retry-After".to_string(), SimpleValue::String(s.to_string()));
        out.extend(serde_amqp::to_vec(&ApplicationProperties(map)).map_err(|e| e.to_string())?);
    }
    out.extend(serde_amqp::to_vec(&Data(Binary::from(json.as_bytes().to_vec()))).map_err(|e| e.to_string())?);
    Ok(out)
}

/// The error condition for a DPS status (docs/device-protocol.md §4.9; Node retries only
/// internal-error and device-container-throttled).
pub fn condition_for(status: u16) -> &'static str {
    match status {
        401 | 403 => "amqp:unauthorized-access",
        404 => "amqp:not-found",
        429 => "com.microsoft:device-container-throttled",
        s if s >= 500 => "amqp:internal-error",
        _ => "com.microsoft:argument-error",
    }
}

/// Fields map holding `retry-after` for a Rejected error's info.
pub fn retry_info(retry_after: u64) -> fe2o3_amqp_types::definitions::Fields {
    let mut f = fe2o3_amqp_types::definitions::Fields::new();
    f.insert(fe2o3_amqp_types::primitives::Symbol::from("retry-after"), Value::String(retry_after.to_string()));
    f.insert(fe2o3_amqp_types::primitives::Symbol::from("Retry-After"), Value::String(retry_after.to_string()));
    f
}

/// The frame bodies and performatives the server sends.
pub mod reply {
    use super::*;
    use fe2o3_amqp_types::definitions::{Error, ErrorCondition, Handle, ReceiverSettleMode, Role, SenderSettleMode};
    use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, Rejected};
    use fe2o3_amqp_types::performatives::{Attach, Begin, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open, Transfer};
    use fe2o3_amqp_types::primitives::{Array, Symbol};
    use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome};

    pub fn sasl_mechanisms(names: &[&str]) -> Result<Vec<u8>, String> {
        let m = SaslMechanisms { sasl_server_mechanisms: Array(names.iter().map(|n| Symbol::from(*n)).collect()) };
        serde_amqp::to_vec(&m).map_err(|e| e.to_string())
    }

    /// (mechanism, initial response) of a sasl-init frame body.
    pub fn sasl_init(body: &[u8]) -> Result<(String, Vec<u8>), String> {
        let i: SaslInit = from_peer(body).map_err(|e| format!("invalid sasl-init: {e}"))?;
        Ok((i.mechanism.0, i.initial_response.map(|b| b.to_vec()).unwrap_or_default()))
    }

    pub fn sasl_challenge(challenge: &[u8]) -> Result<Vec<u8>, String> {
        let c = fe2o3_amqp_types::sasl::SaslChallenge { challenge: Binary::from(challenge.to_vec()) };
        serde_amqp::to_vec(&c).map_err(|e| e.to_string())
    }

    /// The bytes of a sasl-response frame body.
    pub fn sasl_response(body: &[u8]) -> Result<Vec<u8>, String> {
        let r: fe2o3_amqp_types::sasl::SaslResponse = from_peer(body).map_err(|e| format!("invalid sasl-response: {e}"))?;
        Ok(r.response.to_vec())
    }

    pub fn sasl_outcome(ok: bool) -> Result<Vec<u8>, String> {
        let o = SaslOutcome { code: if ok { SaslCode::Ok } else { SaslCode::Auth }, additional_data: None };
        serde_amqp::to_vec(&o).map_err(|e| e.to_string())
    }

    pub fn open(container_id: &str, max_frame_size: u32) -> Performative {
        Performative::Open(Open {
            container_id: container_id.to_string(),
            hostname: None,
            max_frame_size: MaxFrameSize(max_frame_size),
            channel_max: Default::default(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    pub fn begin(remote_channel: u16) -> Performative {
        Performative::Begin(Begin {
            remote_channel: Some(remote_channel),
            next_outgoing_id: 0,
            incoming_window: 65_535,
            outgoing_window: 65_535,
            handle_max: Default::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    /// The server's half of a link the client attached: the opposite role, same name and
    /// handle, the client's terminus echoed. Responses are sent settled.
    pub fn attach(client: &Attach) -> Performative {
        let we_send = matches!(client.role, Role::Receiver);
        Performative::Attach(Attach {
            name: client.name.clone(),
            handle: client.handle.clone(),
            role: if we_send { Role::Sender } else { Role::Receiver },
            snd_settle_mode: if we_send { SenderSettleMode::Settled } else { client.snd_settle_mode.clone() },
            rcv_settle_mode: ReceiverSettleMode::First,
            source: client.source.clone(),
            target: client.target.clone(),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: we_send.then_some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    /// Link credit for the client's sender.
    pub fn credit(handle: &Handle, delivery_count: u32, credit: u32, next_incoming_id: u32, next_outgoing_id: u32) -> Performative {
        Performative::Flow(Flow {
            next_incoming_id: Some(next_incoming_id),
            incoming_window: 65_535,
            next_outgoing_id,
            outgoing_window: 65_535,
            handle: Some(handle.clone()),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        })
    }

    /// Settles a request: accepted, or rejected with the DPS error JSON as description.
    pub fn settle(delivery_id: u32, rejection: Option<(u16, String, Option<u64>)>) -> Performative {
        let state = match rejection {
            None => DeliveryState::Accepted(Accepted {}),
            Some((status, body, retry)) => DeliveryState::Rejected(Rejected {
                error: Some(Error {
                    condition: ErrorCondition::Custom(Symbol::from(condition_for(status))),
                    description: Some(body),
                    info: retry.map(|r| Box::new(retry_info(r))),
                }),
            }),
        };
        Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: delivery_id,
            last: None,
            settled: true,
            state: Some(state),
            batchable: false,
        })
    }

    /// A settled transfer on the server's sender link (`more`: further frames of it follow).
    pub fn transfer(handle: &Handle, delivery_id: u32, more: bool) -> Performative {
        Performative::Transfer(Transfer {
            handle: handle.clone(),
            delivery_id: Some(delivery_id),
            delivery_tag: Some(serde_bytes::ByteBuf::from(delivery_id.to_be_bytes().to_vec())),
            message_format: Some(0),
            settled: Some(true),
            more,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        })
    }

    pub fn detach(handle: &Handle, error: Option<(&str, String)>) -> Performative {
        Performative::Detach(Detach {
            handle: handle.clone(),
            closed: true,
            error: error.map(|(c, d)| Error { condition: ErrorCondition::Custom(Symbol::from(c)), description: Some(d), info: None }),
        })
    }

    pub fn end() -> Performative {
        Performative::End(End { error: None })
    }

    pub fn close(error: Option<(&str, String)>) -> Performative {
        Performative::Close(Close {
            error: error.map(|(c, d)| Error { condition: ErrorCondition::Custom(Symbol::from(c)), description: Some(d), info: None }),
        })
    }
}

/// The `{idScope}/registrations/{registrationId}` a link address names, with the forms the
/// SDKs use: plain (Node, C#), leading `/` (Java), `amqps://host/...` (C).
pub fn link_address_identity(address: &str) -> Option<(String, String)> {
    let a = address.strip_prefix("amqps://").map(|r| r.split_once('/').map_or("", |(_, p)| p)).unwrap_or(address);
    let p = crate::request::RegistrationPath::parse(a.trim_start_matches('/'))?;
    p.rest.is_empty().then(|| (p.id_scope.to_string(), p.registration_id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::performatives::Begin;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let open = reply::open("c", 512);
        let body = encode_performative(&open).unwrap();
        let f = encode_frame(FRAME_AMQP, 0, &body);
        for n in 0..f.len() {
            assert_eq!(parse_frame(&f[..n], 1 << 16), Ok(None));
        }
        let (frame, used) = parse_frame(&f, 1 << 16).unwrap().unwrap();
        assert_eq!(used, f.len());
        let (p, rest) = decode_performative(&frame.body).unwrap();
        assert!(matches!(p, Performative::Open(o) if o.container_id == "c"));
        assert!(rest.is_empty());
        assert!(parse_frame(&[0, 0, 0, 4, 2, 0, 0, 0], 1 << 16).is_err());
        assert_eq!(parse_frame(&[0, 1, 0, 0, 2, 0, 0, 0], 512), Err(FrameError::TooLarge(65536)));
        let begin = Performative::Begin(Begin {
            remote_channel: Some(0),
            next_outgoing_id: 1,
            incoming_window: 5,
            outgoing_window: 5,
            handle_max: Default::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        let b = encode_performative(&begin).unwrap();
        assert_eq!(value_len(&b), Some(b.len()));
        for n in 0..b.len() {
            assert!(value_len(&b[..n]).is_none() || decode_performative(&b[..n]).is_err());
        }
    }

    #[test]
    fn link_addresses_of_the_sdks() {
        let want = Some(("0ne1".to_string(), "dev".to_string()));
        assert_eq!(link_address_identity("0ne1/registrations/dev"), want);
        assert_eq!(link_address_identity("/0ne1/registrations/dev"), want);
        assert_eq!(link_address_identity("amqps://host.example/0ne1/registrations/dev"), want);
        assert_eq!(link_address_identity("0ne1/devices/dev"), None);
        assert_eq!(link_address_identity("0ne1/registrations/dev/extra"), None);
    }

    #[test]
    fn plain_credentials() {
        assert_eq!(
            parse_plain(b"\x000ne1/registrations/d\x00SharedAccessSignature x"),
            Some(("0ne1/registrations/d".into(), "SharedAccessSignature x".into()))
        );
        assert_eq!(parse_plain(b"nozero"), None);
    }

    #[test]
    fn lengths_are_checked_before_decoding() {
        // A sasl-init whose mechanism (sym32) claims 4 GiB inside a 9-byte list: refused
        // without decoding (serde_amqp would allocate the claimed length first).
        let body = [0x00, 0x53, 0x41, 0xc0, 0x07, 0x01, 0xb3, 0xff, 0xff, 0xff, 0xff, b'P'];
        assert_eq!(value_len(&body), None);
        assert!(reply::sasl_init(&body).is_err());
        // The same inside a list32 and inside an array.
        let list32 = [0xd0, 0, 0, 0, 9, 0, 0, 0, 1, 0xb1, 0xff, 0xff, 0xff, 0xf0];
        assert_eq!(value_len(&list32), None);
        let array = [0xe0, 0x06, 0x02, 0xb1, 0, 0, 0, 1];
        assert_eq!(value_len(&array), None, "two elements announced, one short one present");
        // Counts larger than the bytes, and nesting deeper than 32.
        assert_eq!(value_len(&[0xc0, 0x02, 0xff, 0x40]), None);
        let mut deep = Vec::new();
        for _ in 0..40 {
            deep.extend_from_slice(&[0x00, 0x53, 0x01]);
        }
        deep.push(0x40);
        assert_eq!(value_len(&deep), None);
        // Well-formed values of every shape still pass, exactly.
        let ok = [0xc0, 0x0b, 0x02, 0xa1, 0x02, b'h', b'i', 0xe0, 0x04, 0x02, 0x50, 0x07, 0x08, 0x40];
        assert_eq!(value_len(&ok), Some(13), "list of a str8 and an array of two ubytes");
        let open = encode_performative(&reply::open("c", 512)).unwrap();
        assert_eq!(value_len(&open), Some(open.len()));
    }

    #[test]
    fn request_and_response_messages() {
        let mut map = fe2o3_amqp_types::primitives::OrderedMap::new();
        map.insert("iotdps-operation-type".to_string(), SimpleValue::String("iotdps-register".into()));
        let props = Properties { correlation_id: Some(MessageId::String("abc".into())), ..Default::default() };
        let mut payload = serde_amqp::to_vec(&props).unwrap();
        payload.extend(serde_amqp::to_vec(&ApplicationProperties(map)).unwrap());
        payload.extend(serde_amqp::to_vec(&Data(Binary::from(b"{\"registrationId\":\"d\"}".to_vec()))).unwrap());
        let r = parse_request(&payload).unwrap();
        assert_eq!(r.operation, Operation::Register { body: b"{\"registrationId\":\"d\"}".to_vec() });
        assert_eq!(r.correlation_id, Some(MessageId::String("abc".into())));
        let resp = encode_response(r.correlation_id.clone(), "{\"status\":\"assigned\"}", Some(2)).unwrap();
        assert!(parse_request(&resp).is_err(), "a message without an operation type");
        let back = read_sections(&resp).unwrap();
        assert_eq!(back.correlation_id, r.correlation_id);
        assert_eq!(back.body, b"{\"status\":\"assigned\"}");
        assert!(parse_request(&payload[..payload.len() - 1]).is_err());
    }
}
