//! Which client a request comes from, for keying rate limits.
//!
//! The socket peer address is the only address nobody can forge. Forwarding
//! headers (`Forwarded`, `X-Forwarded-For`) are read only when that peer is a
//! proxy the operator declared trusted, and then only from the right: every
//! proxy appends the address it received the request from, so the entries
//! written by our own proxies sit at the right end and anything a client sent
//! sits at the left. The walk skips trusted proxies and stops at the first
//! address that is not one of them; it never takes the leftmost entry on
//! faith, and it never reads past an entry it cannot parse.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Once;

use http::header::{FORWARDED, HeaderMap, HeaderName};
use ipnet::IpNet;

/// At most this many forwarding-header entries are examined per request, so
/// that a huge header costs bounded work.
const MAX_HOPS: usize = 32;

/// The de-facto standard header that `http` has no constant for.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The proxies allowed to tell us the client address through forwarding
/// headers; empty (the default) trusts none and uses the socket peer address.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
}

impl TrustedProxies {
    /// Trusts no proxy: forwarding headers are always ignored.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses networks in CIDR notation (`"10.0.0.0/8"`, `"fd00::/8"`) or bare
    /// addresses (`"127.0.0.1"`, meaning a `/32` or `/128`).
    pub fn parse<I, S>(entries: I) -> Result<Self, InvalidProxy>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let networks = entries
            .into_iter()
            .map(|entry| parse_network(entry.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self { networks })
    }

    /// Whether `ip` belongs to a trusted proxy; IPv4-mapped IPv6 addresses
    /// also match the IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        self.networks
            .iter()
            .any(|network| network.contains(&ip) || network.contains(&canonical))
    }

    /// The networks, for matching elsewhere.
    pub(crate) fn into_networks(self) -> Vec<IpNet> {
        self.networks
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }
}

/// An entry given to [`TrustedProxies::parse`] that is neither an IP address
/// nor a network in CIDR notation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trusted proxy {entry:?}: {reason}")]
pub struct InvalidProxy {
    /// The entry as given.
    pub entry: String,
    /// What is wrong with it and how to write it instead.
    pub reason: String,
}

fn parse_network(entry: &str) -> Result<IpNet, InvalidProxy> {
    let trimmed = entry.trim();
    let invalid = |reason: String| InvalidProxy {
        entry: entry.to_owned(),
        reason,
    };
    if trimmed.is_empty() {
        return Err(invalid(
            "the entry is empty; give an address such as 10.0.0.1 or a network such as 10.0.0.0/8"
                .to_owned(),
        ));
    }
    if let Some((address, prefix)) = trimmed.split_once('/') {
        return trimmed.parse::<IpNet>().map(|net| net.trunc()).map_err(|_| {
            let reason = match address.parse::<IpAddr>() {
                Err(_) => format!(
                    "{address:?} is not an IP address; write a network as 10.0.0.0/8 or fd00::/8"
                ),
                Ok(ip) => format!(
                    "{prefix:?} is not a prefix length for {ip}; use a number from 0 to {}",
                    if ip.is_ipv4() { 32 } else { 128 }
                ),
            };
            invalid(reason)
        });
    }
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let reason = if trimmed.parse::<SocketAddr>().is_ok() {
        "a proxy is identified by its address alone; remove the port".to_owned()
    } else {
        "not an IP address or CIDR network; write e.g. 10.0.0.1, 10.0.0.0/8 or fd00::/8 \
         (host names are not resolved)"
            .to_owned()
    };
    Err(invalid(reason))
}

/// How to find the client address of a request and turn it into a
/// rate-limit key.
///
/// By default no proxy is trusted, IPv4 clients are keyed by their full
/// address and IPv6 clients by their `/64` network (one customer site usually
/// owns a whole `/64`, so keying by full address would let it rotate freely).
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: TrustedProxies,
    ipv6_prefix: u8,
    ipv4_prefix: u8,
}

impl Default for ClientIp {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientIp {
    /// Trusts no proxy, keys IPv4 by address and IPv6 by `/64`.
    pub fn new() -> Self {
        Self {
            trusted: TrustedProxies::none(),
            ipv6_prefix: 64,
            ipv4_prefix: 32,
        }
    }

    /// Reads forwarding headers when the peer is one of these proxies.
    ///
    /// Whichever header is used (`Forwarded` when it names any `for=` node,
    /// else `X-Forwarded-For`), the trusted proxies must append to it, or
    /// overwrite it, and not merely pass on what the client sent.
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.trusted = proxies;
        self
    }

