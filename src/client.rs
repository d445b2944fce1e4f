//! A client's TCP connection as the exchanges on it see it: who it is, how many
//! exchanges are open on it (which tells when it is idle), why it ended when it cut an
//! exchange short, and its socket, watched for writes that make no progress. Also every
//! open client connection in one registry ([`Clients`]), through which the drain and
//! the exit reach them, and the limit on how many may be open ([`Slots`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::abort::Abort;
use crate::record::Outcome;

/// One accepted client connection. Its [`Seat`] is given back when it drops, or, for a
/// WebSocket relayed over HTTP/1.1, when the relay ends.
#[derive(Debug)]
pub struct ClientConn {
    /// Process-unique id (the exchanges on it have their own), in log lines.
    pub id: u64,
    pub peer: SocketAddr,
    /// The client's address as `X-Forwarded-For` carries it, made once.
    pub forwarded_for: hyper::header::HeaderValue,
    /// The worker serving it (0 is the thread that started the server).
    pub worker: usize,
    /// It came while wsgate was draining: it is served one request, then closed.
    /// Connections from before the drain close gracefully when it begins.
    pub accepted_draining: bool,
    seat: Arc<Seat>,
    /// Exchanges open on it ([`Busy`] guards): requests whose response has not ended,
    /// WebSockets relayed.
    busy: AtomicUsize,
    /// When it was accepted: `idle_since_us` counts from it.
    created: Instant,
    /// When `busy` last dropped to 0 (or the connection was accepted), in microseconds
    /// after `created`.
    idle_since_us: AtomicU64,
    /// Woken when `busy` drops to 0, for an HTTP/2 connection (its streams end in other
    /// tasks); an HTTP/1.1 connection's exchanges end in its own task, which looks
    /// itself.
    became_idle: tokio::sync::Notify,
    /// Someone waits on `became_idle`.
    idle_watched: AtomicBool,
    /// A write to the client is waiting for room: the connection is not idle while it
    /// still owes the client bytes.
    writing: AtomicBool,
    /// Why the connection ended, when it was not simply the client leaving
    /// (`Outcome::idx() + 1`; 0: nothing known): the exchanges it cut short read it.
    cause: AtomicU8,
    /// Ends an HTTP/1.1 connection's task from outside: its exchange's admin close,
    /// stall or forced end (an HTTP/2 stream has an [`Abort`] of its own).
    pub abort: Arc<Abort>,
    /// What the drain and the exit asked of it.
    pub signals: Signals,
    /// The registry it is in, which it leaves when dropped.
    registry: Arc<Clients>,
}

impl ClientConn {
    /// A new connection, in `registry` (where the signals already sent reach it too).
    pub fn new(
        id: u64,
        peer: SocketAddr,
        worker: usize,
        accepted_draining: bool,
        slot: Slot,
        active: metrics::Gauge,
        registry: &Arc<Clients>,
    ) -> Arc<Self> {
        active.increment(1.0);
        let seat = Arc::new(Seat {
            _slot: slot,
            active,
        });
        let conn = Arc::new(ClientConn {
            id,
            peer,
            forwarded_for: crate::headers::address_value(peer.ip()),
            worker,
            accepted_draining,
            seat,
            busy: AtomicUsize::new(0),
            created: Instant::now(),
            idle_since_us: AtomicU64::new(0),
            became_idle: tokio::sync::Notify::new(),
            idle_watched: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            cause: AtomicU8::new(0),
            abort: Arc::default(),
            signals: Signals::default(),
            registry: registry.clone(),
        });
        registry.add(&conn);
        conn
    }

    /// Since when nothing has been open on it.
    fn idle_since(&self) -> Instant {
        self.created + Duration::from_micros(self.idle_since_us.load(Ordering::SeqCst))
    }

    /// Marks it idle from now (a connection whose serving starts now).
    pub fn idle_from_now(&self) {
        let us = self.created.elapsed().as_micros() as u64;
        self.idle_since_us.store(us, Ordering::SeqCst);
    }

