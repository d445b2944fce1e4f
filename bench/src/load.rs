//! The load generator: one measurement per process.
//!
//! Protocol with `run` (stdout, one line each): `START` and `END` bracket the measured
//! window (the orchestrator samples the proxy's CPU time at both), `OPEN <opened>
//! <failed> <seconds>` says every idle connection is open (the orchestrator samples the
//! proxy's memory, then writes a line to stdin to release them), and `RESULT {json}`
//! carries the figures. Diagnostics go to stderr.

use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::timeout;

use crate::echo;
use crate::sse;
use crate::stats::Summary;
use crate::ws::{self, Client, Endpoint};

/// Bound on any single network wait of a measurement loop.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a close handshake at the end of a measurement.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// C connections, closed loop, one small message in flight each: messages/s, latency.
    Echo,
    /// Like echo with large messages: throughput.
    Bulk,
    /// One connection, closed loop: latency percentiles.
    Latency,
    /// Connect, upgrade, one echo, close handshake, repeat: cycles/s.
    Churn,
    /// Open N WebSockets and hold them until a line arrives on stdin.
    Idle,
    /// Client Close and client FIN, measured until a scripted backend in this process
    /// sees the end.
    Release,
    /// Event streams aborted by the client (FIN, RST), one at a time, measured until an
    /// event stream backend in this process learns of it.
    #[serde(rename = "sse-release")]
    SseRelease,
    /// N event streams at once from an event stream backend in this process: events
    /// delivered per second.
    #[serde(rename = "sse-load")]
    SseLoad,
}

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// What to measure.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The WebSocket endpoint: ws://HOST:PORT[/PATH] (a proxy, or the backend itself);
    /// for sse-release and sse-load an http://HOST:PORT/PATH, the streams being
    /// PATH/0, PATH/1, ...
    #[arg(long)]
    url: String,
    /// Connections (echo 50, bulk 8, latency 1, churn 20 concurrent cycles, idle 1000,
    /// sse-load 1000 streams).
    #[arg(long)]
    connections: Option<usize>,
    /// Message payload size in bytes (64; bulk 65536).
    #[arg(long)]
    size: Option<usize>,
    /// Measured time for echo, bulk, latency and churn.
    #[arg(long, value_parser = crate::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Unmeasured traffic before the window.
    #[arg(long, value_parser = crate::parse_duration, default_value = "500ms")]
    warmup: Duration,
    /// release, sse-release: connections per kind of ending (client Close, client FIN;
    /// stream FIN, stream RST).
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// release, sse-release, sse-load: where the in-process backend listens (the
    /// proxy's backend).
    #[arg(long)]
    backend_listen: Option<SocketAddr>,
    /// sse-release, sse-load: time between two events of a stream.
    #[arg(long, value_parser = crate::parse_duration, default_value = "100ms")]
    interval: Duration,
    /// idle: longest hold if nothing arrives on stdin.
    #[arg(long, value_parser = crate::parse_duration, default_value = "300s")]
    hold: Duration,
    /// idle, sse-load: handshakes (streams being opened) in flight at once.
    #[arg(long, default_value_t = 200)]
    open_concurrency: usize,
}

/// What a load run reports (the `RESULT` line).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub mode: Option<Mode>,
    pub connections: usize,
    pub size: usize,
    /// Completed messages (echo, bulk, latency) or cycles (churn) inside the window.
    pub messages: u64,
    /// Payload bytes echoed back inside the window.
    pub payload_bytes: u64,
    /// The window, seconds.
    pub window_s: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Per message (or per cycle for churn), microseconds.
    pub latency_us: Option<Summary>,
    /// idle: WebSockets open at the same time, and how long opening them took.
    pub opened: u64,
    pub open_s: f64,
    /// release: client action → backend sees the end, microseconds.
    pub close_us: Option<Summary>,
    pub fin_us: Option<Summary>,
    /// release: what the backend saw, counted (sse-release: `fin_seen` and
    /// `rst_seen`, how the backend learned of the abort).
    pub close_seen: BTreeMap<String, u64>,
    pub fin_seen: BTreeMap<String, u64>,
    /// sse-release: client RST → backend learns it, microseconds.
    pub rst_us: Option<Summary>,
    pub rst_seen: BTreeMap<String, u64>,
    /// sse-release: streams that had unread bytes when the client closed (their FIN
    /// may have been a RST).
    pub unread_at_abort: u64,
    /// sse-load: events received in all (`messages`: in the window).
    pub received: u64,
    /// sse-load: the fewest and most events one stream received in the window.
    pub stream_min: Option<u64>,
    pub stream_max: Option<u64>,
}

