//! Who sent a request, through which proxies: one forwarding model shared by
//! every tower-redis layer (feature `forwarding`).
//!
//! The socket peer address is the only address nobody can forge. Forwarding
//! headers are read only when that peer is a proxy the operator declared
//! trusted, and then only the one header the operator says those proxies
//! write ([`ForwardingHeader`]): a request never chooses which header is read.
//! Proxies append the address they received the request from, so the entries
//! our own proxies wrote sit at the right end and anything a client sent sits
//! to the left. The walk skips trusted proxies and stops at the first address
//! that is not one of them; it never takes the leftmost entry on faith, and
//! it never reads past an entry it cannot parse.
//!
//! Configure it once and give the same [`Forwarding`] to every layer:
//!
//! ```
//! use tower_redis_core::forwarding::{Forwarding, ForwardingHeader, TrustedProxies};
//!
//! let forwarding = Forwarding::new(
//!     TrustedProxies::parse(["10.0.0.0/8", "fd00::/8"])?,
//!     ForwardingHeader::XForwardedFor,
//! );
//! let request = http::Request::builder()
//!     .uri("/cart")
//!     .header("host", "shop.example")
//!     .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
//!     .header("x-forwarded-proto", "https")
//!     .extension(std::net::SocketAddr::from(([10, 0, 0, 1], 40000)))
//!     .body(())?;
//! let view = forwarding.view(&request);
//! assert_eq!(view.client, Some("203.0.113.7".parse()?));
//! assert_eq!(view.scheme.as_ref().map(|s| s.as_str()), Some("https"));
//! assert!(view.via_trusted_proxy);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{FORWARDED, HeaderMap, HeaderName};
use http::uri::{Authority, Scheme};
use ipnet::IpNet;

/// At most this many forwarding-header entries are examined per request, so
/// that a huge header costs bounded work.
const MAX_HOPS: usize = 32;

/// `X-Forwarded-For`, which `http` has no constant for.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Forwarded-Port`.
pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// Request headers that proxies use to describe the original request. A
/// response to a request carrying one of them from a peer that is not a
/// trusted proxy must not shape a shared answer.
pub const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-scheme",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-real-ip",
];

/// Which header the trusted proxies write. Chosen by configuration, never by
/// the request: the other family is ignored (and a warning logged once) when
/// a trusted proxy's request carries it, because proxies pass on what a
/// client sent in a header they do not manage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardingHeader {
    /// `X-Forwarded-For` for the client (nginx, HAProxy, AWS ALB, Google
    /// Cloud Load Balancing, Azure, Cloudflare), with `X-Forwarded-Proto`,
    /// `X-Forwarded-Host` and `X-Forwarded-Port` for the scheme, host and
    /// port. The proxies must append to `X-Forwarded-For` and set
    /// (overwrite) the others when present; the value the nearest proxy
    /// wrote (the rightmost) is read. A host the proxy does not set is taken
    /// from `Host`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded`: `for=`, `proto=` and `host=` of the element the
    /// first trusted proxy appended.
    Forwarded,
}

impl std::str::FromStr for ForwardingHeader {
    type Err = InvalidProxy;

    /// `x-forwarded-for` (or `xff`) and `forwarded`, in any case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("x-forwarded-for") || text.eq_ignore_ascii_case("xff") {
            Ok(Self::XForwardedFor)
        } else if text.eq_ignore_ascii_case("forwarded") {
            Ok(Self::Forwarded)
        } else {
            Err(InvalidProxy {
                entry: text.to_owned(),
                reason: "not a forwarding header; write x-forwarded-for or forwarded".to_owned(),
            })
        }
    }
}

impl ForwardingHeader {
    fn name(self) -> &'static str {
        match self {
            Self::XForwardedFor => "X-Forwarded-For",
            Self::Forwarded => "Forwarded",
        }
    }
}

/// The trusted proxies and the header they write: how every layer finds the
/// client address, scheme and host of a request. Cheap to clone; build it
/// once and hand the same value to each layer.
///
/// The default trusts no proxy: the socket peer is the client, and requests
/// carrying forwarding headers are treated as coming from an untrusted peer.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    trusted: TrustedProxies,
    header: ForwardingHeader,
    /// Whether the "forwarding headers ignored: no proxy trusted" warning
    /// was logged.
    warned_untrusted: AtomicBool,
    /// Whether the "the other forwarding header is ignored" warning was logged.
    warned_other: AtomicBool,
}

