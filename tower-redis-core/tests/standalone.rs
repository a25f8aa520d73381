//! The manager against one real Redis server: commands, scripts, keys and
//! the round-trip budget.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower_redis_core::redis::{self, Script};
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{BreakerState, RedisManager, Source};

async fn manager_for(redis: &TestRedis) -> RedisManager {
    let config = redis
        .config()
        .key_prefix("test")
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("manager starts");
    assert_eq!(manager.health().state, BreakerState::Closed);
    manager
}

#[tokio::test]
async fn commands_and_pipelines_run_through_the_manager() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let key = manager.keys().key(&["greeting"]);

    manager
        .query::<()>(redis::cmd("SET").arg(&key).arg("hello"))
        .await
        .expect("SET");
    let value: Option<String> = manager
        .query(redis::cmd("GET").arg(&key))
        .await
        .expect("GET");
    assert_eq!(value.as_deref(), Some("hello"));

    let (a, b): (i64, i64) = manager
        .query_pipeline(
            redis::pipe()
                .cmd("INCR")
                .arg(&key[..4])
                .cmd("INCRBY")
                .arg(&key[..4])
                .arg(10),
        )
        .await
        .expect("pipeline");
    assert_eq!((a, b), (1, 11));
}

#[tokio::test]
async fn keys_carry_the_configured_prefix() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let key = manager.keys().key(&["a:b"]);
    manager
        .query::<()>(redis::cmd("SET").arg(&key).arg(1))
        .await
        .expect("SET");

    let mut direct = redis.connection().await.expect("direct connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut direct)
        .await
        .expect("KEYS");
    assert_eq!(keys, vec!["test:a%3Ab".to_owned()]);
}

#[tokio::test]
async fn failover_serves_from_redis_when_it_is_healthy() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let served = manager
        .failover(
            |mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await },
            |_| async { "fallback".to_owned() },
        )
        .await;
    assert_eq!(served.value, "PONG");
    assert_eq!(served.source, Source::Redis);
}

#[tokio::test]
async fn a_refused_command_takes_the_fallback_without_opening_the_breaker() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let key = manager.keys().key(&["list"]);
    manager
        .query::<()>(redis::cmd("LPUSH").arg(&key).arg("x"))
        .await
        .expect("LPUSH");

    for _ in 0..20 {
        // GET on a list is WRONGTYPE: the command fails, Redis is healthy.
        let served = manager
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
        assert!(served.is_fallback());
    }
    assert_eq!(manager.health().state, BreakerState::Closed);
}

#[tokio::test]
async fn one_get_through_the_manager_is_one_command_on_the_server() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let key = manager.keys().key(&["counted"]);
    // Warm every pooled connection so connection setup is not counted.
    for _ in 0..16 {
        let _: Option<String> = manager
            .query(redis::cmd("GET").arg(&key))
            .await
            .expect("GET");
    }
    redis.reset_stats().await.expect("reset stats");

    for _ in 0..100 {
        let _: Option<String> = manager
            .query(redis::cmd("GET").arg(&key))
            .await
            .expect("GET");
    }

    let calls = redis.command_calls().await.expect("commandstats");
    assert_eq!(calls.get("get"), Some(&100), "{calls:?}");
    let others: u64 = calls
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "get" | "info" | "config|resetstat"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        others, 0,
        "no PING or other command per operation: {calls:?}"
    );
}

const SUM_SCRIPT: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";

/// Makes Redis forget every script, on a connection of its own.
async fn script_flush(redis: &TestRedis) {
    let mut direct = redis.connection().await.expect("direct connection");
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut direct)
        .await
        .expect("SCRIPT FLUSH");
}

#[tokio::test]
async fn scripts_keep_working_after_script_flush() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let script = Script::new(SUM_SCRIPT);
    let key = manager.keys().key(&["sum"]);

    let first: i64 = manager
        .invoke_script(script.key(&key).arg(2))
        .await
        .expect("first run loads the script");
    assert_eq!(first, 2);

    script_flush(&redis).await;

    let second: i64 = manager
        .invoke_script(script.key(&key).arg(3))
        .await
        .expect("reloaded");
    assert_eq!(second, 5);
    assert_eq!(manager.health().state, BreakerState::Closed);
}

