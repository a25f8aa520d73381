//! The rules of a [`TrackedCache`]'s tickets against a real Redis: which
//! answers may be kept as copies when this instance writes a key itself on
//! its tracking connection (`NOLOOP`: Redis does not report those writes).

use std::time::Duration;

use tower_redis_core::redis::{self, Script};
use tower_redis_core::testing::{TestRedis, wait_for_tracking};
use tower_redis_core::{RedisManager, TrackedCache, Tracking};

async fn tracked(redis: &TestRedis) -> (RedisManager, Tracking, TrackedCache<String>) {
    let manager = RedisManager::connect(redis.config().build().expect("config"))
        .await
        .expect("manager starts");
    wait_for_tracking(&manager, Duration::from_secs(10)).await;
    let tracking = manager.tracking().expect("tracking");
    let cache = tracking.cache(1 << 20, String::len);
    (manager, tracking, cache)
}

/// Reads `key` on the tracking connection (so that Redis tracks it for this
/// instance) and keeps the answer as the copy.
async fn read_into(tracking: &Tracking, cache: &TrackedCache<String>, key: &str) -> String {
    let ticket = cache.begin(key).expect("live");
    let value: Option<String> = tracking
        .run(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
        .await
        .expect("GET");
    let value = value.unwrap_or_default();
    assert!(
        ticket.fill(value.clone()),
        "nothing changed during the read"
    );
    value
}

/// Runs `script` on key `k` with `value` on the tracking connection.
async fn write_on(tracking: &Tracking, script: &Script, value: &str) -> String {
    tracking
        .run(|mut conn| async move { script.key("k").arg(value).invoke_async(&mut conn).await })
        .await
        .expect("script")
}

#[tokio::test]
async fn a_write_voids_the_reads_in_flight_and_those_begun_while_it_is() {
    let redis = TestRedis::start().await;
    let (_manager, _tracking, cache) = tracked(&redis).await;
    let before = cache.begin("k").expect("live");
    let write = cache.begin_write("k").expect("live");
    let during = cache.begin("k").expect("live");
    assert!(!before.fill("old".into()), "a read begun before the write");
    assert!(!during.fill("old".into()), "a read begun during the write");
    assert!(write.fill("new".into()), "the write alone");
    assert_eq!(cache.get("k").as_deref(), Some("new"));
    let after = cache.begin("k").expect("live");
    assert!(after.fill("newer".into()), "a read begun after the write");
}

#[tokio::test]
async fn overlapping_writes_keep_nothing_and_drop_the_copy() {
    let redis = TestRedis::start().await;
    let (_manager, _tracking, cache) = tracked(&redis).await;
    assert!(cache.begin("k").expect("live").fill("base".into()));
    let first = cache.begin_write("k").expect("live");
    let second = cache.begin_write("k").expect("live");
    assert!(!first.fill("base+1".into()), "voided by the second");
    assert_eq!(cache.get("k"), None, "a write kept in vain drops the copy");
    assert!(
        !second.fill("base+2".into()),
        "built on a base without the first"
    );
    assert_eq!(cache.get("k"), None);
    // Both over: the next write is alone again.
    assert!(cache.begin("k").expect("live").fill("base".into()));
    let third = cache.begin_write("k").expect("live");
    drop(third);
    assert_eq!(cache.get("k"), None, "a write not filled drops the copy");
    let fourth = cache.begin_write("k").expect("live");
    assert!(fourth.fill("base+4".into()));
}

/// A write by this instance on its tracking connection, by a script that
/// reads its key last: Redis reports it to nobody here, the key stays
/// tracked, and another client's later write voids the copy. The same
/// script without the last read leaves the key untracked (Redis drops a
/// key from its tracking table at a write), and that later write would go
/// unheard: this is why the session's save script reads its key last.
#[tokio::test]
async fn a_script_that_reads_its_key_last_keeps_it_tracked() {
    let redis = TestRedis::start().await;
    let (manager, tracking, cache) = tracked(&redis).await;
    let write_then_read =
        Script::new("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])");
    assert_eq!(read_into(&tracking, &cache, "k").await, "");
    let write = cache.begin_write("k").expect("live");
    let written = write_on(&tracking, &write_then_read, "mine").await;
    tracking.sync().await.expect("sync");
    assert!(write.fill(written), "no invalidation for its own write");
    assert_eq!(cache.get("k").as_deref(), Some("mine"));

    manager
        .query::<()>(redis::cmd("SET").arg("k").arg("theirs"))
        .await
        .expect("SET");
    tracking.sync().await.expect("sync");
    assert_eq!(cache.get("k"), None, "another client's write is heard of");

    // The control: without the last read, Redis forgets that this
    // connection read the key, and the other client's write goes unheard.
    let write_only = Script::new("redis.call('SET', KEYS[1], ARGV[1]); return ARGV[1]");
    assert_eq!(read_into(&tracking, &cache, "k").await, "theirs");
    let write = cache.begin_write("k").expect("live");
    let written = write_on(&tracking, &write_only, "mine again").await;
    assert!(write.fill(written));
    manager
        .query::<()>(redis::cmd("SET").arg("k").arg("theirs again"))
        .await
        .expect("SET");
    tracking.sync().await.expect("sync");
    assert_eq!(
        cache.get("k").as_deref(),
        Some("mine again"),
        "unheard: the reason for the last read"
    );
}

/// Another structure on the same tracking connection (a second layer
/// built on the same manager) hears of this instance's own writes from
/// the cache that makes them: Redis reports them to nobody here.
#[tokio::test]
async fn a_write_invalidates_the_key_in_the_other_structures_on_the_connection() {
    let redis = TestRedis::start().await;
    let (_manager, tracking, cache) = tracked(&redis).await;
    let sibling: TrackedCache<String> = tracking.cache(1 << 20, String::len);
    assert!(sibling.begin("k").expect("live").fill("old".into()));
    let write = cache.begin_write("k").expect("live");
    assert_eq!(sibling.get("k"), None, "dropped when the write begins");
    let during = sibling.begin("k").expect("live");
    assert!(write.fill("new".into()));
    assert!(!during.fill("old".into()), "a read begun during the write");
    assert_eq!(sibling.get("k"), None);
    assert_eq!(cache.get("k").as_deref(), Some("new"));
}

/// No ticket outlives its read or write, whatever became of it.
#[tokio::test]
async fn tickets_leave_nothing_behind() {
    let redis = TestRedis::start().await;
    let (_manager, _tracking, cache) = tracked(&redis).await;
    drop(cache.begin("a").expect("live"));
    assert!(cache.begin("b").expect("live").fill("b".into()));
    drop(cache.begin_write("c").expect("live"));
    assert!(cache.begin_write("d").expect("live").fill("d".into()));
    let first = cache.begin_write("e").expect("live");
    let second = cache.begin_write("e").expect("live");
    drop(first);
    assert!(!second.fill("e".into()));
    assert_eq!(cache.in_flight(), 0);
}

#[tokio::test]
async fn an_invalidation_during_a_write_voids_it() {
    let redis = TestRedis::start().await;
    let (manager, tracking, cache) = tracked(&redis).await;
    read_into(&tracking, &cache, "k").await;
    let write = cache.begin_write("k").expect("live");
    manager
        .query::<()>(redis::cmd("SET").arg("k").arg("theirs"))
        .await
        .expect("SET");
    tracking.sync().await.expect("sync");
    assert!(!write.fill("mine".into()));
    assert_eq!(cache.get("k"), None);
}

/// A read on the tracking connection that its caller gives up on while
/// Redis hangs makes the manager send its canary, as an operation of
/// `RedisManager::run` does: its timeout reaches the breaker. (The
/// tracking connection's own heartbeat finds the connection hung too, but
/// tells the breaker nothing.)
#[tokio::test]
async fn a_tracked_read_given_up_on_sends_the_canary() {
    let redis = TestRedis::start().await;
    let (manager, tracking, _cache) = tracked(&redis).await;
    assert_eq!(manager.health().consecutive_failures, 0);
    // On the tracking connection, not the pool (whose operations have
    // their own guard).
    assert!(tracking.is_live(), "the tracking connection is up");
    redis.pause().await;
    let read = tokio::time::timeout(
        manager.command_timeout() / 4,
        tracking.run(|mut conn| async move {
            redis::cmd("GET")
                .arg("k")
                .query_async::<Option<String>>(&mut conn)
                .await
        }),
    )
    .await;
    assert!(read.is_err(), "Redis is hung: the caller gave up");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while manager.health().consecutive_failures == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned read told the breaker nothing: {:?}",
            manager.health()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = manager.health();
    redis.resume().await;
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("no answer")),
        "the canary timed out: {health:?}"
    );
}
