//! The first request on an HTTP/1.1 connection, read and looked at by hand.
//!
//! Most connections to wsgate carry exactly one request: a WebSocket upgrade. Served by
//! hyper, each cost a connection state machine, a service call, the upgrade hand-off
//! through a channel and a task for the relay — about a fifth of wsgate's user-space
//! work per WebSocket. So the server reads the first head itself: when it is a plain
//! WebSocket upgrade in a narrow, unambiguous shape ([`classify`]), the upgrade goes on
//! in the same task and the relay runs there too; anything else — any other request,
//! any doubt — goes to hyper with the bytes already read replayed in front of the
//! stream ([`crate::stream::Prefixed`]), so hyper sees the connection as if nobody had touched it.
//!
//! The shape accepted is stricter than hyper: `GET` of an origin-form target in
//! HTTP/1.1, lines ending in CRLF, one `Host`, no `Content-Length` and no
//! `Transfer-Encoding`, header names and values that the `http` crate accepts, the
//! upgrade headers present. What does not fit is hyper's to judge; a test holds the
//! fast path to accepting only requests hyper accepts the same way.

use std::mem::MaybeUninit;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri, Version};
use tokio::io::AsyncRead;

use crate::upgrade;

/// Header lines the fast path looks at; a request with more goes to hyper.
const MAX_HEADERS: usize = 64;

/// Bytes read at once while waiting for the head; an upgrade request is a few hundred.
const READ_CHUNK: usize = 2048;

/// What the start of a connection is.
// One exists at a time, briefly, in the task reading the head: boxing the request would
// cost an allocation per WebSocket to save stack bytes nobody misses.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Classified {
    /// A plain WebSocket upgrade, `head_len` bytes long.
    Upgrade {
        request: Request<()>,
        head_len: usize,
    },
    /// The head is not complete yet.
    Incomplete,
    /// Something for hyper.
    Other,
}

/// Looks at the bytes a connection started with. The request it makes shares `buf`:
/// its target and header values are slices of it, not copies.
pub fn classify(buf: &Bytes) -> Classified {
    if plainly_not_an_upgrade(buf) {
        return Classified::Other;
    }
    // Uninitialised: every plain HTTP connection's first request comes here, and
    // filling 64 slots would cost more than parsing its few lines.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let parser = httparse::ParserConfig::default();
    let head_len = match parser.parse_request_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Classified::Incomplete,
        Err(_) => return Classified::Other,
    };
    match upgrade_request(&parsed, buf, head_len) {
        Some(request) => Classified::Upgrade { request, head_len },
        None => Classified::Other,
    }
}

/// Whether `buf` holds a whole head and no `upgrade`, in any case, anywhere: then the
/// head has no `Upgrade` field and is not a WebSocket upgrade, which a scan for one
/// letter decides for a fraction of parsing the head. The head ends at the first empty
/// line (a bare-LF one ends it sooner), so a CRLFCRLF anywhere in `buf` means all of it
/// is there; without one the head is incomplete or bare-LF, and the parser decides, as
/// it does for empty lines before the request line (which it skips). An upgrade's
/// `Connection` field names `Upgrade` a few dozen bytes in, where the scan stops.
/// Every plain HTTP connection's first request comes here.
fn plainly_not_an_upgrade(buf: &[u8]) -> bool {
    if matches!(buf.first(), None | Some(b'\r' | b'\n')) {
        return false;
    }
    let names_upgrade = memchr::memchr2_iter(b'u', b'U', buf).any(|at| {
        buf.get(at..at + "upgrade".len())
            .is_some_and(|word| word.eq_ignore_ascii_case(b"upgrade"))
    });
    // A request usually arrives alone, its head ending the bytes read.
    !names_upgrade
        && (buf.ends_with(b"\r\n\r\n") || memchr::memmem::find(buf, b"\r\n\r\n").is_some())
}

