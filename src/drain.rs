//! The drain: how a wsgate leaves without dropping WebSockets and without a reconnect
//! storm. It starts on `POST /drain` (a Kubernetes `preStop` hook, while the backend
//! still serves) or on SIGTERM/SIGINT, and then:
//!
//! - `/readyz` fails, so the pod leaves the Service's endpoints;
//! - the proxy port keeps accepting (endpoints update late): new WebSocket upgrades get
//!   503 with `Retry-After`, plain requests are still forwarded, with `Connection: close`;
//! - every open WebSocket gets its closing handshake — `shutdown.client_close_code`
//!   (1012 "service restart") to the client, 1001 to the backend — at a moment drawn at
//!   random within `shutdown.spread`, so that clients reconnect to other pods a few at a
//!   time rather than all at once; each open event stream (`text/event-stream`) ends
//!   cleanly at its next event boundary at such a moment (EventSource reconnects by
//!   itself); other HTTP streams run on until the deadline, since ending them early
//!   would cut their result;
//! - the process exits on SIGTERM once nothing is left open, or at the drain deadline
//!   (`shutdown.drain_timeout` after the start), when what is left is aborted.
//!
//! [`schedule`] decides the moments (pure); [`close_over`] carries them out. The CLI's
//! `wsgate drain` is [`request`], a client of the admin endpoint.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::live::{LiveExchange, LiveTable};
use crate::record::{Kind, Outcome};

/// A drain's state: not begun, or begun at a known moment.
#[derive(Debug, Default)]
pub struct Drain {
    /// Cancelled when the drain begins; HTTP connections open then finish gracefully.
    begun: CancellationToken,
    state: OnceLock<Begun>,
}

#[derive(Debug)]
struct Begun {
    /// What started it: `admin` (`POST /drain`) or `signal`.
    trigger: &'static str,
    at: Instant,
    deadline: Instant,
    spread: Duration,
    client_close_code: u16,
    /// Exchanges ended before it, by kind and outcome, to tell what it ended.
    ended_before: [[u64; Outcome::ALL.len()]; 2],
}

/// How the drain is to go, from the configuration in force when it begins.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub drain_timeout: Duration,
    pub spread: Duration,
    pub client_close_code: u16,
}

impl Drain {
    pub fn is_begun(&self) -> bool {
        self.begun.is_cancelled()
    }

    /// Cancelled when the drain begins.
    pub fn begun(&self) -> &CancellationToken {
        &self.begun
    }

    /// When whatever is still open gets aborted; `None` before the drain.
    pub fn deadline(&self) -> Option<Instant> {
        self.state.get().map(|b| b.deadline)
    }

    /// Begins the drain of the connections in `live` as `plan` says, closing them from a
    /// task on `tasks`. Returns false, and does nothing, if it had begun already.
    pub fn begin(
        &self,
        trigger: &'static str,
        plan: Plan,
        live: &LiveTable,
        tasks: &tokio_util::task::TaskTracker,
    ) -> bool {
        let at = Instant::now();
        let begun = Begun {
            trigger,
            at,
            deadline: at + plan.drain_timeout,
            spread: plan.spread,
            client_close_code: plan.client_close_code,
            ended_before: Kind::BOTH.map(|k| live.ended(k)),
        };
        if self.state.set(begun).is_err() {
            return false;
        }
        self.begun.cancel();
        let open = live.begin_drain();
        tracing::info!(
            trigger,
            open_exchanges = open.len(),
            spread = ?plan.spread,
            client_close_code = plan.client_close_code,
            drain_timeout = ?plan.drain_timeout,
            "draining: closing WebSockets and event streams, refusing new WebSockets"
        );
        tasks.spawn(close_over(open, plan.spread));
        true
    }

