//! wsgate: a transparent WebSocket-aware reverse proxy sidecar that ends every
//! WebSocket and every streaming HTTP response properly, and visibly.
//!
//! # The life of an exchange
//!
//! 1. One of the [`worker`] threads accepts a client TCP connection on its own socket of
//!    the proxy port ([`listener`]: `SO_REUSEPORT`, TCP_NODELAY, keepalive,
//!    TCP_USER_TIMEOUT) and keeps everything about it on its thread from then on.
//!    [`server`] bounds it by `max_connections`, terminates TLS if configured ([`tls`],
//!    [`stream`]) and serves HTTP/1.1 or HTTP/2 on it; [`client`] is what the exchanges
//!    on it know of it (its id, how many are open on it, why it ended) and its socket,
//!    watched for writes that make no progress. [`route`] decides what each request
//!    becomes. Every request is an *exchange* with an id of its own, whether it is a
//!    WebSocket or an HTTP request, and however many share one HTTP/2 connection.
//! 2. A plain request goes to [`proxy`] as one [`exchange::Exchange`]: it borrows an
//!    HTTP/1.1 connection from its worker's pool of idle [`backend`] connections and
//!    drives it in its own task: [`h1`], wsgate's own HTTP/1.1 client, writes the
//!    request and reads the response on the backend's socket as the task polls it, the
//!    request body counted on the way ([`body`], header rules in [`headers`]). The response streams back in an
//!    [`exchange::ForwardedBody`], which sees where the exchange ends: the body's end,
//!    the backend failing (a truncation toward the client, never a clean end), a timer,
//!    the drain (an event stream ends at an event boundary, found by [`sse`]), an
//!    operator, or hyper dropping it because the client left. [`abort`] is how the task
//!    it runs in is ended from outside, and how a client that stopped reading is found.
//! 3. A WebSocket handshake (an HTTP/1.1 upgrade or an HTTP/2 extended CONNECT) goes to
//!    [`upgrade`], which validates it, opens a dedicated connection with the same
//!    [`backend`] connect policy, repeats the handshake there as HTTP/1.1 ([`handshake`]:
//!    one write, the answer parsed as it arrives) and answers the client with the
//!    backend's own response; a client that leaves before that answer has its backend
//!    connection closed at once. On success it hands both streams to a relay. What wsgate
//!    answers itself is an [`error::ProxyError`].
//! 4. [`relay`] spawns one task per WebSocket and runs two [`pump`]s in it, one per
//!    direction. Each pump forwards bytes unchanged while [`frame`] tracks frame
//!    boundaries, so wsgate can read Close codes, answer nothing on anyone's behalf, and
//!    insert its own Close or Ping frames between frames. Large payloads between plain
//!    TCP sockets move by [`splice`].
//! 5. [`session`], a pure state machine, decides how a WebSocket ends: which Close goes
//!    where with which code, when to give up waiting, when each socket is released.
//! 6. WebSockets and HTTP streams (event streams, bodies still open after
//!    `http.stream_after`) are in the [`live`] table while open: the admin page lists
//!    them, the drain and an operator reach them there. When an exchange ends, its
//!    [`record`] is written once by [`report`]: a log line with its outcome, duration,
//!    release time and bytes, the same in [`metrics`], and the [`history`] the admin page
//!    shows. A short request that completes adds one counter.
//!
//! Everything the workers share lives in one [`gate::Gate`]: the settings built from
//! the [`config`], the tasks and the signals that end them, the live table and the
//! metrics. [`admin`] serves `/metrics`, `/livez`, `/readyz`, the live table and its
//! page. [`signals`] turns SIGTERM/SIGINT into the end of [`server::serve`], which
//! begins the [`drain`] and then the [`exit`], and SIGHUP (or a changed file) into a
//! configuration reload, the TLS certificate included. These, and the drain, run on
//! worker 0: the thread that called [`serve`]. The words for an exchange's two ends are
//! in [`side`].

// The crate documentation is for the people who work on wsgate: it links its private
// modules, and CI builds it with `--document-private-items`, where those links resolve.
#![allow(rustdoc::private_intra_doc_links)]

