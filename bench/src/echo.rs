//! The echo backend: accepts WebSockets and sends every data frame back unmasked, with
//! the same opcode and FIN bit, answers Ping with Pong and Close with Close, then closes
//! TCP first (it is the server). Every frame that arrived in one read is answered with
//! one write.
//!
//! The same connection handler serves as the scripted backend of the `release`
//! measurement, where it also reports when the Close (or the end of the stream)
//! arrived.

use std::io;
use std::io::Read;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc::UnboundedSender;

use wsgate::frame::{self, Opcode};

use crate::ws::{self, ReadBuf, TO_CLIENT};

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    /// Address to listen on, e.g. 127.0.0.1:5080.
    #[arg(long)]
    listen: SocketAddr,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Exit when standard input reaches end of file (used by `run`, so the backend
    /// never outlives the benchmark).
    #[arg(long)]
    exit_on_stdin_eof: bool,
}

pub fn main(args: EchoArgs) -> ExitCode {
    if args.exit_on_stdin_eof {
        std::thread::spawn(|| {
            let mut sink = [0u8; 256];
            let mut stdin = io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    runtime.block_on(async {
        let listener = match listen(args.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("wsgate-bench echo: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        eprintln!("wsgate-bench echo: listening on {}", args.listen);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, None));
                }
                Err(e) => {
                    // Out of file descriptors, typically: wait instead of spinning.
                    eprintln!("wsgate-bench echo: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// A listener with a deep accept queue (thousands of idle connections open at once).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// What the backend saw when a connection ended, for the `release` measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A Close frame with this code (`None`: no code).
    Close(Option<u16>),
    /// End of stream without a Close.
    Eof,
    /// A read error (reset, typically).
    Error(io::ErrorKind),
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Close(Some(code)) => write!(f, "Close {code}"),
            Seen::Close(None) => write!(f, "Close (no code)"),
            Seen::Eof => write!(f, "FIN, no Close"),
            Seen::Error(kind) => write!(f, "error ({kind})"),
        }
    }
}

/// Where to report the end of a connection: (request path, what was seen, when).
pub type Reporter = UnboundedSender<(String, Seen, Instant)>;

/// Serves one WebSocket: handshake, then echo until Close or end of stream.
pub async fn serve(mut stream: TcpStream, report: Option<Reporter>) {
    let _ = stream.set_nodelay(true);
    let mut buf = ReadBuf::new(4096);
    let path = match ws::accept(&mut stream, &mut buf).await {
        Ok(path) => path,
        Err(_) => return,
    };
    let (seen, at) = echo_frames(&mut stream, &mut buf).await;
    if let Some(tx) = report {
        let _ = tx.send((path, seen, at));
    }
}

/// The echo loop. Returns how the connection ended and when the backend learned it:
/// for a Close, when the frame was parsed (before the reply is written); for the end
/// of the stream, when the read returned.
async fn echo_frames(stream: &mut TcpStream, buf: &mut ReadBuf) -> (Seen, Instant) {
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        out.clear();
        let mut closed: Option<(Option<u16>, Instant)> = None;
        let need = loop {
            let filled = buf.filled_mut();
            let (h, total) = match ws::parse_header(filled) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break filled.len() + 14,
                Err(e) => return (Seen::Error(e.kind()), Instant::now()),
            };
            if filled.len() < total {
                break total;
            }
            let payload = &mut filled[h.header_len..total];
            if let Some(key) = h.mask {
                ws::apply_mask(payload, key);
            }
            match h.opcode {
                // Control payloads are at most 125 bytes (`ws::parse_header` checks).
                Opcode::Close => {
                    out.extend_from_slice(&frame::encode(TO_CLIENT, Opcode::Close, payload));
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    closed = Some((code, Instant::now()));
                }
                Opcode::Ping => {
                    out.extend_from_slice(&frame::encode(TO_CLIENT, Opcode::Pong, payload));
                }
                Opcode::Pong => {}
                op => {
                    ws::put_header(&mut out, h.fin, op, payload.len(), None);
                    out.extend_from_slice(payload);
                }
            }
            buf.consume(total);
            if closed.is_some() {
                break 0;
            }
        };
        if let Some((code, at)) = closed {
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
            return (Seen::Close(code), at);
        }
        if !out.is_empty()
            && let Err(e) = stream.write_all(&out).await
        {
            return (Seen::Error(e.kind()), Instant::now());
        }
        match buf.fill(stream, need).await {
            Ok(0) => return (Seen::Eof, Instant::now()),
            Ok(_) => {}
            Err(e) => return (Seen::Error(e.kind()), Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{Client, Endpoint};
    use std::time::Duration;

    /// The echo backend and the client against each other on loopback: small and large
    /// messages (all three length encodings), a Ping answered with a Pong, the close
    /// handshake as the backend sees it.
    #[test]
    fn echo_backend_and_client_agree() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                serve(stream, Some(tx)).await;
            });
            let endpoint = Endpoint::parse(&format!("ws://{addr}/echo")).unwrap();
            let mut client = Client::connect(&endpoint, "/echo", None).await.unwrap();
            for size in [0, 64, 126, 65536, 70000] {
                let message: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
                let frame = ws::client_binary_frame(&message);
                client.stream.write_all(&frame).await.unwrap();
                client.recv_echo(&message).await.unwrap();
            }
            let ping = frame::encode(ws::TO_SERVER, Opcode::Ping, b"hi");
            client.stream.write_all(&ping).await.unwrap();
            let pong = client.recv().await.unwrap();
            assert_eq!(
                (pong.opcode, client.payload(&pong)),
                (Opcode::Pong, &b"hi"[..])
            );
            client.close(Duration::from_secs(5)).await.unwrap();
            let (path, seen, _) = rx.recv().await.unwrap();
            assert_eq!((path.as_str(), seen), ("/echo", Seen::Close(Some(1000))));
        });
    }
}
