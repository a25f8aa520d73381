//! Spans: one per Redis operation, with OpenTelemetry's database client
//! attributes. Its own test binary, so that no test without a subscriber
//! runs beside it (tracing caches each callsite's interest process-wide).

use tower_redis_core::RedisManager;
use tower_redis_core::redis;
use tower_redis_core::testing::TestRedis;

/// A span per Redis operation with OpenTelemetry's database client
/// attributes, and the fallback's debug event still emitted with the
/// `metrics` feature on (this test crate enables it).
#[tokio::test(flavor = "current_thread")]
async fn each_operation_has_a_span_with_the_database_client_attributes() {
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::{Context, SubscriberExt};

    type Recorded = Vec<(String, String)>;
    #[derive(Default, Clone)]
    struct Seen {
        spans: Arc<Mutex<Vec<Recorded>>>,
        events: Arc<Mutex<Vec<String>>>,
    }
    struct Fields<'a>(&'a mut Vec<(String, String)>);
    impl tracing::field::Visit for Fields<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.push((field.name().to_owned(), format!("{value:?}")));
        }
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            self.0.push((field.name().to_owned(), value.to_owned()));
        }
    }
    impl<S> tracing_subscriber::Layer<S> for Seen
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
                && span.name() == "redis"
            {
                let fields = span
                    .extensions()
                    .get::<Recorded>()
                    .cloned()
                    .unwrap_or_default();
                self.spans.lock().expect("lock").push(fields);
            }
        }
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
            let mut fields = Vec::new();
            event.record(&mut Fields(&mut fields));
            for (name, value) in fields {
                if name == "message" {
                    self.events.lock().expect("lock").push(value);
                }
            }
        }
    }

    let seen = Seen::default();
    let subscriber = tracing_subscriber::registry().with(seen.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

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

    let spans = seen.spans.lock().expect("lock").clone();
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
    let events = seen.events.lock().expect("lock").clone();
    assert!(
        events.iter().any(|e| e.contains("using the fallback")),
        "the fallback's debug event: {events:?}"
    );
}
