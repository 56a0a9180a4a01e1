//! The hub worker threads: connector steps block (a broker's answer, a DNS lookup, a TLS
//! handshake), so they run here, never on a shard. A shard hands over one step and awaits its
//! result on a oneshot channel; retries and their timing stay with the shard (`run.rs`).

use super::mosquitto::MosquittoHub;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use dps_core::hub::{HubConnector, HubError, HubTask};
use dps_core::model::{HubKind, LinkedHub};
use futures::channel::oneshot;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
}

impl HubWorkers {
    /// `knobs.threads` workers (each step mostly waits on its hub, so more than cores),
    /// `knobs.queue` steps waiting at most; they end once `stop` is set.
    pub fn start(knobs: Knobs, stop: Arc<AtomicBool>) -> std::io::Result<(HubWorkers, Vec<std::thread::JoinHandle<()>>)> {
        let (tx, rx) = bounded::<Job>(knobs.queue.max(1));
        let mut handles = Vec::new();
        for i in 0..knobs.threads.max(1) {
            let (rx, stop) = (rx.clone(), stop.clone());
            handles.push(std::thread::Builder::new().name(format!("hub-{i}")).spawn(move || work(&rx, &stop, knobs))?);
        }
        Ok((HubWorkers { tx }, handles))
    }

    /// Runs one step at `hub` (None: a webhook step); a full queue is a transient failure
    /// (retried later).
    pub async fn run(&self, hub: Option<&LinkedHub>, step: Step) -> Result<Output, HubError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { hub: hub.cloned(), step, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(HubError::Transient("every hub worker is busy".into())),
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
    /// Unique per process start (correlation data, client ids).
    pub instance: u32,
    /// How long a webhook may take to answer.
    pub webhook_timeout: Duration,
}

fn work(rx: &Receiver<Job>, stop: &AtomicBool, knobs: Knobs) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(job) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
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
