//! The live table: every exchange worth watching while it lasts — each relayed
//! WebSocket, and each HTTP exchange once it is a stream (an event stream, or a body
//! still open `http.stream_after` after its head). It is how the rest of wsgate reaches
//! them: the admin `/connections` endpoint reads the counters each one publishes here,
//! the drain and an operator's close post their requests here, and the metrics sweep
//! adds the traffic of open exchanges.
//!
//! Exchanges write plain atomics (no lock on the data path); the table's lock is taken
//! only to add or remove an exchange, to list them, and to reach all of them at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use atomic_waker::AtomicWaker;
use serde::Serialize;
use tokio::sync::Notify;

use crate::abort::Abort;
use crate::frame::{MAX_CONTROL_PAYLOAD, is_sendable_close_code};
use crate::history::{EndedView, History, Releases};
use crate::record::{Counters, ExchangeInfo, Kind, Outcome, Record};
use crate::session::Timers;
use crate::side::Side;

/// "Not measured yet" in the atomics below.
const NONE: u64 = u64::MAX;

/// What exchanges run with. An exchange takes it when it registers; a reload replaces
/// it and tells every open one to take the new values.
#[derive(Clone, Debug)]
pub struct ExchangeConfig {
    /// A WebSocket's timers. Shared by every relay: one pointer per connection instead
    /// of a copy.
    pub timers: Arc<Timers>,
    /// Largest WebSocket data frame accepted from either side; `None` for no limit.
    pub max_frame_size: Option<u64>,
    /// The Close code a drain sends WebSocket clients (`shutdown.client_close_code`).
    pub drain_close_code: u16,
}

/// A close requested through the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: Arc<str>,
}

/// What outside parties asked of an exchange since it last looked, as a set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests(u8);

impl Requests {
    const CLOSE: u8 = 1;
    const SHUTDOWN: u8 = 2;
    const FORCE: u8 = 4;
    const RECONFIGURE: u8 = 8;

    /// An operator asked for a close ([`LiveExchange::close_request`] says how).
    pub fn close(self) -> bool {
        self.0 & Self::CLOSE != 0
    }

    /// wsgate is draining: a WebSocket closes with the shutdown codes, an event stream
    /// ends at its next event boundary.
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

/// Where outside requests wait for an exchange: a set of flags and its task's waker.
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

/// What one open exchange publishes, and its mailbox.
#[derive(Debug)]
pub struct LiveExchange {
    pub info: ExchangeInfo,
    started: Instant,
    /// Per source side (client, backend): bytes read.
    bytes: [AtomicU64; 2],
    /// The part of `bytes` already added to the process-wide counters.
    counted_bytes: [AtomicU64; 2],
    /// Per source side: milliseconds after `started` when data last arrived (WebSocket:
    /// data-frame bytes; HTTP: body bytes).
    last_data_ms: [AtomicU64; 2],
    /// Index into [`Outcome::ALL`] once the exchange is ending, else [`NONE`].
    outcome: AtomicU64,
    mailbox: Mailbox,
    close_request: Mutex<Option<CloseRequest>>,
    detail: LiveDetail,
}

/// What only one kind of open exchange publishes.
#[derive(Debug)]
pub enum LiveDetail {
    WebSocket(LiveWebSocket),
    Http(LiveHttp),
}

impl LiveDetail {
    fn kind(&self) -> Kind {
        match self {
            LiveDetail::WebSocket(_) => Kind::WebSocket,
            LiveDetail::Http(_) => Kind::Http,
        }
    }
}

/// A relayed WebSocket's frames and liveness pings.
#[derive(Debug)]
pub struct LiveWebSocket {
    /// Per source side: frames read, and the part already counted process-wide.
    frames: [AtomicU64; 2],
    counted_frames: [AtomicU64; 2],
    /// Per source side: milliseconds after the start when any bytes last arrived.
    last_rx_ms: [AtomicU64; 2],
    /// Per side pinged: milliseconds after the start when wsgate's last liveness Ping
    /// to it went out.
    ping_written_ms: [AtomicU64; 2],
    /// Per side pinged: last liveness round trip in microseconds.
    rtt_us: [AtomicU64; 2],
    /// Per side pinged: a round trip not yet in the RTT histogram (the sweep takes it).
    unrecorded_rtt_us: [AtomicU64; 2],
}

impl Default for LiveWebSocket {
    fn default() -> Self {
        let none = || [AtomicU64::new(NONE), AtomicU64::new(NONE)];
        LiveWebSocket {
            frames: Default::default(),
            counted_frames: Default::default(),
            last_rx_ms: none(),
            ping_written_ms: none(),
            rtt_us: none(),
            unrecorded_rtt_us: none(),
        }
    }
}

/// An HTTP stream's request and response, and whether its client reads.
#[derive(Debug)]
pub struct LiveHttp {
    pub method: hyper::Method,
    pub status: u16,
    pub event_stream: bool,
    /// How its task is ended from outside, and whether its client keeps up.
    pub abort: Arc<Abort>,
}

impl LiveHttp {
    pub fn new(method: hyper::Method, status: u16, event_stream: bool, abort: Arc<Abort>) -> Self {
        LiveHttp {
            method,
            status,
            event_stream,
            abort,
        }
    }
}

impl LiveExchange {
    fn new(info: ExchangeInfo, detail: LiveDetail) -> Self {
        LiveExchange {
            info,
            started: Instant::now(),
            bytes: Default::default(),
            counted_bytes: Default::default(),
            last_data_ms: [AtomicU64::new(NONE), AtomicU64::new(NONE)],
            outcome: AtomicU64::new(NONE),
            mailbox: Mailbox::default(),
            close_request: Mutex::new(None),
            detail,
        }
    }

