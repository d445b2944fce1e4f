//! The client-facing listener: accepts TCP connections, enforces `max_connections`,
//! serves HTTP/1.1 on each with hyper, and routes every request either to
//! [`crate::proxy`] (plain HTTP) or [`crate::upgrade`] (WebSocket). Also the drain
//! sequence of a graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::live::LiveTable;
use crate::metrics::{Metrics, UpgradeResult};
use crate::proxy::{self, BackendClient, Body, ProxyError};
use crate::relay::{RelayConfig, Signals};
use crate::stream::Stream;
use crate::tls::{BackendTls, ServerTls, TlsError};
use crate::upgrade;

/// Over-capacity connections answered with 503 at once; past this they are closed
/// without an answer, so a flood cannot use more than this many extra descriptors.
const MAX_REJECTING: usize = 64;
/// How long to wait after the forced close for tasks to notice it.
const FORCE_GRACE: Duration = Duration::from_secs(2);
/// Pause after an accept error such as EMFILE, so a full descriptor table does not
/// turn the accept loop into a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// State shared by every connection of one server, on every worker.
pub struct Shared {
    pub config: Config,
    pub relay_config: RelayConfig,
    /// Pooled clients for plain HTTP requests, one per worker: a worker's requests use
    /// backend connections driven by its own thread.
    clients: Vec<BackendClient>,
    /// hyper's HTTP/1.1 server settings, built once: building them per connection
    /// allocated its timer.
    http1: http1::Builder,
    /// TLS toward clients, when `[tls]` is configured.
    pub tls: Option<ServerTls>,
    /// TLS toward an `https://` backend.
    pub backend_tls: Option<BackendTls>,
    /// Every task serving a client, a backend handshake or a relay: shutdown waits for it.
    pub tracker: TaskTracker,
    pub signals: Signals,
    pub metrics: Metrics,
    /// Live WebSocket connections, for the admin `/connections` endpoint.
    pub live: LiveTable,
    /// False while draining: `/readyz` fails.
    pub ready: AtomicBool,
    next_id: AtomicU64,
    /// One permit per client connection (`max_connections`).
    slots: Arc<Semaphore>,
    /// Permits for answering over-capacity connections with a 503.
    rejecting: Arc<Semaphore>,
}

impl Shared {
    /// For `workers` workers. Fails when a TLS certificate, key or CA file does not
    /// load.
    pub fn new(config: Config, workers: usize) -> Result<Self, TlsError> {
        let tls = config.tls.as_ref().map(ServerTls::new).transpose()?;
        let backend_tls = if config.backend.tls {
            Some(BackendTls::new(&config.backend_tls, &config.backend.host)?)
        } else {
            None
        };
        Ok(Shared {
            relay_config: RelayConfig {
                timers: Arc::new(config.websocket.timers()),
                max_frame_size: config.websocket.max_frame_size,
            },
            clients: (0..workers.max(1))
                .map(|_| proxy::backend_client(&config, backend_tls.as_ref()))
                .collect(),
            http1: http1_builder(&config),
            tls,
            backend_tls,
            tracker: TaskTracker::new(),
            signals: Signals {
                shutdown: CancellationToken::new(),
                force: CancellationToken::new(),
            },
            metrics: Metrics::new(config.max_connections),
            live: LiveTable::default(),
            ready: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            rejecting: Arc::new(Semaphore::new(MAX_REJECTING)),
            config,
        })
    }

    /// The HTTP client of `worker`.
    pub fn client(&self, worker: usize) -> &BackendClient {
        &self.clients[worker % self.clients.len()]
    }
}

/// One accepted client connection. It holds a `max_connections` slot until it drops,
/// which for a WebSocket is when its relay ends.
pub struct Connection {
    /// Process-unique id, in log lines.
    pub id: u64,
    pub peer: SocketAddr,
    /// The worker serving it (0 is the thread that started the server).
    pub worker: usize,
    _slot: OwnedSemaphorePermit,
    /// `wsgate_connections_active`, decremented on drop.
    active: metrics::Gauge,
    /// Requests in flight and WebSockets relayed on this connection ([`Busy`] guards).
    busy: AtomicUsize,
    /// When `busy` last dropped to 0 (or the connection was accepted).
    idle_since: Mutex<std::time::Instant>,
}

impl Connection {
    /// Completes once the connection has had nothing in flight for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let since = (self.busy.load(Ordering::SeqCst) == 0)
                .then(|| *self.idle_since.lock().unwrap_or_else(|p| p.into_inner()));
            match since {
                Some(t) if t.elapsed() >= limit => return,
                Some(t) => tokio::time::sleep_until((t + limit).into()).await,
                None => tokio::time::sleep(limit).await,
            }
        }
    }
}

/// Keeps its connection busy while alive: one per request in flight, and one per
/// WebSocket relay for its whole life. It also holds the connection's
/// `max_connections` slot.
pub struct Busy(Arc<Connection>);

