//! [`RedisManager`]: the one handle every layer shares.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, Script, ScriptInvocation};
use tokio::sync::watch;
use tokio::time::timeout;

use crate::breaker::{Breaker, BreakerState, Failure, Health};
use crate::config::{RedisConfig, RedisUrl, Topology};
use crate::connection::{RedisConnection, StandaloneConnector, TracingErrorSink};
use crate::error::{ConfigError, Error, counts_against_breaker};
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
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    breaker: Breaker,
    keys: Keyspace,
    command_timeout: Duration,
    connect_timeout: Duration,
    probe_min_backoff: Duration,
    probe_max_backoff: Duration,
    probing: AtomicBool,
    description: String,
    /// Where [`RedisManager::pubsub`] connects: the server, or the first
    /// cluster seed (plain `PUBLISH` reaches every node of a cluster).
    pubsub_client: Option<redis::Client>,
}

enum Backend {
    Standalone {
        pool: bb8::Pool<StandaloneConnector>,
        generation: Arc<AtomicU64>,
        pool_size: u32,
    },
    Cluster {
        client: Box<ClusterClient>,
        conn: Mutex<Option<ClusterConnection>>,
    },
    Disabled,
}

/// Where a [`Served`] value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Redis answered.
    Redis,
    /// The fallback answered, for this reason.
    Fallback(FallbackReason),
}

/// Why an operation was served by its fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackReason {
    /// The breaker was open (or the manager has no Redis): nothing was sent.
    BreakerOpen,
    /// Redis did not answer within the command timeout.
    Timeout,
    /// No connection could be made, or it broke during the operation.
    ConnectionFailed,
    /// Redis refused the command (out of memory, wrong type, script error, ...).
    CommandFailed,
}

impl FallbackReason {
    /// The lower-case name used in logs, metrics and response headers.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::BreakerOpen => "breaker_open",
            FallbackReason::Timeout => "timeout",
            FallbackReason::ConnectionFailed => "connection_failed",
            FallbackReason::CommandFailed => "command_failed",
        }
    }

    fn of(error: &Error) -> Self {
        match error {
            Error::BreakerOpen | Error::Config(_) | Error::Required { .. } => {
                FallbackReason::BreakerOpen
            }
            Error::Timeout(_) => FallbackReason::Timeout,
            Error::Connect(_) => FallbackReason::ConnectionFailed,
            Error::Redis(e) if counts_against_breaker(e) => FallbackReason::ConnectionFailed,
            Error::Redis(_) => FallbackReason::CommandFailed,
        }
    }
}

/// A value from [`RedisManager::failover`], with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served<T> {
    /// The value, from Redis or from the fallback.
    pub value: T,
    /// Which of the two produced it.
    pub source: Source,
}

impl<T> Served<T> {
    /// True when the fallback produced the value.
    pub fn is_fallback(&self) -> bool {
        matches!(self.source, Source::Fallback(_))
    }
}

impl RedisManager {
    /// Builds the manager and tries Redis once.
    ///
    /// Redis being down is not an error: the manager starts with its breaker
    /// open, logs one warning, and a background probe closes the breaker once
    /// Redis answers. Only an invalid configuration fails, or an unreachable
    /// Redis when [`require_redis`](crate::RedisConfigBuilder::require_redis) is set.
    pub async fn connect(config: RedisConfig) -> Result<Self, Error> {
        let backend = Backend::new(&config)?;
        let pubsub_client = crate::pubsub::client_for(&config);
        let description = describe(config.topology());
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
                description,
                pubsub_client,
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
                description: "disabled (in-process only)".to_owned(),
                pubsub_client: None,
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

    /// A subscription to breaker transitions, for layers that must react
    /// (drop local entries, reconcile writes) when Redis comes back.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.inner.breaker.subscribe()
    }

