//! Each request has a `session` span whose fields record what the layer
//! did (loaded, saved, created), and loads and saves are counted. Its own
//! test binary: tracing caches each callsite's interest process-wide, so no
//! test without a subscriber runs beside it.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, Response, header};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;
use tower_redis_session::{Session, SessionLayer};
use tracing_subscriber::layer::{Context, SubscriberExt};

type Recorded = Vec<(String, String)>;

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
            && span.name() == "session"
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
async fn each_request_has_a_span_saying_what_was_loaded_and_saved() {
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

    let spans = spans.0.lock().expect("lock").clone();
    let field = |fields: &Recorded, name: &str| {
        fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
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
