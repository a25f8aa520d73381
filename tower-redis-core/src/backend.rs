//! How the manager reaches Redis: the connection pool or cluster client,
//! checkout, TLS wiring, and the query helpers for commands, pipelines and
//! scripts.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, Script, ScriptInvocation};

use crate::config::{RedisConfig, RedisUrl, Topology};
use crate::connection::{
    ConnectTarget, PooledConnection, RedisConnection, SentinelDiscovery, StandaloneConnector,
    SwitchWatchers, TracingErrorSink, watch_switches,
};
use crate::error::{ConfigError, Error};
use crate::manager::RedisManager;
use crate::sync::lock;

pub(crate) enum Backend {
    Standalone {
        pool: bb8::Pool<StandaloneConnector>,
        generation: Arc<AtomicU64>,
        pool_size: u32,
        /// Set when the primary is found through Sentinel (pub/sub asks it too).
        sentinel: Option<Arc<SentinelDiscovery>>,
        /// The Sentinel `+switch-master` listeners, stopped on drop.
        _watchers: Option<SwitchWatchers>,
        /// With a pool of one (the default), the connection in use, so
        /// that a checkout is a clone of it and not a trip through bb8
        /// (its lock, its timer and the pool's metrics cost more than the
        /// command itself at high concurrency). It is used only while it is
        /// unbroken and of the current generation; else the checkout goes
        /// through the pool as before and keeps what that gives; so does the
        /// first checkout after a second (see `Live::until_ms`).
        live: ArcSwapOption<Live>,
    },
    Cluster {
        client: Box<ClusterClient>,
        conn: Arc<Mutex<Option<ClusterConnection>>>,
        /// The replacement connection made after a node's timeout.
        rebuild: Arc<ClusterRebuild>,
        /// The connections that send read-only commands to replicas, for
        /// [`RedisManager::run_read`]; made on first use.
        replicas: Arc<ReplicaReads>,
    },
    Disabled,
}

/// A second cluster client whose read-only commands go to a random
/// replica of the slot (`READONLY` connections), and a pause after a
/// failed replica read, so a dead replica costs one attempt per pause and
/// not one per request.
pub(crate) struct ReplicaReads {
    client: ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
    /// Epoch milliseconds before which replica reads are skipped.
    paused_until: AtomicU64,
    /// A connection is being made in the background.
    connecting: AtomicBool,
    connect_timeout: std::time::Duration,
}

/// What the Cluster backend keeps about its nodes beside the connection: a
/// replacement for the shared connection, made in the background after a
/// node's response timed out (see [`Backend::on_node_timeout`]), and when
/// an operation last succeeded (see [`Backend::answered_within`]).
#[derive(Debug)]
pub(crate) struct ClusterRebuild {
    /// One is being made.
    running: AtomicBool,
    /// How many times the connections were discarded (an outage began):
    /// a replacement made across one is not kept.
    discards: AtomicU64,
    /// The origin of `next_ms` and `answered_ms` (a monotonic clock).
    epoch: std::time::Instant,
    /// When an operation last succeeded: milliseconds since `epoch`, plus
    /// one (0: none yet). Written at most once a millisecond.
    answered_ms: AtomicU64,
    /// Milliseconds since `epoch` before which no other is started.
    next_ms: AtomicU64,
    /// How long making one may take (its check then takes at most two
    /// `check_within` more).
    limit: std::time::Duration,
    /// How long each of the replacement's checks may take (the command
    /// timeout): see [`reaches_every_primary`].
    check_within: std::time::Duration,
    /// Replacements not kept in a row, because one did not reach every
    /// primary: after the third, each doubles the wait before the next
    /// (from [`REBUILD_EVERY`] to [`REBUILD_EVERY_AT_MOST`]), so a node
    /// that hangs for minutes is not connected to anew every second.
    rejected: AtomicU32,
}

impl ClusterRebuild {
    /// Milliseconds since `epoch`.
    fn now_ms(&self) -> u64 {
        crate::clock::duration_ms(self.epoch.elapsed())
    }
}

