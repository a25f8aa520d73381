//! The manager while its Redis is broken on purpose: absent at start,
//! killed under load, hung with SIGSTOP, restarted on the same port.
//!
//! Every test asserts behaviour (states, sources, counts); the only time
//! bounds are the contract's own ("no wait longer than the command timeout")
//! with a generous margin for a loaded CI machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tower_redis_core::redis;
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{BreakerState, Error, FallbackReason, RedisManager, Served, Source};

const COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
/// Scheduling slack on a busy two-core machine; the contract is the timeout.
const MARGIN: Duration = Duration::from_millis(400);
/// How long recovery may take before a test gives up.
const RECOVERY: Duration = Duration::from_secs(15);

async fn manager_for(redis: &TestRedis) -> RedisManager {
    let config = redis
        .config()
        .command_timeout(COMMAND_TIMEOUT)
        .connect_timeout(Duration::from_millis(300))
        .failure_threshold(3)
        .build()
        .expect("valid config");
    RedisManager::connect(config).await.expect("manager starts")
}

/// One INCR through the failover helper; the fallback answers -1.
async fn incr(manager: &RedisManager) -> Served<i64> {
    let key = manager.keys().key(&["counter"]);
    manager
        .failover(
            |mut conn| async move { redis::cmd("INCR").arg(key).query_async(&mut conn).await },
            |_| async { -1 },
        )
        .await
}

async fn wait_for_state(manager: &RedisManager, state: BreakerState) {
    let mut rx = manager.subscribe();
    let reached = tokio::time::timeout(RECOVERY, rx.wait_for(|s| *s == state)).await;
    assert!(
        matches!(reached, Ok(Ok(_))),
        "breaker did not reach {state} within {RECOVERY:?}; health: {:?}",
        manager.health()
    );
}

#[tokio::test]
async fn starts_with_redis_down_then_recovers_when_it_appears() {
    let redis = TestRedis::start().await;
    redis.stop().await;

    let manager = manager_for(&redis).await;
    assert_eq!(manager.health().state, BreakerState::Open);

    let started = Instant::now();
    let served = incr(&manager).await;
    assert_eq!(served.source, Source::Fallback(FallbackReason::BreakerOpen));
    assert!(
        started.elapsed() < MARGIN,
        "an open breaker answers at once"
    );

    redis.restart().await;
    wait_for_state(&manager, BreakerState::Closed).await;
    let served = incr(&manager).await;
    assert_eq!(served.source, Source::Redis);
    assert_eq!(served.value, 1);
}

#[tokio::test]
async fn require_redis_refuses_to_start_without_redis() {
    let redis = TestRedis::start().await;
    redis.stop().await;
    let config = redis
        .config()
        .require_redis(true)
        .build()
        .expect("valid config");
    let error = RedisManager::connect(config)
        .await
        .expect_err("must refuse");
    assert!(matches!(error, Error::Required { .. }), "{error}");
    assert!(error.to_string().contains("require_redis"), "{error}");
}

#[tokio::test]
async fn an_open_breaker_sends_nothing_to_redis() {
    let redis = TestRedis::start().await;
    // A slow probe keeps the breaker open for the whole test.
    let config = redis
        .config()
        .command_timeout(COMMAND_TIMEOUT)
        .failure_threshold(3)
        .probe_backoff(Duration::from_secs(60), Duration::from_secs(60))
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("manager starts");
    redis.pause().await;
    for _ in 0..3 {
        assert_eq!(
            incr(&manager).await.source,
            Source::Fallback(FallbackReason::Timeout)
        );
    }
    assert_eq!(manager.health().state, BreakerState::Open);
    redis.resume().await;
    redis.reset_stats().await.expect("reset");

    for _ in 0..50 {
        assert_eq!(
            incr(&manager).await.source,
            Source::Fallback(FallbackReason::BreakerOpen)
        );
    }
    let calls = redis.command_calls().await.expect("commandstats");
    assert_eq!(calls.get("incr"), None, "{calls:?}");
}

