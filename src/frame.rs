//! WebSocket framing (RFC 6455 §5): just enough to find frame boundaries in a byte
//! stream that is forwarded unchanged, to read the few control frames wsgate must
//! understand, and to write the few frames wsgate makes itself.
//!
//! The relay never reassembles messages and never unmasks data payloads: the
//! [`Scanner`] walks the stream header by header and tells the pump how many bytes it
//! may pass on. Only control frames (at most 131 bytes) are held whole, because their
//! payload decides what happens to them (a Close code, a Pong answering wsgate's Ping).

use crate::side::Side;

/// Largest payload a control frame may carry (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest header a control frame can have: 2 bytes plus a 4-byte mask key (the
/// payload length always fits the 7-bit field).
const MAX_CONTROL_HEADER: usize = 6;

/// RSV1, the bit permessage-deflate (RFC 7692) sets on compressed messages.
pub const RSV1: u8 = 0b100;

/// What the WebSocket handshake negotiated that changes how frames are checked.
#[derive(Clone, Copy, Debug, Default)]
pub struct Negotiated {
    /// RSV bits the negotiated extensions may set.
    pub rsv_allowed: u8,
}

impl Negotiated {
    /// Reads `Sec-WebSocket-Extensions` from the backend's 101 response.
    pub fn from_extensions<'a>(values: impl Iterator<Item = &'a str>) -> Self {
        let mut rsv_allowed = 0;
        for ext in values.flat_map(|v| v.split(',')) {
            let name = ext.split(';').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            rsv_allowed |= if name.eq_ignore_ascii_case("permessage-deflate") {
                RSV1
            } else {
                // An extension wsgate does not know may use any RSV bit.
                0b111
            };
        }
        Negotiated { rsv_allowed }
    }
}

/// Frame opcodes (RFC 6455 §5.2). Reserved values are rejected by the scanner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// The opcode's value on the wire.
    pub fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Control frames (Close, Ping, Pong) may interleave with a fragmented message.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Final fragment of a message.
    pub fin: bool,
    /// The three RSV bits, RSV1 in bit 2.
    pub rsv: u8,
    pub opcode: Opcode,
    /// Masking key, present on every client frame and on no backend frame.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// Length of the header itself in bytes (2 to 14).
    pub header_len: usize,
}

impl Header {
    /// Parses a header from the start of `buf`; `Ok(None)` means more bytes are needed.
    ///
    /// Only the encoding is checked here; who may send what is the [`Scanner`]'s job.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, FrameError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::ReservedOpcode(b0 & 0x0F))?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, len_bytes) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let mut be = [0u8; 8];
                    be.copy_from_slice(b);
                    let len = u64::from_be_bytes(be);
                    if len >> 63 != 0 {
                        return Err(FrameError::LengthOverflow);
                    }
                    (len, 8)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 0),
        };
        let mask_at = 2 + len_bytes;
        let mask = if masked {
            match buf.get(mask_at..mask_at + 4) {
                Some(k) => Some([k[0], k[1], k[2], k[3]]),
                None => return Ok(None),
            }
        } else {
            None
        };
        Ok(Some(Header {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0b111,
            opcode,
            mask,
            payload_len,
            header_len: mask_at + if masked { 4 } else { 0 },
        }))
    }
}

/// Why a byte stream is not valid WebSocket framing from its sender. Each variant makes
/// wsgate fail the connection toward that sender with [`FrameError::close_code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Opcodes 0x3-0x7 and 0xB-0xF are reserved (RFC 6455 §5.2).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// Every client frame must be masked (RFC 6455 §5.1).
    #[error("unmasked frame from the client")]
    UnmaskedClientFrame,
    /// No server frame may be masked (RFC 6455 §5.1).
    #[error("masked frame from the backend")]
    MaskedBackendFrame,
    /// A 64-bit length with its most significant bit set.
    #[error("payload length overflows 63 bits")]
    LengthOverflow,
    /// Control frames carry at most 125 bytes and are never fragmented (RFC 6455 §5.5).
    #[error("control frame longer than 125 bytes or fragmented")]
    BadControlFrame,
    /// A Close payload of exactly one byte cannot hold a status code (RFC 6455 §5.5.1).
    #[error("close frame with a one-byte payload")]
    BadClosePayload,
    /// RSV bits set that no negotiated extension defines (RFC 6455 §5.2).
    #[error("reserved bits {0:#05b} set without a negotiated extension")]
    UnexpectedRsv(u8),
    /// A continuation frame with no message to continue, or a new data frame inside a
    /// fragmented message (RFC 6455 §5.4).
    #[error("fragmentation out of sequence")]
    BadFragmentation,
    /// A frame larger than the configured `websocket.max_frame_size`.
    #[error("frame of {0} bytes exceeds max_frame_size")]
    TooLarge(u64),
}

