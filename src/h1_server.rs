//! wsgate's own HTTP/1.1 server for plain requests; hyper serves everything else.
//!
//! Most requests a dashboard sends are plain: a `GET` of a page, an asset or a query, a
//! small `POST`. Served by hyper's server, each cost its connection state machine, its
//! dispatcher and the header map round trips of its encoder: a tenth of wsgate's
//! user-space work per keep-alive GET, a seventh of a one-request connection's, a sixth
//! of a small POST's (callgrind, see bench/README.md). So a client connection's requests are read here
//! ([`parse_head`]) and, while they keep a narrow shape, forwarded and answered here;
//! the first that does not — or any doubt — goes to hyper with the bytes not yet
//! consumed, and hyper serves the rest of the connection ([`Ended::ToHyper`]), as
//! [`crate::request_head`] does for a connection's first request.
//!
//! The shape: HTTP/1.1, an origin-form target, any method but `CONNECT`, lines ending in
//! CRLF, exactly one `Host`, no `Transfer-Encoding`, `Expect`, `Upgrade` or `TE`, a head
//! within `http.max_header_size`, and a body only with one plain `Content-Length` whose
//! bytes have arrived by the time the head was read (up to 64 KiB). Within it
//! the loop behaves as hyper's server does with wsgate's settings, byte for byte on the
//! wire: [`encode_head`] follows hyper's encoder, which a differential test holds it to;
//! a request in flight watches its client as hyper's dispatcher does (an end of stream
//! while nothing else is buffered means the client left); the connection runs under
//! [`crate::server`]'s driving (drain, abort, idle limit, response deadline) and writes
//! through [`ClientIo`] (write timeout).
//!
//! (The backend side of HTTP/1.1 is [`crate::h1`].)

use std::future::Future;
use std::io::{self, IoSlice, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body as _, Frame};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::client::{Busy, ClientConn, ClientIo};
use crate::gate::Gate;
use crate::proxy::{self, Body};
use crate::stream::{Stream, Transport as _};

/// Header lines a plain request may have; one with more goes to hyper.
const MAX_HEADERS: usize = 64;

/// Bytes read at once while waiting for a head.
const READ_CHUNK: usize = 4096;

/// Room below which a read gets a fresh [`READ_CHUNK`].
const MIN_READ: usize = 1024;

/// Body parts written at once, at most, and the bytes past which no more are gathered:
/// about what hyper's write queue takes before it flushes (16 buffers, or its buffer
/// size), so that the body is asked for no further ahead of the client than with hyper.
const BATCH_PARTS: usize = 16;
const BATCH_BYTES: usize = 64 * 1024;

/// A part of a body of unknown length this large has others behind it, likely ready.
const GATHER_AFTER: usize = 4096;

/// The largest body a plain request may have: one that arrives with its head, in the
/// reads a client's write of both takes (a bigger upload streams through hyper).
const MAX_WHOLE_BODY: usize = 64 * 1024;

/// hyper's limit on a request target (`414 URI Too Long` past it).
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// A request head as the loop reads it.
// One at a time, briefly: boxing the request would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// A request in the plain shape, its head `len` bytes long and followed by a body of
    /// `body_len` bytes; `close`: it asks to close the connection after its response.
    Plain {
        request: Request<()>,
        len: usize,
        body_len: usize,
        close: bool,
    },
    /// The head is not complete yet.
    Partial,
    /// Anything else: hyper's.
    Other,
}

/// Reads the request head at the start of `buf`. The request shares `buf`'s bytes.
pub fn parse_head(buf: &Bytes) -> Parsed {
    // Empty lines before a request line: hyper skips them.
    if matches!(buf.first(), None | Some(b'\r' | b'\n')) {
        return if buf.is_empty() {
            Parsed::Partial
        } else {
            Parsed::Other
        };
    }
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    plain_request(&parsed, buf, len)
}

/// The request, if it has the plain shape; else `Other`.
fn plain_request(parsed: &httparse::Request<'_, '_>, buf: &Bytes, len: usize) -> Parsed {
    // `?` on the checks, without building the (large) result twice.
    macro_rules! need {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return Parsed::Other,
            }
        };
    }
    if parsed.version != Some(1) {
        return Parsed::Other;
    }
    let method = need!(
        parsed
            .method
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
    );
    if method == Method::CONNECT {
        return Parsed::Other;
    }
    let target = need!(
        parsed
            .path
            .filter(|p| p.starts_with('/') && p.len() < MAX_TARGET)
    );
    // Every line ends in CRLF: httparse also takes a bare LF, which proxies in front of
    // wsgate may read differently.
    let head = &buf[..len];
    if memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r') {
        return Parsed::Other;
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = need!(Uri::from_maybe_shared(buf.slice_ref(target.as_bytes())).ok());
    let headers = request.headers_mut();
    headers.reserve(parsed.headers.len());
    let (mut hosts, mut close, mut body_len) = (0, false, None);
    for field in parsed.headers.iter() {
        let name = need!(HeaderName::from_bytes(field.name.as_bytes()).ok());
        let value = need!(HeaderValue::from_maybe_shared(buf.slice_ref(field.value)).ok());
        match name {
            // Framing other than a plain length, and what hyper's server answers or
            // hands over itself: hyper's.
            header::TRANSFER_ENCODING | header::EXPECT | header::UPGRADE | header::TE => {
                return Parsed::Other;
            }
            header::CONTENT_LENGTH => {
                if body_len.is_some() {
                    return Parsed::Other;
                }
                body_len = Some(need!(plain_length(value.as_bytes())));
            }
            header::HOST => hosts += 1,
            header::CONNECTION => close |= connection_close(value.as_bytes()),
            _ => {}
        }
        headers.append(name, value);
    }
    if hosts != 1 {
        return Parsed::Other;
    }
    Parsed::Plain {
        request,
        len,
        body_len: body_len.unwrap_or(0),
        close,
    }
}

