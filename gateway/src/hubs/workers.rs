//! The hub worker threads: connector steps block (a broker's answer, a DNS lookup, a TLS
//! handshake), so they run here, never on a shard. A shard hands over one step and awaits its
//! result on a oneshot channel; retries and their timing stay with the shard (`run.rs`).

use super::mosquitto::MosquittoHub;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use dps_core::hub::{HubConnector, HubError, HubTask};
use dps_core::model::{HubKind, LinkedHub};
use futures::channel::oneshot;
use std::time::Duration;

/// One step of hub work.
#[derive(Debug, Clone)]
pub enum Step {
    Assign(HubTask),
    Remove(String),
    Disable(String),
    /// POST a custom allocation request (no hub yet): answered with the HTTP status and body.
    Allocate {
        url: String,
        body: serde_json::Value,
    },
}

/// What a step produced: nothing, or a webhook's HTTP status and body.
pub type Output = Option<(u16, Vec<u8>)>;

struct Job {
    hub: Option<LinkedHub>,
    step: Step,
    reply: oneshot::Sender<Result<Output, HubError>>,
}

pub struct HubWorkers {
    tx: Sender<Job>,
    /// Steps in flight per hub (lower-case name; webhooks under their URL), so one slow hub
    /// cannot hold every worker.
    in_flight: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    per_hub: usize,
}

/// A step's place in its hub's count, given back when the step ends.
struct Slot<'a> {
    workers: &'a HubWorkers,
    hub: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.workers.in_flight.lock() {
            if let Some(n) = m.get_mut(&self.hub) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.hub);
                }
            }
        }
    }
}

impl HubWorkers {
    /// `knobs.threads` workers (each step mostly waits on its hub, so more than cores),
    /// `knobs.queue` steps waiting at most; they end once `stop`'s sender is dropped (an idle
    /// worker sleeps on its queue and on `stop` together: it never wakes just to look).
    pub fn start(knobs: Knobs, stop: Receiver<()>) -> std::io::Result<(HubWorkers, Vec<std::thread::JoinHandle<()>>)> {
        let (tx, rx) = bounded::<Job>(knobs.queue.max(1));
        let mut handles = Vec::new();
        for i in 0..knobs.threads.max(1) {
            let (rx, stop) = (rx.clone(), stop.clone());
            handles.push(std::thread::Builder::new().name(format!("hub-{i}")).spawn(move || work(&rx, &stop, knobs))?);
        }
        Ok((HubWorkers { tx, in_flight: Default::default(), per_hub: knobs.per_hub.max(1) }, handles))
    }

    /// Runs one step at `hub` (None: a webhook step); a full queue is a transient failure
    /// (retried later).
    pub async fn run(&self, hub: Option<&LinkedHub>, step: Step) -> Result<Output, HubError> {
        let name = match (&step, hub) {
            (Step::Allocate { url, .. }, _) => super::http::redact(url).to_ascii_lowercase(),
            (_, Some(h)) => h.name.to_ascii_lowercase(),
            (_, None) => String::new(),
        };
        let _slot = self.take_slot(name)?;
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { hub: hub.cloned(), step, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(HubError::Busy("every hub worker is busy".into())),
            Err(TrySendError::Disconnected(_)) => return Err(HubError::Transient("the hub workers have stopped".into())),
        }
        rx.await.unwrap_or_else(|_| Err(HubError::Transient("the hub worker stopped".into())))
    }
}

/// The workers' settings.
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    pub threads: usize,
    pub queue: usize,
    /// Steps in flight to one hub (or webhook) at most.
    pub per_hub: usize,
    /// Unique per process start (correlation data, client ids).
    pub instance: u32,
    /// How long a webhook may take to answer.
    pub webhook_timeout: Duration,
}

