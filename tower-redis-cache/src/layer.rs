//! [`CacheLayer`] and its builder.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;
use tower_redis_core::RedisManager;

use crate::freshness::Rules;
use crate::handle::CacheHandle;
use crate::route::Route;
use crate::service::Cache;
use crate::service::RequestCacheControl;
use crate::store::{CacheStore, StoreOptions};
use tower_redis_core::forwarding::Forwarding;

/// A problem with the cache configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A targeted cache-control field name is not a valid header name.
    #[error("targeted field {0:?} is not a valid header name; use e.g. \"Acme-Cache-Control\"")]
    TargetedField(String),
    /// An unkeyed header name is not a valid header name.
    #[error("{0:?} is not a valid header name")]
    HeaderName(String),
    /// The body limit is zero.
    #[error("max_body_bytes is 0; use a positive size such as 1 MiB")]
    ZeroBodyLimit,
    /// A duration that must be positive is zero.
    #[error("{0} is 0; use a positive duration")]
    ZeroDuration(&'static str),
}

/// An RFC 9111 shared cache in front of the wrapped service.
///
/// Cheap to clone; clones share the store and configuration.
#[derive(Clone, Debug)]
pub struct CacheLayer {
    pub(crate) config: Arc<Config>,
}

/// How long a URL that answered uncacheable skips coalescing.
const UNCACHEABLE_FOR: Duration = Duration::from_secs(10);
/// URLs remembered as uncacheable at once.
const UNCACHEABLE_CAPACITY: u64 = 10_000;
/// Default [`CacheLayerBuilder::heuristic_freshness_cap`]: a day.
const DEFAULT_HEURISTIC_CAP: Duration = Duration::from_secs(86_400);
/// Default [`CacheLayerBuilder::outage_queue_bytes`]: 4 MiB.
const DEFAULT_OUTAGE_QUEUE_BYTES: usize = 4 << 20;

#[derive(Debug)]
pub(crate) struct Config {
    /// This layer's name in each thread's memo of keyed URLs
    /// (`key/memo.rs`): never reused.
    pub(crate) id: u64,
    pub(crate) store: Arc<CacheStore>,
    pub(crate) routes: Vec<Route>,
    pub(crate) default_route: Route,
    pub(crate) rules: Rules,
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) max_body_bytes: usize,
    pub(crate) keep_stale_for: Duration,
    pub(crate) generate_etags: bool,
    /// Store a `POST` response whose `Content-Location` is its own URL and
    /// whose freshness is explicit, for later `GET`s.
    pub(crate) store_post: bool,
    /// Forward a single byte range of a miss to the origin (and store a
    /// `206` answer as a partial entry) instead of asking for the whole
    /// response.
    pub(crate) forward_ranges: bool,
    pub(crate) unkeyed_headers: Vec<HeaderName>,
    /// The trusted proxies and the header they write.
    pub(crate) forwarding: Forwarding,
    pub(crate) tag_headers: Vec<HeaderName>,
    pub(crate) strip_tag_headers: bool,
    pub(crate) coalesce: Option<Duration>,
    pub(crate) origin_timeout: Option<Duration>,
    pub(crate) request_cache_control: RequestCacheControl,
    /// Flight keys whose last coalesced fill answered something the cache
    /// may not store (`private`, `no-store`, too large…): misses on them go
    /// straight to the origin for a while instead of queueing behind each
    /// other's fill lock for an entry that never comes. Only refusals that
    /// come from the response count: one request's own headers never turn
    /// coalescing off for the others.
    pub(crate) uncacheable: moka::sync::Cache<String, ()>,
}

impl Config {
    /// The first route matching `path`, else the default.
    pub(crate) fn route_for(&self, path: &str) -> &Route {
        self.routes
            .iter()
            .find(|r| r.matches(path))
            .unwrap_or(&self.default_route)
    }
}

