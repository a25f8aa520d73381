//! [`RateLimitLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use http::request::Parts;
use ipnet::IpNet;
use tower_layer::Layer;
use tower_redis_core::RedisManager;

use crate::client_ip::{ClientIp, TrustedProxies};
use crate::key::{CounterKeys, MissingKey};
use crate::limiter::{Fallback, Limiter};
use crate::policy::Policy;
use crate::response::{Denied, DeniedResponse};
use crate::service::RateLimit;
use tower_redis_core::forwarding::Forwarding;

type Predicate = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;
type CostFn = Arc<dyn Fn(&Parts) -> u32 + Send + Sync>;

/// A problem with the layer's configuration, found by
/// [`RateLimitLayerBuilder::build`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The layer has no policy, so it would limit nothing.
    #[error(
        "the rate-limit layer has no policy; add one with `.policy(Policy::gcra(\"per-ip\", 100, Duration::from_secs(60)))`"
    )]
    NoPolicy,
    /// A policy's numbers or name are unusable.
    #[error("rate-limit policy \"{policy}\": {problem}")]
    InvalidPolicy {
        /// The policy's name.
        policy: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// Two policies share a name (they would share counters).
    #[error("two rate-limit policies are named \"{0}\"; give each a distinct name")]
    DuplicatePolicy(String),
    /// An allow-list or trusted-proxy entry is not an address or CIDR.
    #[error(
        "`{entry}` in {list} is not an IP address or CIDR ({reason}); write e.g. 10.0.0.0/8 or 2001:db8::/32"
    )]
    InvalidNetwork {
        /// Which list.
        list: &'static str,
        /// The entry.
        entry: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The memory bound of the in-process state is too small to be useful.
    #[error(
        "the rate-limit layer's memory capacity is {0} bytes; use at least 65536 (64 KiB), e.g. the default of 64 MiB"
    )]
    MemoryCapacityTooSmall(u64),
    /// The local fallback's share is outside (0, 1].
    #[error(
        "the local fallback share is {0}; use a fraction above 0 and at most 1 (e.g. 1/instances)"
    )]
    InvalidShare(String),
}

/// The rate limit layer: decides every applicable [`Policy`] of a request
/// together, in one Redis round trip, and answers 429 when any denies it.
///
/// Cheap to clone; all clones share the configuration and local state.
#[derive(Clone)]
pub struct RateLimitLayer {
    pub(crate) config: Arc<Config>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("policies", &self.config.policies)
            .field("shadow", &self.config.shadow)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// Gives the unused units of this layer's leases ([`Policy::lease`])
    /// back to Redis now, so that other instances can spend them: call it
    /// when the instance shuts down. Idle leases go back by themselves
    /// after 1 s; dropping the layer gives them back from a task. Leases
    /// being taken when it is called (a refill, ahead or not) are waited
    /// for, at most the manager's command timeout, and given back too.
    /// A give-back that fails (Redis unavailable) leaves the units counted
    /// until their window or period ends: fewer admissions, never more.
    pub async fn return_leases(&self) {
        self.config.limiter.return_leases().await;
    }

    /// Starts a builder on a shared connection manager.
    pub fn builder(manager: RedisManager) -> RateLimitLayerBuilder {
        RateLimitLayerBuilder {
            manager,
            policies: Vec::new(),
            client_ip: ClientIp::new(),
            trusted_proxies: Vec::new(),
            missing_key: MissingKey::default(),
            allow_nets: Vec::new(),
            allow_if: Vec::new(),
            shadow: false,
            legacy_headers: false,
            cost: None,
            fallback: Fallback::default(),
            on_denied: None,
            hash_tag: "rl".to_owned(),
            memory_bytes: DEFAULT_MEMORY_BYTES,
        }
    }
}

/// The default bound of a layer's in-process state: 64 MiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;

/// The smallest bound [`RateLimitLayerBuilder::memory_capacity_bytes`] takes.
const MIN_MEMORY_BYTES: u64 = 64 << 10;

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.config))
    }
}

