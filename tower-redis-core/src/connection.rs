//! The connections handed to operations, and the pool behind standalone mode.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use tokio::sync::Notify;

use crate::backend::standalone_client;
use crate::config::{RedisConfig, RedisUrl, SentinelTopology};
use crate::sync::lock;

/// A connection to Redis, standalone or cluster, for one operation.
///
/// It implements redis-rs' [`ConnectionLike`], so commands, pipelines and
/// scripts run on it directly. It is a cheap clone of a multiplexed
/// connection: hold it only for the operation it was given for.
#[derive(Clone)]
pub struct RedisConnection {
    kind: ConnectionKind,
}

#[derive(Clone)]
enum ConnectionKind {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    pub(crate) fn standalone(conn: MultiplexedConnection) -> Self {
        Self {
            kind: ConnectionKind::Standalone(conn),
        }
    }

    pub(crate) fn cluster(conn: ClusterConnection) -> Self {
        Self {
            kind: ConnectionKind::Cluster(conn),
        }
    }

    /// Whether this connection talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, ConnectionKind::Cluster(_))
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ConnectionKind::Standalone(_) => "standalone",
            ConnectionKind::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisConnection")
            .field("kind", &kind)
            .finish()
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("db.operation.name", operation_name(operation(cmd)));
        }
        let server_error = |v: &Value| matches!(v, Value::ServerError(_));
        match &mut self.kind {
            // The multiplexed connection's own future, boxed once by
            // `timed` (its `ConnectionLike` future would be a second box).
            ConnectionKind::Standalone(c) => {
                timed(|| operation(cmd), c.send_packed_command(cmd), server_error)
            }
            ConnectionKind::Cluster(c) => {
                timed(|| operation(cmd), c.req_packed_command(cmd), server_error)
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        tracing::Span::current().record("db.operation.name", "PIPELINE");
        let server_error = |vs: &Vec<Value>| vs.iter().any(|v| matches!(v, Value::ServerError(_)));
        match &mut self.kind {
            ConnectionKind::Standalone(c) => timed(
                || PIPELINE,
                c.send_packed_commands(pipeline, offset, count),
                server_error,
            ),
            ConnectionKind::Cluster(c) => timed(
                || PIPELINE,
                c.req_packed_commands(pipeline, offset, count),
                server_error,
            ),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            ConnectionKind::Standalone(c) => c.get_db(),
            ConnectionKind::Cluster(c) => c.get_db(),
        }
    }
}

/// The commands the layers send, by name ([`KNOWN_COMMANDS`]; anything
/// else is `other`, so that the histogram's series stay few whatever an
/// application sends), and the `db.client.operation.duration` histogram of
/// each, of `other` and of pipelines ([`OPERATIONS`], same order), whose
/// keys are built once.
macro_rules! operations {
    ($($name:literal),* $(,)?) => {
        const KNOWN_COMMANDS: &[&str] = &[$($name),*];
        #[cfg(feature = "metrics")]
        static OPERATIONS: [crate::record::Histogram; KNOWN_COMMANDS.len() + 2] = [
            $(crate::record::Histogram::new(
                crate::record::DB_CLIENT_OPERATION_DURATION,
                &[("db.system.name", "redis"), ("db.operation.name", $name)],
            ),)*
            crate::record::Histogram::new(
                crate::record::DB_CLIENT_OPERATION_DURATION,
                &[("db.system.name", "redis"), ("db.operation.name", "other")],
            ),
            crate::record::Histogram::new(
                crate::record::DB_CLIENT_OPERATION_DURATION,
                &[("db.system.name", "redis"), ("db.operation.name", "PIPELINE")],
            ),
        ];
    };
}

// The layers' per-request commands first (a data hit's `HGET`, a page
// hit's `HMGET`, the scripts' `EVALSHA`, a session read's `HGETALL`): a
// command's name is looked up in this order on every command.
operations!(
    "HGET", "HMGET", "EVALSHA", "GET", "HGETALL", "PEXPIRE", "SET", "DEL", "UNLINK", "EXPIRE",
    "INCR", "INCRBY", "MGET", "EXISTS", "HSET", "HDEL", "SADD", "SREM", "SMEMBERS", "ZADD", "ZREM",
    "ZRANGE", "ZCOUNT", "EVAL", "SCRIPT", "PUBLISH", "PING", "TIME", "INFO",
);

