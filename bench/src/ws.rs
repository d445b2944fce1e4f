//! The WebSocket side of the benchmark. Frame headers are parsed, and control frames
//! written, by wsgate's own `wsgate::frame`; what the library does not offer is here:
//! data frame headers of any length, masking eight bytes at a time, the opening
//! handshake on both sides, and a client that sends pre-built frames and reads frames
//! back from a reused buffer.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use wsgate::frame::{self, Header, MAX_CONTROL_PAYLOAD, Opcode};
// The benchmark's only mention of `Side` (which end of wsgate a frame goes to).
use wsgate::Side;

/// For `frame::encode`: the load generator is a client, so its frames are masked, like
/// wsgate's frames to its backend.
pub const TO_SERVER: Side = Side::Backend;
/// For `frame::encode`: the echo backend is a server, so its frames are not masked,
/// like wsgate's frames to its client.
pub const TO_CLIENT: Side = Side::Client;

/// Largest frame either side accepts (the benchmark sends at most 64 KiB).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest HTTP head accepted in a handshake.
const MAX_HEAD: usize = 16 << 10;

fn invalid(msg: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Parses the frame header at the start of `b` with wsgate's parser and returns it with
/// the frame's whole length (header and payload); `Ok(None)` if `b` holds only part of
/// the header. Frames over [`MAX_FRAME`], control frames over 125 bytes and what wsgate
/// rejects (reserved opcodes, a 64-bit length with its top bit set) are errors.
pub fn parse_header(b: &[u8]) -> io::Result<Option<(Header, usize)>> {
    let Some(h) = Header::parse(b).map_err(invalid)? else {
        return Ok(None);
    };
    let total = usize::try_from(h.payload_len)
        .ok()
        .and_then(|len| len.checked_add(h.header_len))
        .filter(|total| *total <= MAX_FRAME)
        .ok_or_else(|| invalid("frame too large"))?;
    if h.opcode.is_control() && h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
        return Err(invalid("control frame longer than 125 bytes"));
    }
    Ok(Some((h, total)))
}

/// Appends a frame header for a payload of `len` bytes, masked with `mask` if given.
/// wsgate's `frame::encode` writes whole frames of at most 125 bytes (its own control
/// frames); data frames of any size need this.
pub fn put_header(out: &mut Vec<u8>, fin: bool, opcode: Opcode, len: usize, mask: Option<[u8; 4]>) {
    out.push(if fin { 0x80 } else { 0 } | opcode.bits());
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// XORs `buf` with the masking key; `buf` starts at payload offset 0. The same result
/// as `wsgate::frame::apply_mask`, eight bytes at a time: the library's goes byte by
/// byte (it only ever masks control frames), ~14 times slower on 64 KiB, and the echo
/// backend unmasks every byte of the bulk measurement (GB/s), so the library's would
/// make the backend, not the proxy, the bottleneck.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key phase is 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// A complete binary frame as a client sends it: FIN set, masked with a fresh random
/// key. Built once per connection and sent as it is for every message.
pub fn client_binary_frame(payload: &[u8]) -> Vec<u8> {
    let key: [u8; 4] = rand::random();
    let mut out = Vec::with_capacity(payload.len() + 14);
    put_header(&mut out, true, Opcode::Binary, payload.len(), Some(key));
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key);
    out
}

/// A client's Close 1000 (masked).
pub fn client_close_frame() -> Vec<u8> {
    frame::encode_close(TO_SERVER, 1000, "")
}

/// A read buffer reused for the life of a connection: bytes `pos..end` are unread.
pub struct ReadBuf {
    data: Vec<u8>,
    pos: usize,
    end: usize,
}

impl ReadBuf {
    pub fn new(capacity: usize) -> ReadBuf {
        ReadBuf {
            data: vec![0; capacity.max(64)],
            pos: 0,
            end: 0,
        }
    }

    pub fn filled(&self) -> &[u8] {
        &self.data[self.pos..self.end]
    }

    pub fn filled_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.pos..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
    }

    /// Reads once from `stream`, first making room for `need` unread bytes in total
    /// (at least one more than now). Returns the bytes read; 0 is end of stream.
    pub async fn fill(&mut self, stream: &mut TcpStream, need: usize) -> io::Result<usize> {
        let need = need.max(self.end - self.pos + 1);
        if self.data.len() - self.pos < need && self.pos > 0 {
            self.data.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.data.len() - self.pos < need {
            let len = need.max(self.data.len() * 2);
            self.data.resize(len, 0);
        }
        let n = stream.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// Reads an HTTP head into `buf`; returns its length including the blank line.
pub async fn read_head(stream: &mut TcpStream, buf: &mut ReadBuf) -> io::Result<usize> {
    loop {
        if let Some(i) = buf.filled().windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(i + 4);
        }
        if buf.filled().len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP head too large",
            ));
        }
        let need = buf.filled().len() + 1;
        if buf.fill(stream, need).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed during the handshake",
            ));
        }
    }
}