/// What [`Forwarding::view`] found out about a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestView {
    /// The socket peer address (from axum's `ConnectInfo<SocketAddr>`, a
    /// `SocketAddr` or an `IpAddr` extension), if the request carries one.
    pub peer: Option<IpAddr>,
    /// Whether the peer is a trusted proxy, so that the forwarding header
    /// was read.
    pub via_trusted_proxy: bool,
    /// The client address: the rightmost address in the configured header
    /// that is not a trusted proxy, or the peer.
    pub client: Option<IpAddr>,
    /// The scheme the client used, as the trusted proxy reported it
    /// (`http` or `https`); `None` when the peer is not a trusted proxy or
    /// the proxy did not say.
    pub scheme: Option<Scheme>,
    /// The host the client asked for, as the trusted proxy reported it;
    /// `None` when the peer is not a trusted proxy or the proxy did not say.
    pub host: Option<Authority>,
    /// The port the client connected to, as the trusted proxy reported it
    /// (`X-Forwarded-Port`; `ForwardingHeader::XForwardedFor` only).
    pub port: Option<u16>,
    /// A trusted proxy sent a scheme or host that is not valid, so the
    /// request's origin is uncertain.
    pub malformed: bool,
}

impl Forwarding {
    /// Trusts no proxy.
    pub fn none() -> Self {
        Self::default()
    }

    /// Trusts `proxies`, which write `header`.
    pub fn new(proxies: TrustedProxies, header: ForwardingHeader) -> Self {
        Self {
            inner: Arc::new(Inner {
                trusted: proxies,
                header,
                ..Inner::default()
            }),
        }
    }

    /// From the environment: `TRUSTED_PROXIES` (comma-separated addresses
    /// or CIDRs; unset or empty trusts none) and `FORWARDING_HEADER`
    /// (`x-forwarded-for`, the default, or `forwarded`).
    ///
    /// ```
    /// # use tower_redis_core::forwarding::Forwarding;
    /// // With neither variable set, no proxy is trusted.
    /// # if std::env::var_os("TRUSTED_PROXIES").is_none() {
    /// assert!(Forwarding::from_env()?.is_empty());
    /// # }
    /// # Ok::<(), tower_redis_core::forwarding::InvalidProxy>(())
    /// ```
    pub fn from_env() -> Result<Self, InvalidProxy> {
        let proxies = std::env::var("TRUSTED_PROXIES").unwrap_or_default();
        let proxies =
            TrustedProxies::parse(proxies.split(',').map(str::trim).filter(|p| !p.is_empty()))?;
        let header = match std::env::var("FORWARDING_HEADER") {
            Ok(header) if !header.trim().is_empty() => header.parse()?,
            _ => ForwardingHeader::default(),
        };
        Ok(Self::new(proxies, header))
    }

    /// The trusted proxies.
    pub fn trusted_proxies(&self) -> &TrustedProxies {
        &self.inner.trusted
    }

    /// The header the trusted proxies write.
    pub fn header(&self) -> ForwardingHeader {
        self.inner.header
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.inner.trusted.is_empty()
    }

    /// The client address, scheme and host of `request`.
    pub fn view<B>(&self, request: &http::Request<B>) -> RequestView {
        self.view_of(request.headers(), request.extensions())
    }

    /// [`view`](Self::view) for a request's headers and extensions.
    pub fn view_of(&self, headers: &HeaderMap, extensions: &http::Extensions) -> RequestView {
        let Some(peer) = peer_addr(extensions).map(|ip| ip.to_canonical()) else {
            return RequestView::default();
        };
        if !self.inner.trusted.contains(peer) {
            if self.inner.trusted.is_empty() && has_forwarding_header(headers) {
                warn_once(
                    &self.inner.warned_untrusted,
                    warn_forwarding_headers_ignored,
                );
            }
            return RequestView {
                peer: Some(peer),
                client: Some(peer),
                ..RequestView::default()
            };
        }
        let mut view = RequestView {
            peer: Some(peer),
            via_trusted_proxy: true,
            ..RequestView::default()
        };
        match self.inner.header {
            ForwardingHeader::XForwardedFor => {
                if headers.contains_key(FORWARDED) {
                    warn_once(&self.inner.warned_other, || {
                        warn_other_header_ignored(ForwardingHeader::XForwardedFor, "Forwarded");
                    });
                }
                view.client = Some(self.walk(peer, x_forwarded_for_hops(headers)).0);
                view.scheme =
                    read_scheme(last_value(headers, X_FORWARDED_PROTO), &mut view.malformed);
                view.host = read_host(last_value(headers, X_FORWARDED_HOST), &mut view.malformed);
                view.port = read_port(last_value(headers, X_FORWARDED_PORT), &mut view.malformed);
            }
            ForwardingHeader::Forwarded => {
                if headers.contains_key(X_FORWARDED_FOR) {
                    warn_once(&self.inner.warned_other, || {
                        warn_other_header_ignored(ForwardingHeader::Forwarded, "X-Forwarded-For");
                    });
                }
                let (client, element) = self.walk_forwarded(peer, headers);
                view.client = Some(client);
                if self.client_elements_name_an_origin(headers) {
                    // A client's own elements, to the left of the one our
                    // proxy appended, say another host or scheme; an app
                    // reading the first element would build its answer
                    // for those.
                    view.malformed = true;
                }
                if let Some(element) = element {
                    view.scheme =
                        read_scheme(element.proto.as_deref().map(Some), &mut view.malformed);
                    view.host = read_host(element.host.as_deref().map(Some), &mut view.malformed);
                }
            }
        }
        view
    }

