//! Live reconfiguration with the real binary: SIGHUP and a changed file apply a new
//! configuration without dropping a connection; open WebSockets adopt new timers; a
//! broken file changes nothing; keys that need a restart keep their running values.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::*;

/// Rewrites a configuration file as a ConfigMap update does: a new file renamed over
/// the old one, so a reader sees one or the other.
fn rewrite(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn reloads(admin: SocketAddr, result: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    sample(
        &text,
        &format!("wsgate_config_reloads_total{{result=\"{result}\"}}"),
    )
}

/// A relayed round trip: the connection still works.
async fn still_relays(c: &mut Peer, b: &mut Peer) {
    c.send(TEXT, b"still there?").await;
    assert_eq!(b.recv().await.payload, b"still there?");
    b.send(TEXT, b"yes").await;
    assert_eq!(c.recv().await.payload, b"yes");
}

#[tokio::test]
async fn sighup_without_tls_reloads_and_every_websocket_keeps_relaying() {
    let (backend_l, backend_addr) = listener().await;
    // No [tls]: before, SIGHUP's default action ended such a process (status 129).
    let (mut child, addr, admin, mut log) = spawn_wsgate(backend_addr, "").await;
    let mut pairs = Vec::new();
    for _ in 0..3 {
        let ((c, _), (b, _)) = tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(&backend_l, ""));
        pairs.push((c, b));
    }
    signal(&child, "HUP").await;
    log_line(&mut log, |l| l["message"] == "configuration reloaded").await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "wsgate exited on SIGHUP"
    );
    for (c, b) in &mut pairs {
        still_relays(c, b).await;
    }
    assert_eq!(reloads(admin, "ok").await, 1.0);
    // A second one too.
    signal(&child, "HUP").await;
    log_line(&mut log, |l| l["message"] == "configuration reloaded").await;
    for (c, b) in &mut pairs {
        still_relays(c, b).await;
    }
}

#[tokio::test]
async fn an_idle_timeout_introduced_by_a_reload_closes_a_websocket_opened_before() {
    let (backend_l, backend_addr) = listener().await;
    let path = temp_file("reload.toml", &wsgate_config(backend_addr, ""));
    let (child, addr, _admin, mut log) = spawn_wsgate_with(&path).await;
    let ((mut c, _), (mut b, _)) =
        tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(&backend_l, ""));
    still_relays(&mut c, &mut b).await;

    rewrite(
        &path,
        &wsgate_config(backend_addr, "[websocket]\nidle_timeout = \"300ms\""),
    );
    signal(&child, "HUP").await;
    log_line(&mut log, |l| l["message"] == "configuration reloaded").await;
    // The connection was open before the reload; the new timer reaches it.
    let (cf, bf) = (c.recv_close().await, b.recv_close().await);
    assert_eq!((cf.close_code(), bf.close_code()), (Some(1001), Some(1001)));
    assert!(cf.payload.ends_with(b"idle timeout"), "{cf:?}");
    c.send_close(1001, "").await;
    b.send_close(1001, "").await;
    b.shutdown_write().await;
    let ended = log_line(&mut log, |l| l["message"] == "websocket connection ended").await;
    assert_eq!(ended["outcome"], "idle_timeout");
}

#[tokio::test]
async fn a_broken_file_changes_nothing_and_the_log_names_the_key() {
    let (backend_l, backend_addr) = listener().await;
    let path = temp_file("broken.toml", &wsgate_config(backend_addr, ""));
    let (child, addr, admin, mut log) = spawn_wsgate_with(&path).await;
    let ((mut c, _), (mut b, _)) =
        tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(&backend_l, ""));

    // One valid change and one bad value: refused whole.
    rewrite(
        &path,
        &wsgate_config(
            backend_addr,
            "max_connections = 7\n[websocket]\nping_interval = 5",
        ),
    );
    signal(&child, "HUP").await;
    let refused = log_line(&mut log, |l| {
        l["message"] == "configuration reload refused: keeping the running configuration"
    })
    .await;
    assert_eq!(refused["key"], "websocket.ping_interval");
    assert!(
        refused["problem"]
            .as_str()
            .unwrap()
            .contains("expected a string"),
        "{refused}"
    );
    assert_eq!(reloads(admin, "error").await, 1.0);
    assert_eq!(reloads(admin, "ok").await, 0.0);
    // The valid change did not come in either.
    let (_, text) = http_get(admin, "/metrics").await;
    assert_ne!(sample(&text, "wsgate_connections_max"), 7.0);
    still_relays(&mut c, &mut b).await;
    let (_, table) = http_get(admin, "/connections").await;
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    assert_eq!(table[0]["state"], "open");
}

