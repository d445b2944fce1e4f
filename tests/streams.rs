//! Streaming HTTP: every way an HTTP exchange ends, over HTTP/1.1 and HTTP/2, with what
//! the client sees (a clean end, or a truncation: no final chunk and the connection
//! closed, or RST_STREAM), what the backend sees (its connection released), and the
//! record: `/connections` while open, `/connections/recent` and the metrics after.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use hyper::Response;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Which protocol the client speaks to wsgate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

const BOTH: [Proto; 2] = [Proto::H1, Proto::H2];

/// One request the backend received: its path, and the sender that feeds its response
/// body (an `Err` aborts it; dropping the sender ends it cleanly). `released` resolves
/// when the backend's side of the exchange is gone: hyper dropped the body because the
/// connection closed.
struct Held {
    path: String,
    body: UnboundedSender<Result<Bytes, ()>>,
}

impl Held {
    fn send(&self, bytes: &'static [u8]) {
        self.body.send(Ok(Bytes::from_static(bytes))).unwrap();
    }

    /// Waits until wsgate released the backend's side (the body's receiver is gone).
    async fn released(&self) {
        within(self.body.closed()).await;
    }
}

/// A backend whose responses the test feeds: `/events` is a `text/event-stream`,
/// `/ndjson` a chunked `application/x-ndjson`, `/fixed` has `Content-Length: 1000`.
async fn stream_backend() -> (SocketAddr, UnboundedReceiver<Held>) {
    let (tx, rx) = unbounded_channel();
    let (addr, _) = http_backend(move |req| {
        let tx = tx.clone();
        async move {
            let path = req.uri().path().to_string();
            // Read whole, as a server does before it answers: hyper's server stops
            // reading a connection whose request body nobody reads, and would not see
            // wsgate close it.
            use http_body_util::BodyExt;
            let _ = req.into_body().collect().await;
            let (body_tx, body) = channel_body();
            let mut resp = Response::builder();
            resp = match path.as_str() {
                "/events" => resp.header("content-type", "text/event-stream"),
                "/fixed" => resp.header("content-length", "1000"),
                _ => resp.header("content-type", "application/x-ndjson"),
            };
            let _ = tx.send(Held {
                path,
                body: body_tx,
            });
            resp.body(body).unwrap()
        }
    })
    .await;
    (addr, rx)
}

async fn gate_for(backend: SocketAddr, tweak: impl FnOnce(&mut wsgate::Config)) -> Gate {
    let mut c = test_config(backend);
    c.http.h2c = true;
    tweak(&mut c);
    start_gate(c).await
}

/// How a response body ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The final chunk, the full length, or END_STREAM.
    Clean,
    /// No final chunk and the connection closed, a short body, or RST_STREAM.
    Cut,
}

/// A streaming request in flight, HTTP/1.1 (raw, to see the framing) or HTTP/2.
enum Client {
    H1 {
        stream: TcpStream,
        buf: Vec<u8>,
        /// Chunked (else Content-Length with this many bytes left).
        left: Option<usize>,
    },
    H2 {
        body: hyper::body::Incoming,
        /// Keeps the connection.
        _sender: hyper::client::conn::http2::SendRequest<Body>,
    },
}

impl Client {
    /// Sends `GET path` (`POST` with a small body for `/events`) and reads the head;
    /// returns the status and the client.
    async fn open(gate: &Gate, proto: Proto, path: &str) -> (u16, Client) {
        Client::open_at(gate.addr, proto, path).await
    }

    async fn open_at(addr: SocketAddr, proto: Proto, path: &str) -> (u16, Client) {
        match proto {
            Proto::H1 => {
                let mut stream = within(TcpStream::connect(addr)).await.unwrap();
                let req = format!(
                    "POST {path} HTTP/1.1\r\nHost: dash.example\r\nContent-Length: 2\r\n\r\n{{}}"
                );
                within(stream.write_all(req.as_bytes())).await.unwrap();
                let (head, buf) = read_head(&mut stream).await;
                let left = header(&head, "content-length").map(|n| n.parse().unwrap());
                if left.is_none() {
                    assert_eq!(
                        header(&head, "transfer-encoding"),
                        Some("chunked"),
                        "{head}"
                    );
                }
                (status(&head), Client::H1 { stream, buf, left })
            }
            Proto::H2 => {
                let (mut sender, _conn) = h2c_connect(addr).await;
                let resp = within(sender.send_request(h2_request("POST", path, full("{}"))))
                    .await
                    .unwrap();
                (
                    resp.status().as_u16(),
                    Client::H2 {
                        body: resp.into_body(),
                        _sender: sender,
                    },
                )
            }
        }
    }