    /// The client address of a request's headers and extensions, or `None`
    /// when the request carries no peer address.
    pub fn client_addr(
        &self,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Option<IpAddr> {
        self.view_of(headers, extensions).client
    }

    /// Walks `hops` (rightmost first); returns the client address and the
    /// index of the hop it came from (`None` when it is the peer itself or
    /// a trusted hop).
    fn walk(&self, peer: IpAddr, hops: impl Iterator<Item = Hop>) -> (IpAddr, Option<usize>) {
        let mut last_trusted = peer;
        for (index, hop) in hops.take(MAX_HOPS).enumerate() {
            match hop {
                Hop::Empty => {}
                Hop::Addr(ip) if self.inner.trusted.contains(ip) => last_trusted = ip,
                Hop::Addr(ip) => return (ip, Some(index)),
                Hop::Opaque => {
                    tracing::debug!(
                        client = %last_trusted,
                        "unparseable forwarding entry; using the last trusted hop as the client"
                    );
                    return (last_trusted, None);
                }
            }
        }
        (last_trusted, None)
    }

    /// Whether an element to the left of where the walk stopped (the one
    /// naming the client, or one whose `for=` hides it) carries `host=` or
    /// `proto=`: those were written by the client, not by our proxies. All
    /// of them are read, however many (the header's size is the server's
    /// to bound): a client must not hide one behind padding.
    fn client_elements_name_an_origin(&self, headers: &HeaderMap) -> bool {
        let stop = forwarded_hops(headers)
            .take(MAX_HOPS)
            .position(|hop| match hop {
                Hop::Empty => false,
                Hop::Addr(ip) => !self.inner.trusted.contains(ip),
                Hop::Opaque => true,
            });
        let Some(index) = stop else {
            return false;
        };
        list_entries(headers, FORWARDED)
            .skip(index + 1)
            .any(|entry| {
                entry.is_none_or(|text| {
                    text.split(';').any(|pair| {
                        pair.split_once('=').is_some_and(|(key, _)| {
                            let key = key.trim();
                            key.eq_ignore_ascii_case("host") || key.eq_ignore_ascii_case("proto")
                        })
                    })
                })
            })
    }

    /// The `Forwarded` walk, also returning the element the first trusted
    /// proxy appended (the one naming the client), whose `proto` and `host`
    /// describe the client's request.
    fn walk_forwarded<'h>(
        &self,
        peer: IpAddr,
        headers: &'h HeaderMap,
    ) -> (IpAddr, Option<Node<'h>>) {
        let (client, index) = self.walk(peer, forwarded_hops(headers));
        let node = index
            .and_then(|index| forwarded_elements(headers).nth(index))
            .and_then(|element| match element {
                Element::For(node) => Some(node),
                _ => None,
            });
        (client, node)
    }
}