    pub(crate) fn pubsub_client(&self) -> Option<&redis::Client> {
        self.inner.pubsub_client.as_ref()
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

    /// Runs one operation against Redis, within the command timeout, and
    /// tells the breaker how it went.
    ///
    /// The operation gets a connection of its own (a cheap clone of a
    /// multiplexed connection). While the breaker is open this returns
    /// [`Error::BreakerOpen`] without calling Redis.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let inner = &self.inner;
        if !inner.breaker.allows_requests() {
            return Err(Error::BreakerOpen);
        }
        // One timer for checkout and command together: a second one per
        // operation showed up in profiles at high concurrency.
        let attempt = async {
            let (conn, broken) = inner.backend.checkout().await.map_err(Attempt::Connect)?;
            op(conn)
                .await
                .map_err(|error| Attempt::Command(error, broken))
        };
        match timeout(inner.command_timeout, attempt).await {
            Ok(Ok(value)) => {
                inner.breaker.on_success();
                Ok(value)
            }
            Ok(Err(Attempt::Connect(error))) => {
                self.record_failure(&error);
                Err(Error::Connect(error))
            }
            Ok(Err(Attempt::Command(error, broken))) => {
                if counts_against_breaker(&error) {
                    if error.is_io_error() || error.is_connection_dropped() {
                        // A multiplexed connection does not recover, and when
                        // one drops the server has usually restarted, so the
                        // others from before are dead too: replace them all.
                        if let Some(broken) = broken {
                            broken.store(true, Ordering::Release);
                        }
                        inner.backend.discard_connections();
                    }
                    self.record_failure(&error);
                } else {
                    inner.breaker.on_success();
                }
                Err(Error::Redis(error))
            }
            Err(_) => Err(self.record_timeout()),
        }
    }

    /// Runs `op` against Redis when the breaker allows it, and `fallback`
    /// otherwise or when Redis fails or times out. Never waits longer than
    /// the command timeout for Redis; never turns a Redis problem into an error.
    pub async fn failover<T, F, Fut, G, GFut>(&self, op: F, fallback: G) -> Served<T>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
        G: FnOnce(FallbackReason) -> GFut,
        GFut: Future<Output = T>,
    {
        match self.run(op).await {
            Ok(value) => Served {
                value,
                source: Source::Redis,
            },
            Err(error) => {
                let reason = FallbackReason::of(&error);
                if reason != FallbackReason::BreakerOpen {
                    tracing::debug!(target: "tower_redis", %error, "Redis operation failed; using the fallback");
                }
                record_fallback(reason);
                Served {
                    value: fallback(reason).await,
                    source: Source::Fallback(reason),
                }
            }
        }
    }

