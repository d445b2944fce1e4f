//! Server-sent events, for the `sse-release` and `sse-load` measurements: a backend
//! that answers `GET /events/ID` with an event stream (one event at once, then one
//! every interval), a client that reads the events, and the two framings between them:
//! HTTP/1.1's chunked transfer coding and the event stream's events, each ended by a
//! blank line. Both are parsed incrementally, whatever the split of the bytes (a proxy
//! may merge or split chunks).
//!
//! The backend runs inside the load generator's process, so that a client's abort and
//! the moment the backend learns of it are read from one clock.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{MissedTickBehavior, timeout};

use crate::load::LoadResult;
use crate::stats::Summary;
use crate::ws::{self, Endpoint, ReadBuf};

/// Bytes of one event as the backend writes it (its `id:` and `data:` lines and the
/// blank line), inside its chunk.
pub const EVENT_SIZE: usize = 100;
/// Largest event the client accepts.
const MAX_EVENT: usize = 64 << 10;
/// Longest chunk-size line accepted (with extensions).
const MAX_SIZE_LINE: usize = 1024;
/// Bound on opening a stream: connect, request, response head, first event.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// sse-release: how long the backend may take to learn of an aborted stream before the
/// stream counts as an error.
pub const NOTICE_TIMEOUT: Duration = Duration::from_secs(3);

/// The backend's response head: an unbuffered-looking, chunked event stream.
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
    Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";

fn invalid(msg: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Event `seq` of stream `stream`: an `id:` line, a `data: STREAM SEQ ` line padded with
/// dots to [`EVENT_SIZE`] bytes in all, and the blank line that ends it.
pub fn event(stream: u64, seq: u64) -> Vec<u8> {
    let mut e = format!("id: {seq}\ndata: {stream} {seq} ").into_bytes();
    let len = EVENT_SIZE.max(e.len() + 2) - 2;
    e.resize(len, b'.');
    e.extend_from_slice(b"\n\n");
    e
}

/// `payload` as one chunk of the chunked transfer coding.
pub fn chunk(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    out
}

/// The stream and sequence numbers in an event's data, as [`event`] writes them.
pub fn parse_data(data: &str) -> Option<(u64, u64)> {
    let mut words = data.split(' ');
    let stream = words.next()?.parse().ok()?;
    let seq = words.next()?.parse().ok()?;
    Some((stream, seq))
}

/// Where the decoder of the chunked transfer coding is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// The last (zero-size) chunk was seen.
    Done,
}

/// An incremental decoder of HTTP/1.1's chunked transfer coding (RFC 9112 §7.1).
#[derive(Debug, Default)]
pub struct Dechunker {
    /// Input not decoded yet (a partial size line or CRLF).
    pending: Vec<u8>,
    state: ChunkState,
}

/// The value of a chunk-size (hex digits, optional whitespace before extensions).
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
    let digits = std::str::from_utf8(digits)
        .map_err(|_| invalid("chunk size is not ASCII"))?
        .trim_matches([' ', '\t']);
    if digits.is_empty() || digits.len() > 15 {
        return Err(invalid(format!("bad chunk size {digits:?}")));
    }
    u64::from_str_radix(digits, 16).map_err(|_| invalid(format!("bad chunk size {digits:?}")))
}

impl Dechunker {
    /// Decodes `input`, appending the data it completes to `out`. Returns whether the
    /// last chunk has been seen (what follows it, trailers, is not read).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
        self.pending.extend_from_slice(input);
        let mut at = 0;
        let result = loop {
            let rest = &self.pending[at..];
            match self.state {
                ChunkState::Done => break Ok(true),
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        break Ok(false);
                    }
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&rest[..n]);
                    at += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        break Ok(false);
                    }
                    if &rest[..2] != b"\r\n" {
                        break Err(invalid("chunk data not followed by CRLF"));
                    }
                    at += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Size => {
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if rest.len() > MAX_SIZE_LINE {
                            break Err(invalid("chunk size line too long"));
                        }
                        break Ok(false);
                    };
                    let size = match chunk_size(&rest[..eol]) {
                        Ok(size) => size,
                        Err(e) => break Err(e),
                    };
                    at += eol + 2;
                    self.state = if size == 0 {
                        ChunkState::Done
                    } else {
                        ChunkState::Data(size)
                    };
                }
            }
        };
        self.pending.drain(..at);
        result
    }
}

