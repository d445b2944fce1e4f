//! The client-facing listener: accepts TCP connections, enforces `max_connections`,
//! terminates TLS, serves HTTP/1.1 or HTTP/2 on each and hands every request to
//! [`crate::route`]. On an HTTP/1.1 connection the plain WebSocket upgrade that opens it
//! is read and carried out here (see [`crate::request_head`]), watching the client while
//! the backend answers; plain requests are served by [`crate::h1_server`], and from the
//! first request that is neither on, hyper serves the connection. HTTP/2 is hyper's.
//! Every task serving clients can be ended from outside: at the exit, when the drain
//! begins, and by an exchange's [`Abort`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::TaskTracker;

use crate::abort::{Abort, Watch};
use crate::boxed::boxed;
use crate::client::{Busy, ClientConn, ClientIo, Signals};
use crate::error::ProxyError;
use crate::gate::Gate;
use crate::h1_server;
use crate::proxy::{self, Body};
use crate::relay::{self, Handoff, Leg};
use crate::request_head::{self, FirstRequest};
use crate::route::{self, PendingUpgrade};
use crate::stream::{Prefixed, Stream};
use crate::upgrade;

/// Pause after an accept error such as EMFILE, so a full descriptor table does not
/// turn the accept loop into a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// HTTP/2 PING interval when WebSocket pings are off.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes a client may send behind its upgrade request before the backend answered
/// (RFC 6455 says it must wait; what it sends anyway is kept for the relay). Past this
/// wsgate stops reading it until the relay starts.
const MAX_EARLY_BYTES: usize = 64 * 1024;

