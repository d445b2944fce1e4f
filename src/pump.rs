//! One direction of the relay: reads bytes from one side and writes them, unchanged, to
//! the other, while the [`Scanner`] keeps track of frame boundaries.
//!
//! The pump is a poll-driven state machine, polled by [`crate::relay`] for both
//! directions from one task. It stops and reports to the relay only when something needs
//! a decision: a whole control frame (forward or consume?), the end of the source stream,
//! an error, or one of wsgate's own frames written. Between those it moves data with no
//! per-frame allocation: whole reads are forwarded with one write when they hold only
//! data frames.
//!
//! Backpressure: the pump reads from its source only when everything read before has been
//! written, so a slow destination slows the source's sender through TCP flow control, and
//! memory per direction is bounded by one read buffer ([`READ_SIZE`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncWrite;

use crate::frame::{ControlPayload, FrameError, Header, Opcode, Scanner, Step};
use crate::record::Counters;
use crate::session::Verdict;
use crate::splice::{self, Pipe};
use crate::stream::Transport;

/// Bytes read from a socket at once at first. The buffer exists only while bytes are in
/// flight: an idle connection holds none.
pub const READ_SIZE: usize = 16 * 1024;

/// The largest read a busy direction grows to: a read that fills its buffer doubles the
/// next one, so bulk transfers move in few large system calls while chatty connections
/// keep small buffers. Memory per direction stays bounded by this.
pub const MAX_READ_SIZE: usize = 256 * 1024;

/// The read size after a splice: enough for the next frame's header and some small
/// frames; the copy of a large frame's first bytes is what a splice cannot save.
const READ_AFTER_SPLICE: usize = 4 * 1024;

/// Reads per poll before the pump yields, so one busy direction cannot starve the other
/// direction or the timers of its connection.
const READS_PER_POLL: usize = 16;

/// A frame wsgate wrote itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    Close,
    Ping,
}

/// What the pump stopped for.
#[derive(Debug)]
pub enum PumpEvent {
    /// A whole control frame from the source is held; the relay must call
    /// [`Pump::release_held`] before polling again.
    Control {
        header: Header,
        payload: ControlPayload,
    },
    /// A frame queued with [`Pump::inject`] was written entirely.
    Injected(Injected),
    /// After [`Pump::request_shutdown`]: everything queued was written and the
    /// destination's write side is shut.
    WriteShut,
    /// The source sent FIN. `mid_frame`: part of a frame was already passed on.
    Eof { mid_frame: bool },
    /// Reading from the source failed (typically a reset).
    ReadFailed { mid_frame: bool, error: io::Error },
    /// Writing to the destination failed: it is gone.
    WriteFailed(io::Error),
    /// The source sent invalid framing; everything it sends from now on is dropped.
    ProtocolError(FrameError),
}

#[derive(Debug)]
struct Injection {
    kind: Injected,
    bytes: Vec<u8>,
    written: usize,
}

