//! HTTP/1.1 toward the backend: wsgate's own client for the backend leg of an exchange.
//!
//! A request is encoded once ([`Outgoing`]); a backend connection ([`Conn`]) writes it,
//! its body as the client sends it, and reads the response: the head parsed with
//! httparse into an `http` response (without the hop-by-hop fields, which describe this
//! connection and are read here, never forwarded), the body decoded by length, by
//! chunks or to the connection's end. All of it is polled directly on the backend's
//! socket in the exchange's own task, through the same `cx`.
//!
//! Why not hyper's client connection: it runs a dispatcher that talks to the request's
//! sender and to the response body through channels, and a keep-alive GET spent more
//! instructions in that machinery than in all of wsgate's own work (bench/README.md).
//! What it decides is kept: the framing rules of RFC 9112 §6 as hyper's client applies
//! them (a HEAD, 1xx, 204 and 304 response has no body; `Transfer-Encoding` before
//! `Content-Length`; differing or invalid lengths refused; informational heads
//! skipped), the request framing hyper would choose, and the same limits on what the
//! backend may send. The tests hold both to hyper's client on the same bytes (with the
//! forwarding rules' removal of hop-by-hop fields applied to what hyper's reads).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use smallvec::SmallVec;
use tokio::io::AsyncWrite;

use crate::body::RequestBody;
use crate::headers::{self, HopByHopField};
use crate::stream::Stream;

/// The most header fields a response head (or a trailer section) may have: hyper's
/// client's limit.
const MAX_HEADERS: usize = 100;

/// The longest trailer section, or chunk-size line, accepted (a response head's limit
/// is `http.max_header_size`).
const MAX_LINES: usize = 64 * 1024;

/// What the connection reads at least per read (more when a known body needs it).
const READ_SIZE: usize = 8 * 1024;
/// The largest read buffer a connection keeps between exchanges. Large enough that
/// responses of a few pages reuse theirs (letting a 16 KiB response's go costs ~2% of
/// its CPU, a malloc and a free per request: callgrind), small enough that 256 idle
/// pooled connections per worker hold at most 8 MiB.
const KEPT_READ_SIZE: usize = 32 * 1024;

/// Pieces written in one vectored write.
const MAX_SLICES: usize = 16;

/// Why an exchange with the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the backend's connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the backend closed the connection before the response was complete")]
    Incomplete,
    #[error("the backend's response is not valid HTTP/1.1: {0}")]
    Parse(&'static str),
    #[error("the backend's response head (or a chunk line or trailer section) is too large")]
    TooLarge,
    #[error("the client's request body failed: {0}")]
    RequestBody(hyper::Error),
    #[error("the client's request body does not match its length")]
    RequestLength,
}

/// A request that failed, and the request itself when nothing of it was written (the
/// connection was closed already), so that it may go on another.
pub struct Failed {
    pub error: Error,
    pub unsent: Option<Outgoing>,
}

/// A request encoded for the backend: its head as bytes, and its body with the framing
/// it goes out with. Kept whole until a connection starts writing it, so that a request
/// a connection turned out unable to take can go on another.
pub struct Outgoing {
    head: Bytes,
    /// Parts of the body already taken from it and framed, to go out behind the head
    /// (a request given back unsent after its body's first parts were gathered).
    framed: Vec<Bytes>,
    body: Option<(RequestBody, Framing)>,
    /// The response will have no body whatever its head says.
    head_request: bool,
}

/// How a request body goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    Chunked,
}

impl Outgoing {
    /// Encodes `req` (origin-form target, headers as forwarding left them), then the
    /// fields `added` (forwarding's `X-Forwarded-*`). The body's framing is hyper's
    /// client's choice: a valid `Content-Length` the request has; else the body's own
    /// known length, added as one; else chunks — except for a GET, HEAD or CONNECT,
    /// which go without their body.
    pub fn new(req: Request<RequestBody>, added: &[(HeaderName, HeaderValue)]) -> Outgoing {
        let (mut parts, body) = req.into_parts();
        let head_request = parts.method == Method::HEAD;
        let headers = &mut parts.headers;
        let framing = if body.is_end_stream() {
            headers.remove(header::TRANSFER_ENCODING);
            None
        } else if let Some(len) = content_length(headers) {
            Some(Framing::Length(len))
        } else if let Some(len) = body.size_hint().exact() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Some(Framing::Length(len))
        } else if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
            None
        } else {
            headers.remove(header::CONTENT_LENGTH);
            headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            Some(Framing::Chunked)
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        // Exactly the head's length: the buffer is never grown.
        let size = parts.method.as_str().len()
            + 1
            + target.len()
            + b" HTTP/1.1\r\n".len()
            + headers
                .iter()
                .chain(added.iter().map(|(n, v)| (n, v)))
                .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
                .sum::<usize>()
            + 2;
        let mut head = Vec::with_capacity(size);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers.iter().chain(added.iter().map(|(n, v)| (n, v))) {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        debug_assert_eq!(head.len(), size);
        Outgoing {
            head: Bytes::from(head),
            framed: Vec::new(),
            body: framing.map(|f| (body, f)),
            head_request,
        }
    }
}

