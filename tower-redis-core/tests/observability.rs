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
            "tower_redis_fallbacks_total" => {
                // Under the reason's name.
                let reason = labels.iter().find(|(k, _)| k == "reason").map(|(_, v)| v);
                assert!(
                    reason.is_some_and(|r| {
                        [
                            "breaker_open",
                            "timeout",
                            "connection_failed",
                            "command_failed",
                        ]
                        .contains(&r.as_str())
                    }),
                    "{labels:?}"
                );
                fallbacks += count;
            }
            _ => {}
        }
    }
    assert_eq!(opened, 1, "one closed → open transition");
    assert!(fallbacks >= 1);
}

/// Every metric recorded has the help text `describe()` gives it, the
/// breaker state is also a labelled gauge (1 for the current state), and
/// each command's round trip lands in `db.client.operation.duration` under
/// its name, with `error.type` when it failed.
#[tokio::test(flavor = "current_thread")]
async fn metrics_are_described_labelled_and_timed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let key = manager.keys().key(&["k"]);
    let _: () = manager
        .query(redis::cmd("SET").arg(&key).arg("v"))
        .await
        .expect("SET");
    let _: Option<String> = manager
        .query(redis::cmd("GET").arg(&key))
        .await
        .expect("GET");
    // A server error: HSET on a string.
    let failed: Result<(), _> = manager
        .query(redis::cmd("HSET").arg(&key).arg("f").arg("v"))
        .await;
    assert!(failed.is_err(), "WRONGTYPE");
    // A pipeline is timed once, as `PIPELINE`.
    let (_, _): (Option<String>, Option<String>) = manager
        .query_pipeline(redis::pipe().get(&key).get(&key))
        .await
        .expect("pipeline");

    let snapshot = snapshotter.snapshot().into_vec();
    let mut described = 0;
    let mut states = Vec::new();
    let mut timed = Vec::new();
    for (key, _unit, help, value) in &snapshot {
        let name = key.key().name();
        let labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        let help = help.as_ref().map(|h| h.to_string()).unwrap_or_default();
        assert!(!help.is_empty(), "{name} has no help text");
        assert!(
            tower_redis_core::record::METRICS
                .iter()
                .any(|m| m.name == name),
            "{name} is not in record::METRICS"
        );
        described += 1;
        if name == "tower_redis_breaker_in_state"
            && let DebugValue::Gauge(v) = value
        {
            states.push((labels[0].1.clone(), v.into_inner()));
        }
        if name == "db.client.operation.duration"
            && let DebugValue::Histogram(samples) = value
        {
            timed.push((labels, samples.len()));
        }
    }
    assert!(described > 0);
    states.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        states,
        [
            ("closed".to_owned(), 1.0),
            ("disabled".to_owned(), 0.0),
            ("half_open".to_owned(), 0.0),
            ("open".to_owned(), 0.0),
        ],
        "one state at 1"
    );
    let label = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let find = |op: &str, error: Option<&str>| {
        timed.iter().find(|(labels, _)| {
            labels.contains(&label("db.system.name", "redis"))
                && labels.contains(&label("db.operation.name", op))
                && error.is_none_or(|e| labels.contains(&label("error.type", e)))
                && (error.is_some() || !labels.iter().any(|(k, _)| k == "error.type"))
        })
    };
    assert!(find("GET", None).is_some_and(|(_, n)| *n >= 1), "{timed:?}");
    assert!(find("SET", None).is_some_and(|(_, n)| *n >= 1), "{timed:?}");
    assert!(find("HSET", Some("server")).is_some(), "{timed:?}");
    assert!(
        find("PIPELINE", None).is_some_and(|(_, n)| *n >= 1),
        "{timed:?}"
    );
}

/// With a pool of one, checkouts hand out the live connection without the
/// pool, but at least once a second a checkout still goes through it: the
/// pool's metrics (`db.client.connection.wait_time`) keep moving, and bb8
/// keeps seeing the connection used (so it rotates it at its maximum
/// lifetime instead of reaping it as idle). Real time: the kept
/// connection's deadline is read from the system clock.
#[tokio::test(flavor = "current_thread")]
async fn the_pool_still_sees_a_checkout_every_second() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().pool_size(1).build().expect("valid"))
        .await
        .expect("starts");
    let waits = || {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == "db.client.connection.wait_time")
            .map(|(.., value)| match value {
                DebugValue::Histogram(samples) => samples.len(),
                _ => 0,
            })
            .sum::<usize>()
    };
    let ping = || async {
        manager
            .query::<String>(&redis::cmd("PING"))
            .await
            .expect("PING")
    };
    ping().await;
    let _ = waits(); // the snapshot drains what was recorded so far
    for _ in 0..50 {
        ping().await;
    }
    assert_eq!(waits(), 0, "checkouts within a second skip the pool");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ping().await;
    ping().await;
    assert_eq!(
        waits(),
        1,
        "the first checkout after a second goes through the pool"
    );
}
