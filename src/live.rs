//! The live connection table behind the admin `/connections` endpoint: every relayed
//! WebSocket publishes its counters here while it lasts, and can be asked to close.
//!
//! Relays write plain atomics (no lock on the data path); the table's lock is taken
//! only to add or remove a connection and to list them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::RelayMetrics;
use crate::pump::Counters;
use crate::report::ConnectionInfo;
use crate::session::{Outcome, Side};

/// "Not measured yet" in the atomics below.
const NONE: u64 = u64::MAX;

/// A close requested through the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: String,
}

/// What one relayed connection publishes.
#[derive(Debug)]
pub struct LiveConn {
    pub id: u64,
    pub client: SocketAddr,
    /// The worker thread relaying it (see `workers`).
    pub worker: usize,
    /// Request path without the query string.
    pub path: Arc<str>,
    started: Instant,
    /// Per source side (client, backend): bytes and frames read.
    bytes: [AtomicU64; 2],
    frames: [AtomicU64; 2],
    /// The part of `bytes` and `frames` already added to the process-wide counters.
    counted_bytes: [AtomicU64; 2],
    counted_frames: [AtomicU64; 2],
    /// Per source side: milliseconds after `started` when bytes last arrived.
    last_rx_ms: [AtomicU64; 2],
    /// Per side pinged: last liveness round trip in microseconds.
    rtt_us: [AtomicU64; 2],
    /// Index into [`Outcome::ALL`] once the connection is ending, else [`NONE`].
    outcome: AtomicU64,
    /// Cancelled when an operator asks for a close (the request is in `close_request`),
    /// or with its parent, the server's shutdown token.
    pub close_token: CancellationToken,
    close_request: Mutex<Option<CloseRequest>>,
}

fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

impl LiveConn {
    pub fn update_counters(&self, from: Side, c: Counters) {
        self.bytes[idx(from)].store(c.bytes, Ordering::Relaxed);
        self.frames[idx(from)].store(c.frames, Ordering::Relaxed);
    }

    /// Adds the bytes and frames read since the last call to the process-wide counters.
    /// The relay calls it at the end, the server's housekeeping every second meanwhile;
    /// `fetch_max` makes concurrent calls count every byte exactly once.
    pub fn add_to_metrics(&self, metrics: &RelayMetrics) {
        let add = |total: &AtomicU64, counted: &AtomicU64, counter: &metrics::Counter| {
            let now = total.load(Ordering::Relaxed);
            let before = counted.fetch_max(now, Ordering::Relaxed);
            if now > before {
                counter.increment(now - before);
            }
        };
        for i in 0..2 {
            add(&self.bytes[i], &self.counted_bytes[i], &metrics.bytes[i]);
            add(&self.frames[i], &self.counted_frames[i], &metrics.frames[i]);
        }
    }

    pub fn received(&self, from: Side, at: Instant) {
        let ms = at.saturating_duration_since(self.started).as_millis() as u64;
        self.last_rx_ms[idx(from)].store(ms, Ordering::Relaxed);
    }

    pub fn ping_rtt(&self, side: Side, rtt: std::time::Duration) {
        self.rtt_us[idx(side)].store(rtt.as_micros() as u64, Ordering::Relaxed);
    }

    /// The last liveness round trip measured on `side`.
    pub fn rtt(&self, side: Side) -> Option<std::time::Duration> {
        let us = self.rtt_us[idx(side)].load(Ordering::Relaxed);
        (us != NONE).then(|| std::time::Duration::from_micros(us))
    }

