//! Arbitrary bytes parsed as an HTTP request head (httparse, as a stand-in for hyper's
//! parser), turned into a `hyper::Request`, then checked by wsgate's handshake code.
//!
//! Checked: no panic; when `validate` accepts, the request is a GET over HTTP/1.1 with
//! `Sec-WebSocket-Version: 13` and exactly one 24-byte `Sec-WebSocket-Key`.
#![no_main]

use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else {
        return;
    };
    let Some(method) = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
    else {
        return;
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut b = Request::builder()
        .method(method)
        .version(version)
        .uri(parsed.path.unwrap_or("/"));
    for h in parsed.headers.iter() {
        // hyper refuses a request with an invalid header name; values it keeps as bytes.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            continue;
        };
        b = b.header(name, value);
    }
    let Ok(req) = b.body(()) else {
        return;
    };
    let _ = wsgate::upgrade::is_websocket_upgrade(&req);
    if wsgate::upgrade::validate(&req).is_ok() {
        assert_eq!(req.method(), Method::GET);
        assert!(req.version() >= Version::HTTP_11);
        let h = req.headers();
        assert_eq!(
            h.get("sec-websocket-version").map(HeaderValue::as_bytes),
            Some(&b"13"[..])
        );
        let keys: Vec<_> = h.get_all("sec-websocket-key").iter().collect();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].len(), 24);
    }
});
