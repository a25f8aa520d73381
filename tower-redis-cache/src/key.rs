//! Cache keys.
//!
//! An entry is found in two steps, both inside one Redis round trip: the
//! **URL key** (host, path and normalised query) names a Redis hash
//! that holds every variant of that URL; the **variant** is chosen by the
//! response's `Vary` headers plus the route's extra key parts. Invalidating
//! a URL deletes the one hash, and with it every variant.
//!
//! The host comes from the request's authority (`Host`), and only when it
//! is in the configured allow list (if any). Forwarding headers such as
//! `X-Forwarded-Host` reach the key only when a proxy trusted by the
//! layer's forwarding model wrote them; from anyone else they keep the
//! response out of the cache, so they cannot poison entries.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::request::Parts;
use http::{HeaderMap, Method, Uri, header};
use sha2::{Digest, Sha256};

use tower_redis_core::forwarding::RequestView;

use crate::route::Route;

mod memo;
pub(crate) use memo::{Ring, url_and_hash};

/// What a key is read from: a request as it came, or a copy of its head.
/// Keying a request in place copies nothing (a near hit is answered
/// without a copy of the head).
pub(crate) trait Head {
    fn method(&self) -> &Method;
    fn uri(&self) -> &Uri;
    fn headers(&self) -> &HeaderMap;
    /// The head as `Parts`, for a route's key function; `None` for a
    /// request, which is keyed in place only when its route has none.
    fn parts(&self) -> Option<&Parts>;
}

impl Head for Parts {
    fn method(&self) -> &Method {
        &self.method
    }

    fn uri(&self) -> &Uri {
        &self.uri
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn parts(&self) -> Option<&Parts> {
        Some(self)
    }
}

impl<B> Head for http::Request<B> {
    fn method(&self) -> &Method {
        self.method()
    }

    fn uri(&self) -> &Uri {
        self.uri()
    }

    fn headers(&self) -> &HeaderMap {
        self.headers()
    }

    fn parts(&self) -> Option<&Parts> {
        None
    }
}

/// The URL part of a key, before hashing: `//host/path?query`.
pub(crate) fn url_of(head: &impl Head, allowed_hosts: &[String], route: &Route) -> Option<String> {
    let host = authority(head)?;
    let uri = head.uri();
    url_from(host, uri.path(), uri.query(), allowed_hosts, route)
}

/// [`url_of`] for a request received from a trusted proxy: keyed by the
/// host the proxy reports, or by the request's own when it reports none.
pub(crate) fn forwarded_url_of(
    head: &impl Head,
    view: &RequestView,
    allowed_hosts: &[String],
    route: &Route,
) -> Option<String> {
    match &view.host {
        Some(host) => url_from(
            host.as_str(),
            head.uri().path(),
            head.uri().query(),
            allowed_hosts,
            route,
        ),
        None => url_of(head, allowed_hosts, route),
    }
}

/// `parts` as the client sent them to a trusted proxy that reported `host`:
/// origin-form target, `Host: host`.
pub(crate) fn with_host(parts: &Parts, host: &http::uri::Authority) -> Parts {
    let mut rewritten = parts.clone();
    if let Some(path_and_query) = parts.uri.path_and_query() {
        rewritten.uri = Uri::from(path_and_query.clone());
    }
    if let Ok(value) = http::HeaderValue::from_str(host.as_str()) {
        rewritten.headers.insert(header::HOST, value);
    }
    rewritten
}

/// Adds the scheme and port a trusted proxy reported to a variant's extra
/// key parts: the same URL over `http` and `https` (or another port) is a
/// different variant, so a redirect to `https` is never served for it.
///
/// When the entry is keyed by a host the proxy reported, the request's own
/// target authority and `Host` lines are key parts too: an app may build
/// its answer from `Host`, and a proxy that passes the client's `Host` on
/// (nginx's `$http_host`) would otherwise let `Host: shop.example:1` fill
/// the entry of `shop.example`. Behind a proxy that sets `Host` itself the
/// value is the same on every request and costs no hits.
pub(crate) fn push_forwarded_origin(extra: &mut String, view: &RequestView, head: &impl Head) {
    if view.host.is_some() {
        extra.push_str("own-host=");
        if let Some(authority) = head.uri().authority() {
            extra.push_str(&authority.as_str().to_ascii_lowercase());
        }
        for host in head.headers().get_all(header::HOST) {
            extra.push('|');
            extra.push_str(&String::from_utf8_lossy(host.as_bytes()).to_ascii_lowercase());
        }
        extra.push('\n');
    }
    if view.scheme.is_none() && view.port.is_none() {
        return;
    }
    extra.push_str("forwarded=");
    if let Some(scheme) = &view.scheme {
        extra.push_str(scheme.as_str());
    }
    extra.push(':');
    if let Some(port) = view.port {
        extra.push_str(itoa::Buffer::new().format(port));
    }
    extra.push('\n');
}

fn url_from(
    host: &str,
    path: &str,
    query: Option<&str>,
    allowed_hosts: &[String],
    route: &Route,
) -> Option<String> {
    if !allowed_hosts.is_empty() && !allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return None;
    }
    // No scheme: HTTP/2 requests carry one and HTTP/1 requests do not, so
    // keying on it would split one resource (and its invalidation) in two.
    let mut url =
        String::with_capacity(2 + host.len() + path.len() + query.map_or(0, str::len) + 1);
    url.push_str("//");
    url.push_str(host);
    url[2..].make_ascii_lowercase();
    url.push_str(path);
    if let Some(query) = normalised_query(query, route) {
        url.push('?');
        url.push_str(&query);
    }
    Some(url)
}