/// One event of an event stream: its last `id` and its `data` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub data: String,
}

/// An incremental parser of an event stream (the WHATWG HTML standard's
/// `text/event-stream`, lines ended by LF or CRLF): an event ends at a blank line;
/// comments (`:`) and fields other than `id` and `data` are skipped; a block without
/// data is no event.
#[derive(Debug, Default)]
pub struct EventParser {
    buf: Vec<u8>,
}

/// A line without its trailing CR.
fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The event of a block of lines (without the blank line that ended it).
fn parse_event(block: &[u8]) -> io::Result<Option<Event>> {
    let text = std::str::from_utf8(block).map_err(|_| invalid("event is not UTF-8"))?;
    let mut id = None;
    let mut data: Option<String> = None;
    for line in text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            "id" => id = Some(value.to_string()),
            _ => {}
        }
    }
    Ok(data.map(|data| Event { id, data }))
}

impl EventParser {
    /// Appends `bytes` and pushes every event they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> io::Result<()> {
        self.buf.extend_from_slice(bytes);
        let mut event_start = 0;
        let mut line_start = 0;
        while let Some(off) = self.buf[line_start..].iter().position(|&b| b == b'\n') {
            let newline = line_start + off;
            if trim_cr(&self.buf[line_start..newline]).is_empty() {
                if let Some(e) = parse_event(&self.buf[event_start..line_start])? {
                    out.push(e);
                }
                event_start = newline + 1;
            }
            line_start = newline + 1;
        }
        self.buf.drain(..event_start);
        if self.buf.len() > MAX_EVENT {
            return Err(invalid(format!("an event longer than {MAX_EVENT} bytes")));
        }
        Ok(())
    }
}

/// The response body's framing and the events decoded from it.
#[derive(Debug, Default)]
pub struct Decoder {
    /// `None`: the body is not chunked and ends with the connection.
    dechunker: Option<Dechunker>,
    parser: EventParser,
    body: Vec<u8>,
    events: VecDeque<Event>,
    /// The last chunk was seen: no more events will come.
    ended: bool,
}

impl Decoder {
    pub fn new(chunked: bool) -> Decoder {
        Decoder {
            dechunker: chunked.then(Dechunker::default),
            ..Decoder::default()
        }
    }

    /// Takes bytes of the response body as they arrived.
    pub fn take(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.body.clear();
        match &mut self.dechunker {
            Some(d) => {
                if d.feed(bytes, &mut self.body)? {
                    self.ended = true;
                }
            }
            None => self.body.extend_from_slice(bytes),
        }
        let mut events = Vec::new();
        self.parser.feed(&self.body, &mut events)?;
        self.events.extend(events);
        Ok(())
    }

