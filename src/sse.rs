//! Where the events of a `text/event-stream` body begin and end (WHATWG HTML §9.2.6),
//! so that wsgate writes into one only between events: its heartbeat comment, and the
//! end of the response when a drain ends the stream cleanly.
//!
//! A pure scanner over the bytes as they pass, in pieces of any size. Lines end in CRLF,
//! LF or CR; an event ends at an empty line. The stream is at an event *boundary* when
//! nothing has passed yet, or when the last line that ended was empty: a comment line
//! or a blank line written there cannot change any event the client parses.

/// What the scanner knows of the stream so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scanner {
    /// The current line has characters.
    in_line: bool,
    /// A line with characters ended since the last empty line: an event (or a comment)
    /// is being written.
    in_event: bool,
    /// The last byte was a CR: an LF right after it belongs to the same line ending.
    after_cr: bool,
}

impl Scanner {
    pub fn new() -> Self {
        Scanner::default()
    }

    /// Between events: something inserted here cannot split one.
    pub fn at_boundary(&self) -> bool {
        !self.in_line && !self.in_event
    }

    /// Takes in `bytes`; returns the offset just past the first boundary reached within
    /// them (the end of the empty line that closes an event), if any. It jumps from line
    /// ending to line ending (`memchr`): every byte of every event passes here, and a
    /// look at each one cost more than the rest of wsgate's work on the event.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut first = None;
        // The first byte not taken in yet.
        let mut next = 0;
        for at in memchr::memchr2_iter(b'\r', b'\n', bytes) {
            if at > next {
                // Characters of the current line came before this ending.
                self.in_line = true;
                self.after_cr = false;
            }
            next = at + 1;
            let b = bytes[at];
            // The LF of a CRLF: the line already ended at the CR.
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            self.after_cr = b == b'\r';
            if self.in_line {
                self.in_line = false;
                self.in_event = true;
            } else {
                // An empty line: the event (if any) is complete. The LF of a CRLF right
                // behind belongs with it.
                self.in_event = false;
                if first.is_none() {
                    let lf = b == b'\r' && bytes.get(next) == Some(&b'\n');
                    first = Some(next + usize::from(lf));
                }
            }
        }
        if bytes.len() > next {
            self.in_line = true;
            self.after_cr = false;
        }
        first
    }
}