    pub fn kind(&self) -> Kind {
        self.detail.kind()
    }

    /// The totals read from `from` so far.
    pub fn update_counters(&self, from: Side, c: Counters) {
        self.bytes[from.idx()].store(c.bytes, Ordering::Relaxed);
        if let LiveDetail::WebSocket(ws) = &self.detail {
            ws.frames[from.idx()].store(c.frames, Ordering::Relaxed);
        }
    }

    /// The bytes and frames read from `from` since the last call, for the process-wide
    /// counters. The sweep calls it every second and the exchange's record at the end;
    /// `fetch_max` makes concurrent calls count every byte exactly once.
    pub fn take_uncounted(&self, from: Side) -> Counters {
        let take = |total: &AtomicU64, counted: &AtomicU64| {
            let now = total.load(Ordering::Relaxed);
            now.saturating_sub(counted.fetch_max(now, Ordering::Relaxed))
        };
        let i = from.idx();
        let frames = match &self.detail {
            LiveDetail::WebSocket(ws) => take(&ws.frames[i], &ws.counted_frames[i]),
            LiveDetail::Http(_) => 0,
        };
        Counters {
            bytes: take(&self.bytes[i], &self.counted_bytes[i]),
            frames,
        }
    }

    /// Bytes arrived from `from` at `at`; `data`: some of them were data (a WebSocket's
    /// data frames, an HTTP body).
    pub fn received(&self, from: Side, at: Instant, data: bool) {
        let ms = self.ms(at);
        if let LiveDetail::WebSocket(ws) = &self.detail {
            ws.last_rx_ms[from.idx()].store(ms, Ordering::Relaxed);
        }
        if data {
            self.last_data_ms[from.idx()].store(ms, Ordering::Relaxed);
        }
    }