/// The value of header `name` (case-insensitive) in an HTTP head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Server side of the opening handshake: reads the request, answers 101 (or 400 to a
/// request that is not a WebSocket handshake) and returns the request path.
pub async fn accept(stream: &mut TcpStream, buf: &mut ReadBuf) -> io::Result<String> {
    let head_len = read_head(stream, buf).await?;
    let (path, response) = {
        let head = std::str::from_utf8(&buf.filled()[..head_len])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "handshake is not UTF-8"))?;
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let response = header(head, "sec-websocket-key").map(|key| {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            )
        });
        (path, response)
    };
    buf.consume(head_len);
    match response {
        Some(r) => {
            stream.write_all(r.as_bytes()).await?;
            Ok(path)
        }
        None => {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a WebSocket handshake",
            ))
        }
    }
}

/// Where a WebSocket URL points.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

impl Endpoint {
    /// Parses `ws://HOST:PORT[/PATH]`.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        Endpoint::parse_scheme(url, "ws://")
    }

    /// Parses `http://HOST:PORT[/PATH]` (the event stream measurements).
    pub fn parse_http(url: &str) -> Result<Endpoint, String> {
        Endpoint::parse_scheme(url, "http://")
    }

    fn parse_scheme(url: &str, scheme: &str) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix(scheme)
            .ok_or_else(|| format!("{url:?}: only {scheme} URLs are supported here"))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
            .map_err(|e| format!("{url:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: {host} resolves to nothing"))?;
        Ok(Endpoint {
            addr,
            host: host.to_string(),
            path: path.to_string(),
        })
    }
}

/// A source address on loopback for connection `i`: 127.0.0.1 to 127.0.0.250 in turn,
/// so that tens of thousands of connections do not exhaust one address's ports.
pub fn loopback_source(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 1 + (i % 250) as u8])
}

/// A received frame; its payload stays in the client's buffer until the next `recv`.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub opcode: Opcode,
    header_len: usize,
    len: usize,
}

/// The client end of a WebSocket.
pub struct Client {
    pub stream: TcpStream,
    buf: ReadBuf,
    pending: usize,
}

