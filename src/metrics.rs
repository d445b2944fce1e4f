//! Prometheus metrics, rendered by the admin listener's `/metrics`.
//!
//! Each server owns its own recorder (not the process-global one), so several servers in
//! one process — the tests — keep separate counts. Every series with a closed label set
//! is registered up front: dashboards and alerts see zeros instead of missing series,
//! and the hot path only adds to atomics through pre-built handles.
//!
//! Names follow Prometheus conventions: prefix `wsgate_`, base units (`_seconds`,
//! `_bytes`), counters end in `_total`; labels come from closed sets only.

use std::fmt::Write as _;
use std::time::Duration;

use hyper::{Method, StatusCode};
use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::error::{ProxyError, UPGRADE_RESULTS};
use crate::record::{Counters, Details, Kind, Outcome, Record};
use crate::side::Side;

const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Connection durations: 10 ms to 24 h.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
    14400.0, 43200.0, 86400.0,
];
/// Release times: 100 µs to 60 s.
const RELEASE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// Ping round trips and HTTP latencies: 100 µs to 60 s.
const LATENCY_BUCKETS: &[f64] = RELEASE_BUCKETS;

/// Who sent a Close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseSender {
    Client,
    Backend,
    Wsgate,
}

impl CloseSender {
    const ALL: [CloseSender; 3] = [
        CloseSender::Client,
        CloseSender::Backend,
        CloseSender::Wsgate,
    ];

    fn as_str(self) -> &'static str {
        match self {
            CloseSender::Client => "client",
            CloseSender::Backend => "backend",
            CloseSender::Wsgate => "wsgate",
        }
    }
}

/// Label values for Close codes: the registered codes 1000-1015 by number, then
/// `other_valid` (3000-4999), `invalid`, and `none` (a Close without a code).
const CODE_LABELS: [&str; 19] = [
    "1000",
    "1001",
    "1002",
    "1003",
    "1004",
    "1005",
    "1006",
    "1007",
    "1008",
    "1009",
    "1010",
    "1011",
    "1012",
    "1013",
    "1014",
    "1015",
    "other_valid",
    "invalid",
    "none",
];

fn code_label_index(code: Option<u16>) -> usize {
    match code {
        Some(c @ 1000..=1015) => usize::from(c - 1000),
        Some(3000..=4999) => 16,
        Some(_) => 17,
        None => 18,
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const METHOD_GROUPS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];

fn method_group(m: &Method) -> usize {
    METHOD_GROUPS
        .iter()
        .position(|g| *g == m.as_str())
        .unwrap_or(METHOD_GROUPS.len() - 1)
}

fn status_class(s: StatusCode) -> usize {
    usize::from((s.as_u16() / 100).clamp(1, 5) - 1)
}

/// One handle per outcome of a kind, indexed by [`Outcome::idx`]: the outcomes of
/// other kinds have none, so each metric's label set is its kind's.
struct ByOutcome<T>(Vec<Option<T>>);

impl<T> ByOutcome<T> {
    fn new(kind: Kind, make: impl Fn(Outcome) -> T) -> Self {
        ByOutcome(
            Outcome::ALL
                .iter()
                .map(|o| kind.outcomes().contains(o).then(|| make(*o)))
                .collect(),
        )
    }

    fn get(&self, outcome: Outcome) -> Option<&T> {
        self.0.get(outcome.idx()).and_then(Option::as_ref)
    }
}

/// The server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Open WebSocket relays.
    pub websockets_active: Gauge,
    /// Open HTTP streams (those in the live table).
    pub http_streams_active: Gauge,
    /// Open client TCP connections (HTTP and WebSocket).
    pub connections_active: Gauge,
    upgrades: Vec<Counter>,
    ended: ByOutcome<Counter>,
    duration: ByOutcome<Histogram>,
    release: ByOutcome<Histogram>,
    http_ended: ByOutcome<Counter>,
    http_stream_duration: ByOutcome<Histogram>,
    http_release: ByOutcome<Histogram>,
    /// Body bytes of HTTP streams, by the side that sent them.
    http_stream_bytes: [Counter; 2],
    /// SSE comment lines wsgate wrote into quiet event streams.
    pub sse_heartbeats: Counter,
    /// [sender][code label]
    close_frames: Vec<Vec<Counter>>,
    /// Indexed by the side that sent them: client (client_to_backend), backend.
    frames: [Counter; 2],
    bytes: [Counter; 2],
    /// Indexed by the side that was pinged.
    ping_rtt: [Histogram; 2],
    /// [status class][method group]
    http_requests: Vec<Vec<Counter>>,
    /// [status class]
    http_duration: Vec<Histogram>,
    /// Client connections refused at `max_connections`.
    pub connections_rejected: Counter,
    /// The `max_connections` setting.
    pub connections_max: Gauge,
    /// 1 from the start of a drain.
    pub draining: Gauge,
    /// Configuration reloads: [ok, error].
    reloads: [Counter; 2],
    reload_success_time: Gauge,
}

