//! wsgate's errors: [`ProxyError`], why wsgate answered a client request itself;
//! [`TlsError`], why TLS material does not load; and [`Error`], why wsgate could not
//! start. (A configuration's problems are [`crate::config::ConfigError`].)
//!
//! A `ProxyError` carries everything its uses need, so no caller maps it by hand: the
//! HTTP status, the `wsgate-error` header value, the label it counts under in
//! `wsgate_websocket_upgrades_total`, and whose fault it is (which decides how loudly it
//! is logged).

use std::net::SocketAddr;
use std::path::PathBuf;

use hyper::StatusCode;

/// Whose fault a failed request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something wsgate does not accept: nothing to fix on our side.
    Client,
    /// The backend is down, slow or answered badly.
    Backend,
    /// wsgate itself refused: at capacity, or shutting down.
    Wsgate,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Backend => "backend",
            Fault::Wsgate => "wsgate",
        }
    }
}

/// Why wsgate answered a request itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The backend could not be connected to (refused, unreachable, connect timeout, TLS
    /// handshake failed).
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
    /// wsgate is draining: a new WebSocket should go to another instance.
    Draining,
    /// A `CONNECT` that is not a WebSocket's (RFC 8441): a tunnel to wherever the client
    /// names has no place in a reverse proxy for one backend.
    TunnelRefused,
}

/// The values of the `result` label of `wsgate_websocket_upgrades_total`: `ok`, a
/// refusal by the backend, a client that left before the backend answered, then what
/// [`ProxyError::upgrade_label`] gives.
pub const UPGRADE_RESULTS: [&str; 9] = [
    "ok",
    "backend_refused",
    "client_gone",
    "backend_unreachable",
    "backend_error",
    "bad_request",
    "limit_reached",
    "origin_refused",
    "draining",
];

impl ProxyError {
    /// The value of the `wsgate-error` response header.
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
            ProxyError::Draining => "draining",
            ProxyError::TunnelRefused => "tunnel_refused",
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
            ProxyError::Draining => "wsgate is shutting down; reconnect to another instance",
            ProxyError::TunnelRefused => {
                "wsgate forwards requests to its backend; it opens no tunnels (CONNECT)"
            }
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
            ProxyError::OverCapacity | ProxyError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::OriginNotAllowed => StatusCode::FORBIDDEN,
            ProxyError::TunnelRefused => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The `result` an upgrade that failed this way counts under (one of
    /// [`UPGRADE_RESULTS`]).
    pub fn upgrade_label(self) -> &'static str {
        match self {
            ProxyError::BackendUnreachable => "backend_unreachable",
            ProxyError::BackendFailed
            | ProxyError::BackendTimeout
            | ProxyError::BackendBadHandshake => "backend_error",
            ProxyError::BadHandshake
            | ProxyError::UnsupportedVersion
            | ProxyError::TunnelRefused => "bad_request",
            ProxyError::OverCapacity => "limit_reached",
            ProxyError::OriginNotAllowed => "origin_refused",
            ProxyError::Draining => "draining",
        }
    }

    pub fn fault(self) -> Fault {
        match self {
            ProxyError::BackendUnreachable
            | ProxyError::BackendFailed
            | ProxyError::BackendTimeout
            | ProxyError::BackendBadHandshake => Fault::Backend,
            ProxyError::BadHandshake
            | ProxyError::UnsupportedVersion
            | ProxyError::OriginNotAllowed
            | ProxyError::TunnelRefused => Fault::Client,
            ProxyError::OverCapacity | ProxyError::Draining => Fault::Wsgate,
        }
    }
}

/// Why TLS could not be set up. Each names the file or setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    /// rustls refused the material (a key that does not match the certificate, say).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// A configured server name is not a DNS name or IP address.
    #[error("backend_tls.server_name {0:?} is not a valid server name")]
    ServerName(String),
}

/// Errors that stop wsgate from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound: the address is in use or not local.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A TLS certificate, key or CA bundle does not load: fix the file named.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// A bound listener could not be registered with the runtime (out of memory or
    /// descriptors).
    #[error("cannot watch the {what} socket: {source}")]
    Register {
        what: &'static str,
        source: std::io::Error,
    },
    /// A worker thread could not start (no threads or memory left).
    #[error("worker {index} failed to start: {why}")]
    Worker { index: usize, why: String },
    /// The server task itself failed (a bug: it panicked).
    #[error("the server task failed: {0}")]
    Internal(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ProxyError; 10] = [
        ProxyError::BackendUnreachable,
        ProxyError::BackendFailed,
        ProxyError::BackendTimeout,
        ProxyError::BackendBadHandshake,
        ProxyError::BadHandshake,
        ProxyError::UnsupportedVersion,
        ProxyError::OverCapacity,
        ProxyError::OriginNotAllowed,
        ProxyError::Draining,
        ProxyError::TunnelRefused,
    ];

    #[test]
    fn every_error_counts_under_a_known_upgrade_result_and_is_a_proxy_made_error() {
        for e in ALL {
            assert!(UPGRADE_RESULTS[3..].contains(&e.upgrade_label()), "{e:?}");
            assert!(e.status().is_client_error() || e.status().is_server_error());
            // Backend failures are gateway errors; the client's are 4xx.
            match e.fault() {
                Fault::Backend => assert!(e.status().is_server_error(), "{e:?}"),
                Fault::Client => assert!(e.status().is_client_error(), "{e:?}"),
                Fault::Wsgate => assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE),
            }
        }
    }
}