/// One direction: from a source side to a destination side.
#[derive(Debug)]
pub struct Pump {
    scanner: Scanner,
    /// How much the next read asks for (grows from [`READ_SIZE`] to [`MAX_READ_SIZE`]).
    read_size: usize,
    /// Bytes read and not yet written or dropped. `buf[..ready]` is scanned and goes to
    /// the destination next; the rest is an incomplete header or control frame.
    buf: BytesMut,
    ready: usize,
    /// Length of the control frame at the start of `buf` awaiting the relay's verdict.
    held: usize,
    /// That frame is a Close: forwarding it ends the forwarding this way.
    held_close: bool,
    /// While a large payload moves by [`splice`]: the pipe. What it holds goes to the
    /// destination before anything else; `buf` is empty while it is in use.
    pipe: Option<Pipe>,
    /// Frames wsgate queued toward the destination, written at the next frame boundary.
    injections: Vec<Injection>,
    /// Nothing more is forwarded toward the destination (a Close went that way, or it is
    /// being shut down): scanned bytes are dropped.
    dropping: bool,
    /// The source's framing is invalid: its bytes are dropped without being scanned.
    broken: bool,
    /// The source sent FIN or failed.
    read_done: bool,
    /// Writing to the destination failed.
    write_failed: bool,
    /// Bytes were written that the destination may still buffer (TLS).
    unflushed: bool,
    shutdown: Shutdown,
    /// The last write attempt returned `Pending` with bytes waiting.
    write_blocked: bool,
    /// Bytes arrived since the relay last asked ([`Pump::take_activity`]).
    rx_any: bool,
    /// Data-frame bytes arrived since the relay last asked.
    rx_data: bool,
    counters: Counters,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shutdown {
    None,
    Requested,
    Done,
}

impl Pump {
    /// `initial` holds bytes already read from the source during the HTTP upgrade.
    pub fn new(scanner: Scanner, initial: &[u8]) -> Self {
        Pump {
            scanner,
            buf: BytesMut::from(initial),
            read_size: READ_SIZE,
            ready: 0,
            held: 0,
            held_close: false,
            pipe: None,
            injections: Vec::new(),
            dropping: false,
            broken: false,
            read_done: false,
            write_failed: false,
            unflushed: false,
            shutdown: Shutdown::None,
            write_blocked: false,
            rx_any: !initial.is_empty(),
            rx_data: false,
            counters: Counters {
                frames: 0,
                bytes: initial.len() as u64,
            },
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Part of a frame was passed on, so nothing can be inserted before the rest of it.
    pub fn mid_frame(&self) -> bool {
        !self.scanner.at_boundary()
    }

    pub fn write_blocked(&self) -> bool {
        self.write_blocked
    }

    /// Returns (any bytes, data-frame bytes) seen since the last call.
    pub fn take_activity(&mut self) -> (bool, bool) {
        let seen = (self.rx_any, self.rx_data);
        self.rx_any = false;
        self.rx_data = false;
        seen
    }

    /// Queues one of wsgate's frames toward the destination. After a Close nothing else
    /// is forwarded that way.
    pub fn inject(&mut self, kind: Injected, bytes: Vec<u8>) {
        self.injections.push(Injection {
            kind,
            bytes,
            written: 0,
        });
    }

    /// Sends FIN to the destination once everything queued is written.
    pub fn request_shutdown(&mut self) {
        self.dropping = true;
        if self.shutdown == Shutdown::None {
            self.shutdown = Shutdown::Requested;
        }
    }

    /// Forwards or drops the held control frame, as the relay decided. Forwarding a
    /// Close ends the forwarding in this direction.
    pub fn release_held(&mut self, verdict: Verdict) {
        let forward = verdict == Verdict::Forward;
        if forward && !self.dropping {
            self.ready = self.held;
        } else {
            self.buf.advance(self.held);
        }
        self.held = 0;
        if forward && self.held_close {
            self.dropping = true;
        }
    }

    /// Moves bytes until something needs the relay's attention.
    pub fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut src: Option<&mut R>,
        mut dst: Option<&mut W>,
    ) -> Poll<PumpEvent>
    where
        R: Transport,
        W: Transport,
    {
        debug_assert_eq!(self.held, 0, "a held control frame awaits its verdict");
        if self.write_failed {
            dst = None;
        }
        if self.read_done {
            src = None;
        }
        let mut reads = 0;
        loop {
            // 0. Write what a splice left in the pipe: it came before anything in `buf`.
            if let Some(pipe) = &mut self.pipe {
                let to = dst.as_deref().and_then(Transport::plain_tcp);
                if pipe.held() > 0
                    && let Some(to) = to
                {
                    match pipe.poll_drain(cx, to) {
                        Poll::Ready(Ok(_)) => {
                            self.write_blocked = false;
                            continue;
                        }
                        Poll::Ready(Err(e)) => {
                            self.write_failed = true;
                            return Poll::Ready(PumpEvent::WriteFailed(e));
                        }
                        Poll::Pending => {
                            self.write_blocked = true;
                            return Poll::Pending;
                        }
                    }
                }
                // Kept for the rest of this payload; back to the pool once the payload is
                // done or its destination is gone (its bytes go with it).
                if (to.is_none() || self.scanner.payload_remaining() < splice::MIN_PAYLOAD)
                    && let Some(pipe) = self.pipe.take()
                {
                    pipe.give();
                }
            }

            // 1. Write what was scanned.
            if self.ready > 0 {
                let Some(dst) = dst.as_deref_mut() else {
                    self.buf.advance(self.ready);
                    self.ready = 0;
                    continue;
                };
                let n = match self.poll_write(cx, dst, WriteWhat::Ready) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(PumpEvent::WriteFailed(e)),
                    Poll::Pending => return Poll::Pending,
                };
                self.buf.advance(n);
                self.ready -= n;
                continue;
            }

            // 2. At a frame boundary, write wsgate's own frames.
            if !self.injections.is_empty() && self.scanner.at_boundary() {
                let Some(dst) = dst.as_deref_mut() else {
                    self.injections.clear();
                    continue;
                };
                match self.poll_write(cx, dst, WriteWhat::Injection) {
                    Poll::Ready(Ok(n)) => {
                        let inj = &mut self.injections[0];
                        inj.written += n;
                        if inj.written == inj.bytes.len() {
                            let kind = self.injections.remove(0).kind;
                            if kind == Injected::Close {
                                self.dropping = true;
                            }
                            return Poll::Ready(PumpEvent::Injected(kind));
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(PumpEvent::WriteFailed(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }

            // 3. Push written bytes out of any buffering layer (TLS), then FIN if asked.
            if let Some(dst) = dst.as_deref_mut() {
                if self.unflushed {
                    if let Err(e) = ready!(Pin::new(&mut *dst).poll_flush(cx)) {
                        self.write_failed = true;
                        return Poll::Ready(PumpEvent::WriteFailed(e));
                    }
                    self.unflushed = false;
                }
                if self.shutdown == Shutdown::Requested && self.injections.is_empty() {
                    // An error here means the peer is gone already; the session learns
                    // that from the read side.
                    let _ = ready!(Pin::new(&mut *dst).poll_shutdown(cx));
                    self.shutdown = Shutdown::Done;
                    return Poll::Ready(PumpEvent::WriteShut);
                }
            }

            // 4. Scan what was read, as far as it can go in one write. (Everything
            // scanned is written by now: `ready` is 0, and an empty buffer has nothing to
            // scan, as on most passes here.)
            if self.buf.len() > self.ready {
                match self.scan() {
                    Scanned::Progress => continue,
                    Scanned::Stop(event) => return Poll::Ready(event),
                    Scanned::NeedMore => {}
                }
            }

            // 5. Read more.
            let Some(src) = src.as_deref_mut() else {
                return Poll::Pending;
            };
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            if let Some(event) = self.splice_in(cx, &*src, dst.as_deref()) {
                match event {
                    Poll::Ready(Some(event)) => return Poll::Ready(event),
                    Poll::Ready(None) => continue,
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.buf.capacity() == 0 {
                // An idle pump holds no buffer, and the relay polls both pumps whenever
                // either side wakes it: take one only when there is something to read.
                // An error is left to the read to report.
                if src.poll_read_ready(cx).is_pending() {
                    return Poll::Pending;
                }
                self.buf = spare_buffers::take();
            }
            if self.buf.capacity() - self.buf.len() < self.read_size / 4 {
                self.buf.reserve(self.read_size);
            }
            let spare = (self.buf.capacity() - self.buf.len()).min(self.read_size);
            let mut room = (&mut self.buf).limit(spare);
            match tokio_util::io::poll_read_buf(Pin::new(src), cx, &mut room) {
                Poll::Ready(Ok(0)) => {
                    self.read_done = true;
                    return Poll::Ready(PumpEvent::Eof {
                        mid_frame: self.mid_frame(),
                    });
                }
                Poll::Ready(Ok(n)) => {
                    self.rx_any = true;
                    self.counters.bytes += n as u64;
                    if n == spare && self.read_size < MAX_READ_SIZE {
                        self.read_size *= 2;
                    }
                }
                Poll::Ready(Err(error)) => {
                    self.read_done = true;
                    return Poll::Ready(PumpEvent::ReadFailed {
                        mid_frame: self.mid_frame(),
                        error,
                    });
                }
                Poll::Pending => {
                    if self.buf.is_empty() {
                        // Idle connections keep no buffer.
                        spare_buffers::give(std::mem::take(&mut self.buf));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Moves the rest of a large data payload from `src` into a pipe, when everything
    /// before it is written, both sides are plain TCP and a pipe is free. `None`: not
    /// now, read as usual; `Some(Ready(None))`: bytes moved, go on.
    fn splice_in<R: Transport, W: Transport>(
        &mut self,
        cx: &mut Context<'_>,
        src: &R,
        dst: Option<&W>,
    ) -> Option<Poll<Option<PumpEvent>>> {
        let remaining = self.scanner.payload_remaining();
        if remaining < splice::MIN_PAYLOAD
            || !self.buf.is_empty()
            || self.dropping
            || self.broken
            || self.shutdown != Shutdown::None
        {
            return None;
        }
        let from = src.plain_tcp()?;
        dst.and_then(Transport::plain_tcp)?;
        if self.pipe.is_none() {
            self.pipe = Some(Pipe::take()?);
            // The next frame's first read only needs to reach its header: the bulk of a
            // large payload comes by splice, not through a buffer (reads that fill their
            // buffer grow again, as for any stream of smaller frames).
            self.read_size = READ_AFTER_SPLICE;
            if self.buf.capacity() > 0 {
                spare_buffers::give(std::mem::take(&mut self.buf));
            }
        }
        let pipe = self.pipe.as_mut()?;
        let max = usize::try_from(remaining).unwrap_or(usize::MAX);
        Some(match pipe.poll_fill(cx, from, max) {
            Poll::Ready(Ok(0)) => {
                self.read_done = true;
                Poll::Ready(Some(PumpEvent::Eof { mid_frame: true }))
            }
            Poll::Ready(Ok(n)) => {
                self.scanner.skip_payload(n as u64);
                self.counters.bytes += n as u64;
                self.rx_any = true;
                self.rx_data = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(error)) => {
                self.read_done = true;
                Poll::Ready(Some(PumpEvent::ReadFailed {
                    mid_frame: true,
                    error,
                }))
            }
            Poll::Pending => Poll::Pending,
        })
    }

    fn poll_write<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
        what: WriteWhat,
    ) -> Poll<io::Result<usize>> {
        let bytes = match what {
            WriteWhat::Ready => &self.buf[..self.ready],
            WriteWhat::Injection => {
                let inj = &self.injections[0];
                &inj.bytes[inj.written..]
            }
        };
        match Pin::new(dst).poll_write(cx, bytes) {
            Poll::Ready(Ok(0)) => {
                self.write_failed = true;
                Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
            }
            Poll::Ready(Ok(n)) => {
                self.write_blocked = false;
                self.unflushed = true;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                self.write_failed = true;
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                self.write_blocked = true;
                Poll::Pending
            }
        }
    }

    /// Scans buffered bytes after `ready`. Data frames extend `ready` (or are dropped);
    /// a control frame is held for a verdict once everything before it is written.
    fn scan(&mut self) -> Scanned {
        if self.broken {
            self.buf.truncate(self.ready);
            return Scanned::NeedMore;
        }
        let mut progress = false;
        while self.ready < self.buf.len() {
            if !self.injections.is_empty() && self.scanner.at_boundary() {
                break;
            }
            if self.dropping && self.ready > 0 {
                // Write what precedes the cut before dropping what follows it.
                break;
            }
            match self.scanner.step(&self.buf[self.ready..]) {
                Ok(Step::Data { len, new_frame }) => {
                    self.rx_data = true;
                    self.counters.frames += u64::from(new_frame);
                    if self.dropping {
                        self.buf.advance(len);
                    } else {
                        self.ready += len;
                    }
                    progress = true;
                }
                Ok(Step::Control { header, len }) => {
                    if self.ready > 0 {
                        break;
                    }
                    self.counters.frames += 1;
                    self.held = len;
                    self.held_close = header.opcode == Opcode::Close;
                    let payload = ControlPayload::from_frame(&header, &self.buf[..len]);
                    return Scanned::Stop(PumpEvent::Control { header, payload });
                }
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    self.broken = true;
                    self.buf.truncate(self.ready);
                    return Scanned::Stop(PumpEvent::ProtocolError(e));
                }
            }
        }
        if progress || self.ready > 0 {
            Scanned::Progress
        } else {
            Scanned::NeedMore
        }
    }
}

/// Read buffers of pumps that went idle, kept per thread for the next pump that reads.
///
/// A pump gives its buffer back whenever it has nothing left to write, which on a chatty
/// connection is after every message; without this, each message would cost a
/// `malloc`/`free` pair of a [`READ_SIZE`] buffer. The pool is small and per thread (no
/// locking), so idle memory stays bounded by a few buffers per worker thread, however
/// many connections there are.
mod spare_buffers {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use super::READ_SIZE;

    /// Buffers kept per thread. Buffers return at the end of each poll, so a few cover
    /// every pump a thread has mid-read at once.
    pub(super) const KEEP: usize = 8;

    thread_local! {
        static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// A buffer with room for at least [`READ_SIZE`] bytes.
    pub fn take() -> BytesMut {
        SPARE
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| BytesMut::with_capacity(READ_SIZE))
    }

    /// Buffers kept on this thread.
    #[cfg(test)]
    pub fn kept() -> usize {
        SPARE.with_borrow(Vec::len)
    }

    /// Keeps a buffer of the standard size for reuse, emptied; frees any other. Never
    /// allocates: a buffer that cannot get its room back without a new allocation (a
    /// small one, or one still shared) is simply freed.
    pub fn give(mut buf: BytesMut) {
        buf.clear();
        // Reclaims the room before the read position.
        if buf.try_reclaim(READ_SIZE) && buf.capacity() < 2 * READ_SIZE {
            // `try_with`: a pump dropped while this thread's locals are being destroyed
            // (a task freed as its thread exits) frees its buffer instead of panicking.
            let _ = SPARE.try_with(|spare| {
                let mut spare = spare.borrow_mut();
                if spare.len() < KEEP {
                    spare.push(buf);
                }
            });
        }
    }
}

impl Drop for Pump {
    /// A pump that ends hands its buffer to the next one: without this, every WebSocket
    /// would take two buffers out of the pool (its last reads, the Close and the FIN, keep
    /// them) and free them here, a `malloc`/`free` pair of [`READ_SIZE`] per direction.
    fn drop(&mut self) {
        if self.buf.capacity() > 0 {
            spare_buffers::give(std::mem::take(&mut self.buf));
        }
        if let Some(pipe) = self.pipe.take() {
            pipe.give();
        }
    }
}

enum WriteWhat {
    Ready,
    Injection,
}

enum Scanned {
    Progress,
    Stop(PumpEvent),
    NeedMore,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode, encode_close};
    use crate::side::Side;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    /// In-memory streams stand in for sockets; they cannot splice.
    impl Transport for DuplexStream {
        fn abort_on_close(&self) {}
    }

    fn backend_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    /// Loopback sockets: both sides plain TCP, so large payloads can splice.
    impl Transport for tokio::net::TcpStream {
        fn abort_on_close(&self) {}

        fn plain_tcp(&self) -> Option<&tokio::net::TcpStream> {
            Some(self)
        }

        fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            tokio::net::TcpStream::poll_read_ready(self, cx)
        }
    }

    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn a_large_payload_between_tcp_sockets_is_spliced_byte_for_byte() {
        let limit = std::time::Duration::from_secs(10);
        let (mut client, mut src) = tcp_pair().await;
        let (mut dst, mut backend) = tcp_pair().await;
        // What a client sends: a large masked binary frame, a small text frame, a Close.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        // 64-bit length, masked as every client frame is.
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut data = vec![0x82, 0x80 | 127];
        data.extend_from_slice(&(big.len() as u64).to_be_bytes());
        data.extend_from_slice(&key);
        data.extend(big.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        data.extend(encode(Side::Backend, Opcode::Text, b"after"));
        let close = encode_close(Side::Backend, 1000, "");
        let mut sent = data.clone();
        sent.extend_from_slice(&close);
        let writer = tokio::spawn(async move {
            // In pieces, as a browser's frames arrive.
            for piece in sent.chunks(7_000) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let expected = data.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected];
            backend.read_exact(&mut got).await.unwrap();
            got
        });

        let mut pump = Pump::new(Scanner::new(Side::Client, 0, None), b"");
        let ev = tokio::time::timeout(
            limit,
            poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))),
        )
        .await
        .unwrap();
        assert!(
            matches!(ev, PumpEvent::Control { header, .. } if header.opcode == Opcode::Close),
            "{ev:?}"
        );
        let got = tokio::time::timeout(limit, reader).await.unwrap().unwrap();
        assert!(got == data, "the relayed bytes differ");
        assert_eq!(
            pump.counters(),
            Counters {
                frames: 3,
                bytes: (data.len() + close.len()) as u64,
            }
        );
        // The pipe went back to this thread's pool once the payload was through.
        assert!(pump.pipe.is_none());
        assert!(crate::splice::alive() > 0, "nothing was spliced");
        pump.release_held(Verdict::Forward);
        drop(writer.await.unwrap());
        let _ = dst.flush().await;
    }

    #[tokio::test]
    async fn forwards_bytes_unchanged_and_stops_for_control_frames() {
        let (mut src_peer, mut src) = duplex(1024);
        let (mut dst, mut dst_peer) = duplex(1024);
        let mut pump = Pump::new(Scanner::new(Side::Backend, 0, None), b"");
        let mut input = backend_frame(1, b"hello");
        input.extend(backend_frame(9, b"app-ping"));
        input.extend(backend_frame(2, b"after"));
        src_peer.write_all(&input).await.unwrap();

        let ev = poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))).await;
        let PumpEvent::Control { header, payload } = ev else {
            panic!("expected a control frame, got {ev:?}")
        };
        assert_eq!(
            (header.opcode, payload.as_bytes()),
            (Opcode::Ping, &b"app-ping"[..])
        );
        pump.release_held(Verdict::Forward);
        drop(src_peer);
        let ev = poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))).await;
        assert!(matches!(ev, PumpEvent::Eof { mid_frame: false }), "{ev:?}");
        drop(dst);
        let mut out = Vec::new();
        dst_peer.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
        assert_eq!(
            pump.counters(),
            Counters {
                frames: 3,
                bytes: input.len() as u64
            }
        );
    }