/// A `Content-Length` value of digits only (no sign, list or space), at most 18 of them.
fn plain_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// What hyper's server knows of a response body when it writes the head: nothing (the
/// body has ended), its exact length, or neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLength {
    Known(u64),
    Unknown,
}

/// How a response's body goes on the wire after its head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes (0: none at all).
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Close,
}

/// A response head encoded: its body's framing, and whether the connection closes after
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub framing: Framing,
    pub last: bool,
}

/// The response head hyper's server writes for `head` (its status, version, reason
/// phrase and fields) answering a request of `method`, with `body` as hyper would see
/// it, on a connection that stays open after it if `keep_alive` — wsgate's settings:
/// lower-case names, no `Date` added. `Err`: hyper refuses to send it (a 1xx, a field
/// that contradicts the framing) and closes the connection.
pub fn encode_head<B>(
    out: &mut Vec<u8>,
    head: &Response<B>,
    body: Option<BodyLength>,
    method: &Method,
    keep_alive: bool,
) -> Result<Encoded, ()> {
    let status = head.status();
    if status.is_informational() {
        return Err(());
    }
    let mut last = !keep_alive;
    let reason = head.extensions().get::<hyper::ext::ReasonPhrase>();
    if head.version() == Version::HTTP_11 && status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if head.version() == Version::HTTP_10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(reason) => out.extend_from_slice(reason.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    let can_chunk = method != Method::HEAD
        && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let can_have_length = !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let http10 = head.version() == Version::HTTP_10;
    let mut framing = Framing::Length(0);
    let mut wrote_len = false;
    let mut length_value = None;
    // A field written across several values (`a, b`) whose line is still open.
    let mut open: Option<HeaderName> = None;
    let mut chunked_last = true;
    let close_line = |out: &mut Vec<u8>, open: &mut Option<HeaderName>, chunked_last: bool| {
        if open.take().is_some() {
            out.extend_from_slice(if chunked_last {
                b"\r\n".as_slice()
            } else {
                b", chunked\r\n".as_slice()
            });
        }
    };
    // hyper's server says `close` in the response of an HTTP/1.1 exchange after which
    // the connection closes: added to the `Connection` field (or as one, after the
    // others) unless a value has it.
    let mut says_close = false;
    let add_close = |out: &mut Vec<u8>, open: &Option<HeaderName>, says_close: bool| {
        if !keep_alive && !says_close && open.as_ref() == Some(&header::CONNECTION) {
            out.extend_from_slice(b", close");
        }
    };
    for (name, value) in head.headers() {
        if open.as_ref().is_some_and(|o| o != name) {
            add_close(out, &open, says_close);
            close_line(out, &mut open, chunked_last);
        }
        let continuing = open.as_ref() == Some(name);
        match *name {
            header::CONTENT_LENGTH => {
                if wrote_len && !continuing {
                    return Err(());
                }
                match body {
                    Some(BodyLength::Known(len)) => {
                        if !continuing {
                            framing = Framing::Length(len);
                            out.extend_from_slice(b"content-length: ");
                            out.extend_from_slice(value.as_bytes());
                            wrote_len = true;
                            open = Some(name.clone());
                        }
                        continue;
                    }
                    Some(BodyLength::Unknown) => {
                        let len = hyper_length(value.as_bytes()).ok_or(())?;
                        match length_value {
                            Some(prev) if prev != len => return Err(()),
                            Some(_) => {}
                            None => {
                                framing = Framing::Length(len);
                                out.extend_from_slice(b"content-length: ");
                                out.extend_from_slice(value.as_bytes());
                                wrote_len = true;
                                open = Some(name.clone());
                                length_value = Some(len);
                            }
                        }
                        continue;
                    }
                    // No body to send: only a HEAD's answer keeps the field.
                    None if method != Method::HEAD => continue,
                    None => {}
                }
                wrote_len = true;
            }
            header::TRANSFER_ENCODING => {
                if wrote_len && !continuing {
                    return Err(());
                }
                if http10 || !can_chunk {
                    continue;
                }
                wrote_len = true;
                chunked_last = is_chunked(value.as_bytes());
                if !continuing {
                    framing = Framing::Chunked;
                }
                join(out, &mut open, name, value.as_bytes());
                continue;
            }
            header::CONNECTION => {
                if connection_close(value.as_bytes()) {
                    last = true;
                    says_close = true;
                }
                join(out, &mut open, name, value.as_bytes());
                continue;
            }
            header::TRAILER => {
                if http10 || !can_chunk {
                    continue;
                }
                join(out, &mut open, name, value.as_bytes());
                continue;
            }
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    add_close(out, &open, says_close);
    close_line(out, &mut open, chunked_last);
    if !keep_alive && !head.headers().contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_len {
        framing = match body {
            Some(BodyLength::Unknown) if http10 || !can_chunk => Framing::Close,
            Some(BodyLength::Unknown) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            None | Some(BodyLength::Known(0)) => {
                if can_have_length && method != Method::HEAD {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            Some(BodyLength::Known(len)) => {
                if can_have_length {
                    // Writing to a Vec cannot fail.
                    let _ = write!(out, "content-length: {len}\r\n");
                    Framing::Length(len)
                } else {
                    Framing::Length(0)
                }
            }
        };
    }
    if !can_chunk {
        framing = Framing::Length(0);
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::Close {
        last = true;
    }
    Ok(Encoded { framing, last })
}

/// Writes a value of a field that hyper's encoder writes on one line, its values joined
/// with `, ` (`Transfer-Encoding`, `Connection`, `Trailer`): the line is `open` until
/// another field comes.
fn join(out: &mut Vec<u8>, open: &mut Option<HeaderName>, name: &HeaderName, value: &[u8]) {
    if open.as_ref() == Some(name) {
        out.extend_from_slice(b", ");
    } else {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        *open = Some(name.clone());
    }
    out.extend_from_slice(value);
}

/// A `Content-Length` value as hyper's encoder reads one: digits, or a list of equal
/// numbers.
fn hyper_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(part).ok()?.parse().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// Whether a `Transfer-Encoding` value ends in `chunked`.
fn is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a `Connection` value has the `close` token.
fn connection_close(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// How serving a connection ended.
pub enum Ended {
    /// The connection is done: closed by either side, or failed.
    Closed,
    /// A request outside the plain shape: hyper serves the connection from these bytes
    /// on.
    ToHyper(Bytes, Stream),
}

/// Serves `io`'s requests, `read` the bytes already read from it, while they are
/// plain. `closing` is set by the connection's driver when the drain or the exit asks
/// it to stop taking requests: the response under way is the last.
pub async fn serve(
    gate: Arc<Gate>,
    mut io: ClientIo<Stream>,
    conn: Arc<ClientConn>,
    read: Bytes,
    closing: &AtomicBool,
) -> Ended {
    let max_head = gate.settings().config.http.max_header_size;
    let mut buf = thaw(read);
    // Each response head is encoded here, reused.
    let mut out = Vec::with_capacity(1024);
    loop {
        let (request, body, asked_close) =
            match next_request(&mut io, &mut buf, max_head, closing).await {
                Next::Request {
                    request,
                    body,
                    close,
                } => (request, body, close),
                // The client closed, or the drain or the exit asked.
                Next::End => {
                    close(io).await;
                    return Ended::Closed;
                }
                Next::Failed => return Ended::Closed,
                Next::Other(read) => return Ended::ToHyper(read, io.into_inner()),
            };
        let method = request.method().clone();
        let busy = Busy::new(conn.clone());
        let forwarding = if body.is_empty() {
            proxy::forward_bodiless(gate.clone(), busy, request)
        } else {
            proxy::forward_full(gate.clone(), busy, request.map(|()| body))
        };
        let mut forwarding = std::pin::pin!(forwarding);
        let answered = std::future::poll_fn(|cx| {
            if let Poll::Ready(response) = forwarding.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            client_left(&mut io, &mut buf, cx).map(|()| None)
        })
        .await;
        let Some(mut response) = answered else {
            // Dropping the exchange records how it ended.
            return Ended::Closed;
        };
        let keep_alive =
            !asked_close && !closing.load(Ordering::Relaxed) && !conn.accepted_draining;
        let after = respond(
            &mut io,
            &mut buf,
            &mut out,
            &mut response,
            &method,
            keep_alive,
        )
        .await;
        // The exchange ends with its body, if it had not.
        drop(response);
        match after {
            After::Next => {}
            After::Close => {
                close(io).await;
                return Ended::Closed;
            }
            After::Abort => return Ended::Closed,
        }
    }
}

/// What follows a response on its connection.
#[derive(Debug, PartialEq, Eq)]
enum After {
    /// The next request.
    Next,
    /// A clean close (TLS: with close_notify).
    Close,
    /// An abrupt one: the client learns the response was cut.
    Abort,
}

/// Writes `response` to a request of `method`, on a connection that stays open after it
/// if `keep_alive` (and the response does not say `close`).
async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    response: &mut Response<Body>,
    method: &Method,
    keep_alive: bool,
) -> After {
    out.clear();
    let length = body_length(response.body());
    let Ok(encoded) = encode_head(out, response, length, method, keep_alive) else {
        tracing::debug!(status = %response.status(), "a response hyper would not send: closing");
        return After::Abort;
    };
    match send_body(io, buf, out, response.body_mut(), encoded.framing).await {
        Sent::Whole if !encoded.last => After::Next,
        Sent::Whole | Sent::ToTheEnd => After::Close,
        // Cut: no clean end tells the client so.
        Sent::Broken => After::Abort,
    }
}

/// Ends a connection cleanly once everything has been written: over TLS, its
/// close_notify first. Over plain TCP nothing is needed before the socket is closed:
/// closing sends the FIN after whatever is still queued, exactly as a `shutdown`
/// would, and bytes the client sent that were never read turn it into a reset either
/// way. The system call per connection a `shutdown` costs is saved (nginx makes none).
async fn close(mut io: ClientIo<Stream>) {
    if io.get_ref().plain_tcp().is_none() {
        let _ = io.shutdown().await;
    }
}

/// What comes next on a connection.
// One at a time, briefly, as `Parsed`.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// A plain request, its body whole; `close`: it asks to close after its response.
    Request {
        request: Request<()>,
        body: Bytes,
        close: bool,
    },
    /// The client closed between requests, or the connection is to close (`closing`).
    End,
    /// Reading failed.
    Failed,
    /// Something for hyper: these bytes on.
    Other(Bytes),
}

/// Reads the next request into `buf` (which may hold it already) — within
/// `max_head` bytes of head, and a body that has arrived with it — or what else comes.
async fn next_request<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    max_head: usize,
    closing: &AtomicBool,
) -> Next {
    // The body announced was not all there, even with what had arrived since.
    let mut body_short = false;
    loop {
        if buf.is_empty() {
            if closing.load(Ordering::Relaxed) {
                return Next::End;
            }
        } else {
            let frozen = buf.split().freeze();
            match parse_head(&frozen) {
                Parsed::Plain {
                    request,
                    len,
                    body_len,
                    close,
                } if len <= max_head && frozen.len() - len >= body_len => {
                    let body = frozen.slice(len..len + body_len);
                    buf.extend_from_slice(&frozen[len + body_len..]);
                    return Next::Request {
                        request,
                        body,
                        close,
                    };
                }
                Parsed::Partial if frozen.len() <= max_head => *buf = thaw(frozen),
                // The body's first bytes came with the head, the rest is on its way (a
                // read is a few KiB): what has arrived meanwhile is taken, without
                // waiting for more.
                Parsed::Plain { len, body_len, .. }
                    if len <= max_head && body_len <= MAX_WHOLE_BODY && !body_short =>
                {
                    *buf = thaw(frozen);
                    buf.reserve(len + body_len - buf.len());
                    if !read_ready(io, buf).await {
                        body_short = true;
                    }
                    continue;
                }
                // Too long a head, a body still to come, anything else.
                _ => return Next::Other(frozen),
            }
        }
        make_room(buf);
        let read = std::future::poll_fn(|cx| {
            // Nothing half-read to finish: a graceful close ends it here.
            if buf.is_empty() && closing.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(0));
            }
            tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
        })
        .await;
        match read {
            Ok(0) if buf.is_empty() => return Next::End,
            // Closed inside a head: hyper answers that as it always does.
            Ok(0) => return Next::Other(buf.split().freeze()),
            Ok(_) => {}
            Err(_) => return Next::Failed,
        }
    }
}

/// What hyper's server knows of a response body when it writes the head.
fn body_length(body: &Body) -> Option<BodyLength> {
    if body.is_end_stream() {
        return None;
    }
    Some(
        body.size_hint()
            .exact()
            .map_or(BodyLength::Unknown, BodyLength::Known),
    )
}

/// Room in `buf` for a read: what is left behind the last head is used while it can
/// hold a typical one (a fresh buffer for each read cost an allocation and, with the
/// head before it still in use, a copy).
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_READ {
        buf.reserve(READ_CHUNK);
    }
}

/// `BytesMut` again from bytes nothing else holds (no copy); a copy otherwise.
fn thaw(bytes: Bytes) -> BytesMut {
    bytes
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

/// Reads into `buf` what has arrived, without waiting for more: `true` if bytes came.
async fn read_ready<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> bool {
    std::future::poll_fn(
        |cx| match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
            Poll::Ready(Ok(n)) => Poll::Ready(n > 0),
            // An error or the end is hyper's to find again when it reads.
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(false),
        },
    )
    .await
}

/// Reads into `buf` while it is empty, as hyper's dispatcher does while a request is in
/// flight: the end of the client's stream (or an error) means it left. Bytes that come
/// (a pipelined request) are kept, and nothing more is read until they are served.
/// `Ready`: the client left.
fn client_left<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if !buf.is_empty() {
        return Poll::Pending;
    }
    make_room(buf);
    match tokio_util::io::poll_read_buf(Pin::new(io), cx, buf) {
        Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(()),
        _ => Poll::Pending,
    }
}

