//! The load driver: devices started at a fixed arrival rate (open loop) or by a fixed number of
//! workers (closed loop); latency is measured from each device's intended start, so a slow
//! server cannot hide its queueing by slowing the generator down (no coordinated omission).

use crate::device::{BrokerLogin, Failure, Session, Transport};
use crate::endpoint::Endpoint;
use crate::identities::Identities;
use crate::report::Report;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Plan {
    pub transport: Transport,
    pub devices: usize,
    /// Devices in flight at most (closed loop: exactly this many workers).
    pub concurrency: usize,
    /// Open loop: devices started per second. `None`: closed loop.
    pub rate: Option<f64>,
    /// TLS session resumption: every device first connects once with a full handshake (not
    /// measured), then the measured pass resumes each device's own session.
    pub resume: bool,
    pub timeout: Duration,
    /// Print a progress line to stderr this often.
    pub progress: Option<Duration>,
}

pub struct Fleet {
    pub ep: Endpoint,
    pub tls: Arc<rustls::ClientConfig>,
    pub ids: Identities,
    pub broker: Option<BrokerLogin>,
    /// The max-frame-size AMQP devices announce (AMQP's minimum is 512).
    pub amqp_max_frame: u32,
    /// TPM devices: every device's challenge goes through this TPM (its EK is enrolled under
    /// each registration id).
    pub tpm: Option<crate::tpm_device::TpmHandle>,
}

impl Fleet {
    /// Devices of `ep` with a full-handshake TLS client trusting its CA and AMQP's default
    /// max-frame-size of 64 KiB.
    pub fn new(ep: Endpoint, ids: Identities) -> Result<Fleet, crate::BoxError> {
        Ok(Fleet { tls: crate::tls::client_config(&ep.ca)?, ep, ids, broker: None, amqp_max_frame: 65_536, tpm: None })
    }
}

struct Tally {
    hist: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<Failure, usize>>,
    done: AtomicUsize,
    failed: AtomicUsize,
}

impl Tally {
    fn record(&self, since: Instant, r: Result<(), Failure>) {
        match r {
            Ok(()) => {
                if let Ok(mut h) = self.hist.lock() {
                    let _ = h.record(since.elapsed().as_micros().max(1) as u64);
                }
            }
            Err(f) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = self.errors.lock() {
                    *e.entry(f).or_default() += 1;
                }
            }
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Device `i`'s TLS configuration: its own when it resumes, else the fleet's.
fn tls_for(fleet: &Fleet, configs: &Option<Arc<Vec<Arc<rustls::ClientConfig>>>>, i: usize) -> Arc<rustls::ClientConfig> {
    configs.as_ref().map_or_else(|| fleet.tls.clone(), |c| c[i].clone())
}

async fn one(fleet: &Fleet, tls: Arc<rustls::ClientConfig>, plan: &Plan, i: usize) -> Result<(), Failure> {
    let (id, key) = fleet.ids.device(i);
    // An X.509 device's certificate is made as it powers on (part of the measured time: a
    // simulator cost, not the server's).
    let (tls, x509) = match fleet.ids.certificate(i) {
        Some(made) => {
            let (cert, key) = made.map_err(|_| Failure::Tls)?;
            (crate::tls::with_client_certificate(&tls, cert, key).map_err(|_| Failure::Tls)?, true)
        }
        None => (tls, false),
    };
    let s = Session {
        x509,
        ep: &fleet.ep,
        tls,
        registration_id: &id,
        key: &key,
        broker: fleet.broker.as_ref(),
        seq: i as u32,
        amqp_max_frame: fleet.amqp_max_frame,
        tpm: fleet.tpm.as_ref(),
    };
    tokio::time::timeout(plan.timeout, s.run(plan.transport)).await.unwrap_or(Err(Failure::Timeout))
}

/// Runs the plan on the current tokio runtime and reports.
pub async fn run(fleet: Arc<Fleet>, plan: Plan) -> Result<Report, crate::BoxError> {
    let configs: Option<Arc<Vec<Arc<rustls::ClientConfig>>>> = if plan.resume {
        let configs: Arc<Vec<_>> = Arc::new((0..plan.devices).map(|_| crate::tls::resuming(&fleet.tls)).collect());
        eprintln!("resumption: first connection of {} devices (full handshakes, not measured)", plan.devices);
        let warm = pass(fleet.clone(), &Plan { rate: None, progress: None, ..plan.clone() }, Some(configs.clone())).await?;
        if warm.assigned == 0 {
            return Err("no device completed its first connection; nothing to resume".into());
        }
        Some(configs)
    } else {
        None
    };
    pass(fleet, &plan, configs).await
}

async fn pass(fleet: Arc<Fleet>, plan: &Plan, configs: Option<Arc<Vec<Arc<rustls::ClientConfig>>>>) -> Result<Report, crate::BoxError> {
    let tally = Arc::new(Tally {
        hist: Mutex::new(Histogram::new(3)?),
        errors: Mutex::new(BTreeMap::new()),
        done: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let progress = plan.progress.map(|every| {
        let (tally, total) = (tally.clone(), plan.devices);
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(every).await;
                let done = tally.done.load(Ordering::Relaxed);
                eprintln!(
                    "progress: {done}/{total} devices, {} failed, {:.0}/s in the last {:.0} s",
                    tally.failed.load(Ordering::Relaxed),
                    (done - last) as f64 / every.as_secs_f64(),
                    every.as_secs_f64()
                );
                last = done;
            }
        })
    });
    match plan.rate {
        Some(rate) => {
            let gate = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
            for i in 0..plan.devices {
                let intended = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(intended.into()).await;
                let permit = gate.clone().acquire_owned().await?;
                let (fleet, tally, plan, tls) = (fleet.clone(), tally.clone(), plan.clone(), tls_for(&fleet, &configs, i));
                tokio::spawn(async move {
                    let r = one(&fleet, tls, &plan, i).await;
                    tally.record(intended, r);
                    drop(permit);
                });
            }
            // Every device has finished once every permit is back.
            let _ = gate.acquire_many(plan.concurrency.max(1) as u32).await?;
        }
        None => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..plan.concurrency.max(1) {
                let (fleet, tally, plan, next, configs) = (fleet.clone(), tally.clone(), plan.clone(), next.clone(), configs.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= plan.devices {
                            break;
                        }
                        let tls = tls_for(&fleet, &configs, i);
                        let t = Instant::now();
                        let r = one(&fleet, tls, &plan, i).await;
                        tally.record(t, r);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    let hist = tally.hist.lock().map_err(|_| "poisoned")?.clone();
    let errors = tally.errors.lock().map_err(|_| "poisoned")?.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    Ok(Report::new(plan, elapsed, hist, errors))
}
