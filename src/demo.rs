//! A built-in demo backend, so that `wsgate demo` shows wsgate doing its job with no
//! other program.
//!
//! The demo backend imitates an observability dashboard, the kind of application this
//! project started from: one HTML page whose panels each run a "query" that streams rows
//! over a WebSocket of its own (20 rows/s for 8 s, then Close 1000 "query complete").
//! The page is loaded through wsgate and its WebSockets go through wsgate too. On each
//! panel the user can end a query the ways real users do:
//!
//! - **Cancel**: `ws.close(1000, "cancelled")`, the proper way;
//! - **Abandon**: the original bug. The page stops listening but keeps the socket open;
//!   the browser still answers pings, so nobody learns anything until the query ends by
//!   itself (wsgate's admin page flags such a connection: a silent client while the
//!   backend keeps sending);
//! - reloading or closing the tab: the browser sends Close 1001;
//! - **Simulate a vanished laptop**: the demo backend itself opens a WebSocket client
//!   to wsgate's proxy address over raw TCP, reads for a second, then goes silent
//!   without closing anything, like a laptop put to sleep. wsgate's unanswered Ping
//!   turns that into Close 1001 "client unresponsive" toward the backend.
//!
//! One more panel queries the way OpenObserve's UI does today, without a WebSocket: a
//! `fetch` of `POST /api/{org}/_search_stream`, answered with a `text/event-stream`
//! (`event: search_response_metadata`, then `search_response_hits` blocks of five hits
//! every period, then `search_response_end`) that the page reads with a ReadableStream
//! reader. *Cancel* aborts the fetch (the browser closes the connection, wsgate releases
//! the backend's); *Abandon* stops reading but keeps the reader and the stream open. The
//! stream's body is fed through a channel by the query's task, so the task learns that
//! the response is gone the moment hyper drops the body (the connection closed, or a
//! write failed): an HTTP stream has no Close frame, and that moment, measured from the
//! last event, is what the backend can know.
//!
//! The point of the page is its event log, "what the backend saw": for each query, how
//! it ended *from the backend's point of view*, with the Close code and reason received
//! (a WebSocket), the time since the query started and the rows sent. Without wsgate a
//! backend behind a generic proxy sees "connection dropped without a Close", or nothing
//! at all until its query is over; with wsgate it sees a Close frame with a code saying
//! why, and a search stream's connection closed as soon as its client left. The same
//! events are logged with `tracing` (target `wsgate::demo`).
//!
//! The server runs on an OS thread of its own with a current-thread tokio runtime (as
//! wsgate's workers do), so it neither competes with wsgate's workers for a runtime nor
//! depends on how the caller runs wsgate. Everything is bounded: connections, queries,
//! simulated laptops, rows, durations, the event log and request bodies.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The page, with `{{PROXY}}`, `{{BACKEND}}` and `{{ADMIN}}` filled in per request.
const PAGE_HTML: &str = include_str!("demo/index.html");
/// The page's script and style, served as files so the CSP needs no 'unsafe-inline'.
const APP_JS: &str = include_str!("demo/app.js");
const APP_CSS: &str = include_str!("demo/app.css");

/// HTTP connections served at once; further ones are closed at accept. The page needs a
/// handful; this only stops a runaway client from exhausting descriptors.
const MAX_CONNECTIONS: usize = 256;
/// Queries (WebSockets and search streams) streaming at once; the next one gets 503.
const MAX_QUERIES: usize = 64;
/// Simulated vanished laptops at once; the next `POST /simulate/vanish` gets 429.
const MAX_LAPTOPS: usize = 8;
/// Events kept for `GET /events`, newest first.
const MAX_EVENTS: usize = 100;
/// Largest request body read: `POST /simulate/vanish` (ignored) and a search request.
const MAX_BODY: usize = 1024;
/// Largest WebSocket message or frame accepted from a client: clients send nothing but
/// control frames, so anything big is not the page.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Bound on reading a request header, on the upgrade completing, on a request body, on
/// the simulated laptop's connect and handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a query waits for the Close reply (or for its own reply to be written).
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// A row (or a search event) that cannot be written for this long means nothing is
/// reading the connection: the query gives up instead of holding its slot forever.
const SEND_STALL: Duration = Duration::from_secs(10);
/// Hits in one `search_response_hits` event; one event per [`Timing::period`].
const HITS_PER_EVENT: u64 = 5;
/// Hits a search returns when its request names no `size` (8 s at the demo's pace),
/// and the most it may ask for (20 s).
const DEFAULT_HITS: u64 = 800;
const MAX_HITS: u64 = 2_000;
/// The search panel's name in the event log.
const SEARCH_PANEL: &str = "search";
/// The services and messages a search's hits are drawn from.
const SEARCH_SERVICES: &[&str] = &["checkout", "payments", "search", "auth", "inventory"];
const SEARCH_MESSAGES: &[&str] = &[
    "upstream request timed out",
    "connection reset by peer",
    "card declined by issuer",
    "token expired",
    "stock level below zero",
    "retry budget exhausted",
];
/// A simulated laptop reads (and answers Pings) for this long before it goes silent.
const LAPTOP_AWAKE: Duration = Duration::from_secs(1);
/// A simulated laptop closes its socket this long after it started, whatever happened:
/// long past any sane liveness timers, short enough not to pile up.
const LAPTOP_LIFETIME: Duration = Duration::from_secs(120);
/// Largest HTTP response head or WebSocket frame the simulated laptop accepts.
const LAPTOP_MAX_READ: usize = 64 * 1024;
/// How long dropping a [`DemoBackend`] waits for its thread to stop.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The panel the simulated laptop queries: a live tail, long enough for wsgate's default
/// liveness timers (20 s ping interval + 10 s pong timeout) to catch the silence first.
const VANISHED_PANEL: &str = "vanished-laptop";

/// What the demo page links to.
#[derive(Clone, Debug)]
pub struct Links {
    /// wsgate's proxy address, which the simulated vanished laptop connects to. It must be
    /// on loopback: the demo never opens connections elsewhere.
    pub proxy: SocketAddr,
    /// wsgate's admin page (e.g. `"http://127.0.0.1:9090/"`), if the admin listener is
    /// on. Only `http://` and `https://` URLs are linked.
    pub admin_page: Option<String>,
}

/// A running demo backend on its own thread and tokio runtime; stopped when dropped.
#[derive(Debug)]
pub struct DemoBackend {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    stopped: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DemoBackend {
    /// Binds 127.0.0.1:0 and starts serving on a thread of its own.
    pub fn start(links: Links) -> std::io::Result<DemoBackend> {
        Self::start_with(links, Timing::DEMO)
    }

    fn start_with(links: Links, timing: Timing) -> std::io::Result<DemoBackend> {
        let std_listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Registering the socket needs the runtime's reactor; doing it here lets `start`
        // report the failure instead of the thread.
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let state = Arc::new(State::new(links, addr, timing));
        let (stop, stop_rx) = oneshot::channel();
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("wsgate-demo".into())
            .spawn(move || {
                runtime.block_on(serve(listener, state, stop_rx));
                // Dropping the runtime drops every connection, query and laptop task.
                runtime.shutdown_timeout(Duration::from_millis(500));
                let _ = stopped_tx.send(());
            })?;
        tracing::info!(target: "wsgate::demo", %addr, "demo backend listening");
        Ok(DemoBackend {
            addr,
            stop: Some(stop),
            stopped,
            thread: Some(thread),
        })
    }

    /// Where it listens (what wsgate's `backend` must point to).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Join only a thread known to have finished, so a drop never hangs; a thread
        // that panicked dropped its sender, which ends the wait too.
        match self.stopped.recv_timeout(STOP_WAIT) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(target: "wsgate::demo", "demo backend thread did not stop in time; left running");
            }
        }
    }
}

/// How fast and how long queries stream. Tests use shorter ones.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// Time between rows of a dashboard panel's query.
    period: Duration,
    /// Rows of a dashboard panel's query.
    rows: u64,
    /// Time between rows of the vanished laptop's live tail.
    tail_period: Duration,
    /// Rows of the live tail.
    tail_rows: u64,
}

