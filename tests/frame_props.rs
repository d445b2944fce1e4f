//! Property tests for the frame scanner, the header parser and the handshake check.
//!
//! The scanner is driven the way `pump.rs` drives it: a buffer of unconsumed bytes,
//! `step` on that tail, `Data { len }` and `Control { len }` consume `len` bytes,
//! `NeedMore` appends the next chunk. Frame boundaries, opcodes and lengths are checked
//! against tungstenite's header parser, an independent decoder.
//!
//! `PROPTEST_CASES` overrides the case count (256 by default).
#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Version};
use proptest::prelude::*;
use proptest::sample::Index;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use wsgate::Side;
use wsgate::frame::{FrameError, Header, Opcode, RSV1, Scanner, Step};

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

fn opcode_bits(op: Opcode) -> u8 {
    match op {
        Opcode::Continuation => CONTINUATION,
        Opcode::Text => TEXT,
        Opcode::Binary => BINARY,
        Opcode::Close => CLOSE,
        Opcode::Ping => PING,
        Opcode::Pong => PONG,
    }
}

// ---------------------------------------------------------------------------------------
// Generating valid frame sequences
// ---------------------------------------------------------------------------------------

/// One frame as generated, before encoding.
#[derive(Clone, Debug)]
struct FrameSpec {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload_len: usize,
    /// A byte the payload is made of (data payloads are never inspected by wsgate).
    fill: u8,
}

impl FrameSpec {
    fn header_len(&self) -> usize {
        let ext = match self.payload_len {
            0..=125 => 0,
            126..=0xFFFF => 2,
            _ => 8,
        };
        2 + ext + if self.mask.is_some() { 4 } else { 0 }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.push((u8::from(self.fin) << 7) | (self.rsv << 4) | self.opcode);
        let m = if self.mask.is_some() { 0x80 } else { 0 };
        match self.payload_len {
            n @ 0..=125 => out.push(m | n as u8),
            n @ 126..=0xFFFF => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(key) = self.mask {
            out.extend_from_slice(&key);
        }
        let start = out.len();
        out.resize(start + self.payload_len, self.fill);
        if self.opcode == CLOSE && self.payload_len >= 2 {
            // A plausible status code; wsgate's scanner does not judge it.
            out[start..start + 2].copy_from_slice(&1000u16.to_be_bytes());
        }
        if let Some(key) = self.mask {
            for (i, b) in out[start..].iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
    }
}

/// What the generator draws for one frame; [`valid_sequence`] turns a list of these into
/// frames that respect the fragmentation rules.
#[derive(Clone, Debug)]
enum Draw {
    Data {
        binary: bool,
        fin: bool,
        rsv1: bool,
        len: usize,
        fill: u8,
    },
    Control {
        opcode: u8,
        len: usize,
        fill: u8,
    },
}

/// Data payload lengths: every encoding, with its edges (125/126, 65535/65536) likely.
fn data_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..=125,
        2 => prop::sample::select(vec![0usize, 1, 124, 125, 126, 127, 65534, 65535]),
        3 => 126usize..=65535,
        1 => 65536usize..=140_000,
    ]
}

fn draw() -> impl Strategy<Value = Draw> {
    prop_oneof![
        3 => (any::<bool>(), any::<bool>(), any::<bool>(), data_len(), any::<u8>()).prop_map(
            |(binary, fin, rsv1, len, fill)| Draw::Data { binary, fin, rsv1, len, fill }
        ),
        1 => (
            prop::sample::select(vec![CLOSE, PING, PONG]),
            0usize..=125,
            any::<u8>()
        )
            .prop_map(|(opcode, len, fill)| Draw::Control {
                opcode,
                // A one-byte Close cannot carry a status code (RFC 6455 §5.5.1).
                len: if opcode == CLOSE && len == 1 { 0 } else { len },
                fill,
            }),
    ]
}