/// `script_cmd` + `query_script`: the same EVALSHA as a `ScriptInvocation`
/// (keys routed and counted), and the script loaded again when Redis lost it.
#[tokio::test]
async fn a_presized_script_command_is_reloaded_after_script_flush() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let script = Script::new(SUM_SCRIPT);
    let key = manager.keys().key(&["presized"]);
    let run = |amount: i64| {
        let (manager, script, key) = (&manager, &script, &key);
        async move {
            let mut cmd = tower_redis_core::script_cmd(script, &[key.as_str()], 1, 20);
            cmd.arg(amount);
            manager
                .run(|mut conn| async move {
                    tower_redis_core::query_script::<i64>(&mut conn, script, &cmd).await
                })
                .await
        }
    };
    // Never loaded yet: NOSCRIPT, loaded, sent again.
    assert_eq!(run(2).await.expect("loads the script"), 2);
    script_flush(&redis).await;
    assert_eq!(run(3).await.expect("reloaded"), 5);
    assert_eq!(manager.health().state, BreakerState::Closed);
}

#[tokio::test]
async fn scripts_inside_pipelines_are_reloaded_after_script_flush() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let script = Script::new(SUM_SCRIPT);
    let key = manager.keys().key(&["piped"]);
    let other = manager.keys().key(&["other"]);

    script_flush(&redis).await;

    let mut pipe = redis::pipe();
    pipe.invoke_script(script.key(&key).arg(4))
        .cmd("SET")
        .arg(&other)
        .arg("x")
        .ignore();
    let (sum,): (i64,) = manager
        .query_pipeline_with_scripts(&pipe, &[&script])
        .await
        .expect("pipeline reloads the script");
    assert_eq!(sum, 4);
}

#[tokio::test]
async fn the_command_timeout_bounds_a_slow_command() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .command_timeout(Duration::from_millis(100))
        .build()
        .expect("valid");
    let manager = RedisManager::connect(config).await.expect("starts");
    let started = std::time::Instant::now();
    let served = manager
        .failover(
            // A server-side sleep far longer than the timeout.
            |mut conn| async move {
                redis::cmd("EVAL")
                    .arg("local t = redis.call('TIME'); while true do local n = redis.call('TIME'); if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 2000000 then return 1 end end")
                    .arg(0)
                    .query_async::<i64>(&mut conn)
                    .await
            },
            |_| async { -1 },
        )
        .await;
    assert_eq!(served.value, -1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
}

/// The gauge's value, set since the previous snapshot (the debugging
/// recorder hands a gauge's value over and zeroes it).
fn breaker_gauge(snapshotter: &Snapshotter) -> Option<f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(key, _, _, _)| key.key().name() == "tower_redis_breaker_state")
        .and_then(|(_, _, _, value)| match value {
            DebugValue::Gauge(value) => Some(value.into_inner()),
            _ => None,
        })
}

fn gauge_value(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::Open => 1.0,
        BreakerState::HalfOpen => 2.0,
        BreakerState::Disabled => 3.0,
    }
}

/// `tower_redis_breaker_state` is the breaker's state (0 closed, 1 open,
/// 2 half-open) through an outage and a recovery.
#[tokio::test(flavor = "current_thread")]
async fn the_breaker_state_gauge_follows_the_breaker() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager =
        RedisManager::connect(redis.config().failure_threshold(1).build().expect("valid"))
            .await
            .expect("starts");
    assert_eq!(manager.health().state, BreakerState::Closed);
    assert_eq!(breaker_gauge(&snapshotter), Some(0.0), "closed");

    redis.stop().await;
    let failed = manager
        .query::<Option<String>>(redis::cmd("GET").arg("k"))
        .await;
    assert!(failed.is_err(), "{failed:?}");
    // No await since the failure: the probe has not run yet.
    assert_eq!(manager.health().state, BreakerState::Open);
    assert_eq!(breaker_gauge(&snapshotter), Some(1.0), "open");

    // Probing (half-open) and failing (open) while Redis is down.
    let mut states = manager.subscribe();
    tokio::time::timeout(
        Duration::from_secs(15),
        states.wait_for(|s| *s == BreakerState::HalfOpen),
    )
    .await
    .expect("a probe within 15 s")
    .expect("the manager is alive");
    assert_eq!(
        breaker_gauge(&snapshotter),
        Some(gauge_value(manager.health().state)),
        "half-open or, once the probe failed, open"
    );

    // Redis was still down: the probe that succeeds comes after the restart
    // and passes through half-open (2), so a gauge the closing did not set
    // would not read 0.
    redis.restart().await;
    tokio::time::timeout(
        Duration::from_secs(15),
        states.wait_for(|s| *s == BreakerState::Closed),
    )
    .await
    .expect("closed within 15 s of the restart")
    .expect("the manager is alive");
    assert_eq!(breaker_gauge(&snapshotter), Some(0.0), "closed again");
}