/// Accepts clients on worker 0's listener until `stop` completes (SIGTERM, SIGINT),
/// then exits: the drain begins if it has not (`POST /drain` may have begun it), and
/// [`crate::exit`] follows. `abort` completing (polled only from the stop on: a second
/// signal) aborts at once.
pub async fn serve(
    gate: Arc<Gate>,
    listener: TcpListener,
    stop: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) {
    gate.tasks.tracker.spawn(accept(gate.clone(), 0, listener));
    stop.await;
    gate.begin_drain("signal");
    crate::exit::exit(&gate, abort).await;
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
                let conn = ClientConn::new(
                    gate.next_id(),
                    peer,
                    worker,
                    gate.drain.is_begun(),
                    slot,
                    gate.metrics.connections_active.clone(),
                    &gate.clients,
                );
                // Boxed: the task's future is 1.8 KiB, and tokio moved it whole some
                // eight times on its way into the task (callgrind: ~2,000 instructions
                // per connection); boxed, one copy and a pointer moved. What only some
                // connections need stays out of it (see `crate::boxed`).
                gate.tasks
                    .tracker
                    .spawn(Box::pin(serve_client(gate.clone(), stream, conn)));
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

async fn serve_client(gate: Arc<Gate>, tcp: TcpStream, conn: Arc<ClientConn>) {
    let settings = gate.settings();
    let mut stream = match &settings.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let accepted = boxed(|| tls.acceptor.accept(tcp));
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
    let (h2c, max_head, head_timeout) = {
        let http = &settings.config.http;
        (http.h2c, http.max_header_size, http.header_read_timeout)
    };
    let h2 = match &stream {
        Stream::Plain(tcp) => h2c && starts_with_h2_preface(tcp, head_timeout).await,
        _ => stream.alpn() == Some(b"h2"),
    };
    drop(settings);
    if h2 {
        boxed(|| serve_http2(gate, stream, conn)).await;
        return;
    }
    // HTTP/1.1: the first request's head is read here. Plain requests are served by
    // `h1_server` and a plain WebSocket upgrade in its own step, relay included, until
    // a request comes that is neither; hyper serves the connection from there.
    let first = request_head::read_first(&mut stream, max_head, head_timeout).await;
    let (read, stream, first_response) = match first {
        FirstRequest::Gone => return,
        FirstRequest::Other(read) => match serve_plain(&gate, stream, &conn, read).await {
            Some((read, stream)) => (read, stream, None),
            None => return,
        },
        // A step of its own, boxed: what an upgrade holds while the backend answers
        // would otherwise be part of every connection's task.
        FirstRequest::Upgrade {
            request,
            head,
            rest,
        } => match boxed(|| upgrade_first(&gate, &conn, stream, request, head, rest)).await {
            FirstUpgrade::Done => return,
            // hyper writes wsgate's answer to the upgrade and serves what follows.
            FirstUpgrade::Answered {
                read,
                stream,
                response,
            } => (read, stream, Some(response)),
        },
    };
    boxed(|| serve_http1(gate, Prefixed::new(read, stream), conn, first_response)).await;
}

/// How the WebSocket upgrade that opened a connection went.
// One per upgrade, returned at once.
#[allow(clippy::large_enum_variant)]
enum FirstUpgrade {
    /// Relayed (the relay runs as a task of its own), or the client left before the
    /// backend answered: nothing more on this connection here.
    Done,
    /// Answered without a WebSocket (wsgate's own answer or the backend's refusal):
    /// hyper writes `response` and serves what follows, from the bytes `read` on.
    Answered {
        read: Bytes,
        stream: Stream,
        response: Response<Body>,
    },
}

/// Carries out the WebSocket upgrade that opened a connection: `request` (read as
/// `head`, `rest` the bytes behind it) goes to the backend while the client is
/// watched; on a 101 the relay takes both sockets over.
async fn upgrade_first(
    gate: &Arc<Gate>,
    conn: &Arc<ClientConn>,
    mut stream: Stream,
    request: Request<()>,
    head: Bytes,
    rest: Bytes,
) -> FirstUpgrade {
    let busy = Busy::new(conn.clone());
    let mut pending = PendingUpgrade::new(gate, conn, &request);
    let mut early = BytesMut::from(&rest[..]);
    // The client is watched while the backend answers: one that leaves (a query
    // cancelled right after it started) has its backend connection closed at once, not
    // when the backend finally answers.
    let upgraded = tokio::select! {
        upgraded = boxed(|| route::upgrade(gate, conn, request, &mut pending)) => upgraded,
        () = client_leaves(&mut stream, &mut early) => {
            tracing::debug!(peer = %conn.peer, "client left before the backend answered its upgrade");
            // Closes the backend's connection and records the ending.
            drop(pending);
            return FirstUpgrade::Done;
        }
    };
    drop(pending);
    match upgraded {
        Ok(accepted) => {
            let head = response_head(&accepted.response);
            drop(accepted.response);
            if let Err(e) = write_all(&mut stream, &head).await {
                // The client left. The relay still runs: it finds the client gone at
                // once and tells the backend with a Close, and the connection is
                // recorded as it ended.
                tracing::debug!(error = %e, "writing the 101 to the client failed");
            }
            let handoff = Handoff {
                client: Leg {
                    stream,
                    buffered: early.freeze(),
                },
                backend: accepted.backend,
                negotiated: accepted.negotiated,
                info: accepted.info,
            };
            // A task of its own, the size of the relay (under 1 KiB), for the
            // WebSocket's whole life, keeping the connection's seat (its slot) until it
            // ends. Boxed, as the client's task is (see `accept`): one copy into its
            // task instead of eight.
            let relay =
                boxed(|| relay::start(handoff, &gate.live, gate.metrics.clone(), busy.keep(false)));
            gate.tasks.tracker.spawn(relay);
            FirstUpgrade::Done
        }
        // An answer of wsgate's or the backend's refusal: hyper writes it, with
        // everything HTTP/1.1 asks of a response, and serves what follows.
        Err(response) => {
            let mut read = BytesMut::from(&head[..]);
            read.extend_from_slice(&early);
            FirstUpgrade::Answered {
                read: read.freeze(),
                stream,
                response,
            }
        }
    }
}

/// Reads what a client sends while it waits for its upgrade's answer into `early`;
/// completes when the client closes or resets its connection. Stops reading (and never
/// completes) once `early` is full.
async fn client_leaves(stream: &mut Stream, early: &mut BytesMut) {
    while early.len() < MAX_EARLY_BYTES {
        early.reserve(4096);
        match stream.read_buf(early).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending().await
}

/// An HTTP/1.1 response head (a 101 has no body), as hyper would write it.
fn response_head(response: &Response<Body>) -> Vec<u8> {
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
    head
}

async fn write_all(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    stream.write_all(bytes).await?;
    // TLS holds what it encrypted until flushed.
    stream.flush().await
}

/// Spawns hyper's HTTP/2 stream tasks on the server's tracker, so shutdown waits for
/// them like for everything else, each as a [`StreamTask`] that an exchange's abort
/// ends.
#[derive(Clone)]
struct StreamExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(StreamTask {
            inner: Some(Box::pin(fut)),
            abort: Arc::default(),
            watch: Watch::default(),
            polled: false,
        });
    }
}