pub(crate) struct Config {
    pub(crate) policies: Vec<Policy>,
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) client_ip: ClientIp,
    pub(crate) missing_key: MissingKey,
    pub(crate) allow_nets: Vec<IpNet>,
    pub(crate) allow_if: Vec<Predicate>,
    pub(crate) shadow: bool,
    pub(crate) legacy_headers: bool,
    pub(crate) cost: Option<CostFn>,
    pub(crate) on_denied: Option<DeniedResponse>,
    /// Each policy's counter keys, in the order of `policies`.
    pub(crate) counter_keys: Vec<CounterKeys>,
    /// Set once the layer has warned about a request without a peer address.
    pub(crate) warned_no_peer_address: AtomicBool,
    /// Every policy leases, and the layer reads the request itself: its
    /// built-in keys, no `allow_if` predicate, no cost function. A request
    /// is then decided when the service is called, with no future of its
    /// own, whenever the leases hold its units; the few that must take a
    /// lease first are decided again, by the same reads, in a future. No
    /// function of the application's runs twice for one request.
    pub(crate) decides_at_once: bool,
}

/// Configures a [`RateLimitLayer`].
///
/// ```
/// use std::time::Duration;
/// use tower_redis_core::RedisManager;
/// use tower_redis_ratelimit::{Fallback, Key, Policy, RateLimitLayer};
///
/// let layer = RateLimitLayer::builder(RedisManager::disabled())
///     .policy(Policy::gcra("per-ip", 50, Duration::from_secs(30)))
///     .policy(Policy::gcra("api-key", 1_000, Duration::from_secs(60)).key(Key::header("x-api-key")).path("/api/*"))
///     .trusted_proxies(["10.0.0.0/8"])
///     .fallback(Fallback::Local { share: 0.5 })
///     .build()?;
/// # let _ = layer;
/// # Ok::<(), tower_redis_ratelimit::ConfigError>(())
/// ```
pub struct RateLimitLayerBuilder {
    manager: RedisManager,
    policies: Vec<Policy>,
    client_ip: ClientIp,
    trusted_proxies: Vec<String>,
    missing_key: MissingKey,
    allow_nets: Vec<String>,
    allow_if: Vec<Predicate>,
    shadow: bool,
    legacy_headers: bool,
    cost: Option<CostFn>,
    fallback: Fallback,
    on_denied: Option<DeniedResponse>,
    hash_tag: String,
    memory_bytes: u64,
}