impl LoadResult {
    pub(crate) fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn merge(&mut self, other: LoadResult) {
        self.messages += other.messages;
        self.payload_bytes += other.payload_bytes;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

pub fn main(args: LoadArgs) -> ExitCode {
    let sse = matches!(args.mode, Mode::SseRelease | Mode::SseLoad);
    let endpoint = match if sse {
        Endpoint::parse_http(&args.url)
    } else {
        Endpoint::parse(&args.url)
    } {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wsgate-bench load: {e}");
            return ExitCode::from(2);
        }
    };
    if (sse || args.mode == Mode::Release) && args.backend_listen.is_none() {
        eprintln!("wsgate-bench load: this mode needs --backend-listen ADDR");
        return ExitCode::from(2);
    }
    // One connection measures latency: a single-threaded runtime avoids cross-thread
    // wake-ups in the generator itself. The others use a thread per CPU.
    let runtime = if args.mode == Mode::Latency {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
    .expect("cannot start the tokio runtime");
    let mut result = runtime.block_on(measure(&args, &endpoint));
    result.mode = Some(args.mode);
    println!(
        "RESULT {}",
        serde_json::to_string(&result).expect("a result serialises to JSON")
    );
    // Idle connections may still be closing in tasks: do not wait for them.
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::SUCCESS
}

async fn measure(args: &LoadArgs, endpoint: &Endpoint) -> LoadResult {
    let small = args.size.unwrap_or(64);
    match args.mode {
        Mode::Echo => closed_loop(args, endpoint, args.connections.unwrap_or(50), small).await,
        Mode::Bulk => {
            let size = args.size.unwrap_or(64 << 10);
            closed_loop(args, endpoint, args.connections.unwrap_or(8), size).await
        }
        Mode::Latency => closed_loop(args, endpoint, args.connections.unwrap_or(1), small).await,
        Mode::Churn => churn(args, endpoint, args.connections.unwrap_or(20), small).await,
        Mode::Idle => idle(args, endpoint, args.connections.unwrap_or(1000)).await,
        Mode::Release => {
            let listen = args.backend_listen.expect("checked in main");
            release(endpoint, listen, args.count, small).await
        }
        Mode::SseRelease => {
            let listen = args.backend_listen.expect("checked in main");
            sse::release(endpoint, listen, args.count, args.interval).await
        }
        Mode::SseLoad => {
            let listen = args.backend_listen.expect("checked in main");
            let shape = sse::LoadShape {
                streams: args.connections.unwrap_or(1000),
                interval: args.interval,
                warmup: args.warmup,
                duration: args.duration,
                open_concurrency: args.open_concurrency,
            };
            sse::load(endpoint, listen, shape).await
        }
    }
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// Prints the window markers at `start` and `end`.
fn markers(start: Instant, end: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep_until(start.into()).await;
        println!("START");
        tokio::time::sleep_until(end.into()).await;
        println!("END");
    })
}

/// Samples per worker before more are dropped (bounds memory on very fast machines).
const MAX_SAMPLES: usize = 5_000_000;

/// A worker's figures and latency samples (ns).
type WorkerResult = (LoadResult, Vec<u64>);

/// Merges the workers' figures into `result` once they and the window markers are done.
async fn gather(
    mut result: LoadResult,
    workers: Vec<tokio::task::JoinHandle<WorkerResult>>,
    marker: tokio::task::JoinHandle<()>,
    window: Duration,
) -> LoadResult {
    let mut samples = Vec::new();
    for w in workers {
        let (part, mut lat) = w.await.expect("a load worker panicked");
        result.merge(part);
        samples.append(&mut lat);
    }
    let _ = marker.await;
    result.window_s = window.as_secs_f64();
    result.latency_us = Summary::from_nanos(&mut samples);
    result
}

/// echo, bulk, latency: each connection sends one message, waits for its echo, repeats.
async fn closed_loop(
    args: &LoadArgs,
    endpoint: &Endpoint,
    conns: usize,
    size: usize,
) -> LoadResult {
    let mut result = LoadResult {
        connections: conns,
        size,
        ..LoadResult::default()
    };
    let mut clients = Vec::with_capacity(conns);
    for i in 0..conns {
        match timeout(
            IO_TIMEOUT,
            Client::connect(endpoint, &endpoint.path, Some(ws::loopback_source(i))),
        )
        .await
        {
            Ok(Ok(c)) => clients.push(c),
            Ok(Err(e)) => result.error(format!("connect: {e}")),
            Err(_) => result.error("connect: timed out"),
        }
    }
    let start = Instant::now() + args.warmup;
    let end = start + args.duration;
    let marker = markers(start, end);
    let message = Arc::new(payload(size));
    let workers: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(closed_loop_worker(client, message.clone(), start, end)))
        .collect();
    gather(result, workers, marker, args.duration).await
}

