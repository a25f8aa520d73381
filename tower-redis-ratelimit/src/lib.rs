//! Exact distributed rate limits for tower, axum and tonic: every policy
//! that applies to a request is decided together in **one Redis round
//! trip** (one Lua script, all or nothing), with time taken from Redis, and
//! an in-process limiter keeps limiting while Redis is down.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tower_redis_core::{RedisConfig, RedisManager};
//! use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisManager::connect(RedisConfig::from_env()?).await?;
//! let limits = RateLimitLayer::builder(redis)
//!     // 50 requests per 30 s per client IP, on every route.
//!     .policy(Policy::gcra("per-ip", 50, Duration::from_secs(30)))
//!     // 100 per minute per API key under /api.
//!     .policy(Policy::gcra("per-key", 100, Duration::from_secs(60)).key(Key::header("x-api-key")).path("/api/*"))
//!     .build()?;
//! let app: Router = Router::new().route("/api/items", get(|| async { "items" })).layer(limits);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! // Client IPs come from the socket: serve with connect info.
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
//! At most one EVALSHA per decision, whatever the number of policies.
//! Decisions that arrive at the same moment share one: a request that finds
//! no batch forming starts one, yields once to the scheduler so that the
//! requests ready to run beside it can join, and sends them all in one
//! script call, which decides them one after another exactly as separate
//! calls would (and reads and writes a hot key once per call). Alone, a
//! request pays that one yield; under load a call answers many requests
//! (at concurrency 64 in the benchmark, about 10 to 20). Keys are
//! `prefix:{rl}:rl:<policy>:k:<key>`: every key of one layer shares a hash
//! tag, so the all-or-nothing script is legal on Redis Cluster (the price:
//! a layer's counters live on one shard). Every key has a TTL of at most
//! the policy's period (twice the window for windows), so idle clients cost
//! nothing. A key Redis has denied is remembered in process until its
//! `Retry-After`, and such requests are answered with no Redis call.
//!
//! # When Redis is down
//!
//! Decisions go through [`tower_redis_core::RedisManager::failover`]. With
//! [`Fallback::Local`] (the default, share 1.0) each instance limits alone
//! with `share × quota`; the `RateLimit` field then carries a `local`
//! parameter. Overshoot bound: during an outage, N instances admit at most
//! `N × share × quota` per period per client (plus one burst each), on top
//! of what Redis had already admitted in the current period; with
//! `share = 1 / N` and balanced traffic that is about one extra quota.
//! [`Fallback::Allow`] and [`Fallback::Deny`] fail open or closed. When Redis
//! answers again, the shared counters apply and the local state is dropped.

mod body;
mod client_ip;
mod headers;
mod key;
mod layer;
mod policy;
#[cfg(test)]
mod proptests;
mod response;
mod service;
mod store;

pub use body::ResponseBody;
pub use client_ip::{ClientIp, InvalidProxy, TrustedProxies};
pub use key::{Key, KeyFuture, MissingKey};
pub use layer::{ConfigError, DEFAULT_MEMORY_BYTES, RateLimitLayer, RateLimitLayerBuilder};
pub use policy::{Algorithm, Policy};
pub use response::{Denied, DeniedResponse, QUOTA_EXCEEDED_TYPE};
pub use service::{RateLimit, ResponseFuture};
pub use store::{DecisionSource, Fallback};