    /// Reads body bytes until `want` bytes arrived; returns them.
    async fn read(&mut self, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            match self.next().await {
                Some(Ok(data)) => got.extend_from_slice(&data),
                other => panic!("the body ended ({other:?}) after {got:?}"),
            }
        }
        got
    }

    /// The next piece of the body: `None` at a clean end, `Some(Err)` when cut.
    async fn next(&mut self) -> Option<Result<Vec<u8>, ()>> {
        match self {
            Client::H2 { body, .. } => {
                use http_body_util::BodyExt;
                loop {
                    match within(body.frame()).await {
                        None => return None,
                        Some(Ok(f)) => {
                            if let Ok(d) = f.into_data() {
                                return Some(Ok(d.to_vec()));
                            }
                        }
                        Some(Err(_)) => return Some(Err(())),
                    }
                }
            }
            Client::H1 { stream, buf, left } => loop {
                match left {
                    Some(0) => return None,
                    Some(n) if !buf.is_empty() => {
                        let take = (*n).min(buf.len());
                        *n -= take;
                        return Some(Ok(buf.drain(..take).collect()));
                    }
                    Some(_) => {}
                    None => {
                        if let Some(line) = buf.windows(2).position(|w| w == b"\r\n") {
                            let size = usize::from_str_radix(
                                std::str::from_utf8(&buf[..line]).unwrap().trim(),
                                16,
                            )
                            .unwrap();
                            if size == 0 {
                                return None;
                            }
                            if buf.len() >= line + 2 + size + 2 {
                                let data = buf[line + 2..line + 2 + size].to_vec();
                                buf.drain(..line + 2 + size + 2);
                                return Some(Ok(data));
                            }
                        }
                    }
                }
                let mut chunk = [0u8; 16384];
                match within(stream.read(&mut chunk)).await {
                    Ok(0) | Err(_) => return Some(Err(())),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            },
        }
    }

    /// Reads to the end of the body; how it ended and what came.
    async fn finish(&mut self) -> (End, Vec<u8>) {
        let mut got = Vec::new();
        loop {
            match self.next().await {
                None => return (End::Clean, got),
                Some(Err(())) => return (End::Cut, got),
                Some(Ok(d)) => got.extend_from_slice(&d),
            }
        }
    }
}

async fn admin_json(gate: &Gate, path: &str) -> Value {
    let (code, body) = http_get(gate.admin, path).await;
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The open HTTP streams.
async fn open_streams(gate: &Gate) -> Vec<Value> {
    let all = admin_json(gate, "/connections").await;
    all.as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "http")
        .cloned()
        .collect()
}

/// Waits for the first HTTP ending in `/connections/recent` and returns it.
async fn http_ending(gate: &Gate) -> Value {
    let mut found = Value::Null;
    eventually(async || {
        let recent = admin_json(gate, "/connections/recent?kind=http").await;
        match recent.as_array().unwrap().first() {
            Some(r) => {
                found = r.clone();
                true
            }
            None => false,
        }
    })
    .await;
    found
}

async fn metric(gate: &Gate, series: &str) -> f64 {
    sample(&http_get(gate.admin, "/metrics").await.1, series)
}

fn ended(outcome: &str) -> String {
    format!("wsgate_http_exchanges_ended_total{{outcome=\"{outcome}\"}}")
}

/// Checks the record of the one HTTP ending: its outcome, and the fields every record
/// has.
async fn recorded(gate: &Gate, outcome: &str, path: &str) -> Value {
    let r = http_ending(gate).await;
    assert_eq!(r["outcome"], outcome, "{r:#}");
    assert_eq!(r["path"], path, "{r:#}");
    assert_eq!(r["method"], "POST", "{r:#}");
    assert!(r["release_seconds"].as_f64().unwrap() < 1.0, "{r:#}");
    eventually(async || metric(gate, &ended(outcome)).await == 1.0).await;
    eventually(async || metric(gate, "wsgate_http_streams_active").await == 0.0).await;
    assert!(open_streams(gate).await.is_empty());
    r
}

