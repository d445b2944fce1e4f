//! The live connection table: every relayed WebSocket while it lasts. It is how the rest
//! of wsgate reaches a relay: the admin `/connections` endpoint reads the counters each
//! relay publishes here, the drain and an operator's close post their requests to a
//! relay's mailbox here, and the metrics sweep adds the traffic of open connections.
//!
//! Relays write plain atomics (no lock on the data path); the table's lock is taken
//! only to add or remove a connection, to list them, and to reach all of them at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use atomic_waker::AtomicWaker;
use serde::Serialize;
use tokio::sync::Notify;

use crate::frame::{MAX_CONTROL_PAYLOAD, is_sendable_close_code};
use crate::history::{EndedView, History, Releases};
use crate::record::{ConnectionInfo, Counters, Outcome, Record};
use crate::session::Timers;
use crate::side::Side;

/// "Not measured yet" in the atomics below.
const NONE: u64 = u64::MAX;

/// What relays run with. A relay takes it when it registers; a reload replaces it and
/// tells every open relay to take the new timers.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Shared by every relay: one pointer per connection instead of a copy.
    pub timers: Arc<Timers>,
    /// Largest data frame accepted from either side; `None` for no limit.
    pub max_frame_size: Option<u64>,
    /// The Close code a drain sends clients (`shutdown.client_close_code`).
    pub drain_close_code: u16,
}

/// A close requested through the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: Arc<str>,
}

/// What outside parties asked of a relay since it last looked, as a set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests(u8);

impl Requests {
    const CLOSE: u8 = 1;
    const SHUTDOWN: u8 = 2;
    const FORCE: u8 = 4;
    const RECONFIGURE: u8 = 8;

    /// An operator asked for a close ([`LiveConn::close_request`] says how).
    pub fn close(self) -> bool {
        self.0 & Self::CLOSE != 0
    }

    /// wsgate is draining: close with the shutdown codes.
    pub fn shutdown(self) -> bool {
        self.0 & Self::SHUTDOWN != 0
    }

    /// The drain deadline passed: abort what is left.
    pub fn force(self) -> bool {
        self.0 & Self::FORCE != 0
    }

    /// The configuration was reloaded: take the new timers ([`LiveTable::config`]).
    pub fn reconfigure(self) -> bool {
        self.0 & Self::RECONFIGURE != 0
    }
}

/// Where outside requests wait for a relay: a set of flags and the relay task's waker.
/// One atomic word and a waker, instead of a future per kind of request: an idle
/// WebSocket's relay stays small, and checking for requests costs two atomic operations.
#[derive(Debug, Default)]
struct Mailbox {
    pending: AtomicU8,
    waker: AtomicWaker,
}

impl Mailbox {
    fn post(&self, request: u8) {
        self.pending.fetch_or(request, Ordering::AcqRel);
        self.waker.wake();
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Requests> {
        // Register first: a request posted after the check below still wakes the task.
        self.waker.register(cx.waker());
        match self.pending.swap(0, Ordering::AcqRel) {
            0 => Poll::Pending,
            bits => Poll::Ready(Requests(bits)),
        }
    }
}

/// What one relayed connection publishes, and its mailbox.
#[derive(Debug)]
pub struct LiveConn {
    pub info: ConnectionInfo,
    started: Instant,
    /// Per source side (client, backend): bytes and frames read.
    bytes: [AtomicU64; 2],
    frames: [AtomicU64; 2],
    /// The part of `bytes` and `frames` already added to the process-wide counters.
    counted_bytes: [AtomicU64; 2],
    counted_frames: [AtomicU64; 2],
    /// Per source side: milliseconds after `started` when bytes last arrived.
    last_rx_ms: [AtomicU64; 2],
    /// Per source side: milliseconds after `started` when data-frame bytes last arrived.
    last_data_ms: [AtomicU64; 2],
    /// Per side pinged: milliseconds after `started` when wsgate's last liveness Ping to
    /// it went out.
    ping_written_ms: [AtomicU64; 2],
    /// Per side pinged: last liveness round trip in microseconds.
    rtt_us: [AtomicU64; 2],
    /// Per side pinged: a round trip not yet in the RTT histogram (the sweep takes it).
    unrecorded_rtt_us: [AtomicU64; 2],
    /// Index into [`Outcome::ALL`] once the connection is ending, else [`NONE`].
    outcome: AtomicU64,
    mailbox: Mailbox,
    close_request: Mutex<Option<CloseRequest>>,
}

impl LiveConn {
    fn new(info: ConnectionInfo) -> Self {
        LiveConn {
            info,
            started: Instant::now(),
            bytes: Default::default(),
            frames: Default::default(),
            counted_bytes: Default::default(),
            counted_frames: Default::default(),
            last_rx_ms: [AtomicU64::new(NONE), AtomicU64::new(NONE)],
            last_data_ms: [AtomicU64::new(NONE), AtomicU64::new(NONE)],
            ping_written_ms: [AtomicU64::new(NONE), AtomicU64::new(NONE)],
            rtt_us: [AtomicU64::new(NONE), AtomicU64::new(NONE)],
            unrecorded_rtt_us: [AtomicU64::new(NONE), AtomicU64::new(NONE)],
            outcome: AtomicU64::new(NONE),
            mailbox: Mailbox::default(),
            close_request: Mutex::new(None),
        }
    }

