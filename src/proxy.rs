//! HTTP forwarding: every request that is not a WebSocket upgrade goes to the backend
//! as one [`Exchange`], and the response streams back. Also the body type of every
//! response wsgate returns, and the responses it makes itself for a [`ProxyError`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, Uri, Version};

use crate::body::RequestBody;
use crate::client::Busy;
use crate::error::ProxyError;
use crate::exchange::{self, Exchange, ForwardedBody};
use crate::gate::Gate;
use crate::h1;
use crate::headers::{Scheme, prepare_request_headers};

/// Any error a response body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response wsgate returns to clients: one type, without a box for
/// the two that matter most (a forwarded body, a small one of wsgate's own).
// A forwarded body is moved a few times per response (into hyper's dispatcher); a box
// per response would cost more than those copies.
#[allow(clippy::large_enum_variant)]
pub enum Body {
    /// Complete bytes (taken when sent), or nothing.
    Full(Option<Bytes>),
    /// A forwarded response's body, with its exchange.
    Forwarded(ForwardedBody),
    /// Anything else (a refused upgrade's body, read from the backend).
    Boxed(BoxBody<Bytes, BoxError>),
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }

    /// Any body, boxed.
    pub fn boxed<B>(body: B) -> Body
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        Body::Boxed(body.map_err(Into::into).boxed())
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Forwarded(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Body::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Forwarded(body) => body.is_end_stream(),
            Body::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Forwarded(body) => body.size_hint(),
            Body::Boxed(body) => body.size_hint(),
        }
    }
}

/// The header that marks a response made by wsgate rather than the backend, so that
/// operators can tell a 502 from wsgate from a 502 the backend sent.
pub const ERROR_HEADER: &str = "wsgate-error";

/// The response wsgate sends for `error`; `detail` becomes the plain-text body.
pub fn error_response(error: ProxyError, detail: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{detail}\n")));
    *resp.status_mut() = error.status();
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(error.as_str()));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    match error {
        ProxyError::UnsupportedVersion => {
            h.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        // Come back in a second: elsewhere, or when a connection has ended.
        ProxyError::OverCapacity | ProxyError::Draining => {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // A 405 names what the resource takes (RFC 9110 §15.5.6): any method but
        // CONNECT goes to the backend; these are the ones HTTP defines.
        ProxyError::TunnelRefused => {
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"),
            );
        }
        _ => {}
    }
    resp
}

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::Full(Some(bytes.into()))
}

/// Forwards a plain HTTP request from `busy`'s connection as one exchange: the request
/// is prepared here, at once, and the future returned waits for the response — the
/// backend's, streaming, or wsgate's own when the backend cannot answer.
pub fn forward(gate: Arc<Gate>, busy: Busy, req: Request<Incoming>) -> Forwarding {
    forward_with(gate, busy, req, |ex, body| ex.request_body(body))
}

/// [`forward`] for a request without a body (read by [`crate::h1_server`]).
pub fn forward_bodiless(gate: Arc<Gate>, busy: Busy, req: Request<()>) -> Forwarding {
    forward_with(gate, busy, req, |_, ()| RequestBody::empty())
}

/// [`forward`] for a request whose body came whole with its head (read by
/// [`crate::h1_server`]).
pub fn forward_full(gate: Arc<Gate>, busy: Busy, req: Request<Bytes>) -> Forwarding {
    forward_with(gate, busy, req, |ex, body| ex.whole_request_body(body))
}

fn forward_with<B>(
    gate: Arc<Gate>,
    busy: Busy,
    req: Request<B>,
    body_of: impl FnOnce(&mut Exchange, B) -> RequestBody,
) -> Forwarding {
    let (scheme, limit) = {
        let settings = gate.settings();
        let config = &settings.config;
        (Scheme::of(config), config.http.response_timeout)
    };
    let forwarded_for = busy.forwarded_for.clone();
    let mut ex = Exchange::begin(gate, busy, &req);
    let client_version = req.version();
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
    let added = prepare_request_headers(&mut parts.headers, &forwarded_for, scheme);
    parts.uri = origin_form(parts.uri);
    parts.version = Version::HTTP_11;
    let body = body_of(&mut ex, body);
    let deadline = exchange::deadline(limit);
    // Encoded at once: the bytes are smaller than the request, and the exchange's
    // future keeps them.
    let outgoing = h1::Outgoing::new(Request::from_parts(parts, body), &added);
    Forwarding(Box::pin(ex.forward(outgoing, deadline, client_version)))
}

/// A forwarded request waiting for its response head. The wait is boxed: it is most of
/// the request's state, and hyper moves a request's future a few times; one allocation
/// costs less than copying it each time (this future is a pointer).
pub struct Forwarding(Pin<Box<dyn Future<Output = Answered> + Send>>);

/// The response for the client, or the error wsgate answers with.
type Answered = Result<Response<Option<ForwardedBody>>, ProxyError>;

impl Future for Forwarding {
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        Poll::Ready(
            match std::task::ready!(self.get_mut().0.as_mut().poll(cx)) {
                Ok(resp) => resp.map(|body| body.map_or_else(Body::empty, Body::Forwarded)),
                Err(e) => error_response(e, e.message()),
            },
        )
    }
}

/// The request target as the backend gets it: origin-form (path and query), which is
/// what an HTTP/1.1 client sent already; an HTTP/2 request's absolute URI loses its
/// scheme and authority (the authority went into `Host`).
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    uri.path_and_query()
        .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_gets_the_path_and_query_in_origin_form() {
        let origin: Uri = "/api/v1/search?q=a%20b".parse().unwrap();
        assert_eq!(origin_form(origin.clone()), origin);
        let absolute: Uri = "https://dash.example:8443/api/v1/search?q=a%20b"
            .parse()
            .unwrap();
        assert_eq!(origin_form(absolute), origin);
        let bare: Uri = "https://dash.example".parse().unwrap();
        assert_eq!(origin_form(bare), "/");
    }
}
