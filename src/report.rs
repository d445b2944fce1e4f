//! The one writer of what wsgate records about exchanges: when a WebSocket or an HTTP
//! exchange ends, its [`Record`] becomes one structured log line, every per-exchange
//! metric and an entry of the history; while exchanges are open, a sweep every second
//! adds their traffic and ping round trips to the process-wide metrics; and a scrape
//! reads the number open from the live table.
//!
//! Exchanges only write their own atomics in [`crate::live`], never the shared metrics,
//! so nothing process-wide is contended per message.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::config::LogFormat;
use crate::live::{LiveExchange, LiveTable, Registration};
use crate::logging;
use crate::metrics::Metrics;
use crate::record::{Details, HttpDetails, Kind, Record, WebSocketDetails};
use crate::side::Side;

/// How often open exchanges' traffic reaches the process-wide counters.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// What is written of an ended exchange besides its metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// It goes into the history (`/connections/recent`) and its release time into the
    /// release histogram: a WebSocket, an HTTP stream, an HTTP exchange that did not
    /// complete.
    pub listed: bool,
    /// It gets a log line (`log.http` decides for HTTP; a WebSocket always does).
    pub logged: bool,
}

/// Records an exchange's end. Called exactly once per recorded exchange, after it
/// published its last counters to its live entry (if it had one), which it then leaves.
pub fn exchange_ended(
    metrics: &Metrics,
    live: &LiveTable,
    registration: Option<Registration>,
    r: &Record,
    written: Written,
) {
    match registration {
        Some(registration) => {
            add_live_counters(metrics, &registration.entry);
            registration.ended(r);
        }
        None if written.listed => live.ended_unlisted(r),
        None => {}
    }
    metrics.exchange_ended(r, written.listed);
    if written.logged {
        log_ended(r);
    }
}

/// The log line of an ended exchange (target `wsgate::connection`, INFO). Where wsgate
/// installed its logger the line is formatted here, directly into bytes in the logger's
/// format; otherwise (in-process tests) it is an ordinary `tracing` event, which
/// [`event`] writes and the tests below hold the direct format to.
fn log_ended(r: &Record) {
    if !tracing::enabled!(target: "wsgate::connection", tracing::Level::INFO) {
        return;
    }
    match logging::format() {
        Some(format) => {
            logging::write_line(&line(r, format, SystemTime::now()));
        }
        None => event(r),
    }
}

/// The exchange's line as a `tracing` event.
fn event(r: &Record) {
    match &r.details {
        Details::WebSocket(w) => websocket_event(r, w),
        Details::Http(h) => http_event(r, h),
    }
}

fn websocket_event(r: &Record, w: &WebSocketDetails) {
    tracing::info!(
        target: "wsgate::connection",
        id = r.info.id,
        kind = "websocket",
        connection = r.info.connection,
        client = %r.info.client,
        worker = r.info.worker,
        path = %r.info.path,
        outcome = r.outcome.as_str(),
        duration_ms = ms(r.duration),
        release_ms = ms(r.release),
        client_to_backend_bytes = r.client_to_backend.bytes,
        client_to_backend_frames = r.client_to_backend.frames,
        backend_to_client_bytes = r.backend_to_client.bytes,
        backend_to_client_frames = r.backend_to_client.frames,
        client_close_code = w.client_close.flatten(),
        backend_close_code = w.backend_close.flatten(),
        client_received_code = w.client_received_close.flatten(),
        backend_received_code = w.backend_received_close.flatten(),
        wsgate_to_client_code = w.wsgate_to_client_close,
        wsgate_to_backend_code = w.wsgate_to_backend_close,
        client_rtt_ms = w.client_rtt.map(ms),
        backend_rtt_ms = w.backend_rtt.map(ms),
        "websocket connection ended"
    );
}

