//! Keys: whom a policy counts.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::HeaderName;
use http::request::Parts;
use sha2::{Digest, Sha256};
use tower_redis_core::{Keyspace, escape_key_part};

use crate::algorithm::Algorithm;
use crate::client_ip::ClientIp;
use crate::policy::Policy;

/// Key values longer than this many bytes are counted under their SHA-256
/// rather than stored as they are.
pub(crate) const MAX_KEY_LEN: usize = 256;

/// A boxed future returned by a custom key extractor.
pub type KeyFuture = Pin<Box<dyn Future<Output = Option<String>> + Send + 'static>>;

type SyncExtractor = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
type AsyncExtractor = Arc<dyn Fn(&Parts) -> KeyFuture + Send + Sync>;

/// Whom a policy counts.
#[derive(Clone)]
pub struct Key {
    pub(crate) kind: KeyKind,
}

#[derive(Clone)]
pub(crate) enum KeyKind {
    /// The client address, found the way the layer's [`ClientIp`] says.
    ClientIp,
    /// The value of a header (or gRPC metadata entry).
    Header(HeaderName),
    /// A value computed from the request, synchronously.
    Sync(SyncExtractor),
    /// A value computed from the request, asynchronously.
    Async(AsyncExtractor),
    /// One bucket shared by every request.
    Global,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            KeyKind::ClientIp => f.write_str("Key::client_ip()"),
            KeyKind::Header(name) => write!(f, "Key::header({name:?})"),
            KeyKind::Sync(_) => f.write_str("Key::from_fn(..)"),
            KeyKind::Async(_) => f.write_str("Key::from_async_fn(..)"),
            KeyKind::Global => f.write_str("Key::global()"),
        }
    }
}

