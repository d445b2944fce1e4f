//! The life of an upgraded connection: two [`Pump`]s (client→backend, backend→client)
//! and one [`Session`], driven from a single task.
//!
//! The relay is the only place where the pumps' I/O meets the session's decisions: it
//! polls both pumps, the session's timer and the shutdown signals, hands what happened to
//! the session with the current time, and carries out the actions it returns. When both
//! sockets are closed it returns a [`Report`], the connection's single record.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::frame::{self, Opcode, RSV1, Scanner};
use crate::live::LiveConn;
use crate::metrics::RelayMetrics;
use crate::pump::{Counters, Injected, Pump, PumpEvent};
use crate::session::{Action, Outcome, Session, Side, Timers, Verdict};

/// A byte stream the relay can end abruptly.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Makes closing this stream reset the connection (RST) instead of a FIN, so a peer
    /// that stopped responding cannot hold kernel buffers until TCP gives up.
    fn abort_on_close(&self);

    /// The TCP socket, when the stream is nothing more (no TLS, no HTTP/2 framing): its
    /// bytes can then move by [`crate::splice`].
    fn plain_tcp(&self) -> Option<&tokio::net::TcpStream> {
        None
    }
}

/// Per-connection settings of the relay.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Shared by every relay: one pointer per connection instead of a copy.
    pub timers: Arc<Timers>,
    /// Largest data frame accepted from either side; `None` for no limit.
    pub max_frame_size: Option<u64>,
}

/// What the WebSocket handshake negotiated that changes how frames are checked.
#[derive(Clone, Copy, Debug, Default)]
pub struct Negotiated {
    /// RSV bits the negotiated extensions may set.
    pub rsv_allowed: u8,
}

impl Negotiated {
    /// Reads `Sec-WebSocket-Extensions` from the backend's 101 response.
    pub fn from_extensions<'a>(values: impl Iterator<Item = &'a str>) -> Self {
        let mut rsv_allowed = 0;
        for ext in values.flat_map(|v| v.split(',')) {
            let name = ext.split(';').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            rsv_allowed |= if name.eq_ignore_ascii_case("permessage-deflate") {
                RSV1
            } else {
                // An extension wsgate does not know may use any RSV bit.
                0b111
            };
        }
        Negotiated { rsv_allowed }
    }
}

/// One side's socket as the upgrade hands it over.
pub struct Leg<'a, S> {
    pub stream: S,
    /// Bytes the side sent right behind its handshake, already read by the HTTP layer.
    pub buffered: &'a [u8],
}

/// Signals from the server's shutdown logic.
#[derive(Clone, Debug)]
pub struct Signals {
    /// Draining started: close the connection with 1001 on both sides.
    pub shutdown: CancellationToken,
    /// The drain deadline passed: abort.
    pub force: CancellationToken,
}

/// Everything recorded about one relayed connection when it ends.
#[derive(Clone, Debug)]
pub struct Report {
    pub outcome: Outcome,
    /// From the upgrade to both sockets closed.
    pub duration: Duration,
    /// From the first end signal to both sockets closed.
    pub release: Duration,
    pub client_to_backend: Counters,
    pub backend_to_client: Counters,
    /// The Close the client sent (with its code, if it had one).
    pub client_close: Option<Option<u16>>,
    /// The Close the backend sent.
    pub backend_close: Option<Option<u16>>,
    /// The code of the Close wsgate itself sent to each side.
    pub wsgate_to_client_close: Option<u16>,
    pub wsgate_to_backend_close: Option<u16>,
    /// Last liveness round-trip time measured on each side.
    pub client_rtt: Option<Duration>,
    pub backend_rtt: Option<Duration>,
}

/// A liveness Ping wsgate sent.
#[derive(Clone, Copy, Debug)]
struct Ping {
    payload: [u8; 16],
    sent_at: Option<Instant>,
}

/// Prefix of wsgate's liveness Ping payloads; the rest is a sequence number.
const PING_PREFIX: &[u8; 8] = b"wsgate:p";