/// The socket peer address of a request: axum's `ConnectInfo<SocketAddr>`
/// (feature `axum`), else a `SocketAddr`, else an `IpAddr` extension.
pub fn peer_addr(extensions: &http::Extensions) -> Option<IpAddr> {
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

/// The one value of `name`, which the trusted proxy set. `Some(None)` when
/// it is present but unreadable, empty, or holds more than one value (on
/// several lines or separated by commas): frameworks disagree on which of
/// several values counts (the first, the last, the whole line), so the
/// answer an app builds from it cannot be known.
fn last_value(headers: &HeaderMap, name: HeaderName) -> Option<Option<&str>> {
    let mut entries = list_entries(headers, name);
    let only = entries.next()?;
    if entries.next().is_some() {
        return Some(None);
    }
    Some(only.map(str::trim).filter(|text| !text.is_empty()))
}

fn read_scheme(value: Option<Option<&str>>, malformed: &mut bool) -> Option<Scheme> {
    match value? {
        Some(text) if text.eq_ignore_ascii_case("https") => Some(Scheme::HTTPS),
        Some(text) if text.eq_ignore_ascii_case("http") => Some(Scheme::HTTP),
        _ => {
            *malformed = true;
            None
        }
    }
}

fn read_port(value: Option<Option<&str>>, malformed: &mut bool) -> Option<u16> {
    let parsed = value?.and_then(|text| text.parse::<u16>().ok());
    if parsed.is_none() {
        *malformed = true;
    }
    parsed
}

fn read_host(value: Option<Option<&str>>, malformed: &mut bool) -> Option<Authority> {
    let parsed = value?
        .filter(|text| !text.is_empty() && !text.contains('@'))
        .and_then(|text| text.parse::<Authority>().ok());
    if parsed.is_none() {
        *malformed = true;
    }
    parsed
}

/// Runs `warn` the first time only, per configuration (clones share it).
fn warn_once(flag: &AtomicBool, warn: impl FnOnce()) {
    if !flag.load(Ordering::Relaxed) && !flag.swap(true, Ordering::Relaxed) {
        warn();
    }
}

fn has_forwarding_header(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED) || headers.contains_key(X_FORWARDED_FOR)
}

fn warn_forwarding_headers_ignored() {
    {
        tracing::warn!(
            "ignoring Forwarded/X-Forwarded-For headers because no proxy is trusted; the socket \
             peer address is used as the client address. If this service runs behind a reverse \
             proxy or load balancer, configure Forwarding::new(TrustedProxies::parse([..])?, \
             ForwardingHeader::XForwardedFor) with its addresses and give it to each layer"
        );
    }
}

fn warn_other_header_ignored(configured: ForwardingHeader, other: &'static str) {
    {
        tracing::warn!(
            configured = configured.name(),
            ignored = other,
            "a request from a trusted proxy carries {other}, which is ignored: the trusted \
             proxies are configured to write {}, and a proxy passes a client's {other} on \
             untouched. If your proxies write {other}, configure ForwardingHeader accordingly",
            configured.name()
        );
    }
}

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

    /// The networks, as parsed.
    pub fn networks(&self) -> &[IpNet] {
        &self.networks
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

fn forwarded_hops(headers: &HeaderMap) -> impl Iterator<Item = Hop> + '_ {
    forwarded_elements(headers).map(|element| match element {
        Element::Empty => Hop::Empty,
        Element::For(node) => parse_node(&node.node).map_or(Hop::Opaque, Hop::Addr),
        // A proxy that withheld or mangled the address it saw hides everything
        // to its left.
        Element::NoFor | Element::Malformed => Hop::Opaque,
    })
}

/// One element of a `Forwarded` header (RFC 7239, section 4).
#[derive(Debug, PartialEq, Eq)]
enum Element<'a> {
    Empty,
    For(Node<'a>),
    NoFor,
    Malformed,
}

/// The parameters of an element that names a node.
#[derive(Debug, PartialEq, Eq)]
struct Node<'a> {
    node: Cow<'a, str>,
    proto: Option<Cow<'a, str>>,
    host: Option<Cow<'a, str>>,
}