impl Key {
    /// The client IP: the socket peer, or, behind trusted proxies, the
    /// rightmost forwarded address that is not a proxy. IPv6 clients are
    /// grouped by prefix (/64 by default). See
    /// [`RateLimitLayerBuilder::client_ip`](crate::RateLimitLayerBuilder::client_ip).
    ///
    /// The peer address comes from the request extensions (axum's
    /// `ConnectInfo<SocketAddr>`, a `SocketAddr` or an `IpAddr`). Without
    /// one the key is missing and [`MissingKey`] applies; the layer logs a
    /// warning once, naming `into_make_service_with_connect_info`.
    ///
    /// ```
    /// # use std::net::SocketAddr;
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_ratelimit::{Fallback, Key, MissingKey, Policy, RateLimitLayer, RedisManager};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request from `ip`, as axum's `into_make_service_with_connect_info` delivers it.
    /// # fn from(ip: &str, uri: &str) -> Request<Body> {
    /// #     let peer: SocketAddr = format!("{ip}:40000").parse().unwrap();
    /// #     let mut request = Request::get(uri).body(Body::empty()).unwrap();
    /// #     request.extensions_mut().insert(ConnectInfo(peer));
    /// #     request
    /// # }
    /// # fn app(limits: RateLimitLayer) -> Router {
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/api/items", get(|| async { "items" }).post(|| async { "created" }))
    /// #         .layer(limits)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let limits = RateLimitLayer::builder(RedisManager::disabled())
    ///     .policy(Policy::gcra("per-ip", 1, Duration::from_secs(60)).key(Key::client_ip()))
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(send(&app, from("203.0.113.7", "/")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// // IPv6 clients are counted per /64: another address of the same network shares the quota.
    /// send(&app, from("[2001:db8:1:2::1]", "/")).await;
    /// assert_eq!(send(&app, from("[2001:db8:1:2::ffff]", "/")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    ///
    /// // Served without connect info there is no address: the policy cannot count
    /// // the request and is skipped (and a warning is logged, once).
    /// let no_peer = Request::get("/").body(Body::empty())?;
    /// assert!(send(&app, no_peer).await.headers().get("ratelimit").is_none());
    /// # Ok(()) }
    /// ```
    pub fn client_ip() -> Self {
        Self {
            kind: KeyKind::ClientIp,
        }
    }

    /// The value of a request header, e.g. an API key. Works for gRPC
    /// metadata too (`x-api-key` metadata is an `x-api-key` header).
    ///
    /// Any length counts: a value over 256 bytes is counted under its
    /// SHA-256, so padding a key does not escape the policy. The value is
    /// trimmed; in `Authorization` and `Proxy-Authorization` the scheme
    /// counts in lower case, with one space after it (`bearer  T` is
    /// `Bearer T`, as the apps reading them take it). Sent on several lines,
    /// the first counts, as `HeaderMap::get` (and so most apps) reads it: an
    /// app that reads another line, or all of them, should count by a
    /// [`Key::from_fn`] that reads the header as it does.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name.
    ///
    /// ```
    /// # use std::net::SocketAddr;
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_ratelimit::{Fallback, Key, MissingKey, Policy, RateLimitLayer, RedisManager};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request from `ip`, as axum's `into_make_service_with_connect_info` delivers it.
    /// # fn from(ip: &str, uri: &str) -> Request<Body> {
    /// #     let peer: SocketAddr = format!("{ip}:40000").parse().unwrap();
    /// #     let mut request = Request::get(uri).body(Body::empty()).unwrap();
    /// #     request.extensions_mut().insert(ConnectInfo(peer));
    /// #     request
    /// # }
    /// # fn app(limits: RateLimitLayer) -> Router {
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/api/items", get(|| async { "items" }).post(|| async { "created" }))
    /// #         .layer(limits)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let limits = RateLimitLayer::builder(RedisManager::disabled())
    ///     .policy(Policy::gcra("per-key", 1, Duration::from_secs(60)).key(Key::header("x-api-key")))
    ///     .build()?;
    /// let app = app(limits);
    /// let with_key = |key: String| {
    ///     let mut request = from("203.0.113.7", "/");
    ///     request.headers_mut().insert("x-api-key", key.parse().unwrap());
    ///     request
    /// };
    ///
    /// let long = "k".repeat(300);
    /// send(&app, with_key(long.clone())).await;
    /// // A long key is counted under its hash, never skipped.
    /// assert_eq!(send(&app, with_key(long)).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// # Ok(()) }
    /// ```
    pub fn header(name: &str) -> Self {
        match HeaderName::try_from(name) {
            Ok(name) => Self {
                kind: KeyKind::Header(name),
            },
            Err(_) => panic!("Key::header: {name:?} is not a valid header name"),
        }
    }

    /// An authenticated user (or anything else) that earlier middleware put
    /// into the request extensions.
    ///
    /// ```
    /// #[derive(Clone)]
    /// struct UserId(u64);
    /// let key = tower_redis_ratelimit::Key::extension(|user: &UserId| user.0.to_string());
    /// # let _ = key;
    /// ```
    pub fn extension<T, F>(to_key: F) -> Self
    where
        T: Send + Sync + 'static,
        F: Fn(&T) -> String + Send + Sync + 'static,
    {
        Self::from_fn(move |parts| parts.extensions.get::<T>().map(&to_key))
    }

    /// A key computed from the request head; `None` means "no key".
    ///
    /// ```
    /// # use std::net::SocketAddr;
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_ratelimit::{Fallback, Key, MissingKey, Policy, RateLimitLayer, RedisManager};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request from `ip`, as axum's `into_make_service_with_connect_info` delivers it.
    /// # fn from(ip: &str, uri: &str) -> Request<Body> {
    /// #     let peer: SocketAddr = format!("{ip}:40000").parse().unwrap();
    /// #     let mut request = Request::get(uri).body(Body::empty()).unwrap();
    /// #     request.extensions_mut().insert(ConnectInfo(peer));
    /// #     request
    /// # }
    /// # fn app(limits: RateLimitLayer) -> Router {
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/api/items", get(|| async { "items" }).post(|| async { "created" }))
    /// #         .layer(limits)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The tenant is the first path segment under /t/.
    /// let tenant = Key::from_fn(|request| {
    ///     let rest = request.uri.path().strip_prefix("/t/")?;
    ///     rest.split('/').next().map(str::to_owned)
    /// });
    /// let limits = RateLimitLayer::builder(RedisManager::disabled())
    ///     .policy(Policy::gcra("per-tenant", 1, Duration::from_secs(60)).key(tenant))
    ///     .build()?;
    /// let app = Router::new().route("/t/{tenant}/items", get(|| async { "items" })).layer(limits);
    ///
    /// send(&app, from("203.0.113.7", "/t/acme/items")).await;
    /// assert_eq!(send(&app, from("198.51.100.1", "/t/acme/items")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// assert_eq!(send(&app, from("203.0.113.7", "/t/globex/items")).await.status(), StatusCode::OK);
    /// # Ok(()) }
    /// ```
    pub fn from_fn<F>(extract: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            kind: KeyKind::Sync(Arc::new(extract)),
        }
    }

    /// A key computed asynchronously (e.g. by looking a token up). The
    /// function gets the request head and returns a `'static` future, so it
    /// clones what it needs.
    pub fn from_async_fn<F, Fut>(extract: F) -> Self
    where
        F: Fn(&Parts) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<String>> + Send + 'static,
    {
        Self {
            kind: KeyKind::Async(Arc::new(move |parts| Box::pin(extract(parts)))),
        }
    }

    /// One bucket for all requests (a global limit).
    ///
    /// ```
    /// # use std::net::SocketAddr;
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_ratelimit::{Fallback, Key, MissingKey, Policy, RateLimitLayer, RedisManager};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request from `ip`, as axum's `into_make_service_with_connect_info` delivers it.
    /// # fn from(ip: &str, uri: &str) -> Request<Body> {
    /// #     let peer: SocketAddr = format!("{ip}:40000").parse().unwrap();
    /// #     let mut request = Request::get(uri).body(Body::empty()).unwrap();
    /// #     request.extensions_mut().insert(ConnectInfo(peer));
    /// #     request
    /// # }
    /// # fn app(limits: RateLimitLayer) -> Router {
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/api/items", get(|| async { "items" }).post(|| async { "created" }))
    /// #         .layer(limits)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let limits = RateLimitLayer::builder(RedisManager::disabled())
    ///     .policy(Policy::gcra("everyone", 2, Duration::from_secs(60)).key(Key::global()))
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// send(&app, from("203.0.113.7", "/")).await;
    /// send(&app, from("198.51.100.1", "/")).await;
    /// // Whoever comes third waits.
    /// assert_eq!(send(&app, from("192.0.2.1", "/")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// # Ok(()) }
    /// ```
    pub fn global() -> Self {
        Self {
            kind: KeyKind::Global,
        }
    }

    /// True for [`Key::client_ip`], which needs the request's peer address.
    pub(crate) fn is_client_ip(&self) -> bool {
        matches!(self.kind, KeyKind::ClientIp)
    }

    /// True for the keys read from the request head by the layer itself
    /// ([`Key::client_ip`], [`Key::header`], [`Key::global`]), not by a
    /// function of the application's.
    pub(crate) fn is_built_in(&self) -> bool {
        !matches!(self.kind, KeyKind::Sync(_) | KeyKind::Async(_))
    }

    /// Extracts this key from a request head. Empty values count as missing.
    pub(crate) async fn extract(&self, parts: &Parts, client_ip: &ClientIp) -> Option<String> {
        if let Some(value) = self.extract_built_in(parts, client_ip) {
            return value.map(Cow::into_owned);
        }
        let value = match &self.kind {
            KeyKind::Sync(extract) => extract(parts),
            KeyKind::Async(extract) => extract(parts).await,
            // Read above.
            KeyKind::ClientIp | KeyKind::Header(_) | KeyKind::Global => None,
        };
        value.filter(|value| !value.is_empty())
    }

    /// [`extract`](Self::extract) for a [built-in](Self::is_built_in) key,
    /// which needs no waiting; `None` for a function of the application's.
    pub(crate) fn extract_built_in<'p>(
        &self,
        parts: &'p Parts,
        client_ip: &ClientIp,
    ) -> Option<Option<Cow<'p, str>>> {
        let value = match &self.kind {
            KeyKind::ClientIp => client_ip.key_of_parts(parts).map(Cow::Owned),
            KeyKind::Header(name) => parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| header_key(name, v)),
            // The one bucket's key is empty, and not missing.
            KeyKind::Global => return Some(Some(Cow::Borrowed(""))),
            KeyKind::Sync(_) | KeyKind::Async(_) => return None,
        };
        Some(value.filter(|value| !value.is_empty()))
    }
}