#[tokio::test]
async fn a_completed_stream_is_listed_while_open_and_recorded_after() {
    for proto in BOTH {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |_| {}).await;
        let (code, mut client) = Client::open(&gate, proto, "/events").await;
        assert_eq!(code, 200);
        let h = within(held.recv()).await.unwrap();
        h.send(b"event: row\ndata: 1\n\n");
        assert_eq!(client.read(20).await, b"event: row\ndata: 1\n\n");
        // An event stream is listed from its head.
        let open = open_streams(&gate).await;
        assert_eq!(open.len(), 1, "{proto:?}: {open:#?}");
        let s = &open[0];
        assert_eq!(
            (s["method"].as_str(), s["status"].as_u64()),
            (Some("POST"), Some(200))
        );
        assert_eq!(
            (s["path"].as_str(), s["event_stream"].as_bool()),
            (Some("/events"), Some(true))
        );
        assert_eq!(s["backend_to_client"]["bytes"], 20, "{s:#}");
        eventually(async || metric(&gate, "wsgate_http_streams_active").await == 1.0).await;
        // The request body (2 bytes) shows while the stream is open too.
        eventually(async || open_streams(&gate).await[0]["client_to_backend"]["bytes"] == 2).await;
        h.send(b"event: row\ndata: 2\n\n");
        drop(h);
        let (end, rest) = client.finish().await;
        assert_eq!(
            (end, rest.as_slice()),
            (End::Clean, &b"event: row\ndata: 2\n\n"[..])
        );
        let r = recorded(&gate, "completed", "/events").await;
        assert_eq!(
            (r["stream"].as_bool(), r["status"].as_u64()),
            (Some(true), Some(200))
        );
        assert_eq!(r["backend_to_client"]["bytes"], 40);
        assert_eq!(r["client_to_backend"]["bytes"], 2);
        let framing = if proto == Proto::H1 {
            "chunked"
        } else {
            "http2"
        };
        assert_eq!(r["framing"], framing);
        assert_eq!(
            metric(
                &gate,
                "wsgate_http_stream_duration_seconds_count{outcome=\"completed\"}"
            )
            .await,
            1.0
        );
    }
}

#[tokio::test]
async fn a_body_open_past_stream_after_becomes_a_stream() {
    for proto in BOTH {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |c| {
            c.http.stream_after = Duration::from_millis(200)
        })
        .await;
        let (_, mut client) = Client::open(&gate, proto, "/ndjson").await;
        let h = within(held.recv()).await.unwrap();
        h.send(b"{\"n\":1}\n");
        client.read(8).await;
        assert!(open_streams(&gate).await.is_empty(), "not yet a stream");
        // Quiet past stream_after: it is listed without another byte coming.
        eventually(async || open_streams(&gate).await.len() == 1).await;
        drop(h);
        assert_eq!(client.finish().await.0, End::Clean);
        let r = recorded(&gate, "completed", "/ndjson").await;
        assert_eq!(r["event_stream"], false);
        assert_eq!(r["stream"], true);
    }
}

#[tokio::test]
async fn a_short_request_that_completes_is_counted_and_not_listed() {
    let (backend, _) = http_backend(|_| async { Response::new(full("ok")) }).await;
    let gate = gate_for(backend, |_| {}).await;
    for proto in BOTH {
        match proto {
            Proto::H1 => assert_eq!(http_get(gate.addr, "/api/x").await, (200, "ok".into())),
            Proto::H2 => {
                let (mut sender, _conn) = h2c_connect(gate.addr).await;
                let resp = within(sender.send_request(h2_request("GET", "/api/x", empty())))
                    .await
                    .unwrap();
                assert_eq!(read_body(resp.into_body()).await.unwrap(), b"ok");
            }
        }
    }
    eventually(async || metric(&gate, &ended("completed")).await == 2.0).await;
    let recent = admin_json(&gate, "/connections/recent").await;
    assert_eq!(
        recent,
        serde_json::json!([]),
        "a completed short request is not kept"
    );
}

#[tokio::test]
async fn a_client_that_aborts_a_stream_releases_the_backend_at_once() {
    for proto in BOTH {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |_| {}).await;
        let (_, mut client) = Client::open(&gate, proto, "/events").await;
        let h = within(held.recv()).await.unwrap();
        h.send(b"data: 1\n\n");
        client.read(9).await;
        let left = Instant::now();
        // HTTP/1.1: the connection closes; HTTP/2: the response is dropped, which
        // resets the stream (RST_STREAM CANCEL) and leaves the connection open.
        drop(client);
        h.released().await;
        println!(
            "{proto:?}: the backend was released {:?} after the client left",
            left.elapsed()
        );
        let r = recorded(&gate, "client_aborted", "/events").await;
        assert_eq!(r["status"], 200);
        assert!(
            metric(
                &gate,
                "wsgate_http_release_seconds_count{outcome=\"client_aborted\"}"
            )
            .await
                == 1.0
        );
    }
}