/// The URLs an unsafe request may have changed (RFC 9111 §4.4): its own;
/// or, when it has no trustworthy host (its target authority and `Host`
/// disagree, or it has several `Host` fields), the URL under each host it
/// names, since the origin acted on one of them and over-invalidating only
/// costs a miss.
pub(crate) fn invalidated_urls(
    parts: &Parts,
    allowed_hosts: &[String],
    route: &Route,
) -> Vec<String> {
    if let Some(url) = url_of(parts, allowed_hosts, route) {
        return vec![url];
    }
    let named = parts.uri.authority().map(|a| a.as_str().to_owned());
    let hosts = parts
        .headers
        .get_all(header::HOST)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|h| !h.is_empty() && h.parse::<http::uri::Authority>().is_ok());
    let mut urls: Vec<String> = named
        .into_iter()
        .chain(hosts)
        .filter_map(|host| {
            url_from(
                &host,
                parts.uri.path(),
                parts.uri.query(),
                allowed_hosts,
                route,
            )
        })
        .collect();
    urls.sort_unstable();
    urls.dedup();
    urls
}

/// The URL of a `Location` / `Content-Location` value, resolved against the
/// request, when it is on the same origin (RFC 9111 §4.4). `route_for`
/// gives the rules of the target's path.
pub(crate) fn same_origin_url<'r>(
    parts: &Parts,
    value: &str,
    allowed_hosts: &[String],
    route_for: impl Fn(&str) -> &'r Route,
) -> Option<String> {
    let target: Uri = value.trim().parse().ok()?;
    let host = authority(parts)?;
    if let Some(target_host) = target.authority()
        && !target_host.as_str().eq_ignore_ascii_case(host)
    {
        return None;
    }
    let path = target.path();
    if !path.starts_with('/') {
        return None;
    }
    url_from(host, path, target.query(), allowed_hosts, route_for(path))
}

/// The host a request is for: its target's authority (absolute form,
/// HTTP/2 `:authority`) or its `Host`. `None` when the two disagree, when
/// `Host` appears more than once or is not a valid authority: an origin
/// (or a framework's `Host` extractor) may build its answer from either
/// one, so such a request has no host the cache can trust.
fn authority(head: &impl Head) -> Option<&str> {
    let mut hosts = head.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(host), None) => {
            let host = host.to_str().ok()?.trim();
            if host.is_empty() || host.parse::<http::uri::Authority>().is_err() {
                return None;
            }
            Some(host)
        }
        (Some(_), Some(_)) => return None,
    };
    match (head.uri().authority(), host) {
        (Some(authority), Some(host)) => authority
            .as_str()
            .eq_ignore_ascii_case(host)
            .then(|| authority.as_str()),
        (Some(authority), None) => Some(authority.as_str()),
        (None, host) => host,
    }
}

fn normalised_query(query: Option<&str>, route: &Route) -> Option<String> {
    let query = query?;
    let mut pairs: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        // A parameter whose value hides another one (`utm_x=1;callback=evil`,
        // split on `;` by some frameworks) is kept in the key.
        .filter(|pair| {
            pair.contains(';') || !route.ignores_param(pair.split('=').next().unwrap_or(pair))
        })
        .collect();
    // Sorted by name only, and stable: parameters of different names
    // commute, but the order of one name's values is the app's
    // (`sort=price&sort=date` is not `sort=date&sort=price`). Names compare
    // as loosely as any parser reads them ([`loose_name`]), so `%61`, `A`
    // and `a` keep their order among themselves. A query with a `;` in a
    // pair is not sorted at all: frameworks that split on it read other
    // names there.
    if route.sort_query
        && !pairs
            .iter()
            .any(|pair| pair.contains(';') || has_unclosed_bracket(pair))
    {
        if pairs
            .iter()
            .all(|pair| matches!(sort_name(pair), Cow::Borrowed(_)))
        {
            pairs.sort_by(|a, b| sort_name(a).cmp(&sort_name(b)));
        } else {
            // One loose name per pair, not one per comparison.
            pairs.sort_by_cached_key(|pair| sort_name(pair).into_owned());
        }
    }
    (!pairs.is_empty()).then(|| pairs.join("&"))
}

/// Where `name` has `bracket` (`[` or `]`), written or escaped (`%5B`,
/// `%5D`), from `from` on.
fn find_bracket(name: &[u8], from: usize, bracket: u8) -> Option<usize> {
    let escaped: &[u8] = if bracket == b'[' { b"5b" } else { b"5d" };
    (from..name.len()).find(|&at| {
        name[at] == bracket
            || (name[at] == b'%'
                && name
                    .get(at + 1..at + 3)
                    .is_some_and(|hex| hex.eq_ignore_ascii_case(escaped)))
    })
}

/// Whether a pair's name opens a bracket it does not close (`a[b`): PHP
/// reads it as `a_b`, Rack as `a[b]`, so no one sort keeps both apart from
/// the names they would merge it with; such a query is not sorted.
fn has_unclosed_bracket(pair: &str) -> bool {
    let name = pair.split('=').next().unwrap_or(pair).as_bytes();
    find_bracket(name, 0, b'[').is_some_and(|open| find_bracket(name, open, b']').is_none())
}

/// The name a query pair sorts by: the [`loose_name`] of its name up to
/// the first `[` (written or escaped; every one closed, see
/// [`has_unclosed_bracket`]), since `a`, `a[]` and `a[0]` are one name to
/// PHP and `qs` (whose values they combine or overwrite in order), and so
/// keep their order among themselves.
fn sort_name(pair: &str) -> Cow<'_, [u8]> {
    let name = pair.split('=').next().unwrap_or(pair);
    let end = find_bracket(name.as_bytes(), 0, b'[').unwrap_or(name.len());
    loose_name(&name[..end], true)
}

