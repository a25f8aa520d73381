//! One way to count things: the `metrics` facade when the `metrics` feature
//! is on, nothing at all when it is off, so callers write one line instead
//! of a `#[cfg(feature = "metrics")]` pair of functions.
//!
//! Names and label values are `&'static str`, as every metric of the
//! project is: recording costs what the `metrics` macros cost with
//! runtime labels (one small label vector), and nothing without the feature.
//!
//! ```
//! use tower_redis_core::record;
//!
//! record::counter("tower_redis_fallbacks_total", &[("reason", "timeout")], 1);
//! record::gauge("tower_redis_breaker_state", &[], 1.0);
//! ```

/// Labels of one measurement: `(name, value)` pairs.
pub type Labels<'a> = &'a [(&'static str, &'static str)];

/// Adds `value` to the counter `name` with `labels`.
#[inline]
pub fn counter(name: &'static str, labels: Labels<'_>, value: u64) {
    #[cfg(feature = "metrics")]
    metrics::counter!(name, labels).increment(value);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, labels, value);
}

/// A name and labels fixed at compile time, whose `metrics` key is built on
/// first use and kept (with its hash, once a recorder has asked for it).
#[derive(Debug)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
struct FixedKey {
    name: &'static str,
    labels: Labels<'static>,
    #[cfg(feature = "metrics")]
    key: std::sync::OnceLock<metrics::Key>,
}

impl FixedKey {
    const fn new(name: &'static str, labels: Labels<'static>) -> Self {
        Self {
            name,
            labels,
            #[cfg(feature = "metrics")]
            key: std::sync::OnceLock::new(),
        }
    }

    #[cfg(feature = "metrics")]
    fn key(&self) -> &metrics::Key {
        self.key
            .get_or_init(|| metrics::Key::from_parts(self.name, self.labels))
    }
}

/// Adds `value` to the counter with the kept `key`, through the recorder
/// in effect (a local one, else the global one), as the macros do.
#[cfg(feature = "metrics")]
fn count_by_key(key: &metrics::Key, value: u64) {
    metrics::with_recorder(|recorder| {
        recorder.register_counter(key, &METADATA).increment(value);
    });
}

#[cfg(feature = "metrics")]
static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// A counter whose name and labels are fixed, for hot paths: its key is
/// built on first use and kept, so that counting allocates nothing (the
/// `metrics` macros build the key, labels included, on every call).
/// Declare one `static` per label set. It counts through the recorder in
/// effect at each call (a local one, else the global one), as the macros do.
///
/// ```
/// use tower_redis_core::record::Counter;
///
/// static NEAR_HITS: Counter = Counter::new("my_near_hits_total", &[("tier", "near")]);
/// NEAR_HITS.increment(1);
/// ```
#[derive(Debug)]
pub struct Counter(FixedKey);

impl Counter {
    /// The counter `name` with `labels`.
    pub const fn new(name: &'static str, labels: Labels<'static>) -> Self {
        Self(FixedKey::new(name, labels))
    }

    /// Adds `value` to it.
    #[inline]
    pub fn increment(&self, value: u64) {
        #[cfg(feature = "metrics")]
        count_by_key(self.0.key(), value);
        #[cfg(not(feature = "metrics"))]
        let _ = (&self.0, value);
    }
}

/// A histogram whose name and labels are fixed: [`Counter`]'s counterpart.
#[derive(Debug)]
pub struct Histogram(FixedKey);

impl Histogram {
    /// The histogram `name` with `labels`.
    pub const fn new(name: &'static str, labels: Labels<'static>) -> Self {
        Self(FixedKey::new(name, labels))
    }

    /// Records `value` in it.
    #[inline]
    pub fn record(&self, value: f64) {
        #[cfg(feature = "metrics")]
        metrics::with_recorder(|recorder| {
            recorder
                .register_histogram(self.0.key(), &METADATA)
                .record(value);
        });
        #[cfg(not(feature = "metrics"))]
        let _ = (&self.0, value);
    }
}

/// Sets the gauge `name` with `labels` to `value`.
#[inline]
pub fn gauge(name: &'static str, labels: Labels<'_>, value: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(name, labels).set(value);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, labels, value);
}

