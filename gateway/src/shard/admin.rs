//! The admin listener: plain HTTP, loopback by default, `GET /metrics` for Prometheus.

use super::{next_connection, Shard};
use crate::transport::http::{self, Response};
use futures::io::AsyncWriteExt;
use glommio::net::TcpListener;
use std::rc::Rc;
use std::time::Duration;

/// The admin listener (shard 0): plain HTTP, `GET /metrics` in the Prometheus text format.
pub(super) async fn admin_loop(listener: TcpListener, shard: Rc<Shard>) {
    let mut pending = None;
    while let Some(accepted) = next_connection(&listener, &mut pending, &shard.stop).await {
        let Ok(mut stream) = accepted else { continue };
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let mut buf = Vec::new();
            let read =
                glommio::timer::timeout(Duration::from_secs(5), async { Ok(http::read_request(&mut stream, &mut buf, 0).await) }).await;
            let resp = match read {
                Ok(Ok(req)) if req.method == "GET" && req.path == "/metrics" => {
                    let extra = crate::metrics::store_series(&shard.svc.store.stats, shard.svc.store.queued_writes());
                    let text = crate::metrics::render(shard.cache.scrape_all().await, extra);
                    let mut r = Response::new(200).header("Content-Type", "text/plain; version=0.0.4");
                    r.body = text.into_bytes();
                    r
                }
                Ok(Ok(_)) => Response::new(404),
                _ => return,
            };
            let _ = http::write_response(&mut stream, &resp, true).await;
            let _ = stream.close().await;
        })
        .detach();
    }
}