/// A query parameter's or a cookie's name as the loosest common parser
/// reads it: percent-escapes decoded (and `+` a space, in a query),
/// trimmed, in lower case, with `.`, a space and `[` read as `_` (as PHP
/// does). Two names equal here may be one name to some app. Borrowed when
/// the name has none of those.
fn loose_name(raw: &str, plus_is_space: bool) -> Cow<'_, [u8]> {
    let bytes = raw.as_bytes();
    let plain = |b: &u8| {
        !(b.is_ascii_uppercase()
            || matches!(b, b'%' | b'.' | b' ' | b'\t' | b'[')
            || (plus_is_space && *b == b'+'))
    };
    if bytes.iter().all(plain) {
        return Cow::Borrowed(bytes);
    }
    let decoded = percent_decode(bytes, plus_is_space);
    Cow::Owned(
        decoded
            .trim_ascii()
            .iter()
            .map(|b| match b.to_ascii_lowercase() {
                b'.' | b' ' | b'[' => b'_',
                other => other,
            })
            .collect(),
    )
}

/// The path and query of a key URL (`//host/path?query` → `/path?query`).
pub(crate) fn path_of(url: &str) -> &str {
    let rest = url.strip_prefix("//").unwrap_or(url);
    rest.find('/').map_or("/", |i| &rest[i..])
}

/// The directory prefixes of a key URL's path that index it, shortest
/// first: `/`, `/a/`, `/a/b/` … at most `depth` segments deep. The query
/// plays no part, whatever it holds.
pub(crate) fn directories(url: &str, depth: usize) -> Vec<&str> {
    let path = without_query(path_of(url));
    let mut dirs = vec!["/"];
    for (i, _) in path.match_indices('/').skip(1).take(depth) {
        dirs.push(&path[..=i]);
    }
    dirs
}

/// The index directory to read for a purge of everything under `prefix`
/// (a path, or a path and query): the longest directory of its path within
/// `depth` segments. Like [`directories`], it ignores the query, so that a
/// `/` in a query never points a purge at an index nothing is recorded in.
pub(crate) fn directory_for_prefix(prefix: &str, depth: usize) -> &str {
    let path = without_query(prefix);
    let mut dir = "/";
    for (i, _) in path.match_indices('/').skip(1).take(depth) {
        dir = &path[..=i];
    }
    dir
}

fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// The path and query (`/path?query`) a purge of a path-only target
/// selects: the same normalisation as the keys of that path's route, with
/// `parts` carrying no host.
pub(crate) fn path_target(parts: &Parts, route: &Route) -> Option<String> {
    let url = url_from("h", parts.uri.path(), parts.uri.query(), &[], route)?;
    Some(path_of(&url).to_owned())
}

/// The Redis-safe name of a URL: SHA-256, so long URLs make short keys.
pub(crate) fn hash_url(url: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(url.as_bytes()))
}

/// The route's extra key parts, as one string: a line per key header and
/// key cookie, `name=value` when the request has it and `name` alone when
/// it has not, so an empty value and no value are different variants (an
/// app may well answer them differently).
///
/// A route with a key function is keyed from a copy of the head
/// ([`Head::parts`]): the function is given `Parts`. Without one (a request
/// keyed in place) there is no key: the request must bypass the cache
/// rather than share an entry its key function would have kept apart.
/// `None` too when a key header or cookie cannot be read one way only
/// ([`key_header_value`], [`cookie_value`]).
pub(crate) fn extra_key(head: &impl Head, route: &Route) -> Option<String> {
    let mut extra = String::new();
    for name in &route.key_headers {
        extra.push_str(name.as_str());
        if let Some(value) = key_header_value(head.headers(), name.as_str()).ok()? {
            extra.push('=');
            extra.push_str(value);
        }
        extra.push('\n');
    }
    for cookie in &route.key_cookies {
        extra.push_str("cookie:");
        extra.push_str(cookie);
        if let Some(value) = cookie_value(head.headers(), cookie).ok()? {
            extra.push('=');
            extra.push_str(value);
        }
        extra.push('\n');
    }
    if let Some(key_fn) = &route.key_fn
        && let Some(value) = key_fn(head.parts()?)
    {
        extra.push_str("fn=");
        extra.push_str(&value);
    }
    Some(extra)
}

/// The value of a route's key header, as the key reads it: `Ok(None)`
/// when the request has none, `Ok(Some(value))` (trimmed) when it has one
/// line of text. Several lines, or a value that is not text, are
/// [`Ambiguous`]: apps read such a header differently (`HeaderMap::get`
/// takes the first line, others join them; bytes that are not text are
/// kept, replaced or refused), so the request bypasses the cache rather
/// than fill a variant an app reads otherwise.
pub(crate) fn key_header_value<'h>(
    headers: &'h HeaderMap,
    name: &str,
) -> Result<Option<&'h str>, Ambiguous> {
    let mut lines = headers.get_all(name).iter();
    let Some(line) = lines.next() else {
        return Ok(None);
    };
    if lines.next().is_some() {
        return Err(Ambiguous);
    }
    line.to_str()
        .map(|value| Some(value.trim()))
        .map_err(|_| Ambiguous)
}

