//! What is recorded about an exchange — a relayed WebSocket or a forwarded HTTP
//! request: how it ended ([`Outcome`]), what passed each way ([`Counters`]), and the
//! whole [`Record`] written once when it ends.
//!
//! These are the words the rest of wsgate uses for an exchange's life: the WebSocket
//! session and the HTTP body decide the outcome, the pumps and the body count, the
//! relay and the exchange fill in the record, and the log line, the metrics and the
//! admin API show it. They depend on nothing else in wsgate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What kind of exchange a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A WebSocket: an upgrade (HTTP/1.1, or RFC 8441 over HTTP/2) and its relay.
    WebSocket,
    /// A plain HTTP request and its response, streamed or not.
    Http,
}

impl Kind {
    pub const BOTH: [Kind; 2] = [Kind::WebSocket, Kind::Http];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::WebSocket => "websocket",
            Kind::Http => "http",
        }
    }

    pub fn idx(self) -> usize {
        self as usize
    }

    /// The outcomes an exchange of this kind can end with: the label values of its
    /// metrics.
    pub fn outcomes(self) -> &'static [Outcome] {
        match self {
            Kind::WebSocket => &Outcome::WEBSOCKET,
            Kind::Http => &Outcome::HTTP,
        }
    }
}

/// How an exchange ended: the label of the endings tables in the README,
/// used in logs and metrics. Most belong to one kind ([`Kind::outcomes`]); a few mean
/// the same for both (`client_unresponsive`, `client_stalled`, `shutdown`,
/// `admin_close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// WebSocket: the client started the Close handshake.
    ClientClose,
    /// WebSocket: the backend started the Close handshake.
    BackendClose,
    /// WebSocket: a side never answered a Close within `close_timeout`.
    CloseTimeout,
    /// WebSocket: the client closed or reset TCP without a Close frame, or left before
    /// the backend answered its upgrade.
    ClientGone,
    /// The client did not answer wsgate's liveness Ping within `pong_timeout` (an
    /// HTTP/2 PING for an HTTP exchange), or TCP keepalive / TCP_USER_TIMEOUT gave up on
    /// it.
    ClientUnresponsive,
    /// The client stopped reading: writes to it made no progress for `write_timeout`.
    ClientStalled,
    /// WebSocket: the backend closed or reset TCP without a Close frame.
    BackendGone,
    /// WebSocket: the backend did not answer a liveness Ping or stopped reading.
    BackendUnresponsive,
    /// WebSocket: no data frame either way for `idle_timeout`.
    IdleTimeout,
    /// WebSocket: the connection reached `max_lifetime`.
    MaxLifetime,
    /// wsgate is shutting down (the drain, or its deadline).
    Shutdown,
    /// WebSocket: a side sent invalid framing (or a frame over `max_frame_size`).
    ProtocolError,
    /// An operator closed it through the admin API.
    AdminClose,
    /// HTTP: the response reached the client whole.
    Completed,
    /// HTTP: the client closed or reset its connection (or its HTTP/2 stream) before
    /// the response ended, before or after its head.
    ClientAborted,
    /// HTTP: the backend closed or reset its connection before the response ended;
    /// the client saw a truncation (or a 502 before the head).
    BackendAborted,
    /// HTTP: the backend could not be connected to (502).
    BackendUnreachable,
    /// HTTP: no response head within `http.response_timeout` (504).
    BackendTimeout,
    /// HTTP: no body bytes either way for `http.stream_idle_timeout`.
    StreamIdleTimeout,
}

impl Outcome {
    /// Every outcome, for indexing: [`Outcome::idx`] is the position here.
    pub const ALL: [Outcome; 19] = [
        Outcome::ClientClose,
        Outcome::BackendClose,
        Outcome::CloseTimeout,
        Outcome::ClientGone,
        Outcome::ClientUnresponsive,
        Outcome::ClientStalled,
        Outcome::BackendGone,
        Outcome::BackendUnresponsive,
        Outcome::IdleTimeout,
        Outcome::MaxLifetime,
        Outcome::Shutdown,
        Outcome::ProtocolError,
        Outcome::AdminClose,
        Outcome::Completed,
        Outcome::ClientAborted,
        Outcome::BackendAborted,
        Outcome::BackendUnreachable,
        Outcome::BackendTimeout,
        Outcome::StreamIdleTimeout,
    ];

    /// The outcomes of a WebSocket.
    pub const WEBSOCKET: [Outcome; 13] = [
        Outcome::ClientClose,
        Outcome::BackendClose,
        Outcome::CloseTimeout,
        Outcome::ClientGone,
        Outcome::ClientUnresponsive,
        Outcome::ClientStalled,
        Outcome::BackendGone,
        Outcome::BackendUnresponsive,
        Outcome::IdleTimeout,
        Outcome::MaxLifetime,
        Outcome::Shutdown,
        Outcome::ProtocolError,
        Outcome::AdminClose,
    ];

