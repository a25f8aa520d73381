//! [`RedisManager`]: the one handle every layer shares, its construction and
//! the background probe that closes the breaker. How it reaches Redis is in
//! [`backend`](crate::backend); how an operation falls back, in
//! [`failover`](crate::failover).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::timeout;

use crate::backend::{Backend, describe_config, warn_if_certificates_unchecked};
use crate::breaker::{Breaker, BreakerState, Health};
use crate::config::RedisConfig;
use crate::error::Error;
use crate::keys::Keyspace;

/// The shared Redis connection manager: a pool (or cluster client), a
/// circuit breaker and the failover helper the layers are built on.
///
/// Cloning is cheap and every clone shares the same connections and breaker,
/// so build one per app and hand clones to each layer.
///
/// Promises:
/// - one network round trip per operation (nothing is checked on checkout);
/// - no request path waits longer than the command timeout;
/// - while the breaker is open, no request path calls Redis at all;
/// - starting with Redis down succeeds (unless `require_redis`), and the
///   manager recovers by itself when Redis comes back.
///
/// ```no_run
/// use tower_redis_core::{RedisConfig, RedisManager};
///
/// # async fn demo() -> Result<(), tower_redis_core::Error> {
/// let redis = RedisManager::connect(RedisConfig::from_env()?).await?;
/// let key = redis.keys().key(&["visits"]);
/// let visits: u64 = redis
///     .failover(
///         |mut conn| async move { redis::cmd("INCR").arg(&key).query_async(&mut conn).await },
///         |_reason| async { 0 },
///     )
///     .await
///     .value;
/// # let _ = visits;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisManager {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) backend: Backend,
    pub(crate) breaker: Breaker,
    keys: Keyspace,
    pub(crate) command_timeout: Duration,
    connect_timeout: Duration,
    probe_min_backoff: Duration,
    probe_max_backoff: Duration,
    probing: AtomicBool,
    /// When the last canary (see `RedisManager::on_abandoned`) was sent.
    pub(crate) canary_sent: std::sync::Mutex<Option<tokio::time::Instant>>,
    description: String,
    /// `server.address` and `server.port` of the operation spans: the
    /// server, or the first cluster seed (a label, not where the
    /// subscriptions go).
    pub(crate) server: (String, Option<u16>),
    /// Where [`RedisManager::pubsub`] connects: the server, or a cluster
    /// seed (plain `PUBLISH` reaches every node of a cluster).
    pubsub_clients: crate::pubsub::PubSubClients,
    /// The tracking connection, made on first use.
    pub(crate) tracking: crate::tracking::TrackingSlot,
}