/// One HTTP/2 stream's task: hyper's future for the stream, which is dropped when the
/// exchange on it is aborted from outside (an operator's close, a stalled client, the
/// drain deadline) — h2 then resets the stream (RST_STREAM CANCEL) and the exchange,
/// dropped with it, records why.
struct StreamTask<F> {
    inner: Option<Pin<Box<F>>>,
    abort: Arc<Abort>,
    /// The stream's deadlines: its client taking the body, the backend's head.
    watch: Watch,
    /// Polled before: the exchange has taken the abort already.
    polled: bool,
}

impl<F: Future> Future for StreamTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(());
        };
        if this.abort.poll(cx).is_ready() {
            this.inner = None;
            return Poll::Ready(());
        }
        let polled = if this.polled {
            inner.as_mut().poll(cx)
        } else {
            this.polled = true;
            Abort::enter(&this.abort, || inner.as_mut().poll(cx))
        };
        match polled {
            Poll::Ready(_) => {
                this.inner = None;
                Poll::Ready(())
            }
            Poll::Pending => {
                this.watch.check(&this.abort, None, cx);
                Poll::Pending
            }
        }
    }
}

/// Serves an HTTP/2 connection with hyper until it ends.
async fn serve_http2(gate: Arc<Gate>, stream: Stream, conn: Arc<ClientConn>) {
    let settings = gate.settings();
    let config = &settings.config;
    let mut builder = http2::Builder::new(StreamExecutor(gate.tasks.tracker.clone()));
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(config.http.max_header_size).unwrap_or(u32::MAX))
        // HTTP/2 PINGs find a vanished client on an otherwise quiet connection.
        .keep_alive_interval(config.websocket.ping_interval.unwrap_or(H2_KEEPALIVE))
        .keep_alive_timeout(config.websocket.pong_timeout);
    let service = route::service(gate.clone(), conn.clone(), None);
    let io = ClientIo::new(stream, conn.clone(), config.http.write_timeout);
    let served = Box::pin(builder.serve_connection(TokioIo::new(io), service));
    let driving = Driving {
        conn: &conn,
        drain: !conn.accepted_draining,
        // hyper has no idle timeout for HTTP/2: a connection with nothing open for
        // `header_read_timeout` is closed, as HTTP/1.1 keep-alive ones are.
        idle: Some(config.http.header_read_timeout),
        // Each stream has its own (see `StreamTask`).
        abort: None,
        head_limit: None,
    };
    drop(settings);
    let result = drive(served, |c| c.graceful_shutdown(), driving).await;
    ended(result);
}

