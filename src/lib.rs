//! wsgate: a transparent WebSocket-aware reverse proxy sidecar that ends every
//! connection properly.
//!
//! # The life of a connection
//!
//! 1. [`server`] accepts a client TCP connection (bounded by `max_connections`), tunes
//!    the socket (TCP_NODELAY, keepalive, TCP_USER_TIMEOUT), terminates TLS if
//!    configured ([`tls`], [`stream`]) and serves HTTP/1.1 or HTTP/2 on it.
//! 2. A plain request goes to [`proxy`], which forwards it to the backend through a
//!    keep-alive pool and streams the response back.
//! 3. A WebSocket handshake (an HTTP/1.1 upgrade or an HTTP/2 extended CONNECT) goes to
//!    [`upgrade`], which validates it, opens a dedicated backend connection, repeats the
//!    handshake there as HTTP/1.1 and answers the client with the backend's own
//!    response. On success both streams go to a relay.
//! 4. [`relay`] runs two [`pump`]s, one per direction, in one task. Each pump forwards
//!    bytes unchanged while [`frame`] tracks frame boundaries, so wsgate can read Close
//!    codes, answer nothing on anyone's behalf, and insert its own Close or Ping frames
//!    between frames.
//! 5. [`session`], a pure state machine, decides how the connection ends: which Close
//!    goes where with which code, when to give up waiting, when each socket is released.
//! 6. When both sockets are closed, [`report`] records the connection once: one log line
//!    with its outcome, duration, release time, bytes, frames and close codes, and the
//!    same in [`metrics`].
//!
//! [`admin`] serves `/metrics`, `/livez`, `/readyz` and the [`live`] connection table;
//! [`shutdown`] turns SIGTERM/SIGINT into the drain of [`server::serve`] and SIGHUP into
//! a certificate reload; [`config`] reads the TOML file.

pub mod admin;
pub mod config;
pub mod frame;
pub mod live;
pub mod metrics;
pub mod proxy;
pub mod pump;
pub mod relay;
pub mod report;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod stream;
pub mod tls;
pub mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

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
    /// The server task itself failed (a bug: it panicked).
    #[error("the server task failed: {0}")]
    Internal(String),
}

/// Pending connections the kernel may queue per listener.
const LISTEN_BACKLOG: u32 = 4096;

/// The listening sockets, bound before serving so that tests can bind port 0 and read
/// the address back.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds `listen` and `admin.listen` from the configuration.
    pub async fn bind(config: &Config) -> Result<Listeners, Error> {
        let bind = |what, addr: SocketAddr| async move {
            let listen = || -> std::io::Result<TcpListener> {
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.set_reuseaddr(true)?;
                socket.bind(addr)?;
                // The default backlog (128) overflows when a few hundred clients
                // reconnect at once (a pod restart), and each dropped SYN costs the
                // client a 1 s retransmission. The kernel caps it at somaxconn.
                socket.listen(LISTEN_BACKLOG)
            };
            listen().map_err(|source| Error::Bind { what, addr, source })
        };
        let proxy = bind("listen", config.listen).await?;
        server::tune_listener(&proxy);
        let admin = match config.admin.listen {
            Some(addr) => Some(bind("admin.listen", addr).await?),
            None => None,
        };
        Ok(Listeners { proxy, admin })
    }
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
    let shared = Arc::new(server::Shared::new(config)?);
    // No helper task holds connections: all are stopped once the drain is over.
    let housekeeping = tokio::spawn(server::housekeeping(shared.clone()));
    let admin = listeners
        .admin
        .map(|l| tokio::spawn(admin::serve(l, shared.clone())));
    let reload = shared.tls.as_ref().map(|tls| {
        let interval = shared.config.tls.as_ref().and_then(|t| t.reload_interval);
        tokio::spawn(shutdown::reload_certificates(tls.cert.clone(), interval))
    });
    server::serve(shared, listeners.proxy, shutdown, abort).await;
    for task in admin.into_iter().chain(reload).chain([housekeeping]) {
        task.abort();
    }
    Ok(())
}

/// Binds the configured addresses and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    let listeners = Listeners::bind(&config).await?;
    let bound = |l: &TcpListener| {
        l.local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string())
    };
    tracing::info!(
        listen = %bound(&listeners.proxy),
        admin = %listeners.admin.as_ref().map_or_else(|| "off".to_string(), bound),
        backend = %config.backend.authority,
        max_connections = config.max_connections,
        workers = config.workers.count(),
        "wsgate started"
    );
    // The second `signal()` starts listening only when the drain starts, so it is the
    // next SIGTERM or SIGINT after the one that began the drain.
    serve_until(config, listeners, shutdown::signal(), shutdown::signal()).await
}