#[tokio::test]
async fn a_changed_listen_keeps_the_running_one_with_a_warning() {
    let (backend_l, backend_addr) = listener().await;
    let path = temp_file("listen.toml", &wsgate_config(backend_addr, ""));
    let (child, addr, _admin, mut log) = spawn_wsgate_with(&path).await;
    let nowhere = dead_addr();
    let elsewhere = nowhere.addr;
    let text = wsgate_config(backend_addr, "").replace(
        "listen = \"127.0.0.1:0\"\nbackend",
        &format!("listen = \"{elsewhere}\"\nbackend"),
    );
    rewrite(&path, &text);
    signal(&child, "HUP").await;
    let warned = log_line(&mut log, |l| l["key"] == "listen").await;
    assert_eq!(warned["level"], "WARN");
    log_line(&mut log, |l| l["message"] == "configuration reloaded").await;
    // Still serving where it was.
    let ((mut c, _), (mut b, _)) =
        tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(&backend_l, ""));
    still_relays(&mut c, &mut b).await;
}

#[tokio::test]
async fn a_changed_file_is_reloaded_without_sighup() {
    let (backend_l, backend_addr) = listener().await;
    let path = temp_file(
        "watched.toml",
        &wsgate_config(backend_addr, "reload_interval = \"100ms\""),
    );
    let (_child, addr, admin, mut log) = spawn_wsgate_with(&path).await;
    let ((mut c, _), (mut b, _)) =
        tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(&backend_l, ""));
    rewrite(
        &path,
        &wsgate_config(
            backend_addr,
            "reload_interval = \"100ms\"\n[websocket]\nidle_timeout = \"200ms\"",
        ),
    );
    let reloaded = log_line(&mut log, |l| l["message"] == "configuration reloaded").await;
    assert_eq!(reloaded["trigger"], "file changed");
    assert_eq!(reloads(admin, "ok").await, 1.0);
    let (cf, bf) = (c.recv_close().await, b.recv_close().await);
    assert_eq!((cf.close_code(), bf.close_code()), (Some(1001), Some(1001)));
}

/// A backend connection belongs to the configuration its exchange started with: one
/// still in use when a reload points `backend` elsewhere is closed when its exchange
/// ends, not put in the new configuration's pool, where the next request would have
/// gone to the old backend on it.
#[tokio::test]
async fn a_backend_connection_from_before_a_reload_to_another_backend_is_not_reused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (old_l, old_addr) = listener().await;
    let (new_l, new_addr) = listener().await;
    // One worker: one pool, which both requests would share.
    let path = temp_file("moved.toml", &wsgate_config(old_addr, "workers = 1"));
    let (child, addr, _admin, mut log) = spawn_wsgate_with(&path).await;

    // A response whose body is still open across the reload.
    let mut client = within(tokio::net::TcpStream::connect(addr)).await.unwrap();
    within(client.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"))
        .await
        .unwrap();
    let (mut old, _) = within(old_l.accept()).await.unwrap();
    let (head, _) = read_head(&mut old).await;
    assert!(head.starts_with("GET /slow HTTP/1.1\r\n"), "{head}");
    within(old.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"))
        .await
        .unwrap();
    let (head, _) = read_head(&mut client).await;
    assert_eq!(status(&head), 200);

    rewrite(&path, &wsgate_config(new_addr, "workers = 1"));
    signal(&child, "HUP").await;
    log_line(&mut log, |l| l["message"] == "configuration reloaded").await;

    // The old response ends whole: its connection could carry another request.
    within(old.write_all(b"0\r\n\r\n")).await.unwrap();
    let mut body = Vec::new();
    while !body.ends_with(b"0\r\n\r\n") {
        let mut chunk = [0u8; 256];
        let n = within(client.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "the client's response ended early: {body:?}");
        body.extend_from_slice(&chunk[..n]);
    }

    // The next request goes to the new backend, and the old one's connection closes.
    let next = tokio::spawn(http_raw(
        addr,
        "GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ));
    let (mut new, _) = within(new_l.accept()).await.unwrap();
    let (head, _) = read_head(&mut new).await;
    assert!(head.starts_with("GET /next HTTP/1.1\r\n"), "{head}");
    within(new.write_all(b"HTTP/1.1 204 No Content\r\n\r\n"))
        .await
        .unwrap();
    let (head, _) = within(next).await.unwrap();
    assert_eq!(status(&head), 204);
    let mut rest = Vec::new();
    let n = within(old.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(
        n,
        0,
        "the old backend got {:?}",
        String::from_utf8_lossy(&rest)
    );
}
