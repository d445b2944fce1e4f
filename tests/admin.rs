//! The admin API behind the live page: the recent endings (exact records after
//! scripted endings, newest first, bounded), the summary, the flags of connections worth
//! a look, and that none of it is served on the proxy port.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

async fn get_json(gate: &Gate, path: &str) -> Value {
    let (status, body) = http_get(gate.admin, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `n` endings are recorded; returns `/connections/recent`.
async fn recent(gate: &Gate, n: usize) -> Vec<Value> {
    let mut list = Vec::new();
    eventually(async || {
        list = get_json(gate, "/connections/recent")
            .await
            .as_array()
            .unwrap()
            .clone();
        list.len() >= n
    })
    .await;
    list
}

#[tokio::test]
async fn recent_endings_are_the_exact_records_newest_first_and_bounded() {
    let (gate, backend_l) = gate_with(|c| c.admin.recent_endings = 3).await;

    // 1. client_close: 1000 each way.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    c.send(TEXT, b"hello").await;
    b.recv().await;
    c.send_close(1000, "bye").await;
    b.recv().await;
    b.send_close(1000, "").await;
    c.recv().await;
    drop(c);
    b.shutdown_write().await;
    b.expect_end().await;
    recent(&gate, 1).await;

    // 2. client_gone: FIN without a Close; wsgate sends the backend 1001.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    c.shutdown_write().await;
    assert_eq!(b.recv().await.close_code(), Some(1001));
    b.send_close(1001, "").await;
    b.shutdown_write().await;
    b.expect_end().await;
    drop(c);
    recent(&gate, 2).await;

    // 3. backend_gone: wsgate sends the client 1014, which answers it.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    b.shutdown_write().await;
    assert_eq!(c.recv().await.close_code(), Some(1014));
    c.send_close(1014, "").await;
    c.expect_end().await;
    drop((c, b));
    let list = recent(&gate, 3).await;

    let outcomes: Vec<&str> = list
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["backend_gone", "client_gone", "client_close"]);
    let [gone_b, gone_c, close] = &list[..] else {
        panic!("{list:?}")
    };
    // client_close: each side's Close reached the other.
    assert_eq!(close["client_sent_code"], 1000);
    assert_eq!(close["backend_received_code"], 1000);
    assert_eq!(close["backend_sent_code"], 1000);
    assert_eq!(close["client_received_code"], 1000);
    assert!(close["wsgate_to_client_code"].is_null());
    assert_eq!(close["client_to_backend"]["frames"], 2);
    assert!(close["client_to_backend"]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(close["path"], "/ws");
    // client_gone: the client sent and got nothing; wsgate told the backend.
    assert!(gone_c["client_sent_code"].is_null());
    assert!(gone_c["client_received_code"].is_null());
    assert_eq!(gone_c["wsgate_to_backend_code"], 1001);
    assert_eq!(gone_c["backend_received_code"], 1001);
    assert_eq!(gone_c["backend_sent_code"], 1001);
    // backend_gone: wsgate told the client 1014, and the client answered.
    assert_eq!(gone_b["wsgate_to_client_code"], 1014);
    assert_eq!(gone_b["client_received_code"], 1014);
    assert_eq!(gone_b["client_sent_code"], 1014);
    for r in &list {
        assert!(r["release_seconds"].as_f64().unwrap() < 5.0);
        assert!(r["ended_at"].as_f64().unwrap() > 1.7e9);
    }

    // A fourth ending pushes the oldest out: three are kept.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    c.shutdown_write().await;
    b.recv().await;
    b.send_close(1001, "").await;
    b.shutdown_write().await;
    b.expect_end().await;
    drop(c);
    eventually(async || {
        let list = get_json(&gate, "/connections/recent").await;
        list[0]["outcome"] == "client_gone" && list[2]["outcome"] == "client_gone"
    })
    .await;
    let list = get_json(&gate, "/connections/recent").await;
    assert_eq!(list.as_array().unwrap().len(), 3);

    // Filtered by outcome, and an unknown outcome is an error.
    let gone = get_json(&gate, "/connections/recent?outcome=client_gone").await;
    assert_eq!(gone.as_array().unwrap().len(), 2);
    assert_eq!(
        http_get(gate.admin, "/connections/recent?outcome=nope")
            .await
            .0,
        400
    );

    // The summary counts every ending since start, not only the kept ones.
    let summary = get_json(&gate, "/summary").await;
    assert_eq!(summary["ended_by_outcome"]["client_gone"], 2);
    assert_eq!(summary["ended_by_outcome"]["client_close"], 1);
    assert_eq!(summary["ended_by_outcome"]["backend_gone"], 1);
    assert_eq!(summary["ended_by_outcome"]["shutdown"], 0);
    assert_eq!(summary["release_seconds"]["count"], 4);
    assert!(summary["release_seconds"]["p99"].as_f64().unwrap() < 5.0);
    assert_eq!(summary["open_websockets"], 0);
    assert_eq!(summary["draining"], false);
    // The test peer is on loopback; closing is off by default.
    assert_eq!(summary["viewer_may_drain"], true);
    assert_eq!(summary["viewer_may_close"], false);
}

#[tokio::test]
async fn a_query_nobody_reads_is_flagged() {
    let (gate, backend_l) = gate_with(|c| {
        // Flag silence after 200 ms instead of 20 s; liveness pings then start too.
        c.websocket.ping_interval = Some(std::time::Duration::from_millis(200));
    })
    .await;
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    // The backend streams; the client reads (at the TCP level) but sends nothing, and
    // answers wsgate's Pings as a browser does.
    let streaming = tokio::spawn(async move {
        let mut rows = tokio::time::interval(std::time::Duration::from_millis(20));
        for _ in 0..150 {
            rows.tick().await;
            b.send(TEXT, b"row").await;
        }
        b
    });
    let client = tokio::spawn(async move {
        loop {
            let f = c.recv().await;
            if f.opcode == PING {
                c.send(PONG, &f.payload).await;
            }
            if f.opcode == CLOSE {
                return c;
            }
        }
    });
    eventually(async || {
        let table = get_json(&gate, "/connections").await;
        table[0]["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "client_silent"))
    })
    .await;
    let table = get_json(&gate, "/connections").await;
    assert!(
        table[0]["client_to_backend"]["seconds_since_last_data"].is_null(),
        "{table}"
    );
    assert!(
        table[0]["backend_to_client"]["seconds_since_last_data"]
            .as_f64()
            .unwrap()
            < 0.2
    );
    streaming.abort();
    client.abort();
}

#[tokio::test]
async fn the_page_asks_for_a_screenful_of_open_connections_oldest_first() {
    let (gate, backend_l) = gate_with(|_| {}).await;
    let mut peers = Vec::new();
    for _ in 0..3 {
        let (mut c, mut b) = pair(&gate, &backend_l).await;
        // A frame relayed end to end: the relay is running, so it is in the live table
        // (the client has its 101 a moment before the relay registers).
        c.send(TEXT, b"hi").await;
        b.recv().await;
        peers.push((c, b));
    }
    let ids = |v: &Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_u64().unwrap())
            .collect()
    };
    let all = ids(&get_json(&gate, "/connections").await);
    assert_eq!(all.len(), 3, "{all:?}");
    let mut sorted = all.clone();
    sorted.sort_unstable();
    // None is flagged: the two oldest (lowest ids) of the three.
    let two = ids(&get_json(&gate, "/connections?limit=2").await);
    assert_eq!(two, sorted[..2]);
    assert_eq!(
        ids(&get_json(&gate, "/connections?limit=0").await),
        Vec::<u64>::new()
    );
    let (status, body) = http_get(gate.admin, "/connections?limit=lots").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit"), "{body}");
    drop(peers);
}

#[tokio::test]
async fn the_admin_api_is_not_served_on_the_proxy_port() {
    let (gate, backend_l) = gate_with(|_| {}).await;
    for path in ["/", "/summary", "/connections/recent", "/metrics"] {
        let answer = async {
            let (mut s, _) = within(backend_l.accept()).await.unwrap();
            let (head, _) = read_head(&mut s).await;
            s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nbackend",
            )
            .await
            .unwrap();
            head
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let ask = http_raw(gate.addr, &request);
        let (seen, (head, body)) = tokio::join!(answer, ask);
        assert!(seen.starts_with(&format!("GET {path} HTTP/1.1")), "{seen}");
        assert_eq!(status(&head), 200);
        assert_eq!(body, b"backend", "{path} came from wsgate, not the backend");
    }
}

#[tokio::test]
async fn the_admin_page_is_served_with_a_strict_policy() {
    let (gate, _backend_l) = gate_with(|_| {}).await;
    for (path, kind, needle) in [
        ("/", "text/html", "wsgate admin"),
        ("/admin.js", "text/javascript", "summary"),
        ("/admin.css", "text/css", "{"),
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (head, body) = http_raw(gate.admin, &request).await;
        assert_eq!(status(&head), 200, "{path}");
        assert!(
            header(&head, "content-type").unwrap().starts_with(kind),
            "{head}"
        );
        let policy = header(&head, "content-security-policy").unwrap();
        assert!(policy.starts_with("default-src 'self'"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert!(String::from_utf8_lossy(&body).contains(needle), "{path}");
    }
}