impl Client {
    /// Connects (from `source` if given, for loopback spreading) and does the handshake.
    pub async fn connect(
        endpoint: &Endpoint,
        path: &str,
        source: Option<IpAddr>,
    ) -> io::Result<Client> {
        let socket = match endpoint.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source.filter(|ip| ip.is_ipv4() == endpoint.addr.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let mut stream = socket.connect(endpoint.addr).await?;
        stream.set_nodelay(true)?;
        let key = generate_key();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            endpoint.host
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = ReadBuf::new(4096);
        let head_len = read_head(&mut stream, &mut buf).await?;
        {
            let head = String::from_utf8_lossy(&buf.filled()[..head_len]);
            let status = head.split(' ').nth(1).unwrap_or("");
            if status != "101" {
                let line = head.lines().next().unwrap_or("").to_string();
                return Err(io::Error::other(format!("handshake refused: {line}")));
            }
            if header(&head, "sec-websocket-accept")
                != Some(derive_accept_key(key.as_bytes()).as_str())
            {
                return Err(io::Error::other("wrong Sec-WebSocket-Accept"));
            }
        }
        buf.consume(head_len);
        Ok(Client {
            stream,
            buf,
            pending: 0,
        })
    }

    /// Reads the next frame (unmasking it if the peer masked it).
    pub async fn recv(&mut self) -> io::Result<Frame> {
        self.buf.consume(std::mem::take(&mut self.pending));
        loop {
            let need = match parse_header(self.buf.filled())? {
                Some((h, total)) => {
                    if self.buf.filled().len() >= total {
                        if let Some(key) = h.mask {
                            apply_mask(&mut self.buf.filled_mut()[h.header_len..total], key);
                        }
                        self.pending = total;
                        return Ok(Frame {
                            opcode: h.opcode,
                            header_len: h.header_len,
                            len: total - h.header_len,
                        });
                    }
                    total
                }
                None => self.buf.filled().len() + 14,
            };
            if self.buf.fill(&mut self.stream, need).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                ));
            }
        }
    }

    /// The payload of the frame `recv` just returned.
    pub fn payload(&self, frame: &Frame) -> &[u8] {
        &self.buf.filled()[frame.header_len..frame.header_len + frame.len]
    }

    /// Reads until a data frame arrives (answering Pings) and checks it equals `expected`.
    pub async fn recv_echo(&mut self, expected: &[u8]) -> io::Result<()> {
        loop {
            let frame = self.recv().await?;
            match frame.opcode {
                Opcode::Ping => {
                    let pong = frame::encode(TO_SERVER, Opcode::Pong, self.payload(&frame));
                    self.stream.write_all(&pong).await?;
                }
                Opcode::Pong => {}
                Opcode::Close => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "server sent Close instead of the echo",
                    ));
                }
                _ => {
                    if self.payload(&frame) != expected {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "echo differs from the message sent",
                        ));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The close handshake as a client: Close 1000, wait for the server's Close, then
    /// for its FIN (the server closes TCP first, so TIME_WAIT stays on its side).
    pub async fn close(&mut self, limit: Duration) -> io::Result<()> {
        let closing = async {
            self.stream.write_all(&client_close_frame()).await?;
            loop {
                if self.recv().await?.opcode == Opcode::Close {
                    break;
                }
            }
            self.wait_eof().await
        };
        tokio::time::timeout(limit, closing)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "close handshake timed out"))?
    }

    /// Discards whatever arrives until the peer closes TCP.
    pub async fn wait_eof(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 1024];
        while self.stream.read(&mut scratch).await? != 0 {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_written_here_parse_in_wsgate_at_every_length_and_opcode() {
        let opcodes = [
            Opcode::Continuation,
            Opcode::Text,
            Opcode::Binary,
            Opcode::Close,
            Opcode::Ping,
            Opcode::Pong,
        ];
        for len in [0usize, 125, 126, 65535, 65536] {
            for opcode in opcodes {
                for (fin, mask) in [(true, Some([1, 2, 3, 4])), (false, None)] {
                    let mut out = Vec::new();
                    put_header(&mut out, fin, opcode, len, mask);
                    let h = Header::parse(&out).expect("valid").expect("a whole header");
                    assert_eq!((h.fin, h.rsv, h.opcode), (fin, 0, opcode));
                    assert_eq!((h.payload_len, h.mask), (len as u64, mask));
                    assert_eq!(h.header_len, out.len());
                    assert_eq!(Header::parse(&out[..out.len() - 1]), Ok(None));
                }
            }
        }
    }

    #[test]
    fn masking_matches_wsgate_at_every_length_and_restores_the_payload() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..=40 {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut fast = payload.clone();
            apply_mask(&mut fast, key);
            let mut reference = payload.clone();
            frame::apply_mask(&mut reference, key);
            assert_eq!(fast, reference, "length {len}");
            apply_mask(&mut fast, key);
            assert_eq!(fast, payload);
        }
    }

    #[test]
    fn client_frames_are_masked_and_carry_the_payload() {
        let payload: Vec<u8> = (0..1003).map(|i| (i * 7) as u8).collect();
        let frame = client_binary_frame(&payload);
        let (h, total) = parse_header(&frame)
            .expect("valid")
            .expect("a whole header");
        assert_eq!(
            (h.fin, h.opcode, total),
            (true, Opcode::Binary, frame.len())
        );
        let mut body = frame[h.header_len..].to_vec();
        apply_mask(&mut body, h.mask.expect("client frames are masked"));
        assert_eq!(body, payload);

        let close = client_close_frame();
        let (h, _) = parse_header(&close)
            .expect("valid")
            .expect("a whole header");
        let mut body = close[h.header_len..].to_vec();
        apply_mask(&mut body, h.mask.expect("client frames are masked"));
        assert_eq!(
            (h.opcode, body.as_slice()),
            (Opcode::Close, &[0x03, 0xE8][..])
        );
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut big = Vec::new();
        put_header(&mut big, true, Opcode::Binary, MAX_FRAME + 1, None);
        assert!(parse_header(&big).is_err());
        let mut ping = Vec::new();
        put_header(&mut ping, true, Opcode::Ping, 126, None);
        assert!(parse_header(&ping).is_err());
        assert!(parse_header(&[0x83, 0x00]).is_err(), "reserved opcode");
    }

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("ws://127.0.0.1:8080/a/b").expect("valid URL");
        assert_eq!((e.addr.port(), e.path.as_str()), (8080, "/a/b"));
        assert_eq!(
            Endpoint::parse("ws://127.0.0.1:9").expect("valid").path,
            "/"
        );
        assert!(Endpoint::parse("http://127.0.0.1:9").is_err());
        let h = Endpoint::parse_http("http://127.0.0.1:9/events").expect("valid URL");
        assert_eq!((h.addr.port(), h.path.as_str()), (9, "/events"));
        assert!(Endpoint::parse_http("ws://127.0.0.1:9").is_err());
    }
}
