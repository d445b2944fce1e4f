//! How a relayed WebSocket connection ends: a pure state machine.
//!
//! The relay feeds it what happened on the wire (a Close frame, a FIN, an error, bytes
//! arriving, a write that cannot progress) and the passing of time; it answers with
//! [`Action`]s (send a Close or a Ping, half-close, release or abort a socket) and, once
//! both sockets are closed, an [`Outcome`]. It does no I/O and reads no clock: every
//! method takes `now`, so the tests below drive every ending of the README's endings table directly.
//!
//! Rules it enforces:
//! - the first end signal decides the outcome (only an unanswered Close handshake turns
//!   `client_close`/`backend_close` into `close_timeout`);
//! - a Close from one side is forwarded to the other unless a Close already went that
//!   way; otherwise it is a reply to wsgate and consumed;
//! - a side that sent a Close is owed one: if the other side can no longer answer, wsgate
//!   answers itself, echoing the code;
//! - wsgate never sends the reserved codes 1005, 1006, 1015;
//! - every wait is bounded by a timer, so both sockets always end up closed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::frame::is_sendable_close_code;
use crate::record::Outcome;
use crate::side::Side;

/// Close code 1001: the peer on the other side is going away.
pub const GOING_AWAY: u16 = 1001;
/// Close code 1014: the backend (upstream) failed; sent to the client.
pub const BAD_GATEWAY: u16 = 1014;

/// The code wsgate sends to `to` when the *other* side failed.
fn failed_peer_code(to: Side) -> u16 {
    match to {
        Side::Client => BAD_GATEWAY,
        Side::Backend => GOING_AWAY,
    }
}

/// The session's timers. `None` turns a timer off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// Silence from a side after which wsgate pings it.
    pub ping_interval: Option<Duration>,
    /// How long a pinged side has to send anything back.
    pub pong_timeout: Duration,
    /// How long to wait for a Close reply, and then for the peer's FIN.
    pub close_timeout: Duration,
    /// No data frame either way for this long ends the connection.
    pub idle_timeout: Option<Duration>,
    /// The connection ends at this age.
    pub max_lifetime: Option<Duration>,
    /// Writes toward a side that make no progress for this long end the connection.
    pub write_timeout: Option<Duration>,
}

/// The reason text of a Close frame wsgate sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The text of the connection's outcome ("client went away", ...).
    Outcome(&'static str),
    /// The text an operator gave with the admin API's close.
    Operator(Arc<str>),
}

impl Reason {
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Outcome(text) => text,
            Reason::Operator(text) => text,
        }
    }
}

/// What the relay must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write wsgate's own Close frame toward `to` at the next frame boundary; nothing is
    /// forwarded toward `to` after it.
    SendClose { to: Side, code: u16, reason: Reason },
    /// Write liveness Ping number `seq` toward `to` at the next frame boundary, then
    /// report [`Session::on_ping_sent`]; its Pong comes back through
    /// [`Session::on_pong`].
    SendPing { to: Side, seq: u64 },
    /// Once everything queued toward `side` is written, shut its write side (TLS
    /// close_notify, then FIN) and report [`Session::on_write_shut`].
    ShutdownWrite(Side),
    /// Close the socket of `side` now (its FIN was read, or it is gone).
    Release(Side),
    /// Reset the socket of `side` (RST) and drop it: it cannot end cleanly.
    Abort(Side),
}

/// What to do with a control frame a side sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on to the other side.
    Forward,
    /// It is addressed to wsgate (a reply to its Close, a Pong to its Ping), or the other
    /// side cannot take it: drop it.
    Consume,
}

/// Whose a Pong is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pong {
    /// The answer to wsgate's last liveness Ping: consume it. `rtt` is its round trip,
    /// measured from when the Ping went on the wire.
    Ours { rtt: Option<Duration> },
    /// The application's (an answer to a Ping the other side sent): forward it.
    Application,
}

/// How a side's stream ended. `mid_frame`: its stream toward the other side stopped
/// inside a frame, so no clean Close can follow on that stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// It sent FIN: it may still read what wsgate sends it.
    Fin { mid_frame: bool },
    /// Reading from it or writing to it failed (a reset): its socket is dead.
    Failed { mid_frame: bool },
}

/// wsgate's liveness Ping toward a side whose Pong has not come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ping {
    seq: u64,
    /// When it went on the wire; `None` while it waits behind a frame.
    written_at: Option<Instant>,
}

/// Where a side's TCP connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tcp {
    Open,
    /// Done talking since then. The client: waiting for what is queued toward it to be
    /// written and its write side shut. The backend: waiting for its FIN. Bounded by
    /// `close_timeout`.
    Draining(Instant),
    Closed,
}

/// What the session knows of one side.
#[derive(Clone, Debug)]
struct Peer {
    /// Last time any byte arrived from this side (liveness).
    last_rx: Instant,
    /// The last liveness Ping toward this side, until its Pong comes back.
    ping: Option<Ping>,
    /// When a liveness Ping was written with nothing heard since: the side must answer
    /// within `pong_timeout`. Any byte proves liveness, not only the Pong.
    awaiting_since: Option<Instant>,
    /// The last liveness round trip measured (Ping written to its Pong read).
    rtt: Option<Duration>,
    /// The Close this side sent (its code, if it had one).
    close_received: Option<Option<u16>>,
    /// When a Close toward this side (forwarded or wsgate's own) was queued.
    close_sent_at: Option<Instant>,
    /// That Close, with its code if it had one.
    close_sent: Option<Option<u16>>,
    /// The code of the Close wsgate itself sent to this side.
    wsgate_code: Option<u16>,
    /// Its stream no longer parses (protocol error): no Close reply can be read from it.
    broken: bool,
    /// FIN or an error was read from it.
    read_done: bool,
    /// Writing to it failed: the socket is dead.
    write_dead: bool,
    /// Since when writes toward it have made no progress.
    blocked_since: Option<Instant>,
    tcp: Tcp,
}