/// Adds `value` to the counter `name` with `labels` and one more label
/// whose value is only known at run time (a rate-limit policy's name, say).
/// Its values must come from configuration, never from requests, so that
/// the number of series stays bounded. Builds the key on every call: on a
/// hot path, keep a [`NamedCounter`] instead.
#[inline]
pub fn counter_named(
    name: &'static str,
    labels: Labels<'_>,
    named: (&'static str, &str),
    value: u64,
) {
    NamedCounter::new(name, labels, named).increment(value);
}

/// A counter whose labels are fixed when it is made, one of them known
/// only at run time (a policy's name, say): its key is built once, in
/// [`NamedCounter::new`], so that counting allocates nothing. The run-time
/// value must come from configuration, never from requests, so that the
/// number of series stays bounded.
///
/// ```
/// use tower_redis_core::record::NamedCounter;
///
/// let allowed = NamedCounter::new("my_decisions_total", &[("outcome", "allowed")], ("policy", "per-ip"));
/// allowed.increment(1);
/// ```
#[derive(Debug, Clone)]
pub struct NamedCounter {
    #[cfg(feature = "metrics")]
    key: metrics::Key,
}

impl NamedCounter {
    /// The counter `name` with `labels` and the label `named` (name, value).
    pub fn new(name: &'static str, labels: Labels<'_>, named: (&'static str, &str)) -> Self {
        #[cfg(feature = "metrics")]
        {
            let mut all: Vec<metrics::Label> = Vec::with_capacity(labels.len() + 1);
            all.extend(
                labels
                    .iter()
                    .map(|&(k, v)| metrics::Label::from_static_parts(k, v)),
            );
            all.push(metrics::Label::new(named.0, named.1.to_owned()));
            Self {
                key: metrics::Key::from_parts(name, all),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (name, labels, named);
            Self {}
        }
    }

    /// Adds `value` to it, through the recorder in effect.
    #[inline]
    pub fn increment(&self, value: u64) {
        #[cfg(feature = "metrics")]
        count_by_key(&self.key, value);
        #[cfg(not(feature = "metrics"))]
        let _ = value;
    }
}

/// Records `value` in the histogram `name` with `labels`.
#[inline]
pub fn histogram(name: &'static str, labels: Labels<'_>, value: f64) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(name, labels).record(value);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, labels, value);
}

/// A start time for a duration that is recorded only with the `metrics`
/// feature: without it this is zero-sized and reads no clock.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    #[cfg(feature = "metrics")]
    at: std::time::Instant,
}

impl Started {
    /// Now.
    #[inline]
    pub fn now() -> Self {
        Self {
            #[cfg(feature = "metrics")]
            at: std::time::Instant::now(),
        }
    }

    /// Seconds since [`Started::now`] (0 without the `metrics` feature).
    #[inline]
    pub fn elapsed_secs(&self) -> f64 {
        #[cfg(feature = "metrics")]
        return self.at.elapsed().as_secs_f64();
        #[cfg(not(feature = "metrics"))]
        0.0
    }
}

/// The pool's figures after a checkout from the standalone pool: the
/// checkout's wait (`db.client.connection.wait_time`), the connections by
/// state (`db.client.connection.count`, `state` = `idle` / `used`) and the
/// pool's size (`db.client.connection.max`).
#[inline]
pub fn pool_checkout(waited: Started, connections: u32, idle: u32, max: u32) {
    histogram(DB_CLIENT_CONNECTION_WAIT_TIME, &[], waited.elapsed_secs());
    gauge(
        DB_CLIENT_CONNECTION_COUNT,
        &[("db.client.connection.state", "idle")],
        f64::from(idle),
    );
    gauge(
        DB_CLIENT_CONNECTION_COUNT,
        &[("db.client.connection.state", "used")],
        f64::from(connections.saturating_sub(idle)),
    );
    gauge(DB_CLIENT_CONNECTION_MAX, &[], f64::from(max));
}

