//! An RFC 9111 shared HTTP cache as a tower `Layer`, stored in Redis through
//! [`tower_redis_core::RedisManager`], and kept alive in process while Redis
//! is down.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tower_redis_cache::{CacheLayer, Route};
//! use tower_redis_core::{RedisConfig, RedisManager};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisManager::connect(RedisConfig::from_env()?).await?;
//! let cache = CacheLayer::builder(redis)
//!     .route(Route::new("/products/*").default_ttl(Duration::from_secs(60)))
//!     .route(Route::new("/account/*").bypass())
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/products/{id}", get(|| async { "a product" }))
//!     .layer(cache);
//! # let _ = app; Ok(()) }
//! ```
//!
//! # What it does
//!
//! - **Shared-cache rules of RFC 9111 by default**: only GET is stored (HEAD
//!   is answered from it); `no-store` and `private` are never stored;
//!   `no-cache` is stored and revalidated on every use; `s-maxage` over
//!   `max-age` over `Expires`; requests with `Authorization` are stored only
//!   with `public`, `s-maxage` or `must-revalidate`; `Set-Cookie` responses
//!   are not stored unless allowed; `Vary` selects among several variants of
//!   a URL, and `Vary: *` is never stored; `Age` is on every response served
//!   from the cache; request `no-cache`, `max-age`, `max-stale`, `min-fresh`
//!   and `only-if-cached` are honoured; heuristic freshness only when
//!   enabled. `CDN-Cache-Control` and a configurable targeted field
//!   (RFC 9213) take precedence over `Cache-Control`.
//! - **Conditional requests**: `If-None-Match` / `If-Modified-Since` get a
//!   304 from the cache; stale entries are revalidated with their
//!   validators, and a 304 from the origin refreshes the stored headers.
//! - **No poisoning through unkeyed headers**: the key's host comes from the
//!   request's authority (optionally checked against an allow list), never
//!   from `X-Forwarded-Host`; and a response to a request that carries such
//!   a header ([`DEFAULT_UNKEYED_HEADERS`]) is not stored.
//! - **Invalidation**: a successful POST, PUT, PATCH or DELETE invalidates
//!   its URL and same-origin `Location` / `Content-Location`.
//! - **Bodies** are streamed to the client while a copy is kept; past
//!   `max_body_bytes`, or if the client goes away, nothing is stored.
//! - **`Cache-Status`** (RFC 9211) on every response it handles:
//!   `tower-redis; hit; ttl=42`, `tower-redis; fwd=uri-miss; stored`,
//!   `tower-redis; fwd=stale; fwd-status=304; stored`, plus
//!   `detail=redis-unavailable` while Redis is down.
//!
//! # Redis
//!
//! One round trip per lookup, `Vary` resolution included: a URL's variants
//! live in one Redis hash. An instance that knows the URL's `Vary` names
//! reads the variant with one `HMGET`; otherwise (first sight, or the `Vary`
//! changed) a script picks the variant from digests of the request's header
//! values. No cookie or credential is sent to Redis as such. Entries use a compact versioned binary format; a value that does
//! not decode is a miss and is deleted. While Redis is unavailable, a
//! bounded in-process store (moka, by bytes) keeps caching; when Redis is
//! back those entries are dropped and invalidations made meanwhile are
//! replayed.

mod body;
mod directives;
mod entry;
mod freshness;
mod key;
mod layer;
mod policy;
#[cfg(test)]
mod proptests;
mod service;
mod store;

pub use body::CacheBody;
pub use layer::{CacheLayer, CacheLayerBuilder, ConfigError, DEFAULT_UNKEYED_HEADERS};
pub use policy::Route;
pub use service::{Cache, ResponseFuture};
