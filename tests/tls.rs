//! TLS on both legs and WebSocket over HTTP/2 (RFC 8441). Certificates are made by the
//! tests (rcgen); no key is committed.

// A failed unwrap in a test is a failed test; tungstenite's handshake callback type
// returns its (large) HTTP response as the error.
#![allow(clippy::unwrap_used, clippy::result_large_err)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A CA and a leaf certificate for `localhost` signed by it, as PEM.
struct Pki {
    ca_pem: String,
    leaf_pem: String,
    key_pem: String,
}

fn pki(name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("wsgate test CA {name}"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    // rustls rejects a leaf that could be a CA.
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        leaf_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

fn dir() -> PathBuf {
    let d = common::test_dir(&format!(
        "wsgate-tls-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    // Write then rename, as a Kubernetes Secret update swaps files atomically.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

/// ring as rustls' process-wide provider, as wsgate installs it (idempotent).
fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn client_tls(ca_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn server_tls(p: &Pki) -> tokio_rustls::TlsAcceptor {
    install_provider();
    let certs = CertificateDer::pem_slice_iter(p.leaf_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// A tokio-tungstenite echo backend, optionally behind TLS; returns the Close codes.
async fn echo_backend(
    l: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    n: usize,
) -> Vec<Option<u16>> {
    let mut codes = Vec::new();
    for _ in 0..n {
        let (s, _) = within(l.accept()).await.unwrap();
        let code = match &tls {
            Some(acceptor) => {
                let s = within(acceptor.accept(s)).await.unwrap();
                echo(within(tokio_tungstenite::accept_async(s)).await.unwrap()).await
            }
            None => echo(within(tokio_tungstenite::accept_async(s)).await.unwrap()).await,
        };
        codes.push(code);
    }
    codes
}

async fn echo<S>(mut ws: tokio_tungstenite::WebSocketStream<S>) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut code = None;
    while let Some(msg) = within(ws.next()).await {
        match msg {
            Ok(Message::Close(f)) => code = f.map(|f| u16::from(f.code)),
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                let _ = within(ws.send(m)).await;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    code
}

/// wsgate serving TLS with `p`'s leaf (files written to `d`, re-read every 50 ms) in
/// front of `backend_addr`.
async fn tls_gate(p: &Pki, d: &std::path::Path, backend_addr: std::net::SocketAddr) -> Gate {
    let mut config = test_config(backend_addr);
    config.tls = Some(wsgate::config::TlsConfig {
        cert: write(d, "tls.crt", &p.leaf_pem),
        key: write(d, "tls.key", &p.key_pem),
        handshake_timeout: std::time::Duration::from_secs(5),
        reload_interval: Some(std::time::Duration::from_millis(50)),
        http2: true,
    });
    start_gate(config).await
}

/// A TLS connection to `addr` for `localhost`, trusting `ca_pem`, offering `alpn`.
async fn connect_tls(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    client_tls(ca_pem, alpn).connect(name, tcp).await
}

#[tokio::test]
async fn wss_client_to_plain_backend_echoes_and_closes() {
    let p = pki("a");
    let d = dir();
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(echo_backend(backend_l, None, 1));
    let gate = tls_gate(&p, &d, backend_addr).await;

    let tls = within(connect_tls(gate.addr, &p.ca_pem, &[b"http/1.1"]))
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/ws", gate.addr.port());
    let (mut ws, resp) = within(tokio_tungstenite::client_async(url, tls))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    within(ws.send(Message::text("over tls"))).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("over tls")
    );
    within(ws.close(None)).await.unwrap();
    while within(ws.next()).await.is_some() {}
    assert_eq!(within(backend).await.unwrap(), vec![None]);
}

/// A request that asks to close is answered, then the connection ends with TLS's
/// close_notify: without it, the client could not tell the end from a cut (rustls
/// reports an unexpected end of file).
#[tokio::test]
async fn an_https_request_that_asks_to_close_ends_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = pki("close");
    let d = dir();
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(async move { answer_http_once(&backend_l).await });
    let gate = tls_gate(&p, &d, backend_addr).await;

    let mut tls = within(connect_tls(gate.addr, &p.ca_pem, &[b"http/1.1"]))
        .await
        .unwrap();
    within(tls.write_all(b"GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        .await
        .unwrap();
    let mut got = Vec::new();
    within(tls.read_to_end(&mut got))
        .await
        .expect("the stream ends with close_notify");
    let got = String::from_utf8(got).unwrap();
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nok"), "{got}");
    let seen = within(backend).await.unwrap();
    assert!(seen.starts_with("GET /bye HTTP/1.1\r\n"), "{seen}");
}

#[tokio::test]
async fn plain_client_to_wss_backend_echoes_and_every_close_reaches_both_sides() {
    let p = pki("b");
    let d = dir();
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(echo_backend(backend_l, Some(server_tls(&p)), 2));
    let mut config = test_config(backend_addr);
    config.backend =
        wsgate::config::BackendUrl::parse(&format!("https://localhost:{}", backend_addr.port()))
            .unwrap();
    config.backend_tls.ca_file = Some(write(&d, "ca.crt", &p.ca_pem));
    let gate = start_gate(config).await;

    let url = format!("ws://{}/ws", gate.addr);
    let (mut ws, _) = within(tokio_tungstenite::connect_async(&url))
        .await
        .unwrap();
    within(ws.send(Message::binary(vec![7u8; 100_000])))
        .await
        .unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::binary(vec![7u8; 100_000])
    );
    within(ws.close(None)).await.unwrap();
    while within(ws.next()).await.is_some() {}

    // A client that vanishes: the TLS backend still gets Close 1001.
    let (client, _) = connect_ws(gate.addr, "/ws", "").await;
    drop(client);
    assert_eq!(within(backend).await.unwrap(), vec![None, Some(1001)]);
}

#[tokio::test]
async fn untrusted_or_misnamed_backend_certificates_get_502() {
    let p = pki("c");
    let d = dir();
    // No CA (the system roots do not know the test CA), then the right CA but a name
    // the certificate does not carry.
    for (ca, server_name) in [(None, "localhost"), (Some(&p.ca_pem), "other.example")] {
        let (backend_l, backend_addr) = listener().await;
        let acceptor = server_tls(&p);
        let accepting = tokio::spawn(async move {
            let (s, _) = within(backend_l.accept()).await.unwrap();
            // The handshake fails on wsgate's side.
            assert!(within(acceptor.accept(s)).await.is_err());
        });
        let mut config = test_config(backend_addr);
        config.backend =
            wsgate::config::BackendUrl::parse(&format!("https://{backend_addr}")).unwrap();
        config.backend_tls.ca_file = ca.map(|ca| write(&d, "ca.crt", ca));
        config.backend_tls.server_name = Some(server_name.to_string());
        let gate = start_gate(config).await;
        let (head, _) = http_raw(
            gate.addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&head), 502, "{head}");
        assert_eq!(header(&head, "wsgate-error"), Some("backend_unreachable"));
        within(accepting).await.unwrap();
    }
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_handshakes_and_open_connections_survive() {
    let (p1, p2) = (pki("old"), pki("new"));
    let d = dir();
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(echo_backend(backend_l, None, 1));
    let gate = tls_gate(&p1, &d, backend_addr).await;

    let tls = within(connect_tls(gate.addr, &p1.ca_pem, &[]))
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/ws", gate.addr.port());
    let (mut ws, _) = within(tokio_tungstenite::client_async(url, tls))
        .await
        .unwrap();

    // Rotate: a broken pair first (kept out), then the new pair.
    write(&d, "tls.key", "not a key");
    write(&d, "tls.crt", &p2.leaf_pem);
    write(&d, "tls.key", &p2.key_pem);
    let new_ca = p2.ca_pem.clone();
    let addr = gate.addr;
    eventually(async || connect_tls(addr, &new_ca, &[]).await.is_ok()).await;

    // The connection opened with the old certificate still works.
    within(ws.send(Message::text("still here"))).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("still here")
    );
    within(ws.close(None)).await.unwrap();
    while within(ws.next()).await.is_some() {}
    within(backend).await.unwrap();
}

#[tokio::test]
async fn sighup_with_tls_keeps_connections_and_reloads_the_certificate() {
    let (p1, p2) = (pki("hup-old"), pki("hup-new"));
    let d = dir();
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(echo_backend(backend_l, None, 1));
    // The certificate is re-read only on SIGHUP here.
    let tls = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nreload_interval = \"0s\"",
        write(&d, "tls.crt", &p1.leaf_pem),
        write(&d, "tls.key", &p1.key_pem),
    );
    let (child, addr, _admin, mut log) = spawn_wsgate(backend_addr, &tls).await;
    let tls_stream = within(connect_tls(addr, &p1.ca_pem, &[b"http/1.1"]))
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (mut ws, _) = within(tokio_tungstenite::client_async(url, tls_stream))
        .await
        .unwrap();

    write(&d, "tls.crt", &p2.leaf_pem);
    write(&d, "tls.key", &p2.key_pem);
    signal(&child, "HUP").await;
    log_line(&mut log, |l| l["message"] == "configuration reloaded").await;
    // New handshakes get the new certificate; the open connection keeps relaying.
    within(connect_tls(addr, &p2.ca_pem, &[])).await.unwrap();
    within(ws.send(Message::text("after SIGHUP")))
        .await
        .unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("after SIGHUP")
    );
    within(ws.close(None)).await.unwrap();
    while within(ws.next()).await.is_some() {}
    within(backend).await.unwrap();
}

/// Opens an RFC 8441 WebSocket over an HTTP/2 connection `io`; returns the stream.
async fn h2_websocket<I>(io: I, authority: &str) -> (hyper::upgrade::Upgraded, hyper::HeaderMap)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = within(hyper::client::conn::http2::handshake::<
        _,
        _,
        Empty<bytes::Bytes>,
    >(TokioExecutor::new(), TokioIo::new(io)))
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(format!("https://{authority}/ws?room=1"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "chat")
        .body(Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = within(sender.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    let headers = resp.headers().clone();
    let upgraded = within(hyper::upgrade::on(resp)).await.unwrap();
    (upgraded, headers)
}

async fn h2_echo_and_close(upgraded: hyper::upgrade::Upgraded) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut io = TokioIo::new(upgraded);
    within(io.write_all(&encode(true, 0, TEXT, b"over h2", true)))
        .await
        .unwrap();
    let mut buf = vec![0u8; 64];
    let mut got = Vec::new();
    while decode(&got).is_none() {
        let n = within(io.read(&mut buf)).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let (frame, _) = decode(&got).unwrap();
    assert_eq!(
        (frame.opcode, frame.payload.as_slice()),
        (TEXT, &b"over h2"[..])
    );
    within(io.write_all(&encode(true, 0, CLOSE, &close_payload(1000, ""), true)))
        .await
        .unwrap();
    // The backend's reply Close comes back.
    got.clear();
    while decode(&got).is_none() {
        let n = within(io.read(&mut buf)).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(decode(&got).unwrap().0.close_code(), Some(1000));
}

#[tokio::test]
async fn rfc8441_websocket_over_h2c_reaches_an_http1_backend() {
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(async move {
        let (s, _) = within(backend_l.accept()).await.unwrap();
        let mut seen = None;
        let ws = within(tokio_tungstenite::accept_hdr_async(
            s,
            |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
             mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                seen = Some((
                    req.uri().to_string(),
                    req.headers().get("host").cloned(),
                    req.headers().get("sec-websocket-protocol").cloned(),
                ));
                resp.headers_mut()
                    .insert("sec-websocket-protocol", "chat".parse().unwrap());
                Ok(resp)
            },
        ))
        .await
        .unwrap();
        (seen, echo(ws).await)
    });
    let mut config = test_config(backend_addr);
    config.http.h2c = true;
    let gate = start_gate(config).await;

    let tcp = within(TcpStream::connect(gate.addr)).await.unwrap();
    let (upgraded, headers) = h2_websocket(tcp, "dash.example").await;
    assert_eq!(headers.get("sec-websocket-protocol").unwrap(), "chat");
    assert!(headers.get("sec-websocket-accept").is_none());
    h2_echo_and_close(upgraded).await;
    let (seen, code) = within(backend).await.unwrap();
    let (uri, host, protocol) = seen.unwrap();
    assert_eq!(uri, "/ws?room=1");
    assert_eq!(host.unwrap(), "dash.example");
    assert_eq!(protocol.unwrap(), "chat");
    assert_eq!(code, Some(1000), "the client's Close reached the backend");
}

#[tokio::test]
async fn rfc8441_websocket_over_tls_alpn_h2() {
    let p = pki("h2");
    let d = dir();
    let (backend_l, backend_addr) = listener().await;
    let backend = tokio::spawn(echo_backend(backend_l, None, 1));
    let gate = tls_gate(&p, &d, backend_addr).await;

    let tls = within(connect_tls(gate.addr, &p.ca_pem, &[b"h2"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (upgraded, _) = h2_websocket(tls, "localhost").await;
    h2_echo_and_close(upgraded).await;
    assert_eq!(within(backend).await.unwrap(), vec![Some(1000)]);
}

/// Plain HTTP to an `https://` backend: wsgate's own HTTP/1.1 client writes and reads
/// through TLS (whose records wait for a flush), a request body goes out and a streamed,
/// chunked answer comes back, twice on one backend connection.
#[tokio::test]
async fn http_requests_with_bodies_reach_a_tls_backend_and_reuse_its_connection() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let p = pki("h");
    let d = dir();
    let (backend_l, backend_addr) = listener().await;
    let acceptor = server_tls(&p);
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = backend_l.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                // Answers with the request body, in three chunks of a streamed body.
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let parts: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
                            Ok(Frame::data(bytes::Bytes::from_static(b"you sent: "))),
                            Ok(Frame::data(body)),
                            Ok(Frame::data(bytes::Bytes::from_static(b"."))),
                        ];
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(
                            futures_util::stream::iter(parts),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let mut config = test_config(backend_addr);
    config.backend =
        wsgate::config::BackendUrl::parse(&format!("https://localhost:{}", backend_addr.port()))
            .unwrap();
    config.backend_tls.ca_file = Some(write(&d, "ca.crt", &p.ca_pem));
    let gate = start_gate(config).await;
    // One client connection, so one worker and its pool serve both requests.
    let stream = within(TcpStream::connect(gate.addr)).await.unwrap();
    let (mut sender, conn) = within(hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Full<bytes::Bytes>,
    >(TokioIo::new(stream)))
    .await
    .unwrap();
    let driver = tokio::spawn(conn);
    for text in ["one".to_string(), "x".repeat(100_000)] {
        let req = hyper::Request::post("/echo")
            .header("host", "dash.example")
            .body(http_body_util::Full::new(bytes::Bytes::from(text.clone())))
            .unwrap();
        let resp = within(sender.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
        assert_eq!(body, format!("you sent: {text}.").as_bytes());
    }
    driver.abort();
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "backend connections"
    );
}
