//! The WebSocket upgrade: check the client's handshake (RFC 6455 §4.2.1), open a
//! dedicated connection to the backend and repeat the handshake there, then answer the
//! client with exactly what the backend answered. On a 101 both raw sockets (and any
//! bytes already read behind the handshakes) go to a [`Relay`].
//!
//! The backend is connected *before* the client gets its answer, so a backend that is
//! down or refuses the upgrade (401, 403, 404...) produces a real HTTP response the
//! browser can show, not a WebSocket that opens and dies.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::metrics::UpgradeResult;
use crate::proxy::{self, Body, ProxyError};
use crate::relay::{Leg, Negotiated, Relay};
use crate::report::{self, ConnectionInfo};
use crate::server::{Connection, Shared};

/// True when the request asks to switch to WebSocket.
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    header_has_token(req.headers(), header::CONNECTION, "upgrade")
        && header_has_token(req.headers(), header::UPGRADE, "websocket")
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the client's opening handshake; the error says what is wrong.
pub fn validate<B>(req: &Request<B>) -> Result<(), (ProxyError, &'static str)> {
    let bad = |why| Err((ProxyError::BadHandshake, why));
    if req.method() != Method::GET {
        return bad("a WebSocket handshake must use GET");
    }
    if req.version() < Version::HTTP_11 {
        return bad("a WebSocket handshake needs HTTP/1.1");
    }
    let h = req.headers();
    match h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) {
        Some(b"13") => {}
        Some(_) => {
            return Err((
                ProxyError::UnsupportedVersion,
                "only Sec-WebSocket-Version 13 is supported",
            ));
        }
        None => return bad("missing Sec-WebSocket-Version"),
    }
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
        return bad("missing Sec-WebSocket-Key");
    };
    if !is_valid_key(key.as_bytes()) {
        return bad("Sec-WebSocket-Key must be 16 bytes in base64");
    }
    if h.get_all(header::SEC_WEBSOCKET_KEY).iter().count() > 1 {
        return bad("more than one Sec-WebSocket-Key");
    }
    Ok(())
}

/// Cross-site WebSocket hijacking protection: a browser always sends `Origin`, so when a
/// list is configured, a present `Origin` must be on it.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => true,
        Some(Ok(origin)) => allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(origin.trim())),
        Some(Err(_)) => false,
    }
}

/// A base64 encoding of 16 bytes: 22 significant characters and "==" (RFC 6455 §4.1).
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Handles a WebSocket upgrade request end to end; returns the client's response and
/// how the upgrade went.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Connection>,
    req: Request<Incoming>,
) -> (Response<Body>, UpgradeResult) {
    if let Err((error, why)) = validate(&req) {
        tracing::debug!(why, "bad WebSocket handshake");
        return (error.response(why), UpgradeResult::BadRequest);
    }
    if !origin_allowed(&shared.config.websocket.allowed_origins, req.headers()) {
        tracing::debug!(origin = ?req.headers().get(header::ORIGIN), "origin not allowed");
        let e = ProxyError::OriginNotAllowed;
        return (e.response(e.message()), UpgradeResult::OriginRefused);
    }
    match upgrade(shared, conn, req).await {
        Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => (resp, UpgradeResult::Ok),
        Ok(resp) => (resp, UpgradeResult::BackendRefused),
        Err(e) => {
            let result = match e {
                ProxyError::BackendUnreachable => UpgradeResult::BackendUnreachable,
                _ => UpgradeResult::BackendError,
            };
            (e.response(e.message()), result)
        }
    }
}