impl Peer {
    fn new(now: Instant) -> Self {
        Peer {
            last_rx: now,
            ping: None,
            awaiting_since: None,
            rtt: None,
            close_received: None,
            close_sent_at: None,
            close_sent: None,
            wsgate_code: None,
            broken: false,
            read_done: false,
            write_dead: false,
            blocked_since: None,
            tcp: Tcp::Open,
        }
    }

    /// A Ping toward this side waits to be written.
    fn ping_queued(&self) -> bool {
        self.ping.is_some_and(|p| p.written_at.is_none())
    }

    fn writable(&self) -> bool {
        self.tcp == Tcp::Open && !self.write_dead
    }

    /// A Close could still be read from this side.
    fn can_reply(&self) -> bool {
        self.tcp != Tcp::Closed && !self.read_done && !self.broken && self.close_received.is_none()
    }

    /// Nothing more will be said to or heard from this side at the WebSocket level.
    fn done_talking(&self) -> bool {
        let handshake_over = self.close_sent_at.is_some() && !self.can_reply();
        let vanished = self.read_done && self.close_received.is_none();
        handshake_over || vanished || self.write_dead
    }
}

/// The ending state machine of one relayed connection.
#[derive(Debug)]
pub struct Session {
    timers: Arc<Timers>,
    started: Instant,
    /// Last data frame (not control) in either direction, for `idle_timeout`.
    last_data: Instant,
    peers: [Peer; 2],
    outcome: Option<Outcome>,
    /// When the first end signal arrived: the start of the release time.
    ending_since: Option<Instant>,
    /// Decided, not yet carried out. A queue the relay pops, so that carrying out a
    /// batch allocates nothing.
    actions: VecDeque<Action>,
    /// Liveness Pings sent so far, both sides: the next one's sequence number.
    pings: u64,
    /// The text of an operator's close, once one was asked for.
    operator_reason: Option<Arc<str>>,
    /// Something happened that may have moved the next deadline earlier since the relay
    /// last asked ([`Session::deadline_to_arm`]).
    deadline_stale: bool,
}

/// Why a side failed while the connection was open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Unresponsive,
    Stalled,
}

impl Session {
    pub fn new(timers: Arc<Timers>, now: Instant) -> Self {
        Session {
            timers,
            started: now,
            last_data: now,
            peers: [Peer::new(now), Peer::new(now)],
            outcome: None,
            ending_since: None,
            actions: VecDeque::new(),
            pings: 0,
            operator_reason: None,
            deadline_stale: true,
        }
    }

    fn peer(&mut self, side: Side) -> &mut Peer {
        &mut self.peers[side.idx()]
    }

    /// The oldest action decided and not yet taken.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The outcome, once the first end signal arrived.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// When the first end signal arrived.
    pub fn ending_since(&self) -> Option<Instant> {
        self.ending_since
    }

    /// Both sockets are closed: the relay is finished.
    pub fn is_finished(&self) -> bool {
        self.peers.iter().all(|p| p.tcp == Tcp::Closed)
    }

    /// The Close `side` sent, if any, with its code if it had one.
    pub fn close_from(&self, side: Side) -> Option<Option<u16>> {
        self.peers[side.idx()].close_received
    }

    /// The Close sent toward `side`, forwarded or wsgate's own, with its code if it had
    /// one.
    pub fn close_to(&self, side: Side) -> Option<Option<u16>> {
        self.peers[side.idx()].close_sent
    }

    /// The code of the Close wsgate itself sent to `side`, if any.
    pub fn wsgate_code_to(&self, side: Side) -> Option<u16> {
        self.peers[side.idx()].wsgate_code
    }

    /// The last liveness round trip measured on `side`.
    pub fn rtt(&self, side: Side) -> Option<Duration> {
        self.peers[side.idx()].rtt
    }

    /// Bytes arrived from `from`; `data` if they include data-frame bytes.
    pub fn on_received(&mut self, from: Side, data: bool, now: Instant) {
        if data {
            self.last_data = now;
        }
        let p = self.peer(from);
        p.last_rx = now;
        if p.awaiting_since.is_some_and(|sent| now >= sent) {
            p.awaiting_since = None;
            // The next Ping's deadline replaces the Pong's, and may come first.
            self.deadline_stale = true;
        }
    }

    /// wsgate's liveness Ping toward `to` went on the wire.
    pub fn on_ping_sent(&mut self, to: Side, now: Instant) {
        self.deadline_stale = true;
        let p = self.peer(to);
        if let Some(ping) = &mut p.ping {
            ping.written_at = Some(now);
        }
        p.awaiting_since = Some(now);
    }

    /// `from` sent a Pong whose payload is that of wsgate's Ping number `seq`: it is
    /// wsgate's if it answers the last Ping wsgate sent `from`.
    pub fn on_pong(&mut self, from: Side, seq: u64, now: Instant) -> Pong {
        self.deadline_stale = true;
        let p = self.peer(from);
        match p.ping {
            Some(ping) if ping.seq == seq => {
                p.ping = None;
                let rtt = ping
                    .written_at
                    .map(|written| now.saturating_duration_since(written));
                p.rtt = rtt.or(p.rtt);
                Pong::Ours { rtt }
            }
            _ => Pong::Application,
        }
    }

