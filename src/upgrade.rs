//! The WebSocket upgrade: check the client's handshake (RFC 6455 §4.2.1), open a
//! dedicated connection to the backend and repeat the handshake there, then answer the
//! client with exactly what the backend answered. On a 101 both raw sockets (and any
//! bytes already read behind the handshakes) go to a [`Relay`].
//!
//! The backend is connected *before* the client gets its answer, so a backend that is
//! down or refuses the upgrade (401, 403, 404...) produces a real HTTP response the
//! browser can show, not a WebSocket that opens and dies.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::handshake;
use crate::metrics::UpgradeResult;
use crate::proxy::{self, Body, ProxyError};
use crate::relay::{Leg, Negotiated, Relay, Transport};
use crate::report::{self, ConnectionInfo};
use crate::server::{Busy, Shared};
use crate::stream::Stream;

/// True when the request asks to switch to WebSocket: an HTTP/1.1 upgrade, or an
/// HTTP/2 extended CONNECT (RFC 8441).
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    is_extended_connect(req)
        || (header_has_token(req.headers(), header::CONNECTION, "upgrade")
            && header_has_token(req.headers(), header::UPGRADE, "websocket"))
}

/// An HTTP/2 extended CONNECT with `:protocol websocket` (RFC 8441 §4).
pub fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    proxy::header_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// Checks the client's opening handshake; the error says what is wrong.
pub fn validate<B>(req: &Request<B>) -> Result<(), (ProxyError, &'static str)> {
    let bad = |why| Err((ProxyError::BadHandshake, why));
    if is_extended_connect(req) {
        // RFC 8441 §5: no key, no Connection/Upgrade; the version must still be 13.
        return match req
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
        {
            Some(b"13") => Ok(()),
            Some(_) => Err((
                ProxyError::UnsupportedVersion,
                "only Sec-WebSocket-Version 13 is supported",
            )),
            None => bad("missing Sec-WebSocket-Version"),
        };
    }
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
    conn: Busy,
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
    conn: Busy,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let over_h2 = is_extended_connect(&req);
    let info = ConnectionInfo {
        id: conn.id,
        client: conn.peer,
        worker: conn.worker,
        path: req.uri().path().into(),
    };
    // An HTTP/2 client sends no key (RFC 8441 §5): wsgate makes one for the backend.
    let key = match req.headers().get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if !over_h2 => k.clone(),
        _ => HeaderValue::from_str(&generate_key()).map_err(|_| ProxyError::BackendFailed)?,
    };
    let expected_accept = derive_accept_key(key.as_bytes());

    let mut backend = connect_backend(&shared).await?;
    let request = backend_request(&req, conn.peer, shared.config.tls.is_some(), &key);
    // The client's headers are written out: nothing of them has to live through the
    // awaits that follow.
    *req.headers_mut() = HeaderMap::new();
    let exchanged = handshake::exchange(&mut backend, &request, shared.config.http.max_header_size);
    let mut head = match shared.config.http.response_timeout {
        Some(limit) => tokio::time::timeout(limit, exchanged)
            .await
            .map_err(|_| ProxyError::BackendTimeout)?,
        None => exchanged.await,
    }
    .map_err(|e| {
        tracing::debug!(error = %e, "backend upgrade request failed");
        ProxyError::BackendFailed
    })?;

    if head.status != StatusCode::SWITCHING_PROTOCOLS {
        return refused(&shared, backend, head, req.uri()).await;
    }
    let accept = head.headers.get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(HeaderValue::as_bytes) != Some(expected_accept.as_bytes()) {
        tracing::warn!("backend answered the upgrade with a wrong Sec-WebSocket-Accept");
        return Err(ProxyError::BackendBadHandshake);
    }
    let negotiated = Negotiated::from_extensions(
        head.headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let mut headers = std::mem::take(&mut head.headers);
    let backend = Owned {
        stream: backend,
        buffered: head.into_rest(),
    };

    let relay = RelayStart {
        shared: shared.clone(),
        conn,
        info,
        negotiated,
    };
    // The task first waits for hyper to hand over the client's stream, then runs a
    // future built by `RelayStart::start`. Each await holds only what it needs: an idle
    // WebSocket's task is about the size of its relay.
    shared.tracker.spawn(async move {
        let upgraded = match client_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed");
                return;
            }
        };
        if over_h2 {
            let client = Owned {
                stream: TokioIo::new(upgraded),
                buffered: bytes::Bytes::new(),
            };
            relay.start(client, backend).await;
            return;
        }
        match upgraded.downcast::<TokioIo<Stream>>() {
            Ok(parts) => {
                let client = Owned {
                    stream: parts.io.into_inner(),
                    buffered: parts.read_buf,
                };
                relay.start(client, backend).await;
            }
            Err(_) => tracing::error!("upgraded HTTP/1.1 connection is not a wsgate stream"),
        }
    });

    let mut client_resp = Response::new(proxy::full(bytes::Bytes::new()));
    if over_h2 {
        // RFC 8441 §5: 200 instead of 101; the HTTP/1.1 upgrade headers have no place in
        // HTTP/2 (RFC 9113 §8.2.2). Subprotocol and extensions pass as they came.
        *client_resp.status_mut() = StatusCode::OK;
        for name in [
            header::CONNECTION,
            header::UPGRADE,
            header::SEC_WEBSOCKET_ACCEPT,
        ] {
            headers.remove(name);
        }
        proxy::remove_hop_by_hop(&mut headers);
    } else {
        *client_resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    *client_resp.headers_mut() = headers;
    Ok(client_resp)
}