/// A request header's value as `Vary` compares it (RFC 9111 §4.1 lets a
/// cache normalise values known to mean the same, removing whitespace only
/// where the field's syntax allows it). Every line is trimmed and the lines
/// joined with ",". The list fields whose syntax is known go further:
/// whitespace outside quoted strings removed (`Accept`, `Accept-Charset`);
/// `Accept-Encoding` as its set of codings (lower-case, sorted, `q=1` left
/// out), so `gzip, br` and `br,gzip;q=1.0` select one variant;
/// `Accept-Language` as its lower-case tags by falling weight (RFC 4647
/// tags ignore case; among equal weights the order is kept, as servers may
/// break ties by it). A weighted list that does not read cleanly (a member
/// that is not `name[;q=weight]`, a name given twice, over 1 KiB) is not
/// normalised: it keeps its own text, marked so that it can never equal a
/// normalised value (an origin may read it differently). Other fields
/// (`User-Agent`, say) keep their inner whitespace: removing it could make
/// two values the origin tells apart select one variant.
/// `None` when absent, which differs from an empty value. The lookup
/// script receives digests of these values, never the values. Lines of
/// other fields are joined with a line break, and a value that is not
/// text keeps every byte, so that neither makes two requests the origin
/// tells apart select one variant.
pub(crate) fn selecting_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    // The list fields whose syntax is known: `Some(order)` for the weighted
    // ones, `None` for those only stripped of whitespace.
    let list = if name.eq_ignore_ascii_case("accept-encoding") {
        Some(Some(Order::ByName))
    } else if name.eq_ignore_ascii_case("accept-language") {
        Some(Some(Order::ByWeight))
    } else if name.eq_ignore_ascii_case("accept") || name.eq_ignore_ascii_case("accept-charset") {
        Some(None)
    } else {
        None
    };
    let mut text = String::new();
    for (i, value) in values.enumerate() {
        if i > 0 {
            // A line break never occurs in a header value: two lines of a
            // field not known to be a list never equal one line holding
            // both (an origin may read the first line only).
            text.push(if list.is_some() { ',' } else { '\n' });
        }
        match std::str::from_utf8(value.as_bytes()) {
            Ok(line) => text.push_str(line.trim()),
            // Bytes that are not text, each kept (as a NUL, which no
            // header value holds, and its value in hex): two values
            // differing only there never select one variant.
            Err(_) => {
                for byte in value.as_bytes() {
                    let _ = write!(text, "\0{byte:02x}");
                }
            }
        }
    }
    let order = match list {
        Some(Some(order)) => order,
        Some(None) => return Some(without_whitespace(&text)),
        None => return Some(text),
    };
    Some(
        weighted(&without_whitespace(&text), order).unwrap_or_else(|| {
            // A NUL never occurs in a header value, so no normalised value
            // starts with one.
            let mut kept = String::with_capacity(text.len() + 1);
            kept.push('\0');
            kept.push_str(&text);
            kept
        }),
    )
}

/// `text` without spaces and tabs outside quoted strings.
fn without_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut quoted, mut escaped) = (false, false);
    for c in text.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => continue,
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The longest weighted list [`weighted`] normalises, in bytes.
const MAX_NORMALISED: usize = 1024;

/// How [`weighted`] orders a list.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// A set: sorted by name (`Accept-Encoding`).
    ByName,
    /// By falling weight, ties in the order sent (`Accept-Language`).
    ByWeight,
}

/// A whitespace-free weighted list (RFC 9110 §12.4.2) in a canonical form:
/// each member lower-case with a valid weight (`;q=0.500`, none for 1).
/// `None` when the list does not read cleanly: a member that is not
/// `name[;q=weight]`, a name given twice (origins differ on which one
/// counts), or a list longer than [`MAX_NORMALISED`]. Every canonical form
/// reads cleanly again, to itself.
fn weighted(compact: &str, order: Order) -> Option<String> {
    // A client writes this value: past a size no browser sends, it is
    // compared as it is (fewer hits for that client, no work).
    if compact.len() > MAX_NORMALISED {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    let mut members: Vec<(String, u16)> = Vec::new();
    for element in compact.split(',').filter(|element| !element.is_empty()) {
        let element = element.to_ascii_lowercase();
        let mut parts = element.split(';');
        let name = parts.next().unwrap_or_default();
        let q = match (parts.next(), parts.next()) {
            (None, _) => Some(1000),
            (Some(q), None) => q.strip_prefix("q=").and_then(weight),
            _ => None,
        }?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
            return None;
        }
        if !seen.insert(name.to_owned()) {
            return None;
        }
        members.push((name.to_owned(), q));
    }
    match order {
        Order::ByName => members.sort_unstable_by(|a, b| a.0.cmp(&b.0)),
        Order::ByWeight => members.sort_by_key(|member| std::cmp::Reverse(member.1)),
    }
    let texts: Vec<String> = members
        .into_iter()
        .map(|(name, q)| match q {
            1000 => name,
            0 => format!("{name};q=0"),
            q => format!("{name};q=0.{q:03}"),
        })
        .collect();
    Some(texts.join(","))
}

/// An RFC 9110 §12.4.2 weight (`0`, `0.5`, `1.000`) in thousandths.
fn weight(q: &str) -> Option<u16> {
    let (int, frac) = q.split_once('.').unwrap_or((q, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// A key header or cookie that apps may read differently: the request
/// bypasses the cache.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Ambiguous;

/// The value of the cookie `name` in a request's `Cookie` fields, as the
/// key reads it: `Ok(None)` when no pair names it, `Ok(Some(value))` when
/// exactly one pair `name=value` does, with the name exactly as given.
///
/// Apps read cookies with parsers that differ: the `cookie` crate (and
/// tower-cookies, axum-extra's `CookieJar`) trims names and
/// percent-decodes them and lets a later pair of one name win; others keep
/// the first, compare names as sent, or ignore case (ASP.NET). A request
/// one of them reads differently from the key would fill a variant other
/// requests then get: `currency=USD; currency=EUR` keyed `USD` and
/// rendered `EUR`, or `%63urrency=EUR` keyed as no cookie and rendered
/// `EUR` for everyone without one. So the cookie is [`Ambiguous`]
/// whenever a parser could read it otherwise: it is named by more than
/// one pair, or by a pair whose name only trimming, percent-decoding or a
/// case change makes `name`, or by a pair without `=` (which some parsers
/// read as an empty value), or by a pair in a field that is not text (which
/// some parsers skip). The value is the pair's text after `=` as sent:
/// values a parser would read alike (`EUR` and `%45UR`) are different
/// variants, which costs hits, never a wrong answer.
pub(crate) fn cookie_value<'h>(
    headers: &'h HeaderMap,
    name: &str,
) -> Result<Option<&'h str>, Ambiguous> {
    let mut found = None;
    for line in headers.get_all(header::COOKIE) {
        let Ok(text) = line.to_str() else {
            let text = String::from_utf8_lossy(line.as_bytes());
            if cookie_pairs(&text).any(|(pair_name, _)| may_name(pair_name, name)) {
                return Err(Ambiguous);
            }
            continue;
        };
        for (pair_name, value) in cookie_pairs(text) {
            if !may_name(pair_name, name) {
                continue;
            }
            match (found, value) {
                (None, Some(value)) if pair_name == name => found = Some(value),
                _ => return Err(Ambiguous),
            }
        }
    }
    Ok(found)
}

/// The pairs of a `Cookie` field: the name (without the whitespace that
/// follows a `;`) and the text after the first `=`, if any.
fn cookie_pairs(text: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    text.split(';').map(|pair| {
        let pair = pair.trim_start_matches([' ', '\t']);
        match pair.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (pair, None),
        }
    })
}