/// The key of a header's value: its text, trimmed. In `Authorization` and
/// `Proxy-Authorization` the scheme is case-insensitive and may be followed
/// by several spaces (RFC 9110, section 11), and an app reading the
/// credentials (`Authorization<Bearer>` of the `headers` crate, say) reads
/// `bearer  t` as `Bearer t`: the scheme is lower-cased and the spaces (or
/// tabs) after it made one, so that respelling it is not a new bucket. A
/// value with no space keeps its case: it may be the credentials alone.
fn header_key<'v>(name: &HeaderName, value: &'v str) -> Cow<'v, str> {
    let value = value.trim();
    if name != http::header::AUTHORIZATION && name != http::header::PROXY_AUTHORIZATION {
        return Cow::Borrowed(value);
    }
    match value.split_once([' ', '\t']) {
        Some((scheme, credentials)) => {
            let mut key = scheme.to_ascii_lowercase();
            key.push(' ');
            key.push_str(credentials.trim_start_matches([' ', '\t']));
            Cow::Owned(key)
        }
        // No scheme, or no credentials: as sent.
        None => Cow::Borrowed(value),
    }
}

/// What to do with a request when a policy's key cannot be extracted (no
/// header, no user, no peer address). Empty values count as missing; long
/// ones do not (they are hashed).
///
/// A missing peer address usually means the app is served without connect
/// info; the layer warns about it once, whatever this setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Answer 400 with a problem+json body saying what is missing.
    Reject,
    /// Do not apply that policy to the request (the default).
    #[default]
    Skip,
    /// Count every such request in one shared bucket of that policy.
    SharedBucket,
}

