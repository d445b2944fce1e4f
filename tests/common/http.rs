//! HTTP helpers shared by the test files: in-process hyper backends (plain and
//! streaming), and HTTP/1.1 and HTTP/2 clients. Every await is bounded by [`within`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{listener, within};

/// Any error a test body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of the scripted backends' responses and of the clients' requests.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// An in-process hyper HTTP/1.1 backend on 127.0.0.1:0 serving `handler`. Returns its
/// address and the number of TCP connections it has accepted.
pub async fn http_backend<F, Fut>(handler: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let (l, addr) = listener().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// A body fed from a channel: what the test sends on the returned sender goes out as a
/// data frame; an `Err` ends the body with an error (hyper then aborts the response);
/// dropping the sender ends the body cleanly.
pub fn channel_body() -> (mpsc::UnboundedSender<Result<Bytes, ()>>, Body) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Bytes, ()>>();
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|item| {
            item.map(|r| {
                r.map(Frame::data)
                    .map_err(|()| BoxError::from("aborted by the test"))
            })
        })
    });
    (tx, StreamBody::new(stream).boxed())
}

/// A `text/event-stream` response whose events the returned sender feeds.
pub fn event_stream() -> (mpsc::UnboundedSender<Result<Bytes, ()>>, Response<Body>) {
    let (tx, body) = channel_body();
    let resp = Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap();
    (tx, resp)
}

/// The `n`-th event of the test streams: `event: row` and a data line.
pub fn event(n: usize) -> Bytes {
    Bytes::from(format!("event: row\ndata: {{\"n\":{n}}}\n\n"))
}

/// Feeds `count` events, one every `every`, then ends the body cleanly.
pub fn feed_events(tx: mpsc::UnboundedSender<Result<Bytes, ()>>, count: usize, every: Duration) {
    tokio::spawn(async move {
        for n in 0..count {
            if tx.send(Ok(event(n))).is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// An HTTP/2 client connection (h2c, prior knowledge) to `addr`: the sender and the
/// task driving the connection (it ends when the connection does).
pub async fn h2c_connect(addr: SocketAddr) -> (SendRequest<Body>, JoinHandle<hyper::Result<()>>) {
    let tcp = within(TcpStream::connect(addr)).await.unwrap();
    h2_handshake(tcp).await
}

/// An HTTP/2 client connection over `io`.
pub async fn h2_handshake<I>(io: I) -> (SendRequest<Body>, JoinHandle<hyper::Result<()>>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = within(hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(io),
    ))
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

/// A request for `path` with the given method, to send over HTTP/2 (an absolute URI
/// gives `:authority`).
pub fn h2_request(method: &str, path: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("http://dash.example{path}"))
        .body(body)
        .unwrap()
}

/// Reads a response body to its end; `Ok` with the bytes when it ended cleanly (the
/// final chunk, END_STREAM), `Err` with what arrived when it was cut (an error).
pub async fn read_body(mut body: Incoming) -> Result<Vec<u8>, Vec<u8>> {
    let mut got = Vec::new();
    loop {
        match within(body.frame()).await {
            None => return Ok(got),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => return Err(got),
        }
    }
}

/// Opens an RFC 8441 WebSocket on an HTTP/2 connection; returns its stream.
pub async fn h2_websocket(
    sender: &mut SendRequest<Body>,
    path: &str,
) -> TokioIo<hyper::upgrade::Upgraded> {
    let mut req = Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(format!("http://dash.example{path}"))
        .header("sec-websocket-version", "13")
        .body(empty())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = within(sender.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    TokioIo::new(within(hyper::upgrade::on(resp)).await.unwrap())
}