/// Turns draws into a valid frame sequence from `sender`: continuation frames only
/// inside a fragmented message, a new message only outside one, control frames anywhere,
/// RSV1 only on a message's first frame and only when `rsv1_allowed`, every client frame
/// masked and no backend frame. An open message is finished at the end.
fn valid_sequence(
    sender: Side,
    rsv1_allowed: bool,
    draws: &[Draw],
    keys: &[u32],
) -> Vec<FrameSpec> {
    let mut key_at = 0;
    let mut mask = || {
        (sender == Side::Client).then(|| {
            key_at += 1;
            keys.get(key_at % keys.len().max(1))
                .copied()
                .unwrap_or(0x37fa_213d)
                .to_be_bytes()
        })
    };
    let mut frames = Vec::with_capacity(draws.len() + 1);
    let mut in_message = false;
    for d in draws {
        match *d {
            Draw::Data {
                binary,
                fin,
                rsv1,
                len,
                fill,
            } => {
                let opcode = match (in_message, binary) {
                    (true, _) => CONTINUATION,
                    (false, true) => BINARY,
                    (false, false) => TEXT,
                };
                let rsv = if rsv1 && rsv1_allowed && !in_message {
                    RSV1
                } else {
                    0
                };
                frames.push(FrameSpec {
                    fin,
                    rsv,
                    opcode,
                    mask: mask(),
                    payload_len: len,
                    fill,
                });
                in_message = !fin;
            }
            Draw::Control { opcode, len, fill } => frames.push(FrameSpec {
                fin: true,
                rsv: 0,
                opcode,
                mask: mask(),
                payload_len: len,
                fill,
            }),
        }
    }
    if in_message {
        frames.push(FrameSpec {
            fin: true,
            rsv: 0,
            opcode: CONTINUATION,
            mask: mask(),
            payload_len: 3,
            fill: b'z',
        });
    }
    frames
}

/// How a byte stream is cut into the chunks that reads would return.
#[derive(Clone, Debug)]
enum Cuts {
    /// Every byte on its own (only used on short streams).
    EveryByte,
    /// Cut at these positions (each taken modulo the stream length + 1).
    At(Vec<Index>),
    /// Chunks of this size, like a reader with a small buffer.
    Every(usize),
}

fn cuts() -> impl Strategy<Value = Cuts> {
    prop_oneof![
        1 => Just(Cuts::EveryByte),
        4 => prop::collection::vec(any::<Index>(), 0..48).prop_map(Cuts::At),
        2 => prop::sample::select(vec![1usize, 2, 3, 7, 13, 125, 131, 4096, 16384]).prop_map(Cuts::Every),
    ]
}