fn http_event(r: &Record, h: &HttpDetails) {
    tracing::info!(
        target: "wsgate::connection",
        id = r.info.id,
        kind = "http",
        connection = r.info.connection,
        client = %r.info.client,
        worker = r.info.worker,
        method = %h.method,
        path = %r.info.path,
        status = h.status,
        framing = h.framing.as_str(),
        event_stream = h.event_stream,
        stream = h.stream,
        outcome = r.outcome.as_str(),
        duration_ms = ms(r.duration),
        time_to_head_ms = h.time_to_head.map(ms),
        release_ms = ms(r.release),
        client_to_backend_bytes = r.client_to_backend.bytes,
        backend_to_client_bytes = r.backend_to_client.bytes,
        heartbeats = h.heartbeats,
        "http exchange ended"
    );
}

/// A duration in milliseconds to the microsecond, as the line shows it: `0.151`, not
/// the `0.15119100000000002` that nanoseconds in binary floating point would print.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// The exchange's line in `format`, logged at `at`, exactly as `tracing`'s text or
/// flattened JSON formatter would write [`event`] (same fields, order and number
/// formatting), ending in a newline.
fn line(r: &Record, format: LogFormat, at: SystemTime) -> Vec<u8> {
    let kind = r.kind();
    let message = match kind {
        Kind::WebSocket => "websocket connection ended",
        Kind::Http => "http exchange ended",
    };
    let mut l = Line::new(format, at, message);
    l.uint("id", r.info.id);
    l.str("kind", kind.as_str());
    l.uint("connection", r.info.connection);
    l.addr("client", r.info.client);
    l.uint("worker", r.info.worker as u64);
    match &r.details {
        Details::WebSocket(w) => {
            l.display_str("path", &r.info.path);
            l.str("outcome", r.outcome.as_str());
            l.millis("duration_ms", r.duration);
            l.millis("release_ms", r.release);
            l.uint("client_to_backend_bytes", r.client_to_backend.bytes);
            l.uint("client_to_backend_frames", r.client_to_backend.frames);
            l.uint("backend_to_client_bytes", r.backend_to_client.bytes);
            l.uint("backend_to_client_frames", r.backend_to_client.frames);
            let codes = [
                ("client_close_code", w.client_close.flatten()),
                ("backend_close_code", w.backend_close.flatten()),
                ("client_received_code", w.client_received_close.flatten()),
                ("backend_received_code", w.backend_received_close.flatten()),
                ("wsgate_to_client_code", w.wsgate_to_client_close),
                ("wsgate_to_backend_code", w.wsgate_to_backend_close),
            ];
            for (name, code) in codes {
                if let Some(code) = code {
                    l.uint(name, code.into());
                }
            }
            for (name, rtt) in [
                ("client_rtt_ms", w.client_rtt),
                ("backend_rtt_ms", w.backend_rtt),
            ] {
                if let Some(rtt) = rtt {
                    l.millis(name, rtt);
                }
            }
        }
        Details::Http(h) => {
            l.display_str("method", h.method.as_str());
            l.display_str("path", &r.info.path);
            if let Some(status) = h.status {
                l.uint("status", status.into());
            }
            l.str("framing", h.framing.as_str());
            l.bool("event_stream", h.event_stream);
            l.bool("stream", h.stream);
            l.str("outcome", r.outcome.as_str());
            l.millis("duration_ms", r.duration);
            if let Some(t) = h.time_to_head {
                l.millis("time_to_head_ms", t);
            }
            l.millis("release_ms", r.release);
            l.uint("client_to_backend_bytes", r.client_to_backend.bytes);
            l.uint("backend_to_client_bytes", r.backend_to_client.bytes);
            l.uint("heartbeats", h.heartbeats);
        }
    }
    l.finish()
}

