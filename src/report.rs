//! The one writer of what wsgate records about WebSockets: when a connection ends, its
//! [`Record`] becomes one structured log line and every per-connection metric; while
//! connections are open, a sweep every second adds their traffic and ping round trips
//! to the process-wide metrics; and a scrape reads the number open from the live table.
//!
//! Relays only write their own connection's atomics in [`crate::live`], never the shared
//! metrics, so nothing process-wide is contended per message.

use std::time::Duration;

use crate::live::{LiveConn, LiveTable, Registration};
use crate::metrics::Metrics;
use crate::record::Record;
use crate::side::Side;

/// How often open WebSockets' traffic reaches the process-wide counters.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Records a connection's end. Called exactly once per relayed connection, after its
/// relay published its last counters to its live entry, which it then leaves.
pub fn connection_ended(metrics: &Metrics, registration: Registration, r: &Record) {
    add_live_counters(metrics, &registration.conn);
    registration.ended(r);
    metrics.connection_ended(r);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::info!(
        target: "wsgate::connection",
        id = r.info.id,
        client = %r.info.client,
        worker = r.info.worker,
        path = %r.info.path,
        outcome = r.outcome.as_str(),
        duration_ms = ms(r.duration),
        release_ms = ms(r.release),
        client_to_backend_bytes = r.client_to_backend.bytes,
        client_to_backend_frames = r.client_to_backend.frames,
        backend_to_client_bytes = r.backend_to_client.bytes,
        backend_to_client_frames = r.backend_to_client.frames,
        client_close_code = r.client_close.flatten(),
        backend_close_code = r.backend_close.flatten(),
        client_received_code = r.client_received_close.flatten(),
        backend_received_code = r.backend_received_close.flatten(),
        wsgate_to_client_code = r.wsgate_to_client_close,
        wsgate_to_backend_code = r.wsgate_to_backend_close,
        client_rtt_ms = r.client_rtt.map(ms),
        backend_rtt_ms = r.backend_rtt.map(ms),
        "websocket connection ended"
    );
}

/// Adds the traffic and ping round trips of every open connection since the last sweep
/// to the process-wide metrics, and folds histogram samples into their buckets.
pub fn sweep(live: &LiveTable, metrics: &Metrics) {
    for conn in live.conns() {
        add_live_counters(metrics, &conn);
    }
    metrics.run_upkeep();
}

/// The Prometheus exposition, with the number of open WebSockets read from the table
/// at this moment.
pub fn render(live: &LiveTable, metrics: &Metrics) -> String {
    metrics.websockets_active.set(live.len() as f64);
    metrics.render()
}

fn add_live_counters(metrics: &Metrics, conn: &LiveConn) {
    for side in Side::BOTH {
        metrics.add_traffic(side, conn.take_uncounted(side));
        if let Some(rtt) = conn.take_unrecorded_rtt(side) {
            metrics.ping_rtt(side, rtt);
        }
    }
}
