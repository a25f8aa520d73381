//! Policies: what a limit is (algorithm and numbers), whom it counts (key)
//! and where it applies (path pattern and methods).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tower_redis_core::http::PathPattern;
use tower_redis_core::record::NamedCounter;

use crate::algorithm::Algorithm;
use crate::key::Key;

/// One named limit. Several can apply to a request; they are decided
/// together, all or nothing.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_ratelimit::{Key, Policy};
///
/// let per_ip = Policy::gcra("per-ip", 100, Duration::from_secs(60)).burst(20);
/// let per_user_writes = Policy::fixed_window("user-writes", 1_000, Duration::from_secs(3600))
///     .key(Key::header("x-user-id"))
///     .path("/api/*")
///     .methods([http::Method::POST, http::Method::PUT]);
/// # let _ = (per_ip, per_user_writes);
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) name: Arc<str>,
    pub(crate) algorithm: Algorithm,
    pub(crate) key: Key,
    pub(crate) path: Option<PathPattern>,
    pub(crate) methods: Option<Vec<Method>>,
    pub(crate) lease: Option<u32>,
    /// `tower_redis_ratelimit_policy_decisions_total` for this policy, by
    /// outcome (see [`PolicyOutcome`]): built with the policy, so that counting
    /// a decision allocates nothing.
    pub(crate) counters: Arc<Counters>,
    /// This policy's parts of the response fields, written once: neither
    /// its name nor its quota and window change after it is made.
    pub(crate) described: Arc<Described>,
}

/// What the response fields say of one policy that never changes.
pub(crate) struct Described {
    /// Its `RateLimit-Policy` item: `"name";q=<quota>;w=<window s>`.
    pub(crate) item: Box<str>,
    /// The item as a whole field value (the usual one-policy field), or
    /// `None` when the name is not header-safe (such a policy never gets
    /// past the layer's build).
    pub(crate) value: Option<HeaderValue>,
    /// The start of its `RateLimit` item: `"name";r=`.
    pub(crate) limit_prefix: Box<str>,
}

/// Its item alone: the rest says the same again.
impl std::fmt::Debug for Described {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.item)
    }
}

impl Described {
    fn new(name: &str, algorithm: Algorithm) -> Self {
        let item = format!(
            "\"{name}\";q={};w={}",
            algorithm.quota(),
            crate::headers::ceil_secs(algorithm.window())
        );
        Self {
            value: HeaderValue::from_str(&item).ok(),
            item: item.into_boxed_str(),
            limit_prefix: format!("\"{name}\";r=").into_boxed_str(),
        }
    }
}

/// A policy's decision counters, by [`PolicyOutcome`].
pub(crate) struct Counters([NamedCounter; 3]);

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

/// This policy's part in a decision, as its counters label it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PolicyOutcome {
    Allowed = 0,
    Denied = 1,
    /// Decided without the counters (no per-policy state).
    Unknown = 2,
}

impl Policy {
    /// A GCRA policy (the default choice): `quota` requests per `period`,
    /// burst equal to the quota, keyed by client IP.
    ///
    /// GCRA counts time in whole microseconds, so a quota may space its
    /// requests at most one a microsecond (a million a second per key); the
    /// builder refuses a faster one with [`ConfigError::InvalidPolicy`](crate::ConfigError::InvalidPolicy). For
    /// more, use a [`sliding_window`](Self::sliding_window), or a
    /// [lease](Self::lease) of a window policy.
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
    /// // 60 per minute, at most 10 at once: then one per second.
    /// let limits = RateLimitLayer::builder(RedisManager::disabled())
    ///     .policy(Policy::gcra("per-ip", 60, Duration::from_secs(60)).burst(10))
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// let first = send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(first.headers()["ratelimit-policy"], "\"per-ip\";q=60;w=60");
    /// for _ in 1..10 {
    ///     send(&app, from("203.0.113.7", "/")).await;
    /// }
    /// let eleventh = send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(eleventh.status(), StatusCode::TOO_MANY_REQUESTS);
    /// assert_eq!(eleventh.headers()["retry-after"], "1");
    /// # Ok(()) }
    /// ```
    pub fn gcra(name: &str, quota: u32, period: Duration) -> Self {
        Self::new(
            name,
            Algorithm::Gcra {
                quota,
                period,
                burst: quota,
            },
        )
    }