async fn closed_loop_worker(
    mut client: Client,
    message: Arc<Vec<u8>>,
    start: Instant,
    end: Instant,
) -> (LoadResult, Vec<u64>) {
    let frame = ws::client_binary_frame(&message);
    let mut part = LoadResult::default();
    let mut samples = Vec::new();
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let exchange = async {
            client.stream.write_all(&frame).await?;
            client.recv_echo(&message).await
        };
        match timeout(IO_TIMEOUT, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                part.error(format!("echo: {e}"));
                return (part, samples);
            }
            Err(_) => {
                part.error("echo: no answer within 10 s");
                return (part, samples);
            }
        }
        let t1 = Instant::now();
        if t0 >= start && t1 <= end {
            part.messages += 1;
            part.payload_bytes += message.len() as u64;
            if samples.len() < MAX_SAMPLES {
                samples.push((t1 - t0).as_nanos() as u64);
            }
        }
    }
    if let Err(e) = client.close(CLOSE_TIMEOUT).await {
        part.error(format!("close: {e}"));
    }
    (part, samples)
}

/// churn: `conns` workers each repeat connect → upgrade → one echo → close handshake.
async fn churn(args: &LoadArgs, endpoint: &Endpoint, conns: usize, size: usize) -> LoadResult {
    let result = LoadResult {
        connections: conns,
        size,
        ..LoadResult::default()
    };
    let start = Instant::now() + args.warmup;
    let end = start + args.duration;
    let marker = markers(start, end);
    let message = Arc::new(payload(size));
    let next_source = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let endpoint = endpoint.clone();
            let message = message.clone();
            let next_source = next_source.clone();
            tokio::spawn(async move {
                // Built once per worker, sent on every connection it opens.
                let frame = ws::client_binary_frame(&message);
                let mut part = LoadResult::default();
                let mut samples = Vec::new();
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let source = ws::loopback_source(next_source.fetch_add(1, Ordering::Relaxed));
                    let cycle = async {
                        let mut c =
                            Client::connect(&endpoint, &endpoint.path, Some(source)).await?;
                        c.stream.write_all(&frame).await?;
                        c.recv_echo(&message).await?;
                        c.close(CLOSE_TIMEOUT).await
                    };
                    match timeout(IO_TIMEOUT, cycle).await {
                        Ok(Ok(())) => {
                            let t1 = Instant::now();
                            if t0 >= start && t1 <= end {
                                part.messages += 1;
                                part.payload_bytes += message.len() as u64;
                                if samples.len() < MAX_SAMPLES {
                                    samples.push((t1 - t0).as_nanos() as u64);
                                }
                            }
                        }
                        Ok(Err(e)) => {
                            part.error(format!("churn cycle: {e}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(_) => part.error("churn cycle: not done within 10 s"),
                    }
                }
                (part, samples)
            })
        })
        .collect();
    gather(result, workers, marker, args.duration).await
}