    /// When it will have been idle for `limit`, if nothing is open on it and nothing
    /// waits to be written to it.
    pub fn idle_due(&self, limit: Duration) -> Option<Instant> {
        (self.is_idle() && !self.writing.load(Ordering::SeqCst)).then(|| self.idle_since() + limit)
    }

    /// Completes once the connection has had nothing open for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            self.until_idle().await;
            let since = self.idle_since();
            if since.elapsed() >= limit && self.is_idle() {
                return;
            }
            tokio::time::sleep_until((since + limit).into()).await;
        }
    }

    /// Completes once nothing is open on the connection. For an HTTP/2 connection,
    /// whose exchanges end in their streams' tasks.
    pub async fn until_idle(&self) {
        self.idle_watched.store(true, Ordering::SeqCst);
        loop {
            let notified = self.became_idle.notified();
            tokio::pin!(notified);
            // Registered before the check: an exchange ending right after it still
            // wakes us.
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// Nothing is open on it.
    pub fn is_idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
    }

    /// Notes why the connection ends, if nothing was noted before.
    pub fn ended_because(&self, outcome: Outcome) {
        let _ = self.cause.compare_exchange(
            0,
            outcome.idx() as u8 + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Why the connection ended, if something other than the client's leaving ended
    /// it.
    pub fn cause(&self) -> Option<Outcome> {
        match self.cause.load(Ordering::Acquire) {
            0 => None,
            code => Outcome::ALL.get(usize::from(code) - 1).copied(),
        }
    }

    /// Notes what a hyper connection's error says of the client: a PING or a TCP
    /// timeout that went unanswered.
    pub fn note_error(&self, error: &hyper::Error) {
        if is_timeout(error) {
            self.ended_because(Outcome::ClientUnresponsive);
        }
    }
}

/// Whether a hyper error is a timeout of the client's: HTTP/2's keep-alive PING
/// unanswered (hyper's `is_timeout`), or TCP keepalive or TCP_USER_TIMEOUT giving up
/// (an I/O error in its sources).
fn is_timeout(error: &hyper::Error) -> bool {
    if error.is_timeout() {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::TimedOut
        {
            return true;
        }
        source = e.source();
    }
    false
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        self.registry.remove(self.worker, self.id);
    }
}

/// A client connection's place while its TCP connection is open: its `max_connections`
/// slot and its count in `wsgate_connections_active`, given back when the last holder
/// drops it.
#[derive(Debug)]
pub struct Seat {
    _slot: Slot,
    active: metrics::Gauge,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.active.decrement(1.0);
    }
}

/// What a WebSocket relayed over a client connection keeps of it for the WebSocket's
/// whole life.
#[derive(Debug)]
pub struct Kept {
    _seat: Arc<Seat>,
    /// Over HTTP/2 the connection goes on serving other streams and must count the
    /// WebSocket as open on it. Over HTTP/1.1 the connection's task ended with the
    /// upgrade: the seat is all that is left to hold, and an idle WebSocket does not keep
    /// the connection's HTTP state (hundreds of bytes) alive.
    _busy: Option<Busy>,
}

/// What the drain and the exit ask of every client connection's task: a set of flags and
/// the task's waker, checked with two atomic operations per wake-up (a cancellation
/// token's future per signal took a shared lock at every wake-up of every connection).
#[derive(Debug, Default)]
pub struct Signals {
    bits: AtomicU8,
    waker: AtomicWaker,
}

impl Signals {
    /// The drain began: finish what is open and close (a connection from before it).
    pub const DRAIN: u8 = 1;
    /// The exit began: finish what is open and close.
    pub const STOP: u8 = 2;
    /// The drain deadline passed: close now.
    pub const FORCE: u8 = 4;

    fn post(&self, bits: u8) {
        if bits != 0 {
            self.bits.fetch_or(bits, Ordering::SeqCst);
            self.waker.wake();
        }
    }