/// The request, if it is a WebSocket upgrade in the shape the fast path takes.
fn upgrade_request(
    parsed: &httparse::Request<'_, '_>,
    buf: &Bytes,
    head_len: usize,
) -> Option<Request<()>> {
    let head = &buf[..head_len];
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    // No upgrade without an `Upgrade` field: a plain request is for hyper before any
    // header map is built for it.
    if !parsed
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"))
    {
        return None;
    }
    // Origin-form only: absolute-form and the rest are hyper's to interpret.
    let target = parsed.path.filter(|p| p.starts_with('/'))?;
    // Every line ends in CRLF: httparse also takes a bare LF, which proxies in front of
    // wsgate may read differently.
    if head
        .iter()
        .enumerate()
        .any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
    {
        return None;
    }
    let mut request = Request::new(());
    *request.method_mut() = Method::GET;
    *request.version_mut() = Version::HTTP_11;
    *request.uri_mut() = Uri::from_maybe_shared(buf.slice_ref(target.as_bytes())).ok()?;
    let headers = request.headers_mut();
    headers.reserve(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(h.value)).ok()?;
        headers.append(name, value);
    }
    // A body has no place in an upgrade request, and its framing headers are where
    // request smuggling hides.
    if headers.contains_key(header::CONTENT_LENGTH)
        || headers.contains_key(header::TRANSFER_ENCODING)
        || headers.get_all(header::HOST).iter().count() != 1
    {
        return None;
    }
    upgrade::is_websocket_upgrade(&request).then_some(request)
}

/// How the first request of a connection came.
// As for `Classified`: one at a time, briefly.
#[allow(clippy::large_enum_variant)]
pub enum FirstRequest {
    /// A plain WebSocket upgrade, and the bytes the client sent behind it.
    Upgrade {
        request: Request<()>,
        /// The request's own bytes, for hyper if wsgate answers it with an error.
        head: Bytes,
        rest: Bytes,
    },
    /// Anything else: the bytes read so far, for hyper.
    Other(Bytes),
    /// The client closed, failed, or sent no complete head within the time allowed.
    Gone,
}