/// The Redis key (also the in-process key) of `policy`'s counter for the
/// key value `value` (`None`: the shared bucket of requests without one).
///
/// `prefix:{tag}:rl:<policy>[:<algorithm>]:<kind>:<value>`, every part
/// escaped, where:
/// - `<algorithm>` is absent for GCRA (so GCRA counters keep the layout of
///   earlier versions), `fw2` for fixed windows and `sw2` for sliding
///   windows: two layers that give one policy name to different algorithms
///   count in different keys, instead of one reading the other's counter.
///   The `2` is the window counter's layout: a string of packed numbers
///   (see `decide.lua`), where earlier versions kept a hash under
///   `fw`/`sw`. During a rolling upgrade the two versions count a window
///   policy in different keys (each admits up to the limit), and neither
///   reads a counter of the other's type;
/// - `<kind>:<value>` is `k:<value>` for a value of at most
///   [`MAX_KEY_LEN`] bytes, `h:<hex SHA-256 of the value>` for a longer one,
///   and `missing` for the shared bucket. Parts are escaped, so a value
///   cannot contain `:` and these never collide.
#[cfg(test)]
pub(crate) fn counter_key(
    keys: &Keyspace,
    tag: &str,
    policy: &Policy,
    value: Option<&str>,
) -> String {
    CounterKeys::new(keys, tag, policy).key(value).to_string()
}

/// A policy's counter keys (see [`counter_key`]): the start they all
/// share, `prefix:{tag}:rl:<policy>[:fw2|:sw2]:`, is written once, when the
/// layer is built; a request's key appends its own part to it.
#[derive(Debug)]
pub(crate) struct CounterKeys {
    shared: String,
    /// The key of an empty value (a [`Key::global`] policy's one counter),
    /// and of the shared bucket: each made once, a request's is a clone.
    empty: Arc<str>,
    missing: Arc<str>,
}

impl CounterKeys {
    pub(crate) fn new(keys: &Keyspace, tag: &str, policy: &Policy) -> Self {
        let name = policy.name();
        let mut shared = match policy.algorithm() {
            Algorithm::Gcra { .. } => keys.tagged(tag, &["rl", name]),
            Algorithm::FixedWindow { .. } => keys.tagged(tag, &["rl", name, "fw2"]),
            Algorithm::SlidingWindow { .. } => keys.tagged(tag, &["rl", name, "sw2"]),
        };
        shared.push(':');
        let empty = Arc::from(build_key(&shared, Some("")));
        let missing = Arc::from(build_key(&shared, None));
        Self {
            shared,
            empty,
            missing,
        }
    }

    /// The key of the counter of `value` (`None`: the shared bucket of
    /// requests without one). The same text as `Keyspace::tagged` of all
    /// the parts: each part after the shared start is escaped alike.
    pub(crate) fn key(&self, value: Option<&str>) -> Arc<str> {
        match value {
            Some("") => Arc::clone(&self.empty),
            None => Arc::clone(&self.missing),
            Some(_) => {
                // Written into this thread's buffer, then copied once into
                // the key's own allocation.
                thread_local! {
                    static BUFFER: std::cell::RefCell<String> =
                        const { std::cell::RefCell::new(String::new()) };
                }
                tower_redis_core::sync::with_scratch(&BUFFER, |buffer| {
                    write_key(buffer, &self.shared, value);
                    Arc::from(buffer.as_str())
                })
            }
        }
    }
}