    pub fn next(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// The client end of one event stream.
pub struct StreamClient {
    stream: TcpStream,
    decoder: Decoder,
    scratch: Vec<u8>,
}

impl StreamClient {
    /// Connects (from `source` if given), sends `GET path` (HTTP/1.1, keep-alive) and
    /// reads the response head, which must be a 200 event stream. With `zero_linger`,
    /// dropping the client resets the connection (RST) instead of closing it (FIN).
    pub async fn open(
        endpoint: &Endpoint,
        path: &str,
        source: Option<IpAddr>,
        zero_linger: bool,
    ) -> io::Result<StreamClient> {
        let socket = match endpoint.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source.filter(|ip| ip.is_ipv4() == endpoint.addr.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let mut stream = socket.connect(endpoint.addr).await?;
        stream.set_nodelay(true)?;
        if zero_linger {
            stream.set_zero_linger()?;
        }
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\n\r\n",
            endpoint.host
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = ReadBuf::new(4096);
        let head_len = ws::read_head(&mut stream, &mut buf).await?;
        let chunked = {
            let head = std::str::from_utf8(&buf.filled()[..head_len])
                .map_err(|_| invalid("response head is not UTF-8"))?;
            check_head(head)?
        };
        let mut decoder = Decoder::new(chunked);
        decoder.take(&buf.filled()[head_len..])?;
        Ok(StreamClient {
            stream,
            decoder,
            scratch: vec![0; 16 << 10],
        })
    }

    /// The next event, reading as needed.
    pub async fn next_event(&mut self) -> io::Result<Event> {
        loop {
            if let Some(e) = self.decoder.next() {
                return Ok(e);
            }
            if self.decoder.ended {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the event stream ended (last chunk)",
                ));
            }
            let n = self.stream.read(&mut self.scratch).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                ));
            }
            self.decoder.take(&self.scratch[..n])?;
        }
    }

    /// Reads and discards what has already arrived, without waiting: closing a socket
    /// with unread bytes sends RST, not FIN. Returns how many bytes there were.
    pub fn discard_unread(&mut self) -> io::Result<usize> {
        let mut total = 0;
        loop {
            match self.stream.try_read(&mut self.scratch) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Checks a response head for an event stream; returns whether its body is chunked.
pub fn check_head(head: &str) -> io::Result<bool> {
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        let line = head.lines().next().unwrap_or("");
        return Err(io::Error::other(format!("response {line:?}")));
    }
    match ws::header(head, "content-type") {
        Some(t) if t.to_ascii_lowercase().starts_with("text/event-stream") => {}
        other => {
            return Err(invalid(format!(
                "Content-Type {other:?}, not text/event-stream"
            )));
        }
    }
    if ws::header(head, "content-length").is_some() {
        return Err(invalid("an event stream with a Content-Length"));
    }
    Ok(ws::header(head, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked")))
}

/// How the backend learned that a stream's reader went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A read returned end of stream: a FIN arrived.
    ReadEof,
    /// A read failed (a reset, typically).
    ReadError(io::ErrorKind),
    /// Writing the next event failed (broken pipe or reset) before a read noticed.
    WriteError(io::ErrorKind),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::ReadEof => write!(f, "end of stream on read (FIN)"),
            Ended::ReadError(kind) => write!(f, "read error ({kind})"),
            Ended::WriteError(kind) => write!(f, "write error on the next event ({kind})"),
        }
    }
}

/// Where to report the end of a stream: (stream id, how it ended, when).
pub type Reporter = mpsc::UnboundedSender<(u64, Ended, Instant)>;

/// The stream id of a request head `GET /events/ID HTTP/1.1...`.
pub fn stream_id(head: &str) -> Option<u64> {
    let mut parts = head.split(' ');
    if parts.next()? != "GET" {
        return None;
    }
    let target = parts.next()?;
    target
        .strip_prefix("/events/")?
        .split(['?', '/'])
        .next()?
        .parse()
        .ok()
}

/// Accepts connections on `listener` and serves each as an event stream, for ever.
pub async fn backend(listener: TcpListener, interval: Duration, report: Option<Reporter>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, interval, report.clone()));
            }
            // Out of file descriptors, typically: wait instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Serves one connection: reads the request head, answers an event stream and writes
/// an event every `interval` until the connection ends, then reports how it ended.
pub async fn serve(mut stream: TcpStream, interval: Duration, report: Option<Reporter>) {
    let _ = stream.set_nodelay(true);
    let mut buf = ReadBuf::new(4096);
    let Ok(Ok(head_len)) = timeout(OPEN_TIMEOUT, ws::read_head(&mut stream, &mut buf)).await else {
        return;
    };
    let id = std::str::from_utf8(&buf.filled()[..head_len])
        .ok()
        .and_then(stream_id);
    let Some(id) = id else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    let (ended, at) = stream_events(&mut stream, id, interval).await;
    if let Some(tx) = report {
        let _ = tx.send((id, ended, at));
    }
}

