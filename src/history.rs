//! What is kept of exchanges that ended, for the admin page and the drain's report: how
//! many of each kind ended each way since start, the last records themselves (newest
//! first, as many as `admin.recent_endings`), and their release times over the last
//! five minutes.
//!
//! Pure data, written under the live table's lock once per recorded exchange; times come
//! from the caller.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::record::{Counters, Details, Kind, Outcome, Record};

/// How far back the release-time percentiles look.
pub const RELEASE_WINDOW: Duration = Duration::from_secs(300);
/// The window is kept as this many slots, each a histogram of its part of the window:
/// an ending counts for the five minutes after it, give or take one slot.
const SLOTS: usize = 30;
const SLOT: Duration = Duration::from_secs(RELEASE_WINDOW.as_secs() / SLOTS as u64);
/// Release-time histogram buckets: twelve per decade from 1 µs to 100 s, so a
/// percentile is known within about ±10%.
const PER_DECADE: f64 = 12.0;
const BUCKETS: usize = 8 * PER_DECADE as usize;

/// The endings history.
#[derive(Debug)]
pub struct History {
    start: Instant,
    /// By kind, then outcome.
    ended: [[u64; Outcome::ALL.len()]; 2],
    recent: VecDeque<Ended>,
    capacity: usize,
    /// By kind.
    releases: [Box<[Slot; SLOTS]>; 2],
}

#[derive(Debug, Clone)]
struct Ended {
    record: Record,
    at: SystemTime,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Which slot of time since `start` this one holds now.
    epoch: u64,
    counts: [u32; BUCKETS],
}

impl History {
    /// Keeps the last `capacity` records.
    pub fn new(capacity: usize, start: Instant) -> Self {
        let slots = || {
            Box::new(
                [Slot {
                    epoch: u64::MAX,
                    counts: [0; BUCKETS],
                }; SLOTS],
            )
        };
        History {
            start,
            ended: [[0; Outcome::ALL.len()]; 2],
            recent: VecDeque::new(),
            capacity,
            releases: [slots(), slots()],
        }
    }

    /// An exchange ended as `record` says, at `at` (wall clock) and `now`.
    pub fn add(&mut self, record: &Record, at: SystemTime, now: Instant) {
        let kind = record.kind().idx();
        self.ended[kind][record.outcome.idx()] += 1;
        if self.capacity > 0 {
            if self.recent.len() == self.capacity {
                self.recent.pop_back();
            }
            self.recent.push_front(Ended {
                record: record.clone(),
                at,
            });
        }
        let epoch = self.epoch(now);
        let slot = &mut self.releases[kind][(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            *slot = Slot {
                epoch,
                counts: [0; BUCKETS],
            };
        }
        slot.counts[bucket(record.release)] += 1;
    }

    /// Keeps the last `capacity` records from now on (a reload).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.recent.truncate(capacity);
    }

    /// Exchanges of `kind` ended since start, by outcome (indexed like
    /// [`Outcome::ALL`]).
    pub fn ended(&self, kind: Kind) -> [u64; Outcome::ALL.len()] {
        self.ended[kind.idx()]
    }

    /// The records kept, newest first; only those of `kind` and `outcome` if given.
    pub fn recent(&self, kind: Option<Kind>, outcome: Option<Outcome>) -> Vec<EndedView> {
        self.recent
            .iter()
            .filter(|e| kind.is_none_or(|k| e.record.kind() == k))
            .filter(|e| outcome.is_none_or(|o| e.record.outcome == o))
            .map(EndedView::from)
            .collect()
    }