/// One step of a response body.
enum Step {
    Frame(Option<Result<Frame<Bytes>, proxy::BoxError>>),
    /// Nothing ready yet: the head goes out meanwhile.
    Waiting,
    ClientLeft,
}

/// How a response went.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Whole: the connection may carry another.
    Whole,
    /// Whole, its end the connection's (close-delimited).
    ToTheEnd,
    /// The client left, the body failed or came short, a write failed: the connection
    /// ends without a clean close.
    Broken,
}

/// Writes the head `head` and the body in `framing`: the parts of the body that are ready
/// go out together (with the head, and with the end when it is there too), in one
/// write, as hyper's server writes them; the head goes out alone when the body has
/// nothing yet. The body is asked for more once what it gave was written, or gathered.
async fn send_body<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    head: &[u8],
    body: &mut Body,
    framing: Framing,
) -> Sent {
    let mut remaining = match framing {
        Framing::Length(0) => {
            return match write_parts(io, &[head]).await {
                Ok(()) => Sent::Whole,
                Err(_) => Sent::Broken,
            };
        }
        Framing::Length(n) => n,
        Framing::Chunked | Framing::Close => u64::MAX,
    };
    let mut head = Some(head);
    let mut parts: SmallVec<[Bytes; 4]> = SmallVec::new();
    // The body said it had nothing more just before the last write: it will wake the
    // task when it has (an event stream's body arms its timers each time it is asked).
    let mut asked = false;
    loop {
        let step = std::future::poll_fn(|cx| {
            if !std::mem::take(&mut asked)
                && let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx)
            {
                return Poll::Ready(Step::Frame(frame));
            }
            if head.is_some() {
                return Poll::Ready(Step::Waiting);
            }
            client_left(io, buf, cx).map(|()| Step::ClientLeft)
        })
        .await;
        let mut then = match step {
            Step::Waiting => {
                if let Some(head) = head.take()
                    && write_parts(io, &[head]).await.is_err()
                {
                    return Sent::Broken;
                }
                continue;
            }
            Step::ClientLeft => return Sent::Broken,
            // The backend's body failed, or was cut: the client sees a truncation.
            Step::Frame(Some(Err(_))) => return Sent::Broken,
            Step::Frame(None) => Then::End,
            Step::Frame(Some(Ok(frame))) => {
                // Trailers: hyper sends them only to a request with `TE: trailers`,
                // which is not a plain one.
                if let Ok(data) = frame.into_data() {
                    parts.push(data);
                }
                Then::More
            }
        };
        // What else is ready, while the batch has room: for a body of known length (a
        // download, arriving in reads) or a large part. An event stream's small parts
        // go one by one: asking its body again at once only arms its timers twice.
        let mut bytes = parts.iter().map(Bytes::len).sum::<usize>();
        let gather = matches!(framing, Framing::Length(_)) || bytes >= GATHER_AFTER;
        while gather
            && then == Then::More
            && !body.is_end_stream()
            && parts.len() < BATCH_PARTS
            && bytes < BATCH_BYTES
            && (bytes as u64) < remaining
        {
            match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
            {
                Poll::Pending => {
                    asked = true;
                    break;
                }
                Poll::Ready(None) => then = Then::End,
                Poll::Ready(Some(Err(_))) => then = Then::Failed,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        bytes += data.len();
                        parts.push(data);
                    }
                }
            }
        }
        if then == Then::More && body.is_end_stream() {
            // hyper asks no more of a body that says it has ended.
            then = Then::End;
        }
        // The batch on the wire: the head if it is still owed, each part in its
        // framing, the end's if it is there.
        let end: &[u8] = if then == Then::End && framing == Framing::Chunked {
            b"0\r\n\r\n"
        } else {
            b""
        };
        let head = head.take().unwrap_or_default();
        let written = match &parts[..] {
            [] => write_parts(io, &[head, end]).await,
            [data] => {
                let mut size = [0u8; 18];
                let [before, data, after] = on_wire(framing, &mut remaining, data, &mut size);
                write_parts(io, &[head, before, data, after, end]).await
            }
            many => {
                let mut sizes = [[0u8; 18]; BATCH_PARTS];
                let mut pieces: SmallVec<[&[u8]; 3 * BATCH_PARTS + 2]> = SmallVec::new();
                pieces.push(head);
                for (data, size) in many.iter().zip(sizes.iter_mut()) {
                    pieces.extend(on_wire(framing, &mut remaining, data, size));
                }
                pieces.push(end);
                write_parts(io, &pieces).await
            }
        };
        // Let go of the parts before waiting: they share the backend connection's read
        // buffer, which cannot be reused while they live.
        parts.clear();
        if written.is_err() {
            return Sent::Broken;
        }
        match then {
            Then::Failed => return Sent::Broken,
            Then::More if remaining != 0 => {}
            // Whole (past its length: hyper stops there too).
            Then::More | Then::End => {
                return match framing {
                    // A body shorter than its length: hyper ends the connection.
                    Framing::Length(_) if remaining != 0 => Sent::Broken,
                    Framing::Length(_) | Framing::Chunked => Sent::Whole,
                    // Its end is the connection's.
                    Framing::Close => Sent::ToTheEnd,
                };
            }
        }
    }
}