impl CacheLayer {
    /// Starts a builder on the shared connection manager.
    pub fn builder(manager: RedisManager) -> CacheLayerBuilder {
        CacheLayerBuilder {
            manager,
            routes: Vec::new(),
            default_route: Route::new("*"),
            targeted_fields: Vec::new(),
            heuristic: false,
            heuristic_cap: DEFAULT_HEURISTIC_CAP,
            store_set_cookie: false,
            store_post: false,
            forward_ranges: false,
            allowed_hosts: Vec::new(),
            max_body_bytes: 1 << 20,
            keep_stale_for: Duration::from_secs(60),
            generate_etags: false,
            memory_bytes: 64 << 20,
            outage_queue_bytes: DEFAULT_OUTAGE_QUEUE_BYTES,
            unkeyed_headers: DEFAULT_UNKEYED_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            tag_headers: vec!["surrogate-key".to_owned(), "cache-tag".to_owned()],
            strip_tag_headers: true,
            coalesce: Some(Duration::from_secs(5)),
            lock_ttl: Duration::from_secs(5),
            origin_timeout: None,
            request_cache_control: RequestCacheControl::Honor,
            forwarding: Forwarding::none(),
            near_cache: None,
            index_depth: 4,
            read_from_replicas: false,
        }
    }
}

impl CacheLayer {
    /// Waits until the responses already answered have been stored (or
    /// their storing given up). A store waits for the origin to send the
    /// whole body, never for the client to read it; call this before
    /// shutting down so that none is lost.
    pub async fn flush(&self) {
        self.config.store.flushed().await;
    }

    /// The admin side of this cache: purges, warming, inspection, stats.
    pub fn handle(&self) -> CacheHandle {
        CacheHandle::new(Arc::clone(&self.config))
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache::new(inner, Arc::clone(&self.config))
    }
}

/// Configures a [`CacheLayer`].
#[derive(Debug)]
pub struct CacheLayerBuilder {
    manager: RedisManager,
    routes: Vec<Route>,
    default_route: Route,
    targeted_fields: Vec<String>,
    heuristic: bool,
    heuristic_cap: Duration,
    store_set_cookie: bool,
    store_post: bool,
    forward_ranges: bool,
    allowed_hosts: Vec<String>,
    max_body_bytes: usize,
    keep_stale_for: Duration,
    generate_etags: bool,
    memory_bytes: u64,
    outage_queue_bytes: usize,
    unkeyed_headers: Vec<String>,
    tag_headers: Vec<String>,
    strip_tag_headers: bool,
    coalesce: Option<Duration>,
    lock_ttl: Duration,
    origin_timeout: Option<Duration>,
    request_cache_control: RequestCacheControl,
    near_cache: Option<(u64, Duration)>,
    index_depth: usize,
    forwarding: Forwarding,
    read_from_replicas: bool,
}

/// Request headers that can change what an origin answers without being
/// part of the cache key; a response to a request carrying one is not
/// stored (it is still answered from the cache when an entry exists).
///
/// The forwarding headers among them (`Forwarded`, `X-Forwarded-Host`,
/// `-Proto`, `-Port`) are read instead when the request comes from a proxy
/// trusted by [`CacheLayerBuilder::forwarding`] and they are the family
/// those proxies write: the host, scheme and port they name become part of
/// the key.
pub const DEFAULT_UNKEYED_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-scheme",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-host",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

