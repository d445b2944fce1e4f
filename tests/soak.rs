//! A bounded soak: several hundred WebSockets through the real `wsgate` binary with
//! short timers, with clients and backends that end in every way the endings table
//! knows (Close, FIN, vanishing, not reading, reset). Afterwards nothing may be left
//! behind: no active connection in the metrics, every upgrade ended exactly once (in
//! the metrics and in the log), wsgate's file descriptors back to where they were, no
//! wsgate socket in CLOSE_WAIT, and its resident memory within 2 MiB of where it was
//! after the warm-up. wsgate runs as its own process so that its memory and descriptors
//! are measured apart from the test's clients and backend.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Rounds of the soak proper (after the warm-up).
const ROUNDS: usize = 3;
/// Connections per round.
const CONNECTIONS: usize = 400;
/// Connections open at once.
const CONCURRENCY: usize = 100;
/// Rounds of warm-up before the soak proper. wsgate's resident set grows over the first
/// few thousand connections of this mix (the allocator's per-thread arenas reaching the
/// high-water mark of 100 connections at once, some streaming 64 KiB frames), then
/// only wobbles: in a 30-round run 20.0 MiB after the first round, then between 20.7
/// and 22.4 MiB over the 12,000 connections after the fourth, without a trend.
const WARM_UP_ROUNDS: usize = 4;
const WARM_UP: usize = WARM_UP_ROUNDS * CONNECTIONS;
/// Every backend connection whose number modulo this is `VANISH_AT` vanishes.
const VANISH_EVERY: usize = 7;
const VANISH_AT: usize = 3;
/// The most a backend streams toward a client that asked for it (64 frames of 64 KiB):
/// more than the socket buffers between a stalled client and the backend hold.
const STREAM_FRAMES: usize = 64;
const STREAM_FRAME: usize = 64 * 1024;
/// Hard bound on the soak, warm-up and checks included (it takes 10-15 s here).
const SOAK_LIMIT: Duration = Duration::from_secs(60);
/// Hard bound on one client's whole life.
const CLIENT_LIMIT: Duration = Duration::from_secs(30);
/// Slack allowed on wsgate's open file descriptors after the soak (none are expected:
/// the slack absorbs a connection the kernel has not finished handing over).
const FD_MARGIN: usize = 2;
/// Slack allowed on wsgate's resident set after the soak, against its value after the
/// warm-up.
const RSS_MARGIN_KB: u64 = 2 * 1024;

/// How a client behaves after its upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Behaviour {
    /// Three echoes, then a proper Close handshake.
    Close,
    /// One echo, then FIN without a Close.
    Fin,
    /// One echo, then silence: never reads or answers again; dropped once wsgate has
    /// reset it.
    Vanish,
    /// Asks the backend to stream, then stops reading (small receive buffer).
    Stall,
    /// One echo, then a reset (zero linger).
    Reset,
}

const BEHAVIOURS: [Behaviour; 5] = [
    Behaviour::Close,
    Behaviour::Fin,
    Behaviour::Vanish,
    Behaviour::Stall,
    Behaviour::Reset,
];

/// What one client saw.
#[derive(Debug)]
struct ClientEnd {
    behaviour: Behaviour,
    /// The Close code wsgate or the backend sent the client, if one was read.
    close_code: Option<u16>,
    /// How the client's connection ended as the client saw it.
    end: &'static str,
}

/// What the scripted backend saw.
#[derive(Default)]
struct BackendStats {
    accepted: AtomicUsize,
    /// Connection tasks still running.
    open: AtomicUsize,
    vanished: AtomicUsize,
    streamed_bytes: AtomicUsize,
    closes_answered: AtomicUsize,
    /// Reads that waited longer than `LIMIT`: wsgate kept a backend connection silent.
    read_timeouts: AtomicUsize,
    /// Handshakes that went wrong, frames no client sends.
    errors: AtomicUsize,
}

