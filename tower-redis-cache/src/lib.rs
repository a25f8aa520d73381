//! An RFC 9111 shared HTTP cache as a tower `Layer`, stored in Redis through
//! [`tower_redis_core::RedisManager`], and kept alive in process while Redis
//! is down.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, header};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_redis_cache::{CacheLayer, RedisManager, Route};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In an app: RedisManager::connect(RedisConfig::from_env()?).await?
//! // Here, no Redis: the cache runs on its in-process store.
//! let redis = RedisManager::disabled();
//! let cache = CacheLayer::builder(redis)
//!     .route(Route::new("/products/*").default_ttl(Duration::from_secs(60)))
//!     .route(Route::new("/account/*").bypass())
//!     .build()?;
//! let app = Router::new()
//!     .route("/products/{id}", get(|| async { "a product" }))
//!     .layer(cache);
//!
//! let get_product = || Request::get("http://shop.example/products/1").body(Body::empty());
//! // First call: a miss, answered by the app and stored.
//! let first = app.clone().oneshot(get_product()?).await?;
//! let status = first.headers()[header::HeaderName::from_static("cache-status")].to_str()?;
//! assert!(status.starts_with("tower-redis; fwd=uri-miss; stored"), "{status}");
//! first.into_body().collect().await?; // the entry is stored once the body is read
//!
//! // Second call: served from the cache, with its `Age`.
//! let second = app.oneshot(get_product()?).await?;
//! let status = second.headers()["cache-status"].to_str()?;
//! assert!(status.starts_with("tower-redis; hit; ttl="), "{status}");
//! assert!(second.headers().contains_key(header::AGE));
//! assert_eq!(second.into_body().collect().await?.to_bytes(), "a product");
//! # Ok(()) }
//! ```
//!
//! (Without Redis every `Cache-Status` also says `detail=redis-unavailable`.)
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
//!   and `only-if-cached` are honoured, or all ignored with
//!   [`RequestCacheControl::Ignore`] for clients you do not trust;
//!   heuristic freshness only when enabled. `CDN-Cache-Control` and a configurable targeted field
//!   (RFC 9213) take precedence over `Cache-Control`.
//! - **Conditional requests**: `If-None-Match` / `If-Modified-Since` get a
//!   304 from the cache; stale entries are revalidated with their
//!   validators, and a 304 from the origin refreshes the stored headers.
//! - **No poisoning through unkeyed headers**: the key's host comes from the
//!   request's authority (optionally checked against an allow list), never
//!   from `X-Forwarded-Host`; and a response to a request that carries such
//!   a header ([`DEFAULT_UNKEYED_HEADERS`]) is not stored. A request whose
//!   target authority (absolute form, HTTP/2 `:authority`) and `Host`
//!   disagree, or with several `Host` fields, is neither answered from the
//!   cache nor stored; nor is a GET or HEAD with a body (`Content-Length`
//!   other than 0, `Transfer-Encoding`, or an HTTP/2 stream that did not
//!   end with its headers), whose key could not include its body.
//! - **Invalidation**: a successful POST, PUT, PATCH or DELETE invalidates
//!   its URL and same-origin `Location` / `Content-Location`.
//! - **Bodies** of responses that may be stored are read from the origin at
//!   its pace, whatever the client's, and streamed to the client as they
//!   come: the entry is stored as soon as the origin has sent it, so a slow
//!   reader never holds back the requests coalesced on it nor
//!   [`CacheLayer::flush`]. Past `max_body_bytes` nothing is stored and the
//!   rest streams with ordinary backpressure; if the client goes away before
//!   the origin has sent the whole body, the origin body is dropped and
//!   nothing is stored.
//! - **`Cache-Status`** (RFC 9211) on every response it handles:
//!   `tower-redis; hit; ttl=42`, `tower-redis; fwd=uri-miss; stored`,
//!   `tower-redis; fwd=stale; fwd-status=304; stored`, plus
//!   `detail=redis-unavailable` while Redis is down.
//! - **Request coalescing** (on by default): concurrent misses for one URL
//!   make one origin call — the first request in a process leads and the
//!   others follow it; across instances the leaders race for a short fill
//!   lock in Redis and the losers wait for the winner's entry (woken by
//!   pub/sub, polling as a fallback) up to [`CacheLayerBuilder::coalesce`]'s
//!   wait, then go to the origin rather than hang. A holder that dies frees
//!   the lock when it expires ([`CacheLayerBuilder::lock_ttl`]). Followers
//!   answer `hit; detail=coalesced`. Revalidations are coalesced the same
//!   way: concurrent requests for a stale entry, or with `no-cache`, make
//!   one conditional origin request; when it fails, the followers that may
//!   serve `stale-if-error` do so without asking the origin again. A URL
//!   whose fill answered something the cache may not store (`private`,
//!   `no-store`, too large) is not coalesced for the next 10 s in that
//!   process: its misses go to the origin at once instead of queueing for
//!   an entry that never comes. A request whose own headers keep its answer
//!   out of the cache (an unkeyed header, `no-store`, `Authorization`)
//!   never causes that, and never leads a coalesced fill.
//! - **Stale serving** (RFC 5861): `stale-while-revalidate` serves a stale
//!   entry at once (`hit; fwd=stale; detail=stale-while-revalidate`) while
//!   exactly one background request — per instance and across instances —
//!   refreshes it; `stale-if-error` serves it when the origin errors,
//!   answers 500/502/503/504 or exceeds [`CacheLayerBuilder::origin_timeout`]
//!   (`detail=stale-if-error; fwd-status=503`). From the response's
//!   `Cache-Control`, else [`Route::stale_while_revalidate`] /
//!   [`Route::stale_if_error`]; never with `must-revalidate`,
//!   `proxy-revalidate` or `no-cache`.
//! - **Tags and purges**: tags from `Surrogate-Key` / `Cache-Tag` response
//!   headers (removed before the client sees them), [`Route::tag`] and
//!   [`Route::tags_fn`]; [`CacheHandle`] purges by tag, URL, path prefix or
//!   everything, hard or soft (soft: marked stale, so stale-while-revalidate
//!   keeps serving while one request refreshes; the mark and the entries'
//!   response times both come from Redis' clock, so instances whose clocks
//!   disagree agree on what it made stale), warms URLs through the
//!   app, looks entries up and reports statistics; [`admin::CacheAdmin`]
//!   (feature `axum`) puts the same behind an authorisation check.
//! - **Near cache** (opt-in, [`CacheLayerBuilder::near_cache`]): hot entries
//!   answered from process memory with no round trip (`detail=near`), kept
//!   coherent by pub/sub invalidations from every instance; not used while
//!   the pub/sub connection or Redis is down, emptied when it reconnects,
//!   and each copy lives at most its TTL.
//!
//! # Features
//!
//! - `metrics`: counts requests by result with the `metrics` facade
//!   (`tower_redis_cache_requests_total{result, stored, degraded}`), plus
//!   the connection manager's breaker and fallback metrics.
//! - `axum`: [`admin::CacheAdmin`], an axum `Router` for purges, entry
//!   lookup, stats and warming behind an authorisation check.
//!
//! Everything a layer needs is re-exported here ([`RedisManager`],
//! [`RedisConfig`], [`Error`], [`Forwarding`]), so that this crate is the
//! only dependency to add.
//!
//! # Redis
//!
//! One round trip per lookup (none from the near cache), `Vary` resolution
//! included: a URL's variants live in one Redis hash. An instance that knows the URL's `Vary` names
//! reads the variant with one `HMGET`; otherwise (first sight, or the `Vary`
//! changed) a script picks the variant from digests of the request's header
//! values. No cookie or credential is sent to Redis as such. Entries use a compact versioned binary format; a value that does
//! not decode is a miss and is deleted. While Redis is unavailable, a
//! bounded in-process store (moka, by bytes) keeps caching; when Redis is
//! back those entries are dropped and invalidations and purges made
//! meanwhile are replayed.
//!
//! | operation | round trips |
//! |---|---|
//! | hit | 1 `HMGET` (0 from the near cache) |
//! | miss, coalescing off | 1 lookup + 1 write batch (entry, indexes, announcement) |
//! | miss, coalescing on | 1 lookup + 1 lock script + 1 write batch (lock released in it) |
//! | purge by tag / prefix | 1 index read + 1 batch per 500 URLs (+ 1 `ZREM` per page) |
//!
//! Tags and path prefixes are **indexes**: one sorted set per tag
//! (`ct:<tag>`) and per directory level of the path (`cx:/`, `cx:/products/`
//! … up to [`CacheLayerBuilder::prefix_index_depth`]), members the URLs,
//! scored by when their entry expires; every write prunes expired members,
//! so an index holds about as many members as there are live entries under
//! it and a purge costs O(entries under the tag or prefix). Every command
//! names a single key, so this works the same on Redis Cluster (where a
//! write batch is sent as concurrent commands to the slots' nodes instead
//! of one pipeline, and the announcements only once every write is
//! acknowledged: one more round trip of time, so that a subscriber never
//! hears of an update before it can read it). A URL that is re-stored
//! without a tag it had stays in that tag's index until its entry expires:
//! a purge of the old tag then removes it too (over-purging is a miss,
//! never a stale hit).
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod admin;
mod body;
mod bus;
mod directives;
mod entry;
mod freshness;
mod handle;
mod key;
mod layer;
#[cfg(test)]
mod proptests;
mod route;
mod service;
mod store;

pub use body::CacheBody;
pub use handle::{CacheHandle, EntryInfo, InvalidUrl, Purged, Stats, Warmed};
pub use layer::{CacheLayer, CacheLayerBuilder, ConfigError, DEFAULT_UNKEYED_HEADERS};
pub use route::Route;
pub use service::RequestCacheControl;
pub use service::{Cache, ResponseFuture};
pub use tower_redis_core::forwarding::{Forwarding, ForwardingHeader};

// One dependency line is enough: what building this layer needs from
// `tower-redis-core`, under the same names.
/// The whole core crate, for what the names above do not cover (its
/// `testing` harness, `degrade`, `keys`, `redis`).
pub use tower_redis_core;
/// The connection manager's invalid-configuration error
/// ([`tower_redis_core::ConfigError`]), returned by [`RedisConfig::from_env`]
/// and [`RedisConfigBuilder::build`].
pub use tower_redis_core::ConfigError as RedisConfigError;
pub use tower_redis_core::{
    BreakerState, Error, Health, RedisConfig, RedisConfigBuilder, RedisManager,
};

/// The crate README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