    /// The outcomes of an HTTP exchange.
    pub const HTTP: [Outcome; 10] = [
        Outcome::Completed,
        Outcome::ClientAborted,
        Outcome::ClientUnresponsive,
        Outcome::ClientStalled,
        Outcome::BackendAborted,
        Outcome::BackendUnreachable,
        Outcome::BackendTimeout,
        Outcome::StreamIdleTimeout,
        Outcome::Shutdown,
        Outcome::AdminClose,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::ClientClose => "client_close",
            Outcome::BackendClose => "backend_close",
            Outcome::CloseTimeout => "close_timeout",
            Outcome::ClientGone => "client_gone",
            Outcome::ClientUnresponsive => "client_unresponsive",
            Outcome::ClientStalled => "client_stalled",
            Outcome::BackendGone => "backend_gone",
            Outcome::BackendUnresponsive => "backend_unresponsive",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::MaxLifetime => "max_lifetime",
            Outcome::Shutdown => "shutdown",
            Outcome::ProtocolError => "protocol_error",
            Outcome::AdminClose => "admin_close",
            Outcome::Completed => "completed",
            Outcome::ClientAborted => "client_aborted",
            Outcome::BackendAborted => "backend_aborted",
            Outcome::BackendUnreachable => "backend_unreachable",
            Outcome::BackendTimeout => "backend_timeout",
            Outcome::StreamIdleTimeout => "stream_idle_timeout",
        }
    }

    /// The outcome whose label is `label`.
    pub fn from_label(label: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == label)
    }

    /// Its position in [`Outcome::ALL`].
    pub fn idx(self) -> usize {
        self as usize
    }

    /// The reason text of the Close frames wsgate sends a WebSocket for this outcome
    /// (none for the outcomes of HTTP alone).
    pub fn reason(self) -> &'static str {
        match self {
            Outcome::ClientClose | Outcome::BackendClose => "",
            Outcome::CloseTimeout => "close handshake timed out",
            Outcome::ClientGone => "client went away",
            Outcome::ClientUnresponsive => "client unresponsive",
            Outcome::ClientStalled => "client stopped reading",
            Outcome::BackendGone => "backend went away",
            Outcome::BackendUnresponsive => "backend unresponsive",
            Outcome::IdleTimeout => "idle timeout",
            Outcome::MaxLifetime => "max lifetime reached",
            Outcome::Shutdown => "proxy shutting down",
            Outcome::ProtocolError => "protocol error",
            Outcome::AdminClose => "closed by operator",
            Outcome::Completed
            | Outcome::ClientAborted
            | Outcome::BackendAborted
            | Outcome::BackendUnreachable
            | Outcome::BackendTimeout
            | Outcome::StreamIdleTimeout => "",
        }
    }
}

/// Bytes and frames that passed one way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// WebSocket frames read from the source (data and control); 0 for HTTP.
    pub frames: u64,
    /// Bytes read from the source: WebSocket frames with their headers, or an HTTP
    /// body (heads and chunk framing not included).
    pub bytes: u64,
}

/// What is known about an exchange from its request.
#[derive(Clone, Debug)]
pub struct ExchangeInfo {
    /// Process-unique exchange id: every WebSocket and every HTTP exchange has its own,
    /// also when several share one HTTP/2 connection.
    pub id: u64,
    /// The client TCP connection it came on (process-unique, from the same sequence).
    pub connection: u64,
    /// The client's address as wsgate sees it.
    pub client: SocketAddr,
    /// The worker thread that served it.
    pub worker: usize,
    /// Request path without the query string (queries may carry tokens).
    pub path: Arc<str>,
}

/// Everything recorded about one exchange when it ends: the one value its log line and
/// every per-exchange metric are written from.
#[derive(Clone, Debug)]
pub struct Record {
    pub info: ExchangeInfo,
    pub outcome: Outcome,
    /// From the request to the end: for a WebSocket, both sockets closed; for HTTP, the
    /// response's end (or the exchange's abort).
    pub duration: Duration,
    /// From wsgate learning of the end (its first end signal) to the backend's
    /// connection released: for a WebSocket both sockets closed; for HTTP the
    /// backend's connection closed, or back in the pool.
    pub release: Duration,
    pub client_to_backend: Counters,
    pub backend_to_client: Counters,
    pub details: Details,
}

impl Record {
    pub fn kind(&self) -> Kind {
        match self.details {
            Details::WebSocket(_) => Kind::WebSocket,
            Details::Http(_) => Kind::Http,
        }
    }
}

