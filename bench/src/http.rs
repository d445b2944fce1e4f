//! The plain HTTP rows (the `http` measurement): the nginx origin the requests are
//! forwarded to, the self-signed certificate of the HTTP/2 row, and running wrk and
//! h2load and reading what they print.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::procfs::{self, CpuTicks};
use crate::targets::{self, TlsFiles};

const ORIGIN_TEMPLATE: &str = include_str!("../origin.conf");

/// The small response body (GET /small, and the answer to POST /post).
pub const SMALL_BODY: usize = 100;
/// The large response body (GET /large): eight pieces.
pub const LARGE_BODY: usize = 16 << 10;
const PIECE: usize = LARGE_BODY / 8;
/// The body of each POST.
pub const POST_BODY: usize = 4 << 10;

/// The rows of the `http` measurement, each a run of its own with a fresh proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Row {
    /// Keep-alive GET, 100-byte response (wrk).
    Small,
    /// Keep-alive GET, 16 KiB response (wrk).
    Large,
    /// Keep-alive POST of 4 KiB, 100-byte response (wrk with a Lua script).
    Post,
    /// GET of 100 bytes on a new connection each (`Connection: close`, wrk).
    Close,
    /// HTTP/2 over TLS, GET of 100 bytes (h2load).
    H2,
}

impl Row {
    pub const ALL: [Row; 5] = [Row::Small, Row::Large, Row::Post, Row::Close, Row::H2];

    /// The part of the table's keys: `http.small.rate`.
    pub fn key(self) -> &'static str {
        match self {
            Row::Small => "small",
            Row::Large => "large",
            Row::Post => "post",
            Row::Close => "close",
            Row::H2 => "h2",
        }
    }

    /// The origin's path.
    pub fn path(self) -> &'static str {
        match self {
            Row::Small | Row::Close | Row::H2 => "/small",
            Row::Large => "/large",
            Row::Post => "/post",
        }
    }

    /// Measured with wrk (HTTP/1.1); otherwise with h2load.
    pub fn uses_wrk(self) -> bool {
        self != Row::H2
    }
}

/// `len` bytes of lowercase letters: nothing nginx's configuration would read as an
/// escape, a quote or a variable.
pub fn body_text(len: usize) -> String {
    (0..len)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect()
}

/// The wrk script of the POST row: 4 KiB bodies (wrk adds the Content-Length).
pub fn post_script() -> String {
    format!(
        "-- The POST row of wsgate-bench's http measurement.\n\
         wrk.method = \"POST\"\n\
         wrk.body = string.rep(\"x\", {POST_BODY})\n\
         wrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n"
    )
}

/// The origin's configuration, listening on `listen`, its files under `dir`.
fn origin_config(listen: SocketAddr, dir: &Path) -> String {
    targets::fill(
        ORIGIN_TEMPLATE,
        &[
            ("LISTEN", listen.to_string()),
            ("DIR", dir.display().to_string()),
            ("SMALL", body_text(SMALL_BODY)),
            ("PIECE", body_text(PIECE)),
        ],
    )
}

/// The HTTP origin, an nginx of its own for the whole run. Stopped on drop.
pub struct Origin {
    pub addr: SocketAddr,
    child: Child,
}

impl Origin {
    pub fn start(nginx: &Path, dir: &Path) -> Result<Origin, String> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let addr = targets::free_port();
        let config = dir.join("origin.conf");
        fs::write(&config, origin_config(addr, dir))
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log = dir.join("origin.log");
        let out =
            fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot reopen {}: {e}", log.display()))?;
        let mut child = Command::new(nginx)
            .arg("-e")
            .arg(dir.join("origin-error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start the HTTP origin (nginx): {e}"))?;
        targets::wait_ready(addr, &mut child, "the HTTP origin (nginx)", &log)?;
        Ok(Origin { addr, child })
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        targets::signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes a self-signed certificate for 127.0.0.1 and localhost with `openssl` (ECDSA
/// P-256, `CA:FALSE`: rustls refuses a CA certificate as a server's own).
pub fn make_certificate(openssl: &Path, dir: &Path) -> Result<TlsFiles, String> {
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("cert-and-key.pem"),
    };
    let out = Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
        ])
        .arg(&files.key)
        .arg("-out")
        .arg(&files.cert)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl req failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let read = |p: &Path| fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let mut combined = read(&files.cert)?;
    combined.extend_from_slice(&read(&files.key)?);
    fs::write(&files.combined, combined)
        .map_err(|e| format!("cannot write {}: {e}", files.combined.display()))?;
    Ok(files)
}

