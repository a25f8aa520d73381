//! Each data cache read has a `data` span with its key, and the factory
//! runs inside it. Its own test binary: tracing caches each callsite's
//! interest process-wide, so no test without a subscriber runs beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tower_redis_cache::data::{DataCache, DataOptions};
use tower_redis_core::RedisManager;
use tower_redis_core::testing::{TestRedis, Traces, field};

#[tokio::test(flavor = "current_thread")]
async fn each_read_has_a_data_span_and_the_factory_runs_inside_it() {
    let seen = Traces::new("data");
    let _tracing = seen.install();
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let data = DataCache::new(manager);
    let options = DataOptions::default().near(false);

    let made: String = data
        .get_or_insert_with("product:1", &options, || async {
            let span = tracing::Span::current();
            let name = span.metadata().map_or("none", |m| m.name());
            Ok::<_, std::io::Error>(format!("made in {name}"))
        })
        .await
        .expect("made");
    assert_eq!(
        made, "made in data",
        "the factory runs inside the read's span"
    );
    let found: String = data
        .get_or_insert_with("product:1", &options, || async {
            Err::<String, _>(std::io::Error::other("the value is stored"))
        })
        .await
        .expect("a hit");
    assert_eq!(found, made);

    let keys: Vec<String> = seen.spans().iter().map(|f| field(f, "key")).collect();
    assert_eq!(keys, ["product:1", "product:1"], "one span per read");
}
