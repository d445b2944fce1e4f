//! The one place where an ended WebSocket connection is recorded: one structured log
//! line and the metrics, both from its [`Report`].

use std::net::SocketAddr;

use crate::metrics::Metrics;
use crate::relay::Report;

/// What is known about a WebSocket connection from its handshake.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// Process-unique connection id.
    pub id: u64,
    /// The client's address as wsgate sees it.
    pub client: SocketAddr,
    /// The worker thread that served it.
    pub worker: usize,
    /// Request path without the query string (queries may carry tokens); shared with
    /// the connection's `/connections` entry.
    pub path: std::sync::Arc<str>,
}

/// Records a connection's end. Called exactly once per relayed connection.
pub fn connection_ended(metrics: &Metrics, info: &ConnectionInfo, r: &Report) {
    metrics.connection_ended(r);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    tracing::info!(
        target: "wsgate::connection",
        id = info.id,
        client = %info.client,
        worker = info.worker,
        path = %info.path,
        outcome = r.outcome.as_str(),
        duration_ms = ms(r.duration),
        release_ms = ms(r.release),
        client_to_backend_bytes = r.client_to_backend.bytes,
        client_to_backend_frames = r.client_to_backend.frames,
        backend_to_client_bytes = r.backend_to_client.bytes,
        backend_to_client_frames = r.backend_to_client.frames,
        client_close_code = r.client_close.flatten(),
        backend_close_code = r.backend_close.flatten(),
        wsgate_to_client_code = r.wsgate_to_client_close,
        wsgate_to_backend_code = r.wsgate_to_backend_close,
        client_rtt_ms = r.client_rtt.map(ms),
        backend_rtt_ms = r.backend_rtt.map(ms),
        "websocket connection ended"
    );
}
