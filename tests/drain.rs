//! The drain and the exit, with the real binary: on request (`POST /drain`, `wsgate
//! drain --wait`), with Closes spread over `shutdown.spread`, in the order Kubernetes
//! runs a native sidecar (drain while the backend serves, then the backend exits, then
//! SIGTERM), and what the proxy port answers meanwhile.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A backend WebSocket that streams a row every 10 ms (a query's results) until a Close
/// arrives, answers it and closes TCP, as a server does. Returns the code it got.
fn streaming_backend(mut b: Peer) -> JoinHandle<Option<u16>> {
    tokio::spawn(async move {
        let mut rows = tokio::time::interval(Duration::from_millis(10));
        loop {
            tokio::select! {
                frame = b.try_recv() => match frame {
                    Ok(f) if f.opcode == CLOSE => {
                        let code = f.close_code();
                        b.send_close(code.unwrap_or(1000), "").await;
                        b.shutdown_write().await;
                        b.expect_end().await;
                        return code;
                    }
                    Ok(_) => {}
                    Err(end) => panic!("the backend's connection ended ({end:?}) without a Close"),
                },
                _ = rows.tick() => b.send(TEXT, b"row").await,
            }
        }
    })
}

/// A browser-like client: reads until a Close, notes when it came, answers it and waits
/// for the server to close TCP. Returns the code and the moment.
fn closing_client(mut c: Peer) -> JoinHandle<(Option<u16>, Instant)> {
    tokio::spawn(async move {
        let close = c.recv_close().await;
        let at = Instant::now();
        let code = close.close_code();
        c.send_close(code.unwrap_or(1000), "").await;
        assert_eq!(c.expect_end().await, End::Eof);
        (code, at)
    })
}

/// `n` WebSockets through the wsgate at `addr`, each backend streaming.
async fn open(
    addr: SocketAddr,
    backend_l: &TcpListener,
    n: usize,
) -> (
    Vec<JoinHandle<(Option<u16>, Instant)>>,
    Vec<JoinHandle<Option<u16>>>,
) {
    let (mut clients, mut backends) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let ((c, _), (b, _)) = tokio::join!(connect_ws(addr, "/ws", ""), accept_ws(backend_l, ""));
        backends.push(streaming_backend(b));
        clients.push(closing_client(c));
    }
    (clients, backends)
}

async fn readyz(admin: SocketAddr) -> u16 {
    http_get(admin, "/readyz").await.0
}