/// Decrements `open` when a backend connection task ends, however it ends.
struct OpenGuard(Arc<BackendStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The scripted backend: echoes data frames, answers Ping with Pong and Close with
/// Close (then closes), streams on request, and vanishes (FIN or RST, no Close) on every
/// `VANISH_EVERY`th connection after its first data frame.
async fn backend(listener: TcpListener, stats: Arc<BackendStats>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let n = stats.accepted.fetch_add(1, Ordering::SeqCst);
                stats.open.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(stats.clone());
                conns.spawn(backend_conn(stream, n, guard));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn backend_conn(mut s: TcpStream, n: usize, guard: OpenGuard) {
    let stats = guard.0.clone();
    let Some(mut buf) = backend_handshake(&mut s).await else {
        stats.errors.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let vanish = n % VANISH_EVERY == VANISH_AT;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        while let Some((f, used)) = decode(&buf) {
            buf.drain(..used);
            let reply = match f.opcode {
                0..=2 if f.payload == b"stream" => {
                    let frame = encode(true, 0, BINARY, &[7u8; STREAM_FRAME], false);
                    for _ in 0..STREAM_FRAMES {
                        if !write(&mut s, &frame).await {
                            break;
                        }
                        stats
                            .streamed_bytes
                            .fetch_add(frame.len(), Ordering::SeqCst);
                    }
                    None
                }
                0..=2 => Some(encode(f.fin, f.rsv, f.opcode, &f.payload, false)),
                PING => Some(encode(true, 0, PONG, &f.payload, false)),
                PONG => None,
                CLOSE => {
                    let code = f.payload.get(..2).unwrap_or_default();
                    if write(&mut s, &encode(true, 0, CLOSE, code, false)).await {
                        stats.closes_answered.fetch_add(1, Ordering::SeqCst);
                    }
                    // The server closes TCP first.
                    return;
                }
                _ => {
                    stats.errors.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            };
            if let Some(reply) = reply
                && !write(&mut s, &reply).await
            {
                return;
            }
            if vanish && f.opcode <= 2 {
                stats.vanished.fetch_add(1, Ordering::SeqCst);
                if n.is_multiple_of(2) {
                    let _ = s.set_zero_linger();
                }
                return;
            }
        }
        match tokio::time::timeout(LIMIT, s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
            Err(_) => {
                stats.read_timeouts.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// Reads the upgrade request and answers 101; returns the bytes read behind it.
async fn backend_handshake(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        match tokio::time::timeout(LIMIT, s.read(&mut chunk)).await {
            Ok(Ok(k)) if k > 0 => buf.extend_from_slice(&chunk[..k]),
            _ => return None,
        }
    };
    let rest = buf.split_off(end + 4);
    let head = String::from_utf8(buf).ok()?;
    let accept = derive_accept_key(header(&head, "sec-websocket-key")?.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    write(s, resp.as_bytes()).await.then_some(rest)
}

/// Writes all of `bytes`; false if the connection failed or made no progress for
/// `LIMIT`.
async fn write(s: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(LIMIT, s.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Opens a WebSocket through the gate; a small receive buffer for clients that stall,
/// so that the backend's stream fills it quickly.
async fn connect(gate: SocketAddr, path: &str, small_buffer: bool) -> Peer {
    let socket = TcpSocket::new_v4().unwrap();
    if small_buffer {
        socket.set_recv_buffer_size(4096).unwrap();
    }
    let mut s = within(socket.connect(gate)).await.unwrap();
    within(s.write_all(upgrade_request(path, "").as_bytes()))
        .await
        .unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert_eq!(status(&head), 101, "{head}");
    Peer::new(s, Role::Client, rest)
}

/// Sends a masked frame; false if the connection is gone (wsgate may reset a client at
/// any time, which is not the client's failure).
async fn try_send(peer: &mut Peer, opcode: u8, payload: &[u8]) -> bool {
    let frame = encode(true, 0, opcode, payload, true);
    matches!(within(peer.stream.write_all(&frame)).await, Ok(()))
}

/// The next frame that is not a Ping; Pings are answered on the way.
async fn next(peer: &mut Peer) -> Result<Frame, End> {
    loop {
        let f = peer.try_recv().await?;
        if f.opcode == PING {
            try_send(peer, PONG, &f.payload).await;
            continue;
        }
        return Ok(f);
    }
}

fn end_name(end: End) -> &'static str {
    match end {
        End::Eof => "eof",
        End::Reset => "reset",
    }
}

/// Sends `msg` and waits for its echo. `Err` carries how the connection ended instead:
/// a Close (answered, then read to the end) or the end of the stream.
async fn echo(peer: &mut Peer, msg: &[u8]) -> Result<(), (Option<u16>, &'static str)> {
    if !try_send(peer, TEXT, msg).await {
        return Err((None, end_name(peer.drain_to_end().await)));
    }
    match next(peer).await {
        Ok(f) if f.opcode == CLOSE => {
            let code = f.close_code();
            try_send(peer, CLOSE, &f.payload[..f.payload.len().min(2)]).await;
            Err((code, end_name(peer.drain_to_end().await)))
        }
        Ok(f) => {
            assert_eq!((f.opcode, f.payload.as_slice()), (TEXT, msg), "echo");
            Ok(())
        }
        Err(end) => Err((None, end_name(end))),
    }
}

/// Waits until wsgate has reset a client that is not reading (the socket reports
/// ECONNRESET without a read).
async fn wait_for_reset(peer: &Peer) {
    // Polls rather than `eventually`: an async closure borrowing the peer would make
    // this future not `Send`, and client tasks run on the multi-threaded runtime.
    within(async {
        loop {
            if let Ok(Some(e)) = peer.stream.take_error() {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn run_client(gate: SocketAddr, id: usize, behaviour: Behaviour) -> ClientEnd {
    let path = format!("/soak/{id}/{behaviour:?}");
    let mut peer = connect(gate, &path, behaviour == Behaviour::Stall).await;
    let done = |close_code, end| ClientEnd {
        behaviour,
        close_code,
        end,
    };
    let rounds = if behaviour == Behaviour::Close { 3 } else { 1 };
    if behaviour != Behaviour::Stall {
        for i in 0..rounds {
            if let Err((code, end)) = echo(&mut peer, format!("{id}:{i}").as_bytes()).await {
                return done(code, end);
            }
        }
    }
    match behaviour {
        Behaviour::Close => {
            if !try_send(&mut peer, CLOSE, &close_payload(1000, "bye")).await {
                return done(None, end_name(peer.drain_to_end().await));
            }
            match next(&mut peer).await {
                Ok(f) => {
                    assert_eq!(f.opcode, CLOSE, "{f:?}");
                    done(f.close_code(), end_name(peer.drain_to_end().await))
                }
                Err(end) => done(None, end_name(end)),
            }
        }
        Behaviour::Fin => {
            let _ = within(peer.stream.shutdown()).await;
            done(None, end_name(peer.drain_to_end().await))
        }
        Behaviour::Vanish => {
            wait_for_reset(&peer).await;
            done(None, "reset")
        }
        Behaviour::Stall => {
            if try_send(&mut peer, TEXT, b"stream").await {
                wait_for_reset(&peer).await;
            }
            done(None, "reset")
        }
        Behaviour::Reset => {
            peer.reset();
            done(None, "reset by client")
        }
    }
}

/// Runs `count` clients, `CONCURRENCY` at a time, behaviours in turn.
async fn round(gate: SocketAddr, first_id: usize, count: usize) -> Vec<ClientEnd> {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let mut clients = JoinSet::new();
    for id in first_id..first_id + count {
        let slots = slots.clone();
        let behaviour = BEHAVIOURS[id % BEHAVIOURS.len()];
        clients.spawn(async move {
            let _slot = slots.acquire_owned().await.unwrap();
            match tokio::time::timeout(CLIENT_LIMIT, run_client(gate, id, behaviour)).await {
                Ok(end) => end,
                Err(_) => {
                    panic!("client {id} ({behaviour:?}) still running after {CLIENT_LIMIT:?}")
                }
            }
        });
    }
    let mut ends = Vec::with_capacity(count);
    while let Some(end) = clients.join_next().await {
        ends.push(end.unwrap());
    }
    ends
}

async fn scrape(admin: SocketAddr) -> String {
    let (code, text) = http_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    text
}

/// Every `wsgate_websocket_connections_ended_total` series with its value.
fn ended_by_outcome(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("wsgate_websocket_connections_ended_total{outcome=\""))
        .filter_map(|l| {
            let (outcome, rest) = l.split_once("\"}")?;
            Some((outcome.to_string(), rest.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until no connection is open, in wsgate and in the backend.
async fn quiescent(admin: SocketAddr, stats: &BackendStats) {
    let mut last = String::new();
    let settled = tokio::time::timeout(LIMIT, async {
        loop {
            let text = scrape(admin).await;
            let open = [
                sample(&text, "wsgate_websocket_connections_active"),
                sample(&text, "wsgate_connections_active"),
                stats.open.load(Ordering::SeqCst) as f64,
            ];
            if open == [0.0; 3] {
                return;
            }
            last = format!(
                "websockets {}, connections {}, backend connections {}",
                open[0], open[1], open[2]
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "still open after {LIMIT:?}: {last}");
}

/// Polls `check` until it returns `Ok`; fails with its last `Err` after `LIMIT`. For
/// state the kernel releases asynchronously (descriptors, socket states).
async fn settle<T>(mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("not settled after {LIMIT:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Counts wsgate's "websocket connection ended" log lines by outcome, reading its log to
/// the end (reading also keeps the pipe from filling and blocking wsgate's logging).
fn count_log_lines(
    mut log: BufReader<tokio::process::ChildStderr>,
) -> Arc<std::sync::Mutex<BTreeMap<String, f64>>> {
    let counts = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let shared = counts.clone();
    tokio::spawn(async move {
        let mut line = String::new();
        while log.read_line(&mut line).await.unwrap_or(0) > 0 {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "websocket connection ended"
            {
                let outcome = v["outcome"].as_str().unwrap_or("?").to_string();
                *shared.lock().unwrap().entry(outcome).or_insert(0.0) += 1.0;
            }
            line.clear();
        }
    });
    counts
}

/// An IPv4 socket address as /proc/net/tcp writes it: the address as a host-order
/// (little-endian) hex word, then the port in hex.
fn proc_net_addr(addr: SocketAddr) -> String {
    let SocketAddr::V4(v4) = addr else {
        panic!("{addr} is not IPv4")
    };
    let [a, b, c, d] = v4.ip().octets();
    format!("{d:02X}{c:02X}{b:02X}{a:02X}:{:04X}", v4.port())
}

/// Sockets in /proc/net/tcp in state CLOSE_WAIT (08) that wsgate owns: its end of a
/// client connection (local address = the proxy listener) or of a backend connection
/// (remote address = the backend).
fn gate_sockets_in_close_wait(proxy: SocketAddr, backend: SocketAddr) -> Vec<String> {
    let (proxy, backend) = (proc_net_addr(proxy), proc_net_addr(backend));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "08" && (f[1] == proxy || f[2] == backend)
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_leaves_nothing_behind() {
    let started = Instant::now();
    let (backend_l, backend_addr) = listener().await;
    let stats = Arc::new(BackendStats::default());
    let backend_task = tokio::spawn(backend(backend_l, stats.clone()));
    let (mut wsgate, addr, admin, log) = spawn_wsgate(
        backend_addr,
        "[websocket]\nping_interval = \"200ms\"\npong_timeout = \"300ms\"\n\
         close_timeout = \"300ms\"\nwrite_timeout = \"500ms\"\n\
         [shutdown]\ndrain_timeout = \"5s\"",
    )
    .await;
    let pid = wsgate.id().unwrap();
    let logged = count_log_lines(log);

    let checked = tokio::time::timeout(SOAK_LIMIT, async {
        // Warm-up at full concurrency, so tasks, buffers and the allocator reach their
        // working size. The reference is the highest resident set seen at the warm-up's
        // quiet points: a single sample can land at the bottom of the allocator's wobble.
        let mut warm_rss = Vec::with_capacity(WARM_UP_ROUNDS);
        for r in 0..WARM_UP_ROUNDS {
            let warm = round(addr, r * CONNECTIONS, CONNECTIONS).await;
            assert_eq!(warm.len(), CONNECTIONS);
            quiescent(admin, &stats).await;
            warm_rss.push(rss_kb(pid));
        }
        let fds_before = open_fds(pid);
        let rss_before = warm_rss.iter().copied().max().unwrap();

        // Several rounds, each measured once everything it opened is closed: a leak
        // shows as a trend, not only as a final difference.
        let soak_started = Instant::now();
        let mut ends = Vec::with_capacity(ROUNDS * CONNECTIONS);
        let mut fds = vec![fds_before];
        let mut rss = warm_rss.clone();
        for r in 0..ROUNDS {
            let first_id = WARM_UP + r * CONNECTIONS;
            let this_round = round(addr, first_id, CONNECTIONS).await;
            assert_eq!(this_round.len(), CONNECTIONS);
            ends.extend(this_round);
            quiescent(admin, &stats).await;
            fds.push(
                settle(|| match open_fds(pid) {
                    n if n <= fds_before + FD_MARGIN => Ok(n),
                    n => Err(format!("{n} open descriptors, {fds_before} before the soak")),
                })
                .await,
            );
            rss.push(rss_kb(pid));
        }
        let soak_time = soak_started.elapsed();

        let upgraded = (WARM_UP + ROUNDS * CONNECTIONS) as f64;
        let text = scrape(admin).await;
        assert_eq!(
            sample(&text, "wsgate_websocket_upgrades_total{result=\"ok\"}"),
            upgraded
        );
        let outcomes = ended_by_outcome(&text);
        assert_eq!(
            outcomes.values().sum::<f64>(),
            upgraded,
            "every upgrade ends exactly once: {outcomes:?}"
        );
        // One log line per ended connection, with the outcome the metrics counted.
        let in_metrics: BTreeMap<String, f64> = outcomes
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .map(|(o, n)| (o.clone(), *n))
            .collect();
        settle(|| {
            let in_log = logged.lock().unwrap().clone();
            if in_log == in_metrics {
                Ok(())
            } else {
                Err(format!("log lines by outcome {in_log:?}, metrics {in_metrics:?}"))
            }
        })
        .await;
        assert_eq!(
            stats.accepted.load(Ordering::SeqCst) as f64,
            upgraded,
            "backend connections"
        );
        assert_eq!(stats.errors.load(Ordering::SeqCst), 0, "backend errors");
        assert_eq!(
            stats.read_timeouts.load(Ordering::SeqCst),
            0,
            "backend connections left silent for {LIMIT:?}"
        );

        // What each client saw is consistent with the endings table.
        for e in &ends {
            match e.behaviour {
                Behaviour::Close => assert!(
                    matches!(e.close_code, Some(1000 | 1014)),
                    "a closing client gets its Close answered, or 1014 if the backend went: {e:?}"
                ),
                _ => assert!(
                    matches!(e.close_code, None | Some(1014)),
                    "only a vanished backend sends the client a Close here: {e:?}"
                ),
            }
        }

        settle(
            || match gate_sockets_in_close_wait(addr, backend_addr).as_slice() {
                [] => Ok(()),
                left => Err(format!("gate sockets in CLOSE_WAIT:\n{}", left.join("\n"))),
            },
        )
        .await;

        let mut by_behaviour: BTreeMap<String, usize> = BTreeMap::new();
        for e in &ends {
            *by_behaviour
                .entry(format!("{:?}/{}", e.behaviour, e.end).to_lowercase())
                .or_default() += 1;
        }
        let by_behaviour: Vec<String> = by_behaviour
            .iter()
            .map(|(b, n)| format!("{b}={n}"))
            .collect();
        let outcomes: Vec<String> = outcomes
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .map(|(o, n)| format!("{o}={n}"))
            .collect();
        let trend = |v: &[usize]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" -> ")
        };
        let mib = |v: &[u64]| {
            v.iter()
                .map(|kb| format!("{:.1}", *kb as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" -> ")
        };
        eprintln!(
            "soak: {} connections in {ROUNDS} rounds (+{WARM_UP} warm-up), {CONCURRENCY} at once | \
             client behaviour/end: {} | backends vanished {}, closes answered {}, streamed {} MiB | \
             outcomes: {} | fds {} | RSS MiB, warm-up {} | soak {} | soak {:.1} s, test {:.1} s",
            ROUNDS * CONNECTIONS,
            by_behaviour.join(" "),
            stats.vanished.load(Ordering::SeqCst),
            stats.closes_answered.load(Ordering::SeqCst),
            stats.streamed_bytes.load(Ordering::SeqCst) / (1024 * 1024),
            outcomes.join(" "),
            trend(&fds),
            mib(&rss[..WARM_UP_ROUNDS]),
            mib(&rss[WARM_UP_ROUNDS..]),
            soak_time.as_secs_f64(),
            started.elapsed().as_secs_f64(),
        );
        let rss_after = rss[WARM_UP_ROUNDS..].iter().copied().max().unwrap();
        assert!(
            rss_after <= rss_before + RSS_MARGIN_KB,
            "wsgate's RSS grew from {rss_before} KiB after the warm-up to {rss_after} KiB"
        );
    })
    .await;
    assert!(checked.is_ok(), "the soak took longer than {SOAK_LIMIT:?}");
    // Nothing open: SIGTERM ends wsgate at once, with status 0.
    sigterm(&wsgate).await;
    let exit = within(wsgate.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
    backend_task.abort();
}