/// Measures the latency a layer adds to one request: the time from the
/// layer's `call` until its response is ready, minus the time spent in the
/// inner service's futures ([`LayerClock::inner`]), or in its `call` and
/// future ([`LayerClock::inner_started`] to [`LayerClock::inner_ended`]). Recorded once, when the
/// clock is dropped (at the end of the layer's response future), in
/// [`TOWER_REDIS_LAYER_OVERHEAD_DURATION`] with label `layer`. Without the
/// `metrics` feature it is zero-sized and [`LayerClock::inner`] only awaits.
#[derive(Debug)]
pub struct LayerClock {
    #[cfg(feature = "metrics")]
    layer: &'static str,
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
    #[cfg(feature = "metrics")]
    inner_ns: std::sync::atomic::AtomicU64,
}

impl LayerClock {
    /// Starts timing a request in `layer` (`cache`, `ratelimit`, `session`).
    #[inline]
    pub fn start(layer: &'static str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = layer;
        Self {
            #[cfg(feature = "metrics")]
            layer,
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
            #[cfg(feature = "metrics")]
            inner_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The inner service's future, its time counted as not the layer's
    /// (from this call until it is ready).
    ///
    /// It wraps `future` (`map`) rather than awaiting it in an `async fn`,
    /// which would hold the future twice: once as its argument and once
    /// where it is awaited, in every layer's boxed response future.
    #[inline]
    pub fn inner<'a, F: std::future::Future + 'a>(
        &'a self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> + 'a {
        Self::time_inner(self, future)
    }

    /// [`inner`](Self::inner) for a clock held through any pointer: an
    /// `Arc` kept by a call that outlives a borrow of the clock.
    #[inline]
    pub fn time_inner<C, F>(clock: C, future: F) -> impl std::future::Future<Output = F::Output>
    where
        C: std::ops::Deref<Target = LayerClock>,
        F: std::future::Future,
    {
        #[cfg(feature = "metrics")]
        {
            use futures_util::FutureExt;
            let started = std::time::Instant::now();
            future.map(move |output| {
                clock.add_inner_since(started);
                output
            })
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = clock;
            future
        }
    }

    /// For a response future written by hand: the inner service's call
    /// begins now. Pass what it returns to [`inner_ended`](Self::inner_ended)
    /// when that call is ready.
    #[inline]
    pub fn inner_started(&self) -> InnerStarted {
        InnerStarted {
            #[cfg(feature = "metrics")]
            at: std::time::Instant::now(),
        }
    }

    /// The inner service's call begun at `started` is ready: its time is
    /// counted as not the layer's.
    #[inline]
    pub fn inner_ended(&self, started: InnerStarted) {
        #[cfg(feature = "metrics")]
        self.add_inner_since(started.at);
        #[cfg(not(feature = "metrics"))]
        let _ = started;
    }

    /// Counts the time since `started` as the inner service's.
    #[cfg(feature = "metrics")]
    fn add_inner_since(&self, started: std::time::Instant) {
        let spent = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.inner_ns
            .fetch_add(spent, std::sync::atomic::Ordering::Relaxed);
    }
}

/// When the inner service's call began ([`LayerClock::inner_started`]).
/// Without the `metrics` feature it is zero-sized.
#[derive(Debug, Clone, Copy)]
pub struct InnerStarted {
    #[cfg(feature = "metrics")]
    at: std::time::Instant,
}

#[cfg(feature = "metrics")]
impl Drop for LayerClock {
    fn drop(&mut self) {
        let total = self.started.elapsed().as_secs_f64();
        let inner = self.inner_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
        let overhead = (total - inner).max(0.0);
        // The project's layers through fixed keys: recording allocates nothing.
        static LAYERS: [(&str, Histogram); 3] = [
            (
                "cache",
                Histogram::new(TOWER_REDIS_LAYER_OVERHEAD_DURATION, &[("layer", "cache")]),
            ),
            (
                "ratelimit",
                Histogram::new(
                    TOWER_REDIS_LAYER_OVERHEAD_DURATION,
                    &[("layer", "ratelimit")],
                ),
            ),
            (
                "session",
                Histogram::new(TOWER_REDIS_LAYER_OVERHEAD_DURATION, &[("layer", "session")]),
            ),
        ];
        match LAYERS.iter().find(|(layer, _)| *layer == self.layer) {
            Some((_, fixed)) => fixed.record(overhead),
            None => histogram(
                TOWER_REDIS_LAYER_OVERHEAD_DURATION,
                &[("layer", self.layer)],
                overhead,
            ),
        }
    }
}

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution of values.
    Histogram,
}

/// One metric of the project, as [`METRICS`] lists it.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The name given to the `metrics` facade (a Prometheus exporter turns
    /// dots into underscores).
    pub name: &'static str,
    /// Its labels.
    pub labels: &'static [&'static str],
    /// Seconds, bytes, or a plain count.
    pub unit: Option<&'static str>,
    /// The help text.
    pub help: &'static str,
}

