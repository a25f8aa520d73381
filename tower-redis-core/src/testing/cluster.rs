//! A three-master Redis Cluster of `redis-server` processes, optionally
//! with replicas that take over when a primary dies.

use std::time::Duration;

use super::process::{ServerProcess, find_binary, free_port};
use super::{TestRedisError, redis_server_binary};
use crate::RedisConfigBuilder;

/// How long the cluster may take to agree on its slots after creation or a restart.
const CLUSTER_OK_DEADLINE: Duration = Duration::from_secs(30);

/// `cluster-node-timeout` with replicas: how long a primary must be
/// unreachable before its replica takes over.
const REPLICA_NODE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a promotion may take after a primary dies.
const PROMOTION_DEADLINE: Duration = Duration::from_secs(30);

/// A real Redis Cluster with three masters, each a `redis-server` process
/// that can be killed and restarted (it rejoins from the `nodes.conf` kept
/// in its directory). [`start`](Self::start) builds it without replicas;
/// [`with_replicas`](Self::with_replicas) gives each primary replicas, so
/// that [`kill_primary`](Self::kill_primary) makes a real cluster failover.
///
/// ```no_run
/// use tower_redis_core::testing::TestCluster;
///
/// # async fn demo() {
/// let cluster = TestCluster::with_replicas(1).await; // 3 primaries + 3 replicas
/// let killed = cluster.kill_primary(0).await;        // the primary of slot 0
/// let promoted = cluster.wait_for_promotion(0, killed).await;
/// assert_ne!(promoted, killed);
/// # }
/// ```
pub struct TestCluster {
    nodes: Vec<ServerProcess>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("urls", &self.urls())
            .finish()
    }
}

impl TestCluster {
    /// Starts the cluster, or panics with a message that says what is missing.
    pub async fn start() -> Self {
        match Self::try_start().await {
            Ok(cluster) => cluster,
            Err(error) => panic!("{error}"),
        }
    }

    /// Starts three masters, joins them with `redis-cli --cluster create`
    /// and waits for `cluster_state:ok` on every node.
    pub async fn try_start() -> Result<Self, TestRedisError> {
        Self::try_start_with(0).await
    }

    /// Starts three primaries with `replicas` replicas each
    /// (`cluster-node-timeout` 1000 ms), or panics with a message that says
    /// what is missing. Nodes are indexed primaries first, as created.
    pub async fn with_replicas(replicas: usize) -> Self {
        match Self::try_start_with(replicas).await {
            Ok(cluster) => cluster,
            Err(error) => panic!("{error}"),
        }
    }

    /// Like [`with_replicas`](Self::with_replicas), with the error returned.
    /// It also waits until every replica's link to its primary is up, so a
    /// primary killed at once has a replica ready to take over.
    pub async fn try_start_with(replicas: usize) -> Result<Self, TestRedisError> {
        let node_timeout = if replicas == 0 {
            Duration::from_millis(2000)
        } else {
            REPLICA_NODE_TIMEOUT
        };
        Self::try_start_timed(replicas, node_timeout).await
    }

    /// Three primaries without replicas whose `cluster-node-timeout` is
    /// `node_timeout`, or panics with a message that says what is missing.
    /// [`start`](Self::start)'s is 2 s: a node paused for longer is
    /// marked failed, and the others then refuse every key. A long node
    /// timeout lets a test hang a node for longer with the rest of the
    /// cluster serving.
    pub async fn with_node_timeout(node_timeout: Duration) -> Self {
        match Self::try_start_timed(0, node_timeout).await {
            Ok(cluster) => cluster,
            Err(error) => panic!("{error}"),
        }
    }

