//! The byte streams wsgate relays — plain TCP or TLS over TCP on either side, and the
//! stream of a WebSocket carried by an HTTP/2 request (RFC 8441) — and what the relay
//! needs of each ([`Transport`]); and a stream with bytes already read in front of it
//! ([`Prefixed`]), for a connection whose first request wsgate looked at before hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream the relay can end abruptly.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Makes closing this stream reset the connection (RST) instead of a FIN, so a peer
    /// that stopped responding cannot hold kernel buffers until TCP gives up.
    fn abort_on_close(&self);

    /// The TCP socket, when the stream is nothing more (no TLS, no HTTP/2 framing): its
    /// bytes can then move by [`crate::splice`].
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }

    /// Ready when a read may make progress; `Pending` (with `cx` registered for the
    /// change) when a read certainly would not. Lets an idle pump wait without taking a
    /// read buffer. Streams that cannot tell (TLS may hold decrypted bytes) say ready.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }
}

/// One side's connection: TCP, with or without TLS, or one stream of an HTTP/2
/// connection.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session is large and most deployments terminate TLS elsewhere.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// A WebSocket over HTTP/2 (RFC 8441), as hyper hands it over: "aborting" it is
    /// dropping it, which resets the stream (RST_STREAM) without touching the
    /// connection's other streams.
    Http2(Box<TokioIo<Upgraded>>),
}

impl Stream {
    /// The ALPN protocol TLS negotiated, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(s) => s.get_ref().1.alpn_protocol(),
            Stream::Plain(_) | Stream::Http2(_) => None,
        }
    }
}

/// Forwards each I/O call to the stream inside.
macro_rules! each {
    ($stream:expr, $s:ident => $call:expr) => {
        match $stream {
            Stream::Plain($s) => $call,
            Stream::Tls($s) => {
                let $s = $s.as_mut();
                $call
            }
            Stream::Http2($s) => {
                let $s = $s.as_mut();
                $call
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Http2(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl Transport for Stream {
    fn abort_on_close(&self) {
        // Failing to set SO_LINGER leaves a normal close: acceptable.
        match self {
            Stream::Plain(s) => {
                let _ = s.set_zero_linger();
            }
            Stream::Tls(s) => {
                let _ = s.get_ref().0.set_zero_linger();
            }
            // Dropping the stream resets it; the connection carries other streams.
            Stream::Http2(_) => {}
        }
    }

    fn plain_tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(_) | Stream::Http2(_) => None,
        }
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Tls(_) | Stream::Http2(_) => Poll::Ready(Ok(())),
        }
    }
}

/// A stream whose first bytes were already read: reads return those first, then the
/// stream's own. Writes go to the stream.
#[derive(Debug)]
pub struct Prefixed<S> {
    read: Bytes,
    stream: S,
}

impl<S> Prefixed<S> {
    pub fn new(read: Bytes, stream: S) -> Self {
        Prefixed { read, stream }
    }

    /// The stream, and what of the prefix was not read yet.
    pub fn into_parts(self) -> (S, Bytes) {
        (self.stream, self.read)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_prefixed_stream_reads_its_prefix_first() {
        let (mut near, far) = tokio::io::duplex(64);
        let mut prefixed = Prefixed::new(Bytes::from_static(b"first "), far);
        near.write_all(b"then").await.unwrap();
        drop(near);
        let mut all = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut prefixed, &mut all)
            .await
            .unwrap();
        assert_eq!(all, "first then");
    }
}