const fn metric(
    kind: Kind,
    name: &'static str,
    labels: &'static [&'static str],
    unit: Option<&'static str>,
    help: &'static str,
) -> Metric {
    Metric {
        kind,
        name,
        labels,
        unit,
        help,
    }
}

/// The name of the Redis operation duration histogram (OpenTelemetry's
/// database client convention).
pub const DB_CLIENT_OPERATION_DURATION: &str = "db.client.operation.duration";

/// The pool checkout wait histogram (OpenTelemetry's database client
/// connection metrics).
pub const DB_CLIENT_CONNECTION_WAIT_TIME: &str = "db.client.connection.wait_time";

/// The pool's connections by `db.client.connection.state` (`idle`, `used`).
pub const DB_CLIENT_CONNECTION_COUNT: &str = "db.client.connection.count";

/// The pool's maximum size.
pub const DB_CLIENT_CONNECTION_MAX: &str = "db.client.connection.max";

/// The latency a layer adds to a request, its inner service's time left out.
pub const TOWER_REDIS_LAYER_OVERHEAD_DURATION: &str = "tower_redis.layer.overhead.duration";

/// Every metric the four crates record (with their `metrics` feature).
/// [`describe`] gives each its help text; docs/OBSERVABILITY.md lists them.
pub const METRICS: &[Metric] = &[
    // tower-redis-core
    metric(
        Kind::Counter,
        "tower_redis_breaker_transitions_total",
        &["from", "to"],
        None,
        "Circuit breaker transitions, by the state left and the state entered.",
    ),
    metric(
        Kind::Gauge,
        "tower_redis_breaker_state",
        &[],
        None,
        "The circuit breaker's state as a number: 0 closed, 1 open, 2 half-open, 3 disabled.",
    ),
    metric(
        Kind::Gauge,
        "tower_redis_breaker_in_state",
        &["state"],
        None,
        "1 for the circuit breaker's current state (closed, open, half_open, disabled), 0 for the others.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_fallbacks_total",
        &["reason"],
        None,
        "Operations answered by their in-process fallback instead of Redis, by reason.",
    ),
    metric(
        Kind::Histogram,
        DB_CLIENT_OPERATION_DURATION,
        &["db.system.name", "db.operation.name", "error.type"],
        Some("seconds"),
        "Duration of Redis commands and pipelines, from sending to the answer (error.type only on failures).",
    ),
    metric(
        Kind::Histogram,
        DB_CLIENT_CONNECTION_WAIT_TIME,
        &[],
        Some("seconds"),
        "Time a command waited to check a connection out of the standalone pool.",
    ),
    metric(
        Kind::Gauge,
        DB_CLIENT_CONNECTION_COUNT,
        &["db.client.connection.state"],
        None,
        "Connections in the standalone pool, by state (idle, used), as of the last checkout.",
    ),
    metric(
        Kind::Gauge,
        DB_CLIENT_CONNECTION_MAX,
        &[],
        None,
        "The most connections the standalone pool opens (RedisConfig pool_size).",
    ),
    metric(
        Kind::Histogram,
        TOWER_REDIS_LAYER_OVERHEAD_DURATION,
        &["layer"],
        Some("seconds"),
        "Latency a layer adds to a request: its time until the response is ready, minus the inner service's.",
    ),
    metric(
        Kind::Gauge,
        "tower_redis_degraded",
        &["layer"],
        None,
        "1 while a layer serves without Redis, 0 otherwise.",
    ),
    metric(
        Kind::Gauge,
        "tower_redis_outage_queue_bytes",
        &["layer"],
        Some("bytes"),
        "Bytes of changes queued during an outage, waiting to be written to Redis.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_outage_refused_total",
        &["layer"],
        None,
        "Changes refused during an outage because the queue was full.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_outage_replayed_total",
        &["layer"],
        None,
        "Changes queued during an outage and written to Redis after it.",
    ),
    // tower-redis-cache
    metric(
        Kind::Counter,
        "tower_redis_cache_requests_total",
        &["result", "stored", "degraded"],
        None,
        "Requests the cache answered, by Cache-Status result, whether the response was stored, and whether Redis was unavailable.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_cache_near_hits_total",
        &[],
        None,
        "Hits answered from the in-process near cache without asking Redis.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_cache_coalesced_total",
        &[],
        None,
        "Misses that waited for another request's fill of the same entry instead of calling the origin.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_cache_stale_total",
        &["kind"],
        None,
        "Stale entries served, by kind: stale-while-revalidate or stale-if-error.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_cache_data_total",
        &["result", "tier"],
        None,
        "Data cache lookups (DataCache::get_or_insert_with), by result (hit, stale, miss) and tier (redis, near, in-process).",
    ),
    metric(
        Kind::Counter,
        "tower_redis_cache_data_decode_failures_total",
        &[],
        None,
        "Stored data values that did not decode (schema change, corruption): treated as misses and deleted.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_cache_data_too_large_total",
        &[],
        None,
        "Data values returned but not stored because their encoding is over the size limit.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_cache_fills_dropped_total",
        &["kind", "reason"],
        None,
        "Fills (kind: page, data) answered but not stored: reason purged (a purge, removal or soft purge is newer than the question), too_slow (asked longer ago than a purge's tombstone lives) or lock_lost (outlived its fill lock, where an older purge mark is held); raise lock_ttl for the last two.",
    ),
    // tower-redis-ratelimit
    metric(
        Kind::Counter,
        "tower_redis_ratelimit_decisions_total",
        &["outcome", "source", "shadow"],
        None,
        "Rate-limit decisions, by outcome (allowed, denied), how they were made, and whether in shadow mode.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_ratelimit_policy_decisions_total",
        &["policy", "outcome"],
        None,
        "Rate-limit decisions per policy: allowed, or denied by this policy.",
    ),
    // tower-redis-session
    metric(
        Kind::Counter,
        "tower_redis_session_loads_total",
        &["result"],
        None,
        "Session loads, by result: found, or missing (unknown, ended or expired id).",
    ),
    metric(
        Kind::Counter,
        "tower_redis_session_saves_total",
        &["kind", "result"],
        None,
        "Session writes, by kind (created, saved, cycled, deleted) and result (written, gone, refused).",
    ),
    metric(
        Kind::Counter,
        "tower_redis_session_reconciled_total",
        &[],
        None,
        "Session changes made during an outage and written to Redis after it.",
    ),
    metric(
        Kind::Counter,
        "tower_redis_session_refused_total",
        &[],
        None,
        "Session changes refused during an outage.",
    ),
];

