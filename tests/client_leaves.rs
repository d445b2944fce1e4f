//! A client that leaves while wsgate waits for the backend's answer — a dashboard query
//! cancelled right after it started: the backend's connection is released at once, not
//! when the backend finally answers, and the ending is counted. For the WebSocket fast
//! path, hyper's upgrade path, a plain HTTP/1.1 request and an HTTP/2 request.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How soon the backend must see its connection end after the client left. The real
/// figure is well under a millisecond (printed); the bound only separates "noticed at
/// once" from "noticed when the backend answers", with room for a loaded CI machine.
const PROMPTLY: Duration = Duration::from_millis(250);

/// Accepts the backend connection, reads the request (its head, and its body when it
/// declares a length); returns the socket.
async fn backend_holds_the_answer(l: &TcpListener) -> TcpStream {
    let (mut s, _) = within(l.accept()).await.unwrap();
    let (head, mut body) = read_head(&mut s).await;
    let length: usize = header(&head, "content-length").map_or(0, |n| n.parse().unwrap());
    while body.len() < length {
        let mut chunk = [0u8; 1024];
        let n = within(s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "the request body was cut");
        body.extend_from_slice(&chunk[..n]);
    }
    s
}

/// Waits for the backend's connection to end (EOF or reset) without answering; returns
/// how long after `left` it ended.
async fn backend_sees_the_end(mut s: TcpStream, left: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    match within(s.read(&mut buf)).await {
        Ok(0) | Err(_) => left.elapsed(),
        Ok(n) => panic!("unexpected bytes toward the backend: {:?}", &buf[..n]),
    }
}

async fn scrape(gate: &Gate) -> String {
    http_get(gate.admin, "/metrics").await.1
}

async fn metric_reaches(gate: &Gate, series: &str, value: f64) {
    eventually(async || sample(&scrape(gate).await, series) == value).await;
}

async fn last_ending(gate: &Gate) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    eventually(async || {
        let (_, body) = http_get(gate.admin, "/connections/recent").await;
        let recent: serde_json::Value = serde_json::from_str(&body).unwrap();
        match recent.as_array().and_then(|r| r.first()) {
            Some(r) => {
                last = r.clone();
                true
            }
            None => false,
        }
    })
    .await;
    last
}

/// Sends `request` raw, lets the backend receive it, then the client leaves (FIN, or
/// RST with `reset`); returns the gate and how long the backend took to see its end.
async fn leave_while_waiting(request: &str, reset: bool, h2c: bool) -> (Gate, Duration) {
    let (gate, backend_l) = gate_with(|c| c.http.h2c = h2c).await;
    let mut client = within(TcpStream::connect(gate.addr)).await.unwrap();
    within(client.write_all(request.as_bytes())).await.unwrap();
    let backend = backend_holds_the_answer(&backend_l).await;
    if reset {
        client.set_zero_linger().unwrap();
    }
    let left = Instant::now();
    drop(client);
    let took = backend_sees_the_end(backend, left).await;
    println!("backend released {took:?} after the client left");
    assert!(
        took < PROMPTLY,
        "the backend saw the end only after {took:?}"
    );
    (gate, took)
}

#[tokio::test]
async fn fast_path_upgrade_whose_client_leaves_before_the_101_releases_the_backend() {
    for reset in [false, true] {
        let (gate, _) = leave_while_waiting(&upgrade_request("/ws", ""), reset, false).await;
        metric_reaches(
            &gate,
            "wsgate_websocket_upgrades_total{result=\"client_gone\"}",
            1.0,
        )
        .await;
        metric_reaches(
            &gate,
            "wsgate_websocket_connections_ended_total{outcome=\"client_gone\"}",
            1.0,
        )
        .await;
        let r = last_ending(&gate).await;
        assert_eq!(
            (r["kind"].as_str(), r["outcome"].as_str()),
            (Some("websocket"), Some("client_gone")),
            "{r:#}"
        );
        assert_eq!(r["path"], "/ws");
        metric_reaches(&gate, "wsgate_connections_active", 0.0).await;
    }
}

#[tokio::test]
async fn hyper_path_upgrade_whose_client_leaves_before_the_101_releases_the_backend() {
    // `Content-Length: 0` keeps the head off the fast path: hyper reads it.
    let request = upgrade_request("/ws", "Content-Length: 0\r\n");
    for reset in [false, true] {
        let (gate, _) = leave_while_waiting(&request, reset, false).await;
        metric_reaches(
            &gate,
            "wsgate_websocket_upgrades_total{result=\"client_gone\"}",
            1.0,
        )
        .await;
        let r = last_ending(&gate).await;
        assert_eq!(
            (r["kind"].as_str(), r["outcome"].as_str()),
            (Some("websocket"), Some("client_gone")),
            "{r:#}"
        );
        metric_reaches(&gate, "wsgate_connections_active", 0.0).await;
    }
}

#[tokio::test]
async fn plain_http1_request_whose_client_leaves_before_the_head_releases_the_backend() {
    let request = "POST /api/default/_search_stream HTTP/1.1\r\nHost: dash.example\r\nContent-Length: 2\r\n\r\n{}";
    for reset in [false, true] {
        let (gate, _) = leave_while_waiting(request, reset, false).await;
        metric_reaches(
            &gate,
            "wsgate_http_exchanges_ended_total{outcome=\"client_aborted\"}",
            1.0,
        )
        .await;
        let r = last_ending(&gate).await;
        assert_eq!(
            (r["kind"].as_str(), r["outcome"].as_str()),
            (Some("http"), Some("client_aborted")),
            "{r:#}"
        );
        assert_eq!(
            (r["method"].as_str(), r["path"].as_str()),
            (Some("POST"), Some("/api/default/_search_stream"))
        );
        assert!(r["status"].is_null(), "no response head: {r:#}");
        metric_reaches(&gate, "wsgate_connections_active", 0.0).await;
    }
}

#[tokio::test]
async fn http2_request_reset_before_the_head_releases_the_backend() {
    let (backend_l, backend_addr) = listener().await;
    let mut config = test_config(backend_addr);
    config.http.h2c = true;
    let gate = start_gate(config).await;
    let (mut sender, _conn) = h2c_connect(gate.addr).await;
    let request = h2_request("POST", "/api/default/_search_stream", full("{}"));
    // The response future dropped: hyper's client resets the stream (RST_STREAM CANCEL);
    // the connection stays open.
    let pending = tokio::spawn(sender.send_request(request));
    let backend = backend_holds_the_answer(&backend_l).await;
    let left = Instant::now();
    pending.abort();
    let took = backend_sees_the_end(backend, left).await;
    println!("backend released {took:?} after RST_STREAM");
    assert!(
        took < PROMPTLY,
        "the backend saw the end only after {took:?}"
    );
    metric_reaches(
        &gate,
        "wsgate_http_exchanges_ended_total{outcome=\"client_aborted\"}",
        1.0,
    )
    .await;
    let r = last_ending(&gate).await;
    assert_eq!(
        (r["kind"].as_str(), r["outcome"].as_str()),
        (Some("http"), Some("client_aborted")),
        "{r:#}"
    );
    // The connection itself still serves.
    let (_, ok) = tokio::join!(
        async {
            let (mut s, _) = within(backend_l.accept()).await.unwrap();
            read_head(&mut s).await;
            within(s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
                .await
                .unwrap();
            s
        },
        async {
            let resp = within(sender.send_request(h2_request("GET", "/after", empty())))
                .await
                .unwrap();
            read_body(resp.into_body()).await.unwrap()
        }
    );
    assert_eq!(ok, b"ok");
}
