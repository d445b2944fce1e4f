//! The client-facing listener: accepts TCP connections, enforces `max_connections`,
//! serves HTTP/1.1 or HTTP/2 on each with hyper, and routes every request either to
//! [`crate::proxy`] (plain HTTP) or to [`crate::upgrade`] and then [`crate::relay`]
//! (WebSocket). Also the drain sequence of a graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ProxyError;
use crate::frame::Negotiated;
use crate::gate::{Gate, Slot, Tasks};
use crate::proxy::{self, Body};
use crate::record::ConnectionInfo;
use crate::relay::{self, Handoff, Leg};
use crate::report;
use crate::request_head::{self, FirstRequest};
use crate::stream::{Replayed, Stream};
use crate::upgrade::{self, Upgrade};

/// How long to wait after the forced close for tasks to notice it.
const FORCE_GRACE: Duration = Duration::from_secs(2);
/// Pause after an accept error such as EMFILE, so a full descriptor table does not
/// turn the accept loop into a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One accepted client connection. It holds a `max_connections` slot until it drops,
/// which for a WebSocket is when its relay ends.
struct Connection {
    /// Process-unique id, in log lines.
    id: u64,
    peer: std::net::SocketAddr,
    /// The worker serving it (0 is the thread that started the server).
    worker: usize,
    /// It came while wsgate was draining: it is served one request, then closed.
    /// Connections from before the drain close gracefully when it begins.
    accepted_draining: bool,
    _slot: Slot,
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
struct Busy(Arc<Connection>);

impl Busy {
    fn new(conn: Arc<Connection>) -> Busy {
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

/// Every [`report::SWEEP_INTERVAL`], until aborted: adds open WebSockets' traffic to
/// the process-wide counters and folds histogram samples into their buckets.
pub async fn housekeeping(gate: Arc<Gate>) {
    let mut every = tokio::time::interval(report::SWEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        report::sweep(&gate.live, &gate.metrics);
    }
}

/// Accepts clients on worker 0's listener until `stop` completes (SIGTERM, SIGINT),
/// then exits (DESIGN §5): the drain begins if it has not (`POST /drain` may have begun
/// it), and once no WebSocket is left the listeners close and in-flight HTTP requests
/// finish; at the drain deadline what is left is aborted. `abort` completing (polled only
/// from the stop on: a second signal) aborts at once.
pub async fn serve(
    gate: Arc<Gate>,
    listener: TcpListener,
    stop: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) {
    gate.tasks.tracker.spawn(accept(gate.clone(), 0, listener));
    stop.await;
    gate.begin_drain("signal");
    exit(&gate, abort).await;
}

/// One worker's accept loop, run as a task of its own: a task woken by its listener is
/// queued on its thread directly, whereas the future a runtime's `block_on` drives is
/// woken through the runtime's eventfd, one more system call per accepted batch. Serves
/// every client of `listener` on this thread's runtime until the exit begins, then
/// closes the listener. During the drain it keeps accepting: the pod's endpoints are
/// removed seconds after its readiness fails.
pub async fn accept(gate: Arc<Gate>, worker: usize, listener: TcpListener) {
    let stop = gate.tasks.stop.clone();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
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
        match gate.slots.try_take() {
            Some(slot) => {
                gate.metrics.connections_active.increment(1.0);
                let conn = Arc::new(Connection {
                    id: gate.next_id(),
                    peer,
                    worker,
                    accepted_draining: gate.drain.is_begun(),
                    _slot: slot,
                    active: gate.metrics.connections_active.clone(),
                    busy: AtomicUsize::new(0),
                    idle_since: Mutex::new(std::time::Instant::now()),
                });
                gate.tasks
                    .tracker
                    .spawn(serve_client(gate.clone(), stream, conn));
            }
            None => {
                gate.metrics.connections_rejected.increment(1);
                match gate.rejecting.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tracing::debug!(%peer, "max_connections reached: answering 503");
                        gate.tasks
                            .tracker
                            .spawn(reject_client(gate.clone(), stream, permit));
                    }
                    Err(_) => tracing::debug!(%peer, "max_connections reached: closing"),
                }
            }
        }
    }
}