    /// Where the drain stands, for `GET /drain`.
    pub fn status(&self, live: &LiveTable) -> Status {
        let open_websockets = live.count(Kind::WebSocket);
        let open_http_streams = live.count(Kind::Http);
        let Some(b) = self.state.get() else {
            return Status {
                draining: false,
                open_websockets,
                open_http_streams,
                ..Status::default()
            };
        };
        let now = Instant::now();
        let since_start = |kind: Kind| {
            let ended = live.ended(kind);
            let before = &b.ended_before[kind.idx()];
            kind.outcomes()
                .iter()
                .filter_map(|o| {
                    let n = ended[o.idx()].saturating_sub(before[o.idx()]);
                    (n > 0).then(|| (o.as_str().to_string(), n))
                })
                .collect()
        };
        Status {
            draining: true,
            trigger: Some(b.trigger.to_string()),
            seconds_since_start: Some(now.saturating_duration_since(b.at).as_secs_f64()),
            seconds_to_deadline: Some(b.deadline.saturating_duration_since(now).as_secs_f64()),
            spread_seconds: Some(b.spread.as_secs_f64()),
            client_close_code: Some(b.client_close_code),
            open_websockets,
            open_http_streams,
            ended_since_start: since_start(Kind::WebSocket),
            http_ended_since_start: since_start(Kind::Http),
        }
    }
}

/// The drain as `GET /drain` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub draining: bool,
    /// `admin` or `signal`.
    pub trigger: Option<String>,
    pub seconds_since_start: Option<f64>,
    /// Until what is still open gets aborted.
    pub seconds_to_deadline: Option<f64>,
    pub spread_seconds: Option<f64>,
    pub client_close_code: Option<u16>,
    pub open_websockets: usize,
    /// HTTP streams open (event streams end at an event boundary within the spread;
    /// other streams run until the deadline).
    #[serde(default)]
    pub open_http_streams: usize,
    /// WebSockets that ended since the drain began, by outcome.
    pub ended_since_start: BTreeMap<String, u64>,
    /// HTTP streams (and cut-short exchanges) that ended since the drain began, by
    /// outcome.
    #[serde(default)]
    pub http_ended_since_start: BTreeMap<String, u64>,
}

/// The moments, counted from the start of the drain, at which `n` connections get their
/// Close: drawn uniformly at random within `spread`, in order.
pub fn schedule(n: usize, spread: Duration, rng: &mut impl Rng) -> Vec<Duration> {
    let mut at: Vec<Duration> = (0..n)
        .map(|_| spread.mul_f64(rng.random::<f64>()))
        .collect();
    at.sort_unstable();
    at
}

/// Asks each of `conns` to close at its moment of a [`schedule`] over `spread`.
async fn close_over(mut conns: Vec<Arc<LiveExchange>>, spread: Duration) {
    let start = tokio::time::Instant::now();
    let moments = schedule(conns.len(), spread, &mut rand::rng());
    // Which connection gets which moment is random too: the table lists them by id,
    // which is the order they came in.
    rand::seq::SliceRandom::shuffle(&mut conns[..], &mut rand::rng());
    for (conn, at) in conns.iter().zip(moments) {
        tokio::time::sleep_until(start + at).await;
        conn.drain_now();
    }
}

/// How long the CLI waits for one answer of the admin listener.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `wsgate drain --wait` asks how the drain goes.
const POLL: Duration = Duration::from_millis(100);

/// `wsgate drain`: starts the drain of the wsgate whose admin listener is `admin` and,
/// with `wait`, waits until no WebSocket is left or the drain deadline passed. Returns a
/// line saying what happened.
pub fn request(admin: SocketAddr, wait: bool) -> Result<String, String> {
    let (code, body) = call(admin, "POST", "/drain")?;
    if code != 202 {
        return Err(format!(
            "POST /drain on {admin} answered {code}: {}",
            body.trim()
        ));
    }
    if !wait {
        return Ok(format!("{admin}: draining"));
    }
    loop {
        let (code, body) = call(admin, "GET", "/drain")?;
        if code != 200 {
            return Err(format!(
                "GET /drain on {admin} answered {code}: {}",
                body.trim()
            ));
        }
        let status: Status = serde_json::from_str(&body)
            .map_err(|e| format!("GET /drain on {admin}: unexpected answer ({e})"))?;
        let deadline_passed = status.seconds_to_deadline.is_some_and(|s| s <= 0.0);
        if status.open_websockets + status.open_http_streams == 0 || deadline_passed {
            return Ok(summary(&status));
        }
        std::thread::sleep(POLL);
    }
}