/// Splits `bytes` into chunks; no chunk is empty, and together they are `bytes`.
fn chunks<'a>(bytes: &'a [u8], cuts: &Cuts) -> Vec<&'a [u8]> {
    let n = bytes.len();
    let mut points: Vec<usize> = match cuts {
        // Byte by byte is quadratic in the pump model; keep it to short streams and
        // fall back to small chunks on long ones.
        Cuts::EveryByte if n <= 4096 => (1..n).collect(),
        Cuts::EveryByte => (1..n).step_by(7).collect(),
        Cuts::At(ix) => ix.iter().map(|i| i.index(n + 1)).collect(),
        Cuts::Every(size) => (*size..n).step_by(*size).collect(),
    };
    points.push(0);
    points.push(n);
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| &bytes[w[0]..w[1]])
        .filter(|c| !c.is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Driving the scanner the way the pump does
// ---------------------------------------------------------------------------------------

/// A frame as the scanner delimited it.
#[derive(Debug, PartialEq, Eq)]
struct Found {
    /// Offset of its first byte in the stream.
    start: usize,
    /// Header and payload bytes.
    len: usize,
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload_len: u64,
    header_len: usize,
}

/// Feeds `chunks` to `scanner` like the pump: returns the frames found, or the error and
/// the offset it was reported at. Panics if the scanner breaks one of the pump's
/// assumptions (no progress, a step longer than the buffer, a boundary that is wrong).
fn drive(scanner: &mut Scanner, chunks: &[&[u8]]) -> (Vec<Found>, Option<(usize, FrameError)>) {
    let mut buf: Vec<u8> = Vec::new();
    // Stream offset of buf[0].
    let mut base = 0usize;
    let mut found: Vec<Found> = Vec::new();
    // Stream offset where the current data frame ends, while it is being passed on.
    let mut data_end: Option<usize> = None;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        let mut at = 0usize;
        loop {
            let tail = &buf[at..];
            let step = match scanner.step(tail) {
                Ok(s) => s,
                Err(e) => return (found, Some((base + at, e))),
            };
            match step {
                Step::NeedMore => {
                    // With bytes to look at, NeedMore is only for an incomplete header or
                    // control frame, never inside a data frame's payload.
                    assert!(
                        tail.is_empty() || scanner.at_boundary(),
                        "NeedMore inside a data frame at {}",
                        base + at
                    );
                    break;
                }
                Step::Data { len, new_frame } => {
                    assert!(
                        len > 0 && len <= tail.len(),
                        "Data len {len} of {}",
                        tail.len()
                    );
                    let pos = base + at;
                    if new_frame {
                        assert!(data_end.is_none(), "new data frame inside one at {pos}");
                        // The scanner gives no header for data; the test reads it.
                        let h = Header::parse(tail).unwrap().unwrap();
                        assert!(
                            len >= h.header_len,
                            "a new frame's first step holds its header"
                        );
                        let flen = h.header_len + usize::try_from(h.payload_len).unwrap();
                        found.push(Found {
                            start: pos,
                            len: flen,
                            fin: h.fin,
                            rsv: h.rsv,
                            opcode: opcode_bits(h.opcode),
                            masked: h.mask.is_some(),
                            payload_len: h.payload_len,
                            header_len: h.header_len,
                        });
                        data_end = Some(pos + flen);
                    } else {
                        assert!(
                            data_end.is_some(),
                            "continued data with no frame open at {pos}"
                        );
                    }
                    let end = data_end.unwrap();
                    assert!(pos + len <= end, "a Data step crossed its frame's end");
                    at += len;
                    let done = base + at == end;
                    assert_eq!(scanner.at_boundary(), done, "at_boundary at {}", base + at);
                    if done {
                        data_end = None;
                    }
                }
                Step::Control { header, len } => {
                    assert!(
                        data_end.is_none(),
                        "control frame inside a data frame's bytes"
                    );
                    assert!(len <= tail.len() && len <= 2 + 4 + 125);
                    assert_eq!(len, header.header_len + header.payload_len as usize);
                    assert!(scanner.at_boundary());
                    found.push(Found {
                        start: base + at,
                        len,
                        fin: header.fin,
                        rsv: header.rsv,
                        opcode: opcode_bits(header.opcode),
                        masked: header.mask.is_some(),
                        payload_len: header.payload_len,
                        header_len: header.header_len,
                    });
                    at += len;
                }
            }
        }
        buf.drain(..at);
        base += at;
    }
    (found, None)
}

/// The reference: tungstenite's header parser walking the same stream.
fn reference(stream: &[u8]) -> Vec<Found> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < stream.len() {
        let mut cur = Cursor::new(&stream[pos..]);
        let (h, payload_len) = FrameHeader::parse(&mut cur)
            .expect("reference rejects a generated frame")
            .expect("reference finds a truncated frame");
        let header_len = usize::try_from(cur.position()).unwrap();
        let len = header_len + usize::try_from(payload_len).unwrap();
        out.push(Found {
            start: pos,
            len,
            fin: h.is_final,
            rsv: (u8::from(h.rsv1) << 2) | (u8::from(h.rsv2) << 1) | u8::from(h.rsv3),
            opcode: u8::from(h.opcode),
            masked: h.mask.is_some(),
            payload_len,
            header_len,
        });
        pos += len;
    }
    out
}

fn sender() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Client), Just(Side::Backend)]
}

fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c
}