    pub fn update_counters(&self, from: Side, c: Counters) {
        self.bytes[from.idx()].store(c.bytes, Ordering::Relaxed);
        self.frames[from.idx()].store(c.frames, Ordering::Relaxed);
    }

    /// The bytes and frames read from `from` since the last call, for the process-wide
    /// counters. The sweep calls it every second and the relay's record at the end;
    /// `fetch_max` makes concurrent calls count every byte exactly once.
    pub fn take_uncounted(&self, from: Side) -> Counters {
        let take = |total: &AtomicU64, counted: &AtomicU64| {
            let now = total.load(Ordering::Relaxed);
            now.saturating_sub(counted.fetch_max(now, Ordering::Relaxed))
        };
        let i = from.idx();
        Counters {
            bytes: take(&self.bytes[i], &self.counted_bytes[i]),
            frames: take(&self.frames[i], &self.counted_frames[i]),
        }
    }

    /// Bytes arrived from `from` at `at`; `data`: some of them were data-frame bytes.
    pub fn received(&self, from: Side, at: Instant, data: bool) {
        let ms = self.ms(at);
        self.last_rx_ms[from.idx()].store(ms, Ordering::Relaxed);
        if data {
            self.last_data_ms[from.idx()].store(ms, Ordering::Relaxed);
        }
    }

