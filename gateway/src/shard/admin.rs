//! The admin listener: plain HTTP, loopback by default, `GET /metrics` for Prometheus.

use super::{next_connection, Answer, Request, Shard, ShardMesh};
use crate::metrics::Metrics;
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
                    let store = crate::metrics::StoreView::read(&shard.svc.store.stats, shard.svc.store.queued_writes());
                    let text = crate::metrics::render(scrape_all(&shard.metrics, shard.cache.mesh()).await, Some(store));
                    let mut r = Response::new(200).header("Content-Type", crate::metrics::CONTENT_TYPE);
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

/// This shard's metric series, with the cross-shard calls in flight as they are now.
pub(super) fn snapshot(metrics: &Metrics, mesh: &ShardMesh) -> Vec<(String, i64)> {
    metrics.set("dps_cross_shard_pending", &[("shard", &mesh.me().to_string())], mesh.pending() as i64);
    metrics.snapshot()
}

/// Every shard's series: this one's and, over the mesh, the others'.
pub(crate) async fn scrape_all(metrics: &Metrics, mesh: &ShardMesh) -> Vec<Vec<(String, i64)>> {
    let mut all = vec![snapshot(metrics, mesh)];
    for peer in (0..mesh.peers()).filter(|p| *p != mesh.me()) {
        if let Ok(Answer::Scraped(series)) = mesh.call(peer, Request::Scrape).await {
            all.push(series);
        }
    }
    all
}
