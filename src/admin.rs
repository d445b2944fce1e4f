//! The admin listener, for the platform rather than for clients: `/metrics`
//! (Prometheus), `/livez` (the process serves), `/readyz` (it accepts new connections;
//! fails while draining). It runs on its own address, by default on loopback only.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::proxy::{Body, full};
use crate::server::Shared;

/// Bound on reading an admin request's header.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often histogram upkeep runs between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Serves the admin endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        let accepted = tokio::select! {
            _ = upkeep.tick() => {
                shared.metrics.run_upkeep();
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let service = service_fn(move |req| {
                let resp = route(&shared, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    if (req.method(), req.uri().path()) == (&Method::GET, "/metrics") {
        let mut resp = Response::new(full(shared.metrics.render()));
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return resp;
    }
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/livez") => (StatusCode::OK, "ok"),
        (&Method::GET, "/readyz") if shared.ready.load(Ordering::SeqCst) => {
            (StatusCode::OK, "ready")
        }
        (&Method::GET, "/readyz") => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /livez or /readyz",
        ),
    };
    let mut resp = Response::new(full(format!("{body}\n")));
    *resp.status_mut() = status;
    resp
}