enum Wake {
    Pump(Side, PumpEvent),
    Timer,
    Shutdown,
    Force,
    AdminClose,
}

/// One upgraded connection being relayed.
pub struct Relay<C, B> {
    client: Option<C>,
    backend: Option<B>,
    /// Reads the client, writes the backend.
    c2b: Pump,
    /// Reads the backend, writes the client.
    b2c: Pump,
    session: Session,
    timer: Pin<Box<Sleep>>,
    /// The deadline the timer is set to, if any.
    armed: Option<Instant>,
    signals: Signals,
    /// The outside signal awaited next: first this connection's close token (a child of
    /// the shutdown token, also cancelled by an operator's close), then the force token.
    /// One future instead of three keeps idle connections small and wake-ups cheap.
    signal: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// wsgate's outstanding liveness Ping per side (client, backend).
    pings: [Option<Ping>; 2],
    ping_seq: u64,
    /// Write-blocked state last reported to the session, per destination.
    blocked: [bool; 2],
    /// Which pump is polled first, alternated for fairness.
    client_first: bool,
    started: Instant,
    metrics: Arc<RelayMetrics>,
    /// This connection's entry in the admin `/connections` table.
    live: Arc<LiveConn>,
    /// The outcome was published to `live`.
    ending_published: bool,
}

impl<C: Transport, B: Transport> Relay<C, B> {
    pub fn new(
        client: Leg<'_, C>,
        backend: Leg<'_, B>,
        negotiated: Negotiated,
        config: RelayConfig,
        signals: Signals,
        metrics: Arc<RelayMetrics>,
        live: Arc<LiveConn>,
    ) -> Self {
        let now = Instant::now();
        let scanner = |sender| Scanner::new(sender, negotiated.rsv_allowed, config.max_frame_size);
        Relay {
            client: Some(client.stream),
            backend: Some(backend.stream),
            c2b: Pump::new(scanner(Side::Client), client.buffered),
            b2c: Pump::new(scanner(Side::Backend), backend.buffered),
            session: Session::new(config.timers.clone(), now.into_std()),
            timer: Box::pin(tokio::time::sleep_until(now)),
            armed: None,
            signal: Some(Box::pin(live.close_token.clone().cancelled_owned())),
            signals,
            pings: [None, None],
            ping_seq: 0,
            blocked: [false, false],
            client_first: true,
            started: now,
            metrics,
            live,
            ending_published: false,
        }
    }

    /// Relays until both sockets are closed. Takes `&mut self` so the caller's relay is
    /// the only copy.
    pub async fn run(&mut self) -> Report {
        self.rearm();
        loop {
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            let now = Instant::now();
            match wake {
                Wake::Timer => self.session.on_timer(now.into_std()),
                Wake::Shutdown => self.session.on_shutdown(now.into_std()),
                Wake::Force => self.session.on_force_close(now.into_std()),
                Wake::AdminClose => {
                    if let Some(request) = self.live.close_request() {
                        self.session.on_admin_close(request.code, now.into_std());
                    }
                }
                Wake::Pump(from, event) => self.on_pump_event(from, event, now),
            }
            if !self.ending_published
                && let Some(outcome) = self.session.outcome()
            {
                self.live.ending(outcome);
                self.ending_published = true;
            }
            self.apply_actions();
            if self.session.is_finished() {
                self.publish_counters();
                self.live.add_to_metrics(&self.metrics);
                return self.report(now);
            }
            // `poll_wake` re-arms the timer before it waits again.
        }
    }