    /// Keys IPv6 clients by their network of this many bits (at most 128).
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.min(128);
        self
    }

    /// Keys IPv4 clients by their network of this many bits (at most 32).
    pub fn ipv4_prefix(mut self, bits: u8) -> Self {
        self.ipv4_prefix = bits.min(32);
        self
    }

    /// The client address of `request`, or `None` when the request carries no
    /// peer address.
    ///
    /// The peer address comes from the request extensions: axum's
    /// `ConnectInfo<SocketAddr>`, else a `SocketAddr`, else an `IpAddr`. When
    /// the peer is a trusted proxy, the forwarding header is walked from the
    /// right, skipping trusted proxies; the first other address is the
    /// client. An entry that is not an address (`unknown`, an obfuscated
    /// identifier, garbage) ends the walk at the last trusted hop. IPv4-mapped
    /// IPv6 addresses are returned as IPv4.
    pub fn client_addr<B>(&self, request: &http::Request<B>) -> Option<IpAddr> {
        self.client_addr_from(request.headers(), request.extensions())
    }

    /// The rate-limit key of the client of `request`: its address masked to
    /// the configured prefix, e.g. `203.0.113.7` or `2001:db8:1:2::/64`.
    pub fn key<B>(&self, request: &http::Request<B>) -> Option<String> {
        self.client_addr(request).map(|ip| self.key_for(ip))
    }

    /// [`client_addr`](Self::client_addr) for a request already split into parts.
    pub(crate) fn client_addr_of_parts(&self, parts: &http::request::Parts) -> Option<IpAddr> {
        self.client_addr_from(&parts.headers, &parts.extensions)
    }

    /// [`key`](Self::key) for a request already split into parts.
    pub(crate) fn key_of_parts(&self, parts: &http::request::Parts) -> Option<String> {
        self.client_addr_of_parts(parts).map(|ip| self.key_for(ip))
    }

    fn client_addr_from(
        &self,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Option<IpAddr> {
        let peer = peer_addr(extensions)?.to_canonical();
        if !self.trusted.contains(peer) {
            if self.trusted.is_empty() && has_forwarding_header(headers) {
                warn_forwarding_headers_ignored();
            }
            return Some(peer);
        }
        if forwarded_names_a_node(headers) {
            Some(self.walk(peer, forwarded_hops(headers)))
        } else {
            Some(self.walk(peer, x_forwarded_for_hops(headers)))
        }
    }

    fn key_for(&self, ip: IpAddr) -> String {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.ipv4_prefix))
                    .unwrap_or(0);
                let network = Ipv4Addr::from(u32::from(v4) & mask);
                network_key(network, self.ipv4_prefix, 32)
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.ipv6_prefix))
                    .unwrap_or(0);
                let network = Ipv6Addr::from(u128::from(v6) & mask);
                network_key(network, self.ipv6_prefix, 128)
            }
        }
    }

    /// Walks `hops` (rightmost first) and returns the client address.
    fn walk(&self, peer: IpAddr, hops: impl Iterator<Item = Hop>) -> IpAddr {
        let mut last_trusted = peer;
        for hop in hops.take(MAX_HOPS) {
            match hop {
                Hop::Empty => {}
                Hop::Addr(ip) if self.trusted.contains(ip) => last_trusted = ip,
                Hop::Addr(ip) => return ip,
                Hop::Opaque => {
                    tracing::debug!(
                        client = %last_trusted,
                        "unparseable forwarding entry; using the last trusted hop as the client"
                    );
                    return last_trusted;
                }
            }
        }
        last_trusted
    }
}

fn network_key(network: impl fmt::Display, prefix: u8, full: u8) -> String {
    if prefix == full {
        network.to_string()
    } else {
        format!("{network}/{prefix}")
    }
}

fn peer_addr(extensions: &http::Extensions) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(addr.ip());
    }
    if let Some(addr) = extensions.get::<SocketAddr>() {
        return Some(addr.ip());
    }
    extensions.get::<IpAddr>().copied()
}

fn has_forwarding_header(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED) || headers.contains_key(X_FORWARDED_FOR)
}