impl HubWorkers {
    fn take_slot(&self, hub: String) -> Result<Slot<'_>, HubError> {
        let mut m = self.in_flight.lock().map_err(|_| HubError::Transient("hub worker state poisoned".into()))?;
        let n = m.entry(hub.clone()).or_insert(0);
        if *n >= self.per_hub {
            return Err(HubError::Busy(format!("{} steps already in flight to {hub}", self.per_hub)));
        }
        *n += 1;
        Ok(Slot { workers: self, hub })
    }
}

fn work(rx: &Receiver<Job>, stop: &Receiver<()>, knobs: Knobs) {
    loop {
        // Stop first: steps still queued then are answered as transient failures (their
        // replies dropped), not worked through while the service shuts down.
        let job = crossbeam_channel::select_biased! {
            recv(stop) -> _ => return,
            recv(rx) -> job => match job {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let result = match (&job.step, &job.hub) {
            (Step::Allocate { url, body }, _) => {
                super::http::post_json(url, body, knobs.webhook_timeout, dps_core::hub::custom::MAX_RESPONSE_BYTES).map(Some)
            }
            (_, None) => Err(HubError::Refused("no hub named for a hub step".into())),
            (step, Some(hub)) => connector(hub, knobs.instance)
                .and_then(|c| match step {
                    Step::Assign(t) => c.assign(t),
                    Step::Remove(id) => c.remove(id),
                    Step::Disable(id) => c.disable(id),
                    Step::Allocate { .. } => Ok(()),
                })
                .map(|()| None),
        };
        let _ = job.reply.send(result);
    }
}

/// The connector of a linked hub's kind.
fn connector(hub: &LinkedHub, instance: u32) -> Result<Box<dyn HubConnector>, HubError> {
    match hub.kind() {
        HubKind::Mosquitto => Ok(Box::new(MosquittoHub::new(hub, instance)?)),
        HubKind::AzureIotHub => Ok(Box::new(super::azure_iothub::AzureIotHub::new(hub)?)),
        HubKind::Webhook => Ok(Box::new(super::webhook::WebhookHub::new(hub)?)),
        HubKind::RegistryOnly => Ok(Box::new(RegistryOnly)),
    }
}

/// A hub managed elsewhere: the assignment is only recorded.
struct RegistryOnly;

impl HubConnector for RegistryOnly {
    fn assign(&self, _: &HubTask) -> Result<(), HubError> {
        Ok(())
    }
    fn remove(&self, _: &str) -> Result<(), HubError> {
        Ok(())
    }
    fn disable(&self, _: &str) -> Result<(), HubError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};

    /// A webhook that answers 200 after `delay`.
    fn slow_webhook(delay: Duration) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let mut c = c.unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    std::thread::sleep(delay);
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
                });
            }
        });
        format!("http://127.0.0.1:{port}/hook")
    }

    #[test]
    fn one_hub_cannot_take_more_than_its_share_of_workers() {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let knobs = Knobs { threads: 4, queue: 16, per_hub: 1, instance: 1, webhook_timeout: Duration::from_secs(5) };
        let (w, threads) = HubWorkers::start(knobs, stopped).unwrap();
        let step = |url: &str| Step::Allocate { url: url.to_string(), body: serde_json::json!({}) };
        let (slow, other) = (slow_webhook(Duration::from_millis(300)), slow_webhook(Duration::ZERO));
        let (a, b, c) = futures::executor::block_on(futures::future::join3(
            w.run(None, step(&slow)),
            w.run(None, step(&slow)),
            w.run(None, step(&other)),
        ));
        assert_eq!(a.unwrap().map(|(s, _)| s), Some(200));
        assert!(matches!(b, Err(HubError::Busy(m)) if m.contains("in flight")), "the second step to the same hub waits its turn");
        assert_eq!(c.unwrap().map(|(s, _)| s), Some(200), "another hub is not held up");
        // The slot is given back: the hub takes a step again.
        assert!(futures::executor::block_on(w.run(None, step(&slow))).is_ok());
        drop(stop);
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