/// What only one kind of exchange has.
#[derive(Clone, Debug)]
pub enum Details {
    WebSocket(WebSocketDetails),
    Http(HttpDetails),
}

/// The Close frames and liveness round trips of a WebSocket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebSocketDetails {
    /// The Close the client sent (with its code, if it had one).
    pub client_close: Option<Option<u16>>,
    /// The Close the backend sent.
    pub backend_close: Option<Option<u16>>,
    /// The Close each side was sent: the other side's, forwarded, or wsgate's own.
    pub client_received_close: Option<Option<u16>>,
    pub backend_received_close: Option<Option<u16>>,
    /// The code of the Close wsgate itself sent to each side.
    pub wsgate_to_client_close: Option<u16>,
    pub wsgate_to_backend_close: Option<u16>,
    /// Last liveness round-trip time measured on each side.
    pub client_rtt: Option<Duration>,
    pub backend_rtt: Option<Duration>,
}

/// The request and response of an HTTP exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpDetails {
    /// The request method (`GET`, `POST`...).
    pub method: hyper::Method,
    /// The response status the client got (the backend's, or wsgate's own 502/504);
    /// `None` when the exchange ended before a response head.
    pub status: Option<u16>,
    /// How the response body was delimited toward the client.
    pub framing: Framing,
    /// The response was a `text/event-stream`.
    pub event_stream: bool,
    /// The exchange was a stream: an event stream, or a body still open
    /// `http.stream_after` after its head.
    pub stream: bool,
    /// From the request to the response head.
    pub time_to_head: Option<Duration>,
    /// SSE comment lines wsgate inserted (`http.sse_heartbeat`).
    pub heartbeats: u64,
}

/// How a response body is delimited toward the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No response head was sent.
    None,
    /// `Content-Length` over HTTP/1.1.
    Length,
    /// `Transfer-Encoding: chunked` over HTTP/1.1 (the end is the final chunk).
    Chunked,
    /// Over HTTP/1.1 until the connection closes (no length, no chunking possible).
    Close,
    /// An HTTP/2 stream (the end is END_STREAM).
    Http2,
}

impl Framing {
    pub fn as_str(self) -> &'static str {
        match self {
            Framing::None => "none",
            Framing::Length => "length",
            Framing::Chunked => "chunked",
            Framing::Close => "close",
            Framing::Http2 => "http2",
        }
    }
}

#[cfg(test)]
impl Record {
    /// A WebSocket's record for the unit tests: client Close 1000, answered.
    pub fn websocket_example(id: u64, outcome: Outcome) -> Record {
        Record {
            info: ExchangeInfo {
                id,
                connection: id,
                client: "127.0.0.1:1".parse().expect("an address"),
                worker: 0,
                path: "/ws".into(),
            },
            outcome,
            duration: Duration::from_millis(10),
            release: Duration::from_micros(100),
            client_to_backend: Counters::default(),
            backend_to_client: Counters::default(),
            details: Details::WebSocket(WebSocketDetails {
                client_close: Some(Some(1000)),
                backend_close: Some(Some(1000)),
                client_received_close: Some(Some(1000)),
                backend_received_close: Some(Some(1000)),
                ..WebSocketDetails::default()
            }),
        }
    }

    /// An HTTP stream's record for the unit tests: a POST answered 200 with an event
    /// stream.
    pub fn http_example(id: u64, outcome: Outcome) -> Record {
        Record {
            info: ExchangeInfo {
                id,
                connection: 1,
                client: "127.0.0.1:1".parse().expect("an address"),
                worker: 0,
                path: "/api/default/_search_stream".into(),
            },
            outcome,
            duration: Duration::from_secs(2),
            release: Duration::from_micros(200),
            client_to_backend: Counters {
                frames: 0,
                bytes: 2,
            },
            backend_to_client: Counters {
                frames: 0,
                bytes: 4096,
            },
            details: Details::Http(HttpDetails {
                method: hyper::Method::POST,
                status: Some(200),
                framing: Framing::Chunked,
                event_stream: true,
                stream: true,
                time_to_head: Some(Duration::from_millis(3)),
                heartbeats: 0,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcomes_index_is_its_place_in_all() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.idx(), i, "{o:?}");
            assert_eq!(Outcome::from_label(o.as_str()), Some(*o));
        }
    }

    #[test]
    fn every_outcome_belongs_to_a_kind() {
        for o in Outcome::ALL {
            assert!(
                Kind::BOTH.iter().any(|k| k.outcomes().contains(&o)),
                "{o:?}"
            );
        }
        // The HTTP outcomes send no Close frame: they have no reason text of their own.
        for o in Outcome::HTTP {
            if !Outcome::WEBSOCKET.contains(&o) {
                assert_eq!(o.reason(), "", "{o:?}");
            }
        }
    }
}
