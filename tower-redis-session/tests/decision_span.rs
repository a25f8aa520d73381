//! Each request has a `session` span whose fields record what the layer
//! did (loaded, saved, created), and loads and saves are counted. Its own
//! test binary: tracing caches each callsite's interest process-wide, so no
//! test without a subscriber runs beside it.

use std::convert::Infallible;

use http::{Request, Response, header};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::{TestRedis, Traces, field};
use tower_redis_session::{Session, SessionLayer};

#[tokio::test(flavor = "current_thread")]
async fn each_request_has_a_span_saying_what_was_loaded_and_saved() {
    let spans = Traces::new("session");
    let _tracing = spans.install();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let layer = SessionLayer::builder(manager)
        .insecure_http_for_local_development()
        .build()
        .expect("layer");
    let service = tower::Layer::layer(
        &layer,
        tower::service_fn(|request: Request<()>| async move {
            let session = request
                .extensions()
                .get::<Session>()
                .expect("the layer adds it")
                .clone();
            let visits: u32 = session.get("visits").await.expect("get").unwrap_or(0) + 1;
            session.insert("visits", visits).await.expect("insert");
            Ok::<_, Infallible>(Response::new(visits.to_string()))
        }),
    );

    let first = service
        .clone()
        .oneshot(Request::new(()))
        .await
        .expect("infallible");
    let cookie = first.headers()[header::SET_COOKIE]
        .to_str()
        .expect("text")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let request = Request::builder()
        .header(header::COOKIE, &cookie)
        .body(())
        .expect("request");
    let second = service.clone().oneshot(request).await.expect("infallible");
    assert_eq!(second.into_body(), "2");

    let spans = spans.spans();
    let seen: Vec<[String; 4]> = spans
        .iter()
        .map(|f| {
            [
                field(f, "cookie"),
                field(f, "loaded"),
                field(f, "saved"),
                field(f, "save_result"),
            ]
        })
        .collect();
    let row = |cookie: &str, loaded: &str, saved: &str| {
        [cookie, loaded, saved, "written"].map(str::to_owned)
    };
    assert_eq!(
        seen,
        [row("false", "", "created"), row("true", "found", "saved")],
        "no cookie: nothing loaded, a session created; then loaded and saved"
    );

    let mut counts = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        if !name.starts_with("tower_redis_session_") {
            continue;
        }
        let DebugValue::Counter(count) = value else {
            continue;
        };
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        counts.insert(format!("{name}{{{}}}", labels.join(",")), count);
    }
    assert_eq!(
        counts.get("tower_redis_session_loads_total{result=found}"),
        Some(&1),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("tower_redis_session_saves_total{kind=created,result=written}"),
        Some(&1),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("tower_redis_session_saves_total{kind=saved,result=written}"),
        Some(&1),
        "{counts:?}"
    );
}
