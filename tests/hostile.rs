//! Hostile input: malformed HTTP, oversized and slow headers, bad WebSocket handshakes,
//! invalid framing after the upgrade, backends that answer the upgrade with garbage, a
//! connection flood past `max_connections`, and origins that are not allowed. Each test
//! ends by checking that the same in-process gate still relays a normal WebSocket.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsgate::Config;
use wsgate::config::MaxConnections;

/// Sends `request` on a fresh connection and reads until wsgate closes it (FIN or RST);
/// returns every byte received.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = within(TcpStream::connect(addr)).await.unwrap();
    within(s.write_all(request)).await.unwrap();
    read_until_closed(&mut s).await
}

/// Reads until the peer closes the connection (FIN or RST); returns what arrived.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match within(s.read(&mut chunk)).await {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// The head of an HTTP response in `bytes`; panics if there is none.
fn head_of(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let end = text
        .find("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in {text:?}"));
    text[..end + 4].to_string()
}

/// A normal request on a new connection is forwarded and answered.
async fn plain_request_works(gate: &Gate, backend: &TcpListener) {
    let (seen, (head, body)) = tokio::join!(
        answer_http_once(backend),
        http_raw(
            gate.addr,
            "GET /after HTTP/1.1\r\nHost: wsgate.test\r\nConnection: close\r\n\r\n",
        )
    );
    assert!(seen.starts_with("GET /after HTTP/1.1\r\n"), "{seen}");
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(body, b"ok");
}

/// The gate still relays a normal WebSocket both ways and closes it cleanly. The backend
/// listener's next connection must be this WebSocket's: a connection wsgate opened
/// earlier by mistake (for a refused handshake, say) would show up here instead.
async fn still_relays(gate: &Gate, backend: &TcpListener) {
    let (mut client, mut server) = pair(gate, backend).await;
    client.send(TEXT, b"still here").await;
    let f = server.recv().await;
    assert_eq!((f.opcode, f.payload.as_slice()), (TEXT, &b"still here"[..]));
    server.send(TEXT, &f.payload).await;
    assert_eq!(client.recv().await.payload, b"still here");
    client.send_close(1000, "").await;
    assert_eq!(server.recv().await.close_code(), Some(1000));
    server.send_close(1000, "").await;
    assert_eq!(client.recv().await.close_code(), Some(1000));
    assert_eq!(client.expect_end().await, End::Eof);
    server.shutdown_write().await;
    assert_eq!(server.expect_end().await, End::Eof);
}

async fn scrape(gate: &Gate) -> String {
    let (code, text) = http_get(gate.admin, "/metrics").await;
    assert_eq!(code, 200);
    text
}