impl fmt::Debug for RateLimitLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("policies", &self.policies)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayerBuilder {
    /// Adds a policy. Every policy that applies to a request is decided with
    /// the others, all or nothing.
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
    ///     .policy(Policy::gcra("per-ip", 100, Duration::from_secs(60)))
    ///     .policy(Policy::gcra("api", 1, Duration::from_secs(60)).path("/api/*"))
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// // Under /api both policies apply, and both are reported.
    /// let first = send(&app, from("203.0.113.7", "/api/items")).await;
    /// let policies: Vec<&str> = first.headers().get_all("ratelimit-policy").iter().map(|v| v.to_str().unwrap()).collect();
    /// assert_eq!(policies.join(", "), "\"per-ip\";q=100;w=60, \"api\";q=1;w=60");
    /// // Denied by "api": all or nothing, so "per-ip" is not charged for it.
    /// let second = send(&app, from("203.0.113.7", "/api/items")).await;
    /// assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    /// let home = send(&app, from("203.0.113.7", "/")).await;
    /// // 100 - 2 (the denied request was not counted); `local`: decided in process.
    /// let field = home.headers()["ratelimit"].to_str()?;
    /// assert!(field.starts_with("\"per-ip\";r=98;t=") && field.ends_with(";local"), "{field}");
    /// # Ok(()) }
    /// ```
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policies.push(policy);
        self
    }

    /// How [`Key::client_ip`](crate::Key::client_ip) finds the client (IPv6
    /// grouping and so on). Proxies given to
    /// [`trusted_proxies`](Self::trusted_proxies) replace the ones set here.
    pub fn client_ip(mut self, client_ip: ClientIp) -> Self {
        self.client_ip = client_ip;
        self
    }

    /// The shared forwarding model: which proxies are trusted and which one
    /// header they write (`X-Forwarded-For` or `Forwarded`). Give the same
    /// value to the cache layer. Replaces the proxies set with
    /// [`client_ip`](Self::client_ip); proxies given to
    /// [`trusted_proxies`](Self::trusted_proxies) still replace these.
    ///
    /// ```
    /// use tower_redis_core::forwarding::{Forwarding, ForwardingHeader, TrustedProxies};
    /// use tower_redis_ratelimit::{Policy, RateLimitLayer};
    ///
    /// let forwarding = Forwarding::new(
    ///     TrustedProxies::parse(["10.0.0.0/8"])?,
    ///     ForwardingHeader::XForwardedFor,
    /// );
    /// let layer = RateLimitLayer::builder(tower_redis_core::RedisManager::disabled())
    ///     .forwarding(forwarding)
    ///     .policy(Policy::gcra("per-ip", 100, std::time::Duration::from_secs(60)))
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forwarding(mut self, forwarding: Forwarding) -> Self {
        self.client_ip = self.client_ip.forwarding(forwarding);
        self
    }

    /// Proxies whose `X-Forwarded-For` is believed, as addresses or CIDRs.
    /// Without any, forwarding headers are ignored (a client could otherwise
    /// pick its own key). `Forwarded` is never read this way, because proxies
    /// pass a client's `Forwarded` on untouched; for proxies that write
    /// `Forwarded`, use [`forwarding`](Self::forwarding).
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
    ///     .policy(Policy::gcra("per-ip", 1, Duration::from_secs(60)))
    ///     .trusted_proxies(["10.0.0.0/8"])
    ///     .build()?;
    /// let app = app(limits);
    /// let via_proxy = |client: &str| {
    ///     let mut request = from("10.0.0.2", "/");
    ///     request.headers_mut().insert("x-forwarded-for", client.parse().unwrap());
    ///     request
    /// };
    ///
    /// // Two clients behind one proxy are counted apart.
    /// assert_eq!(send(&app, via_proxy("198.51.100.1")).await.status(), StatusCode::OK);
    /// assert_eq!(send(&app, via_proxy("198.51.100.2")).await.status(), StatusCode::OK);
    /// assert_eq!(send(&app, via_proxy("198.51.100.1")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// // From an untrusted peer the header is ignored: it cannot pick its own key.
    /// let mut spoofed = from("203.0.113.7", "/");
    /// spoofed.headers_mut().insert("x-forwarded-for", "198.51.100.9".parse()?);
    /// assert_eq!(send(&app, spoofed).await.status(), StatusCode::OK);
    /// let mut spoofed = from("203.0.113.7", "/");
    /// spoofed.headers_mut().insert("x-forwarded-for", "198.51.100.10".parse()?);
    /// assert_eq!(send(&app, spoofed).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// # Ok(()) }
    /// ```
    pub fn trusted_proxies<I, S>(mut self, proxies: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.trusted_proxies
            .extend(proxies.into_iter().map(|p| p.as_ref().to_owned()));
        self
    }

    /// What to do when a policy's key is missing from a request (default:
    /// skip that policy).
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
    /// let by_key = Policy::gcra("per-key", 100, Duration::from_secs(60)).key(Key::header("x-api-key"));
    /// let limits = RateLimitLayer::builder(RedisManager::disabled())
    ///     .policy(by_key)
    ///     .on_missing_key(MissingKey::Reject)
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// let anonymous = send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(anonymous.status(), StatusCode::BAD_REQUEST);
    /// assert_eq!(anonymous.headers()["content-type"], "application/problem+json");
    /// # Ok(()) }
    /// ```
    pub fn on_missing_key(mut self, outcome: MissingKey) -> Self {
        self.missing_key = outcome;
        self
    }

    /// Client addresses or CIDRs that are never limited.
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
    ///     .policy(Policy::gcra("per-ip", 1, Duration::from_secs(60)))
    ///     .allow_ips(["192.0.2.0/24"]) // e.g. the monitoring hosts
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// for _ in 0..3 {
    ///     assert_eq!(send(&app, from("192.0.2.10", "/")).await.status(), StatusCode::OK);
    /// }
    /// send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(send(&app, from("203.0.113.7", "/")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// # Ok(()) }
    /// ```
    pub fn allow_ips<I, S>(mut self, networks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.allow_nets
            .extend(networks.into_iter().map(|n| n.as_ref().to_owned()));
        self
    }

    /// Requests for which `allow` returns true are never limited.
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
    ///     .policy(Policy::gcra("per-ip", 1, Duration::from_secs(60)))
    ///     .allow_if(|request| request.uri.path() == "/")
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// for _ in 0..3 {
    ///     let home = send(&app, from("203.0.113.7", "/")).await;
    ///     assert_eq!(home.status(), StatusCode::OK);
    ///     assert!(home.headers().get("ratelimit").is_none()); // not even counted
    /// }
    /// # Ok(()) }
    /// ```
    pub fn allow_if<F>(mut self, allow: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.allow_if.push(Arc::new(allow));
        self
    }

    /// Shadow mode: decide and count (logs, metrics) but never deny and add
    /// no fields, for trying a policy on real traffic.
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
    ///     .policy(Policy::gcra("per-ip", 1, Duration::from_secs(60)))
    ///     .shadow(true)
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// for _ in 0..3 {
    ///     // Would be denied from the second on; decided and counted, never enforced.
    ///     let home = send(&app, from("203.0.113.7", "/")).await;
    ///     assert_eq!(home.status(), StatusCode::OK);
    ///     assert!(home.headers().get("ratelimit").is_none());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Also send `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds).
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
    ///     .policy(Policy::gcra("per-ip", 10, Duration::from_secs(60)))
    ///     .legacy_headers(true)
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// let home = send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(home.headers()["x-ratelimit-limit"], "10");
    /// assert_eq!(home.headers()["x-ratelimit-remaining"], "9");
    /// assert!(home.headers().contains_key("ratelimit")); // the IETF fields as well
    /// # Ok(()) }
    /// ```
    pub fn legacy_headers(mut self, legacy: bool) -> Self {
        self.legacy_headers = legacy;
        self
    }

    /// The cost of a request in quota units (default 1). A cost of 0 is free.
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
    /// // Writes cost 5 units, reads 1.
    /// let limits = RateLimitLayer::builder(RedisManager::disabled())
    ///     .policy(Policy::gcra("per-ip", 6, Duration::from_secs(60)))
    ///     .cost(|request| if request.method == http::Method::POST { 5 } else { 1 })
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// let mut write = from("203.0.113.7", "/api/items");
    /// *write.method_mut() = http::Method::POST;
    /// assert_eq!(send(&app, write).await.status(), StatusCode::OK);
    /// let read = send(&app, from("203.0.113.7", "/api/items")).await;
    /// assert!(read.headers()["ratelimit"].to_str()?.starts_with("\"per-ip\";r=0;"));
    /// assert_eq!(send(&app, from("203.0.113.7", "/api/items")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// # Ok(()) }
    /// ```
    pub fn cost<F>(mut self, cost: F) -> Self
    where
        F: Fn(&Parts) -> u32 + Send + Sync + 'static,
    {
        self.cost = Some(Arc::new(cost));
        self
    }

    /// What to do while Redis is unavailable (default: limit in process
    /// with the full quota; see [`Fallback`]).
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
    /// // While Redis is unavailable (here: always), ...
    /// let app_with = |fallback| {
    ///     let limits = RateLimitLayer::builder(RedisManager::disabled())
    ///         .policy(Policy::gcra("per-ip", 4, Duration::from_secs(60)))
    ///         .fallback(fallback)
    ///         .build()
    ///         .unwrap();
    ///     app(limits)
    /// };
    ///
    /// // ... limit in process with half the quota (two instances) ...
    /// let local = app_with(Fallback::Local { share: 0.5 });
    /// let mut allowed = 0;
    /// for _ in 0..3 {
    ///     if send(&local, from("203.0.113.7", "/")).await.status() == StatusCode::OK { allowed += 1 }
    /// }
    /// assert_eq!(allowed, 2);
    /// // ... or fail open, or closed.
    /// assert_eq!(send(&app_with(Fallback::Allow), from("203.0.113.7", "/")).await.status(), StatusCode::OK);
    /// assert_eq!(
    ///     send(&app_with(Fallback::Deny), from("203.0.113.7", "/")).await.status(),
    ///     StatusCode::TOO_MANY_REQUESTS
    /// );
    /// # Ok(()) }
    /// ```
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// Replaces the default 429 problem+json response (gRPC requests still
    /// get `RESOURCE_EXHAUSTED`).
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
    ///     .policy(Policy::gcra("per-ip", 1, Duration::from_secs(60)))
    ///     .on_denied(|denied| {
    ///         let text = format!("slow down ({})", denied.policies.join(", "));
    ///         Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(Bytes::from(text)).unwrap()
    ///     })
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// send(&app, from("203.0.113.7", "/")).await;
    /// let denied = send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(denied.status(), StatusCode::SERVICE_UNAVAILABLE);
    /// assert_eq!(denied.body(), "slow down (per-ip)");
    /// assert!(denied.headers().contains_key("retry-after")); // added for you
    /// # Ok(()) }
    /// ```
    pub fn on_denied<F>(mut self, respond: F) -> Self
    where
        F: Fn(&Denied) -> http::Response<bytes::Bytes> + Send + Sync + 'static,
    {
        self.on_denied = Some(Arc::new(respond));
        self
    }

    /// The cluster hash tag of this layer's keys (default `rl`). All keys of
    /// one layer share it, so a decision over several policies is one
    /// atomic script on Redis Cluster too.
    pub fn hash_tag(mut self, tag: &str) -> Self {
        self.hash_tag = tag.to_owned();
        self
    }

    /// The most memory this layer's in-process state may take, in bytes
    /// (default [`DEFAULT_MEMORY_BYTES`], 64 MiB; at least 64 KiB). Half
    /// goes to the local limiter that decides while Redis is down, half to
    /// the cache of keys Redis has denied (of which a quarter goes to the
    /// leases when a policy leases, see [`Policy::lease`]). Each entry is counted for its key
    /// plus about 280 bytes (its share of the maps, with room for their
    /// growth), so the default holds about 100 000 clients in each.
    ///
    /// At the bound the least recently used entry is evicted, so a client
    /// rotating through addresses or keys cannot grow memory:
    /// - in the local limiter, an evicted client starts over with a fresh
    ///   local quota the next time it comes; every client still held keeps
    ///   being limited, and one that keeps sending stays held unless more
    ///   distinct clients than fit arrive between two of its requests;
    /// - in the blocked-key cache, an evicted key's next request is decided
    ///   by Redis again (one round trip; the limit itself is unchanged).
    pub fn memory_capacity_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    /// Checks everything and builds the layer.
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
    /// use tower_redis_ratelimit::ConfigError;
    ///
    /// let error = RateLimitLayer::builder(RedisManager::disabled()).build().unwrap_err();
    /// assert!(matches!(error, ConfigError::NoPolicy));
    /// let error = RateLimitLayer::builder(RedisManager::disabled())
    ///     .policy(Policy::gcra("per-ip", 10, Duration::from_secs(60)))
    ///     .trusted_proxies(["not an address"])
    ///     .build()
    ///     .unwrap_err();
    /// println!("{error}"); // names the value and what to write instead
    /// # Ok(()) }
    /// ```
    pub fn build(self) -> Result<RateLimitLayer, ConfigError> {
        if self.policies.is_empty() {
            return Err(ConfigError::NoPolicy);
        }
        for (i, policy) in self.policies.iter().enumerate() {
            policy
                .validate()
                .map_err(|problem| ConfigError::InvalidPolicy {
                    policy: policy.name().to_owned(),
                    problem,
                })?;
            if self.policies[..i].iter().any(|p| p.name() == policy.name()) {
                return Err(ConfigError::DuplicatePolicy(policy.name().to_owned()));
            }
        }
        if let Fallback::Local { share } = self.fallback
            && !(share > 0.0 && share <= 1.0)
        {
            return Err(ConfigError::InvalidShare(share.to_string()));
        }
        if self.memory_bytes < MIN_MEMORY_BYTES {
            return Err(ConfigError::MemoryCapacityTooSmall(self.memory_bytes));
        }
        let mut client_ip = self.client_ip;
        if !self.trusted_proxies.is_empty() {
            let proxies = TrustedProxies::parse(&self.trusted_proxies).map_err(|e| {
                ConfigError::InvalidNetwork {
                    list: "trusted_proxies",
                    entry: e.entry.clone(),
                    reason: e.reason.clone(),
                }
            })?;
            client_ip = client_ip.trusted_proxies(proxies);
        }
        let allow_nets = TrustedProxies::parse(&self.allow_nets)
            .map_err(|e| ConfigError::InvalidNetwork {
                list: "allow_ips",
                entry: e.entry.clone(),
                reason: e.reason.clone(),
            })?
            .networks()
            .to_vec();
        let leases = self.policies.iter().any(|p| p.lease.is_some());
        let decides_at_once = self
            .policies
            .iter()
            .all(|p| p.lease.is_some() && p.key.is_built_in())
            && self.allow_if.is_empty()
            && self.cost.is_none();
        let counter_keys = self
            .policies
            .iter()
            .map(|policy| CounterKeys::new(self.manager.keys(), &self.hash_tag, policy))
            .collect();
        Ok(RateLimitLayer {
            config: Arc::new(Config {
                policies: self.policies,
                limiter: Limiter::with_leases(
                    self.manager,
                    self.fallback,
                    self.memory_bytes,
                    leases,
                ),
                client_ip,
                missing_key: self.missing_key,
                allow_nets,
                allow_if: self.allow_if,
                shadow: self.shadow,
                legacy_headers: self.legacy_headers,
                cost: self.cost,
                on_denied: self.on_denied,
                counter_keys,
                warned_no_peer_address: AtomicBool::new(false),
                decides_at_once,
            }),
        })
    }
}
