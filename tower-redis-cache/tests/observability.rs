//! Hits, misses and degraded answers are counted with `metrics`.

use std::collections::HashMap;
use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, Full};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;

#[tokio::test(flavor = "current_thread")]
async fn results_are_counted_with_their_degraded_flag() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let layer = CacheLayer::builder(manager).build().expect("layer");
    let service = tower::Layer::layer(
        &layer,
        tower::service_fn(|_: Request<Empty<Bytes>>| async {
            let mut response = Response::new(Full::new(Bytes::from_static(b"hello")));
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, "max-age=60".parse().expect("value"));
            Ok::<_, Infallible>(response)
        }),
    );
    let get = || {
        Request::get("/x")
            .header(header::HOST, "a.example")
            .body(Empty::new())
            .expect("request")
    };
    for _ in 0..3 {
        let response = service.clone().oneshot(get()).await.expect("infallible");
        response.into_body().collect().await.expect("body");
        layer.flush().await;
    }

    let mut counts: HashMap<String, u64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "tower_redis_cache_requests_total" {
            continue;
        }
        let DebugValue::Counter(n) = value else {
            continue;
        };
        let result = key
            .key()
            .labels()
            .find(|l| l.key() == "result")
            .map(|l| l.value().to_owned())
            .expect("label");
        *counts.entry(result).or_default() += n;
    }
    assert_eq!(counts.get("uri-miss"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("hit"), Some(&2), "{counts:?}");
}