/// The end of the process, once the drain has begun: WebSockets first (the port keeps
/// accepting, and refusing upgrades, while they close), then the listeners and what is
/// in flight, all by the drain deadline.
async fn exit(gate: &Gate, abort: impl Future<Output = ()>) {
    let tasks = &gate.tasks;
    let deadline = gate
        .drain
        .deadline()
        .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std);
    tracing::info!(
        websockets = gate.live.len(),
        open_tasks = tasks.tracker.len(),
        "stopping: waiting for the drain"
    );
    let finished = async {
        gate.live.emptied().await;
        tasks.stop.cancel();
        tasks.tracker.close();
        tasks.tracker.wait().await;
    };
    let drained = tokio::select! {
        waited = tokio::time::timeout_at(deadline, finished) => {
            if waited.is_err() {
                tracing::warn!(
                    websockets = gate.live.len(),
                    open_tasks = tasks.tracker.len(),
                    "drain deadline reached: aborting the rest"
                );
            }
            waited.is_ok()
        }
        () = abort => {
            tracing::warn!(
                websockets = gate.live.len(),
                open_tasks = tasks.tracker.len(),
                "second stop signal: aborting the rest"
            );
            false
        }
    };
    if !drained {
        tasks.stop.cancel();
        tasks.tracker.close();
        tasks.force.cancel();
        gate.live.force_all();
        if tokio::time::timeout(FORCE_GRACE, tasks.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                open_tasks = tasks.tracker.len(),
                "tasks still running at exit"
            );
        }
    }
    tracing::info!("shutdown complete");
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

async fn serve_client(gate: Arc<Gate>, tcp: TcpStream, conn: Arc<Connection>) {
    let settings = gate.settings();
    let mut stream = match &settings.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let accepted = Box::pin(tls.acceptor.accept(tcp));
            match tokio::time::timeout(tls.handshake_timeout, accepted).await {
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
    let http = settings.config.http.clone();
    let h2 = match &stream {
        Stream::Plain(tcp) => {
            http.h2c && starts_with_h2_preface(tcp, http.header_read_timeout).await
        }
        _ => stream.alpn() == Some(b"h2"),
    };
    drop(settings);
    if h2 {
        Box::pin(serve_http2(gate, stream, conn)).await;
        return;
    }
    // HTTP/1.1: the first request's head is read here. A plain WebSocket upgrade goes
    // on in this task, relay included; the rest is hyper's (`request_head`).
    let first =
        request_head::read_first(&mut stream, http.max_header_size, http.header_read_timeout).await;
    let (read, first_response) = match first {
        FirstRequest::Gone => return,
        FirstRequest::Other(read) => (read, None),
        FirstRequest::Upgrade {
            request,
            head,
            rest,
        } => {
            let busy = Busy::new(conn.clone());
            match Box::pin(upgrade(&gate, &busy, request)).await {
                Ok(accepted) => {
                    if let Err(e) = write_head(&mut stream, &accepted.response).await {
                        // The client left. The relay still runs: it finds the client
                        // gone at once and tells the backend with a Close, and the
                        // connection is recorded as it ended.
                        tracing::debug!(error = %e, "writing the 101 to the client failed");
                    }
                    let handoff = Handoff {
                        client: Leg {
                            stream,
                            buffered: rest,
                        },
                        backend: accepted.backend,
                        negotiated: accepted.negotiated,
                        info: accepted.info,
                    };
                    // A task of its own, the size of the relay (under 1 KiB), for the
                    // WebSocket's whole life: this task's future, with every step before
                    // the relay in it, is three times that. It keeps the connection busy
                    // (and its slot taken) until it ends.
                    let relay = relay::start(handoff, &gate.live, gate.metrics.clone(), busy);
                    gate.tasks.tracker.spawn(relay);
                    return;
                }
                // An answer of wsgate's or the backend's refusal: hyper writes it, with
                // everything HTTP/1.1 asks of a response, and serves what follows.
                Err(response) => {
                    let mut read = bytes::BytesMut::from(&head[..]);
                    read.extend_from_slice(&rest);
                    (read.freeze(), Some(response))
                }
            }
        }
    };
    Box::pin(serve_http1(
        gate,
        Replayed::new(read, stream),
        conn,
        first_response,
    ))
    .await;
}

/// Writes an HTTP/1.1 response head (a 101 has no body), as hyper would.
async fn write_head(stream: &mut Stream, response: &Response<Body>) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let status = response.status();
    let headers = response.headers();
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>();
    let mut head = Vec::with_capacity(size + 64);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await?;
    // TLS holds what it encrypted until flushed.
    stream.flush().await
}