impl Timing {
    /// 20 rows/s for 8 s; the live tail 2 rows/s for 100 s. The tail is slow so that its
    /// 200 rows (about 13 KB) fit in the silent laptop's socket buffers: wsgate then
    /// notices the missing Pong, not a stalled write, and the story stays the Ping one.
    /// 100 s outlasts wsgate's default liveness timers (20 s + 10 s) with room to spare
    /// and ends before the laptop's own 120 s bound.
    const DEMO: Timing = Timing {
        period: Duration::from_millis(50),
        rows: 160,
        tail_period: Duration::from_millis(500),
        tail_rows: 200,
    };

    fn for_panel(&self, panel: &Panel) -> (Duration, u64) {
        if panel.name == VANISHED_PANEL {
            (self.tail_period, self.tail_rows)
        } else {
            (self.period, self.rows)
        }
    }
}

/// A query the page can run: what it is called and what its rows look like.
#[derive(Debug)]
struct Panel {
    name: &'static str,
    labels: &'static [&'static str],
    unit: &'static str,
    /// Typical value, and the largest step of its random walk.
    base: f64,
    step: f64,
}

const PANELS: &[Panel] = &[
    Panel {
        name: "errors",
        labels: &["checkout", "payments", "search", "auth", "inventory"],
        unit: "errors/min",
        base: 12.0,
        step: 3.0,
    },
    Panel {
        name: "latency",
        labels: &["/api/search", "/api/cart", "/api/login", "/api/orders"],
        unit: "ms",
        base: 180.0,
        step: 25.0,
    },
    Panel {
        name: "logs",
        labels: &["ingress", "app", "db", "queue"],
        unit: "lines/s",
        base: 1800.0,
        step: 150.0,
    },
    Panel {
        name: VANISHED_PANEL,
        labels: &["tail"],
        unit: "lines/s",
        base: 40.0,
        step: 8.0,
    },
];

fn panel_named(name: &str) -> Option<&'static Panel> {
    PANELS.iter().find(|p| p.name == name)
}

/// The rows of one query: a random walk per label, one label per row in turn.
struct Series {
    panel: &'static Panel,
    values: Vec<f64>,
}

impl Series {
    fn new(panel: &'static Panel) -> Series {
        let mut rng = rand::rng();
        let values = panel
            .labels
            .iter()
            .map(|_| panel.base * rng.random_range(0.4..1.6))
            .collect();
        Series { panel, values }
    }

    fn row(&mut self, seq: u64, elapsed: Duration) -> String {
        let count = self.values.len().max(1);
        let i = usize::try_from(seq).unwrap_or(0) % count;
        let step = self.panel.step;
        let value = self.values.get(i).copied().unwrap_or(self.panel.base)
            + rand::rng().random_range(-step..=step);
        let value = value.clamp(0.0, self.panel.base * 3.0);
        if let Some(v) = self.values.get_mut(i) {
            *v = value;
        }
        serde_json::json!({
            "seq": seq,
            "t_ms": millis(elapsed),
            "label": self.panel.labels.get(i).copied().unwrap_or("?"),
            "value": (value * 10.0).round() / 10.0,
            "unit": self.panel.unit,
        })
        .to_string()
    }
}

/// One entry of "what the backend saw".
#[derive(Clone, Debug, Serialize)]
struct Event {
    /// Increases by one per event, so the page can tell when the log changed.
    seq: u64,
    unix_ms: u64,
    /// The query's id; `None` for the simulated laptop's own events.
    query: Option<u64>,
    panel: &'static str,
    /// How the query streamed: `websocket`, or `sse` (a search stream).
    transport: &'static str,
    /// `started`, `completed`, `client_close`, `client_went_away`,
    /// `client_unresponsive`, `client_stalled`, `dropped`, `stalled`, `error`, or
    /// `laptop_*` for the simulated laptop. A search stream that lost its connection is
    /// `client_went_away` too: without a Close frame, that is all the backend learns.
    kind: &'static str,
    /// The event in one sentence, as the page shows it.
    text: String,
    /// The Close code and reason the backend received, if it received a Close.
    code: Option<u16>,
    reason: Option<String>,
    /// Time from the query's start to the moment the backend learned how it ended.
    after_ms: Option<u64>,
    /// A search stream that lost its client: time from its last event to the moment
    /// the backend learned.
    since_last_event_ms: Option<u64>,
    /// Rows sent (a search stream: hits).
    rows: Option<u64>,
}

impl Event {
    fn new(query: Option<u64>, panel: &'static str, kind: &'static str, text: String) -> Event {
        Event {
            seq: 0,
            unix_ms: 0,
            query,
            panel,
            transport: "websocket",
            kind,
            text,
            code: None,
            reason: None,
            after_ms: None,
            since_last_event_ms: None,
            rows: None,
        }
    }
}

/// What the server's tasks share.
struct State {
    links: Links,
    addr: SocketAddr,
    timing: Timing,
    events: Mutex<VecDeque<Event>>,
    next_seq: AtomicU64,
    next_query: AtomicU64,
    next_laptop: AtomicU64,
    queries: Arc<Semaphore>,
    laptops: Arc<Semaphore>,
}

impl State {
    fn new(links: Links, addr: SocketAddr, timing: Timing) -> State {
        State {
            links,
            addr,
            timing,
            events: Mutex::new(VecDeque::with_capacity(MAX_EVENTS)),
            next_seq: AtomicU64::new(1),
            next_query: AtomicU64::new(1),
            next_laptop: AtomicU64::new(1),
            queries: Arc::new(Semaphore::new(MAX_QUERIES)),
            laptops: Arc::new(Semaphore::new(MAX_LAPTOPS)),
        }
    }

    /// Logs the event and keeps it for `/events`.
    fn record(&self, mut event: Event) {
        event.seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        event.unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, millis);
        tracing::info!(
            target: "wsgate::demo",
            query = event.query,
            panel = event.panel,
            transport = event.transport,
            outcome = event.kind,
            code = event.code,
            reason = event.reason.as_deref(),
            after_ms = event.after_ms,
            since_last_event_ms = event.since_last_event_ms,
            rows = event.rows,
            "{}",
            event.text
        );
        // A poisoned lock only means another task panicked mid-push; the deque is intact.
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.push_front(event);
        events.truncate(MAX_EVENTS);
    }

    fn events_json(&self) -> Vec<u8> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::to_vec(&*events).unwrap_or_else(|_| b"[]".to_vec())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Accepts connections until `stop` fires (or its sender is dropped).
async fn serve(listener: TcpListener, state: Arc<State>, mut stop: oneshot::Receiver<()>) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, usually: wait a little rather than spin.
                tracing::warn!(target: "wsgate::demo", error = %e, "demo backend accept failed");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue; // dropping the stream closes it
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, state.clone(), permit));
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<State>, _permit: OwnedSemaphorePermit) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(&state, req).await) }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

type Resp = Response<DemoBody>;

/// A response body: an answer whole at once, or a search stream fed piece by piece by
/// its query's task through a channel. hyper drops the body when the connection ends
/// (the client closed it, or a write failed), and with it the channel's receiver: the
/// task's sender learns at once ([`mpsc::Sender::closed`]).
enum DemoBody {
    Full(Full<Bytes>),
    /// `None` once the stream ended cleanly.
    Stream(Option<mpsc::Receiver<Piece>>),
}

/// What a search's task sends its response body.
#[derive(Debug)]
enum Piece {
    /// The next event(s) of the stream.
    Data(Bytes),
    /// The response is whole: end it cleanly (the last chunk).
    End,
}

/// A search stream whose task went away without [`Piece::End`]: hyper cuts the
/// response short (no last chunk) instead of ending it as if it were whole.
#[derive(Debug, thiserror::Error)]
#[error("the search stopped before its end")]
struct Unfinished;

