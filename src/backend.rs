//! The way to the backend: one connect policy — TCP, socket options, TLS for an
//! `https://` backend, all within `http.connect_timeout` — used by both paths. A
//! WebSocket gets a dedicated connection from [`Backend::connect`]; an HTTP exchange
//! borrows an HTTP/1.1 connection ([`Lease`]) from its worker's [`Pool`] of idle ones,
//! or a new one from the same [`Connector`], drives it in its own task with
//! [`crate::h1`] and gives it back when its response has ended.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::boxed::boxed;
use crate::config::{self, Config};
use crate::error::{ProxyError, TlsError};
use crate::h1;
use crate::stream::Stream;
use crate::tls::BackendTls;

/// How long an idle backend connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How wsgate connects to the backend. Cheap to clone (one pointer).
#[derive(Clone)]
pub struct Connector(Arc<Target>);

struct Target {
    backend: config::BackendUrl,
    /// The backend's host, when it is an IP address.
    ip: Option<std::net::IpAddr>,
    /// TLS toward an `https://` backend.
    tls: Option<BackendTls>,
    connect_timeout: Duration,
    /// The longest response head accepted from the backend.
    max_header_size: usize,
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
            max_header_size: config.http.max_header_size,
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
                None => boxed(|| TcpStream::connect((b.host.as_str(), b.port))).await,
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
            let tls = boxed(|| tls.connector.connect(tls.server_name.clone(), tcp))
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

/// The backend as the server uses it: the connector, and one pool of idle HTTP/1.1
/// connections per worker (a worker's exchanges use backend connections on its own
/// thread).
pub struct Backend {
    connector: Connector,
    pools: Vec<Pool>,
}

impl Backend {
    /// For `workers` workers. Fails when TLS material toward the backend does not load.
    pub fn new(config: &Config, workers: usize) -> Result<Backend, TlsError> {
        let connector = Connector::new(config)?;
        let pools = (0..workers.max(1)).map(|_| Pool::default()).collect();
        Ok(Backend { connector, pools })
    }

    /// A dedicated connection, for a WebSocket.
    pub async fn connect(&self) -> Result<Stream, ProxyError> {
        self.connector.connect().await
    }

    /// An idle HTTP/1.1 connection of `worker`'s pool that is still open, polled with
    /// `cx` (the exchange's task takes over its wake-ups); `None`: make a
    /// [`Backend::fresh`] one.
    pub fn take(&self, worker: usize, cx: &mut Context<'_>) -> Option<Lease> {
        self.pool(worker).take(cx)
    }

    /// Gives a connection back to `worker`'s pool after a completed response, if it
    /// can carry another request to this backend (a reload may have changed it);
    /// else closes it.
    pub fn put(&self, worker: usize, lease: Lease) {
        if Arc::ptr_eq(&lease.origin.0, &self.connector.0) {
            self.pool(worker).put(lease);
        }
    }

    /// A new HTTP/1.1 connection.
    pub async fn fresh(&self) -> Result<Lease, ProxyError> {
        let stream = self.connector.connect().await?;
        Ok(Lease {
            conn: Box::new(h1::Conn::new(stream, self.connector.0.max_header_size)),
            reused: false,
            origin: self.connector.clone(),
        })
    }

    fn pool(&self, worker: usize) -> &Pool {
        &self.pools[worker % self.pools.len()]
    }

    /// Closes the idle connections that expired or that the backend closed.
    pub fn sweep(&self) {
        for pool in &self.pools {
            pool.sweep();
        }
    }
}

/// A backend connection lent to one exchange, which drives it in its own task: the
/// request goes out and the response comes in as the exchange polls it (see
/// [`crate::h1`]), with no other task and no channel between them. Dropping it closes
/// the connection.
pub struct Lease {
    /// Boxed: a lease moves with its exchange (into the response body, then into
    /// hyper's dispatcher) and in and out of the pool, a few times per request; the
    /// connection's state is ten times a pointer's size, and one allocation per backend
    /// connection costs less than copying it on every move.
    conn: Box<h1::Conn>,
    /// It served an exchange before this one.
    reused: bool,
    /// The connector that made it: a reload that changes the backend makes another.
    origin: Connector,
}

impl Lease {
    /// Starts the exchange of `req`: it goes out as the lease is polled.
    pub fn start(&mut self, req: h1::Outgoing) {
        self.conn.start(req);
    }

    /// Writes the request and reads the response head (see [`h1::Conn::poll_head`]).
    pub fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<hyper::Response<()>, h1::Failed>> {
        self.conn.poll_head(cx)
    }

    /// The next part of the response body (see [`h1::Conn::poll_frame`]).
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, h1::Error>>> {
        self.conn.poll_frame(cx)
    }

    /// The response body has ended.
    pub fn is_end_stream(&self) -> bool {
        self.conn.is_end_stream()
    }

    /// What is known of the response body's length.
    pub fn size_hint(&self) -> hyper::body::SizeHint {
        self.conn.size_hint()
    }

    /// It served an exchange before this one, so a request it cannot take is no sign
    /// that the backend is down.
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// It can carry another request: open, and done with the last one.
    pub fn is_reusable(&self) -> bool {
        self.conn.is_reusable()
    }

    /// The backend closed it while it was idle (or sent what nobody asked for). Polled
    /// for no task: the pool's sweep or next take looks again.
    fn has_ended(&mut self) -> bool {
        !self
            .conn
            .poll_idle(&mut Context::from_waker(std::task::Waker::noop()))
    }
}

/// Idle HTTP/1.1 connections of one worker, most recently used first out: a client's
/// requests, one after the other, keep using the same connection, and a client with
/// nothing in flight holds none. An idle connection is not polled; a connection the
/// backend closed meanwhile is found when it is taken (polled once then) or by the
/// sweep every second.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    lease: Lease,
    since: Instant,
}

