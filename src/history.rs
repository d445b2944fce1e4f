//! What is kept of WebSockets that ended, for the admin page and the drain's report:
//! how many ended each way since start, the last records themselves (newest first, as
//! many as `admin.recent_endings`), and their release times over the last five minutes.
//!
//! Pure data, written under the live table's lock once per ended connection; times come
//! from the caller.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::record::{Counters, Outcome, Record};

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
    ended: [u64; Outcome::ALL.len()],
    recent: VecDeque<Ended>,
    capacity: usize,
    releases: Box<[Slot; SLOTS]>,
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
        History {
            start,
            ended: [0; Outcome::ALL.len()],
            recent: VecDeque::new(),
            capacity,
            releases: Box::new(
                [Slot {
                    epoch: u64::MAX,
                    counts: [0; BUCKETS],
                }; SLOTS],
            ),
        }
    }

    /// A connection ended as `record` says, at `at` (wall clock) and `now`.
    pub fn add(&mut self, record: &Record, at: SystemTime, now: Instant) {
        self.ended[record.outcome.idx()] += 1;
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
        let slot = &mut self.releases[(epoch % SLOTS as u64) as usize];
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

    /// Connections ended since start, by outcome (indexed like [`Outcome::ALL`]).
    pub fn ended(&self) -> [u64; Outcome::ALL.len()] {
        self.ended
    }

    /// The records kept, newest first; only those of `outcome` if given.
    pub fn recent(&self, outcome: Option<Outcome>) -> Vec<EndedView> {
        self.recent
            .iter()
            .filter(|e| outcome.is_none_or(|o| e.record.outcome == o))
            .map(EndedView::from)
            .collect()
    }

    /// Release-time percentiles over the last [`RELEASE_WINDOW`].
    pub fn releases(&self, now: Instant) -> Releases {
        let current = self.epoch(now);
        let mut counts = [0u64; BUCKETS];
        for slot in self.releases.iter() {
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

/// One ended connection as `/connections/recent` shows it: the record of its log line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndedView {
    pub id: u64,
    pub client: String,
    pub worker: usize,
    pub path: String,
    pub outcome: &'static str,
    /// Unix time, seconds.
    pub ended_at: f64,
    pub duration_seconds: f64,
    pub release_seconds: f64,
    pub client_sent_code: Option<u16>,
    pub client_received_code: Option<u16>,
    pub backend_sent_code: Option<u16>,
    pub backend_received_code: Option<u16>,
    pub wsgate_to_client_code: Option<u16>,
    pub wsgate_to_backend_code: Option<u16>,
    pub client_to_backend: Traffic,
    pub backend_to_client: Traffic,
    pub client_rtt_seconds: Option<f64>,
    pub backend_rtt_seconds: Option<f64>,
}

/// Bytes and frames one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub bytes: u64,
    pub frames: u64,
}

impl From<Counters> for Traffic {
    fn from(c: Counters) -> Self {
        Traffic {
            bytes: c.bytes,
            frames: c.frames,
        }
    }
}

impl From<&Ended> for EndedView {
    fn from(e: &Ended) -> Self {
        let r = &e.record;
        EndedView {
            id: r.info.id,
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
            client_sent_code: r.client_close.flatten(),
            client_received_code: r.client_received_close.flatten(),
            backend_sent_code: r.backend_close.flatten(),
            backend_received_code: r.backend_received_close.flatten(),
            wsgate_to_client_code: r.wsgate_to_client_close,
            wsgate_to_backend_code: r.wsgate_to_backend_close,
            client_to_backend: r.client_to_backend.into(),
            backend_to_client: r.backend_to_client.into(),
            client_rtt_seconds: r.client_rtt.map(|d| d.as_secs_f64()),
            backend_rtt_seconds: r.backend_rtt.map(|d| d.as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ConnectionInfo;

    fn record(id: u64, outcome: Outcome, release_us: u64) -> Record {
        Record {
            info: ConnectionInfo {
                id,
                client: "127.0.0.1:1".parse().unwrap(),
                worker: 0,
                path: "/ws".into(),
            },
            outcome,
            duration: Duration::from_millis(10),
            release: Duration::from_micros(release_us),
            client_to_backend: Counters::default(),
            backend_to_client: Counters::default(),
            client_close: Some(Some(1000)),
            backend_close: None,
            client_received_close: Some(Some(1001)),
            backend_received_close: Some(Some(1000)),
            wsgate_to_client_close: Some(1001),
            wsgate_to_backend_close: None,
            client_rtt: None,
            backend_rtt: None,
        }
    }

    #[test]
    fn the_last_records_are_kept_newest_first_and_filtered() {
        let t0 = Instant::now();
        let mut h = History::new(3, t0);
        for id in 1..=5 {
            let outcome = if id % 2 == 0 {
                Outcome::ClientGone
            } else {
                Outcome::ClientClose
            };
            h.add(&record(id, outcome, 100), SystemTime::now(), t0);
        }
        let ids: Vec<u64> = h.recent(None).iter().map(|e| e.id).collect();
        assert_eq!(ids, [5, 4, 3]);
        let gone: Vec<u64> = h
            .recent(Some(Outcome::ClientGone))
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(gone, [4]);
        assert_eq!(h.ended()[Outcome::ClientClose.idx()], 3);
        assert_eq!(h.ended()[Outcome::ClientGone.idx()], 2);
        let view = &h.recent(None)[0];
        assert_eq!(
            (view.client_sent_code, view.client_received_code),
            (Some(1000), Some(1001))
        );
        assert_eq!(view.wsgate_to_client_code, Some(1001));
        h.set_capacity(1);
        assert_eq!(h.recent(None).len(), 1);
    }

    #[test]
    fn release_percentiles_cover_the_last_five_minutes() {
        let t0 = Instant::now();
        let mut h = History::new(0, t0);
        assert_eq!(h.releases(t0).count, 0);
        assert_eq!(h.releases(t0).p50, None);
        // 98 fast releases and 2 slow ones.
        for i in 0..100 {
            let us = if i < 98 { 400 } else { 3_000_000 };
            h.add(&record(i, Outcome::ClientClose, us), SystemTime::now(), t0);
        }
        let r = h.releases(t0 + Duration::from_secs(1));
        assert_eq!(r.count, 100);
        let p50 = r.p50.unwrap();
        assert!((0.00036..0.00044).contains(&p50), "{p50}");
        let p99 = r.p99.unwrap();
        assert!((2.7..3.3).contains(&p99), "{p99}");
        // Nothing recorded for records kept: capacity 0.
        assert!(h.recent(None).is_empty());
        // Five minutes later the old slots no longer count.
        let later = t0 + RELEASE_WINDOW + SLOT;
        assert_eq!(h.releases(later).count, 0);
        h.add(
            &record(1, Outcome::ClientGone, 50),
            SystemTime::now(),
            later,
        );
        assert_eq!(h.releases(later).count, 1);
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