    /// Writes toward `to` stopped making progress at `since` (`None`: they progress again).
    pub fn on_write_blocked(&mut self, to: Side, since: Option<Instant>) {
        self.deadline_stale = true;
        self.peer(to).blocked_since = since;
    }

    /// `from` sent a Close frame with `code`.
    pub fn on_close_frame(&mut self, from: Side, code: Option<u16>, now: Instant) -> Verdict {
        self.deadline_stale = true;
        if self.peers[from.idx()].close_received.is_some() {
            // A second Close breaks RFC 6455 §5.5.1; nobody is waiting for it.
            return Verdict::Consume;
        }
        self.peer(from).close_received = Some(code);
        self.begin(
            match from {
                Side::Client => Outcome::ClientClose,
                Side::Backend => Outcome::BackendClose,
            },
            now,
        );
        let to = self.peer(from.other());
        let verdict = if to.close_sent_at.is_none() && to.writable() {
            to.close_sent_at = Some(now);
            to.close_sent = Some(code);
            Verdict::Forward
        } else {
            Verdict::Consume
        };
        self.advance(now);
        verdict
    }

    /// Everything queued toward `side` was written and its write side shut.
    pub fn on_write_shut(&mut self, side: Side, now: Instant) {
        self.deadline_stale = true;
        let p = self.peer(side);
        if matches!(p.tcp, Tcp::Draining(_)) {
            // The server closes the TCP connection immediately after the closing
            // handshake (RFC 6455 §7.1.1): wsgate does not wait for the client's FIN.
            // Nothing it could still send matters: its Close came before.
            p.tcp = Tcp::Closed;
            self.actions.push_back(Action::Release(side));
        }
        self.advance(now);
    }

    /// `side` ended its stream (see [`Gone`]).
    pub fn on_gone(&mut self, side: Side, gone: Gone, now: Instant) {
        self.deadline_stale = true;
        let (mid_frame, dead) = match gone {
            Gone::Fin { mid_frame } => (mid_frame, false),
            Gone::Failed { mid_frame } => (mid_frame, true),
        };
        let p = self.peer(side);
        p.read_done = true;
        p.write_dead |= dead;
        let without_close = p.close_received.is_none();
        if without_close && self.outcome.is_none() {
            self.begin(
                match side {
                    Side::Client => Outcome::ClientGone,
                    Side::Backend => Outcome::BackendGone,
                },
                now,
            );
            let other = side.other();
            if mid_frame {
                self.abort(other);
            } else {
                self.send_close(other, failed_peer_code(other), now);
            }
        } else if mid_frame && self.peers[side.other().idx()].close_sent_at.is_none() {
            // The Close the other side is owed could not follow the cut frame.
            self.abort(side.other());
        }
        self.advance(now);
    }

    /// `from` sent invalid framing; `code` is 1002, or 1009 for an oversized frame.
    pub fn on_protocol_error(&mut self, from: Side, code: u16, now: Instant) {
        self.deadline_stale = true;
        self.peer(from).broken = true;
        let first = self.begin(Outcome::ProtocolError, now);
        self.send_close(from, code, now);
        if first {
            let other = from.other();
            self.send_close(other, failed_peer_code(other), now);
        }
        self.advance(now);
    }

    /// wsgate is draining: close the client with `client_code` (1012 "service restart"
    /// or 1001) and the backend with 1001.
    pub fn on_shutdown(&mut self, client_code: u16, now: Instant) {
        self.deadline_stale = true;
        if self.begin(Outcome::Shutdown, now) {
            self.send_close(Side::Client, client_code, now);
            self.send_close(Side::Backend, GOING_AWAY, now);
            self.advance(now);
        }
    }

    /// The configuration was reloaded: the timers apply from now on, to deadlines
    /// already under way too (a shorter `idle_timeout` counts from the last data frame).
    pub fn set_timers(&mut self, timers: Arc<Timers>) {
        self.deadline_stale = true;
        self.timers = timers;
    }

    /// An operator asked to close the connection with `code` and `reason` on both sides.
    pub fn on_admin_close(&mut self, code: u16, reason: Arc<str>, now: Instant) {
        self.deadline_stale = true;
        if self.begin(Outcome::AdminClose, now) {
            self.operator_reason = Some(reason);
            self.send_close(Side::Client, code, now);
            self.send_close(Side::Backend, code, now);
            self.advance(now);
        }
    }

    /// The drain deadline passed: abort whatever is still open.
    pub fn on_force_close(&mut self, now: Instant) {
        self.deadline_stale = true;
        self.begin(Outcome::Shutdown, now);
        for side in [Side::Client, Side::Backend] {
            self.abort(side);
        }
    }