/// Clears [`ClusterRebuild::running`] when the making ends, however it
/// ends (its task dropped with its runtime included).
struct Running(Arc<ClusterRebuild>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// At most one replacement cluster connection a second.
const REBUILD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest wait between replacements while they are not kept.
const REBUILD_EVERY_AT_MOST: std::time::Duration = std::time::Duration::from_secs(4);
/// Making a cluster connection connects to every node it is given and
/// reads the slot map; one node that hangs costs its connection timeout.
const REBUILD_LIMIT_FLOOR: std::time::Duration = std::time::Duration::from_secs(2);

/// How long replica reads are skipped after one failed.
const REPLICA_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

impl ReplicaReads {
    /// Whether replica reads are paused after a failure.
    pub(crate) fn paused(&self) -> bool {
        crate::clock::now_ms() < self.paused_until.load(Ordering::Acquire)
    }

    /// A connection that reads from replicas, or none while one is being
    /// made: that is done in the background (a cluster connection asks
    /// for the slot map and connects to every node), so that no request
    /// waits for it or, cut off by its timeout, throws it away.
    pub(crate) fn checkout(self: &Arc<Self>) -> Option<RedisConnection> {
        if let Some(existing) = lock(&self.conn).clone() {
            return Some(RedisConnection::cluster(existing));
        }
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let replicas = Arc::downgrade(self);
            let (client, limit) = (self.client.clone(), self.connect_timeout);
            tokio::spawn(async move {
                let made = tokio::time::timeout(limit, client.get_async_connection()).await;
                let Some(replicas) = replicas.upgrade() else {
                    return;
                };
                match made {
                    Ok(Ok(conn)) => {
                        lock(&replicas.conn).get_or_insert(conn);
                    }
                    _ => replicas.failed(),
                }
                replicas.connecting.store(false, Ordering::Release);
            });
        }
        None
    }

    /// After a failed or late replica read: drop the connection (a fresh
    /// one reads the current slot map) and skip replicas for a while.
    pub(crate) fn failed(&self) {
        lock(&self.conn).take();
        let until = crate::clock::now_ms()
            .saturating_add(u64::try_from(REPLICA_PAUSE.as_millis()).unwrap_or(u64::MAX));
        self.paused_until.store(until, Ordering::Release);
    }
}