/// wrk's arguments for `row`: one thread, `connections` connections, `seconds`.
pub fn wrk_args(
    row: Row,
    url: &str,
    connections: usize,
    seconds: u64,
    post_script: &Path,
) -> Vec<String> {
    let mut a = vec![
        "-t1".to_string(),
        format!("-c{connections}"),
        format!("-d{seconds}s"),
        "--latency".to_string(),
    ];
    match row {
        Row::Post => a.extend(["-s".to_string(), post_script.display().to_string()]),
        Row::Close => a.extend(["-H".to_string(), "Connection: close".to_string()]),
        _ => {}
    }
    a.push(url.to_string());
    a
}

/// h2load's arguments: one thread, `connections` × `streams` concurrent streams,
/// `seconds` (timing-based, no warm-up of its own).
pub fn h2load_args(url: &str, connections: usize, streams: usize, seconds: u64) -> Vec<String> {
    vec![
        "-t1".to_string(),
        format!("-c{connections}"),
        format!("-m{streams}"),
        format!("-D{seconds}"),
        url.to_string(),
    ]
}

/// A duration as wrk and h2load print it (`367.00us`, `1.20ms`, `3.00s`, `1.50m`), in
/// microseconds.
pub fn parse_time_us(s: &str) -> Option<f64> {
    let s = s.trim().trim_end_matches(',');
    let (number, scale) = [
        ("us", 1.0),
        ("ms", 1e3),
        ("s", 1e6),
        ("m", 60e6),
        ("h", 3600e6),
    ]
    .iter()
    .find_map(|(unit, scale)| s.strip_suffix(unit).map(|n| (n, *scale)))?;
    let v: f64 = number.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v * scale)
}

/// What a wrk run printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkReport {
    /// Responses completed.
    pub requests: u64,
    /// The run's duration as wrk measured it.
    pub seconds: f64,
    /// `Requests/sec`.
    pub rate: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// The `Socket errors` line, if any (connect, read, write, timeout).
    pub socket_errors: Option<String>,
    pub socket_error_count: u64,
    /// `Non-2xx or 3xx responses`.
    pub non_2xx: u64,
}

/// Reads wrk 4's output (with `--latency`).
pub fn parse_wrk(text: &str) -> Result<WrkReport, String> {
    let mut r = WrkReport::default();
    let mut requests = None;
    let mut rate = None;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rate = v.trim().parse::<f64>().ok();
        } else if words.len() >= 4 && words[1] == "requests" && words[2] == "in" {
            requests = words[0].parse::<u64>().ok();
            r.seconds = parse_time_us(words[3]).map_or(0.0, |us| us / 1e6);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            r.socket_errors = Some(v.trim().to_string());
            r.socket_error_count = v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().unwrap_or(0);
        } else if words.len() == 2 && words[0] == "50%" {
            r.p50_us = parse_time_us(words[1]);
        } else if words.len() == 2 && words[0] == "99%" {
            r.p99_us = parse_time_us(words[1]);
        }
    }
    r.requests = requests.ok_or("no \"N requests in T\" line in wrk's output")?;
    r.rate = rate.ok_or("no Requests/sec line in wrk's output")?;
    Ok(r)
}

/// What an h2load run printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct H2loadReport {
    /// `finished in`: the measured duration.
    pub seconds: f64,
    pub succeeded: u64,
    /// Requests failed, errored or timed out.
    pub failed: u64,
    /// Responses with a status other than 2xx.
    pub non_2xx: u64,
    pub tls_protocol: Option<String>,
    pub cipher: Option<String>,
    /// The protocol negotiated by ALPN (`h2`).
    pub application_protocol: Option<String>,
}

