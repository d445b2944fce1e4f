//! The header rules that forwarding ([`crate::proxy`]) and the WebSocket upgrade
//! ([`crate::upgrade`]) share: hop-by-hop headers removed (RFC 9110 §7.6.1), the
//! client's address and scheme added as `X-Forwarded-*`.

use std::fmt::Write as _;
use std::net::SocketAddr;

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Config;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), so a proxy
/// must not forward them. `Proxy-Connection` is a pre-standard variant clients still send.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The comma-separated tokens of every `name` header (`Connection: keep-alive, Upgrade`
/// gives `keep-alive`, `Upgrade`), trimmed; values that are not text are skipped.
pub fn header_tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The hop-by-hop headers of one message: the fixed list, and whatever its `Connection`
/// header names (RFC 9110 §7.6.1).
pub struct HopByHop<'a> {
    /// Names from `Connection` outside the fixed list. Rare (`keep-alive, Upgrade` is
    /// the usual value), and an empty Vec does not allocate.
    named: Vec<&'a str>,
}

impl<'a> HopByHop<'a> {
    pub fn of(headers: &'a HeaderMap) -> Self {
        let named = header_tokens(headers, header::CONNECTION)
            .filter(|t| {
                !t.is_empty()
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| h.as_str().eq_ignore_ascii_case(t))
            })
            .collect();
        HopByHop { named }
    }

    pub fn contains(&self, name: &HeaderName) -> bool {
        HOP_BY_HOP.contains(name)
            || self
                .named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_str()))
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
///
/// Runs for every forwarded request and response, so it allocates nothing in the usual
/// case: a lookup per fixed name, and a name is made only for the rare others that
/// `Connection` lists.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = HopByHop::of(headers)
        .named
        .iter()
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// How the client reached wsgate, for `X-Forwarded-Proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    /// Over TLS that wsgate terminated.
    Https,
}

impl Scheme {
    /// The scheme of wsgate's own listener.
    pub fn of(config: &Config) -> Scheme {
        if config.tls.is_some() {
            Scheme::Https
        } else {
            Scheme::Http
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The `X-Forwarded-*` headers a request from `peer` carries to the backend: the
/// client's address appended to `X-Forwarded-For` (after every value a proxy in front
/// already put there), and `X-Forwarded-Proto` and `X-Forwarded-Host` unless such a
/// proxy (an ingress terminating TLS, say) already set them. `host` is the request's
/// `Host`; the caller replaces any `X-Forwarded-For` it has with the one returned.
pub fn forwarded_headers(
    headers: &HeaderMap,
    host: Option<&HeaderValue>,
    peer: SocketAddr,
    client: Scheme,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> + use<> {
    let mut chain = String::with_capacity(64);
    for prior in headers.get_all(X_FORWARDED_FOR) {
        if let Ok(prior) = prior.to_str()
            && !prior.trim().is_empty()
        {
            chain.push_str(prior.trim());
            chain.push_str(", ");
        }
    }
    let _ = write!(chain, "{}", peer.ip());
    // Printable ASCII from valid header values and an address: always a valid value.
    let xff = HeaderValue::from_maybe_shared(Bytes::from(chain))
        .ok()
        .map(|v| (X_FORWARDED_FOR, v));
    let proto = (!headers.contains_key(X_FORWARDED_PROTO))
        .then(|| (X_FORWARDED_PROTO, HeaderValue::from_static(client.as_str())));
    let fwd_host = host
        .filter(|_| !headers.contains_key(X_FORWARDED_HOST))
        .map(|h| (X_FORWARDED_HOST, h.clone()));
    [xff, proto, fwd_host].into_iter().flatten()
}

/// Applies the request header rules to a request forwarded as it is: hop-by-hop
/// headers removed, the [`forwarded_headers`] set. `Host` is left as the client sent
/// it.
pub fn prepare_request_headers(headers: &mut HeaderMap, peer: SocketAddr, client: Scheme) {
    remove_hop_by_hop(headers);
    let added = forwarded_headers(headers, headers.get(header::HOST), peer, client);
    for (name, value) in added {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Trace"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::COOKIE], "a=b");
    }

    #[test]
    fn forwarded_headers_append_and_respect_prior_proxies() {
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("dash.example"));
        prepare_request_headers(&mut h, peer, Scheme::Http);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "dash.example");
        assert_eq!(h[header::HOST], "dash.example");

        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static(" 2.2.2.2, 3.3.3.3 "),
        );
        h.append("x-forwarded-for", HeaderValue::from_static(""));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        prepare_request_headers(&mut h, peer, Scheme::Https);
        let chain: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(chain, ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3"]);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(
            !h.contains_key("x-forwarded-host"),
            "no Host, no X-Forwarded-Host"
        );
    }
}