    /// The signals posted so far (they stay set); registers the task for the next.
    pub fn poll(&self, cx: &mut Context<'_>) -> u8 {
        self.waker.register(cx.waker());
        self.bits.load(Ordering::SeqCst)
    }
}

/// Every open client connection, per worker, and the signals sent to all of them.
#[derive(Debug, Default)]
pub struct Clients {
    /// Per worker: its open connections (a connection takes its worker's lock when it
    /// opens and closes; the drain takes each once).
    open: Vec<Mutex<HashMap<u64, Weak<ClientConn>>>>,
    /// The signals sent so far: a connection that opens later gets them at once.
    sent: AtomicU8,
}

impl Clients {
    /// A registry for `workers` workers.
    pub fn new(workers: usize) -> Clients {
        Clients {
            open: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
            sent: AtomicU8::new(0),
        }
    }

    fn map(&self, worker: usize) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<ClientConn>>> {
        self.open[worker % self.open.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, conn: &Arc<ClientConn>) {
        self.map(conn.worker).insert(conn.id, Arc::downgrade(conn));
        // After the insert: a signal sent meanwhile either finds it in the map or is
        // already in `sent`.
        conn.signals.post(self.sent.load(Ordering::SeqCst));
    }

    fn remove(&self, worker: usize, id: u64) {
        self.map(worker).remove(&id);
    }

    /// Posts `bits` to every open connection, and to those that open from now on.
    pub fn signal(&self, bits: u8) {
        self.sent.fetch_or(bits, Ordering::SeqCst);
        for worker in 0..self.open.len() {
            let open: Vec<Arc<ClientConn>> = self
                .map(worker)
                .values()
                .filter_map(Weak::upgrade)
                .collect();
            for conn in open {
                conn.signals.post(bits);
            }
        }
    }
}

/// Keeps its connection busy while alive: one per exchange open on it (a request until
/// its response ends, a WebSocket for its whole life). It also holds the connection's
/// `max_connections` slot.
#[derive(Debug)]
pub struct Busy(Arc<ClientConn>);

impl Busy {
    pub fn new(conn: Arc<ClientConn>) -> Busy {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Busy(conn)
    }
}

impl Busy {
    /// What a WebSocket relayed over this connection keeps of it (see [`Kept`]).
    pub fn keep(self, over_h2: bool) -> Kept {
        Kept {
            _seat: self.0.seat.clone(),
            _busy: over_h2.then_some(self),
        }
    }
}

impl std::ops::Deref for Busy {
    type Target = ClientConn;
    fn deref(&self) -> &ClientConn {
        &self.0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle_from_now();
            if self.0.idle_watched.load(Ordering::SeqCst) {
                self.0.became_idle.notify_waiters();
            }
        }
    }
}

/// The client's stream as hyper serves it: writes that make no progress for
/// `http.write_timeout` fail (the connection then ends, its exchanges as
/// `client_stalled`), and a timed-out read or write marks the client unresponsive.
/// The timer exists only once a write had to wait.
#[derive(Debug)]
pub struct ClientIo<S> {
    io: S,
    conn: Arc<ClientConn>,
    write_timeout: Option<Duration>,
    /// Armed while a write waits: the moment it gives up.
    stall: Option<Pin<Box<Sleep>>>,
    stall_armed: bool,
    /// A write is waiting (the connection says so, see [`ClientConn::idle_due`]).
    waiting: bool,
}

impl<S> ClientIo<S> {
    pub fn new(io: S, conn: Arc<ClientConn>, write_timeout: Option<Duration>) -> Self {
        ClientIo {
            io,
            conn,
            write_timeout,
            stall: None,
            stall_armed: false,
            waiting: false,
        }
    }

    pub fn into_inner(self) -> S {
        self.io
    }

