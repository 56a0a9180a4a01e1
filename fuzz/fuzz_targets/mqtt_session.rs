#![no_main]
// Arbitrary bytes into the MQTT session machine, fed in two pieces, every request answered: it
// must never panic, and everything it writes must parse back as MQTT packets.
use dps_core::mqtt_session::{Event, Session, Settings};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut s = Session::new(Settings { max_packet: 4096, idle_secs: 60, client_certificate: None, id_scope: "0ne1".into(), max_keep_alive_secs: 300 });
    let (a, b) = data.split_at(data.len() / 2);
    for piece in [a, b] {
        s.receive(piece);
        for _ in 0..64 {
            match s.poll() {
                Ok(Some(Event::Request { rid, .. })) => {
                    let _ = s.answer(&rid, 200, "{\"status\":\"assigned\"}", None);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let mut out = s.take_output();
        while !out.is_empty() {
            if mqttbytes::v4::read(&mut out, 1 << 20).is_err() {
                panic!("the session wrote something that is not MQTT");
            }
        }
    }
});
