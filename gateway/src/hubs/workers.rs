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

/// One connector step.
#[derive(Debug, Clone)]
pub enum Step {
    Assign(HubTask),
    Remove(String),
    Disable(String),
}

struct Job {
    hub: LinkedHub,
    step: Step,
    reply: oneshot::Sender<Result<(), HubError>>,
}

pub struct HubWorkers {
    tx: Sender<Job>,
}

impl HubWorkers {
    /// `threads` workers (each step is mostly waiting on the hub, so a few more than cores),
    /// `queue` steps waiting at most; they end once `stop` is set.
    pub fn start(
        threads: usize,
        queue: usize,
        instance: u32,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(HubWorkers, Vec<std::thread::JoinHandle<()>>)> {
        let (tx, rx) = bounded::<Job>(queue.max(1));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, stop) = (rx.clone(), stop.clone());
            handles.push(std::thread::Builder::new().name(format!("hub-{i}")).spawn(move || work(&rx, &stop, instance))?);
        }
        Ok((HubWorkers { tx }, handles))
    }

    /// Runs one step at `hub`; a full queue is a transient failure (retried later).
    pub async fn run(&self, hub: &LinkedHub, step: Step) -> Result<(), HubError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { hub: hub.clone(), step, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(HubError::Transient("every hub worker is busy".into())),
            Err(TrySendError::Disconnected(_)) => return Err(HubError::Transient("the hub workers have stopped".into())),
        }
        rx.await.unwrap_or_else(|_| Err(HubError::Transient("the hub worker stopped".into())))
    }
}

fn work(rx: &Receiver<Job>, stop: &AtomicBool, instance: u32) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(job) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        let result = connector(&job.hub, instance).and_then(|c| match &job.step {
            Step::Assign(t) => c.assign(t),
            Step::Remove(id) => c.remove(id),
            Step::Disable(id) => c.disable(id),
        });
        let _ = job.reply.send(result);
    }
}

/// The connector of a linked hub's kind.
fn connector(hub: &LinkedHub, instance: u32) -> Result<Box<dyn HubConnector>, HubError> {
    match hub.kind() {
        HubKind::Mosquitto => Ok(Box::new(MosquittoHub::new(hub, instance)?)),
        HubKind::RegistryOnly => Ok(Box::new(RegistryOnly)),
        other => Err(HubError::Refused(format!("hub kind '{}' has no connector", other.as_str()))),
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
