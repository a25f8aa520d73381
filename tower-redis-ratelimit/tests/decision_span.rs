//! Each decision has a span whose fields say what was decided and by which
//! policy, and each policy's part is counted per policy. Its own test
//! binary: tracing caches each callsite's interest process-wide, so no test
//! without a subscriber runs beside it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::{TestRedis, Traces, field};
use tower_redis_ratelimit::{Policy, RateLimitLayer};

/// An empty answer behind `layer`.
fn limited(
    layer: &RateLimitLayer,
) -> impl tower::Service<
    Request<()>,
    Response = Response<tower_redis_ratelimit::ResponseBody<Empty<Bytes>>>,
    Error = Infallible,
    Future: Send,
> + Clone {
    tower::Layer::layer(
        layer,
        tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn decisions_have_a_span_with_the_verdict_and_per_policy_counts() {
    let spans = Traces::new("ratelimit");
    let _tracing = spans.install();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let layer = RateLimitLayer::builder(manager)
        .policy(Policy::gcra("burst", 2, Duration::from_secs(3600)))
        .policy(Policy::gcra("hourly", 100, Duration::from_secs(3600)))
        .build()
        .expect("layer");
    let service = limited(&layer);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let mut request = Request::get("/x").body(()).expect("request");
        request
            .extensions_mut()
            .insert(SocketAddr::from(([192, 0, 2, 7], 1)));
        let response = service.clone().oneshot(request).await.expect("infallible");
        statuses.push(response.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );

    let seen: Vec<(String, String, String, String)> = spans
        .spans()
        .iter()
        .map(|f| {
            (
                field(f, "path"),
                field(f, "verdict"),
                field(f, "policy"),
                field(f, "source"),
            )
        })
        .collect();
    let row = |verdict: &str, policy: &str| {
        (
            "/x".to_owned(),
            verdict.to_owned(),
            policy.to_owned(),
            "redis".to_owned(),
        )
    };
    assert_eq!(
        seen,
        [
            row("allowed", "burst"),
            row("allowed", "burst"),
            row("denied", "burst")
        ],
        "the tightest policy when allowed, the one that denied otherwise"
    );

    let mut counts = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "tower_redis_ratelimit_policy_decisions_total" {
            continue;
        }
        let DebugValue::Counter(count) = value else {
            continue;
        };
        let label = |name: &str| {
            key.key()
                .labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_default()
        };
        counts.insert((label("policy"), label("outcome")), count);
    }
    let pair = |p: &str, o: &str| (p.to_owned(), o.to_owned());
    assert_eq!(
        counts.get(&pair("burst", "allowed")),
        Some(&2),
        "{counts:?}"
    );
    assert_eq!(counts.get(&pair("burst", "denied")), Some(&1), "{counts:?}");
    // The hourly policy allowed all three; the request was still denied.
    assert_eq!(
        counts.get(&pair("hourly", "allowed")),
        Some(&3),
        "{counts:?}"
    );
    assert_eq!(counts.get(&pair("hourly", "denied")), None, "{counts:?}");

    // A leased policy: the first request takes a lease from Redis in its
    // future; the next are decided when the service is called, and their
    // spans say the same.
    let layer = RateLimitLayer::builder(
        RedisManager::connect(redis.config().build().expect("valid"))
            .await
            .expect("starts"),
    )
    .policy(
        Policy::gcra("global", 100, Duration::from_secs(3600))
            .key(tower_redis_ratelimit::Key::global())
            .lease(10),
    )
    .build()
    .expect("layer");
    let service = limited(&layer);
    let before = spans.spans().len();
    for _ in 0..3 {
        let request = Request::get("/y").body(()).expect("request");
        let response = service.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
    }
    let leased: Vec<(String, String, String)> = spans.spans()[before..]
        .iter()
        .map(|f| (field(f, "path"), field(f, "verdict"), field(f, "policy")))
        .collect();
    let row = || ("/y".to_owned(), "allowed".to_owned(), "global".to_owned());
    assert_eq!(leased, [row(), row(), row()]);
}