/// Gives every metric in [`METRICS`] its help text and unit, through the
/// `metrics` facade's `describe_*!` macros. Call it once after installing
/// the recorder (an exporter shows the text as `# HELP`);
/// [`RedisManager::connect`](crate::RedisManager::connect) calls it too.
/// Without the `metrics` feature it does nothing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    for m in METRICS {
        let unit = match m.unit {
            Some("seconds") => Some(metrics::Unit::Seconds),
            Some("bytes") => Some(metrics::Unit::Bytes),
            _ => None,
        };
        match (m.kind, unit) {
            (Kind::Counter, Some(unit)) => metrics::describe_counter!(m.name, unit, m.help),
            (Kind::Counter, None) => metrics::describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(m.name, unit, m.help),
            (Kind::Gauge, None) => metrics::describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(unit)) => metrics::describe_histogram!(m.name, unit, m.help),
            (Kind::Histogram, None) => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// One measurement: (name, sorted labels, value).
    type Measurement = (String, Vec<(String, String)>, DebugValue);

    /// Every measurement the closure records.
    fn recorded(body: impl FnOnce()) -> Vec<Measurement> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, body);
        let mut seen: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let mut labels: Vec<(String, String)> = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                (key.key().name().to_owned(), labels, value)
            })
            .collect();
        seen.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        seen
    }

    fn pair(key: &str, value: &str) -> (String, String) {
        (key.to_owned(), value.to_owned())
    }

    #[test]
    fn counters_add_up_per_label_set() {
        let seen = recorded(|| {
            counter(
                "requests_total",
                &[("result", "hit"), ("stored", "false")],
                1,
            );
            counter(
                "requests_total",
                &[("result", "hit"), ("stored", "false")],
                2,
            );
            counter(
                "requests_total",
                &[("result", "miss"), ("stored", "true")],
                1,
            );
            counter("refused_total", &[], 5);
        });
        assert_eq!(
            seen,
            [
                ("refused_total".to_owned(), vec![], DebugValue::Counter(5)),
                (
                    "requests_total".to_owned(),
                    vec![pair("result", "hit"), pair("stored", "false")],
                    DebugValue::Counter(3)
                ),
                (
                    "requests_total".to_owned(),
                    vec![pair("result", "miss"), pair("stored", "true")],
                    DebugValue::Counter(1)
                ),
            ]
        );
    }

    /// Runs `timed` on a current-thread runtime with a recorder and
    /// returns the one layer-overhead value it recorded, checking that it
    /// is the only measurement and carries `layer`'s label.
    fn overhead_of<F: std::future::Future<Output = ()>>(layer: &str, timed: F) -> f64 {
        let seen = recorded(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime");
            runtime.block_on(timed);
        });
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].0, TOWER_REDIS_LAYER_OVERHEAD_DURATION);
        assert_eq!(seen[0].1, [pair("layer", layer)]);
        let DebugValue::Histogram(values) = &seen[0].2 else {
            panic!("not a histogram: {seen:?}");
        };
        assert_eq!(values.len(), 1);
        values[0].into_inner()
    }

    #[test]
    fn a_layer_clock_records_its_time_without_the_inner_service() {
        let inner_time = std::time::Duration::from_millis(50);
        let added = overhead_of("cache", async {
            let clock = LayerClock::start("cache");
            clock.inner(tokio::time::sleep(inner_time)).await;
            drop(clock);
        });
        // The 50 ms inside the inner service are not the layer's.
        assert!((0.0..inner_time.as_secs_f64()).contains(&added), "{added}");
    }

    /// A response future written by hand: from `inner_started` to
    /// `inner_ended` is the inner service's time (its `call` included),
    /// what follows is the layer's, and the clock records once, when it
    /// is dropped.
    #[test]
    fn a_layer_clock_counts_from_inner_started_to_inner_ended_as_the_inner_services() {
        let inner_time = std::time::Duration::from_millis(200);
        let then_time = std::time::Duration::from_millis(10);
        let added = overhead_of("ratelimit", async {
            let clock = LayerClock::start("ratelimit");
            let started = clock.inner_started();
            // The inner service's `call`, then its future.
            std::thread::sleep(inner_time / 2);
            tokio::time::sleep(inner_time / 2).await;
            clock.inner_ended(started);
            std::thread::sleep(then_time);
            drop(clock);
        });
        // Below the inner service's `call` alone (half of its time): that
        // is not the layer's either.
        assert!(
            (then_time.as_secs_f64()..(inner_time / 2).as_secs_f64()).contains(&added),
            "{added}"
        );
    }

    #[test]
    fn gauges_keep_the_last_value() {
        let seen = recorded(|| {
            gauge("breaker_state", &[], 1.0);
            gauge("breaker_state", &[], 2.0);
        });
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "breaker_state");
        assert!(matches!(seen[0].2, DebugValue::Gauge(v) if v.into_inner() == 2.0));
    }
}
