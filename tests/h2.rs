//! HTTP/2 from the client: streams that outlive their head, connections that close when
//! idle, several WebSockets and exchanges sharing one connection, the exit with an
//! idle HTTP/2 connection open, a plain CONNECT refused, a backend's early answer to an
//! upload, and the header rules (`X-Forwarded-*`, hop-by-hop fields). A browser behind TLS speaks HTTP/2 to wsgate, so every
//! behaviour that holds over HTTP/1.1 is checked here over h2c as well.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyper::Response;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// wsgate with cleartext HTTP/2 on, `tweak` applied.
async fn h2c_gate(backend: std::net::SocketAddr, tweak: impl FnOnce(&mut wsgate::Config)) -> Gate {
    let mut config = test_config(backend);
    config.http.h2c = true;
    tweak(&mut config);
    start_gate(config).await
}

async fn admin_json(gate: &Gate, path: &str) -> Value {
    let (status, body) = http_get(gate.admin, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn a_streamed_response_outlives_header_read_timeout_over_h2() {
    // 12 events 100 ms apart: 1.2 s, four times header_read_timeout.
    let (backend, _) = http_backend(|_| async {
        let (tx, resp) = event_stream();
        feed_events(tx, 12, Duration::from_millis(100));
        resp
    })
    .await;
    let gate = h2c_gate(backend, |c| {
        c.http.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut sender, _conn) = h2c_connect(gate.addr).await;
    let resp =
        within(sender.send_request(h2_request("POST", "/api/default/_search_stream", empty())))
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let body = read_body(resp.into_body()).await.unwrap_or_else(|got| {
        panic!(
            "the stream was cut after {:?}: {}",
            started.elapsed(),
            String::from_utf8_lossy(&got)
        )
    });
    let expected: Vec<u8> = (0..12).flat_map(|n| event(n).to_vec()).collect();
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&expected)
    );
}

#[tokio::test]
async fn an_h2_connection_with_no_open_stream_is_closed_after_header_read_timeout() {
    let (backend, _) = http_backend(|_| async { Response::new(full("hello")) }).await;
    let limit = Duration::from_millis(300);
    let gate = h2c_gate(backend, |c| c.http.header_read_timeout = limit).await;
    let (mut sender, conn) = h2c_connect(gate.addr).await;
    let resp = within(sender.send_request(h2_request("GET", "/", empty())))
        .await
        .unwrap();
    assert_eq!(read_body(resp.into_body()).await.unwrap(), b"hello");
    let idle_from = Instant::now();
    // The client keeps the connection and answers wsgate's frames; wsgate ends it.
    within(conn).await.unwrap().unwrap();
    let idle = idle_from.elapsed();
    assert!(
        idle >= limit,
        "closed after {idle:?}, before the idle limit"
    );
}

/// Reads one WebSocket frame from an HTTP/2 stream, `buf` holding what was read ahead.
async fn read_frame(io: &mut TokioIo<hyper::upgrade::Upgraded>, buf: &mut Vec<u8>) -> Frame {
    loop {
        if let Some((frame, used)) = decode(buf) {
            buf.drain(..used);
            return frame;
        }
        let mut chunk = [0u8; 4096];
        let n = within(io.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "the stream ended while a frame was expected");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn websockets_sharing_an_h2_connection_each_have_an_id_a_drain_close_and_a_record() {
    let (backend_l, backend_addr) = listener().await;
    let gate = h2c_gate(backend_addr, |_| {}).await;
    let (mut sender, _conn) = h2c_connect(gate.addr).await;
    let mut clients = Vec::new();
    let mut backends = Vec::new();
    for panel in 0..3 {
        let path = format!("/ws/panel{panel}");
        let (client, (backend, _)) =
            tokio::join!(h2_websocket(&mut sender, &path), accept_ws(&backend_l, ""));
        clients.push(client);
        backends.push(backend);
    }
    // Each relays: a frame from each client reaches its own backend.
    for (i, (client, backend)) in clients.iter_mut().zip(&mut backends).enumerate() {
        let msg = format!("panel {i}");
        within(client.write_all(&encode(true, 0, TEXT, msg.as_bytes(), true)))
            .await
            .unwrap();
        assert_eq!(backend.recv().await.payload, msg.as_bytes());
    }

    let open = admin_json(&gate, "/connections").await;
    let open = open.as_array().unwrap();
    assert_eq!(open.len(), 3, "{open:#?}");
    let mut ids: Vec<u64> = open.iter().map(|c| c["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three WebSockets, three ids: {open:#?}");
    let connection = &open[0]["connection"];
    assert!(connection.is_u64(), "{open:#?}");
    assert!(
        open.iter().all(|c| &c["connection"] == connection),
        "one TCP connection"
    );
    assert!(open.iter().all(|c| c["kind"] == "websocket"), "{open:#?}");

    let (status, body) = http_request(gate.admin, "POST", "/drain", "").await;
    assert_eq!(status, 202, "{body}");
    // Each WebSocket gets its own Close on both sides: 1012 to the client, 1001 to the
    // backend; the handshakes complete.
    for (client, backend) in clients.iter_mut().zip(&mut backends) {
        let mut buf = Vec::new();
        let close = read_frame(client, &mut buf).await;
        assert_eq!(close.close_code(), Some(1012), "{close:?}");
        within(client.write_all(&encode(true, 0, CLOSE, &close_payload(1012, ""), true)))
            .await
            .unwrap();
        assert_eq!(backend.recv_close().await.close_code(), Some(1001));
        backend.send_close(1001, "").await;
        backend.shutdown_write().await;
    }
    let mut recent = Vec::new();
    eventually(async || {
        recent = admin_json(&gate, "/connections/recent")
            .await
            .as_array()
            .unwrap()
            .clone();
        recent.len() == 3
    })
    .await;
    let mut ended: Vec<u64> = recent.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    ended.sort_unstable();
    assert_eq!(ended, ids, "each WebSocket ended with its own record");
    assert!(
        recent.iter().all(|r| r["outcome"] == "shutdown"),
        "{recent:#?}"
    );
    assert!(
        recent.iter().all(|r| r["client_received_code"] == 1012),
        "{recent:#?}"
    );
}

#[tokio::test]
async fn an_idle_h2_connection_does_not_hold_the_exit() {
    let (backend, _) = http_backend(|_| async { Response::new(full("hello")) }).await;
    let mut gate = h2c_gate(backend, |c| {
        // Far beyond the test's own limit: waiting for it fails the test.
        c.shutdown.drain_timeout = Duration::from_secs(60);
        c.shutdown.spread = Duration::ZERO;
    })
    .await;
    let (mut sender, conn) = h2c_connect(gate.addr).await;
    let resp = within(sender.send_request(h2_request("GET", "/", empty())))
        .await
        .unwrap();
    assert_eq!(read_body(resp.into_body()).await.unwrap(), b"hello");
    // The signal path: the drain begins and the exit follows at once.
    let stopping = Instant::now();
    within(gate.begin_shutdown()).await.unwrap();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(2), "the exit took {took:?}");
    // The client was told (GOAWAY) and its connection ended.
    within(conn).await.unwrap().ok();
    assert!(sender.is_closed());
}

#[tokio::test]
async fn an_idle_h2_connection_whose_client_does_not_answer_does_not_hold_the_exit() {
    let (backend, _) = http_backend(|_| async { Response::new(full("hello")) }).await;
    let mut gate = h2c_gate(backend, |c| {
        c.shutdown.drain_timeout = Duration::from_secs(60);
        c.shutdown.spread = Duration::ZERO;
    })
    .await;
    // A raw client: the preface, SETTINGS, one GET on stream 1; then it reads nothing
    // more and answers nothing (a laptop gone to sleep with its connection open).
    let mut s = within(tokio::net::TcpStream::connect(gate.addr))
        .await
        .unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    // HEADERS, END_STREAM|END_HEADERS, stream 1: :method GET, :scheme http, :path /,
    // :authority a (HPACK indexed 2, 6, 4 and a literal without indexing, name index 1).
    let block = [0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
    hello.extend_from_slice(&[0, 0, block.len() as u8, 0x01, 0x05, 0, 0, 0, 1]);
    hello.extend_from_slice(&block);
    within(s.write_all(&hello)).await.unwrap();
    // The response arrives (HEADERS and DATA frames); read until "hello" shows.
    let mut got = Vec::new();
    while !got.windows(5).any(|w| w == b"hello") {
        let mut chunk = [0u8; 4096];
        let n = within(s.read(&mut chunk)).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    let stopping = Instant::now();
    within(gate.begin_shutdown()).await.unwrap();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(2), "the exit took {took:?}");
}

/// A plain `CONNECT` over HTTP/2 (no `:protocol`, so not a WebSocket's) is refused with a
/// 405 like over HTTP/1.1, and the connection's other streams go on: a GET on it after
/// the refusal reaches the backend, the first request the backend sees.
#[tokio::test]
async fn a_plain_connect_over_h2_is_refused_and_the_connection_goes_on() {
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let (backend, _) = http_backend(move |req: hyper::Request<hyper::body::Incoming>| {
        let _ = seen_tx.send((req.method().clone(), req.uri().path().to_string()));
        async { Response::new(full("from the backend")) }
    })
    .await;
    let gate = h2c_gate(backend, |_| {}).await;
    let (mut sender, _conn) = h2c_connect(gate.addr).await;

    let connect = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("internal.example:443")
        .body(empty())
        .unwrap();
    let resp = within(sender.send_request(connect)).await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(
        resp.headers().get("wsgate-error").unwrap(),
        "tunnel_refused"
    );

    let resp = within(sender.send_request(h2_request("GET", "/after", empty())))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        read_body(resp.into_body()).await.unwrap(),
        b"from the backend"
    );
    let (method, path) = within(seen.recv()).await.unwrap();
    assert_eq!((method, path.as_str()), (hyper::Method::GET, "/after"));
}

/// An upload over HTTP/2 that the backend refuses before reading it (a 413) and closes
/// on: the client's stream gets the 413, not a 502, as over HTTP/1.1.
#[tokio::test]
async fn an_answer_sent_before_the_upload_was_read_reaches_an_h2_client() {
    const LEN: usize = 16 << 20;
    let (backend_l, backend_addr) = listener().await;
    let gate = h2c_gate(backend_addr, |_| {}).await;
    let backend = backend_refusing_upload(&backend_l, "/upload");
    let client = async {
        let (mut sender, _conn) = h2c_connect(gate.addr).await;
        let req = h2_request("POST", "/upload", full(vec![b'x'; LEN]));
        let resp = within(sender.send_request(req)).await.unwrap();
        let status = resp.status();
        (status, read_body(resp.into_body()).await)
    };
    let ((), (status, body)) = tokio::join!(backend, client);
    assert_eq!(status, 413);
    assert_eq!(body.unwrap(), b"too large");
}

/// The header rules over HTTP/2 as over HTTP/1.1: the backend's request head gets `Host`
/// from `:authority`, the client's `X-Forwarded-For` with the client's address after it,
/// `X-Forwarded-Proto` and `X-Forwarded-Host`; the client's response has none of the
/// backend's hop-by-hop fields, nor one its `Connection` names (which hyper's HTTP/2
/// server would not know to drop).
#[tokio::test]
async fn header_rules_hold_for_an_h2_client() {
    let (backend_l, backend_addr) = listener().await;
    let gate = h2c_gate(backend_addr, |_| {}).await;
    let backend = tokio::spawn(async move {
        let (mut s, _) = within(backend_l.accept()).await.unwrap();
        let (head, _) = read_head(&mut s).await;
        within(s.write_all(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Backend-Hop\r\nKeep-Alive: timeout=5\r\n\
              X-Backend-Hop: 1\r\nX-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok",
        ))
        .await
        .unwrap();
        (head, s)
    });
    let (mut sender, _conn) = h2c_connect(gate.addr).await;
    let mut req = h2_request("GET", "/rules?q=1", empty());
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let resp = within(sender.send_request(req)).await.unwrap();
    let (seen, _backend_socket) = within(backend).await.unwrap();

    assert!(seen.starts_with("GET /rules?q=1 HTTP/1.1\r\n"), "{seen}");
    assert_eq!(header(&seen, "host"), Some("dash.example"), "{seen}");
    assert_eq!(
        header(&seen, "x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1"),
        "{seen}"
    );
    assert_eq!(seen.matches("x-forwarded-for").count(), 1, "{seen}");
    assert_eq!(header(&seen, "x-forwarded-proto"), Some("http"), "{seen}");
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some("dash.example"),
        "{seen}"
    );

    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h.get("x-end-to-end").unwrap(), "kept");
    for hop in ["x-backend-hop", "keep-alive", "connection"] {
        assert!(h.get(hop).is_none(), "{hop} reached the client: {h:?}");
    }
    assert_eq!(read_body(resp.into_body()).await.unwrap(), b"ok");
}