/// The backend refused the upgrade (401, 403, 404...): the client gets exactly that
/// answer, body included. hyper's client reads it (every body framing) from what was
/// read so far and the rest of the stream; its connection runs as a tracked task, which
/// streams the body to the client after this returns.
async fn refused(
    shared: &Arc<Shared>,
    backend: Stream,
    head: handshake::ResponseHead,
    target: &hyper::Uri,
) -> Result<Response<Body>, ProxyError> {
    tracing::debug!(status = %head.status, "backend refused the upgrade");
    let failed = |e: hyper::Error| {
        tracing::debug!(error = %e, "reading the backend's refusal failed");
        ProxyError::BackendFailed
    };
    let replay = handshake::Replay::new(head.into_read(), backend);
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(replay))
        .await
        .map_err(failed)?;
    let force = shared.signals.force.clone();
    shared.tracker.spawn(async move {
        tokio::select! {
            ended = connection => if let Err(e) = ended {
                tracing::debug!(error = %e, "backend refusal connection ended");
            },
            () = force.cancelled() => {}
        }
    });
    // Only the method and target matter: the request went out already, and the
    // method decides how hyper reads the body of the answer.
    let mut request = Request::new(http_body_util::Empty::new());
    *request.uri_mut() = target.path_and_query().map_or_else(
        || hyper::Uri::from_static("/"),
        |p| hyper::Uri::from(p.clone()),
    );
    let resp = sender.send_request(request).await.map_err(failed)?;
    let (mut parts, body) = resp.into_parts();
    proxy::remove_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        http_body_util::BodyExt::boxed(body),
    ))
}

/// A side's stream and the bytes it sent behind its handshake.
struct Owned<S> {
    stream: S,
    buffered: bytes::Bytes,
}

/// What a relay task needs once the client's upgrade completes.
struct RelayStart {
    shared: Arc<Shared>,
    /// Keeps the client connection busy (and its `max_connections` slot taken) until
    /// the relay ends.
    conn: Busy,
    info: ConnectionInfo,
    negotiated: Negotiated,
}

impl RelayStart {
    /// Builds the relay now and returns the future that runs it. Building outside that
    /// future keeps it from also holding the streams, buffers and handshake state the
    /// relay was made from: a future stores its arguments for its whole life.
    fn start<C: Transport>(
        self,
        client: Owned<C>,
        backend: Owned<Stream>,
    ) -> impl Future<Output = ()> + Send + use<C> {
        let RelayStart {
            shared,
            conn,
            info,
            negotiated,
        } = self;
        let registration = shared.live.register(&info, &shared.signals.shutdown);
        let mut relay = Relay::new(
            Leg {
                stream: client.stream,
                buffered: &client.buffered,
            },
            Leg {
                stream: backend.stream,
                buffered: &backend.buffered,
            },
            negotiated,
            shared.relay_config.clone(),
            shared.signals.clone(),
            shared.metrics.relay(),
            registration.conn.clone(),
        );
        // The pumps copied these bytes; the buffers they came from are the HTTP layer's
        // whole read buffers, which must not stay alive for the connection's life. (They
        // drop here, at the end of this function.)
        async move {
            // `run` takes the relay by reference: moving it into its own future would
            // keep a second copy alive for the connection's whole life.
            let active = &shared.metrics.websockets_active;
            active.increment(1.0);
            let ended = relay.run().await;
            active.decrement(1.0);
            drop(registration);
            report::connection_ended(&shared.metrics, &info, &ended);
            drop(conn);
        }
    }
}

