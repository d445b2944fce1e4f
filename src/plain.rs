//! PROTOTYPE (branch wip/h1-server, not for main): plain HTTP/1.1 requests served
//! without hyper's server, to measure what hyper's server leg costs per request. No
//! client-leaving watch, no stall watch, no drain, no idle limit: measurement only.

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use hyper::body::Body as _;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri, Version};
use tokio::io::AsyncWriteExt;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::client::{Busy, ClientConn, ClientIo};
use crate::gate::Gate;
use crate::proxy;
use crate::stream::Stream;

pub enum Served {
    Done,
    Fallback(Bytes, Stream),
}

enum Parsed {
    Plain(Request<()>, bool),
    Partial,
    Other,
}

fn parse(head: &Bytes) -> (Parsed, usize) {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut slots);
    let n = match parsed.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return (Parsed::Partial, 0),
        Err(_) => return (Parsed::Other, 0),
    };
    if parsed.version != Some(1) {
        return (Parsed::Other, 0);
    }
    let Some(method) = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
    else {
        return (Parsed::Other, 0);
    };
    if method == Method::CONNECT {
        return (Parsed::Other, 0);
    }
    let Some(target) = parsed.path.filter(|p| p.starts_with('/')) else {
        return (Parsed::Other, 0);
    };
    let Ok(uri) = Uri::from_maybe_shared(head.slice_ref(target.as_bytes())) else {
        return (Parsed::Other, 0);
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    let mut close = false;
    let headers = req.headers_mut();
    headers.reserve(parsed.headers.len());
    for h in parsed.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return (Parsed::Other, 0);
        };
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE
        {
            return (Parsed::Other, 0);
        }
        if name == header::CONNECTION && h.value.eq_ignore_ascii_case(b"close") {
            close = true;
        }
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice_ref(h.value)) else {
            return (Parsed::Other, 0);
        };
        headers.append(name, value);
    }
    (Parsed::Plain(req, close), n)
}

/// Reads into `buf` when it is empty, as hyper does while a request is in flight: the
/// client's end (EOF or an error) means it left. Bytes that come (a pipelined request)
/// are kept and nothing more is read. `Ready(())`: the client left.
fn poll_client_left<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    if !buf.is_empty() {
        return std::task::Poll::Pending;
    }
    buf.reserve(4096);
    match tokio_util::io::poll_read_buf(Pin::new(io), cx, buf) {
        std::task::Poll::Ready(Ok(0) | Err(_)) => std::task::Poll::Ready(()),
        _ => std::task::Poll::Pending,
    }
}

pub async fn serve(
    gate: Arc<Gate>,
    mut stream: ClientIo<Stream>,
    conn: Arc<ClientConn>,
    first: Bytes,
    closing: &AtomicBool,
) -> Served {
    let max = gate.settings().config.http.max_header_size;
    let mut buf = BytesMut::from(&first[..]);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let closing_now = || closing.load(Ordering::Relaxed) || conn.accepted_draining;
    loop {
        let (req, close) = loop {
            if !buf.is_empty() {
                let frozen = buf.split().freeze();
                match parse(&frozen) {
                    (Parsed::Plain(req, close), n) => {
                        let rest = &frozen[n..];
                        buf.extend_from_slice(rest);
                        break (req, close);
                    }
                    (Parsed::Partial, _) if frozen.len() <= max => {
                        buf.extend_from_slice(&frozen);
                    }
                    _ => return Served::Fallback(frozen, stream.into_inner()),
                }
            } else if closing.load(Ordering::Relaxed) {
                return Served::Done;
            }
            buf.reserve(4096);
            let read = std::future::poll_fn(|cx| {
                if buf.is_empty() && closing.load(Ordering::Relaxed) {
                    return std::task::Poll::Ready(Ok(0));
                }
                tokio_util::io::poll_read_buf(Pin::new(&mut stream), cx, &mut buf)
            })
            .await;
            match read {
                Ok(0) | Err(_) => return Served::Done,
                Ok(_) => {}
            }
        };
        let head_request = req.method() == Method::HEAD;
        let busy = Busy::new(conn.clone());
        let forwarding = proxy::forward_bodiless(gate.clone(), busy, req);
        let mut forwarding = std::pin::pin!(forwarding);
        let resp = std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(resp) = forwarding.as_mut().poll(cx) {
                return std::task::Poll::Ready(Some(resp));
            }
            poll_client_left(&mut stream, &mut buf, cx).map(|()| None)
        })
        .await;
        let Some(resp) = resp else {
            return Served::Done;
        };
        let close = close || closing_now();
        let (parts, mut body) = resp.into_parts();
        let close = close
            || parts
                .headers
                .get(header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let status = parts.status.as_u16();
        let bodiless = head_request || status == 204 || status == 304 || status < 200;
        let mut chunked = false;
        if !bodiless && !parts.headers.contains_key(header::CONTENT_LENGTH) {
            match body.size_hint().exact() {
                Some(n) => {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(n.to_string().as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                None => {
                    chunked = true;
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                }
            }
        }
        if close && !parts.headers.contains_key(header::CONNECTION) {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !bodiless {
            loop {
                let frame = std::future::poll_fn(|cx| {
                    if let std::task::Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                        return std::task::Poll::Ready(Some(frame));
                    }
                    poll_client_left(&mut stream, &mut buf, cx).map(|()| None)
                })
                .await;
                let Some(frame) = frame else {
                    return Served::Done;
                };
                match frame {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            if chunked {
                                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                            }
                            out.extend_from_slice(&data);
                            if chunked {
                                out.extend_from_slice(b"\r\n");
                            }
                            if body.is_end_stream() {
                                break;
                            }
                            if stream.write_all(&out).await.is_err() {
                                return Served::Done;
                            }
                            out.clear();
                        }
                    }
                    Some(Err(_)) => return Served::Done,
                    None => break,
                }
            }
            if chunked {
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        drop(body);
        if stream.write_all(&out).await.is_err() {
            return Served::Done;
        }
        if close {
            let _ = stream.shutdown().await;
            return Served::Done;
        }
    }
}