/// The counter key of `value` after the policy's `shared` start.
fn build_key(shared: &str, value: Option<&str>) -> String {
    let mut key = String::new();
    write_key(&mut key, shared, value);
    key
}

fn write_key(key: &mut String, shared: &str, value: Option<&str>) {
    let hashed;
    let (kind, part) = match value {
        Some(value) if value.len() <= MAX_KEY_LEN => ("k", escape_key_part(value)),
        Some(value) => {
            hashed = sha256_hex(value);
            ("h", escape_key_part(&hashed))
        }
        None => ("missing", Cow::Borrowed("")),
    };
    key.reserve(shared.len() + kind.len() + 1 + part.len());
    key.push_str(shared);
    key.push_str(kind);
    if value.is_some() {
        key.push(':');
        key.push_str(&part);
    }
}

fn sha256_hex(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(value.as_bytes());
    let mut hex = String::with_capacity(2 * digest.len());
    for byte in digest.iter() {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;

    /// The key written from the shared start is the key of all its parts
    /// (as earlier versions wrote it), escapes included.
    #[test]
    fn a_counter_key_is_its_parts_tagged() {
        let keys = Keyspace::new("app:x");
        let hour = Duration::from_secs(3600);
        let long = "v".repeat(MAX_KEY_LEN + 1);
        for tag in ["rl", "a{b}:c"] {
            for policy in [
                Policy::gcra("p", 1, hour),
                Policy::fixed_window("p-2", 1, hour),
                Policy::sliding_window("p", 1, hour),
            ] {
                let written = CounterKeys::new(&keys, tag, &policy);
                let kind = match policy.algorithm() {
                    Algorithm::Gcra { .. } => vec![],
                    Algorithm::FixedWindow { .. } => vec!["fw2"],
                    Algorithm::SlidingWindow { .. } => vec!["sw2"],
                };
                let hashed = sha256_hex(&long);
                for (value, tail) in [
                    (Some("alice"), vec!["k", "alice"]),
                    (Some("a:b {c}*?%"), vec!["k", "a:b {c}*?%"]),
                    (Some(""), vec!["k", ""]),
                    (Some(long.as_str()), vec!["h", hashed.as_str()]),
                    (None, vec!["missing"]),
                ] {
                    let mut parts = vec!["rl", policy.name()];
                    parts.extend(&kind);
                    parts.extend(tail);
                    assert_eq!(&*written.key(value), keys.tagged(tag, &parts), "{value:?}");
                }
            }
        }
    }

    #[test]
    fn counter_keys_differ_by_algorithm_kind_and_value() {
        let keys = Keyspace::new("app");
        let hour = Duration::from_secs(3600);
        let policies = [
            Policy::gcra("p", 1, hour),
            Policy::fixed_window("p", 1, hour),
            Policy::sliding_window("p", 1, hour),
        ];
        let long_a = "a".repeat(MAX_KEY_LEN + 1);
        let long_b = format!("{}b", "a".repeat(MAX_KEY_LEN));
        let exact = "a".repeat(MAX_KEY_LEN);
        let hash_of_a = sha256_hex(&long_a);
        let values = [
            Some("alice"),
            Some(exact.as_str()),
            Some(long_a.as_str()),
            Some(long_b.as_str()),
            // A client sending the hash of someone's long key as its own
            // key, or the words the layout uses.
            Some(hash_of_a.as_str()),
            Some("h"),
            Some("missing"),
            Some("fw:k:alice"),
            None,
        ];
        let mut seen = HashSet::new();
        for policy in &policies {
            for value in values {
                let key = counter_key(&keys, "rl", policy, value);
                assert!(key.len() < 64 + 3 * MAX_KEY_LEN, "{key}");
                assert!(seen.insert(key.clone()), "{key} collides");
            }
        }
        // GCRA keeps the layout of earlier versions.
        assert_eq!(
            counter_key(&keys, "rl", &policies[0], Some("alice")),
            "app:{rl}:rl:p:k:alice"
        );
        assert_eq!(
            counter_key(&keys, "rl", &policies[1], Some("alice")),
            "app:{rl}:rl:p:fw2:k:alice"
        );
        assert_eq!(
            counter_key(&keys, "rl", &policies[2], None),
            "app:{rl}:rl:p:sw2:missing"
        );
        assert_eq!(
            counter_key(&keys, "rl", &policies[0], Some(&long_a)),
            format!("app:{{rl}}:rl:p:h:{hash_of_a}")
        );
        assert_eq!(hash_of_a.len(), 64);
    }
}