    /// A sliding-window counter policy keyed by client IP.
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
    ///     .policy(Policy::sliding_window("per-ip", 2, Duration::from_secs(10)))
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// send(&app, from("203.0.113.7", "/")).await;
    /// send(&app, from("203.0.113.7", "/")).await;
    /// let third = send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    /// assert_eq!(third.headers()["ratelimit-policy"], "\"per-ip\";q=2;w=10");
    /// # Ok(()) }
    /// ```
    pub fn sliding_window(name: &str, limit: u32, window: Duration) -> Self {
        Self::new(name, Algorithm::SlidingWindow { limit, window })
    }

    /// A fixed-window policy keyed by client IP.
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
    ///     .policy(Policy::fixed_window("per-ip", 2, Duration::from_secs(3600)))
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// send(&app, from("203.0.113.7", "/")).await;
    /// let second = send(&app, from("203.0.113.7", "/")).await;
    /// assert!(second.headers()["ratelimit"].to_str()?.starts_with("\"per-ip\";r=0;"));
    /// // The window is aligned to the clock hour: the reset is at its end.
    /// let third = send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    /// # Ok(()) }
    /// ```
    pub fn fixed_window(name: &str, limit: u32, window: Duration) -> Self {
        Self::new(name, Algorithm::FixedWindow { limit, window })
    }

    fn new(name: &str, algorithm: Algorithm) -> Self {
        Self {
            name: name.into(),
            algorithm,
            key: Key::client_ip(),
            path: None,
            methods: None,
            lease: None,
            counters: Arc::new(Counters(["allowed", "denied", "unknown"].map(|outcome| {
                NamedCounter::new(
                    "tower_redis_ratelimit_policy_decisions_total",
                    &[("outcome", outcome)],
                    ("policy", name),
                )
            }))),
            described: Arc::new(Described::new(name, algorithm)),
        }
    }

    /// Counts this policy's part in one decision.
    pub(crate) fn count(&self, outcome: PolicyOutcome) {
        self.counters.0[outcome as usize].increment(1);
    }

    /// For GCRA, how many requests may arrive at once (default: the quota).
    /// Ignored by the window algorithms.
    pub fn burst(mut self, burst: u32) -> Self {
        if let Algorithm::Gcra { burst: b, .. } = &mut self.algorithm {
            *b = burst;
        }
        self
    }

    /// Whom the policy counts (default: [`Key::client_ip`]).
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
    /// let per_key = Policy::gcra("per-key", 1, Duration::from_secs(60)).key(Key::header("x-api-key"));
    /// let limits = RateLimitLayer::builder(RedisManager::disabled()).policy(per_key).build()?;
    /// let app = app(limits);
    /// let with_key = |key: &str| {
    ///     let mut request = from("203.0.113.7", "/");
    ///     request.headers_mut().insert("x-api-key", key.parse().unwrap());
    ///     request
    /// };
    ///
    /// assert_eq!(send(&app, with_key("team-a")).await.status(), StatusCode::OK);
    /// // Same address, other key: its own quota.
    /// assert_eq!(send(&app, with_key("team-b")).await.status(), StatusCode::OK);
    /// assert_eq!(send(&app, with_key("team-a")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// // No key: the policy is skipped (see `on_missing_key`).
    /// assert_eq!(send(&app, from("203.0.113.7", "/")).await.status(), StatusCode::OK);
    /// # Ok(()) }
    /// ```
    pub fn key(mut self, key: Key) -> Self {
        self.key = key;
        self
    }