/// The service of a hyper connection: every request through [`route`], except that the
/// first gets `first` when it is given (the answer already decided for a request read
/// before hyper took over).
fn service(
    gate: Arc<Gate>,
    conn: Arc<Connection>,
    first: Option<Response<Body>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    let first = Arc::new(Mutex::new(first));
    service_fn(move |req| {
        let gate = gate.clone();
        let busy = Busy::new(conn.clone());
        let answer = first.lock().unwrap_or_else(|p| p.into_inner()).take();
        async move {
            Ok::<_, Infallible>(match answer {
                Some(answer) => answer,
                None => route(gate, busy, req).await,
            })
        }
    })
}

/// Serves an HTTP/2 connection with hyper until it ends.
async fn serve_http2(gate: Arc<Gate>, stream: Stream, conn: Arc<Connection>) {
    let tasks = &gate.tasks;
    let settings = gate.settings();
    let config = &settings.config;
    let mut builder = http2::Builder::new(TrackedExecutor(tasks.tracker.clone()));
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(config.http.max_header_size).unwrap_or(u32::MAX))
        // HTTP/2 PINGs find a vanished client on an otherwise quiet connection.
        .keep_alive_interval(config.websocket.ping_interval.unwrap_or(H2_KEEPALIVE))
        .keep_alive_timeout(config.websocket.pong_timeout);
    let service = service(gate.clone(), conn.clone(), None);
    let served = Box::pin(builder.serve_connection(TokioIo::new(stream), service));
    // hyper has no idle timeout for HTTP/2: a connection with nothing in flight for
    // `header_read_timeout` is closed, as HTTP/1.1 keep-alive ones are.
    let idle = Some((&*conn, config.http.header_read_timeout));
    drop(settings);
    let result = drive(
        served,
        |c| c.graceful_shutdown(),
        tasks,
        drain(&gate, &conn),
        idle,
    )
    .await;
    ended(result);
}

/// Serves an HTTP/1.1 connection with hyper until it ends; `first` answers its first
/// request if given.
async fn serve_http1(
    gate: Arc<Gate>,
    stream: Replayed<Stream>,
    conn: Arc<Connection>,
    first: Option<Response<Body>>,
) {
    let tasks = &gate.tasks;
    let settings = gate.settings();
    let service = service(gate.clone(), conn.clone(), first);
    let io = TokioIo::new(stream);
    let http1 = if conn.accepted_draining {
        let mut once = settings.http1.clone();
        once.keep_alive(false);
        once.serve_connection(io, service)
    } else {
        settings.http1.serve_connection(io, service)
    };
    drop(settings);
    let served = Box::pin(http1.with_upgrades());
    let result = drive(
        served,
        |c| c.graceful_shutdown(),
        tasks,
        drain(&gate, &conn),
        None,
    )
    .await;
    ended(result);
}

/// When a connection from before the drain closes gracefully: when it begins (an idle
/// one at once). One accepted during the drain gets one request and
/// `Connection: close` instead.
fn drain<'a>(gate: &'a Gate, conn: &Connection) -> Option<&'a CancellationToken> {
    (!conn.accepted_draining).then(|| gate.drain.begun())
}

