//! Secure sessions for tower and axum, stored in Redis through
//! [`tower_redis_core::RedisManager`], that keep every change of concurrent
//! requests and keep working while Redis is down.
//!
//! ```
//! use axum::{Router, body::Body, routing::{get, post}};
//! use http::{Request, header};
//! use tower::ServiceExt;
//! use tower_redis_session::{RedisManager, Session, SessionLayer};
//!
//! async fn login(session: Session) -> &'static str {
//!     // A privilege change: new id, the old one stops working.
//!     session.cycle_id().await;
//!     session.set_user("user-42").await;
//!     session.insert("cart_items", 3).await.expect("serializable");
//!     "welcome"
//! }
//!
//! async fn me(session: Session) -> String {
//!     session.user().await.unwrap_or_default()
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In an app: RedisManager::connect(RedisConfig::from_env()?).await?
//! // Here, no Redis: sessions live in process.
//! let redis = RedisManager::disabled();
//! let sessions = SessionLayer::builder(redis).build()?;
//! let app = Router::new()
//!     .route("/login", post(login))
//!     .route("/me", get(me))
//!     .layer(sessions);
//!
//! let response = app.clone().oneshot(Request::post("/login").body(Body::empty())?).await?;
//! // A new session: its cookie, with the secure defaults, and no caching.
//! let set_cookie = response.headers()[header::SET_COOKIE].to_str()?;
//! assert!(set_cookie.starts_with("__Host-session="), "{set_cookie}");
//! for attribute in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
//!     assert!(set_cookie.split("; ").any(|a| a == attribute), "{attribute} in {set_cookie}");
//! }
//! assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
//!
//! // The browser sends it back.
//! let cookie = set_cookie.split(';').next().unwrap_or_default();
//! let me = Request::get("/me").header(header::COOKIE, cookie).body(Body::empty())?;
//! let response = app.oneshot(me).await?;
//! assert!(response.headers().get(header::SET_COOKIE).is_none()); // nothing new to say
//! let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
//! assert_eq!(body, "user-42");
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `axum` (default): [`Session`] is an axum extractor (without it, take
//!   the `Session` from the request extensions).
//! - `metrics`: counts degraded operations and the changes written after an
//!   outage with the `metrics` facade, plus the connection manager's
//!   breaker and fallback metrics.
//!
//! Everything a layer needs is re-exported here ([`RedisManager`],
//! [`RedisConfig`], [`Error`], [`SameSite`] for [`CookieConfig`]), so that
//! this crate is the only dependency to add.
//!
//! # Promises
//!
//! - **Lazy.** A request whose handler never touches the session costs no
//!   Redis call. A read is one round trip: one `HGETALL`, pipelined with a
//!   `PEXPIRE` that renews the idle TTL (without rewriting the data) when
//!   this instance has not renewed it for 1/100 of the idle timeout (at most
//!   a minute). A change costs one more (a Lua script). With a tracked
//!   copy of the session here, the change renews the idle TTL only when
//!   the copy knows of no renewal by this instance within that time, so a
//!   session changed on every request is renewed about as often as one read
//!   on every request; without one, every change renews it. A new session is
//!   stored only once it holds something.
//! - **Unchanged sessions are read with no round trip.** With Redis client
//!   tracking (on by default, [`SessionLayerBuilder::tracked_capacity_bytes`];
//!   off on a Redis Cluster) this instance keeps a copy of each session it
//!   read, bounded by bytes, and Redis tells it when any instance changes,
//!   deletes or expires one. A read of a session unchanged since this
//!   instance last read it costs 0 round trips; the idle-timeout renewal
//!   still goes to Redis when due. A change this instance makes to a
//!   session it holds a copy of keeps the copy current (the script runs on
//!   the tracking connection and tells whether anyone else wrote
//!   meanwhile), so a session written on every request is still read with
//!   no round trip; a login, a new session or overlapping changes of one
//!   session on this instance drop the copy instead. Once another instance's change is
//!   acknowledged, this instance serves the old session only until its
//!   tracking connection has read Redis' invalidation (sent before that
//!   acknowledgement); [`SessionStore::sync`] waits for it. A lost tracking
//!   connection, an open breaker, a Sentinel failover or `FLUSHALL` drop
//!   every copy at once.
//!
//!   | operation | round trips |
//!   |---|---|
//!   | handler never touches the session | 0 |
//!   | read | 1 (idle-TTL renewal included); 0 when unchanged since this instance last read it (tracking) |
//!   | change | ≤ 2; 1 when the session's copy here is current (tracking) |
//! - **Concurrent requests keep their changes.** Each entry is written
//!   separately (a Redis hash, one script), so two requests that change
//!   different entries both persist. Two requests that change the *same*
//!   entry: the last write wins, for that entry only. A session destroyed or
//!   cycled by one request is not resurrected by another's save, and that
//!   other request leaves the cookie alone: only the request that destroys
//!   a session tells the browser to drop it, so a concurrent request with
//!   the old cookie never logs out a login that just cycled the id.
//! - **Secure defaults** (OWASP): 256-bit ids from the OS CSPRNG; strict
//!   mode (an id the store does not know is never adopted); Redis keys are
//!   SHA-256 of the id; cookie `__Host-session` with `Secure; HttpOnly;
//!   SameSite=Lax; Path=/`; optional HMAC-signed cookies; `Cache-Control:
//!   no-store` on every response that sets the cookie; a malformed,
//!   oversized or tampered cookie is simply no session.
//! - **Expiry**: idle (rolling) and absolute timeouts together.
//! - **Redis down**: sessions read on this instance before the outage stay
//!   readable from a bounded local copy; new sessions and changes are kept
//!   in process and written to Redis when it is back, entry by entry, never
//!   over newer data. A session ended on any instance (a log out, a
//!   login's `cycle_id`, [`SessionStore::revoke_user`]) is announced once
//!   Redis acknowledges it (`PUBLISH` on `<prefix>:session-ended`; the
//!   Redis user needs that channel, ACL `&<prefix>:session-ended`, or a
//!   warning is logged and the end still holds), and every instance drops
//!   its copy, so no instance serves it in a later outage; after a new
//!   subscription an instance checks its copies against Redis and drops
//!   those whose session is gone.
//!   Limits: an instance only knows the sessions it has
//!   seen, so without sticky routing a user may look logged out on another
//!   instance during the outage; changes queued on two instances for the
//!   same entry are resolved by their times (instance clocks); an instance
//!   cut off from a Redis that still serves the others hears of no end
//!   until it reaches Redis again.
//! - **Bounded memory.** A session holds at most
//!   [`max_session_bytes`](SessionLayerBuilder::max_session_bytes) (64 KiB
//!   by default; an insert over it is a [`SessionError::TooLarge`] the
//!   handler sees). The local copies and the outage queue are bounded by
//!   bytes ([`local_capacity_bytes`](SessionLayerBuilder::local_capacity_bytes),
//!   [`outage_queue_bytes`](SessionLayerBuilder::outage_queue_bytes)); a
//!   full queue refuses new sessions and changes (the visitor gets a fresh
//!   session) but never drops a queued change, and never refuses a log out.
//!   [`SessionStore::local_usage`] reports both.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
#[cfg(feature = "axum")]
mod extract;
mod id;
mod layer;
#[cfg(test)]
mod proptests;
mod service;
mod session;
mod store;

pub use config::{CookieConfig, Durability, Expiry};
pub use cookie::SameSite;
pub use layer::{
    ConfigError, DEFAULT_LOCAL_CAPACITY_BYTES, DEFAULT_MAX_SESSION_BYTES,
    DEFAULT_OUTAGE_QUEUE_BYTES, DEFAULT_TRACKED_CAPACITY_BYTES, SessionLayer, SessionLayerBuilder,
};
pub use service::{ResponseFuture, SessionService};
pub use session::{Session, SessionError};
pub use store::{LocalUsage, SessionStore, StoreError, UserSession};

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