    /// The stream inside, to look at (what kind it is), not to do I/O on past the
    /// write timeout.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// A write is waiting: fails it once it has waited `write_timeout`.
    fn waited(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(limit) = self.write_timeout else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + limit;
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stall_armed {
            sleep.as_mut().reset(deadline);
            self.stall_armed = true;
        }
        if sleep.as_mut().poll(cx).is_ready() {
            self.conn.ended_because(Outcome::ClientStalled);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no bytes for http.write_timeout",
            ));
        }
        Ok(())
    }

    /// What a write's result says of the client.
    fn wrote<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending if !self.waiting => {
                self.waiting = true;
                self.conn.writing.store(true, Ordering::SeqCst);
                match self.waited(cx) {
                    Ok(()) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
            Poll::Pending => match self.waited(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            Poll::Ready(result) => {
                self.stall_armed = false;
                if std::mem::take(&mut self.waiting) {
                    self.conn.writing.store(false, Ordering::SeqCst);
                    if self.conn.is_idle() {
                        // Idle from when the client took the last bytes.
                        self.conn.idle_from_now();
                    }
                }
                if let Err(e) = &result {
                    self.failed(e);
                }
                Poll::Ready(result)
            }
        }
    }

    fn failed(&self, e: &io::Error) {
        if e.kind() == io::ErrorKind::TimedOut {
            self.conn.ended_because(Outcome::ClientUnresponsive);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &polled {
            this.failed(e);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.wrote(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.wrote(cx, polled)
    }
}

/// Client connections open, and how many may be (`max_connections`, which a reload
/// may change).
#[derive(Debug)]
pub struct Slots {
    max: AtomicUsize,
    taken: AtomicUsize,
}

/// One client connection's place; given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(max: usize) -> Self {
        Slots {
            max: AtomicUsize::new(max),
            taken: AtomicUsize::new(0),
        }
    }

    /// A new `max_connections`: a lower one refuses until enough connections have
    /// ended, a higher one admits at once.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    /// A place for one more connection, unless `max_connections` are open.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let before = self.taken.fetch_add(1, Ordering::AcqRel);
        if before >= self.max.load(Ordering::Acquire) {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that fails as the kernel fails one once TCP keepalive or
    /// TCP_USER_TIMEOUT gave up on the peer (a laptop that slept, a cable pulled), or
    /// with another error.
    struct Failing(io::ErrorKind);

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(self.0.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn conn() -> Arc<ClientConn> {
        let slots = Arc::new(Slots::new(1));
        ClientConn::new(
            1,
            SocketAddr::from(([127, 0, 0, 1], 1)),
            0,
            false,
            slots.try_take().unwrap(),
            metrics::Gauge::noop(),
            &Arc::new(Clients::new(1)),
        )
    }

    #[tokio::test]
    async fn a_peer_the_kernel_gave_up_on_makes_the_connection_unresponsive() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A read or a write that timed out: its exchanges end as client_unresponsive.
        let c = conn();
        let mut io = ClientIo::new(Failing(io::ErrorKind::TimedOut), c.clone(), None);
        assert!(io.read(&mut [0; 8]).await.is_err());
        assert_eq!(c.cause(), Some(Outcome::ClientUnresponsive));
        let c = conn();
        let mut io = ClientIo::new(Failing(io::ErrorKind::TimedOut), c.clone(), None);
        assert!(io.write(b"event").await.is_err());
        assert_eq!(c.cause(), Some(Outcome::ClientUnresponsive));
        // A reset says only that the client left (client_aborted, the default).
        let c = conn();
        let mut io = ClientIo::new(Failing(io::ErrorKind::ConnectionReset), c.clone(), None);
        assert!(io.write(b"event").await.is_err());
        assert_eq!(c.cause(), None);
    }

    #[test]
    fn slots_follow_the_limit_in_force() {
        let slots = Arc::new(Slots::new(2));
        let a = slots.try_take().unwrap();
        let _b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        drop(a);
        let c = slots.try_take().unwrap();
        // A lower limit refuses until enough have ended; a higher one admits at once.
        slots.set_max(1);
        drop(c);
        assert!(slots.try_take().is_none());
        slots.set_max(3);
        assert!(slots.try_take().is_some());
    }
}
