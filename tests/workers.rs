//! Several workers: each accepts on its own socket of the shared port and relays what
//! it accepted; the drain reaches every worker's connections.

mod common;

use std::collections::BTreeSet;

use common::*;
use wsgate::config::Workers;

const TEXT: u8 = 0x1;

#[tokio::test]
async fn connections_spread_over_the_workers_and_the_drain_closes_them_all() {
    let (mut gate, backend_l) = gate_with(|c| {
        c.workers = Workers::Count(3);
        // The drain's other code for clients: "going away".
        c.shutdown.client_close_code = 1001;
    })
    .await;
    // The kernel hashes each client address and port onto one of the three sockets: with
    // 60 connections, the chance that a worker gets none is 3 × (2/3)^60, below 1e-10.
    let mut pairs = Vec::new();
    for _ in 0..60 {
        pairs.push(pair(&gate, &backend_l).await);
    }
    // Every WebSocket relays both ways, so every relay runs and is in the live table
    // (a client has its 101 a moment before its relay registers).
    for (i, (client, backend)) in pairs.iter_mut().enumerate() {
        let msg = format!("message {i}");
        client.send(TEXT, msg.as_bytes()).await;
        assert_eq!(backend.recv().await.payload, msg.as_bytes());
        backend.send(TEXT, msg.as_bytes()).await;
        assert_eq!(client.recv().await.payload, msg.as_bytes());
    }

    let (status, body) = http_get(gate.admin, "/connections").await;
    assert_eq!(status, 200);
    let table: serde_json::Value = serde_json::from_str(&body).unwrap();
    let workers: BTreeSet<u64> = table
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["worker"].as_u64().unwrap())
        .collect();
    assert_eq!(workers, BTreeSet::from([0, 1, 2]), "{body}");

    let done = gate.begin_shutdown();
    for (client, backend) in &mut pairs {
        assert_eq!(client.recv().await.close_code(), Some(1001));
        assert_eq!(backend.recv().await.close_code(), Some(1001));
        client.send_close(1001, "").await;
        backend.send_close(1001, "").await;
        backend.shutdown_write().await;
    }
    for (client, backend) in &mut pairs {
        assert_eq!(client.expect_end().await, End::Eof);
        assert_eq!(backend.expect_end().await, End::Eof);
    }
    within(done).await.unwrap();
    // Every worker's socket is closed: nothing accepts on the port any more.
    assert!(tokio::net::TcpStream::connect(gate.addr).await.is_err());
}

#[tokio::test]
async fn a_second_server_cannot_share_the_port() {
    let (gate, _backend_l) = gate_with(|c| c.workers = Workers::Count(2)).await;
    let mut config = test_config("127.0.0.1:9".parse().unwrap());
    config.listen = gate.addr;
    config.admin.listen = None;
    for workers in [1, 2] {
        config.workers = Workers::Count(workers);
        let err = wsgate::Listeners::bind(&config).unwrap_err();
        assert!(err.to_string().contains("Address already in use"), "{err}");
    }
}