    /// Release-time percentiles of `kind` over the last [`RELEASE_WINDOW`].
    pub fn releases(&self, kind: Kind, now: Instant) -> Releases {
        let current = self.epoch(now);
        let mut counts = [0u64; BUCKETS];
        for slot in self.releases[kind.idx()].iter() {
            if slot.epoch <= current && current - slot.epoch < SLOTS as u64 {
                for (sum, n) in counts.iter_mut().zip(slot.counts) {
                    *sum += u64::from(n);
                }
            }
        }
        let count: u64 = counts.iter().sum();
        // Nearest rank: the smallest bucket holding at least q of the samples.
        let percentile = |q: f64| {
            let rank = ((q * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            counts.iter().position(|n| {
                seen += n;
                seen >= rank
            })
        };
        let (p50, p99) = if count == 0 {
            (None, None)
        } else {
            (
                percentile(0.5).map(bucket_middle),
                percentile(0.99).map(bucket_middle),
            )
        };
        Releases {
            window_seconds: RELEASE_WINDOW.as_secs_f64(),
            count,
            p50,
            p99,
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.start).as_secs()) / SLOT.as_secs()
    }
}

/// The bucket of a release time.
fn bucket(release: Duration) -> usize {
    let us = release.as_secs_f64() * 1e6;
    if us <= 1.0 {
        return 0;
    }
    ((us.log10() * PER_DECADE) as usize).min(BUCKETS - 1)
}

/// The middle of a bucket (geometrically), in seconds.
fn bucket_middle(i: usize) -> f64 {
    10f64.powf((i as f64 + 0.5) / PER_DECADE) / 1e6
}

/// Release times over the last five minutes, as the admin page's summary shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Releases {
    pub window_seconds: f64,
    pub count: u64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// One ended exchange as `/connections/recent` shows it: the record of its log line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndedView {
    pub id: u64,
    /// `websocket` or `http`.
    pub kind: &'static str,
    /// The client TCP connection it came on.
    pub connection: u64,
    pub client: String,
    pub worker: usize,
    pub path: String,
    pub outcome: &'static str,
    /// Unix time, seconds.
    pub ended_at: f64,
    pub duration_seconds: f64,
    pub release_seconds: f64,
    pub client_to_backend: Traffic,
    pub backend_to_client: Traffic,
    #[serde(flatten)]
    pub detail: EndedDetail,
}

/// The fields of one kind in `/connections/recent`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EndedDetail {
    WebSocket {
        client_sent_code: Option<u16>,
        client_received_code: Option<u16>,
        backend_sent_code: Option<u16>,
        backend_received_code: Option<u16>,
        wsgate_to_client_code: Option<u16>,
        wsgate_to_backend_code: Option<u16>,
        client_rtt_seconds: Option<f64>,
        backend_rtt_seconds: Option<f64>,
    },
    Http {
        method: String,
        /// The status the client got; `null` when no response head reached it.
        status: Option<u16>,
        /// `length`, `chunked`, `close`, `http2` or `none`.
        framing: &'static str,
        event_stream: bool,
        /// It was a stream: an event stream, or a body open `http.stream_after` after
        /// its head.
        stream: bool,
        time_to_head_seconds: Option<f64>,
        heartbeats: u64,
    },
}

/// Bytes and frames one way (frames for a WebSocket only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<u64>,
}

