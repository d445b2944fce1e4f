//! Plain HTTP forwarding and the refusals around WebSocket upgrades: what the client and
//! the backend each see on the wire. Real sockets on loopback; backends are in-process
//! hyper servers or scripted raw listeners.
// The backend and client helpers below run outside #[test] functions; a failed unwrap
// there is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use wsgate::config::MaxConnections;

/// What an HTTP backend saw of one request.
#[derive(Debug)]
struct Seen {
    method: hyper::Method,
    /// The request target as sent on the wire (origin-form: path and query).
    target: String,
    headers: HeaderMap,
}

/// A backend that records every request head on the returned channel and answers each
/// with `respond(&request)`.
async fn recording_backend(
    respond: impl Fn(&Seen) -> Response<Body> + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let respond = Arc::new(respond);
    let (addr, accepted) = http_backend(move |req: Request<Incoming>| {
        let seen = Seen {
            method: req.method().clone(),
            target: req
                .uri()
                .path_and_query()
                .map_or_else(String::new, |p| p.to_string()),
            headers: req.headers().clone(),
        };
        let resp = respond(&seen);
        let _ = tx.send(seen);
        async move { resp }
    })
    .await;
    (addr, accepted, rx)
}

/// Reads one response whose body is delimited by Content-Length, leaving the connection
/// usable for the next request. Returns (head, body).
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let (head, mut body) = read_head(s).await;
    let len: usize = header(&head, "content-length")
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"))
        .parse()
        .unwrap();
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        let n = within(s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "connection closed inside a body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len, "bytes after the body: {head}");
    (head, body)
}

/// Sends `request` on a fresh connection and reads one Content-Length response.
async fn request_once(addr: SocketAddr, request: &str) -> (String, Vec<u8>) {
    let mut s = within(TcpStream::connect(addr)).await.unwrap();
    within(s.write_all(request.as_bytes())).await.unwrap();
    read_response(&mut s).await
}

/// Decodes a complete chunked body (RFC 9112 §7.1), trailers ignored.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_line = std::str::from_utf8(&raw[..line_end]).unwrap();
        let size_hex = size_line.split(';').next().unwrap().trim();
        let size = usize::from_str_radix(size_hex, 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n", "chunk not followed by CRLF");
        raw = &raw[size + 2..];
    }
}

