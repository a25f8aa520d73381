//! Exact distributed rate limits for tower, axum and tonic: every policy
//! that applies to a request is decided together in **one Redis round
//! trip** (one Lua script, all or nothing), with time taken from Redis, and
//! an in-process limiter keeps limiting while Redis is down.
//!
//! ```
//! use std::net::SocketAddr;
//! use std::time::Duration;
//! use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_redis_ratelimit::{Key, Policy, RateLimitLayer, RedisManager};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In an app: RedisManager::connect(RedisConfig::from_env()?).await?
//! // Here, no Redis: every decision is made in process (and says `local`).
//! let redis = RedisManager::disabled();
//! let limits = RateLimitLayer::builder(redis)
//!     // 2 requests per minute per client IP, on every route.
//!     .policy(Policy::gcra("per-ip", 2, Duration::from_secs(60)))
//!     // 100 per minute per API key under /api.
//!     .policy(Policy::gcra("per-key", 100, Duration::from_secs(60)).key(Key::header("x-api-key")).path("/api/*"))
//!     .build()?;
//! let app = Router::new().route("/", get(|| async { "home" })).layer(limits);
//!
//! // Client IPs come from the connection: serve with
//! // `axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())`,
//! // which puts this extension into every request. Without it a per-IP
//! // policy cannot count anyone: it is skipped, and a warning is logged once.
//! let request = || {
//!     let mut request = Request::get("/").body(Body::empty()).unwrap();
//!     request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([203, 0, 113, 7], 40000))));
//!     request
//! };
//!
//! let first = app.clone().oneshot(request()).await?;
//! assert_eq!(first.status(), StatusCode::OK);
//! assert_eq!(first.headers()["ratelimit-policy"], "\"per-ip\";q=2;w=60");
//! // One left; full again in 30 s; decided in process (`local`).
//! assert_eq!(first.headers()["ratelimit"], "\"per-ip\";r=1;t=30;local");
//! app.clone().oneshot(request()).await?;
//!
//! let third = app.oneshot(request()).await?;
//! assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
//! let field = third.headers()["ratelimit"].to_str()?;
//! assert!(field.starts_with("\"per-ip\";r=0;t=") && field.ends_with(";local"), "{field}");
//! let retry_after: u64 = third.headers()["retry-after"].to_str()?.parse()?;
//! assert!((29..=30).contains(&retry_after)); // the next request is allowed 30 s after the first
//! assert_eq!(third.headers()["content-type"], "application/problem+json");
//! let problem: serde_json::Value = serde_json::from_slice(&third.into_body().collect().await?.to_bytes())?;
//! assert_eq!(problem["violated-policies"], serde_json::json!(["per-ip"]));
//! # Ok(()) }
//! ```
//!
//! Serving it:
//!
//! ```no_run
//! # use axum::{Router, routing::get};
//! # async fn serve(app: Router) -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! # What clients see
//!
//! Allowed and denied responses carry the IETF fields
//! (draft-ietf-httpapi-ratelimit-headers):
//!
//! ```text
//! RateLimit-Policy: "per-ip";q=50;w=30, "per-key";q=100;w=60
//! RateLimit: "per-ip";r=12;t=18, "per-key";r=97;t=2
//! ```
//!
//! A denied request gets `429 Too Many Requests` with `Retry-After` (seconds)
//! and an `application/problem+json` body of type `quota-exceeded` listing
//! the violated policies ([`RateLimitLayerBuilder::on_denied`] replaces it).
//! A gRPC request (`content-type: application/grpc…`) gets a trailers-only
//! answer with `grpc-status: 8` (RESOURCE_EXHAUSTED) instead.
//!
//! # Algorithms
//!
//! - [`Policy::gcra`] (the default choice): exact; `burst` requests at once,
//!   then one every `period / quota`.
//! - [`Policy::fixed_window`]: exact per aligned window; up to twice the
//!   limit across a window edge.
//! - [`Policy::sliding_window`]: the current window's count plus the
//!   previous window's weighted by overlap. It assumes the previous window's
//!   requests were spread evenly, so it can admit more or fewer than an exact
//!   sliding log would; the difference is at most the previous window's
//!   count times the fraction of it that overlaps.
//!
//! # Redis
//!
//! At most one EVALSHA per decision, whatever the number of policies
//! (a leased policy: one per lease, see below).
//! A request that finds no other decision of its layer waiting for Redis
//! sends its own call at once (no yield, no batch). Decisions that arrive
//! while one is waiting share a call: a request that finds no batch
//! forming starts one, yields once to the scheduler so that the requests
//! ready to run beside it can join, and sends them all in one script call,
//! which decides them one after another exactly as separate calls would
//! (and reads and writes a hot key once per call). Under load a call
//! answers many requests (at concurrency 64 in the benchmark, about 10 to
//! 20). The script is written for the server's time per call: its numbers
//! arrive packed as binary doubles and its answer is packed the same way,
//! so that no decimal number is parsed or printed on the hot path. A
//! batch's answer carries no number per request: only the server's time,
//! each counter as it stood before the batch, and how many requests of
//! each run of identical ones were allowed; the layer works out each
//! request's numbers with the same arithmetic, which costs the server a
//! fraction of what it did per request. Keys are
//! `prefix:{rl}:rl:<policy>:k:<key>` for GCRA and
//! `prefix:{rl}:rl:<policy>:fw2:k:<key>` / `…:sw2:k:<key>` for fixed and
//! sliding windows, so layers that give one policy name to different
//! algorithms never read each other's counters. Every counter is one
//! string: a GCRA counter its theoretical arrival time, a window counter
//! its window and counts packed (the `2`: versions before it kept window
//! counters as hashes under `fw`/`sw`, so during a rolling upgrade old and
//! new instances count a window policy in separate keys, each up to the
//! limit, until every instance runs the new version). One `MGET` reads
//! every counter of a call and one command writes each (`SET`, or
//! `SETRANGE` for a window's counts within its window, which keeps its
//! TTL), so a request with three stacked policies costs the script five
//! Redis commands. A key value longer than
//! 256 bytes is counted under its SHA-256 (`…:h:<hex>`), never skipped.
//! Every key of one layer shares a hash
//! tag, so the all-or-nothing script is legal on Redis Cluster (the price:
//! a layer's counters live on one shard). Every key has a TTL of at most
//! the policy's period (twice the window for windows), so idle clients cost
//! nothing. A key Redis has denied is remembered in process until its
//! `Retry-After`, and such requests are answered with no Redis call.
//!
//! # Leased quotas for hot keys
//!
//! One global or per-tenant counter hit at a very high rate makes one key
//! on one Redis shard the bottleneck. [`Policy::lease`] lets each instance
//! take up to `n` units of such a counter in one script call and spend them
//! in process, with no Redis call per request (about `1 / n` to `4 / (3n)` calls per
//! request while the key is hot). Window policies stay exact (units are
//! counted when leased and end with their window); a leased GCRA policy
//! admits at most `instances × n` over its bound in any interval. Units an
//! instance leased but does not use are not available to the others until
//! they go back: after 1 s without use, when the lease ends or is evicted,
//! when the layer is dropped, and on [`RateLimitLayer::return_leases`].
//! While Redis is down, leased units are spent, then the [`Fallback`]
//! decides as without a lease. See [`Policy::lease`] for the details.
//!
//! # When Redis is down
//!
//! Decisions go through [`tower_redis_core::RedisManager::failover`]. With
//! [`Fallback::Local`] (the default, share 1.0) each instance limits alone
//! with `share × quota`; the `RateLimit` field then carries a `local`
//! parameter. Overshoot bound: during an outage, N instances admit at most
//! `N × share × quota` per period per client (plus one burst each), on top
//! of what Redis had already admitted in the current period; with
//! `share = 1 / N` and balanced traffic that is about one extra quota. The
//! bound holds for every client the local limiter keeps in memory; a client
//! evicted at the memory bound (see below) gets a fresh local quota.
//! [`Fallback::Allow`] and [`Fallback::Deny`] fail open or closed. When Redis
//! answers again, the shared counters apply; the local counts are kept until
//! their windows pass, so outages that follow each other within a period
//! (a flapping Redis) share one local quota instead of a fresh one each.
//!
//! # Memory
//!
//! The in-process state a client can grow (the local limiter's counters
//! and the blocked keys) is bounded by bytes
//! ([`RateLimitLayerBuilder::memory_capacity_bytes`], 64 MiB by default),
//! and every decision is O(1) whatever the number of clients. At the bound
//! the least recently used entry is evicted: a client rotating through
//! addresses (IPv6 /64s) or header keys during an outage cannot exhaust
//! memory, every client still held keeps being limited, and an evicted one
//! starts over with a fresh local quota when it comes back.
//!
//! # Features
//!
//! - `axum` (default): reads the client's address from axum's
//!   `ConnectInfo<SocketAddr>` (without it, from a `SocketAddr` or
//!   `IpAddr` request extension).
//! - `metrics`: counts decisions with the `metrics` facade
//!   (`tower_redis_ratelimit_decisions_total{outcome, source, shadow}`),
//!   plus the connection manager's breaker and fallback metrics.
//!
//! Everything a layer needs is re-exported here ([`RedisManager`],
//! [`RedisConfig`], [`Error`], [`Forwarding`]), so that this crate is the
//! only dependency to add.
//!
//! # Client addresses
//!
//! [`Key::client_ip`] needs the peer address in the request extensions:
//! serve axum apps with
//! `into_make_service_with_connect_info::<SocketAddr>()`, and with plain
//! hyper, tower or tonic insert the connection's `SocketAddr`. A per-IP
//! policy that meets a request without one cannot count it
//! ([`MissingKey`] says what happens then); the layer logs a warning the
//! first time, naming the call to add.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod algorithm;
mod body;
mod client_ip;
mod headers;
mod key;
mod layer;
mod limiter;
mod policy;
#[cfg(test)]
mod proptests;
mod response;
mod service;

pub use algorithm::Algorithm;
pub use body::ResponseBody;
pub use client_ip::{ClientIp, InvalidProxy, TrustedProxies};
pub use key::{Key, KeyFuture, MissingKey};
pub use layer::{ConfigError, DEFAULT_MEMORY_BYTES, RateLimitLayer, RateLimitLayerBuilder};
pub use limiter::{DecisionSource, Fallback};
pub use policy::Policy;
pub use response::{Denied, DeniedResponse, QUOTA_EXCEEDED_TYPE};
pub use service::{RateLimit, ResponseFuture};
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