impl Metrics {
    pub fn new(max_connections: usize) -> Metrics {
        let builder = [
            (
                "wsgate_websocket_connection_duration_seconds",
                DURATION_BUCKETS,
            ),
            ("wsgate_websocket_release_seconds", RELEASE_BUCKETS),
            ("wsgate_websocket_ping_rtt_seconds", LATENCY_BUCKETS),
            ("wsgate_http_request_duration_seconds", LATENCY_BUCKETS),
            ("wsgate_http_stream_duration_seconds", DURATION_BUCKETS),
            ("wsgate_http_release_seconds", RELEASE_BUCKETS),
        ]
        .into_iter()
        .fold(PrometheusBuilder::new(), |b, (name, buckets)| {
            // Cannot fail: the bucket lists are not empty.
            b.set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new())
        });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let r = &recorder;

        let counter = |name: &'static str, labels: Vec<Label>| {
            r.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let histogram = |name: &'static str, labels: Vec<Label>| {
            r.register_histogram(&Key::from_parts(name, labels), &METADATA)
        };
        let gauge = |name: &'static str| r.register_gauge(&Key::from_name(name), &METADATA);
        let describe_counter = |name: &'static str, unit, help: &'static str| {
            r.describe_counter(
                KeyName::from_const_str(name),
                unit,
                SharedString::const_str(help),
            )
        };
        let describe_gauge = |name: &'static str, help: &'static str| {
            r.describe_gauge(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            )
        };
        let describe_histogram = |name: &'static str, help: &'static str| {
            r.describe_histogram(
                KeyName::from_const_str(name),
                Some(Unit::Seconds),
                SharedString::const_str(help),
            )
        };

        describe_gauge(
            "wsgate_build_info",
            "wsgate build information; the value is always 1.",
        );
        r.register_gauge(
            &Key::from_parts(
                "wsgate_build_info",
                vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
            ),
            &METADATA,
        )
        .set(1.0);
        describe_gauge(
            "wsgate_connections_max",
            "The max_connections setting: client connections served at once.",
        );
        let connections_max = gauge("wsgate_connections_max");
        connections_max.set(max_connections as f64);
        describe_gauge(
            "wsgate_draining",
            "1 while wsgate drains (after POST /drain or a stop signal), else 0.",
        );
        describe_counter(
            "wsgate_config_reloads_total",
            None,
            "Configuration reloads (SIGHUP or a changed file), by result.",
        );
        describe_gauge(
            "wsgate_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (Unix time): at start, or the last successful reload.",
        );
        let reload_success_time = gauge("wsgate_config_last_reload_success_timestamp_seconds");
        reload_success_time.set(unix_now());
        describe_gauge(
            "wsgate_connections_active",
            "Client TCP connections open (HTTP and WebSocket).",
        );
        describe_counter(
            "wsgate_connections_rejected_total",
            None,
            "Client connections refused because max_connections was reached.",
        );
        describe_gauge(
            "wsgate_websocket_connections_active",
            "WebSocket connections being relayed.",
        );
        describe_counter(
            "wsgate_websocket_upgrades_total",
            None,
            "WebSocket upgrade requests by result.",
        );
        describe_counter(
            "wsgate_websocket_connections_ended_total",
            None,
            "Relayed WebSocket connections ended, by outcome.",
        );
        describe_histogram(
            "wsgate_websocket_connection_duration_seconds",
            "Lifetime of relayed WebSocket connections from the upgrade to both sockets closed, by outcome.",
        );
        describe_histogram(
            "wsgate_websocket_release_seconds",
            "Time from a connection's first end signal to both TCP sockets closed, by outcome.",
        );
        describe_counter(
            "wsgate_websocket_close_frames_total",
            None,
            "Close frames by sender (client, backend, wsgate) and code.",
        );
        describe_counter(
            "wsgate_websocket_frames_total",
            None,
            "WebSocket frames relayed, by direction.",
        );
        describe_counter(
            "wsgate_websocket_bytes_total",
            Some(Unit::Bytes),
            "WebSocket bytes relayed (frame headers included), by direction.",
        );
        describe_histogram(
            "wsgate_websocket_ping_rtt_seconds",
            "Round-trip time of wsgate's liveness pings, by the side pinged.",
        );
        describe_counter(
            "wsgate_http_requests_total",
            None,
            "Plain HTTP requests forwarded (or answered by wsgate), by status class and method.",
        );
        describe_histogram(
            "wsgate_http_request_duration_seconds",
            "Time from a plain HTTP request to its response head (time to head, not the stream's lifetime), by status class.",
        );
        describe_counter(
            "wsgate_http_exchanges_ended_total",
            None,
            "HTTP exchanges ended, by outcome: completed, or how the response was cut short.",
        );
        describe_gauge(
            "wsgate_http_streams_active",
            "HTTP streams open: event streams, and responses still open http.stream_after after their head.",
        );
        describe_histogram(
            "wsgate_http_stream_duration_seconds",
            "Lifetime of HTTP streams from the request to the response's end or abort, by outcome.",
        );
        describe_histogram(
            "wsgate_http_release_seconds",
            "Time from wsgate learning that an HTTP stream or cut-short exchange ended to the backend's connection released, by outcome.",
        );
        describe_counter(
            "wsgate_http_stream_bytes_total",
            Some(Unit::Bytes),
            "Body bytes of HTTP streams, by direction (open streams' bytes are added every second).",
        );
        describe_counter(
            "wsgate_http_sse_heartbeats_total",
            None,
            "SSE comment lines wsgate wrote into quiet event streams (http.sse_heartbeat).",
        );

        let outcome_label = |o: Outcome| vec![Label::new("outcome", o.as_str())];
        let direction = |from: Side| vec![Label::new("direction", from.direction_from())];
        Metrics {
            websockets_active: gauge("wsgate_websocket_connections_active"),
            http_streams_active: gauge("wsgate_http_streams_active"),
            connections_active: gauge("wsgate_connections_active"),
            connections_rejected: counter("wsgate_connections_rejected_total", vec![]),
            connections_max,
            draining: gauge("wsgate_draining"),
            reloads: ["ok", "error"].map(|result| {
                counter(
                    "wsgate_config_reloads_total",
                    vec![Label::new("result", result)],
                )
            }),
            reload_success_time,
            upgrades: UPGRADE_RESULTS
                .iter()
                .map(|result| {
                    counter(
                        "wsgate_websocket_upgrades_total",
                        vec![Label::new("result", *result)],
                    )
                })
                .collect(),
            ended: ByOutcome::new(Kind::WebSocket, |o| {
                counter("wsgate_websocket_connections_ended_total", outcome_label(o))
            }),
            duration: ByOutcome::new(Kind::WebSocket, |o| {
                histogram(
                    "wsgate_websocket_connection_duration_seconds",
                    outcome_label(o),
                )
            }),
            release: ByOutcome::new(Kind::WebSocket, |o| {
                histogram("wsgate_websocket_release_seconds", outcome_label(o))
            }),
            http_ended: ByOutcome::new(Kind::Http, |o| {
                counter("wsgate_http_exchanges_ended_total", outcome_label(o))
            }),
            http_stream_duration: ByOutcome::new(Kind::Http, |o| {
                histogram("wsgate_http_stream_duration_seconds", outcome_label(o))
            }),
            http_release: ByOutcome::new(Kind::Http, |o| {
                histogram("wsgate_http_release_seconds", outcome_label(o))
            }),
            http_stream_bytes: Side::BOTH
                .map(|from| counter("wsgate_http_stream_bytes_total", direction(from))),
            sse_heartbeats: counter("wsgate_http_sse_heartbeats_total", vec![]),
            close_frames: CloseSender::ALL
                .iter()
                .map(|s| {
                    CODE_LABELS
                        .iter()
                        .map(|code| {
                            counter(
                                "wsgate_websocket_close_frames_total",
                                vec![Label::new("sender", s.as_str()), Label::new("code", *code)],
                            )
                        })
                        .collect()
                })
                .collect(),
            frames: Side::BOTH
                .map(|from| counter("wsgate_websocket_frames_total", direction(from))),
            bytes: Side::BOTH.map(|from| counter("wsgate_websocket_bytes_total", direction(from))),
            ping_rtt: Side::BOTH.map(|pinged| {
                histogram(
                    "wsgate_websocket_ping_rtt_seconds",
                    vec![Label::new("side", pinged.as_str())],
                )
            }),
            http_requests: STATUS_CLASSES
                .iter()
                .map(|class| {
                    METHOD_GROUPS
                        .iter()
                        .map(|m| {
                            counter(
                                "wsgate_http_requests_total",
                                vec![Label::new("status_class", *class), Label::new("method", *m)],
                            )
                        })
                        .collect()
                })
                .collect(),
            http_duration: STATUS_CLASSES
                .iter()
                .map(|class| {
                    histogram(
                        "wsgate_http_request_duration_seconds",
                        vec![Label::new("status_class", *class)],
                    )
                })
                .collect(),
            recorder,
            handle,
        }
    }

    /// An upgrade was answered 101 and its WebSocket relayed.
    pub fn upgrade_relayed(&self) {
        self.upgrade("ok");
    }

    /// The backend refused an upgrade (401, 403, 404...): the client got its answer.
    pub fn upgrade_refused(&self) {
        self.upgrade("backend_refused");
    }

    /// The client left before the backend answered its upgrade.
    pub fn upgrade_client_gone(&self) {
        self.upgrade("client_gone");
    }

    /// wsgate answered an upgrade with `error`.
    pub fn upgrade_failed(&self, error: ProxyError) {
        self.upgrade(error.upgrade_label());
    }

    fn upgrade(&self, result: &str) {
        if let Some(i) = UPGRADE_RESULTS.iter().position(|r| *r == result) {
            self.upgrades[i].increment(1);
        }
    }

    /// Records an exchange's end. Called once per exchange, by [`crate::report`]:
    /// - a WebSocket: its outcome, duration, release time and the Close frames of both
    ///   handshakes;
    /// - an HTTP exchange: its outcome; its lifetime if it was a stream; its release
    ///   time if it was a stream or did not complete (`listed`: what the live table and
    ///   the history show). A short request that completed adds one counter.
    pub fn exchange_ended(&self, r: &Record, listed: bool) {
        let o = r.outcome;
        // The `_ended_total` counter last: a scrape that sees the ending counted sees
        // all of it.
        match &r.details {
            Details::WebSocket(w) => {
                if let Some(h) = self.duration.get(o) {
                    h.record(r.duration.as_secs_f64());
                }
                if let Some(h) = self.release.get(o) {
                    h.record(r.release.as_secs_f64());
                }
                let closes = [
                    (CloseSender::Client, w.client_close),
                    (CloseSender::Backend, w.backend_close),
                    (CloseSender::Wsgate, w.wsgate_to_client_close.map(Some)),
                    (CloseSender::Wsgate, w.wsgate_to_backend_close.map(Some)),
                ];
                for (sender, close) in closes {
                    if let Some(code) = close {
                        self.close_frames[sender as usize][code_label_index(code)].increment(1);
                    }
                }
                if let Some(c) = self.ended.get(o) {
                    c.increment(1);
                }
            }
            Details::Http(h) => {
                if h.stream
                    && let Some(hist) = self.http_stream_duration.get(o)
                {
                    hist.record(r.duration.as_secs_f64());
                }
                if listed && let Some(hist) = self.http_release.get(o) {
                    hist.record(r.release.as_secs_f64());
                }
                if let Some(c) = self.http_ended.get(o) {
                    c.increment(1);
                }
            }
        }
    }

    /// A configuration reload took effect.
    pub fn reload_succeeded(&self) {
        self.reloads[0].increment(1);
        self.reload_success_time.set(unix_now());
    }

    /// A configuration reload was refused: the running configuration stays.
    pub fn reload_failed(&self) {
        self.reloads[1].increment(1);
    }

    /// Adds traffic of an exchange of `kind` read from `from` to the process-wide
    /// counters: a WebSocket's bytes and frames, an HTTP stream's body bytes.
    pub fn add_traffic(&self, kind: Kind, from: Side, traffic: Counters) {
        let bytes = match kind {
            Kind::WebSocket => &self.bytes[from.idx()],
            Kind::Http => &self.http_stream_bytes[from.idx()],
        };
        if traffic.bytes > 0 {
            bytes.increment(traffic.bytes);
        }
        if traffic.frames > 0 {
            self.frames[from.idx()].increment(traffic.frames);
        }
    }

    /// Records a liveness round trip measured on `side`.
    pub fn ping_rtt(&self, side: Side, rtt: Duration) {
        self.ping_rtt[side.idx()].record(rtt.as_secs_f64());
    }

    /// A short HTTP exchange completed (the common case, with no record written).
    pub fn http_completed(&self) {
        if let Some(c) = self.http_ended.get(Outcome::Completed) {
            c.increment(1);
        }
    }

    /// A response head went to the client, `elapsed` after the request.
    pub fn http_request(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        let class = status_class(status);
        self.http_requests[class][method_group(method)].increment(1);
        self.http_duration[class].record(elapsed.as_secs_f64());
    }

    /// Folds queued histogram samples into their buckets. Samples wait in a queue until
    /// this (or a scrape) drains it, so the server calls it every second: with nothing
    /// scraping (the admin listener off) memory would otherwise grow with every
    /// connection.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition of every metric, process metrics included.
    pub fn render(&self) -> String {
        let _ = &self.recorder;
        let mut out = self.handle.render();
        let _ = writeln!(
            out,
            "# HELP wsgate_log_lines_dropped_total Log lines dropped because the log output could not keep up.\n\
             # TYPE wsgate_log_lines_dropped_total counter\n\
             wsgate_log_lines_dropped_total {}",
            crate::logging::dropped()
        );
        render_process_metrics(&mut out);
        out
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends `process_*` metrics read from /proc (Linux only; elsewhere nothing).
fn render_process_metrics(out: &mut String) {
    let Some(p) = ProcessStats::read() else {
        return;
    };
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.rss_bytes,
    );
    metric(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.vsize_bytes,
    );
    metric(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds,
    );
    metric(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        p.max_fds,
    );
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
}

