//! The manager against a real three-master Redis Cluster.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_redis_core::redis::{self, Script};
use tower_redis_core::testing::TestCluster;
use tower_redis_core::{BreakerState, Health, RedisManager, Source};

async fn slot_of(cluster: &TestCluster, key: &str) -> u16 {
    let mut conn = cluster
        .client()
        .get_async_connection()
        .await
        .expect("cluster connection");
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("KEYSLOT")
}

#[tokio::test]
async fn commands_reach_keys_in_different_slots_and_nodes() {
    let cluster = TestCluster::start().await;
    let manager = RedisManager::connect(cluster.config().build().expect("valid"))
        .await
        .expect("starts");
    assert_eq!(manager.health().state, BreakerState::Closed);

    let keys: Vec<String> = (0..30)
        .map(|i| manager.keys().key(&["k", &i.to_string()]))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        manager
            .query::<()>(redis::cmd("SET").arg(key).arg(i))
            .await
            .expect("SET");
    }
    for (i, key) in keys.iter().enumerate() {
        let value: usize = manager
            .query(redis::cmd("GET").arg(key))
            .await
            .expect("GET");
        assert_eq!(value, i);
    }
    let mut slots = HashSet::new();
    for key in &keys {
        slots.insert(slot_of(&cluster, key).await / (16384 / 3 + 1));
    }
    assert_eq!(slots.len(), 3, "the keys must span all three masters");
}

#[tokio::test]
async fn a_multi_key_script_on_hash_tagged_keys_runs_in_one_slot() {
    let cluster = TestCluster::start().await;
    let manager = RedisManager::connect(cluster.config().build().expect("valid"))
        .await
        .expect("starts");
    let a = manager.keys().tagged("user:7", &["a"]);
    let b = manager.keys().tagged("user:7", &["b"]);
    assert_eq!(slot_of(&cluster, &a).await, slot_of(&cluster, &b).await);

    let script = Script::new(
        "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return redis.call('GET', KEYS[2])",
    );
    let value: String = manager
        .invoke_script(script.key(&a).key(&b).arg("both"))
        .await
        .expect("same-slot script");
    assert_eq!(value, "both");
}

#[tokio::test]
async fn a_killed_node_falls_back_and_recovers_after_restart() {
    let cluster = TestCluster::start().await;
    let config = cluster
        .config()
        .command_timeout(Duration::from_millis(300))
        .failure_threshold(2)
        .build()
        .expect("valid");
    let manager = RedisManager::connect(config).await.expect("starts");
    let keys: Vec<String> = (0..12)
        .map(|i| manager.keys().key(&["n", &i.to_string()]))
        .collect();

    cluster.kill_node(1).await;
    let mut fallbacks = 0;
    for key in keys.iter().cycle().take(36) {
        if timed_incr(&manager, key).await.0 != Source::Redis {
            fallbacks += 1;
        }
    }
    assert!(fallbacks > 0, "keys on the dead node must fall back");

    cluster.restart_node(1).await;
    let mut rx = manager.subscribe();
    let closed = tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| *s == BreakerState::Closed),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "health: {:?}",
        manager.health()
    );
    for key in &keys {
        assert_eq!(
            timed_incr(&manager, key).await.0,
            Source::Redis,
            "{key}: health {:?}",
            manager.health()
        );
    }
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// What was written so far.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// The log of this thread (debug level and above) until the guard drops.
fn capture_log() -> (Capture, tracing::subscriber::DefaultGuard) {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    (
        capture,
        tower_redis_core::testing::install_subscriber(subscriber),
    )
}

/// Tracking (0-round-trip session reads, the cache's near tier) is off on a
/// cluster; a user who counted on it reads why in the log, once, not twice.
#[tokio::test]
async fn tracking_off_on_a_cluster_is_logged_once() {
    let cluster = TestCluster::start().await;
    let manager = RedisManager::connect(cluster.config().build().expect("valid"))
        .await
        .expect("starts");
    let (capture, guard) = capture_log();
    assert!(manager.tracking().is_none());
    assert!(manager.clone().tracking().is_none());
    drop(guard);
    let log = capture.text();
    assert_eq!(
        log.matches("client tracking is off on a Redis Cluster")
            .count(),
        1,
        "{log}"
    );
}

