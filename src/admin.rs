//! The admin listener, for the platform rather than for clients: `/metrics`
//! (Prometheus), `/livez` (the process serves), `/readyz` (it takes new connections;
//! fails while draining), `/connections` (the live WebSocket table), `/drain` (start the
//! drain, see how it goes) and, when `admin.allow_close` is set,
//! `POST /connections/{id}/close`. It runs on its own address, by default on loopback
//! only.
//!
//! Probes and scrapes come from anywhere the address is reachable (in Kubernetes, the
//! cluster network); what changes wsgate's state — the drain and closing a connection —
//! is refused with 403 to a peer that is not on loopback: the `preStop` hook and an
//! operator's `kubectl exec` or port-forward arrive there.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::gate::Gate;
use crate::history::Releases;
use crate::live::CloseError;
use crate::proxy::{Body, full};
use crate::record::{Kind, Outcome};
use crate::report;

/// Bound on reading an admin request's header.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gate = gate.clone();
        conns.spawn(async move {
            let service = service_fn(move |req| {
                let gate = gate.clone();
                async move { Ok::<_, Infallible>(route(&gate, peer, req).await) }
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

/// Largest request body accepted (a close request).
const MAX_BODY: usize = 4096;

async fn route(gate: &Gate, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let changes_state = req.method() == Method::POST;
    if changes_state && !may_change_state(peer.ip()) {
        tracing::warn!(%peer, path, "admin request refused: not from loopback");
        return text(
            StatusCode::FORBIDDEN,
            "only a client on loopback may do this (kubectl exec, port-forward, a preStop hook)",
        );
    }
    if changes_state && !same_origin(req.headers()) {
        tracing::warn!(%peer, path, "admin request refused: sent by another site's page");
        return text(
            StatusCode::FORBIDDEN,
            "a page of another origin may not do this",
        );
    }
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["metrics"]) => {
            let mut resp = Response::new(full(report::render(&gate.live, &gate.metrics)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, [""]) => page(PAGE, "text/html; charset=utf-8"),
        (&Method::GET, ["admin.js"]) => page(SCRIPT, "text/javascript; charset=utf-8"),
        (&Method::GET, ["admin.css"]) => page(STYLE, "text/css; charset=utf-8"),
        (&Method::GET, ["livez"]) => text(StatusCode::OK, "ok"),
        (&Method::GET, ["readyz"]) if gate.is_ready() => text(StatusCode::OK, "ready"),
        (&Method::GET, ["readyz"]) => text(StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (&Method::GET, ["connections"]) => connections(gate, req.uri().query()),
        (&Method::GET, ["connections", "recent"]) => recent(gate, req.uri().query()),
        (&Method::GET, ["summary"]) => json(StatusCode::OK, &summary(gate, peer)),
        (&Method::POST, ["connections", id, "close"]) => close(gate, id, req).await,
        (&Method::POST, ["drain"]) => {
            if gate.begin_drain("admin") {
                tracing::info!(%peer, "drain requested");
            }
            json(StatusCode::ACCEPTED, &gate.drain.status(&gate.live))
        }
        (&Method::GET, ["drain"]) => json(StatusCode::OK, &gate.drain.status(&gate.live)),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /metrics, /livez, /readyz, /connections, /connections/recent, /summary or /drain",
        ),
    }
}

/// The raw value of `name` in a query string (`a=1&name=value`), if present. The admin
/// API's parameters are plain words and numbers: nothing to percent-decode.
fn param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// `GET /connections[?limit=N]`: the open WebSockets; with a limit, at most N of them,
/// flagged first, then the oldest (the admin page asks for a screenful, not for all ten
/// thousand every second).
fn connections(gate: &Gate, query: Option<&str>) -> Response<Body> {
    let limit = match param(query, "limit").map(str::parse::<usize>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return text(
                StatusCode::BAD_REQUEST,
                "limit: expected a whole number of connections, e.g. ?limit=200",
            );
        }
    };
    json(StatusCode::OK, &gate.live.snapshot(limit))
}

/// `GET /connections/recent[?kind=websocket|http][&outcome=LABEL]`: the last exchanges
/// that ended, newest first.
fn recent(gate: &Gate, query: Option<&str>) -> Response<Body> {
    let outcome = match param(query, "outcome") {
        None | Some("") | Some("all") => None,
        Some(label) => match Outcome::from_label(label) {
            Some(o) => Some(o),
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("unknown outcome {label:?}"),
                );
            }
        },
    };
    let kind = match param(query, "kind") {
        None | Some("") | Some("all") => None,
        Some(label) => match Kind::BOTH.into_iter().find(|k| k.as_str() == label) {
            Some(k) => Some(k),
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("unknown kind {label:?}: use websocket or http"),
                );
            }
        },
    };
    json(StatusCode::OK, &gate.live.recent(kind, outcome))
}

/// `GET /summary`: what the admin page shows above its tables.
#[derive(Debug, Serialize)]
struct Summary {
    version: &'static str,
    uptime_seconds: f64,
    draining: bool,
    open_websockets: usize,
    /// HTTP streams open (in `/connections`).
    open_http_streams: usize,
    max_connections: usize,
    ping_interval_seconds: Option<f64>,
    /// WebSockets ended since start, by every WebSocket outcome.
    ended_by_outcome: BTreeMap<&'static str, u64>,
    /// HTTP streams and cut-short exchanges ended since start, by every HTTP outcome
    /// (`completed` counts streams only: a short request that completed is counted in
    /// the metrics, not here).
    http_ended_by_outcome: BTreeMap<&'static str, u64>,
    release_seconds: Releases,
    http_release_seconds: Releases,
    /// `admin.allow_close` is on and the viewer is on loopback: the page offers a
    /// Close button per connection.
    viewer_may_close: bool,
    /// The viewer is on loopback: the page offers to start the drain.
    viewer_may_drain: bool,
}

