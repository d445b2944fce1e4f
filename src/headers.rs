//! The header rules that forwarding ([`crate::proxy`]) and the WebSocket upgrade
//! ([`crate::upgrade`]) share: hop-by-hop headers removed (RFC 9110 §7.6.1), the
//! client's address and scheme added as `X-Forwarded-*`.

use std::net::IpAddr;

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

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

/// True when a `name` header lists `token` among its comma-separated tokens
/// (`Connection: keep-alive, Upgrade` lists `upgrade`), trimmed and compared ASCII
/// case-insensitively; values that are not text are skipped. Read on bytes: splitting
/// and trimming `str`s cost more than the rest of an upgrade's classification.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        let bytes = value.as_bytes();
        // Not text (`to_str` fails on it): skipped.
        bytes
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
            && bytes
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The comma-separated tokens of every `name` header (`Connection: keep-alive, Upgrade`
/// gives `keep-alive`, `Upgrade`), trimmed; values that are not text are skipped. The
/// plain reading of the lists, which [`has_token`] is held to.
#[cfg(test)]
fn header_tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
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
        let connection = headers.get_all(header::CONNECTION);
        Self::named_by(|| connection.iter())
    }

    /// Those that `connection` (the values of a `Connection` header, each time it is
    /// called) names.
    fn named_by<I>(connection: impl Fn() -> I) -> Self
    where
        I: Iterator<Item = &'a HeaderValue>,
    {
        // The usual values name nothing beyond the fixed list: say so without taking
        // them apart.
        let plain = connection().all(|v| {
            let v = v.as_bytes().trim_ascii();
            v.eq_ignore_ascii_case(b"keep-alive")
                || v.eq_ignore_ascii_case(b"close")
                || v.eq_ignore_ascii_case(b"upgrade")
        });
        if plain {
            return HopByHop { named: Vec::new() };
        }
        let named = connection()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| names_other_field(t.as_bytes()))
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

/// Which of the headers the forwarding rules look at a message has, found in one pass
/// over its names (a hash lookup per rule would cost more than the pass).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Present {
    /// Bit `i` set: `HOP_BY_HOP[i]` is there.
    hop_by_hop: u8,
    forwarded_for: bool,
    forwarded_proto: bool,
    forwarded_host: bool,
}

impl Present {
    fn of(headers: &HeaderMap) -> Present {
        let mut p = Present::default();
        for name in headers.keys() {
            if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
                p.hop_by_hop |= 1 << i;
            } else if *name == X_FORWARDED_FOR {
                p.forwarded_for = true;
            } else if *name == X_FORWARDED_PROTO {
                p.forwarded_proto = true;
            } else if *name == X_FORWARDED_HOST {
                p.forwarded_host = true;
            }
        }
        p
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
///
/// Runs for every forwarded request and response, so it allocates nothing in the usual
/// case: one pass over the names, a removal per hop-by-hop header found, and a name is
/// made only for the rare others that `Connection` lists.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    remove_present(headers, Present::of(headers).hop_by_hop);
}

/// Removes the fixed hop-by-hop headers of the bit set `present`, and those the
/// `Connection` header names.
fn remove_present(headers: &mut HeaderMap, present: u8) {
    if present == 0 {
        return;
    }
    // `Connection` is the first of the fixed list: only then can it name others. Read,
    // then removed: an entry lookup would have done both at once, but it grows a map
    // that is full (hyper sizes a request's map to its fields), an allocation and a
    // rehash on every request with `Connection` (browsers send `keep-alive`).
    if present & 1 != 0 {
        let named = named_by_connection(|| headers.get_all(header::CONNECTION).iter());
        headers.remove(header::CONNECTION);
        for name in &named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// The client's address as `X-Forwarded-For` carries it: made once per connection, an
/// IPv4 address digit by digit (formatting through `Display` cost more than the rest
/// of the header rules together).
pub fn address_value(ip: IpAddr) -> HeaderValue {
    let text = match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                s.push_str(digits.format(octet));
            }
            s
        }
        IpAddr::V6(v6) => v6.to_string(),
    };
    // Digits, dots, colons and hex letters: always a valid value.
    HeaderValue::from_maybe_shared(Bytes::from(text))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
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