proptest! {
    #![proptest_config(config(256))]

    /// Valid frames, split anywhere: the scanner finds exactly the frames tungstenite
    /// finds (offsets, lengths, opcode, FIN, RSV, mask, payload length), in order, never
    /// errs, ends at a boundary, and `at_boundary` is true exactly between frames.
    #[test]
    fn scanner_matches_reference_on_valid_streams(
        sender in sender(),
        rsv1 in any::<bool>(),
        draws in prop::collection::vec(draw(), 0..12),
        keys in prop::collection::vec(any::<u32>(), 1..4),
        cuts in cuts(),
    ) {
        let frames = valid_sequence(sender, rsv1, &draws, &keys);
        let mut stream = Vec::new();
        for f in &frames {
            f.encode_into(&mut stream);
        }
        let chunks = chunks(&stream, &cuts);
        let mut scanner = Scanner::new(sender, if rsv1 { RSV1 } else { 0 }, None);
        let (found, err) = drive(&mut scanner, &chunks);
        prop_assert_eq!(err, None);
        prop_assert!(scanner.at_boundary());

        let expected = reference(&stream);
        prop_assert_eq!(&found, &expected);
        // And the generator meant what the reference read.
        prop_assert_eq!(expected.len(), frames.len());
        for (e, f) in expected.iter().zip(&frames) {
            prop_assert_eq!(
                (e.opcode, e.fin, e.rsv, e.masked, e.payload_len, e.header_len),
                (f.opcode, f.fin, f.rsv, f.mask.is_some(), f.payload_len as u64, f.header_len())
            );
        }
    }

    /// The same valid streams with a few bytes overwritten: the scanner never panics,
    /// never stalls, and agrees with the reference on every frame before its first error.
    #[test]
    fn scanner_agrees_with_reference_up_to_a_corruption(
        sender in sender(),
        rsv_allowed in prop::sample::select(vec![0u8, RSV1, 0b111]),
        max in prop::option::of(0u64..70_000),
        draws in prop::collection::vec(draw(), 1..8),
        keys in prop::collection::vec(any::<u32>(), 1..4),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        cuts in cuts(),
    ) {
        let frames = valid_sequence(sender, rsv_allowed & RSV1 != 0, &draws, &keys);
        let mut stream = Vec::new();
        for f in &frames {
            f.encode_into(&mut stream);
        }
        for (i, b) in &flips {
            let at = i.index(stream.len());
            stream[at] = *b;
        }
        let chunks = chunks(&stream, &cuts);
        let mut scanner = Scanner::new(sender, rsv_allowed, max);
        let (found, _err) = drive(&mut scanner, &chunks);
        // Every frame the scanner delimited is the one the reference reads there.
        let mut pos = 0;
        for f in &found {
            prop_assert_eq!(f.start, pos);
            let mut cur = Cursor::new(&stream[pos..]);
            let parsed = FrameHeader::parse(&mut cur);
            let Ok(Some((h, payload_len))) = parsed else {
                return Err(TestCaseError::fail(format!("reference rejects {f:?}: {parsed:?}")));
            };
            prop_assert_eq!(
                (f.opcode, f.fin, f.masked, f.payload_len, f.header_len),
                (u8::from(h.opcode), h.is_final, h.mask.is_some(), payload_len, cur.position() as usize)
            );
            pos += f.len;
        }
    }

    /// Arbitrary bytes split arbitrarily, from either side, with any extension bits
    /// and size limit: the scanner never panics and never stalls (any result is fine).
    #[test]
    fn scanner_never_panics_on_arbitrary_bytes(
        sender in sender(),
        rsv_allowed in prop::sample::select(vec![0u8, RSV1, 0b111]),
        max in prop::option::of(any::<u64>()),
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in cuts(),
    ) {
        let chunks = chunks(&bytes, &cuts);
        let mut scanner = Scanner::new(sender, rsv_allowed, max);
        let _ = drive(&mut scanner, &chunks);
    }

    /// Arbitrary bytes behind a valid first header, so that arbitrary data runs through
    /// the "payload still to come" path and the headers after it are arbitrary.
    #[test]
    fn scanner_never_panics_on_arbitrary_payloads(
        sender in sender(),
        len in data_len(),
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
        cuts in cuts(),
    ) {
        let mut stream = Vec::new();
        FrameSpec {
            fin: true,
            rsv: 0,
            opcode: BINARY,
            mask: (sender == Side::Client).then_some([1, 2, 3, 4]),
            payload_len: len.min(200),
            fill: 0,
        }
        .encode_into(&mut stream);
        stream.extend_from_slice(&bytes);
        let chunks = chunks(&stream, &cuts);
        let mut scanner = Scanner::new(sender, 0, None);
        let (found, _) = drive(&mut scanner, &chunks);
        prop_assert!(!found.is_empty());
    }

    /// Every strict prefix of a valid header (any FIN/RSV/opcode, masked or not, every
    /// length encoding up to 2^63 - 1) is incomplete, never an error; the whole header
    /// parses to what was encoded, the same with extra bytes behind it.
    #[test]
    fn header_prefixes_are_incomplete_never_errors(
        fin in any::<bool>(),
        rsv in 0u8..8,
        opcode in prop::sample::select(vec![CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG]),
        mask in prop::option::of(any::<[u8; 4]>()),
        payload_len in prop_oneof![
            0u64..=125,
            126u64..=0xFFFF,
            0x1_0000u64..=(u64::MAX >> 1),
            Just(u64::MAX >> 1),
        ],
        trailer in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut h = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload_len {
            n @ 0..=125 => h.push(m | n as u8),
            n @ 126..=0xFFFF => {
                h.push(m | 126);
                h.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                h.push(m | 127);
                h.extend_from_slice(&n.to_be_bytes());
            }
        }
        if let Some(k) = mask {
            h.extend_from_slice(&k);
        }
        for cut in 0..h.len() {
            prop_assert_eq!(Header::parse(&h[..cut]), Ok(None), "prefix of {} bytes", cut);
        }
        let parsed = Header::parse(&h).unwrap().unwrap();
        prop_assert_eq!(
            (parsed.fin, parsed.rsv, opcode_bits(parsed.opcode), parsed.mask, parsed.payload_len, parsed.header_len),
            (fin, rsv, opcode, mask, payload_len, h.len())
        );
        let mut longer = h.clone();
        longer.extend_from_slice(&trailer);
        prop_assert_eq!(Header::parse(&longer), Ok(Some(parsed)));
    }

    /// Differential: on any 0-16 bytes, wsgate's header parser and tungstenite's agree.
    /// Where tungstenite finds a complete header, wsgate finds the same one, or rejects a
    /// reserved opcode or a 64-bit length with its top bit set (which tungstenite
    /// accepts); where tungstenite needs more bytes, wsgate never returns a header.
    #[test]
    fn header_parse_agrees_with_tungstenite(bytes in prop::collection::vec(any::<u8>(), 0..16)) {
        let ours = Header::parse(&bytes);
        let mut cur = Cursor::new(&bytes[..]);
        match FrameHeader::parse(&mut cur) {
            Ok(Some((h, payload_len))) => match ours {
                Ok(Some(o)) => prop_assert_eq!(
                    (o.fin, o.rsv, opcode_bits(o.opcode), o.mask, o.payload_len, o.header_len),
                    (
                        h.is_final,
                        (u8::from(h.rsv1) << 2) | (u8::from(h.rsv2) << 1) | u8::from(h.rsv3),
                        u8::from(h.opcode),
                        h.mask,
                        payload_len,
                        cur.position() as usize
                    )
                ),
                Err(FrameError::LengthOverflow) => prop_assert!(payload_len >> 63 != 0),
                other => return Err(TestCaseError::fail(format!("tungstenite: {h:?} {payload_len}; wsgate: {other:?}"))),
            },
            Ok(None) => prop_assert!(!matches!(ours, Ok(Some(_))), "wsgate: {:?}", ours),
            Err(_) => prop_assert!(
                matches!(ours, Err(FrameError::ReservedOpcode(_)) | Ok(None)),
                "wsgate: {:?}", ours
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The handshake check
// ---------------------------------------------------------------------------------------

/// Bytes a `HeaderValue` accepts (visible ASCII, space, tab, obs-text), biased toward
/// the characters handshake headers are made of.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![
        4 => prop::sample::select(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/=,; 13".to_vec()),
        1 => 0x20u8..0x7F,
        1 => 0x80u8..=0xFF,
        1 => Just(b'\t'),
    ];
    prop_oneof![
        3 => prop::collection::vec(byte, 0..40),
        1 => prop::sample::select(vec![
            b"13".to_vec(),
            b"8".to_vec(),
            b" 13 ".to_vec(),
            b"dGhlIHNhbXBsZSBub25jZQ==".to_vec(),
            b"dGhlIHNhbXBsZSBub25jZQ=".to_vec(),
            b"dGhlIHNhbXBsZSBub25jZQ==\xff".to_vec(),
            b"\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9==".to_vec(),
            b"Upgrade".to_vec(),
            b"keep-alive, Upgrade".to_vec(),
            b"websocket".to_vec(),
            b"WebSocket, h2c".to_vec(),
            b",,,".to_vec(),
            b"".to_vec(),
        ]),
    ]
    .prop_filter_map("not a valid header value", |v| HeaderValue::from_bytes(&v).ok())
}

fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "connection",
            "upgrade",
            "sec-websocket-version",
            "sec-websocket-key",
            "sec-websocket-extensions",
            "sec-websocket-protocol",
            "origin",
            "host",
        ])
        .prop_map(HeaderName::from_static),
        1 => "[a-z][a-z0-9-]{0,20}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// `validate` and `is_websocket_upgrade` never panic, whatever the method, version,
    /// `:protocol` (RFC 8441 extended CONNECT) and header values (repeated headers
    /// included). When `validate` accepts, the request really is either an extended
    /// CONNECT for `websocket` with version 13, or a GET over HTTP/1.1+ with version 13
    /// and one well-formed key.
    #[test]
    fn handshake_checks_never_panic(
        method in prop_oneof![
            4 => Just(Method::GET),
            2 => Just(Method::CONNECT),
            1 => prop::sample::select(vec![Method::POST, Method::HEAD, Method::OPTIONS]),
            1 => "[A-Z]{1,10}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
        ],
        version in prop::sample::select(vec![
            Version::HTTP_09, Version::HTTP_10, Version::HTTP_11, Version::HTTP_2, Version::HTTP_3,
        ]),
        protocol in prop::option::of(prop_oneof![
            3 => Just("websocket".to_string()),
            1 => Just("WebSocket".to_string()),
            1 => "[a-z0-9.-]{0,12}",
        ]),
        base in any::<bool>(),
        headers in prop::collection::vec((header_name(), header_value()), 0..10),
    ) {
        let mut b = Request::builder().method(method.clone()).version(version).uri("/ws");
        if base {
            // Start from a valid handshake so that the arbitrary headers mostly add to it.
            b = b
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        }
        for (n, v) in &headers {
            b = b.header(n.clone(), v.clone());
        }
        if let Some(p) = &protocol {
            b = b.extension(hyper::ext::Protocol::from(p.as_str()));
        }
        let req = b.body(()).unwrap();
        let _ = wsgate::upgrade::is_websocket_upgrade(&req);
        if wsgate::upgrade::validate(&req).is_ok() {
            let h = req.headers();
            prop_assert_eq!(h.get("sec-websocket-version").unwrap().as_bytes(), b"13");
            let extended_connect = method == Method::CONNECT
                && protocol.is_some_and(|p| p.eq_ignore_ascii_case("websocket"));
            if !extended_connect {
                prop_assert_eq!(req.method(), Method::GET);
                prop_assert!(req.version() >= Version::HTTP_11);
                let keys: Vec<_> = h.get_all("sec-websocket-key").iter().collect();
                prop_assert_eq!(keys.len(), 1);
                prop_assert_eq!(keys[0].len(), 24);
            }
        }
    }
}

/// RSV bits no extension allows are an error on a data frame; RSV1 is fine once allowed.
#[test]
fn rsv_bits_follow_the_negotiated_extensions() {
    for rsv in 1u8..8 {
        let frame = [0x80 | (rsv << 4) | BINARY, 0];
        let mut s = Scanner::new(Side::Backend, 0, None);
        assert_eq!(s.step(&frame), Err(FrameError::UnexpectedRsv(rsv)));
        let mut s = Scanner::new(Side::Backend, RSV1, None);
        let r = s.step(&frame);
        if rsv == RSV1 {
            assert_eq!(
                r,
                Ok(Step::Data {
                    len: 2,
                    new_frame: true
                })
            );
        } else {
            assert_eq!(r, Err(FrameError::UnexpectedRsv(rsv)));
        }
    }
}