impl H2loadReport {
    /// Successful requests per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.succeeded as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Reads h2load's output (nghttp2 1.52).
pub fn parse_h2load(text: &str) -> Result<H2loadReport, String> {
    let mut r = H2loadReport::default();
    let mut finished = false;
    let mut counted = false;
    // "N word" pairs of a comma-separated list.
    let counts = |list: &str| -> Vec<(String, u64)> {
        list.split(',')
            .filter_map(|part| {
                let mut w = part.split_whitespace();
                let n = w.next()?.parse().ok()?;
                Some((w.next()?.to_string(), n))
            })
            .collect()
    };
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("finished in ") {
            r.seconds = v
                .split(',')
                .next()
                .and_then(parse_time_us)
                .map_or(0.0, |us| us / 1e6);
            finished = true;
        } else if let Some(v) = line.strip_prefix("requests:") {
            for (word, n) in counts(v) {
                match word.as_str() {
                    "succeeded" => r.succeeded = n,
                    "failed" | "errored" | "timeout" => r.failed += n,
                    _ => {}
                }
            }
            counted = true;
        } else if let Some(v) = line.strip_prefix("status codes:") {
            r.non_2xx = counts(v)
                .iter()
                .filter(|(class, _)| class != "2xx")
                .map(|(_, n)| n)
                .sum();
        } else if let Some(v) = line.strip_prefix("TLS Protocol:") {
            r.tls_protocol = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Cipher:") {
            r.cipher = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Application protocol:") {
            r.application_protocol = Some(v.trim().to_string());
        }
    }
    if !finished || !counted {
        return Err("no \"finished in\" and \"requests:\" lines in h2load's output".to_string());
    }
    Ok(r)
}

/// A load tool's run: what it printed and the proxy's CPU time from just after it was
/// started to just after it exited.
pub struct ToolRun {
    /// Its standard output and error.
    pub output: String,
    pub cpu: CpuTicks,
    pub wall: Duration,
}