/// Waits until the metric `series` reads `value`.
async fn metric_reaches(gate: &Gate, series: &str, value: f64) {
    let mut last = f64::NAN;
    let reached = tokio::time::timeout(LIMIT, async {
        loop {
            last = sample(&scrape(gate).await, series);
            if last == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "{series} is {last}, expected {value}");
}

fn upgrades(result: &str) -> String {
    format!("wsgate_websocket_upgrades_total{{result=\"{result}\"}}")
}

#[tokio::test]
async fn malformed_request_line_gets_400_and_the_gate_serves_on() {
    let (gate, backend_l) = gate_with(|_| {}).await;

    let got = exchange(gate.addr, b"GARBAGE\r\n\r\n").await;
    let head = head_of(&got);
    assert_eq!(status(&head), 400, "{head}");

    plain_request_works(&gate, &backend_l).await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn header_line_without_colon_gets_400_and_the_gate_serves_on() {
    let (gate, backend_l) = gate_with(|_| {}).await;

    let got = exchange(
        gate.addr,
        b"GET / HTTP/1.1\r\nHost: wsgate.test\r\nThis line has no colon\r\n\r\n",
    )
    .await;
    let head = head_of(&got);
    assert_eq!(status(&head), 400, "{head}");

    plain_request_works(&gate, &backend_l).await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn header_section_over_max_header_size_gets_431() {
    let (gate, backend_l) = gate_with(|c| {
        c.http.max_header_size = 8192;
    })
    .await;

    let filler = |total: usize| {
        let line = format!("X-Filler: {}\r\n", "f".repeat(190));
        line.repeat(total / line.len() + 1)
    };
    let request = format!(
        "GET /big HTTP/1.1\r\nHost: wsgate.test\r\n{}Connection: close\r\n\r\n",
        filler(20 * 1024)
    );
    assert!(request.len() > 20 * 1024);
    let got = exchange(gate.addr, request.as_bytes()).await;
    let head = head_of(&got);
    assert_eq!(status(&head), 431, "{head}");

    // Just under the limit is still fine.
    let request = format!(
        "GET /after HTTP/1.1\r\nHost: wsgate.test\r\n{}Connection: close\r\n\r\n",
        filler(6 * 1024)
    );
    let (seen, (head, body)) =
        tokio::join!(answer_http_once(&backend_l), http_raw(gate.addr, &request));
    assert!(seen.starts_with("GET /after HTTP/1.1\r\n"), "{seen}");
    assert_eq!(
        (status(&head), body.as_slice()),
        (200, &b"ok"[..]),
        "{head}"
    );
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn slowloris_client_is_disconnected_after_header_read_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let (gate, backend_l) = gate_with(|c| {
        c.http.header_read_timeout = TIMEOUT;
    })
    .await;

    let started = Instant::now();
    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    within(s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n"))
        .await
        .unwrap();
    // The rest of the head never comes: wsgate must hang up (FIN or RST), perhaps after
    // a 408, and never forward the partial request.
    let got = read_until_closed(&mut s).await;
    let waited = started.elapsed();
    if !got.is_empty() {
        let head = head_of(&got);
        assert_eq!(status(&head), 408, "{head}");
    }
    assert!(
        waited >= TIMEOUT - Duration::from_millis(50),
        "closed after {waited:?}"
    );
    // The slot is given back.
    metric_reaches(&gate, "wsgate_connections_active", 0.0).await;
    plain_request_works(&gate, &backend_l).await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn silent_and_idle_connections_are_disconnected_after_header_read_timeout() {
    // A connection that never sends a byte, and one idle after a keep-alive request,
    // would otherwise each hold a `max_connections` slot for as long as they like.
    const TIMEOUT: Duration = Duration::from_millis(300);
    let (gate, backend_l) = gate_with(|c| {
        c.http.header_read_timeout = TIMEOUT;
    })
    .await;

    let mut silent = within(TcpStream::connect(gate.addr)).await.unwrap();
    let got = read_until_closed(&mut silent).await;
    assert!(
        got.is_empty() || status(&head_of(&got)) == 408,
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    let mut idle = within(TcpStream::connect(gate.addr)).await.unwrap();
    let answered = async {
        within(idle.write_all(b"GET /one HTTP/1.1\r\nHost: wsgate.test\r\n\r\n"))
            .await
            .unwrap();
        read_until_closed(&mut idle).await
    };
    let (_, got) = tokio::join!(answer_http_once(&backend_l), answered);
    let head = head_of(&got);
    assert_eq!(status(&head), 200, "{head}");
    metric_reaches(&gate, "wsgate_connections_active", 0.0).await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn silent_h2c_connection_is_disconnected_after_header_read_timeout() {
    // The HTTP/2 twin of the slowloris above: the preface and an empty SETTINGS frame,
    // then nothing. Without a bound the connection holds a `max_connections` slot for
    // as long as the client likes.
    let (gate, backend_l) = gate_with(|c| {
        c.http.h2c = true;
        c.http.header_read_timeout = Duration::from_millis(300);
    })
    .await;

    let mut s = within(TcpStream::connect(gate.addr)).await.unwrap();
    within(s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"))
        .await
        .unwrap();
    // wsgate's SETTINGS (and perhaps a GOAWAY) arrive, then the connection must end.
    read_until_closed(&mut s).await;
    metric_reaches(&gate, "wsgate_connections_active", 0.0).await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn unsupported_version_gets_426_and_missing_key_gets_400() {
    let (gate, backend_l) = gate_with(|_| {}).await;

    let request = upgrade_request("/ws", "Connection: close\r\n").replace(
        "Sec-WebSocket-Version: 13\r\n",
        "Sec-WebSocket-Version: 8\r\n",
    );
    assert!(request.contains("Sec-WebSocket-Version: 8\r\n"));
    let (head, _) = http_raw(gate.addr, &request).await;
    assert_eq!(status(&head), 426, "{head}");
    assert_eq!(header(&head, "sec-websocket-version"), Some("13"), "{head}");
    assert_eq!(
        header(&head, "wsgate-error"),
        Some("unsupported_version"),
        "{head}"
    );

    let request = upgrade_request("/ws", "Connection: close\r\n")
        .replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "");
    assert!(!request.contains("Sec-WebSocket-Key"));
    let (head, body) = http_raw(gate.addr, &request).await;
    assert_eq!(status(&head), 400, "{head}");
    assert_eq!(
        header(&head, "wsgate-error"),
        Some("bad_handshake"),
        "{head}"
    );
    assert!(
        String::from_utf8_lossy(&body).contains("missing Sec-WebSocket-Key"),
        "{body:?}"
    );

    metric_reaches(&gate, &upgrades("bad_request"), 2.0).await;
    // Neither request reached the backend: its next connection is this WebSocket.
    still_relays(&gate, &backend_l).await;
}

/// Sends `frame` from the client right after the upgrade; the client must get Close
/// `code`, the backend Close 1001 and not a byte of the frame, and both connections
/// must end.
async fn client_frame_is_refused(frame: &[u8], code: u16, configure: impl FnOnce(&mut Config)) {
    let (backend_l, backend_addr) = listener().await;
    let mut config = test_config(backend_addr);
    configure(&mut config);
    let gate = start_gate(config).await;
    let (mut client, mut backend) = pair(&gate, &backend_l).await;

    // A good frame first: the bad one comes in the middle of a working connection.
    client.send(TEXT, b"before").await;
    assert_eq!(backend.recv().await.payload, b"before");
    client.send_raw(frame).await;
    let close = client.recv().await;
    assert_eq!(close.close_code(), Some(code), "{close:?}");
    assert!(!close.masked);
    let close = backend.recv().await;
    assert_eq!(
        close.close_code(),
        Some(1001),
        "the bad frame must not be forwarded: {close:?}"
    );
    assert!(close.masked);
    assert_eq!(client.expect_end().await, End::Eof);
    backend.send_close(1001, "").await;
    backend.shutdown_write().await;
    assert_eq!(backend.expect_end().await, End::Eof);

    metric_reaches(
        &gate,
        "wsgate_websocket_connections_ended_total{outcome=\"protocol_error\"}",
        1.0,
    )
    .await;
    let text = scrape(&gate).await;
    let code = code.to_string();
    assert_eq!(
        sample(
            &text,
            &format!("wsgate_websocket_close_frames_total{{sender=\"wsgate\",code=\"{code}\"}}")
        ),
        1.0
    );
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn reserved_opcode_is_a_protocol_error() {
    client_frame_is_refused(&encode(true, 0, 0x3, b"what is this", true), 1002, |_| {}).await;
}

#[tokio::test]
async fn fragmented_ping_is_a_protocol_error() {
    client_frame_is_refused(&encode(false, 0, PING, b"half", true), 1002, |_| {}).await;
}

#[tokio::test]
async fn control_frame_over_125_bytes_is_a_protocol_error() {
    client_frame_is_refused(&encode(true, 0, PING, &[b'p'; 126], true), 1002, |_| {}).await;
}

#[tokio::test]
async fn rsv1_without_a_negotiated_extension_is_a_protocol_error() {
    client_frame_is_refused(&encode(true, 0b100, TEXT, b"deflated?", true), 1002, |_| {}).await;
}

#[tokio::test]
async fn continuation_without_a_message_is_a_protocol_error() {
    client_frame_is_refused(&encode(true, 0, 0x0, b"orphan", true), 1002, |_| {}).await;
}

#[tokio::test]
async fn length_with_the_top_bit_set_is_a_protocol_error() {
    // A 64-bit length must have its most significant bit clear (RFC 6455 §5.2).
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 63).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    client_frame_is_refused(&frame, 1002, |_| {}).await;
}

#[tokio::test]
async fn frame_announcing_more_than_max_frame_size_gets_1009_from_its_header_alone() {
    // Only the header of a 1 GiB frame is sent: wsgate must refuse it from the announced
    // length, without waiting for (or forwarding) any of the payload.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 30).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    client_frame_is_refused(&frame, 1009, |c| {
        c.websocket.max_frame_size = Some(1024 * 1024);
    })
    .await;
}

#[tokio::test]
async fn close_with_a_one_byte_payload_is_a_protocol_error() {
    client_frame_is_refused(&encode(true, 0, CLOSE, &[3], true), 1002, |_| {}).await;
}

#[tokio::test]
async fn masked_frame_from_the_backend_is_a_protocol_error() {
    let (gate, backend_l) = gate_with(|_| {}).await;
    let (mut client, mut backend) = pair(&gate, &backend_l).await;

    backend
        .send_raw(&encode(true, 0, TEXT, b"servers never mask", true))
        .await;
    let close = backend.recv().await;
    assert_eq!(close.close_code(), Some(1002), "{close:?}");
    let close = client.recv().await;
    assert_eq!(
        close.close_code(),
        Some(1014),
        "the bad frame must not be forwarded: {close:?}"
    );
    client.send_close(1014, "").await;
    assert_eq!(client.expect_end().await, End::Eof);
    backend.shutdown_write().await;
    assert_eq!(backend.expect_end().await, End::Eof);
    metric_reaches(
        &gate,
        "wsgate_websocket_connections_ended_total{outcome=\"protocol_error\"}",
        1.0,
    )
    .await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn rsv1_with_permessage_deflate_negotiated_passes_unchanged() {
    let (gate, backend_l) = gate_with(|_| {}).await;
    let ext = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    let ((mut client, head), (mut backend, seen)) = tokio::join!(
        connect_ws(gate.addr, "/ws", ext),
        accept_ws(&backend_l, ext)
    );
    assert_eq!(
        header(&seen, "sec-websocket-extensions"),
        Some("permessage-deflate"),
        "{seen}"
    );
    assert_eq!(
        header(&head, "sec-websocket-extensions"),
        Some("permessage-deflate"),
        "{head}"
    );

    // "Hello" compressed (RFC 7692 §7.2.3.1), whole and as a fragmented message whose
    // first frame carries RSV1.
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let mut sent = encode(true, 0b100, TEXT, &hello, true);
    sent.extend(encode(false, 0b100, TEXT, &hello[..3], true));
    sent.extend(encode(true, 0, 0x0, &hello[3..], true));
    client.send_raw(&sent).await;
    let mut got = vec![0u8; sent.len()];
    within(backend.stream.read_exact(&mut got)).await.unwrap();
    assert_eq!(
        got, sent,
        "client frames must reach the backend byte for byte"
    );

    let sent = encode(true, 0b100, BINARY, &hello, false);
    backend.send_raw(&sent).await;
    let mut got = vec![0u8; sent.len()];
    within(client.stream.read_exact(&mut got)).await.unwrap();
    assert_eq!(
        got, sent,
        "backend frames must reach the client byte for byte"
    );

    // The connection is healthy: a normal close handshake follows.
    client.send_close(1000, "").await;
    assert_eq!(backend.recv().await.close_code(), Some(1000));
    backend.send_close(1000, "").await;
    assert_eq!(client.recv().await.close_code(), Some(1000));
    assert_eq!(client.expect_end().await, End::Eof);
    backend.shutdown_write().await;
    assert_eq!(backend.expect_end().await, End::Eof);
    still_relays(&gate, &backend_l).await;
}

/// Accepts one connection, reads the upgrade request, answers `response`, then reads
/// until wsgate closes the connection (it must not keep it).
async fn answer_upgrade_with(backend: &TcpListener, response: &[u8]) -> String {
    let (mut s, _) = within(backend.accept()).await.unwrap();
    let (head, _) = read_head(&mut s).await;
    within(s.write_all(response)).await.unwrap();
    read_until_closed(&mut s).await;
    head
}

#[tokio::test]
async fn backend_answering_the_upgrade_with_garbage_is_a_502() {
    let (gate, backend_l) = gate_with(|_| {}).await;

    // Bytes from a fixed-seed generator, not starting like "HTTP/".
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = std::iter::once(0u8)
        .chain((0..511).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        }))
        .collect();
    let upgrade = upgrade_request("/ws", "Connection: close\r\n");
    for garbage in [&b"HTTP/1.1 banana\r\n\r\n"[..], &random] {
        let (seen, got) = tokio::join!(
            answer_upgrade_with(&backend_l, garbage),
            exchange(gate.addr, upgrade.as_bytes())
        );
        assert!(seen.starts_with("GET /ws HTTP/1.1\r\n"), "{seen}");
        let head = head_of(&got);
        assert_eq!(status(&head), 502, "{head}");
        assert_eq!(
            header(&head, "wsgate-error"),
            Some("backend_failed"),
            "{head}"
        );
    }
    metric_reaches(&gate, &upgrades("backend_error"), 2.0).await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn backend_101_with_a_wrong_accept_is_a_502() {
    let (gate, backend_l) = gate_with(|_| {}).await;

    let upgrade = upgrade_request("/ws", "Connection: close\r\n");
    let response = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Accept: dGhpcyBpcyBub3QgdGhlIGtleQ==\r\n\r\n";
    let (_, got) = tokio::join!(
        answer_upgrade_with(&backend_l, response.as_bytes()),
        exchange(gate.addr, upgrade.as_bytes())
    );
    let head = head_of(&got);
    assert_eq!(status(&head), 502, "{head}");
    assert_eq!(
        header(&head, "wsgate-error"),
        Some("backend_bad_handshake"),
        "{head}"
    );
    assert_eq!(header(&head, "sec-websocket-accept"), None, "{head}");

    // A 101 without any Sec-WebSocket-Accept is refused the same way.
    let response =
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let (_, got) = tokio::join!(
        answer_upgrade_with(&backend_l, response.as_bytes()),
        exchange(gate.addr, upgrade.as_bytes())
    );
    let head = head_of(&got);
    assert_eq!(status(&head), 502, "{head}");
    assert_eq!(
        header(&head, "wsgate-error"),
        Some("backend_bad_handshake"),
        "{head}"
    );
    metric_reaches(&gate, &upgrades("backend_error"), 2.0).await;
    metric_reaches(&gate, "wsgate_websocket_connections_active", 0.0).await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn client_gone_during_the_upgrade_releases_the_backend() {
    let (gate, backend_l) = gate_with(|_| {}).await;

    let mut client = within(TcpStream::connect(gate.addr)).await.unwrap();
    within(client.write_all(upgrade_request("/ws", "").as_bytes()))
        .await
        .unwrap();
    // The backend has the request; the client resets before the answer reaches it.
    let (mut backend, _) = within(backend_l.accept()).await.unwrap();
    let (head, _) = read_head(&mut backend).await;
    client.set_zero_linger().unwrap();
    drop(client);
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
        header(&head, "sec-websocket-key").unwrap().as_bytes(),
    );
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    within(backend.write_all(response.as_bytes()))
        .await
        .unwrap();
    // Whether wsgate saw the reset before the 101 (the backend connection is closed) or
    // after it (the relay starts and finds the client gone: Close 1001), the backend's
    // connection ends and nothing stays open.
    let mut backend = Peer::new(backend, Role::Backend, Vec::new());
    if let Ok(close) = backend.try_recv().await {
        assert_eq!(close.close_code(), Some(1001), "{close:?}");
        backend.send_close(1001, "").await;
        backend.shutdown_write().await;
        backend.expect_end().await;
    }
    metric_reaches(&gate, "wsgate_connections_active", 0.0).await;
    metric_reaches(&gate, "wsgate_websocket_connections_active", 0.0).await;
    let text = scrape(&gate).await;
    let ended: f64 = text
        .lines()
        .filter(|l| l.starts_with("wsgate_websocket_connections_ended_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    // Seen before the 101, the ending is the upgrade's (`client_gone`); after it, the
    // relay's. Either way each upgrade the backend saw ends once.
    assert_eq!(
        sample(&text, &upgrades("ok")) + sample(&text, &upgrades("client_gone")),
        ended,
        "every upgrade the backend saw is counted as ended once"
    );
    assert_eq!(ended, 1.0);
    still_relays(&gate, &backend_l).await;
}

/// What a connection attempt over capacity got.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// A response with this status and `wsgate-error` value.
    Answered(u16, Option<String>),
    /// Closed (FIN or RST) without a response.
    Closed,
}

#[tokio::test]
async fn connection_flood_past_max_connections_leaves_open_websockets_working() {
    const MAX: usize = 20;
    const FLOOD: usize = 200;
    let (gate, backend_l) = gate_with(|c| {
        c.max_connections = MaxConnections::Count(MAX);
    })
    .await;

    let mut open = Vec::new();
    for _ in 0..MAX {
        open.push(pair(&gate, &backend_l).await);
    }
    metric_reaches(&gate, "wsgate_connections_active", MAX as f64).await;

    // Every attempt connects and stays silent before any of them sends its request, so
    // the rejections wsgate answers (64 at once) are all in flight together and the
    // rest of the flood must be closed without an answer.
    let mut attempts = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        attempts.push(within(TcpStream::connect(gate.addr)).await.unwrap());
    }
    let request = upgrade_request("/flood", "");
    let mut refusals = Vec::with_capacity(FLOOD);
    for s in &mut attempts {
        // wsgate may already have closed an attempt it does not answer.
        let _ = within(s.write_all(request.as_bytes())).await;
        let got = read_until_closed(s).await;
        refusals.push(if got.is_empty() {
            Refusal::Closed
        } else {
            let head = head_of(&got);
            Refusal::Answered(
                status(&head),
                header(&head, "wsgate-error").map(str::to_string),
            )
        });
    }
    drop(attempts);
    let over_capacity = Refusal::Answered(503, Some("over_capacity".into()));
    let answered = refusals.iter().filter(|r| **r == over_capacity).count();
    eprintln!(
        "flood: {answered} of {FLOOD} attempts answered 503, {} closed without an answer",
        FLOOD - answered
    );
    for (i, r) in refusals.iter().enumerate() {
        assert!(
            *r == over_capacity || *r == Refusal::Closed,
            "attempt {i}: {r:?}"
        );
    }
    // Which attempts get the answers depends on when each worker accepts its share of
    // them, but the first ones accepted all find a free answering slot.
    assert!(answered >= 5, "only {answered} attempts were answered 503");
    assert!(
        answered < FLOOD,
        "200 silent attempts were all kept waiting for a 503: over-capacity connections are not bounded"
    );
    metric_reaches(&gate, "wsgate_connections_rejected_total", FLOOD as f64).await;
    metric_reaches(&gate, "wsgate_connections_active", MAX as f64).await;
    metric_reaches(&gate, &upgrades("limit_reached"), answered as f64).await;
    metric_reaches(&gate, &upgrades("ok"), MAX as f64).await;

    // Every WebSocket opened before the flood still relays both ways.
    for (i, (client, backend)) in open.iter_mut().enumerate() {
        let msg = format!("still open {i}");
        client.send(TEXT, msg.as_bytes()).await;
        assert_eq!(backend.recv().await.payload, msg.as_bytes());
        backend.send(TEXT, msg.as_bytes()).await;
        assert_eq!(client.recv().await.payload, msg.as_bytes());
    }
    for (mut client, mut backend) in open {
        client.send_close(1000, "").await;
        assert_eq!(backend.recv().await.close_code(), Some(1000));
        backend.send_close(1000, "").await;
        assert_eq!(client.recv().await.close_code(), Some(1000));
        assert_eq!(client.expect_end().await, End::Eof);
        backend.shutdown_write().await;
        assert_eq!(backend.expect_end().await, End::Eof);
    }
    metric_reaches(&gate, "wsgate_connections_active", 0.0).await;
    still_relays(&gate, &backend_l).await;
}

#[tokio::test]
async fn only_allowed_origins_open_websockets() {
    let (gate, backend_l) = gate_with(|c| {
        c.websocket.allowed_origins = vec!["https://dash.example".to_string()];
    })
    .await;

    let (head, body) = http_raw(
        gate.addr,
        &upgrade_request(
            "/ws",
            "Origin: https://evil.example\r\nConnection: close\r\n",
        ),
    )
    .await;
    assert_eq!(status(&head), 403, "{head}");
    assert_eq!(
        header(&head, "wsgate-error"),
        Some("origin_not_allowed"),
        "{head}"
    );
    assert!(!body.is_empty());
    metric_reaches(&gate, &upgrades("origin_refused"), 1.0).await;

    // The allowed origin gets through, and the backend sees it. The refused request
    // never reached the backend: this is the backend's first connection.
    let ((mut client, head), (mut backend, seen)) = tokio::join!(
        connect_ws(gate.addr, "/ws", "Origin: https://dash.example\r\n"),
        accept_ws(&backend_l, "")
    );
    assert_eq!(status(&head), 101);
    assert_eq!(
        header(&seen, "origin"),
        Some("https://dash.example"),
        "{seen}"
    );
    client.send(TEXT, b"from the dashboard").await;
    assert_eq!(backend.recv().await.payload, b"from the dashboard");

    // No Origin: not a browser, allowed.
    still_relays(&gate, &backend_l).await;
    metric_reaches(&gate, &upgrades("ok"), 2.0).await;
}
