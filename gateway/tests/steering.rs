#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Light load on one shard: while the shards are lightly busy every new connection goes to
//! shard 0; many connections open on shard 0 spread them again; turned off, the kernel
//! spreads them always.

mod common;
use common::{stalled_connection, test_config, TestServer};
use std::time::{Duration, Instant};

/// The admin listener's metrics page.
fn metrics_text(s: &TestServer) -> String {
    reqwest::blocking::get(format!("http://127.0.0.1:{}/metrics", s.ep.ports.admin)).unwrap().text().unwrap()
}

/// Connections each shard accepted so far (by the `shard` label).
fn accepted_by_shard(s: &TestServer) -> [f64; 2] {
    let text = metrics_text(s);
    let mut by = [0.0; 2];
    for l in text.lines().filter(|l| l.starts_with("dps_connections_accepted_total{")) {
        let v: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
        for (i, slot) in by.iter_mut().enumerate() {
            if l.contains(&format!("shard=\"{i}\"")) {
                *slot += v;
            }
        }
    }
    by
}

/// Waits until shard 0 steers (it reports so once its listeners have the program).
fn steering_started(s: &TestServer) {
    let t = Instant::now();
    loop {
        let text = metrics_text(s);
        if text.contains("\ndps_light_load_steering 1\n") {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Opens `n` connections one after the other, each accepted before the next (its first
/// byte hands it to the gateway), and closes them: which shard accepted each.
fn one_at_a_time(s: &TestServer, n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| {
            let before = accepted_by_shard(s);
            let c = stalled_connection(s.ep.ports.mqtt);
            let t = Instant::now();
            loop {
                let now = accepted_by_shard(s);
                if let Some(shard) = (0..2).find(|i| now[*i] > before[*i]) {
                    drop(c);
                    return shard;
                }
                assert!(t.elapsed() < Duration::from_secs(5), "never accepted");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .collect()
}

#[test]
fn at_light_load_every_new_connection_goes_to_shard_0() {
    let s = TestServer::start(test_config());
    steering_started(&s);
    let shards = one_at_a_time(&s, 30);
    assert!(shards.iter().all(|s| *s == 0), "{shards:?}");
}

#[test]
fn turned_off_the_kernel_spreads_them() {
    let mut cfg = test_config();
    cfg.limits.steer_light_load = false;
    let s = TestServer::start(cfg);
    let shards = one_at_a_time(&s, 40);
    // By the kernel's hash of the client's port: 40 all on one shard is a 1 in 2^39 chance.
    assert!(shards.contains(&0) && shards.contains(&1), "{shards:?}");
    let text = metrics_text(&s);
    assert!(!text.contains("\ndps_light_load_steering "), "{text}");
}

#[test]
fn many_connections_open_on_shard_0_spread_the_next_ones() {
    let s = TestServer::start(test_config());
    steering_started(&s);
    // 64 held open (a begun handshake, then nothing) fill shard 0's steering budget...
    let held: Vec<_> = (0..64).map(|_| stalled_connection(s.ep.ports.mqtt)).collect();
    let t = Instant::now();
    while accepted_by_shard(&s)[0] < 64.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", accepted_by_shard(&s));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(accepted_by_shard(&s)[1], 0.0, "steered while under the budget");
    // ...so the next ones are spread (the first of them may still go to shard 0, which
    // then spreads).
    let more: Vec<_> = (0..40).map(|_| stalled_connection(s.ep.ports.mqtt)).collect();
    let t = Instant::now();
    while accepted_by_shard(&s).iter().sum::<f64>() < 104.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", accepted_by_shard(&s));
        std::thread::sleep(Duration::from_millis(5));
    }
    let spread = accepted_by_shard(&s);
    assert!(spread[1] >= 5.0, "{spread:?}");
    // Once they close, shard 0 steers again from its next accept on (until then the kernel
    // spreads): after the first new connection it takes, it takes them all.
    drop((held, more));
    std::thread::sleep(Duration::from_millis(300));
    let shards = one_at_a_time(&s, 30);
    let first = shards.iter().position(|s| *s == 0).expect("shard 0 took one");
    assert!(shards[first..].iter().all(|s| *s == 0), "{shards:?}");
}