impl From<&Ended> for EndedView {
    fn from(e: &Ended) -> Self {
        let r = &e.record;
        let websocket = matches!(r.details, Details::WebSocket(_));
        let traffic = |c: Counters| Traffic {
            bytes: c.bytes,
            frames: websocket.then_some(c.frames),
        };
        let detail = match &r.details {
            Details::WebSocket(w) => EndedDetail::WebSocket {
                client_sent_code: w.client_close.flatten(),
                client_received_code: w.client_received_close.flatten(),
                backend_sent_code: w.backend_close.flatten(),
                backend_received_code: w.backend_received_close.flatten(),
                wsgate_to_client_code: w.wsgate_to_client_close,
                wsgate_to_backend_code: w.wsgate_to_backend_close,
                client_rtt_seconds: w.client_rtt.map(|d| d.as_secs_f64()),
                backend_rtt_seconds: w.backend_rtt.map(|d| d.as_secs_f64()),
            },
            Details::Http(h) => EndedDetail::Http {
                method: h.method.to_string(),
                status: h.status,
                framing: h.framing.as_str(),
                event_stream: h.event_stream,
                stream: h.stream,
                time_to_head_seconds: h.time_to_head.map(|d| d.as_secs_f64()),
                heartbeats: h.heartbeats,
            },
        };
        EndedView {
            id: r.info.id,
            kind: r.kind().as_str(),
            connection: r.info.connection,
            client: r.info.client.to_string(),
            worker: r.info.worker,
            path: r.info.path.to_string(),
            outcome: r.outcome.as_str(),
            ended_at: e
                .at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            duration_seconds: r.duration.as_secs_f64(),
            release_seconds: r.release.as_secs_f64(),
            client_to_backend: traffic(r.client_to_backend),
            backend_to_client: traffic(r.backend_to_client),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, outcome: Outcome, release_us: u64) -> Record {
        let mut r = Record::websocket_example(id, outcome);
        r.release = Duration::from_micros(release_us);
        if let Details::WebSocket(w) = &mut r.details {
            w.backend_close = None;
            w.client_received_close = Some(Some(1001));
            w.wsgate_to_client_close = Some(1001);
        }
        r
    }

    #[test]
    fn the_last_records_are_kept_newest_first_and_filtered() {
        let t0 = Instant::now();
        let mut h = History::new(4, t0);
        for id in 1..=5 {
            let outcome = if id % 2 == 0 {
                Outcome::ClientGone
            } else {
                Outcome::ClientClose
            };
            h.add(&record(id, outcome, 100), SystemTime::now(), t0);
        }
        h.add(
            &Record::http_example(6, Outcome::ClientAborted),
            SystemTime::now(),
            t0,
        );
        let ids: Vec<u64> = h.recent(None, None).iter().map(|e| e.id).collect();
        assert_eq!(ids, [6, 5, 4, 3]);
        let gone: Vec<u64> = h
            .recent(None, Some(Outcome::ClientGone))
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(gone, [4]);
        let http: Vec<u64> = h
            .recent(Some(Kind::Http), None)
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(http, [6]);
        let ws = h.ended(Kind::WebSocket);
        assert_eq!(ws[Outcome::ClientClose.idx()], 3);
        assert_eq!(ws[Outcome::ClientGone.idx()], 2);
        assert_eq!(h.ended(Kind::Http)[Outcome::ClientAborted.idx()], 1);
        assert_eq!(ws[Outcome::ClientAborted.idx()], 0);
        let view = &h.recent(Some(Kind::WebSocket), None)[0];
        let EndedDetail::WebSocket {
            client_sent_code,
            client_received_code,
            wsgate_to_client_code,
            ..
        } = view.detail
        else {
            panic!("{view:?}")
        };
        assert_eq!(
            (client_sent_code, client_received_code),
            (Some(1000), Some(1001))
        );
        assert_eq!(wsgate_to_client_code, Some(1001));
        h.set_capacity(1);
        assert_eq!(h.recent(None, None).len(), 1);
    }

    #[test]
    fn an_http_record_shows_its_request_and_response_and_no_frames() {
        let t0 = Instant::now();
        let mut h = History::new(4, t0);
        h.add(
            &Record::http_example(9, Outcome::ClientAborted),
            SystemTime::now(),
            t0,
        );
        let view = serde_json::to_value(&h.recent(None, None)[0]).unwrap();
        assert_eq!(view["kind"], "http");
        assert_eq!(view["outcome"], "client_aborted");
        assert_eq!(view["method"], "POST");
        assert_eq!(view["status"], 200);
        assert_eq!(view["framing"], "chunked");
        assert_eq!(view["event_stream"], true);
        assert_eq!(
            view["backend_to_client"],
            serde_json::json!({"bytes": 4096})
        );
        assert!(view.get("client_sent_code").is_none(), "{view}");
        assert_eq!(view["release_seconds"], 0.0002);
    }

    #[test]
    fn release_percentiles_cover_the_last_five_minutes() {
        let t0 = Instant::now();
        let mut h = History::new(0, t0);
        assert_eq!(h.releases(Kind::WebSocket, t0).count, 0);
        assert_eq!(h.releases(Kind::WebSocket, t0).p50, None);
        // 98 fast releases and 2 slow ones.
        for i in 0..100 {
            let us = if i < 98 { 400 } else { 3_000_000 };
            h.add(&record(i, Outcome::ClientClose, us), SystemTime::now(), t0);
        }
        let r = h.releases(Kind::WebSocket, t0 + Duration::from_secs(1));
        assert_eq!(r.count, 100);
        let p50 = r.p50.unwrap();
        assert!((0.00036..0.00044).contains(&p50), "{p50}");
        let p99 = r.p99.unwrap();
        assert!((2.7..3.3).contains(&p99), "{p99}");
        // Each kind has its own.
        assert_eq!(h.releases(Kind::Http, t0).count, 0);
        // Nothing recorded for records kept: capacity 0.
        assert!(h.recent(None, None).is_empty());
        // Five minutes later the old slots no longer count.
        let later = t0 + RELEASE_WINDOW + SLOT;
        assert_eq!(h.releases(Kind::WebSocket, later).count, 0);
        h.add(
            &record(1, Outcome::ClientGone, 50),
            SystemTime::now(),
            later,
        );
        assert_eq!(h.releases(Kind::WebSocket, later).count, 1);
    }

    #[test]
    fn buckets_span_microseconds_to_minutes() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_secs(1000)), BUCKETS - 1);
        for us in [3u64, 70, 400, 12_000, 900_000, 40_000_000] {
            let mid = bucket_middle(bucket(Duration::from_micros(us))) * 1e6;
            let ratio = mid / us as f64;
            assert!((0.89..1.13).contains(&ratio), "{us} µs -> {mid}");
        }
    }
}
