#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! AMQP on its TLS port: bad headers, SASL refusals and oversized frames end the connection
//! cleanly while the shard keeps serving. (The success paths are covered by the official Node
//! SDK over `amqp` and `amqpws` in tests/tests/interop_device.rs.)

mod common;
use common::mqtt_client::device_token;
use common::*;
use dps_core::amqp::{encode_frame, parse_frame, FRAME_SASL};
use std::io::{Read, Write};

fn open_amqp(s: &TestServer) -> TlsStream {
    open_tls(s, s.ep.ports.amqp)
}

/// Everything the server sends until it closes.
fn read_all(tls: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    out
}

fn sasl_init(mechanism: &str, response: &[u8]) -> Vec<u8> {
    // sasl-init (0x41): list [symbol mechanism, binary initial-response]
    let mut list = vec![0xa3, mechanism.len() as u8];
    list.extend_from_slice(mechanism.as_bytes());
    list.push(0xb0);
    list.extend_from_slice(&(response.len() as u32).to_be_bytes());
    list.extend_from_slice(response);
    let mut body = vec![0x00, 0x53, 0x41, 0xd0];
    body.extend_from_slice(&((list.len() + 4) as u32).to_be_bytes());
    body.extend_from_slice(&2u32.to_be_bytes());
    body.extend_from_slice(&list);
    encode_frame(FRAME_SASL, 0, &body)
}

/// The SASL frames after the 8-byte header: (mechanisms offered, outcome code).
fn sasl_exchange(s: &TestServer, mechanism: &str, response: &[u8]) -> (Vec<u8>, Option<u8>) {
    let mut tls = open_amqp(s);
    tls.write_all(&dps_core::amqp::SASL_HEADER).unwrap();
    tls.write_all(&sasl_init(mechanism, response)).unwrap();
    tls.flush().unwrap();
    let all = read_all(&mut tls);
    assert_eq!(&all[..8], &dps_core::amqp::SASL_HEADER);
    let (mechs, used) = parse_frame(&all[8..], 1 << 16).unwrap().unwrap();
    let outcome = parse_frame(&all[8 + used..], 1 << 16).unwrap().map(|(f, _)| f.body);
    // sasl-outcome: 0x00 0x53 0x44 list [ubyte code]; the code is the first list item.
    let code = outcome.and_then(|b| b.windows(2).position(|w| w == [0x50, 0x00] || w == [0x50, 0x01]).map(|i| b[i + 1]));
    (mechs.body, code)
}

