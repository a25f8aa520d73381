//! Degraded decisions are visible in metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;
use tower_redis_ratelimit::{Policy, RateLimitLayer};

#[tokio::test(flavor = "current_thread")]
async fn decisions_are_counted_by_outcome_and_source() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let layer = RateLimitLayer::builder(manager)
        .policy(Policy::gcra("per-ip", 1, Duration::from_secs(3600)))
        .build()
        .expect("layer");
    let service = tower::Layer::layer(
        &layer,
        tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }),
    );
    let request = || {
        let mut request = Request::get("/").body(()).expect("request");
        request
            .extensions_mut()
            .insert(SocketAddr::from(([192, 0, 2, 1], 1)));
        request
    };
    service
        .clone()
        .oneshot(request())
        .await
        .expect("infallible");
    redis.kill().await;
    for _ in 0..3 {
        service
            .clone()
            .oneshot(request())
            .await
            .expect("infallible");
    }

    let mut by_source = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "tower_redis_ratelimit_decisions_total" {
            continue;
        }
        let DebugValue::Counter(count) = value else {
            continue;
        };
        let source = key
            .key()
            .labels()
            .find(|l| l.key() == "source")
            .map(|l| l.value().to_owned())
            .expect("source label");
        *by_source.entry(source).or_insert(0) += count;
    }
    assert_eq!(by_source.get("redis"), Some(&1), "{by_source:?}");
    assert_eq!(by_source.get("local"), Some(&3), "{by_source:?}");
}