/// Writes the response head and event 0 at once, then an event every `interval`,
/// while reading the socket; returns at the first sign that the reader went away (end
/// of stream or error on read, error on write) and when it came.
async fn stream_events(stream: &mut TcpStream, id: u64, interval: Duration) -> (Ended, Instant) {
    let mut first = RESPONSE_HEAD.to_vec();
    first.extend_from_slice(&chunk(&event(id, 0)));
    if let Err(e) = stream.write_all(&first).await {
        return (Ended::WriteError(e.kind()), Instant::now());
    }
    let (mut rd, mut wr) = stream.split();
    let reader = async move {
        let mut sink = [0u8; 1024];
        loop {
            match rd.read(&mut sink).await {
                Ok(0) => return (Ended::ReadEof, Instant::now()),
                // Nothing more is expected on this connection: discarded.
                Ok(_) => {}
                Err(e) => return (Ended::ReadError(e.kind()), Instant::now()),
            }
        }
    };
    let writer = async move {
        let mut ticks = tokio::time::interval_at((Instant::now() + interval).into(), interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq = 1u64;
        loop {
            ticks.tick().await;
            if let Err(e) = wr.write_all(&chunk(&event(id, seq))).await {
                return (Ended::WriteError(e.kind()), Instant::now());
            }
            seq += 1;
        }
    };
    tokio::select! {
        r = reader => r,
        w = writer => w,
    }
}

/// The path of stream `id` under the endpoint's path (`/events` → `/events/7`).
fn stream_path(endpoint: &Endpoint, id: usize) -> String {
    format!("{}/{id}", endpoint.path.trim_end_matches('/'))
}

/// Checks that `e` is event `seq` of stream `stream`.
fn check_event(e: &Event, stream: usize, seq: u64) -> Result<(), String> {
    match parse_data(&e.data) {
        Some((s, q)) if s == stream as u64 && q == seq => Ok(()),
        Some((s, _)) if s != stream as u64 => {
            Err(format!("stream {stream} got an event of stream {s}"))
        }
        Some((_, q)) => Err(format!(
            "stream {stream}: event {q} where {seq} was next (lost or out of order)"
        )),
        None => Err(format!("stream {stream}: unreadable event {:?}", e.data)),
    }
}

/// How a stream is aborted in `sse-release`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// close(2) with nothing unread: a FIN.
    Fin,
    /// close(2) with SO_LINGER 0: a RST.
    Rst,
}

/// One stream of `sse-release`: open, read the head and event 0, abort, and wait for
/// the backend's report of that stream. Returns how the backend learned it, the time
/// from the abort, and how many unread bytes were discarded just before closing.
async fn release_one(
    endpoint: &Endpoint,
    id: usize,
    abort: Abort,
    seen: &mut mpsc::UnboundedReceiver<(u64, Ended, Instant)>,
) -> io::Result<(Ended, Duration, usize)> {
    let opening = async {
        let path = stream_path(endpoint, id);
        let source = Some(ws::loopback_source(id));
        let mut c = StreamClient::open(endpoint, &path, source, abort == Abort::Rst).await?;
        let first = c.next_event().await?;
        check_event(&first, id, 0).map_err(invalid)?;
        Ok::<_, io::Error>(c)
    };
    let mut client = timeout(OPEN_TIMEOUT, opening)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no first event within 10 s"))??;
    let unread = client.discard_unread()?;
    let t0 = Instant::now();
    drop(client);
    let noticed = async {
        loop {
            let (got, ended, at) = seen
                .recv()
                .await
                .ok_or_else(|| io::Error::other("the backend stopped"))?;
            // Reports of earlier streams that timed out are skipped.
            if got == id as u64 {
                return Ok::<_, io::Error>((ended, at));
            }
        }
    };
    let (ended, at) = timeout(NOTICE_TIMEOUT, noticed).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the backend was not told within {NOTICE_TIMEOUT:?}"),
        )
    })??;
    if at < t0 {
        return Err(io::Error::other(format!(
            "the backend's stream ended before the client aborted ({ended})"
        )));
    }
    Ok((ended, at - t0, unread))
}