impl FrameError {
    /// The Close code that tells the sender what it did wrong (RFC 6455 §7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::TooLarge(_) => 1009,
            _ => 1002,
        }
    }
}

/// What [`Scanner::step`] found at the start of the bytes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The first `len` bytes belong to data frames (a header, payload, or both) and can be
    /// passed on as they are. `new_frame` says a data frame header starts these bytes.
    Data { len: usize, new_frame: bool },
    /// A whole control frame of `len` bytes (header and payload) starts the bytes.
    Control { header: Header, len: usize },
    /// The bytes end inside a header or a control frame: read more.
    NeedMore,
}

/// Tracks frame boundaries in one direction of a WebSocket byte stream.
#[derive(Clone, Debug)]
pub struct Scanner {
    /// Who sends this stream: client frames must be masked, backend frames must not.
    sender: Side,
    /// RSV bits the negotiated extensions allow (RSV1 for permessage-deflate; all of them
    /// when an extension wsgate does not know was negotiated).
    rsv_allowed: u8,
    /// Largest data frame payload accepted; `None` for no limit.
    max_frame_size: Option<u64>,
    /// Payload bytes of the current data frame still to come.
    remaining: u64,
    /// Inside a fragmented data message (a non-final data frame was seen).
    in_message: bool,
}

impl Scanner {
    pub fn new(sender: Side, rsv_allowed: u8, max_frame_size: Option<u64>) -> Self {
        Scanner {
            sender,
            rsv_allowed,
            max_frame_size,
            remaining: 0,
            in_message: false,
        }
    }

    /// True between frames: nothing of a frame has been passed on without the rest of it.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Payload bytes of the current data frame not seen yet.
    pub fn payload_remaining(&self) -> u64 {
        self.remaining
    }

    /// `n` bytes of the current data frame's payload passed without being seen (they
    /// were spliced); `n` is at most [`Scanner::payload_remaining`].
    pub fn skip_payload(&mut self, n: u64) {
        debug_assert!(n <= self.remaining, "skipping past the frame");
        self.remaining -= n.min(self.remaining);
    }

    /// Classifies the start of `buf`. Data bytes are consumed by the scanner when it
    /// returns [`Step::Data`]; a [`Step::Control`] frame is consumed by the same call.
    pub fn step(&mut self, buf: &[u8]) -> Result<Step, FrameError> {
        if buf.is_empty() {
            return Ok(Step::NeedMore);
        }
        if self.remaining > 0 {
            let len = usize::try_from(self.remaining).map_or(buf.len(), |r| r.min(buf.len()));
            self.remaining -= len as u64;
            return Ok(Step::Data {
                len,
                new_frame: false,
            });
        }
        let Some(header) = Header::parse(buf)? else {
            return Ok(Step::NeedMore);
        };
        self.check(&header)?;
        if header.opcode.is_control() {
            // `check` bounded the payload to 125 bytes.
            let len = header.header_len + header.payload_len as usize;
            if buf.len() < len {
                return Ok(Step::NeedMore);
            }
            return Ok(Step::Control { header, len });
        }
        self.in_message = !header.fin;
        let in_buf = (buf.len() - header.header_len) as u64;
        let taken = header.payload_len.min(in_buf);
        self.remaining = header.payload_len - taken;
        Ok(Step::Data {
            len: header.header_len + taken as usize,
            new_frame: true,
        })
    }

    fn check(&self, h: &Header) -> Result<(), FrameError> {
        match (self.sender, h.mask.is_some()) {
            (Side::Client, false) => return Err(FrameError::UnmaskedClientFrame),
            (Side::Backend, true) => return Err(FrameError::MaskedBackendFrame),
            _ => {}
        }
        if h.opcode.is_control() {
            if !h.fin || h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(FrameError::BadControlFrame);
            }
            if h.opcode == Opcode::Close && h.payload_len == 1 {
                return Err(FrameError::BadClosePayload);
            }
            // Extensions define no RSV use on control frames.
            if h.rsv != 0 {
                return Err(FrameError::UnexpectedRsv(h.rsv));
            }
            return Ok(());
        }
        if h.rsv & !self.rsv_allowed != 0 {
            return Err(FrameError::UnexpectedRsv(h.rsv));
        }
        let continuation = h.opcode == Opcode::Continuation;
        if continuation != self.in_message {
            return Err(FrameError::BadFragmentation);
        }
        if let Some(max) = self.max_frame_size
            && h.payload_len > max
        {
            return Err(FrameError::TooLarge(h.payload_len));
        }
        Ok(())
    }
}