#[tokio::test]
async fn a_backend_that_dies_mid_stream_shows_the_client_a_truncation() {
    for (proto, path) in [
        (Proto::H1, "/events"),
        (Proto::H1, "/fixed"),
        (Proto::H2, "/events"),
        (Proto::H2, "/fixed"),
    ] {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |_| {}).await;
        let (_, mut client) = Client::open(&gate, proto, path).await;
        let h = within(held.recv()).await.unwrap();
        h.send(b"data: 1\n\n");
        client.read(9).await;
        h.body.send(Err(())).unwrap();
        let (end, _) = client.finish().await;
        assert_eq!(
            end,
            End::Cut,
            "{proto:?} {path}: the client must see a truncation"
        );
        recorded(&gate, "backend_aborted", path).await;
    }
}

#[tokio::test]
async fn backend_unreachable_and_backend_timeout_are_recorded() {
    let dead = dead_addr();
    let gate = gate_for(dead.addr, |_| {}).await;
    let (code, _) = http_request(gate.addr, "POST", "/api/q", "{}").await;
    assert_eq!(code, 502);
    let r = recorded(&gate, "backend_unreachable", "/api/q").await;
    assert_eq!(
        (r["status"].as_u64(), r["stream"].as_bool()),
        (Some(502), Some(false))
    );

    let (l, addr) = listener().await;
    let gate = gate_for(addr, |c| {
        c.http.response_timeout = Some(Duration::from_millis(200))
    })
    .await;
    let silent = tokio::spawn(async move {
        let (s, _) = within(l.accept()).await.unwrap();
        s
    });
    let (code, _) = http_request(gate.addr, "POST", "/api/q", "{}").await;
    assert_eq!(code, 504);
    let r = recorded(&gate, "backend_timeout", "/api/q").await;
    assert_eq!(r["status"], 504);
    drop(silent);
}

#[tokio::test]
async fn a_quiet_stream_ends_at_stream_idle_timeout() {
    for proto in BOTH {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |c| {
            c.http.stream_idle_timeout = Some(Duration::from_millis(300));
        })
        .await;
        let (_, mut client) = Client::open(&gate, proto, "/ndjson").await;
        let h = within(held.recv()).await.unwrap();
        h.send(b"{}\n");
        client.read(3).await;
        let (end, _) = client.finish().await;
        assert_eq!(end, End::Cut, "{proto:?}");
        h.released().await;
        recorded(&gate, "stream_idle_timeout", "/ndjson").await;
    }
}