    async fn try_start_timed(
        replicas: usize,
        node_timeout: Duration,
    ) -> Result<Self, TestRedisError> {
        let server = redis_server_binary().ok_or(TestRedisError::NoBackend)?;
        let cli = find_binary("redis-cli").ok_or_else(|| {
            TestRedisError::Cluster(
                "redis-cli not found; install it (Debian/Ubuntu: `apt-get install redis-tools`)"
                    .to_owned(),
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("tower-redis-cluster-")
            .tempdir()
            .map_err(|e| TestRedisError::Spawn(format!("temporary directory: {e}")))?;
        let count = 3 * (1 + replicas);
        let mut nodes = Vec::with_capacity(count);
        for index in 0..count {
            let node_dir = dir.path().join(format!("node{index}"));
            std::fs::create_dir_all(&node_dir).map_err(|e| TestRedisError::Spawn(e.to_string()))?;
            let mut attempt = 0;
            let node = loop {
                let port = free_port(true)?;
                let args = vec![
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-config-file".to_owned(),
                    "nodes.conf".to_owned(),
                    "--cluster-node-timeout".to_owned(),
                    node_timeout.as_millis().to_string(),
                ];
                match ServerProcess::spawn(server.clone(), node_dir.clone(), port, args, false)
                    .await
                {
                    Ok(node) => break node,
                    Err(error @ TestRedisError::Exited { .. }) if attempt < 4 => {
                        attempt += 1;
                        let _ = error;
                    }
                    Err(error) => return Err(error),
                }
            };
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = tokio::process::Command::new(cli)
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .map_err(|e| TestRedisError::Cluster(format!("redis-cli: {e}")))?;
        if !output.status.success() {
            return Err(TestRedisError::Cluster(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let cluster = Self { nodes, _dir: dir };
        cluster.wait_until_ok().await?;
        if replicas > 0 {
            cluster.wait_for_replicas(3 * replicas).await?;
        }
        Ok(cluster)
    }

    /// The node URLs, `redis://127.0.0.1:<port>`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port()))
            .collect()
    }

    /// A cluster configuration for these nodes with a fast recovery probe.
    pub fn config(&self) -> RedisConfigBuilder {
        crate::RedisConfig::builder()
            .cluster_nodes(self.urls())
            .probe_backoff(Duration::from_millis(20), Duration::from_millis(200))
    }

    /// A direct cluster client, bypassing the manager.
    pub fn client(&self) -> redis::cluster::ClusterClient {
        match redis::cluster::ClusterClient::new(self.urls()) {
            Ok(client) => client,
            Err(error) => panic!("test cluster URLs are invalid: {error}"),
        }
    }

    /// The number of nodes: 3, or 3 × (1 + replicas).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The indexes of the live nodes that are replicas now (`ROLE`).
    pub async fn replicas(&self) -> Vec<usize> {
        let mut replicas = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            if node.is_running() && node_role(node.port()).await.as_deref() == Some("slave") {
                replicas.push(index);
            }
        }
        replicas
    }

    /// Calls per command on one node since its last
    /// [`reset_stats`](Self::reset_stats), from `INFO commandstats`
    /// (lower-case names such as `hmget`, `evalsha_ro`); empty for a node
    /// that does not answer.
    pub async fn command_calls(&self, index: usize) -> std::collections::HashMap<String, u64> {
        let ask = async {
            let mut conn = node_connection(self.node(index).port()).await?;
            redis::cmd("INFO")
                .arg("commandstats")
                .query_async::<String>(&mut conn)
                .await
        };
        match tokio::time::timeout(Duration::from_secs(1), ask).await {
            Ok(Ok(info)) => super::parse_commandstats(&info),
            _ => std::collections::HashMap::new(),
        }
    }

    /// `CONFIG RESETSTAT` on every live node.
    pub async fn reset_stats(&self) {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let reset = async {
                let mut conn = node_connection(node.port()).await?;
                redis::cmd("CONFIG")
                    .arg("RESETSTAT")
                    .query_async::<()>(&mut conn)
                    .await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), reset).await;
        }
    }

    /// `CONFIG SET name value` on every live node, or panics with the
    /// node's error.
    pub async fn config_set(&self, name: &str, value: &str) {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let set = async {
                let mut conn = node_connection(node.port()).await?;
                redis::cmd("CONFIG")
                    .arg("SET")
                    .arg(name)
                    .arg(value)
                    .query_async::<()>(&mut conn)
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(5), set).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    panic!("CONFIG SET {name} {value} on port {}: {error}", node.port())
                }
                Err(_) => panic!(
                    "CONFIG SET {name} {value} on port {}: no answer within 5 s",
                    node.port()
                ),
            }
        }
    }