impl RedisManager {
    /// Whether this manager talks to a Redis Cluster (where one pipeline
    /// cannot span slots).
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.backend, Backend::Cluster { .. })
    }

    /// Builds the manager and tries Redis once.
    ///
    /// Redis being down is not an error: the manager starts with its breaker
    /// open, logs one warning, and a background probe closes the breaker once
    /// Redis answers. Only an invalid configuration fails, or an unreachable
    /// Redis when [`require_redis`](crate::RedisConfigBuilder::require_redis) is set.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_core::BreakerState;
    ///
    /// // Nothing listens on port 1: the manager starts anyway, with the breaker
    /// // open, and a background probe connects when Redis answers.
    /// let config = RedisConfig::builder().url("redis://127.0.0.1:1").build()?;
    /// let manager = RedisManager::connect(config).await?;
    /// let health = manager.health();
    /// assert_ne!(health.state, BreakerState::Closed);
    /// assert!(health.last_error.is_some());
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: RedisConfig) -> Result<Self, Error> {
        let backend = Backend::new(&config)?;
        let pubsub_clients = crate::pubsub::clients_for(&config);
        let description = describe_config(&config);
        crate::record::describe();
        // The span's `server.*` attributes: the server, the first cluster
        // seed, or (Sentinel) the master's name, as the primary moves.
        let server = match config.topology() {
            crate::config::Topology::Standalone(url) => url.server(),
            crate::config::Topology::Cluster(nodes) => nodes
                .first()
                .map_or_else(|| (String::new(), None), crate::url::RedisUrl::server),
            crate::config::Topology::Sentinel(sentinel) => {
                (sentinel.master_name().to_owned(), None)
            }
        };
        warn_if_certificates_unchecked(config.topology(), &description);
        let breaker_config = config.breaker();
        let manager = Self {
            inner: Arc::new(Inner {
                backend,
                breaker: Breaker::new(BreakerState::HalfOpen, breaker_config.failure_threshold),
                keys: Keyspace::new(config.key_prefix()),
                command_timeout: config.command_timeout(),
                connect_timeout: config.connect_timeout(),
                probe_min_backoff: breaker_config.probe_min_backoff,
                probe_max_backoff: breaker_config.probe_max_backoff,
                probing: AtomicBool::new(false),
                canary_sent: std::sync::Mutex::new(None),
                description,
                server,
                pubsub_clients,
                tracking: crate::tracking::TrackingSlot::new(),
            }),
        };
        match manager.inner.probe().await {
            Ok(()) => {
                manager.inner.breaker.transition(BreakerState::Closed, None);
                tracing::info!(target: "tower_redis", redis = %manager.inner.description, "connected to Redis");
            }
            Err(error) if config.require_redis() => {
                return Err(Error::Required {
                    reason: error.to_string(),
                });
            }
            Err(error) => {
                manager
                    .inner
                    .breaker
                    .transition(BreakerState::Open, Some(&error.to_string()));
                tracing::warn!(
                    target: "tower_redis",
                    redis = %manager.inner.description,
                    %error,
                    "Redis is not reachable; serving from in-process fallbacks and retrying in the background \
                     (set REDIS_URL to point at your Redis)"
                );
                manager.start_probe();
            }
        }
        Ok(manager)
    }

    /// A manager without Redis: every operation takes its fallback, for good.
    /// For development and for apps that want the layers' in-process behaviour only.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_core::{BreakerState, FallbackReason, Source};
    ///
    /// let manager = RedisManager::disabled();
    /// assert_eq!(manager.health().state, BreakerState::Disabled);
    /// let served = manager
    ///     .failover(
    ///         |mut conn| async move { redis::cmd("GET").arg("k").query_async::<Option<String>>(&mut conn).await },
    ///         |_reason| async { Some("from memory".to_owned()) },
    ///     )
    ///     .await;
    /// assert_eq!(served.value.as_deref(), Some("from memory"));
    /// assert_eq!(served.source, Source::Fallback(FallbackReason::BreakerOpen));
    /// # Ok(()) }
    /// ```
    pub fn disabled() -> Self {
        Self {
            inner: Arc::new(Inner {
                backend: Backend::Disabled,
                breaker: Breaker::new(BreakerState::Disabled, 1),
                keys: Keyspace::new(RedisConfig::DEFAULT_KEY_PREFIX),
                command_timeout: RedisConfig::DEFAULT_COMMAND_TIMEOUT,
                connect_timeout: RedisConfig::DEFAULT_CONNECT_TIMEOUT,
                probe_min_backoff: Duration::MAX,
                probe_max_backoff: Duration::MAX,
                probing: AtomicBool::new(false),
                canary_sent: std::sync::Mutex::new(None),
                description: "disabled (in-process only)".to_owned(),
                server: (String::new(), None),
                pubsub_clients: crate::pubsub::PubSubClients::default(),
                tracking: crate::tracking::TrackingSlot::new(),
            }),
        }
    }

    /// The breaker's state, failure count and last error.
    pub fn health(&self) -> Health {
        self.inner.breaker.health()
    }

    /// Whether request paths currently use Redis.
    pub fn is_available(&self) -> bool {
        self.inner.breaker.allows_requests()
    }

    /// Whether the last operation to end failed, none having succeeded
    /// since: Redis may hang while the breaker is still closed, and a
    /// request it already failed should not wait for it again.
    pub(crate) fn is_failing(&self) -> bool {
        self.inner.breaker.consecutive_failures() > 0
    }

    /// Whether Redis hangs while the breaker still lets calls through:
    /// the last failure recorded was a timeout (the command timeout, or a
    /// connection's, the pool's or a cluster node's), and no operation has
    /// succeeded since. A layer whose request Redis just failed this way
    /// asks it nothing more for that request: each call would wait another
    /// timeout. An error that came at once (a refusal, a `READONLY` after a
    /// failover) does not count. False while the breaker is open: calls
    /// are answered at once then. With a Redis Cluster the count is the
    /// manager's, not a node's: one node that hangs while the others
    /// answer does not read as hanging.
    ///
    /// ```
    /// # use tower_redis_core::RedisManager;
    /// // Never reached: its breaker lets no call through.
    /// assert!(!RedisManager::disabled().is_hanging());
    /// ```
    pub fn is_hanging(&self) -> bool {
        self.inner.breaker.allows_requests() && self.inner.breaker.hangs()
    }

    /// A subscription to breaker transitions, for layers that must react
    /// (drop local entries, reconcile writes) when Redis comes back.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_core::BreakerState;
    ///
    /// let manager = RedisManager::disabled();
    /// let mut state = manager.subscribe();
    /// assert_eq!(*state.borrow_and_update(), BreakerState::Disabled);
    /// // A layer waits on `state.changed().await` to react when Redis comes back.
    /// # Ok(()) }
    /// ```
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.inner.breaker.subscribe()
    }

    pub(crate) fn pubsub_clients(&self) -> &crate::pubsub::PubSubClients {
        &self.inner.pubsub_clients
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.inner.connect_timeout
    }

    /// Builds the keys of this app (prefix, hash tags, escaping).
    pub fn keys(&self) -> &Keyspace {
        &self.inner.keys
    }

    /// The longest a request path waits for Redis.
    pub fn command_timeout(&self) -> Duration {
        self.inner.command_timeout
    }

    pub(crate) fn start_probe(&self) {
        if self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(probe_until_closed(Arc::downgrade(&self.inner)));
    }
}