/// A body part as it goes on the wire in `framing`: its chunk's size line, itself, the
/// chunk's end; past a known length it is cut, as hyper cuts it.
fn on_wire<'a>(
    framing: Framing,
    remaining: &mut u64,
    data: &'a [u8],
    size: &'a mut [u8; 18],
) -> [&'a [u8]; 3] {
    if data.is_empty() {
        // An empty chunk would end the body.
        return [b"", b"", b""];
    }
    match framing {
        Framing::Chunked => [chunk_size(size, data.len()), data, b"\r\n"],
        Framing::Length(_) => {
            let take = usize::try_from(*remaining)
                .unwrap_or(usize::MAX)
                .min(data.len());
            *remaining -= take as u64;
            [b"", &data[..take], b""]
        }
        Framing::Close => [b"", data, b""],
    }
}

/// What follows a batch of body parts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    More,
    End,
    Failed,
}

/// `"{len:x}\r\n"` in `buf`.
fn chunk_size(buf: &mut [u8; 18], len: usize) -> &[u8] {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, digit) in buf[..digits].iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    buf[digits] = b'\r';
    buf[digits + 1] = b'\n';
    &buf[..digits + 2]
}

/// Writes `parts` (in as few system calls as the stream allows) and flushes.
async fn write_parts<W: AsyncWrite + Unpin>(io: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: SmallVec<[IoSlice<'_>; 8]> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n =
            std::future::poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, slices)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(text: &str) -> Parsed {
        parse_head(&Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn a_plain_get_is_read_with_its_fields() {
        let Parsed::Plain {
            request,
            len,
            body_len,
            close,
        } = parse("GET /q?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\nrest")
        else {
            panic!("not plain");
        };
        assert_eq!((len, body_len, close), (45, 0, false));
        assert_eq!(request.uri(), "/q?x=1");
        assert_eq!(request.headers()["accept"], "*/*");
        assert_eq!(request.version(), Version::HTTP_11);
    }

    #[test]
    fn close_and_a_plain_length_are_noted() {
        let Parsed::Plain {
            body_len, close, ..
        } = parse(
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\nContent-Length: 4\r\n\r\nbody",
        )
        else {
            panic!("not plain");
        };
        assert_eq!((body_len, close), (4, true));
    }

    #[test]
    fn anything_outside_the_shape_is_hypers() {
        for head in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
            "GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
            "\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
            "G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(matches!(parse(head), Parsed::Other), "{head:?}");
        }
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: a\r\n"),
            Parsed::Partial
        ));
        assert!(matches!(parse(""), Parsed::Partial));
    }

    /// A body of parts whose length nobody knows beforehand (as a backend's chunked
    /// one), some of them empty.
    struct Parts(std::collections::VecDeque<Bytes>);

    impl hyper::body::Body for Parts {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Empty,
        Whole,
        Parts,
    }

    /// One response to one request, as the differential test sends it both ways.
    #[derive(Clone, Debug)]
    struct Case {
        method: &'static str,
        close: bool,
        status: u16,
        version: Version,
        reason: Option<&'static str>,
        fields: &'static [(&'static str, &'static str)],
        body: Kind,
    }

    impl Case {
        fn response(&self) -> hyper::Response<Body> {
            let body = match self.body {
                Kind::Empty => Body::empty(),
                Kind::Whole => proxy::full("hello"),
                Kind::Parts => Body::boxed(Parts(
                    ["ab", "", "cde"]
                        .into_iter()
                        .map(|s| Bytes::from_static(s.as_bytes()))
                        .collect(),
                )),
            };
            let mut response = hyper::Response::new(body);
            *response.status_mut() = StatusCode::from_u16(self.status).unwrap();
            *response.version_mut() = self.version;
            if let Some(reason) = self.reason {
                response
                    .extensions_mut()
                    .insert(hyper::ext::ReasonPhrase::from_static(reason.as_bytes()));
            }
            for (name, value) in self.fields {
                response
                    .headers_mut()
                    .append(*name, HeaderValue::from_static(value));
            }
            response
        }

        /// The request, and one more behind it (pipelined) that closes the connection:
        /// what follows the first response shows whether the connection went on.
        fn requests(&self) -> String {
            let close = if self.close {
                "Connection: close\r\n"
            } else {
                ""
            };
            format!(
                "{} /case HTTP/1.1\r\nHost: a\r\n{close}\r\nGET /end HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                self.method
            )
        }
    }

    fn end() -> hyper::Response<Body> {
        hyper::Response::new(proxy::full("end"))
    }

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    async fn exchange(mut client: tokio::net::TcpStream, requests: &str) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        client.write_all(requests.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_to_end(&mut got),
        );
        read.await
            .expect("the server ended the connection")
            .unwrap();
        got
    }

    /// What hyper's server, set up as wsgate's, writes for the case.
    async fn through_hyper(case: &Case) -> Vec<u8> {
        let (client, server) = pair().await;
        let answer = case.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let response = if req.uri() == "/end" {
                end()
            } else {
                answer.response()
            };
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        crate::gate::tune_http1(&mut builder, 16 * 1024);
        tokio::spawn(builder.serve_connection(hyper_util::rt::TokioIo::new(server), service));
        exchange(client, &case.requests()).await
    }

    /// What the loop's encoder and body writer write for the case.
    async fn through_loop(case: &Case) -> Vec<u8> {
        let (client, mut server) = pair().await;
        let requests = case.requests();
        let len = requests.len();
        let method = Method::from_bytes(case.method.as_bytes()).unwrap();
        let answers = [
            (method, !case.close, case.response()),
            (Method::GET, false, end()),
        ];
        tokio::spawn(async move {
            // Both requests read first, as a server does before it closes.
            let mut buf = BytesMut::new();
            while buf.len() < len {
                use tokio::io::AsyncReadExt;
                if server.read_buf(&mut buf).await.unwrap() == 0 {
                    return;
                }
            }
            buf.clear();
            let mut out = Vec::new();
            for (method, keep_alive, response) in answers {
                let mut response = response;
                match respond(
                    &mut server,
                    &mut buf,
                    &mut out,
                    &mut response,
                    &method,
                    keep_alive,
                )
                .await
                {
                    After::Next => {}
                    After::Close => {
                        let _ = server.shutdown().await;
                        return;
                    }
                    After::Abort => return,
                }
            }
        });
        exchange(client, &requests).await
    }

    /// The loop writes what hyper's server writes, byte for byte, for every mix of
    /// method, `Connection: close`, status, version, reason phrase, framing fields and
    /// body kind a forwarded or wsgate-made response can have.
    #[tokio::test]
    async fn the_loop_writes_what_hypers_server_writes() {
        const FIELDS: &[&[(&str, &str)]] = &[
            &[],
            &[
                ("content-type", "text/plain"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
            ],
            &[("content-length", "5"), ("x-after", "1")],
            &[("connection", "close"), ("retry-after", "1")],
            &[
                ("trailer", "x-sum"),
                ("date", "Mon, 07 Dec 2026 20:00:00 GMT"),
            ],
            &[("transfer-encoding", "chunked")],
            &[("connection", "keep-alive"), ("connection", "x-hop")],
        ];
        let mut differ = Vec::new();
        let mut cases = 0;
        for method in ["GET", "HEAD", "POST"] {
            for close in [false, true] {
                for status in [200, 201, 204, 304, 404, 299] {
                    for version in [Version::HTTP_11, Version::HTTP_10] {
                        for reason in [None, Some("Fine")] {
                            for fields in FIELDS {
                                for body in [Kind::Empty, Kind::Whole, Kind::Parts] {
                                    let case = Case {
                                        method,
                                        close,
                                        status,
                                        version,
                                        reason,
                                        fields,
                                        body,
                                    };
                                    // hyper checks a length field against a body of known
                                    // length (in debug builds, by panicking); a forwarded
                                    // response's always agree.
                                    let length_field =
                                        fields.iter().any(|(n, _)| *n == "content-length");
                                    let chunked_field =
                                        fields.iter().any(|(n, _)| *n == "transfer-encoding");
                                    if length_field
                                        && !matches!(body, Kind::Whole)
                                        && method != "HEAD"
                                    {
                                        continue;
                                    }
                                    if chunked_field && !matches!(body, Kind::Parts) {
                                        continue;
                                    }
                                    cases += 1;
                                    let (hyper, ours) =
                                        (through_hyper(&case).await, through_loop(&case).await);
                                    if hyper != ours {
                                        differ.push(format!(
                                            "{case:?}\n  hyper: {:?}\n  loop:  {:?}",
                                            String::from_utf8_lossy(&hyper),
                                            String::from_utf8_lossy(&ours)
                                        ));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(cases > 1000, "{cases}");
        assert!(
            differ.is_empty(),
            "{} of {cases} differ:\n{}",
            differ.len(),
            differ[..differ.len().min(12)].join("\n")
        );
    }

    /// Header lines the generator picks from: ordinary ones, and the shapes behind
    /// request smuggling and parser disagreements.
    fn field_line() -> impl Strategy<Value = String> {
        prop_oneof![
            1 => Just("Host: other.example".to_string()),
            6 => Just("Accept: */*".to_string()),
            1 => Just("Connection: close".to_string()),
            1 => Just("Connection: keep-alive, Close".to_string()),
            1 => Just("Connection: keep-alive".to_string()),
            1 => Just("Cookie: a=b".to_string()),
            6 => Just("Content-Length: 5".to_string()),
            1 => Just("content-length: 0".to_string()),
            1 => Just("Content-Length: 05".to_string()),
            1 => Just("Content-Length: 5, 5".to_string()),
            1 => Just("Content-Length: +5".to_string()),
            1 => Just("Content-Length: 5 ".to_string()),
            1 => Just("Content-Length: 99999999999999999999".to_string()),
            1 => Just("Transfer-Encoding: chunked".to_string()),
            1 => Just("Transfer-Encoding: identity".to_string()),
            1 => Just("Expect: 100-continue".to_string()),
            1 => Just("Upgrade: websocket".to_string()),
            1 => Just("TE: trailers".to_string()),
            1 => Just(" folded continuation".to_string()),
            1 => Just("X-Bad\x01: value".to_string()),
            1 => Just("X-Ctl: a\x7fb".to_string()),
            1 => Just("X-Space : value".to_string()),
            1 => Just(": no name".to_string()),
            1 => Just("No-Colon".to_string()),
            1 => Just("X-Utf8: caf\u{e9}".to_string()),
            8 => "[A-Za-z-]{1,12}: [ -~]{0,20}",
        ]
    }

    fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
        let method = prop_oneof![
            6 => Just("GET"),
            4 => Just("POST"),
            1 => Just("HEAD"),
            1 => Just("PURGE"),
            1 => Just("get"),
            1 => Just("CONNECT"),
        ];
        let target = prop_oneof![
            12 => Just("/api/q?x=1"),
            1 => Just("/a b"),
            1 => Just("http://dash.example/a"),
            1 => Just("*"),
            1 => Just("//x"),
            1 => Just("/a?x=%00"),
        ];
        let version = prop_oneof![
            12 => Just("HTTP/1.1"),
            1 => Just("HTTP/1.0"),
            1 => Just("HTTP/2.0"),
        ];
        // Most requests have their one `Host`, so that the rest decides.
        let extra = prop::collection::vec((field_line(), prop::bool::weighted(0.97)), 0..4);
        let lines = (prop::bool::weighted(0.8), extra)
            .prop_map(|(host, mut lines)| {
                if host {
                    lines.push(("Host: dash.example".to_string(), true));
                }
                lines
            })
            .prop_shuffle();
        // Behind the head: nothing, a body's worth, or a pipelined request.
        let behind = prop_oneof![
            Just(String::new()),
            Just("hello".to_string()),
            Just("hel".to_string()),
            Just("helloGET /second HTTP/1.1\r\nHost: x\r\n\r\n".to_string()),
        ];
        (
            method,
            target,
            version,
            prop::bool::weighted(0.95),
            lines,
            behind,
        )
            .prop_map(|(method, target, version, crlf, lines, behind)| {
                crate::request_head::tests::request_text(
                    method, target, version, crlf, &lines, &behind,
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Whatever the bytes, the loop either leaves them to hyper or takes exactly the
        /// request hyper's server reads from them: method, target, version, fields, and a
        /// body of the same bytes.
        #[test]
        fn the_loop_takes_only_what_hyper_reads_the_same_way(bytes in request_bytes()) {
            let buf = Bytes::from(bytes.clone());
            if let Parsed::Plain { request, len, body_len, .. } = parse_head(&buf) {
                let text = String::from_utf8_lossy(&bytes[..len]).to_ascii_lowercase();
                prop_assert!(!text.contains("transfer-encoding"));
                prop_assert!(!text.contains("\n ") && !text.contains("\n\t"));
                // hyper reads a request whose body is all there; the loop takes no other.
                if bytes.len() < len + body_len {
                    return Ok(());
                }
                let whole = &bytes[..len + body_len];
                let theirs = crate::request_head::tests::hyper_reads(whole);
                prop_assert!(theirs.is_some(), "hyper refused what the loop took: {:?}", text);
                let (theirs, body) = theirs.unwrap();
                prop_assert_eq!(theirs.method(), request.method());
                prop_assert_eq!(theirs.uri(), request.uri());
                prop_assert_eq!(theirs.version(), request.version());
                prop_assert_eq!(theirs.headers(), request.headers());
                prop_assert_eq!(body.as_deref(), Some(&bytes[len..len + body_len]));
            }
        }
    }

    #[test]
    fn the_generator_produces_requests_the_loop_takes() {
        // The property above means little if the loop never takes anything.
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = request_bytes();
        let taken = (0..2000)
            .filter(|_| {
                let bytes = strategy.new_tree(&mut runner).unwrap().current();
                matches!(parse_head(&Bytes::from(bytes)), Parsed::Plain { .. })
            })
            .count();
        println!("{taken} of 2000 generated requests taken by the loop");
        assert!(
            taken > 200,
            "only {taken} of 2000 generated requests were taken"
        );
    }

    /// `next_request` over the client end of a pipe that has `sent` in it (and is
    /// closed after it if `eof`).
    async fn next_of(sent: &[u8], eof: bool, max_head: usize, closing: bool) -> Next {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(sent).await.unwrap();
        if eof {
            client.shutdown().await.unwrap();
        }
        let mut buf = BytesMut::new();
        let closing = AtomicBool::new(closing);
        let next = next_request(&mut server, &mut buf, max_head, &closing);
        tokio::time::timeout(std::time::Duration::from_secs(5), next)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn what_comes_next_on_a_connection() {
        let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let Next::Request {
            request,
            body,
            close,
        } = next_of(get, false, 1024, false).await
        else {
            panic!("not a request");
        };
        assert_eq!((request.uri().path(), body.len(), close), ("/", 0, false));
        // A head past `http.max_header_size` is hyper's to refuse (431).
        assert!(matches!(next_of(get, false, 20, false).await, Next::Other(b) if b[..] == get[..]));
        // A body written right behind its head is taken with it.
        let post = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody";
        let Next::Request { body, .. } = next_of(post, false, 1024, false).await else {
            panic!("not a request");
        };
        assert_eq!(&body[..], b"body");
        // Cut short by the client's end: hyper's, bytes and all.
        assert!(
            matches!(next_of(&post[..40], true, 1024, false).await, Next::Other(b) if b[..] == post[..40])
        );
        assert!(
            matches!(next_of(&get[..10], true, 1024, false).await, Next::Other(b) if b[..] == get[..10])
        );
        // Nothing more: the client closed between requests, or the drain asks to close.
        assert!(matches!(next_of(b"", true, 1024, false).await, Next::End));
        assert!(matches!(next_of(b"", false, 1024, true).await, Next::End));
        // As hyper's: an idle connection closes when the drain begins, what the client
        // sent meanwhile unread.
        assert!(matches!(next_of(get, false, 1024, true).await, Next::End));
    }

    #[test]
    fn chunk_sizes_are_lower_case_hex() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_size(&mut buf, 0), b"0\r\n");
        assert_eq!(chunk_size(&mut buf, 10), b"a\r\n");
        assert_eq!(chunk_size(&mut buf, 16), b"10\r\n");
        assert_eq!(chunk_size(&mut buf, 0x4000), b"4000\r\n");
        assert_eq!(chunk_size(&mut buf, usize::MAX), b"ffffffffffffffff\r\n");
    }
}