#[tokio::test]
async fn a_drain_on_request_spreads_1012_to_clients_and_1001_to_backends() {
    let spread = Duration::from_secs(2);
    let (backend_l, backend_addr) = listener().await;
    let (mut child, addr, admin, _log) = spawn_wsgate(
        backend_addr,
        "[shutdown]\ndrain_timeout = \"20s\"\nspread = \"2s\"",
    )
    .await;
    let (clients, backends) = open(addr, &backend_l, 50).await;
    assert_eq!(readyz(admin).await, 200);

    let asked = Instant::now();
    let (code, body) = http_request(admin, "POST", "/drain", "").await;
    assert_eq!(code, 202, "{body}");
    let drain: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(drain["draining"], true);
    assert_eq!(drain["client_close_code"], 1012);
    // Asked again while under way: the same answer, nothing new begins.
    assert_eq!(http_request(admin, "POST", "/drain", "").await.0, 202);
    assert_eq!(readyz(admin).await, 503);

    // The port still answers: a new WebSocket is sent elsewhere...
    let (head, _) = http_raw(addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(header(&head, "retry-after"), Some("1"));
    assert_eq!(header(&head, "wsgate-error"), Some("draining"));
    // ...and a plain request still reaches the backend, answered with Connection: close.
    let get = tokio::spawn(async move {
        let mut s = within(TcpStream::connect(addr)).await.unwrap();
        within(s.write_all(b"GET /plain HTTP/1.1\r\nHost: wsgate.test\r\n\r\n"))
            .await
            .unwrap();
        let (head, mut body) = read_head(&mut s).await;
        // wsgate closes the connection after this one response.
        within(s.read_to_end(&mut body)).await.unwrap();
        (head, body)
    });
    let (mut b, _) = within(backend_l.accept()).await.unwrap();
    let (request, _) = read_head(&mut b).await;
    assert!(request.starts_with("GET /plain HTTP/1.1"), "{request}");
    within(b.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"))
        .await
        .unwrap();
    let (head, body) = within(get).await.unwrap();
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(header(&head, "connection"), Some("close"));
    assert_eq!(body, b"ok");

    let mut arrivals = Vec::new();
    for client in clients {
        let (code, at) = within(client).await.unwrap();
        assert_eq!(code, Some(1012));
        arrivals.push(at.duration_since(asked));
    }
    for backend in backends {
        assert_eq!(within(backend).await.unwrap(), Some(1001));
    }
    arrivals.sort();
    let (first, last) = (arrivals[0], arrivals[arrivals.len() - 1]);
    println!("50 WebSockets: first Close after {first:?}, last after {last:?}");
    // Uniform over 2 s: the 50 arrivals cover more than half of it (the chance that
    // they all fall within one half is about 50 × 2^-49).
    assert!(last - first >= spread / 2, "{first:?} .. {last:?}");
    assert!(last < spread + Duration::from_secs(1), "{last:?}");
    let (_, drain) = http_get(admin, "/drain").await;
    let drain: serde_json::Value = serde_json::from_str(&drain).unwrap();
    assert_eq!(drain["open_websockets"], 0);
    assert_eq!(drain["ended_since_start"]["shutdown"], 50);

    // The backend exits; SIGTERM then ends wsgate at once, not at the 20 s deadline.
    drop(backend_l);
    let stopping = Instant::now();
    sigterm(&child).await;
    let exit = within(child.wait()).await.unwrap();
    let took = stopping.elapsed();
    assert!(exit.success(), "{exit:?}");
    println!("SIGTERM after the drain: exit 0 after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test]
async fn the_native_sidecar_order_tells_no_client_the_backend_failed() {
    let (backend_l, backend_addr) = listener().await;
    let (mut child, addr, admin, _log) = spawn_wsgate(
        backend_addr,
        "[shutdown]\ndrain_timeout = \"20s\"\nspread = \"500ms\"",
    )
    .await;
    let (clients, backends) = open(addr, &backend_l, 5).await;

    // The preStop hook: `wsgate drain --wait`, while the backend still serves.
    let out = within(
        tokio::process::Command::new(BIN)
            .args(["drain", "--wait", "--admin", &admin.to_string()])
            .output(),
    )
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(said.starts_with("drained in "), "{said}");
    assert!(said.contains("5 WebSocket(s) ended (shutdown 5)"), "{said}");
    for client in clients {
        assert_eq!(within(client).await.unwrap().0, Some(1012), "not 1014");
    }
    for backend in backends {
        assert_eq!(within(backend).await.unwrap(), Some(1001));
    }
    // The backend container exits, then the kubelet sends the sidecar SIGTERM.
    drop(backend_l);
    sigterm(&child).await;
    let exit = within(child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn sigterm_alone_drains_with_the_spread_and_exits_once_the_websockets_are_gone() {
    let (backend_l, backend_addr) = listener().await;
    let (mut child, addr, admin, _log) = spawn_wsgate(
        backend_addr,
        "[shutdown]\ndrain_timeout = \"20s\"\nspread = \"300ms\"\nclient_close_code = 1001",
    )
    .await;
    let (clients, backends) = open(addr, &backend_l, 10).await;
    sigterm(&child).await;
    for client in clients {
        assert_eq!(within(client).await.unwrap().0, Some(1001));
    }
    for backend in backends {
        assert_eq!(within(backend).await.unwrap(), Some(1001));
    }
    // Nothing is left: the process ends well before the 20 s deadline.
    let exit = within(child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "the admin listener is closed"
    );
}

#[tokio::test]
async fn wsgate_drain_says_when_nothing_listens() {
    let dead = dead_addr();
    let out = within(
        tokio::process::Command::new(BIN)
            .args(["drain", "--admin", &dead.addr.to_string()])
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("POST /drain"));
}

#[tokio::test]
async fn wsgate_drain_reaches_wsgate_through_a_file_that_no_longer_validates() {
    let (_backend_l, backend_addr) = listener().await;
    let (_child, _addr, admin, _log) = spawn_wsgate(backend_addr, "").await;
    // A ConfigMap update the running wsgate refused: the preStop hook still drains it.
    let broken = temp_file(
        "broken.toml",
        &format!("max_connections = -1\n[admin]\nlisten = \"{admin}\"\n"),
    );
    let out = within(
        tokio::process::Command::new(BIN)
            .args(["drain", "--wait", "--config"])
            .arg(&broken)
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("drained in"));
    assert_eq!(http_get(admin, "/readyz").await.0, 503);
}