    pub fn ending(&self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.outcome.store(i as u64, Ordering::Relaxed);
        }
    }

    /// The pending close request, if an operator made one.
    pub fn close_request(&self) -> Option<CloseRequest> {
        lock(&self.close_request).clone()
    }

    fn request_close(&self, request: CloseRequest) {
        *lock(&self.close_request) = Some(request);
        self.close_token.cancel();
    }

    fn snapshot(&self, now: Instant) -> ConnSnapshot {
        let age = now.saturating_duration_since(self.started);
        let direction = |from: Side| {
            let last = self.last_rx_ms[idx(from)].load(Ordering::Relaxed);
            DirectionSnapshot {
                bytes: self.bytes[idx(from)].load(Ordering::Relaxed),
                frames: self.frames[idx(from)].load(Ordering::Relaxed),
                seconds_since_last_frame: (last != NONE)
                    .then(|| (age.as_millis() as u64).saturating_sub(last) as f64 / 1e3),
            }
        };
        let rtt = |side: Side| {
            let us = self.rtt_us[idx(side)].load(Ordering::Relaxed);
            (us != NONE).then(|| us as f64 / 1e6)
        };
        let outcome = Outcome::ALL
            .get(self.outcome.load(Ordering::Relaxed) as usize)
            .map(|o| o.as_str());
        ConnSnapshot {
            id: self.id,
            client: self.client.to_string(),
            worker: self.worker,
            path: self.path.to_string(),
            age_seconds: age.as_secs_f64(),
            state: if outcome.is_some() { "closing" } else { "open" },
            outcome,
            client_to_backend: direction(Side::Client),
            backend_to_client: direction(Side::Backend),
            client_ping_rtt_seconds: rtt(Side::Client),
            backend_ping_rtt_seconds: rtt(Side::Backend),
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it; the data (a
/// map of handles, a request) is still consistent, so keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One connection as `/connections` shows it.
#[derive(Debug, Serialize)]
pub struct ConnSnapshot {
    pub id: u64,
    pub client: String,
    pub worker: usize,
    pub path: String,
    pub age_seconds: f64,
    /// `open`, or `closing` once the first end signal arrived.
    pub state: &'static str,
    /// Why it is closing (the outcome label), once it is.
    pub outcome: Option<&'static str>,
    pub client_to_backend: DirectionSnapshot,
    pub backend_to_client: DirectionSnapshot,
    pub client_ping_rtt_seconds: Option<f64>,
    pub backend_ping_rtt_seconds: Option<f64>,
}

/// One direction of a connection in `/connections`.
#[derive(Debug, Serialize)]
pub struct DirectionSnapshot {
    pub bytes: u64,
    pub frames: u64,
    /// Seconds since bytes last arrived from the sending side; `None` if none yet.
    pub seconds_since_last_frame: Option<f64>,
}

/// Why a close request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseError {
    #[error("no open connection with id {0}")]
    NotFound(u64),
    #[error("code {0} cannot be sent: use 1000-1003, 1007-1014 or 3000-4999")]
    BadCode(u16),
    #[error("the reason is longer than 123 bytes")]
    ReasonTooLong,
}

type Conns = Mutex<BTreeMap<u64, Arc<LiveConn>>>;

/// All live relayed connections.
#[derive(Debug, Default)]
pub struct LiveTable {
    conns: Arc<Conns>,
}

/// Removes its connection from the table when dropped. It shares the table instead of
/// borrowing it, so a relay's future can own it.
pub struct Registration {
    table: Arc<Conns>,
    pub conn: Arc<LiveConn>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.table).remove(&self.conn.id);
    }
}

impl LiveTable {
    /// `shutdown` is the server's shutdown token: the connection's close token is its
    /// child, so a relay waits on one token for both.
    pub fn register(&self, info: &ConnectionInfo, shutdown: &CancellationToken) -> Registration {
        let conn = Arc::new(LiveConn {
            id: info.id,
            client: info.client,
            worker: info.worker,
            path: info.path.clone(),
            started: Instant::now(),
            bytes: Default::default(),
            frames: Default::default(),
            counted_bytes: Default::default(),
            counted_frames: Default::default(),
            last_rx_ms: [AtomicU64::new(NONE), AtomicU64::new(NONE)],
            rtt_us: [AtomicU64::new(NONE), AtomicU64::new(NONE)],
            outcome: AtomicU64::new(NONE),
            close_token: shutdown.child_token(),
            close_request: Mutex::new(None),
        });
        lock(&self.conns).insert(info.id, conn.clone());
        Registration {
            table: self.conns.clone(),
            conn,
        }
    }

