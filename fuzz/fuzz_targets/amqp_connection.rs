#![no_main]
// Arbitrary bytes into the AMQP connection state machine, fed in two pieces, with every event
// answered: it must never panic, and its output must always be whole frames it can parse back.
use dps_core::amqp_connection::{Connection, Event, Settings};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The chain is only carried, never parsed, by the connection machine.
    let cert = data.first().is_some_and(|b| b & 1 == 1).then(|| std::sync::Arc::new(vec![data.to_vec()]));
    let Ok(mut c) = Connection::new(Settings { max_frame: 4096, max_message: 8192, link_credit: 2, client_certificate: cert, id_scope: "0ne1".into() }) else {
        return;
    };
    let (a, b) = data.split_at(data.len() / 2);
    for piece in [a, b] {
        c.receive(piece);
        for _ in 0..64 {
            match c.poll() {
                Ok(Some(Event::Request { delivery_id, correlation_id, .. })) => {
                    let _ = c.answer(delivery_id, correlation_id, 200, "{\"status\":\"assigned\"}", None);
                }
                Ok(Some(Event::Invalid { delivery_id, .. })) => {
                    let _ = c.answer(delivery_id, None, 400, "{}", None);
                }
                Ok(Some(Event::TpmKeys { .. })) => {
                    let n = data.last().map_or(900, |b| usize::from(*b) * 8);
                    let _ = c.tpm_challenge(&vec![7u8; n]);
                }
                Ok(Some(Event::Closed)) | Ok(None) | Err(_) => break,
            }
        }
        let _ = c.take_output();
    }
});