/// XORs `data` with the masking key (RFC 6455 §5.3); masking and unmasking are the same.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// A control frame's payload, unmasked, copied out of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlPayload {
    len: u8,
    bytes: [u8; MAX_CONTROL_PAYLOAD],
}

impl ControlPayload {
    /// Copies and unmasks the payload of the control frame `frame` described by `header`.
    pub fn from_frame(header: &Header, frame: &[u8]) -> Self {
        let mut bytes = [0u8; MAX_CONTROL_PAYLOAD];
        let payload = &frame[header.header_len..];
        let len = payload.len().min(MAX_CONTROL_PAYLOAD);
        bytes[..len].copy_from_slice(&payload[..len]);
        if let Some(key) = header.mask {
            apply_mask(&mut bytes[..len], key);
        }
        ControlPayload {
            len: len as u8,
            bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The status code of a Close payload; `None` when the Close carries none.
    pub fn close_code(&self) -> Option<u16> {
        match self.as_bytes() {
            [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }
}

/// Encodes a frame made by wsgate itself: masked with a fresh random key when it goes to
/// the backend (wsgate is its client), unmasked toward the client (RFC 6455 §5.1).
pub fn encode(to: Side, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
    let len = payload.len().min(MAX_CONTROL_PAYLOAD);
    let mut out = Vec::with_capacity(MAX_CONTROL_HEADER + len);
    out.push(0x80 | opcode.bits());
    match to {
        Side::Client => {
            out.push(len as u8);
            out.extend_from_slice(&payload[..len]);
        }
        Side::Backend => {
            let key: [u8; 4] = rand::random();
            out.push(0x80 | len as u8);
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(&payload[..len]);
            apply_mask(&mut out[start..], key);
        }
    }
    out
}

/// Encodes a Close frame with `code` and a short `reason` (truncated to fit 125 bytes).
pub fn encode_close(to: Side, code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(MAX_CONTROL_PAYLOAD);
    payload.extend_from_slice(&code.to_be_bytes());
    let room = MAX_CONTROL_PAYLOAD - 2;
    // Cut on a char boundary so the reason stays valid UTF-8 (RFC 6455 §5.5.1).
    let mut cut = reason.len().min(room);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(to, Opcode::Close, &payload)
}

/// The payload of wsgate's liveness Ping number `seq`: a recognisable prefix, then the
/// number, so that its Pong can be told from an application's.
pub fn liveness_ping(seq: u64) -> [u8; 16] {
    let mut payload = [0u8; 16];
    payload[..8].copy_from_slice(LIVENESS_PREFIX);
    payload[8..].copy_from_slice(&seq.to_be_bytes());
    payload
}

/// The number of the liveness Ping whose payload a Pong echoes, if it has that shape.
pub fn liveness_seq(pong_payload: &[u8]) -> Option<u64> {
    let rest = pong_payload.strip_prefix(LIVENESS_PREFIX)?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// Prefix of wsgate's liveness Ping payloads.
const LIVENESS_PREFIX: &[u8; 8] = b"wsgate:p";

/// True for codes an endpoint may put in a Close frame (RFC 6455 §7.4). 1005, 1006 and
/// 1015 are reserved for reporting and must never be sent.
pub fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_pings_carry_their_number() {
        assert_eq!(liveness_seq(&liveness_ping(42)), Some(42));
        assert_eq!(&liveness_ping(1)[..8], b"wsgate:p");
        assert_eq!(liveness_seq(b"wsgate:p"), None);
        assert_eq!(liveness_seq(b"application pong"), None);
    }

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1, 2, 3, 4];
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        let mut p = payload.to_vec();
        apply_mask(&mut p, key);
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn parses_all_three_length_encodings() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let f = client_frame(true, 2, &vec![7u8; len]);
            let h = Header::parse(&f).unwrap().unwrap();
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(h.header_len + len, f.len());
            assert_eq!(h.mask, Some([1, 2, 3, 4]));
            // Every strict prefix of the header is incomplete, never an error.
            for cut in 0..h.header_len {
                assert_eq!(Header::parse(&f[..cut]), Ok(None));
            }
        }
    }

    #[test]
    fn data_frames_pass_in_pieces_and_boundaries_are_tracked() {
        let mut s = Scanner::new(Side::Client, 0, None);
        let f = client_frame(true, 1, b"hello world");
        assert_eq!(s.step(&f[..3]), Ok(Step::NeedMore));
        assert_eq!(
            s.step(&f[..8]),
            Ok(Step::Data {
                len: 8,
                new_frame: true
            })
        );
        assert!(!s.at_boundary());
        assert_eq!(
            s.step(&f[8..]),
            Ok(Step::Data {
                len: f.len() - 8,
                new_frame: false
            })
        );
        assert!(s.at_boundary());
    }

    #[test]
    fn control_frames_are_returned_whole() {
        let mut s = Scanner::new(Side::Client, 0, None);
        let f = client_frame(true, 8, &[0x03, 0xE8, b'b', b'y', b'e']);
        assert_eq!(s.step(&f[..f.len() - 1]), Ok(Step::NeedMore));
        let Ok(Step::Control { header, len }) = s.step(&f) else {
            panic!("expected a control frame")
        };
        assert_eq!(len, f.len());
        let p = ControlPayload::from_frame(&header, &f);
        assert_eq!(p.close_code(), Some(1000));
        assert_eq!(&p.as_bytes()[2..], b"bye");
    }

    #[test]
    fn rejects_what_rfc6455_forbids() {
        let mut s = Scanner::new(Side::Client, 0, None);
        let mut unmasked = vec![0x81, 0x01, b'x'];
        assert_eq!(s.step(&unmasked), Err(FrameError::UnmaskedClientFrame));
        let mut b = Scanner::new(Side::Backend, 0, None);
        assert_eq!(
            b.step(&client_frame(true, 1, b"x")),
            Err(FrameError::MaskedBackendFrame)
        );
        assert_eq!(b.step(&[0x83, 0x00]), Err(FrameError::ReservedOpcode(3)));
        assert_eq!(b.step(&[0x09, 0x00]), Err(FrameError::BadControlFrame));
        assert_eq!(
            b.step(&[0x89, 126, 0, 126]),
            Err(FrameError::BadControlFrame)
        );
        assert_eq!(
            b.step(&[0x88, 0x01, 0x03]),
            Err(FrameError::BadClosePayload)
        );
        assert_eq!(b.step(&[0xC1, 0x00]), Err(FrameError::UnexpectedRsv(RSV1)));
        assert_eq!(b.step(&[0x80, 0x00]), Err(FrameError::BadFragmentation));
        unmasked[0] = 0x01; // a first fragment, then a new text frame inside it
        let mut b = Scanner::new(Side::Backend, 0, None);
        assert!(b.step(&unmasked).is_ok());
        assert_eq!(b.step(&[0x81, 0x00]), Err(FrameError::BadFragmentation));
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(b.step(&huge), Err(FrameError::LengthOverflow));
    }

    #[test]
    fn permessage_deflate_allows_rsv1_and_size_limit_gives_1009() {
        let mut s = Scanner::new(Side::Backend, RSV1, Some(4));
        assert!(s.step(&[0xC1, 0x01, 0xAA]).is_ok());
        let err = s.step(&[0x82, 0x05, 1, 2, 3, 4, 5]).unwrap_err();
        assert_eq!(err, FrameError::TooLarge(5));
        assert_eq!(err.close_code(), 1009);
    }

    #[test]
    fn encoded_frames_follow_the_masking_rule() {
        let to_client = encode_close(Side::Client, 1001, "going away");
        let h = Header::parse(&to_client).unwrap().unwrap();
        assert_eq!((h.opcode, h.mask), (Opcode::Close, None));
        assert_eq!(
            ControlPayload::from_frame(&h, &to_client).close_code(),
            Some(1001)
        );

        let to_backend = encode_close(Side::Backend, 1014, &"é".repeat(100));
        let h = Header::parse(&to_backend).unwrap().unwrap();
        assert!(h.mask.is_some() && h.payload_len <= 125);
        let p = ControlPayload::from_frame(&h, &to_backend);
        assert_eq!(p.close_code(), Some(1014));
        assert!(std::str::from_utf8(&p.as_bytes()[2..]).is_ok());
    }

    #[test]
    fn reserved_codes_are_never_sendable() {
        for code in [1005, 1006, 1015, 999, 1004, 2000, 5000] {
            assert!(!is_sendable_close_code(code), "{code}");
        }
        for code in [1000, 1001, 1002, 1009, 1011, 1014, 3000, 4999] {
            assert!(is_sendable_close_code(code), "{code}");
        }
    }
}
