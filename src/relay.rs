//! The life of an upgraded connection: two [`Pump`]s (client→backend, backend→client)
//! and one [`Session`], driven from a single task that this module spawns, registers in
//! the live table, and ends by recording the connection.
//!
//! The relay is the only place where the pumps' I/O meets the session's decisions: it
//! polls both pumps, the session's timer and its mailbox in the live table (an
//! operator's close, the drain), hands what happened to the session with the current
//! time, and carries out the actions it returns. When both sockets are closed it fills in
//! the connection's [`Record`] and hands it to [`report`].

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;

use crate::frame::{self, Negotiated, Opcode, Scanner};
use crate::live::{ExchangeConfig, LiveDetail, LiveExchange, LiveTable, Requests};
use crate::metrics::Metrics;
use crate::pump::{Injected, Pump, PumpEvent};
use crate::record::{Details, ExchangeInfo, Outcome, Record, WebSocketDetails};
use crate::report::{self, Written};
use crate::session::{Action, Gone, Pong, Session, Verdict};
use crate::side::Side;
use crate::stream::{Stream, Transport};

/// One side's stream as the upgrade hands it over.
pub struct Leg<S> {
    pub stream: S,
    /// Bytes the side sent right behind its handshake, already read by the HTTP layer.
    pub buffered: Bytes,
}

/// What a successful upgrade hands to its relay. `C` is the client's stream, or a
/// future of it.
pub struct Handoff<C> {
    /// The client's stream, or (see [`spawn`]) a future that completes with it once
    /// the HTTP layer lets go of it (after the 101 is written), or with `None` if it
    /// never does (the client left first).
    pub client: C,
    pub backend: Leg<Stream>,
    pub negotiated: Negotiated,
    pub info: ExchangeInfo,
}

/// Spawns the relay of one WebSocket on `tasks`: it waits for the client's stream,
/// then runs [`start`]'s future as a task of its own, which registers in `live`, relays
/// until both sockets are closed, records the connection in `metrics` and the log, and
/// drops `guard` (what the client connection holds for as long as its WebSocket lasts).
/// The waiting task ends there: kept for the WebSocket's life, it would hold what it
/// captured (the upgrade future, the backend stream's old place) beside the relay.
pub fn spawn<F, G>(
    tasks: &TaskTracker,
    handoff: Handoff<F>,
    live: &LiveTable,
    metrics: &Arc<Metrics>,
    guard: G,
) where
    F: Future<Output = Option<Leg<Stream>>> + Send + 'static,
    G: Send + 'static,
{
    let Handoff {
        client,
        backend,
        negotiated,
        info,
    } = handoff;
    let live = live.clone();
    let metrics = metrics.clone();
    let relays = tasks.clone();
    tasks.spawn(async move {
        let Some(client) = client.await else {
            return;
        };
        let handoff = Handoff {
            client,
            backend,
            negotiated,
            info,
        };
        // Boxed: one copy of the relay's future into its task, not eight.
        relays.spawn(Box::pin(start(handoff, &live, metrics, guard)));
    });
}

/// Builds the relay of a WebSocket whose client stream is at hand, and returns the
/// future that runs it to its end, records it and then drops `guard`. Building outside
/// that future keeps it from also holding the streams, buffers and handshake state the
/// relay was made from: a future stores its arguments for its whole life, and an idle
/// WebSocket's task should be about the size of its relay. For the same reason the
/// future is meant to be spawned as it is: an `async` block that awaits it would hold
/// it twice (once captured, once awaited), 1,952 bytes instead of 968.
pub fn start<G: Send + 'static>(
    handoff: Handoff<Leg<Stream>>,
    live: &LiveTable,
    metrics: Arc<Metrics>,
    guard: G,
) -> impl Future<Output = ()> + Send + use<G> {
    let Handoff {
        client,
        backend,
        negotiated,
        info,
    } = handoff;
    let registration = live.register(info, LiveDetail::WebSocket(Default::default()));
    let mut relay = Relay::new(
        client,
        backend,
        negotiated,
        &registration.config,
        registration.entry.clone(),
    );
    let live = live.clone();
    async move {
        // `run` takes the relay by reference: moving it into its own future would keep
        // a second copy alive for the connection's whole life.
        let record = relay.run(&live).await;
        let written = Written {
            listed: true,
            logged: true,
        };
        report::exchange_ended(&metrics, &live, Some(registration), &record, written);
        drop(guard);
    }
}

enum Wake {
    Pump(Side, PumpEvent),
    Timer,
    Requests(Requests),
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
    /// The timer was polled since it was last set, so it holds this task's waker.
    timer_polled: bool,
    /// The time [`Relay::note_activity`] read in the current poll, which the wake's
    /// handling reuses: the clock is read once per wake-up, not twice.
    clock: Option<Instant>,
    /// Write-blocked state last reported to the session, per destination.
    blocked: [bool; 2],
    /// Which pump is polled first, alternated for fairness.
    client_first: bool,
    started: Instant,
    /// This connection's entry in the live table: its published counters and mailbox.
    live: Arc<LiveExchange>,
    /// The Close code a drain sends the client.
    drain_close_code: u16,
    /// The outcome was published to `live`.
    ending_published: bool,
}