/// Writes `d` as [`ms`]'s value prints: `Debug` of the `f64` in the text format,
/// serde_json's number in JSON. Below 10^15 µs (31 years) both print the shortest
/// decimal that reads back as that `f64`, which is the exact one: whole milliseconds, a
/// point, the microseconds without trailing zeros, at least one digit (`4712.345`,
/// `0.45`, `3.0`). Beyond, the float is formatted.
fn write_millis(out: &mut Vec<u8>, d: Duration, json: bool) {
    const LIMIT: u128 = 1_000_000_000_000_000;
    let micros = d.as_micros();
    if micros >= LIMIT {
        let value = ms(d);
        if json {
            let _ = serde_json::to_writer(&mut *out, &value);
        } else {
            let _ = write!(out, "{value:?}");
        }
        return;
    }
    let micros = micros as u64;
    out.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    out.push(b'.');
    let frac = micros % 1000;
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    // Trailing zeros dropped, one digit kept.
    let keep = if frac.is_multiple_of(100) {
        1
    } else if frac.is_multiple_of(10) {
        2
    } else {
        3
    };
    out.extend_from_slice(&digits[..keep]);
}

/// True when `Debug` writes `s` as it is between quotes: printable ASCII without a
/// quote or a backslash.
fn is_plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// A log line being written field by field.
struct Line {
    out: Vec<u8>,
    json: bool,
}

impl Line {
    const TARGET: &str = "wsgate::connection";

    fn new(format: LogFormat, at: SystemTime, message: &str) -> Line {
        let mut out = Vec::with_capacity(512);
        let at = humantime::format_rfc3339_micros(at);
        let json = format == LogFormat::Json;
        if json {
            let _ = write!(
                out,
                "{{\"timestamp\":\"{at}\",\"level\":\"INFO\",\"message\":\"{message}\""
            );
        } else {
            let _ = write!(out, "{at}  INFO {}: {message}", Self::TARGET);
        }
        Line { out, json }
    }

    fn bool(&mut self, name: &str, value: bool) {
        self.name(name);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn name(&mut self, name: &str) {
        if self.json {
            self.out.extend_from_slice(b",\"");
            self.out.extend_from_slice(name.as_bytes());
            self.out.extend_from_slice(b"\":");
        } else {
            self.out.push(b' ');
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b'=');
        }
    }

    fn uint(&mut self, name: &str, value: u64) {
        self.name(name);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// A duration as [`ms`] gives it, written as both formatters write that `f64`
    /// (`Debug`, serde_json's): the same digits, found from the integer microseconds.
    /// Formatting the float was a third of the line's cost.
    fn millis(&mut self, name: &str, d: Duration) {
        self.name(name);
        write_millis(&mut self.out, d, self.json);
    }

    /// A string field: quoted in both formats (`tracing` writes `&str` with `Debug`).
    fn str(&mut self, name: &str, value: &str) {
        self.name(name);
        if self.json {
            let _ = serde_json::to_writer(&mut self.out, value);
        } else if is_plain(value) {
            // What `Debug` writes for it, without escaping char by char.
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }

    /// A string field written as `display` would write it.
    fn display_str(&mut self, name: &str, value: &str) {
        self.name(name);
        if self.json {
            let _ = serde_json::to_writer(&mut self.out, value);
        } else {
            self.out.extend_from_slice(value.as_bytes());
        }
    }

    /// The client's address, as `display` would write it. An IPv4 address is written
    /// octet by octet: `Display` of an address was a tenth of the whole line's cost.
    fn addr(&mut self, name: &str, addr: SocketAddr) {
        let SocketAddr::V4(v4) = addr else {
            return self.display(name, &addr);
        };
        self.name(name);
        if self.json {
            self.out.push(b'"');
        }
        let mut digits = itoa::Buffer::new();
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.out.push(b'.');
            }
            self.out.extend_from_slice(digits.format(octet).as_bytes());
        }
        self.out.push(b':');
        self.out
            .extend_from_slice(digits.format(v4.port()).as_bytes());
        if self.json {
            self.out.push(b'"');
        }
    }