/// Reads until the first request's head is complete (at most `max_head` bytes, within
/// `timeout`) or it is clearly not for the fast path.
pub async fn read_first<S>(stream: &mut S, max_head: usize, timeout: Duration) -> FirstRequest
where
    S: AsyncRead + Unpin,
{
    let read = async {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            if buf.capacity() == buf.len() {
                buf.reserve(READ_CHUNK);
            }
            match tokio_util::io::read_buf(stream, &mut buf).await {
                Ok(0) if buf.is_empty() => return FirstRequest::Gone,
                // Closed mid-head: hyper answers that as it always does.
                Ok(0) => return FirstRequest::Other(buf.freeze()),
                Ok(_) => {}
                Err(_) => return FirstRequest::Gone,
            }
            // Frozen to be looked at, so that the request can share the bytes; thawed
            // again (no copy: nothing else holds them) when the head is incomplete.
            let mut read = buf.freeze();
            match classify(&read) {
                Classified::Incomplete if read.len() <= max_head => {
                    buf = read
                        .try_into_mut()
                        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
                }
                Classified::Incomplete | Classified::Other => {
                    return FirstRequest::Other(read);
                }
                Classified::Upgrade { head_len, .. } if head_len > max_head => {
                    return FirstRequest::Other(read);
                }
                Classified::Upgrade { request, head_len } => {
                    let rest = read.split_off(head_len);
                    return FirstRequest::Upgrade {
                        request,
                        head: read,
                        rest,
                    };
                }
            }
        }
    };
    // hyper would close a connection whose head takes longer (`header_read_timeout`).
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(FirstRequest::Gone)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use tokio::io::AsyncWriteExt;

    use super::*;

    const UPGRADE: &str = "GET /ws?q=1 HTTP/1.1\r\nHost: dash.example\r\nConnection: keep-alive, Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn a_plain_upgrade_is_taken_with_what_follows_it_and_the_rest_is_not() {
        let mut bytes = UPGRADE.as_bytes().to_vec();
        bytes.extend_from_slice(b"\x81\x80frame");
        let bytes = Bytes::from(bytes);
        let Classified::Upgrade { request, head_len } = classify(&bytes) else {
            panic!("not taken")
        };
        assert_eq!(head_len, UPGRADE.len());
        assert_eq!(request.uri(), "/ws?q=1");
        assert_eq!(request.headers()["host"], "dash.example");
        assert!(matches!(
            classify(&bytes.slice(..40)),
            Classified::Incomplete
        ));
        for other in [
            UPGRADE.replace("GET", "POST"),
            UPGRADE.replace("HTTP/1.1", "HTTP/1.0"),
            UPGRADE.replace("/ws?q=1", "http://dash.example/ws"),
            UPGRADE.replace("Upgrade: websocket", "Upgrade: h2c"),
            UPGRADE.replace("Host: dash.example\r\n", ""),
            UPGRADE.replace("Host: dash.example", "Host: a\r\nHost: b"),
            UPGRADE.replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
            UPGRADE.replace("\r\n\r\n", "\r\nTransfer-Encoding: chunked\r\n\r\n"),
            UPGRADE.replace("Upgrade: websocket\r\n", "Upgrade: websocket\n"),
            UPGRADE.replace("Upgrade: websocket\r\n", "Upgrade:\r\n websocket\r\n"),
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_string(),
        ] {
            assert!(
                matches!(classify(&Bytes::from(other.clone())), Classified::Other),
                "{other:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_head_arriving_in_pieces_is_read_until_it_is_complete() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let sent = [UPGRADE.as_bytes(), b"\x81\x80frame"].concat();
        let (first, second) = sent.split_at(50);
        client.write_all(first).await.unwrap();
        let mut read = std::pin::pin!(read_first(&mut server, 8192, Duration::from_secs(5)));
        // Polled once: the first piece is read, found incomplete, and more is awaited.
        let waiting = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(read.as_mut(), cx).is_pending())
        });
        assert!(waiting.await);
        client.write_all(second).await.unwrap();
        let first_request = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap();
        let FirstRequest::Upgrade {
            request,
            head,
            rest,
        } = first_request
        else {
            panic!("not taken as an upgrade")
        };
        assert_eq!(&head[..], UPGRADE.as_bytes());
        assert_eq!(&rest[..], b"\x81\x80frame");
        assert_eq!(request.uri(), "/ws?q=1");
        assert_eq!(
            request.headers()["sec-websocket-key"],
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
    }

    /// The request hyper's HTTP/1.1 server makes of `bytes`, if it accepts them, and its
    /// body (`None`: it did not come whole).
    pub(crate) fn hyper_reads(bytes: &[u8]) -> Option<(Request<()>, Option<Bytes>)> {
        use http_body_util::BodyExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            let tx = Arc::new(Mutex::new(Some(tx)));
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let tx = tx.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.ok().map(|b| b.to_bytes());
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send((Request::from_parts(parts, ()), body));
                    }
                    Ok::<_, Infallible>(hyper::Response::new(http_body_util::Empty::<Bytes>::new()))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), service);
            client.write_all(bytes).await.unwrap();
            // The client stays: hyper reads its end mid-request as the client leaving.
            // A request hyper refuses ends the connection instead, and so does one that
            // asks to close, once answered (in the poll that read it).
            let read = async {
                tokio::select! {
                    seen = &mut rx => seen.ok(),
                    _ = conn => rx.try_recv().ok(),
                }
            };
            tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .ok()
                .flatten()
        })
    }

    /// Header lines the generator picks from: the upgrade's own, ordinary ones, and the
    /// shapes behind request smuggling and parser disagreements.
    fn header_line() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Host: dash.example".to_string()),
            Just("Host: other.example".to_string()),
            Just("Connection: Upgrade".to_string()),
            Just("Connection: keep-alive, upgrade".to_string()),
            Just("Connection: close".to_string()),
            Just("Upgrade: websocket".to_string()),
            Just("Upgrade: WebSocket".to_string()),
            Just("Upgrade: h2c".to_string()),
            Just("Sec-WebSocket-Version: 13".to_string()),
            Just("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==".to_string()),
            Just("Cookie: a=b".to_string()),
            Just("Content-Length: 0".to_string()),
            Just("Content-Length: 5".to_string()),
            Just("content-length: 5".to_string()),
            Just("Transfer-Encoding: chunked".to_string()),
            Just("Transfer-Encoding: chunked, identity".to_string()),
            Just(" folded continuation".to_string()),
            Just("\tfolded continuation".to_string()),
            Just("X-Bad\x01: value".to_string()),
            Just("X-Ctl: a\x7fb".to_string()),
            Just("X-Space : value".to_string()),
            Just(": no name".to_string()),
            Just("No-Colon".to_string()),
            Just("X-Utf8: caf\u{e9}".to_string()),
            "[A-Za-z-]{1,12}: [ -~]{0,20}",
        ]
    }

    fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
        let method = prop_oneof![
            12 => Just("GET"),
            1 => Just("POST"),
            1 => Just("get"),
            1 => Just("CONNECT"),
        ];
        let target = prop_oneof![
            12 => Just("/ws"),
            1 => Just("/a b"),
            1 => Just("http://dash.example/ws"),
            1 => Just("*"),
            1 => Just("//x"),
            1 => Just("/ws?x=%00"),
        ];
        let version = prop_oneof![
            12 => Just("HTTP/1.1"),
            1 => Just("HTTP/1.0"),
            1 => Just("HTTP/2.0"),
            1 => Just("http/1.1"),
        ];
        // Each line ends in CRLF, or sometimes in a bare LF. Most requests start from a
        // valid upgrade's lines, so that the rest decides.
        let extra = prop::collection::vec((header_line(), prop::bool::weighted(0.9)), 0..4);
        let lines = (prop::bool::weighted(0.7), extra)
            .prop_map(|(upgrade, extra)| {
                let mut lines: Vec<(String, bool)> = if upgrade {
                    UPGRADE
                        .trim_end()
                        .lines()
                        .skip(1)
                        .map(|l| (l.trim_end().to_string(), true))
                        .collect()
                } else {
                    Vec::new()
                };
                lines.extend(extra);
                lines
            })
            .prop_shuffle();
        // Bytes behind the head: nothing, a frame, or a second, pipelined request.
        let behind = prop_oneof![
            Just(String::new()),
            Just("\u{81}\u{80}abcd".to_string()),
            Just("GET /second HTTP/1.1\r\nHost: x\r\n\r\n".to_string()),
            Just("hello".to_string()),
        ];
        (
            method,
            target,
            version,
            prop::bool::weighted(0.9),
            lines,
            behind,
        )
            .prop_map(|(method, target, version, crlf, lines, behind)| {
                request_text(method, target, version, crlf, &lines, &behind)
            })
    }

    /// A request's bytes: its request line and header lines, each ending in CRLF or (if
    /// its flag is false) a bare LF, the empty line, then `behind`.
    pub(crate) fn request_text(
        method: &str,
        target: &str,
        version: &str,
        crlf: bool,
        lines: &[(String, bool)],
        behind: &str,
    ) -> Vec<u8> {
        let eol = |crlf: bool| if crlf { "\r\n" } else { "\n" };
        let mut s = format!("{method} {target} {version}{}", eol(crlf));
        for (line, crlf) in lines {
            s.push_str(line);
            s.push_str(eol(*crlf));
        }
        s.push_str("\r\n");
        s.push_str(behind);
        s.into_bytes()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Whatever the bytes, the fast path either leaves them to hyper or takes exactly
        /// the request hyper would have read, as an upgrade hyper would have seen too.
        #[test]
        fn the_fast_path_takes_only_what_hyper_takes_the_same_way(bytes in request_bytes()) {
            if let Classified::Upgrade { request, head_len } = classify(&Bytes::from(bytes.clone())) {
                let head = &bytes[..head_len];
                // None of the smuggling shapes got through.
                let text = String::from_utf8_lossy(head).to_ascii_lowercase();
                prop_assert!(!text.contains("content-length"));
                prop_assert!(!text.contains("transfer-encoding"));
                prop_assert!(!text.contains("\n ") && !text.contains("\n\t"));
                prop_assert!(head.starts_with(b"GET /"));
                let theirs = hyper_reads(head);
                prop_assert!(theirs.is_some(), "hyper refused what the fast path took");
                let (theirs, _) = theirs.unwrap();
                prop_assert_eq!(theirs.method(), request.method());
                prop_assert_eq!(theirs.uri(), request.uri());
                prop_assert_eq!(theirs.version(), request.version());
                prop_assert_eq!(theirs.headers(), request.headers());
                prop_assert!(upgrade::is_websocket_upgrade(&theirs));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// The scan that turns away heads without `upgrade` turns away only what the
        /// parse would have left to hyper too.
        #[test]
        fn the_scan_turns_away_no_upgrade(bytes in request_bytes(), cut in 0usize..600) {
            let bytes = &bytes[..cut.min(bytes.len())];
            if plainly_not_an_upgrade(bytes) {
                let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
                let mut parsed = httparse::Request::new(&mut []);
                let parser = httparse::ParserConfig::default();
                let status =
                    parser.parse_request_with_uninit_headers(&mut parsed, bytes, &mut slots);
                let buf = Bytes::copy_from_slice(bytes);
                let taken = match status {
                    Ok(httparse::Status::Complete(len)) => {
                        upgrade_request(&parsed, &buf, len).is_some()
                    }
                    _ => false,
                };
                let text = String::from_utf8_lossy(bytes);
                prop_assert!(!taken, "an upgrade turned away: {:?}", text);
                // The head was whole, as the scan assumed.
                prop_assert!(!matches!(status, Ok(httparse::Status::Partial)), "{:?}", text);
            }
        }
    }

    #[test]
    fn a_head_without_upgrade_is_turned_away_before_parsing() {
        assert!(plainly_not_an_upgrade(
            b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n"
        ));
        assert!(plainly_not_an_upgrade(
            b"GET / HTTP/1.1\r\nUser-Agent: u\r\nAccept-Language: en\r\n\r\n{}"
        ));
        // `upgrade` after the head (a body, a pipelined request): parsed all the same.
        assert!(!plainly_not_an_upgrade(
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /upgrade HTTP/1.1\r\n"
        ));
        // Incomplete, bare-LF or naming `upgrade` anywhere in the head: parsed.
        assert!(!plainly_not_an_upgrade(
            b"GET /small HTTP/1.1\r\nHost: a\r\n"
        ));
        assert!(!plainly_not_an_upgrade(b"GET / HTTP/1.1\nHost: a\n\n"));
        assert!(!plainly_not_an_upgrade(
            b"\r\n\r\nGET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(!plainly_not_an_upgrade(UPGRADE.as_bytes()));
        assert!(!plainly_not_an_upgrade(
            &UPGRADE.to_ascii_uppercase().into_bytes()
        ));
        assert!(!plainly_not_an_upgrade(
            b"GET /upgrade HTTP/1.1\r\nHost: a\r\n\r\n"
        ));
    }

    #[test]
    fn the_generator_produces_upgrades_the_fast_path_takes() {
        // The property above means little if the fast path never takes anything.
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = request_bytes();
        let taken = (0..2000)
            .filter(|_| {
                let bytes = strategy.new_tree(&mut runner).unwrap().current();
                matches!(classify(&Bytes::from(bytes)), Classified::Upgrade { .. })
            })
            .count();
        println!("{taken} of 2000 generated requests taken by the fast path");
        assert!(
            taken > 200,
            "only {taken} of 2000 generated requests were taken"
        );
    }
}