/// Serves an HTTP/1.1 connection's plain requests with [`h1_server`], `read` the bytes
/// read from it so far, under the same driving as hyper's connections. `Some`: a
/// request that is not plain, which hyper serves from these bytes on.
async fn serve_plain(
    gate: &Arc<Gate>,
    stream: Stream,
    conn: &Arc<ClientConn>,
    read: Bytes,
) -> Option<(Bytes, Stream)> {
    let (head_limit, write_timeout) = {
        let settings = gate.settings();
        let http = &settings.config.http;
        (http.header_read_timeout, http.write_timeout)
    };
    // Set by the driving when the drain or the exit asks the connection to stop taking
    // requests; the loop reads it between requests and before a response's head.
    let closing = AtomicBool::new(false);
    let io = ClientIo::new(stream, conn.clone(), write_timeout);
    let served = boxed(|| h1_server::serve(gate.clone(), io, conn.clone(), read, &closing));
    let driving = Driving {
        conn,
        drain: !conn.accepted_draining,
        idle: None,
        abort: Some(&conn.abort),
        head_limit: Some(head_limit),
    };
    match drive(served, |_| closing.store(true, Ordering::Relaxed), driving).await {
        Some(h1_server::Ended::ToHyper(read, stream)) => Some((read, stream)),
        Some(h1_server::Ended::Closed) | None => None,
    }
}

/// Serves an HTTP/1.1 connection with hyper until it ends; `first` answers its first
/// request if given.
async fn serve_http1(
    gate: Arc<Gate>,
    stream: Prefixed<Stream>,
    conn: Arc<ClientConn>,
    first: Option<Response<Body>>,
) {
    let settings = gate.settings();
    let settings_head_limit = settings.config.http.header_read_timeout;
    let service = route::service(gate.clone(), conn.clone(), first);
    let io = TokioIo::new(ClientIo::new(
        stream,
        conn.clone(),
        settings.config.http.write_timeout,
    ));
    let http1 = if conn.accepted_draining {
        let mut once = settings.http1.clone();
        once.keep_alive(false);
        once.serve_connection(io, service)
    } else {
        settings.http1.serve_connection(io, service)
    };
    drop(settings);
    let served = Box::pin(http1.with_upgrades());
    let driving = Driving {
        conn: &conn,
        drain: !conn.accepted_draining,
        idle: None,
        abort: Some(&conn.abort),
        head_limit: Some(settings_head_limit),
    };
    let result = drive(served, |c| c.graceful_shutdown(), driving).await;
    ended(result);
}

/// What a served connection's end says of its client.
trait Noted {
    fn note(&self, conn: &ClientConn);
}

impl Noted for hyper::Result<()> {
    fn note(&self, conn: &ClientConn) {
        if let Err(e) = self {
            conn.note_error(e);
        }
    }
}

impl Noted for h1_server::Ended {
    fn note(&self, _: &ClientConn) {}
}