/// `sse-release`: `count` streams aborted with a FIN and `count` with a RST, one at a
/// time, alternating, through the endpoint to a backend in this process; the time from
/// the abort to the backend's read (or write) failing.
pub async fn release(
    endpoint: &Endpoint,
    listen: SocketAddr,
    count: usize,
    interval: Duration,
) -> LoadResult {
    let mut result = LoadResult {
        connections: 1,
        size: EVENT_SIZE,
        ..LoadResult::default()
    };
    let listener = match crate::echo::listen(listen) {
        Ok(l) => l,
        Err(e) => {
            result.error(format!("cannot listen on {listen}: {e}"));
            return result;
        }
    };
    let (tx, mut seen) = mpsc::unbounded_channel();
    let server = tokio::spawn(backend(listener, interval, Some(tx)));
    let mut fin_ns = Vec::new();
    let mut rst_ns = Vec::new();
    for id in 0..2 * count {
        let abort = if id % 2 == 0 { Abort::Fin } else { Abort::Rst };
        match release_one(endpoint, id, abort, &mut seen).await {
            Ok((ended, dt, unread)) => {
                let (samples, counts) = match abort {
                    Abort::Fin => (&mut fin_ns, &mut result.fin_seen),
                    Abort::Rst => (&mut rst_ns, &mut result.rst_seen),
                };
                samples.push(dt.as_nanos() as u64);
                *counts.entry(ended.to_string()).or_default() += 1;
                if unread > 0 {
                    result.unread_at_abort += 1;
                }
                result.messages += 1;
            }
            Err(e) => result.error(format!("stream {id} ({abort:?}): {e}")),
        }
    }
    server.abort();
    result.fin_us = Summary::from_nanos(&mut fin_ns);
    result.rst_us = Summary::from_nanos(&mut rst_ns);
    result
}

/// The shape of `sse-load`.
#[derive(Clone, Copy, Debug)]
pub struct LoadShape {
    pub streams: usize,
    pub interval: Duration,
    pub warmup: Duration,
    pub duration: Duration,
    /// Streams being opened at once.
    pub open_concurrency: usize,
}

/// What one stream of `sse-load` received.
#[derive(Debug, Default)]
struct StreamStats {
    /// Events that arrived inside the measured window.
    in_window: u64,
    received: u64,
    errors: u64,
    first_error: Option<String>,
}

impl StreamStats {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// One stream of `sse-load`: opens (reporting on `opened`), then reads and checks
/// events until `stop`.
async fn read_stream(
    endpoint: Endpoint,
    id: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    opened: mpsc::Sender<Result<(), String>>,
    window: Arc<OnceLock<(Instant, Instant)>>,
    mut stop: watch::Receiver<bool>,
    interval: Duration,
) -> StreamStats {
    let mut stats = StreamStats::default();
    let opening = async {
        let path = stream_path(&endpoint, id);
        let mut c =
            StreamClient::open(&endpoint, &path, Some(ws::loopback_source(id)), false).await?;
        let first = c.next_event().await?;
        Ok::<_, io::Error>((c, first))
    };
    let outcome = timeout(OPEN_TIMEOUT, opening).await;
    drop(permit);
    let (mut client, first) = match outcome {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let _ = opened.send(Err(format!("stream {id}: open: {e}"))).await;
            return stats;
        }
        Err(_) => {
            let _ = opened
                .send(Err(format!("stream {id}: open: timed out")))
                .await;
            return stats;
        }
    };
    let _ = opened.send(Ok(())).await;
    drop(opened);
    let mut next = 0u64;
    let mut last_event = Instant::now();
    let mut take = |e: &Event, stats: &mut StreamStats| {
        let now = Instant::now();
        last_event = now;
        stats.received += 1;
        if let Some(&(start, end)) = window.get()
            && now >= start
            && now <= end
        {
            stats.in_window += 1;
        }
        if let Err(msg) = check_event(e, id, next) {
            stats.error(msg);
        }
        // Resynchronise on what arrived, so that one gap is one error.
        next = parse_data(&e.data).map_or(next + 1, |(_, seq)| seq + 1);
    };
    take(&first, &mut stats);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            r = client.next_event() => match r {
                Ok(e) => take(&e, &mut stats),
                Err(e) => {
                    stats.error(format!("stream {id}: {e}"));
                    return stats;
                }
            },
        }
    }
    // A stream that stopped delivering while still open is an error too.
    let stall = (interval * 10).max(Duration::from_secs(1));
    if let Some(&(_, end)) = window.get() {
        let quiet = end.saturating_duration_since(last_event);
        if quiet > stall {
            stats.error(format!(
                "stream {id}: no event in the last {:.1} s of the window",
                quiet.as_secs_f64()
            ));
        }
    }
    stats
}

