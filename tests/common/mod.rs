//! Test harness: wsgate in-process on port 0, scripted raw WebSocket peers on both sides,
//! and an independent frame decoder. Every await is bounded by [`within`].
// Each test file uses a different part of the harness; a failed unwrap here is a failed
// test, and configs read best as defaults plus the fields a test changes.
#![allow(dead_code, clippy::unwrap_used, clippy::field_reassign_with_default)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use wsgate::Listeners;
use wsgate::config::{BackendUrl, Config, Workers};

pub mod http;
// Not every test file speaks HTTP.
#[allow(unused_imports)]
pub use http::*;

/// Upper bound on any single wait in a test: generous, because it only turns a hang into
/// a failure; it never decides an outcome.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`LIMIT`].
pub async fn within<F: Future>(f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {LIMIT:?}"),
    }
}

/// Polls `check` until it returns true, failing after [`LIMIT`]. For state that changes
/// asynchronously (a readiness flag), never for ordering the test's own steps.
pub async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    within(async {
        loop {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Test configuration: loopback, port 0, admin on, wsgate's liveness pings off so raw
/// peers see only what the test provokes, drain Closes not spread out. Two workers whatever the machine's CPUs, so
/// every test also crosses the multi-worker paths (a connection may land on either).
pub fn test_config(backend: SocketAddr) -> Config {
    let mut c = Config::default();
    c.workers = Workers::Count(2);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    c.backend = BackendUrl::parse(&format!("http://{backend}")).unwrap();
    c.websocket.ping_interval = None;
    c.websocket.close_timeout = Duration::from_millis(500);
    c.shutdown.drain_timeout = Duration::from_secs(5);
    // Every WebSocket gets its drain Close at once (the spread has tests of its own).
    c.shutdown.spread = Duration::ZERO;
    c
}

/// The `wsgate` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// Where the tests keep their files: under cargo's target directory, which
/// `cargo clean` empties, not the machine's temporary directory, which nothing would.
pub fn test_dir(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Writes `text` to a new file (unique within this test process, whose tests run in
/// parallel) and returns its path.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = test_dir(&format!("wsgate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).unwrap();
    path
}

/// The configuration file `spawn_wsgate` writes: both listeners on port 0, JSON logs,
/// and `extra` (top-level keys first, then any sections).
pub fn wsgate_config(backend: SocketAddr, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nbackend = \"http://{backend}\"\n{extra}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n"
    )
}

/// Starts the real binary in front of `backend` with [`wsgate_config`]; returns it
/// (killed on drop), its proxy and admin addresses (read from its "wsgate started"
/// line), and the rest of its log.
pub async fn spawn_wsgate(
    backend: SocketAddr,
    extra: &str,
) -> (Child, SocketAddr, SocketAddr, BufReader<ChildStderr>) {
    let path = temp_file("run.toml", &wsgate_config(backend, extra));
    spawn_wsgate_with(&path).await
}

/// Starts the real binary with the configuration file at `path` (which must keep both
/// listeners on port 0 and JSON logs, as [`wsgate_config`] does).
pub async fn spawn_wsgate_with(
    path: &std::path::Path,
) -> (Child, SocketAddr, SocketAddr, BufReader<ChildStderr>) {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(path)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = within(stderr.read_line(&mut line)).await.unwrap();
        assert!(n > 0, "wsgate exited before starting");
        if line.contains("wsgate started") {
            break;
        }
    }
    let field = |name: &str| -> SocketAddr {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v[name].as_str().unwrap().parse().unwrap()
    };
    let (listen, admin) = (field("listen"), field("admin"));
    (child, listen, admin, stderr)
}

/// Reads JSON log lines until one satisfies `wanted`, and returns it; fails if the log
/// ends first (or after [`LIMIT`]).
pub async fn log_line(
    log: &mut BufReader<ChildStderr>,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut line = String::new();
    loop {
        line.clear();
        let n = within(log.read_line(&mut line)).await.unwrap();
        assert!(n > 0, "the log ended without the line looked for");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && wanted(&v)
        {
            return v;
        }
    }
}

/// Sends `signal` (`TERM`, `HUP`...) to a child process (kill(1): the crate forbids
/// unsafe code).
pub async fn signal(child: &Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    let sent = within(
        Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status(),
    )
    .await
    .unwrap();
    assert!(sent.success());
}

/// Sends SIGTERM to a child process.
pub async fn sigterm(child: &Child) {
    signal(child, "TERM").await;
}

/// wsgate running in-process. Dropping it stops it.
pub struct Gate {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub async fn start_gate(config: Config) -> Gate {
    let listeners = Listeners::bind(&config).unwrap();
    let addr = listeners.local_addr().unwrap();
    let admin = listeners.admin.as_ref().unwrap().local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        wsgate::serve(config, listeners, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Gate {
        addr,
        admin,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Gate {
    /// Starts the graceful shutdown and waits for it to finish.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        within(self.task.take().unwrap()).await.unwrap();
    }

    /// Begins the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A listener for scripted backends.
pub async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// An address where nothing listens, for as long as the value lives: a socket bound
/// there that never listens, so that connecting is refused. A listener bound and closed
/// would leave the port free for the next `bind` to port 0 — another test's backend,
/// running at the same time, which would then receive this test's requests.
pub struct DeadAddr {
    pub addr: SocketAddr,
    _held: tokio::net::TcpSocket,
}

pub fn dead_addr() -> DeadAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    DeadAddr {
        addr: socket.local_addr().unwrap(),
        _held: socket,
    }
}

/// Reads an HTTP head (up to the blank line); returns it and the bytes read after it.
pub async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
        let n = within(stream.read(&mut chunk)).await.unwrap();
        assert!(
            n > 0,
            "connection closed inside an HTTP head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Answers one plain HTTP request on `backend` with 200 "ok" and closes; returns the
/// request head.
pub async fn answer_http_once(backend: &TcpListener) -> String {
    let (mut s, _) = within(backend.accept()).await.unwrap();
    let (head, _) = read_head(&mut s).await;
    within(s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"))
        .await
        .unwrap();
    head
}

/// A backend that refuses an upload: it takes the connection on `l`, checks the request
/// is a `POST` of `path`, lets the first 64 KiB of its body arrive (the upload is under
/// way), answers 413 `too large` with `Connection: close`, and closes with the rest of
/// the body unread, so that the kernel answers what follows with a reset.
pub async fn backend_refusing_upload(l: &TcpListener, path: &str) {
    const READ_FIRST: usize = 64 * 1024;
    let (mut s, _) = within(l.accept()).await.unwrap();
    let (head, mut got) = read_head(&mut s).await;
    assert!(
        head.starts_with(&format!("POST {path} HTTP/1.1\r\n")),
        "{head}"
    );
    let mut buf = vec![0u8; READ_FIRST];
    while got.len() < READ_FIRST {
        let n = within(s.read(&mut buf)).await.unwrap();
        assert!(n > 0, "wsgate closed the upload");
        got.extend_from_slice(&buf[..n]);
    }
    within(s.write_all(
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large",
    ))
    .await
    .unwrap();
    drop(s);
}

/// The value of header `name` in an HTTP head (case-insensitive).
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The status code of an HTTP response head.
pub fn status(head: &str) -> u16 {
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A raw WebSocket client request with `extra` header lines (each ending in \r\n).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: wsgate.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
    )
}

/// Accepts one connection on `l`, reads its upgrade request and answers 101 with
/// `extra` header lines. Returns the backend's end and the request head it saw.
pub async fn accept_ws(l: &TcpListener, extra: &str) -> (Peer, String) {
    let (mut s, _) = within(l.accept()).await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    let key = header(&head, "sec-websocket-key").unwrap();
    let accept = derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    );
    within(s.write_all(resp.as_bytes())).await.unwrap();
    (Peer::new(s, Role::Backend, rest), head)
}

/// Opens a raw WebSocket through `gate_addr`; panics unless the answer is 101.
pub async fn connect_ws(gate_addr: SocketAddr, path: &str, extra: &str) -> (Peer, String) {
    let mut s = within(TcpStream::connect(gate_addr)).await.unwrap();
    within(s.write_all(upgrade_request(path, extra).as_bytes()))
        .await
        .unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert_eq!(status(&head), 101, "{head}");
    (Peer::new(s, Role::Client, rest), head)
}

/// A connected client and backend through wsgate.
pub async fn pair(gate: &Gate, backend: &TcpListener) -> (Peer, Peer) {
    let connecting = connect_ws(gate.addr, "/ws", "");
    let accepting = accept_ws(backend, "");
    let ((client, _), (server, _)) = tokio::join!(connecting, accepting);
    (client, server)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends masked frames.
    Client,
    /// Sends unmasked frames.
    Backend,
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, 8, "not a Close frame: {self:?}");
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;

/// Encodes a frame; masked with a fixed key when `masked`.
pub fn encode(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xFFFF => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// How a read from a peer's socket ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Orderly FIN.
    Eof,
    /// Connection reset (RST).
    Reset,
}

/// One end of a WebSocket with raw frame I/O.
pub struct Peer {
    pub stream: TcpStream,
    role: Role,
    buf: Vec<u8>,
}

impl Peer {
    pub fn new(stream: TcpStream, role: Role, buffered: Vec<u8>) -> Self {
        Peer {
            stream,
            role,
            buf: buffered,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        within(self.stream.write_all(bytes)).await.unwrap();
    }

    pub async fn send(&mut self, opcode: u8, payload: &[u8]) {
        let f = encode(true, 0, opcode, payload, self.role == Role::Client);
        self.send_raw(&f).await;
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) {
        self.send(CLOSE, &close_payload(code, reason)).await;
    }

    /// Reads the next frame; `None` if the connection ended first.
    pub async fn try_recv(&mut self) -> Result<Frame, End> {
        loop {
            if let Some((frame, used)) = decode(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match within(self.stream.read(&mut chunk)).await {
                Ok(0) => return Err(End::Eof),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(End::Reset);
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    pub async fn recv(&mut self) -> Frame {
        match self.try_recv().await {
            Ok(f) => f,
            Err(end) => panic!("connection ended ({end:?}) while a frame was expected"),
        }
    }

    /// Reads frames until a Close arrives; returns it. Other frames are skipped.
    pub async fn recv_close(&mut self) -> Frame {
        loop {
            let f = self.recv().await;
            if f.opcode == CLOSE {
                return f;
            }
        }
    }

    /// Expects the connection to end (FIN or RST) with no further frame but those
    /// `allowed` lets through; returns how it ended.
    pub async fn expect_end(&mut self) -> End {
        match self.try_recv().await {
            Ok(f) => panic!("expected the connection to end, got {f:?}"),
            Err(end) => end,
        }
    }

    /// Reads and discards everything until the connection ends.
    pub async fn drain_to_end(&mut self) -> End {
        loop {
            self.buf.clear();
            let mut chunk = vec![0u8; 256 * 1024];
            match within(self.stream.read(&mut chunk)).await {
                Ok(0) => return End::Eof,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return End::Reset,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Sends FIN.
    pub async fn shutdown_write(&mut self) {
        within(self.stream.shutdown()).await.unwrap();
    }

    /// Resets the connection (RST) by closing with a zero linger.
    pub fn reset(self) {
        self.stream.set_zero_linger().unwrap();
        drop(self.stream);
    }
}

/// Decodes one frame from the start of `buf`: (frame, bytes used), or `None` if
/// incomplete. Independent of wsgate's own decoder on purpose.
pub fn decode(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key = if masked {
        let k: [u8; 4] = buf.get(at..at + 4)?.try_into().unwrap();
        at += 4;
        Some(k)
    } else {
        None
    };
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(k) = key {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= k[i % 4]);
    }
    Some((
        Frame {
            fin: buf[0] & 0x80 != 0,
            rsv: (buf[0] >> 4) & 7,
            opcode: buf[0] & 0x0F,
            masked,
            payload,
        },
        at + len,
    ))
}

/// Sends an HTTP/1.1 request on a fresh connection and reads the whole response
/// (the request must ask for `Connection: close`). Returns (head, body).
pub async fn http_raw(addr: SocketAddr, request: &str) -> (String, Vec<u8>) {
    let mut s = within(TcpStream::connect(addr)).await.unwrap();
    within(s.write_all(request.as_bytes())).await.unwrap();
    let (head, mut body) = read_head(&mut s).await;
    within(s.read_to_end(&mut body)).await.unwrap();
    (head, body)
}

/// Sends one HTTP/1.1 request with hyper's client; returns (status, body).
pub async fn http_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let stream = within(TcpStream::connect(addr)).await.unwrap();
    let (mut sender, conn) = within(
        hyper::client::conn::http1::handshake::<_, Full<bytes::Bytes>>(
            hyper_util::rt::TokioIo::new(stream),
        ),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = within(sender.send_request(req)).await.unwrap();
    let status = resp.status().as_u16();
    let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
    driver.abort();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "").await
}

/// The value of the sample `series` (name with labels, exactly as rendered) in a
/// Prometheus text exposition; panics if absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} not in the scrape:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// wsgate in front of a fresh scripted backend listener, with `tweak` applied to the
/// test configuration first.
pub async fn gate_with(tweak: impl FnOnce(&mut Config)) -> (Gate, TcpListener) {
    let (backend_l, backend_addr) = listener().await;
    let mut config = test_config(backend_addr);
    tweak(&mut config);
    (start_gate(config).await, backend_l)
}
