//! Real third-party peers: tokio-tungstenite as client and as backend, talking through
//! wsgate as they would directly.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A tokio-tungstenite echo backend serving `connections` connections; returns the
/// Close code each one ended with.
async fn echo_backend(l: tokio::net::TcpListener, connections: usize) -> Vec<Option<u16>> {
    let mut codes = Vec::new();
    for _ in 0..connections {
        let (s, _) = within(l.accept()).await.unwrap();
        let mut ws = within(tokio_tungstenite::accept_async(s)).await.unwrap();
        let mut code = None;
        while let Some(msg) = within(ws.next()).await {
            match msg.unwrap() {
                Message::Close(frame) => {
                    code = frame.map(|f| u16::from(f.code));
                }
                m @ (Message::Text(_) | Message::Binary(_)) => within(ws.send(m)).await.unwrap(),
                _ => {}
            }
        }
        codes.push(code);
    }
    codes
}

#[tokio::test]
async fn tungstenite_client_and_backend_echo_and_close_cleanly() {
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(echo_backend(backend_l, 1));
    let gate = start_gate(test_config(backend_addr)).await;

    let url = format!("ws://{}/echo", gate.addr);
    let (mut ws, resp) = within(tokio_tungstenite::connect_async(url)).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..100u32 {
        let text = format!("message {i}").repeat(i as usize % 7 + 1);
        within(ws.send(Message::text(text.clone()))).await.unwrap();
        assert_eq!(
            within(ws.next()).await.unwrap().unwrap(),
            Message::text(text)
        );
    }
    let big = vec![0x5au8; 1 << 20];
    within(ws.send(Message::binary(big.clone()))).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::binary(big)
    );
    within(ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "tab closed".into(),
    })))
    .await
    .unwrap();
    // The backend's reply Close comes back through wsgate, then the stream ends.
    let reply = within(ws.next()).await.unwrap().unwrap();
    assert!(
        matches!(reply, Message::Close(Some(ref f)) if f.code == CloseCode::Away),
        "{reply:?}"
    );
    assert!(within(ws.next()).await.is_none());
    assert_eq!(within(backend).await.unwrap(), vec![Some(1001)]);
}

#[tokio::test]
async fn tungstenite_backend_sees_1001_when_the_client_vanishes() {
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(echo_backend(backend_l, 1));
    let gate = start_gate(test_config(backend_addr)).await;

    let (client, _) = connect_ws(gate.addr, "/echo", "").await;
    // The browser tab is killed: FIN, no Close frame.
    drop(client);
    assert_eq!(within(backend).await.unwrap(), vec![Some(1001)]);
}
