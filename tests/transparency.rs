//! Transparency: for a scripted session with permessage-deflate negotiated, a fragmented
//! message with an interleaved Ping, RSV1 frames, binary frames of every length encoding
//! and a Close, both peers receive exactly the same bytes (and the client the same 101
//! headers) with wsgate in between as when connected directly.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The backend's 101 headers beyond the mandatory ones, in the case it sends them.
const BACKEND_101_EXTRA: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=15\r\n\
    Sec-WebSocket-Protocol: v1.query\r\nX-Backend-Build: 42\r\n";

fn client_script() -> Vec<u8> {
    let mut s = Vec::new();
    // A "compressed" text message: RSV1 set; the payload is opaque to wsgate.
    s.extend(encode(
        true,
        0b100,
        TEXT,
        &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
        true,
    ));
    // A fragmented message with a Ping between its fragments.
    s.extend(encode(false, 0b100, TEXT, b"frag-1 ", true));
    s.extend(encode(true, 0, PING, b"client-ping", true));
    s.extend(encode(false, 0, 0, b"frag-2 ", true));
    s.extend(encode(true, 0, 0, b"frag-3", true));
    // Binary frames with 7-bit, 16-bit and 64-bit lengths.
    s.extend(encode(true, 0, BINARY, &[1u8; 125], true));
    s.extend(encode(true, 0, BINARY, &[2u8; 40_000], true));
    s.extend(encode(
        true,
        0,
        BINARY,
        &(0..70_000u32).map(|i| i as u8).collect::<Vec<_>>(),
        true,
    ));
    s.extend(encode(true, 0, CLOSE, &close_payload(1000, "bye"), true));
    s
}

fn backend_script() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend(encode(true, 0b100, TEXT, &[0x4a, 0x4c, 0x02, 0x00], false));
    s.extend(encode(true, 0, PONG, b"client-ping", false));
    s.extend(encode(false, 0, BINARY, &[9u8; 300], false));
    s.extend(encode(true, 0, 0, &[8u8; 66_000], false));
    s.extend(encode(true, 0, CLOSE, &close_payload(1000, "bye"), false));
    s
}

/// Reads until the stream holds a complete Close frame; returns everything read.
async fn read_through_close(s: &mut TcpStream, mut got: Vec<u8>) -> Vec<u8> {
    loop {
        let mut at = 0;
        while let Some((f, used)) = decode(&got[at..]) {
            at += used;
            if f.opcode == CLOSE {
                assert_eq!(at, got.len(), "bytes after the Close");
                return got;
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = within(s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "stream ended before a Close");
        got.extend_from_slice(&chunk[..n]);
    }
}

struct Seen {
    client_head: String,
    backend_got: Vec<u8>,
    client_got: Vec<u8>,
}

/// Runs the scripted session, the client connecting to `connect_to`.
async fn session(connect_to: SocketAddr, backend: &TcpListener) -> Seen {
    let client = async {
        let mut s = within(TcpStream::connect(connect_to)).await.unwrap();
        let extra = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
                     Sec-WebSocket-Protocol: v1.query, v0.query\r\n";
        // The handshake and the first frames in one write: bytes behind the request
        // must not be lost by the upgrade.
        let mut first = upgrade_request("/api/ws?stream=1", extra).into_bytes();
        let script = client_script();
        first.extend_from_slice(&script[..100]);
        within(s.write_all(&first)).await.unwrap();
        let (head, rest) = read_head(&mut s).await;
        within(s.write_all(&script[100..])).await.unwrap();
        let got = read_through_close(&mut s, rest).await;
        (head, got)
    };
    let server = async {
        let (mut s, _) = within(backend.accept()).await.unwrap();
        let (head, rest) = read_head(&mut s).await;
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
            header(&head, "sec-websocket-key").unwrap().as_bytes(),
        );
        let mut first = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{BACKEND_101_EXTRA}\r\n"
        )
        .into_bytes();
        // The 101 and the first frame in one write, too.
        let script = backend_script();
        first.extend_from_slice(&script[..5]);
        within(s.write_all(&first)).await.unwrap();
        within(s.write_all(&script[5..])).await.unwrap();
        read_through_close(&mut s, rest).await
    };
    let ((client_head, client_got), backend_got) = tokio::join!(client, server);
    Seen {
        client_head,
        backend_got,
        client_got,
    }
}

/// Header lines of a head as sorted (lower-case name, value) pairs.
fn header_set(head: &str) -> Vec<(String, String)> {
    let mut v: Vec<_> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn bytes_and_101_headers_are_identical_with_and_without_wsgate() {
    let (direct_l, direct_addr) = listener().await;
    let direct = session(direct_addr, &direct_l).await;

    let (backend_l, backend_addr) = listener().await;
    let gate = start_gate(test_config(backend_addr)).await;
    let proxied = session(gate.addr, &backend_l).await;

    assert_eq!(direct.backend_got, client_script());
    assert_eq!(direct.client_got, backend_script());
    assert!(
        proxied.backend_got == direct.backend_got,
        "the backend received other bytes through wsgate"
    );
    assert!(
        proxied.client_got == direct.client_got,
        "the client received other bytes through wsgate"
    );
    assert_eq!(
        header_set(&proxied.client_head),
        header_set(&direct.client_head)
    );
    assert!(proxied.client_head.starts_with("HTTP/1.1 101"));
}
