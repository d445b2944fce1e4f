//! wsgate: a transparent WebSocket-aware reverse proxy sidecar that ends every
//! connection properly.
//!
//! # The life of a connection
//!
//! 1. One of the [`worker`] threads accepts a client TCP connection on its own socket of
//!    the proxy port ([`listener`]: `SO_REUSEPORT`, TCP_NODELAY, keepalive,
//!    TCP_USER_TIMEOUT) and keeps everything about it on its thread from then on.
//!    [`server`] bounds it by `max_connections`, terminates TLS if configured ([`tls`],
//!    [`stream`]) and serves HTTP/1.1 or HTTP/2 on it.
//! 2. A plain request goes to [`proxy`], which forwards it to the backend through the
//!    worker's keep-alive pool and streams the response back.
//! 3. A WebSocket handshake (an HTTP/1.1 upgrade or an HTTP/2 extended CONNECT) goes to
//!    [`upgrade`], which validates it, opens a dedicated backend connection, repeats the
//!    handshake there as HTTP/1.1 ([`handshake`]: one write, the answer parsed as it
//!    arrives) and answers the client with the backend's own response. On success both
//!    streams go to a relay.
//! 4. [`relay`] runs two [`pump`]s, one per direction, in one task. Each pump forwards
//!    bytes unchanged while [`frame`] tracks frame boundaries, so wsgate can read Close
//!    codes, answer nothing on anyone's behalf, and insert its own Close or Ping frames
//!    between frames. Large payloads between plain TCP sockets move by [`splice`].
//! 5. [`session`], a pure state machine, decides how the connection ends: which Close
//!    goes where with which code, when to give up waiting, when each socket is released.
//! 6. When both sockets are closed, [`report`] records the connection once: one log line
//!    with its outcome, duration, release time, bytes, frames and close codes, and the
//!    same in [`metrics`].
//!
//! [`admin`] serves `/metrics`, `/livez`, `/readyz` and the [`live`] connection table;
//! [`shutdown`] turns SIGTERM/SIGINT into the drain of [`server::serve`] and SIGHUP into
//! a certificate reload; [`config`] reads the TOML file. These, and the drain, run on
//! worker 0: the thread that called [`serve`].

pub mod admin;
pub mod config;
pub mod demo;
pub mod frame;
pub mod handshake;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod proxy;
pub mod pump;
pub mod relay;
pub mod report;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod splice;
pub mod stream;
pub mod tls;
pub mod upgrade;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;

pub use config::Config;
pub use listener::Listeners;

/// Errors that stop wsgate from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound: the address is in use or not local.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A TLS certificate, key or CA bundle does not load: fix the file named.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// A bound listener could not be registered with the runtime (out of memory or
    /// descriptors).
    #[error("cannot watch the {what} socket: {source}")]
    Register {
        what: &'static str,
        source: std::io::Error,
    },
    /// A worker thread could not start (no threads or memory left).
    #[error("worker {index} failed to start: {why}")]
    Worker { index: usize, why: String },
    /// The server task itself failed (a bug: it panicked).
    #[error("the server task failed: {0}")]
    Internal(String),
}

/// Serves on pre-bound listeners until `shutdown` completes, then drains and returns.
/// Fails before serving if the TLS material does not load.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    serve_until(config, listeners, shutdown, std::future::pending()).await
}

/// Like [`serve`]; `abort`, first polled when the drain starts, ends the drain at once
/// when it completes (a second SIGTERM): what is still open is reset.
pub async fn serve_until(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) -> Result<(), Error> {
    let mut proxy = listeners.proxy.into_iter();
    let first = proxy
        .next()
        .ok_or_else(|| Error::Internal("no proxy listener".into()))?;
    let shared = Arc::new(server::Shared::new(config, 1 + proxy.len())?);
    let register =
        |what, l| TcpListener::from_std(l).map_err(|source| Error::Register { what, source });
    let first = register("listen", first)?;
    let admin_listener = listeners
        .admin
        .map(|l| register("admin.listen", l))
        .transpose()?;
    // Worker 0 is this task's thread; the others get threads of their own.
    let workers = worker::Workers::start(&shared, proxy.collect()).await?;
    shared.ready.store(true, Ordering::SeqCst);
    // No helper task holds connections: all are stopped once the drain is over.
    let housekeeping = tokio::spawn(server::housekeeping(shared.clone()));
    let admin = admin_listener.map(|l| tokio::spawn(admin::serve(l, shared.clone())));
    let reload = shared.tls.as_ref().map(|tls| {
        let interval = shared.config.tls.as_ref().and_then(|t| t.reload_interval);
        tokio::spawn(shutdown::reload_certificates(tls.cert.clone(), interval))
    });
    server::serve(shared, first, shutdown, abort).await;
    workers.stop().await;
    for task in admin.into_iter().chain(reload).chain([housekeeping]) {
        task.abort();
    }
    Ok(())
}

/// Binds the configured addresses and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    let listeners = Listeners::bind(&config)?;
    let shown =
        |a: std::io::Result<SocketAddr>| a.map_or_else(|e| e.to_string(), |a| a.to_string());
    tracing::info!(
        listen = %shown(listeners.local_addr()),
        admin = %listeners.admin.as_ref().map_or_else(|| "off".to_string(), |l| shown(l.local_addr())),
        backend = %config.backend.authority,
        max_connections = config.max_connections,
        workers = listeners.proxy.len(),
        "wsgate started"
    );
    // The second `signal()` starts listening only when the drain starts, so it is the
    // next SIGTERM or SIGINT after the one that began the drain.
    serve_until(config, listeners, shutdown::signal(), shutdown::signal()).await
}
