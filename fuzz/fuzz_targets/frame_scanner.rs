//! Arbitrary bytes through the frame scanner, from both sides, read in chunks the way
//! the pump reads them. The first input byte picks the read size, the RSV bits the
//! negotiated extensions allow, and whether a frame size limit applies.
//!
//! Checked: no panic; every step moves the stream forward within the bytes it was
//! given; `NeedMore` never stops a data payload; every frame the scanner delimits starts
//! with a header that tungstenite's parser reads the same way.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::frame::FrameHeader;
use wsgate::frame::{FrameError, Header, RSV1, Scanner, Step};
use wsgate::Side;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let chunk = match usize::from(ctl & 0x1F) {
        0 => bytes.len().max(1),
        n => n,
    };
    let rsv = [0, RSV1, 0b111, RSV1][usize::from((ctl >> 5) & 3)];
    let max = (ctl & 0x80 != 0).then_some(1000);
    for side in [Side::Client, Side::Backend] {
        drive(Scanner::new(side, rsv, max), bytes, chunk);
    }
    same_header_as_tungstenite(bytes);
});

/// The pump's loop: a buffer of unconsumed bytes, `step` on it, consume what it says.
fn drive(mut scanner: Scanner, bytes: &[u8], chunk: usize) {
    let mut buf: Vec<u8> = Vec::new();
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        let mut at = 0;
        loop {
            let tail = &buf[at..];
            let boundary = scanner.at_boundary();
            match scanner.step(tail) {
                Err(_) => return,
                Ok(Step::NeedMore) => {
                    assert!(
                        tail.is_empty() || scanner.at_boundary(),
                        "NeedMore mid-frame"
                    );
                    break;
                }
                Ok(Step::Data { len, new_frame }) => {
                    assert!(len > 0 && len <= tail.len(), "Data {len} of {}", tail.len());
                    assert_eq!(
                        new_frame, boundary,
                        "a new frame starts exactly at a boundary"
                    );
                    if new_frame {
                        let h = Header::parse(tail).unwrap().unwrap();
                        assert!(len >= h.header_len);
                        same_header_as_tungstenite(tail);
                    }
                    at += len;
                }
                Ok(Step::Control { header, len }) => {
                    assert!(boundary);
                    assert!(len <= tail.len() && len <= 6 + 125);
                    assert_eq!(len, header.header_len + header.payload_len as usize);
                    assert_eq!(Header::parse(tail), Ok(Some(header)));
                    same_header_as_tungstenite(tail);
                    at += len;
                }
            }
        }
        buf.drain(..at);
    }
}

/// wsgate's header parser and tungstenite's agree on the header at the start of `bytes`.
fn same_header_as_tungstenite(bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(14)];
    let ours = Header::parse(bytes);
    let mut cur = Cursor::new(bytes);
    match FrameHeader::parse(&mut cur) {
        Ok(Some((h, payload_len))) => match ours {
            Ok(Some(o)) => {
                let rsv = (u8::from(h.rsv1) << 2) | (u8::from(h.rsv2) << 1) | u8::from(h.rsv3);
                assert_eq!(o.fin, h.is_final);
                assert_eq!(o.rsv, rsv);
                assert_eq!(o.mask, h.mask);
                assert_eq!(o.payload_len, payload_len);
                assert_eq!(o.header_len as u64, cur.position());
                let op: u8 = h.opcode.into();
                assert_eq!(opcode_bits(o.opcode), op);
            }
            // tungstenite accepts a 64-bit length with its top bit set; RFC 6455 does not.
            Err(FrameError::LengthOverflow) => assert!(payload_len >> 63 != 0),
            other => panic!("tungstenite {h:?} {payload_len}, wsgate {other:?}"),
        },
        Ok(None) => assert!(!matches!(ours, Ok(Some(_))), "wsgate {ours:?}"),
        // tungstenite rejects reserved opcodes only once the header is whole.
        Err(_) => assert!(matches!(
            ours,
            Err(FrameError::ReservedOpcode(_)) | Ok(None)
        )),
    }
}

fn opcode_bits(op: wsgate::frame::Opcode) -> u8 {
    use wsgate::frame::Opcode::*;
    match op {
        Continuation => 0x0,
        Text => 0x1,
        Binary => 0x2,
        Close => 0x8,
        Ping => 0x9,
        Pong => 0xA,
    }
}
