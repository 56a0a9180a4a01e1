//! The service API benchmark: imports N individual symmetric-key enrollments through the bulk
//! API (per-call limit raised), measures point reads under concurrency, then restarts the
//! gateway on the same data and times until it serves. The gateway runs in this process on its
//! glommio shards; the client is a tokio runtime on other threads, so both share the machine as
//! they would on one host. No timing is asserted.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hdrhistogram::Histogram;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::BoxError;
use dps_loadgen::service::ServiceClient as Client;

fn config(shards: usize, batch: usize) -> dps_gateway::config::Config {
    let mut c = dps_gateway::config::Config::loopback();
    c.shards = shards;
    c.limits.max_bulk_items = batch;
    c.limits.max_body_bytes = (batch * 400).max(96 * 1024);
    c.limits.service_operations_per_minute = 0;
    c
}

/// The service API client loadgen uses, pointed at the gateway this benchmark started.
fn connect(dir: &std::path::Path) -> Result<Arc<Client>, BoxError> {
    let ep = dps_loadgen::endpoint::Endpoint::read(&dir.join("endpoint.json"), "127.0.0.1")?;
    Ok(Arc::new(Client::new(&ep)?))
}

fn enrollment(i: usize) -> serde_json::Value {
    // Keys are supplied, as an importer of existing device records would.
    let key = B64.encode(format!("bench-key-material-{i:012}").as_bytes());
    json!({"registrationId": format!("bench-{i:09}"), "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}})
}

async fn import(c: Arc<Client>, n: usize, batch: usize, concurrency: usize) -> Result<Duration, BoxError> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, next) = (c.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(batch, Ordering::Relaxed);
                if start >= n {
                    return Ok::<(), BoxError>(());
                }
                let items: Vec<_> = (start..(start + batch).min(n)).map(enrollment).collect();
                let body = json!({"mode": "create", "enrollments": items}).to_string();
                let (status, text) = c.call(reqwest::Method::POST, "/enrollments", Some(body)).await?;
                if status != 200 || !text.contains("\"isSuccessful\":true") {
                    return Err(format!("bulk call at {start} failed: {status} {}", &text[..text.len().min(300)]).into());
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

async fn point_reads(c: Arc<Client>, n: usize, reads: usize, concurrency: usize) -> Result<(Duration, Histogram<u64>), BoxError> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (c, next) = (c.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3)?;
            // A cheap LCG spreads the reads over the whole key space.
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ w as u64;
            while next.fetch_add(1, Ordering::Relaxed) < reads {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let i = (x >> 33) as usize % n;
                let t = Instant::now();
                let (status, _) = c.call(reqwest::Method::GET, &format!("/enrollments/bench-{i:09}"), None).await?;
                if status != 200 {
                    return Err::<Histogram<u64>, BoxError>(format!("read of bench-{i:09} answered {status}").into());
                }
                h.record(t.elapsed().as_micros() as u64)?;
            }
            Ok(h)
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    Ok((started.elapsed(), all))
}

pub struct Sizes {
    pub enrollments: usize,
    pub batch: usize,
    pub concurrency: usize,
    pub reads: usize,
    pub shards: usize,
}

/// Runs the benchmark; returns the table rows (`| measurement | value |`).
pub fn run(a: &Sizes, rt: &tokio::runtime::Runtime) -> Result<Vec<String>, BoxError> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let running = dps_gateway::start(config(a.shards, a.batch), &dir)?;
    let client = connect(&dir)?;
    let import_time = rt.block_on(import(client.clone(), a.enrollments, a.batch, a.concurrency))?;
    let (read_time, hist) = rt.block_on(point_reads(client, a.enrollments, a.reads, a.concurrency))?;
    running.shutdown()?;
    let disk = crate::dir_bytes(&dir);

    // Restart on the same data: time from start until the first read is answered.
    let t = Instant::now();
    let running = dps_gateway::start(config(a.shards, a.batch), &dir)?;
    let client = connect(&dir)?;
    let (status, _) = rt.block_on(client.call(reqwest::Method::GET, "/enrollments/bench-000000001", None))?;
    let serving = t.elapsed();
    running.shutdown()?;
    if status != 200 {
        return Err(format!("after restart the first read answered {status}").into());
    }
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    Ok(vec![
        format!(
            "| bulk import of {} enrollments (batch {}, {} in flight) | {:.1} s, {:.0}/s |",
            a.enrollments,
            a.batch,
            a.concurrency,
            import_time.as_secs_f64(),
            a.enrollments as f64 / import_time.as_secs_f64()
        ),
        format!(
            "| point reads ({} reads, {} in flight) | {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms |",
            a.reads,
            a.concurrency,
            a.reads as f64 / read_time.as_secs_f64(),
            q(0.5),
            q(0.99),
            q(0.999)
        ),
        format!("| bytes on disk after the import | {:.1} MiB |", disk as f64 / (1 << 20) as f64),
        format!("| restart until the first read is served | {:.2} s |", serving.as_secs_f64()),
    ])
}