    /// wsgate's liveness Ping went out to `to` at `at`.
    pub fn ping_written(&self, to: Side, at: Instant) {
        if let LiveDetail::WebSocket(ws) = &self.detail {
            ws.ping_written_ms[to.idx()].store(self.ms(at), Ordering::Relaxed);
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    /// A liveness round trip was measured on `side`.
    pub fn ping_rtt(&self, side: Side, rtt: Duration) {
        if let LiveDetail::WebSocket(ws) = &self.detail {
            let us = (rtt.as_micros() as u64).min(NONE - 1);
            ws.rtt_us[side.idx()].store(us, Ordering::Relaxed);
            ws.unrecorded_rtt_us[side.idx()].store(us, Ordering::Relaxed);
        }
    }

    /// The round trip measured on `side` since the last call, for the RTT histogram.
    /// Pings toward a side are at least `ping_interval` apart, so the sweep every second
    /// records each one.
    pub fn take_unrecorded_rtt(&self, side: Side) -> Option<Duration> {
        let LiveDetail::WebSocket(ws) = &self.detail else {
            return None;
        };
        let us = ws.unrecorded_rtt_us[side.idx()].swap(NONE, Ordering::Relaxed);
        (us != NONE).then(|| Duration::from_micros(us))
    }

    pub fn ending(&self, outcome: Outcome) {
        self.outcome.store(outcome.idx() as u64, Ordering::Relaxed);
    }

    /// What was asked of this exchange since it last looked; registers its task to be
    /// woken by the next request.
    pub fn poll_requests(&self, cx: &mut Context<'_>) -> Poll<Requests> {
        self.mailbox.poll(cx)
    }

    /// The close an operator asked for, if any.
    pub fn close_request(&self) -> Option<CloseRequest> {
        lock(&self.close_request).clone()
    }

    fn request_close(&self, request: CloseRequest) {
        match &self.detail {
            LiveDetail::WebSocket(_) => {
                *lock(&self.close_request) = Some(request);
                self.mailbox.post(Requests::CLOSE);
            }
            // An HTTP stream has no handshake to carry a code: both sides are cut.
            LiveDetail::Http(http) => http.abort.request(Outcome::AdminClose),
        }
    }

    /// The drain's turn for this exchange: a WebSocket closes with the drain's codes,
    /// an event stream ends at its next event boundary; other HTTP streams run on until
    /// the drain deadline.
    pub fn drain_now(&self) {
        self.mailbox.post(Requests::SHUTDOWN);
    }

    /// The drain deadline passed: end it now.
    fn force(&self) {
        match &self.detail {
            LiveDetail::WebSocket(_) => self.mailbox.post(Requests::FORCE),
            LiveDetail::Http(http) => http.abort.request(Outcome::Shutdown),
        }
    }

    /// How it looks at `now`; `silence` is how long a client may send no data while
    /// the backend does before a WebSocket is flagged (`ping_interval`).
    fn snapshot(&self, now: Instant, silence: Duration) -> ExchangeSnapshot {
        let age = now.saturating_duration_since(self.started);
        let age_ms = age.as_millis() as u64;
        // Seconds since the moment in `at` (ms after the start); `None` if never.
        let since = |at: &AtomicU64| {
            let at = at.load(Ordering::Relaxed);
            (at != NONE).then(|| age_ms.saturating_sub(at) as f64 / 1e3)
        };
        let outcome = Outcome::ALL
            .get(self.outcome.load(Ordering::Relaxed) as usize)
            .map(|o| o.as_str());
        let mut flags = Vec::new();
        let direction = |from: Side| DirectionSnapshot {
            bytes: self.bytes[from.idx()].load(Ordering::Relaxed),
            frames: match &self.detail {
                LiveDetail::WebSocket(ws) => Some(ws.frames[from.idx()].load(Ordering::Relaxed)),
                LiveDetail::Http(_) => None,
            },
            seconds_since_last_frame: match &self.detail {
                LiveDetail::WebSocket(ws) => Some(since(&ws.last_rx_ms[from.idx()])),
                LiveDetail::Http(_) => None,
            },
            seconds_since_last_data: since(&self.last_data_ms[from.idx()]),
        };
        let (client_to_backend, backend_to_client) =
            (direction(Side::Client), direction(Side::Backend));
        let detail = match &self.detail {
            LiveDetail::WebSocket(ws) => {
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
                    let pinged = ws.ping_written_ms[side.idx()].load(Ordering::Relaxed);
                    let heard = ws.last_rx_ms[side.idx()].load(Ordering::Relaxed);
                    let unanswered = pinged != NONE && (heard == NONE || heard < pinged);
                    if unanswered && age_ms.saturating_sub(pinged) >= UNANSWERED_MS {
                        flags.push(flag);
                    }
                }
                let rtt = |side: Side| {
                    let us = ws.rtt_us[side.idx()].load(Ordering::Relaxed);
                    (us != NONE).then(|| us as f64 / 1e6)
                };
                DetailSnapshot::WebSocket {
                    client_ping_rtt_seconds: rtt(Side::Client),
                    backend_ping_rtt_seconds: rtt(Side::Backend),
                }
            }
            LiveDetail::Http(http) => {
                let waiting = http
                    .abort
                    .waiting_since()
                    .map(|at| now.saturating_duration_since(at).as_secs_f64());
                if waiting.is_some_and(|s| s * 1e3 >= UNANSWERED_MS as f64) {
                    flags.push("client_not_reading");
                }
                DetailSnapshot::Http {
                    method: http.method.to_string(),
                    status: http.status,
                    event_stream: http.event_stream,
                    seconds_client_not_reading: waiting,
                }
            }
        };
        if outcome.is_some() {
            flags.push("closing");
        }
        ExchangeSnapshot {
            id: self.info.id,
            kind: self.kind().as_str(),
            connection: self.info.connection,
            client: self.info.client.to_string(),
            worker: self.info.worker,
            path: self.info.path.to_string(),
            age_seconds: age.as_secs_f64(),
            state: if outcome.is_some() { "closing" } else { "open" },
            outcome,
            client_to_backend,
            backend_to_client,
            detail,
            flags,
        }
    }
}

/// A liveness Ping unanswered (or a body part not taken) for this long marks its side
/// on the admin page (a Pong takes milliseconds; the timeouts end it later).
const UNANSWERED_MS: u64 = 1000;

/// A poisoned lock only means another thread panicked while holding it; the data (a
/// map of handles, a request) is still consistent, so keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One open exchange as `/connections` shows it.
#[derive(Debug, Serialize)]
pub struct ExchangeSnapshot {
    pub id: u64,
    /// `websocket` or `http`.
    pub kind: &'static str,
    /// The client TCP connection it came on (HTTP/2 carries several).
    pub connection: u64,
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
    #[serde(flatten)]
    pub detail: DetailSnapshot,
    /// What makes it worth a look: `client_silent` (a WebSocket's client sent no data
    /// for longer than `ping_interval` while the backend sends: a query nobody reads),
    /// `client_not_answering` / `backend_not_answering` (wsgate's liveness Ping is
    /// unanswered), `client_not_reading` (an HTTP stream's client has not taken the
    /// next part of the body for a second or more), `closing`.
    pub flags: Vec<&'static str>,
}

/// The fields of one kind in `/connections`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum DetailSnapshot {
    WebSocket {
        client_ping_rtt_seconds: Option<f64>,
        backend_ping_rtt_seconds: Option<f64>,
    },
    Http {
        method: String,
        status: u16,
        event_stream: bool,
        /// Seconds since the body handed a part over that the client has not taken.
        seconds_client_not_reading: Option<f64>,
    },
}

/// One direction of an exchange in `/connections`.
#[derive(Debug, Serialize)]
pub struct DirectionSnapshot {
    /// WebSocket frames with their headers, or HTTP body bytes.
    pub bytes: u64,
    /// WebSocket only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<u64>,
    /// WebSocket only: seconds since bytes last arrived from the sending side; `null`
    /// if none yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_since_last_frame: Option<Option<f64>>,
    /// Seconds since data (data-frame bytes, body bytes) last arrived.
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

/// How far wsgate's shutdown has come, as far as exchanges are concerned. One that
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
    open: BTreeMap<u64, Arc<LiveExchange>>,
    phase: Phase,
    config: ExchangeConfig,
    /// Those that ended.
    history: History,
}

#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    /// Woken when the last exchange leaves the table.
    emptied: Notify,
}

