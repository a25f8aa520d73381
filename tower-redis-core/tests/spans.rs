//! Spans: one per Redis operation, with OpenTelemetry's database client
//! attributes. Its own test binary, so that no test without a subscriber
//! runs beside it (tracing caches each callsite's interest process-wide).

use tower_redis_core::RedisManager;
use tower_redis_core::redis;
use tower_redis_core::testing::{TestRedis, Traces};

/// A span per Redis operation with OpenTelemetry's database client
/// attributes, and the fallback's debug event still emitted with the
/// `metrics` feature on (this test crate enables it).
#[tokio::test(flavor = "current_thread")]
async fn each_operation_has_a_span_with_the_database_client_attributes() {
    let seen = Traces::new("redis");
    let _guard = seen.install();

    let redis = TestRedis::start().await;
    let manager =
        RedisManager::connect(redis.config().failure_threshold(5).build().expect("valid"))
            .await
            .expect("starts");
    let port = redis.url().rsplit(':').next().expect("port").to_owned();
    let key = manager.keys().key(&["k"]);
    let _: Option<String> = manager
        .query(redis::cmd("GET").arg(&key))
        .await
        .expect("GET");
    let _: () = manager
        .query(redis::cmd("HSET").arg(&key).arg("f").arg("v"))
        .await
        .expect("HSET");
    let hash = key.clone();
    let served = manager
        .failover(
            |mut conn| async move {
                redis::cmd("GET")
                    .arg(&hash)
                    .query_async::<Option<String>>(&mut conn)
                    .await
                    .map(Option::unwrap_or_default)
            },
            |_| async { "fallback".to_owned() },
        )
        .await;
    assert_eq!(served.value, "fallback", "GET on a hash fails (WRONGTYPE)");

    let spans = seen.spans();
    let has = |fields: &Vec<(String, String)>, k: &str, v: &str| {
        fields.iter().any(|(fk, fv)| fk == k && fv == v)
    };
    let get = spans
        .iter()
        .find(|f| has(f, "db.operation.name", "GET") && !f.iter().any(|(k, _)| k == "error.type"))
        .unwrap_or_else(|| panic!("a GET span in {spans:?}"));
    assert!(has(get, "db.system.name", "redis"), "{get:?}");
    assert!(has(get, "server.address", "127.0.0.1"), "{get:?}");
    assert!(has(get, "server.port", &port), "{get:?}");
    assert!(
        spans.iter().any(|f| has(f, "db.operation.name", "HSET")),
        "{spans:?}"
    );
    assert!(
        spans
            .iter()
            .any(|f| has(f, "db.operation.name", "GET") && has(f, "error.type", "server")),
        "the failed GET records error.type: {spans:?}"
    );
    let events = seen.messages();
    assert!(
        events.iter().any(|e| e.contains("using the fallback")),
        "the fallback's debug event: {events:?}"
    );
}