impl hyper::body::Body for DemoBody {
    type Data = Bytes;
    type Error = Unfinished;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Unfinished>>> {
        match self.get_mut() {
            DemoBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|never| match never {}))),
            DemoBody::Stream(stream) => {
                let Some(rx) = stream else {
                    return Poll::Ready(None);
                };
                rx.poll_recv(cx).map(|piece| match piece {
                    Some(Piece::Data(bytes)) => Some(Ok(Frame::data(bytes))),
                    Some(Piece::End) => {
                        *stream = None;
                        None
                    }
                    None => Some(Err(Unfinished)),
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DemoBody::Full(full) => full.is_end_stream(),
            DemoBody::Stream(stream) => stream.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DemoBody::Full(full) => full.size_hint(),
            DemoBody::Stream(_) => SizeHint::default(),
        }
    }
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (path.as_str(), method) {
        ("/", Method::GET) => page(state, req.headers()),
        ("/app.js", Method::GET) => asset(APP_JS, "text/javascript; charset=utf-8", req.headers()),
        ("/app.css", Method::GET) => asset(APP_CSS, "text/css; charset=utf-8", req.headers()),
        ("/events", Method::GET) => {
            let mut r = respond(StatusCode::OK, "application/json", state.events_json());
            no_store(&mut r);
            r
        }
        ("/simulate/vanish", Method::POST) => simulate_vanish(state, req).await,
        ("/query", Method::GET) => query(state, req),
        (p, Method::POST) if search_org(p).is_some() => search_stream(state, req).await,
        (p, _) if search_org(p).is_some() => method_not_allowed("POST"),
        ("/favicon.ico", Method::GET) => respond(StatusCode::NO_CONTENT, "text/plain", ""),
        ("/" | "/app.js" | "/app.css" | "/events" | "/query", _) => method_not_allowed("GET"),
        ("/simulate/vanish", _) => method_not_allowed("POST"),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n",
        ),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(DemoBody::Full(Full::new(body.into())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Resp {
    let mut r = respond(status, "application/json", value.to_string());
    no_store(&mut r);
    r
}

fn no_store(r: &mut Resp) {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = respond(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain; charset=utf-8",
        "method not allowed\n",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The page's Content-Security-Policy: only the demo's own files, no inline code.
/// `connect-src 'self'` covers the page's WebSockets in current browsers; the explicit
/// `ws://` and `wss://` sources for the request's own host cover older ones.
fn csp(headers: &HeaderMap) -> String {
    let mut connect = String::from("'self'");
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    // Only characters a host and port can contain, so nothing can add a directive.
    if let Some(host) = host.filter(|h| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    }) {
        connect.push_str(&format!(" ws://{host} wss://{host}"));
    }
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

fn with_csp(mut r: Resp, headers: &HeaderMap) -> Resp {
    if let Ok(v) = HeaderValue::from_str(&csp(headers)) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn asset(body: &'static str, content_type: &'static str, headers: &HeaderMap) -> Resp {
    let mut r = respond(StatusCode::OK, content_type, body);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_csp(r, headers)
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(state: &State, headers: &HeaderMap) -> Resp {
    let admin = match state
        .links
        .admin_page
        .as_deref()
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
    {
        Some(url) => format!(
            "wsgate's admin page: <a href=\"{u}\" target=\"_blank\" rel=\"noopener\">{u}</a>. \
             Each ending shows up there with its outcome and release time.",
            u = escape_html(url)
        ),
        None => "wsgate's admin listener is off, so there is no admin page to link to; \
                 wsgate still logs one line per ended connection with its outcome and release time."
            .to_string(),
    };
    // {{ADMIN}} last: a URL containing another placeholder stays as it is.
    let html = PAGE_HTML
        .replace("{{PROXY}}", &escape_html(&state.links.proxy.to_string()))
        .replace("{{BACKEND}}", &escape_html(&state.addr.to_string()))
        .replace("{{ADMIN}}", &admin);
    let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", html);
    no_store(&mut r);
    with_csp(r, headers)
}

/// `POST /simulate/vanish`: starts a simulated laptop that connects through wsgate and
/// goes silent.
async fn simulate_vanish(state: &Arc<State>, req: Request<Incoming>) -> Resp {
    if !is_json(req.headers()) {
        return json(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            serde_json::json!({"error": "send Content-Type: application/json"}),
        );
    }
    let proxy = state.links.proxy;
    if !proxy.ip().is_loopback() {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": format!(
                "wsgate's proxy address {proxy} is not on loopback; the demo only connects to loopback"
            )}),
        );
    }
    match timeout(
        HANDSHAKE_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": format!("body unreadable or over {MAX_BODY} bytes")}),
            );
        }
        Err(_) => {
            return json(
                StatusCode::REQUEST_TIMEOUT,
                serde_json::json!({"error": "body not received in time"}),
            );
        }
    }
    let Ok(permit) = state.laptops.clone().try_acquire_owned() else {
        return json(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"error": format!(
                "{MAX_LAPTOPS} simulated laptops are already asleep; each closes its socket within {} s",
                LAPTOP_LIFETIME.as_secs()
            )}),
        );
    };
    let n = state.next_laptop.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(vanished_laptop(state.clone(), n, permit));
    json(
        StatusCode::ACCEPTED,
        serde_json::json!({
            "laptop": n,
            "message": format!(
                "Simulated laptop #{n} is opening a live-tail query through wsgate ({proxy}); \
                 it goes silent after {} s. Watch the event log for how the backend learns.",
                LAPTOP_AWAKE.as_secs()
            ),
        }),
    )
}

/// Whether the request says its body is JSON. A JSON content type cannot be sent
/// cross-site without a CORS preflight, which this server never grants: another site
/// open in the browser cannot start a simulated laptop or a search.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"))
}

/// Whether `Origin`, if present, names the host the request was sent to: another site
/// open in the browser may not run queries.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true; // not a browser
    };
    let origin = origin.to_str().unwrap_or("");
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