fn warn_forwarding_headers_ignored() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "ignoring Forwarded/X-Forwarded-For headers because no proxy is trusted; the socket \
             peer address is used as the client address. If this service runs behind a reverse \
             proxy or load balancer, configure \
             ClientIp::new().trusted_proxies(TrustedProxies::parse([\"10.0.0.0/8\"])?) with its \
             addresses, or every client will be rate limited as the proxy"
        );
    });
}

/// One entry of a forwarding header, as the walk sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// An empty list element, which HTTP list syntax says to ignore.
    Empty,
    /// A node address.
    Addr(IpAddr),
    /// Anything else: `unknown`, an obfuscated identifier, garbage.
    Opaque,
}

/// The comma-separated entries of every `name` header line, rightmost first;
/// `None` stands for an entry that is not readable text.
///
/// Entries are split on every comma, even inside quoted strings: no node
/// identifier contains one, and a quote-aware split would let a client's
/// unterminated quote swallow the entries our own proxies appended after it.
/// For the same reason the line is split before it is decoded: a byte that
/// is not text, sent by a client to the left, must not hide the entries our
/// proxies appended to the same line.
fn list_entries<'h>(
    headers: &'h HeaderMap,
    name: HeaderName,
) -> impl Iterator<Item = Option<&'h str>> + 'h {
    headers.get_all(name).iter().rev().flat_map(|line| {
        line.as_bytes().rsplit(|byte| *byte == b',').map(|entry| {
            std::str::from_utf8(entry)
                .ok()
                .filter(|text| text.is_ascii())
        })
    })
}

fn x_forwarded_for_hops(headers: &HeaderMap) -> impl Iterator<Item = Hop> + '_ {
    list_entries(headers, X_FORWARDED_FOR).map(|entry| match entry {
        None => Hop::Opaque,
        Some(text) if text.trim().is_empty() => Hop::Empty,
        Some(text) => parse_node(text).map_or(Hop::Opaque, Hop::Addr),
    })
}

fn forwarded_elements(headers: &HeaderMap) -> impl Iterator<Item = Element<'_>> + '_ {
    list_entries(headers, FORWARDED).map(|entry| entry.map_or(Element::Malformed, parse_element))
}

/// Whether the `Forwarded` header is in use: some element names a `for` node.
fn forwarded_names_a_node(headers: &HeaderMap) -> bool {
    forwarded_elements(headers)
        .take(MAX_HOPS)
        .any(|element| matches!(element, Element::For(_)))
}

fn forwarded_hops(headers: &HeaderMap) -> impl Iterator<Item = Hop> + '_ {
    forwarded_elements(headers).map(|element| match element {
        Element::Empty => Hop::Empty,
        Element::For(node) => parse_node(&node).map_or(Hop::Opaque, Hop::Addr),
        // A proxy that withheld or mangled the address it saw hides everything
        // to its left.
        Element::NoFor | Element::Malformed => Hop::Opaque,
    })
}

/// One element of a `Forwarded` header (RFC 7239, section 4).
#[derive(Debug, PartialEq, Eq)]
enum Element<'a> {
    Empty,
    For(Cow<'a, str>),
    NoFor,
    Malformed,
}

fn parse_element(element: &str) -> Element<'_> {
    if element.trim().is_empty() {
        return Element::Empty;
    }
    let mut node = None;
    for pair in element.split(';').map(str::trim) {
        if pair.is_empty() {
            continue;
        }
        let Some((key, value)) = pair.split_once('=') else {
            return Element::Malformed;
        };
        let Some(value) = unquote(value.trim()) else {
            return Element::Malformed;
        };
        if key.trim().eq_ignore_ascii_case("for") && node.replace(value).is_some() {
            // Each parameter may occur once per element.
            return Element::Malformed;
        }
    }
    node.map_or(Element::NoFor, Element::For)
}

