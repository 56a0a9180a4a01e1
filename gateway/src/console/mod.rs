//! The web console: HTTPS on its own port (loopback by default), for operators. A login with a
//! shared access policy's name and key opens a session (`sessions`); the page's script then
//! calls the service API through `/api/…`, which this module forwards to the same handler the
//! service API port uses, signed with the session's policy, so the console can do exactly what
//! that policy's rights allow. `/stats` gives the page the counters its live charts need.

pub mod sessions;
pub mod stats;

use crate::clock::{mono_nanos, utc_now};
use crate::shard::{next_connection, Shard};
use crate::transport::http::{self, Request, Response};
use dps_core::service_route::OWN_CLIENTS_API_VERSION;
use futures::io::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use sessions::Sessions;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Console connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;
/// Largest request body the console takes (an enrollment with its initial twin fits).
const MAX_BODY: usize = 256 * 1024;
/// The header every `/api`, `/stats` and `/logout` call must carry: a page of another site
/// cannot set it on a request to us without our consent (CORS), so it stops cross-site request
/// forgery even where SameSite cookies are not honoured.
pub const CSRF_HEADER: &str = "x-dps-console";

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

struct Console {
    sessions: RefCell<Sessions>,
    open: Cell<usize>,
}

/// The console listener (shard 0).
pub(crate) async fn console_loop(listener: TcpListener, shard: Rc<Shard>) {
    let console = Rc::new(Console { sessions: RefCell::default(), open: Cell::new(0) });
    let mut pending = None;
    while let Some(accepted) = next_connection(&listener, &mut pending, &shard.stop).await {
        let Ok(stream) = accepted else { continue };
        if console.open.get() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        console.open.set(console.open.get() + 1);
        let (shard, console) = (shard.clone(), console.clone());
        glommio::spawn_local(async move {
            serve(stream, &shard, &console).await;
            console.open.set(console.open.get() - 1);
        })
        .detach();
    }
}

async fn serve(stream: TcpStream, shard: &Shard, console: &Console) {
    let _ = stream.set_nodelay(true);
    let handshake = Duration::from_secs(shard.limits.handshake_timeout_secs);
    let accept = futures_rustls::TlsAcceptor::from(shard.tls.console.clone()).accept(stream);
    let Ok(Ok(mut s)) = glommio::timer::timeout(handshake, async { Ok(accept.await) }).await else { return };
    let idle = Duration::from_secs(shard.limits.idle_timeout_secs);
    let mut buf = Vec::new();
    loop {
        let read = glommio::timer::timeout(idle, async { Ok(http::read_request(&mut s, &mut buf, MAX_BODY).await) }).await;
        let req = match read {
            Ok(Ok(r)) => r,
            Ok(Err(http::ReadError::Closed | http::ReadError::Io)) | Err(_) => break,
            Ok(Err(_)) => {
                let _ = http::write_response(&mut s, &text(400, "bad request"), true).await;
                break;
            }
        };
        let resp = answer(&req, shard, console).await.header("X-Content-Type-Options", "nosniff").header("Referrer-Policy", "no-referrer");
        let close = req.close || shard.stop.load(Ordering::Relaxed);
        if http::write_response(&mut s, &resp, close).await.is_err() || close {
            break;
        }
    }
    let _ = s.close().await;
}

fn text(status: u16, body: &str) -> Response {
    let mut r = Response::new(status).header("Content-Type", "text/plain; charset=utf-8");
    r.body = body.as_bytes().to_vec();
    r
}

fn asset(content_type: &str, body: &str) -> Response {
    let mut r = Response::new(200)
        .header("Content-Type", content_type)
        .header("Cache-Control", "no-cache")
        // Only our own script and style; nothing inline, nothing from elsewhere, no framing.
        .header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        );
    r.body = body.as_bytes().to_vec();
    r
}

fn json(status: u16, v: &serde_json::Value) -> Response {
    Response::json(status, v.to_string()).header("Cache-Control", "no-store")
}

fn unix_now() -> u64 {
    utc_now().unix_secs().max(0) as u64
}