    pub fn snapshot(&self) -> Vec<ConnSnapshot> {
        let now = Instant::now();
        let conns: Vec<Arc<LiveConn>> = lock(&self.conns).values().cloned().collect();
        conns.iter().map(|c| c.snapshot(now)).collect()
    }

    pub fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Adds the traffic of every open connection to the process-wide counters (see
    /// [`LiveConn::add_to_metrics`]).
    pub fn add_to_metrics(&self, metrics: &RelayMetrics) {
        for conn in lock(&self.conns).values() {
            conn.add_to_metrics(metrics);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks connection `id` to close with `code` and `reason` on both sides.
    pub fn close(&self, id: u64, code: u16, reason: String) -> Result<(), CloseError> {
        if !crate::frame::is_sendable_close_code(code) {
            return Err(CloseError::BadCode(code));
        }
        if reason.len() > crate::frame::MAX_CONTROL_PAYLOAD - 2 {
            return Err(CloseError::ReasonTooLong);
        }
        let conn = lock(&self.conns)
            .get(&id)
            .cloned()
            .ok_or(CloseError::NotFound(id))?;
        conn.request_close(CloseRequest { code, reason });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64, path: &str) -> ConnectionInfo {
        ConnectionInfo {
            id,
            client: "127.0.0.1:1".parse().unwrap(),
            worker: 0,
            path: path.into(),
        }
    }

    #[test]
    fn traffic_reaches_the_shared_counters_exactly_once() {
        let metrics = crate::metrics::Metrics::new(10);
        let table = LiveTable::default();
        let reg = table.register(&info(1, "/ws"), &CancellationToken::new());
        let bytes = |text: &str| -> String {
            text.lines()
                .find(|l| {
                    l.starts_with("wsgate_websocket_bytes_total{direction=\"client_to_backend\"}")
                })
                .unwrap()
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        let sent = |n| Counters {
            frames: 1,
            bytes: n,
        };
        reg.conn.update_counters(Side::Client, sent(106));
        // The sweep and the relay's final call may both run: each byte counts once.
        table.add_to_metrics(&metrics.relay());
        reg.conn.add_to_metrics(&metrics.relay());
        table.add_to_metrics(&metrics.relay());
        assert_eq!(bytes(&metrics.render()), "106");
        reg.conn.update_counters(Side::Client, sent(150));
        table.add_to_metrics(&metrics.relay());
        assert_eq!(bytes(&metrics.render()), "150");
    }

    #[test]
    fn registration_lists_and_removes_connections() {
        let table = LiveTable::default();
        let reg = table.register(&info(7, "/ws"), &CancellationToken::new());
        reg.conn.update_counters(
            Side::Client,
            Counters {
                frames: 2,
                bytes: 30,
            },
        );
        let snap = table.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!((snap[0].id, snap[0].state), (7, "open"));
        assert_eq!(snap[0].client_to_backend.bytes, 30);
        assert_eq!(snap[0].client_to_backend.seconds_since_last_frame, None);
        reg.conn.ending(Outcome::ClientGone);
        assert_eq!(table.snapshot()[0].outcome, Some("client_gone"));
        drop(reg);
        assert!(table.is_empty());
    }

    #[test]
    fn close_requests_are_checked() {
        let table = LiveTable::default();
        let reg = table.register(&info(1, "/"), &CancellationToken::new());
        assert_eq!(
            table.close(2, 1000, String::new()),
            Err(CloseError::NotFound(2))
        );
        assert_eq!(
            table.close(1, 1006, String::new()),
            Err(CloseError::BadCode(1006))
        );
        assert_eq!(
            table.close(1, 4000, "x".repeat(124)),
            Err(CloseError::ReasonTooLong)
        );
        assert!(!reg.conn.close_token.is_cancelled());
        assert_eq!(table.close(1, 4000, "maintenance".into()), Ok(()));
        assert!(reg.conn.close_token.is_cancelled());
        assert_eq!(
            reg.conn.close_request(),
            Some(CloseRequest {
                code: 4000,
                reason: "maintenance".into()
            })
        );
    }
}