    fn pump_toward(&mut self, to: Side) -> &mut Pump {
        match to {
            Side::Client => &mut self.b2c,
            Side::Backend => &mut self.c2b,
        }
    }

    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Some(f) = &mut self.signal
            && f.as_mut().poll(cx).is_ready()
        {
            let wake = if self.signals.force.is_cancelled() {
                Wake::Force
            } else if self.signals.shutdown.is_cancelled() {
                Wake::Shutdown
            } else {
                Wake::AdminClose
            };
            self.signal = (!matches!(wake, Wake::Force))
                .then(|| Box::pin(self.signals.force.clone().cancelled_owned()));
            return Poll::Ready(wake);
        }
        self.client_first = !self.client_first;
        let order = if self.client_first {
            [Side::Client, Side::Backend]
        } else {
            [Side::Backend, Side::Client]
        };
        for from in order {
            let polled = match from {
                Side::Client => self
                    .c2b
                    .poll(cx, self.client.as_mut(), self.backend.as_mut()),
                Side::Backend => self
                    .b2c
                    .poll(cx, self.backend.as_mut(), self.client.as_mut()),
            };
            if let Poll::Ready(event) = polled {
                self.note_activity();
                return Poll::Ready(Wake::Pump(from, event));
            }
        }
        self.note_activity();
        self.rearm();
        if self.armed.is_some() && self.timer.as_mut().poll(cx).is_ready() {
            self.armed = None;
            return Poll::Ready(Wake::Timer);
        }
        Poll::Pending
    }

    /// Tells the session which sides sent bytes and which writes are blocked. Reads the
    /// clock only when something changed.
    fn note_activity(&mut self) {
        let c = self.c2b.take_activity();
        let b = self.b2c.take_activity();
        let blocked = [self.b2c.write_blocked(), self.c2b.write_blocked()];
        if !(c.0 || b.0 || blocked != self.blocked) {
            return;
        }
        let now = Instant::now().into_std();
        if c.0 || b.0 {
            // Plain stores to this connection's own atomics. The process-wide counters
            // (shared by every connection, so contended) are fed from these by the
            // server's housekeeping every second, and at the end.
            self.publish_counters();
        }
        if c.0 {
            self.session.on_received(Side::Client, c.1, now);
            self.live.received(Side::Client, now);
        }
        if b.0 {
            self.session.on_received(Side::Backend, b.1, now);
            self.live.received(Side::Backend, now);
        }
        for (i, to) in [Side::Client, Side::Backend].into_iter().enumerate() {
            if blocked[i] != self.blocked[i] {
                self.session.on_write_blocked(to, blocked[i].then_some(now));
            }
        }
        self.blocked = blocked;
    }

    /// Stores both directions' counters in this connection's live entry, where
    /// `/connections` and the process-wide counters read them.
    fn publish_counters(&self) {
        self.live.update_counters(Side::Client, self.c2b.counters());
        self.live
            .update_counters(Side::Backend, self.b2c.counters());
    }

    /// Sets the timer to the session's next deadline when that is earlier than the one
    /// armed. A later deadline is left to a harmless early wake-up, which saves resetting
    /// the timer on every frame.
    fn rearm(&mut self) {
        let Some(next) = self.session.next_deadline().map(Instant::from_std) else {
            return;
        };
        if self.armed.is_none_or(|armed| next < armed) {
            self.timer.as_mut().reset(next);
            self.armed = Some(next);
        }
    }

    fn on_pump_event(&mut self, from: Side, event: PumpEvent, now: Instant) {
        let now_std = now.into_std();
        match event {
            PumpEvent::Control { header, payload } => {
                let (forward, is_close) = match header.opcode {
                    Opcode::Close => {
                        let verdict =
                            self.session
                                .on_close_frame(from, payload.close_code(), now_std);
                        (verdict == Verdict::Forward, true)
                    }
                    Opcode::Pong => {
                        let ours = self.pings[from as usize]
                            .is_some_and(|p| p.payload[..] == *payload.as_bytes());
                        if ours
                            && let Some(sent) =
                                self.pings[from as usize].take().and_then(|p| p.sent_at)
                        {
                            let rtt = now - sent;
                            self.metrics.ping_rtt[from as usize].record(rtt.as_secs_f64());
                            self.live.ping_rtt(from, rtt);
                        }
                        (!ours, false)
                    }
                    _ => (true, false),
                };
                let pump = match from {
                    Side::Client => &mut self.c2b,
                    Side::Backend => &mut self.b2c,
                };
                pump.release_held(forward, is_close);
            }
            PumpEvent::Injected(Injected::Ping) => {
                let to = from.other();
                if let Some(p) = &mut self.pings[to as usize] {
                    p.sent_at = Some(now);
                }
                self.session.on_ping_sent(to, now_std);
            }
            PumpEvent::Injected(Injected::Close) => {}
            PumpEvent::WriteShut => self.session.on_write_shut(from.other(), now_std),
            PumpEvent::Eof { mid_frame } => {
                tracing::debug!(side = from.as_str(), mid_frame, "peer sent FIN");
                self.session.on_gone(from, mid_frame, false, now_std);
            }
            PumpEvent::ReadFailed { mid_frame, error } => {
                tracing::debug!(side = from.as_str(), mid_frame, %error, "read failed");
                self.session.on_gone(from, mid_frame, true, now_std);
            }
            PumpEvent::WriteFailed(error) => {
                let to = from.other();
                tracing::debug!(side = to.as_str(), %error, "write failed");
                let mid_frame = self.pump_toward(from).mid_frame();
                self.session.on_gone(to, mid_frame, true, now_std);
            }
            PumpEvent::ProtocolError(error) => {
                tracing::debug!(side = from.as_str(), %error, "invalid framing");
                self.session
                    .on_protocol_error(from, error.close_code(), now_std);
            }
        }
    }

    fn apply_actions(&mut self) {
        while let Some(action) = self.session.next_action() {
            match action {
                Action::SendClose { to, code, reason } => {
                    let admin = self
                        .live
                        .close_request()
                        .filter(|_| self.session.outcome() == Some(Outcome::AdminClose));
                    let reason = admin.as_ref().map_or(reason, |r| r.reason.as_str());
                    let bytes = frame::encode_close(to, code, reason);
                    self.pump_toward(to).inject(Injected::Close, bytes);
                }
                Action::SendPing { to } => {
                    self.ping_seq += 1;
                    let mut payload = [0u8; 16];
                    payload[..8].copy_from_slice(PING_PREFIX);
                    payload[8..].copy_from_slice(&self.ping_seq.to_be_bytes());
                    self.pings[to as usize] = Some(Ping {
                        payload,
                        sent_at: None,
                    });
                    let bytes = frame::encode(to, Opcode::Ping, &payload);
                    self.pump_toward(to).inject(Injected::Ping, bytes);
                }
                Action::ShutdownWrite(side) => self.pump_toward(side).request_shutdown(),
                Action::Release(side) => self.drop_socket(side, false),
                Action::Abort(side) => self.drop_socket(side, true),
            }
        }
    }

    fn drop_socket(&mut self, side: Side, abort: bool) {
        match side {
            Side::Client => {
                if let Some(s) = self.client.take()
                    && abort
                {
                    s.abort_on_close();
                }
            }
            Side::Backend => {
                if let Some(s) = self.backend.take()
                    && abort
                {
                    s.abort_on_close();
                }
            }
        }
    }

    fn report(&self, now: Instant) -> Report {
        let s = &self.session;
        let ended = s.ending_since().map(Instant::from_std).unwrap_or(now);
        Report {
            // `is_finished` implies an outcome; `Shutdown` is the only way to finish
            // without a signal, so it is the honest fallback.
            outcome: s.outcome().unwrap_or(Outcome::Shutdown),
            duration: now - self.started,
            release: now.saturating_duration_since(ended),
            client_to_backend: self.c2b.counters(),
            backend_to_client: self.b2c.counters(),
            client_close: s.close_from(Side::Client),
            backend_close: s.close_from(Side::Backend),
            wsgate_to_client_close: s.wsgate_code_to(Side::Client),
            wsgate_to_backend_close: s.wsgate_code_to(Side::Backend),
            client_rtt: self.live.rtt(Side::Client),
            backend_rtt: self.live.rtt(Side::Backend),
        }
    }
}