/// Whether some cookie parser could read `sent` as the name `name`: as
/// sent, trimmed, percent-decoded (and trimmed again), in any ASCII case.
fn may_name(sent: &str, name: &str) -> bool {
    loose_name(sent, false) == loose_name(name, false)
}

/// `bytes` with each `%` and two hex digits replaced by the byte they name
/// (other `%` kept), and each `+` by a space when `plus_is_space` (a form
/// field's name or value).
fn percent_decode(bytes: &[u8], plus_is_space: bool) -> Vec<u8> {
    let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => {
                // Two hex digits: at most 0xff.
                out.push(u8::try_from(high * 16 + low).unwrap_or(u8::MAX));
                i += 3;
            }
            (b'+', _, _) if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// The normalised list of `Vary` names of a response (lower-case, sorted,
/// comma-joined), or `None` for `Vary: *` (never matches, never stored).
pub(crate) fn vary_names(headers: &HeaderMap) -> Option<String> {
    let mut names: Vec<String> = Vec::new();
    for value in headers.get_all(header::VARY) {
        for name in String::from_utf8_lossy(value.as_bytes()).split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name == "*" {
                return None;
            }
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort_unstable();
    Some(names.join(","))
}

/// What stands for a header value in a variant: its SHA-1, so that cookies
/// and credentials never travel to Redis as such.
pub(crate) fn value_digest(value: &str) -> String {
    let mut out = String::with_capacity(40);
    push_sha1_hex(&mut out, value.as_bytes());
    out
}

/// Appends the SHA-1 of `bytes` in lower-case hex (what Lua's
/// `redis.sha1hex` gives). Written out by hand: the `Display` of a digest
/// goes through the formatting machinery once per byte, and a lookup
/// computes several digests.
fn push_sha1_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in sha1_smol::Sha1::from(bytes).digest().bytes() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
}

/// The digest of no extra parts, and the variant of a response without
/// `Vary` on a route without extra parts (most responses): every lookup
/// computes a variant, and SHA-1 is the dearest part of it.
static EMPTY_DIGEST: LazyLock<String> = LazyLock::new(|| value_digest(""));
static PLAIN_VARIANT: LazyLock<String> =
    LazyLock::new(|| computed_variant("", &HeaderMap::new(), ""));

/// The variant a request selects: the same computation as `lookup.lua`.
pub(crate) fn variant(vary: &str, request: &HeaderMap, extra: &str) -> String {
    variant_of(vary, request, extra).into_owned()
}

/// [`variant`], borrowed when it is the variant of a URL without `Vary`
/// or extra key parts: a lookup compares it, and needs no copy of it.
pub(crate) fn variant_of(
    vary: &str,
    request: &HeaderMap,
    extra: &str,
) -> std::borrow::Cow<'static, str> {
    if vary.is_empty() && extra.is_empty() {
        return std::borrow::Cow::Borrowed(PLAIN_VARIANT.as_str());
    }
    std::borrow::Cow::Owned(computed_variant(vary, request, extra))
}