/// The `X-Forwarded-*` headers a request from the client whose address is `client`
/// (see [`address_value`]) carries to the backend: the client's address appended to
/// `X-Forwarded-For` (after every value a proxy in front already put there), and
/// `X-Forwarded-Proto` and `X-Forwarded-Host` unless such a proxy (an ingress
/// terminating TLS, say) already set them. `host` is the request's `Host`; the caller
/// replaces any `X-Forwarded-For` it has with the one returned.
pub fn forwarded_headers(
    headers: &HeaderMap,
    host: Option<&HeaderValue>,
    client: &HeaderValue,
    scheme: Scheme,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> + use<> {
    let present = Present::of(headers);
    forwarded(headers, present, host, client, scheme)
}

fn forwarded(
    headers: &HeaderMap,
    present: Present,
    host: Option<&HeaderValue>,
    client: &HeaderValue,
    scheme: Scheme,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> + use<> {
    let xff = if present.forwarded_for {
        let mut chain = Vec::with_capacity(64);
        for prior in headers.get_all(X_FORWARDED_FOR) {
            let prior = prior.as_bytes().trim_ascii();
            if !prior.is_empty() {
                chain.extend_from_slice(prior);
                chain.extend_from_slice(b", ");
            }
        }
        chain.extend_from_slice(client.as_bytes());
        // Bytes of valid header values and an address: always a valid value.
        HeaderValue::from_maybe_shared(Bytes::from(chain)).ok()
    } else {
        Some(client.clone())
    };
    let proto = (!present.forwarded_proto)
        .then(|| (X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str())));
    let fwd_host = host
        .filter(|_| !present.forwarded_host)
        .map(|h| (X_FORWARDED_HOST, h.clone()));
    [xff.map(|v| (X_FORWARDED_FOR, v)), proto, fwd_host]
        .into_iter()
        .flatten()
}

/// The fields a forwarded request gains (see [`prepare_request_headers`]).
pub type Added = SmallVec<[(HeaderName, HeaderValue); 3]>;

/// Applies the request header rules to a request forwarded as it is: hop-by-hop
/// headers removed from `headers`, from one pass over the names, and the
/// [`forwarded_headers`] returned for the backend leg's encoder to write after the
/// request's own fields (an `X-Forwarded-For` the request had is removed: the returned
/// chain replaces it). Appending them to the map instead cost a hash, a probe and
/// often a growth per field, on every request (bench/README.md). `Host` is left as the
/// client sent it.
#[must_use = "the added fields go to the backend"]
pub fn prepare_request_headers(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    scheme: Scheme,
) -> Added {
    let present = Present::of(headers);
    remove_present(headers, present.hop_by_hop);
    let added = forwarded(headers, present, headers.get(header::HOST), client, scheme).collect();
    if present.forwarded_for {
        headers.remove(X_FORWARDED_FOR);
    }
    added
}

/// The fields that a `Connection` header's `values` name beyond the fixed hop-by-hop
/// list (rare: `keep-alive`, `close` and `Upgrade` are the usual values) removed from
/// `headers`.
pub fn remove_named_by_connection(headers: &mut HeaderMap, values: &[HeaderValue]) {
    for name in &named_by_connection(|| values.iter()) {
        headers.remove(name);
    }
}

/// The names, beyond the fixed list, of the fields that `connection` (the values of a
/// `Connection` header, each time it is called) names.
fn named_by_connection<'a, I>(connection: impl Fn() -> I) -> SmallVec<[HeaderName; 2]>
where
    I: Iterator<Item = &'a HeaderValue>,
{
    HopByHop::named_by(connection)
        .named
        .iter()
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

/// Which of the fixed hop-by-hop headers a name is, for a reader that needs what two of
/// them say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopByHopField {
    Connection,
    TransferEncoding,
    /// `Keep-Alive`, `Proxy-Connection`, `TE` or `Upgrade`.
    Other,
}

/// Whether `name` is one of the fixed hop-by-hop headers (not those a `Connection`
/// header names), and which.
pub fn hop_by_hop_field(name: &HeaderName) -> Option<HopByHopField> {
    if name == header::CONNECTION {
        Some(HopByHopField::Connection)
    } else if name == header::TRANSFER_ENCODING {
        Some(HopByHopField::TransferEncoding)
    } else if HOP_BY_HOP.contains(name) {
        Some(HopByHopField::Other)
    } else {
        None
    }
}

/// Whether a `Connection` token names a field beyond the fixed hop-by-hop ones.
pub fn names_other_field(token: &[u8]) -> bool {
    !token.is_empty()
        && !HOP_BY_HOP
            .iter()
            .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(token))
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

    /// The request's headers as the backend reads them: the rules applied, the added
    /// fields after the request's own.
    fn prepared(h: &mut HeaderMap, client: &HeaderValue, scheme: Scheme) {
        for (name, value) in prepare_request_headers(h, client, scheme) {
            h.append(name, value);
        }
    }

    #[test]
    fn forwarded_headers_append_and_respect_prior_proxies() {
        let peer = address_value("10.1.2.3".parse().unwrap());
        let peer = &peer;
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("dash.example"));
        prepared(&mut h, peer, Scheme::Http);
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
        prepared(&mut h, peer, Scheme::Https);
        let chain: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(chain, ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3"]);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(
            !h.contains_key("x-forwarded-host"),
            "no Host, no X-Forwarded-Host"
        );
    }

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        for ip in [
            "10.1.2.3",
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(address_value(ip).to_str().unwrap(), ip.to_string());
        }
    }

    /// The byte scan finds a token exactly where the `str` reading of the lists does.
    #[test]
    fn has_token_finds_what_the_plain_reading_of_the_lists_finds() {
        let values: [&[u8]; 14] = [
            b"upgrade",
            b"Upgrade",
            b"keep-alive, Upgrade",
            b"keep-alive,upgrade ",
            b"\tupgrade\t",
            b"upgrades",
            b"up grade",
            b"",
            b",,",
            b"keep-alive",
            b"upgrade, \xff",
            b"\xffupgrade",
            b"upgrade\x80",
            b"close , UPGRADE , x",
        ];
        for value in values {
            for repeat in [false, true] {
                let mut h = HeaderMap::new();
                h.append(header::CONNECTION, HeaderValue::from_bytes(value).unwrap());
                if repeat {
                    h.append(header::CONNECTION, HeaderValue::from_static("close"));
                }
                let expected = header_tokens(&h, header::CONNECTION)
                    .any(|t| t.eq_ignore_ascii_case("upgrade"));
                assert_eq!(
                    has_token(&h, header::CONNECTION, "upgrade"),
                    expected,
                    "{value:?}"
                );
            }
        }
    }

    /// The rules as a straightforward reading of RFC 9110 §7.6.1 and the
    /// `X-Forwarded-*` convention: the reference the one-pass version is held to.
    fn reference(mut h: HeaderMap, client: &str, scheme: Scheme) -> HeaderMap {
        let named: Vec<HeaderName> = header_tokens(&h, header::CONNECTION)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in HOP_BY_HOP.iter().chain(&named) {
            h.remove(name);
        }
        let mut chain: Vec<String> = h
            .get_all(X_FORWARDED_FOR)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        chain.push(client.to_string());
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_str(&chain.join(", ")).unwrap(),
        );
        if !h.contains_key(X_FORWARDED_PROTO) {
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
        }
        if !h.contains_key(X_FORWARDED_HOST)
            && let Some(host) = h.get(header::HOST).cloned()
        {
            h.insert(X_FORWARDED_HOST, host);
        }
        h
    }

    /// Every name with its values in order, sorted by name: what a backend reads.
    fn shape(h: &HeaderMap) -> Vec<(String, Vec<Vec<u8>>)> {
        let mut out: Vec<_> = h
            .keys()
            .map(|k| {
                let values = h.get_all(k).iter().map(|v| v.as_bytes().to_vec()).collect();
                (k.as_str().to_string(), values)
            })
            .collect();
        out.sort();
        out
    }

    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = (String, String)> {
        let name = prop_oneof![
            Just("connection"),
            Just("keep-alive"),
            Just("proxy-connection"),
            Just("te"),
            Just("transfer-encoding"),
            Just("upgrade"),
            Just("x-forwarded-for"),
            Just("x-forwarded-proto"),
            Just("x-forwarded-host"),
            Just("host"),
            Just("cookie"),
            Just("x-trace"),
            Just("accept"),
        ];
        let value = prop_oneof![
            Just("keep-alive".to_string()),
            Just("keep-alive, X-Trace".to_string()),
            Just("Upgrade, cookie".to_string()),
            Just("close".to_string()),
            Just(" 1.1.1.1 , 2.2.2.2 ".to_string()),
            Just(String::new()),
            "[a-z0-9.,: ]{0,12}",
        ];
        (name, value).prop_map(|(n, v)| (n.to_string(), v))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the headers, the one-pass rules leave exactly what the reference
        /// leaves.
        #[test]
        fn the_one_pass_rules_equal_the_reference(
            headers in prop::collection::vec(header(), 0..10),
            v6 in any::<bool>(),
            https in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            for (name, value) in &headers {
                h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
            }
            let ip: IpAddr = if v6 { "2001:db8::7".parse().unwrap() } else { "10.9.8.7".parse().unwrap() };
            let scheme = if https { Scheme::Https } else { Scheme::Http };
            let expected = reference(h.clone(), &ip.to_string(), scheme);
            prepared(&mut h, &address_value(ip), scheme);
            prop_assert_eq!(shape(&h), shape(&expected));
        }
    }
}