/// "drained in 4.8 s: 50 WebSocket(s) ended (client_close 2, shutdown 48)", and the HTTP
/// streams' line when any ended.
pub fn summary(status: &Status) -> String {
    let how = |ended: &BTreeMap<String, u64>| {
        ended
            .iter()
            .map(|(outcome, n)| format!("{outcome} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ended: u64 = status.ended_since_start.values().sum();
    let streams: u64 = status.http_ended_since_start.values().sum();
    let took = status.seconds_since_start.unwrap_or(0.0);
    let open = status.open_websockets + status.open_http_streams;
    let head = if open == 0 {
        format!("drained in {took:.1} s")
    } else {
        format!(
            "drain deadline reached after {took:.1} s with {} WebSocket(s) and {} HTTP stream(s) still open",
            status.open_websockets, status.open_http_streams
        )
    };
    let mut line = if ended == 0 {
        format!("{head}: no WebSocket ended")
    } else {
        format!(
            "{head}: {ended} WebSocket(s) ended ({})",
            how(&status.ended_since_start)
        )
    };
    if streams > 0 {
        line.push_str(&format!(
            "; {streams} HTTP stream(s) ended ({})",
            how(&status.http_ended_since_start)
        ));
    }
    line
}

/// One HTTP/1.1 request to the admin listener; the status code and body.
fn call(admin: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    let fail = |e: std::io::Error| format!("{method} {path} on {admin}: {e}");
    let mut s = TcpStream::connect_timeout(&admin, CLIENT_TIMEOUT).map_err(fail)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(fail)?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(fail)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut answer = Vec::new();
    // An admin answer is small; a bound keeps a wrong address from feeding us forever.
    s.take(1 << 20).read_to_end(&mut answer).map_err(fail)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} {path} on {admin}: not an HTTP answer"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{method} {path} on {admin}: not an HTTP answer"))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn closes_are_spread_over_the_whole_window_in_order() {
        let spread = Duration::from_secs(5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let at = schedule(1000, spread, &mut rng);
        assert_eq!(at.len(), 1000);
        assert!(at.windows(2).all(|w| w[0] <= w[1]), "in order");
        assert!(at.iter().all(|t| *t < spread), "within the window");
        // Uniform: about a tenth in each tenth of the window.
        for tenth in 0..10 {
            let (lo, hi) = (spread * tenth / 10, spread * (tenth + 1) / 10);
            let n = at.iter().filter(|t| **t >= lo && **t < hi).count();
            assert!((60..=140).contains(&n), "tenth {tenth}: {n}");
        }
        assert!(
            schedule(3, Duration::ZERO, &mut rng)
                .iter()
                .all(|t| t.is_zero())
        );
    }

    #[test]
    fn the_summary_says_how_the_websockets_ended() {
        let mut status = Status {
            draining: true,
            seconds_since_start: Some(4.84),
            open_websockets: 0,
            ..Status::default()
        };
        status.ended_since_start.insert("client_close".into(), 2);
        status.ended_since_start.insert("shutdown".into(), 48);
        assert_eq!(
            summary(&status),
            "drained in 4.8 s: 50 WebSocket(s) ended (client_close 2, shutdown 48)"
        );
        status.open_websockets = 3;
        assert!(summary(&status).starts_with("drain deadline reached after 4.8 s with 3"));
    }
}
