//! The manager on Redis Sentinel, against real processes: one primary, one
//! replica and three Sentinels (`TestSentinel`). It writes through the
//! primary, follows a failover after the primary dies, never keeps writing
//! to a demoted primary, and pub/sub follows the primary too.

use std::time::Duration;

use tokio::time::Instant;
use tower_redis_core::redis;
use tower_redis_core::testing::{TestSentinel, wait_for_breaker};
use tower_redis_core::{BreakerState, RedisManager, Source};

/// Generous: a failover takes `down-after-milliseconds` (1 s) plus an
/// election, on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

async fn manager(sentinel: &TestSentinel) -> RedisManager {
    let config = sentinel.config().build().expect("valid Sentinel config");
    let manager = RedisManager::connect(config).await.expect("connects");
    wait_for_breaker(&manager, BreakerState::Closed, DEADLINE).await;
    manager
}

/// `SET key value` through the manager's failover helper.
async fn set(manager: &RedisManager, key: &str, value: &str) -> Source {
    let cmd = redis::cmd("SET").arg(key).arg(value).clone();
    manager
        .failover(
            |mut conn| async move { cmd.query_async::<()>(&mut conn).await },
            |_| async {},
        )
        .await
        .source
}

/// `GET key` on the data node at `port`, bypassing Sentinel and the manager.
async fn get_on(sentinel: &TestSentinel, port: u16, key: &str) -> Option<String> {
    let mut conn = sentinel
        .node_client(port)
        .get_multiplexed_async_connection()
        .await
        .expect("node answers");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_the_primary_and_follow_it_after_it_dies() {
    let sentinel = TestSentinel::start().await;
    // A recovery probe far slower than a failover: the manager must follow
    // the Sentinels' announcement, not wait for its next probe.
    let config = sentinel
        .config()
        .probe_backoff(Duration::from_secs(10), Duration::from_secs(10))
        .build()
        .expect("valid Sentinel config");
    let manager = RedisManager::connect(config).await.expect("connects");
    wait_for_breaker(&manager, BreakerState::Closed, DEADLINE).await;
    let first = sentinel.primary_port().await;
    assert_eq!(set(&manager, "before", "1").await, Source::Redis);
    assert_eq!(
        get_on(&sentinel, first, "before").await.as_deref(),
        Some("1")
    );
    // Replication is asynchronous: the write is on the replica only once
    // the replica says so (what the failover keeps is checked below).
    let mut conn = sentinel
        .node_client(first)
        .get_multiplexed_async_connection()
        .await
        .expect("primary answers");
    let replicas: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(DEADLINE.as_millis().to_string())
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(replicas, 1, "the replica acknowledged the write");

    // Kill the primary, then write until a write reaches the new primary.
    let events = sentinel.record_events().await;
    let killed_at = Instant::now();
    let old = sentinel.kill_primary().await;
    assert_eq!(old, first);
    let mut attempts = 0u32;
    let recovered = loop {
        attempts += 1;
        if set(&manager, "after", &attempts.to_string()).await == Source::Redis {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < DEADLINE,
            "no write reached a primary within {DEADLINE:?} of the kill; health: {:?}",
            manager.health()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let promoting = events.first(killed_at, "+failover-state-wait-promotion");
    let promoted = events.first(killed_at, "+promoted-slave");
    let switched = events.first(killed_at, "+switch-master");
    println!(
        "sentinel failover: first successful write {recovered:?} after the primary was killed \
         (down-after-milliseconds {:?}, {attempts} attempts); first \
         +failover-state-wait-promotion at {promoting:?}, first +promoted-slave at \
         {promoted:?}, first +switch-master at {switched:?}",
        TestSentinel::DOWN_AFTER
    );
    for (at, line) in events.since(killed_at) {
        println!("  {at:>12?}  {line}");
    }
    // The manager reacts to the announcement itself, not to its probe
    // backoff: the first write lands soon after the first announcement
    // (the leader's `+failover-state-wait-promotion`, after which the
    // manager watches the replica for the role, or the Sentinels'
    // `+promoted-slave` / `+switch-master`). Generous (a loaded machine),
    // but far below the 10 s probe backoff set above, which would bound it
    // otherwise.
    let announced = promoting
        .into_iter()
        .chain(promoted)
        .chain(switched)
        .min()
        .expect("a Sentinel announced the promotion");
    assert!(
        recovered < announced + Duration::from_secs(1),
        "the first write came {:?} after the announcement",
        recovered.saturating_sub(announced)
    );
    sentinel.wait_for_promotion(old).await;
    let new = sentinel.primary_port().await;
    assert_ne!(new, old);
    assert_eq!(
        get_on(&sentinel, new, "after").await,
        Some(attempts.to_string()),
        "the successful write is on the new primary"
    );
    assert_eq!(
        get_on(&sentinel, new, "before").await.as_deref(),
        Some("1"),
        "replicated before the kill"
    );

    // Pub/sub connects to the new primary too.
    let mut pubsub = manager
        .pubsub()
        .await
        .expect("subscribes on the new primary");
    pubsub.subscribe("news").await.expect("SUBSCRIBE");
    let mut messages = pubsub.on_message();
    let published: i64 = manager
        .query(redis::cmd("PUBLISH").arg("news").arg("hello"))
        .await
        .expect("PUBLISH through the manager");
    assert_eq!(
        published, 1,
        "the subscriber is on the primary the manager writes to"
    );
    let message = tokio::time::timeout(DEADLINE, futures_util::StreamExt::next(&mut messages))
        .await
        .expect("message within the deadline")
        .expect("stream open");
    assert_eq!(message.get_payload::<String>().expect("text"), "hello");
}

/// Runs `round` (numbered from 1, 2 ms apart) from a task of its own
/// through a forced failover; returns the old primary's port and every
/// round's output, in order.
async fn through_a_forced_failover<T, F, Fut>(sentinel: &TestSentinel, round: F) -> (u16, Vec<T>)
where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let stop = std::sync::Arc::clone(&stop);
        async move {
            let mut rounds = Vec::new();
            let mut index = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                index += 1;
                rounds.push(round(index).await);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            rounds
        }
    });
    let old = sentinel.force_failover().await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    (old, writer.await.expect("writer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_forced_failover_no_write_lands_on_the_demoted_primary() {
    let sentinel = TestSentinel::start().await;
    let manager = manager(&sentinel).await;
    assert_eq!(set(&manager, "warm", "1").await, Source::Redis);

    // A writer runs through the whole failover, recording what Redis
    // acknowledged.
    let (old, rounds) = through_a_forced_failover(&sentinel, {
        let manager = manager.clone();
        move |index| {
            let manager = manager.clone();
            async move {
                let key = format!("during-{index}");
                (set(&manager, &key, "v").await == Source::Redis).then_some(key)
            }
        }
    })
    .await;
    let acknowledged: Vec<String> = rounds.into_iter().flatten().collect();
    let new = sentinel.primary_port().await;
    assert_ne!(new, old);
    assert_eq!(sentinel.role(old).await.expect("ROLE").as_str(), "slave");
    let mut lost = 0;
    for key in &acknowledged {
        if get_on(&sentinel, new, key).await.is_none() {
            lost += 1;
        }
    }
    println!(
        "forced failover: {lost} of {} writes acknowledged during the switch are not on the new \
         primary (asynchronous replication: acknowledged by the old primary before it stepped down)",
        acknowledged.len()
    );
    // Without the Sentinels' +switch-master, the old primary would take
    // every write from the promotion until it is reconfigured (seconds
    // later) and then drop them all; with it, only the ones sent before
    // the announcement reached the manager.
    assert!(
        lost * 4 < acknowledged.len(),
        "{lost} of {} acknowledged writes were lost: the manager kept writing to the replaced \
         primary after the switch",
        acknowledged.len()
    );

    // Every write from now on must be acknowledged by the new primary, and
    // the manager gives up its connection to the demoted one at once.
    let started = Instant::now();
    let mut written = Vec::new();
    let mut failed = 0;
    for index in 0..50 {
        let key = format!("after-{index}");
        loop {
            if set(&manager, &key, "v").await == Source::Redis {
                break;
            }
            failed += 1;
            assert!(
                started.elapsed() < DEADLINE,
                "the manager did not recover within {DEADLINE:?}; health: {:?}",
                manager.health()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        written.push(key);
    }
    for key in &written {
        assert_eq!(
            get_on(&sentinel, new, key).await.as_deref(),
            Some("v"),
            "{key} was acknowledged but is not on the new primary"
        );
    }
    assert!(
        failed <= 1,
        "{failed} writes failed after the demotion; the first error must send the manager back \
         to the Sentinels"
    );
    assert_eq!(sentinel.role(old).await.expect("ROLE").as_str(), "slave");
    assert_eq!(sentinel.role(new).await.expect("ROLE").as_str(), "master");
}

/// A primary demoted under a live connection answers writes with READONLY:
/// the manager drops that connection at the first one and asks the
/// Sentinels again (and refuses the demoted node by its ROLE), instead of
/// sending every write to it until the breaker opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_from_a_demoted_primary_sends_the_manager_back_to_discovery() {
    let sentinel = TestSentinel::start().await;
    // A high threshold: the breaker must not be what rescues the manager.
    let config = sentinel
        .config()
        .failure_threshold(1000)
        .build()
        .expect("valid");
    let manager = RedisManager::connect(config).await.expect("connects");
    wait_for_breaker(&manager, BreakerState::Closed, DEADLINE).await;
    assert_eq!(set(&manager, "warm", "1").await, Source::Redis);

    // Swap the roles by hand, behind the Sentinels' back: they keep naming
    // the old primary for a while (no +switch-master yet), and REPLICAOF
    // keeps client connections open, so the manager's pooled connection
    // answers READONLY instead of dropping.
    let old = sentinel.primary_port().await;
    let other = *sentinel
        .node_ports()
        .iter()
        .find(|port| **port != old)
        .expect("two nodes");
    for (port, target) in [(other, None), (old, Some(other))] {
        let mut conn = sentinel
            .node_client(port)
            .get_multiplexed_async_connection()
            .await
            .expect("node answers");
        let mut cmd = redis::cmd("REPLICAOF");
        match target {
            Some(target) => cmd.arg("127.0.0.1").arg(target),
            None => cmd.arg("NO").arg("ONE"),
        };
        cmd.query_async::<()>(&mut conn).await.expect("REPLICAOF");
    }
    assert_eq!(sentinel.role(old).await.expect("ROLE").as_str(), "slave");

    let write = |value: &'static str| {
        let manager = manager.clone();
        async move {
            manager
                .query::<()>(redis::cmd("SET").arg("k").arg(value))
                .await
        }
    };
    let first = write("1").await.expect_err("the demoted primary refuses");
    assert!(
        matches!(&first, tower_redis_core::Error::Redis(e)
            if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)),
        "{first}"
    );
    // The next operation does not reuse that connection: it asks the
    // Sentinels, who still name the demoted node, and ROLE refuses it.
    let second = write("2")
        .await
        .expect_err("no primary where the Sentinels say");
    assert!(
        matches!(second, tower_redis_core::Error::Connect(_)),
        "the second write went to the demoted primary again: {second}"
    );
    assert!(second.to_string().contains("ROLE"), "{second}");

    // Put the roles back: the node the Sentinels name is a primary again,
    // and the manager, asking them at its next connect, finds it.
    for (port, target) in [(old, None), (other, Some(old))] {
        let mut conn = sentinel
            .node_client(port)
            .get_multiplexed_async_connection()
            .await
            .expect("node answers");
        let mut cmd = redis::cmd("REPLICAOF");
        match target {
            Some(target) => cmd.arg("127.0.0.1").arg(target),
            None => cmd.arg("NO").arg("ONE"),
        };
        cmd.query_async::<()>(&mut conn).await.expect("REPLICAOF");
    }
    let started = Instant::now();
    while set(&manager, "k", "3").await != Source::Redis {
        assert!(
            started.elapsed() < DEADLINE,
            "no recovery within {DEADLINE:?}; health: {:?}",
            manager.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let primary = sentinel.primary_port().await;
    assert_eq!(get_on(&sentinel, primary, "k").await.as_deref(), Some("3"));
}

/// The `redis+sentinel://` URL form reaches the primary through the
/// Sentinels, as `REDIS_URL` would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_url_finds_the_primary() {
    let sentinel = TestSentinel::start().await;
    let url = format!(
        "redis+sentinel://{}/{}/0",
        sentinel.sentinel_addresses().join(","),
        TestSentinel::MASTER_NAME
    );
    let config = tower_redis_core::RedisConfig::builder()
        .url(url)
        .build()
        .expect("valid Sentinel URL");
    let manager = RedisManager::connect(config).await.expect("connects");
    wait_for_breaker(&manager, BreakerState::Closed, DEADLINE).await;
    assert_eq!(set(&manager, "via-url", "1").await, Source::Redis);
    let primary = sentinel.primary_port().await;
    assert_eq!(
        get_on(&sentinel, primary, "via-url").await.as_deref(),
        Some("1")
    );
}

/// A write sent on the tracking connection (as a tracked session update
/// is) follows the pool to the new primary at a switch: once the pool has
/// moved (its writes land on the new primary), no write acknowledged on
/// the tracking connection lands on the demoted one, even before the
/// tracking connection's heartbeat would notice the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_the_tracking_connection_follow_the_switch() {
    let sentinel = TestSentinel::start().await;
    let manager = manager(&sentinel).await;
    tower_redis_core::testing::wait_for_tracking(&manager, DEADLINE).await;
    let tracking = manager.tracking().expect("tracking on Sentinel");

    // Each round: a write through the pool, then one on the tracking
    // connection; what each got acknowledged is recorded.
    let (old, rounds) = through_a_forced_failover(&sentinel, {
        let manager = manager.clone();
        move |index| {
            let (manager, tracking) = (manager.clone(), tracking.clone());
            async move {
                let pooled = set(&manager, &format!("pool-{index}"), "v").await == Source::Redis;
                let key = format!("tracked-{index}");
                let tracked = tracking
                    .run(|mut conn| {
                        let cmd = redis::cmd("SET").arg(&key).arg("v").clone();
                        async move { cmd.query_async::<()>(&mut conn).await }
                    })
                    .await
                    .is_ok();
                (index, pooled, tracked)
            }
        }
    })
    .await;
    let new = sentinel.primary_port().await;
    assert_ne!(new, old);

    // The pool's writes lost in the switch (acknowledged by the old primary
    // after the promotion) end where the pool moved.
    let mut last_lost_pooled = 0;
    for &(index, pooled, _) in &rounds {
        if pooled
            && get_on(&sentinel, new, &format!("pool-{index}"))
                .await
                .is_none()
        {
            last_lost_pooled = index;
        }
    }
    let mut lost = Vec::new();
    for &(index, _, tracked) in &rounds {
        if tracked
            && index > last_lost_pooled + 1
            && get_on(&sentinel, new, &format!("tracked-{index}"))
                .await
                .is_none()
        {
            lost.push(index);
        }
    }
    // One round may straddle the switch unseen (no pool write lost: the
    // promotion fell between a round's two writes and the pool moved
    // before the next round): its tracked write is lost as a pooled one
    // would be. Without the check, every round until the heartbeat is.
    assert!(
        lost.len() <= 1,
        "writes acknowledged on the tracking connection after the pool moved (round {last_lost_pooled}) \
         are not on the new primary: rounds {lost:?} of {}",
        rounds.len()
    );
}