/// The index of `other` in [`OPERATIONS`]; `PIPELINE` is the next one.
const OTHER: usize = KNOWN_COMMANDS.len();
const PIPELINE: usize = OTHER + 1;

/// The index in [`OPERATIONS`] of a command: its name's, when it is one of
/// [`KNOWN_COMMANDS`], else [`OTHER`].
fn operation(cmd: &Cmd) -> usize {
    let Some(redis::Arg::Simple(first)) = cmd.args_iter().next() else {
        return OTHER;
    };
    KNOWN_COMMANDS
        .iter()
        .position(|known| known.as_bytes().eq_ignore_ascii_case(first))
        .unwrap_or(OTHER)
}

/// OpenTelemetry's `db.operation.name` of the operation at `index` of
/// [`OPERATIONS`].
fn operation_name(index: usize) -> &'static str {
    match index {
        PIPELINE => "PIPELINE",
        index => KNOWN_COMMANDS.get(index).copied().unwrap_or("other"),
    }
}

/// The request as a boxed future; with the `metrics` feature, timed into
/// `db.client.operation.duration`.
///
/// The timing wraps the request (`map`) instead of awaiting it in an
/// `async` block: an `async` block keeps the future it was given beside
/// the one it awaits, which made the box twice the request's size (2.3 KB
/// instead of 1.2 KB a command, a copy and an allocation too large for the
/// allocator's per-thread cache).
#[cfg(feature = "metrics")]
fn timed<'a, T: Send + 'a>(
    operation: impl FnOnce() -> usize,
    sent: impl Future<Output = RedisResult<T>> + Send + 'a,
    server_error: fn(&T) -> bool,
) -> RedisFuture<'a, T> {
    use futures_util::FutureExt;
    let operation = operation();
    let started = std::time::Instant::now();
    Box::pin(sent.map(move |result| {
        record_duration(operation, started, &result, server_error);
        result
    }))
}

/// Records one request's duration into `db.client.operation.duration`.
#[cfg(feature = "metrics")]
fn record_duration<T>(
    operation: usize,
    started: std::time::Instant,
    result: &RedisResult<T>,
    server_error: fn(&T) -> bool,
) {
    let seconds = started.elapsed().as_secs_f64();
    let histogram = crate::record::DB_CLIENT_OPERATION_DURATION;
    let name = || operation_name(operation);
    match result {
        // redis-rs hands a server's error reply back as a value.
        Ok(value) if server_error(value) => crate::record::histogram(
            histogram,
            &[
                ("db.system.name", "redis"),
                ("db.operation.name", name()),
                ("error.type", "server"),
            ],
            seconds,
        ),
        // The usual case: a key built once, no allocation.
        Ok(_) => {
            if let Some(durations) = OPERATIONS.get(operation) {
                durations.record(seconds);
            }
        }
        Err(error) => crate::record::histogram(
            histogram,
            &[
                ("db.system.name", "redis"),
                ("db.operation.name", name()),
                ("error.type", crate::failover::error_type(error)),
            ],
            seconds,
        ),
    }
}

#[cfg(not(feature = "metrics"))]
#[inline]
fn timed<'a, T>(
    _operation: impl FnOnce() -> usize,
    sent: impl Future<Output = RedisResult<T>> + Send + 'a,
    _server_error: fn(&T) -> bool,
) -> RedisFuture<'a, T> {
    Box::pin(sent)
}

/// A pooled multiplexed connection with the marks that decide whether the
/// pool may hand it out again.
pub(crate) struct PooledConnection {
    pub(crate) conn: MultiplexedConnection,
    /// Set when an operation on any clone of this connection hit an I/O
    /// error: a multiplexed connection does not recover, so it is dropped.
    pub(crate) broken: Arc<AtomicBool>,
    /// The pool generation it was made in. Opening the breaker starts a new
    /// generation, so connections from before an outage are never reused.
    generation: u64,
}

