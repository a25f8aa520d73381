//! Each request the cache handles has a span whose fields record the
//! outcome; near hits are counted; the per-answer trace event is still
//! emitted with the `metrics` feature on (this test crate enables it). Its
//! own test binary: tracing caches each callsite's interest process-wide,
//! so no test without a subscriber runs beside it.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, Full};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::{TestRedis, Traces, field};

#[tokio::test(flavor = "current_thread")]
async fn each_answer_has_a_span_with_its_cache_status_and_near_hits_are_counted() {
    let seen = Traces::new("cache");
    let _tracing = seen.install();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let layer = CacheLayer::builder(manager.clone())
        .near_cache(1 << 20, Duration::from_secs(60))
        .build()
        .expect("layer");
    // The near tier is used once client tracking is up.
    tower_redis_core::testing::wait_for_tracking(&manager, Duration::from_secs(10)).await;
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
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let request = Request::get("/x")
            .header(header::HOST, "a.example")
            .body(Empty::new())
            .expect("request");
        let response = service.clone().oneshot(request).await.expect("infallible");
        statuses.push(
            response.headers()["cache-status"]
                .to_str()
                .expect("text")
                .to_owned(),
        );
        response.into_body().collect().await.expect("body");
        layer.flush().await;
    }

    let spans = seen.spans();
    let recorded: Vec<(String, String, String)> = spans
        .iter()
        .map(|f| {
            (
                field(f, "path"),
                field(f, "result"),
                field(f, "cache_status"),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = statuses
        .iter()
        .map(|status| {
            let result = if status.contains("; hit") {
                "hit"
            } else {
                "uri-miss"
            };
            ("/x".to_owned(), result.to_owned(), status.clone())
        })
        .collect();
    assert_eq!(recorded, expected, "one span per request, with its outcome");
    assert_eq!(recorded[0].1, "uri-miss");

    let near_answers = statuses
        .iter()
        .filter(|s| s.contains("detail=near"))
        .count();
    assert!(near_answers >= 1, "{statuses:?}");
    let near_hits: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| key.key().name() == "tower_redis_cache_near_hits_total")
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(count) => count,
            _ => 0,
        })
        .sum();
    assert_eq!(
        near_hits,
        u64::try_from(near_answers).expect("small"),
        "{statuses:?}"
    );

    // The trace event of each answer, with the `metrics` feature on.
    let answered = seen
        .events()
        .iter()
        .filter(|f| field(f, "message") == "answered")
        .count();
    assert_eq!(answered, 4);
}
