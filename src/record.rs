//! What is recorded about a relayed WebSocket: how it ended ([`Outcome`]), what passed
//! each way ([`Counters`]), and the whole [`Record`] written once when it ends.
//!
//! These are the words the rest of wsgate uses for a connection's life: the session
//! decides the outcome, the pumps count, the relay fills in the record, and the log
//! line, the metrics and the admin API show it. They depend on nothing else in wsgate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How a connection ended: the label of DESIGN §4, used in logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The client started the Close handshake.
    ClientClose,
    /// The backend started the Close handshake.
    BackendClose,
    /// A side never answered a Close within `close_timeout`.
    CloseTimeout,
    /// The client closed or reset TCP without a Close frame.
    ClientGone,
    /// The client did not answer wsgate's liveness Ping within `pong_timeout`.
    ClientUnresponsive,
    /// The client stopped reading: writes to it made no progress for `write_timeout`.
    ClientStalled,
    /// The backend closed or reset TCP without a Close frame.
    BackendGone,
    /// The backend did not answer a liveness Ping or stopped reading.
    BackendUnresponsive,
    /// No data frame either way for `idle_timeout`.
    IdleTimeout,
    /// The connection reached `max_lifetime`.
    MaxLifetime,
    /// wsgate is shutting down.
    Shutdown,
    /// A side sent invalid framing (or a frame over `max_frame_size`).
    ProtocolError,
    /// An operator closed it through the admin API.
    AdminClose,
}

impl Outcome {
    /// Every outcome, for pre-registering metric label values.
    pub const ALL: [Outcome; 13] = [
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
        }
    }

    /// Its position in [`Outcome::ALL`]: the index of its metric series.
    pub fn idx(self) -> usize {
        self as usize
    }

    /// The reason text of the Close frames wsgate sends for this outcome.
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
        }
    }
}

/// Bytes and frames that passed one way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames read from the source (data and control).
    pub frames: u64,
    /// Bytes read from the source, frame headers included.
    pub bytes: u64,
}

/// What is known about a WebSocket connection from its handshake.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// Process-unique connection id.
    pub id: u64,
    /// The client's address as wsgate sees it.
    pub client: SocketAddr,
    /// The worker thread that served it.
    pub worker: usize,
    /// Request path without the query string (queries may carry tokens).
    pub path: Arc<str>,
}

/// Everything recorded about one relayed connection when it ends: the one value the log
/// line and every per-connection metric are written from.
#[derive(Clone, Debug)]
pub struct Record {
    pub info: ConnectionInfo,
    pub outcome: Outcome,
    /// From the upgrade to both sockets closed.
    pub duration: Duration,
    /// From the first end signal to both sockets closed.
    pub release: Duration,
    pub client_to_backend: Counters,
    pub backend_to_client: Counters,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcomes_index_is_its_place_in_all() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.idx(), i, "{o:?}");
        }
    }
}
