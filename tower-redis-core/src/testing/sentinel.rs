//! [`TestSentinel`]: a primary, a replica and three Sentinels, all
//! `redis-server` processes on free ports, with a real failover on demand.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::process::{ServerProcess, free_port};
use super::{TestRedisError, redis_server_binary};
use crate::RedisConfigBuilder;

/// The name the Sentinels monitor the primary under.
const MASTER_NAME: &str = "mymaster";
/// Sentinel's `down-after-milliseconds`: how long the primary must be
/// silent before a Sentinel thinks it is down.
const DOWN_AFTER: Duration = Duration::from_millis(1000);
/// Sentinel's `failover-timeout`.
const FAILOVER_TIMEOUT: Duration = Duration::from_millis(5000);
/// How long startup (replication, Sentinels finding each other) may take.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a failover may take to show in every Sentinel.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

/// One primary, one replica (`--replicaof`) and three Sentinels (quorum 2),
/// each a child process killed when this handle drops.
///
/// ```no_run
/// use tower_redis_core::{RedisManager, testing::TestSentinel};
///
/// # async fn demo() {
/// let sentinel = TestSentinel::start().await;
/// let manager = RedisManager::connect(sentinel.config().build().unwrap()).await.unwrap();
/// let old = sentinel.primary_port().await;
/// sentinel.failover().await;          // SIGKILL the primary, wait for promotion
/// assert_ne!(sentinel.primary_port().await, old);
/// # drop(manager);
/// # }
/// ```
pub struct TestSentinel {
    /// The two data nodes; either may be the primary.
    nodes: Vec<ServerProcess>,
    sentinels: Vec<SentinelProcess>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestSentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestSentinel")
            .field("nodes", &self.node_ports())
            .field(
                "sentinels",
                &self.sentinels.iter().map(|s| s.port).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TestSentinel {
    /// The name the Sentinels monitor the primary under.
    pub const MASTER_NAME: &'static str = MASTER_NAME;
    /// Sentinel's `down-after-milliseconds` here (1 s).
    pub const DOWN_AFTER: Duration = DOWN_AFTER;

    /// Starts everything, or panics with a message that says what is missing.
    pub async fn start() -> Self {
        match Self::try_start().await {
            Ok(sentinel) => sentinel,
            Err(error) => panic!("{error}"),
        }
    }

    /// Starts the primary, the replica and the Sentinels, and waits until
    /// the replica is in sync and every Sentinel knows the replica and the
    /// two other Sentinels (without that, no failover can be agreed).
    pub async fn try_start() -> Result<Self, TestRedisError> {
        let binary = redis_server_binary().ok_or(TestRedisError::NoBackend)?;
        let dir = tempfile::Builder::new()
            .prefix("tower-redis-sentinel-")
            .tempdir()
            .map_err(|e| TestRedisError::Spawn(format!("temporary directory: {e}")))?;
        let primary = spawn_node(&binary, &dir.path().join("node0"), Vec::new()).await?;
        let replica_args = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary.port().to_string(),
        ];
        let replica = spawn_node(&binary, &dir.path().join("node1"), replica_args).await?;
        let mut sentinels = Vec::with_capacity(3);
        for index in 0..3 {
            let sentinel_dir = dir.path().join(format!("sentinel{index}"));
            sentinels.push(SentinelProcess::spawn(&binary, &sentinel_dir, primary.port()).await?);
        }
        let this = Self {
            nodes: vec![primary, replica],
            sentinels,
            _dir: dir,
        };
        this.wait_until_ready().await?;
        Ok(this)
    }

    /// A configuration that finds the primary through the three Sentinels,
    /// with a fast recovery probe.
    pub fn config(&self) -> RedisConfigBuilder {
        crate::RedisConfig::builder()
            .sentinels(self.sentinel_addresses(), MASTER_NAME)
            .probe_backoff(Duration::from_millis(20), Duration::from_millis(200))
    }

    /// The Sentinels as `127.0.0.1:<port>`.
    pub fn sentinel_addresses(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The ports of the two data nodes (the first started as the primary).
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(ServerProcess::port).collect()
    }

    /// A direct client of the data node on `port`, bypassing Sentinel.
    pub fn node_client(&self, port: u16) -> redis::Client {
        match redis::Client::open(format!("redis://127.0.0.1:{port}")) {
            Ok(client) => client,
            Err(error) => panic!("node URL is invalid: {error}"),
        }
    }

    /// The primary's port as the first Sentinel that answers names it.
    pub async fn primary_port(&self) -> u16 {
        for sentinel in &self.sentinels {
            if let Ok(port) = sentinel.master_port().await {
                return port;
            }
        }
        panic!("no Sentinel names the primary")
    }

    /// The role (`master` / `slave`) the data node on `port` reports.
    pub async fn role(&self, port: u16) -> Result<String, TestRedisError> {
        let mut conn = self
            .node_client(port)
            .get_multiplexed_async_connection()
            .await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        Ok(match role.first() {
            Some(redis::Value::BulkString(role)) => String::from_utf8_lossy(role).into_owned(),
            Some(redis::Value::SimpleString(role)) => role.clone(),
            other => format!("{other:?}"),
        })
    }

    /// SIGKILLs the current primary and waits until every Sentinel names the
    /// replica and the replica reports itself primary. Returns the killed
    /// node's port.
    pub async fn failover(&self) -> u16 {
        let old = self.kill_primary().await;
        self.wait_for_promotion(old).await;
        old
    }

    /// SIGKILLs the current primary, without waiting; returns its port.
    pub async fn kill_primary(&self) -> u16 {
        let old = self.primary_port().await;
        if let Some(node) = self.nodes.iter().find(|n| n.port() == old) {
            node.kill();
        }
        old
    }

    /// `SENTINEL FAILOVER` while the primary is alive, then waits until
    /// every Sentinel names the replica, the replica reports itself primary
    /// and the old primary reports itself a replica (demoted). Returns the
    /// old primary's port.
    pub async fn force_failover(&self) -> u16 {
        let deadline = Instant::now() + FAILOVER_DEADLINE;
        let old = self.start_failover().await;
        self.wait_for_promotion(old).await;
        let demoted = async {
            while self.role(old).await.ok().as_deref() != Some("slave") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout_at(deadline, demoted).await.is_err() {
            panic!("the old primary on port {old} was not demoted within {FAILOVER_DEADLINE:?}");
        }
        old
    }

    /// Sends `SENTINEL FAILOVER` (asking again while a Sentinel refuses,
    /// within a deadline) and returns the old primary's port at once,
    /// without waiting for the promotion.
    pub async fn start_failover(&self) -> u16 {
        let old = self.primary_port().await;
        let deadline = Instant::now() + FAILOVER_DEADLINE;
        // A Sentinel refuses while it still thinks a failover is under way
        // (NOGOODSLAVE / INPROG right after start): ask again.
        loop {
            match self.sentinels[0].failover().await {
                Ok(()) => return old,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "SENTINEL FAILOVER kept failing: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Waits until every Sentinel names a primary other than `old`, and
    /// that node reports itself primary.
    pub async fn wait_for_promotion(&self, old: u16) {
        let promoted = async {
            loop {
                let mut named = Vec::with_capacity(self.sentinels.len());
                for sentinel in &self.sentinels {
                    named.push(sentinel.master_port().await.ok());
                }
                if let Some(Some(new)) = named.first().copied()
                    && new != old
                    && named.iter().all(|port| *port == Some(new))
                    && self.role(new).await.ok().as_deref() == Some("master")
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(FAILOVER_DEADLINE, promoted)
            .await
            .is_err()
        {
            panic!(
                "the Sentinels did not promote a new primary within {FAILOVER_DEADLINE:?} \
                 (old primary on port {old})"
            );
        }
    }

    /// Starts recording every Sentinel's events (`PSUBSCRIBE *`: `+sdown`,
    /// `+odown`, `+promoted-slave`, `+switch-master`, …) with the time each
    /// arrived, for a failover's timeline. Recording stops when the handle
    /// drops.
    pub async fn record_events(&self) -> SentinelEvents {
        let events = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::with_capacity(self.sentinels.len());
        for sentinel in &self.sentinels {
            let subscribe = async {
                let mut pubsub = sentinel.client.get_async_pubsub().await?;
                pubsub.psubscribe("*").await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = match tokio::time::timeout(Duration::from_secs(5), subscribe).await {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(error)) => panic!("Sentinel {} refused PSUBSCRIBE: {error}", sentinel.port),
                Err(_) => panic!("Sentinel {} did not answer PSUBSCRIBE", sentinel.port),
            };
            let events = std::sync::Arc::clone(&events);
            let port = sentinel.port;
            tasks.push(tokio::spawn(async move {
                let mut messages = pubsub.into_on_message();
                while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                    let payload: String = message.get_payload().unwrap_or_default();
                    let line = format!("sentinel {port}: {} {payload}", message.get_channel_name());
                    events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), line));
                }
            }));
        }
        SentinelEvents { events, tasks }
    }

    async fn wait_until_ready(&self) -> Result<(), TestRedisError> {
        let replica = self.nodes[1].port();
        let ready = async {
            loop {
                if self.replica_in_sync(replica).await && self.sentinels_know_each_other().await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(START_DEADLINE, ready)
            .await
            .map_err(|_| {
                TestRedisError::Spawn(format!(
                    "the replica and Sentinels were not ready within {START_DEADLINE:?}"
                ))
            })
    }

    async fn replica_in_sync(&self, port: u16) -> bool {
        let info = async {
            let mut conn = self
                .node_client(port)
                .get_multiplexed_async_connection()
                .await?;
            redis::cmd("INFO")
                .arg("replication")
                .query_async::<String>(&mut conn)
                .await
        };
        info.await
            .is_ok_and(|info| info.contains("master_link_status:up"))
    }

    async fn sentinels_know_each_other(&self) -> bool {
        for sentinel in &self.sentinels {
            let known = async {
                let mut conn = sentinel.connection().await?;
                let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(MASTER_NAME)
                    .query_async(&mut conn)
                    .await?;
                let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("SENTINELS")
                    .arg(MASTER_NAME)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>(replicas.len() == 1 && others.len() == 2)
            };
            if !matches!(known.await, Ok(true)) {
                return false;
            }
        }
        true
    }
}

/// The Sentinels' events as they arrive; see [`TestSentinel::record_events`].
pub struct SentinelEvents {
    events: std::sync::Arc<Mutex<Vec<(Instant, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for SentinelEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelEvents")
            .field(
                "recorded",
                &self.events.lock().map(|e| e.len()).unwrap_or(0),
            )
            .finish()
    }
}

impl SentinelEvents {
    /// Each event recorded so far, with its time after `since` (events
    /// before `since` are left out).
    pub fn since(&self, since: Instant) -> Vec<(Duration, String)> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(at, line)| (at.duration_since(since), line.clone()))
            .collect()
    }

    /// When the first event whose line contains `needle` arrived, after `since`.
    pub fn first(&self, since: Instant, needle: &str) -> Option<Duration> {
        self.since(since)
            .into_iter()
            .find(|(_, line)| line.contains(needle))
            .map(|(at, _)| at)
    }
}

impl Drop for SentinelEvents {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn spawn_node(
    binary: &Path,
    dir: &Path,
    args: Vec<String>,
) -> Result<ServerProcess, TestRedisError> {
    std::fs::create_dir_all(dir).map_err(|e| TestRedisError::Spawn(e.to_string()))?;
    let mut attempt = 0;
    loop {
        let port = free_port(false)?;
        match ServerProcess::spawn(binary.to_owned(), dir.to_owned(), port, args.clone(), false)
            .await
        {
            Ok(node) => return Ok(node),
            Err(TestRedisError::Exited { .. }) if attempt < 4 => attempt += 1,
            Err(error) => return Err(error),
        }
    }
}

/// A `redis-server <conf> --sentinel` child process.
struct SentinelProcess {
    port: u16,
    child: Mutex<Option<Child>>,
    client: redis::Client,
}

impl SentinelProcess {
    async fn spawn(binary: &Path, dir: &Path, primary: u16) -> Result<Self, TestRedisError> {
        std::fs::create_dir_all(dir).map_err(|e| TestRedisError::Spawn(e.to_string()))?;
        let mut attempt = 0;
        loop {
            let port = free_port(false)?;
            match Self::try_spawn(binary, dir, primary, port).await {
                Ok(sentinel) => return Ok(sentinel),
                Err(_) if attempt < 4 => attempt += 1,
                Err(error) => return Err(error),
            }
        }
    }

    async fn try_spawn(
        binary: &Path,
        dir: &Path,
        primary: u16,
        port: u16,
    ) -> Result<Self, TestRedisError> {
        let conf = dir.join("sentinel.conf");
        let log: PathBuf = dir.join("sentinel.log");
        let text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n\
             dir \"{dir}\"\nlogfile \"{log}\"\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} {down}\n\
             sentinel failover-timeout {MASTER_NAME} {failover}\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            dir = dir.display(),
            log = log.display(),
            down = DOWN_AFTER.as_millis(),
            failover = FAILOVER_TIMEOUT.as_millis(),
        );
        std::fs::write(&conf, text).map_err(|e| TestRedisError::Spawn(e.to_string()))?;
        let child = Command::new(binary)
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TestRedisError::Spawn(format!("{}: {e}", binary.display())))?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let this = Self {
            port,
            child: Mutex::new(Some(child)),
            client,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(mut conn) = this.connection().await
                && redis::cmd("PING")
                    .query_async::<()>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(this);
            }
            let exited = this
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(TestRedisError::Exited {
                    port,
                    status: status.to_string(),
                    log: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            if Instant::now() > deadline {
                return Err(TestRedisError::NotReady { port });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
        let connect = self.client.get_multiplexed_async_connection();
        tokio::time::timeout(Duration::from_secs(2), connect)
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "Sentinel did not answer",
                ))
            })?
    }

    async fn master_port(&self) -> Result<u16, redis::RedisError> {
        let mut conn = self.connection().await?;
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER_NAME)
            .query_async(&mut conn)
            .await?;
        Ok(port)
    }

    async fn failover(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.connection().await?;
        redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(MASTER_NAME)
            .query_async(&mut conn)
            .await
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let taken = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut child) = taken {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