    /// wsgate's liveness Ping went out to `to` at `at`.
    pub fn ping_written(&self, to: Side, at: Instant) {
        self.ping_written_ms[to.idx()].store(self.ms(at), Ordering::Relaxed);
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    /// A liveness round trip was measured on `side`.
    pub fn ping_rtt(&self, side: Side, rtt: Duration) {
        let us = (rtt.as_micros() as u64).min(NONE - 1);
        self.rtt_us[side.idx()].store(us, Ordering::Relaxed);
        self.unrecorded_rtt_us[side.idx()].store(us, Ordering::Relaxed);
    }

    /// The round trip measured on `side` since the last call, for the RTT histogram.
    /// Pings toward a side are at least `ping_interval` apart, so the sweep every second
    /// records each one.
    pub fn take_unrecorded_rtt(&self, side: Side) -> Option<Duration> {
        let us = self.unrecorded_rtt_us[side.idx()].swap(NONE, Ordering::Relaxed);
        (us != NONE).then(|| Duration::from_micros(us))
    }

    pub fn ending(&self, outcome: Outcome) {
        self.outcome.store(outcome.idx() as u64, Ordering::Relaxed);
    }

    /// What was asked of this connection since the relay last looked; registers the
    /// relay's task to be woken by the next request.
    pub fn poll_requests(&self, cx: &mut Context<'_>) -> Poll<Requests> {
        self.mailbox.poll(cx)
    }

    /// The close an operator asked for, if any.
    pub fn close_request(&self) -> Option<CloseRequest> {
        lock(&self.close_request).clone()
    }

    fn request_close(&self, request: CloseRequest) {
        *lock(&self.close_request) = Some(request);
        self.mailbox.post(Requests::CLOSE);
    }

    /// Asks the relay to close with the drain's codes.
    pub fn request_shutdown(&self) {
        self.mailbox.post(Requests::SHUTDOWN);
    }

    /// How it looks at `now`; `silence` is how long a client may send no data while
    /// the backend does before the connection is flagged (`ping_interval`).
    fn snapshot(&self, now: Instant, silence: Duration) -> ConnSnapshot {
        let age = now.saturating_duration_since(self.started);
        let age_ms = age.as_millis() as u64;
        // Seconds since the moment in `at` (ms after the start); `None` if never.
        let since = |at: &AtomicU64| {
            let at = at.load(Ordering::Relaxed);
            (at != NONE).then(|| age_ms.saturating_sub(at) as f64 / 1e3)
        };
        let direction = |from: Side| DirectionSnapshot {
            bytes: self.bytes[from.idx()].load(Ordering::Relaxed),
            frames: self.frames[from.idx()].load(Ordering::Relaxed),
            seconds_since_last_frame: since(&self.last_rx_ms[from.idx()]),
            seconds_since_last_data: since(&self.last_data_ms[from.idx()]),
        };
        let rtt = |side: Side| {
            let us = self.rtt_us[side.idx()].load(Ordering::Relaxed);
            (us != NONE).then(|| us as f64 / 1e6)
        };
        let outcome = Outcome::ALL
            .get(self.outcome.load(Ordering::Relaxed) as usize)
            .map(|o| o.as_str());
        let (client_to_backend, backend_to_client) =
            (direction(Side::Client), direction(Side::Backend));
        let mut flags = Vec::new();
        let silence = silence.as_secs_f64();
        let client_quiet = client_to_backend
            .seconds_since_last_data
            .unwrap_or(age.as_secs_f64());
        let backend_streams = backend_to_client
            .seconds_since_last_data
            .is_some_and(|s| s < silence);
        if client_quiet > silence && backend_streams {
            flags.push("client_silent");
        }
        for (side, flag) in [
            (Side::Client, "client_not_answering"),
            (Side::Backend, "backend_not_answering"),
        ] {
            let pinged = self.ping_written_ms[side.idx()].load(Ordering::Relaxed);
            let heard = self.last_rx_ms[side.idx()].load(Ordering::Relaxed);
            let unanswered = pinged != NONE && (heard == NONE || heard < pinged);
            if unanswered && age_ms.saturating_sub(pinged) >= UNANSWERED_MS {
                flags.push(flag);
            }
        }
        if outcome.is_some() {
            flags.push("closing");
        }
        ConnSnapshot {
            id: self.info.id,
            client: self.info.client.to_string(),
            worker: self.info.worker,
            path: self.info.path.to_string(),
            age_seconds: age.as_secs_f64(),
            state: if outcome.is_some() { "closing" } else { "open" },
            outcome,
            client_to_backend,
            backend_to_client,
            client_ping_rtt_seconds: rtt(Side::Client),
            backend_ping_rtt_seconds: rtt(Side::Backend),
            flags,
        }
    }
}

/// A liveness Ping unanswered for this long marks its side as not answering on the
/// admin page (a Pong takes milliseconds; `pong_timeout` ends the connection later).
const UNANSWERED_MS: u64 = 1000;

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
    /// What makes it worth a look: `client_silent` (no data from the client for longer
    /// than `ping_interval` while the backend sends: a query nobody reads),
    /// `client_not_answering` / `backend_not_answering` (wsgate's liveness Ping is
    /// unanswered), `closing`.
    pub flags: Vec<&'static str>,
}

/// One direction of a connection in `/connections`.
#[derive(Debug, Serialize)]
pub struct DirectionSnapshot {
    pub bytes: u64,
    pub frames: u64,
    /// Seconds since bytes last arrived from the sending side; `None` if none yet.
    pub seconds_since_last_frame: Option<f64>,
    /// Seconds since data-frame bytes (not Ping, Pong or Close) last arrived.
    pub seconds_since_last_data: Option<f64>,
}

/// The silence after which a client is flagged when pings are off.
const DEFAULT_SILENCE: Duration = Duration::from_secs(20);

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

/// How far wsgate's shutdown has come, as far as relays are concerned. A relay that
/// registers late still gets what the others got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Serving,
    Draining,
    Forced,
}

#[derive(Debug)]
struct Table {
    conns: BTreeMap<u64, Arc<LiveConn>>,
    phase: Phase,
    config: RelayConfig,
    /// Those that ended.
    history: History,
}

#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    /// Woken when the last connection leaves the table.
    emptied: Notify,
}

/// All live relayed connections. Cheap to clone: clones share the table.
#[derive(Clone, Debug)]
pub struct LiveTable {
    shared: Arc<Shared>,
}