/// All open exchanges worth watching. Cheap to clone: clones share the table.
#[derive(Clone, Debug)]
pub struct LiveTable {
    shared: Arc<Shared>,
}

/// Removes its exchange from the table when dropped. It shares the table instead of
/// borrowing it, so an exchange's future can own it.
#[derive(Debug)]
pub struct Registration {
    shared: Arc<Shared>,
    pub entry: Arc<LiveExchange>,
    /// What the exchange runs with, as of its registration.
    pub config: ExchangeConfig,
}

impl Registration {
    /// The exchange ended as `record` says: it leaves the table for its history.
    pub fn ended(self, record: &Record) {
        self.shared.history_add(record);
    }
}

impl Shared {
    fn history_add(&self, record: &Record) {
        lock(&self.table)
            .history
            .add(record, SystemTime::now(), Instant::now());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut table = lock(&self.shared.table);
        table.open.remove(&self.entry.info.id);
        if table.open.is_empty() {
            self.shared.emptied.notify_waiters();
        }
    }
}

impl LiveTable {
    /// `recent` is how many ended exchanges to keep (`admin.recent_endings`).
    pub fn new(config: ExchangeConfig, recent: usize) -> Self {
        LiveTable {
            shared: Arc::new(Shared {
                table: Mutex::new(Table {
                    open: BTreeMap::new(),
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

    /// Adds an exchange, with the configuration it starts with. During a drain it finds
    /// the drain's turn (or the forced end) already asked for.
    pub fn register(&self, info: ExchangeInfo, detail: LiveDetail) -> Registration {
        let entry = Arc::new(LiveExchange::new(info, detail));
        let mut table = self.lock();
        match table.phase {
            Phase::Serving => {}
            Phase::Draining => entry.drain_now(),
            Phase::Forced => entry.force(),
        }
        table.open.insert(entry.info.id, entry.clone());
        Registration {
            shared: self.shared.clone(),
            entry,
            config: table.config.clone(),
        }
    }

    /// Keeps the record of an exchange that ended without ever being in the table (an
    /// HTTP exchange that was no stream but did not complete).
    pub fn ended_unlisted(&self, record: &Record) {
        self.shared.history_add(record);
    }

    /// The drain begins: exchanges registering from now on get their turn at once, and
    /// the ones open now are returned, for the drain to reach at moments of its choice.
    pub fn begin_drain(&self) -> Vec<Arc<LiveExchange>> {
        let mut table = self.lock();
        if table.phase == Phase::Serving {
            table.phase = Phase::Draining;
        }
        table.open.values().cloned().collect()
    }

    /// Asks every exchange, present and future, to end now.
    pub fn force_all(&self) {
        let mut table = self.lock();
        table.phase = Phase::Forced;
        for entry in table.open.values() {
            entry.force();
        }
    }

    /// Replaces the configuration and the number of ended exchanges kept; open
    /// exchanges adopt the new timers.
    pub fn reconfigure(&self, config: ExchangeConfig, recent: usize) {
        let mut table = self.lock();
        table.config = config;
        table.history.set_capacity(recent);
        for entry in table.open.values() {
            entry.mailbox.post(Requests::RECONFIGURE);
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> ExchangeConfig {
        self.lock().config.clone()
    }

    /// Exchanges of `kind` ended since start, by outcome (indexed like
    /// [`Outcome::ALL`]).
    pub fn ended(&self, kind: Kind) -> [u64; Outcome::ALL.len()] {
        self.lock().history.ended(kind)
    }

    /// The last exchanges that ended, newest first; only those of `kind` and `outcome`
    /// when given.
    pub fn recent(&self, kind: Option<Kind>, outcome: Option<Outcome>) -> Vec<EndedView> {
        self.lock().history.recent(kind, outcome)
    }

    /// Release times of the exchanges of `kind` that ended in the last five minutes.
    pub fn releases(&self, kind: Kind) -> Releases {
        self.lock().history.releases(kind, Instant::now())
    }

    /// Completes once no exchange is open.
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

    /// Every open exchange as `/connections` shows it.
    ///
    /// With a `limit`, at most that many: the flagged ones first (what an operator looks
    /// for), then the oldest. A page refreshing every second must not serialize ten
    /// thousand connections each time to show the first screenful.
    pub fn snapshot(&self, limit: Option<usize>) -> Vec<ExchangeSnapshot> {
        let now = Instant::now();
        let (open, ping_interval) = {
            let table = self.lock();
            let open: Vec<_> = table.open.values().cloned().collect();
            (open, table.config.timers.ping_interval)
        };
        let silence = ping_interval.unwrap_or(DEFAULT_SILENCE);
        let mut all: Vec<ExchangeSnapshot> =
            open.iter().map(|c| c.snapshot(now, silence)).collect();
        if let Some(limit) = limit {
            // The table is ordered by id, so a stable sort on "has flags" keeps the
            // oldest first within each group.
            all.sort_by_key(|c| c.flags.is_empty());
            all.truncate(limit);
        }
        all
    }

    /// Every open exchange, for a pass over all of them without holding the lock.
    pub fn entries(&self) -> Vec<Arc<LiveExchange>> {
        self.lock().open.values().cloned().collect()
    }

    /// Open exchanges.
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// Open exchanges of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        self.lock()
            .open
            .values()
            .filter(|e| e.kind() == kind)
            .count()
    }

    /// Asks exchange `id` to close: a WebSocket with `code` and `reason` on both sides,
    /// an HTTP stream cut on both sides.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> Result<(), CloseError> {
        if !is_sendable_close_code(code) {
            return Err(CloseError::BadCode(code));
        }
        if reason.len() > MAX_CONTROL_PAYLOAD - 2 {
            return Err(CloseError::ReasonTooLong);
        }
        let entry = self
            .lock()
            .open
            .get(&id)
            .cloned()
            .ok_or(CloseError::NotFound(id))?;
        entry.request_close(CloseRequest {
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
            ExchangeConfig {
                timers: Arc::new(crate::config::Config::default().websocket.timers()),
                max_frame_size: None,
                drain_close_code: 1012,
            },
            10,
        )
    }

    fn info(id: u64, path: &str) -> ExchangeInfo {
        ExchangeInfo {
            id,
            connection: 100 + id,
            client: "127.0.0.1:1".parse().unwrap(),
            worker: 0,
            path: path.into(),
        }
    }

    fn websocket() -> LiveDetail {
        LiveDetail::WebSocket(LiveWebSocket::default())
    }

    fn http(abort: &Arc<Abort>) -> LiveDetail {
        LiveDetail::Http(LiveHttp::new(hyper::Method::POST, 200, true, abort.clone()))
    }

    #[test]
    fn traffic_is_taken_for_the_shared_counters_exactly_once() {
        let table = table();
        let reg = table.register(info(1, "/ws"), websocket());
        let sent = |n| Counters {
            frames: 1,
            bytes: n,
        };
        reg.entry.update_counters(Side::Client, sent(106));
        // The sweep and the relay's final record may both take: each byte counts once.
        assert_eq!(reg.entry.take_uncounted(Side::Client).bytes, 106);
        assert_eq!(reg.entry.take_uncounted(Side::Client), Counters::default());
        reg.entry.update_counters(Side::Client, sent(150));
        assert_eq!(reg.entry.take_uncounted(Side::Client).bytes, 44);
        assert_eq!(reg.entry.take_uncounted(Side::Backend), Counters::default());
        // A round trip is recorded once, and stays visible to /connections.
        reg.entry
            .ping_rtt(Side::Backend, Duration::from_micros(250));
        assert_eq!(
            reg.entry.take_unrecorded_rtt(Side::Backend),
            Some(Duration::from_micros(250))
        );
        assert_eq!(reg.entry.take_unrecorded_rtt(Side::Backend), None);
        let snap = serde_json::to_value(&table.snapshot(None)[0]).unwrap();
        assert_eq!(snap["backend_ping_rtt_seconds"], 0.00025);
    }

    #[test]
    fn connections_worth_a_look_are_flagged() {
        let table = table();
        let reg = table.register(info(1, "/query"), websocket());
        let c = &reg.entry;
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
        let reg = table.register(info(7, "/ws"), websocket());
        reg.entry.update_counters(
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
        assert_eq!(
            snap[0].client_to_backend.seconds_since_last_frame,
            Some(None)
        );
        reg.entry.ending(Outcome::ClientGone);
        assert_eq!(table.snapshot(None)[0].outcome, Some("client_gone"));
        drop(reg);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_limited_snapshot_shows_flagged_connections_first_then_the_oldest() {
        let table = table();
        let regs: Vec<_> = (1..=5)
            .map(|id| table.register(info(id, "/ws"), websocket()))
            .collect();
        regs[3].entry.ending(Outcome::IdleTimeout); // id 4: flagged "closing"
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

    fn requests(conn: &LiveExchange) -> Option<Requests> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match conn.poll_requests(&mut cx) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    #[test]
    fn close_requests_are_checked_and_delivered() {
        let table = table();
        let reg = table.register(info(1, "/"), websocket());
        assert_eq!(table.close(2, 1000, ""), Err(CloseError::NotFound(2)));
        assert_eq!(table.close(1, 1006, ""), Err(CloseError::BadCode(1006)));
        assert_eq!(
            table.close(1, 4000, &"x".repeat(124)),
            Err(CloseError::ReasonTooLong)
        );
        assert_eq!(requests(&reg.entry), None);
        assert_eq!(table.close(1, 4000, "maintenance"), Ok(()));
        let got = requests(&reg.entry).unwrap();
        assert!(got.close() && !got.shutdown() && !got.force());
        assert_eq!(
            reg.entry.close_request(),
            Some(CloseRequest {
                code: 4000,
                reason: "maintenance".into()
            })
        );
        // Taken once.
        assert_eq!(requests(&reg.entry), None);
    }

    #[test]
    fn a_drain_reaches_open_connections_and_those_that_register_later() {
        let table = table();
        let early = table.register(info(1, "/"), websocket());
        let open = table.begin_drain();
        assert_eq!(open.len(), 1);
        // The drain decides when the open ones close.
        assert_eq!(requests(&early.entry), None);
        open[0].drain_now();
        assert!(requests(&early.entry).unwrap().shutdown());
        let late = table.register(info(2, "/"), websocket());
        assert!(requests(&late.entry).unwrap().shutdown());
        table.force_all();
        assert!(requests(&early.entry).unwrap().force());
        let later = table.register(info(3, "/"), websocket());
        assert!(requests(&later.entry).unwrap().force());
    }

    #[test]
    fn a_reload_reaches_open_relays_and_new_ones_start_with_it() {
        let table = table();
        let open = table.register(info(1, "/"), websocket());
        let mut config = table.config();
        config.max_frame_size = Some(10);
        table.reconfigure(config, 10);
        assert!(requests(&open.entry).unwrap().reconfigure());
        assert_eq!(open.config.max_frame_size, None);
        assert_eq!(
            table
                .register(info(2, "/"), websocket())
                .config
                .max_frame_size,
            Some(10)
        );
    }

    #[tokio::test]
    async fn the_table_says_when_it_is_empty_and_counts_endings() {
        let table = table();
        let a = table.register(info(1, "/"), websocket());
        let b = table.register(info(2, "/"), websocket());
        let waiting = tokio::spawn({
            let table = table.clone();
            async move { table.emptied().await }
        });
        a.ended(&Record::websocket_example(1, Outcome::ClientClose));
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(table.ended(Kind::WebSocket)[Outcome::ClientClose.idx()], 1);
        assert_eq!(table.ended(Kind::WebSocket).iter().sum::<u64>(), 1);
        assert_eq!(table.recent(None, None)[0].id, 1);
        assert_eq!(table.releases(Kind::WebSocket).count, 1);
    }

    #[test]
    fn an_http_stream_is_listed_and_ended_through_its_tasks_abort() {
        let table = table();
        let abort = Arc::new(Abort::default());
        let reg = table.register(info(5, "/api/default/_search_stream"), http(&abort));
        reg.entry.update_counters(
            Side::Backend,
            Counters {
                frames: 7,
                bytes: 300,
            },
        );
        let snap = serde_json::to_value(&table.snapshot(None)[0]).unwrap();
        assert_eq!(snap["kind"], "http");
        assert_eq!(snap["connection"], 105);
        assert_eq!(snap["method"], "POST");
        assert_eq!(snap["status"], 200);
        assert_eq!(snap["event_stream"], true);
        // HTTP has no frames: the field is left out, the bytes are there.
        assert_eq!(snap["backend_to_client"]["bytes"], 300);
        assert!(snap["backend_to_client"].get("frames").is_none(), "{snap}");
        assert_eq!(table.count(Kind::Http), 1);
        assert_eq!(table.count(Kind::WebSocket), 0);
        // An operator's close and the forced end reach the task, the first one wins.
        assert_eq!(table.close(5, 1000, ""), Ok(()));
        table.force_all();
        assert_eq!(abort.cause(), Some(Outcome::AdminClose));
    }
}