fn computed_variant(vary: &str, request: &HeaderMap, extra: &str) -> String {
    let mut text = String::with_capacity(vary.len() + 48);
    text.push_str(vary);
    text.push('\n');
    // The route's extra parts (cookies, headers) travel as a digest too.
    if extra.is_empty() {
        text.push_str(&EMPTY_DIGEST);
    } else {
        push_sha1_hex(&mut text, extra.as_bytes());
    }
    for name in vary.split(',').filter(|n| !n.is_empty()) {
        text.push('\n');
        text.push_str(name);
        text.push('=');
        match selecting_value(request, name) {
            Some(value) => push_sha1_hex(&mut text, value.as_bytes()),
            None => text.push('\u{0}'),
        }
    }
    let mut field = String::with_capacity(42);
    field.push_str("e:");
    push_sha1_hex(&mut field, text.as_bytes());
    field
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn digests_are_lower_case_sha1_hex_as_in_lua() {
        // FIPS 180 test vectors; Lua's redis.sha1hex answers the same.
        assert_eq!(
            value_digest("abc"),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(value_digest(""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        let field = variant("", &HeaderMap::new(), "");
        assert_eq!(field.len(), 42);
        assert!(field.starts_with("e:"));
    }

    /// The variants kept computed are the ones computed in full.
    #[test]
    fn kept_variants_are_the_computed_ones() {
        let plain = {
            let mut text = String::from("\n");
            push_sha1_hex(&mut text, b"");
            let mut field = String::from("e:");
            push_sha1_hex(&mut field, text.as_bytes());
            field
        };
        assert_eq!(variant("", &HeaderMap::new(), ""), plain);
        let mut request = HeaderMap::new();
        request.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
        let with_vary = {
            let mut text = String::from("accept-language\n");
            push_sha1_hex(&mut text, b"");
            text.push_str("\naccept-language=");
            push_sha1_hex(&mut text, b"en");
            let mut field = String::from("e:");
            push_sha1_hex(&mut field, text.as_bytes());
            field
        };
        assert_eq!(variant("accept-language", &request, ""), with_vary);
    }

    #[test]
    fn url_parts_and_directories() {
        assert_eq!(path_of("//h:8080/a/b?x=1"), "/a/b?x=1");
        assert_eq!(path_of("//h"), "/");
        assert_eq!(directories("//h/a/b/c?x=/y/", 8), vec!["/", "/a/", "/a/b/"]);
        assert_eq!(directories("//h/a/b/c/d/e", 2), vec!["/", "/a/", "/a/b/"]);
        assert_eq!(directories("//h/", 3), vec!["/"]);
        assert_eq!(directory_for_prefix("/a/b/c", 8), "/a/b/");
        assert_eq!(directory_for_prefix("/a/b/c/d/", 2), "/a/b/");
        assert_eq!(directory_for_prefix("/pro", 8), "/");
        assert_eq!(directory_for_prefix("/search?q=a/b", 8), "/");
        assert_eq!(directory_for_prefix("/a/b?q=/c/d/", 8), "/a/");
        assert_eq!(directories("//h/search?q=a/b", 8), vec!["/"]);
    }

    #[test]
    fn a_host_that_disagrees_with_the_target_authority_gives_no_key() {
        let route = Route::new("*");
        let absolute = |host: &str| {
            let mut builder = http::Request::get("http://shop.example/p");
            if !host.is_empty() {
                builder = builder.header("host", host);
            }
            builder.body(()).unwrap().into_parts().0
        };
        assert_eq!(
            url_of(&absolute("shop.example"), &[], &route).as_deref(),
            Some("//shop.example/p")
        );
        assert_eq!(
            url_of(&absolute("SHOP.example"), &[], &route).as_deref(),
            Some("//shop.example/p")
        );
        assert_eq!(
            url_of(&absolute(""), &[], &route).as_deref(),
            Some("//shop.example/p")
        );
        assert_eq!(url_of(&absolute("evil.example"), &[], &route), None);
        assert_eq!(url_of(&absolute("shop.example:8080"), &[], &route), None);
        let two_hosts = parts("/p", &[("host", "shop.example"), ("host", "evil.example")]);
        assert_eq!(url_of(&two_hosts, &[], &route), None);
        let bad_host = parts("/p", &[("host", "a b")]);
        assert_eq!(url_of(&bad_host, &[], &route), None);
        // An unsafe request without a trustworthy host invalidates the
        // URL under every host it names.
        assert_eq!(
            invalidated_urls(&absolute("evil.example"), &[], &route),
            ["//evil.example/p", "//shop.example/p"]
        );
        assert_eq!(
            invalidated_urls(&two_hosts, &[], &route),
            ["//evil.example/p", "//shop.example/p"]
        );
        assert_eq!(
            invalidated_urls(&absolute("shop.example"), &[], &route),
            ["//shop.example/p"]
        );
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::get(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn query_is_sorted_and_ignored_params_dropped() {
        let route = Route::new("*").ignore_query_params(["utm_*"]);
        let a = url_of(
            &parts("/p?b=2&a=1&utm_source=x", &[("host", "Shop.example")]),
            &[],
            &route,
        );
        let b = url_of(
            &parts("/p?a=1&b=2", &[("host", "shop.example")]),
            &[],
            &route,
        );
        assert_eq!(a.as_deref(), Some("//shop.example/p?a=1&b=2"));
        assert_eq!(a, b);
    }

    /// Sorting makes parameters of different names commute, never the
    /// values of one name: the app reads them in order (last wins, or a
    /// list), so two orders are two pages.
    #[test]
    fn repeated_parameters_keep_their_order() {
        let route = Route::new("*");
        let key = |uri: &str| url_of(&parts(uri, &[("host", "shop.example")]), &[], &route);
        assert_ne!(
            key("/list?sort=price&sort=date"),
            key("/list?sort=date&sort=price")
        );
        assert_eq!(
            key("/list?sort=price&page=2&sort=date").as_deref(),
            Some("//shop.example/list?page=2&sort=price&sort=date")
        );
        // One name however it is written: its order is kept too.
        assert_ne!(key("/list?a=1&%61=2"), key("/list?%61=2&a=1"));
        assert_ne!(key("/list?a+b=1&a%20b=2"), key("/list?a%20b=2&a+b=1"));
        assert_eq!(key("/list?b=1&a=2"), key("/list?a=2&b=1"));
        // Names some parser reads as one: case (ASP.NET), `.` (PHP).
        assert_ne!(
            key("/list?Sort=price&sort=date"),
            key("/list?sort=date&Sort=price")
        );
        assert_ne!(key("/list?a.b=1&a_b=2"), key("/list?a_b=2&a.b=1"));
        // An array's name is its name before `[` (PHP, `qs`): `a` and `a[]`
        // keep their order, escaped or not, and sort among other names.
        assert_ne!(key("/l?a[]=1&a=2"), key("/l?a=2&a[]=1"));
        assert_ne!(key("/l?a[1]=y&a[0]=x"), key("/l?a[0]=x&a[1]=y"));
        assert_ne!(key("/l?a%5B%5D=1&a=2"), key("/l?a=2&a%5b%5d=1"));
        assert_eq!(key("/l?b=1&a[]=2&a=3"), key("/l?a[]=2&a=3&b=1"));
        // A bracket left open (`a[b`, which PHP reads as `a_b`): not sorted.
        assert_ne!(key("/l?a[b=1&a_b=2"), key("/l?a_b=2&a[b=1"));
        assert_ne!(key("/l?a%5Bb=1&a_b=2"), key("/l?a_b=2&a%5Bb=1"));
        assert_ne!(key("/l?b=1&a[=2"), key("/l?a[=2&b=1"));
        // A `;` hides other names from the sort: not sorted at all.
        assert_ne!(key("/list?x=1;s=a&s=b"), key("/list?s=b&x=1;s=a"));
        // A malformed escape is a name of its own, and no panic.
        assert!(key("/list?%zz=1&%=2&a%2=3").is_some());
    }

    #[test]
    fn forwarded_host_headers_never_reach_the_key() {
        let route = Route::new("*");
        let plain = url_of(&parts("/p", &[("host", "shop.example")]), &[], &route);
        let poisoned = url_of(
            &parts(
                "/p",
                &[
                    ("host", "shop.example"),
                    ("x-forwarded-host", "evil.example"),
                    ("x-original-url", "/admin"),
                ],
            ),
            &[],
            &route,
        );
        assert_eq!(plain, poisoned);
    }

    #[test]
    fn hosts_outside_the_allow_list_are_not_cached() {
        let route = Route::new("*");
        let allowed = ["shop.example".to_owned()];
        assert!(url_of(&parts("/p", &[("host", "shop.example")]), &allowed, &route).is_some());
        assert!(url_of(&parts("/p", &[("host", "evil.example")]), &allowed, &route).is_none());
        assert!(
            url_of(&parts("/p", &[]), &[], &route).is_none(),
            "no host, no key"
        );
    }

    #[test]
    fn vary_star_and_normalisation() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::VARY,
            "Accept-Encoding, accept-language".parse().unwrap(),
        );
        headers.append(header::VARY, "Accept-Encoding".parse().unwrap());
        assert_eq!(
            vary_names(&headers).as_deref(),
            Some("accept-encoding,accept-language")
        );
        headers.append(header::VARY, "*".parse().unwrap());
        assert_eq!(vary_names(&headers), None);
    }

    /// Values the origin may tell apart select different variants: bytes
    /// that are not text (read lossily, `\xff` and `\xfe` were both `�`),
    /// and two lines of a field not known to be a list against one line
    /// holding both (an origin reading the first line sees `a`, not `a,b`).
    #[test]
    fn selecting_values_keep_what_the_origin_may_tell_apart() {
        let of = |name: &str, values: &[&[u8]]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            selecting_value(&headers, name)
        };
        assert_ne!(of("x-foo", &[b"\xff"]), of("x-foo", &[b"\xfe"]));
        assert_ne!(of("x-foo", &[b"a\xff"]), of("x-foo", &[b"a\xef\xbf\xbd"]));
        assert_ne!(of("user-agent", &[b"a", b"b"]), of("user-agent", &[b"a,b"]));
        // A list field's lines are one list, as RFC 9110 §5.3 has it.
        assert_eq!(
            of("accept-encoding", &[b"gzip", b"br"]),
            of("accept-encoding", &[b"gzip, br"])
        );
        assert_eq!(
            of("accept", &[b"text/html", b"*/*"]),
            of("accept", &[b"text/html,*/*"])
        );
    }

    #[test]
    fn selecting_values_are_normalised() {
        let ae = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append("accept-encoding", v.parse().unwrap());
            }
            selecting_value(&headers, "accept-encoding")
        };
        let canonical = ae(&["gzip, br"]);
        assert_eq!(canonical.as_deref(), Some("br,gzip"));
        for same in [
            &["br,gzip"][..],
            &["GZIP ,  br"],
            &["gzip;q=1.0, br;q=1"],
            &["gzip", "br"],
        ] {
            assert_eq!(ae(same), canonical, "{same:?}");
        }
        assert_eq!(
            ae(&["gzip;q=0.50, identity;q=0"]).as_deref(),
            Some("gzip;q=0.500,identity;q=0")
        );
        assert_ne!(ae(&["gzip;q=0"]), ae(&["gzip"]));
        assert_eq!(ae(&[]), None);
        assert_eq!(ae(&[""]).as_deref(), Some(""));
        let mut headers = HeaderMap::new();
        headers.insert("accept-language", "en-GB, fr;q=0.5".parse().unwrap());
        headers.insert("x-q", " a, \"b c\" ".parse().unwrap());
        assert_eq!(
            selecting_value(&headers, "accept-language").as_deref(),
            Some("en-gb,fr;q=0.500")
        );
        let al = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("accept-language", v.parse().unwrap());
            selecting_value(&headers, "accept-language")
        };
        assert_eq!(al("fr;q=0.5, EN-gb"), al("en-GB, fr;q=0.50"));
        assert_eq!(al("de;q=0.2, en, fr").as_deref(), Some("en,fr,de;q=0.200"));
        assert_ne!(al("en, fr"), al("fr, en"), "ties keep their order");
        // Other fields keep their inner whitespace; lines are trimmed.
        assert_eq!(
            selecting_value(&headers, "x-q").as_deref(),
            Some("a, \"b c\"")
        );
    }

    /// A list that does not read cleanly keeps its own text and can never
    /// select the variant of a normalised value: a malformed weight that
    /// looks like a canonical one, a name given twice (origins differ on
    /// which counts), an over-long list.
    #[test]
    fn lists_that_do_not_read_cleanly_never_share_a_normalised_variant() {
        let al = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("accept-language", v.parse().unwrap());
            selecting_value(&headers, "accept-language").unwrap()
        };
        let ae = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("accept-encoding", v.parse().unwrap());
            selecting_value(&headers, "accept-encoding").unwrap()
        };
        assert_ne!(ae("gzip;q=500"), ae("gzip;q=0.5"));
        assert_ne!(al("en,fr;q=500"), al("fr;q=0.5,en"));
        assert_ne!(al("fr-FR,fr;q=0.9,fr-FR;q=0,fr;q=0"), al("fr-FR,fr;q=0.9"));
        assert_ne!(ae("br, gzip, br"), ae("br, gzip"));
        assert_eq!(ae("gzip;q=2"), "\0gzip;q=2");
        let long = "x,".repeat(600);
        assert_eq!(al(&long), format!("\0{long}"));
        // Every normalised value reads cleanly again, to itself.
        for v in [
            "gzip;q=0.5, br;q=0, identity",
            "de;q=0.2, EN-us, fr;q=1.000",
        ] {
            let once = ae(v);
            assert_eq!(ae(&once), once);
            let once = al(v);
            assert_eq!(al(&once), once);
        }
        // Not a list with a known syntax: inner whitespace is meaning.
        let ua = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("user-agent", v.parse().unwrap());
            selecting_value(&headers, "user-agent").unwrap()
        };
        assert_ne!(
            ua("Mozilla/5.0 (iPhone; CPU iPhone OS)"),
            ua("Mozilla/5.0 (iPhone;CPUiPhoneOS)")
        );
    }

    /// The key reads a key cookie one way only: a pair every parser reads
    /// as that cookie gives its value; anything a parser could read
    /// otherwise (a second pair, a name that only trimming, decoding or a
    /// case change makes the cookie's, a pair without `=`, a field that is
    /// not text) makes the request bypass the cache.
    #[test]
    fn a_key_cookie_parsers_could_read_differently_is_ambiguous() {
        let read = |lines: &[&[u8]]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(header::COOKIE, HeaderValue::from_bytes(line).unwrap());
            }
            cookie_value(&headers, "currency").map(|v| v.map(str::to_owned))
        };
        let value = |v: &str| Ok(Some(v.to_owned()));
        assert_eq!(read(&[]), Ok(None));
        assert_eq!(read(&[b"session=a; other=b"]), Ok(None));
        assert_eq!(read(&[b"currency=EUR"]), value("EUR"));
        assert_eq!(read(&[b"a=1;currency=EUR; b=2"]), value("EUR"));
        assert_eq!(read(&[b"a=1", b"currency=EUR"]), value("EUR"));
        assert_eq!(read(&[b"currency="]), value(""));
        assert_eq!(read(&[b"currency=%45UR"]), value("%45UR"));
        assert_eq!(read(&[b"currency=a=b"]), value("a=b"));
        // Names that merely contain or resemble it.
        assert_eq!(read(&[b"xcurrency=EUR; currency2=USD"]), Ok(None));
        assert_eq!(read(&[b"cur%72ency2=EUR; %zzcurrency=1"]), Ok(None));
        for ambiguous in [
            &[&b"currency=USD; currency=EUR"[..]][..],
            &[b"currency=EUR", b"currency=EUR"],
            &[b"currency =EUR"],
            &[b"currency\t=EUR"],
            &[b"%63urrency=EUR"],
            &[b"%63URRENCY=EUR"],
            &[b"%20currency=EUR"],
            &[b"Currency=EUR"],
            &[b"currency"],
            &[b"a=1; currency"],
            &[b"currency=EUR; x=\xff"],
            &[b"currency=USD", b"currency=EUR; x=\xff"],
        ] {
            assert_eq!(read(ambiguous), Err(Ambiguous), "{ambiguous:?}");
        }
        // A field that is not text and does not name it leaves it be.
        assert_eq!(read(&[b"x=\xff", b"currency=EUR"]), value("EUR"));
        assert_eq!(percent_decode(b"%63ur%zz%7+", false), b"cur%zz%7+");
        assert_eq!(percent_decode(b"%ff%41+", true), b"\xffA ");
        // PHP reads `.`, a space and `[` in a name as `_`.
        for mangled in [
            &b"site.lang=xx"[..],
            b"site lang=xx",
            b"site[lang=xx",
            b"SITE_LANG=xx",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::COOKIE, HeaderValue::from_bytes(mangled).unwrap());
            assert_eq!(
                cookie_value(&headers, "site_lang"),
                Err(Ambiguous),
                "{mangled:?}"
            );
        }
    }

    /// A key header read one way only: one line of text gives its
    /// (trimmed) value; several lines (`HeaderMap::get` reads the first,
    /// other code joins them) or bytes that are not text make the request
    /// bypass the cache.
    #[test]
    fn a_key_header_apps_could_read_differently_bypasses() {
        let route = Route::new("*").key_header("x-tenant");
        let extra = |lines: &[&[u8]]| {
            let mut head = parts("/", &[]);
            for line in lines {
                head.headers
                    .append("x-tenant", HeaderValue::from_bytes(line).unwrap());
            }
            extra_key(&head, &route)
        };
        assert_eq!(extra(&[b"t1"]).as_deref(), Some("x-tenant=t1\n"));
        assert_eq!(extra(&[b" t1 "]), extra(&[b"t1"]));
        assert_eq!(extra(&[b"t1", b"t2"]), None);
        assert_eq!(extra(&[b"t1, t2"]).as_deref(), Some("x-tenant=t1, t2\n"));
        assert_eq!(extra(&[b"\xff"]), None);
        assert_eq!(extra(&[b"\xfe"]), None);
    }

    /// A key header or cookie that is absent and one that is empty are
    /// different variants.
    #[test]
    fn an_absent_key_part_is_not_an_empty_one() {
        let route = Route::new("*")
            .key_header("x-tenant")
            .key_cookie("currency");
        let extra = |headers: &[(&str, &str)]| extra_key(&parts("/", headers), &route);
        let none = extra(&[]);
        assert!(none.is_some());
        assert_ne!(none, extra(&[("x-tenant", "")]));
        assert_ne!(none, extra(&[("cookie", "currency=")]));
        assert_ne!(
            extra(&[("x-tenant", "")]),
            extra(&[("cookie", "currency=")])
        );
        assert_eq!(none, extra(&[("cookie", "session=a")]));
        assert_eq!(extra(&[("cookie", "currency=USD; currency=EUR")]), None);
    }

    #[test]
    fn variants_differ_by_vary_values_and_absence() {
        let en = parts("/", &[("accept-language", "en")]).headers;
        let de = parts("/", &[("accept-language", "de")]).headers;
        let none = parts("/", &[]).headers;
        let empty = parts("/", &[("accept-language", "")]).headers;
        let v = "accept-language";
        assert_ne!(variant(v, &en, ""), variant(v, &de, ""));
        assert_ne!(variant(v, &none, ""), variant(v, &empty, ""));
        assert_eq!(variant(v, &en, ""), variant(v, &en, ""));
        assert_ne!(variant(v, &en, "x"), variant(v, &en, ""));
    }
}
