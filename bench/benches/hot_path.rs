//! `cargo bench -p dps-bench`: the hot path's pieces under criterion (the same methods the
//! `dps-bench` table times).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use dps_bench::micro::HotPath;
use std::hint::black_box;

fn hot_path(c: &mut Criterion) {
    let mut h = HotPath::new().unwrap();
    c.bench_function("sas_verify", |b| b.iter(|| assert!(h.sas_verify())));
    c.bench_function("group_key_derivation", |b| b.iter(|| black_box(h.derive_key())));
    c.bench_function("mqtt_decode_connect_subscribe_publish", |b| b.iter(|| assert_eq!(h.mqtt_decode(), 3)));
    c.bench_function("response_json_and_publish_encode", |b| b.iter(|| black_box(h.render_response())));
    let mut k = 0u64;
    c.bench_function("store_get_cached", |b| {
        b.iter(|| {
            k += 7919;
            assert!(h.store_get(k))
        })
    });
    let mut g = c.benchmark_group("store_put");
    g.sample_size(20);
    g.bench_function("one_transaction_per_fsync", |b| b.iter(|| assert!(h.store_put_group(1))));
    g.throughput(criterion::Throughput::Elements(256));
    g.bench_function("group_of_256_per_fsync", |b| b.iter(|| assert!(h.store_put_group(256))));
    g.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