#[test]
fn sasl_refusals_and_bad_input() {
    let mut cfg = test_config();
    cfg.limits.idle_timeout_secs = 1;
    let s = TestServer::start(cfg);
    let scope = s.ep.id_scope.clone();
    // PLAIN is offered.
    let token = device_token(&scope, "amqp-dev", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
    let good = [b"\x00".as_slice(), format!("{scope}/registrations/amqp-dev").as_bytes(), b"\x00", token.as_bytes()].concat();
    let (mechs, code) = sasl_exchange(&s, "PLAIN", &good);
    assert!(mechs.windows(5).any(|w| w == b"PLAIN"));
    // A well-formed identity passes SASL (attestation happens at register); then the server
    // waits for the AMQP header, which this client never sends.
    assert_eq!(code, Some(0));
    // Not PLAIN, a user name that is not a registration, a password that is not a token: auth.
    assert_eq!(sasl_exchange(&s, "ANONYMOUS", b"").1, Some(1));
    let bad_user = [b"\x00".as_slice(), b"someone\x00", token.as_bytes()].concat();
    assert_eq!(sasl_exchange(&s, "PLAIN", &bad_user).1, Some(1));
    let bad_pass = [b"\x00".as_slice(), format!("{scope}/registrations/amqp-dev").as_bytes(), b"\x00hunter2"].concat();
    assert_eq!(sasl_exchange(&s, "PLAIN", &bad_pass).1, Some(1));

    // Not AMQP at all: the server answers with its header and closes.
    let mut tls = open_amqp(&s);
    tls.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let all = read_all(&mut tls);
    assert_eq!(all, dps_core::amqp::SASL_HEADER);
    // A frame claiming 16 MB: closed without buffering it.
    let mut tls = open_amqp(&s);
    tls.write_all(&dps_core::amqp::SASL_HEADER).unwrap();
    tls.write_all(&[0x01, 0x00, 0x00, 0x00, 2, 1, 0, 0]).unwrap();
    let all = read_all(&mut tls);
    assert!(all.len() < 200, "closed after the mechanisms frame");
    // The plain AMQP header (the X.509 path) without a client certificate: our header, open,
    // and a close with amqp:unauthorized-access.
    let mut tls = open_amqp(&s);
    tls.write_all(&dps_core::amqp::AMQP_HEADER).unwrap();
    let all = read_all(&mut tls);
    assert!(all.starts_with(&dps_core::amqp::AMQP_HEADER));
    assert!(all.windows(24).any(|w| w == b"amqp:unauthorized-access"), "{all:?}");
    // After SASL, a frame over our 64 KiB max-frame-size: a close with framing-error.
    let mut tls = open_amqp(&s);
    tls.write_all(&dps_core::amqp::SASL_HEADER).unwrap();
    tls.write_all(&sasl_init("PLAIN", &good)).unwrap();
    tls.write_all(&dps_core::amqp::AMQP_HEADER).unwrap();
    tls.write_all(&[0x00, 0x02, 0x00, 0x00, 2, 0, 0, 0]).unwrap();
    let all = read_all(&mut tls);
    assert!(all.windows(29).any(|w| w == b"amqp:connection:framing-error"), "{all:?}");
    // The shard still serves.
    assert_eq!(s.send("GET", "/enrollments/x", None).status().as_u16(), 404);
}

#[test]
fn a_client_that_trickles_sasl_bytes_is_closed_at_the_login_deadline() {
    // Each byte used to reset the read deadline, so a client sending one now and then held its
    // connection for ever without finishing SASL. Now SASL and open must be done within
    // `limits.login_timeout_secs` of the handshake.
    let mut cfg = test_config();
    cfg.limits.login_timeout_secs = 2;
    cfg.limits.idle_timeout_secs = 60;
    let s = TestServer::start(cfg);
    let mut tls = open_amqp(&s);
    tls.write_all(&dps_core::amqp::SASL_HEADER).unwrap();
    tls.flush().unwrap();
    // A sasl-init frame, fed a byte every 300 ms.
    let frame = sasl_init("PLAIN", &[b'x'; 200]);
    let closed = trickle_until_closed(&mut tls, frame.into_iter().cycle().take(40));
    let closed = closed.unwrap_or_else(|| panic!("the connection outlived 40 trickled bytes (12 s) past a 2 s login deadline"));
    assert!(closed < std::time::Duration::from_secs(11), "trickled for {closed:?}");
    // Counted by the step it never finished.
    let timeouts = |step| counter(&s, "dps_login_timeouts_total", &[("protocol", "amqp"), ("waiting_for", step)]);
    assert_eq!(timeouts("sasl-init"), 1.0);

    // A TPM device that sends its init and never its storage root key: counted at that step.
    let mut tls = open_amqp(&s);
    tls.write_all(&dps_core::amqp::SASL_HEADER).unwrap();
    let mut init = vec![0u8];
    init.extend_from_slice(format!("{}\0stalled-tpm\0", s.ep.id_scope).as_bytes());
    init.extend_from_slice(&[1, 2, 3]);
    tls.write_all(&sasl_init("TPM", &init)).unwrap();
    tls.flush().unwrap();
    let all = read_all(&mut tls);
    assert!(!all.is_empty(), "the header, mechanisms and the first challenge came before the close");
    assert_eq!(timeouts("tpm-srk"), 1.0);
    assert_eq!(timeouts("sasl-init"), 1.0);
}
