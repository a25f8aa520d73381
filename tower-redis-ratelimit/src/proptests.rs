//! Property tests for the forwarding-header parser (`Forwarded`,
//! `X-Forwarded-For`): it never panics on arbitrary bytes, a peer that is
//! not a trusted proxy always keys by its own address whatever it sends, the
//! client our proxies appended is found whatever a client put to its left,
//! and keys are bounded in length and are addresses or networks.
//!
//! `PROPTEST_CASES` sets the number of cases per property (proptest reads
//! it itself; default 256);
//! run longer with e.g.
//! `PROPTEST_CASES=100000 cargo test -p tower-redis-ratelimit --lib proptests`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{HeaderValue, Request};
use ipnet::IpNet;
use proptest::prelude::*;

use tower_redis_core::forwarding::{Forwarding, ForwardingHeader};

use crate::client_ip::{ClientIp, TrustedProxies};

const PROXIES: [&str; 2] = ["10.0.0.0/8", "fd00::/8"];

fn behind_proxies() -> ClientIp {
    ClientIp::new().trusted_proxies(TrustedProxies::parse(PROXIES).expect("valid"))
}

fn behind_forwarded_proxies() -> ClientIp {
    ClientIp::new().forwarding(Forwarding::new(
        TrustedProxies::parse(PROXIES).expect("valid"),
        ForwardingHeader::Forwarded,
    ))
}

/// Bytes a header value may hold, biased towards the parsers' separators.
fn value_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => prop::sample::select(b",;=\"\\[]:._ 0123456789abcdefforFOR".to_vec()),
        3 => 0x20u8..0x7f,
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    prop::collection::vec(byte, 0..160)
}

/// Like [`value_bytes`] but only visible ASCII, as a client can put into a
/// header that a proxy then appends to.
fn ascii_junk() -> impl Strategy<Value = String> {
    "[ -~]{0,80}"
}

/// An address that is not a trusted proxy.
fn public_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
    ]
    .prop_map(|ip| ip.to_canonical())
    .prop_filter("not a trusted proxy", |ip| {
        !TrustedProxies::parse(PROXIES).expect("valid").contains(*ip)
    })
}

fn proxy_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff)))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(
            (0xfd00u128 << 112) | (n & ((1u128 << 112) - 1))
        ))),
    ]
}

/// An address as a node of `X-Forwarded-For`, in one of the forms proxies write.
fn xff_node(ip: IpAddr, style: u8, port: u16) -> String {
    match (ip, style % 3) {
        (IpAddr::V4(v4), 0) => v4.to_string(),
        (IpAddr::V4(v4), _) => format!("{v4}:{port}"),
        (IpAddr::V6(v6), 0) => v6.to_string(),
        (IpAddr::V6(v6), 1) => format!("[{v6}]"),
        (IpAddr::V6(v6), _) => format!("[{v6}]:{port}"),
    }
}

/// An address as a `Forwarded` element.
fn forwarded_node(ip: IpAddr, style: u8, port: u16) -> String {
    match (ip, style % 3) {
        (IpAddr::V4(v4), 0) => format!("for={v4}"),
        (IpAddr::V4(v4), 1) => format!("for=\"{v4}:{port}\";proto=https"),
        (IpAddr::V4(v4), _) => format!("proto=http;For={v4}"),
        (IpAddr::V6(v6), 0) => format!("for=\"[{v6}]\""),
        (IpAddr::V6(v6), _) => format!("for=\"[{v6}]:{port}\";by=_proxy"),
    }
}

fn request(peer: IpAddr, headers: &[(&'static str, Vec<u8>)]) -> Request<()> {
    let mut request = Request::builder()
        .extension(SocketAddr::new(peer, 40_000))
        .body(())
        .expect("request");
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            request.headers_mut().append(*name, value);
        }
    }
    request
}

fn key_is_bounded_and_an_address(key: &str) -> bool {
    key.len() <= "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128".len()
        && (key.parse::<IpAddr>().is_ok() || key.parse::<IpNet>().is_ok())
}