/// The one `Content-Length` of `headers` (every value, comma lists included, the same
/// number), as hyper reads it; `None` when there is none or it is not valid.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .fold(None, |length, value| {
            Some(fold_length(length, value.as_bytes()))
        })?
        .ok()
}

/// What `Content-Length` fields say once `value` (one field's, maybe a comma list) is
/// added to what the fields before it said (`None`: there were none): `Ok(n)` while
/// every number is `n`, `Err` for good once one is not a number or differs.
fn fold_length(before: Option<Result<u64, ()>>, value: &[u8]) -> Result<u64, ()> {
    let mut length = before.transpose()?;
    for part in value.split(|&b| b == b',') {
        let n = parse_decimal(part.trim_ascii()).ok_or(())?;
        if length.is_some_and(|l| l != n) {
            return Err(());
        }
        length = Some(n);
    }
    length.ok_or(())
}

/// Digits only, at most 19 of them (no sign, no spaces).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes the connection.
    Eof,
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data: this many bytes to come.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
    /// The body has ended.
    Done,
}

/// What decoding a body found.
#[derive(Debug, PartialEq)]
enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

impl Chunked {
    fn new() -> Chunked {
        Chunked {
            state: ChunkState::Size,
        }
    }

    /// Decodes what `buf` holds: a part of the body, the trailers, or the end, taken
    /// from `buf`; `None` when it needs more bytes.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, Error> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Some(Decoded::Data(buf.split_to(n).freeze())));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Parse("a chunk's data does not end with CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(Some(Decoded::End));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let trailers = header_map(fields)?;
                            (len, trailers)
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_LINES => {
                            return Err(Error::TooLarge);
                        }
                        Ok(httparse::Status::Partial) => return Ok(None),
                        Err(_) => return Err(Error::Parse("the trailer section")),
                    };
                    // The section ends with its empty line: the body has ended.
                    buf.advance(len);
                    self.state = ChunkState::Done;
                    return Ok(Some(Decoded::Trailers(trailers)));
                }
                ChunkState::Done => return Ok(Some(Decoded::End)),
            }
        }
    }
}

/// Where the line at the start of `buf` ends (its CRLF); `None` until it is all there.
fn line_end(buf: &[u8]) -> Result<Option<usize>, Error> {
    match memchr::memchr(b'\n', buf) {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(Error::Parse("a chunk-size line does not end with CRLF")),
        None if buf.len() > MAX_LINES => Err(Error::TooLarge),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional whitespace and chunk extensions (which
/// are ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(Error::Parse("a chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(Error::Parse("a chunk size"));
    }
    if rest.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
        return Err(Error::Parse("a chunk extension"));
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(v)
    });
    Ok(size)
}

/// A header map from httparse's fields (a trailer section's).
fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| Error::Parse("a trailer field's name"))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| Error::Parse("a trailer field's value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// A response head read from the backend, with what reading its body needs.
struct Head {
    response: Response<()>,
    decoder: Option<Decoder>,
    keep_alive: bool,
}

/// Parses a response head of at most `max_head` bytes at the start of `buf` and takes
/// it; `None` until it is all there. Informational (1xx) heads are taken and skipped.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    max_head: usize,
) -> Result<Option<Head>, Error> {
    loop {
        // Uninitialised: filling a hundred fields per response would cost more than
        // parsing the usual handful.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let parser = httparse::ParserConfig::default();
        let len = match parser.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(Error::TooLarge),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::TooLarge),
            Err(_) => return Err(Error::Parse("the response head")),
        };
        if len > max_head {
            return Err(Error::TooLarge);
        }
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| Error::Parse("the status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                // wsgate asked for no upgrade on this connection.
                return Err(Error::Parse("an unrequested 101 response"));
            }
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // Where each name and value is: they stay where they are when the head is
        // split off, and the values share its bytes (no copy per value).
        let base = buf.as_ptr() as usize;
        let count = parsed.headers.len();
        // Filled where it lies (`collect` would build it, then move its kilobyte).
        let mut spans: SmallVec<[(usize, usize, usize, usize); 32]> = SmallVec::new();
        spans.extend(parsed.headers.iter().map(|f| {
            let name = f.name.as_ptr() as usize - base;
            let value = f.value.as_ptr() as usize - base;
            (name, name + f.name.len(), value, value + f.value.len())
        }));
        let reason = parsed.reason.unwrap_or("");
        let reason = (Some(reason) != status.canonical_reason())
            .then(|| hyper::ext::ReasonPhrase::try_from(reason.as_bytes().to_vec()).ok())
            .flatten();
        let bytes = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        let mut fields = ConnectionFields::default();
        for &(name_start, name_end, value_start, value_end) in &spans {
            let name = HeaderName::from_bytes(&bytes[name_start..name_end])
                .map_err(|_| Error::Parse("a header field's name"))?;
            let value = HeaderValue::from_maybe_shared(bytes.slice(value_start..value_end))
                .map_err(|_| Error::Parse("a header field's value"))?;
            if name == header::CONTENT_LENGTH {
                fields.length = Some(fold_length(fields.length, value.as_bytes()));
                headers.append(name, value);
            } else if let Some(field) = headers::hop_by_hop_field(&name) {
                fields.note(field, value);
            } else {
                headers.append(name, value);
            }
        }
        if !fields.naming.is_empty() {
            headers::remove_named_by_connection(&mut headers, &fields.naming);
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        if let Some(reason) = reason {
            response.extensions_mut().insert(reason);
        }
        let (decoder, keep_alive) = framing(&fields, &mut headers, status, version, head_request)?;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            decoder,
            keep_alive,
        }));
    }
}