impl CacheLayerBuilder {
    /// Replaces [`DEFAULT_UNKEYED_HEADERS`]: the request headers whose
    /// presence stops a response from being stored, because an origin that
    /// reflects them would poison the entry for everyone.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .unkeyed_headers(["x-forwarded-host", "x-tenant"])
    ///     .route(Route::new("*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let app = Router::new().route("/", get(|| async { "home" })).layer(cache);
    ///
    /// // Answered, but not stored: the origin might have reflected `X-Tenant`.
    /// let tenant = Request::get("http://shop.example/").header("x-tenant", "a").body(Body::empty())?;
    /// assert!(!status(&send(&app, tenant).await).contains("stored"));
    /// // Without it, stored.
    /// assert!(status(&send(&app, req("http://shop.example/")).await).contains("stored"));
    /// # Ok(()) }
    /// ```
    pub fn unkeyed_headers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.unkeyed_headers = names.into_iter().map(Into::into).collect();
        self
    }

    /// The shared forwarding model: which proxies are trusted and which one
    /// header they write. Give the same value to the rate-limit layer.
    ///
    /// From a trusted proxy, the host, scheme and port the proxy reports
    /// (`X-Forwarded-Host` / `-Proto` / `-Port`, or `host=` / `proto=` of
    /// `Forwarded`) key the entry, so a response to `http` is never served
    /// for `https` and a proxied app keeps caching. From any other peer
    /// those headers keep the response out of the cache (see
    /// [`DEFAULT_UNKEYED_HEADERS`]), and a trusted proxy that sends a value
    /// that cannot be read makes the request bypass the cache. Without
    /// this, no proxy is trusted.
    ///
    /// ```
    /// use tower_redis_cache::CacheLayer;
    /// use tower_redis_core::forwarding::{Forwarding, ForwardingHeader, TrustedProxies};
    ///
    /// let forwarding = Forwarding::new(
    ///     TrustedProxies::parse(["10.0.0.0/8"])?,
    ///     ForwardingHeader::XForwardedFor,
    /// );
    /// let layer = CacheLayer::builder(tower_redis_core::RedisManager::disabled())
    ///     .forwarding(forwarding)
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forwarding(mut self, forwarding: Forwarding) -> Self {
        self.forwarding = forwarding;
        self
    }

    /// Adds route rules; the first route whose pattern matches applies.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .route(Route::new("/products/drafts/*").bypass())
    ///     .route(Route::new("/products/*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let app = Router::new()
    ///     .route("/products/{id}", get(|| async { "a product" }))
    ///     .route("/products/drafts/{id}", get(|| async { "a draft" }))
    ///     .layer(cache);
    ///
    /// assert!(status(&send(&app, req("http://shop.example/products/1")).await).contains("stored"));
    /// // Both routes match a draft; the first one added wins.
    /// let draft = send(&app, req("http://shop.example/products/drafts/1")).await;
    /// assert!(!status(&draft).contains("stored"));
    /// # Ok(()) }
    /// ```
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// The rules for paths no route matches (default: origin headers only).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Paths under /api are never cached; every other path is, for 30 s.
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .route(Route::new("/api/*").bypass())
    ///     .default_route(Route::new("*").default_ttl(Duration::from_secs(30)))
    ///     .build()?;
    /// let app = Router::new().route("/about", get(|| async { "about us" })).layer(cache);
    ///
    /// send(&app, req("http://shop.example/about")).await;
    /// let hit = send(&app, req("http://shop.example/about")).await;
    /// assert!(status(&hit).starts_with("tower-redis; hit"));
    /// assert!((29..=30).contains(&ttl(&hit)));
    /// # Ok(()) }
    /// ```
    pub fn default_route(mut self, route: Route) -> Self {
        self.default_route = route;
        self
    }

    /// A targeted cache-control field (RFC 9213) this cache obeys before
    /// `Cache-Control`, after `CDN-Cache-Control`. Lets an app say "cache
    /// here, not in browsers".
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Browsers are told not to cache; this cache is told to, for a minute.
    /// let origin = || async {
    ///     ([("cache-control", "no-cache"), ("shop-cache-control", "max-age=60")], "prices")
    /// };
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .targeted_field("shop-cache-control")
    ///     .build()?;
    /// let app = Router::new().route("/prices", get(origin)).layer(cache);
    ///
    /// let first = send(&app, req("http://shop.example/prices")).await;
    /// assert!(status(&first).contains("stored"));
    /// assert_eq!(first.headers()["cache-control"], "no-cache"); // what the browser sees
    /// let second = send(&app, req("http://shop.example/prices")).await;
    /// assert!(status(&second).starts_with("tower-redis; hit"));
    /// # Ok(()) }
    /// ```
    pub fn targeted_field(mut self, name: &str) -> Self {
        self.targeted_fields.push(name.to_owned());
        self
    }

    /// Heuristic freshness (RFC 9111 §4.2.2; default off): a response with
    /// `Last-Modified` and no explicit freshness (no `max-age`, `s-maxage`,
    /// `Expires`, and no route [`default_ttl`](Route::default_ttl)) whose
    /// status is heuristically cacheable (200, 203, 204, 300, 301, 308,
    /// 404, 405, 410, 414, 501, or any with `public`) is fresh for 10% of
    /// the time since it was last modified, at most
    /// [`heuristic_freshness_cap`](Self::heuristic_freshness_cap). Off, such
    /// responses are not stored: an app route that forgot `Cache-Control`
    /// is not cached by surprise. A proxy in front of static files wants it
    /// on.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // No `Cache-Control`, no `Expires`: only a `Last-Modified` years ago.
    /// let origin = || async { ([("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")], "an old page") };
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .heuristic_freshness(true)
    ///     .build()?;
    /// let app = Router::new().route("/old", get(origin)).layer(cache);
    ///
    /// assert!(status(&send(&app, req("http://shop.example/old")).await).contains("stored"));
    /// let hit = send(&app, req("http://shop.example/old")).await;
    /// // Fresh for 10% of its age, at most a day.
    /// assert!(ttl(&hit) > 86_000 && ttl(&hit) <= 86_400);
    /// # Ok(()) }
    /// ```
    pub fn heuristic_freshness(mut self, enabled: bool) -> Self {
        self.heuristic = enabled;
        self
    }

    /// Range requests on a miss (RFC 9111 §3.3, §3.4; default off): off,
    /// a `GET` with one byte range that finds nothing stored asks the
    /// origin for the whole response, stores it and cuts the range from
    /// it: the next requests, ranged or not, are hits. On, the range (and
    /// its `If-Range`) is forwarded as the client sent it, and a `206`
    /// with one `Content-Range: bytes a-b/N` (a strong `ETag` or none) is
    /// stored as a *partial* entry: later ranges inside `a-b` are served
    /// from it, and a range that reaches past it is completed with a
    /// range request for the missing bytes (combined only when the
    /// origin's answer has the same strong `ETag`; once the bytes `0..N`
    /// are all there the entry is a complete `200`). A request without
    /// `Range` is never served from a partial entry. Turn it on in front
    /// of large files (media, downloads) that clients read by ranges.
    ///
    /// Whatever this says, a request that finds a partial entry it cannot
    /// use is forwarded with its range.
    pub fn forward_ranges(mut self, enabled: bool) -> Self {
        self.forward_ranges = enabled;
        self
    }

    /// The longest heuristic freshness lifetime (default a day).
    pub fn heuristic_freshness_cap(mut self, cap: Duration) -> Self {
        self.heuristic_cap = cap;
        self
    }

    /// Stores responses that carry `Set-Cookie` (default off: on app routes
    /// they are usually personal). RFC 9111 lets a shared cache store them;
    /// turn this on for a proxy in front of an origin that marks such
    /// responses cacheable on purpose. The stored copy then keeps
    /// `Set-Cookie`, and every hit sends it, except when the response says
    /// `private="Set-Cookie"` or `no-cache="Set-Cookie"`: then the copy is
    /// stored and used without that one field (§5.2.2.7, §5.2.2.4).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let origin = || async {
    ///     ([("cache-control", "public, max-age=60"), ("set-cookie", "theme=dark")], "home")
    /// };
    /// let app = |cache| Router::new().route("/", get(origin)).layer(cache);
    ///
    /// // By default a response that sets a cookie is not stored.
    /// let default = app(CacheLayer::builder(RedisManager::disabled()).build()?);
    /// assert!(!status(&send(&default, req("http://shop.example/")).await).contains("stored"));
    /// // Allowed, it is (with its `Set-Cookie`, for everyone).
    /// let allowed = app(CacheLayer::builder(RedisManager::disabled()).store_set_cookie(true).build()?);
    /// assert!(status(&send(&allowed, req("http://shop.example/")).await).contains("stored"));
    /// # Ok(()) }
    /// ```
    pub fn store_set_cookie(mut self, enabled: bool) -> Self {
        self.store_set_cookie = enabled;
        self
    }

    /// Stores the answer to a `POST` for later `GET`s of the same URL when
    /// the origin says it is that URL's representation: a `200` or `203`
    /// whose `Content-Location` is the request's URL (behind a trusted proxy,
    /// on the host it reports), with explicit freshness (`max-age`,
    /// `s-maxage` or `Expires`; RFC 9110 §9.3.3, RFC 9111 §4.4). Never an
    /// answer that sets a cookie (whatever
    /// [`store_set_cookie`](Self::store_set_cookie) says) or whose `Vary`
    /// names a body field such as `Content-Type`. The other storage rules
    /// apply as to a `GET` (`private`, `no-store`, `Authorization`, the
    /// variant the request's headers select…). The `POST` still invalidates
    /// the URL first. Off by default: on an app route, a `POST` answer is
    /// usually about the one client that sent it, so turn it on only where
    /// the origin marks such answers fresh for everyone on purpose.
    ///
    /// ```
    /// # use axum::{Router, body::Body, routing::post};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let vote = || async {
    ///     let fields = [
    ///         ("content-location", "http://poll.example/results"),
    ///         ("cache-control", "public, max-age=30"),
    ///     ];
    ///     (fields, "yes: 12, no: 7")
    /// };
    /// let cache = CacheLayer::builder(RedisManager::disabled()).store_post(true).build()?;
    /// let app = Router::new()
    ///     .route("/results", post(vote).get(|| async { "from the origin" }))
    ///     .layer(cache.clone());
    /// let post = Request::post("http://poll.example/results").body(Body::from("yes"))?;
    /// assert!(status(&send(&app, post).await).contains("stored"));
    /// cache.flush().await;
    /// let get = send(&app, Request::get("http://poll.example/results").body(Body::empty())?).await;
    /// assert!(status(&get).contains("hit"));
    /// assert_eq!(get.body(), "yes: 12, no: 7");
    /// # Ok(()) }
    /// ```
    pub fn store_post(mut self, enabled: bool) -> Self {
        self.store_post = enabled;
        self
    }

    /// Only these hosts (the request's `Host` / authority) are cached; other
    /// requests pass through. Empty (the default) caches every host.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .allowed_hosts(["shop.example"])
    ///     .route(Route::new("*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let app = Router::new().route("/", get(|| async { "home" })).layer(cache);
    ///
    /// assert!(status(&send(&app, req("http://shop.example/")).await).contains("stored"));
    /// // Another `Host` passes through the cache untouched.
    /// let other = send(&app, req("http://attacker.example/")).await;
    /// assert_eq!(status(&other), "");
    /// assert_eq!(other.body(), "home");
    /// # Ok(()) }
    /// ```
    pub fn allowed_hosts<I, S>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_hosts.extend(hosts.into_iter().map(Into::into));
        self
    }

    /// Larger bodies are streamed to the client but not stored (default 1 MiB).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .max_body_bytes(8)
    ///     .route(Route::new("*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let app = Router::new()
    ///     .route("/small", get(|| async { "tiny" }))
    ///     .route("/large", get(|| async { "more than eight bytes" }))
    ///     .layer(cache);
    ///
    /// assert!(status(&send(&app, req("http://shop.example/small")).await).contains("stored"));
    /// // The client gets the whole body; the cache keeps nothing.
    /// let large = send(&app, req("http://shop.example/large")).await;
    /// assert_eq!(large.body(), "more than eight bytes");
    /// assert!(!status(&large).contains("stored"));
    /// # Ok(()) }
    /// ```
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// How long entries are kept past their freshness, for revalidation
    /// with their validators and for `max-stale` requests (default 60 s).
    pub fn keep_stale_for(mut self, duration: Duration) -> Self {
        self.keep_stale_for = duration;
        self
    }

    /// Adds a strong `ETag` (a hash of the body) to stored responses that
    /// have none, so later hits answer `If-None-Match` (default off).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .generate_etags(true)
    ///     .route(Route::new("*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let app = Router::new().route("/", get(|| async { "home" })).layer(cache);
    ///
    /// send(&app, req("http://shop.example/")).await;
    /// let hit = send(&app, req("http://shop.example/")).await;
    /// let etag = hit.headers()["etag"].clone();
    /// // A client that has the body already gets a 304 from the cache.
    /// let revalidate = Request::get("http://shop.example/").header("if-none-match", etag).body(Body::empty())?;
    /// assert_eq!(send(&app, revalidate).await.status(), 304);
    /// # Ok(()) }
    /// ```
    pub fn generate_etags(mut self, enabled: bool) -> Self {
        self.generate_etags = enabled;
        self
    }

    /// The in-process store's size while Redis is unavailable (default 64
    /// MiB). A 64th of it (at least 16 KiB) also bounds the `Vary` names
    /// remembered per URL, which make a lookup one plain `HMGET`.
    pub fn memory_capacity_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    /// The bound, in bytes, of the invalidations and purges queued while
    /// Redis is unavailable, written to it when it answers again (default
    /// 4 MiB, some 25,000 invalidations). They are never dropped: past the
    /// bound, the queue instead gets one soft purge of everything this
    /// layer stored, so that after the outage every entry from before it
    /// is stale (revalidated before it is served fresh) rather than some
    /// invalidation lost; invalidations and soft purges that follow are
    /// then covered by it and not queued. Hard purges are always queued.
    pub fn outage_queue_bytes(mut self, bytes: usize) -> Self {
        self.outage_queue_bytes = bytes;
        self
    }

    /// The response headers that carry tags: `Surrogate-Key`
    /// (space-separated) and `Cache-Tag` (comma-separated) by default. Any
    /// other name is read as a comma- or space-separated list.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let origin = || async { ([("cache-control", "max-age=60"), ("x-tags", "sale, shoes")], "red shoes") };
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .tag_headers(["x-tags"])
    ///     .build()?;
    /// let handle = cache.handle();
    /// let app = Router::new().route("/shoes/red", get(origin)).layer(cache);
    ///
    /// let first = send(&app, req("http://shop.example/shoes/red")).await;
    /// assert!(first.headers().get("x-tags").is_none()); // removed before the client
    /// handle.purge_tag("sale").await;
    /// let after = send(&app, req("http://shop.example/shoes/red")).await;
    /// assert!(status(&after).contains("miss"), "purged: {}", status(&after));
    /// # Ok(()) }
    /// ```
    pub fn tag_headers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tag_headers = names.into_iter().map(Into::into).collect();
        self
    }

    /// Whether tag headers are removed from responses before they reach the
    /// client (and from stored entries). Default: removed.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let origin = || async { ([("cache-control", "max-age=60"), ("surrogate-key", "home")], "home") };
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .strip_tag_headers(false) // e.g. a CDN in front purges by the same tags
    ///     .build()?;
    /// let app = Router::new().route("/", get(origin)).layer(cache);
    ///
    /// send(&app, req("http://shop.example/")).await;
    /// let hit = send(&app, req("http://shop.example/")).await;
    /// assert_eq!(hit.headers()["surrogate-key"], "home");
    /// # Ok(()) }
    /// ```
    pub fn strip_tag_headers(mut self, strip: bool) -> Self {
        self.strip_tag_headers = strip;
        self
    }

    /// Request coalescing: concurrent misses for one URL make one origin
    /// call — in process, and across instances through a Redis lock — and
    /// the others wait for its entry up to `max_wait`, then go to the
    /// origin themselves. On by default with a 5 s wait; `None` turns it
    /// off (a miss then costs one round trip less).
    pub fn coalesce(mut self, max_wait: Option<Duration>) -> Self {
        self.coalesce = max_wait;
        self
    }

    /// How long a fill lock lives if its holder never releases it (the
    /// holder crashed): others wait at most this long before one of them
    /// fills instead (default 5 s). Also bounds background refreshes, and
    /// sets how long a purge's tombstone lives: twelve times this, at
    /// least 2 s (60 s by default). A fill that does not hold its lock (it
    /// lost it, or never took one) and asked the origin longer ago than a
    /// tombstone lives (from the question to the end of the body, plus a
    /// second's margin for its write's way to Redis) is not stored, since
    /// a purge made early in its question may have left a tombstone that
    /// is gone by then: an answer slower than that is served but never
    /// cached (counted in `tower_redis_cache_fills_dropped_total` with
    /// `reason="too_slow"`, and a warning at most once a minute), so
    /// raise this for a slow origin. So is a fill that outlived its lock,
    /// which another fill then took, where the URL holds an older purge or
    /// soft-purge mark (`reason="lock_lost"`). Give every instance and data cache that shares
    /// the key prefix the same value: a fill is checked against tombstones
    /// as long as its own instance says they live.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    /// With a stale entry that may be served `stale-if-error`, an origin
    /// that has not answered within this time counts as failed and the
    /// stale entry is served (default: no timeout).
    pub fn origin_timeout(mut self, timeout: Duration) -> Self {
        self.origin_timeout = Some(timeout);
        self
    }

    /// Whether requests' `Cache-Control` and `Pragma: no-cache` are obeyed
    /// ([`RequestCacheControl::Honor`], the default) or ignored
    /// ([`RequestCacheControl::Ignore`]). Obeyed, any client can make the
    /// cache revalidate with the origin (`no-cache`, `max-age=0`) or keep
    /// an answer out of the cache (`no-store`); ignore them when the
    /// clients are not yours, as a CDN edge does.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_cache::RequestCacheControl;
    ///
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .request_cache_control(RequestCacheControl::Ignore)
    ///     .route(Route::new("*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let app = Router::new().route("/", get(|| async { "home" })).layer(cache);
    ///
    /// send(&app, req("http://shop.example/")).await;
    /// // A client's `no-cache` does not reach the origin.
    /// let reload = Request::get("http://shop.example/").header("cache-control", "no-cache").body(Body::empty())?;
    /// assert!(status(&send(&app, reload).await).starts_with("tower-redis; hit"));
    /// # Ok(()) }
    /// ```
    pub fn request_cache_control(mut self, policy: RequestCacheControl) -> Self {
        self.request_cache_control = policy;
        self
    }

    /// Reads cache entries from replicas (off by default): on a Redis
    /// Cluster with replicas, a lookup (a hit, and the look again of a
    /// coalesced miss) goes to a replica of its slot over a `READONLY`
    /// connection, so hits spread over the replicas instead of loading
    /// the primaries. Writes, fill locks, purges and invalidations stay on
    /// the primaries. With a standalone server or Sentinel it changes
    /// nothing (reads stay on the primary).
    ///
    /// **Staleness:** replicas apply the primary's writes asynchronously.
    /// An entry stored, invalidated or purged a moment ago may still be
    /// found as it was on a replica for the replication lag (usually
    /// under a millisecond; while a replica's link to its primary is
    /// down, until the cluster fails it over or it catches up). A
    /// coalesced miss may then see no entry yet and ask the origin once
    /// more. Entries read from a replica are not copied into the
    /// [near cache](Self::near_cache), where a purged entry would outlive
    /// the lag, so the near cache gains little with this on. A replica
    /// that fails or does not answer within half the command timeout
    /// costs that time once: the lookup goes to the primary, and replicas
    /// are skipped for a second.
    pub fn read_from_replicas(mut self, on: bool) -> Self {
        self.read_from_replicas = on;
        self
    }

    /// A near cache: an in-process copy of entries read from Redis, of at
    /// most `max_bytes`, each kept at most `ttl`, answering hits with no
    /// round trip (`Cache-Status: …; detail=near`). Redis client tracking
    /// keeps it coherent: a store, invalidation, purge or expiry by any
    /// instance drops the copies everywhere (on a Redis Cluster, where
    /// tracking is off, the layers' pub/sub announcements do). While that
    /// connection is down or Redis is unavailable it is not used, and it is
    /// emptied when the connection is lost or replaced, so `ttl` bounds how
    /// stale a copy can be even if a message is lost. The crate docs ("Near
    /// cache") state the exact guarantee. A purge made through this
    /// instance's [`CacheHandle`](crate::CacheHandle) has removed its copies
    /// by the time it returns; one by path, prefix or tag empties this
    /// instance's near cache (copies do not record their tags). Off by
    /// default.
    ///
    /// Besides `max_bytes`, each thread that reads the near cache holds its
    /// own copy of the last 8 URLs it read there (URLs whose entries, with
    /// the copy's bookkeeping, are charged under 16 KiB: about 128 KiB a
    /// thread), so that a URL read on every core at once costs each hit no
    /// write to memory the cores share. A thread serves its copy only while
    /// the near cache has not changed since it last found that copy
    /// current: after any store, invalidation or purge there, each thread's
    /// next hit reads the shared copies, and keeps its own only if that URL
    /// did not change.
    ///
    /// The near cache also saves the round trip of a page that is never
    /// stored (a private one): once a lookup on the tracking connection
    /// found such a URL absent from Redis, its lookups answer a miss from
    /// memory (`fwd=uri-miss; detail=near`) until any instance writes it,
    /// the near cache is emptied, or `ttl` has passed. These marks are kept
    /// with the URLs' `Vary` hints, in the share of
    /// [`memory_capacity_bytes`](Self::memory_capacity_bytes) those take.
    /// Not on a Redis Cluster.
    pub fn near_cache(mut self, max_bytes: u64, ttl: Duration) -> Self {
        self.near_cache = Some((max_bytes, ttl));
        self
    }

    /// How many path segments deep URLs are indexed for
    /// [`CacheHandle::purge_prefix`] (default 4: `/a/b/c/d/`). A prefix
    /// purge deeper than this reads the deepest indexed level and filters.
    pub fn prefix_index_depth(mut self, depth: usize) -> Self {
        self.index_depth = depth;
        self
    }

    /// Checks everything and builds the layer.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_cache::ConfigError;
    ///
    /// let error = CacheLayer::builder(RedisManager::disabled())
    ///     .unkeyed_headers(["not a header name"])
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(error, ConfigError::HeaderName(_)));
    /// let error = CacheLayer::builder(RedisManager::disabled()).max_body_bytes(0).build().unwrap_err();
    /// println!("{error}"); // says which setting is wrong
    /// # Ok(()) }
    /// ```
    pub fn build(self) -> Result<CacheLayer, ConfigError> {
        if self.max_body_bytes == 0 {
            return Err(ConfigError::ZeroBodyLimit);
        }
        let unkeyed_headers = self
            .unkeyed_headers
            .iter()
            .map(|name| {
                HeaderName::try_from(name.as_str())
                    .map_err(|_| ConfigError::HeaderName(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tag_headers = self
            .tag_headers
            .iter()
            .map(|name| {
                HeaderName::try_from(name.as_str())
                    .map_err(|_| ConfigError::HeaderName(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.lock_ttl.is_zero() {
            return Err(ConfigError::ZeroDuration("lock_ttl"));
        }
        if self.coalesce.is_some_and(|wait| wait.is_zero()) {
            return Err(ConfigError::ZeroDuration("coalesce wait"));
        }
        if self.origin_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::ZeroDuration("origin_timeout"));
        }
        if self.near_cache.is_some_and(|(_, ttl)| ttl.is_zero()) {
            return Err(ConfigError::ZeroDuration("near cache ttl"));
        }
        let targeted_fields = self
            .targeted_fields
            .iter()
            .map(|name| {
                HeaderName::try_from(name.as_str())
                    .map_err(|_| ConfigError::TargetedField(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rules = Rules {
            targeted_fields,
            heuristic: self.heuristic.then_some(self.heuristic_cap),
            store_set_cookie: self.store_set_cookie,
        };
        Ok(CacheLayer {
            config: Arc::new(Config {
                id: crate::store::front::owner_id(),
                store: Arc::new(
                    CacheStore::new(
                        self.manager,
                        StoreOptions {
                            memory_bytes: self.memory_bytes,
                            near: self.near_cache,
                            index_depth: self.index_depth,
                            lock_ttl: self.lock_ttl,
                            outage_queue_bytes: self.outage_queue_bytes,
                            rules: Some(rules.clone()),
                        },
                    )
                    .with_replica_reads(self.read_from_replicas),
                ),
                routes: self.routes,
                default_route: self.default_route,
                rules,
                allowed_hosts: self.allowed_hosts,
                max_body_bytes: self.max_body_bytes,
                keep_stale_for: self.keep_stale_for,
                generate_etags: self.generate_etags,
                store_post: self.store_post,
                forward_ranges: self.forward_ranges,
                unkeyed_headers,
                forwarding: self.forwarding,
                tag_headers,
                strip_tag_headers: self.strip_tag_headers,
                coalesce: self.coalesce,
                origin_timeout: self.origin_timeout,
                request_cache_control: self.request_cache_control,
                uncacheable: moka::sync::Cache::builder()
                    .max_capacity(UNCACHEABLE_CAPACITY)
                    .time_to_live(UNCACHEABLE_FOR)
                    .build(),
            }),
        })
    }
}