    /// Time passed: fire whatever timer is due.
    pub fn on_timer(&mut self, now: Instant) {
        self.deadline_stale = true;
        let t = *self.timers;
        if self.outcome.is_none() {
            if t.max_lifetime.is_some_and(|d| now >= self.started + d) {
                self.end_both(Outcome::MaxLifetime, now);
            } else if t.idle_timeout.is_some_and(|d| now >= self.last_data + d) {
                self.end_both(Outcome::IdleTimeout, now);
            }
        }
        for side in [Side::Client, Side::Backend] {
            if self.outcome.is_some() {
                break;
            }
            let p = &self.peers[side.idx()];
            let stalled = t
                .write_timeout
                .zip(p.blocked_since)
                .is_some_and(|(d, since)| now >= since + d);
            // While writes toward the other side are blocked, this side's bytes (its Pong
            // among them) are not being read: its silence proves nothing.
            let unread = self.peers[side.other().idx()].blocked_since.is_some();
            let silent = !unread
                && p.awaiting_since
                    .is_some_and(|sent| now >= sent + t.pong_timeout);
            if stalled {
                self.fail(side, Failure::Stalled, now);
            } else if silent {
                self.fail(side, Failure::Unresponsive, now);
            }
        }
        if self.outcome.is_none()
            && let Some(interval) = t.ping_interval
        {
            for side in [Side::Client, Side::Backend] {
                let seq = self.pings;
                let p = self.peer(side);
                if !p.ping_queued() && p.awaiting_since.is_none() && now >= p.last_rx + interval {
                    p.ping = Some(Ping {
                        seq,
                        written_at: None,
                    });
                    self.pings += 1;
                    self.actions.push_back(Action::SendPing { to: side, seq });
                }
            }
        }
        for side in [Side::Client, Side::Backend] {
            let p = &self.peers[side.idx()];
            let reply_overdue = p.tcp == Tcp::Open
                && p.can_reply()
                && p.close_sent_at
                    .is_some_and(|sent| now >= sent + t.close_timeout);
            let drain_overdue =
                matches!(p.tcp, Tcp::Draining(since) if now >= since + t.close_timeout);
            if reply_overdue {
                if matches!(
                    self.outcome,
                    Some(Outcome::ClientClose | Outcome::BackendClose)
                ) {
                    self.outcome = Some(Outcome::CloseTimeout);
                }
                self.abort(side);
            } else if drain_overdue {
                self.abort(side);
            }
        }
        self.advance(now);
    }

    /// [`Session::next_deadline`], when it may have moved earlier since the last call;
    /// `None` when it cannot have. Every event may move it earlier except bytes
    /// arriving, which only push the ping, pong and idle deadlines later (unless they
    /// answer a liveness Ping): on the data path the relay need not look again.
    pub fn deadline_to_arm(&mut self) -> Option<Instant> {
        if !std::mem::take(&mut self.deadline_stale) {
            return None;
        }
        self.next_deadline()
    }