impl RedisManager {
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

/// An `EVALSHA` of `script` with `keys`, sized up front for `args` more
/// arguments of `arg_bytes` bytes in all, which the caller adds with
/// [`Cmd::arg`]. Send it with [`query_script`]. Unlike a
/// [`ScriptInvocation`], it copies no key or argument into buffers of its
/// own: the command is the only buffer.
///
/// ```
/// use tower_redis_core::redis::Script;
///
/// let script = Script::new("return redis.call('GET', KEYS[1])");
/// let mut cmd = tower_redis_core::script_cmd(&script, &["k"], 1, 2);
/// cmd.arg("v1");
/// assert_eq!(cmd.args_iter().count(), 5); // EVALSHA, hash, 1, k, v1
/// ```
pub fn script_cmd(script: &Script, keys: &[&str], args: usize, arg_bytes: usize) -> Cmd {
    let hash = script.get_hash();
    let data = 7 + hash.len() + 2 + keys.iter().map(|k| k.len()).sum::<usize>() + arg_bytes;
    let mut cmd = Cmd::with_capacity(3 + keys.len() + args, data);
    cmd.arg("EVALSHA").arg(hash).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}

/// Sends `cmd`, an `EVALSHA` of `script` built with [`script_cmd`], on
/// `conn`; when Redis has lost the script (NOSCRIPT: a restart, `SCRIPT
/// FLUSH`), loads it and sends the command once more. For use inside
/// [`RedisManager::run`] and [`RedisManager::failover`].
pub async fn query_script<T: FromRedisValue>(
    conn: &mut RedisConnection,
    script: &Script,
    cmd: &Cmd,
) -> RedisResult<T> {
    match cmd.query_async(conn).await {
        // Boxed: the rare reload is not part of every call's future.
        Err(error) if is_noscript(&error) => Box::pin(load_and_retry(conn, script, cmd)).await,
        other => other,
    }
}

/// Loads `script` (the server did not have it) and sends `cmd` again.
async fn load_and_retry<T: FromRedisValue>(
    conn: &mut RedisConnection,
    script: &Script,
    cmd: &Cmd,
) -> RedisResult<T> {
    script.prepare_invoke().load_async(conn).await?;
    cmd.query_async(conn).await
}

fn is_noscript(error: &RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

pub(crate) type CheckedOut = (RedisConnection, Option<Arc<AtomicBool>>);

/// A pooled connection kept for checkouts without the pool (see
/// `Backend::Standalone::live`).
pub(crate) struct Live {
    conn: redis::aio::MultiplexedConnection,
    broken: Arc<AtomicBool>,
    generation: u64,
    /// Epoch milliseconds after which the next checkout goes through the
    /// pool again (and keeps what it gets): bb8 then still sees the
    /// connection used, rotates it at its maximum lifetime, and the pool's
    /// metrics stay current.
    until_ms: u64,
}

/// How long a kept connection is handed out before a checkout goes through
/// the pool again.
const LIVE_MS: u64 = 1000;

impl Live {
    /// `pooled`, kept for the next [`LIVE_MS`].
    fn of(pooled: &PooledConnection) -> Self {
        Self {
            conn: pooled.conn.clone(),
            broken: Arc::clone(&pooled.broken),
            generation: pooled.generation(),
            until_ms: crate::clock::now_ms() + LIVE_MS,
        }
    }

    fn checked_out(&self) -> CheckedOut {
        (
            RedisConnection::standalone(self.conn.clone()),
            Some(Arc::clone(&self.broken)),
        )
    }
}

impl Backend {
    pub(crate) fn new(config: &RedisConfig) -> Result<Self, ConfigError> {
        match config.topology() {
            Topology::Standalone(url) => {
                let client = standalone_client(config, url).map_err(|e| {
                    ConfigError::new(
                        "url",
                        format!("`{url}` is rejected by the Redis client ({e})"),
                        "check the URL",
                    )
                })?;
                Ok(Self::pool(
                    config,
                    ConnectTarget::Server(Box::new(client)),
                    None,
                ))
            }
            Topology::Sentinel(sentinel) => {
                let discovery = SentinelDiscovery::new(config, sentinel).map_err(|e| {
                    ConfigError::new(
                        "sentinels",
                        format!("`{sentinel}` is rejected by the Redis client ({e})"),
                        "check the Sentinel and primary URLs",
                    )
                })?;
                let discovery = Arc::new(discovery);
                Ok(Self::pool(
                    config,
                    ConnectTarget::Sentinel(Arc::clone(&discovery)),
                    Some(discovery),
                ))
            }
            Topology::Cluster(nodes) => {
                let builder = || {
                    ClusterClient::builder(nodes.iter().map(|n| n.expose().to_owned()))
                        .connection_timeout(config.connect_timeout())
                        .response_timeout(config.command_timeout())
                        .retries(2)
                };
                let replica_builder = builder()
                    .read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy);
                let rejected = |e: RedisError| {
                    ConfigError::new(
                        "cluster_nodes",
                        format!("are rejected by the cluster client ({e})"),
                        "check the node URLs",
                    )
                };
                let client = with_cluster_roots(builder(), config)
                    .build()
                    .map_err(rejected)?;
                let replica_client = with_cluster_roots(replica_builder, config)
                    .build()
                    .map_err(rejected)?;
                Ok(Backend::Cluster {
                    client: Box::new(client),
                    conn: Arc::new(Mutex::new(None)),
                    rebuild: Arc::new(ClusterRebuild {
                        running: AtomicBool::new(false),
                        discards: AtomicU64::new(0),
                        epoch: std::time::Instant::now(),
                        answered_ms: AtomicU64::new(0),
                        next_ms: AtomicU64::new(0),
                        limit: (config.connect_timeout() * 4).max(REBUILD_LIMIT_FLOOR),
                        check_within: config.command_timeout(),
                        rejected: AtomicU32::new(0),
                    }),
                    replicas: Arc::new(ReplicaReads {
                        client: replica_client,
                        conn: Mutex::new(None),
                        paused_until: AtomicU64::new(0),
                        connecting: AtomicBool::new(false),
                        connect_timeout: config.connect_timeout(),
                    }),
                })
            }
        }
    }

    /// The standalone pool, over a fixed server or the primary the
    /// Sentinels name.
    fn pool(
        config: &RedisConfig,
        target: ConnectTarget,
        sentinel: Option<Arc<SentinelDiscovery>>,
    ) -> Self {
        let connector = StandaloneConnector::new(target, config.connect_timeout());
        let generation = Arc::clone(&connector.generation);
        let watchers = sentinel
            .as_ref()
            .map(|discovery| watch_switches(discovery, &generation));
        let pool = bb8::Pool::builder()
            .max_size(config.pool_size())
            .test_on_check_out(false)
            .retry_connection(false)
            .connection_timeout(config.connect_timeout())
            .queue_strategy(bb8::QueueStrategy::Fifo)
            .error_sink(Box::new(TracingErrorSink))
            .build_unchecked(connector);
        Backend::Standalone {
            pool,
            generation,
            pool_size: config.pool_size(),
            sentinel,
            _watchers: watchers,
            live: ArcSwapOption::empty(),
        }
    }

    /// The replica reads of a cluster; none for a standalone server or
    /// Sentinel (their reads stay on the primary).
    pub(crate) fn replicas(&self) -> Option<&Arc<ReplicaReads>> {
        match self {
            Backend::Cluster { replicas, .. } => Some(replicas),
            _ => None,
        }
    }

    /// The Sentinel discovery, when the primary is found through Sentinel.
    pub(crate) fn sentinel(&self) -> Option<&Arc<SentinelDiscovery>> {
        match self {
            Backend::Standalone { sentinel, .. } => sentinel.as_ref(),
            _ => None,
        }
    }

    /// A connection: the kept live one or the cluster's shared one when
    /// there is one (no await), else one from the pool or a new one. Only
    /// the latter is a future of its own, boxed: bb8's checkout is a large
    /// future, and every operation's future would otherwise carry (and
    /// move) its state.
    pub(crate) async fn checkout(&self) -> Result<CheckedOut, RedisError> {
        match self.ready() {
            Some(checked_out) => Ok(checked_out),
            None => Box::pin(self.connect()).await,
        }
    }

    /// The connection in use, when it can be handed out without waiting.
    fn ready(&self) -> Option<CheckedOut> {
        match self {
            Backend::Standalone {
                generation,
                pool_size,
                live,
                ..
            } => {
                if *pool_size == 1
                    && let Some(kept) = &*live.load()
                    && !kept.broken.load(Ordering::Acquire)
                    && kept.generation == generation.load(Ordering::Acquire)
                    && crate::clock::now_ms() < kept.until_ms
                {
                    return Some(kept.checked_out());
                }
                None
            }
            Backend::Cluster { conn, .. } => lock(conn)
                .clone()
                .map(|existing| (RedisConnection::cluster(existing), None)),
            Backend::Disabled => None,
        }
    }

    /// A connection from the pool, or a new one.
    async fn connect(&self) -> Result<CheckedOut, RedisError> {
        match self {
            Backend::Standalone {
                pool,
                generation,
                pool_size,
                live,
                ..
            } => {
                // Stale connections (from before an outage, or broken) are
                // dropped by bb8 when their guard goes back; try the next.
                for _ in 0..=*pool_size {
                    let usable = if pool.state().connections == 0 {
                        // An empty pool: bb8 would connect in the background
                        // and make `get` wait, hiding the reason a connect
                        // failed until its timeout. Connect here instead, so
                        // a refused connection is known (and opens the
                        // breaker) at once, then give the result to the pool.
                        let fresh = pool.dedicated_connection().await?;
                        let usable = Live::of(&fresh);
                        // A full pool refuses it; the clone above still works.
                        let _ = pool.add(fresh);
                        usable
                    } else {
                        let waited = crate::record::Started::now();
                        let guard = pool.get().await.map_err(pool_error)?;
                        let state = pool.state();
                        crate::record::pool_checkout(
                            waited,
                            state.connections,
                            state.idle_connections,
                            *pool_size,
                        );
                        if guard.broken.load(Ordering::Acquire)
                            || guard.generation() != generation.load(Ordering::Acquire)
                        {
                            continue;
                        }
                        Live::of(&guard)
                    };
                    let checked_out = usable.checked_out();
                    if *pool_size == 1 {
                        live.store(Some(Arc::new(usable)));
                    }
                    return Ok(checked_out);
                }
                Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "no usable pooled connection",
                    "every pooled connection was stale".to_owned(),
                )))
            }
            Backend::Cluster { client, conn, .. } => {
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

    /// An operation succeeded. On a Cluster it is remembered, so that a
    /// node's timeout can be told from the whole cluster's
    /// ([`answered_within`](Self::answered_within)): one clock read, and a
    /// write at most once a millisecond.
    pub(crate) fn on_answer(&self) {
        if let Backend::Cluster { rebuild, .. } = self {
            let now = rebuild.now_ms() + 1;
            if rebuild.answered_ms.load(Ordering::Relaxed) < now {
                rebuild.answered_ms.fetch_max(now, Ordering::Relaxed);
            }
        }
    }

    /// Whether this is a Cluster on which an operation succeeded within
    /// the last `window`.
    pub(crate) fn answered_within(&self, window: std::time::Duration) -> bool {
        let Backend::Cluster { rebuild, .. } = self else {
            return false;
        };
        let answered = rebuild.answered_ms.load(Ordering::Relaxed);
        let now = rebuild.now_ms() + 1;
        answered != 0 && now.saturating_sub(answered) <= crate::clock::duration_ms(window)
    }

    /// A Cluster node's response timed out; the shared connection is kept
    /// (throwing it away would make every key wait for a new one, which
    /// waits for the node that hangs). But redis-rs reads its slot map
    /// again on a redirection or a broken connection, not on a timeout: a
    /// primary that hangs and is failed over would keep being asked for
    /// its slots, by this connection, for as long as it hangs. So a
    /// replacement is made in the background (it reads the slot map
    /// afresh), at most one at a time and one a second (less often, down
    /// to one every four seconds, while they are not kept), and takes the shared
    /// connection's place when it reaches every primary the cluster names
    /// ([`reaches_every_primary`]: not while the node hangs and is still a
    /// primary); operations under way keep the one they have. Not while
    /// no connection is kept (an operation is making one), and not kept
    /// when the connections were discarded meanwhile (an outage began:
    /// none from before it is used again). Nothing for a standalone
    /// server.
    pub(crate) fn on_node_timeout(&self) {
        let Backend::Cluster {
            client,
            conn,
            rebuild,
            ..
        } = self
        else {
            return;
        };
        let now = rebuild.now_ms();
        if now < rebuild.next_ms.load(Ordering::Acquire) {
            return;
        }
        // The connection it would replace, and the discards so far: one
        // made while none is kept (an operation is making one) or stored
        // after a discard (an outage began) is not wanted.
        let discards = {
            let kept = lock(conn);
            if kept.is_none() {
                return;
            }
            rebuild.discards.load(Ordering::Acquire)
        };
        if rebuild.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = Running(Arc::clone(rebuild));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rebuild.next_ms.store(
            now.saturating_add(crate::clock::duration_ms(REBUILD_EVERY)),
            Ordering::Release,
        );
        let (client, conn, limit) = ((**client).clone(), Arc::downgrade(conn), rebuild.limit);
        let check_within = rebuild.check_within;
        runtime.spawn(async move {
            // Held to the task's end, however it ends.
            let running = running;
            let made = tokio::time::timeout(limit, client.get_async_connection()).await;
            let made = match made {
                Ok(Ok(mut fresh)) => {
                    if !reaches_every_primary(&mut fresh, check_within).await {
                        let rebuild = &running.0;
                        // One a second for the first three, then twice
                        // the wait each time.
                        let rejected = rebuild.rejected.fetch_add(1, Ordering::AcqRel).min(10);
                        let wait = (REBUILD_EVERY * (1 << rejected.saturating_sub(2)))
                            .min(REBUILD_EVERY_AT_MOST);
                        rebuild.next_ms.fetch_max(
                            rebuild.now_ms().saturating_add(crate::clock::duration_ms(wait)),
                            Ordering::AcqRel,
                        );
                        tracing::debug!(target: "tower_redis", ?wait, "a replacement Redis Cluster connection does not reach every primary; the connection in use is kept");
                        return;
                    }
                    running.0.rejected.store(0, Ordering::Release);
                    Ok(Ok(fresh))
                }
                other => other,
            };
            let Some(conn) = conn.upgrade() else {
                // The manager is gone.
                return;
            };
            match made {
                Ok(Ok(fresh)) => {
                    let mut kept = lock(&conn);
                    if kept.is_some() && running.0.discards.load(Ordering::Acquire) == discards {
                        *kept = Some(fresh);
                    }
                }
                Ok(Err(error)) => {
                    tracing::debug!(target: "tower_redis", %error, "a replacement Redis Cluster connection could not be made");
                }
                Err(_) => {
                    tracing::debug!(target: "tower_redis", ?limit, "a replacement Redis Cluster connection was not made in time");
                }
            }
        });
    }

    /// Makes sure no connection from before now is used again.
    pub(crate) fn discard_connections(&self) {
        match self {
            Backend::Standalone { generation, .. } => {
                generation.fetch_add(1, Ordering::AcqRel);
            }
            Backend::Cluster {
                conn,
                replicas,
                rebuild,
                ..
            } => {
                let mut kept = lock(conn);
                rebuild.discards.fetch_add(1, Ordering::AcqRel);
                kept.take();
                drop(kept);
                lock(&replicas.conn).take();
            }
            Backend::Disabled => {}
        }
    }
}

/// Whether a new Cluster connection reaches every primary the cluster
/// names (`CLUSTER SLOTS`): for each, an operation the connection routes
/// to that primary's slots is answered by that primary (`CLUSTER MYID`,
/// its node id), within `within`. redis-rs' own routing is asked, so its
/// endpoints and address rewriting need no copy here.
///
/// A connection made while a primary hangs has no connection to it: it
/// sends that primary's slots to another node (a replica of its shard, or
/// any node), whose `MOVED` reply makes redis-rs read the slot map again,
/// and every such reading holds every key's operations while it waits for
/// the node that hangs. The connection in use keeps its connection to the
/// node instead (its operations time out, the other nodes' go on), so a
/// replacement takes its place only once this holds: after the cluster
/// failed the node over (the node asked knows of it), or once the node
/// answers again.
async fn reaches_every_primary(conn: &mut ClusterConnection, within: std::time::Duration) -> bool {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let slots = tokio::time::timeout(
        within,
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<redis::Value>(conn),
    )
    .await;
    let Ok(Ok(redis::Value::Array(ranges))) = slots else {
        return false;
    };
    // Each primary's id, with the first slot of one of its ranges.
    let mut primaries: Vec<(Vec<u8>, u16)> = Vec::new();
    for range in &ranges {
        // [start, end, [endpoint, port, id, …], replicas…]
        let redis::Value::Array(fields) = range else {
            return false;
        };
        let (Some(redis::Value::Int(start)), Some(redis::Value::Array(primary))) =
            (fields.first(), fields.get(2))
        else {
            return false;
        };
        let id = match primary.get(2) {
            Some(redis::Value::BulkString(id)) => id.clone(),
            Some(redis::Value::SimpleString(id)) => id.clone().into_bytes(),
            _ => return false,
        };
        let Ok(start) = u16::try_from(*start) else {
            return false;
        };
        if !primaries.iter().any(|(known, _)| *known == id) {
            primaries.push((id, start));
        }
    }
    // A cluster that names no slot (a node just reset) shows nothing.
    if primaries.is_empty() {
        return false;
    }
    let asks = primaries.into_iter().map(|(id, slot)| {
        let mut conn = conn.clone();
        async move {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                slot,
                SlotAddr::Master,
            )));
            let answer = tokio::time::timeout(
                within,
                conn.route_command(redis::cmd("CLUSTER").arg("MYID").clone(), routing),
            )
            .await;
            match answer {
                Ok(Ok(redis::Value::BulkString(answered))) => answered == id,
                Ok(Ok(redis::Value::SimpleString(answered))) => answered.as_bytes() == id,
                _ => false,
            }
        }
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .all(|answered| answered)
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
pub(crate) fn warn_if_certificates_unchecked(topology: &Topology, description: &str) {
    let unchecked = match topology {
        Topology::Standalone(url) => url.skips_certificate_checks(),
        Topology::Cluster(nodes) => nodes.iter().any(RedisUrl::skips_certificate_checks),
        Topology::Sentinel(sentinel) => sentinel
            .sentinels()
            .iter()
            .chain([sentinel.master_url()])
            .any(RedisUrl::skips_certificate_checks),
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

/// What the startup log line names: the topology, and which environment
/// variables chose it when several were set.
pub(crate) fn describe_config(config: &RedisConfig) -> String {
    let topology = describe(config.topology());
    match config.origin() {
        Some(origin) => format!("{topology} ({origin})"),
        None => topology,
    }
}

pub(crate) fn describe(topology: &Topology) -> String {
    match topology {
        Topology::Sentinel(sentinel) => sentinel.to_string(),
        Topology::Standalone(url) => url.to_string(),
        Topology::Cluster(nodes) => {
            let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
            format!("cluster [{}]", nodes.join(", "))
        }
    }
}
