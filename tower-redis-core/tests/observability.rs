//! What operators see: breaker transitions counted with `metrics`, health
//! snapshots that say what went wrong.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower_redis_core::redis;
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{BreakerState, RedisManager};

#[tokio::test(flavor = "current_thread")]
async fn breaker_transitions_and_fallbacks_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Thread-local, so parallel tests do not see each other's metrics; the
    // current-thread runtime keeps the probe task on this thread.
    let _guard = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    redis.kill().await;
    let key = manager.keys().key(&["k"]);
    // Requests to a killed Redis open the breaker; a deadline, so that a
    // breaker that never opens fails the test instead of hanging it.
    let deadline = Duration::from_secs(10);
    let opened = tokio::time::timeout(deadline, async {
        while manager.health().state == BreakerState::Closed {
            manager
                .failover(
                    |mut conn| {
                        let key = key.clone();
                        async move {
                            redis::cmd("GET")
                                .arg(key)
                                .query_async::<Option<String>>(&mut conn)
                                .await
                        }
                    },
                    |_| async { None },
                )
                .await;
        }
    })
    .await;
    assert!(
        opened.is_ok(),
        "the breaker stayed closed for {deadline:?} of requests to a killed Redis: {:?}",
        manager.health()
    );
    assert!(manager.health().last_error.is_some());

    let mut opened = 0;
    let mut fallbacks = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let DebugValue::Counter(count) = value else {
            continue;
        };
        let labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        match key.key().name() {
            "tower_redis_breaker_transitions_total"
                if labels.contains(&("from".to_owned(), "closed".to_owned()))
                    && labels.contains(&("to".to_owned(), "open".to_owned())) =>
            {
                opened += count;
            }
            "tower_redis_fallbacks_total" => fallbacks += count,
            _ => {}
        }
    }
    assert_eq!(opened, 1, "one closed → open transition");
    assert!(fallbacks >= 1);
}