/// What a response head's framing and connection fields say. They describe the
/// backend's connection, which this client owns, not the message (RFC 9110 §7.6.1):
/// read here as the head is parsed, the hop-by-hop ones are left out of the response's
/// header map (adding them and then removing them for the client cost more than
/// anything else wsgate did with a response head: bench/README.md).
#[derive(Default)]
struct ConnectionFields {
    /// `Connection` names `close`.
    close: bool,
    /// `Connection` names `keep-alive`.
    keep_alive: bool,
    /// The `Connection` values that name other fields, which are hop-by-hop too (rare).
    naming: Vec<HeaderValue>,
    /// The last `Transfer-Encoding` field, if there is one.
    transfer_encoding: Option<HeaderValue>,
    /// The `Content-Length` fields, folded ([`fold_length`]), if there are any.
    length: Option<Result<u64, ()>>,
}

impl ConnectionFields {
    /// Notes `value`, of a hop-by-hop `field`.
    fn note(&mut self, field: HopByHopField, value: HeaderValue) {
        if field == HopByHopField::Connection {
            let mut names_others = false;
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if headers::names_other_field(token) {
                    names_others = true;
                }
            }
            if names_others {
                self.naming.push(value);
            }
        } else if field == HopByHopField::TransferEncoding {
            self.transfer_encoding = Some(value);
        }
    }
}

/// How the body of a response whose head said `fields` ends (`None`: it has none), and
/// whether the connection can carry another request after it (RFC 9112 §6.3, §9.3).
/// A `Content-Length` beside a `Transfer-Encoding` is removed from `headers`.
fn framing(
    fields: &ConnectionFields,
    headers: &mut HeaderMap,
    status: StatusCode,
    version: Version,
    head_request: bool,
) -> Result<(Option<Decoder>, bool), Error> {
    let keep_alive = if version == Version::HTTP_11 {
        !fields.close
    } else {
        fields.keep_alive
    };
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((None, keep_alive));
    }
    if let Some(coding) = &fields.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(Error::Parse("Transfer-Encoding in an HTTP/1.0 response"));
        }
        let chunked = coding
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        // A length beside it would mislead whoever reads the head next: the client's
        // side frames the body anew.
        let with_length = headers.remove(header::CONTENT_LENGTH).is_some();
        return Ok(if chunked {
            (
                Some(Decoder::Chunked(Chunked::new())),
                keep_alive && !with_length,
            )
        } else {
            // Not chunked: the body ends with the connection.
            (Some(Decoder::Eof), false)
        });
    }
    match fields.length {
        Some(Ok(0)) => Ok((None, keep_alive)),
        Some(Ok(n)) => Ok((Some(Decoder::Length(n)), keep_alive)),
        Some(Err(())) => Err(Error::Parse("an invalid Content-Length")),
        None => Ok((Some(Decoder::Eof), false)),
    }
}

/// Where the connection's reading is.
#[derive(Debug)]
enum Reading {
    /// Between exchanges.
    Idle,
    /// Waiting for a response head.
    Head {
        head_request: bool,
    },
    Body(Decoder),
    /// The response has ended.
    Done,
}

/// One HTTP/1.1 connection to the backend, and the exchange it carries.
pub struct Conn {
    io: Stream,
    /// Bytes read from the backend and not yet taken.
    read: BytesMut,
    /// Bytes to write, in order.
    write: VecDeque<Bytes>,
    /// The request body still to send.
    body: Option<(RequestBody, Framing)>,
    reading: Reading,
    /// Nothing of the current request has been written yet.
    unsent: bool,
    /// Bytes were written since the last flush.
    unflushed: bool,
    /// The connection can carry another exchange once this one is done.
    keep_alive: bool,
    /// The longest response head accepted (`http.max_header_size`).
    max_head: usize,
    /// `read` was given room beyond [`KEPT_READ_SIZE`] (for a long head or body): its
    /// allocation is let go between exchanges, so that idle pooled connections do not
    /// each keep the largest buffer they ever needed. (`capacity()` cannot tell at the
    /// end: it counts only the room after what was split off.)
    grown: bool,
}

impl Conn {
    pub fn new(io: Stream, max_head: usize) -> Conn {
        Conn {
            io,
            read: BytesMut::new(),
            write: VecDeque::new(),
            body: None,
            reading: Reading::Idle,
            unsent: false,
            unflushed: false,
            keep_alive: true,
            max_head,
            grown: false,
        }
    }

    /// Starts an exchange: `req` goes out as the connection is polled.
    pub fn start(&mut self, req: Outgoing) {
        self.write.push_back(req.head);
        self.write.extend(req.framed);
        self.body = req.body;
        self.reading = Reading::Head {
            head_request: req.head_request,
        };
        self.unsent = true;
    }