impl Pool {
    /// An idle connection that is still open, polled with `cx` (the exchange's task
    /// takes over its wake-ups).
    fn take(&self, cx: &mut Context<'_>) -> Option<Lease> {
        loop {
            let idle = lock(&self.idle).pop()?;
            if idle.since.elapsed() >= POOL_IDLE_TIMEOUT {
                continue;
            }
            let mut lease = idle.lease;
            // The backend may have closed it meanwhile: a read finds its end, and
            // otherwise leaves a wake-up for this task.
            if lease.conn.poll_idle(cx) {
                lease.reused = true;
                return Some(lease);
            }
        }
    }

    /// Takes `lease` back if it can carry another request; else closes it.
    fn put(&self, mut lease: Lease) {
        if !lease.is_reusable() {
            return;
        }
        lease.conn.reset();
        let mut idle = lock(&self.idle);
        if idle.len() >= MAX_IDLE_PER_WORKER {
            // The oldest goes: drop it outside the lock.
            let oldest = idle.remove(0);
            idle.push(Idle {
                lease,
                since: Instant::now(),
            });
            drop(idle);
            drop(oldest);
            return;
        }
        idle.push(Idle {
            lease,
            since: Instant::now(),
        });
    }

    /// Closes the connections idle for longer than [`POOL_IDLE_TIMEOUT`] and those the
    /// backend closed.
    fn sweep(&self) {
        let mut gone = Vec::new();
        {
            let mut idle = lock(&self.idle);
            let mut i = 0;
            while i < idle.len() {
                let expired = idle[i].since.elapsed() >= POOL_IDLE_TIMEOUT;
                if expired || idle[i].lease.has_ended() {
                    gone.push(idle.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            // Most recently used last again (swap_remove moved some).
            idle.sort_by_key(|i| i.since);
        }
        drop(gone);
    }

    /// Idle connections held.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// At most this many idle connections per worker: enough for the concurrency of a
/// busy sidecar, few enough that a burst does not leave hundreds open.
const MAX_IDLE_PER_WORKER: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hyper::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::body::RequestBody;

    use super::*;

    /// A backend on loopback that answers every request on a connection with "ok" and
    /// hands each accepted socket's server end to the test through `accepted`.
    async fn backend() -> (Backend, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = Config::default();
        config.backend =
            config::BackendUrl::parse(&format!("http://{}", l.local_addr().unwrap())).unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let _ = tx.send(s);
            }
        });
        (Backend::new(&config, 1).unwrap(), rx)
    }

    /// Sends one GET on `lease` with an empty body, answered by the test through
    /// `server`; drives the connection until the response has ended.
    async fn exchange(lease: &mut Lease, server: &mut TcpStream) {
        lease.start(h1::Outgoing::new(hyper_body(), &[]));
        let mut head = [0u8; 1024];
        let answer = async {
            let n = server.read(&mut head).await.unwrap();
            assert!(head[..n].starts_with(b"GET / HTTP/1.1"));
            server
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
        };
        let response = std::future::poll_fn(|cx| lease.poll_head(cx));
        let (resp, ()) = tokio::join!(response, answer);
        assert_eq!(resp.ok().unwrap().status(), 200);
        let frame = std::future::poll_fn(|cx| lease.poll_frame(cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "ok");
        // The end of the body.
        assert!(lease.is_end_stream());
        assert!(
            std::future::poll_fn(|cx| lease.poll_frame(cx))
                .await
                .is_none()
        );
    }

    /// A GET without a body.
    fn hyper_body() -> Request<RequestBody> {
        Request::get("/").body(RequestBody::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_pooled_connection_the_backend_closed_is_not_taken() {
        let (backend, mut accepted) = backend().await;
        let mut lease = backend.fresh().await.unwrap();
        let mut server = accepted.recv().await.unwrap();
        exchange(&mut lease, &mut server).await;
        backend.put(0, lease);
        // The backend closes it while it waits. Until its end reaches the connection, a
        // take may still find it open (and it goes back); once it has, the take's poll
        // must find it closed. Without that poll, it would be taken forever.
        drop(server);
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match std::future::poll_fn(|cx| Poll::Ready(backend.take(0, cx))).await {
                    Some(lease) => backend.put(0, lease),
                    None => break,
                }
                // Lets the runtime's I/O driver run (a yield is woken after it).
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a closed connection was taken from the pool until the timeout");
        assert_eq!(backend.pool(0).len(), 0);
    }

    #[tokio::test]
    async fn a_connection_goes_back_to_the_pool_and_is_swept_when_the_backend_closes_it() {
        let (backend, mut accepted) = backend().await;
        let mut lease = backend.fresh().await.unwrap();
        assert!(!lease.is_reused());
        let mut server = accepted.recv().await.unwrap();
        exchange(&mut lease, &mut server).await;
        backend.put(0, lease);
        assert_eq!(backend.pool(0).len(), 1);
        // Taken again: the same connection, reused.
        let taken = std::future::poll_fn(|cx| Poll::Ready(backend.take(0, cx))).await;
        let mut lease = taken.expect("the idle connection");
        assert!(lease.is_reused());
        exchange(&mut lease, &mut server).await;
        backend.put(0, lease);
        // The backend closes it: the sweep finds it and lets it go.
        drop(server);
        tokio::time::timeout(Duration::from_secs(5), async {
            while backend.pool(0).len() > 0 {
                backend.sweep();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert!(
            accepted.try_recv().is_err(),
            "no second connection was made"
        );
    }
}