impl<C: Transport, B: Transport> Relay<C, B> {
    /// The pumps copy the bytes each side sent behind its handshake; the buffers they
    /// came from (the HTTP layer's whole read buffers) drop here.
    pub fn new(
        client: Leg<C>,
        backend: Leg<B>,
        negotiated: Negotiated,
        config: &ExchangeConfig,
        live: Arc<LiveExchange>,
    ) -> Self {
        let now = Instant::now();
        let scanner = |sender| Scanner::new(sender, negotiated.rsv_allowed, config.max_frame_size);
        Relay {
            client: Some(client.stream),
            backend: Some(backend.stream),
            c2b: Pump::new(scanner(Side::Client), &client.buffered),
            b2c: Pump::new(scanner(Side::Backend), &backend.buffered),
            session: Session::new(config.timers.clone(), now.into_std()),
            timer: Box::pin(tokio::time::sleep_until(now)),
            armed: None,
            timer_polled: false,
            clock: None,
            blocked: [false, false],
            client_first: true,
            started: now,
            live,
            drain_close_code: config.drain_close_code,
            ending_published: false,
        }
    }

    /// Relays until both sockets are closed. Takes `&mut self` so the caller's relay is
    /// the only copy. `table` is where a reloaded configuration is found.
    pub async fn run(&mut self, table: &LiveTable) -> Record {
        self.rearm();
        loop {
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            let now = self.clock.take().unwrap_or_else(Instant::now);
            match wake {
                Wake::Timer => self.session.on_timer(now.into_std()),
                Wake::Requests(requests) => self.on_requests(requests, table, now),
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
                return self.record(now);
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
        // A time read in an earlier poll is stale by now.
        self.clock = None;
        if let Poll::Ready(requests) = self.live.poll_requests(cx) {
            return Poll::Ready(Wake::Requests(requests));
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
        // Polling a timer that already holds this task's waker only to hear "not yet"
        // costs as much as relaying a small frame; once polled, it is polled again only
        // when it has fired.
        if self.armed.is_some() && (!self.timer_polled || self.timer.is_elapsed()) {
            self.timer_polled = true;
            if self.timer.as_mut().poll(cx).is_ready() {
                self.armed = None;
                return Poll::Ready(Wake::Timer);
            }
        }
        Poll::Pending
    }

    /// What the drain, an operator or a reload asked for. A forced close wins; a close
    /// asked while another is under way changes nothing (the session keeps the first).
    fn on_requests(&mut self, requests: Requests, table: &LiveTable, now: Instant) {
        let now = now.into_std();
        if requests.force() {
            self.session.on_force_close(now);
            return;
        }
        if requests.reconfigure() {
            let config = table.config();
            self.session.set_timers(config.timers);
            self.drain_close_code = config.drain_close_code;
            // A deadline may have moved later: `rearm` only ever moves the timer
            // earlier, so let it start from nothing.
            self.armed = None;
        }
        if requests.shutdown() {
            self.session.on_shutdown(self.drain_close_code, now);
        }
        if requests.close()
            && let Some(request) = self.live.close_request()
        {
            self.session
                .on_admin_close(request.code, request.reason, now);
        }
    }

    /// Tells the session which sides sent bytes and which writes are blocked. Reads the
    /// clock only when something changed.
    fn note_activity(&mut self) {
        let c = self.c2b.take_activity();
        let b = self.b2c.take_activity();
        let blocked = [self.b2c.write_blocked(), self.c2b.write_blocked()];
        let received = c.0 || c.1 || b.0 || b.1;
        if !received && blocked == self.blocked {
            return;
        }
        let now = Instant::now();
        self.clock = Some(now);
        let now = now.into_std();
        if received {
            // Plain stores to this connection's own atomics: the process-wide counters
            // are fed from these by the sweep every second, and at the end.
            self.publish_counters();
        }
        for (side, (any, data)) in [(Side::Client, c), (Side::Backend, b)] {
            // Data can be scanned a poll after its bytes were read (behind a held
            // control frame): it counts when it is scanned.
            if any || data {
                self.session.on_received(side, data, now);
                self.live.received(side, now, data);
            }
        }
        for to in Side::BOTH {
            if blocked[to.idx()] != self.blocked[to.idx()] {
                self.session
                    .on_write_blocked(to, blocked[to.idx()].then_some(now));
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
    /// the timer on every frame; and after bytes arriving alone the session says there is
    /// nothing earlier, which saves computing it on every frame.
    fn rearm(&mut self) {
        let Some(next) = self.session.deadline_to_arm().map(Instant::from_std) else {
            return;
        };
        if self.armed.is_none_or(|armed| next < armed) {
            self.timer.as_mut().reset(next);
            self.timer_polled = false;
            self.armed = Some(next);
        }
    }

    fn on_pump_event(&mut self, from: Side, event: PumpEvent, now: Instant) {
        let now = now.into_std();
        match event {
            PumpEvent::Control { header, payload } => {
                let verdict = match header.opcode {
                    Opcode::Close => self.session.on_close_frame(from, payload.close_code(), now),
                    Opcode::Pong => self.on_pong(from, payload.as_bytes(), now),
                    _ => Verdict::Forward,
                };
                let pump = match from {
                    Side::Client => &mut self.c2b,
                    Side::Backend => &mut self.b2c,
                };
                pump.release_held(verdict);
            }
            PumpEvent::Injected(Injected::Ping) => {
                self.session.on_ping_sent(from.other(), now);
                self.live.ping_written(from.other(), now);
            }
            PumpEvent::Injected(Injected::Close) => {}
            PumpEvent::WriteShut => self.session.on_write_shut(from.other(), now),
            PumpEvent::Eof { mid_frame } => {
                tracing::debug!(side = from.as_str(), mid_frame, "peer sent FIN");
                self.session.on_gone(from, Gone::Fin { mid_frame }, now);
            }
            PumpEvent::ReadFailed { mid_frame, error } => {
                tracing::debug!(side = from.as_str(), mid_frame, %error, "read failed");
                self.session.on_gone(from, Gone::Failed { mid_frame }, now);
            }
            PumpEvent::WriteFailed(error) => {
                let to = from.other();
                tracing::debug!(side = to.as_str(), %error, "write failed");
                let mid_frame = self.pump_toward(from).mid_frame();
                self.session.on_gone(to, Gone::Failed { mid_frame }, now);
            }
            PumpEvent::ProtocolError(error) => {
                tracing::debug!(side = from.as_str(), %error, "invalid framing");
                self.session
                    .on_protocol_error(from, error.close_code(), now);
            }
        }
    }

    /// A Pong from `from`: wsgate's own (consumed, its round trip published) or the
    /// application's (forwarded).
    fn on_pong(&mut self, from: Side, payload: &[u8], now: std::time::Instant) -> Verdict {
        let Some(seq) = frame::liveness_seq(payload) else {
            return Verdict::Forward;
        };
        match self.session.on_pong(from, seq, now) {
            Pong::Ours { rtt } => {
                if let Some(rtt) = rtt {
                    self.live.ping_rtt(from, rtt);
                }
                Verdict::Consume
            }
            Pong::Application => Verdict::Forward,
        }
    }

    fn apply_actions(&mut self) {
        while let Some(action) = self.session.next_action() {
            match action {
                Action::SendClose { to, code, reason } => {
                    let bytes = frame::encode_close(to, code, reason.as_str());
                    self.pump_toward(to).inject(Injected::Close, bytes);
                }
                Action::SendPing { to, seq } => {
                    let bytes = frame::encode(to, Opcode::Ping, &frame::liveness_ping(seq));
                    self.pump_toward(to).inject(Injected::Ping, bytes);
                }
                Action::ShutdownWrite(side) => self.pump_toward(side).request_shutdown(),
                Action::Release(side) => self.let_go(side, SocketEnd::Close),
                Action::Abort(side) => self.let_go(side, SocketEnd::Reset),
            }
        }
    }

    /// Drops the socket of `side`, which closes it.
    fn let_go(&mut self, side: Side, end: SocketEnd) {
        let reset = end == SocketEnd::Reset;
        match side {
            Side::Client => {
                if let Some(s) = self.client.take()
                    && reset
                {
                    s.abort_on_close();
                }
            }
            Side::Backend => {
                if let Some(s) = self.backend.take()
                    && reset
                {
                    s.abort_on_close();
                }
            }
        }
    }

    fn record(&self, now: Instant) -> Record {
        let s = &self.session;
        let ended = s.ending_since().map(Instant::from_std).unwrap_or(now);
        Record {
            info: self.live.info.clone(),
            // `is_finished` implies an outcome; `Shutdown` is the only way to finish
            // without a signal, so it is the honest fallback.
            outcome: s.outcome().unwrap_or(Outcome::Shutdown),
            duration: now - self.started,
            release: now.saturating_duration_since(ended),
            client_to_backend: self.c2b.counters(),
            backend_to_client: self.b2c.counters(),
            details: Details::WebSocket(WebSocketDetails {
                client_close: s.close_from(Side::Client),
                backend_close: s.close_from(Side::Backend),
                client_received_close: s.close_to(Side::Client),
                backend_received_close: s.close_to(Side::Backend),
                wsgate_to_client_close: s.wsgate_code_to(Side::Client),
                wsgate_to_backend_close: s.wsgate_code_to(Side::Backend),
                client_rtt: s.rtt(Side::Client),
                backend_rtt: s.rtt(Side::Backend),
            }),
        }
    }
}

/// How a socket is let go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SocketEnd {
    /// A normal close (FIN, or TLS close_notify then FIN, already sent or owed).
    Close,
    /// A reset (RST): the peer cannot end cleanly.
    Reset,
}