    /// Applies the policy only to matching paths: an exact path (`/login`)
    /// or a prefix ending in `*` (`/api/*`).
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
    ///     .policy(Policy::gcra("api", 1, Duration::from_secs(60)).path("/api/*"))
    ///     .build()?;
    /// let app = app(limits);
    ///
    /// send(&app, from("203.0.113.7", "/api/items")).await;
    /// assert_eq!(send(&app, from("203.0.113.7", "/api/items")).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// let home = send(&app, from("203.0.113.7", "/")).await;
    /// assert_eq!(home.status(), StatusCode::OK);
    /// assert!(home.headers().get("ratelimit").is_none()); // no policy applies here
    /// # Ok(()) }
    /// ```
    pub fn path(mut self, pattern: &str) -> Self {
        self.path = Some(PathPattern::new(pattern));
        self
    }

    /// Applies the policy only to these methods. A policy on `GET` applies
    /// to `HEAD` too: routers answer a `HEAD` with the `GET` handler (axum
    /// does), so the work and the status a `GET` would be limited for are
    /// there without a body.
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
    /// let writes = Policy::gcra("writes", 1, Duration::from_secs(60)).methods([http::Method::POST]);
    /// let limits = RateLimitLayer::builder(RedisManager::disabled()).policy(writes).build()?;
    /// let app = app(limits);
    /// let post = || {
    ///     let mut request = from("203.0.113.7", "/api/items");
    ///     *request.method_mut() = http::Method::POST;
    ///     request
    /// };
    ///
    /// assert_eq!(send(&app, post()).await.status(), StatusCode::OK);
    /// assert_eq!(send(&app, post()).await.status(), StatusCode::TOO_MANY_REQUESTS);
    /// assert_eq!(send(&app, from("203.0.113.7", "/api/items")).await.status(), StatusCode::OK);
    /// # Ok(()) }
    /// ```
    pub fn methods<I: IntoIterator<Item = Method>>(mut self, methods: I) -> Self {
        let mut methods: Vec<Method> = methods.into_iter().collect();
        if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
            methods.push(Method::HEAD);
        }
        self.methods = Some(methods);
        self
    }

    /// Leases up to `units` of the quota at a time to this instance, for a
    /// hot counter (a global or per-tenant policy hit at a rate where one
    /// key on one Redis shard is the bottleneck): one script call takes the
    /// units, and requests spend them in process with no Redis call until
    /// they run out. At most `units` per instance are held at once (a
    /// request costing more takes its cost).
    ///
    /// What it changes, per algorithm, while Redis answers:
    ///
    /// - **Fixed and sliding windows: no overshoot.** Leased units are
    ///   counted in the window's counter when they are taken, and are void
    ///   when that window ends (on this instance's clock, measured from
    ///   before the lease was asked for, so never after the window really
    ///   ends). Admissions per window stay within the limit (for the sliding
    ///   window, within its usual approximation).
    /// - **GCRA: at most `instances × units` over the GCRA bound in any
    ///   interval** (a period included). A unit is counted when it is
    ///   leased, and may be spent later, so the units an instance holds
    ///   when an interval starts (at most `units`) can be spent in it on top
    ///   of what the GCRA admits in it. A GCRA lease ends one period after
    ///   it was taken.
    /// - **The price: units parked on an idle instance.** Units are taken
    ///   before they are spent, so another instance can be denied while one
    ///   holds unused units: at most `(instances − 1) × units`. Unused units
    ///   go back to Redis (and to the other instances) when a lease has not
    ///   been spent from for 1 s, when it ends (sliding window, GCRA), when
    ///   it is evicted at the memory bound, when the layer is dropped, and on
    ///   [`RateLimitLayer::return_leases`](crate::RateLimitLayer::return_leases)
    ///   (call it at shutdown). A leased policy that Redis denies is asked
    ///   again after 100 ms at the latest (not at its `Retry-After`), so
    ///   units given back reach the other instances.
    /// - **Taken ahead.** A request that leaves the lease at a quarter of
    ///   `units` or less starts the next lease in the background, for what
    ///   brings the units held back to `units`: a hot key's requests do not
    ///   wait for Redis. The next units keep their own window and end.
    /// - **Redis round trips:** one per lease (`1 / units` to `4 / (3 × units)` per request while
    ///   the key is hot), one per give-back; a request with two leased
    ///   policies that both run out at once makes two.
    /// - **When a request is decided.** When every policy of the layer
    ///   leases and is keyed by the layer itself ([`Key::client_ip`](crate::Key::client_ip),
    ///   [`Key::header`](crate::Key::header), [`Key::global`](crate::Key::global)),
    ///   with no `allow_if` and no `cost`, a request whose units are in the
    ///   leases is decided when the service is called, with no future of its
    ///   own; a response future dropped unpolled has spent its units. Any
    ///   other request is decided in its response future.
    ///
    /// While Redis is unavailable, units already leased are spent (Redis
    /// counted them); once they are gone, the layer's [`Fallback`](crate::Fallback)
    /// decides exactly as for a policy without a lease. While Redis hangs,
    /// a request waits for Redis at most one command timeout, as without a
    /// lease: those waiting for a refill that fails take the fallback with
    /// it, rather than refill in turn. Leases live in a map
    /// bounded by bytes (an eighth of
    /// [`memory_capacity_bytes`](crate::RateLimitLayerBuilder::memory_capacity_bytes)),
    /// so a leased per-client policy cannot grow memory: the least recently
    /// used lease is evicted and its units given back.
    ///
    /// `units` must be 1 to the quota (GCRA: 1 to the burst); the builder
    /// says so otherwise.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_ratelimit::{Key, Policy, RateLimitLayer, RedisManager};
    ///
    /// // 100 000 requests a minute over every instance; each takes 500 at a time.
    /// let global = Policy::fixed_window("global", 100_000, Duration::from_secs(60))
    ///     .key(Key::global())
    ///     .lease(500);
    /// let layer = RateLimitLayer::builder(RedisManager::disabled()).policy(global).build()?;
    /// # let _ = layer;
    /// # Ok::<(), tower_redis_ratelimit::ConfigError>(())
    /// ```
    pub fn lease(mut self, units: u32) -> Self {
        self.lease = Some(units);
        self
    }

    /// The lease size set with [`Policy::lease`], if any.
    pub fn lease_units(&self) -> Option<u32> {
        self.lease
    }

    /// The policy's name, as reported in the `RateLimit` fields.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The counting algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub(crate) fn applies_to(&self, method: &Method, path: &str) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
            && self.path.as_ref().is_none_or(|p| p.matches(path))
    }

    /// Checks the numbers and the name; the message says what to change.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err("the name must be 1 to 64 characters".to_owned());
        }
        if let Some(bad) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':')))
        {
            return Err(format!(
                "the name contains {bad:?}; use letters, digits, `-`, `_`, `.`, `/` or `:`"
            ));
        }
        let (count, span) = match self.algorithm {
            Algorithm::Gcra {
                quota,
                period,
                burst,
            } => {
                if burst == 0 {
                    return Err("burst is 0; use at least 1".to_owned());
                }
                (quota, period)
            }
            Algorithm::SlidingWindow { limit, window }
            | Algorithm::FixedWindow { limit, window } => (limit, window),
        };
        if count == 0 {
            return Err(
                "the quota is 0; use at least 1 (or leave the route out of the policy)".to_owned(),
            );
        }
        if span < Duration::from_millis(1) || span > Duration::from_secs(366 * 24 * 3600) {
            return Err(format!("the period is {span:?}; use 1 ms to a year"));
        }
        if let Algorithm::Gcra { quota, period, .. } = self.algorithm {
            // GCRA's counter on Redis is a time in whole µs: an interval
            // under 1 µs would round away, and the key would never be
            // limited.
            let most = period.as_micros();
            if u128::from(quota) > most {
                return Err(format!(
                    "the quota is {quota} per {period:?}, more than one a microsecond, which \
                     GCRA cannot space (it counts time in whole µs); use at most {most} per \
                     {period:?}, or a sliding or fixed window"
                ));
            }
        }
        if let Some(units) = self.lease {
            // GCRA never grants more than its burst at once.
            let most = match self.algorithm {
                Algorithm::Gcra { burst, .. } => burst,
                _ => count,
            };
            if units == 0 || units > most {
                return Err(format!(
                    "the lease is {units} units; use 1 to {most} (the {}), e.g. a hundredth of it",
                    if matches!(self.algorithm, Algorithm::Gcra { .. }) {
                        "burst"
                    } else {
                        "limit"
                    }
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields written when a policy is made stay true whatever is set
    /// on it afterwards: no builder method changes its name, quota or
    /// window.
    #[test]
    fn the_written_fields_hold_after_every_builder_method() {
        let minute = Duration::from_secs(60);
        let policies = [
            Policy::gcra("g", 10, minute).burst(3),
            Policy::fixed_window("f", 7, Duration::from_millis(1500))
                .key(Key::header("x-user"))
                .path("/api/*")
                .methods([Method::POST]),
            Policy::sliding_window("s", 5, minute).lease(2),
        ];
        for policy in &policies {
            let algorithm = policy.algorithm();
            let item = format!(
                "\"{}\";q={};w={}",
                policy.name(),
                algorithm.quota(),
                crate::headers::ceil_secs(algorithm.window())
            );
            assert_eq!(&*policy.described.item, item);
            assert_eq!(
                policy.described.value.as_ref().map(HeaderValue::as_bytes),
                Some(item.as_bytes())
            );
            assert_eq!(
                &*policy.described.limit_prefix,
                format!("\"{}\";r=", policy.name())
            );
            assert_eq!(format!("{:?}", policy.described), item);
        }
    }

    #[test]
    fn prefix_and_exact_patterns() {
        let api = Policy::gcra("a", 1, Duration::from_secs(1)).path("/api/*");
        assert!(api.applies_to(&Method::GET, "/api/items"));
        assert!(!api.applies_to(&Method::GET, "/apix"));
        let login = Policy::gcra("b", 1, Duration::from_secs(1))
            .path("/login")
            .methods([Method::POST]);
        assert!(login.applies_to(&Method::POST, "/login"));
        assert!(!login.applies_to(&Method::GET, "/login"));
        assert!(!login.applies_to(&Method::POST, "/login/x"));
    }

    #[test]
    fn zero_quota_and_bad_names_are_rejected() {
        assert!(
            Policy::gcra("x", 0, Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            Policy::gcra("x", 1, Duration::from_secs(1))
                .burst(0)
                .validate()
                .is_err()
        );
        assert!(
            Policy::gcra("with space", 1, Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            Policy::gcra("quote\"", 1, Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            Policy::fixed_window("ok", 1, Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            Policy::sliding_window("per-ip", 10, Duration::from_secs(1))
                .validate()
                .is_ok()
        );
    }

    /// GCRA's counter is a time in whole µs: a quota spaced under 1 µs
    /// apart would round its interval away and never limit the key.
    #[test]
    fn a_gcra_quota_above_one_a_microsecond_is_refused() {
        let second = Duration::from_secs(1);
        let fast = Policy::gcra("g", 1_000_001, second).validate().unwrap_err();
        assert!(
            fast.contains("more than one a microsecond")
                && fast.contains("use at most 1000000 per 1s"),
            "{fast}"
        );
        let ms = Duration::from_millis(1);
        assert!(Policy::gcra("g", 1_001, ms).validate().is_err());
        assert!(Policy::gcra("g", 1_000, ms).validate().is_ok());
        assert!(Policy::gcra("g", 1_000_000, second).validate().is_ok());
        // A window counts requests, not time: any quota.
        assert!(
            Policy::sliding_window("w", u32::MAX, second)
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn a_lease_must_fit_the_quota() {
        let window = Policy::fixed_window("g", 100, Duration::from_secs(1));
        assert!(window.clone().lease(100).validate().is_ok());
        let too_big = window.clone().lease(101).validate().unwrap_err();
        assert!(too_big.contains("use 1 to 100 (the limit)"), "{too_big}");
        assert!(window.lease(0).validate().is_err());
        let gcra = Policy::gcra("g", 100, Duration::from_secs(1)).burst(10);
        let over_burst = gcra.clone().lease(11).validate().unwrap_err();
        assert!(over_burst.contains("(the burst)"), "{over_burst}");
        assert!(gcra.lease(10).validate().is_ok());
    }
}