    /// A `%value` field: unquoted in text, a string in JSON.
    fn display(&mut self, name: &str, value: &dyn std::fmt::Display) {
        self.name(name);
        if self.json {
            let _ = serde_json::to_writer(&mut self.out, &value.to_string());
        } else {
            let _ = write!(self.out, "{value}");
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.json {
            let _ = write!(self.out, ",\"target\":\"{}\"}}", Self::TARGET);
        }
        self.out.push(b'\n');
        self.out
    }
}

/// Adds the traffic and ping round trips of every open exchange since the last sweep
/// to the process-wide metrics, and folds histogram samples into their buckets.
pub fn sweep(live: &LiveTable, metrics: &Metrics) {
    for entry in live.entries() {
        add_live_counters(metrics, &entry);
    }
    metrics.run_upkeep();
}

/// The Prometheus exposition, with the number of open WebSockets and HTTP streams read
/// from the table at this moment.
pub fn render(live: &LiveTable, metrics: &Metrics) -> String {
    metrics
        .websockets_active
        .set(live.count(Kind::WebSocket) as f64);
    metrics
        .http_streams_active
        .set(live.count(Kind::Http) as f64);
    metrics.render()
}

fn add_live_counters(metrics: &Metrics, entry: &LiveExchange) {
    let kind = entry.kind();
    for side in Side::BOTH {
        metrics.add_traffic(kind, side, entry.take_uncounted(side));
        if let Some(rtt) = entry.take_unrecorded_rtt(side) {
            metrics.ping_rtt(side, rtt);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::record::{Counters, ExchangeInfo, Framing, Outcome};

    /// Collects what a test subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn record(rtt: bool) -> Record {
        Record {
            info: ExchangeInfo {
                id: 42,
                connection: 41,
                client: "[2001:db8::1]:4000".parse().unwrap(),
                worker: 1,
                path: "/live query".into(),
            },
            outcome: Outcome::ClientGone,
            duration: Duration::from_micros(4_712_345),
            release: Duration::from_nanos(450_123),
            client_to_backend: Counters {
                frames: 5,
                bytes: 184,
            },
            backend_to_client: Counters {
                frames: 7,
                bytes: 1_000_000_000_000,
            },
            details: Details::WebSocket(WebSocketDetails {
                client_close: None,
                backend_close: Some(Some(1001)),
                client_received_close: None,
                backend_received_close: Some(Some(1001)),
                wsgate_to_client_close: None,
                wsgate_to_backend_close: Some(1001),
                client_rtt: rtt.then(|| Duration::from_micros(250)),
                backend_rtt: rtt.then(|| Duration::from_nanos(33_333)),
            }),
        }
    }

    /// An HTTP exchange's record: a stream cut by its client, or (`head` false) a
    /// request the client left before its head.
    fn http_record(head: bool) -> Record {
        let mut r = record(false);
        r.outcome = Outcome::ClientAborted;
        r.client_to_backend.frames = 0;
        r.backend_to_client.frames = 0;
        r.details = Details::Http(HttpDetails {
            method: hyper::Method::from_bytes(b"PROPFIND").unwrap(),
            status: head.then_some(200),
            framing: if head {
                Framing::Chunked
            } else {
                Framing::None
            },
            event_stream: head,
            stream: head,
            time_to_head: head.then(|| Duration::from_micros(2_500)),
            heartbeats: 3,
        });
        r
    }

    /// Every shape of line: WebSockets with and without round trips, HTTP exchanges
    /// with and without a head.
    fn records() -> [Record; 4] {
        [
            record(false),
            record(true),
            http_record(true),
            http_record(false),
        ]
    }

    /// With and without round trips; IPv4 addresses (written by hand) and IPv6 ones.
    const CASES: [(bool, &str); 4] = [
        (false, "[2001:db8::1]:4000"),
        (true, "192.0.2.255:65535"),
        (false, "10.0.0.1:0"),
        (true, "[fe80::1%2]:80"),
    ];

    /// What `tracing`'s own formatter writes for [`event`], without the timestamp.
    fn through_tracing(r: &Record, format: LogFormat) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone());
        let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
            LogFormat::Text => Box::new(tracing_subscriber::registry().with(layer)),
            LogFormat::Json => {
                Box::new(tracing_subscriber::registry().with(layer.json().flatten_event(true)))
            }
        };
        tracing::subscriber::with_default(subscriber, || event(r));
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    use tracing_subscriber::layer::SubscriberExt;