/// `GET /query?panel=NAME`: the WebSocket handshake, then the query on its own task.
fn query(state: &Arc<State>, mut req: Request<Incoming>) -> Resp {
    let text = "text/plain; charset=utf-8";
    let name = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("panel="))
        .unwrap_or("");
    let Some(panel) = panel_named(name) else {
        return respond(StatusCode::BAD_REQUEST, text, "unknown panel\n");
    };
    let headers = req.headers();
    if !crate::headers::has_token(headers, header::UPGRADE, "websocket")
        || !crate::headers::has_token(headers, header::CONNECTION, "upgrade")
    {
        return respond(
            StatusCode::BAD_REQUEST,
            text,
            "this is a WebSocket endpoint: send an Upgrade: websocket request\n",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = respond(
            StatusCode::UPGRADE_REQUIRED,
            text,
            "only WebSocket version 13\n",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    // A key is 16 random bytes in base64: 24 characters.
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| k.len() == 24)
    else {
        return respond(
            StatusCode::BAD_REQUEST,
            text,
            "missing or malformed Sec-WebSocket-Key\n",
        );
    };
    if !same_origin(headers) {
        return respond(StatusCode::FORBIDDEN, text, "Origin does not match Host\n");
    }
    let Ok(permit) = state.queries.clone().try_acquire_owned() else {
        let mut r = respond(
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "too many queries running\n",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, text, "accept key\n");
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let id = state.next_query.fetch_add(1, Ordering::Relaxed);
    let state = state.clone();
    tokio::spawn(async move {
        let _permit = permit;
        // The upgrade completes once the 101 is written; a client gone before that is
        // not a query.
        let Ok(Ok(upgraded)) = timeout(HANDSHAKE_TIMEOUT, upgrade).await else {
            return;
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_CLIENT_MESSAGE))
            .max_frame_size(Some(MAX_CLIENT_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        run_query(&state, id, panel, ws).await;
    });
    let mut r = respond(StatusCode::SWITCHING_PROTOCOLS, text, "");
    let h = r.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    r
}

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// How a query ended, as the backend learned it.
#[derive(Debug)]
enum End {
    /// Every row was sent and the backend sent Close 1000 "query complete"; with what
    /// came back.
    Completed(Reply),
    /// The client (or wsgate on its behalf) sent a Close frame.
    ClientClose(Option<CloseFrame>),
    /// The TCP stream ended or failed without a Close frame.
    Dropped(Option<String>),
    /// Rows could not be written for [`SEND_STALL`].
    Stalled,
    /// The client broke the protocol.
    Error(String),
}

/// What followed the backend's own Close.
#[derive(Debug)]
enum Reply {
    Answered,
    Dropped,
    Silent,
}

impl End {
    fn from_error(e: WsError) -> End {
        match e {
            WsError::ConnectionClosed | WsError::AlreadyClosed => End::Dropped(None),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Dropped(None),
            WsError::Io(e) => End::Dropped(Some(e.to_string())),
            e => End::Error(e.to_string()),
        }
    }
}

/// Streams the panel's rows until they are all sent or the client goes, and records how
/// it went. The Close from the client is noticed between two rows at the latest: the
/// loop waits on the row timer and on the stream at once.
async fn run_query(state: &State, id: u64, panel: &'static Panel, mut ws: Ws) {
    let started = Instant::now();
    let (period, total) = state.timing.for_panel(panel);
    let mut event = Event::new(
        Some(id),
        panel.name,
        "started",
        format!(
            "query started: {total} rows, one every {} ms",
            period.as_millis()
        ),
    );
    event.rows = Some(0);
    state.record(event);
    let mut series = Series::new(panel);
    let mut rows = 0u64;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (end, learned) = loop {
        tokio::select! {
            message = ws.next() => match message {
                // Pings are answered by tungstenite on the next write or read; the page
                // sends nothing else that matters.
                Some(Ok(Message::Close(frame))) => {
                    let learned = started.elapsed();
                    // Keep reading so tungstenite writes the reply Close; it then
                    // reports the end of the stream.
                    let _ = timeout(CLOSE_WAIT, async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    break (End::ClientClose(frame), learned);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break (End::from_error(e), started.elapsed()),
                None => break (End::Dropped(None), started.elapsed()),
            },
            _ = tick.tick() => {
                if rows >= total {
                    let learned = started.elapsed();
                    break (End::Completed(complete(&mut ws).await), learned);
                }
                let row = series.row(rows, started.elapsed());
                match timeout(SEND_STALL, ws.send(Message::text(row))).await {
                    Ok(Ok(())) => rows += 1,
                    Ok(Err(e)) => break (End::from_error(e), started.elapsed()),
                    Err(_) => break (End::Stalled, started.elapsed()),
                }
            }
        }
    };
    state.record(describe(id, panel, end, learned, rows));
}

/// Sends Close 1000 "query complete" and waits, bounded, for the reply.
async fn complete(ws: &mut Ws) -> Reply {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: Utf8Bytes::from_static("query complete"),
    };
    match timeout(CLOSE_WAIT, ws.close(Some(frame))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Reply::Dropped,
        Err(_) => return Reply::Silent,
    }
    let reply = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => return Reply::Answered,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Reply::Dropped,
            }
        }
    };
    timeout(CLOSE_WAIT, reply).await.unwrap_or(Reply::Silent)
}

/// The event for a query's end: its kind and sentence, from the backend's side.
fn describe(id: u64, panel: &'static Panel, end: End, learned: Duration, rows: u64) -> Event {
    let after = secs(learned);
    let sent = format!("({rows} rows sent)");
    let mut code = None;
    let mut reason = None;
    let (kind, text) = match end {
        End::Completed(reply) => {
            code = Some(1000);
            reason = Some("query complete".to_string());
            let reply = match reply {
                Reply::Answered => "the client answered the Close".to_string(),
                Reply::Dropped => "then the connection dropped without a Close reply".to_string(),
                Reply::Silent => format!("no Close reply came within {} s", CLOSE_WAIT.as_secs()),
            };
            (
                "completed",
                format!("completed: all {rows} rows sent after {after}; {reply}"),
            )
        }
        End::ClientClose(None) => (
            "client_close",
            format!("client closed without a code after {after} {sent}"),
        ),
        End::ClientClose(Some(frame)) => {
            let c = u16::from(frame.code);
            let r = frame.reason.as_str().to_string();
            let shown = if r.is_empty() {
                format!("{c} (no reason)")
            } else {
                format!("{c} \"{r}\"")
            };
            let (kind, text) = if c == 1001 && r.contains("unresponsive") {
                (
                    "client_unresponsive",
                    format!("client unresponsive: Close {shown} after {after} {sent}"),
                )
            } else if c == 1001 && r.contains("stopped reading") {
                (
                    "client_stalled",
                    format!("client stopped reading: Close {shown} after {after} {sent}"),
                )
            } else if c == 1001 {
                (
                    "client_went_away",
                    format!("client went away: Close {shown} after {after} {sent}"),
                )
            } else {
                (
                    "client_close",
                    format!("client closed with {shown} after {after} {sent}"),
                )
            };
            code = Some(c);
            reason = Some(r);
            (kind, text)
        }
        End::Dropped(why) => (
            "dropped",
            match why {
                Some(why) => {
                    format!("connection dropped without a Close ({why}) after {after} {sent}")
                }
                None => format!("connection dropped without a Close after {after} {sent}"),
            },
        ),
        End::Stalled => (
            "stalled",
            format!(
                "writes stalled for {} s: nothing took the rows; gave up after {after} {sent}",
                SEND_STALL.as_secs()
            ),
        ),
        End::Error(e) => (
            "error",
            format!("protocol error from the client ({e}) after {after} {sent}"),
        ),
    };
    let mut event = Event::new(Some(id), panel.name, kind, text);
    event.code = code;
    event.reason = reason;
    event.after_ms = Some(millis(learned));
    event.rows = Some(rows);
    event
}

/// The organisation in `/api/{org}/_search_stream`, if that is the path.
fn search_org(path: &str) -> Option<&str> {
    let org = path
        .strip_prefix("/api/")?
        .strip_suffix("/_search_stream")?;
    let valid = !org.is_empty()
        && org.len() <= 64
        && org
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    valid.then_some(org)
}

/// What a search asked for.
#[derive(Debug)]
struct Search {
    org: String,
    sql: String,
    /// Hits to send.
    size: u64,
}

impl Search {
    /// Reads a search request's body, `{"query": {"sql": "...", "size": 800}}` (both
    /// fields optional, as is the body).
    fn parse(org: &str, body: &[u8]) -> Result<Search, String> {
        let value: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
            serde_json::json!({})
        } else {
            serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?
        };
        if !value.is_object() {
            return Err("expected a JSON object: {\"query\": {\"sql\": \"...\"}}".into());
        }
        let query = value.get("query").unwrap_or(&serde_json::Value::Null);
        let sql = query
            .get("sql")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("SELECT * FROM \"default\"");
        let size = match query.get("size") {
            None | Some(serde_json::Value::Null) => DEFAULT_HITS,
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=MAX_HITS).contains(n))
                .ok_or_else(|| format!("size: a whole number of hits from 1 to {MAX_HITS}"))?,
        };
        Ok(Search {
            org: org.to_string(),
            sql: sql.chars().take(200).collect(),
            size,
        })
    }
}

