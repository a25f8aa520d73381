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
use tower_redis_ratelimit::{Fallback, Policy, RateLimitLayer};

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

/// Every decision is counted with how it was made: the `source` label says
/// whether Redis decided (`redis`, or `blocked_cache` for a key Redis blocked
/// that is answered in process) or the layer decided without it, degraded
/// (`local`, `fail_open`, `fail_closed`), and `shadow` whether it was only
/// observed.
#[tokio::test(flavor = "current_thread")]
async fn degraded_decisions_are_labelled_with_how_they_were_made() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let layer = |fallback, shadow| {
        let layer = RateLimitLayer::builder(manager.clone())
            .policy(Policy::gcra("per-ip", 1, Duration::from_secs(3600)))
            .fallback(fallback)
            .shadow(shadow)
            .build()
            .expect("layer");
        tower::Layer::layer(
            &layer,
            tower::service_fn(|_: Request<()>| async {
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }),
        )
    };
    let local = layer(Fallback::Local { share: 1.0 }, false);
    let open = layer(Fallback::Allow, false);
    let closed = layer(Fallback::Deny, false);
    let shadow = layer(Fallback::Allow, true);
    let request = |last: u8| {
        let mut request = Request::get("/").body(()).expect("request");
        request
            .extensions_mut()
            .insert(SocketAddr::from(([192, 0, 2, last], 1)));
        request
    };
    macro_rules! decide {
        ($service:expr, $client:expr) => {
            $service
                .clone()
                .oneshot(request($client))
                .await
                .expect("infallible")
                .status()
                .as_u16()
        };
    }
    // Redis up: allowed, denied, then denied from the blocked-key cache.
    assert_eq!(decide!(local, 1), 200);
    assert_eq!(decide!(local, 1), 429);
    assert_eq!(decide!(local, 1), 429);
    assert_eq!(decide!(shadow, 2), 200);

    redis.kill().await;
    // Redis down: each fallback, degraded.
    assert_eq!(decide!(local, 3), 200);
    assert_eq!(decide!(local, 3), 429);
    assert_eq!(decide!(open, 4), 200);
    assert_eq!(decide!(closed, 5), 429);
    assert_eq!(decide!(shadow, 6), 200);

    let mut counted = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "tower_redis_ratelimit_decisions_total" {
            continue;
        }
        let DebugValue::Counter(count) = value else {
            panic!("a counter, not {value:?}");
        };
        let label = |name: &str| {
            key.key()
                .labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_else(|| panic!("no {name} label on {key:?}"))
        };
        *counted
            .entry((label("outcome"), label("source"), label("shadow")))
            .or_insert(0) += count;
    }
    let expected: std::collections::BTreeMap<_, _> = [
        (("allowed", "redis", "false"), 1),
        (("denied", "redis", "false"), 1),
        (("denied", "blocked_cache", "false"), 1),
        (("allowed", "redis", "true"), 1),
        (("allowed", "local", "false"), 1),
        (("denied", "local", "false"), 1),
        (("allowed", "fail_open", "false"), 1),
        (("denied", "fail_closed", "false"), 1),
        (("allowed", "fail_open", "true"), 1),
    ]
    .into_iter()
    .map(|((o, s, sh), n)| ((o.to_owned(), s.to_owned(), sh.to_owned()), n))
    .collect();
    assert_eq!(counted, expected);
}