/// FNV-1a, 64 bits: a checksum independent of the transport.
fn fnv1a(mut hash: u64, data: &[u8]) -> u64 {
    for b in data {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// `len` bytes of a deterministic pseudo-random pattern (xorshift), so that a dropped,
/// repeated or reordered block changes the checksum.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Accepts one connection on `l`, reads a request head and answers `response` verbatim.
/// Returns the head it read and the socket, kept open.
async fn scripted_once(l: &TcpListener, response: &str) -> (String, TcpStream) {
    let (mut s, _) = within(l.accept()).await.unwrap();
    let (head, _) = read_head(&mut s).await;
    within(s.write_all(response.as_bytes())).await.unwrap();
    (head, s)
}

fn is_gate_error(head: &str, what: &str) -> bool {
    header(head, "wsgate-error") == Some(what)
}

#[tokio::test]
async fn get_round_trip_keeps_host_path_and_adds_forwarded_headers() {
    let (backend_addr, _, mut seen) = recording_backend(|_| {
        Response::builder()
            .status(StatusCode::OK)
            .header("x-backend", "dash-v2")
            .header("content-type", "text/plain")
            .body(full("hello from the backend"))
            .unwrap()
    })
    .await;
    let gate = start_gate(test_config(backend_addr)).await;

    let (head, body) = http_raw(
        gate.addr,
        "GET /api/v1/search?q=a%20b&page=2 HTTP/1.1\r\nHost: dash.example\r\n\
         Accept: text/plain\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(header(&head, "x-backend"), Some("dash-v2"), "{head}");
    assert_eq!(header(&head, "wsgate-error"), None, "{head}");
    assert_eq!(body, b"hello from the backend");

    let req = within(seen.recv()).await.unwrap();
    assert_eq!(req.method, hyper::Method::GET);
    assert_eq!(req.target, "/api/v1/search?q=a%20b&page=2");
    let h = &req.headers;
    assert_eq!(h["host"], "dash.example");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "dash.example");
    assert_eq!(h["accept"], "text/plain");
    assert_eq!(h.get_all("host").iter().count(), 1);
}

#[tokio::test]
async fn large_chunked_post_streams_both_ways() {
    const TOTAL: usize = 8 * 1024 * 1024;
    const HALF: usize = TOTAL / 2;

    // The backend echoes the body as it arrives, counting and hashing it on the way,
    // and reports (length, checksum) once the request body has ended.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, u64)>();
    let (backend_addr, _) = http_backend(move |req: Request<Incoming>| {
        let done = done_tx.clone();
        async move {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(8);
            let mut body = req.into_body();
            tokio::spawn(async move {
                let (mut len, mut hash) = (0, FNV_OFFSET);
                while let Some(frame) = body.frame().await {
                    let frame = match frame {
                        Ok(f) => f,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    if let Some(data) = frame.data_ref() {
                        len += data.len();
                        hash = fnv1a(hash, data);
                    }
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                let _ = done.send((len, hash));
            });
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            Response::new(StreamBody::new(frames).map_err(BoxError::from).boxed())
        }
    })
    .await;
    let gate = start_gate(test_config(backend_addr)).await;

    let data = Arc::new(pattern(TOTAL));
    let s = within(TcpStream::connect(gate.addr)).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let (progress_tx, mut progress_rx) = watch::channel(0usize);

    // The writer sends the first half, then waits until the client has received at least
    // half the size back before sending the rest: this only completes if wsgate streams
    // the request to the backend and the response to the client without buffering
    // either whole.
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        let head = "POST /upload?name=blob HTTP/1.1\r\nHost: dash.example\r\n\
                    Content-Type: application/octet-stream\r\n\
                    Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        within(wr.write_all(head.as_bytes())).await.unwrap();
        let (mut at, mut i, mut waited) = (0, 0usize, false);
        while at < sent.len() {
            if at >= HALF && !waited {
                within(progress_rx.wait_for(|n| *n >= HALF)).await.unwrap();
                waited = true;
            }
            // Chunks of varying sizes, 1 KiB to ~65 KiB.
            let size = (1024 + (i * 7919) % 64_000).min(sent.len() - at);
            let mut chunk = format!("{size:x}\r\n").into_bytes();
            chunk.extend_from_slice(&sent[at..at + size]);
            chunk.extend_from_slice(b"\r\n");
            within(wr.write_all(&chunk)).await.unwrap();
            at += size;
            i += 1;
        }
        within(wr.write_all(b"0\r\n\r\n")).await.unwrap();
        // The write half is handed back, not dropped: dropping it sends FIN, and hyper
        // (wsgate's server) drops a connection whose client half-closes mid-response.
        (i, wr)
    });

    let mut raw = Vec::new();
    let mut head_end = None;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = within(rd.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if head_end.is_none() {
            head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if let Some(end) = head_end {
            progress_tx.send_replace(raw.len() - end);
        }
    }
    let (chunks, _write_half) = within(writer).await.unwrap();
    assert!(chunks > 100, "the body went in {chunks} chunks");

    let end = head_end.expect("no response head");
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    assert_eq!(status(head), 200, "{head}");
    let echoed = match header(head, "content-length") {
        Some(_) => raw[end..].to_vec(),
        None => {
            assert_eq!(header(head, "transfer-encoding"), Some("chunked"), "{head}");
            dechunk(&raw[end..])
        }
    };
    assert_eq!(echoed.len(), TOTAL);
    assert!(echoed == *data, "the echoed body differs from the one sent");

    let (len, hash) = within(done_rx.recv()).await.unwrap();
    assert_eq!(len, TOTAL, "length the backend received");
    assert_eq!(
        hash,
        fnv1a(FNV_OFFSET, &data),
        "checksum of what the backend got"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let (backend_l, backend_addr) = listener().await;
    let gate = start_gate(test_config(backend_addr)).await;

    let body = "ok";
    let response = format!(
        "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nConnection: X-Backend-Hop\r\n\
         X-Backend-Hop: 1\r\nX-End-To-End: kept\r\nSet-Cookie: s=1\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let backend = tokio::spawn(async move { scripted_once(&backend_l, &response).await });

    let (head, got) = request_once(
        gate.addr,
        "GET /hop HTTP/1.1\r\nHost: dash.example\r\nConnection: keep-alive, X-Secret-Hop\r\n\
         X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
         Proxy-Connection: keep-alive\r\nCookie: a=b\r\n\r\n",
    )
    .await;
    let (seen, _backend_socket) = within(backend).await.unwrap();

    // Request direction.
    assert!(seen.starts_with("GET /hop HTTP/1.1\r\n"), "{seen}");
    assert_eq!(header(&seen, "cookie"), Some("a=b"), "{seen}");
    assert_eq!(header(&seen, "host"), Some("dash.example"), "{seen}");
    for hop in ["x-secret-hop", "keep-alive", "te", "proxy-connection"] {
        assert_eq!(
            header(&seen, hop),
            None,
            "{hop} reached the backend:\n{seen}"
        );
    }
    if let Some(connection) = header(&seen, "connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-secret-hop"),
            "{seen}"
        );
    }

    // Response direction.
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(got, body.as_bytes());
    assert_eq!(header(&head, "x-end-to-end"), Some("kept"), "{head}");
    assert_eq!(header(&head, "set-cookie"), Some("s=1"), "{head}");
    for hop in ["x-backend-hop", "keep-alive"] {
        assert_eq!(
            header(&head, hop),
            None,
            "{hop} reached the client:\n{head}"
        );
    }
    if let Some(connection) = header(&head, "connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-backend-hop"),
            "{head}"
        );
    }
}

#[tokio::test]
async fn backend_down_is_a_502_for_http_and_upgrades() {
    let dead = dead_addr();
    let gate = start_gate(test_config(dead.addr)).await;

    let (head, body) = http_raw(
        gate.addr,
        "GET / HTTP/1.1\r\nHost: dash.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 502, "{head}");
    assert!(is_gate_error(&head, "backend_unreachable"), "{head}");
    assert!(!body.is_empty());

    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    within(s.write_all(upgrade_request("/ws", "").as_bytes()))
        .await
        .unwrap();
    let (head, _) = read_head(&mut s).await;
    assert_eq!(status(&head), 502, "{head}");
    assert!(is_gate_error(&head, "backend_unreachable"), "{head}");
}

/// Accepts one connection, reads its request head, never answers, and reads on until
/// the connection ends. Returns the head.
async fn silent_backend(l: &TcpListener) -> String {
    let (mut s, _) = within(l.accept()).await.unwrap();
    let (head, _) = read_head(&mut s).await;
    let mut sink = [0u8; 1024];
    // wsgate gives up on the request: it must not keep the backend connection.
    while within(s.read(&mut sink)).await.unwrap_or(0) > 0 {}
    head
}

#[tokio::test]
async fn backend_that_never_answers_is_a_504() {
    const LIMIT: Duration = Duration::from_millis(300);
    let (backend_l, backend_addr) = listener().await;
    let mut config = test_config(backend_addr);
    config.http.response_timeout = Some(LIMIT);
    let gate = start_gate(config).await;
    let backend_l = Arc::new(backend_l);

    let l = backend_l.clone();
    let backend = tokio::spawn(async move { silent_backend(&l).await });
    let started = Instant::now();
    let (head, _) = http_raw(
        gate.addr,
        "GET /slow HTTP/1.1\r\nHost: dash.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 504, "{head}");
    assert!(is_gate_error(&head, "backend_timeout"), "{head}");
    assert!(
        started.elapsed() >= LIMIT,
        "answered after {:?}",
        started.elapsed()
    );
    let seen = within(backend).await.unwrap();
    assert!(seen.starts_with("GET /slow HTTP/1.1\r\n"), "{seen}");

    // The same limit applies to the backend's answer to an upgrade.
    let l = backend_l.clone();
    let backend = tokio::spawn(async move { silent_backend(&l).await });
    let started = Instant::now();
    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    within(s.write_all(upgrade_request("/ws", "").as_bytes()))
        .await
        .unwrap();
    let (head, _) = read_head(&mut s).await;
    assert_eq!(status(&head), 504, "{head}");
    assert!(is_gate_error(&head, "backend_timeout"), "{head}");
    assert!(
        started.elapsed() >= LIMIT,
        "answered after {:?}",
        started.elapsed()
    );
    let seen = within(backend).await.unwrap();
    assert!(seen.starts_with("GET /ws HTTP/1.1\r\n"), "{seen}");
}

#[tokio::test]
async fn refused_upgrade_reaches_the_client_unchanged() {
    let (backend_l, backend_addr) = listener().await;
    let gate = start_gate(test_config(backend_addr)).await;

    let body = "token missing or expired\n";
    let response = format!(
        "HTTP/1.1 403 Forbidden\r\nx-reason: no token\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let backend = tokio::spawn(async move { scripted_once(&backend_l, &response).await });

    let (head, got) = request_once(gate.addr, &upgrade_request("/ws", "")).await;
    let (seen, _backend_socket) = within(backend).await.unwrap();
    assert!(seen.starts_with("GET /ws HTTP/1.1\r\n"), "{seen}");
    assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
    assert_eq!(header(&head, "x-reason"), Some("no token"), "{head}");
    assert_eq!(header(&head, "content-type"), Some("text/plain"), "{head}");
    assert_eq!(header(&head, "wsgate-error"), None, "{head}");
    assert_eq!(header(&head, "upgrade"), None, "{head}");
    assert_eq!(got, body.as_bytes());
}

#[tokio::test]
async fn refusals_with_chunked_or_close_delimited_bodies_reach_the_client_whole() {
    let (backend_l, backend_addr) = listener().await;
    let gate = start_gate(test_config(backend_addr)).await;
    let request = upgrade_request("/ws", "Connection: close\r\n");

    // Chunked, arriving in pieces: part of the body in the same write as the head.
    let backend = async {
        let (mut s, _) = within(backend_l.accept()).await.unwrap();
        read_head(&mut s).await;
        for part in [
            &b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\nx-reason: expired\r\n\r\n6\r\nlog in"[..],
            b"\r\n7\r\n again\n\r\n",
            b"0\r\n\r\n",
        ] {
            within(s.write_all(part)).await.unwrap();
            within(s.flush()).await.unwrap();
        }
        s
    };
    let ((head, raw), _s) = tokio::join!(http_raw(gate.addr, &request), backend);
    assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
    assert_eq!(header(&head, "x-reason"), Some("expired"), "{head}");
    let body = if header(&head, "transfer-encoding").is_some() {
        dechunk(&raw)
    } else {
        raw
    };
    assert_eq!(body, b"log in again\n");

    // No length at all: the body ends when the backend closes.
    let backend = async {
        let (mut s, _) = within(backend_l.accept()).await.unwrap();
        read_head(&mut s).await;
        within(s.write_all(b"HTTP/1.1 404 Not Found\r\n\r\nno such room"))
            .await
            .unwrap();
    };
    let ((head, raw), ()) = tokio::join!(http_raw(gate.addr, &request), backend);
    assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
    let body = if header(&head, "transfer-encoding").is_some() {
        dechunk(&raw)
    } else {
        raw
    };
    assert_eq!(body, b"no such room");
}

#[tokio::test]
async fn a_response_head_over_max_header_size_is_a_502() {
    let (backend_l, backend_addr) = listener().await;
    let mut config = test_config(backend_addr);
    config.http.max_header_size = 4096;
    let gate = start_gate(config).await;
    let backend = async {
        let (mut s, _) = within(backend_l.accept()).await.unwrap();
        read_head(&mut s).await;
        let huge = format!(
            "HTTP/1.1 101 Switching Protocols\r\nx-padding: {}\r\n",
            "a".repeat(8192)
        );
        // wsgate may close while this is still being written.
        let _ = within(s.write_all(huge.as_bytes())).await;
        s
    };
    let request = upgrade_request("/ws", "Connection: close\r\n");
    let ((head, _), _s) = tokio::join!(http_raw(gate.addr, &request), backend);
    assert_eq!(status(&head), 502, "{head}");
    assert!(is_gate_error(&head, "backend_failed"), "{head}");
}

#[tokio::test]
async fn a_forwarded_responses_head_over_max_header_size_is_a_502_and_one_under_passes() {
    let (backend_l, backend_addr) = listener().await;
    let mut config = test_config(backend_addr);
    config.http.max_header_size = 4096;
    let gate = start_gate(config).await;
    for (pad, expected) in [(3000, 200), (8192, 502)] {
        let backend = async {
            let (mut s, _) = within(backend_l.accept()).await.unwrap();
            read_head(&mut s).await;
            let answer = format!(
                "HTTP/1.1 200 OK\r\nx-padding: {}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                "a".repeat(pad)
            );
            // wsgate may close while this is still being written.
            let _ = within(s.write_all(answer.as_bytes())).await;
            s
        };
        let request = "GET /big-head HTTP/1.1\r\nHost: dash.example\r\nConnection: close\r\n\r\n";
        let ((head, body), _s) = tokio::join!(http_raw(gate.addr, request), backend);
        assert_eq!(status(&head), expected, "{head}");
        if expected == 502 {
            assert!(is_gate_error(&head, "backend_failed"), "{head}");
        } else {
            assert_eq!(body, b"ok");
        }
    }
}

/// A backend that answers an upload before reading its body (a 413 for one too large)
/// and closes, resetting the connection on the body it left unread: the client gets the
/// 413, not a 502, though writing the rest of the body to the backend fails.
#[tokio::test]
async fn an_answer_sent_before_the_request_body_was_read_reaches_the_client() {
    const LEN: usize = 16 << 20;
    const CHUNK: usize = 64 * 1024;
    let (backend_l, backend_addr) = listener().await;
    let gate = start_gate(test_config(backend_addr)).await;
    // The upload is under way before the backend refuses it.
    let backend = backend_refusing_upload(&backend_l, "/upload");
    let client = async {
        let c = within(TcpStream::connect(gate.addr)).await.unwrap();
        let (mut r, mut w) = c.into_split();
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: dash.example\r\nContent-Length: {LEN}\r\n\r\n");
        within(w.write_all(head.as_bytes())).await.unwrap();
        // The body goes on until wsgate stops taking it (it may stop reading it once the
        // answer is out): each write bounded, the loop by the body's length.
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; CHUNK];
            for _ in 0..LEN / CHUNK {
                match tokio::time::timeout(Duration::from_secs(2), w.write_all(&chunk)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
        });
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.ends_with(b"too large") {
            match within(r.read(&mut buf)).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        writer.abort();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let ((), answer) = tokio::join!(backend, client);
    assert!(
        answer.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\ntoo large"), "{answer}");
}

#[tokio::test]
async fn upgrade_request_reaches_the_backend_with_its_headers() {
    let (backend_l, backend_addr) = listener().await;
    let gate = start_gate(test_config(backend_addr)).await;

    let extra = "Cookie: session=abc; theme=dark\r\nAuthorization: Bearer t0k3n\r\n\
                 Origin: https://dash.example\r\nSec-WebSocket-Protocol: chat, superchat\r\n\
                 Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let ((_client, client_head), (_backend, seen)) = tokio::join!(
        connect_ws(gate.addr, "/ws/live?room=7", extra),
        accept_ws(&backend_l, "Sec-WebSocket-Protocol: chat\r\n"),
    );

    assert!(
        seen.starts_with("GET /ws/live?room=7 HTTP/1.1\r\n"),
        "{seen}"
    );
    for (name, value) in [
        ("host", "wsgate.test"),
        ("cookie", "session=abc; theme=dark"),
        ("authorization", "Bearer t0k3n"),
        ("origin", "https://dash.example"),
        ("sec-websocket-protocol", "chat, superchat"),
        (
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits",
        ),
        ("sec-websocket-key", KEY),
        ("sec-websocket-version", "13"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "wsgate.test"),
    ] {
        assert_eq!(header(&seen, name), Some(value), "{name}:\n{seen}");
    }
    assert!(
        header(&seen, "connection").is_some_and(|v| v
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))),
        "{seen}"
    );
    assert!(
        header(&seen, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{seen}"
    );

    assert_eq!(
        header(&client_head, "sec-websocket-protocol"),
        Some("chat"),
        "{client_head}"
    );
    assert_eq!(
        header(&client_head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{client_head}"
    );
}

/// A `CONNECT` asks for a tunnel, which a reverse proxy for one backend does not open:
/// wsgate answers 405 itself, and the backend never sees it (the first request it gets
/// is the GET that follows).
#[tokio::test]
async fn a_connect_is_refused_without_reaching_the_backend() {
    let (backend_addr, _, mut seen) =
        recording_backend(|_| Response::new(full("from the backend"))).await;
    let gate = start_gate(test_config(backend_addr)).await;

    let (head, body) = request_once(
        gate.addr,
        "CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 405, "{head}");
    assert!(is_gate_error(&head, "tunnel_refused"), "{head}");
    let allow = header(&head, "allow").unwrap_or_default();
    assert!(
        allow.contains("GET") && !allow.contains("CONNECT"),
        "{head}"
    );
    assert!(String::from_utf8_lossy(&body).contains("no tunnels"));

    let (head, body) = http_raw(
        gate.addr,
        "GET /after HTTP/1.1\r\nHost: dash.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(body, b"from the backend");
    let first = within(seen.recv()).await.unwrap();
    assert_eq!(first.method, hyper::Method::GET);
    assert_eq!(first.target, "/after");
}

#[tokio::test]
async fn bad_handshakes_are_refused_without_contacting_the_backend() {
    // Nothing listens at the backend address: had wsgate tried it, the answer would be
    // a 502, so a 400 or 426 shows it did not.
    let dead = dead_addr();
    let gate = start_gate(test_config(dead.addr)).await;

    let (head, body) = request_once(
        gate.addr,
        "GET /ws HTTP/1.1\r\nHost: wsgate.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 400, "{head}");
    assert!(is_gate_error(&head, "bad_handshake"), "{head}");
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("missing Sec-WebSocket-Key"), "{body}");

    let request = upgrade_request("/ws", "").replace(
        "Sec-WebSocket-Version: 13\r\n",
        "Sec-WebSocket-Version: 8\r\n",
    );
    assert!(request.contains("Sec-WebSocket-Version: 8\r\n"));
    let (head, body) = request_once(gate.addr, &request).await;
    assert_eq!(status(&head), 426, "{head}");
    assert!(is_gate_error(&head, "unsupported_version"), "{head}");
    assert_eq!(header(&head, "sec-websocket-version"), Some("13"), "{head}");
    assert!(!body.is_empty());
}

#[tokio::test]
async fn max_connections_refuses_with_503_and_frees_the_slot_on_close() {
    let (backend_l, backend_addr) = listener().await;
    let mut config = test_config(backend_addr);
    config.max_connections = MaxConnections::Count(1);
    let gate = start_gate(config).await;
    let (mut client, mut backend) = pair(&gate, &backend_l).await;

    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    within(s.write_all(upgrade_request("/ws", "").as_bytes()))
        .await
        .unwrap();
    let (head, _) = read_head(&mut s).await;
    assert_eq!(status(&head), 503, "{head}");
    assert!(is_gate_error(&head, "over_capacity"), "{head}");
    assert!(header(&head, "retry-after").is_some(), "{head}");
    drop(s);

    // The refusal did not disturb the open WebSocket.
    client.send(TEXT, b"x").await;
    assert_eq!(backend.recv().await.payload, b"x");
    backend.send(TEXT, b"y").await;
    assert_eq!(client.recv().await.payload, b"y");

    client.send_close(1000, "").await;
    assert_eq!(backend.recv().await.close_code(), Some(1000));
    backend.send_close(1000, "").await;
    assert_eq!(client.recv().await.close_code(), Some(1000));
    assert_eq!(client.expect_end().await, End::Eof);
    backend.shutdown_write().await;
    assert_eq!(backend.expect_end().await, End::Eof);

    // The slot frees when the relay task finishes: retry until a new upgrade gets in.
    let next_backend = tokio::spawn(async move { accept_ws(&backend_l, "").await.0 });
    let mut admitted = None;
    eventually(async || {
        let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
        within(s.write_all(upgrade_request("/ws", "").as_bytes()))
            .await
            .unwrap();
        let (head, rest) = read_head(&mut s).await;
        match status(&head) {
            101 => {
                admitted = Some(Peer::new(s, Role::Client, rest));
                true
            }
            503 => false,
            other => panic!("unexpected {other}: {head}"),
        }
    })
    .await;
    let mut client = admitted.unwrap();
    let mut backend = within(next_backend).await.unwrap();
    client.send(TEXT, b"again").await;
    assert_eq!(backend.recv().await.payload, b"again");
}

#[tokio::test]
async fn keep_alive_requests_share_one_backend_connection() {
    let (backend_addr, accepted, mut seen) = recording_backend(|req| {
        let body = format!("you asked for {}", req.target);
        Response::new(full(body))
    })
    .await;
    let gate = start_gate(test_config(backend_addr)).await;

    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    for path in ["/one", "/two?x=1"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: dash.example\r\n\r\n");
        within(s.write_all(request.as_bytes())).await.unwrap();
        let (head, body) = read_response(&mut s).await;
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, format!("you asked for {path}").as_bytes());
        assert_eq!(within(seen.recv()).await.unwrap().target, path);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "backend connections");
}

#[tokio::test]
async fn a_backend_that_closes_after_each_answer_gets_a_new_connection_per_request() {
    // A raw backend: one request per connection, answered with `Connection: close`.
    let (l, backend_addr) = listener().await;
    let answering = tokio::spawn(async move {
        for n in 0..3 {
            let (mut s, _) = within(l.accept()).await.unwrap();
            read_head(&mut s).await;
            let body = format!("answer {n}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            within(s.write_all(resp.as_bytes())).await.unwrap();
        }
    });
    let gate = start_gate(test_config(backend_addr)).await;
    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    for n in 0..3 {
        within(s.write_all(b"GET / HTTP/1.1\r\nHost: dash.example\r\n\r\n"))
            .await
            .unwrap();
        let (head, body) = read_response(&mut s).await;
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, format!("answer {n}").as_bytes());
    }
    within(answering).await.unwrap();
}

/// A backend that answers every request with what it got: method, target and body.
async fn echo_backend() -> SocketAddr {
    let (addr, _) = http_backend(|req: Request<Incoming>| async move {
        let what = format!("{} {}", req.method(), req.uri());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(format!("{what} {}", String::from_utf8_lossy(&body))))
    })
    .await;
    addr
}

/// Requests pipelined on one connection, in and out of the shape wsgate serves itself
/// (`h1_server`): a plain GET, a POST whose body came with it, a chunked POST (from
/// which hyper serves the connection), a GET after it, and a POST whose body comes
/// later. Each is answered, in order, with what the backend got.
#[tokio::test]
async fn plain_requests_then_others_on_one_connection_are_answered_in_order() {
    let gate = start_gate(test_config(echo_backend().await)).await;
    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    let pipelined = "GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n\
        POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz\
        POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n\
        GET /d HTTP/1.1\r\nHost: h\r\n\r\n";
    within(s.write_all(pipelined.as_bytes())).await.unwrap();
    for expected in ["GET /a?x=1 ", "POST /b xyz", "POST /c wxyz", "GET /d "] {
        let (head, body) = read_response(&mut s).await;
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(String::from_utf8(body).unwrap(), expected);
    }
}

/// A request whose body has not arrived with its head goes to the backend at once (its
/// body streamed as it comes, by hyper, which serves the connection from then on): it
/// is not held back until its body is whole.
#[tokio::test]
async fn a_body_that_comes_after_its_head_is_streamed() {
    let (heads_tx, mut heads) = mpsc::unbounded_channel();
    let (backend, _) = http_backend(move |req: Request<Incoming>| {
        let _ = heads_tx.send(req.uri().to_string());
        async move {
            let what = format!("{} {}", req.method(), req.uri());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(full(format!("{what} {}", String::from_utf8_lossy(&body))))
        }
    })
    .await;
    let gate = start_gate(test_config(backend)).await;
    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    within(s.write_all(b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"))
        .await
        .unwrap();
    assert_eq!(within(heads.recv()).await.unwrap(), "/e");
    within(s.write_all(b"hello")).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(body, b"POST /e hello");
    // A plain request after it, on the same connection.
    within(s.write_all(b"GET /f HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(header(&head, "connection"), Some("close"));
    assert_eq!(body, b"GET /f ");
    let mut rest = Vec::new();
    assert_eq!(within(s.read_to_end(&mut rest)).await.unwrap(), 0);
}

/// A plain request is counted as any other: its method and status class.
#[tokio::test]
async fn a_plain_post_is_counted() {
    let gate = start_gate(test_config(echo_backend().await)).await;
    let (head, body) = request_once(
        gate.addr,
        "POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabcd",
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(body, b"POST /up abcd");
    let (_, text) = http_get(gate.admin, "/metrics").await;
    assert_eq!(
        sample(
            &text,
            "wsgate_http_requests_total{status_class=\"2xx\",method=\"POST\"}"
        ),
        1.0
    );
}
