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

use crate::ws::{self, MAX_FRAME, OP_CLOSE, OP_PING, OP_PONG, ReadBuf};

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
            let Some(h) = ws::parse_header(filled) else {
                break filled.len() + 14;
            };
            if h.total() > MAX_FRAME {
                return (Seen::Error(io::ErrorKind::InvalidData), Instant::now());
            }
            if filled.len() < h.total() {
                break h.total();
            }
            let payload = &mut filled[h.header_len..h.total()];
            if let Some(key) = h.mask {
                ws::apply_mask(payload, key);
            }
            match h.opcode {
                OP_CLOSE => {
                    ws::put_header(&mut out, 0x80 | OP_CLOSE, payload.len(), None);
                    out.extend_from_slice(payload);
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    closed = Some((code, Instant::now()));
                }
                OP_PING => {
                    ws::put_header(&mut out, 0x80 | OP_PONG, payload.len(), None);
                    out.extend_from_slice(payload);
                }
                OP_PONG => {}
                op => {
                    let fin = if h.fin { 0x80 } else { 0 };
                    ws::put_header(&mut out, fin | op, payload.len(), None);
                    out.extend_from_slice(payload);
                }
            }
            buf.consume(h.total());
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