async fn answer(req: &Request, shard: &Shard, console: &Console) -> Response {
    let now = unix_now();
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/" | "/index.html") => return asset("text/html; charset=utf-8", INDEX_HTML),
        ("GET", "/console.js") => return asset("text/javascript; charset=utf-8", CONSOLE_JS),
        ("GET", "/console.css") => return asset("text/css; charset=utf-8", CONSOLE_CSS),
        ("POST", "/login") => return login(req, shard, console, now),
        (_, "/session" | "/logout" | "/stats") => {}
        (_, p) if p.starts_with("/api/") => {}
        // The browser's own asks (favicon.ico) and anything else: nothing here.
        _ => return json(404, &serde_json::json!({ "message": "no such page" })),
    }
    // Everything else needs a session and the console's own header.
    let session = console.sessions.borrow().find(req.header("cookie"), now).cloned();
    let Some(session) = session else {
        return json(401, &serde_json::json!({ "message": "log in first" }));
    };
    if req.header(CSRF_HEADER).is_none() {
        return json(403, &serde_json::json!({ "message": format!("the {CSRF_HEADER} header is missing") }));
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/session") => json(200, &serde_json::json!({ "policy": session.policy, "idScope": shard.svc.id_scope })),
        ("POST", "/logout") => {
            console.sessions.borrow_mut().close(req.header("cookie"));
            json(200, &serde_json::json!({})).header("Set-Cookie", sessions::clear_cookie())
        }
        ("GET", "/stats") => {
            let shards = crate::shard::admin::scrape_all(&shard.metrics, shard.cache.mesh()).await;
            json(200, &stats::summary(&shards, now))
        }
        (_, p) if p.starts_with("/api/") => forward(req, &p[4..], &session, shard).await,
        _ => json(404, &serde_json::json!({ "message": "no such page" })),
    }
}

fn login(req: &Request, shard: &Shard, console: &Console, now: u64) -> Response {
    #[derive(serde::Deserialize)]
    struct Login {
        policy: String,
        key: String,
    }
    let Ok(l) = serde_json::from_slice::<Login>(&req.body) else {
        return json(400, &serde_json::json!({ "message": "expected {\"policy\": …, \"key\": …}" }));
    };
    match shard.api.check_policy_key(&l.policy, &l.key, utc_now()) {
        Ok(key) => {
            let id = dps_core::ids::hex(&crate::service::random_bytes::<32>());
            console.sessions.borrow_mut().open(id.clone(), &l.policy, key, now);
            tracing::info!(policy = %l.policy, "console login");
            json(200, &serde_json::json!({ "policy": l.policy })).header("Set-Cookie", sessions::set_cookie(&id))
        }
        Err(e) => {
            tracing::info!(policy = %l.policy, reason = %e.detail(), "console login refused");
            json(401, &serde_json::json!({ "message": "unknown policy or wrong key" }))
        }
    }
}

/// Hands `/api/{path}` to the service API as the session's policy (a fresh SAS token, the
/// headers the service API reads, api-version added when the page left it out).
async fn forward(req: &Request, path: &str, session: &sessions::Session, shard: &Shard) -> Response {
    let Some(host) = shard.svc.host_names.first() else { return json(500, &serde_json::json!({ "message": "no host name" })) };
    let token = dps_core::sas::build(host, &session.key, unix_now() as i64 + 300, Some(&session.policy));
    let mut headers = vec![("Authorization".to_string(), token)];
    for name in ["content-type", "if-match", "x-ms-continuation", "x-ms-max-item-count"] {
        if let Some(v) = req.header(name) {
            headers.push((name.to_string(), v.to_string()));
        }
    }
    let query = match req.query.contains("api-version=") {
        true => req.query.clone(),
        false if req.query.is_empty() => format!("api-version={OWN_CLIENTS_API_VERSION}"),
        false => format!("{}&api-version={OWN_CLIENTS_API_VERSION}", req.query),
    };
    let inner = Request { method: req.method.clone(), path: path.to_string(), query, headers, body: req.body.clone(), close: false };
    shard.api.handle(&inner, utc_now(), mono_nanos()).await.header("Cache-Control", "no-store")
}