fn ended(result: hyper::Result<()>) {
    if let Err(e) = result {
        // Clients hang up mid-request all the time: not an error of wsgate's.
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// Serves a hyper connection until it ends. At the exit, when `drain` begins, or once
/// `idle` says the connection had nothing in flight for its limit, it stops taking new
/// requests (`graceful`) and finishes the current ones, until the force signal.
///
/// The connection comes boxed: inline, hyper's state made the client task's future
/// 3.6 KiB, which tokio boxes itself and copies several times on every spawn.
async fn drive<F>(
    mut served: Pin<Box<F>>,
    graceful: impl FnOnce(Pin<&mut F>),
    tasks: &Tasks,
    drain: Option<&CancellationToken>,
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
    let drain_begun = async {
        match drain {
            Some(drain) => drain.cancelled().await,
            None => std::future::pending().await,
        }
    };
    // How long the graceful close may take: until the force signal on shutdown; as long
    // as the idle limit again for an idle connection (an HTTP/2 client that does not
    // answer the GOAWAY's PING would otherwise hold it).
    let grace = tokio::select! {
        result = served.as_mut() => return result,
        () = tasks.stop.cancelled() => None,
        () = drain_begun => None,
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
        () = tasks.force.cancelled() => Ok(()),
        () = deadline => Ok(()),
    }
}

/// Peeks (without consuming) whether a plain connection starts with the HTTP/2 preface,
/// waiting at most `limit` (`http.header_read_timeout`) for enough bytes.
async fn starts_with_h2_preface(tcp: &TcpStream, limit: Duration) -> bool {
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
    tokio::time::timeout(limit, peek).await.unwrap_or(false)
}

/// A WebSocket upgrade carried out: what goes to the client and what to the relay.
struct Accepted {
    response: Response<Body>,
    backend: Leg<Stream>,
    negotiated: Negotiated,
    info: ConnectionInfo,
}

/// A WebSocket upgrade request, whichever way it came: refused while draining, else
/// carried out by [`upgrade::handle`]; counted. `Err` is the response to send instead.
async fn upgrade<B>(
    gate: &Gate,
    conn: &Connection,
    req: Request<B>,
) -> Result<Accepted, Response<Body>> {
    let failed = |e: ProxyError, why: &str| {
        tracing::debug!(why, fault = e.fault().as_str(), "upgrade failed");
        gate.metrics.upgrade_failed(e);
        proxy::error_response(e, why)
    };
    if gate.drain.is_begun() {
        let e = ProxyError::Draining;
        return Err(failed(e, e.message()));
    }
    let info = ConnectionInfo {
        id: conn.id,
        client: conn.peer,
        worker: conn.worker,
        path: req.uri().path().into(),
    };
    let settings = gate.settings();
    match upgrade::handle(&settings, &gate.tasks, conn.peer, req).await {
        Ok(Upgrade::Accepted {
            response,
            backend,
            negotiated,
        }) => {
            gate.metrics.upgrade_relayed();
            Ok(Accepted {
                response,
                backend,
                negotiated,
                info,
            })
        }
        Ok(Upgrade::Refused(response)) => {
            gate.metrics.upgrade_refused();
            Err(response)
        }
        Err(e) => Err(failed(e.error, e.why)),
    }
}

/// A request hyper read: a WebSocket upgrade (its relay spawned once hyper hands the
/// client's stream over), or plain HTTP forwarded to the backend.
async fn route(gate: Arc<Gate>, conn: Busy, mut req: Request<Incoming>) -> Response<Body> {
    if upgrade::is_websocket_upgrade(&req) {
        let client = hyper::upgrade::on(&mut req);
        let over_h2 = upgrade::is_extended_connect(&req);
        return match upgrade(&gate, &conn, req).await {
            Ok(accepted) => {
                let handoff = Handoff {
                    client: upgrade::client_stream(client, over_h2),
                    backend: accepted.backend,
                    negotiated: accepted.negotiated,
                    info: accepted.info,
                };
                // The relay keeps the client connection busy (and its slot taken).
                relay::spawn(
                    &gate.tasks.tracker,
                    handoff,
                    &gate.live,
                    &gate.metrics,
                    conn,
                );
                accepted.response
            }
            Err(response) => response,
        };
    }
    let settings = gate.settings();
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let client = settings.backend.client(conn.worker);
    let resp = proxy::forward(client, &settings.config, conn.peer, req)
        .await
        .unwrap_or_else(|e| proxy::error_response(e, e.message()));
    gate.metrics
        .http_request(&method, resp.status(), started.elapsed());
    resp
}

/// Answers a connection over `max_connections` with 503 and closes it.
async fn reject_client(gate: Arc<Gate>, stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let full = ProxyError::OverCapacity;
    let svc_gate = gate.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        if upgrade::is_websocket_upgrade(&req) {
            svc_gate.metrics.upgrade_failed(full);
        } else {
            svc_gate
                .metrics
                .http_request(req.method(), full.status(), Duration::ZERO);
        }
        async move { Ok::<_, Infallible>(proxy::error_response(full, full.message())) }
    });
    let mut builder = gate.settings().http1.clone();
    builder.keep_alive(false);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = served => {}
        () = gate.tasks.force.cancelled() => {}
    }
}