/// `POST /api/{org}/_search_stream`: a search answered as a `text/event-stream`, the way
/// OpenObserve streams search results; its events come from a task of its own.
async fn search_stream(state: &Arc<State>, req: Request<Incoming>) -> Resp {
    let org = search_org(req.uri().path())
        .unwrap_or("default")
        .to_string();
    if !is_json(req.headers()) {
        return json(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            serde_json::json!({"error": "send Content-Type: application/json"}),
        );
    }
    if !same_origin(req.headers()) {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "Origin does not match Host"}),
        );
    }
    let body = match timeout(
        HANDSHAKE_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(_)) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": format!("body unreadable or over {MAX_BODY} bytes")}),
            );
        }
        Err(_) => {
            return json(
                StatusCode::REQUEST_TIMEOUT,
                serde_json::json!({"error": "body not received in time"}),
            );
        }
    };
    let search = match Search::parse(&org, &body) {
        Ok(search) => search,
        Err(why) => return json(StatusCode::BAD_REQUEST, serde_json::json!({"error": why})),
    };
    let Ok(permit) = state.queries.clone().try_acquire_owned() else {
        let mut r = json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "too many queries running"}),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let id = state.next_query.fetch_add(1, Ordering::Relaxed);
    // Room for one piece: the task hands over an event only once hyper took the one
    // before, so a client that stops reading holds the task back (and [`SEND_STALL`]
    // ends it), and a dropped body is noticed by the next send at the latest.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(run_search(state.clone(), id, search, tx, permit));
    let mut r = Response::new(DemoBody::Stream(Some(rx)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// How a search stream ended, as the backend learned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SearchEnd {
    /// Every hit and the end event were handed to the response, which then ended.
    Completed,
    /// The response body was dropped before its end: its connection closed, or a
    /// write to it failed.
    Gone,
    /// An event could not be handed over for [`SEND_STALL`].
    Stalled,
}

/// Hands `piece` to the response body, waiting at most [`SEND_STALL`] for room.
async fn send_piece(tx: &mpsc::Sender<Piece>, piece: Piece) -> Result<(), SearchEnd> {
    match timeout(SEND_STALL, tx.send(piece)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(SearchEnd::Gone),
        Err(_) => Err(SearchEnd::Stalled),
    }
}

/// One block of an event stream: `event: KIND`, `data: JSON`, an empty line.
fn sse_event(kind: &str, data: &serde_json::Value) -> Piece {
    Piece::Data(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")))
}

/// The `search_response_hits` event with hits `from..from + n` of `total`.
fn hits_event(from: u64, n: u64, total: u64) -> Piece {
    let mut rng = rand::rng();
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let pick = |list: &[&'static str], i: usize| list.get(i).copied().unwrap_or("?");
    let hits: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let service = pick(SEARCH_SERVICES, rng.random_range(0..SEARCH_SERVICES.len()));
            let message = pick(SEARCH_MESSAGES, rng.random_range(0..SEARCH_MESSAGES.len()));
            serde_json::json!({
                "_timestamp": now_us.saturating_sub((n - i) * 1_000),
                "service": service,
                "level": "error",
                "message": message,
                "duration_ms": rng.random_range(5..2_000),
            })
        })
        .collect();
    sse_event(
        "search_response_hits",
        &serde_json::json!({
            "hits": hits,
            "from": from,
            "total": total,
            "progress": (from + n) * 100 / total.max(1),
        }),
    )
}

/// Streams a search's events until they are all sent or its response is gone, and
/// records how it went. The response being dropped is noticed while the task waits for
/// its next event ([`mpsc::Sender::closed`]), not only when that event is sent.
async fn run_search(
    state: Arc<State>,
    id: u64,
    search: Search,
    tx: mpsc::Sender<Piece>,
    _permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let period = state.timing.period;
    let mut event = Event::new(
        Some(id),
        SEARCH_PANEL,
        "started",
        format!(
            "search stream started (POST /api/{}/_search_stream): {} hits, {HITS_PER_EVENT} \
             per event, one event every {} ms",
            search.org,
            search.size,
            period.as_millis()
        ),
    );
    event.transport = "sse";
    event.rows = Some(0);
    state.record(event);
    let mut hits = 0u64;
    // When the last event was handed to the response, from the start.
    let mut last_event = Duration::ZERO;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let metadata = sse_event(
        "search_response_metadata",
        &serde_json::json!({"org": search.org, "sql": search.sql, "size": search.size}),
    );
    let end = 'stream: {
        if let Err(end) = send_piece(&tx, metadata).await {
            break 'stream end;
        }
        last_event = started.elapsed();
        loop {
            tokio::select! {
                () = tx.closed() => break 'stream SearchEnd::Gone,
                _ = tick.tick() => {
                    let n = HITS_PER_EVENT.min(search.size - hits);
                    let last = n == 0;
                    let piece = if last {
                        let took = millis(started.elapsed());
                        sse_event(
                            "search_response_end",
                            &serde_json::json!({"total": hits, "took_ms": took}),
                        )
                    } else {
                        hits_event(hits, n, search.size)
                    };
                    if let Err(end) = send_piece(&tx, piece).await {
                        break 'stream end;
                    }
                    hits += n;
                    last_event = started.elapsed();
                    if last {
                        break 'stream match send_piece(&tx, Piece::End).await {
                            Ok(()) => SearchEnd::Completed,
                            Err(end) => end,
                        };
                    }
                }
            }
        }
    };
    let learned = started.elapsed();
    state.record(describe_search(
        id,
        end,
        learned,
        learned.saturating_sub(last_event),
        hits,
    ));
}

/// The event for a search stream's end: its kind and sentence, from the backend's side.
fn describe_search(
    id: u64,
    end: SearchEnd,
    learned: Duration,
    since_last_event: Duration,
    hits: u64,
) -> Event {
    let after = secs(learned);
    let (kind, text) = match end {
        SearchEnd::Completed => (
            "completed",
            format!("completed: all {hits} hits and the end event sent after {after}"),
        ),
        SearchEnd::Gone => (
            "client_went_away",
            format!(
                "client went away (connection closed) after {after}, {} ms after the last \
                 event ({hits} hits sent)",
                millis(since_last_event)
            ),
        ),
        SearchEnd::Stalled => (
            "stalled",
            format!(
                "writes stalled for {} s: nothing took the events; gave up after {after} \
                 ({hits} hits sent)",
                SEND_STALL.as_secs()
            ),
        ),
    };
    let mut event = Event::new(Some(id), SEARCH_PANEL, kind, text);
    event.transport = "sse";
    event.after_ms = Some(millis(learned));
    event.since_last_event_ms = (end == SearchEnd::Gone).then(|| millis(since_last_event));
    event.rows = Some(hits);
    event
}

/// A simulated laptop: a raw WebSocket client to wsgate that behaves for a second, then
/// goes silent without closing anything (no Close, no FIN), and closes its socket only
/// at [`LAPTOP_LIFETIME`]. Holds `permit` (one of [`MAX_LAPTOPS`]) throughout.
async fn vanished_laptop(state: Arc<State>, n: u64, _permit: OwnedSemaphorePermit) {
    let deadline = Instant::now() + LAPTOP_LIFETIME;
    let proxy = state.links.proxy;
    let laptop_event = |kind, text: String| {
        state.record(Event::new(None, VANISHED_PANEL, kind, text));
    };
    let (mut stream, rest) = match timeout(HANDSHAKE_TIMEOUT, laptop_handshake(proxy)).await {
        Ok(Ok(connected)) => connected,
        Ok(Err(why)) => {
            laptop_event(
                "laptop_failed",
                format!(
                    "simulated laptop #{n}: could not open its query through wsgate ({proxy}): {why}"
                ),
            );
            return;
        }
        Err(_) => {
            laptop_event(
                "laptop_failed",
                format!(
                    "simulated laptop #{n}: no WebSocket handshake from wsgate ({proxy}) within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            );
            return;
        }
    };
    laptop_event(
        "laptop_connected",
        format!(
            "simulated laptop #{n}: connected through wsgate; reading and answering Pings for {} s",
            LAPTOP_AWAKE.as_secs()
        ),
    );
    match laptop_awake(&mut stream, rest).await {
        Ok(frames) => laptop_event(
            "laptop_silent",
            format!(
                "simulated laptop #{n}: asleep after {frames} frames: it reads nothing more and \
                 answers no Ping; its socket stays open, no FIN"
            ),
        ),
        Err(why) => {
            laptop_event(
                "laptop_closed",
                format!("simulated laptop #{n}: its connection ended while it was awake: {why}"),
            );
            return;
        }
    }
    // The laptop sleeps: the socket stays open, unread, until the bound.
    tokio::time::sleep_until(deadline).await;
    drop(stream);
    laptop_event(
        "laptop_closed",
        format!(
            "simulated laptop #{n}: closed its socket at its {} s bound",
            LAPTOP_LIFETIME.as_secs()
        ),
    );
}

/// Connects to wsgate and does the client handshake for the live tail; returns the
/// stream and any bytes read past the 101 head.
async fn laptop_handshake(proxy: SocketAddr) -> Result<(TcpStream, Vec<u8>), String> {
    let mut stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let key = generate_key();
    let request = format!(
        "GET /query?panel={VANISHED_PANEL} HTTP/1.1\r\nHost: {proxy}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\nUser-Agent: wsgate-demo (simulated laptop)\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let expected = derive_accept_key(key.as_bytes());
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before answering the handshake".into());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let code = response.code.unwrap_or(0);
                if code != 101 {
                    return Err(format!("answered {code} instead of 101"));
                }
                let accepted = response.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("sec-websocket-accept")
                        && h.value == expected.as_bytes()
                });
                if !accepted {
                    return Err("wrong Sec-WebSocket-Accept".into());
                }
                let rest = buf.get(len..).unwrap_or_default().to_vec();
                return Ok((stream, rest));
            }
            Ok(httparse::Status::Partial) if buf.len() <= LAPTOP_MAX_READ => {}
            Ok(httparse::Status::Partial) => return Err("response head too large".into()),
            Err(e) => return Err(format!("bad response head: {e}")),
        }
    }
}

/// One frame from the server: its opcode, payload and length on the wire.
struct ServerFrame {
    opcode: u8,
    payload: Vec<u8>,
    len: usize,
}