/// The tests that hang a node under load run one at a time: their
/// assertions are about timeouts, which another test's cluster starting on
/// the same (two-core) machine could add.
static HANGS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One `INCR` of `key` through the manager: its source and how long it took.
async fn timed_incr(manager: &RedisManager, key: &str) -> (Source, Duration) {
    let started = std::time::Instant::now();
    let served = manager
        .failover(
            |mut conn| async move {
                redis::cmd("INCR")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
            },
            |_| async { -1 },
        )
        .await;
    (served.source, started.elapsed())
}

/// A key of `manager`'s whose slot's primary is (`on`) or is not (`!on`)
/// node `node`.
async fn key_on(cluster: &TestCluster, manager: &RedisManager, node: usize, on: bool) -> String {
    for i in 0..200 {
        let key = manager.keys().key(&["slot", &i.to_string()]);
        let owner = cluster.primary_of(cluster.slot_of(&key).await).await;
        if (owner == node) == on {
            return key;
        }
    }
    panic!("no key found {} node {node}", if on { "on" } else { "off" })
}

/// A key on node `node` and one elsewhere, each answered by Redis once.
async fn keys_on_and_off(
    cluster: &TestCluster,
    manager: &RedisManager,
    node: usize,
) -> (String, String) {
    let on = key_on(cluster, manager, node, true).await;
    let off = key_on(cluster, manager, node, false).await;
    for key in [&on, &off] {
        assert_eq!(timed_incr(manager, key).await.0, Source::Redis);
    }
    (on, off)
}

/// What [`hang_under_load`] saw.
struct HungLoad {
    /// The other node's key: served by Redis, and fallen back.
    served: u32,
    fell_back: u32,
    /// The breaker moved while the node hung.
    moved: bool,
    /// The manager's health at the hang's end.
    health: Health,
}

impl HungLoad {
    /// The breaker never moved, the other node's key never fell back, and
    /// Redis served it at least `at_least` times.
    fn assert_other_node_served(&self, at_least: u32) {
        let Self {
            served,
            fell_back,
            moved,
            health,
        } = self;
        assert!(!moved, "the breaker moved: {health:?}");
        assert_eq!(
            *fell_back, 0,
            "the other node's key fell back {fell_back} times ({served} served by Redis)"
        );
        assert!(*served >= at_least, "{served} served by Redis");
    }
}

/// Node 1 of `cluster` paused for `for_` while `tasks` tasks send `INCR`s
/// through `manager`, every third to a key of the paused node (the tasks
/// start at different points of that cycle) and the rest to another
/// node's key; then resumed. Each task must end within `for_` plus 20 s.
async fn hang_under_load(
    cluster: &TestCluster,
    manager: &RedisManager,
    tasks: usize,
    for_: Duration,
) -> HungLoad {
    let hung = 1;
    let (on_hung, elsewhere) = keys_on_and_off(cluster, manager, hung).await;
    let mut transitions = manager.subscribe();
    transitions.mark_unchanged();
    cluster.pause_node(hung).await;
    let until = tokio::time::Instant::now() + for_;
    let tasks: Vec<_> = (0..tasks)
        .map(|task| {
            let manager = manager.clone();
            let (on_hung, elsewhere) = (on_hung.clone(), elsewhere.clone());
            tokio::spawn(async move {
                let (mut served, mut fell_back) = (0_u32, 0_u32);
                let mut n = task;
                while tokio::time::Instant::now() < until {
                    let to_hung = n % 3 == 0;
                    let key = if to_hung { &on_hung } else { &elsewhere };
                    let (source, _) = timed_incr(&manager, key).await;
                    match (to_hung, source) {
                        (false, Source::Redis) => served += 1,
                        (false, _) => fell_back += 1,
                        (true, _) => {}
                    }
                    n += 1;
                    // A fallback answers at once: let the other tasks run.
                    tokio::task::yield_now().await;
                }
                (served, fell_back)
            })
        })
        .collect();
    let (mut served, mut fell_back) = (0, 0);
    for task in tasks {
        let (s, f) = tokio::time::timeout(for_ + Duration::from_secs(20), task)
            .await
            .expect("each task ends in time")
            .expect("no panic");
        served += s;
        fell_back += f;
    }
    let health = manager.health();
    cluster.resume_node(hung).await;
    HungLoad {
        served,
        fell_back,
        moved: transitions.has_changed().expect("the manager lives"),
        health,
    }
}

/// A manager on `cluster` with the command timeout `timeout` and the
/// default breaker threshold.
async fn timeout_manager(cluster: &TestCluster, timeout: Duration) -> RedisManager {
    let config = cluster
        .config()
        .command_timeout(timeout)
        .build()
        .expect("valid");
    RedisManager::connect(config).await.expect("starts")
}