    /// SIGKILL one node.
    pub async fn kill_node(&self, index: usize) {
        self.node(index).kill();
    }

    /// SIGSTOP one node.
    pub async fn pause_node(&self, index: usize) {
        self.node(index).pause();
    }

    /// SIGCONT one node.
    pub async fn resume_node(&self, index: usize) {
        self.node(index).resume();
    }

    /// Starts a stopped node again on its port and waits until the cluster
    /// is whole again. Panics if it cannot.
    pub async fn restart_node(&self, index: usize) {
        let node = self.node(index);
        node.stop();
        if let Err(error) = node.start().await {
            panic!("cannot restart cluster node {index}: {error}");
        }
        if let Err(error) = self.wait_until_ok().await {
            panic!("cluster did not recover after restarting node {index}: {error}");
        }
    }

    /// The index of the node that serves `slot` as primary now, as a live
    /// node's `CLUSTER SLOTS` says.
    pub async fn primary_of(&self, slot: u16) -> usize {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            if let Ok(Some(port)) = slot_owner(node.port(), slot).await
                && let Some(index) = self.nodes.iter().position(|n| n.port() == port)
            {
                return index;
            }
        }
        panic!("no live node names the primary of slot {slot}")
    }

    /// The slot of `key` (`CLUSTER KEYSLOT` on a live node; a `{tag}`
    /// counts as the whole key).
    pub async fn slot_of(&self, key: &str) -> u16 {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let ask = async {
                let mut conn = node_connection(node.port()).await?;
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query_async::<u16>(&mut conn)
                    .await
            };
            if let Ok(Ok(slot)) = tokio::time::timeout(Duration::from_secs(1), ask).await {
                return slot;
            }
        }
        panic!("no live node answers CLUSTER KEYSLOT")
    }

    /// SIGKILLs the primary of `slot` without waiting; returns its index.
    pub async fn kill_primary(&self, slot: u16) -> usize {
        let index = self.primary_of(slot).await;
        self.node(index).kill();
        index
    }

    /// [`kill_primary`](Self::kill_primary), then
    /// [`wait_for_promotion`](Self::wait_for_promotion): returns the killed
    /// and the promoted node's indexes.
    pub async fn failover(&self, slot: u16) -> (usize, usize) {
        let killed = self.kill_primary(slot).await;
        (killed, self.wait_for_promotion(slot, killed).await)
    }

    /// Waits until every live node names a node other than `killed` as the
    /// primary of `slot`, that node says `ROLE master`, and every live node
    /// reports `cluster_state:ok`. Returns the new primary's index; panics
    /// after a generous deadline.
    pub async fn wait_for_promotion(&self, slot: u16, killed: usize) -> usize {
        let killed_port = self.node(killed).port();
        let promoted = async {
            loop {
                if let Some(port) = self.agreed_owner(slot).await
                    && port != killed_port
                    && node_role(port).await.as_deref() == Some("master")
                    && self.live_nodes_ok().await
                    && let Some(index) = self.nodes.iter().position(|n| n.port() == port)
                {
                    return index;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        match tokio::time::timeout(PROMOTION_DEADLINE, promoted).await {
            Ok(index) => index,
            Err(_) => panic!(
                "no replica took over slot {slot} within {PROMOTION_DEADLINE:?} after node \
                 {killed} (port {killed_port}) was killed"
            ),
        }
    }

    /// The owner of `slot` when every live node names the same one.
    async fn agreed_owner(&self, slot: u16) -> Option<u16> {
        let mut agreed = None;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let owner = slot_owner(node.port(), slot).await.ok().flatten()?;
            if agreed.is_some_and(|port| port != owner) {
                return None;
            }
            agreed = Some(owner);
        }
        agreed
    }

    async fn live_nodes_ok(&self) -> bool {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            if !node_reports_ok(&format!("redis://127.0.0.1:{}", node.port())).await {
                return false;
            }
        }
        true
    }

    /// Waits until `expected` nodes are replicas with their link up.
    async fn wait_for_replicas(&self, expected: usize) -> Result<(), TestRedisError> {
        let deadline = tokio::time::Instant::now() + CLUSTER_OK_DEADLINE;
        loop {
            let mut synced = 0;
            for node in &self.nodes {
                if replica_link_up(node.port()).await {
                    synced += 1;
                }
            }
            // And every node's `CLUSTER SLOTS` names them (gossip lags the
            // replication link): a client reading from replicas takes its
            // slot map from one node, once.
            let per_primary = expected / 3;
            let mut listed = true;
            for node in &self.nodes {
                if !slots_list_replicas(node.port(), per_primary).await {
                    listed = false;
                    break;
                }
            }
            if synced >= expected && listed {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(TestRedisError::Cluster(format!(
                    "{synced} of {expected} replicas in sync after {CLUSTER_OK_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn node(&self, index: usize) -> &ServerProcess {
        match self.nodes.get(index) {
            Some(node) => node,
            None => panic!(
                "the test cluster has {} nodes, not {}",
                self.nodes.len(),
                index + 1
            ),
        }
    }

    async fn wait_until_ok(&self) -> Result<(), TestRedisError> {
        let deadline = tokio::time::Instant::now() + CLUSTER_OK_DEADLINE;
        loop {
            let mut all_ok = true;
            for url in self.urls() {
                if !node_reports_ok(&url).await {
                    all_ok = false;
                    break;
                }
            }
            if all_ok {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(TestRedisError::Cluster(format!(
                    "cluster_state did not become ok within {CLUSTER_OK_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn node_connection(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    client.get_multiplexed_async_connection().await
}

/// The port of the primary serving `slot`, from the node on `port`'s
/// `CLUSTER SLOTS` (`[[start, end, [ip, port, id, …], replicas…], …]`).
async fn slot_owner(port: u16, slot: u16) -> redis::RedisResult<Option<u16>> {
    let ask = async {
        let mut conn = node_connection(port).await?;
        let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        for range in ranges {
            let (Some(start), Some(end), Some(primary)) =
                (range.first(), range.get(1), range.get(2))
            else {
                continue;
            };
            let start: u16 = redis::from_redis_value_ref(start)?;
            let end: u16 = redis::from_redis_value_ref(end)?;
            if (start..=end).contains(&slot) {
                let primary: Vec<redis::Value> = redis::from_redis_value_ref(primary)?;
                let port = primary
                    .get(1)
                    .map(redis::from_redis_value_ref)
                    .transpose()?;
                return Ok(port);
            }
        }
        Ok(None)
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer to CLUSTER SLOTS",
            )))
        })
}

/// Whether every slot range in the `CLUSTER SLOTS` of the node at `port`
/// lists at least `replicas` replicas after its primary.
async fn slots_list_replicas(port: u16, replicas: usize) -> bool {
    let ask = async {
        let mut conn = node_connection(port).await?;
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<Vec<redis::Value>>>(&mut conn)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(1), ask).await {
        // Start, end, primary, then the replicas.
        Ok(Ok(ranges)) => !ranges.is_empty() && ranges.iter().all(|r| r.len() >= 3 + replicas),
        _ => false,
    }
}

/// `ROLE`'s first word on the node at `port`.
async fn node_role(port: u16) -> Option<String> {
    let ask = async {
        let mut conn = node_connection(port).await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        let role: String = redis::from_redis_value_ref(role.first().unwrap_or(&redis::Value::Nil))?;
        Ok::<_, redis::RedisError>(role)
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()?
        .ok()
}

/// Whether the node at `port` is a replica whose link to its primary is up.
async fn replica_link_up(port: u16) -> bool {
    let ask = async {
        let mut conn = node_connection(port).await?;
        redis::cmd("INFO")
            .arg("replication")
            .query_async::<String>(&mut conn)
            .await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ask).await,
        Ok(Ok(info)) if info.contains("role:slave") && info.contains("master_link_status:up")
    )
}

async fn node_reports_ok(url: &str) -> bool {
    let check = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await?;
        Ok::<_, redis::RedisError>(
            info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384"),
        )
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Ok(true))
    )
}