impl fmt::Debug for RedisManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisManager")
            .field("redis", &self.inner.description)
            .field("state", &self.inner.breaker.state())
            .field("key_prefix", &self.inner.keys.prefix())
            .finish()
    }
}

/// The background task that closes the breaker once Redis answers again.
async fn probe_until_closed(inner: Weak<Inner>) {
    let Some((min, max, switched)) = inner.upgrade().map(|i| {
        let switched = i.backend.sentinel().map(|d| d.switched());
        (i.probe_min_backoff, i.probe_max_backoff, switched)
    }) else {
        return;
    };
    let mut backoff = min;
    loop {
        // With Sentinel, an announced new primary ends the wait at once.
        match &switched {
            Some(switched) => {
                tokio::select! {
                    () = tokio::time::sleep(jittered(backoff)) => {}
                    () = switched.notified() => backoff = min,
                }
            }
            None => tokio::time::sleep(jittered(backoff)).await,
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.breaker.transition(BreakerState::HalfOpen, None);
        match inner.probe().await {
            Ok(()) => {
                // Cleared before closing, so a failure right after closing
                // starts a new probe instead of finding this one still marked.
                inner.probing.store(false, Ordering::Release);
                inner.breaker.transition(BreakerState::Closed, None);
                return;
            }
            Err(error) => inner
                .breaker
                .transition(BreakerState::Open, Some(&error.to_string())),
        }
        backoff = backoff.saturating_mul(2).min(max);
    }
}

/// Between half and all of `backoff`, so instances do not probe in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let millis = u64::try_from(backoff.as_millis())
        .unwrap_or(u64::MAX)
        .max(2);
    Duration::from_millis(rand::random_range(millis / 2..=millis))
}

impl Inner {
    /// One PING on a fresh (or current) connection, within the connect and
    /// command timeouts. Only the probe and startup call it.
    pub(crate) async fn probe(&self) -> Result<(), Error> {
        let (mut conn, broken) = match timeout(self.connect_timeout, self.backend.checkout()).await
        {
            Ok(Ok(checked_out)) => checked_out,
            Ok(Err(error)) => return Err(Error::Connect(error)),
            Err(_) => return Err(Error::Timeout(self.connect_timeout)),
        };
        let result = match timeout(
            self.command_timeout,
            redis::cmd("PING").query_async::<()>(&mut conn),
        )
        .await
        {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => Err(Error::Redis(error)),
            Err(_) => Err(Error::Timeout(self.command_timeout)),
        };
        if let Some(broken) = broken {
            broken.store(true, Ordering::Release);
        }
        self.backend.discard_connections();
        result
    }
}
