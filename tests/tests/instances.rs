//! Several app instances (managers) sharing one Redis.

use std::time::Duration;

use tower_redis_core::redis;
use tower_redis_core::testing::{TestRedis, wait_for_breaker};
use tower_redis_core::{BreakerState, RedisManager, Source};

/// How long requests to a killed Redis may take to open a breaker (each
/// fails at once on a refused connection; the first one opens it).
const OPEN_DEADLINE: Duration = Duration::from_secs(10);

async fn instance(redis: &TestRedis, prefix: &str) -> RedisManager {
    let config = redis
        .config()
        .key_prefix(prefix)
        .build()
        .expect("valid config");
    RedisManager::connect(config)
        .await
        .expect("instance starts")
}

async fn incr(manager: &RedisManager, name: &str) -> (i64, Source) {
    let key = manager.keys().key(&[name]);
    let served = manager
        .failover(
            |mut conn| async move { redis::cmd("INCR").arg(key).query_async(&mut conn).await },
            |_| async { -1 },
        )
        .await;
    (served.value, served.source)
}

#[tokio::test]
async fn instances_of_one_app_share_state_and_other_apps_stay_apart() {
    let redis = TestRedis::start().await;
    let shop_a = instance(&redis, "shop").await;
    let shop_b = instance(&redis, "shop").await;
    let blog = instance(&redis, "blog").await;

    assert_eq!(incr(&shop_a, "hits").await, (1, Source::Redis));
    assert_eq!(incr(&shop_b, "hits").await, (2, Source::Redis));
    assert_eq!(incr(&blog, "hits").await, (1, Source::Redis));
}

#[tokio::test]
async fn every_instance_recovers_on_its_own_after_an_outage() {
    let redis = TestRedis::start().await;
    let instances = [instance(&redis, "app").await, instance(&redis, "app").await];
    redis.kill().await;
    for manager in &instances {
        // Each instance discovers the outage through its own traffic.
        let opened = tokio::time::timeout(OPEN_DEADLINE, async {
            while manager.health().state == BreakerState::Closed {
                incr(manager, "n").await;
            }
        })
        .await;
        assert!(
            opened.is_ok(),
            "the breaker stayed closed for {OPEN_DEADLINE:?} of requests to a killed Redis: {:?}",
            manager.health()
        );
    }
    redis.restart().await;
    for manager in &instances {
        wait_for_breaker(manager, BreakerState::Closed, Duration::from_secs(15)).await;
    }
    assert_eq!(incr(&instances[0], "n").await, (1, Source::Redis));
    assert_eq!(incr(&instances[1], "n").await, (2, Source::Redis));
}