proptest! {
    #[test]
    fn arbitrary_forwarding_headers_never_panic_and_keys_stay_bounded(
        xff in prop::collection::vec(value_bytes(), 0..4),
        forwarded in prop::collection::vec(value_bytes(), 0..4),
        peer_is_proxy in any::<bool>(),
        client in public_ip(),
        proxy in proxy_ip(),
        v6_prefix in 0u8..=255,
        v4_prefix in 0u8..=255,
    ) {
        let peer = if peer_is_proxy { proxy } else { client };
        let mut headers = Vec::new();
        headers.extend(xff.into_iter().map(|v| ("x-forwarded-for", v)));
        headers.extend(forwarded.into_iter().map(|v| ("forwarded", v)));
        let request = request(peer, &headers);
        for config in [behind_proxies(), behind_forwarded_proxies()] {
            let config = config.ipv6_prefix(v6_prefix).ipv4_prefix(v4_prefix);
            let found = config.client_addr(&request).expect("a peer address is set");
            if !peer_is_proxy {
                prop_assert_eq!(found, peer);
            }
            let key = config.key(&request).expect("a peer address is set");
            prop_assert!(key_is_bounded_and_an_address(&key), "{key}");
        }
    }

    #[test]
    fn an_untrusted_peer_always_keys_by_its_own_address(
        xff in value_bytes(),
        forwarded in value_bytes(),
        peer in public_ip(),
    ) {
        let request = request(peer, &[("x-forwarded-for", xff), ("forwarded", forwarded)]);
        prop_assert_eq!(behind_proxies().client_addr(&request), Some(peer));
        prop_assert_eq!(behind_forwarded_proxies().client_addr(&request), Some(peer));
        prop_assert_eq!(ClientIp::new().client_addr(&request), Some(peer));
    }

    #[test]
    fn the_client_our_proxies_appended_wins_over_anything_to_its_left_xff(
        junk in ascii_junk(),
        client in public_ip(),
        hops in prop::collection::vec(proxy_ip(), 0..4),
        style in any::<u8>(),
        port in any::<u16>(),
        peer in proxy_ip(),
        split_lines in any::<bool>(),
    ) {
        let mut ours = vec![xff_node(client, style, port)];
        ours.extend(hops.iter().map(|h| xff_node(*h, style / 3, port)));
        let headers = if split_lines {
            vec![("x-forwarded-for", junk.into_bytes()), ("x-forwarded-for", ours.join(", ").into_bytes())]
        } else {
            vec![("x-forwarded-for", format!("{junk}, {}", ours.join(",")).into_bytes())]
        };
        let request = request(peer, &headers);
        prop_assert_eq!(behind_proxies().client_addr(&request), Some(client));
    }

    #[test]
    fn the_client_our_proxies_appended_wins_over_anything_to_its_left_forwarded(
        junk in ascii_junk(),
        client in public_ip(),
        hops in prop::collection::vec(proxy_ip(), 0..4),
        style in any::<u8>(),
        port in any::<u16>(),
        peer in proxy_ip(),
    ) {
        let mut ours = vec![forwarded_node(client, style, port)];
        ours.extend(hops.iter().map(|h| forwarded_node(*h, style / 3, port)));
        let headers = vec![
            ("forwarded", junk.into_bytes()),
            ("forwarded", ours.join(", ").into_bytes()),
        ];
        let request = request(peer, &headers);
        prop_assert_eq!(behind_forwarded_proxies().client_addr(&request), Some(client));
    }

    #[test]
    fn a_forwarded_header_a_client_sends_never_picks_the_xff_client(
        forwarded in value_bytes(),
        client in public_ip(),
        hops in prop::collection::vec(proxy_ip(), 0..4),
        peer in proxy_ip(),
    ) {
        // Behind proxies that append to X-Forwarded-For, a client's own
        // `Forwarded` is passed on untouched; whatever it holds, the client
        // is the one the proxies appended to X-Forwarded-For.
        let mut ours = vec![client.to_string()];
        ours.extend(hops.iter().map(ToString::to_string));
        let request = request(
            peer,
            &[("forwarded", forwarded), ("x-forwarded-for", ours.join(", ").into_bytes())],
        );
        prop_assert_eq!(behind_proxies().client_addr(&request), Some(client));
    }

    #[test]
    fn bytes_a_client_sends_cannot_hide_the_entries_our_proxies_append(
        junk in value_bytes(),
        client in public_ip(),
        peer in proxy_ip(),
    ) {
        // The proxy appends to the client's line, as nginx's
        // `$proxy_add_x_forwarded_for` does: one line, client bytes first.
        let mut line = junk;
        line.extend_from_slice(format!(", {client}").as_bytes());
        let request = request(peer, &[("x-forwarded-for", line.clone())]);
        if HeaderValue::from_bytes(&line).is_ok() {
            prop_assert_eq!(behind_proxies().client_addr(&request), Some(client));
        }
    }

    #[test]
    fn bytes_a_client_sends_cannot_hide_the_elements_our_proxies_append_forwarded(
        junk in value_bytes(),
        client in public_ip(),
        hops in prop::collection::vec(proxy_ip(), 0..4),
        style in any::<u8>(),
        port in any::<u16>(),
        peer in proxy_ip(),
        split_lines in any::<bool>(),
    ) {
        // Proxies configured for `Forwarded` append their elements to what
        // the client sent: on the client's own line (one line, client bytes
        // first), or on a line of their own.
        let mut ours = vec![forwarded_node(client, style, port)];
        ours.extend(hops.iter().map(|h| forwarded_node(*h, style / 3, port)));
        let headers = if split_lines {
            vec![("forwarded", junk), ("forwarded", ours.join(", ").into_bytes())]
        } else {
            let mut line = junk;
            line.extend_from_slice(format!(", {}", ours.join(", ")).as_bytes());
            vec![("forwarded", line)]
        };
        prop_assert!(headers.iter().all(|(_, v)| HeaderValue::from_bytes(v).is_ok()));
        let request = request(peer, &headers);
        prop_assert_eq!(behind_forwarded_proxies().client_addr(&request), Some(client));
    }
}

/// The smallest case the property above found before the fix: one byte
/// that is not text, left of the client, hid the whole line.
#[test]
fn a_non_text_byte_left_of_the_client_does_not_hide_it() {
    let client: IpAddr = "203.0.113.7".parse().expect("address");
    let peer: IpAddr = "10.0.0.1".parse().expect("address");
    let line = b"\x80, 203.0.113.7".to_vec();
    let request = request(peer, &[("x-forwarded-for", line)]);
    assert_eq!(behind_proxies().client_addr(&request), Some(client));
}