/// The comment line wsgate writes into a quiet event stream (and an empty line after it,
/// so the stream is at a boundary again).
pub const HEARTBEAT: &[u8] = b":\n\n";

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn boundaries_follow_empty_lines_in_every_line_ending() {
        let mut s = Scanner::new();
        assert!(s.at_boundary(), "nothing sent yet");
        assert_eq!(s.feed(b"event: row\ndata: 1\n"), None);
        assert!(!s.at_boundary());
        assert_eq!(s.feed(b"\ndata: 2"), Some(1));
        assert!(!s.at_boundary(), "the next event has begun");
        assert_eq!(s.feed(b"\r\n\r\n"), Some(4));
        assert!(s.at_boundary());
        // CR alone ends lines too; the LF of a CRLF split across pieces is one ending.
        assert_eq!(s.feed(b"data: 3\r"), None);
        assert_eq!(s.feed(b"\n"), None, "the LF of \\r\\n is no empty line");
        assert!(!s.at_boundary());
        assert_eq!(s.feed(b"\r"), Some(1));
        assert!(s.at_boundary());
        // A comment line is not an event, but wsgate still waits for its empty line.
        assert_eq!(s.feed(b": keep-alive\n"), None);
        assert!(!s.at_boundary());
        assert_eq!(s.feed(b"\n"), Some(1));
    }

    /// One event's lines, the way a server might write them.
    #[derive(Clone, Debug)]
    struct Event {
        lines: Vec<String>,
        eol: &'static str,
    }

    fn event() -> impl Strategy<Value = Event> {
        let line = prop_oneof![
            "data: [a-z0-9 {}:,\"]{0,20}".prop_map(|s| s),
            "event: [a-z]{1,8}".prop_map(|s| s),
            "id: [0-9]{1,4}".prop_map(|s| s),
            ": [a-z ]{0,10}".prop_map(|s| s),
            Just("data".to_string()),
            Just("retry: 1000".to_string()),
        ];
        (
            prop::collection::vec(line, 1..5),
            prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        )
            .prop_map(|(lines, eol)| Event { lines, eol })
    }

    fn encode(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            for l in &e.lines {
                out.extend_from_slice(l.as_bytes());
                out.extend_from_slice(e.eol.as_bytes());
            }
            out.extend_from_slice(e.eol.as_bytes());
        }
        out
    }

    /// The events a client dispatches (type, data, id), parsed as WHATWG's algorithm
    /// does: independent of the scanner.
    fn parse(stream: &[u8]) -> Vec<(String, String, String)> {
        let text = String::from_utf8_lossy(stream);
        let mut lines = Vec::new();
        let mut line = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' => {
                    if chars.peek() == Some(&'\n') {
                        chars.next();
                    }
                    lines.push(std::mem::take(&mut line));
                }
                '\n' => lines.push(std::mem::take(&mut line)),
                c => line.push(c),
            }
        }
        let (mut events, mut data, mut kind, mut id) =
            (Vec::new(), String::new(), String::new(), String::new());
        for l in lines {
            if l.is_empty() {
                if !data.is_empty() {
                    data.pop();
                    events.push((
                        std::mem::take(&mut kind),
                        std::mem::take(&mut data),
                        id.clone(),
                    ));
                }
                kind.clear();
                data.clear();
                continue;
            }
            if l.starts_with(':') {
                continue;
            }
            let (field, value) = match l.split_once(':') {
                Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                None => (l.clone(), String::new()),
            };
            match field.as_str() {
                "data" => {
                    data.push_str(&value);
                    data.push('\n');
                }
                "event" => kind = value,
                "id" => id = value,
                _ => {}
            }
        }
        events
    }

    /// The scanner's rules one byte at a time, as plainly as they can be written: the
    /// reference [`Scanner::feed`] is held to.
    fn reference_feed(s: &mut Scanner, bytes: &[u8]) -> Option<usize> {
        let mut first = None;
        for (i, &b) in bytes.iter().enumerate() {
            let after_cr = std::mem::take(&mut s.after_cr);
            match b {
                b'\n' if after_cr => {}
                b'\r' | b'\n' => {
                    s.after_cr = b == b'\r';
                    if s.in_line {
                        s.in_line = false;
                        s.in_event = true;
                    } else {
                        s.in_event = false;
                        if first.is_none() {
                            let lf = b == b'\r' && bytes.get(i + 1) == Some(&b'\n');
                            first = Some(i + 1 + usize::from(lf));
                        }
                    }
                }
                _ => s.in_line = true,
            }
        }
        first
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any bytes (line endings dense among them), cut anywhere: the same boundaries
        /// and the same state as the byte-at-a-time reference.
        #[test]
        fn feed_agrees_with_the_byte_at_a_time_reference(
            bytes in prop::collection::vec(prop::sample::select(vec![b'\r', b'\n', b'a', b':']), 0..200),
            cuts in prop::collection::vec(0usize..200, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let (mut fast, mut plain, mut at) = (Scanner::new(), Scanner::new(), 0);
            for cut in cuts {
                let piece = &bytes[at..cut];
                at = cut;
                prop_assert_eq!(fast.feed(piece), reference_feed(&mut plain, piece));
                prop_assert_eq!(fast, plain);
            }
        }

        /// Whatever the events and however the body is cut into pieces, a heartbeat
        /// written wherever the scanner says "boundary" changes no event the client
        /// sees, and a stream ended at the first boundary after some piece ends with
        /// whole events only.
        #[test]
        fn heartbeats_and_drain_ends_never_split_an_event(
            events in prop::collection::vec(event(), 1..8),
            cuts in prop::collection::vec(0usize..400, 0..12),
            beat_after in prop::collection::vec(any::<bool>(), 12),
            end_after in 0usize..12,
        ) {
            let stream = encode(&events);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            cuts.dedup();
            let mut scanner = Scanner::new();
            let (mut with_beats, mut at) = (Vec::new(), 0);
            for (i, &cut) in cuts.iter().enumerate() {
                let piece = &stream[at..cut];
                scanner.feed(piece);
                with_beats.extend_from_slice(piece);
                at = cut;
                if beat_after.get(i).copied().unwrap_or(false) && scanner.at_boundary() {
                    with_beats.extend_from_slice(HEARTBEAT);
                    scanner.feed(HEARTBEAT);
                    prop_assert!(scanner.at_boundary());
                }
            }
            prop_assert_eq!(parse(&with_beats), parse(&stream));

            // A drain asked after piece `end_after`: the body ends at the next boundary.
            let mut scanner = Scanner::new();
            let (mut ended, mut at) = (Vec::new(), 0);
            for (i, &cut) in cuts.iter().enumerate() {
                let piece = &stream[at..cut];
                at = cut;
                if i > end_after {
                    if scanner.at_boundary() {
                        break;
                    }
                    let took = scanner.feed(piece).unwrap_or(piece.len());
                    ended.extend_from_slice(&piece[..took]);
                    if took < piece.len() || scanner.at_boundary() {
                        break;
                    }
                } else {
                    scanner.feed(piece);
                    ended.extend_from_slice(piece);
                }
            }
            // Every event the cut stream has is whole, and one of the original's, in order.
            let got = parse(&ended);
            let all = parse(&stream);
            prop_assert!(got.len() <= all.len());
            prop_assert_eq!(&all[..got.len()], &got[..]);
            if scanner.at_boundary() {
                // It ended at a boundary: nothing of a next event was sent.
                let rest = &stream[ended.len()..];
                prop_assert_eq!(parse(&[&ended[..], rest].concat()), all);
            }
        }
    }
}