/// Parses the frame at the start of `buf`; `Ok(None)` if it is not all there yet.
fn parse_frame(buf: &[u8]) -> Result<Option<ServerFrame>, String> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    let short = u64::from(b1 & 0x7f);
    let (payload_len, mut at) = match short {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (n, 2),
    };
    let payload_len = usize::try_from(payload_len)
        .ok()
        .filter(|&n| n <= LAPTOP_MAX_READ)
        .ok_or_else(|| format!("a frame of {payload_len} bytes is more than a tail row"))?;
    // Servers do not mask, but a masked frame is still readable.
    let mask = if b1 & 0x80 != 0 {
        let Some(m) = buf
            .get(at..at + 4)
            .and_then(|m| <[u8; 4]>::try_from(m).ok())
        else {
            return Ok(None);
        };
        at += 4;
        Some(m)
    } else {
        None
    };
    let Some(payload) = buf.get(at..at + payload_len) else {
        return Ok(None);
    };
    let mut payload = payload.to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Ok(Some(ServerFrame {
        opcode: b0 & 0x0f,
        payload,
        len: at + payload_len,
    }))
}

/// A masked client frame (RFC 6455 §5.3: clients mask everything).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let payload = payload.get(..125).unwrap_or(payload); // control frames carry ≤ 125
    let mask: [u8; 4] = rand::random();
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | opcode);
    frame.push(0x80 | u8::try_from(payload.len()).unwrap_or(125));
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The laptop's waking second: reads frames and answers Pings like a browser would.
/// Returns how many frames it read, or why the connection ended meanwhile.
async fn laptop_awake(stream: &mut TcpStream, mut buf: Vec<u8>) -> Result<u64, String> {
    let until = Instant::now() + LAPTOP_AWAKE;
    let mut frames = 0u64;
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(frame) = parse_frame(&buf)? {
            buf.drain(..frame.len);
            frames += 1;
            match frame.opcode {
                0x9 => {
                    let pong = client_frame(0xA, &frame.payload);
                    match timeout_at(until, stream.write_all(&pong)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(format!("write: {e}")),
                        Err(_) => return Ok(frames),
                    }
                }
                0x8 => return Err("wsgate sent a Close".into()),
                _ => {}
            }
        }
        match timeout_at(until, stream.read(&mut chunk)).await {
            Err(_) => return Ok(frames),
            Ok(Ok(0)) => return Err("the connection was closed".into()),
            Ok(Ok(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(Err(e)) => return Err(format!("read: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    use tokio_tungstenite::connect_async;

    /// Bound on any single wait: it turns a hang into a failure, never decides an outcome.
    const LIMIT: Duration = Duration::from_secs(10);

    async fn within<F: Future>(f: F) -> F::Output {
        timeout(LIMIT, f).await.expect("timed out")
    }

    /// Short queries, so that completing one takes a tenth of a second.
    const FAST: Timing = Timing {
        period: Duration::from_millis(5),
        rows: 20,
        tail_period: Duration::from_millis(5),
        tail_rows: 20,
    };

    fn links(proxy: SocketAddr, admin: Option<&str>) -> Links {
        Links {
            proxy,
            admin_page: admin.map(str::to_string),
        }
    }

    /// An address where nothing listens, for tests that never simulate a laptop.
    fn nowhere() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// One HTTP/1.1 request on a fresh connection; the status, the head and the body.
    async fn http(addr: SocketAddr, head: &str, body: &str) -> (u16, String, String) {
        let mut s = within(TcpStream::connect(addr)).await.unwrap();
        let request = format!(
            "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        within(s.write_all(request.as_bytes())).await.unwrap();
        let mut raw = Vec::new();
        within(s.read_to_end(&mut raw)).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        http(addr, &format!("GET {path} HTTP/1.1"), "").await
    }

    async fn vanish(addr: SocketAddr) -> (u16, serde_json::Value) {
        let (status, _, body) = http(
            addr,
            "POST /simulate/vanish HTTP/1.1\r\nContent-Type: application/json",
            "{}",
        )
        .await;
        (status, serde_json::from_str(&body).unwrap())
    }

    /// Polls `/events` until one satisfies `pred` (bounded by [`LIMIT`]).
    async fn event(
        addr: SocketAddr,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        within(async {
            loop {
                let (status, _, body) = get(addr, "/events").await;
                assert_eq!(status, 200);
                let events: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
                if let Some(e) = events.into_iter().find(|e| pred(e)) {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    fn header<'a>(head: &'a str, name: &str) -> &'a str {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {head}"))
    }

    #[tokio::test]
    async fn page_and_assets_are_served_with_their_types_and_csp() {
        let demo = DemoBackend::start(links(nowhere(), Some("http://127.0.0.1:9090/"))).unwrap();
        let addr = demo.addr();
        let (status, head, page) = get(addr, "/").await;
        assert_eq!(status, 200);
        assert_eq!(header(&head, "content-type"), "text/html; charset=utf-8");
        let csp = header(&head, "content-security-policy");
        assert!(csp.starts_with("default-src 'self';"), "{csp}");
        assert!(
            csp.contains(&format!("connect-src 'self' ws://{addr} wss://{addr};")),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        // Nothing the CSP would block: no inline script, style or handler.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains("<script src=\"/app.js\" defer></script>"));
        assert!(page.contains("<link rel=\"stylesheet\" href=\"/app.css\">"));
        assert!(!page.contains(" style=") && !page.contains(" onclick="));
        assert!(page.contains("<a href=\"http://127.0.0.1:9090/\""));
        assert!(page.contains(&format!("demo backend {addr}")));
        assert!(!page.contains("{{"), "a placeholder left");
        for (path, kind, text) in [
            ("/app.js", "text/javascript; charset=utf-8", APP_JS),
            ("/app.css", "text/css; charset=utf-8", APP_CSS),
        ] {
            let (status, head, body) = get(addr, path).await;
            assert_eq!(status, 200, "{path}");
            assert_eq!(header(&head, "content-type"), kind);
            assert!(header(&head, "content-security-policy").starts_with("default-src 'self';"));
            assert_eq!(body, text);
        }
        // Self-contained: no other origin is referenced, and the whole is small.
        for asset in [PAGE_HTML, APP_JS, APP_CSS] {
            assert!(
                !asset.contains("http://")
                    && !asset.contains("https://")
                    && !asset.contains("//fonts")
            );
        }
        assert!(PAGE_HTML.len() + APP_JS.len() + APP_CSS.len() < 25_000);
    }

    #[tokio::test]
    async fn admin_link_is_escaped_or_explained_when_absent() {
        let demo = DemoBackend::start(links(
            nowhere(),
            Some("http://x/\"><script>alert(1)</script>"),
        ))
        .unwrap();
        let (_, _, page) = get(demo.addr(), "/").await;
        assert!(page.contains("href=\"http://x/&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\""));
        assert_eq!(page.matches("<script").count(), 1);
        let demo = DemoBackend::start(links(nowhere(), Some("javascript:alert(1)"))).unwrap();
        let (_, _, page) = get(demo.addr(), "/").await;
        assert!(!page.contains("javascript:") && page.contains("admin listener is off"));
        let demo = DemoBackend::start(links(nowhere(), None)).unwrap();
        let (_, _, page) = get(demo.addr(), "/").await;
        assert!(page.contains("admin listener is off"));
    }

    #[tokio::test]
    async fn bad_requests_get_clear_answers() {
        let demo = DemoBackend::start(links(nowhere(), None)).unwrap();
        let addr = demo.addr();
        assert_eq!(get(addr, "/query?panel=nope").await.0, 400);
        assert_eq!(get(addr, "/query?panel=errors").await.0, 400);
        let old = "GET /query?panel=errors HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8";
        assert_eq!(http(addr, old, "").await.0, 426);
        let cross = "GET /query?panel=errors HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                     Origin: http://elsewhere.example";
        assert_eq!(http(addr, cross, "").await.0, 403);
        assert_eq!(get(addr, "/nope").await.0, 404);
        assert_eq!(http(addr, "POST / HTTP/1.1", "").await.0, 405);
        assert_eq!(get(addr, "/simulate/vanish").await.0, 405);
        let plain = "POST /simulate/vanish HTTP/1.1\r\nContent-Type: text/plain";
        assert_eq!(http(addr, plain, "{}").await.0, 415);
        let big = "x".repeat(MAX_BODY + 1);
        let json = "POST /simulate/vanish HTTP/1.1\r\nContent-Type: application/json";
        assert_eq!(http(addr, json, &big).await.0, 413);
    }

    #[tokio::test]
    async fn a_query_streams_rows_then_ends_with_1000_and_is_recorded_completed() {
        let demo = DemoBackend::start_with(links(nowhere(), None), FAST).unwrap();
        let addr = demo.addr();
        let url = format!("ws://{addr}/query?panel=latency");
        let (mut ws, _) = within(connect_async(url)).await.unwrap();
        let mut rows = 0;
        let close = loop {
            match within(ws.next()).await.unwrap().unwrap() {
                Message::Text(t) => {
                    let row: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(row["seq"], rows);
                    assert!(row["label"].as_str().unwrap().starts_with("/api/"));
                    assert!(row["value"].as_f64().unwrap() >= 0.0);
                    rows += 1;
                }
                Message::Close(frame) => break frame.unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(rows, FAST.rows);
        assert_eq!(close.code, CloseCode::Normal);
        assert_eq!(close.reason.as_str(), "query complete");
        // tungstenite answers the Close; the backend then ends the stream.
        assert!(within(ws.next()).await.is_none());
        let done = event(addr, |e| e["kind"] == "completed").await;
        assert_eq!(done["panel"], "latency");
        assert_eq!(done["rows"], FAST.rows);
        assert_eq!(done["code"], 1000);
        assert!(
            done["text"]
                .as_str()
                .unwrap()
                .ends_with("the client answered the Close"),
            "{done}"
        );
        let started = event(addr, |e| e["kind"] == "started").await;
        assert_eq!(started["query"], done["query"]);
        assert!(started["seq"].as_u64() < done["seq"].as_u64());
    }

    #[tokio::test]
    async fn a_client_close_is_recorded_with_its_code_and_reason() {
        let demo = DemoBackend::start(links(nowhere(), None)).unwrap();
        let addr = demo.addr();
        let (mut ws, _) = within(connect_async(format!("ws://{addr}/query?panel=errors")))
            .await
            .unwrap();
        assert!(within(ws.next()).await.unwrap().unwrap().is_text());
        let cancel = CloseFrame {
            code: CloseCode::Normal,
            reason: "cancelled".into(),
        };
        within(ws.close(Some(cancel))).await.unwrap();
        // Rows already on their way, then the backend's reply Close, then the end.
        loop {
            match within(ws.next()).await {
                Some(Ok(Message::Close(reply))) => {
                    assert_eq!(reply.unwrap().code, CloseCode::Normal);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{e}"),
                None => break,
            }
        }
        let e = event(addr, |e| e["kind"] == "client_close").await;
        assert_eq!(
            (e["code"].as_u64(), e["reason"].as_str()),
            (Some(1000), Some("cancelled"))
        );
        assert!(e["rows"].as_u64().unwrap() >= 1);
        assert!(e["after_ms"].as_u64().unwrap() < 8_000);
        let text = e["text"].as_str().unwrap();
        assert!(
            text.starts_with("client closed with 1000 \"cancelled\" after "),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_tcp_drop_without_close_is_recorded_as_such() {
        let demo = DemoBackend::start(links(nowhere(), None)).unwrap();
        let addr = demo.addr();
        let (mut ws, _) = within(connect_async(format!("ws://{addr}/query?panel=logs")))
            .await
            .unwrap();
        assert!(within(ws.next()).await.unwrap().unwrap().is_text());
        drop(ws); // FIN (or RST, with rows unread), no Close frame
        let e = event(addr, |e| e["kind"] == "dropped").await;
        assert_eq!(e["panel"], "logs");
        assert!(e["code"].is_null() && e["reason"].is_null());
        let text = e["text"].as_str().unwrap();
        assert!(
            text.starts_with("connection dropped without a Close"),
            "{text}"
        );
    }

    /// The body of a chunked response, without its chunk framing.
    fn dechunk(mut body: &str) -> String {
        let mut out = String::new();
        loop {
            let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
            let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
            if size == 0 {
                return out;
            }
            out.push_str(&rest[..size]);
            body = rest[size..]
                .strip_prefix("\r\n")
                .expect("CRLF after a chunk");
        }
    }

    /// The events of an event stream, as (type, data) pairs.
    fn sse_events(stream: &str) -> Vec<(String, serde_json::Value)> {
        stream
            .split_terminator("\n\n")
            .map(|block| {
                let kind = block.lines().find_map(|l| l.strip_prefix("event: "));
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                (
                    kind.expect("an event type").to_string(),
                    serde_json::from_str(data.expect("a data line")).expect("JSON data"),
                )
            })
            .collect()
    }

    const SEARCH: &str =
        "POST /api/default/_search_stream HTTP/1.1\r\nContent-Type: application/json";

    #[tokio::test]
    async fn a_search_streams_its_events_then_ends_and_is_recorded_completed() {
        let demo = DemoBackend::start_with(links(nowhere(), None), FAST).unwrap();
        let addr = demo.addr();
        let body =
            r#"{"query": {"sql": "SELECT * FROM \"default\" WHERE level = 'error'", "size": 12}}"#;
        let (status, head, raw) = http(addr, SEARCH, body).await;
        assert_eq!(status, 200, "{head}");
        assert_eq!(header(&head, "content-type"), "text/event-stream");
        assert_eq!(header(&head, "transfer-encoding"), "chunked");
        let events = sse_events(&dechunk(&raw));
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        // 12 hits, five per event: 5 + 5 + 2.
        assert_eq!(
            kinds,
            [
                "search_response_metadata",
                "search_response_hits",
                "search_response_hits",
                "search_response_hits",
                "search_response_end"
            ]
        );
        assert_eq!(events[0].1["size"], 12);
        assert!(
            events[0].1["sql"]
                .as_str()
                .unwrap()
                .contains("level = 'error'")
        );
        let hits: Vec<&serde_json::Value> = events
            .iter()
            .filter_map(|(_, d)| d["hits"].as_array())
            .flatten()
            .collect();
        assert_eq!(hits.len(), 12);
        assert!(
            hits.iter()
                .all(|h| SEARCH_SERVICES.contains(&h["service"].as_str().unwrap()))
        );
        assert_eq!(events[3].1["progress"], 100);
        assert_eq!(events[4].1["total"], 12);
        let done = event(addr, |e| e["panel"] == "search" && e["kind"] == "completed").await;
        assert_eq!(done["transport"], "sse");
        assert_eq!(done["rows"], 12);
        assert!(done["code"].is_null() && done["since_last_event_ms"].is_null());
        let text = done["text"].as_str().unwrap();
        assert!(
            text.starts_with("completed: all 12 hits and the end event sent after "),
            "{text}"
        );
        let started = event(addr, |e| e["panel"] == "search" && e["kind"] == "started").await;
        assert_eq!(started["query"], done["query"]);
        assert_eq!(started["transport"], "sse");
    }

    #[tokio::test]
    async fn a_search_whose_client_drops_its_connection_is_recorded_at_once() {
        let demo = DemoBackend::start(links(nowhere(), None)).unwrap();
        let addr = demo.addr();
        let mut s = within(TcpStream::connect(addr)).await.unwrap();
        let body = r#"{"query": {"sql": "SELECT 1"}}"#;
        let request = format!(
            "{SEARCH}\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        within(s.write_all(request.as_bytes())).await.unwrap();
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("event: search_response_hits") {
            let mut chunk = [0u8; 4096];
            let n = within(s.read(&mut chunk)).await.unwrap();
            assert!(n > 0, "the stream ended early");
            seen.extend_from_slice(&chunk[..n]);
        }
        let dropped = std::time::Instant::now();
        drop(s); // FIN mid-stream: the connection is gone
        let e = event(addr, |e| e["panel"] == "search" && e["kind"] != "started").await;
        let learned = dropped.elapsed();
        assert_eq!(e["kind"], "client_went_away", "{e}");
        assert_eq!(e["transport"], "sse");
        assert!(e["code"].is_null(), "no Close frame on an HTTP stream");
        let text = e["text"].as_str().unwrap();
        assert!(
            text.starts_with("client went away (connection closed) after "),
            "{text}"
        );
        // The demo's 800 hits take 8 s: it learned long before the end, and within about
        // one event period of the last event it sent.
        assert!(e["after_ms"].as_u64().unwrap() < 4_000, "{e}");
        assert!(e["since_last_event_ms"].as_u64().unwrap() < 1_000, "{e}");
        assert!(learned < Duration::from_secs(4), "{learned:?}");
        assert!(e["rows"].as_u64().unwrap() < DEFAULT_HITS, "{e}");
    }

    #[tokio::test]
    async fn bad_search_requests_get_clear_answers() {
        let demo = DemoBackend::start_with(links(nowhere(), None), FAST).unwrap();
        let addr = demo.addr();
        let status = async |head: &str, body: &str| http(addr, head, body).await.0;
        assert_eq!(
            status("GET /api/default/_search_stream HTTP/1.1", "").await,
            405
        );
        let plain = "POST /api/default/_search_stream HTTP/1.1\r\nContent-Type: text/plain";
        assert_eq!(status(plain, "{}").await, 415);
        assert_eq!(status(SEARCH, "not json").await, 400);
        assert_eq!(status(SEARCH, "[1]").await, 400);
        assert_eq!(status(SEARCH, r#"{"query": {"size": 0}}"#).await, 400);
        assert_eq!(status(SEARCH, r#"{"query": {"size": 2001}}"#).await, 400);
        assert_eq!(status(SEARCH, &"x".repeat(MAX_BODY + 1)).await, 413);
        let cross = format!("{SEARCH}\r\nOrigin: http://elsewhere.example");
        assert_eq!(status(&cross, "{}").await, 403);
        let bad_org = "POST /api/a%2Fb/_search_stream HTTP/1.1\r\nContent-Type: application/json";
        assert_eq!(status(bad_org, "{}").await, 404);
        // An empty body is a search with the defaults.
        let (code, head, _) = http(addr, SEARCH, "").await;
        assert_eq!(
            (code, header(&head, "content-type")),
            (200, "text/event-stream")
        );
        assert_eq!(search_org("/api/my-org_2/_search_stream"), Some("my-org_2"));
        assert_eq!(search_org("/api//_search_stream"), None);
        assert_eq!(search_org("/api/default/_search"), None);
    }

    #[test]
    fn search_endings_are_named_from_the_backends_side() {
        let at = Duration::from_millis(2_300);
        let since = Duration::from_millis(17);
        let cases = [
            (
                SearchEnd::Completed,
                "completed",
                "completed: all 45 hits and the end event sent after 2.3 s",
                None,
            ),
            (
                SearchEnd::Gone,
                "client_went_away",
                "client went away (connection closed) after 2.3 s, 17 ms after the last event (45 hits sent)",
                Some(17),
            ),
            (
                SearchEnd::Stalled,
                "stalled",
                "writes stalled for 10 s: nothing took the events; gave up after 2.3 s (45 hits sent)",
                None,
            ),
        ];
        for (end, kind, text, since_ms) in cases {
            let e = describe_search(7, end, at, since, 45);
            assert_eq!((e.kind, e.text.as_str()), (kind, text));
            assert_eq!((e.panel, e.transport), (SEARCH_PANEL, "sse"));
            assert_eq!(
                (e.query, e.after_ms, e.rows, e.since_last_event_ms),
                (Some(7), Some(2_300), Some(45), since_ms)
            );
            assert_eq!((e.code, e.reason), (None, None));
        }
    }

    #[test]
    fn close_codes_are_named_from_the_backends_side() {
        let panel = panel_named("errors").unwrap();
        let close = |code: u16, reason: &'static str| {
            End::ClientClose(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: Utf8Bytes::from_static(reason),
            }))
        };
        let cases = [
            (
                close(1001, "client went away"),
                "client_went_away",
                "client went away: Close 1001 \"client went away\" after 2.3 s (45 rows sent)",
            ),
            (
                close(1001, ""),
                "client_went_away",
                "client went away: Close 1001 (no reason) after 2.3 s (45 rows sent)",
            ),
            (
                close(1001, "client unresponsive"),
                "client_unresponsive",
                "client unresponsive: Close 1001 \"client unresponsive\" after 2.3 s (45 rows sent)",
            ),
            (
                close(1001, "client stopped reading"),
                "client_stalled",
                "client stopped reading: Close 1001 \"client stopped reading\" after 2.3 s (45 rows sent)",
            ),
            (
                close(4000, "bye"),
                "client_close",
                "client closed with 4000 \"bye\" after 2.3 s (45 rows sent)",
            ),
            (
                End::ClientClose(None),
                "client_close",
                "client closed without a code after 2.3 s (45 rows sent)",
            ),
            (
                End::Dropped(None),
                "dropped",
                "connection dropped without a Close after 2.3 s (45 rows sent)",
            ),
            (
                End::Completed(Reply::Silent),
                "completed",
                "completed: all 45 rows sent after 2.3 s; no Close reply came within 5 s",
            ),
        ];
        for (end, kind, text) in cases {
            let e = describe(7, panel, end, Duration::from_millis(2_300), 45);
            assert_eq!((e.kind, e.text.as_str()), (kind, text));
            assert_eq!(
                (e.query, e.after_ms, e.rows),
                (Some(7), Some(2_300), Some(45))
            );
        }
    }

    #[tokio::test]
    async fn a_simulated_laptop_handshakes_then_goes_silent_without_closing() {
        let proxy = within(TcpListener::bind("127.0.0.1:0")).await.unwrap();
        let demo = DemoBackend::start(links(proxy.local_addr().unwrap(), None)).unwrap();
        let addr = demo.addr();
        let (status, answer) = vanish(addr).await;
        assert_eq!(status, 202, "{answer}");
        // Play wsgate: take the laptop's handshake and accept it.
        let (mut laptop, _) = within(proxy.accept()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(within(laptop.read(&mut byte)).await.unwrap(), 1);
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.starts_with("GET /query?panel=vanished-laptop HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("\r\nUpgrade: websocket\r\n")
                && head.contains("\r\nSec-WebSocket-Version: 13\r\n")
        );
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let accept = derive_accept_key(key.as_bytes());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        within(laptop.write_all(response.as_bytes())).await.unwrap();
        // Awake, it answers a Ping with a masked Pong, as a browser would.
        within(laptop.write_all(b"\x89\x06awake?")).await.unwrap();
        let mut buf = Vec::new();
        let pong = within(async {
            loop {
                if let Some(frame) = parse_frame(&buf).unwrap() {
                    return frame;
                }
                let mut chunk = [0u8; 256];
                let n = laptop.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the laptop closed");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        assert_eq!(buf[1] & 0x80, 0x80, "client frames are masked");
        assert_eq!(
            (pong.opcode, pong.payload.as_slice()),
            (0xA, &b"awake?"[..])
        );
        event(addr, |e| e["kind"] == "laptop_connected").await;
        // Asleep: a Ping and a row get nothing back, not even a FIN.
        event(addr, |e| e["kind"] == "laptop_silent").await;
        within(laptop.write_all(b"\x89\x07asleep?\x81\x02{}"))
            .await
            .unwrap();
        let mut chunk = [0u8; 64];
        let read = timeout(Duration::from_millis(1500), laptop.read(&mut chunk)).await;
        assert!(read.is_err(), "the sleeping laptop answered: {read:?}");
    }

    #[tokio::test]
    async fn simulated_laptops_are_bounded_and_loopback_only() {
        // Connections to this listener queue in its backlog and are never answered, so
        // each laptop holds its slot for the handshake timeout.
        let proxy = within(TcpListener::bind("127.0.0.1:0")).await.unwrap();
        let demo = DemoBackend::start(links(proxy.local_addr().unwrap(), None)).unwrap();
        for _ in 0..MAX_LAPTOPS {
            assert_eq!(vanish(demo.addr()).await.0, 202);
        }
        let (status, answer) = vanish(demo.addr()).await;
        assert_eq!(status, 429);
        assert!(answer["error"].as_str().unwrap().contains("already asleep"));
        let elsewhere = "192.0.2.1:8080".parse().unwrap();
        let demo = DemoBackend::start(links(elsewhere, None)).unwrap();
        assert_eq!(vanish(demo.addr()).await.0, 403);
    }

    #[tokio::test]
    async fn dropping_the_backend_stops_it_promptly_with_queries_open() {
        let proxy = within(TcpListener::bind("127.0.0.1:0")).await.unwrap();
        let demo = DemoBackend::start(links(proxy.local_addr().unwrap(), None)).unwrap();
        let addr = demo.addr();
        let (mut ws, _) = within(connect_async(format!("ws://{addr}/query?panel=errors")))
            .await
            .unwrap();
        assert!(within(ws.next()).await.unwrap().unwrap().is_text());
        assert_eq!(vanish(addr).await.0, 202);
        let began = std::time::Instant::now();
        drop(demo);
        assert!(
            began.elapsed() < STOP_WAIT,
            "drop took {:?}",
            began.elapsed()
        );
        // The query's socket is gone with the runtime.
        within(async { while let Some(Ok(_)) = ws.next().await {} }).await;
        assert!(within(TcpStream::connect(addr)).await.is_err());
    }
}
