//! The one writer of what wsgate records about WebSockets: when a connection ends, its
//! [`Record`] becomes one structured log line and every per-connection metric; while
//! connections are open, a sweep every second adds their traffic and ping round trips
//! to the process-wide metrics; and a scrape reads the number open from the live table.
//!
//! Relays only write their own connection's atomics in [`crate::live`], never the shared
//! metrics, so nothing process-wide is contended per message.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::config::LogFormat;
use crate::live::{LiveConn, LiveTable, Registration};
use crate::logging;
use crate::metrics::Metrics;
use crate::record::Record;
use crate::side::Side;

/// How often open WebSockets' traffic reaches the process-wide counters.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Records a connection's end. Called exactly once per relayed connection, after its
/// relay published its last counters to its live entry, which it then leaves.
pub fn connection_ended(metrics: &Metrics, registration: Registration, r: &Record) {
    add_live_counters(metrics, &registration.conn);
    registration.ended(r);
    metrics.connection_ended(r);
    log_ended(r);
}

/// The log line of an ended connection (target `wsgate::connection`, INFO). Where
/// wsgate installed its logger the line is formatted here, directly into bytes in the
/// logger's format; otherwise (in-process tests) it is an ordinary `tracing` event,
/// which [`event`] writes and the tests below hold the direct format to.
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

/// The connection's line as a `tracing` event.
fn event(r: &Record) {
    tracing::info!(
        target: "wsgate::connection",
        id = r.info.id,
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
        client_close_code = r.client_close.flatten(),
        backend_close_code = r.backend_close.flatten(),
        client_received_code = r.client_received_close.flatten(),
        backend_received_code = r.backend_received_close.flatten(),
        wsgate_to_client_code = r.wsgate_to_client_close,
        wsgate_to_backend_code = r.wsgate_to_backend_close,
        client_rtt_ms = r.client_rtt.map(ms),
        backend_rtt_ms = r.backend_rtt.map(ms),
        "websocket connection ended"
    );
}

/// A duration in milliseconds to the microsecond, as the line shows it: `0.151`, not
/// the `0.15119100000000002` that nanoseconds in binary floating point would print.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// The connection's line in `format`, logged at `at`, exactly as `tracing`'s text or
/// flattened JSON formatter would write [`event`] (same fields, order and number
/// formatting), ending in a newline.
fn line(r: &Record, format: LogFormat, at: SystemTime) -> Vec<u8> {
    let mut l = Line::new(format, at);
    l.uint("id", r.info.id);
    l.addr("client", r.info.client);
    l.uint("worker", r.info.worker as u64);
    l.display("path", &r.info.path);
    l.str("outcome", r.outcome.as_str());
    l.float("duration_ms", ms(r.duration));
    l.float("release_ms", ms(r.release));
    l.uint("client_to_backend_bytes", r.client_to_backend.bytes);
    l.uint("client_to_backend_frames", r.client_to_backend.frames);
    l.uint("backend_to_client_bytes", r.backend_to_client.bytes);
    l.uint("backend_to_client_frames", r.backend_to_client.frames);
    let codes = [
        ("client_close_code", r.client_close.flatten()),
        ("backend_close_code", r.backend_close.flatten()),
        ("client_received_code", r.client_received_close.flatten()),
        ("backend_received_code", r.backend_received_close.flatten()),
        ("wsgate_to_client_code", r.wsgate_to_client_close),
        ("wsgate_to_backend_code", r.wsgate_to_backend_close),
    ];
    for (name, code) in codes {
        if let Some(code) = code {
            l.uint(name, code.into());
        }
    }
    for (name, rtt) in [
        ("client_rtt_ms", r.client_rtt),
        ("backend_rtt_ms", r.backend_rtt),
    ] {
        if let Some(rtt) = rtt {
            l.float(name, ms(rtt));
        }
    }
    l.finish()
}

/// A log line being written field by field.
struct Line {
    out: Vec<u8>,
    json: bool,
}

impl Line {
    const MESSAGE: &str = "websocket connection ended";
    const TARGET: &str = "wsgate::connection";

    fn new(format: LogFormat, at: SystemTime) -> Line {
        let mut out = Vec::with_capacity(512);
        let at = humantime::format_rfc3339_micros(at);
        let json = format == LogFormat::Json;
        if json {
            let _ = write!(
                out,
                "{{\"timestamp\":\"{at}\",\"level\":\"INFO\",\"message\":\"{}\"",
                Self::MESSAGE
            );
        } else {
            let _ = write!(out, "{at}  INFO {}: {}", Self::TARGET, Self::MESSAGE);
        }
        Line { out, json }
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

    fn float(&mut self, name: &str, value: f64) {
        self.name(name);
        if self.json {
            // serde_json writes numbers as the JSON formatter does.
            let _ = serde_json::to_writer(&mut self.out, &value);
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }

    /// A string field: quoted in both formats (`tracing` writes `&str` with `Debug`).
    fn str(&mut self, name: &str, value: &str) {
        self.name(name);
        if self.json {
            let _ = serde_json::to_writer(&mut self.out, value);
        } else {
            let _ = write!(self.out, "{value:?}");
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

/// Adds the traffic and ping round trips of every open connection since the last sweep
/// to the process-wide metrics, and folds histogram samples into their buckets.
pub fn sweep(live: &LiveTable, metrics: &Metrics) {
    for conn in live.conns() {
        add_live_counters(metrics, &conn);
    }
    metrics.run_upkeep();
}

/// The Prometheus exposition, with the number of open WebSockets read from the table
/// at this moment.
pub fn render(live: &LiveTable, metrics: &Metrics) -> String {
    metrics.websockets_active.set(live.len() as f64);
    metrics.render()
}

fn add_live_counters(metrics: &Metrics, conn: &LiveConn) {
    for side in Side::BOTH {
        metrics.add_traffic(side, conn.take_uncounted(side));
        if let Some(rtt) = conn.take_unrecorded_rtt(side) {
            metrics.ping_rtt(side, rtt);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::record::{ConnectionInfo, Counters, Outcome};

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
            info: ConnectionInfo {
                id: 42,
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
            client_close: None,
            backend_close: Some(Some(1001)),
            client_received_close: None,
            backend_received_close: Some(Some(1001)),
            wsgate_to_client_close: None,
            wsgate_to_backend_close: Some(1001),
            client_rtt: rtt.then(|| Duration::from_micros(250)),
            backend_rtt: rtt.then(|| Duration::from_nanos(33_333)),
        }
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

    #[test]
    fn the_direct_text_line_is_tracings_line() {
        for (rtt, client) in CASES {
            let mut r = record(rtt);
            r.info.client = client.parse().unwrap();
            let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_930_000_123_456);
            let direct = String::from_utf8(line(&r, LogFormat::Text, at)).unwrap();
            let stamp = "2025-12-05T10:20:00.123456Z ";
            assert!(direct.starts_with(stamp), "{direct}");
            // `without_time` leaves the level's padding where the timestamp was.
            assert_eq!(&direct[stamp.len()..], through_tracing(&r, LogFormat::Text));
            // Milliseconds to the microsecond, without binary floating-point tails.
            assert!(
                direct.contains(" duration_ms=4712.345 release_ms=0.45 "),
                "{direct}"
            );
            if rtt {
                assert!(
                    direct.ends_with(" client_rtt_ms=0.25 backend_rtt_ms=0.033\n"),
                    "{direct}"
                );
            }
        }
    }

    #[test]
    fn the_direct_json_line_is_tracings_line() {
        for (rtt, client) in CASES {
            let mut r = record(rtt);
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
