//! A three-master Redis Cluster of `redis-server` processes.

use std::time::Duration;

use super::process::{ServerProcess, find_binary, free_port};
use super::{TestRedisError, redis_server_binary};
use crate::RedisConfigBuilder;

/// How long the cluster may take to agree on its slots after creation or a restart.
const CLUSTER_OK_DEADLINE: Duration = Duration::from_secs(30);

/// A real Redis Cluster with three masters and no replicas, each a
/// `redis-server` process that can be killed and restarted (it rejoins with
/// its slots, from the `nodes.conf` kept in its directory).
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
        let mut nodes = Vec::with_capacity(3);
        for index in 0..3 {
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
                    "2000".to_owned(),
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
            .args(["--cluster-replicas", "0", "--cluster-yes"])
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

    /// The number of nodes (3).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
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
