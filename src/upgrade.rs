//! The WebSocket upgrade: check the client's handshake (RFC 6455 §4.2.1), open a
//! dedicated connection to the backend and repeat the handshake there, then answer the
//! client with exactly what the backend answered. On a 101 the backend's stream, the
//! client's stream (once hyper lets go of it) and what was negotiated are handed off to
//! a relay.
//!
//! The backend is connected *before* the client gets its answer, so a backend that is
//! down or refuses the upgrade (401, 403, 404...) produces a real HTTP response the
//! browser can show, not a WebSocket that opens and dies.

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::client::ClientIo;
use crate::error::ProxyError;
use crate::frame::Negotiated;
use crate::gate::{Settings, Tasks};
use crate::handshake;
use crate::headers::{self, Scheme};
use crate::proxy::{self, Body};
use crate::relay::Leg;
use crate::stream::{Prefixed, Stream};

/// An upgrade wsgate could not carry out, and why (for the response body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    pub error: ProxyError,
    pub why: &'static str,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Self {
        Failed {
            error,
            why: error.message(),
        }
    }
}

/// How the backend answered an upgrade wsgate carried out.
pub enum Upgrade {
    /// It switched protocols: `response` goes to the client; the backend's stream and
    /// what was negotiated go to a relay, with the client's.
    Accepted {
        response: Response<Body>,
        backend: Leg<Stream>,
        negotiated: Negotiated,
    },
    /// It refused (401, 403, 404...): its answer goes to the client unchanged.
    Refused(Response<Body>),
}

/// True when the request asks to switch to WebSocket: an HTTP/1.1 upgrade, or an
/// HTTP/2 extended CONNECT (RFC 8441).
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    is_extended_connect(req)
        || (headers::has_token(req.headers(), header::CONNECTION, "upgrade")
            && headers::has_token(req.headers(), header::UPGRADE, "websocket"))
}

/// An HTTP/2 extended CONNECT with `:protocol websocket` (RFC 8441 §4).
pub fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Checks the client's opening handshake; the error says what is wrong.
pub fn validate<B>(req: &Request<B>) -> Result<(), Failed> {
    let bad = |why| {
        Err(Failed {
            error: ProxyError::BadHandshake,
            why,
        })
    };
    let unsupported = Err(Failed {
        error: ProxyError::UnsupportedVersion,
        why: "only Sec-WebSocket-Version 13 is supported",
    });
    if is_extended_connect(req) {
        // RFC 8441 §5: no key, no Connection/Upgrade; the version must still be 13.
        return match req
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
        {
            Some(b"13") => Ok(()),
            Some(_) => unsupported,
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
        Some(_) => return unsupported,
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

/// Carries out a WebSocket upgrade request from the client whose address is `client`
/// (as `X-Forwarded-For` carries it): checks it, connects the
/// backend and repeats the handshake there. The client's stream is the caller's: hyper
/// hands it over after the response, or the caller has it already (see
/// [`crate::request_head`]). The backend's connection is kept in `backend` while the
/// handshake runs, so that a caller who stops waiting (the client left) closes it
/// itself, and knows when.
pub async fn handle<B>(
    settings: &Settings,
    tasks: &Tasks,
    client: &HeaderValue,
    mut req: Request<B>,
    backend: &mut Option<Stream>,
) -> Result<Upgrade, Failed> {
    validate(&req)?;
    let config = &settings.config;
    if !origin_allowed(&config.websocket.allowed_origins, req.headers()) {
        tracing::debug!(origin = ?req.headers().get(header::ORIGIN), "origin not allowed");
        return Err(ProxyError::OriginNotAllowed.into());
    }
    let over_h2 = is_extended_connect(&req);
    // An HTTP/2 client sends no key (RFC 8441 §5): wsgate makes one for the backend.
    let key = match req.headers().get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if !over_h2 => k.clone(),
        _ => HeaderValue::from_str(&generate_key()).map_err(|_| ProxyError::BackendFailed)?,
    };
    let expected_accept = derive_accept_key(key.as_bytes());

    let slot = backend;
    let backend = slot.insert(settings.backend.connect().await?);
    let request = backend_request(&req, client, Scheme::of(config), &key);
    // The client's headers are written out: nothing of them has to live through the
    // awaits that follow.
    *req.headers_mut() = HeaderMap::new();
    let exchanged = handshake::exchange(backend, &request, config.http.max_header_size);
    let mut head = match config.http.response_timeout {
        Some(limit) => tokio::time::timeout(limit, exchanged)
            .await
            .map_err(|_| ProxyError::BackendTimeout)?,
        None => exchanged.await,
    }
    .map_err(|e| {
        tracing::debug!(error = %e, "backend upgrade request failed");
        ProxyError::BackendFailed
    })?;

    let Some(backend) = slot.take() else {
        return Err(ProxyError::BackendFailed.into());
    };
    if head.status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Upgrade::Refused(
            refused(tasks, backend, head, req.uri()).await?,
        ));
    }
    let accept = head.headers.get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(HeaderValue::as_bytes) != Some(expected_accept.as_bytes()) {
        tracing::warn!("backend answered the upgrade with a wrong Sec-WebSocket-Accept");
        return Err(ProxyError::BackendBadHandshake.into());
    }
    let negotiated = Negotiated::from_extensions(
        head.headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let mut headers = std::mem::take(&mut head.headers);
    let backend = Leg {
        stream: backend,
        buffered: head.into_rest(),
    };

    let mut response = Response::new(proxy::Body::empty());
    if over_h2 {
        // RFC 8441 §5: 200 instead of 101; the HTTP/1.1 upgrade headers have no place in
        // HTTP/2 (RFC 9113 §8.2.2). Subprotocol and extensions pass as they came.
        *response.status_mut() = StatusCode::OK;
        for name in [
            header::CONNECTION,
            header::UPGRADE,
            header::SEC_WEBSOCKET_ACCEPT,
        ] {
            headers.remove(name);
        }
        headers::remove_hop_by_hop(&mut headers);
    } else {
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    *response.headers_mut() = headers;
    Ok(Upgrade::Accepted {
        response,
        backend,
        negotiated,
    })
}

/// The client's stream of a request hyper served, once hyper has written the answer
/// and lets go of it, with any bytes it read behind the handshake.
pub async fn client_stream(
    upgrade: hyper::upgrade::OnUpgrade,
    over_h2: bool,
) -> Option<Leg<Stream>> {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "client upgrade failed");
            return None;
        }
    };
    if over_h2 {
        return Some(Leg {
            stream: Stream::Http2(Box::new(TokioIo::new(upgraded))),
            buffered: Bytes::new(),
        });
    }
    match upgraded.downcast::<TokioIo<ClientIo<Prefixed<Stream>>>>() {
        Ok(parts) => {
            // What was read ahead and hyper did not read comes first (hyper reads all it
            // can, so this is empty in practice).
            let (stream, unread) = parts.io.into_inner().into_inner().into_parts();
            let buffered = if unread.is_empty() {
                parts.read_buf
            } else {
                let mut both = bytes::BytesMut::from(&unread[..]);
                both.extend_from_slice(&parts.read_buf);
                both.freeze()
            };
            Some(Leg { stream, buffered })
        }
        Err(_) => {
            tracing::error!("upgraded HTTP/1.1 connection is not a wsgate stream");
            None
        }
    }
}