    /// Writes what it can of the request and reads the response head.
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<()>, Failed>> {
        if let Err(e) = self.poll_send(cx) {
            let unsent = self.take_unsent();
            // Unless nothing went out (the request goes on another connection), the
            // backend may have answered before reading the whole body: read on.
            if unsent.is_some() || !self.stop_sending(&e) {
                return Poll::Ready(Err(Failed { error: e, unsent }));
            }
        }
        let Reading::Head { head_request } = self.reading else {
            return Poll::Ready(Err(Failed {
                error: Error::Parse("no request"),
                unsent: None,
            }));
        };
        loop {
            match parse_head(&mut self.read, head_request, self.max_head) {
                Ok(Some(head)) => {
                    self.keep_alive &= head.keep_alive;
                    self.reading = match head.decoder {
                        Some(decoder) => Reading::Body(decoder),
                        None => Reading::Done,
                    };
                    return Poll::Ready(Ok(head.response));
                }
                Ok(None) => {}
                Err(e) => {
                    self.keep_alive = false;
                    return Poll::Ready(Err(Failed {
                        error: e,
                        unsent: None,
                    }));
                }
            }
            match ready!(self.poll_fill(cx, READ_SIZE)) {
                Ok(0) => {
                    self.keep_alive = false;
                    let unsent = self.take_unsent();
                    return Poll::Ready(Err(Failed {
                        error: Error::Incomplete,
                        unsent,
                    }));
                }
                Ok(_) => {}
                Err(e) => {
                    self.keep_alive = false;
                    let unsent = self.take_unsent();
                    return Poll::Ready(Err(Failed {
                        error: e.into(),
                        unsent,
                    }));
                }
            }
        }
    }

    /// After `error` writing the request: when it was the socket's (the backend closed
    /// its side, typically having answered early — a 413 for an upload too large, a 401
    /// — and reset the connection on the body it left unread), the rest of the request is
    /// dropped and the response still read: it is often already in the socket's receive
    /// queue, and it is the answer the client should get, not a 502. The connection is
    /// not used again. `false` for the client's body failing or overrunning its length:
    /// the backend got a truncated request and the exchange ends.
    fn stop_sending(&mut self, error: &Error) -> bool {
        if !matches!(error, Error::Io(_)) {
            return false;
        }
        self.write.clear();
        self.body = None;
        self.unflushed = false;
        self.keep_alive = false;
        true
    }

    /// The request, when nothing of it has been written.
    fn take_unsent(&mut self) -> Option<Outgoing> {
        if !self.unsent {
            return None;
        }
        self.unsent = false;
        let head = self.write.pop_front()?;
        let head_request = matches!(self.reading, Reading::Head { head_request: true });
        self.reading = Reading::Done;
        Some(Outgoing {
            head,
            framed: self.write.drain(..).collect(),
            body: self.body.take(),
            head_request,
        })
    }