/// A manager on `cluster` with the command timeout `timeout` and a breaker
/// threshold no hang of these tests reaches, so that the breaker stays out
/// of them.
async fn hang_test_manager(cluster: &TestCluster, timeout: Duration) -> RedisManager {
    let config = cluster
        .config()
        .command_timeout(timeout)
        .failure_threshold(1000)
        .build()
        .expect("valid");
    RedisManager::connect(config).await.expect("starts")
}

/// A Cluster node that hangs while the others answer: with a threshold
/// the hang cannot reach, the other nodes' keys go on with Redis, within
/// a fraction of the command timeout, and the breaker stays closed. Before,
/// the node's response timeout threw the cluster connection away, and a
/// new one waited for the hung node: every key, on every node, timed out.
#[tokio::test]
async fn a_hung_cluster_node_does_not_stall_the_other_nodes_keys() {
    let _one_at_a_time = HANGS.lock().await;
    const TIMEOUT: Duration = Duration::from_millis(300);
    let cluster = TestCluster::start().await;
    let manager = hang_test_manager(&cluster, TIMEOUT).await;
    let hung = 1;
    let (on_hung, elsewhere) = keys_on_and_off(&cluster, &manager, hung).await;

    cluster.pause_node(hung).await;
    // Well within the cluster's node timeout (2 s), after which the other
    // nodes refuse every key.
    for _ in 0..3 {
        let (source, took) = timed_incr(&manager, &on_hung).await;
        assert_ne!(source, Source::Redis, "the hung node's key, after {took:?}");
        let (source, took) = timed_incr(&manager, &elsewhere).await;
        assert_eq!(
            source,
            Source::Redis,
            "the other node's key, after {took:?}"
        );
        assert!(took < TIMEOUT / 3, "the other node's key took {took:?}");
    }
    assert_eq!(manager.health().state, BreakerState::Closed);
    cluster.resume_node(hung).await;
}

/// A primary that hangs and stays hung while the cluster fails it over:
/// redis-rs does not read its slot map again on a timeout, so the kept
/// connection would go on asking the hung node for its slots. A
/// replacement made in the background after the node's timeouts reads the
/// new map: the slot is served by the promoted replica, with the breaker
/// kept out of it (a threshold the hang cannot reach), and the other
/// primaries' keys still answer.
#[tokio::test]
async fn a_hung_primary_that_is_failed_over_is_left_for_its_replica() {
    let _one_at_a_time = HANGS.lock().await;
    hung_primary_is_left_for_its_replica(None).await;
}

/// The same on a cluster that announces no endpoint in `CLUSTER SLOTS`
/// (`cluster-preferred-endpoint-type unknown-endpoint`, for clusters behind
/// a load balancer): redis-rs then uses the address of the node it asked,
/// and the replacement connection's check, which asks redis-rs' routing
/// rather than the announced addresses, still finds the promoted replica.
#[tokio::test]
async fn a_hung_primary_is_left_for_its_replica_when_the_cluster_announces_no_endpoint() {
    let _one_at_a_time = HANGS.lock().await;
    hung_primary_is_left_for_its_replica(Some("unknown-endpoint")).await;
}

