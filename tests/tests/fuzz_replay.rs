//! Replays the checked-in fuzz seeds (`fuzz/seeds/{target}/`: each target's minimized corpus
//! and any crasher ever found) through the fuzz targets' own bodies, on stable, in every test
//! run: what the fuzzer once reached keeps working, and a fixed crash stays fixed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../fuzz/src/targets.rs"]
mod targets;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 10] = [
    ("amqp_connection", targets::amqp_connection),
    ("device_wire", targets::device_wire),
    ("enrollment_json", targets::enrollment_json),
    ("http_request", targets::http_request),
    ("mqtt_session", targets::mqtt_session),
    ("sas_token", targets::sas_token),
    ("tpm_public", targets::tpm_public),
    ("websocket_frame", targets::websocket_frame),
    ("x509_chain", targets::x509_chain),
    ("hub_answers", targets::hub_answers),
];

#[test]
fn every_seed_of_every_target_replays() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    for (name, run) in TARGETS {
        let dir = seeds.join(name);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{name}: seed {} panics", path.display());
            }
            n += 1;
        }
        assert!(n > 0, "{name} has no seeds");
        println!("{name}: {n} seeds replayed");
    }
}