mod abort;
mod admin;
mod backend;
mod body;
mod boxed;
mod client;
pub mod config;
pub mod demo;
pub mod drain;
mod error;
mod exchange;
mod exit;
pub mod frame;
mod gate;
mod h1;
mod h1_server;
mod handshake;
mod headers;
mod history;
mod listener;
mod live;
pub mod logging;
mod metrics;

mod proxy;
mod pump;
mod record;
mod relay;
mod report;
mod request_head;
mod route;
mod server;
mod session;
pub mod side;
mod signals;
mod splice;
pub mod sse;
mod stream;
mod tls;
pub mod upgrade;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;
pub use error::Error;
pub use listener::{Listeners, reserved_descriptors, websocket_capacity};
pub use side::Side;

/// Serves on pre-bound listeners until `shutdown` completes, then drains and returns.
/// Fails before serving if the TLS material does not load.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let hangup = signals::Hangup::listen();
    let abort = std::future::pending();
    serve_with(
        config,
        listeners,
        Process::default(),
        hangup,
        shutdown,
        abort,
    )
    .await
}

/// What a wsgate started as a process has besides its configuration: the source to
/// reload it from, and the logger a reload may switch to another format.
#[derive(Default)]
pub struct Process {
    /// Where the configuration came from, and the file content it was read from (a
    /// reload happens when the content differs); `None`: nothing to reload (SIGHUP
    /// still never ends the process).
    pub source: Option<(config::Source, Vec<u8>)>,
    pub logging: Option<logging::Logging>,
}

/// Serves on pre-bound listeners, reloading the configuration on SIGHUP or when its
/// file changes, until SIGTERM or SIGINT; then drains and returns. A second SIGTERM or
/// SIGINT during the drain aborts what is left.
pub async fn run(config: Config, listeners: Listeners, process: Process) -> Result<(), Error> {
    // Listening before saying we started: a signal sent on that word must not find the
    // default action (which ends the process) still in place.
    let hangup = signals::Hangup::listen();
    let stop = signals::stop();
    // The second listener is made only when the exit starts (an async block runs
    // nothing until polled), so it waits for the signal after the one that began it.
    let abort = async { signals::stop().await };
    let shown =
        |a: std::io::Result<SocketAddr>| a.map_or_else(|e| e.to_string(), |a| a.to_string());
    tracing::info!(
        listen = %shown(listeners.local_addr()),
        admin = %listeners.admin.as_ref().map_or_else(|| "off".to_string(), |l| shown(l.local_addr())),
        backend = %config.backend.authority,
        max_connections = config
            .max_connections
            .resolve(websocket_capacity(listeners.proxy.len())),
        workers = listeners.proxy.len(),
        "wsgate started"
    );
    serve_with(config, listeners, process, hangup, stop, abort).await
}

/// `abort`, first polled when the exit starts, ends it at once when it completes: what
/// is still open is reset.
async fn serve_with(
    config: Config,
    listeners: Listeners,
    process: Process,
    hangup: signals::Hangup,
    stop: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) -> Result<(), Error> {
    let mut proxy = listeners.proxy.into_iter();
    let first = proxy
        .next()
        .ok_or_else(|| Error::Internal("no proxy listener".into()))?;
    let gate = Arc::new(gate::Gate::new(config, 1 + proxy.len(), process.logging)?);
    let register =
        |what, l| TcpListener::from_std(l).map_err(|source| Error::Register { what, source });
    let first = register("listen", first)?;
    let admin_listener = listeners
        .admin
        .map(|l| register("admin.listen", l))
        .transpose()?;
    // Worker 0 is this task's thread; the others get threads of their own.
    let workers = worker::Workers::start(&gate, proxy.collect()).await?;
    // No helper task holds connections: all are stopped once the drain is over.
    let helpers = [
        Some(tokio::spawn(gate::housekeeping(gate.clone()))),
        admin_listener.map(|l| tokio::spawn(admin::serve(l, gate.clone()))),
        Some(tokio::spawn(signals::watch(
            gate.clone(),
            process.source,
            hangup,
        ))),
    ];
    server::serve(gate, first, stop, abort).await;
    workers.stop().await;
    for task in helpers.into_iter().flatten() {
        task.abort();
    }
    Ok(())
}
