//! What a test saw of the `tracing` output: the fields of every closed span
//! of one name, and every event's fields.
//!
//! `tracing` caches each call site's interest process-wide. Install
//! subscribers with [`install_subscriber`] (as [`Traces::install`] does),
//! which keeps call sites that other tests reach first from being cached
//! as of no interest. One race is left: a call site reached for the first
//! time at the very moment the process registers its first subscriber. A
//! test that must not miss a single event of call sites other tests reach
//! as well is safest in a test binary of its own.

use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::sync::lock;

/// Makes `subscriber` the current thread's subscriber until the guard drops,
/// as [`tracing::subscriber::set_default`] does, and also for call sites that
/// another thread reaches first.
///
/// While a single scoped subscriber exists, `tracing` asks only the
/// registering thread's subscriber whether a new call site is of interest.
/// A call site first reached on a thread without one (another test's) is
/// then cached as of no interest, and its events never reach this
/// subscriber. A second subscriber, registered once and kept, makes
/// `tracing` ask every registered subscriber instead.
pub fn install_subscriber<S>(subscriber: S) -> tracing::subscriber::DefaultGuard
where
    S: Subscriber + Send + Sync + 'static,
{
    static KEPT: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    KEPT.get_or_init(|| tracing::Dispatch::new(Kept));
    tracing::subscriber::set_default(subscriber)
}

/// The kept subscriber of [`install_subscriber`]: wants nothing, and says
/// so (no interest, level off), so that it changes neither which call sites
/// are enabled nor the process' maximum level.
struct Kept;

impl Subscriber for Kept {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::never()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::OFF)
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        false
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// A span's or event's fields, `(name, value)` in the order recorded (a
/// field recorded twice appears twice; [`field`] reads the last).
pub type Fields = Vec<(String, String)>;

/// Records the closed spans named `span_name` and every event, for a test
/// to assert on; see [`install`](Self::install).
#[derive(Clone, Debug)]
pub struct Traces {
    span_name: &'static str,
    spans: Arc<Mutex<Vec<Fields>>>,
    events: Arc<Mutex<Vec<Fields>>>,
}

impl Traces {
    /// Records the spans named `span_name`.
    pub fn new(span_name: &'static str) -> Self {
        Self {
            span_name,
            spans: Arc::default(),
            events: Arc::default(),
        }
    }

    /// Makes this the current thread's subscriber until the guard drops
    /// (use a current-thread runtime).
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        install_subscriber(tracing_subscriber::registry().with(self.clone()))
    }

    /// The fields of each closed span of the name, in closing order.
    pub fn spans(&self) -> Vec<Fields> {
        lock(&self.spans).clone()
    }

    /// The fields of each event, in order.
    pub fn events(&self) -> Vec<Fields> {
        lock(&self.events).clone()
    }

    /// Each event's `message`.
    pub fn messages(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|fields| field(fields, "message"))
            .collect()
    }
}

/// The last value recorded for `name`, or `""`.
pub fn field(fields: &Fields, name: &str) -> String {
    fields
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

struct Recorder<'a>(&'a mut Fields);

impl Visit for Recorder<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S> tracing_subscriber::Layer<S> for Traces
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Recorder(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(&mut Recorder(fields));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && span.name() == self.span_name
        {
            let fields = span
                .extensions()
                .get::<Fields>()
                .cloned()
                .unwrap_or_default();
            lock(&self.spans).push(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Recorder(&mut fields));
        lock(&self.events).push(fields);
    }
}