#[tokio::test]
async fn kill_under_load_opens_the_breaker_and_no_caller_waits_past_the_timeout() {
    let redis = Arc::new(TestRedis::start().await);
    let manager = manager_for(&redis).await;
    let mut opened = manager.subscribe();
    let longest = Arc::new(AtomicU64::new(0));
    let fallbacks = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_millis(1500);

    let mut workers = Vec::new();
    for _ in 0..16 {
        let manager = manager.clone();
        let longest = Arc::clone(&longest);
        let fallbacks = Arc::clone(&fallbacks);
        workers.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                let started = Instant::now();
                let served = incr(&manager).await;
                let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                longest.fetch_max(waited, Ordering::Relaxed);
                if served.is_fallback() {
                    fallbacks.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill().await;
    for worker in workers {
        worker.await.expect("worker");
    }

    assert!(
        tokio::time::timeout(RECOVERY, opened.wait_for(|s| *s != BreakerState::Closed))
            .await
            .is_ok(),
        "breaker never opened"
    );
    assert!(fallbacks.load(Ordering::Relaxed) > 0);
    let longest = Duration::from_micros(longest.load(Ordering::Relaxed));
    assert!(
        longest <= COMMAND_TIMEOUT + MARGIN,
        "a caller waited {longest:?}"
    );
}

#[tokio::test]
async fn hung_redis_times_out_opens_and_closes_after_resume() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    assert_eq!(incr(&manager).await.source, Source::Redis);

    redis.pause().await;
    let mut reasons = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let served = incr(&manager).await;
        assert!(
            started.elapsed() <= COMMAND_TIMEOUT + MARGIN,
            "waited {:?}",
            started.elapsed()
        );
        if let Source::Fallback(reason) = served.source {
            reasons.push(reason);
        }
    }
    assert_eq!(&reasons[..3], &[FallbackReason::Timeout; 3], "{reasons:?}");
    assert!(
        reasons[3..]
            .iter()
            .all(|r| *r == FallbackReason::BreakerOpen),
        "{reasons:?}"
    );
    assert_ne!(manager.health().state, BreakerState::Closed);

    redis.resume().await;
    wait_for_state(&manager, BreakerState::Closed).await;
    assert_eq!(incr(&manager).await.source, Source::Redis);
}

#[tokio::test]
async fn restart_under_load_replaces_pooled_connections_and_nothing_fails_after_recovery() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let load = {
        let manager = manager.clone();
        tokio::spawn(async move {
            let stop_at = Instant::now() + Duration::from_millis(800);
            while Instant::now() < stop_at {
                incr(&manager).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.kill().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.restart().await;
    load.await.expect("load");

    wait_for_state(&manager, BreakerState::Closed).await;
    for _ in 0..200 {
        let served = incr(&manager).await;
        assert_eq!(
            served.source,
            Source::Redis,
            "health: {:?}",
            manager.health()
        );
    }
}

#[tokio::test]
async fn idle_restart_costs_at_most_one_fallback() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    for _ in 0..8 {
        assert_eq!(incr(&manager).await.source, Source::Redis);
    }
    // No traffic while Redis is away: every pooled connection is now dead
    // without the manager having noticed.
    redis.restart().await;

    let mut fallbacks = 0;
    for _ in 0..100 {
        if incr(&manager).await.is_fallback() {
            fallbacks += 1;
        }
    }
    assert!(
        fallbacks <= 1,
        "{fallbacks} operations fell back after the restart"
    );
    assert_eq!(manager.health().state, BreakerState::Closed);
}

#[tokio::test]
async fn a_disabled_manager_always_falls_back() {
    let manager = RedisManager::disabled();
    assert_eq!(manager.health().state, BreakerState::Disabled);
    let served = incr(&manager).await;
    assert_eq!(served.source, Source::Fallback(FallbackReason::BreakerOpen));
}