/// idle: opens `n` WebSockets from spread loopback addresses, reports `OPEN`, holds them
/// until a line (or end of file) on stdin or `--hold`, then closes them properly.
async fn idle(args: &LoadArgs, endpoint: &Endpoint, n: usize) -> LoadResult {
    let mut result = LoadResult {
        connections: n,
        ..LoadResult::default()
    };
    let began = Instant::now();
    let gate = Arc::new(Semaphore::new(args.open_concurrency.max(1)));
    let (release_tx, release_rx) = watch::channel(false);
    let (opened_tx, mut opened_rx) = mpsc::channel::<Result<(), String>>(n.max(1));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let endpoint = endpoint.clone();
        let opened_tx = opened_tx.clone();
        let mut release_rx = release_rx.clone();
        tasks.push(tokio::spawn(async move {
            let connect = Client::connect(&endpoint, &endpoint.path, Some(ws::loopback_source(i)));
            let mut client = match timeout(Duration::from_secs(30), connect).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    drop(permit);
                    let _ = opened_tx.send(Err(format!("open: {e}"))).await;
                    return Ok(());
                }
                Err(_) => {
                    drop(permit);
                    let _ = opened_tx.send(Err("open: timed out".to_string())).await;
                    return Ok(());
                }
            };
            drop(permit);
            let _ = opened_tx.send(Ok(())).await;
            drop(opened_tx);
            // Hold: wait for the release (or for the sender to go away).
            let _ = release_rx.wait_for(|released| *released).await;
            client.close(Duration::from_secs(20)).await
        }));
    }
    drop(opened_tx);
    // Every task reports once (success or failure) and keeps no sender afterwards.
    while let Some(r) = opened_rx.recv().await {
        match r {
            Ok(()) => result.opened += 1,
            Err(e) => result.error(e),
        }
    }
    result.open_s = began.elapsed().as_secs_f64();
    println!(
        "OPEN {} {} {:.3}",
        result.opened, result.errors, result.open_s
    );

    // Hold until a line on stdin (std, in a thread: tokio's io-std is not enabled).
    let (line_tx, line_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = io::stdin().lock().read_line(&mut line);
        let _ = line_tx.send(());
    });
    let _ = timeout(args.hold, line_rx).await;
    let _ = release_tx.send(true);
    let closing = async {
        let mut failures = Vec::new();
        for t in tasks {
            if let Ok(Err(e)) = t.await {
                failures.push(e);
            }
        }
        failures
    };
    match timeout(Duration::from_secs(30), closing).await {
        Ok(failures) => {
            for e in failures {
                result.error(format!("close: {e}"));
            }
        }
        Err(_) => result.error("close: not all idle connections closed within 30 s"),
    }
    result
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    Close,
    Fin,
}

/// release: one connection at a time through the target to a scripted backend in this
/// process; the client sends Close (even ids) or FIN without Close (odd ids) and the
/// time until the backend sees the end is measured on one clock.
async fn release(
    endpoint: &Endpoint,
    backend: SocketAddr,
    count: usize,
    size: usize,
) -> LoadResult {
    let mut result = LoadResult {
        connections: 1,
        size,
        ..LoadResult::default()
    };
    let listener = echo::listen(backend).expect("cannot listen for the scripted backend");
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let acceptor = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(echo::serve(stream, Some(seen_tx.clone())));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    let message = payload(size);
    let data = ws::client_binary_frame(&message);
    let close = ws::client_close_frame();
    let mut close_ns = Vec::new();
    let mut fin_ns = Vec::new();
    for id in 0..2 * count {
        let ending = if id % 2 == 0 {
            Ending::Close
        } else {
            Ending::Fin
        };
        let path = format!("/release/{id}");
        let one = async {
            let source = Some(ws::loopback_source(id));
            let mut c = Client::connect(endpoint, &path, source).await?;
            c.stream.write_all(&data).await?;
            c.recv_echo(&message).await?;
            let t0 = Instant::now();
            match ending {
                Ending::Close => c.stream.write_all(&close).await?,
                Ending::Fin => c.stream.shutdown().await?,
            }
            let (seen, at) = loop {
                let (p, seen, at) = seen_rx
                    .recv()
                    .await
                    .ok_or_else(|| io::Error::other("scripted backend stopped"))?;
                if p == path {
                    break (seen, at);
                }
            };
            // The server side closes TCP; wait for it so nothing lingers.
            let _ = c.wait_eof().await;
            Ok::<_, io::Error>((at.saturating_duration_since(t0), seen))
        };
        match timeout(IO_TIMEOUT, one).await {
            Ok(Ok((dt, seen))) => {
                let (samples, seen_count) = match ending {
                    Ending::Close => (&mut close_ns, &mut result.close_seen),
                    Ending::Fin => (&mut fin_ns, &mut result.fin_seen),
                };
                samples.push(dt.as_nanos() as u64);
                *seen_count.entry(seen.to_string()).or_default() += 1;
                result.messages += 1;
            }
            Ok(Err(e)) => result.error(format!("release {id}: {e}")),
            Err(_) => result.error(format!("release {id}: the backend saw no end within 10 s")),
        }
    }
    acceptor.abort();
    result.close_us = Summary::from_nanos(&mut close_ns);
    result.fin_us = Summary::from_nanos(&mut fin_ns);
    result
}