/// A primary of a cluster with replicas hung; with `endpoint`, the
/// cluster's `cluster-preferred-endpoint-type` first set to it on every
/// node. Its slot must be served by Redis (the promoted replica) within
/// 30 s, and another primary's key after that.
async fn hung_primary_is_left_for_its_replica(endpoint: Option<&str>) {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let cluster = TestCluster::with_replicas(1).await;
    if let Some(endpoint) = endpoint {
        cluster
            .config_set("cluster-preferred-endpoint-type", endpoint)
            .await;
    }
    let manager = hang_test_manager(&cluster, TIMEOUT).await;
    let key = manager.keys().key(&["followed"]);
    let slot = cluster.slot_of(&key).await;
    let hung = cluster.primary_of(slot).await;
    let elsewhere = key_on(&cluster, &manager, hung, false).await;
    assert_eq!(timed_incr(&manager, &key).await.0, Source::Redis);

    cluster.pause_node(hung).await;
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        if timed_incr(&manager, &key).await.0 == Source::Redis {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was still not served after {:?}: primary of slot {slot} now {}, health {:?}",
            started.elapsed(),
            cluster.primary_of(slot).await,
            manager.health()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "served by the promoted replica {:?} after the pause",
        started.elapsed()
    );
    // The node asked may not have heard of the promotion yet (gossip): asked
    // again for up to 5 s.
    let heard = started.elapsed() + Duration::from_secs(5);
    while cluster.primary_of(slot).await == hung {
        assert!(
            started.elapsed() < heard,
            "served, but the cluster still names the hung node the primary of slot {slot}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (source, took) = timed_incr(&manager, &elsewhere).await;
    assert_eq!(
        source,
        Source::Redis,
        "another primary's key, after {took:?}"
    );
    cluster.resume_node(hung).await;
}

/// A Cluster node that hangs under concurrent load, with the default
/// breaker threshold: its keys' operations time out, many of them ending
/// together, while the other nodes answer. Those timeouts do not open the
/// breaker, and the other nodes' keys go on with Redis throughout. Before,
/// the first timeouts to end together, with no success between them,
/// opened the breaker for every node.
#[tokio::test]
async fn a_hung_cluster_node_under_load_leaves_the_other_nodes_on_redis() {
    let _one_at_a_time = HANGS.lock().await;
    const TIMEOUT: Duration = Duration::from_millis(300);
    const TASKS: usize = 32;
    let cluster = TestCluster::start().await;
    let manager = timeout_manager(&cluster, TIMEOUT).await;
    // Well within the cluster's node timeout (2 s), after which the other
    // nodes refuse every key: about four timeouts of each task.
    let load = hang_under_load(&cluster, &manager, TASKS, Duration::from_millis(1300)).await;
    load.assert_other_node_served(TASKS as u32 * 4);
    assert_eq!(load.health.state, BreakerState::Closed);
}

/// The same load with every node hung: nothing answers, so the timeouts
/// count as before and the breaker opens (within a few command timeouts).
#[tokio::test]
async fn a_hung_cluster_opens_the_breaker() {
    let _one_at_a_time = HANGS.lock().await;
    const TIMEOUT: Duration = Duration::from_millis(300);
    let cluster = TestCluster::start().await;
    let manager = timeout_manager(&cluster, TIMEOUT).await;
    let keys: Vec<String> = (0..3)
        .map(|i| manager.keys().key(&["hung", &i.to_string()]))
        .collect();
    for key in &keys {
        assert_eq!(timed_incr(&manager, key).await.0, Source::Redis);
    }
    for node in 0..3 {
        cluster.pause_node(node).await;
    }
    let started = tokio::time::Instant::now();
    let opened = tokio::time::timeout(Duration::from_millis(1800), async {
        loop {
            tokio::join!(
                timed_incr(&manager, &keys[0]),
                timed_incr(&manager, &keys[1]),
                timed_incr(&manager, &keys[2]),
            );
            if manager.health().state != BreakerState::Closed {
                break;
            }
        }
    })
    .await;
    let health = manager.health();
    for node in 0..3 {
        cluster.resume_node(node).await;
    }
    assert!(
        opened.is_ok(),
        "the breaker stayed closed for {:?}: {health:?}",
        started.elapsed()
    );
}

/// A Cluster node that hangs for seconds under load, with the manager's
/// defaults (command timeout 200 ms, connect timeout 500 ms): the other
/// nodes' keys go on with Redis throughout, and the breaker never moves.
/// The replacement connection made after a node's timeout (to find a
/// failover) has no connection to the node that hangs; before it was
/// kept only once it reached every primary, it took the shared
/// connection's place and sent the node's slots elsewhere, and each
/// `MOVED` made redis-rs read the slot map again while holding every key:
/// the breaker opened 1.6 s after the pause and stayed open.
#[tokio::test]
async fn a_node_hung_for_seconds_leaves_the_other_nodes_on_redis() {
    let _one_at_a_time = HANGS.lock().await;
    const TASKS: usize = 32;
    // Long enough that the cluster does not mark the node failed (after
    // which the other nodes refuse every key).
    let cluster = TestCluster::with_node_timeout(Duration::from_secs(30)).await;
    let config = cluster.config().build().expect("valid");
    let manager = RedisManager::connect(config).await.expect("starts");
    let (capture, guard) = capture_log();
    // Several of the replacements (one a second, then less often).
    let load = hang_under_load(&cluster, &manager, TASKS, Duration::from_secs(4)).await;
    drop(guard);
    let log = capture.text();
    load.assert_other_node_served(TASKS as u32 * 8);
    // The replacements were made, and not kept.
    assert!(
        log.contains("does not reach every primary"),
        "no replacement connection was turned down:\n{log}"
    );
}