    /// The next part of the response body (`None`: it has ended), writing the rest of
    /// the request body meanwhile.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Err(e) = self.poll_send(cx)
            && !self.stop_sending(&e)
        {
            self.keep_alive = false;
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let Reading::Body(mut decoder) = self.reading else {
                return Poll::Ready(None);
            };
            let decoded = match &mut decoder {
                Decoder::Length(left) if !self.read.is_empty() => {
                    let n = self
                        .read
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    Some(Decoded::Data(self.read.split_to(n).freeze()))
                }
                Decoder::Length(_) => None,
                Decoder::Eof => {
                    (!self.read.is_empty()).then(|| Decoded::Data(self.read.split().freeze()))
                }
                Decoder::Chunked(chunked) => match chunked.decode(&mut self.read) {
                    Ok(decoded) => decoded,
                    Err(e) => {
                        self.keep_alive = false;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
            };
            self.reading = match (decoder, &decoded) {
                (Decoder::Length(0), _) | (_, Some(Decoded::Trailers(_) | Decoded::End)) => {
                    Reading::Done
                }
                (decoder, _) => Reading::Body(decoder),
            };
            match decoded {
                Some(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Some(Decoded::Trailers(trailers)) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Some(Decoded::End) => return Poll::Ready(None),
                None => {}
            }
            let want = match self.reading {
                Reading::Body(Decoder::Length(left)) => usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .clamp(READ_SIZE, 64 * 1024),
                _ => READ_SIZE,
            };
            match ready!(self.poll_fill(cx, want)) {
                Ok(0) => {
                    self.keep_alive = false;
                    if let Reading::Body(Decoder::Eof) = self.reading {
                        self.reading = Reading::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Error::Incomplete)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.keep_alive = false;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    /// The response has no more body to read.
    pub fn is_end_stream(&self) -> bool {
        matches!(self.reading, Reading::Done)
    }

    /// What is known of the response body's length.
    pub fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Body(Decoder::Length(left)) => SizeHint::with_exact(left),
            Reading::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// It can carry another exchange: the last one is over on both sides, and neither
    /// side said it would close.
    pub fn is_reusable(&self) -> bool {
        self.keep_alive
            && matches!(self.reading, Reading::Done | Reading::Idle)
            && self.body.is_none()
            && self.write.is_empty()
            && !self.unflushed
            && self.read.is_empty()
    }

    /// Between exchanges: ready for the next (`Reading::Idle`), a grown read buffer let
    /// go.
    pub fn reset(&mut self) {
        self.reading = Reading::Idle;
        self.unsent = false;
        if self.grown {
            self.read = BytesMut::new();
            self.grown = false;
        }
    }

    /// An idle connection is still open: reading it finds nothing (neither its end nor
    /// bytes nobody asked for).
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.is_reusable() {
            return false;
        }
        match self.poll_fill(cx, 1) {
            Poll::Pending => true,
            Poll::Ready(_) => {
                self.keep_alive = false;
                false
            }
        }
    }

    /// Reads more of the response into `read`, room for at least `want` bytes made.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < want.min(READ_SIZE) {
            self.read.reserve(want.max(READ_SIZE));
            self.grown |= self.read.capacity() > KEPT_READ_SIZE;
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }

    /// Flushes what was written, if anything was since the last flush (a TLS stream
    /// may hold records back until then).
    fn flush(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// Writes what can be written of the request: its head, then its body as the
    /// client sends it, framed. `Ok` when it is all written or the socket or the body
    /// must be waited for.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        loop {
            // What the body has ready goes out with what is queued, in one write: a head
            // and the body hyper read with it are one segment to the backend, not two.
            // (A chunk takes three pieces: its size line, its data, its CRLF.)
            while self.body.is_some() && self.write.len() + 3 <= MAX_SLICES {
                match self.poll_body(cx) {
                    Poll::Ready(polled) => polled?,
                    Poll::Pending => break,
                }
            }
            if self.write.is_empty() {
                return self.flush(cx);
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut n = 0;
            for (slot, piece) in slices.iter_mut().zip(self.write.iter()) {
                *slot = IoSlice::new(piece);
                n += 1;
            }
            let written = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ok(0)) => {
                    return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                }
                Poll::Ready(Ok(written)) => written,
                Poll::Ready(Err(e)) => return Err(e.into()),
            };
            self.unsent = false;
            self.unflushed = true;
            let mut left = written;
            while left > 0 {
                let Some(front) = self.write.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.write.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
    }

    /// Takes the request body's next part, if it has one ready, into the write queue,
    /// framed; at its end, the chunked body's last chunk.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Some((body, framing)) = &mut self.body else {
            return Poll::Ready(Ok(()));
        };
        let frame = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
            None => None,
            Some(Ok(frame)) => Some(frame),
            Some(Err(e)) => {
                self.keep_alive = false;
                self.body = None;
                return Poll::Ready(Err(Error::RequestBody(e)));
            }
        };
        match (frame, *framing) {
            (Some(frame), Framing::Length(left)) => {
                // Trailers cannot go with a length: dropped, as hyper does.
                if let Ok(data) = frame.into_data() {
                    let n = data.len() as u64;
                    if n > left {
                        self.keep_alive = false;
                        self.body = None;
                        return Poll::Ready(Err(Error::RequestLength));
                    }
                    *framing = Framing::Length(left - n);
                    if !data.is_empty() {
                        self.write.push_back(data);
                    }
                }
            }
            (Some(frame), Framing::Chunked) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    self.write
                        .push_back(Bytes::from(format!("{:X}\r\n", data.len())));
                    self.write.push_back(data);
                    self.write.push_back(Bytes::from_static(b"\r\n"));
                }
                Err(frame) => {
                    let mut end = b"0\r\n".to_vec();
                    if let Ok(trailers) = frame.into_trailers() {
                        for (name, value) in &trailers {
                            end.extend_from_slice(name.as_str().as_bytes());
                            end.extend_from_slice(b": ");
                            end.extend_from_slice(value.as_bytes());
                            end.extend_from_slice(b"\r\n");
                        }
                    }
                    end.extend_from_slice(b"\r\n");
                    self.write.push_back(Bytes::from(end));
                    self.body = None;
                }
            },
            (None, Framing::Length(left)) => {
                self.body = None;
                if left != 0 {
                    self.keep_alive = false;
                    return Poll::Ready(Err(Error::RequestLength));
                }
            }
            (None, Framing::Chunked) => {
                self.write.push_back(Bytes::from_static(b"0\r\n\r\n"));
                self.body = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What a client made of a response: its head, body and trailers, or that it failed
    /// (before the head, or in the body).
    #[derive(Debug, PartialEq)]
    enum Seen {
        Head(String),
        Response {
            status: u16,
            version: Version,
            reason: Option<Vec<u8>>,
            headers: Vec<(String, Vec<u8>)>,
            body: Vec<u8>,
            trailers: Vec<(String, Vec<u8>)>,
        },
        BodyFailed {
            status: u16,
            body: Vec<u8>,
        },
    }

    /// Every field, by name (a name's values in their order): a removal reorders a
    /// map's names.
    fn fields(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        let mut fields: Vec<_> = h
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        fields
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("timed out")
    }

    /// A backend on loopback that reads one request head and answers with `answer`, cut
    /// into the pieces `cuts` says (each written and flushed on its own), then closes.
    /// Returns the connection's client end and what the backend read.
    async fn answered(
        answer: Vec<u8>,
        cuts: Vec<usize>,
    ) -> (TcpStream, tokio::task::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let backend = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let mut at = 0;
            for cut in cuts.into_iter().chain([answer.len()]) {
                let cut = cut.clamp(at, answer.len());
                let _ = s.write_all(&answer[at..cut]).await;
                let _ = s.flush().await;
                // Lets the piece go out as its own segment.
                tokio::task::yield_now().await;
                at = cut;
            }
            request
        });
        (TcpStream::connect(addr).await.unwrap(), backend)
    }

