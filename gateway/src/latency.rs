//! Round-trip times from this node to each linked hub, for the geoLatency allocation policy:
//! a plain thread (never a shard) times a TCP connect to every hub's host name now and then.
//! Hubs that cannot be reached have no measurement and rank after every measured one.

use crate::service::Service;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use dps_core::model::LinkedHub;
use dps_storage::Table;
use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connect time in microseconds to `host:port`, or None when unreachable within `timeout`.
pub fn measure(host: &str, port: u16, timeout: Duration) -> Option<u64> {
    let addr = (host, port).to_socket_addrs().ok()?.next()?;
    let t = Instant::now();
    TcpStream::connect_timeout(&addr, timeout).ok()?;
    Some(t.elapsed().as_micros() as u64)
}

/// Measures every linked hub every `every` until `stop`'s sender is dropped (between rounds the
/// thread sleeps on it); publishes the results in the service and bumps its config generation
/// so shards pick them up.
pub fn spawn(svc: Arc<Service>, port: u16, every: Duration, stop: Receiver<()>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("hub-latency".into()).spawn(move || {
        let mut next = Instant::now();
        loop {
            match stop.recv_deadline(next) {
                Err(RecvTimeoutError::Timeout) => {}
                // The sender dropped (nothing is ever sent on it): stop.
                _ => return,
            }
            next = Instant::now() + every;
            let hubs: Vec<LinkedHub> = match futures::executor::block_on(svc.store.scan(Table::Hubs, "", None, usize::MAX)) {
                Ok(rows) => rows.iter().filter_map(|(_, r)| serde_json::from_slice(&r.body).ok()).collect(),
                Err(_) => continue,
            };
            let measured: HashMap<String, u64> = hubs
                .iter()
                .filter_map(|h| measure(&h.name, port, Duration::from_secs(2)).map(|rtt| (h.name.to_ascii_lowercase(), rtt)))
                .collect();
            let changed = svc.hub_latency.read().map(|m| *m != measured).unwrap_or(true);
            if changed {
                if let Ok(mut m) = svc.hub_latency.write() {
                    *m = measured;
                }
                svc.bump_generation();
            }
        }
    })
}