impl Busy {
    pub fn new(conn: Arc<Connection>) -> Busy {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Busy(conn)
    }
}

impl std::ops::Deref for Busy {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) =
                std::time::Instant::now();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.active.decrement(1.0);
    }
}

/// How often open WebSockets' traffic reaches the process-wide counters.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Every second, until aborted: adds open WebSockets' traffic to the process-wide byte
/// and frame counters (relays only write their own atomics, so the shared counters are
/// not contended per message) and folds histogram samples into their buckets.
pub async fn housekeeping(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        shared.live.add_to_metrics(&shared.metrics.relay());
        shared.metrics.run_upkeep();
    }
}

/// Accepts clients on worker 0's listener until `shutdown` completes, then drains
/// (DESIGN §5): readiness off, no new connections on any worker, every WebSocket closed
/// with 1001 on both sides, keep-alive HTTP connections closed after their current
/// request, all of it bounded by `shutdown.drain_timeout`, after which what is left is
/// aborted. `abort` completing during the drain (polled only from then on) aborts at
/// once.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) {
    shared.tracker.spawn(accept(shared.clone(), 0, listener));
    shutdown.await;
    drain(&shared, abort).await;
}

/// One worker's accept loop, run as a task of its own: a task woken by its listener is
/// queued on its thread directly, whereas the future a runtime's `block_on` drives is
/// woken through the runtime's eventfd, one more system call per accepted batch. Serves
/// every client of `listener` on this thread's runtime until the drain begins, then
/// closes the listener.
pub async fn accept(shared: Arc<Shared>, worker: usize, listener: TcpListener) {
    let draining = shared.signals.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = draining.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // On Linux the socket inherited these from the listener (see `listener::tune`).
        #[cfg(not(target_os = "linux"))]
        crate::listener::tune_socket(socket2::SockRef::from(&stream));
        match shared.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                shared.metrics.connections_active.increment(1.0);
                let conn = Arc::new(Connection {
                    id: shared.next_id.fetch_add(1, Ordering::Relaxed),
                    peer,
                    worker,
                    _slot: slot,
                    active: shared.metrics.connections_active.clone(),
                    busy: AtomicUsize::new(0),
                    idle_since: Mutex::new(std::time::Instant::now()),
                });
                shared
                    .tracker
                    .spawn(serve_client(shared.clone(), stream, conn));
            }
            Err(_) => {
                shared.metrics.connections_rejected.increment(1);
                match shared.rejecting.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tracing::debug!(%peer, "max_connections reached: answering 503");
                        shared
                            .tracker
                            .spawn(reject_client(shared.clone(), stream, permit));
                    }
                    Err(_) => tracing::debug!(%peer, "max_connections reached: closing"),
                }
            }
        }
    }
}

async fn drain(shared: &Shared, abort: impl Future<Output = ()>) {
    shared.ready.store(false, Ordering::SeqCst);
    let drain_timeout = shared.config.shutdown.drain_timeout;
    tracing::info!(
        open_tasks = shared.tracker.len(),
        ?drain_timeout,
        "shutting down: closing connections"
    );
    shared.signals.shutdown.cancel();
    shared.tracker.close();
    let drained = tokio::select! {
        waited = tokio::time::timeout(drain_timeout, shared.tracker.wait()) => {
            if waited.is_err() {
                tracing::warn!(
                    open_tasks = shared.tracker.len(),
                    "drain timeout reached: aborting the rest"
                );
            }
            waited.is_ok()
        }
        () = abort => {
            tracing::warn!(
                open_tasks = shared.tracker.len(),
                "second stop signal: aborting the rest"
            );
            false
        }
    };
    if !drained {
        shared.signals.force.cancel();
        if tokio::time::timeout(FORCE_GRACE, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                open_tasks = shared.tracker.len(),
                "tasks still running at exit"
            );
        }
    }
    tracing::info!("shutdown complete");
}

fn http1_builder(config: &Config) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(config.http.header_read_timeout)
        .max_buf_size(config.http.max_header_size.max(8192))
        // Responses carry the backend's own Date, or none: wsgate adds nothing.
        .auto_date_header(false);
    b
}

/// HTTP/2 PING interval when WebSocket pings are off.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Spawns hyper's HTTP/2 stream tasks on the server's tracker, so shutdown waits for
/// them like for everything else.
#[derive(Clone)]
struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