    #[tokio::test]
    async fn injects_only_at_a_frame_boundary_and_drops_after_close() {
        let (mut src_peer, mut src) = duplex(1024);
        let (mut dst, mut dst_peer) = duplex(1024);
        let mut pump = Pump::new(Scanner::new(Side::Backend, 0, None), b"");
        let frame = backend_frame(2, b"0123456789");
        // Half a frame arrives; wsgate wants to close meanwhile.
        src_peer.write_all(&frame[..6]).await.unwrap();
        {
            let mut polled =
                std::pin::pin!(poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))));
            assert!(futures_poll_once(&mut polled).await.is_none());
        }
        pump.inject(Injected::Close, encode_close(Side::Client, 1001, "bye"));
        assert!(pump.mid_frame());
        src_peer.write_all(&frame[6..]).await.unwrap();
        src_peer
            .write_all(&backend_frame(1, b"late"))
            .await
            .unwrap();
        let ev = poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))).await;
        assert!(matches!(ev, PumpEvent::Injected(Injected::Close)), "{ev:?}");
        drop(src_peer);
        let ev = poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))).await;
        assert!(matches!(ev, PumpEvent::Eof { .. }), "{ev:?}");
        drop(dst);
        let mut out = Vec::new();
        dst_peer.read_to_end(&mut out).await.unwrap();
        let mut expected = frame.clone();
        expected.extend(encode_close(Side::Client, 1001, "bye"));
        assert_eq!(out, expected, "the late frame must not follow the Close");
    }

    #[tokio::test]
    async fn invalid_framing_is_reported_and_later_bytes_dropped() {
        let (mut src_peer, mut src) = duplex(1024);
        let (mut dst, mut dst_peer) = duplex(1024);
        let mut pump = Pump::new(Scanner::new(Side::Client, 0, None), b"");
        let good = {
            let mut f = encode(Side::Backend, Opcode::Binary, b"ok");
            f[0] = 0x82;
            f
        };
        let mut input = good.clone();
        input.extend(backend_frame(1, b"unmasked"));
        src_peer.write_all(&input).await.unwrap();
        let ev = poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))).await;
        assert!(
            matches!(
                ev,
                PumpEvent::ProtocolError(FrameError::UnmaskedClientFrame)
            ),
            "{ev:?}"
        );
        pump.inject(Injected::Close, encode_close(Side::Backend, 1001, ""));
        let ev = poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))).await;
        assert!(matches!(ev, PumpEvent::Injected(Injected::Close)), "{ev:?}");
        drop(dst);
        let mut out = vec![0u8; good.len()];
        dst_peer.read_exact(&mut out).await.unwrap();
        assert_eq!(out, good);
    }

    #[tokio::test]
    async fn an_idle_pump_holds_no_buffer_and_reuses_a_spare_one() {
        let (mut src_peer, mut src) = duplex(1024);
        let (mut dst, mut dst_peer) = duplex(1024);
        let mut pump = Pump::new(Scanner::new(Side::Backend, 0, None), b"");
        for round in 0..3 {
            src_peer
                .write_all(&backend_frame(2, b"data"))
                .await
                .unwrap();
            // Everything read is written, then the read would block: the pump is idle.
            let mut polled =
                std::pin::pin!(poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))));
            assert!(
                futures_poll_once(&mut polled).await.is_none(),
                "round {round}"
            );
            let mut out = [0u8; 6];
            dst_peer.read_exact(&mut out).await.unwrap();
            assert_eq!(
                pump.buf.capacity(),
                0,
                "round {round}: idle pump kept a buffer"
            );
        }
    }

    #[tokio::test]
    async fn a_pump_with_nothing_to_read_takes_no_buffer() {
        let (_src_peer, mut src) = tcp_pair().await;
        let (mut dst, _dst_peer) = tcp_pair().await;
        while spare_buffers::kept() > 0 {
            drop(spare_buffers::take());
        }
        // A fresh socket counts as readable until a read says otherwise, as after the
        // pump's first read.
        let err = src.try_read(&mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let mut pump = Pump::new(Scanner::new(Side::Backend, 0, None), b"");
        // The relay polls both pumps when either side wakes it; the quiet one must not
        // take a buffer (which here would be a fresh allocation, left in the pool).
        let mut polled =
            std::pin::pin!(poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))));
        assert!(futures_poll_once(&mut polled).await.is_none());
        assert_eq!(
            spare_buffers::kept(),
            0,
            "a buffer was taken and given back"
        );
    }

    #[tokio::test]
    async fn an_ended_pump_returns_its_buffer_to_the_pool() {
        let (mut src_peer, mut src) = duplex(1024);
        let (mut dst, mut dst_peer) = duplex(1024);
        let mut pump = Pump::new(Scanner::new(Side::Backend, 0, None), b"");
        let bound = std::time::Duration::from_secs(5);
        src_peer
            .write_all(&backend_frame(2, b"data"))
            .await
            .unwrap();
        // FIN right behind the frame: the pump reads both and stops with its buffer.
        drop(src_peer);
        let ev = tokio::time::timeout(
            bound,
            poll_fn(|cx| pump.poll(cx, Some(&mut src), Some(&mut dst))),
        )
        .await
        .unwrap();
        assert!(matches!(ev, PumpEvent::Eof { mid_frame: false }), "{ev:?}");
        let mut out = [0u8; 6];
        tokio::time::timeout(bound, dst_peer.read_exact(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(pump.buf.capacity() > 0, "the pump still holds its buffer");
        assert_eq!(spare_buffers::kept(), 0);
        drop(pump);
        assert_eq!(spare_buffers::kept(), 1);
        assert!(spare_buffers::take().capacity() >= READ_SIZE);
    }

    #[test]
    fn a_pump_dropped_after_the_pool_is_gone_frees_its_buffer_quietly() {
        thread_local! {
            static HOLDER: std::cell::RefCell<Option<Pump>> =
                const { std::cell::RefCell::new(None) };
        }
        std::thread::spawn(|| {
            // Registered first, destroyed last (thread locals are destroyed in reverse
            // order of first use here): the pool is gone when this pump drops.
            HOLDER.with_borrow_mut(|h| *h = None);
            spare_buffers::give(spare_buffers::take());
            let mut pump = Pump::new(Scanner::new(Side::Backend, 0, None), b"");
            pump.buf = spare_buffers::take();
            HOLDER.with_borrow_mut(|h| *h = Some(pump));
        })
        .join()
        .expect("dropping a pump at thread exit must not panic");
    }

    #[test]
    fn spare_buffers_are_reused_and_bounded() {
        std::thread::spawn(|| {
            let mut buf = spare_buffers::take();
            buf.extend_from_slice(b"bytes in flight");
            let ptr = buf.as_ptr();
            buf.advance(buf.len());
            spare_buffers::give(buf);
            let again = spare_buffers::take();
            assert_eq!(again.as_ptr(), ptr, "the spare buffer is reused");
            assert!(again.is_empty() && again.capacity() >= READ_SIZE);

            assert_eq!(spare_buffers::kept(), 0);

            // A grown (bulk) buffer is freed, not kept; so is one too small to hold a
            // read (giving never allocates).
            spare_buffers::give(BytesMut::with_capacity(MAX_READ_SIZE));
            spare_buffers::give(BytesMut::from(&b"handshake leftovers"[..]));
            assert_eq!(spare_buffers::kept(), 0);

            // At most a few are kept per thread.
            let many: Vec<_> = (0..20).map(|_| spare_buffers::take()).collect();
            many.into_iter().for_each(spare_buffers::give);
            assert_eq!(spare_buffers::kept(), spare_buffers::KEEP);
        })
        .join()
        .unwrap();
    }

    /// Polls a future once; `None` if it is pending.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        poll_fn(|cx| match Pin::new(&mut *f).poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }
}
