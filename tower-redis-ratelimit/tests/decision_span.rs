//! Each decision has a span whose fields say what was decided and by which
//! policy, and each policy's part is counted per policy. Its own test
//! binary: tracing caches each callsite's interest process-wide, so no test
//! without a subscriber runs beside it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;
use tower_redis_ratelimit::{Policy, RateLimitLayer};
use tracing_subscriber::layer::{Context, SubscriberExt};

type Recorded = Vec<(String, String)>;

/// The fields of every closed span named `ratelimit`.
#[derive(Default, Clone)]
struct Spans(Arc<Mutex<Vec<Recorded>>>);

struct Fields<'a>(&'a mut Recorded);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S> tracing_subscriber::Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }
    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Recorded>()
        {
            values.record(&mut Fields(fields));
        }
    }
    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && span.name() == "ratelimit"
        {
            let fields = span
                .extensions()
                .get::<Recorded>()
                .cloned()
                .unwrap_or_default();
            self.0.lock().expect("lock").push(fields);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn decisions_have_a_span_with_the_verdict_and_per_policy_counts() {
    let spans = Spans::default();
    let _tracing =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
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
    let service = tower::Layer::layer(
        &layer,
        tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }),
    );
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

    let spans = spans.0.lock().expect("lock").clone();
    let field = |fields: &Recorded, name: &str| {
        fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let seen: Vec<(String, String, String, String)> = spans
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
}