fn summary(gate: &Gate, viewer: SocketAddr) -> Summary {
    let settings = gate.settings();
    let config = &settings.config;
    let by_outcome = |kind: Kind| {
        let ended = gate.live.ended(kind);
        kind.outcomes()
            .iter()
            .map(|o| (o.as_str(), ended[o.idx()]))
            .collect()
    };
    let on_loopback = may_change_state(viewer.ip());
    Summary {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: gate.started.elapsed().as_secs_f64(),
        draining: gate.drain.is_begun(),
        open_websockets: gate.live.count(Kind::WebSocket),
        open_http_streams: gate.live.count(Kind::Http),
        max_connections: settings.max_connections,
        ping_interval_seconds: config.websocket.ping_interval.map(|d| d.as_secs_f64()),
        ended_by_outcome: by_outcome(Kind::WebSocket),
        http_ended_by_outcome: by_outcome(Kind::Http),
        release_seconds: gate.live.releases(Kind::WebSocket),
        http_release_seconds: gate.live.releases(Kind::Http),
        viewer_may_close: config.admin.allow_close && on_loopback,
        viewer_may_drain: on_loopback,
    }
}

/// A request that changes state must not come from another site's page: a browser
/// always sends `Origin` with a POST, and a page elsewhere could otherwise make the
/// operator's browser drain wsgate (the admin port is often reachable from it through a
/// port-forward). Requests without `Origin` are not from a browser page (`wsgate drain`,
/// curl).
fn same_origin(headers: &hyper::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin.to_str().ok(), host) {
        (Some(origin), Some(host)) => origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// Whether `peer` may change wsgate's state (drain it, close a connection): only from
/// loopback, IPv4-mapped IPv6 loopback included.
fn may_change_state(peer: IpAddr) -> bool {
    match peer {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The body of `POST /connections/{id}/close`. An HTTP stream has no Close frame: its
/// code and reason are ignored (and may be left out).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    #[serde(default = "normal_closure")]
    code: u16,
    #[serde(default)]
    reason: String,
}

fn normal_closure() -> u16 {
    1000
}

async fn close(gate: &Gate, id: &str, req: Request<Incoming>) -> Response<Body> {
    if !gate.settings().config.admin.allow_close {
        return text(
            StatusCode::FORBIDDEN,
            "closing connections is disabled: set admin.allow_close = true",
        );
    }
    let Ok(id) = id.parse::<u64>() else {
        return text(
            StatusCode::BAD_REQUEST,
            "the connection id must be a number",
        );
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "the body is too large or unreadable",
            );
        }
    };
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        bytes::Bytes::from_static(b"{}")
    } else {
        body
    };
    let request: CloseBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"code\": 1000, \"reason\": \"...\"}}: {e}"),
            );
        }
    };
    match gate.live.close(id, request.code, &request.reason) {
        Ok(()) => {
            tracing::info!(id, code = request.code, "close requested by operator");
            text(StatusCode::ACCEPTED, "closing")
        }
        Err(e @ CloseError::NotFound(_)) => text(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e) => text(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// The admin page (`GET /`): one page, its script and its style, in the binary. The
/// JSON endpoints are its API; it polls them every second.
const PAGE: &str = include_str!("admin/index.html");
const SCRIPT: &str = include_str!("admin/admin.js");
const STYLE: &str = include_str!("admin/admin.css");

/// Nothing but the page's own files: no inline code, nothing fetched elsewhere, never
/// framed by another page.
const PAGE_POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

fn page(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{body}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|e| e.to_string().into_bytes());
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The page polls every second: always the state of now.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_parameter_is_found_by_its_whole_name() {
        assert_eq!(
            param(Some("outcome=client_gone&limit=20"), "limit"),
            Some("20")
        );
        assert_eq!(param(Some("limit="), "limit"), Some(""));
        assert_eq!(param(Some("limits=3&xlimit=4"), "limit"), None);
        assert_eq!(param(None, "limit"), None);
    }

    #[test]
    fn a_page_of_another_origin_may_not_change_state() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = hyper::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        // No Origin: wsgate drain, curl.
        assert!(same_origin(&headers(&[("host", "127.0.0.1:9090")])));
        // The admin page itself.
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090")
        ])));
        for evil in ["https://evil.example", "http://127.0.0.1:9091", "null"] {
            assert!(
                !same_origin(&headers(&[("host", "127.0.0.1:9090"), ("origin", evil)])),
                "{evil}"
            );
        }
    }

    #[test]
    fn only_loopback_peers_may_change_state() {
        for ok in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert!(may_change_state(ok.parse().unwrap()), "{ok}");
        }
        for refused in [
            "10.0.0.7",
            "192.168.1.2",
            "0.0.0.0",
            "fe80::1",
            "2001:db8::1",
            "::ffff:10.0.0.7",
        ] {
            assert!(!may_change_state(refused.parse().unwrap()), "{refused}");
        }
    }
}
