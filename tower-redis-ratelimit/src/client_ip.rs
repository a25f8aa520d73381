//! Which client a request comes from, for keying rate limits.
//!
//! The client address comes from the shared forwarding model of
//! [`tower_redis_core::forwarding`]: the socket peer address, or, when that
//! peer is a trusted proxy, the rightmost address that is not a trusted proxy
//! in the one header those proxies are configured to write. A request never
//! chooses which forwarding header is read.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tower_redis_core::forwarding::{Forwarding, ForwardingHeader};
pub use tower_redis_core::forwarding::{InvalidProxy, TrustedProxies};

/// How to find the client address of a request and turn it into a
/// rate-limit key.
///
/// By default no proxy is trusted, IPv4 clients are keyed by their full
/// address and IPv6 clients by their `/64` network (one customer site usually
/// owns a whole `/64`, so keying by full address would let it rotate freely).
#[derive(Debug, Clone)]
pub struct ClientIp {
    forwarding: Forwarding,
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
            forwarding: Forwarding::none(),
            ipv6_prefix: 64,
            ipv4_prefix: 32,
        }
    }

    /// Reads `X-Forwarded-For` when the peer is one of these proxies; the
    /// proxies must append to it (or overwrite it). Proxies that write
    /// `Forwarded` instead are configured with [`forwarding`](Self::forwarding).
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.forwarding = Forwarding::new(proxies, ForwardingHeader::XForwardedFor);
        self
    }

    /// Uses the shared forwarding model: the trusted proxies and the one
    /// header they write. Give the same value to the cache layer.
    pub fn forwarding(mut self, forwarding: Forwarding) -> Self {
        self.forwarding = forwarding;
        self
    }

    /// The forwarding model in use.
    pub fn forwarding_model(&self) -> &Forwarding {
        &self.forwarding
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
    /// the peer is a trusted proxy, the configured forwarding header is
    /// walked from the right, skipping trusted proxies; the first other
    /// address is the client. An entry that is not an address (`unknown`, an
    /// obfuscated identifier, garbage) ends the walk at the last trusted hop.
    /// IPv4-mapped IPv6 addresses are returned as IPv4.
    pub fn client_addr<B>(&self, request: &http::Request<B>) -> Option<IpAddr> {
        self.forwarding
            .client_addr(request.headers(), request.extensions())
    }

    /// The rate-limit key of the client of `request`: its address masked to
    /// the configured prefix, e.g. `203.0.113.7` or `2001:db8:1:2::/64`.
    pub fn key<B>(&self, request: &http::Request<B>) -> Option<String> {
        self.client_addr(request).map(|ip| self.key_for(ip))
    }

    /// [`client_addr`](Self::client_addr) for a request already split into parts.
    pub(crate) fn client_addr_of_parts(&self, parts: &http::request::Parts) -> Option<IpAddr> {
        self.forwarding
            .client_addr(&parts.headers, &parts.extensions)
    }

    /// [`key`](Self::key) for a request already split into parts.
    pub(crate) fn key_of_parts(&self, parts: &http::request::Parts) -> Option<String> {
        self.client_addr_of_parts(parts).map(|ip| self.key_for(ip))
    }

    fn key_for(&self, ip: IpAddr) -> String {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.ipv4_prefix))
                    .unwrap_or(0);
                let network = Ipv4Addr::from(u32::from(v4) & mask);
                ipv4_key(network, self.ipv4_prefix)
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
}

/// What [`network_key`] writes for an IPv4 network (`a.b.c.d`, then
/// `/prefix` when it is not 32), built by hand: this runs on every request
/// of a per-IP policy, and the formatting machinery was a measurable share
/// of a decision.
fn ipv4_key(network: Ipv4Addr, prefix: u8) -> String {
    let mut key = String::with_capacity(18);
    let mut number = itoa::Buffer::new();
    for (i, octet) in network.octets().into_iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        key.push_str(number.format(octet));
    }
    if prefix != 32 {
        key.push('/');
        key.push_str(number.format(prefix));
    }
    key
}

fn network_key(network: impl fmt::Display, prefix: u8, full: u8) -> String {
    if prefix == full {
        network.to_string()
    } else {
        format!("{network}/{prefix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};
    use std::net::SocketAddr;

    const PROXY: &str = "10.0.0.1";
    const CLIENT: &str = "203.0.113.7";

    #[test]
    fn an_ipv4_key_is_written_as_the_formatter_would() {
        for prefix in [32, 31, 24, 8, 1, 0] {
            for octet in 0..=255u8 {
                let network = Ipv4Addr::new(octet, 255 - octet, octet / 3, octet % 10);
                assert_eq!(
                    ipv4_key(network, prefix),
                    network_key(network, prefix, 32),
                    "{network}/{prefix}"
                );
            }
        }
    }

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

    /// Behind proxies that write `Forwarded` (RFC 7239).
    fn behind_forwarded_proxies() -> ClientIp {
        ClientIp::new().forwarding(Forwarding::new(
            TrustedProxies::parse(["10.0.0.0/8", "fd00::/8"]).unwrap(),
            ForwardingHeader::Forwarded,
        ))
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
            tower_redis_core::forwarding::X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"198.51.100.1, \xff\xfe").unwrap(),
        );
        headers.append(
            tower_redis_core::forwarding::X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.2"),
        );
        assert_eq!(client(&behind_proxies(), &request), ip("10.0.0.2"));

        let mut forwarded = self::request(PROXY, &[]);
        forwarded.headers_mut().append(
            http::header::FORWARDED,
            HeaderValue::from_bytes(b"for=\xc3\x28").unwrap(),
        );
        assert_eq!(client(&behind_forwarded_proxies(), &forwarded), ip(PROXY));
    }

    #[test]
    fn number_of_examined_entries_is_capped() {
        // More trusted hops than the walk examines (32).
        let hops = vec!["10.0.0.2"; 42].join(", ");
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
        assert_eq!(
            client(&behind_forwarded_proxies(), &request),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn a_client_forwarded_header_cannot_override_the_configured_xff() {
        // The proxies write X-Forwarded-For and pass a client's `Forwarded`
        // on untouched: it must not choose the client address.
        let request = request(
            PROXY,
            &[
                ("forwarded", "for=198.51.100.99;proto=https"),
                ("x-forwarded-for", CLIENT),
            ],
        );
        assert_eq!(client(&behind_proxies(), &request), ip(CLIENT));
    }

    #[test]
    fn a_client_xff_header_cannot_override_the_configured_forwarded() {
        let request = request(
            PROXY,
            &[
                ("forwarded", "proto=https;host=example.com"),
                ("x-forwarded-for", "198.51.100.99"),
            ],
        );
        assert_eq!(client(&behind_forwarded_proxies(), &request), ip(PROXY));
    }

    #[test]
    fn obfuscated_forwarded_node_stops_the_walk() {
        let config = behind_forwarded_proxies();
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
        assert_eq!(client(&behind_forwarded_proxies(), &request), ip(PROXY));
    }

    #[test]
    fn unterminated_quote_cannot_swallow_the_entries_of_our_proxies() {
        let request = request(
            PROXY,
            &[("forwarded", "for=\"198.51.100.1, for=203.0.113.7")],
        );
        assert_eq!(client(&behind_forwarded_proxies(), &request), ip(CLIENT));
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
}