    /// The digits written from the microseconds are the ones both formatters write for
    /// [`ms`]'s `f64`: at the edges of each digit count and over a spread of
    /// magnitudes up to and beyond the limit where the float is formatted instead.
    #[test]
    fn milliseconds_are_written_as_the_float_would_be() {
        let mut micros: Vec<u64> = vec![0, 1, 9, 10, 11, 99, 100, 101, 450, 999, 1000, 1001];
        for exp in 3..=17 {
            let p = 10u64.pow(exp);
            micros.extend([p - 1, p, p + 1, p + 10, p + 100, p + 450, 3 * p + 7]);
        }
        // A simple generator: the same values every run, every magnitude.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            micros.push(x >> (x % 60));
        }
        for m in micros {
            let d = Duration::from_micros(m);
            for json in [false, true] {
                let mut ours = Vec::new();
                write_millis(&mut ours, d, json);
                let theirs = if json {
                    serde_json::to_string(&ms(d)).unwrap()
                } else {
                    format!("{:?}", ms(d))
                };
                assert_eq!(
                    String::from_utf8(ours).unwrap(),
                    theirs,
                    "{m} µs, json {json}"
                );
            }
        }
    }

    #[test]
    fn plain_strings_are_quoted_as_debug_quotes_them() {
        for s in [
            "",
            "completed",
            "/a b?c=1&d=%20",
            "say \"hi\"",
            "back\\slash",
            "tab\t",
            "é",
            "\u{7f}",
        ] {
            let mut l = Line {
                out: Vec::new(),
                json: false,
            };
            l.str("s", s);
            assert_eq!(
                String::from_utf8(l.out).unwrap(),
                format!(" s={s:?}"),
                "{s:?}"
            );
        }
    }

    #[test]
    fn the_direct_text_line_is_tracings_line() {
        for ((rtt, client), mut r) in CASES.into_iter().zip(records()) {
            r.info.client = client.parse().unwrap();
            let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_930_000_123_456);
            let direct = String::from_utf8(line(&r, LogFormat::Text, at)).unwrap();
            let stamp = "2025-12-05T10:20:00.123456Z ";
            assert!(direct.starts_with(stamp), "{direct}");
            // `without_time` leaves the level's padding where the timestamp was.
            assert_eq!(&direct[stamp.len()..], through_tracing(&r, LogFormat::Text));
            // Milliseconds to the microsecond, without binary floating-point tails.
            assert!(direct.contains(" duration_ms=4712.345 "), "{direct}");
            assert!(direct.contains(" release_ms=0.45 "), "{direct}");
            if rtt && r.kind() == Kind::WebSocket {
                assert!(
                    direct.ends_with(" client_rtt_ms=0.25 backend_rtt_ms=0.033\n"),
                    "{direct}"
                );
            }
        }
    }

    #[test]
    fn the_direct_json_line_is_tracings_line() {
        for ((_, client), mut r) in CASES.into_iter().zip(records()) {
            r.info.client = client.parse().unwrap();
            let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_930_000_123_456);
            let direct = String::from_utf8(line(&r, LogFormat::Json, at)).unwrap();
            let mut direct: serde_json::Value = serde_json::from_str(&direct).unwrap();
            assert_eq!(direct["timestamp"], "2025-12-05T10:20:00.123456Z");
            direct.as_object_mut().unwrap().remove("timestamp");
            let traced: serde_json::Value =
                serde_json::from_str(&through_tracing(&r, LogFormat::Json)).unwrap();
            assert_eq!(direct, traced);
        }
    }
}