fn parse_element(element: &str) -> Element<'_> {
    if element.trim().is_empty() {
        return Element::Empty;
    }
    let (mut node, mut proto, mut host) = (None, None, None);
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
        let slot = match key.trim() {
            key if key.eq_ignore_ascii_case("for") => &mut node,
            key if key.eq_ignore_ascii_case("proto") => &mut proto,
            key if key.eq_ignore_ascii_case("host") => &mut host,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            // Each parameter may occur once per element.
            return Element::Malformed;
        }
    }
    node.map_or(Element::NoFor, |node| {
        Element::For(Node { node, proto, host })
    })
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

    fn proxies() -> TrustedProxies {
        TrustedProxies::parse(["10.0.0.0/8", "fd00::/8"]).unwrap()
    }

    fn xff() -> Forwarding {
        Forwarding::new(proxies(), ForwardingHeader::XForwardedFor)
    }

    fn forwarded() -> Forwarding {
        Forwarding::new(proxies(), ForwardingHeader::Forwarded)
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

    #[test]
    fn a_client_forwarded_header_is_ignored_when_proxies_write_xff() {
        let request = request(
            PROXY,
            &[
                ("forwarded", "for=198.51.100.99"),
                ("x-forwarded-for", CLIENT),
            ],
        );
        assert_eq!(xff().view(&request).client, Some(ip(CLIENT)));
    }

    #[test]
    fn a_client_xff_header_is_ignored_when_proxies_write_forwarded() {
        let request = request(
            PROXY,
            &[
                ("forwarded", "for=203.0.113.7"),
                ("x-forwarded-for", "198.51.100.99"),
            ],
        );
        assert_eq!(forwarded().view(&request).client, Some(ip(CLIENT)));
        let only_xff = self::request(PROXY, &[("x-forwarded-for", "198.51.100.99")]);
        assert_eq!(forwarded().view(&only_xff).client, Some(ip(PROXY)));
    }

    #[test]
    fn untrusted_peers_get_no_scheme_or_host_from_headers() {
        let request = request(
            CLIENT,
            &[
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "evil.example"),
                ("forwarded", "for=1.2.3.4;proto=http;host=evil.example"),
            ],
        );
        for forwarding in [xff(), forwarded(), Forwarding::none()] {
            let view = forwarding.view(&request);
            assert_eq!(view.client, Some(ip(CLIENT)));
            assert!(!view.via_trusted_proxy);
            assert_eq!(view.scheme, None);
            assert_eq!(view.host, None);
        }
    }

    #[test]
    fn xff_mode_reads_the_proto_and_host_the_nearest_proxy_set() {
        let request = request(
            PROXY,
            &[
                ("x-forwarded-for", CLIENT),
                ("x-forwarded-proto", "HTTPS"),
                ("x-forwarded-host", "shop.example:8443"),
                ("x-forwarded-port", "8443"),
            ],
        );
        let view = xff().view(&request);
        assert_eq!(view.port, Some(8443));
        assert_eq!(view.scheme, Some(Scheme::HTTPS));
        assert_eq!(
            view.host.as_ref().map(Authority::as_str),
            Some("shop.example:8443")
        );
        assert!(!view.malformed);
    }

    #[test]
    fn forwarded_mode_reads_proto_and_host_of_the_client_element() {
        let request = request(
            PROXY,
            &[(
                "forwarded",
                "for=198.51.100.1;proto=http;host=evil.example, \
                 for=203.0.113.7;proto=https;host=shop.example, for=10.0.0.2;proto=http",
            )],
        );
        let view = forwarded().view(&request);
        assert_eq!(view.client, Some(ip(CLIENT)));
        assert_eq!(view.scheme, Some(Scheme::HTTPS));
        assert_eq!(
            view.host.as_ref().map(Authority::as_str),
            Some("shop.example")
        );
    }

    #[test]
    fn bad_proto_or_host_from_a_trusted_proxy_is_malformed() {
        for (name, value) in [
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "a b"),
            ("x-forwarded-host", "user@evil.example"),
            ("x-forwarded-port", "99999"),
        ] {
            let request = request(PROXY, &[("x-forwarded-for", CLIENT), (name, value)]);
            let view = xff().view(&request);
            assert!(view.malformed, "{name}: {value}");
            assert_eq!(view.scheme, None);
            assert_eq!(view.host, None);
            assert_eq!(view.port, None);
        }
        let mut bytes = request(PROXY, &[]);
        bytes.headers_mut().insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_bytes(b"\xffhttps").unwrap(),
        );
        assert!(xff().view(&bytes).malformed);
    }

    #[test]
    fn several_or_empty_values_of_a_forwarded_field_are_malformed() {
        for headers in [
            vec![
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-host", "shop.example"),
            ],
            vec![("x-forwarded-host", "evil.example, shop.example")],
            vec![("x-forwarded-host", "")],
            vec![("x-forwarded-proto", "http, https")],
            vec![("x-forwarded-port", "80"), ("x-forwarded-port", "443")],
        ] {
            let mut all = vec![("x-forwarded-for", CLIENT)];
            all.extend(headers.iter().copied());
            let view = xff().view(&request(PROXY, &all));
            assert!(view.malformed, "{headers:?}");
            assert_eq!((view.host, view.scheme, view.port), (None, None, None));
        }
    }

    #[test]
    fn a_client_forwarded_element_naming_a_host_or_scheme_is_malformed() {
        let request = request(
            PROXY,
            &[(
                "forwarded",
                "for=1.1.1.1;host=evil.example;proto=http, for=203.0.113.7;host=shop.example;proto=https",
            )],
        );
        let view = forwarded().view(&request);
        assert_eq!(view.client, Some(ip(CLIENT)));
        assert!(view.malformed);
        let clean = self::request(
            PROXY,
            &[(
                "forwarded",
                "for=1.1.1.1, for=203.0.113.7;host=shop.example;proto=https, for=10.0.0.2;proto=http",
            )],
        );
        assert!(!forwarded().view(&clean).malformed);
    }

    /// A client cannot hide its own `host=` / `proto=` element behind
    /// padding (more elements than a walk reads), nor behind an element of
    /// our proxy whose `for=` hides the client (RFC 7239 §6.3).
    #[test]
    fn a_client_element_naming_a_host_is_found_behind_padding_or_a_hidden_client() {
        let mut padded = "for=198.51.100.1;host=evil.example;proto=http".to_owned();
        for _ in 0..2 * MAX_HOPS {
            padded.push_str(", for=198.51.100.2");
        }
        padded.push_str(", for=203.0.113.7;host=shop.example;proto=https");
        let view = forwarded().view(&request(PROXY, &[("forwarded", &padded)]));
        assert_eq!(view.client, Some(ip(CLIENT)));
        assert!(view.malformed, "the padded element was not read");
        for hidden in [
            "for=1.1.1.1;host=evil.example, for=_hidden;host=shop.example;proto=https",
            "for=1.1.1.1;proto=http, for=unknown;host=shop.example;proto=https",
        ] {
            let view = forwarded().view(&request(PROXY, &[("forwarded", hidden)]));
            assert!(view.malformed, "{hidden}");
        }
        // Padding alone, and a hidden client alone, stay clean.
        let mut clean = "for=198.51.100.1".to_owned();
        for _ in 0..2 * MAX_HOPS {
            clean.push_str(", for=198.51.100.2");
        }
        clean.push_str(", for=203.0.113.7;host=shop.example;proto=https");
        assert!(
            !forwarded()
                .view(&request(PROXY, &[("forwarded", &clean)]))
                .malformed
        );
        let hidden = "for=1.1.1.1, for=_hidden;host=shop.example;proto=https";
        assert!(
            !forwarded()
                .view(&request(PROXY, &[("forwarded", hidden)]))
                .malformed
        );
    }

    #[test]
    fn forwarding_header_names_parse() {
        assert_eq!(
            "X-Forwarded-For".parse::<ForwardingHeader>().unwrap(),
            ForwardingHeader::XForwardedFor
        );
        assert_eq!(
            " forwarded ".parse::<ForwardingHeader>().unwrap(),
            ForwardingHeader::Forwarded
        );
        let error = "x-real-ip".parse::<ForwardingHeader>().unwrap_err();
        assert!(
            error.to_string().contains("x-forwarded-for or forwarded"),
            "{error}"
        );
    }

    #[test]
    fn no_peer_address_gives_an_empty_view() {
        let request = Request::builder()
            .header("x-forwarded-for", CLIENT)
            .body(())
            .unwrap();
        assert_eq!(xff().view(&request), RequestView::default());
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

    /// Log lines written while `f` runs, on this thread.
    fn logs_of(f: impl FnOnce()) -> String {
        use std::io::Write;
        use std::sync::Mutex;
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = crate::testing::install_subscriber(subscriber);
        f();
        drop(guard);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_ignored_other_header_is_warned_about_once() {
        let forwarding = xff();
        let request = request(
            PROXY,
            &[
                ("forwarded", "for=198.51.100.99"),
                ("x-forwarded-for", CLIENT),
            ],
        );
        let logs = logs_of(|| {
            for _ in 0..3 {
                let _ = forwarding.clone().view(&request);
            }
        });
        assert_eq!(logs.matches("WARN").count(), 1, "{logs}");
        assert!(logs.contains("Forwarded, which is ignored"), "{logs}");
        assert!(logs.contains("X-Forwarded-For"), "{logs}");
        let quiet = logs_of(|| {
            let _ = xff().view(&self::request(PROXY, &[("x-forwarded-for", CLIENT)]));
        });
        assert_eq!(quiet, "", "no warning without the other header");
    }
}