/// The backend refused the upgrade (401, 403, 404...): the client gets exactly that
/// answer, body included. hyper's client reads it (every body framing) from what was
/// read so far and the rest of the stream; its connection runs as a tracked task, which
/// streams the body to the client after this returns.
async fn refused(
    tasks: &Tasks,
    backend: Stream,
    head: handshake::ResponseHead,
    target: &hyper::Uri,
) -> Result<Response<Body>, ProxyError> {
    tracing::debug!(status = %head.status, "backend refused the upgrade");
    let failed = |e: hyper::Error| {
        tracing::debug!(error = %e, "reading the backend's refusal failed");
        ProxyError::BackendFailed
    };
    let refusal = handshake::RefusalStream::new(head.into_read(), backend);
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(refusal))
        .await
        .map_err(failed)?;
    let force = tasks.force.clone();
    tasks.tracker.spawn(async move {
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
    headers::remove_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, proxy::Body::boxed(body)))
}

/// The upgrade request as the backend gets it, written straight from the client's
/// request: every end-to-end header in the client's order (cookies, authorization,
/// origin, `Sec-WebSocket-*`), `Host` unchanged (or taken from `:authority` for an
/// HTTP/2 client), the `X-Forwarded-*` headers, and the HTTP/1.1 upgrade headers with
/// `key`.
fn backend_request<B>(
    req: &Request<B>,
    peer: &HeaderValue,
    client: Scheme,
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
    let hop_by_hop = headers::HopByHop::of(headers);
    for (name, value) in headers {
        // wsgate writes its own key, and `X-Forwarded-For` with the client appended.
        let replaced = *name == header::SEC_WEBSOCKET_KEY || *name == headers::X_FORWARDED_FOR;
        if !replaced && !hop_by_hop.contains(name) {
            head.header(name, value);
        }
    }
    for (name, value) in headers::forwarded_headers(headers, host, peer, client) {
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
        assert_eq!(validate(&req).unwrap_err().error, ProxyError::BadHandshake);
        let req = Request::get("/")
            .header("sec-websocket-version", "8")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        assert_eq!(
            validate(&req).unwrap_err().error,
            ProxyError::UnsupportedVersion
        );
        let req = Request::get("/")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "short")
            .body(())
            .unwrap();
        assert_eq!(
            validate(&req).unwrap_err().why,
            "Sec-WebSocket-Key must be 16 bytes in base64"
        );
        let req = Request::get("/")
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap();
        assert_eq!(validate(&req).unwrap_err().why, "missing Sec-WebSocket-Key");
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
        let peer = headers::address_value("10.0.0.9".parse().unwrap());
        let peer = &peer;
        let key = HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAA==");
        let got = lines(&backend_request(&req, peer, Scheme::Https, &key));
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
        let peer = headers::address_value("2001:db8::1".parse().unwrap());
        let peer = &peer;
        let key = HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAA==");
        let got = lines(&backend_request(&req, peer, Scheme::Http, &key));
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