    /// wsgate's client on `answer`.
    async fn ours(method: Method, answer: &[u8], cuts: &[usize]) -> Seen {
        let (s, backend) = answered(answer.to_vec(), cuts.to_vec()).await;
        let mut conn = Conn::new(Stream::Plain(s), 64 * 1024);
        let req = Request::builder()
            .method(method)
            .uri("/")
            .header("host", "backend")
            .body(RequestBody::empty())
            .unwrap();
        conn.start(Outgoing::new(req, &[]));
        let head = match within(std::future::poll_fn(|cx| conn.poll_head(cx))).await {
            Ok(head) => head,
            Err(failed) => return Seen::Head(failed.error.to_string()),
        };
        let mut body = Vec::new();
        let mut trailers = Vec::new();
        loop {
            match within(std::future::poll_fn(|cx| conn.poll_frame(cx))).await {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => body.extend_from_slice(&data),
                    Err(frame) => trailers = fields(&frame.into_trailers().unwrap()),
                },
                Some(Err(_)) => {
                    return Seen::BodyFailed {
                        status: head.status().as_u16(),
                        body,
                    };
                }
            }
        }
        let request = within(backend).await.unwrap();
        assert!(
            request.starts_with(b"GET / HTTP/1.1\r\n")
                || request.starts_with(b"HEAD / HTTP/1.1\r\n")
        );
        Seen::Response {
            status: head.status().as_u16(),
            version: head.version(),
            reason: head
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| r.as_bytes().to_vec()),
            headers: fields(head.headers()),
            body,
            trailers,
        }
    }

    /// hyper's client on `answer`, then the forwarding rules' removal of the hop-by-hop
    /// fields (wsgate's client drops them as it reads the head).
    async fn hypers(method: Method, answer: &[u8], cuts: &[usize]) -> Seen {
        let (s, backend) = answered(answer.to_vec(), cuts.to_vec()).await;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri("/")
            .header("host", "backend")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = match within(sender.send_request(req)).await {
            Ok(resp) => resp,
            Err(e) => return Seen::Head(e.to_string()),
        };
        let (mut parts, mut incoming) = resp.into_parts();
        crate::headers::remove_hop_by_hop(&mut parts.headers);
        let mut body = Vec::new();
        let mut trailers = Vec::new();
        while let Some(frame) = within(incoming.frame()).await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => body.extend_from_slice(&data),
                    Err(frame) => trailers = fields(&frame.into_trailers().unwrap()),
                },
                Err(_) => {
                    return Seen::BodyFailed {
                        status: parts.status.as_u16(),
                        body,
                    };
                }
            }
        }
        drop(backend);
        Seen::Response {
            status: parts.status.as_u16(),
            version: parts.version,
            reason: parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| r.as_bytes().to_vec()),
            headers: fields(&parts.headers),
            body,
            trailers,
        }
    }

    /// The same outcome: the same response, or both failed at the same point (the
    /// errors' words differ).
    fn same(a: &Seen, b: &Seen) -> bool {
        match (a, b) {
            (Seen::Head(_), Seen::Head(_)) => true,
            _ => a == b,
        }
    }

    /// Responses a backend may send, right and wrong: framings, informational heads,
    /// bodies cut short, malformed chunks and lengths.
    const ANSWERS: &[(&str, &[u8])] = &[
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1;q=\"a b\"\r\n world\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\nA\r\n0123456789\r\n000\r\nx-sum: 45\r\nx-more: a b\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: until the end\n\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot chunked, until the end"),
        ("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc"),
        ("GET", b"HTTP/1.0 200 OK\r\n\r\nuntil the end"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", b"HTTP/1.1 200 Fine By Me\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nServer: x\r\n\r\nok"),
        ("GET", b"HTTP/1.1 200 OK\r\nX-Trace: 1\r\nConnection: close, X-Trace\r\nConnection: x-other\r\nX-Other: 2\r\nX-Kept: 3\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nConnection: Upgrade\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX-Odd: \xe9t\xe9\r\nX-Empty:\r\n\r\nno"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\nhello"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nhello"),
        ("GET", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ;x\r\nhello\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\nhello\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nFolded: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nBad Name: a\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"SSH-2.0-OpenSSH\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Le"),
        ("GET", b""),
    ];

    /// wsgate's client and hyper's see every answer alike: whole, in two pieces cut
    /// inside the head, and in pieces cut inside the body.
    #[tokio::test]
    async fn the_client_reads_every_answer_as_hypers_client_does() {
        let mut differ = Vec::new();
        for (i, (method, answer)) in ANSWERS.iter().enumerate() {
            let method: Method = method.parse().unwrap();
            let head_end = answer
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(answer.len(), |p| p + 4);
            for cuts in [
                vec![],
                vec![head_end / 2],
                vec![head_end, head_end + 3, head_end + 9],
            ] {
                let a = ours(method.clone(), answer, &cuts).await;
                let b = hypers(method.clone(), answer, &cuts).await;
                if !same(&a, &b) {
                    differ.push(format!(
                        "answer {i} cut at {cuts:?}:\n  wsgate {a:?}\n  hyper  {b:?}"
                    ));
                }
            }
        }
        assert!(differ.is_empty(), "{}", differ.join("\n"));
    }

    /// A client's request body as hyper's server hands it over: the client has sent
    /// `sent` of a `Content-Length: len` body; the client's end is returned to send more.
    async fn request_body(len: usize, sent: &[u8]) -> (RequestBody, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(req.into_body());
            }
            // Never answered: the connection lives on and feeds the body.
            std::future::pending::<Result<Response<http_body_util::Empty<Bytes>>, io::Error>>()
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), service),
        );
        let head = format!("POST /up HTTP/1.1\r\nHost: client\r\nContent-Length: {len}\r\n\r\n");
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(sent).await.unwrap();
        let incoming = within(rx).await.unwrap();
        (
            RequestBody::new(incoming, std::time::Instant::now()).0,
            client,
        )
    }

    /// A request that a connection could not write at all (the backend had reset it) is
    /// given back whole, the body parts already gathered behind its head included, and
    /// another connection sends all of it.
    #[tokio::test]
    async fn a_request_given_back_unsent_keeps_the_body_parts_it_gathered() {
        let (body, mut client) = request_body(11, b"hello").await;
        let req = Request::builder()
            .method(Method::POST)
            .uri("/up")
            .header("host", "backend")
            .header("content-length", "11")
            .body(body)
            .unwrap();

        // A pooled connection the backend reset: nothing can be written to it.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let reset = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (peer, _) = l.accept().await.unwrap();
        socket2::SockRef::from(&peer)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(peer);
        within(reset.readable()).await.unwrap();
        let mut dead = Conn::new(Stream::Plain(reset), 64 * 1024);
        dead.start(Outgoing::new(req, &[]));
        let failed = match within(std::future::poll_fn(|cx| dead.poll_head(cx))).await {
            Ok(_) => panic!("a reset connection answered"),
            Err(failed) => failed,
        };
        let unsent = failed.unsent.expect("the request is given back");

        // A live backend that reads the whole request, body included, then answers.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let backend = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let body = request
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|end| request.len() - end - 4);
                if body.is_some_and(|n| n >= 11) {
                    break;
                }
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            request
        });
        let mut conn = Conn::new(Stream::Plain(s), 64 * 1024);
        conn.start(unsent);
        client.write_all(b" world").await.unwrap();
        let head = within(std::future::poll_fn(|cx| conn.poll_head(cx))).await;
        assert!(head.is_ok_and(|head| head.status() == StatusCode::OK));
        while let Some(frame) = within(std::future::poll_fn(|cx| conn.poll_frame(cx))).await {
            frame.unwrap();
        }
        let request = within(backend).await.unwrap();
        assert!(
            request.ends_with(b"\r\n\r\nhello world"),
            "{}",
            String::from_utf8_lossy(&request)
        );
    }

    /// A connection that carried a large body goes back to the pool with a small read
    /// buffer: idle connections do not each keep the largest buffer they ever needed.
    #[tokio::test]
    async fn a_reused_connection_lets_a_grown_read_buffer_go() {
        let body = vec![b'x'; 48 * 1024];
        let mut answer =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend_from_slice(&body);
        let (s, backend) = answered(answer, vec![]).await;
        let mut conn = Conn::new(Stream::Plain(s), 64 * 1024);
        let req = Request::builder()
            .uri("/")
            .header("host", "backend")
            .body(RequestBody::empty())
            .unwrap();
        conn.start(Outgoing::new(req, &[]));
        let head = within(std::future::poll_fn(|cx| conn.poll_head(cx))).await;
        assert!(head.is_ok_and(|head| head.status() == StatusCode::OK));
        let mut read = 0;
        while let Some(frame) = within(std::future::poll_fn(|cx| conn.poll_frame(cx))).await {
            read += frame.unwrap().into_data().unwrap().len();
        }
        within(backend).await.unwrap();
        assert_eq!(read, body.len());
        assert!(conn.grown, "the body never needed a larger buffer");
        assert!(conn.is_reusable());
        conn.reset();
        assert!(!conn.grown);
        assert_eq!(conn.read.capacity(), 0);
    }

    /// The one answer read differently on purpose: a `Content-Length` beside
    /// `Transfer-Encoding: chunked` (a smuggling pattern) is dropped, where hyper's client
    /// keeps it, since the next reader of the head (the client's side of wsgate) would
    /// frame the body by it; and the connection is not used again.
    #[tokio::test]
    async fn a_length_beside_chunked_is_dropped_where_hyper_keeps_it() {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let Seen::Response {
            headers: mut hyper_headers,
            ..
        } = hypers(Method::GET, answer, &[]).await
        else {
            panic!("hyper's client refused it");
        };
        let ours = ours(Method::GET, answer, &[]).await;
        hyper_headers.retain(|(n, _)| n != "content-length");
        assert_eq!(
            ours,
            Seen::Response {
                status: 200,
                version: Version::HTTP_11,
                reason: None,
                headers: hyper_headers,
                body: b"hello".to_vec(),
                trailers: vec![],
            }
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let fields = ConnectionFields {
            transfer_encoding: Some(HeaderValue::from_static("chunked")),
            length: Some(Ok(3)),
            ..ConnectionFields::default()
        };
        let (decoder, keep_alive) = framing(
            &fields,
            &mut headers,
            StatusCode::OK,
            Version::HTTP_11,
            false,
        )
        .unwrap();
        assert_eq!(decoder, Some(Decoder::Chunked(Chunked::new())));
        assert!(!keep_alive);
        assert!(headers.is_empty());
    }

    #[test]
    fn a_head_over_the_limit_is_refused_and_one_at_the_limit_read() {
        let head = |pad: usize| {
            let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-Pad: "[..]);
            b.extend_from_slice(&vec![b'a'; pad]);
            b.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
            b
        };
        let mut at = head(1000);
        let limit = at.len();
        assert!(parse_head(&mut at, false, limit).unwrap().is_some());
        let mut over = head(1001);
        assert!(matches!(
            parse_head(&mut over, false, limit),
            Err(Error::TooLarge)
        ));
        // Still incomplete, and already over the limit.
        let mut partial = head(2000);
        partial.truncate(limit + 10);
        assert!(matches!(
            parse_head(&mut partial, false, limit),
            Err(Error::TooLarge)
        ));
        let mut many = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse_head(&mut many, false, 1 << 20),
            Err(Error::TooLarge)
        ));
    }

    /// A body as chunks of the given sizes, each with an extension or not, and trailers.
    fn chunked(body: &[u8], sizes: &[usize], trailers: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        for (i, &size) in sizes.iter().enumerate() {
            let size = size.min(body.len() - at);
            if size == 0 {
                continue;
            }
            let ext = if i % 2 == 0 { ";name=\"v a\"" } else { "" };
            out.extend_from_slice(format!("{size:x}{ext}\r\n").as_bytes());
            out.extend_from_slice(&body[at..at + size]);
            out.extend_from_slice(b"\r\n");
            at += size;
        }
        if at < body.len() {
            out.extend_from_slice(format!("{:X}\r\n", body.len() - at).as_bytes());
            out.extend_from_slice(&body[at..]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for (n, v) in trailers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// However a chunked body is chunked and however its bytes arrive, the decoder
        /// gives back the body and the trailers, ends where it ends, and leaves what
        /// follows it (the next response) alone.
        #[test]
        fn chunked_bodies_decode_whatever_their_cuts(
            body in prop::collection::vec(any::<u8>(), 0..600),
            sizes in prop::collection::vec(0usize..200, 0..6),
            trailers in prop::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,12}"), 0..3),
            cuts in prop::collection::vec(0usize..1200, 0..8),
        ) {
            let trailers: Vec<(String, String)> = trailers
                .into_iter()
                .map(|(n, v)| (n, v.trim().to_string()))
                .collect();
            let mut wire = chunked(&body, &sizes, &trailers);
            let end = wire.len();
            wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut decoder = Chunked::new();
            let (mut buf, mut fed, mut got, mut seen_trailers, mut ended) =
                (BytesMut::new(), 0, Vec::new(), Vec::new(), false);
            for cut in cuts {
                buf.extend_from_slice(&wire[fed..cut]);
                fed = cut;
                while let Some(decoded) = decoder.decode(&mut buf).unwrap() {
                    match decoded {
                        Decoded::Data(d) => got.extend_from_slice(&d),
                        Decoded::Trailers(t) => seen_trailers = fields(&t),
                        Decoded::End => {}
                    }
                    if decoder.state == ChunkState::Done {
                        ended = true;
                        break;
                    }
                }
                if ended {
                    // The rest is the next response's, untouched.
                    prop_assert_eq!(&buf[..], &wire[end..fed]);
                    break;
                }
            }
            prop_assert!(ended);
            prop_assert_eq!(got, body);
            let mut expected: Vec<(String, Vec<u8>)> = trailers
                .iter()
                .map(|(n, v)| (n.clone(), v.as_bytes().to_vec()))
                .collect();
            expected.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(seen_trailers, expected);
        }

        /// A response head is incomplete at every cut before its end, and read whole, with
        /// its body's first bytes left in place, at its end.
        #[test]
        fn a_head_is_read_only_once_whole(pad in 0usize..300, cut in 0usize..400) {
            let wire = format!(
                "HTTP/1.1 200 OK\r\nX-Pad: {}\r\nContent-Length: 4\r\n\r\nbody",
                "p".repeat(pad)
            );
            let head_len = wire.len() - 4;
            let cut = cut % (wire.len() + 1);
            let mut buf = BytesMut::from(&wire.as_bytes()[..cut]);
            match parse_head(&mut buf, false, 64 * 1024).unwrap() {
                None => prop_assert!(cut < head_len),
                Some(head) => {
                    prop_assert!(cut >= head_len);
                    prop_assert_eq!(head.decoder, Some(Decoder::Length(4)));
                    prop_assert_eq!(&buf[..], &wire.as_bytes()[head_len..cut]);
                }
            }
        }
    }
}