impl PooledConnection {
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

/// bb8's view of how to make and judge standalone connections.
///
/// bb8-redis' manager is not used because it never reports a connection as
/// broken, and it PINGs on every checkout unless told otherwise; this one
/// checks nothing on checkout (one round trip per operation) and discards a
/// connection after an I/O error or an outage.
pub(crate) struct StandaloneConnector {
    target: ConnectTarget,
    config: AsyncConnectionConfig,
    pub(crate) generation: Arc<AtomicU64>,
}

/// Where a standalone connection goes: one fixed server, or the primary
/// the Sentinels name at the time of connecting.
pub(crate) enum ConnectTarget {
    Server(Box<redis::Client>),
    Sentinel(Arc<SentinelDiscovery>),
}

/// The connection settings of the pool: the connect timeout, and no
/// response timeout (the manager times each whole operation instead; the
/// client's own default is 500 ms).
pub(crate) fn pooled_connection_config(connect_timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(None)
}

impl StandaloneConnector {
    pub(crate) fn new(target: ConnectTarget, connect_timeout: Duration) -> Self {
        Self {
            target,
            config: pooled_connection_config(connect_timeout),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Finds the primary through the Sentinels: asks them in turn for
/// `SENTINEL get-master-addr-by-name`, connects to the address named with
/// the primary's credentials, database and TLS, and keeps the connection
/// only if `ROLE` says `master`. redis-rs' own `SentinelClient` is not used:
/// it asks `SENTINEL MASTERS`, opens extra blocking-style connections for
/// the role check, and gives no per-Sentinel connect timeout.
pub(crate) struct SentinelDiscovery {
    sentinels: Vec<(RedisUrl, redis::Client)>,
    topology: SentinelTopology,
    /// For the primary's client: the TLS roots.
    config: RedisConfig,
    connect_timeout: Duration,
    /// The address a Sentinel last announced as promoted (`+promoted-slave`,
    /// `+switch-master`): tried first, still checked with `ROLE`, forgotten
    /// when that check fails. It spares the wait for every Sentinel to
    /// update its answer to `get-master-addr-by-name`.
    announced: Mutex<Option<(String, u16)>>,
    /// Woken when a Sentinel announces a new primary, so that the recovery
    /// probe connects at once instead of at its next backoff step.
    switched: Arc<Notify>,
    /// A replica the leading Sentinel told to become primary is being
    /// watched (one at a time: see [`SentinelDiscovery::watch_promotion`]).
    watching: AtomicBool,
    /// The primary that only the promotion watch announced, until a
    /// Sentinel announces one itself.
    provisional: Mutex<Option<(String, u16)>>,
}

impl SentinelDiscovery {
    pub(crate) fn new(config: &RedisConfig, topology: &SentinelTopology) -> RedisResult<Self> {
        let sentinels = topology
            .sentinels()
            .iter()
            .map(|url| Ok((url.clone(), standalone_client(config, url)?)))
            .collect::<RedisResult<Vec<_>>>()?;
        Ok(Self {
            sentinels,
            topology: topology.clone(),
            config: config.clone(),
            connect_timeout: config.connect_timeout(),
            announced: Mutex::new(None),
            switched: Arc::new(Notify::new()),
            watching: AtomicBool::new(false),
            provisional: Mutex::new(None),
        })
    }

    /// Watches `address`, the replica that the leading Sentinel has just
    /// told to become primary (`+failover-state-wait-promotion`), and
    /// announces it (a new pool generation, the recovery probe woken) as
    /// soon as it says `ROLE master` itself: the Sentinels only announce the
    /// promotion (`+promoted-slave`) once their next `INFO` of the replica
    /// shows it, up to a second later. `ROLE` is asked every 20 ms on one
    /// connection (remade at most every 100 ms if it fails), for at most
    /// [`PROMOTION_WATCH`], and the watch ends as soon as any other
    /// announcement arrives. One replica is watched at a time, so a flood
    /// of announcements starts no more work, and the watch holds the
    /// discovery weakly, so it ends with the manager. An address announced
    /// this way is provisional until a Sentinel announces a primary itself:
    /// an aborted failover takes it back ([`SentinelDiscovery::aborted`]).
    /// A replica that never takes the role is never used.
    pub(crate) async fn watch_promotion(
        this: std::sync::Weak<Self>,
        address: (String, u16),
        generation: Arc<AtomicU64>,
    ) {
        let Some(discovery) = this.upgrade() else {
            return;
        };
        if discovery.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let before = lock(&discovery.announced).clone();
        let settings = pooled_connection_config(discovery.connect_timeout);
        let connect_timeout = discovery.connect_timeout;
        let client = discovery.client_at(&address.0, address.1);
        drop(discovery);
        let deadline = tokio::time::Instant::now() + PROMOTION_WATCH;
        let mut conn: Option<MultiplexedConnection> = None;
        while tokio::time::Instant::now() < deadline {
            let Some(discovery) = this.upgrade() else {
                return;
            };
            if *lock(&discovery.announced) != before {
                break;
            }
            let Ok(client) = client.as_ref() else {
                break;
            };
            if conn.is_none() {
                let made = tokio::time::timeout(
                    connect_timeout,
                    client.get_multiplexed_async_connection_with_config(&settings),
                )
                .await;
                match made {
                    Ok(Ok(made)) => conn = Some(made),
                    _ => {
                        drop(discovery);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            if let Some(open) = conn.as_mut() {
                match tokio::time::timeout(connect_timeout, role_is_master(open)).await {
                    Ok(Ok(true)) => {
                        let mut announced = lock(&discovery.announced);
                        if *announced == before {
                            *announced = Some(address.clone());
                            *lock(&discovery.provisional) = Some(address.clone());
                            drop(announced);
                            generation.fetch_add(1, Ordering::AcqRel);
                            tracing::info!(target: "tower_redis", address = %format!("{}:{}", address.0, address.1), "the replica a Sentinel is promoting says it is the primary; reconnecting");
                            discovery.switched.notify_one();
                        }
                        break;
                    }
                    Ok(Ok(false)) => {}
                    _ => conn = None,
                }
            }
            drop(discovery);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(discovery) = this.upgrade() {
            discovery.watching.store(false, Ordering::Release);
        }
    }

    /// A Sentinel aborted a failover of this master: a primary that only
    /// the promotion watch announced is taken back (a new pool generation;
    /// the next connection asks the Sentinels again).
    pub(crate) fn aborted(&self, generation: &AtomicU64) {
        let Some(provisional) = lock(&self.provisional).take() else {
            return;
        };
        let mut announced = lock(&self.announced);
        if announced.as_ref() == Some(&provisional) {
            *announced = None;
            drop(announced);
            generation.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(target: "tower_redis", address = %format!("{}:{}", provisional.0, provisional.1), "a Sentinel aborted the failover to the primary this manager had switched to; asking the Sentinels again");
        }
    }

    /// Woken each time a Sentinel announces a new primary.
    pub(crate) fn switched(&self) -> Arc<Notify> {
        Arc::clone(&self.switched)
    }

    /// Records `address` as the announced primary (a Sentinel's own
    /// announcement: no longer provisional); true when it is new.
    fn announce(&self, address: (String, u16)) -> bool {
        lock(&self.provisional).take();
        let mut announced = lock(&self.announced);
        if announced.as_ref() == Some(&address) {
            return false;
        }
        *announced = Some(address);
        true
    }

    /// The announced primary, when it still says `ROLE master`; a failed
    /// check forgets it.
    async fn connect_announced(
        &self,
        settings: &AsyncConnectionConfig,
    ) -> Option<(String, u16, MultiplexedConnection)> {
        let (host, port) = lock(&self.announced).clone()?;
        match self.connect_checked(&host, port, settings).await {
            Ok(conn) => Some((host, port, conn)),
            Err(error) => {
                tracing::debug!(target: "tower_redis", address = %format!("{host}:{port}"), %error, "the primary a Sentinel announced is not usable; asking the Sentinels");
                let mut announced = lock(&self.announced);
                if announced.as_ref() == Some(&(host, port)) {
                    *announced = None;
                }
                None
            }
        }
    }

    /// A connection to the current primary, checked with `ROLE`.
    pub(crate) async fn connect_master(
        &self,
        settings: &AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        if let Some((_, _, conn)) = self.connect_announced(settings).await {
            return Ok(conn);
        }
        let mut last_error = None;
        let mut tried: Vec<(String, u16)> = Vec::new();
        for (sentinel_url, sentinel) in &self.sentinels {
            let (host, port) = match self.ask(sentinel, settings).await {
                Ok(address) => address,
                Err(error) => {
                    tracing::debug!(target: "tower_redis", sentinel = %sentinel_url, %error, "Sentinel did not name the primary");
                    last_error = Some(error);
                    continue;
                }
            };
            // Several Sentinels usually name the same address: one try each.
            if tried.contains(&(host.clone(), port)) {
                continue;
            }
            tried.push((host.clone(), port));
            match self.connect_checked(&host, port, settings).await {
                Ok(conn) => return Ok(conn),
                Err(error) => {
                    tracing::debug!(target: "tower_redis", sentinel = %sentinel_url, address = %format!("{host}:{port}"), %error, "the address a Sentinel named is not a usable primary");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| RedisError::from((redis::ErrorKind::Io, "no Sentinel configured"))))
    }

    /// A client for the current primary (for pub/sub), checked with `ROLE`.
    pub(crate) async fn master_client(&self) -> RedisResult<redis::Client> {
        let settings = pooled_connection_config(self.connect_timeout);
        if let Some((host, port, _)) = self.connect_announced(&settings).await {
            return self.client_at(&host, port);
        }
        let mut last_error = None;
        for (_, sentinel) in &self.sentinels {
            let result = async {
                let (host, port) = self.ask(sentinel, &settings).await?;
                self.connect_checked(&host, port, &settings).await?;
                self.client_at(&host, port)
            }
            .await;
            match result {
                Ok(client) => return Ok(client),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error
            .unwrap_or_else(|| RedisError::from((redis::ErrorKind::Io, "no Sentinel configured"))))
    }

    /// One Sentinel's answer: the primary's host and port.
    async fn ask(
        &self,
        sentinel: &redis::Client,
        settings: &AsyncConnectionConfig,
    ) -> RedisResult<(String, u16)> {
        let question = async {
            let mut conn = sentinel
                .get_multiplexed_async_connection_with_config(settings)
                .await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(self.topology.master_name())
                .query_async::<Option<(String, String)>>(&mut conn)
                .await
        };
        let answer = tokio::time::timeout(self.connect_timeout, question)
            .await
            .map_err(|_| timed_out("no answer from the Sentinel"))??;
        let Some((host, port)) = answer else {
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "the Sentinel does not monitor this master name",
                self.topology.master_name().to_owned(),
            )));
        };
        let port = port.parse::<u16>().map_err(|_| {
            RedisError::from((
                redis::ErrorKind::Io,
                "the Sentinel named an invalid port",
                port.clone(),
            ))
        })?;
        Ok((host, port))
    }

    fn client_at(&self, host: &str, port: u16) -> RedisResult<redis::Client> {
        let url = self.topology.master_at(host, port).map_err(|problem| {
            RedisError::from((redis::ErrorKind::Io, "unusable primary address", problem))
        })?;
        standalone_client(&self.config, &url)
    }

    /// Connects to `host:port` and checks that it is a primary.
    async fn connect_checked(
        &self,
        host: &str,
        port: u16,
        settings: &AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        let client = self.client_at(host, port)?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(settings)
            .await?;
        let is_master = tokio::time::timeout(self.connect_timeout, role_is_master(&mut conn))
            .await
            .map_err(|_| timed_out("no answer to ROLE"))??;
        if !is_master {
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "the address the Sentinel named is not a primary (ROLE)",
                format!("{host}:{port}"),
            )));
        }
        Ok(conn)
    }
}

/// Listens to every Sentinel's `+promoted-slave` and `+switch-master`
/// announcements, to `+failover-state-wait-promotion`, after which the
/// replica being promoted is watched until it says it is the primary
/// ([`SentinelDiscovery::watch_promotion`]), and to `-failover-abort-*`.
/// When the primary named `master_name` moves, it starts a new pool
/// generation, so that no operation keeps writing to a primary the
/// Sentinels have replaced (the demoted primary would acknowledge writes
/// until the Sentinels reconfigure it, seconds later, and then drop them);
/// it records the new address for the next connect and wakes the recovery
/// probe. `+promoted-slave` comes first: the leading Sentinel sends it as
/// soon as the replica reports itself primary, before the other Sentinels
/// update their answers. A lost subscription is renewed after a pause. The
/// tasks end when the returned guard drops.
pub(crate) fn watch_switches(
    discovery: &Arc<SentinelDiscovery>,
    generation: &Arc<AtomicU64>,
) -> SwitchWatchers {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return SwitchWatchers(Vec::new());
    };
    let tasks = discovery
        .sentinels
        .iter()
        .map(|(url, client)| {
            let watcher = SwitchWatcher {
                sentinel: url.clone(),
                client: client.clone(),
                discovery: Arc::downgrade(discovery),
                generation: Arc::clone(generation),
            };
            runtime.spawn(watcher.run()).abort_handle()
        })
        .collect();
    SwitchWatchers(tasks)
}

/// Stops the `+switch-master` listeners when the backend drops.
pub(crate) struct SwitchWatchers(Vec<tokio::task::AbortHandle>);

impl Drop for SwitchWatchers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

struct SwitchWatcher {
    sentinel: RedisUrl,
    client: redis::Client,
    /// Weak: the watcher must not keep the backend alive.
    discovery: std::sync::Weak<SentinelDiscovery>,
    generation: Arc<AtomicU64>,
}

impl SwitchWatcher {
    const SWITCH: &'static str = "+switch-master";
    const PROMOTED: &'static str = "+promoted-slave";
    const PROMOTING: &'static str = "+failover-state-wait-promotion";
    /// `-failover-abort-not-elected`, `-failover-abort-slave-timeout`, …
    const ABORTED: &'static str = "-failover-abort-*";
    const RETRY: Duration = Duration::from_secs(1);

    async fn run(self) {
        loop {
            let Some(connect_timeout) = self.discovery.upgrade().map(|d| d.connect_timeout) else {
                return;
            };
            if let Err(error) = self.listen(connect_timeout).await {
                tracing::debug!(target: "tower_redis", sentinel = %self.sentinel, %error, "lost the Sentinel's +switch-master subscription; renewing it");
            }
            let jitter = Duration::from_millis(rand::random_range(0..250));
            tokio::time::sleep(Self::RETRY + jitter).await;
        }
    }

    async fn listen(&self, connect_timeout: Duration) -> RedisResult<()> {
        let subscribe = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub
                .subscribe(&[Self::SWITCH, Self::PROMOTED, Self::PROMOTING])
                .await?;
            pubsub.psubscribe(Self::ABORTED).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(connect_timeout, subscribe)
            .await
            .map_err(|_| timed_out("no answer from the Sentinel"))??;
        let mut messages = pubsub.into_on_message();
        while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
            let Some(discovery) = self.discovery.upgrade() else {
                return Ok(());
            };
            let payload: String = message.get_payload().unwrap_or_default();
            let master_name = discovery.topology.master_name();
            if message.get_channel_name().starts_with("-failover-abort-") {
                // `master <name> <ip> <port>`: this master's failover ended
                // without a promotion.
                if payload.split(' ').nth(1) == Some(master_name) {
                    discovery.aborted(&self.generation);
                }
                continue;
            }
            let Some(address) =
                announced_primary(message.get_channel_name(), &payload, master_name)
            else {
                continue;
            };
            if message.get_channel_name() == Self::PROMOTING {
                // Told to become primary, not one yet: watched, not used.
                tokio::spawn(SentinelDiscovery::watch_promotion(
                    Arc::downgrade(&discovery),
                    address,
                    Arc::clone(&self.generation),
                ));
                continue;
            }
            if discovery.announce(address) {
                self.generation.fetch_add(1, Ordering::AcqRel);
                tracing::info!(target: "tower_redis", sentinel = %self.sentinel, event = %message.get_channel_name(), announcement = %payload, "a Sentinel announced a new primary; reconnecting");
            }
            discovery.switched.notify_one();
        }
        Ok(())
    }
}

/// How long a replica being promoted is watched for the role: enough to
/// beat the Sentinels' next `INFO` of it (every second during a failover);
/// a slower promotion is left to their own announcements.
const PROMOTION_WATCH: Duration = Duration::from_secs(2);

/// Whether the server on `conn` says `ROLE master`.
async fn role_is_master(conn: &mut MultiplexedConnection) -> RedisResult<bool> {
    let role = redis::cmd("ROLE").query_async::<Vec<Value>>(conn).await?;
    Ok(match role.first() {
        Some(Value::BulkString(role)) => role == b"master",
        Some(Value::SimpleString(role)) => role == "master",
        _ => false,
    })
}

/// The new primary's address in a Sentinel announcement about `master_name`:
/// `+switch-master <master name> <old ip> <old port> <new ip> <new port>`,
/// or `+promoted-slave slave <ip>:<port> <ip> <port> @ <master name> <master
/// ip> <master port>`. Anything else (another master, a malformed payload)
/// is `None`.
fn announced_primary(channel: &str, payload: &str, master_name: &str) -> Option<(String, u16)> {
    let words: Vec<&str> = payload.split(' ').collect();
    let (name, host, port) = match (channel, words.as_slice()) {
        ("+switch-master", [name, _, _, host, port]) => (*name, *host, *port),
        (
            "+promoted-slave" | "+failover-state-wait-promotion",
            ["slave", _, host, port, "@", name, _, _],
        ) => (*name, *host, *port),
        _ => return None,
    };
    if name != master_name {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

fn timed_out(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

impl bb8::ManageConnection for StandaloneConnector {
    type Connection = PooledConnection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let generation = self.generation.load(Ordering::Acquire);
        let conn = match &self.target {
            ConnectTarget::Server(client) => {
                client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await?
            }
            ConnectTarget::Sentinel(discovery) => discovery.connect_master(&self.config).await?,
        };
        Ok(PooledConnection {
            conn,
            broken: Arc::new(AtomicBool::new(false)),
            generation,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING").query_async::<()>(&mut conn.conn).await
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken.load(Ordering::Acquire)
            || conn.generation != self.generation.load(Ordering::Acquire)
    }
}

/// Sends bb8's background connection errors to `tracing` at debug level; the
/// breaker already reports outages once, at warn.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TracingErrorSink;

impl bb8::ErrorSink<redis::RedisError> for TracingErrorSink {
    fn sink(&self, error: redis::RedisError) {
        tracing::debug!(target: "tower_redis", %error, "background Redis connection attempt failed");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<redis::RedisError>> {
        Box::new(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::announced_primary;

    /// Each known command is named by itself, in any case; anything else
    /// (no name at all included) is `other`.
    #[test]
    fn a_command_is_named_by_its_own_name() {
        use super::{KNOWN_COMMANDS, OTHER, operation, operation_name};
        for (index, name) in KNOWN_COMMANDS.iter().enumerate() {
            for spelled in [name.to_string(), name.to_lowercase()] {
                let found = operation(&redis::cmd(&spelled));
                assert_eq!(found, index, "{spelled}");
                assert_eq!(operation_name(found), *name);
            }
        }
        for other in ["HSCAN", "GETEX", "HGE", "HGETALLX"] {
            assert_eq!(operation(&redis::cmd(other)), OTHER, "{other}");
        }
        assert_eq!(operation(&redis::Cmd::new()), OTHER);
        assert_eq!(operation_name(OTHER), "other");
    }

    /// The timing adds a few words to the request's future, not a second
    /// copy of it (each command's box was twice the request's size).
    #[cfg(feature = "metrics")]
    #[test]
    fn the_timed_request_is_boxed_once_at_about_its_own_size() {
        use std::future::Future;
        use std::pin::pin;
        use std::task::{Context, Poll, Waker};

        let request = async {
            let held = [7u8; 1024];
            tokio::task::yield_now().await;
            Ok::<_, redis::RedisError>(redis::Value::Int(i64::from(held[1023])))
        };
        let request_size = std::mem::size_of_val(&request);
        let timed = super::timed(|| 0, request, |_| false);
        let boxed = std::mem::size_of_val(&*timed);
        assert!(
            boxed <= request_size + 64,
            "the timed box is {boxed} bytes for a {request_size}-byte request"
        );
        // And it still answers what the request answered.
        let mut timed = pin!(timed);
        let mut context = Context::from_waker(Waker::noop());
        let answer = loop {
            if let Poll::Ready(answer) = timed.as_mut().poll(&mut context) {
                break answer;
            }
        };
        assert_eq!(answer.expect("answered"), redis::Value::Int(7));
    }

    #[test]
    fn sentinel_announcements_name_the_new_primary_of_this_master_only() {
        assert_eq!(
            announced_primary(
                "+switch-master",
                "mymaster 10.0.0.1 6379 10.0.0.2 6380",
                "mymaster"
            ),
            Some(("10.0.0.2".to_owned(), 6380))
        );
        assert_eq!(
            announced_primary(
                "+promoted-slave",
                "slave 10.0.0.2:6380 10.0.0.2 6380 @ mymaster 10.0.0.1 6379",
                "mymaster"
            ),
            Some(("10.0.0.2".to_owned(), 6380))
        );
        assert_eq!(
            announced_primary(
                "+failover-state-wait-promotion",
                "slave 10.0.0.2:6380 10.0.0.2 6380 @ mymaster 10.0.0.1 6379",
                "mymaster"
            ),
            Some(("10.0.0.2".to_owned(), 6380))
        );
        assert_eq!(
            announced_primary(
                "+switch-master",
                "other 10.0.0.1 6379 10.0.0.2 6380",
                "mymaster"
            ),
            None
        );
        assert_eq!(
            announced_primary("+switch-master", "mymaster 10.0.0.1", "mymaster"),
            None
        );
        assert_eq!(
            announced_primary("+switch-master", "mymaster a 1 b 99999", "mymaster"),
            None
        );
        assert_eq!(
            announced_primary("+sdown", "mymaster a 1 b 2", "mymaster"),
            None
        );
    }

    /// The replica that the leading Sentinel is promoting
    /// (`+failover-state-wait-promotion`) is used as soon as it says `ROLE
    /// master` itself, without waiting for the Sentinels to see it: a new
    /// pool generation, its address recorded, the recovery probe woken.
    /// While it is still a replica it is not used, and an aborted failover
    /// takes back what only the watch announced. Real servers: a primary
    /// and its replica, promoted with `REPLICAOF NO ONE`; no Sentinel is
    /// asked.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn a_replica_being_promoted_is_used_once_it_says_it_is_the_primary() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::Duration;

        use super::{SentinelDiscovery, lock};
        use crate::RedisConfig;
        use crate::config::Topology;
        use crate::testing::TestRedis;

        let primary = TestRedis::start().await;
        let replica = TestRedis::start().await;
        let port = |url: &str| -> u16 { url.rsplit(':').next().unwrap().parse().unwrap() };
        let (primary_port, replica_port) = (port(primary.url()), port(replica.url()));
        let mut conn = replica
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(primary_port)
            .query_async(&mut conn)
            .await
            .unwrap();

        // Sentinels that are never asked.
        let config = RedisConfig::builder()
            .sentinels(["127.0.0.1:1"], "mymaster")
            .build()
            .unwrap();
        let Topology::Sentinel(topology) = config.topology() else {
            panic!("a Sentinel topology");
        };
        let discovery = Arc::new(SentinelDiscovery::new(&config, topology).unwrap());
        let generation = Arc::new(AtomicU64::new(0));
        let switched = discovery.switched();
        let address = ("127.0.0.1".to_owned(), replica_port);
        let watcher = tokio::spawn(SentinelDiscovery::watch_promotion(
            Arc::downgrade(&discovery),
            address.clone(),
            Arc::clone(&generation),
        ));
        // A second announcement while one is watched starts nothing.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !discovery.watching.load(Ordering::Acquire) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first watcher starts");
        tokio::time::timeout(
            Duration::from_secs(1),
            SentinelDiscovery::watch_promotion(
                Arc::downgrade(&discovery),
                address.clone(),
                Arc::clone(&generation),
            ),
        )
        .await
        .expect("returns at once");

        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(generation.load(Ordering::Acquire), 0, "still a replica");
        assert_eq!(*lock(&discovery.announced), None);

        let notified = switched.notified();
        let () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut conn)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), notified)
            .await
            .expect("the recovery probe is woken once the replica is the primary");
        assert_eq!(
            generation.load(Ordering::Acquire),
            1,
            "a new pool generation"
        );
        assert_eq!(*lock(&discovery.announced), Some(address.clone()));
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watcher ends")
            .unwrap();

        // Once a Sentinel announces it too, it is no longer provisional: an
        // abort leaves it.
        assert!(!discovery.announce(address.clone()), "already the primary");
        discovery.aborted(&generation);
        assert_eq!(*lock(&discovery.announced), Some(address.clone()));
        assert_eq!(generation.load(Ordering::Acquire), 1);

        // Announced by the watch alone, an aborted failover takes it back.
        tokio::time::timeout(
            Duration::from_secs(10),
            SentinelDiscovery::watch_promotion(
                Arc::downgrade(&discovery),
                address.clone(),
                Arc::clone(&generation),
            ),
        )
        .await
        .expect("the watch ends");
        assert_eq!(generation.load(Ordering::Acquire), 2);
        discovery.aborted(&generation);
        assert_eq!(*lock(&discovery.announced), None);
        assert_eq!(generation.load(Ordering::Acquire), 3);
    }
}
