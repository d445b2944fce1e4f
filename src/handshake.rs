//! The WebSocket opening handshake toward the backend, written and read by hand: the
//! request goes out in one write, and the response head is parsed with `httparse` as it
//! arrives. [`crate::upgrade`] decides what the request holds and what the answer means.
//!
//! A general HTTP client (hyper's) costs a connection task, channels between the request
//! and the connection, and an upgrade hand-off per WebSocket; for a request whose answer
//! is a bodiless 101 almost always, that was about a fifth of wsgate's user-space work per
//! WebSocket. Only the rare refusal has a body (Content-Length, chunked, or until close):
//! for that answer [`RefusalStream`] hands the bytes already read, and the rest of the stream, to
//! hyper's client, which knows every way a body can be framed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::stream::Prefixed;

/// Header lines accepted in a response head (hyper's client accepts 100).
const MAX_HEADERS: usize = 100;

/// Bytes read at once while waiting for the response head; a 101 is about 150 bytes.
const READ_CHUNK: usize = 1024;

/// Why the handshake with the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Writing the request or reading the answer failed: the backend is gone.
    #[error("backend connection failed: {0}")]
    Io(#[from] io::Error),
    /// The backend closed the connection before a whole response head.
    #[error("the backend closed the connection before answering")]
    Closed,
    /// The answer is not an HTTP/1.x response head.
    #[error("invalid response head: {0}")]
    Invalid(&'static str),
    /// The response head is larger than `http.max_header_size`.
    #[error("response head over {0} bytes")]
    TooLarge(usize),
}

/// A request head being written for one write: `GET {target} HTTP/1.1`, then header
/// lines, then the blank line.
pub struct RequestHead {
    out: Vec<u8>,
}

impl RequestHead {
    /// Starts `GET` of `target`'s path and query; `headers_size` is a guess of the
    /// header lines' size, so that the buffer grows at most once.
    pub fn get(target: &Uri, headers_size: usize) -> Self {
        let target = target.path_and_query().map_or("/", |p| p.as_str());
        let mut out = Vec::with_capacity(target.len() + headers_size + 32);
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        RequestHead { out }
    }

    /// Adds one header line. A `HeaderName` or `HeaderValue` holds no CR or LF (the http
    /// crate refuses them), so no line can end early and smuggle another header.
    pub fn header(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.out.extend_from_slice(name.as_str().as_bytes());
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// The whole head, ending with the blank line.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(b"\r\n");
        self.out
    }
}

/// The backend's answer, as far as it was read.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Everything read from the backend: the head, then whatever followed it.
    read: BytesMut,
    /// Length of the head within `read`.
    head_len: usize,
}

impl ResponseHead {
    /// The bytes the backend sent behind its head (the first frames, after a 101).
    pub fn into_rest(mut self) -> Bytes {
        self.read.advance(self.head_len);
        self.read.freeze()
    }

    /// Everything read, head included, for [`RefusalStream`].
    pub fn into_read(self) -> Bytes {
        self.read.freeze()
    }
}

/// Writes `request` and reads until a whole response head arrived, which must fit in
/// `max_head` bytes.
pub async fn exchange<S>(
    stream: &mut S,
    request: &[u8],
    max_head: usize,
) -> Result<ResponseHead, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request).await?;
    // TLS buffers what it encrypts until flushed.
    stream.flush().await?;
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if read.capacity() == read.len() {
            read.reserve(READ_CHUNK.max(read.len()));
        }
        let n = tokio_util::io::read_buf(stream, &mut read).await?;
        match parse(&read)? {
            Some((status, headers, head_len)) => {
                return Ok(ResponseHead {
                    status,
                    headers,
                    read,
                    head_len,
                });
            }
            None if read.len() > max_head => return Err(HandshakeError::TooLarge(max_head)),
            None if n == 0 => return Err(HandshakeError::Closed),
            None => {}
        }
    }
}

/// Parses a response head from the start of `buf`: `None` while it is incomplete.
fn parse(buf: &[u8]) -> Result<Option<(StatusCode, HeaderMap, usize)>, HandshakeError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::Invalid("too many header lines"));
        }
        Err(_) => return Err(HandshakeError::Invalid("not an HTTP/1.x response")),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(HandshakeError::Invalid("bad status code"))?;
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| HandshakeError::Invalid("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| HandshakeError::Invalid("bad header value"))?;
        headers.append(name, value);
    }
    Ok(Some((status, headers, head_len)))
}

/// A backend stream whose first bytes were already read: reads return those first, then
/// what the stream has. Writes are swallowed, since the request they would carry already
/// went out. This lets hyper's client read a refused handshake's response, body
/// framing and all, as if it had sent the request itself.
pub struct RefusalStream<S> {
    stream: Prefixed<S>,
    /// Nothing is readable before the request is "written": an HTTP client treats bytes
    /// that arrive while no request is in flight as an error.
    requested: bool,
    /// The reader waiting for that write.
    reader: Option<Waker>,
}