/// Opens a dedicated connection to the backend for one WebSocket: TCP, then TLS for an
/// `https://` backend, both within `http.connect_timeout`.
async fn connect_backend(shared: &Shared) -> Result<Stream, ProxyError> {
    let b = &shared.config.backend;
    let connect = async {
        let tcp = TcpStream::connect((b.host.as_str(), b.port))
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, backend = %b.authority, "backend connect failed");
                ProxyError::BackendUnreachable
            })?;
        if b.loopback {
            // A loopback peer cannot vanish silently: when its process dies the kernel
            // closes its sockets. Keepalive and TCP_USER_TIMEOUT would only cost five
            // system calls per WebSocket; Nagle still has to go.
            let _ = tcp.set_nodelay(true);
        } else {
            crate::listener::tune_socket(socket2::SockRef::from(&tcp));
        }
        let Some(tls) = &shared.backend_tls else {
            return Ok(Stream::Plain(tcp));
        };
        let tls = tls
            .connector
            .connect(tls.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                // An untrusted or misnamed certificate: worth a warning, it is a
                // configuration problem, not a client's.
                tracing::warn!(error = %e, backend = %b.authority, "backend TLS handshake failed");
                ProxyError::BackendUnreachable
            })?;
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
    };
    match tokio::time::timeout(shared.config.http.connect_timeout, connect).await {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!(backend = %b.authority, "backend connect timed out");
            Err(ProxyError::BackendUnreachable)
        }
    }
}

/// The upgrade request as the backend gets it, written straight from the client's
/// request: every end-to-end header in the client's order (cookies, authorization,
/// origin, `Sec-WebSocket-*`), `Host` unchanged (or taken from `:authority` for an
/// HTTP/2 client), the `X-Forwarded-*` headers, and the HTTP/1.1 upgrade headers with
/// `key`.
fn backend_request<B>(
    req: &Request<B>,
    peer: SocketAddr,
    client_tls: bool,
    key: &HeaderValue,
) -> Vec<u8> {
    let headers = req.headers();
    let client_host = headers.get(header::HOST);
    let authority = client_host
        .is_none()
        .then(|| req.uri().authority())
        .flatten()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let host = client_host.or(authority.as_ref());
    // The client's lines, and room for the forwarding and upgrade lines added below.
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + 160;
    let mut head = handshake::RequestHead::get(req.uri(), size);
    if let Some(authority) = &authority {
        head.header(&header::HOST, authority);
    }
    let hop_by_hop = proxy::HopByHop::of(headers);
    for (name, value) in headers {
        // wsgate writes its own key, and `X-Forwarded-For` with the client appended.
        let replaced = *name == header::SEC_WEBSOCKET_KEY || *name == proxy::X_FORWARDED_FOR;
        if !replaced && !hop_by_hop.contains(name) {
            head.header(name, value);
        }
    }
    for (name, value) in proxy::forwarded_headers(headers, host, peer, client_tls) {
        head.header(&name, &value);
    }
    head.header(&header::CONNECTION, &HeaderValue::from_static("Upgrade"));
    head.header(&header::UPGRADE, &HeaderValue::from_static("websocket"));
    head.header(&header::SEC_WEBSOCKET_KEY, key);
    head.finish()
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

    /// The header lines of a request head, in order.
    fn lines(head: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(head).unwrap();
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        text.trim_end().split("\r\n").map(str::to_string).collect()
    }

    #[test]
    fn the_backend_gets_the_clients_headers_in_order_with_forwarding_and_our_key() {
        let req = handshake()
            .uri("/ws?q=1")
            .header("host", "dash.example")
            .header("cookie", "session=abc")
            .header("x-forwarded-for", "1.1.1.1")
            .header("x-forwarded-for", "2.2.2.2")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("connection", "X-Trace")
            .header("x-trace", "7")
            .header("sec-websocket-protocol", "chat")
            .body(())
            .unwrap();
        let peer: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        let key = HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAA==");
        let got = lines(&backend_request(&req, peer, true, &key));
        assert_eq!(
            got,
            [
                "GET /ws?q=1 HTTP/1.1",
                "sec-websocket-version: 13",
                "host: dash.example",
                "cookie: session=abc",
                "sec-websocket-protocol: chat",
                "x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.9",
                "x-forwarded-proto: https",
                "x-forwarded-host: dash.example",
                "connection: Upgrade",
                "upgrade: websocket",
                "sec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA==",
            ]
        );
    }

    #[test]
    fn an_http2_request_gets_host_from_its_authority_and_keeps_prior_forwarding() {
        let req = Request::connect("https://dash.example:8443/live")
            .header("sec-websocket-version", "13")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "public.example")
            .body(())
            .unwrap();
        let peer: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let key = HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAA==");
        let got = lines(&backend_request(&req, peer, false, &key));
        assert_eq!(
            got,
            [
                "GET /live HTTP/1.1",
                "host: dash.example:8443",
                "sec-websocket-version: 13",
                "x-forwarded-proto: https",
                "x-forwarded-host: public.example",
                "x-forwarded-for: 2001:db8::1",
                "connection: Upgrade",
                "upgrade: websocket",
                "sec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA==",
            ]
        );
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