/// `sse-load`: opens `streams` event streams through the endpoint to a backend in this
/// process that sends an event on each every `interval`, then counts the events that
/// arrive in a window bracketed by `START` and `END`, checking that every stream gets
/// its own events in order.
pub async fn load(endpoint: &Endpoint, listen: SocketAddr, shape: LoadShape) -> LoadResult {
    let n = shape.streams;
    let mut result = LoadResult {
        connections: n,
        size: EVENT_SIZE,
        ..LoadResult::default()
    };
    let listener = match crate::echo::listen(listen) {
        Ok(l) => l,
        Err(e) => {
            result.error(format!("cannot listen on {listen}: {e}"));
            return result;
        }
    };
    let server = tokio::spawn(backend(listener, shape.interval, None));
    let window: Arc<OnceLock<(Instant, Instant)>> = Arc::new(OnceLock::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (opened_tx, mut opened_rx) = mpsc::channel(n.max(1));
    let gate = Arc::new(Semaphore::new(shape.open_concurrency.max(1)));
    let began = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for id in 0..n {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        tasks.push(tokio::spawn(read_stream(
            endpoint.clone(),
            id,
            permit,
            opened_tx.clone(),
            window.clone(),
            stop_rx.clone(),
            shape.interval,
        )));
    }
    drop(opened_tx);
    // Every task reports once and keeps no sender afterwards.
    while let Some(r) = opened_rx.recv().await {
        match r {
            Ok(()) => result.opened += 1,
            Err(e) => result.error(e),
        }
    }
    result.open_s = began.elapsed().as_secs_f64();
    let start = Instant::now() + shape.warmup;
    let end = start + shape.duration;
    let _ = window.set((start, end));
    tokio::time::sleep_until(start.into()).await;
    println!("START");
    tokio::time::sleep_until(end.into()).await;
    println!("END");
    let _ = stop_tx.send(true);
    let collect = async {
        let mut all = Vec::with_capacity(tasks.len());
        for t in tasks {
            all.push(t.await);
        }
        all
    };
    let mut per_stream = Vec::new();
    match timeout(Duration::from_secs(30), collect).await {
        Ok(all) => {
            for s in all {
                match s {
                    Ok(s) => {
                        if s.received > 0 {
                            per_stream.push(s.in_window);
                        }
                        result.messages += s.in_window;
                        result.received += s.received;
                        result.errors += s.errors;
                        if result.first_error.is_none() {
                            result.first_error = s.first_error;
                        }
                    }
                    Err(e) => result.error(format!("a stream's task failed: {e}")),
                }
            }
        }
        Err(_) => result.error("the streams did not stop within 30 s"),
    }
    server.abort();
    result.window_s = shape.duration.as_secs_f64();
    result.stream_min = per_stream.iter().copied().min();
    result.stream_max = per_stream.iter().copied().max();
    result
}

/// What `sse-release` found, by kind of abort, for the report: "3 × end of stream on
/// read (FIN)".
pub fn describe_seen(seen: &BTreeMap<String, u64>) -> String {
    if seen.is_empty() {
        return "nothing".to_string();
    }
    seen.iter()
        .map(|(what, n)| format!("{n} × {what}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_100_bytes_and_carry_stream_and_sequence() {
        for (stream, seq) in [(0, 0), (999, 12_345), (7, u64::from(u32::MAX))] {
            let e = event(stream, seq);
            assert_eq!(e.len(), EVENT_SIZE);
            assert!(e.ends_with(b"\n\n"));
            let mut parser = EventParser::default();
            let mut out = Vec::new();
            parser.feed(&e, &mut out).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].id.as_deref(), Some(seq.to_string().as_str()));
            assert_eq!(parse_data(&out[0].data), Some((stream, seq)));
        }
        // Numbers too long to pad: the event grows, and still parses.
        assert!(event(u64::MAX, u64::MAX).len() >= EVENT_SIZE);
    }

    /// Decodes `wire` fed in pieces of `step` bytes.
    fn decode(wire: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut d = Dechunker::default();
        let mut out = Vec::new();
        let mut done = false;
        for piece in wire.chunks(step) {
            done = d.feed(piece, &mut out).unwrap();
        }
        (out, done)
    }

    #[test]
    fn chunked_bodies_decode_at_any_split() {
        let mut wire = Vec::new();
        let mut body = Vec::new();
        for (i, len) in [1usize, 15, 16, 255, 256, 4097].into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            wire.extend_from_slice(&chunk(&data));
            body.extend_from_slice(&data);
        }
        // Upper-case hex, an extension and whitespace before it are allowed.
        wire.extend_from_slice(b"A ;name=value\r\n0123456789\r\n");
        body.extend_from_slice(b"0123456789");
        let open = wire.clone();
        wire.extend_from_slice(b"0\r\nTrailer: x\r\n\r\n");
        for step in [1, 2, 3, 7, 100, wire.len()] {
            assert_eq!(decode(&wire, step), (body.clone(), true), "step {step}");
            assert_eq!(decode(&open, step), (body.clone(), false), "step {step}");
        }
    }

    #[test]
    fn broken_chunk_framing_is_an_error() {
        for wire in [
            &b"zz\r\nab\r\n"[..],
            b"2\r\nabX\r\n",
            b"\r\n",
            b"10000000000000000\r\n",
        ] {
            let mut out = Vec::new();
            assert!(
                Dechunker::default().feed(wire, &mut out).is_err(),
                "{wire:?}"
            );
        }
        let mut out = Vec::new();
        let long = vec![b'1'; MAX_SIZE_LINE + 1];
        assert!(Dechunker::default().feed(&long, &mut out).is_err());
    }

    #[test]
    fn event_streams_parse_at_any_split_with_lf_or_crlf() {
        let text = ": a comment\n\nid: 1\ndata: one\n\ndata: two\r\ndata:three\r\n\r\n\
                    event: x\nretry: 5\n\nid: 9\ndata\n\n";
        let expected = vec![
            Event {
                id: Some("1".into()),
                data: "one".into(),
            },
            Event {
                id: None,
                data: "two\nthree".into(),
            },
            Event {
                id: Some("9".into()),
                data: String::new(),
            },
        ];
        for step in [1, 2, 5, text.len()] {
            let mut parser = EventParser::default();
            let mut out = Vec::new();
            for piece in text.as_bytes().chunks(step) {
                parser.feed(piece, &mut out).unwrap();
            }
            assert_eq!(out, expected, "step {step}");
        }
        let mut parser = EventParser::default();
        let mut out = Vec::new();
        assert!(parser.feed(&vec![b'x'; MAX_EVENT + 1], &mut out).is_err());
    }

    #[test]
    fn the_decoder_turns_a_chunked_stream_of_events_back_into_events() {
        // What a proxy may send: the backend's events in chunks of another size.
        let events: Vec<u8> = (0..20).flat_map(|seq| event(3, seq)).collect();
        let mut wire = Vec::new();
        for piece in events.chunks(37) {
            wire.extend_from_slice(&chunk(piece));
        }
        for step in [1, 64, 1000, wire.len()] {
            let mut d = Decoder::new(true);
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                d.take(piece).unwrap();
                while let Some(e) = d.next() {
                    got.push(parse_data(&e.data).unwrap());
                }
            }
            let want: Vec<(u64, u64)> = (0..20).map(|seq| (3, seq)).collect();
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn response_heads_and_request_lines() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
                  transfer-encoding: chunked\r\n\r\n";
        assert!(check_head(ok).unwrap());
        let close_delimited = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n";
        assert!(!check_head(close_delimited).unwrap());
        assert!(check_head("HTTP/1.1 502 Bad Gateway\r\n\r\n").is_err());
        assert!(check_head("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n").is_err());
        let sized =
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 5\r\n\r\n";
        assert!(check_head(sized).is_err());

        assert_eq!(stream_id("GET /events/42 HTTP/1.1\r\n"), Some(42));
        assert_eq!(stream_id("GET /events/42?x=1 HTTP/1.1\r\n"), Some(42));
        assert_eq!(stream_id("GET /events/ HTTP/1.1\r\n"), None);
        assert_eq!(stream_id("POST /events/1 HTTP/1.1\r\n"), None);
        assert_eq!(stream_id("GET /other/1 HTTP/1.1\r\n"), None);
    }

    #[test]
    fn events_are_checked_for_stream_and_order() {
        let e = |stream, seq| Event {
            id: None,
            data: format!("{stream} {seq} ..."),
        };
        assert_eq!(check_event(&e(4, 7), 4, 7), Ok(()));
        assert!(
            check_event(&e(5, 7), 4, 7)
                .unwrap_err()
                .contains("of stream 5")
        );
        assert!(
            check_event(&e(4, 9), 4, 7)
                .unwrap_err()
                .contains("lost or out of order")
        );
        let junk = Event {
            id: None,
            data: "junk".into(),
        };
        assert!(check_event(&junk, 4, 7).is_err());
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The backend and the client against each other on loopback: events in order,
    /// then a FIN and a RST from the client, as the backend sees them.
    #[test]
    fn backend_and_client_agree_and_the_backend_learns_of_aborts() {
        runtime().block_on(async {
            let listener = crate::echo::listen("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, mut seen) = mpsc::unbounded_channel();
            tokio::spawn(backend(listener, Duration::from_millis(5), Some(tx)));
            let endpoint = Endpoint::parse_http(&format!("http://{addr}/events")).unwrap();

            let mut c = StreamClient::open(&endpoint, "/events/5", None, false)
                .await
                .unwrap();
            for seq in 0..5 {
                let e = c.next_event().await.unwrap();
                assert_eq!(check_event(&e, 5, seq), Ok(()));
                assert_eq!(e.id, Some(seq.to_string()));
            }
            drop(c);
            let (id, ended, _) = seen.recv().await.unwrap();
            assert_eq!(id, 5);
            assert!(
                matches!(ended, Ended::ReadEof | Ended::WriteError(_)),
                "{ended}"
            );

            // Aborts, from a backend whose second event would come only after 10 s, so
            // that no write races the read that notices.
            let listener = crate::echo::listen("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, mut seen) = mpsc::unbounded_channel();
            tokio::spawn(backend(listener, Duration::from_secs(10), Some(tx)));
            let endpoint = Endpoint::parse_http(&format!("http://{addr}/events")).unwrap();
            let (ended, dt, _) = release_one(&endpoint, 6, Abort::Fin, &mut seen)
                .await
                .unwrap();
            assert_eq!(ended, Ended::ReadEof);
            assert!(dt < NOTICE_TIMEOUT);
            let (ended, _, _) = release_one(&endpoint, 7, Abort::Rst, &mut seen)
                .await
                .unwrap();
            assert_eq!(ended, Ended::ReadError(io::ErrorKind::ConnectionReset));
        });
    }

    #[test]
    fn a_load_counts_every_streams_events_in_the_window() {
        runtime().block_on(async {
            let listen = crate::targets::free_port();
            let endpoint = Endpoint::parse_http(&format!("http://{listen}/events")).unwrap();
            let shape = LoadShape {
                streams: 20,
                interval: Duration::from_millis(20),
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(400),
                open_concurrency: 5,
            };
            let r = load(&endpoint, listen, shape).await;
            assert_eq!(r.errors, 0, "{:?}", r.first_error);
            assert_eq!(r.opened, 20);
            // 20 events per stream in the window, give or take the timers.
            let (min, max) = (r.stream_min.unwrap(), r.stream_max.unwrap());
            assert!(min >= 5 && max <= 22, "{min}..{max}");
            assert!(r.messages >= 20 * 5 && r.received >= r.messages, "{r:?}");
        });
    }
}
