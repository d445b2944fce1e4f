//! Metrics and the admin endpoints after real scenarios: exact counters by outcome and
//! close code, the live connection table, the operator close, and Prometheus tooling
//! (promtool and a real Prometheus server) on a real scrape.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::AsyncWriteExt;

/// True when CI installed the Prometheus tools: then tests needing them must not skip.
fn tools_required() -> bool {
    std::env::var_os("WSGATE_REQUIRE_TOOLS").is_some()
}

fn have(tool: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found || !tools_required(),
        "{tool} is required (WSGATE_REQUIRE_TOOLS is set)"
    );
    if !found {
        eprintln!("skipping: {tool} is not installed (.ci/run installs it)");
    }
    found
}

async fn scrape(gate: &Gate) -> String {
    let (status, body) = http_get(gate.admin, "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// Waits until `n` connections have ended and none is open, by the metrics. Both in one
/// scrape: a scrape reads the open count first and the counters after, so a relay on
/// another worker that ends in between is counted ended and still open.
async fn ended(gate: &Gate, n: f64) -> String {
    let mut text = String::new();
    eventually(async || {
        text = scrape(gate).await;
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("wsgate_websocket_connections_ended_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        total >= n && sample(&text, "wsgate_websocket_connections_active") == 0.0
    })
    .await;
    text
}

#[tokio::test]
async fn counters_by_outcome_and_close_code_after_one_of_each_ending() {
    // Every reply Close is sent at once, but on a loaded machine (the whole suite at
    // once on two cores) the test config's 500 ms close_timeout could pass before one
    // is read, and turn an exact count into a flake: wait as long as the default.
    let (gate, backend_l) =
        gate_with(|c| c.websocket.close_timeout = std::time::Duration::from_secs(5)).await;

    // client_close with 1000 both ways.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    c.send(TEXT, b"hello").await;
    b.recv().await;
    c.send_close(1000, "").await;
    b.recv().await;
    b.send_close(1000, "").await;
    c.recv().await;
    drop(c);
    b.shutdown_write().await;
    b.expect_end().await;

    // backend_close with 4001 both ways.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    b.send_close(4001, "").await;
    c.recv().await;
    c.send_close(4001, "").await;
    b.recv().await;
    b.shutdown_write().await;
    b.expect_end().await;
    c.expect_end().await;
    drop(c);

    // client_gone: wsgate sends 1001, the backend answers 1001.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    c.shutdown_write().await;
    b.recv().await;
    b.send_close(1001, "").await;
    b.shutdown_write().await;
    b.expect_end().await;

    // backend_gone: wsgate sends 1014, the client answers 1014.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    b.shutdown_write().await;
    c.recv().await;
    c.send_close(1014, "").await;
    c.expect_end().await;
    drop(c);

    // protocol_error: 1002 to the client, 1001 to the backend, which answers 1001.
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    c.send_raw(&encode(true, 0, TEXT, b"unmasked", false)).await;
    c.recv().await;
    c.expect_end().await;
    drop(c);
    b.recv().await;
    b.send_close(1001, "").await;
    b.shutdown_write().await;
    b.expect_end().await;
    drop(b);

    // A refused upgrade and a bad handshake.
    let refuse = async {
        let (mut s, _) = within(backend_l.accept()).await.unwrap();
        read_head(&mut s).await;
        s.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
    };
    let request = upgrade_request("/", "Connection: close\r\n");
    let (_, (head, _)) = tokio::join!(refuse, http_raw(gate.addr, &request));
    assert_eq!(status(&head), 403);
    let (head, _) = http_raw(
        gate.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nConnection: close\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 400);

    let text = ended(&gate, 5.0).await;
    let ended_by = |o: &str| {
        sample(
            &text,
            &format!("wsgate_websocket_connections_ended_total{{outcome=\"{o}\"}}"),
        )
    };
    for (outcome, n) in [
        ("client_close", 1.0),
        ("backend_close", 1.0),
        ("client_gone", 1.0),
        ("backend_gone", 1.0),
        ("protocol_error", 1.0),
        ("close_timeout", 0.0),
        ("client_unresponsive", 0.0),
        ("shutdown", 0.0),
    ] {
        assert_eq!(ended_by(outcome), n, "{outcome}");
    }
    let closes = |sender: &str, code: &str| {
        sample(
            &text,
            &format!("wsgate_websocket_close_frames_total{{sender=\"{sender}\",code=\"{code}\"}}"),
        )
    };
    for (sender, code, n) in [
        ("client", "1000", 1.0),
        ("backend", "1000", 1.0),
        ("client", "other_valid", 1.0),
        ("backend", "other_valid", 1.0),
        ("wsgate", "1001", 2.0),
        ("backend", "1001", 2.0),
        ("wsgate", "1014", 1.0),
        ("client", "1014", 1.0),
        ("wsgate", "1002", 1.0),
        ("client", "1002", 0.0),
        ("wsgate", "1006", 0.0),
    ] {
        assert_eq!(closes(sender, code), n, "{sender} {code}");
    }
    let upgrades = |r: &str| {
        sample(
            &text,
            &format!("wsgate_websocket_upgrades_total{{result=\"{r}\"}}"),
        )
    };
    assert_eq!(upgrades("ok"), 5.0);
    assert_eq!(upgrades("backend_refused"), 1.0);
    assert_eq!(upgrades("bad_request"), 1.0);
    assert_eq!(sample(&text, "wsgate_websocket_connections_active"), 0.0);
    assert_eq!(
        sample(
            &text,
            "wsgate_websocket_connection_duration_seconds_count{outcome=\"client_close\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "wsgate_websocket_release_seconds_count{outcome=\"backend_gone\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "wsgate_websocket_release_seconds_bucket{outcome=\"backend_gone\",le=\"+Inf\"}"
        ),
        1.0
    );
    // Client frames: "hello" and Close, a Close reply, a Close reply (the unmasked
    // frame is refused, not counted); backend frames: four Closes.
    assert_eq!(
        sample(
            &text,
            "wsgate_websocket_frames_total{direction=\"client_to_backend\"}"
        ),
        4.0
    );
    assert_eq!(
        sample(
            &text,
            "wsgate_websocket_frames_total{direction=\"backend_to_client\"}"
        ),
        4.0
    );
    assert!(
        sample(
            &text,
            "wsgate_websocket_bytes_total{direction=\"client_to_backend\"}"
        ) > 0.0
    );
    assert_eq!(
        sample(
            &text,
            "wsgate_http_requests_total{status_class=\"2xx\",method=\"GET\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn traffic_of_an_open_connection_reaches_the_byte_counters() {
    let (gate, backend_l) = gate_with(|_| {}).await;
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    // One burst, then silence: the counters are updated within about a second anyway,
    // not only when the connection ends.
    c.send(TEXT, &[b'x'; 100]).await;
    b.recv().await;
    eventually(async || {
        let text = http_get(gate.admin, "/metrics").await.1;
        sample(
            &text,
            "wsgate_websocket_bytes_total{direction=\"client_to_backend\"}",
        ) == 106.0
    })
    .await;
    let text = http_get(gate.admin, "/metrics").await.1;
    assert_eq!(
        sample(
            &text,
            "wsgate_websocket_frames_total{direction=\"client_to_backend\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "wsgate_websocket_connections_active"),
        1.0,
        "the connection is still open"
    );
}

#[tokio::test]
async fn connections_table_shows_live_counters_and_forgets_ended_ones() {
    let (gate, backend_l) = gate_with(|_| {}).await;
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    c.send(TEXT, &[b'x'; 100]).await;
    b.recv().await;

    // The relay publishes its counters right after writing the frame on; with two
    // workers it may still be doing so on its own thread when the backend has read it.
    // A masked 100-byte text frame: 2 + 4 + 100 bytes.
    let mut body = String::new();
    let mut table = serde_json::Value::Null;
    eventually(async || {
        let (status, text) = http_get(gate.admin, "/connections").await;
        assert_eq!(status, 200);
        table = serde_json::from_str(&text).unwrap();
        body = text;
        table[0]["client_to_backend"]["bytes"] == 106
    })
    .await;
    let conn = &table[0];
    assert_eq!(table.as_array().unwrap().len(), 1, "{body}");
    assert_eq!(conn["path"], "/ws");
    assert_eq!(conn["state"], "open");
    assert_eq!(conn["client_to_backend"]["bytes"], 106, "{body}");
    assert_eq!(conn["client_to_backend"]["frames"], 1);
    assert!(
        conn["client_to_backend"]["seconds_since_last_frame"]
            .as_f64()
            .is_some()
    );
    assert!(conn["backend_to_client"]["seconds_since_last_frame"].is_null());

    c.shutdown_write().await;
    b.recv().await;
    drop(b);
    eventually(async || http_get(gate.admin, "/connections").await.1.trim() == "[]").await;
}

#[tokio::test]
async fn operator_close_needs_opt_in_then_closes_both_sides() {
    let (gate, backend_l) = gate_with(|_| {}).await;
    let (_c, _b) = pair(&gate, &backend_l).await;
    let body = r#"{"code": 4000, "reason": "maintenance"}"#;
    let (status, _) = http_request(gate.admin, "POST", "/connections/1/close", body).await;
    assert_eq!(status, 403);
    drop(gate);

    let (gate, backend_l) = gate_with(|c| {
        c.admin.allow_close = true;
    })
    .await;
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    // The relay registers on its worker's thread as the handshake completes.
    let mut id = None;
    eventually(async || {
        let (_, table) = http_get(gate.admin, "/connections").await;
        id = serde_json::from_str::<serde_json::Value>(&table).unwrap()[0]["id"].as_u64();
        id.is_some()
    })
    .await;
    let id = id.unwrap();

    let (status, _) = http_request(gate.admin, "POST", "/connections/999/close", body).await;
    assert_eq!(status, 404);
    let bad = r#"{"code": 1006}"#;
    let (status, _) =
        http_request(gate.admin, "POST", &format!("/connections/{id}/close"), bad).await;
    assert_eq!(status, 400);
    let (status, _) = http_request(
        gate.admin,
        "POST",
        &format!("/connections/{id}/close"),
        body,
    )
    .await;
    assert_eq!(status, 202);

    let (cf, bf) = (c.recv().await, b.recv().await);
    assert_eq!((cf.close_code(), bf.close_code()), (Some(4000), Some(4000)));
    assert_eq!(&cf.payload[2..], b"maintenance");
    c.send_close(4000, "").await;
    b.send_close(4000, "").await;
    b.shutdown_write().await;
    c.expect_end().await;
    b.expect_end().await;
    drop(c);
    let text = ended(&gate, 1.0).await;
    assert_eq!(
        sample(
            &text,
            "wsgate_websocket_connections_ended_total{outcome=\"admin_close\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn promtool_accepts_a_real_scrape() {
    if !have("promtool") {
        return;
    }
    let (gate, backend_l) = gate_with(|_| {}).await;
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    c.send_close(1000, "").await;
    b.recv().await;
    b.send_close(1000, "").await;
    c.recv().await;
    let text = ended(&gate, 1.0).await;

    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    within(stdin.write_all(text.as_bytes())).await.unwrap();
    drop(stdin);
    let out = within(child.wait_with_output()).await.unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("promtool check metrics:\n{report}");
    assert!(out.status.success(), "{report}");
    assert!(
        report.trim().is_empty(),
        "promtool found problems:\n{report}"
    );
}

#[tokio::test]
async fn a_real_prometheus_scrapes_wsgate() {
    if !have("prometheus") {
        return;
    }
    let (_backend_l, backend_addr) = listener().await;
    let gate = start_gate(test_config(backend_addr)).await;
    let dir = common::test_dir(&format!("wsgate-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: wsgate\n    static_configs:\n      - targets: ['{}']\n",
            gate.admin
        ),
    )
    .unwrap();
    // Prometheus needs a fixed port: take a free one from the kernel.
    let port = listener().await.1.port();
    let web = format!("127.0.0.1:{port}");
    let _prom = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = web.parse().unwrap();
    let mut answer = String::new();
    within(async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let (status, body) = http_get(addr, "/api/v1/query?query=wsgate_build_info").await;
                if status == 200 && body.contains("\"version\"") {
                    answer = body;
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(answer.contains("\"job\":\"wsgate\""), "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn liveness_round_trips_reach_the_histogram_and_the_connection_table() {
    let (gate, backend_l) = gate_with(|c| {
        c.websocket.ping_interval = Some(std::time::Duration::from_millis(100));
    })
    .await;
    let (mut c, mut b) = pair(&gate, &backend_l).await;
    // Both sides are silent: wsgate pings each; only the client answers.
    let ping = c.recv().await;
    assert_eq!(ping.opcode, PING);
    assert_eq!(b.recv().await.opcode, PING);
    c.send(PONG, &ping.payload).await;
    // wsgate's Pong is consumed: the next frame the backend sees is the client's data.
    c.send(TEXT, b"after the pong").await;
    let next = b.recv().await;
    assert_eq!(
        (next.opcode, &next.payload[..]),
        (TEXT, &b"after the pong"[..])
    );
    eventually(async || {
        let text = scrape(&gate).await;
        sample(
            &text,
            "wsgate_websocket_ping_rtt_seconds_count{side=\"client\"}",
        ) == 1.0
    })
    .await;
    let text = scrape(&gate).await;
    assert_eq!(
        sample(
            &text,
            "wsgate_websocket_ping_rtt_seconds_count{side=\"backend\"}"
        ),
        0.0,
        "the backend never answered"
    );
    let (_, table) = http_get(gate.admin, "/connections").await;
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    assert!(table[0]["client_ping_rtt_seconds"].as_f64().unwrap() > 0.0);
    assert!(table[0]["backend_ping_rtt_seconds"].is_null());
}