    /// One command, one round trip.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, Error> {
        self.run(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// One pipeline, one round trip.
    pub async fn query_pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, Error> {
        self.run(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// Runs a Lua script by EVALSHA: one round trip, plus a reload when
    /// Redis has lost the script (restart, `SCRIPT FLUSH`).
    pub async fn invoke_script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        self.run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    /// Runs a pipeline that contains script invocations (EVALSHA). When Redis
    /// reports NOSCRIPT, the scripts are loaded and the pipeline is sent
    /// once more, so the other commands in it must be safe to repeat.
    pub async fn query_pipeline_with_scripts<T: FromRedisValue>(
        &self,
        pipe: &Pipeline,
        scripts: &[&Script],
    ) -> Result<T, Error> {
        self.run(|mut conn| async move { pipeline_with_scripts(&mut conn, pipe, scripts).await })
            .await
    }

    fn record_timeout(&self) -> Error {
        let timeout = self.inner.command_timeout;
        let message = format!("no answer within {timeout:?}");
        if self.inner.breaker.on_failure(Failure::Counted, &message) {
            self.on_opened();
        }
        Error::Timeout(timeout)
    }

    fn record_failure(&self, error: &RedisError) {
        let failure = if error.is_connection_refusal() {
            Failure::Refused
        } else {
            Failure::Counted
        };
        if self.inner.breaker.on_failure(failure, &error.to_string()) {
            self.on_opened();
        }
    }

    fn on_opened(&self) {
        self.inner.backend.discard_connections();
        self.start_probe();
    }

    fn start_probe(&self) {
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
    let Some((mut backoff, max)) = inner
        .upgrade()
        .map(|i| (i.probe_min_backoff, i.probe_max_backoff))
    else {
        return;
    };
    loop {
        tokio::time::sleep(jittered(backoff)).await;
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

/// Sends a pipeline that contains script invocations (EVALSHA) on `conn`;
/// when Redis reports NOSCRIPT, loads `scripts` and sends the pipeline once
/// more, so the other commands in it must be safe to repeat. For use inside
/// [`RedisManager::run`] and [`RedisManager::failover`].
pub async fn pipeline_with_scripts<T: FromRedisValue>(
    conn: &mut RedisConnection,
    pipe: &Pipeline,
    scripts: &[&Script],
) -> RedisResult<T> {
    match pipe.query_async(conn).await {
        Err(error) if is_noscript(&error) => {
            for script in scripts {
                script.prepare_invoke().load_async(conn).await?;
            }
            pipe.query_async(conn).await
        }
        other => other,
    }
}

/// Between half and all of `backoff`, so instances do not probe in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let millis = u64::try_from(backoff.as_millis())
        .unwrap_or(u64::MAX)
        .max(2);
    Duration::from_millis(rand::random_range(millis / 2..=millis))
}

fn is_noscript(error: &RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

impl Inner {
    /// One PING on a fresh (or current) connection, within the connect and
    /// command timeouts. Only the probe and startup call it.
    async fn probe(&self) -> Result<(), Error> {
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

type CheckedOut = (RedisConnection, Option<Arc<AtomicBool>>);

/// How an operation failed inside its time budget.
enum Attempt {
    /// No connection could be had.
    Connect(RedisError),
    /// The command failed; the connection's broken flag, if pooled.
    Command(RedisError, Option<Arc<AtomicBool>>),
}

impl Backend {
    fn new(config: &RedisConfig) -> Result<Self, ConfigError> {
        match config.topology() {
            Topology::Standalone(url) => {
                let client = standalone_client(config, url).map_err(|e| {
                    ConfigError::new(
                        "url",
                        format!("`{url}` is rejected by the Redis client ({e})"),
                        "check the URL",
                    )
                })?;
                let connector = StandaloneConnector::new(client, config.connect_timeout());
                let generation = Arc::clone(&connector.generation);
                let pool = bb8::Pool::builder()
                    .max_size(config.pool_size())
                    .test_on_check_out(false)
                    .retry_connection(false)
                    .connection_timeout(config.connect_timeout())
                    .queue_strategy(bb8::QueueStrategy::Fifo)
                    .error_sink(Box::new(TracingErrorSink))
                    .build_unchecked(connector);
                Ok(Backend::Standalone {
                    pool,
                    generation,
                    pool_size: config.pool_size(),
                })
            }
            Topology::Cluster(nodes) => {
                let builder = ClusterClient::builder(nodes.iter().map(|n| n.expose().to_owned()))
                    .connection_timeout(config.connect_timeout())
                    .response_timeout(config.command_timeout())
                    .retries(2);
                let client = with_cluster_roots(builder, config).build().map_err(|e| {
                    ConfigError::new(
                        "cluster_nodes",
                        format!("are rejected by the cluster client ({e})"),
                        "check the node URLs",
                    )
                })?;
                Ok(Backend::Cluster {
                    client: Box::new(client),
                    conn: Mutex::new(None),
                })
            }
        }
    }

    async fn checkout(&self) -> Result<CheckedOut, RedisError> {
        match self {
            Backend::Standalone {
                pool,
                generation,
                pool_size,
            } => {
                // Stale connections (from before an outage, or broken) are
                // dropped by bb8 when their guard goes back; try the next.
                for _ in 0..=*pool_size {
                    if pool.state().connections == 0 {
                        // An empty pool: bb8 would connect in the background
                        // and make `get` wait, hiding the reason a connect
                        // failed until its timeout. Connect here instead, so
                        // a refused connection is known (and opens the
                        // breaker) at once, then give the result to the pool.
                        let fresh = pool.dedicated_connection().await?;
                        let checked_out = (
                            RedisConnection::standalone(fresh.conn.clone()),
                            Some(Arc::clone(&fresh.broken)),
                        );
                        // A full pool refuses it; the clone above still works.
                        let _ = pool.add(fresh);
                        return Ok(checked_out);
                    }
                    let guard = pool.get().await.map_err(pool_error)?;
                    if !guard.broken.load(Ordering::Acquire)
                        && guard.generation() == generation.load(Ordering::Acquire)
                    {
                        return Ok((
                            RedisConnection::standalone(guard.conn.clone()),
                            Some(Arc::clone(&guard.broken)),
                        ));
                    }
                }
                Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "no usable pooled connection",
                    "every pooled connection was stale".to_owned(),
                )))
            }
            Backend::Cluster { client, conn } => {
                if let Some(existing) = lock(conn).clone() {
                    return Ok((RedisConnection::cluster(existing), None));
                }
                let fresh = client.get_async_connection().await?;
                let mut slot = lock(conn);
                let shared = slot.get_or_insert(fresh).clone();
                Ok((RedisConnection::cluster(shared), None))
            }
            Backend::Disabled => Err(RedisError::from((
                redis::ErrorKind::Client,
                "Redis is disabled for this manager",
            ))),
        }
    }

    /// Makes sure no connection from before now is used again.
    fn discard_connections(&self) {
        match self {
            Backend::Standalone { generation, .. } => {
                generation.fetch_add(1, Ordering::AcqRel);
            }
            Backend::Cluster { conn, .. } => {
                lock(conn).take();
            }
            Backend::Disabled => {}
        }
    }
}

/// The client of a standalone server (or of one cluster node, for
/// pub/sub): with the configured root certificates for a `rediss://` URL
/// that has some.
pub(crate) fn standalone_client(
    config: &RedisConfig,
    url: &RedisUrl,
) -> RedisResult<redis::Client> {
    #[cfg(feature = "tls")]
    if url.is_tls() {
        install_crypto_provider();
        if let Some(pem) = config.tls_root_certificates() {
            let certificates = crate::config::tls_certificates(pem).map_err(|problem| {
                RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "invalid TLS root certificates",
                    problem,
                ))
            })?;
            return redis::Client::build_with_tls(url.expose(), certificates);
        }
    }
    #[cfg(not(feature = "tls"))]
    let _ = config;
    redis::Client::open(url.expose())
}

#[cfg(feature = "tls")]
fn with_cluster_roots(
    builder: redis::cluster::ClusterClientBuilder,
    config: &RedisConfig,
) -> redis::cluster::ClusterClientBuilder {
    let Topology::Cluster(nodes) = config.topology() else {
        return builder;
    };
    if !nodes.iter().any(RedisUrl::is_tls) {
        return builder;
    }
    install_crypto_provider();
    // Checked by `RedisConfigBuilder::build`; a failure here leaves the
    // built-in roots, and the connections then say why they fail.
    match config
        .tls_root_certificates()
        .map(crate::config::tls_certificates)
    {
        Some(Ok(certificates)) => builder.certs(certificates),
        _ => builder,
    }
}

#[cfg(not(feature = "tls"))]
fn with_cluster_roots(
    builder: redis::cluster::ClusterClientBuilder,
    _config: &RedisConfig,
) -> redis::cluster::ClusterClientBuilder {
    builder
}

/// rustls needs a process-wide crypto provider; redis-rs does not pick one.
/// Installs ring's unless the app installed one already.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn pool_error(error: bb8::RunError<RedisError>) -> RedisError {
    match error {
        bb8::RunError::User(error) => error,
        bb8::RunError::TimedOut => RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out waiting for a pooled Redis connection",
        )),
    }
}