fn ended(result: Option<hyper::Result<()>>) {
    if let Some(Err(e)) = result {
        // Clients hang up mid-request all the time: not an error of wsgate's.
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// What ends a hyper connection besides its client.
struct Driving<'a> {
    conn: &'a ClientConn,
    /// The drain's signal applies: a connection from before it (one that came during
    /// it is served one request, then closes by itself).
    drain: bool,
    /// HTTP/2: closed once nothing was open on it for this long, and, once a graceful
    /// close began, as soon as nothing is open.
    idle: Option<Duration>,
    /// HTTP/1.1: the connection's own abort (an HTTP/2 stream's is its task's).
    abort: Option<&'a Abort>,
    /// HTTP/1.1: closed once nothing was open on it for this long
    /// (`http.header_read_timeout`): a keep-alive connection left idle, or a request
    /// head that does not come whole in time.
    head_limit: Option<Duration>,
}

/// What [`drive`] does next, besides serving.
enum Turn {
    /// Stop taking requests, finish the open ones.
    Graceful,
    /// End now: the drain deadline, or the exchange's abort.
    Now,
}

/// Serves a hyper connection until it ends. At the exit, when the drain begins, or once
/// an HTTP/2 connection had nothing open for its idle limit, it stops taking new
/// requests (`graceful`: GOAWAY, or `Connection: close`) and finishes the open ones,
/// until the drain deadline; an HTTP/2 connection then closes as soon as nothing is
/// open on it, whether or not its client answers the GOAWAY. An abort ends it at once:
/// its exchange records why.
///
/// The connection comes boxed: inline, hyper's state made the client task's future
/// 3.6 KiB, which tokio boxes itself and copies several times on every spawn.
async fn drive<F>(
    mut served: Pin<Box<F>>,
    graceful: impl FnOnce(Pin<&mut F>),
    d: Driving<'_>,
) -> Option<F::Output>
where
    F: Future,
    F::Output: Noted,
{
    let conn = d.conn;
    let note = |result: F::Output| {
        // Before `served` drops the exchanges still on it: they read why.
        result.note(conn);
        Some(result)
    };
    // The signals, the exchange's abort and the task's deadlines: a few atomic
    // operations per wake-up.
    let mut watch = Watch::default();
    let mut told_graceful = false;
    conn.idle_from_now();
    let mut turn = std::pin::pin!(std::future::poll_fn(move |cx| {
        let signals = conn.signals.poll(cx);
        if signals & Signals::FORCE != 0 {
            return Poll::Ready(Turn::Now);
        }
        if let Some(abort) = d.abort {
            let idle = d.head_limit.and_then(|limit| conn.idle_due(limit));
            if watch.check(abort, idle, cx) {
                tracing::debug!("closing an HTTP/1.1 connection idle past header_read_timeout");
                return Poll::Ready(Turn::Now);
            }
            if abort.poll(cx).is_ready() {
                return Poll::Ready(Turn::Now);
            }
        }
        let drained = d.drain && signals & Signals::DRAIN != 0;
        if !told_graceful && (drained || signals & Signals::STOP != 0) {
            told_graceful = true;
            return Poll::Ready(Turn::Graceful);
        }
        Poll::Pending
    }));
    let mut idle_out = std::pin::pin!(async {
        match d.idle {
            Some(limit) => conn.idle_for(limit).await,
            None => std::future::pending().await,
        }
    });
    let mut nothing_open = std::pin::pin!(async {
        match d.idle {
            Some(_) => conn.until_idle().await,
            None => std::future::pending().await,
        }
    });
    let mut graceful = Some(graceful);
    loop {
        tokio::select! {
            // `served` first: the stall watch reads what its poll handed over, and
            // after a graceful close its poll sends the GOAWAY.
            biased;
            result = served.as_mut() => return note(result),
            next = &mut turn => match next {
                Turn::Now => return None,
                Turn::Graceful => {
                    if let Some(graceful) = graceful.take() {
                        graceful(served.as_mut());
                    }
                }
            },
            () = &mut idle_out, if graceful.is_some() => {
                tracing::debug!("closing an idle HTTP/2 connection");
                if let Some(graceful) = graceful.take() {
                    graceful(served.as_mut());
                }
            }
            () = &mut nothing_open, if graceful.is_none() => return None,
        }
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
    let (mut builder, limit) = {
        let settings = gate.settings();
        (
            settings.http1.clone(),
            settings.config.http.header_read_timeout,
        )
    };
    builder.keep_alive(false);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    // One request, read within `header_read_timeout` (hyper's own head timer is off:
    // see `Settings::http1`), and its short answer.
    tokio::select! {
        _ = tokio::time::timeout(limit, served) => {}
        () = gate.tasks.force.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Clients, Slots};
    use crate::config::Config;

    /// A client's task is copied whole into fresh memory on every accept, and the task
    /// of a plain HTTP/1.1 connection lives in it: what only an upgrade, TLS, HTTP/2 or
    /// hyper needs must stay in boxes of their own (`crate::boxed`), not in its state.
    #[tokio::test]
    async fn a_client_task_keeps_only_what_a_plain_connection_needs() {
        let gate = Arc::new(Gate::new(Config::default(), 1, None).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let slot = Arc::new(Slots::new(1)).try_take().unwrap();
        let conn = ClientConn::new(
            1,
            tcp.peer_addr().unwrap(),
            0,
            false,
            slot,
            gate.metrics.connections_active.clone(),
            &Arc::new(Clients::new(1)),
        );
        let task = serve_client(gate, tcp, conn);
        let size = std::mem::size_of_val(&task);
        eprintln!("serve_client: {size} bytes");
        assert!(size <= 2048, "a client's task is {size} bytes");
    }
}