    /// The earliest time [`Session::on_timer`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = &*self.timers;
        let mut next: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        };
        if self.outcome.is_none() {
            consider(t.max_lifetime.map(|d| self.started + d));
            consider(t.idle_timeout.map(|d| self.last_data + d));
            for (i, p) in self.peers.iter().enumerate() {
                consider(t.write_timeout.zip(p.blocked_since).map(|(d, s)| s + d));
                if self.peers[1 - i].blocked_since.is_none() {
                    consider(p.awaiting_since.map(|s| s + t.pong_timeout));
                }
                if !p.ping_queued() && p.awaiting_since.is_none() {
                    consider(t.ping_interval.map(|d| p.last_rx + d));
                }
            }
        }
        for p in &self.peers {
            if p.tcp == Tcp::Open && p.can_reply() {
                consider(p.close_sent_at.map(|s| s + t.close_timeout));
            }
            if let Tcp::Draining(since) = p.tcp {
                consider(Some(since + t.close_timeout));
            }
        }
        next
    }

    /// Records the first end signal; returns whether this was it.
    fn begin(&mut self, outcome: Outcome, now: Instant) -> bool {
        if self.outcome.is_some() {
            return false;
        }
        self.outcome = Some(outcome);
        self.ending_since = Some(now);
        true
    }

    fn end_both(&mut self, outcome: Outcome, now: Instant) {
        if self.begin(outcome, now) {
            self.send_close(Side::Client, GOING_AWAY, now);
            self.send_close(Side::Backend, GOING_AWAY, now);
            self.advance(now);
        }
    }

    fn fail(&mut self, side: Side, failure: Failure, now: Instant) {
        let outcome = match (side, failure) {
            (Side::Client, Failure::Unresponsive) => Outcome::ClientUnresponsive,
            (Side::Client, Failure::Stalled) => Outcome::ClientStalled,
            (Side::Backend, _) => Outcome::BackendUnresponsive,
        };
        if self.begin(outcome, now) {
            self.abort(side);
            let other = side.other();
            self.send_close(other, failed_peer_code(other), now);
            self.advance(now);
        }
    }

    fn send_close(&mut self, to: Side, code: u16, now: Instant) {
        debug_assert!(is_sendable_close_code(code));
        let reason = match (&self.operator_reason, self.outcome) {
            (Some(text), Some(Outcome::AdminClose)) => Reason::Operator(text.clone()),
            (_, outcome) => Reason::Outcome(outcome.map_or("", Outcome::reason)),
        };
        let p = self.peer(to);
        if p.close_sent_at.is_none() && p.writable() {
            p.close_sent_at = Some(now);
            p.close_sent = Some(Some(code));
            p.wsgate_code = Some(code);
            self.actions
                .push_back(Action::SendClose { to, code, reason });
        }
    }

    fn abort(&mut self, side: Side) {
        let p = self.peer(side);
        if p.tcp != Tcp::Closed {
            p.tcp = Tcp::Closed;
            self.actions.push_back(Action::Abort(side));
        }
    }

    /// Moves an ending connection along: answers owed Closes and releases sockets of
    /// sides that are done talking.
    fn advance(&mut self, now: Instant) {
        if self.outcome.is_none() {
            return;
        }
        for side in [Side::Client, Side::Backend] {
            if self.peers[side.idx()].tcp == Tcp::Open && self.peers[side.idx()].write_dead {
                self.abort(side);
            }
        }
        for side in [Side::Client, Side::Backend] {
            let p = &self.peers[side.idx()];
            let other = &self.peers[side.other().idx()];
            // `side` sent a Close and got none back; the other side's reply would have
            // been forwarded, but it can no longer come.
            let owed = p.close_sent_at.is_none() && p.writable();
            if let (Some(code), true, false) = (p.close_received, owed, other.can_reply()) {
                let code = code.filter(|c| is_sendable_close_code(*c)).unwrap_or(1000);
                self.send_close(side, code, now);
            }
        }
        for side in [Side::Client, Side::Backend] {
            let p = self.peer(side);
            match p.tcp {
                Tcp::Open if p.done_talking() => {
                    if p.read_done {
                        p.tcp = Tcp::Closed;
                        self.actions.push_back(Action::Release(side));
                    } else {
                        p.tcp = Tcp::Draining(now);
                        // wsgate is the server toward the client, so it closes first
                        // (RFC 6455 §7.1.1), once its last bytes are out; the backend is
                        // expected to close first, which also leaves TIME_WAIT on the
                        // backend, not on wsgate's ports.
                        if side == Side::Client {
                            self.actions.push_back(Action::ShutdownWrite(side));
                        }
                    }
                }
                Tcp::Draining(_) if p.read_done => {
                    p.tcp = Tcp::Closed;
                    self.actions.push_back(Action::Release(side));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::Side::*;
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn timers() -> Timers {
        Timers {
            ping_interval: Some(ms(20_000)),
            pong_timeout: ms(10_000),
            close_timeout: ms(5_000),
            idle_timeout: None,
            max_lifetime: None,
            write_timeout: Some(ms(30_000)),
        }
    }

    struct Harness {
        s: Session,
        t0: Instant,
    }

    impl Harness {
        fn new(timers: Timers) -> Self {
            let t0 = Instant::now();
            Harness {
                s: Session::new(Arc::new(timers), t0),
                t0,
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn actions(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.s.next_action()).collect()
        }
        fn tick(&mut self, ms: u64) -> Vec<Action> {
            self.s.on_timer(self.at(ms));
            self.actions()
        }
    }

    fn close(to: Side, code: u16, reason: &'static str) -> Action {
        SendClose {
            to,
            code,
            reason: Reason::Outcome(reason),
        }
    }

    const FIN: Gone = Gone::Fin { mid_frame: false };
    const RESET: Gone = Gone::Failed { mid_frame: false };

    #[test]
    fn client_close_is_forwarded_and_the_reply_completes_both_handshakes() {
        let mut h = Harness::new(timers());
        assert_eq!(
            h.s.on_close_frame(Client, Some(1000), h.at(1)),
            Verdict::Forward
        );
        assert_eq!(h.actions(), vec![]);
        assert_eq!(
            h.s.on_close_frame(Backend, Some(1000), h.at(2)),
            Verdict::Forward
        );
        // wsgate closes toward the client first and waits for the backend's FIN.
        assert_eq!(h.actions(), vec![ShutdownWrite(Client)]);
        h.s.on_gone(Backend, FIN, h.at(3));
        assert_eq!(h.actions(), vec![Release(Backend)]);
        // Once the reply and the FIN are out, the client's socket closes at once.
        h.s.on_write_shut(Client, h.at(4));
        assert_eq!(h.actions(), vec![Release(Client)]);
        assert!(h.s.is_finished());
        assert_eq!(h.s.outcome(), Some(Outcome::ClientClose));
        assert_eq!(h.s.ending_since(), Some(h.at(1)));
        assert_eq!(h.s.close_from(Client), Some(Some(1000)));
        assert_eq!(h.s.wsgate_code_to(Client), None);
        // Each side got the other's Close.
        assert_eq!(h.s.close_to(Backend), Some(Some(1000)));
        assert_eq!(h.s.close_to(Client), Some(Some(1000)));
    }

    #[test]
    fn bytes_arriving_never_call_for_an_earlier_deadline() {
        let mut h = Harness::new(timers());
        assert_eq!(h.s.deadline_to_arm(), Some(h.at(20_000)));
        assert_eq!(h.s.deadline_to_arm(), None, "asked already");
        for ms in [1_000, 2_000, 3_000] {
            h.s.on_received(Client, true, h.at(ms));
            h.s.on_received(Backend, true, h.at(ms));
            assert_eq!(h.s.deadline_to_arm(), None);
            // The timer armed for 20 s only wakes the relay early; then it looks again.
            assert!(h.s.next_deadline() > Some(h.at(20_000)));
        }
        // A Ping answered by a byte: the next Ping's deadline, which may be earlier.
        h.tick(23_000);
        h.s.on_ping_sent(Client, h.at(23_000));
        assert_eq!(h.s.deadline_to_arm(), h.s.next_deadline());
        h.s.on_received(Client, false, h.at(23_001));
        assert_eq!(h.s.deadline_to_arm(), h.s.next_deadline());
        h.s.on_close_frame(Client, Some(1000), h.at(24_000));
        assert_eq!(h.s.deadline_to_arm(), Some(h.at(29_000)));
    }

    #[test]
    fn backend_close_waits_for_the_clients_reply() {
        let mut h = Harness::new(timers());
        assert_eq!(
            h.s.on_close_frame(Backend, Some(4000), h.at(1)),
            Verdict::Forward
        );
        assert_eq!(h.s.next_deadline(), Some(h.at(5_001)));
        assert_eq!(
            h.s.on_close_frame(Client, Some(4000), h.at(2)),
            Verdict::Forward
        );
        assert_eq!(h.actions(), vec![ShutdownWrite(Client)]);
        // A client FIN that arrives before the shutdown completed also releases it.
        h.s.on_gone(Client, FIN, h.at(3));
        h.s.on_gone(Backend, FIN, h.at(3));
        assert_eq!(h.actions(), vec![Release(Client), Release(Backend)]);
        h.s.on_write_shut(Client, h.at(4));
        assert_eq!(h.actions(), vec![]);
        assert_eq!(h.s.outcome(), Some(Outcome::BackendClose));
    }

    #[test]
    fn the_client_is_released_once_its_write_side_is_shut_not_on_its_fin() {
        let mut h = Harness::new(timers());
        h.s.on_close_frame(Backend, Some(1000), h.at(1));
        // A shutdown reported before the handshake is over changes nothing.
        h.s.on_write_shut(Client, h.at(1));
        assert_eq!(h.actions(), vec![]);
        h.s.on_close_frame(Client, Some(1000), h.at(2));
        assert_eq!(h.actions(), vec![ShutdownWrite(Client)]);
        h.s.on_write_shut(Client, h.at(3));
        assert_eq!(h.actions(), vec![Release(Client)]);
        // The backend is the server: wsgate waits for its FIN, at most close_timeout.
        assert!(!h.s.is_finished());
        assert_eq!(h.s.next_deadline(), Some(h.at(5_002)));
        assert_eq!(h.tick(5_002), vec![Abort(Backend)]);
        assert!(h.s.is_finished());
        assert_eq!(h.s.outcome(), Some(Outcome::BackendClose));
    }

    #[test]
    fn unanswered_close_times_out_and_wsgate_answers_the_owed_side() {
        let mut h = Harness::new(timers());
        h.s.on_close_frame(Client, Some(1000), h.at(0));
        assert_eq!(h.tick(4_999), vec![]);
        let actions = h.tick(5_000);
        assert_eq!(
            actions,
            vec![
                Abort(Backend),
                close(Client, 1000, "close handshake timed out"),
                ShutdownWrite(Client)
            ]
        );
        assert_eq!(h.s.outcome(), Some(Outcome::CloseTimeout));
        // The client never sends its FIN: the drain deadline aborts it.
        assert_eq!(h.s.next_deadline(), Some(h.at(10_000)));
        assert_eq!(h.tick(10_000), vec![Abort(Client)]);
        assert!(h.s.is_finished());
    }

    #[test]
    fn client_that_never_answers_a_backend_close_gets_aborted() {
        let mut h = Harness::new(timers());
        h.s.on_close_frame(Backend, Some(1001), h.at(0));
        let actions = h.tick(5_000);
        assert_eq!(
            actions,
            vec![
                Abort(Client),
                close(Backend, 1001, "close handshake timed out")
            ]
        );
        h.s.on_gone(Backend, FIN, h.at(5_001));
        assert_eq!(h.actions(), vec![Release(Backend)]);
        assert_eq!(h.s.outcome(), Some(Outcome::CloseTimeout));
    }

    #[test]
    fn client_fin_without_close_sends_1001_to_the_backend() {
        let mut h = Harness::new(timers());
        h.s.on_gone(Client, FIN, h.at(7));
        assert_eq!(
            h.actions(),
            vec![close(Backend, 1001, "client went away"), Release(Client)]
        );
        // The backend's reply is for wsgate, not for the departed client.
        assert_eq!(
            h.s.on_close_frame(Backend, Some(1001), h.at(8)),
            Verdict::Consume
        );
        h.s.on_gone(Backend, FIN, h.at(9));
        assert_eq!(h.actions(), vec![Release(Backend)]);
        assert_eq!(h.s.outcome(), Some(Outcome::ClientGone));
        assert!(h.s.is_finished());
    }

    #[test]
    fn client_gone_mid_frame_aborts_the_backend() {
        let mut h = Harness::new(timers());
        h.s.on_gone(Client, Gone::Failed { mid_frame: true }, h.at(1));
        assert_eq!(h.actions(), vec![Abort(Backend), Abort(Client)]);
        assert_eq!(h.s.outcome(), Some(Outcome::ClientGone));
        assert!(h.s.is_finished());
    }

    #[test]
    fn silent_client_is_pinged_then_declared_unresponsive() {
        let mut h = Harness::new(timers());
        h.s.on_received(Backend, true, h.at(19_000));
        assert_eq!(h.s.next_deadline(), Some(h.at(20_000)));
        assert_eq!(h.tick(20_000), vec![SendPing { to: Client, seq: 0 }]);
        h.s.on_ping_sent(Client, h.at(20_001));
        assert_eq!(h.s.next_deadline(), Some(h.at(30_001)));
        assert_eq!(
            h.tick(30_001),
            vec![Abort(Client), close(Backend, 1001, "client unresponsive")]
        );
        assert_eq!(h.s.outcome(), Some(Outcome::ClientUnresponsive));
    }

    #[test]
    fn the_pong_to_wsgates_last_ping_is_consumed_and_timed() {
        let mut h = Harness::new(timers());
        assert_eq!(h.tick(20_000)[0], SendPing { to: Client, seq: 0 });
        h.s.on_ping_sent(Client, h.at(20_004));
        h.s.on_received(Client, false, h.at(20_010));
        // An application Pong, and one with wsgate's payload but another number.
        assert_eq!(h.s.on_pong(Client, 7, h.at(20_010)), Pong::Application);
        assert_eq!(
            h.s.on_pong(Client, 0, h.at(20_010)),
            Pong::Ours { rtt: Some(ms(6)) }
        );
        assert_eq!(h.s.rtt(Client), Some(ms(6)));
        // Answered once: a repeat is not wsgate's any more.
        assert_eq!(h.s.on_pong(Client, 0, h.at(20_011)), Pong::Application);
        assert_eq!(h.s.rtt(Backend), None);
    }

    #[test]
    fn any_byte_after_a_ping_proves_liveness() {
        let mut h = Harness::new(timers());
        assert_eq!(
            h.tick(20_000),
            vec![
                SendPing { to: Client, seq: 0 },
                SendPing {
                    to: Backend,
                    seq: 1
                }
            ]
        );
        h.s.on_ping_sent(Client, h.at(20_000));
        h.s.on_ping_sent(Backend, h.at(20_000));
        h.s.on_received(Client, false, h.at(20_002));
        h.s.on_received(Backend, false, h.at(20_003));
        assert_eq!(h.tick(30_000), vec![]);
        assert_eq!(h.s.outcome(), None);
        assert_eq!(h.s.next_deadline(), Some(h.at(40_002)));
    }

    #[test]
    fn a_side_is_not_blamed_for_silence_while_its_bytes_cannot_be_read() {
        let mut h = Harness::new(Timers {
            write_timeout: None,
            ..timers()
        });
        assert_eq!(
            h.tick(20_000),
            vec![
                SendPing { to: Client, seq: 0 },
                SendPing {
                    to: Backend,
                    seq: 1
                }
            ]
        );
        h.s.on_ping_sent(Client, h.at(20_000));
        h.s.on_received(Backend, false, h.at(20_001));
        // The backend stopped reading: the client's Pong is stuck behind it.
        h.s.on_write_blocked(Backend, Some(h.at(20_001)));
        assert_eq!(h.tick(30_000), vec![]);
        h.s.on_write_blocked(Backend, None);
        assert_eq!(
            h.tick(30_001),
            vec![Abort(Client), close(Backend, 1001, "client unresponsive")]
        );
    }

    #[test]
    fn stalled_client_writes_end_the_connection() {
        let mut h = Harness::new(Timers {
            ping_interval: None,
            ..timers()
        });
        h.s.on_write_blocked(Client, Some(h.at(100)));
        assert_eq!(h.s.next_deadline(), Some(h.at(30_100)));
        h.s.on_write_blocked(Client, None);
        assert_eq!(h.s.next_deadline(), None);
        h.s.on_write_blocked(Client, Some(h.at(200)));
        assert_eq!(
            h.tick(30_200),
            vec![
                Abort(Client),
                close(Backend, 1001, "client stopped reading")
            ]
        );
        assert_eq!(h.s.outcome(), Some(Outcome::ClientStalled));
    }

    #[test]
    fn backend_fin_without_close_sends_1014_to_the_client() {
        let mut h = Harness::new(timers());
        h.s.on_gone(Backend, FIN, h.at(1));
        assert_eq!(
            h.actions(),
            vec![close(Client, 1014, "backend went away"), Release(Backend)]
        );
        assert_eq!(
            h.s.on_close_frame(Client, Some(1014), h.at(2)),
            Verdict::Consume
        );
        assert_eq!(h.actions(), vec![ShutdownWrite(Client)]);
        h.s.on_gone(Client, FIN, h.at(3));
        assert_eq!(h.actions(), vec![Release(Client)]);
        assert_eq!(h.s.outcome(), Some(Outcome::BackendGone));
    }

    #[test]
    fn backend_reset_or_stall_is_reported_as_such() {
        let mut h = Harness::new(timers());
        h.s.on_gone(Backend, RESET, h.at(1));
        assert_eq!(
            h.actions(),
            vec![close(Client, 1014, "backend went away"), Abort(Backend)]
        );

        let mut h = Harness::new(timers());
        h.s.on_write_blocked(Backend, Some(h.at(0)));
        assert_eq!(
            h.tick(30_000),
            vec![Abort(Backend), close(Client, 1014, "backend unresponsive")]
        );
        assert_eq!(h.s.outcome(), Some(Outcome::BackendUnresponsive));
    }

    #[test]
    fn idle_timeout_counts_data_frames_only() {
        let mut h = Harness::new(Timers {
            ping_interval: Some(ms(1_000)),
            idle_timeout: Some(ms(60_000)),
            ..timers()
        });
        h.s.on_received(Client, true, h.at(10_000));
        for ms in (11_000..70_000).step_by(1_000) {
            // Ping traffic keeps both sides alive but is not data.
            h.s.on_received(Client, false, h.at(ms));
            h.s.on_received(Backend, false, h.at(ms));
            assert!(h.tick(ms).iter().all(|a| matches!(a, SendPing { .. })));
            h.s.on_ping_sent(Client, h.at(ms));
            h.s.on_ping_sent(Backend, h.at(ms));
        }
        assert_eq!(
            h.tick(70_000),
            vec![
                close(Client, 1001, "idle timeout"),
                close(Backend, 1001, "idle timeout")
            ]
        );
        // Both replies are addressed to wsgate.
        assert_eq!(
            h.s.on_close_frame(Client, Some(1001), h.at(70_001)),
            Verdict::Consume
        );
        assert_eq!(
            h.s.on_close_frame(Backend, Some(1001), h.at(70_002)),
            Verdict::Consume
        );
        assert_eq!(h.actions(), vec![ShutdownWrite(Client)]);
        assert_eq!(h.s.outcome(), Some(Outcome::IdleTimeout));
    }

    #[test]
    fn max_lifetime_and_shutdown_close_both_sides_with_1001() {
        let mut h = Harness::new(Timers {
            max_lifetime: Some(ms(3_600_000)),
            ..timers()
        });
        h.s.on_received(Client, true, h.at(3_599_999));
        h.s.on_received(Backend, true, h.at(3_599_999));
        assert_eq!(h.s.next_deadline(), Some(h.at(3_600_000)));
        let actions = h.tick(3_600_000);
        assert_eq!(actions[0], close(Client, 1001, "max lifetime reached"));
        assert_eq!(h.s.outcome(), Some(Outcome::MaxLifetime));

        let mut h = Harness::new(timers());
        h.s.on_shutdown(1001, h.at(1));
        assert_eq!(
            h.actions(),
            vec![
                close(Client, 1001, "proxy shutting down"),
                close(Backend, 1001, "proxy shutting down")
            ]
        );
        // A second signal changes nothing.
        h.s.on_shutdown(1001, h.at(2));
        assert_eq!(h.actions(), vec![]);

        // A drain tells clients to reconnect elsewhere; the backend is going away.
        let mut h = Harness::new(timers());
        h.s.on_shutdown(1012, h.at(1));
        assert_eq!(
            h.actions(),
            vec![
                close(Client, 1012, "proxy shutting down"),
                close(Backend, 1001, "proxy shutting down")
            ]
        );
    }

    #[test]
    fn reloaded_timers_apply_to_an_open_connection() {
        let mut h = Harness::new(timers());
        h.s.on_received(Client, true, h.at(1_000));
        assert_eq!(h.s.next_deadline(), Some(h.at(20_000)));
        // An idle timeout introduced later counts from the last data frame.
        h.s.set_timers(Arc::new(Timers {
            idle_timeout: Some(ms(5_000)),
            ..timers()
        }));
        assert_eq!(h.s.next_deadline(), Some(h.at(6_000)));
        assert_eq!(
            h.tick(6_000),
            vec![
                close(Client, 1001, "idle timeout"),
                close(Backend, 1001, "idle timeout")
            ]
        );
    }

    #[test]
    fn invalid_client_framing_gets_1002_and_the_backend_1001() {
        let mut h = Harness::new(timers());
        h.s.on_protocol_error(Client, 1002, h.at(1));
        assert_eq!(
            h.actions(),
            vec![
                close(Client, 1002, "protocol error"),
                close(Backend, 1001, "protocol error"),
                ShutdownWrite(Client)
            ]
        );
        assert_eq!(h.s.outcome(), Some(Outcome::ProtocolError));
        assert_eq!(
            h.s.on_close_frame(Backend, Some(1001), h.at(2)),
            Verdict::Consume
        );
        h.s.on_gone(Backend, FIN, h.at(3));
        h.s.on_gone(Client, FIN, h.at(3));
        assert_eq!(h.actions(), vec![Release(Backend), Release(Client)]);
        assert!(h.s.is_finished());
    }

    #[test]
    fn admin_close_sends_the_requested_code_both_ways() {
        let mut h = Harness::new(timers());
        h.s.on_admin_close(4000, "maintenance".into(), h.at(1));
        let operator = |to| SendClose {
            to,
            code: 4000,
            reason: Reason::Operator("maintenance".into()),
        };
        assert_eq!(h.actions(), vec![operator(Client), operator(Backend)]);
        assert_eq!(h.s.outcome(), Some(Outcome::AdminClose));
        // Once ending, a second request changes nothing.
        h.s.on_admin_close(1000, "again".into(), h.at(2));
        assert_eq!(h.actions(), vec![]);
    }

    #[test]
    fn force_close_aborts_what_is_left() {
        let mut h = Harness::new(timers());
        h.s.on_shutdown(1012, h.at(0));
        h.actions();
        h.s.on_force_close(h.at(25_000));
        assert_eq!(h.actions(), vec![Abort(Client), Abort(Backend)]);
        assert!(h.s.is_finished());
    }

    #[test]
    fn reserved_close_codes_are_never_echoed() {
        let mut h = Harness::new(timers());
        // A client Close carrying 1005 (reserved) and a backend that vanishes.
        h.s.on_close_frame(Client, Some(1005), h.at(0));
        h.s.on_gone(Backend, RESET, h.at(1));
        let sent: Vec<_> = h
            .actions()
            .into_iter()
            .filter_map(|a| match a {
                SendClose { code, .. } => Some(code),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![1000]);
    }

    #[test]
    fn every_action_sequence_ends_with_both_sockets_closed() {
        // Whatever happens first, the timers alone bring the session to its end.
        type Step = fn(&mut Session, Instant);
        let starts: [Step; 6] = [
            |s, t| {
                s.on_close_frame(Client, Some(1000), t);
            },
            |s, t| {
                s.on_close_frame(Backend, None, t);
            },
            |s, t| s.on_gone(Client, FIN, t),
            |s, t| s.on_gone(Backend, FIN, t),
            |s, t| s.on_protocol_error(Backend, 1002, t),
            |s, t| s.on_shutdown(1012, t),
        ];
        for start in starts {
            let mut h = Harness::new(timers());
            let t0 = h.at(0);
            start(&mut h.s, t0);
            let mut guard = 0;
            while let Some(at) = h.s.next_deadline() {
                h.s.on_timer(at);
                h.actions();
                guard += 1;
                assert!(guard < 10, "timers never settle");
            }
            assert!(h.s.is_finished(), "{:?}", h.s);
        }
    }
}