/// `rediss://…#insecure` makes redis-rs accept any certificate: said once
/// per manager, at connect, with the fix.
fn warn_if_certificates_unchecked(topology: &Topology, description: &str) {
    let unchecked = match topology {
        Topology::Standalone(url) => url.skips_certificate_checks(),
        Topology::Cluster(nodes) => nodes.iter().any(RedisUrl::skips_certificate_checks),
    };
    if unchecked {
        tracing::warn!(
            target: "tower_redis",
            redis = %description,
            "`#insecure` turns off TLS certificate checks: anyone who can intercept the connection \
             can pose as Redis and read every password and value sent to it. Remove `#insecure` and, \
             for a private CA, pass its certificate to RedisConfigBuilder::tls_root_certificates \
             (without redis-rs' `tls-rustls-insecure` feature, such a URL cannot connect at all)"
        );
    }
}

fn describe(topology: &Topology) -> String {
    match topology {
        Topology::Standalone(url) => url.to_string(),
        Topology::Cluster(nodes) => {
            let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
            format!("cluster [{}]", nodes.join(", "))
        }
    }
}

#[cfg(feature = "metrics")]
fn record_fallback(reason: FallbackReason) {
    metrics::counter!("tower_redis_fallbacks_total", "reason" => reason.as_str()).increment(1);
}

#[cfg(not(feature = "metrics"))]
fn record_fallback(_reason: FallbackReason) {}