/// Connects the backend, repeats the handshake there and, on 101, starts the relay.
async fn upgrade(
    shared: Arc<Shared>,
    conn: Arc<Connection>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let info = ConnectionInfo {
        id: conn.id,
        client: conn.peer,
        path: req.uri().path().to_string(),
    };
    let expected_accept = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));

    let backend = connect_backend(&shared).await?;
    let (mut sender, handshake) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(backend))
        .await
        .map_err(|e| {
            tracing::debug!(error = %e, "backend handshake setup failed");
            ProxyError::BackendFailed
        })?;
    // Drives the backend connection until it upgrades (or ends after a refusal).
    let force = shared.signals.force.clone();
    shared.tracker.spawn(async move {
        tokio::select! {
            result = handshake.with_upgrades() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "backend upgrade connection ended");
                }
            }
            () = force.cancelled() => {}
        }
    });

    let backend_req = backend_request(&req, conn.peer);
    let sent = sender.send_request(backend_req);
    let mut resp = match shared.config.http.response_timeout {
        Some(limit) => tokio::time::timeout(limit, sent)
            .await
            .map_err(|_| ProxyError::BackendTimeout)?,
        None => sent.await,
    }
    .map_err(|e| {
        tracing::debug!(error = %e, "backend upgrade request failed");
        ProxyError::BackendFailed
    })?;

    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The backend refused (401, 403, 404...): the client sees exactly that.
        tracing::debug!(status = %resp.status(), "backend refused the upgrade");
        let (mut parts, body) = resp.into_parts();
        proxy::remove_hop_by_hop(&mut parts.headers);
        return Ok(Response::from_parts(
            parts,
            http_body_util::BodyExt::boxed(body),
        ));
    }
    let accept = resp.headers().get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(HeaderValue::as_bytes) != expected_accept.as_ref().map(|a| a.as_bytes()) {
        tracing::warn!("backend answered the upgrade with a wrong Sec-WebSocket-Accept");
        return Err(ProxyError::BackendBadHandshake);
    }
    let negotiated = Negotiated::from_extensions(
        resp.headers()
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let headers = resp.headers().clone();
    let backend_upgraded = hyper::upgrade::on(&mut resp).await.map_err(|e| {
        tracing::debug!(error = %e, "backend upgrade failed");
        ProxyError::BackendFailed
    })?;
    let backend = backend_upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| ProxyError::BackendFailed)?;

    let relay_shared = shared.clone();
    shared.tracker.spawn(async move {
        let client = match client_upgrade.await {
            Ok(upgraded) => upgraded.downcast::<TokioIo<TcpStream>>(),
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed");
                return;
            }
        };
        let Ok(client) = client else {
            tracing::error!("client connection is not a TCP stream");
            return;
        };
        let registration = relay_shared
            .live
            .register(info.id, info.client, info.path.clone());
        let relay = Relay::new(
            Leg {
                stream: client.io.into_inner(),
                buffered: &client.read_buf,
            },
            Leg {
                stream: backend.io.into_inner(),
                buffered: &backend.read_buf,
            },
            negotiated,
            relay_shared.relay_config,
            relay_shared.signals.clone(),
            relay_shared.metrics.relay(),
            registration.conn.clone(),
        );
        let active = &relay_shared.metrics.websockets_active;
        active.increment(1.0);
        let ended = relay.run().await;
        active.decrement(1.0);
        drop(registration);
        report::connection_ended(&relay_shared.metrics, &info, &ended);
        // The client connection's slot is freed when `conn` drops, after the relay.
        drop(conn);
    });

    let mut client_resp = Response::new(proxy::full(bytes::Bytes::new()));
    *client_resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *client_resp.headers_mut() = headers;
    Ok(client_resp)
}

/// Opens a dedicated TCP connection to the backend for one WebSocket.
async fn connect_backend(shared: &Shared) -> Result<TcpStream, ProxyError> {
    let b = &shared.config.backend;
    let connect = TcpStream::connect((b.host.as_str(), b.port));
    let stream = match tokio::time::timeout(shared.config.http.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, backend = %b.authority, "backend connect failed");
            return Err(ProxyError::BackendUnreachable);
        }
        Err(_) => {
            tracing::debug!(backend = %b.authority, "backend connect timed out");
            return Err(ProxyError::BackendUnreachable);
        }
    };
    crate::server::tune_socket(&stream);
    Ok(stream)
}

/// The upgrade request as the backend gets it: every end-to-end header of the client's
/// (cookies, authorization, origin, `Sec-WebSocket-*`), `Host` unchanged, the
/// `X-Forwarded-*` headers, and the upgrade headers themselves.
fn backend_request(
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Request<http_body_util::Empty<bytes::Bytes>> {
    let mut headers = req.headers().clone();
    proxy::prepare_request_headers(&mut headers, peer);
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut out = Request::new(http_body_util::Empty::new());
    *out.method_mut() = Method::GET;
    *out.uri_mut() = path
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    *out.headers_mut() = headers;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> hyper::http::request::Builder {
        Request::get("/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    #[test]
    fn a_valid_handshake_passes() {
        let req = handshake().body(()).unwrap();
        assert!(is_websocket_upgrade(&req));
        assert_eq!(validate(&req), Ok(()));
    }

    #[test]
    fn bad_handshakes_say_why() {
        let req = handshake().method("POST").body(()).unwrap();
        assert_eq!(validate(&req).unwrap_err().0, ProxyError::BadHandshake);
        let req = Request::get("/")
            .header("sec-websocket-version", "8")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        assert_eq!(
            validate(&req).unwrap_err().0,
            ProxyError::UnsupportedVersion
        );
        let req = Request::get("/")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "short")
            .body(())
            .unwrap();
        assert_eq!(
            validate(&req).unwrap_err().1,
            "Sec-WebSocket-Key must be 16 bytes in base64"
        );
        let req = Request::get("/")
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap();
        assert_eq!(validate(&req).unwrap_err().1, "missing Sec-WebSocket-Key");
    }

    #[test]
    fn origins_are_checked_only_when_listed() {
        let mut h = HeaderMap::new();
        assert!(origin_allowed(&[], &h));
        let list = vec!["https://dash.example".to_string()];
        assert!(origin_allowed(&list, &h), "no Origin: not a browser");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://DASH.example"),
        );
        assert!(origin_allowed(&list, &h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!origin_allowed(&list, &h));
    }

    #[test]
    fn only_websocket_upgrades_are_recognised() {
        let req = Request::get("/")
            .header("connection", "upgrade")
            .header("upgrade", "h2c")
            .body(())
            .unwrap();
        assert!(!is_websocket_upgrade(&req));
    }
}