/// A `Forwarded` parameter value: a token, or a quoted string with its
/// escapes resolved. `None` if it is neither.
fn unquote(value: &str) -> Option<Cow<'_, str>> {
    let Some(quoted) = value.strip_prefix('"') else {
        let is_token = !value.is_empty() && !value.contains(['"', ' ', '\t']);
        return is_token.then_some(Cow::Borrowed(value));
    };
    let mut unquoted = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    loop {
        match chars.next()? {
            '"' => return chars.as_str().is_empty().then_some(Cow::Owned(unquoted)),
            '\\' => unquoted.push(chars.next()?),
            c => unquoted.push(c),
        }
    }
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:8080`,
/// `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`. IPv4-mapped IPv6
/// addresses come back as IPv4.
fn parse_node(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let ip = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, rest) = bracketed.split_once(']')?;
        if !rest.is_empty() && !rest.strip_prefix(':').is_some_and(is_port) {
            return None;
        }
        IpAddr::V6(host.parse().ok()?)
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else {
        let (host, port) = text.split_once(':')?;
        if !is_port(port) {
            return None;
        }
        IpAddr::V4(host.parse().ok()?)
    };
    Some(ip.to_canonical())
}

/// A port number, or an obfuscated port (`_` followed by letters, digits,
/// `.`, `_` or `-`) as RFC 7239 allows.
fn is_port(text: &str) -> bool {
    match text.strip_prefix('_') {
        Some(obfuscated) => {
            !obfuscated.is_empty()
                && obfuscated
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => text.parse::<u16>().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};

    const PROXY: &str = "10.0.0.1";
    const CLIENT: &str = "203.0.113.7";

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn request(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().extension(SocketAddr::new(ip(peer), 40000));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn behind_proxies() -> ClientIp {
        ClientIp::new().trusted_proxies(TrustedProxies::parse(["10.0.0.0/8", "fd00::/8"]).unwrap())
    }

    fn client(config: &ClientIp, request: &Request<()>) -> IpAddr {
        config.client_addr(request).unwrap()
    }

    #[test]
    fn peer_address_is_the_client_without_forwarding_headers() {
        let request = request(CLIENT, &[]);
        assert_eq!(client(&ClientIp::new(), &request), ip(CLIENT));
    }

    #[test]
    fn spoofed_xff_from_untrusted_peer_is_ignored() {
        let request = request(CLIENT, &[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
        assert_eq!(client(&ClientIp::new(), &request), ip(CLIENT));
    }

    #[test]
    fn spoofed_forwarded_from_untrusted_peer_is_ignored() {
        let request = request(CLIENT, &[("forwarded", "for=198.51.100.1")]);
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn trusted_peer_without_forwarding_headers_is_the_client() {
        let request = request(PROXY, &[]);
        assert_eq!(client(&behind_proxies(), &request), ip(PROXY));
    }

    #[test]
    fn empty_xff_from_trusted_peer_leaves_the_peer_as_client() {
        let request = request(PROXY, &[("x-forwarded-for", "")]);
        assert_eq!(client(&behind_proxies(), &request), ip(PROXY));
    }

    #[test]
    fn rightmost_untrusted_address_wins() {
        let request = request(
            PROXY,
            &[("x-forwarded-for", "198.51.100.1, 203.0.113.7, 10.0.0.2")],
        );
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn leftmost_is_never_taken_when_a_spoofed_entry_precedes_the_real_client() {
        let request = request(PROXY, &[("x-forwarded-for", "10.0.0.9, 203.0.113.7")]);
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn all_trusted_hops_give_the_leftmost_entry() {
        let request = request(PROXY, &[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(client(&behind_proxies(), &request), ip("10.0.0.3"));
    }

    #[test]
    fn garbage_entry_stops_the_walk() {
        let request = request(
            PROXY,
            &[("x-forwarded-for", "198.51.100.1, not-an-ip, 10.0.0.2")],
        );
        assert_eq!(client(&behind_proxies(), &request), ip("10.0.0.2"));
    }

    #[test]
    fn garbage_as_rightmost_entry_leaves_the_peer_as_client() {
        let request = request(PROXY, &[("x-forwarded-for", "198.51.100.1, unknown")]);
        assert_eq!(client(&behind_proxies(), &request), ip(PROXY));
    }

    #[test]
    fn empty_list_elements_are_skipped() {
        let request = request(PROXY, &[("x-forwarded-for", "203.0.113.7, , 10.0.0.2,")]);
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn xff_entries_with_ports_and_whitespace_are_tolerated() {
        let config = behind_proxies();
        let v4 = request(
            PROXY,
            &[("x-forwarded-for", "  203.0.113.7:5678 ,10.0.0.2:80")],
        );
        assert_eq!(client(&config, &v4), ip(CLIENT));
        let v6 = request(PROXY, &[("x-forwarded-for", "[2001:db8::1]:80, [fd00::2]")]);
        assert_eq!(client(&config, &v6), ip("2001:db8::1"));
        let bare_v6 = request(PROXY, &[("x-forwarded-for", "2001:db8::1")]);
        assert_eq!(client(&config, &bare_v6), ip("2001:db8::1"));
    }

    #[test]
    fn multiple_xff_header_lines_are_concatenated() {
        let request = request(
            PROXY,
            &[
                ("x-forwarded-for", "198.51.100.1, 203.0.113.7"),
                ("x-forwarded-for", "10.0.0.3"),
                ("x-forwarded-for", "10.0.0.2"),
            ],
        );
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn invalid_utf8_header_does_not_panic() {
        let mut request = request(PROXY, &[]);
        let headers = request.headers_mut();
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"198.51.100.1, \xff\xfe").unwrap(),
        );
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        assert_eq!(client(&behind_proxies(), &request), ip("10.0.0.2"));

        let mut forwarded = self::request(PROXY, &[]);
        forwarded
            .headers_mut()
            .append(FORWARDED, HeaderValue::from_bytes(b"for=\xc3\x28").unwrap());
        assert_eq!(client(&behind_proxies(), &forwarded), ip(PROXY));
    }

    #[test]
    fn number_of_examined_entries_is_capped() {
        let hops = vec!["10.0.0.2"; MAX_HOPS + 10].join(", ");
        let header = format!("203.0.113.7, {hops}");
        let request = request(PROXY, &[("x-forwarded-for", &header)]);
        assert_eq!(client(&behind_proxies(), &request), ip("10.0.0.2"));
    }

    #[test]
    fn forwarded_header_with_quoted_ipv6_and_port() {
        let request = request(
            PROXY,
            &[(
                "forwarded",
                "for=198.51.100.1, For=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.2",
            )],
        );
        assert_eq!(client(&behind_proxies(), &request), ip("2001:db8::1"));
    }

    #[test]
    fn forwarded_header_is_preferred_over_xff() {
        let request = request(
            PROXY,
            &[
                ("forwarded", "for=203.0.113.7;proto=https"),
                ("x-forwarded-for", "198.51.100.1"),
            ],
        );
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn forwarded_header_without_for_falls_back_to_xff() {
        let request = request(
            PROXY,
            &[
                ("forwarded", "proto=https;host=example.com"),
                ("x-forwarded-for", "203.0.113.7"),
            ],
        );
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn obfuscated_forwarded_node_stops_the_walk() {
        let config = behind_proxies();
        let hidden = request(
            PROXY,
            &[("forwarded", "for=198.51.100.1, for=_hidden, for=10.0.0.2")],
        );
        assert_eq!(client(&config, &hidden), ip("10.0.0.2"));
        let unknown = request(PROXY, &[("forwarded", "for=198.51.100.1, for=unknown")]);
        assert_eq!(client(&config, &unknown), ip(PROXY));
    }

    #[test]
    fn forwarded_element_without_for_stops_the_walk() {
        let request = request(PROXY, &[("forwarded", "for=198.51.100.1, proto=https")]);
        assert_eq!(client(&behind_proxies(), &request), ip(PROXY));
    }

    #[test]
    fn unterminated_quote_cannot_swallow_the_entries_of_our_proxies() {
        let request = request(
            PROXY,
            &[("forwarded", "for=\"198.51.100.1, for=203.0.113.7")],
        );
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn repeated_for_parameter_makes_the_element_malformed() {
        assert_eq!(
            parse_element("for=203.0.113.7;for=198.51.100.1"),
            Element::Malformed
        );
    }

    #[test]
    fn quoted_forwarded_values_are_unescaped() {
        assert_eq!(unquote("\"a\\\"b\"").as_deref(), Some("a\"b"));
        assert_eq!(unquote("\"unterminated"), None);
        assert_eq!(unquote("\"trailing\"x"), None);
    }

    #[test]
    fn obfuscated_ports_are_accepted() {
        assert_eq!(parse_node("203.0.113.7:_abc"), Some(ip(CLIENT)));
        assert_eq!(parse_node("203.0.113.7:99999"), None);
    }

    #[test]
    fn no_peer_address_gives_none() {
        let request = Request::builder()
            .header("x-forwarded-for", CLIENT)
            .body(())
            .unwrap();
        assert_eq!(behind_proxies().client_addr(&request), None);
        assert_eq!(behind_proxies().key(&request), None);
    }

    #[test]
    fn plain_ip_addr_extension_is_a_peer_address() {
        let request = Request::builder().extension(ip(CLIENT)).body(()).unwrap();
        assert_eq!(client(&ClientIp::new(), &request), ip(CLIENT));
    }

    #[cfg(feature = "axum")]
    #[test]
    fn axum_connect_info_is_preferred_as_peer_address() {
        let request = Request::builder()
            .extension(axum::extract::ConnectInfo(SocketAddr::new(ip(CLIENT), 1)))
            .extension(SocketAddr::new(ip("198.51.100.1"), 1))
            .body(())
            .unwrap();
        assert_eq!(client(&ClientIp::new(), &request), ip(CLIENT));
    }

    #[test]
    fn ipv4_is_keyed_by_full_address_by_default() {
        let request = request(CLIENT, &[]);
        assert_eq!(ClientIp::new().key(&request).unwrap(), "203.0.113.7");
    }

    #[test]
    fn ipv4_prefix_groups_addresses_into_a_network() {
        let request = request(CLIENT, &[]);
        let config = ClientIp::new().ipv4_prefix(24);
        assert_eq!(config.key(&request).unwrap(), "203.0.113.0/24");
    }

    #[test]
    fn ipv6_is_grouped_by_64_by_default() {
        let request = request("2001:db8:1:2:aaaa:bbbb:cccc:dddd", &[]);
        assert_eq!(ClientIp::new().key(&request).unwrap(), "2001:db8:1:2::/64");
    }

    #[test]
    fn full_ipv6_prefix_keys_by_address() {
        let request = request("2001:db8::1", &[]);
        let config = ClientIp::new().ipv6_prefix(200);
        assert_eq!(config.key(&request).unwrap(), "2001:db8::1");
    }

    #[test]
    fn zero_prefix_puts_every_client_in_one_bucket() {
        let config = ClientIp::new().ipv4_prefix(0).ipv6_prefix(0);
        assert_eq!(config.key(&request(CLIENT, &[])).unwrap(), "0.0.0.0/0");
        assert_eq!(config.key(&request("2001:db8::1", &[])).unwrap(), "::/0");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_treated_as_ipv4() {
        let request = request("::ffff:203.0.113.7", &[]);
        let config = ClientIp::new();
        assert_eq!(client(&config, &request), ip(CLIENT));
        assert_eq!(config.key(&request).unwrap(), "203.0.113.7");
    }

    #[test]
    fn ipv4_mapped_peer_matches_ipv4_trusted_network() {
        let request = request("::ffff:10.0.0.1", &[("x-forwarded-for", CLIENT)]);
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn trusted_proxies_accept_networks_and_bare_addresses() {
        let proxies =
            TrustedProxies::parse(["10.0.0.0/8", " 127.0.0.1 ", "::1", "fd00::/8"]).unwrap();
        assert!(proxies.contains(ip("10.200.0.1")));
        assert!(proxies.contains(ip("127.0.0.1")));
        assert!(!proxies.contains(ip("127.0.0.2")));
        assert!(proxies.contains(ip("::1")));
        assert!(proxies.contains(ip("fd12::1")));
        assert!(!proxies.contains(ip(CLIENT)));
    }

    #[test]
    fn no_trusted_proxies_contain_nothing() {
        assert!(TrustedProxies::none().is_empty());
        assert!(!TrustedProxies::none().contains(ip("127.0.0.1")));
        assert!(
            TrustedProxies::parse(Vec::<String>::new())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn invalid_trusted_proxy_names_the_entry() {
        let error = TrustedProxies::parse(["10.0.0.0/8", "proxy.internal"]).unwrap_err();
        assert_eq!(error.entry, "proxy.internal");
        assert!(error.to_string().contains("proxy.internal"), "{error}");
    }

    #[test]
    fn trusted_proxy_prefix_longer_than_the_address_is_rejected() {
        let error = TrustedProxies::parse(["10.0.0.0/33"]).unwrap_err();
        assert!(error.reason.contains("0 to 32"), "{error}");
    }

    #[test]
    fn trusted_proxy_with_port_is_rejected() {
        let error = TrustedProxies::parse(["10.0.0.1:8080"]).unwrap_err();
        assert!(error.reason.contains("port"), "{error}");
    }

    #[test]
    fn empty_trusted_proxy_entry_is_rejected() {
        let error = TrustedProxies::parse([""]).unwrap_err();
        assert!(error.reason.contains("empty"), "{error}");
    }
}
