//! HTTP forwarding: every request that is not a WebSocket upgrade goes to the backend
//! through a keep-alive pool, and the response streams back. Also the header rules both
//! forwarding and [`crate::upgrade`] share: hop-by-hop removal (RFC 9110 §7.6.1),
//! `X-Forwarded-*`, and the responses wsgate makes itself.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Config;
use crate::tls::BackendTls;

/// The body of every response wsgate returns to clients.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The header that marks a response made by wsgate rather than the backend, so that
/// operators can tell a 502 from wsgate from a 502 the backend sent.
pub const ERROR_HEADER: &str = "wsgate-error";

/// How long an idle pooled backend connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pooled HTTP client used for plain requests.
pub type BackendClient = Client<HttpsConnector<HttpConnector>, Incoming>;

/// The pooled client; `tls` is set for an `https://` backend.
pub fn backend_client(config: &Config, tls: Option<&BackendTls>) -> BackendClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.http.connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(crate::listener::TCP_KEEPALIVE_IDLE));
    // The TLS layer above handles `https://` URIs.
    connector.enforce_http(false);
    // Plain `http://` URIs never use the TLS configuration; it only has to exist.
    let mut tls_config = tls.map_or_else(crate::tls::plain_client_config, |t| {
        rustls::ClientConfig::clone(&t.config)
    });
    // The connector sets ALPN itself (and refuses a configuration that has it).
    tls_config.alpn_protocols.clear();
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls_config)
        .https_or_http();
    let builder = match tls {
        Some(t) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
            t.server_name.clone(),
        )),
        None => builder,
    };
    let connector = builder.enable_http1().wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Why wsgate answered a request itself. `as_str` goes into [`ERROR_HEADER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The backend could not be connected to (refused, unreachable, connect timeout).
    BackendUnreachable,
    /// The backend accepted the request but failed before a complete response head.
    BackendFailed,
    /// The backend did not send a response head within `http.response_timeout`.
    BackendTimeout,
    /// The backend answered a WebSocket upgrade with an invalid 101.
    BackendBadHandshake,
    /// The client's WebSocket handshake is invalid.
    BadHandshake,
    /// The client asked for a WebSocket version other than 13.
    UnsupportedVersion,
    /// `max_connections` is reached.
    OverCapacity,
    /// The WebSocket's `Origin` is not in `websocket.allowed_origins`.
    OriginNotAllowed,
}

impl ProxyError {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::BackendUnreachable => "backend_unreachable",
            ProxyError::BackendFailed => "backend_failed",
            ProxyError::BackendTimeout => "backend_timeout",
            ProxyError::BackendBadHandshake => "backend_bad_handshake",
            ProxyError::BadHandshake => "bad_handshake",
            ProxyError::UnsupportedVersion => "unsupported_version",
            ProxyError::OverCapacity => "over_capacity",
            ProxyError::OriginNotAllowed => "origin_not_allowed",
        }
    }

    /// The default explanation in the response body.
    pub fn message(self) -> &'static str {
        match self {
            ProxyError::BackendUnreachable => "wsgate could not connect to the backend",
            ProxyError::BackendFailed => "the backend failed before sending a response",
            ProxyError::BackendTimeout => "the backend did not answer in time",
            ProxyError::BackendBadHandshake => "the backend sent an invalid WebSocket handshake",
            ProxyError::BadHandshake => "invalid WebSocket handshake",
            ProxyError::UnsupportedVersion => "only WebSocket version 13 is supported",
            ProxyError::OverCapacity => "wsgate is at max_connections; retry shortly",
            ProxyError::OriginNotAllowed => "this origin may not open WebSockets here",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::BackendUnreachable
            | ProxyError::BackendFailed
            | ProxyError::BackendBadHandshake => StatusCode::BAD_GATEWAY,
            ProxyError::BackendTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadHandshake => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            ProxyError::OverCapacity => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::OriginNotAllowed => StatusCode::FORBIDDEN,
        }
    }

    /// The response wsgate sends; `detail` becomes the plain-text body.
    pub fn response(self, detail: &str) -> Response<Body> {
        let mut resp = Response::new(full(format!("{detail}\n")));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.as_str()));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            ProxyError::UnsupportedVersion => {
                h.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            ProxyError::OverCapacity => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Forwards a plain HTTP request and streams the backend's response back.
pub async fn forward(
    client: &BackendClient,
    config: &Config,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    // HTTP/2 requests carry the host in `:authority`; the backend speaks HTTP/1.1.
    if !parts.headers.contains_key(header::HOST)
        && let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, host);
    }
    prepare_request_headers(&mut parts.headers, peer, config.tls.is_some());
    parts.uri = backend_uri(
        config.backend.scheme(),
        &config.backend.authority,
        &parts.uri,
    );
    parts.version = hyper::Version::HTTP_11;
    let sent = client.request(Request::from_parts(parts, body));
    let result = match config.http.response_timeout {
        Some(limit) => match tokio::time::timeout(limit, sent).await {
            Ok(result) => result,
            Err(_) => return Err(ProxyError::BackendTimeout),
        },
        None => sent.await,
    };
    let resp = result.map_err(|e| {
        tracing::debug!(error = %e, "backend request failed");
        if e.is_connect() {
            ProxyError::BackendUnreachable
        } else {
            ProxyError::BackendFailed
        }
    })?;
    let (mut parts, body) = resp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The absolute URI of `uri`'s path and query on the backend.
pub fn backend_uri(scheme: &str, authority: &str, uri: &Uri) -> Uri {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        // Both parts were valid URI components already.
        .unwrap_or_else(|_| Uri::from_static("/"))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), so a proxy
/// must not forward them. `Proxy-Connection` is a pre-standard variant clients still send.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The comma-separated tokens of every `name` header (`Connection: keep-alive, Upgrade`
/// gives `keep-alive`, `Upgrade`), trimmed; values that are not text are skipped.
pub fn header_tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
///
/// Runs for every request and WebSocket handshake, so it allocates nothing: one pass over
/// the names finds the few headers to remove.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Other names listed in `Connection` are rare (`keep-alive, Upgrade` is the usual
    // value), and an empty Vec does not allocate.
    let named: Vec<HeaderName> = header_tokens(headers, header::CONNECTION)
        .filter(|t| {
            !HOP_BY_HOP
                .iter()
                .any(|h| h.as_str().eq_ignore_ascii_case(t))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    while let Some(name) = headers.keys().find(|n| HOP_BY_HOP.contains(n)).cloned() {
        headers.remove(name);
    }
}

/// Applies the request header rules: hop-by-hop headers removed, the client's address
/// appended to `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` set unless a
/// proxy in front of wsgate (an ingress terminating TLS, say) already set them. `Host` is
/// left as the client sent it.
pub fn prepare_request_headers(headers: &mut HeaderMap, peer: SocketAddr, client_tls: bool) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const FWD_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    remove_hop_by_hop(headers);
    // A parsed request's map is full: grow it once for everything added here and by
    // the WebSocket handshake, not once per insert.
    headers.reserve(6);
    let xff = XFF;
    let mut chain = String::with_capacity(64);
    if let Some(prior) = headers.get(&xff).and_then(|v| v.to_str().ok())
        && !prior.trim().is_empty()
    {
        chain.push_str(prior);
        chain.push_str(", ");
    }
    let _ = write!(chain, "{}", peer.ip());
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(chain)) {
        headers.insert(xff, v);
    }
    let proto = PROTO;
    if !headers.contains_key(&proto) {
        let scheme = if client_tls { "https" } else { "http" };
        headers.insert(proto, HeaderValue::from_static(scheme));
    }
    let fwd_host = FWD_HOST;
    if !headers.contains_key(&fwd_host)
        && let Some(host) = headers.get(header::HOST).cloned()
    {
        headers.insert(fwd_host, host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Trace"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::COOKIE], "a=b");
    }

    #[test]
    fn forwarded_headers_append_and_respect_prior_proxies() {
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("dash.example"));
        prepare_request_headers(&mut h, peer, false);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "dash.example");
        assert_eq!(h[header::HOST], "dash.example");

        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        prepare_request_headers(&mut h, peer, true);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn backend_uri_keeps_path_and_query() {
        let uri: Uri = "/api/v1/search?q=a%20b".parse().unwrap();
        assert_eq!(
            backend_uri("http", "127.0.0.1:5080", &uri).to_string(),
            "http://127.0.0.1:5080/api/v1/search?q=a%20b"
        );
    }
}