/// Runs `program ARGS`, sampling the CPU time of `pids` just after starting it and
/// just after it exits; kills it after `limit`. A failed exit is an error.
pub fn run_tool(
    program: &Path,
    args: &[String],
    pids: &[u32],
    limit: Duration,
) -> Result<ToolRun, String> {
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let began = Instant::now();
    let before = procfs::cpu_ticks(pids);
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if began.elapsed() < limit => sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("{name} still running after {limit:?}: killed"));
            }
            Err(e) => break Err(format!("waiting for {name}: {e}")),
        }
    };
    let cpu = procfs::cpu_ticks(pids).since(before);
    let wall = began.elapsed();
    let output = format!(
        "{}{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    let status = status?;
    if !status.success() {
        let tail: Vec<&str> = output.lines().rev().take(5).collect();
        return Err(format!(
            "{name} failed ({status}): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    Ok(ToolRun { output, cpu, wall })
}

/// The first line `program ARG` prints (its version), for the report.
pub fn version(program: &Path, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Whole seconds for wrk's `-d` (it takes no fractions), at least one.
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs_f64().round() as u64).max(1)
}

/// The directory for the files of the `http` measurement.
pub fn dir(tmp: &Path) -> PathBuf {
    tmp.join("http")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 3s test @ http://127.0.0.1:18081/small
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   260.62us   69.22us   1.84ms   95.75%
    Req/Sec   144.26k     1.82k  146.43k    60.00%
  Latency Distribution
     50%  259.00us
     75%  273.00us
     90%  283.00us
     99%    1.20ms
  430535 requests in 3.00s, 34.08MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec: 143448.79
Transfer/sec:     34.06MB
";

    #[test]
    fn wrk_output_is_read() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests, 430_535);
        assert_eq!(r.seconds, 3.0);
        assert_eq!(r.rate, 143_448.79);
        assert_eq!(r.p50_us, Some(259.0));
        assert_eq!(r.p99_us, Some(1200.0));
        assert_eq!(r.socket_error_count, 5);
        assert_eq!(
            r.socket_errors.as_deref(),
            Some("connect 0, read 3, write 0, timeout 2")
        );
        assert_eq!(r.non_2xx, 7);
        // Without errors and without --latency.
        let plain = "  100 requests in 1.00m, 1MB read\nRequests/sec: 1.67\n";
        let r = parse_wrk(plain).unwrap();
        assert_eq!((r.requests, r.seconds, r.p99_us), (100, 60.0, None));
        assert_eq!((r.socket_error_count, r.non_2xx), (0, 0));
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2
Process Request Failure:2

finished in 2.00s, 154826.00 req/s, 10.63MB/s
requests: 309652 total, 309752 started, 309652 done, 309600 succeeded, 50 failed, 2 errored, 0 timeout
status codes: 309600 2xx, 0 3xx, 1 4xx, 3 5xx
traffic: 21.26MB (22295434) total, 14.17MB (14863296) headers (space savings 51.02%), 1.77MB (1857912) data
                     min         max         mean         sd        +/- sd
time for request:       22us      6.41ms       575us       226us    90.29%
";

    #[test]
    fn h2load_output_is_read() {
        let r = parse_h2load(H2LOAD).unwrap();
        assert_eq!(r.seconds, 2.0);
        assert_eq!(r.succeeded, 309_600);
        assert_eq!(r.failed, 52);
        assert_eq!(r.non_2xx, 4);
        assert_eq!(r.rate(), 154_800.0);
        assert_eq!(r.tls_protocol.as_deref(), Some("TLSv1.3"));
        assert_eq!(r.cipher.as_deref(), Some("TLS_AES_128_GCM_SHA256"));
        assert_eq!(r.application_protocol.as_deref(), Some("h2"));
        let ms = "finished in 502.34ms, 20000.00 req/s, 1.37MB/s\n\
                  requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, 0 errored, 0 timeout\n";
        let r = parse_h2load(ms).unwrap();
        assert!((r.seconds - 0.50234).abs() < 1e-9, "{}", r.seconds);
        assert_eq!(r.application_protocol, None);
        assert!(parse_h2load("No protocol negotiated. Exiting...").is_err());
    }

    #[test]
    fn times_in_every_unit() {
        assert_eq!(parse_time_us("367.00us"), Some(367.0));
        assert_eq!(parse_time_us("1.20ms"), Some(1200.0));
        assert_eq!(parse_time_us("3.00s,"), Some(3e6));
        assert_eq!(parse_time_us("1.50m"), Some(90e6));
        assert_eq!(parse_time_us("2h"), Some(7200e6));
        assert_eq!(parse_time_us("12"), None);
        assert_eq!(parse_time_us("-1s"), None);
        assert_eq!(parse_time_us("fast"), None);
    }

    #[test]
    fn tool_arguments() {
        let script = Path::new("/tmp/post.lua");
        let url = "http://127.0.0.1:9/post";
        let post = wrk_args(Row::Post, url, 50, 3, script);
        assert_eq!(
            post,
            [
                "-t1",
                "-c50",
                "-d3s",
                "--latency",
                "-s",
                "/tmp/post.lua",
                url
            ]
        );
        let close = wrk_args(Row::Close, url, 50, 3, script);
        assert_eq!(close[4..], ["-H", "Connection: close", url]);
        assert_eq!(
            h2load_args("https://127.0.0.1:9/small", 10, 10, 3),
            ["-t1", "-c10", "-m10", "-D3", "https://127.0.0.1:9/small"]
        );
        assert_eq!(whole_seconds(Duration::from_millis(500)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(2600)), 3);
        assert!(post_script().contains("string.rep(\"x\", 4096)"));
    }

    #[test]
    fn the_origin_serves_the_sizes_the_rows_name() {
        let config = origin_config("127.0.0.1:9".parse().unwrap(), Path::new("/tmp/o"));
        assert!(!config.contains("{{"), "{config}");
        let small = body_text(SMALL_BODY);
        assert_eq!(small.len(), 100);
        assert!(config.contains(&format!("return 200 \"{small}\";")));
        let piece = body_text(PIECE);
        assert!(config.contains(&format!("set $piece \"{piece}\";")));
        assert_eq!(8 * piece.len(), LARGE_BODY);
        assert_eq!(
            config.matches("$piece").count(),
            1 + 8,
            "one `set`, eight in the body"
        );
        assert!(small.bytes().all(|b| b.is_ascii_lowercase()));
    }
}