#[tokio::test]
async fn an_operator_closes_a_stream_on_both_sides() {
    for proto in BOTH {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |c| c.admin.allow_close = true).await;
        let (_, mut client) = Client::open(&gate, proto, "/events").await;
        let h = within(held.recv()).await.unwrap();
        h.send(b"data: 1\n\n");
        client.read(9).await;
        let id = open_streams(&gate).await[0]["id"].as_u64().unwrap();
        let (code, body) =
            http_request(gate.admin, "POST", &format!("/connections/{id}/close"), "").await;
        assert_eq!(code, 202, "{body}");
        assert_eq!(client.finish().await.0, End::Cut, "{proto:?}");
        h.released().await;
        recorded(&gate, "admin_close", "/events").await;
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_as_stalled() {
    for proto in BOTH {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |c| {
            c.http.write_timeout = Some(Duration::from_millis(300))
        })
        .await;
        let (_, client) =
            match proto {
                // A small receive buffer, so that the client's socket fills soon.
                Proto::H1 => {
                    let socket = tokio::net::TcpSocket::new_v4().unwrap();
                    socket.set_recv_buffer_size(4096).unwrap();
                    let mut stream = within(socket.connect(gate.addr)).await.unwrap();
                    within(stream.write_all(
                        b"POST /ndjson HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
                    ))
                    .await
                    .unwrap();
                    (
                        0,
                        Client::H1 {
                            stream,
                            buf: Vec::new(),
                            left: None,
                        },
                    )
                }
                Proto::H2 => Client::open(&gate, proto, "/ndjson").await,
            };
        let h = within(held.recv()).await.unwrap();
        // The client reads nothing; the backend writes until wsgate lets it go.
        let block = Bytes::from(vec![b'x'; 64 * 1024]);
        let writer = {
            let body = h.body.clone();
            tokio::spawn(async move {
                for _ in 0..2048 {
                    if body.send(Ok(block.clone())).is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        h.released().await;
        writer.abort();
        let r = recorded(&gate, "client_stalled", "/ndjson").await;
        assert!(
            r["backend_to_client"]["bytes"].as_u64().unwrap() > 0,
            "{r:#}"
        );
        drop(client);
    }
}

#[tokio::test]
async fn the_drain_ends_an_event_stream_at_an_event_boundary() {
    for proto in BOTH {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |c| {
            c.shutdown.spread = Duration::ZERO;
            c.shutdown.drain_timeout = Duration::from_secs(30);
        })
        .await;
        let (_, mut client) = Client::open(&gate, proto, "/events").await;
        let h = within(held.recv()).await.unwrap();
        h.send(b"data: 1\n\n");
        client.read(9).await;
        // Half an event, then the drain begins.
        h.send(b"event: row\ndata: ");
        client.read(17).await;
        let (code, _) = http_request(gate.admin, "POST", "/drain", "").await;
        assert_eq!(code, 202);
        // The stream has its turn (listed as closing), and waits for its boundary.
        eventually(async || open_streams(&gate).await[0]["state"] == "closing").await;
        // The rest of that event and the next one come: the client gets the first whole,
        // nothing of the second, and a clean end.
        h.send(b"2\n\ndata: 3\n\n");
        let (end, rest) = client.finish().await;
        assert_eq!(
            (end, rest.as_slice()),
            (End::Clean, &b"2\n\n"[..]),
            "{proto:?}"
        );
        h.released().await;
        recorded(&gate, "shutdown", "/events").await;
    }
}

#[tokio::test]
async fn sse_heartbeats_go_between_events_only() {
    for proto in BOTH {
        let (backend, mut held) = stream_backend().await;
        let gate = gate_for(backend, |c| {
            c.http.sse_heartbeat = Some(Duration::from_millis(100))
        })
        .await;
        let (_, mut client) = Client::open(&gate, proto, "/events").await;
        let h = within(held.recv()).await.unwrap();
        // Half an event, then quiet for several heartbeat periods: nothing may come.
        h.send(b"event: row\ndata: ");
        assert_eq!(client.read(17).await, b"event: row\ndata: ");
        let quiet = Instant::now();
        h.send(b"1\n\n");
        // Whatever arrives first is the rest of the event: no comment inside it.
        let mut got = client.read(3).await;
        assert_eq!(&got[..3], b"1\n\n", "{proto:?}: {got:?}");
        got.drain(..3);
        // Then, quiet at a boundary: heartbeats.
        while got.len() < 6 {
            got.extend(client.next().await.unwrap().unwrap());
        }
        assert_eq!(&got[..6], b":\n\n:\n\n", "{proto:?}");
        assert!(quiet.elapsed() >= Duration::from_millis(200));
        assert!(metric(&gate, "wsgate_http_sse_heartbeats_total").await >= 2.0);
        drop(h);
        client.finish().await;
        let r = recorded(&gate, "completed", "/events").await;
        assert!(r["heartbeats"].as_u64().unwrap() >= 2, "{r:#}");
    }
}

#[tokio::test]
async fn an_h2_client_that_stops_answering_pings_is_unresponsive() {
    let (backend, mut held) = stream_backend().await;
    let gate = gate_for(backend, |c| {
        c.websocket.ping_interval = Some(Duration::from_millis(200));
        c.websocket.pong_timeout = Duration::from_millis(200);
    })
    .await;
    // A raw client: preface, SETTINGS, a GET of /events on stream 1; then it reads
    // nothing and answers nothing.
    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    // :method POST (3), :scheme http (6), :path literal "/events" (name index 4),
    // :authority literal "a" (name index 1).
    let mut block = vec![0x83, 0x86, 0x04, 0x07];
    block.extend_from_slice(b"/events");
    block.extend_from_slice(&[0x01, 0x01, b'a']);
    hello.extend_from_slice(&[0, 0, block.len() as u8, 0x01, 0x05, 0, 0, 0, 1]);
    hello.extend_from_slice(&block);
    within(s.write_all(&hello)).await.unwrap();
    let h = within(held.recv()).await.unwrap();
    assert_eq!(h.path, "/events");
    h.released().await;
    let r = http_ending(&gate).await;
    assert_eq!(r["outcome"], "client_unresponsive", "{r:#}");
}

/// The real binary with `http` under `[log]` and `shutdown` as its `[shutdown]`
/// section, JSON logs.
async fn binary(
    backend: SocketAddr,
    log_http: &str,
    shutdown: &str,
) -> (
    tokio::process::Child,
    SocketAddr,
    SocketAddr,
    tokio::io::BufReader<tokio::process::ChildStderr>,
) {
    let config = format!(
        "listen = \"127.0.0.1:0\"\nbackend = \"http://{backend}\"\n[http]\nh2c = true\n\
         [shutdown]\n{shutdown}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [log]\nformat = \"json\"\nhttp = \"{log_http}\"\n"
    );
    spawn_wsgate_with(&temp_file("streams.toml", &config)).await
}

fn is_http_line(v: &Value) -> bool {
    v["message"] == "http exchange ended"
}

#[tokio::test]
async fn the_drain_deadline_cuts_the_other_streams_and_the_log_says_how_each_ended() {
    let (backend, mut held) = stream_backend().await;
    let (mut child, addr, _admin, mut log) = binary(
        backend,
        "streams",
        "drain_timeout = \"1s\"\nspread = \"0s\"",
    )
    .await;
    // Two result streams (HTTP/1.1 and HTTP/2), and an event stream.
    let mut clients = Vec::new();
    let mut bodies = Vec::new();
    for (proto, path) in [
        (Proto::H1, "/ndjson"),
        (Proto::H2, "/ndjson"),
        (Proto::H1, "/events"),
    ] {
        let (_, mut client) = Client::open_at(addr, proto, path).await;
        let h = within(held.recv()).await.unwrap();
        h.send(b"data: 1\n\n");
        client.read(9).await;
        clients.push(client);
        bodies.push(h);
    }
    let stopping = Instant::now();
    sigterm(&child).await;
    let mut events = clients.pop().unwrap();
    // The event stream ends at once and cleanly: it was at a boundary.
    assert_eq!(events.finish().await, (End::Clean, Vec::new()));
    assert!(
        stopping.elapsed() < Duration::from_millis(900),
        "{:?}",
        stopping.elapsed()
    );
    // The others run until the deadline, then are cut: a truncation, not a clean end.
    for mut client in clients {
        assert_eq!(client.finish().await.0, End::Cut);
    }
    assert!(
        stopping.elapsed() >= Duration::from_millis(900),
        "{:?}",
        stopping.elapsed()
    );
    for h in &bodies {
        h.released().await;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let line = log_line(&mut log, is_http_line).await;
        seen.push((
            line["path"].as_str().unwrap().to_string(),
            line["outcome"].as_str().unwrap().to_string(),
        ));
        assert_eq!(line["kind"], "http");
        assert_eq!(line["status"], 200);
        assert!(line["release_ms"].as_f64().is_some(), "{line}");
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("/events".to_string(), "shutdown".to_string()),
            ("/ndjson".to_string(), "shutdown".to_string()),
            ("/ndjson".to_string(), "shutdown".to_string()),
        ]
    );
    assert!(within(child.wait()).await.unwrap().success());
}

#[tokio::test]
async fn log_http_all_is_an_access_log_and_the_default_leaves_short_requests_out() {
    let (backend, _) = http_backend(|_| async { Response::new(full("ok")) }).await;
    for (setting, logged) in [("all", true), ("streams", false)] {
        let (mut child, addr, _admin, mut log) = binary(backend, setting, "").await;
        assert_eq!(
            http_get(addr, "/api/short?token=secret").await,
            (200, "ok".into())
        );
        sigterm(&child).await;
        let mut lines = Vec::new();
        loop {
            let line = log_line(&mut log, |v| {
                is_http_line(v) || v["message"] == "shutdown complete"
            })
            .await;
            if !is_http_line(&line) {
                break;
            }
            lines.push(line);
        }
        assert!(within(child.wait()).await.unwrap().success());
        if logged {
            assert_eq!(lines.len(), 1, "{lines:#?}");
            let first = &lines[0];
            assert_eq!(
                (
                    first["method"].as_str(),
                    first["path"].as_str(),
                    first["outcome"].as_str()
                ),
                (Some("GET"), Some("/api/short"), Some("completed"))
            );
            assert_eq!(
                (first["status"].as_u64(), first["stream"].as_bool()),
                (Some(200), Some(false))
            );
            assert!(
                !first.to_string().contains("secret"),
                "no query in the log: {first}"
            );
        } else {
            assert!(lines.is_empty(), "{lines:#?}");
        }
    }
}
