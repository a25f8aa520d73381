//! The Redis connection manager shared by the tower-redis layers.
//!
//! One [`RedisManager`] per app holds the connections (a pool of
//! multiplexed connections, or the Redis Cluster client), a circuit breaker,
//! and [`failover`](RedisManager::failover): the helper every layer uses to
//! run an operation on Redis when Redis is healthy and on its in-process
//! fallback otherwise. A Redis problem never becomes a panic, an error
//! response or a wait longer than the command timeout.
//!
//! ```
//! use std::time::Duration;
//! use tower_redis_core::{BreakerState, FallbackReason, RedisConfig, RedisManager, Source};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_redis_core::Error> {
//! let config = RedisConfig::builder()
//!     .url("redis://127.0.0.1:6379")
//!     .command_timeout(Duration::from_millis(100))
//!     .key_prefix("myapp")
//!     .build()?;
//! // In an app: `RedisManager::connect(config).await?`, which succeeds even
//! // when Redis is down (the breaker starts open and recovers). Here, no
//! // Redis at all: every operation takes its fallback.
//! # let _ = config;
//! let redis = RedisManager::disabled();
//!
//! let key = redis.keys().key(&["greeting"]);
//! let served = redis
//!     .failover(
//!         |mut conn| async move {
//!             redis::cmd("GET").arg(&key).query_async::<Option<String>>(&mut conn).await
//!         },
//!         |_reason| async { Some("hello from memory".to_owned()) },
//!     )
//!     .await;
//! assert_eq!(served.value.as_deref(), Some("hello from memory"));
//! assert_eq!(served.source, Source::Fallback(FallbackReason::BreakerOpen));
//! assert_eq!(redis.health().state, BreakerState::Disabled);
//! if let Source::Fallback(reason) = served.source {
//!     tracing::info!(reason = reason.as_str(), "served without Redis");
//! }
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `metrics`: counts breaker transitions (`tower_redis_breaker_transitions_total`),
//!   the breaker state (`tower_redis_breaker_state`: 0 closed, 1 open,
//!   2 half-open, 3 disabled) and fallbacks (`tower_redis_fallbacks_total`).
//! - `tls`: `rediss://` URLs (rustls with ring; the webpki roots, or a
//!   private CA given to [`RedisConfigBuilder::tls_root_certificates`]).
//! - `testing`: [`testing::TestRedis`], [`testing::TestCluster`] (with
//!   replicas on demand) and [`testing::TestSentinel`], real Redis servers
//!   for tests that can be killed, paused, restarted and failed over.
//! - `testing-docker`: adds a Docker backend (testcontainers) to `testing`.
//! - `http`: the module `http`, the HTTP plumbing the layers share:
//!   `PathPattern`, `is_grpc`, `Problem` (`application/problem+json`) and
//!   `InnerOrFull`, the body of a response that is the inner service's or
//!   the layer's own.
//! - `forwarding` (implies `http`): the module `forwarding`, the
//!   trusted-proxy view of a request (client address, scheme, host) shared
//!   by every layer.
//! - `axum` (implies `forwarding`): also reads the peer address from axum's
//!   `ConnectInfo`.
//!
//! Always available, without extra dependencies: [`sync::lock`] (a
//! poison-tolerant mutex lock), [`clock`] (epoch milliseconds) and
//! [`record`] (metrics that compile to nothing without `metrics`).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod breaker;
pub mod bytes_cache;
pub mod clock;
mod config;
mod connection;
pub mod degrade;
mod error;
mod failover;
#[cfg(feature = "forwarding")]
#[cfg_attr(docsrs, doc(cfg(feature = "forwarding")))]
pub mod forwarding;
mod future;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
mod keys;
mod manager;
mod pubsub;
pub mod record;
pub mod sync;
mod tls;
pub mod tracking;
mod url;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use backend::{pipeline_with_scripts, query_script, script_cmd};
pub use breaker::{BreakerState, Health};
pub use config::{
    BreakerConfig, RedisConfig, RedisConfigBuilder, RedisUrl, SentinelTopology, Topology,
};
pub use connection::RedisConnection;
pub use degrade::Failover;
pub use error::{ConfigError, Error};
pub use failover::{FallbackReason, Served, Source};
pub use future::{ResponseFuture, in_span};
pub use keys::{Keyspace, escape_key_part};
pub use manager::RedisManager;
pub use pubsub::{ListenOnce, Subscriber, listen};
pub use tracking::{Invalidate, TrackedCache, Tracking, WriteTicket};

/// The redis-rs crate this manager is built on, for writing commands,
/// pipelines and scripts against [`RedisConnection`].
pub use redis;

/// The crate README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
