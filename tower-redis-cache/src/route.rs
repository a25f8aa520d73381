//! Per-route policy: which paths are cached, how long, and what goes into
//! the cache key besides the URL.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http::request::Parts;
use tower_redis_core::http::PathPattern;

type KeyFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
type TagsFn = Arc<dyn Fn(&Parts, &http::response::Parts) -> Vec<String> + Send + Sync>;

/// The cache rules for the paths that match a pattern. The first matching
/// route applies; paths no route matches use the layer's default route.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::Route;
///
/// let products = Route::new("/products/*")
///     .default_ttl(Duration::from_secs(60))
///     .max_ttl(Duration::from_secs(300))
///     .ignore_query_params(["utm_*", "fbclid"])
///     .key_header("accept-language");
/// let account = Route::new("/account/*").bypass();
/// # let _ = (products, account);
/// ```
#[derive(Clone)]
pub struct Route {
    pub(crate) pattern: PathPattern,
    pub(crate) enabled: bool,
    pub(crate) default_ttl: Option<Duration>,
    pub(crate) min_ttl: Option<Duration>,
    pub(crate) max_ttl: Option<Duration>,
    pub(crate) override_origin: bool,
    pub(crate) sort_query: bool,
    pub(crate) ignored_params: Vec<String>,
    pub(crate) key_headers: Vec<HeaderName>,
    pub(crate) key_cookies: Vec<String>,
    pub(crate) key_fn: Option<KeyFn>,
    pub(crate) stale_while_revalidate: Option<Duration>,
    pub(crate) stale_if_error: Option<Duration>,
    pub(crate) tags: Vec<String>,
    pub(crate) tags_fn: Option<TagsFn>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("pattern", &self.pattern)
            .field("enabled", &self.enabled)
            .field("default_ttl", &self.default_ttl)
            .field("override_origin", &self.override_origin)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// Rules for an exact path (`/about`) or a prefix ending in `*`
    /// (`/products/*`); `*` alone matches everything.
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: PathPattern::new(pattern),
            enabled: true,
            default_ttl: None,
            min_ttl: None,
            max_ttl: None,
            override_origin: false,
            sort_query: true,
            ignored_params: Vec::new(),
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            key_fn: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            tags: Vec::new(),
            tags_fn: None,
        }
    }

    /// Never cache these paths (they still invalidate on unsafe requests).
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
    ///     .route(Route::new("/cart").bypass())
    ///     .build()?;
    /// let origin = || async { ([("cache-control", "public, max-age=60")], "your cart") };
    /// let app = Router::new().route("/cart", get(origin)).layer(cache);
    ///
    /// for _ in 0..2 {
    ///     // Whatever the origin says, never stored and never served from the cache.
    ///     let cart = send(&app, req("http://shop.example/cart")).await;
    ///     assert!(!status(&cart).contains("stored") && !status(&cart).contains("hit"));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn bypass(mut self) -> Self {
        self.enabled = false;
        self
    }

    /// Freshness for responses that state none (no `max-age`, `s-maxage`,
    /// `Expires`). Without it such responses are only stored when heuristic
    /// freshness is enabled on the layer.
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
    /// // The origin says nothing about freshness.
    /// let app = |route| {
    ///     let cache = CacheLayer::builder(RedisManager::disabled()).route(route).build().unwrap();
    ///     Router::new().route("/news", get(|| async { "news" })).layer(cache)
    /// };
    ///
    /// let without = app(Route::new("/news"));
    /// assert!(!status(&send(&without, req("http://shop.example/news")).await).contains("stored"));
    /// let with = app(Route::new("/news").default_ttl(Duration::from_secs(60)));
    /// assert!(status(&send(&with, req("http://shop.example/news")).await).contains("stored"));
    /// # Ok(()) }
    /// ```
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// Raises shorter freshness lifetimes to this.
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
    /// let origin = || async { ([("cache-control", "max-age=5")], "prices") };
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .route(Route::new("/prices").min_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let app = Router::new().route("/prices", get(origin)).layer(cache);
    ///
    /// send(&app, req("http://shop.example/prices")).await;
    /// let hit = send(&app, req("http://shop.example/prices")).await;
    /// assert!(ttl(&hit) > 50, "raised from 5 s to 60 s");
    /// # Ok(()) }
    /// ```
    pub fn min_ttl(mut self, ttl: Duration) -> Self {
        self.min_ttl = Some(ttl);
        self
    }

    /// Caps longer freshness lifetimes to this.
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
    /// let origin = || async { ([("cache-control", "max-age=86400")], "prices") };
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .route(Route::new("/prices").max_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let app = Router::new().route("/prices", get(origin)).layer(cache);
    ///
    /// send(&app, req("http://shop.example/prices")).await;
    /// let hit = send(&app, req("http://shop.example/prices")).await;
    /// assert!(ttl(&hit) <= 60, "capped from a day to 60 s");
    /// # Ok(()) }
    /// ```
    pub fn max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = Some(ttl);
        self
    }

    /// Uses [`default_ttl`](Self::default_ttl) whatever freshness the origin
    /// states. `no-store`, `private` and `Set-Cookie` are still respected.
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
    /// let origin = || async { ([("cache-control", "max-age=1")], "prices") };
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .route(Route::new("/prices").default_ttl(Duration::from_secs(300)).override_origin())
    ///     .build()?;
    /// let app = Router::new().route("/prices", get(origin)).layer(cache);
    ///
    /// send(&app, req("http://shop.example/prices")).await;
    /// let hit = send(&app, req("http://shop.example/prices")).await;
    /// assert!(ttl(&hit) > 290, "the route's 300 s, not the origin's 1 s");
    /// # Ok(()) }
    /// ```
    pub fn override_origin(mut self) -> Self {
        self.override_origin = true;
        self
    }

    /// Keeps the query's parameter order as sent (by default parameters are
    /// sorted by name, so `?a=1&b=2` and `?b=2&a=1` share an entry; the
    /// values of a repeated name keep their order, as the app reads them:
    /// `?tag=a&tag=b` and `?tag=b&tag=a` are two entries).
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
    /// let app = |route: Route| {
    ///     let route = route.default_ttl(Duration::from_secs(60));
    ///     let cache = CacheLayer::builder(RedisManager::disabled()).route(route).build().unwrap();
    ///     Router::new().route("/search", get(|| async { "results" })).layer(cache)
    /// };
    ///
    /// let sorted = app(Route::new("/search"));
    /// send(&sorted, req("http://shop.example/search?a=1&b=2")).await;
    /// let swapped = send(&sorted, req("http://shop.example/search?b=2&a=1")).await;
    /// assert!(status(&swapped).starts_with("tower-redis; hit"));
    ///
    /// let as_sent = app(Route::new("/search").keep_query_order());
    /// send(&as_sent, req("http://shop.example/search?a=1&b=2")).await;
    /// let swapped = send(&as_sent, req("http://shop.example/search?b=2&a=1")).await;
    /// assert!(status(&swapped).contains("miss"));
    /// # Ok(()) }
    /// ```
    pub fn keep_query_order(mut self) -> Self {
        self.sort_query = false;
        self
    }

    /// Query parameters left out of the key (a trailing `*` matches a prefix).
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
    /// let route = Route::new("/products/*")
    ///     .default_ttl(Duration::from_secs(60))
    ///     .ignore_query_params(["utm_*", "fbclid"]);
    /// let cache = CacheLayer::builder(RedisManager::disabled()).route(route).build()?;
    /// let app = Router::new().route("/products/{id}", get(|| async { "a product" })).layer(cache);
    ///
    /// send(&app, req("http://shop.example/products/1?utm_source=mail")).await;
    /// // Another campaign, same entry.
    /// let hit = send(&app, req("http://shop.example/products/1?utm_source=ad&fbclid=x")).await;
    /// assert!(status(&hit).starts_with("tower-redis; hit"));
    /// # Ok(()) }
    /// ```
    pub fn ignore_query_params<I, S>(mut self, params: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.ignored_params
            .extend(params.into_iter().map(Into::into));
        self
    }

    /// Adds a request header's value to the key (like a `Vary` the origin
    /// did not send). A request without the header and one with an empty
    /// value are different variants; a request with the header on several
    /// lines, or with a value that is not text, bypasses the cache (apps
    /// read those differently).
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name.
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
    /// let route = Route::new("*").default_ttl(Duration::from_secs(60)).key_header("accept-language");
    /// let cache = CacheLayer::builder(RedisManager::disabled()).route(route).build()?;
    /// let app = Router::new().route("/", get(|| async { "home" })).layer(cache);
    /// let in_language = |lang: &str| {
    ///     Request::get("http://shop.example/").header("accept-language", lang).body(Body::empty()).unwrap()
    /// };
    ///
    /// send(&app, in_language("en")).await;
    /// assert!(status(&send(&app, in_language("de")).await).contains("miss"));
    /// assert!(status(&send(&app, in_language("en")).await).starts_with("tower-redis; hit"));
    /// # Ok(()) }
    /// ```
    pub fn key_header(mut self, name: &str) -> Self {
        match HeaderName::try_from(name) {
            Ok(name) => self.key_headers.push(name),
            Err(_) => panic!("Route::key_header: {name:?} is not a valid header name"),
        }
        self
    }

    /// Adds a cookie's value to the key. A request without the cookie and
    /// one with an empty value are different variants.
    ///
    /// Apps read cookies with parsers that differ on a few forms: a name
    /// sent twice (`currency=USD; currency=EUR`: the `cookie` crate,
    /// tower-cookies and axum-extra's `CookieJar` keep the last, others the
    /// first), a name with whitespace or percent-escapes (`currency =EUR`,
    /// `%63urrency=EUR`), in another case, with `.`, a space or `[` where
    /// the name has `_` (PHP reads those as `_`), without `=`, or in a
    /// field that is not text. A request that names the cookie in any such form is
    /// neither answered from the cache nor stored, so it cannot fill the
    /// variant of requests the app reads otherwise.
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
    /// let route = Route::new("*").default_ttl(Duration::from_secs(60)).key_cookie("currency");
    /// let cache = CacheLayer::builder(RedisManager::disabled()).route(route).build()?;
    /// let app = Router::new().route("/prices", get(|| async { "prices" })).layer(cache);
    /// let with_cookie = |cookie: &str| {
    ///     Request::get("http://shop.example/prices").header("cookie", cookie).body(Body::empty()).unwrap()
    /// };
    ///
    /// send(&app, with_cookie("currency=EUR; session=a")).await;
    /// // Other cookies do not matter; the currency does.
    /// assert!(status(&send(&app, with_cookie("currency=EUR; session=b")).await).starts_with("tower-redis; hit"));
    /// assert!(status(&send(&app, with_cookie("currency=USD")).await).contains("miss"));
    /// # Ok(()) }
    /// ```
    pub fn key_cookie(mut self, name: &str) -> Self {
        self.key_cookies.push(name.to_owned());
        self
    }

    /// Adds a computed value to the key; `None` adds nothing.
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
    /// // One entry per tenant, named by the first label of the host.
    /// let route = Route::new("*").default_ttl(Duration::from_secs(60)).key_fn(|request| {
    ///     let host = request.uri.host()?;
    ///     host.split('.').next().map(str::to_owned)
    /// });
    /// let cache = CacheLayer::builder(RedisManager::disabled()).route(route).build()?;
    /// let app = Router::new().route("/", get(|| async { "home" })).layer(cache);
    ///
    /// send(&app, req("http://acme.shop.example/")).await;
    /// assert!(status(&send(&app, req("http://acme.shop.example/")).await).starts_with("tower-redis; hit"));
    /// assert!(status(&send(&app, req("http://globex.shop.example/")).await).contains("miss"));
    /// # Ok(()) }
    /// ```
    pub fn key_fn<F>(mut self, key: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.key_fn = Some(Arc::new(key));
        self
    }

    /// Serves a stale entry at once for this long past its freshness while
    /// one background request refreshes it (RFC 5861), when the response
    /// does not say `stale-while-revalidate` itself. Never for responses
    /// with `must-revalidate`, `proxy-revalidate`, `no-cache` or `s-maxage`
    /// (which implies `proxy-revalidate`, RFC 9111 §5.2.2.10).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = Some(window);
        self
    }

    /// Serves a stale entry for this long past its freshness when the
    /// origin fails (an error, a 500, 502, 503 or 504, or no answer within
    /// the layer's origin timeout), when the response does not say
    /// `stale-if-error` itself. Never for responses with `must-revalidate`,
    /// `proxy-revalidate`, `no-cache` or `s-maxage`.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = Some(window);
        self
    }

    /// Tags every response stored under this route with `tag`, for
    /// [`CacheHandle::purge_tag`](crate::CacheHandle::purge_tag).
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
    ///     .route(Route::new("/products/*").default_ttl(Duration::from_secs(60)).tag("catalogue"))
    ///     .build()?;
    /// let handle = cache.handle();
    /// let app = Router::new().route("/products/{id}", get(|| async { "a product" })).layer(cache);
    ///
    /// send(&app, req("http://shop.example/products/1")).await;
    /// send(&app, req("http://shop.example/products/2")).await;
    /// handle.purge_tag("catalogue").await; // both go
    /// assert!(status(&send(&app, req("http://shop.example/products/1")).await).contains("miss"));
    /// assert!(status(&send(&app, req("http://shop.example/products/2")).await).contains("miss"));
    /// # Ok(()) }
    /// ```
    pub fn tag(mut self, tag: &str) -> Self {
        self.tags.push(tag.to_owned());
        self
    }

    /// Computes tags for a response from the request and the response head
    /// (added to those from the response's tag headers and [`tag`](Self::tag)).
    ///
    /// ```
    /// use tower_redis_cache::Route;
    ///
    /// let route = Route::new("/products/*").tags_fn(|request, _response| {
    ///     let id = request.uri.path().trim_start_matches("/products/");
    ///     vec![format!("product:{id}")]
    /// });
    /// # let _ = route;
    /// ```
    pub fn tags_fn<F>(mut self, tags: F) -> Self
    where
        F: Fn(&Parts, &http::response::Parts) -> Vec<String> + Send + Sync + 'static,
    {
        self.tags_fn = Some(Arc::new(tags));
        self
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        self.pattern.matches(path)
    }

    /// Clamps a freshness lifetime (seconds) to the route's bounds.
    pub(crate) fn clamp(&self, lifetime: u64) -> u64 {
        let mut lifetime = lifetime;
        if let Some(min) = self.min_ttl {
            lifetime = lifetime.max(min.as_secs());
        }
        if let Some(max) = self.max_ttl {
            lifetime = lifetime.min(max.as_secs());
        }
        lifetime
    }

    pub(crate) fn ignores_param(&self, name: &str) -> bool {
        self.ignored_params
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_applies_min_then_max() {
        let route = Route::new("*")
            .min_ttl(Duration::from_secs(10))
            .max_ttl(Duration::from_secs(60));
        assert_eq!(route.clamp(1), 10);
        assert_eq!(route.clamp(30), 30);
        assert_eq!(route.clamp(600), 60);
    }

    #[test]
    fn ignored_params_support_prefixes() {
        let route = Route::new("*").ignore_query_params(["utm_*", "fbclid"]);
        assert!(route.ignores_param("utm_source"));
        assert!(route.ignores_param("fbclid"));
        assert!(!route.ignores_param("page"));
    }

    #[test]
    fn patterns() {
        assert!(Route::new("*").matches("/anything"));
        assert!(Route::new("/p/*").matches("/p/1"));
        assert!(!Route::new("/p/*").matches("/q"));
        assert!(Route::new("/about").matches("/about"));
        assert!(!Route::new("/about").matches("/about/x"));
    }
}
