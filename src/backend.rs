//! The way to the backend: one connect policy — TCP, socket options, TLS for an
//! `https://` backend, all within `http.connect_timeout` — used by both paths. A
//! WebSocket gets a dedicated connection from [`Backend::connect`]; plain HTTP requests
//! go through [`Backend::client`], a keep-alive pool per worker whose connections come
//! from the same [`Connector`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{self, Config};
use crate::error::{ProxyError, TlsError};
use crate::stream::Stream;
use crate::tls::BackendTls;

/// How long an idle pooled backend connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pooled HTTP client for plain requests.
pub type HttpClient = Client<Connector, Incoming>;

/// How wsgate connects to the backend. Cheap to clone (one pointer).
#[derive(Clone)]
pub struct Connector(Arc<Target>);

struct Target {
    backend: config::Backend,
    /// The backend's host, when it is an IP address.
    ip: Option<std::net::IpAddr>,
    /// TLS toward an `https://` backend.
    tls: Option<BackendTls>,
    connect_timeout: Duration,
}

impl Connector {
    /// Fails when the backend's CA bundle or client certificate does not load.
    pub fn new(config: &Config) -> Result<Connector, TlsError> {
        let tls = if config.backend.tls {
            Some(BackendTls::new(&config.backend_tls, &config.backend.host)?)
        } else {
            None
        };
        Ok(Connector(Arc::new(Target {
            ip: config.backend.host.parse().ok(),
            backend: config.backend.clone(),
            tls,
            connect_timeout: config.http.connect_timeout,
        })))
    }

    /// Opens a new connection to the backend: TCP, then TLS for an `https://` backend,
    /// both within `http.connect_timeout`.
    pub async fn connect(&self) -> Result<Stream, ProxyError> {
        let t = &*self.0;
        let b = &t.backend;
        let connect = async {
            // An IP address (the sidecar's 127.0.0.1) needs no lookup; a name is
            // resolved on each connect, so a changed DNS record is followed.
            let tcp = match t.ip {
                Some(ip) => TcpStream::connect((ip, b.port)).await,
                None => Box::pin(TcpStream::connect((b.host.as_str(), b.port))).await,
            };
            let tcp = tcp.map_err(|e| {
                tracing::debug!(error = %e, backend = %b.authority, "backend connect failed");
                ProxyError::BackendUnreachable
            })?;
            if b.loopback {
                // A loopback peer cannot vanish silently: when its process dies the
                // kernel closes its sockets. Keepalive and TCP_USER_TIMEOUT would only
                // cost five system calls per connection; Nagle still has to go.
                let _ = tcp.set_nodelay(true);
            } else {
                crate::listener::tune_socket(socket2::SockRef::from(&tcp));
            }
            let Some(tls) = &t.tls else {
                return Ok(Stream::Plain(tcp));
            };
            // Boxed: a TLS session is large, and inline it would make every upgrade's
            // future that large, TLS or not.
            let tls = Box::pin(tls.connector.connect(tls.server_name.clone(), tcp))
                .await
                .map_err(|e| {
                    // An untrusted or misnamed certificate: worth a warning, it is a
                    // configuration problem, not a client's.
                    tracing::warn!(error = %e, backend = %b.authority, "backend TLS handshake failed");
                    ProxyError::BackendUnreachable
                })?;
            Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
        };
        match tokio::time::timeout(t.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(backend = %b.authority, "backend connect timed out");
                Err(ProxyError::BackendUnreachable)
            }
        }
    }
}

/// The backend as the server uses it: the connector, and one keep-alive pool per
/// worker (a worker's requests use backend connections driven by its own thread).
pub struct Backend {
    connector: Connector,
    clients: Vec<HttpClient>,
}

impl Backend {
    /// For `workers` workers. Fails when TLS material toward the backend does not load.
    pub fn new(config: &Config, workers: usize) -> Result<Backend, TlsError> {
        let connector = Connector::new(config)?;
        let clients = (0..workers.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(connector.clone())
            })
            .collect();
        Ok(Backend { connector, clients })
    }

    /// A dedicated connection, for a WebSocket.
    pub async fn connect(&self) -> Result<Stream, ProxyError> {
        self.connector.connect().await
    }

    /// The pooled HTTP client of `worker`.
    pub fn client(&self, worker: usize) -> &HttpClient {
        &self.clients[worker % self.clients.len()]
    }
}

/// hyper's pool asks the connector for a connection per `Uri`; wsgate has one backend,
/// so the URI only keys the pool.
impl tower_service::Service<Uri> for Connector {
    type Response = PooledConn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PooledConn>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move {
            connector
                .connect()
                .await
                .map(|s| PooledConn(TokioIo::new(s)))
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.message()))
        })
    }
}

/// A pooled backend connection, in the I/O traits hyper's client speaks.
pub struct PooledConn(TokioIo<Stream>);

impl Connection for PooledConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for PooledConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl Write for PooledConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