impl<S> RefusalStream<S> {
    pub fn new(read: Bytes, stream: S) -> Self {
        RefusalStream {
            stream: Prefixed::new(read, stream),
            requested: false,
            reader: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RefusalStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.requested {
            this.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RefusalStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.requested = true;
        if let Some(reader) = this.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn the_request_is_one_http_1_1_head_with_every_header() {
        let uri: Uri = "/ws/live?room=7".parse().unwrap();
        let mut head = RequestHead::get(&uri, 0);
        for (name, value) in [
            ("host", "dash.example"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ] {
            head.header(
                &HeaderName::from_static(name),
                &HeaderValue::from_static(value),
            );
        }
        let text = String::from_utf8(head.finish()).unwrap();
        assert!(
            text.starts_with("GET /ws/live?room=7 HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        // httparse reads back exactly what went in, repeated headers included.
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut slots);
        assert_eq!(
            req.parse(text.as_bytes()).unwrap(),
            httparse::Status::Complete(text.len())
        );
        let seen: Vec<(&str, &[u8])> = req.headers.iter().map(|h| (h.name, h.value)).collect();
        assert_eq!(
            seen,
            vec![
                ("host", &b"dash.example"[..]),
                ("cookie", b"a=1"),
                ("cookie", b"b=2"),
                ("sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            ]
        );
        let no_path = RequestHead::get(&Uri::from_static("http://h"), 0).finish();
        assert_eq!(no_path, b"GET / HTTP/1.1\r\n\r\n");
    }

    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
        Sec-WebSocket-Protocol: chat\r\n\r\n";

    #[test]
    fn a_head_parses_only_once_complete() {
        for end in 0..HEAD.len() {
            assert!(parse(&HEAD[..end]).unwrap().is_none(), "{end}");
        }
        let (status, headers, len) = parse(HEAD).unwrap().unwrap();
        assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(len, HEAD.len());
        assert_eq!(headers["sec-websocket-protocol"], "chat");
        assert_eq!(headers.len(), 4);
    }

    #[test]
    fn garbage_and_header_floods_are_refused() {
        for bad in [
            &b"HTTP/1.1 banana\r\n\r\n"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"HTTP/1.1 101 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 1010 Too long\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HandshakeError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut flood = b"HTTP/1.1 101 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            flood.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        flood.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse(&flood),
            Err(HandshakeError::Invalid("too many header lines"))
        ));
    }

    /// A scripted backend: answers the request with `chunks`, one write each.
    async fn exchange_with(
        chunks: Vec<Vec<u8>>,
        max_head: usize,
    ) -> (Result<ResponseHead, HandshakeError>, Vec<u8>) {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let backend = tokio::spawn(async move {
            let mut seen = vec![0u8; 4];
            theirs.read_exact(&mut seen).await.unwrap();
            for chunk in chunks {
                theirs.write_all(&chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            seen
        });
        let head = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            exchange(&mut ours, b"GET ", max_head),
        )
        .await
        .unwrap();
        let seen = backend.await.unwrap();
        (head, seen)
    }

    #[tokio::test]
    async fn a_head_split_over_reads_is_whole_and_the_first_frames_are_kept() {
        let frame = [0x81u8, 0x02, b'h', b'i'];
        let (a, b) = HEAD.split_at(40);
        let mut tail = b.to_vec();
        tail.extend_from_slice(&frame);
        let (head, seen) = exchange_with(vec![a.to_vec(), tail], 64 * 1024).await;
        assert_eq!(seen, b"GET ");
        let head = head.unwrap();
        assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(head.into_rest(), &frame[..]);
    }

    #[tokio::test]
    async fn a_backend_that_closes_early_or_talks_too_much_fails() {
        let (head, _) = exchange_with(vec![HEAD[..20].to_vec()], 64 * 1024).await;
        assert!(matches!(head, Err(HandshakeError::Closed)), "{head:?}");
        let mut long = b"HTTP/1.1 101 OK\r\nx: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 5000));
        let (head, _) = exchange_with(vec![long], 2048).await;
        assert!(
            matches!(head, Err(HandshakeError::TooLarge(2048))),
            "{head:?}"
        );
    }

    #[tokio::test]
    async fn a_refusal_stream_reads_what_was_read_then_the_stream_and_swallows_writes() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut refusal = RefusalStream::new(Bytes::from_static(b"HTTP/1.1 403 "), ours);
        // Nothing to read before the request went out, however much was read before.
        let mut byte = [0u8; 1];
        let mut early = ReadBuf::new(&mut byte);
        let pending = std::future::poll_fn(|cx| {
            Poll::Ready(
                Pin::new(&mut refusal)
                    .poll_read(cx, &mut early)
                    .is_pending(),
            )
        });
        assert!(pending.await);
        refusal.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        theirs.write_all(b"Forbidden\r\n").await.unwrap();
        drop(theirs);
        let mut got = String::new();
        refusal.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "HTTP/1.1 403 Forbidden\r\n");
    }
}