async fn serve_client(shared: Arc<Shared>, tcp: TcpStream, conn: Arc<Connection>) {
    let stream = match &shared.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let limit = shared
                .config
                .tls
                .as_ref()
                .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
            match tokio::time::timeout(limit, Box::pin(tls.acceptor.accept(tcp))).await {
                Ok(Ok(s)) => Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(s))),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %conn.peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let h2 = match &stream {
        Stream::Tls(_) => stream.alpn() == Some(b"h2"),
        Stream::Plain(tcp) => {
            shared.config.http.h2c && starts_with_h2_preface(tcp, &shared.config).await
        }
    };
    let svc_shared = shared.clone();
    let svc_conn = conn.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let busy = Busy::new(svc_conn.clone());
        async move { Ok::<_, Infallible>(route(shared, busy, req).await) }
    });
    let result = if h2 {
        let c = &shared.config;
        let mut builder = http2::Builder::new(TrackedExecutor(shared.tracker.clone()));
        builder
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_header_list_size(u32::try_from(c.http.max_header_size).unwrap_or(u32::MAX))
            // HTTP/2 PINGs find a vanished client on an otherwise quiet connection.
            .keep_alive_interval(c.websocket.ping_interval.unwrap_or(H2_KEEPALIVE))
            .keep_alive_timeout(c.websocket.pong_timeout);
        let served = Box::pin(builder.serve_connection(TokioIo::new(stream), service));
        // hyper has no idle timeout for HTTP/2: a connection with nothing in flight
        // for `header_read_timeout` is closed, as HTTP/1.1 keep-alive ones are.
        let idle = Some((&*conn, c.http.header_read_timeout));
        drive(served, |c| c.graceful_shutdown(), &shared.signals, idle).await
    } else {
        let http1 = shared.http1.serve_connection(TokioIo::new(stream), service);
        let served = Box::pin(http1.with_upgrades());
        drive(served, |c| c.graceful_shutdown(), &shared.signals, None).await
    };
    drop(conn);
    if let Err(e) = result {
        // Clients hang up mid-request all the time: not an error of wsgate's.
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// Serves a hyper connection until it ends. On shutdown, or once `idle` says the
/// connection had nothing in flight for its limit, it stops taking new requests
/// (`graceful`) and finishes the current ones, until the force signal.
///
/// The connection comes boxed: inline, hyper's state made the client task's future
/// 3.6 KiB, which tokio boxes itself and copies several times on every spawn.
async fn drive<F>(
    mut served: Pin<Box<F>>,
    graceful: impl FnOnce(Pin<&mut F>),
    signals: &Signals,
    idle: Option<(&Connection, Duration)>,
) -> hyper::Result<()>
where
    F: Future<Output = hyper::Result<()>>,
{
    let idle_out = async {
        match idle {
            Some((conn, limit)) => conn.idle_for(limit).await,
            None => std::future::pending().await,
        }
    };
    // How long the graceful close may take: until the force signal on shutdown; as long
    // as the idle limit again for an idle connection (an HTTP/2 client that does not
    // answer the GOAWAY's PING would otherwise hold it).
    let grace = tokio::select! {
        result = served.as_mut() => return result,
        () = signals.shutdown.cancelled() => None,
        () = idle_out => {
            tracing::debug!("closing an idle HTTP/2 connection");
            idle.map(|(_, limit)| limit)
        }
    };
    graceful(served.as_mut());
    let deadline = async {
        match grace {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = served => result,
        () = signals.force.cancelled() => Ok(()),
        () = deadline => Ok(()),
    }
}

/// Peeks (without consuming) whether a plain connection starts with the HTTP/2 preface,
/// waiting at most `http.header_read_timeout` for enough bytes.
async fn starts_with_h2_preface(tcp: &TcpStream, config: &Config) -> bool {
    let peek = async {
        let mut buf = [0u8; 24];
        let mut seen = 0;
        loop {
            let n = match tcp.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if buf[..n] != H2_PREFACE[..n] {
                return false;
            }
            if n == H2_PREFACE.len() {
                return true;
            }
            if n == seen {
                // Nothing new since the last peek: let the client send more.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen = n;
        }
    };
    tokio::time::timeout(config.http.header_read_timeout, peek)
        .await
        .unwrap_or(false)
}

async fn route(shared: Arc<Shared>, conn: Busy, req: Request<Incoming>) -> Response<Body> {
    if upgrade::is_websocket_upgrade(&req) {
        let (resp, result) = upgrade::handle(shared.clone(), conn, req).await;
        shared.metrics.upgrade(result);
        return resp;
    }
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let resp = proxy::forward(shared.client(conn.worker), &shared.config, conn.peer, req)
        .await
        .unwrap_or_else(|e| e.response(e.message()));
    shared
        .metrics
        .http_request(&method, resp.status(), started.elapsed());
    resp
}

/// Answers a connection over `max_connections` with 503 and closes it.
async fn reject_client(shared: Arc<Shared>, stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let svc_shared = shared.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        if upgrade::is_websocket_upgrade(&req) {
            svc_shared.metrics.upgrade(UpgradeResult::LimitReached);
        } else {
            let status = ProxyError::OverCapacity.status();
            svc_shared
                .metrics
                .http_request(req.method(), status, std::time::Duration::ZERO);
        }
        async {
            Ok::<_, Infallible>(
                ProxyError::OverCapacity.response(ProxyError::OverCapacity.message()),
            )
        }
    });
    let mut builder = shared.http1.clone();
    builder.keep_alive(false);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = served => {}
        () = shared.signals.force.cancelled() => {}
    }
}
