//! The demo backend behind a real wsgate, as `wsgate demo` will run it: what the backend
//! records when a client vanishes or drops its connection is what wsgate told it (a
//! WebSocket), or when wsgate closed its connection (a search stream), and wsgate's own
//! record of the same ending.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::connect_async;
use wsgate::config::BackendUrl;
use wsgate::demo::{DemoBackend, Links};
use wsgate::{Config, Listeners};

/// Bound on any single wait: it turns a hang into a failure, never decides an outcome.
const LIMIT: Duration = Duration::from_secs(10);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

/// wsgate on port 0 with short liveness timers, in front of a demo backend that knows
/// wsgate's address: wsgate binds first, then the demo starts, then wsgate serves.
struct Setup {
    proxy: SocketAddr,
    admin: SocketAddr,
    _demo: DemoBackend,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    let mut config = Config::parse(
        "listen = \"127.0.0.1:0\"\nworkers = 1\n\
         [websocket]\nping_interval = \"300ms\"\npong_timeout = \"300ms\"\nclose_timeout = \"1s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let listeners = Listeners::bind(&config).unwrap();
    let proxy = listeners.local_addr().unwrap();
    let admin = listeners.admin.as_ref().unwrap().local_addr().unwrap();
    let demo = DemoBackend::start(Links {
        proxy,
        admin_page: None,
    })
    .unwrap();
    config.backend = BackendUrl::parse(&format!("http://{}", demo.addr())).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        wsgate::serve(config, listeners, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Setup {
        proxy,
        admin,
        _demo: demo,
        stop,
        served,
    }
}

impl Setup {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        within(self.served).await.unwrap();
    }
}

/// One request on a fresh connection, read to its end: the status and the body (a
/// chunked body still in its chunks).
async fn http(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut s = within(TcpStream::connect(addr)).await.unwrap();
    let request = format!(
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    within(s.write_all(request.as_bytes())).await.unwrap();
    let mut raw = Vec::new();
    within(s.read_to_end(&mut raw)).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_string(),
    )
}

/// Polls the demo's `/events`, through wsgate, until one satisfies `pred`.
async fn event(proxy: SocketAddr, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    within(async {
        loop {
            let (status, body) = http(proxy, "GET /events HTTP/1.1", "").await;
            assert_eq!(status, 200);
            let events: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
            if let Some(e) = events.into_iter().find(|e| pred(e)) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_vanished_laptop_reaches_the_backend_as_close_1001_client_unresponsive() {
    let gate = setup().await;
    let (status, page) = http(gate.proxy, "GET / HTTP/1.1", "").await;
    assert_eq!(status, 200);
    assert!(page.contains(&format!("<b>wsgate</b> {}", gate.proxy)));
    let (status, answer) = http(
        gate.proxy,
        "POST /simulate/vanish HTTP/1.1\r\nContent-Type: application/json",
        "{}",
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let e = event(gate.proxy, |e| e["kind"] == "client_unresponsive").await;
    assert_eq!(e["panel"], "vanished-laptop");
    assert_eq!(
        (e["code"].as_u64(), e["reason"].as_str()),
        (Some(1001), Some("client unresponsive"))
    );
    // Awake for 1 s, then one ping interval and one pong timeout.
    assert!(e["after_ms"].as_u64().unwrap() >= 1_000, "{e}");
    event(gate.proxy, |e| e["kind"] == "laptop_silent").await;
    gate.shutdown().await;
}

#[tokio::test]
async fn a_client_dropping_its_connection_reaches_the_backend_as_close_1001() {
    let gate = setup().await;
    let url = format!("ws://{}/query?panel=errors", gate.proxy);
    let (mut ws, _) = within(connect_async(url)).await.unwrap();
    assert!(within(ws.next()).await.unwrap().unwrap().is_text());
    drop(ws); // no Close frame: without wsgate the backend records "dropped"
    let e = event(gate.proxy, |e| {
        e["query"].is_u64() && e["kind"] != "started"
    })
    .await;
    assert_eq!(e["kind"], "client_went_away", "{e}");
    assert_eq!(
        (e["code"].as_u64(), e["reason"].as_str()),
        (Some(1001), Some("client went away"))
    );
    gate.shutdown().await;
}

/// The body of a chunked response, without its chunk framing.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap();
    }
}

/// The newest of wsgate's recorded HTTP endings that satisfies `pred`, from its admin API.
async fn http_ending(
    admin: SocketAddr,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    within(async {
        loop {
            let (status, body) =
                http(admin, "GET /connections/recent?kind=http HTTP/1.1", "").await;
            assert_eq!(status, 200, "{body}");
            let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
            if let Some(e) = list.into_iter().find(|e| pred(e)) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

const SEARCH: &str = "POST /api/default/_search_stream HTTP/1.1\r\nContent-Type: application/json";
const SEARCH_PATH: &str = "/api/default/_search_stream";

#[tokio::test]
async fn a_search_stream_runs_through_wsgate_and_ends_completed_on_both_sides() {
    let gate = setup().await;
    let (status, raw) = http(gate.proxy, SEARCH, r#"{"query": {"size": 10}}"#).await;
    assert_eq!(status, 200);
    let stream = dechunk(&raw);
    let kinds: Vec<&str> = stream
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        kinds,
        [
            "search_response_metadata",
            "search_response_hits",
            "search_response_hits",
            "search_response_end"
        ],
        "{stream}"
    );
    let e = event(gate.proxy, |e| {
        e["panel"] == "search" && e["kind"] != "started"
    })
    .await;
    assert_eq!(e["kind"], "completed", "{e}");
    assert_eq!(e["rows"], 10);
    // wsgate kept the event stream in its history: the whole response reached the client.
    let ending = http_ending(gate.admin, |e| e["path"] == SEARCH_PATH).await;
    assert_eq!(ending["outcome"], "completed", "{ending}");
    assert_eq!(ending["method"], "POST");
    assert_eq!(ending["status"], 200);
    assert_eq!(ending["framing"], "chunked");
    assert_eq!(ending["event_stream"], true);
    assert_eq!(ending["stream"], true);
    assert_eq!(
        ending["backend_to_client"]["bytes"].as_u64(),
        Some(stream.len() as u64)
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn a_client_dropping_a_search_stream_reaches_the_backend_at_once_as_a_closed_connection() {
    let gate = setup().await;
    let mut s = within(TcpStream::connect(gate.proxy)).await.unwrap();
    let body = r#"{"query": {"sql": "SELECT 1"}}"#;
    let request = format!(
        "{SEARCH}\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{body}",
        gate.proxy,
        body.len()
    );
    within(s.write_all(request.as_bytes())).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("event: search_response_hits") {
        let mut chunk = [0u8; 4096];
        let n = within(s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&chunk[..n]);
    }
    // The stream is open on wsgate's admin API meanwhile.
    let (_, open) = http(gate.admin, "GET /connections HTTP/1.1", "").await;
    let open: Vec<serde_json::Value> = serde_json::from_str(&open).unwrap();
    assert!(
        open.iter()
            .any(|c| c["kind"] == "http" && c["path"] == SEARCH_PATH && c["event_stream"] == true),
        "{open:?}"
    );
    drop(s); // FIN mid-stream, no more reads: the client is gone
    let e = event(gate.proxy, |e| {
        e["panel"] == "search" && e["kind"] != "started"
    })
    .await;
    assert_eq!(e["kind"], "client_went_away", "{e}");
    let text = e["text"].as_str().unwrap();
    assert!(
        text.starts_with("client went away (connection closed) after "),
        "{text}"
    );
    // 800 hits take 8 s: wsgate closed the backend's connection long before, and the
    // backend learned within about an event period of the last event it sent.
    assert!(e["after_ms"].as_u64().unwrap() < 4_000, "{e}");
    assert!(e["since_last_event_ms"].as_u64().unwrap() < 1_000, "{e}");
    let ending = http_ending(gate.admin, |e| e["path"] == SEARCH_PATH).await;
    assert_eq!(ending["outcome"], "client_aborted", "{ending}");
    assert_eq!(ending["status"], 200);
    assert!(
        ending["release_seconds"].as_f64().unwrap() < 1.0,
        "{ending}"
    );
    gate.shutdown().await;
}
