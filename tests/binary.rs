//! The real `wsgate` binary: `--check-config`, and a graceful shutdown on SIGTERM with
//! WebSockets open.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use tokio::process::{Child, Command};

#[tokio::test]
async fn check_config_accepts_the_example() {
    let out = within(
        Command::new(BIN)
            .args(["--check-config", "config.example.toml"])
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[tokio::test]
async fn check_config_lists_every_problem_and_exits_64() {
    let path = temp_file(
        "bad.toml",
        "backend = \"ftp://x\"\n[websocket]\nping_interval = \"often\"\nclose_timout = \"1s\"\n",
    );
    let out = within(Command::new(BIN).arg("--check-config").arg(&path).output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "backend:",
        "websocket.ping_interval:",
        "websocket.close_timout: unknown key",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

#[tokio::test]
async fn a_bad_flag_value_is_a_config_error() {
    let out = within(Command::new(BIN).args(["--backend", "ftp://x"]).output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backend"));
}

#[tokio::test]
async fn sigterm_drains_every_websocket_on_both_sides_and_exits_0() {
    let (backend_l, backend_addr) = listener().await;
    let (mut child, addr, admin, _stderr) = spawn_wsgate(
        backend_addr,
        "[shutdown]\ndrain_timeout = \"20s\"\nspread = \"1s\"",
    )
    .await;
    let mut clients = Vec::new();
    let mut backends = Vec::new();
    for _ in 0..3 {
        let ((mut c, _), (mut b, _)) =
            tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(&backend_l, ""));
        c.send(TEXT, b"live").await;
        assert_eq!(b.recv().await.payload, b"live");
        clients.push(c);
        backends.push(b);
    }
    let (head, _) = http_raw(
        admin,
        "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 200);

    sigterm(&child).await;

    // Clients are told to reconnect elsewhere (1012), the backend that its client is
    // going away (1001).
    for (c, b) in clients.iter_mut().zip(backends.iter_mut()) {
        let (cf, bf) = (c.recv().await, b.recv().await);
        assert_eq!((cf.close_code(), bf.close_code()), (Some(1012), Some(1001)));
    }
    // The handshakes are still open, so wsgate is draining: not ready.
    let (head, _) = http_raw(
        admin,
        "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 503);
    for (c, b) in clients.iter_mut().zip(backends.iter_mut()) {
        c.send_close(1001, "").await;
        b.send_close(1001, "").await;
        b.shutdown_write().await;
    }
    for (c, b) in clients.iter_mut().zip(backends.iter_mut()) {
        assert_eq!(c.expect_end().await, End::Eof);
        assert_eq!(b.expect_end().await, End::Eof);
    }
    // Like browsers, the clients close their end once the server closed.
    drop(clients);
    // Exits well before the 20 s drain deadline (`within` allows 10 s), with status 0.
    let exit = within(child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let (backend_l, backend_addr) = listener().await;
    let (mut child, addr, _admin, _stderr) = spawn_wsgate(
        backend_addr,
        "[shutdown]\ndrain_timeout = \"60s\"\nspread = \"0s\"\n[websocket]\nclose_timeout = \"60s\"",
    )
    .await;
    let ((mut c, _), (mut b, _)) =
        tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(&backend_l, ""));
    sigterm(&child).await;
    let (cf, bf) = (c.recv().await, b.recv().await);
    assert_eq!((cf.close_code(), bf.close_code()), (Some(1012), Some(1001)));
    // Neither side answers the Close: the drain would wait up to 60 s. A second SIGTERM
    // ends it now: both connections are dropped and the process exits with 0, well
    // within `within`'s 10 s.
    sigterm(&child).await;
    assert!(matches!(c.expect_end().await, End::Eof | End::Reset));
    assert!(matches!(b.expect_end().await, End::Eof | End::Reset));
    let exit = within(child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Names of a running process's threads, from /proc.
fn threads(child: &Child) -> Vec<String> {
    let pid = child.id().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn workers_sets_the_thread_count_and_one_worker_is_one_thread() {
    let (backend_l, backend_addr) = listener().await;
    for (workers, expected) in [
        (1, vec!["wsgate", "wsgate-log"]),
        (
            3,
            vec!["wsgate", "wsgate-log", "wsgate-worker-1", "wsgate-worker-2"],
        ),
    ] {
        let (child, addr, _admin, _stderr) =
            spawn_wsgate(backend_addr, &format!("workers = {workers}")).await;
        // A WebSocket relayed end to end: the single thread does all the work.
        let ((mut c, _), (mut b, _)) =
            tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(&backend_l, ""));
        c.send(TEXT, b"one thread").await;
        assert_eq!(b.recv().await.payload, b"one thread");
        b.send(TEXT, b"back").await;
        assert_eq!(c.recv().await.payload, b"back");
        // The main thread is worker 0; each other worker is one more thread; the log
        // lines are written by a thread of their own.
        assert_eq!(threads(&child), expected, "workers = {workers}");
    }
}

#[tokio::test]
async fn wsgate_demo_prints_its_urls_and_a_query_ends_on_the_admin_page() {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncBufReadExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let config = temp_file(
        "demo.toml",
        "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut child = Command::new(BIN)
        .arg("demo")
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = async |label: &str| -> String {
        let line = within(out.next_line()).await.unwrap().unwrap();
        let url = line.strip_prefix(label).unwrap_or_else(|| panic!("{line}"));
        url.trim().to_string()
    };
    let demo = url("demo:").await;
    let admin = url("admin:").await;
    let host = |url: &str| -> std::net::SocketAddr {
        url.trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap()
    };
    let (proxy, admin) = (host(&demo), host(&admin));

    // The dashboard comes from the built-in backend, through wsgate.
    let (code, page) = http_get(proxy, "/").await;
    assert_eq!(code, 200);
    assert!(page.contains("wsgate demo"), "{page}");

    // A query streams rows until the client cancels it properly.
    let (mut ws, _) = within(tokio_tungstenite::connect_async(format!(
        "ws://{proxy}/query?panel=errors"
    )))
    .await
    .unwrap();
    for _ in 0..3 {
        let row = within(ws.next()).await.unwrap().unwrap();
        assert!(row.is_text(), "{row:?}");
    }
    within(ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "cancelled".into(),
    }))))
    .await
    .unwrap();
    while within(ws.next()).await.is_some_and(|m| m.is_ok()) {}

    // The ending shows on the admin listener, with both sides' codes.
    eventually(async || {
        let (_, body) = http_get(admin, "/connections/recent").await;
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        list[0]["outcome"] == "client_close"
            && list[0]["client_sent_code"] == 1000
            && list[0]["backend_received_code"] == 1000
    })
    .await;
    sigterm(&child).await;
    let exit = within(child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
}