/// Process statistics from /proc/self.
#[derive(Debug)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    pub vsize_bytes: f64,
    pub open_fds: f64,
    pub max_fds: f64,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Clock ticks per second and page size: the Linux values on every platform
    /// wsgate targets (reading them needs libc calls, which this crate avoids).
    const TICKS: f64 = 100.0;
    const PAGE: f64 = 4096.0;

    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which may contain spaces, in parentheses.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        // Field numbers of proc(5) minus 3 (pid and comm are gone, 1-based).
        let cpu_seconds = (num(11)? + num(12)?) / Self::TICKS;
        let start_ticks = num(19)?;
        let vsize_bytes = num(20)?;
        let rss_bytes = num(21)? * Self::PAGE;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()?
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
            .unwrap_or(0.0);
        Some(ProcessStats {
            cpu_seconds,
            rss_bytes,
            vsize_bytes,
            open_fds,
            max_fds,
            start_time_seconds: boot + start_ticks / Self::TICKS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_map_to_closed_labels() {
        assert_eq!(CODE_LABELS[code_label_index(Some(1000))], "1000");
        assert_eq!(CODE_LABELS[code_label_index(Some(1015))], "1015");
        assert_eq!(CODE_LABELS[code_label_index(Some(4001))], "other_valid");
        assert_eq!(CODE_LABELS[code_label_index(Some(2000))], "invalid");
        assert_eq!(CODE_LABELS[code_label_index(Some(999))], "invalid");
        assert_eq!(CODE_LABELS[code_label_index(None)], "none");
    }

    #[test]
    fn every_series_is_present_before_any_traffic() {
        let m = Metrics::new(10);
        m.http_request(
            &Method::from_bytes(b"PROPFIND").unwrap(),
            StatusCode::BAD_GATEWAY,
            Duration::from_millis(3),
        );
        let text = m.render();
        for needle in [
            "# HELP wsgate_websocket_connections_ended_total",
            "wsgate_websocket_connections_ended_total{outcome=\"client_gone\"} 0",
            "wsgate_websocket_close_frames_total{sender=\"wsgate\",code=\"1014\"} 0",
            "wsgate_websocket_upgrades_total{result=\"limit_reached\"} 0",
            "wsgate_http_requests_total{status_class=\"5xx\",method=\"other\"} 1",
            "wsgate_websocket_release_seconds_bucket{outcome=\"shutdown\",le=\"0.0001\"} 0",
            "wsgate_connections_max 10",
            "wsgate_build_info{version=",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        if cfg!(target_os = "linux") {
            assert!(text.contains("process_open_fds "), "{text}");
        }
    }

    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!("../README.md");
        let text = Metrics::new(10).render();
        let names: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(names.len() > 10, "{names:?}");
        for name in names {
            assert!(
                readme.contains(&format!("`{name}`")),
                "README.md's metrics table does not list {name}"
            );
        }
    }
}