/// Removes its connection from the table when dropped. It shares the table instead of
/// borrowing it, so a relay's future can own it.
pub struct Registration {
    shared: Arc<Shared>,
    pub conn: Arc<LiveConn>,
    /// What the relay runs with, as of its registration.
    pub config: RelayConfig,
}

impl Registration {
    /// The connection ended as `record` says: it leaves the table for its history.
    pub fn ended(self, record: &Record) {
        lock(&self.shared.table)
            .history
            .add(record, SystemTime::now(), Instant::now());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut table = lock(&self.shared.table);
        table.conns.remove(&self.conn.info.id);
        if table.conns.is_empty() {
            self.shared.emptied.notify_waiters();
        }
    }
}

impl LiveTable {
    /// `recent` is how many ended connections to keep (`admin.recent_endings`).
    pub fn new(config: RelayConfig, recent: usize) -> Self {
        LiveTable {
            shared: Arc::new(Shared {
                table: Mutex::new(Table {
                    conns: BTreeMap::new(),
                    phase: Phase::Serving,
                    config,
                    history: History::new(recent, Instant::now()),
                }),
                emptied: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.shared.table)
    }

    /// Adds a connection, with the relay configuration it starts with. During a drain
    /// it finds the shutdown (or the forced close) already in its mailbox.
    pub fn register(&self, info: ConnectionInfo) -> Registration {
        let conn = Arc::new(LiveConn::new(info));
        let mut table = self.lock();
        match table.phase {
            Phase::Serving => {}
            Phase::Draining => conn.mailbox.post(Requests::SHUTDOWN),
            Phase::Forced => conn.mailbox.post(Requests::FORCE),
        }
        table.conns.insert(conn.info.id, conn.clone());
        Registration {
            shared: self.shared.clone(),
            conn,
            config: table.config.clone(),
        }
    }

    /// The drain begins: connections registering from now on are closed at once, and
    /// the ones open now are returned, for the drain to close at moments of its choice.
    pub fn begin_drain(&self) -> Vec<Arc<LiveConn>> {
        let mut table = self.lock();
        if table.phase == Phase::Serving {
            table.phase = Phase::Draining;
        }
        table.conns.values().cloned().collect()
    }

    /// Asks every relay, present and future, to abort.
    pub fn force_all(&self) {
        let mut table = self.lock();
        table.phase = Phase::Forced;
        for conn in table.conns.values() {
            conn.mailbox.post(Requests::FORCE);
        }
    }

    /// Replaces the relay configuration and the number of ended connections kept; open
    /// relays adopt the new timers.
    pub fn reconfigure(&self, config: RelayConfig, recent: usize) {
        let mut table = self.lock();
        table.config = config;
        table.history.set_capacity(recent);
        for conn in table.conns.values() {
            conn.mailbox.post(Requests::RECONFIGURE);
        }
    }

    /// The relay configuration in force.
    pub fn config(&self) -> RelayConfig {
        self.lock().config.clone()
    }

    /// Connections ended since start, by outcome (indexed like [`Outcome::ALL`]).
    pub fn ended(&self) -> [u64; Outcome::ALL.len()] {
        self.lock().history.ended()
    }

    /// The last connections that ended, newest first; only those of `outcome` if given.
    pub fn recent(&self, outcome: Option<Outcome>) -> Vec<EndedView> {
        self.lock().history.recent(outcome)
    }

    /// Release times of the connections that ended in the last five minutes.
    pub fn releases(&self) -> Releases {
        self.lock().history.releases(Instant::now())
    }

    /// Completes once no connection is open.
    pub async fn emptied(&self) {
        loop {
            let emptied = self.shared.emptied.notified();
            tokio::pin!(emptied);
            // Registered before the check: a removal right after it still wakes us.
            emptied.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            emptied.await;
        }
    }

    /// Every open connection as `/connections` shows it.
    ///
    /// With a `limit`, at most that many: the flagged ones first (what an operator looks
    /// for), then the oldest. A page refreshing every second must not serialize ten
    /// thousand connections each time to show the first screenful.
    pub fn snapshot(&self, limit: Option<usize>) -> Vec<ConnSnapshot> {
        let now = Instant::now();
        let (conns, ping_interval) = {
            let table = self.lock();
            let conns: Vec<_> = table.conns.values().cloned().collect();
            (conns, table.config.timers.ping_interval)
        };
        let silence = ping_interval.unwrap_or(DEFAULT_SILENCE);
        let mut all: Vec<ConnSnapshot> = conns.iter().map(|c| c.snapshot(now, silence)).collect();
        if let Some(limit) = limit {
            // The table is ordered by id, so a stable sort on "has flags" keeps the
            // oldest first within each group.
            all.sort_by_key(|c| c.flags.is_empty());
            all.truncate(limit);
        }
        all
    }

    /// Every open connection, for a pass over all of them without holding the lock.
    pub fn conns(&self) -> Vec<Arc<LiveConn>> {
        self.lock().conns.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Asks connection `id` to close with `code` and `reason` on both sides.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> Result<(), CloseError> {
        if !is_sendable_close_code(code) {
            return Err(CloseError::BadCode(code));
        }
        if reason.len() > MAX_CONTROL_PAYLOAD - 2 {
            return Err(CloseError::ReasonTooLong);
        }
        let conn = self
            .lock()
            .conns
            .get(&id)
            .cloned()
            .ok_or(CloseError::NotFound(id))?;
        conn.request_close(CloseRequest {
            code,
            reason: reason.into(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> LiveTable {
        LiveTable::new(
            RelayConfig {
                timers: Arc::new(crate::config::Config::default().websocket.timers()),
                max_frame_size: None,
                drain_close_code: 1012,
            },
            10,
        )
    }

    fn info(id: u64, path: &str) -> ConnectionInfo {
        ConnectionInfo {
            id,
            client: "127.0.0.1:1".parse().unwrap(),
            worker: 0,
            path: path.into(),
        }
    }

    #[test]
    fn traffic_is_taken_for_the_shared_counters_exactly_once() {
        let table = table();
        let reg = table.register(info(1, "/ws"));
        let sent = |n| Counters {
            frames: 1,
            bytes: n,
        };
        reg.conn.update_counters(Side::Client, sent(106));
        // The sweep and the relay's final record may both take: each byte counts once.
        assert_eq!(reg.conn.take_uncounted(Side::Client).bytes, 106);
        assert_eq!(reg.conn.take_uncounted(Side::Client), Counters::default());
        reg.conn.update_counters(Side::Client, sent(150));
        assert_eq!(reg.conn.take_uncounted(Side::Client).bytes, 44);
        assert_eq!(reg.conn.take_uncounted(Side::Backend), Counters::default());
        // A round trip is recorded once, and stays visible to /connections.
        reg.conn.ping_rtt(Side::Backend, Duration::from_micros(250));
        assert_eq!(
            reg.conn.take_unrecorded_rtt(Side::Backend),
            Some(Duration::from_micros(250))
        );
        assert_eq!(reg.conn.take_unrecorded_rtt(Side::Backend), None);
        assert_eq!(
            table.snapshot(None)[0].backend_ping_rtt_seconds,
            Some(0.00025)
        );
    }

    #[test]
    fn connections_worth_a_look_are_flagged() {
        let table = table();
        let reg = table.register(info(1, "/query"));
        let c = &reg.conn;
        let at = |ms: u64| c.started + Duration::from_millis(ms);
        let flags = |ms| c.snapshot(at(ms), Duration::from_secs(20)).flags;
        c.received(Side::Client, at(2_000), true);
        c.received(Side::Backend, at(24_500), true);
        c.ping_written(Side::Client, at(23_000));
        c.ping_written(Side::Backend, at(24_800));
        // The client has said nothing for 23 s while the backend streams, and has not
        // answered the Ping of 2 s ago; the backend's Ping is only 200 ms old.
        assert_eq!(flags(25_000), ["client_silent", "client_not_answering"]);
        // A Pong is any byte from the client: it answers; data does not come back.
        c.received(Side::Client, at(25_100), false);
        assert_eq!(flags(25_200), ["client_silent"]);
        // The backend never answered its Ping either...
        assert_eq!(flags(60_000), ["backend_not_answering"]);
        // ...until it does; with the backend quiet too, the client is not blamed.
        c.received(Side::Backend, at(24_900), false);
        assert!(flags(60_000).is_empty());
        c.ending(Outcome::IdleTimeout);
        assert_eq!(flags(60_000), ["closing"]);
    }

    #[test]
    fn registration_lists_and_removes_connections() {
        let table = table();
        let reg = table.register(info(7, "/ws"));
        reg.conn.update_counters(
            Side::Client,
            Counters {
                frames: 2,
                bytes: 30,
            },
        );
        let snap = table.snapshot(None);
        assert_eq!(snap.len(), 1);
        assert_eq!((snap[0].id, snap[0].state), (7, "open"));
        assert_eq!(snap[0].client_to_backend.bytes, 30);
        assert_eq!(snap[0].client_to_backend.seconds_since_last_frame, None);
        reg.conn.ending(Outcome::ClientGone);
        assert_eq!(table.snapshot(None)[0].outcome, Some("client_gone"));
        drop(reg);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_limited_snapshot_shows_flagged_connections_first_then_the_oldest() {
        let table = table();
        let regs: Vec<_> = (1..=5).map(|id| table.register(info(id, "/ws"))).collect();
        regs[3].conn.ending(Outcome::IdleTimeout); // id 4: flagged "closing"
        let ids = |limit| {
            table
                .snapshot(limit)
                .iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(Some(3)), [4, 1, 2]);
        assert_eq!(ids(Some(0)), Vec::<u64>::new());
        assert_eq!(ids(Some(100)), [4, 1, 2, 3, 5]);
        assert_eq!(ids(None), [1, 2, 3, 4, 5]);
    }

    fn requests(conn: &LiveConn) -> Option<Requests> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match conn.poll_requests(&mut cx) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    #[test]
    fn close_requests_are_checked_and_delivered() {
        let table = table();
        let reg = table.register(info(1, "/"));
        assert_eq!(table.close(2, 1000, ""), Err(CloseError::NotFound(2)));
        assert_eq!(table.close(1, 1006, ""), Err(CloseError::BadCode(1006)));
        assert_eq!(
            table.close(1, 4000, &"x".repeat(124)),
            Err(CloseError::ReasonTooLong)
        );
        assert_eq!(requests(&reg.conn), None);
        assert_eq!(table.close(1, 4000, "maintenance"), Ok(()));
        let got = requests(&reg.conn).unwrap();
        assert!(got.close() && !got.shutdown() && !got.force());
        assert_eq!(
            reg.conn.close_request(),
            Some(CloseRequest {
                code: 4000,
                reason: "maintenance".into()
            })
        );
        // Taken once.
        assert_eq!(requests(&reg.conn), None);
    }

    #[test]
    fn a_drain_reaches_open_connections_and_those_that_register_later() {
        let table = table();
        let early = table.register(info(1, "/"));
        let open = table.begin_drain();
        assert_eq!(open.len(), 1);
        // The drain decides when the open ones close.
        assert_eq!(requests(&early.conn), None);
        open[0].request_shutdown();
        assert!(requests(&early.conn).unwrap().shutdown());
        let late = table.register(info(2, "/"));
        assert!(requests(&late.conn).unwrap().shutdown());
        table.force_all();
        assert!(requests(&early.conn).unwrap().force());
        let later = table.register(info(3, "/"));
        assert!(requests(&later.conn).unwrap().force());
    }

    #[test]
    fn a_reload_reaches_open_relays_and_new_ones_start_with_it() {
        let table = table();
        let open = table.register(info(1, "/"));
        let mut config = table.config();
        config.max_frame_size = Some(10);
        table.reconfigure(config, 10);
        assert!(requests(&open.conn).unwrap().reconfigure());
        assert_eq!(open.config.max_frame_size, None);
        assert_eq!(table.register(info(2, "/")).config.max_frame_size, Some(10));
    }

    #[tokio::test]
    async fn the_table_says_when_it_is_empty_and_counts_endings() {
        let table = table();
        let a = table.register(info(1, "/"));
        let b = table.register(info(2, "/"));
        let waiting = tokio::spawn({
            let table = table.clone();
            async move { table.emptied().await }
        });
        a.ended(&Record {
            info: info(1, "/"),
            outcome: Outcome::ClientClose,
            duration: Duration::ZERO,
            release: Duration::ZERO,
            client_to_backend: Counters::default(),
            backend_to_client: Counters::default(),
            client_close: Some(Some(1000)),
            backend_close: Some(Some(1000)),
            client_received_close: Some(Some(1000)),
            backend_received_close: Some(Some(1000)),
            wsgate_to_client_close: None,
            wsgate_to_backend_close: None,
            client_rtt: None,
            backend_rtt: None,
        });
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(table.ended()[Outcome::ClientClose.idx()], 1);
        assert_eq!(table.ended().iter().sum::<u64>(), 1);
        assert_eq!(table.recent(None)[0].id, 1);
        assert_eq!(table.releases().count, 1);
    }
}
