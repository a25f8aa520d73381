//! The chaos harness: an app with all three layers (cache, sessions, rate
//! limit) on several instances sharing one Redis, a steady load of client
//! tasks calling them in process, the invariants every response is checked
//! against, and [`FaultProxy`], a TCP proxy that slows, drops or resets the
//! connections between the managers and Redis.
//!
//! The invariants:
//!
//! - no 5xx and no panic (the app itself answers 500 only when a session
//!   read fails, which is a broken invariant too);
//! - no request takes longer than [`LATENCY_BOUND`] (or the bound a load
//!   is given, [`Load::start_with_latency_bound`]), net of the time the
//!   load's runtime could not run at all (a loaded machine was seen to
//!   stop the process for over a second);
//! - a cached page is always the page of the URL and `Accept-Language`
//!   variant that was asked for (the origin writes both into the body);
//! - a `private` response, or one to a request with `Authorization`, is
//!   always the requesting client's own;
//! - every session read answers the reading client's last acknowledged
//!   write of that entry (a reply meant for another request is a broken
//!   invariant); a session that vanished (read as empty, or replaced by a
//!   new one) is a [`SessionLoss`], which only a fault that loses Redis'
//!   data may explain ([`Load::session_losses`]);
//! - session writes reach Redis once it is back ([`Load::missing_session_writes`]);
//! - the rate limit admits no more during an outage than the documented
//!   bound, local and shared admissions each within their own part
//!   ([`Load::rate_limit_report`]).
//!
//! Every request is also checked for degradation: a response that says it
//! was served without Redis (`Cache-Status`, `RateLimit`), or any Redis
//! fallback taken while serving it, counted from the managers'
//! `tower_redis_fallbacks_total` metric and attributed to the request (and
//! to the session layer, which has no header to say so) through task-locals
//! ([`Load::degraded`], [`Load::session_degraded`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, Request, StatusCode, Uri, header};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::{BreakerState, RedisConfigBuilder, RedisManager, redis};
use tower_redis_ratelimit::{Fallback, Key, Policy, RateLimitLayer};
use tower_redis_session::{Expiry, Session, SessionLayer};

/// The managers' command timeout in every chaos scenario.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
/// The cache's coalescing wait (and its Redis fill lock's lifetime) in the
/// chaos app: how long a request may wait for another's fetch of its URL.
pub const COALESCE: Duration = Duration::from_millis(500);
/// The most Redis operations one request makes one after the other through
/// the three layers, each of which the contract bounds by the command
/// timeout (checkout and command together; several round trips inside one
/// operation, such as a session load that also renews the TTL, share it):
///
/// - rate limit: one decision for every policy (a batch follower waits for
///   its leader's one decision instead);
/// - cache, a GET miss: one lookup, then the coalescing loop, which may end
///   with one more lookup and one fill-lock attempt that began just before
///   its [`COALESCE`] deadline (a follower: one lookup after the wait);
///   the store after the response is a task of its own. An unsafe method
///   (the session writes' POST): one invalidation after the response;
/// - session: one load when the handler first touches the session, one
///   save (or a cycle, two round trips in one operation) after it.
///
/// The longest chain is a session read (`GET /session/…`, which the cache
/// sees as a cacheable miss): 1 + 3 + 1 = 5 operations plus the coalescing
/// wait; a session write is 4 (1 + load + invalidation + save), a page 4.
pub const SEQUENTIAL_OPERATIONS: u32 = 5;
/// Scheduling slack on a loaded two-core machine (two instances, a load,
/// Redis servers and other builds): timers that fire late, tasks that wait
/// their turn, the origin handlers. Seen: the slowest standalone requests
/// are two or three timeouts in a row before a breaker opens (405 ms,
/// 615 ms), a few milliseconds over their operations' timeouts. Time in
/// which the process did not run at all is not counted against a request
/// (see [`Load::held_up`]).
pub const SCHEDULING_MARGIN: Duration = Duration::from_millis(300);
/// No request may take longer: what the contract allows a request through
/// the three layers ([`SEQUENTIAL_OPERATIONS`] × [`COMMAND_TIMEOUT`] plus
/// the [`COALESCE`] wait: 1.5 s) and [`SCHEDULING_MARGIN`].
pub const LATENCY_BOUND: Duration = Duration::from_millis(
    COALESCE.as_millis() as u64
        + SEQUENTIAL_OPERATIONS as u64 * COMMAND_TIMEOUT.as_millis() as u64
        + SCHEDULING_MARGIN.as_millis() as u64,
);
/// The bound on a Redis Cluster with a node down, where the contract's
/// count does not hold yet: the cache replays the invalidations it queued
/// while degraded inline, in the first request that gets an answer from
/// Redis (`tower-redis-cache/src/store/mod.rs`, `after` → `replay`), one
/// operation each. With one node down the breaker stays closed (the other
/// nodes answer) while every replay to the dead node's slots times out, so
/// that request waits one command timeout per queued invalidation (seen:
/// 4 of them, 827 ms, inside a 1.48 s request). Until the replay leaves the
/// request path this is the suite's former bound, unchanged.
pub const CLUSTER_LATENCY_BOUND: Duration = Duration::from_millis(2_200);
/// The key prefix of the app.
pub const PREFIX: &str = "chaos";
/// The host every request names (the cache keys on it).
pub const HOST: &str = "shop.test";

/// The rate-limited route's policy: GCRA, this many per [`RL_PERIOD`], burst the same.
pub const RL_QUOTA: u32 = 10;
/// The period of the rate-limited route's policy.
pub const RL_PERIOD: Duration = Duration::from_secs(2);
/// The share of the quota each instance enforces alone while Redis is unavailable.
pub const RL_SHARE: f64 = 0.5;

/// One app instance: its own manager and layers, sharing Redis with the others.
pub struct Instance {
    /// The instance's connection manager.
    pub manager: RedisManager,
    /// The app, with the three layers.
    pub app: Router,
}

impl Instance {
    /// Connects a manager with the chaos pacing (see [`tuned`]) and builds the app.
    pub async fn start(config: RedisConfigBuilder) -> Self {
        let manager = RedisManager::connect(tuned(config).build().expect("valid Redis config"))
            .await
            .expect("the manager starts (Redis being down is not an error)");
        Self {
            app: app(manager.clone()),
            manager,
        }
    }
}

/// The chaos settings on top of a test server's configuration: a 200 ms
/// command timeout, three failures open the breaker, a quick probe.
pub fn tuned(config: RedisConfigBuilder) -> RedisConfigBuilder {
    config
        .command_timeout(COMMAND_TIMEOUT)
        .connect_timeout(COMMAND_TIMEOUT)
        .failure_threshold(3)
        .probe_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .key_prefix(PREFIX)
}

/// The configuration of the manager a test reads Redis with to check what
/// the layers wrote ([`Load::missing_session_writes`]): the chaos key
/// prefix, but neither the chaos timeouts nor its breaker. It is the
/// test's instrument, not a subject: on a loaded machine a read that takes
/// longer than the layers' 200 ms must slow the check down, not turn every
/// later read away as `BreakerOpen` until the check's deadline has passed.
pub fn checker(config: RedisConfigBuilder) -> RedisConfigBuilder {
    config
        .command_timeout(CHECKER_TIMEOUT)
        .connect_timeout(CHECKER_TIMEOUT)
        .failure_threshold(u32::MAX)
        .probe_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .key_prefix(PREFIX)
}

/// How long the checker ([`checker`]) waits for one connection or answer.
const CHECKER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the app's layers are bounded by, beyond the chaos defaults. The
/// default is the chaos app's: the library defaults everywhere and no
/// `/visit` route. The soak test bounds every in-process store small and
/// adds a near cache and the `visit` policy.
#[derive(Debug, Clone, Default)]
pub struct AppBounds {
    /// The cache's in-process store (`memory_capacity_bytes`).
    pub local_cache_bytes: Option<u64>,
    /// The cache's near tier: its byte bound and entry lifetime.
    pub near_cache: Option<(u64, Duration)>,
    /// The session lifetimes.
    pub session_expiry: Option<Expiry>,
    /// The session layer's local copies (`local_capacity_bytes`).
    pub session_copies_bytes: Option<u64>,
    /// The session layer's outage queue (`outage_queue_bytes`).
    pub session_queue_bytes: Option<usize>,
    /// The rate limiter's in-process maps (`memory_capacity_bytes`).
    pub rate_limit_bytes: Option<u64>,
    /// A `visit` policy on `/visit` (and that route), keyed by `x-visitor`,
    /// allowing this many visits a minute.
    pub visits_per_minute: Option<u32>,
}

/// The app: cacheable pages (with `Vary`, validators and short lifetimes),
/// private and authorised pages, session reads and writes, and a
/// rate-limited route; cache inside sessions inside the rate limit, as in
/// the README.
pub fn app(manager: RedisManager) -> Router {
    bounded_app(manager, &AppBounds::default())
}

/// [`app`] with its in-process stores bounded by `bounds`.
pub fn bounded_app(manager: RedisManager, bounds: &AppBounds) -> Router {
    // Coalescing waits (and the cross-instance lock) bounded well under the
    // latency bound: a lock taken in Redis by a request that then timed out
    // during a hang is released when the outage queue is written, which
    // waits for the recovery's backoff; with the defaults (5 s each) the
    // first requests for that URL could wait that long (4.96 s was seen
    // after SIGSTOP before the release was queued).
    let mut cache = CacheLayer::builder(manager.clone())
        .coalesce(Some(COALESCE))
        .lock_ttl(COALESCE);
    if let Some(bytes) = bounds.local_cache_bytes {
        cache = cache.memory_capacity_bytes(bytes);
    }
    if let Some((bytes, ttl)) = bounds.near_cache {
        cache = cache.near_cache(bytes, ttl);
    }
    let cache = cache.build().expect("valid cache layer");
    let mut sessions = SessionLayer::builder(manager.clone());
    if let Some(expiry) = bounds.session_expiry {
        sessions = sessions.expiry(expiry);
    }
    if let Some(bytes) = bounds.session_copies_bytes {
        sessions = sessions.local_capacity_bytes(bytes);
    }
    if let Some(bytes) = bounds.session_queue_bytes {
        sessions = sessions.outage_queue_bytes(bytes);
    }
    let sessions = sessions.build().expect("valid session layer");
    let mut limits = RateLimitLayer::builder(manager)
        .policy(
            Policy::gcra("limited", RL_QUOTA, RL_PERIOD)
                .key(Key::header("x-rl-key"))
                .path("/limited"),
        )
        .policy(
            Policy::gcra("per-client", 1_000_000, Duration::from_secs(1))
                .key(Key::header("x-client")),
        );
    if let Some(visits) = bounds.visits_per_minute {
        limits = limits.policy(
            Policy::gcra("visit", visits, Duration::from_secs(60))
                .key(Key::header("x-visitor"))
                .path("/visit"),
        );
    }
    limits = limits.fallback(Fallback::Local { share: RL_SHARE });
    if let Some(bytes) = bounds.rate_limit_bytes {
        limits = limits.memory_capacity_bytes(bytes);
    }
    let limits = limits.build().expect("valid rate-limit layer");
    let mut router = Router::new();
    if bounds.visits_per_minute.is_some() {
        router = router.route(
            "/visit",
            get(|| async { ([(header::CACHE_CONTROL, "no-store")], "visit ok") }),
        );
    }
    router
        .route("/page/{id}", get(page))
        .route("/private/{id}", get(private))
        .route("/auth/{id}", get(authorised))
        .route(
            "/session/{field}",
            get(|session: Session, Path(field): Path<String>| {
                // The handler's first use loads the session: the session
                // layer's work, though it runs inside the cache's.
                IN_LAYER.scope(LayerName::Session, async move {
                    match session.get::<String>(&field).await {
                        Ok(value) => value.unwrap_or_else(|| "none".to_owned()).into_response(),
                        // Never swallowed: a value that is not what was
                        // written (another request's reply, say) shows.
                        Err(error) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("session read failed: {error}"),
                        )
                            .into_response(),
                    }
                })
            }),
        )
        .route(
            "/session/{field}/{value}",
            axum::routing::post(
                |session: Session, Path((field, value)): Path<(String, String)>| {
                    IN_LAYER.scope(LayerName::Session, async move {
                        match session.insert(&field, value).await {
                            Ok(()) => "ok".into_response(),
                            Err(_) => StatusCode::BAD_REQUEST.into_response(),
                        }
                    })
                },
            ),
        )
        .route(
            "/limited",
            get(|| async { ([(header::CACHE_CONTROL, "no-store")], "limited ok") }),
        )
        .layer(cache)
        // What runs inside the session layer but is the cache's (or the
        // handler's) is not the session layer's...
        .layer(Mark(LayerName::Other))
        .layer(sessions)
        // ...and what the session layer does around it (its saves) is.
        .layer(Mark(LayerName::Session))
        .layer(limits)
}

/// Which part of the chaos app a Redis fallback was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerName {
    /// The session layer (loads from handlers, saves after them).
    Session,
    /// The cache or the rate limit (which say so in their headers).
    Other,
}

tokio::task_local! {
    /// The fallbacks taken while serving the current request (set by the
    /// load's client tasks around each request).
    static REQUEST_FALLBACKS: Arc<RequestFallbacks>;
    /// The layer whose future is being polled (set by [`Mark`]).
    static IN_LAYER: LayerName;
}

/// Redis fallbacks taken while serving one request, by layer.
#[derive(Debug, Default)]
struct RequestFallbacks {
    session: AtomicU64,
    other: AtomicU64,
}

/// Fallbacks taken outside any request of a load (in tasks the layers
/// spawn, such as the cache's stores and the rate limit's batches).
static UNATTRIBUTED_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// A layer that marks the futures of the service it wraps as `LayerName`'s
/// work, for the attribution of fallbacks.
#[derive(Debug, Clone, Copy)]
struct Mark(LayerName);

impl<S> tower::Layer<S> for Mark {
    type Service = Marked<S>;

    fn layer(&self, inner: S) -> Marked<S> {
        Marked {
            inner,
            layer: self.0,
        }
    }
}

#[derive(Debug, Clone)]
struct Marked<S> {
    inner: S,
    layer: LayerName,
}

impl<S, R> tower::Service<R> for Marked<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tokio::task::futures::TaskLocalFuture<LayerName, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        IN_LAYER.scope(self.layer, self.inner.call(request))
    }
}

/// Counts `tower_redis_fallbacks_total` (every fallback any manager takes,
/// from `RedisManager::failover`) into the request being served, by the
/// layer taking it.
struct FallbackCounter;

impl metrics::CounterFn for FallbackCounter {
    fn increment(&self, value: u64) {
        let layer = IN_LAYER.try_with(|l| *l).unwrap_or(LayerName::Other);
        let counted = REQUEST_FALLBACKS.try_with(|fallbacks| match layer {
            LayerName::Session => fallbacks.session.fetch_add(value, Ordering::AcqRel),
            LayerName::Other => fallbacks.other.fetch_add(value, Ordering::AcqRel),
        });
        if counted.is_err() {
            UNATTRIBUTED_FALLBACKS.fetch_add(value, Ordering::AcqRel);
        }
    }

    fn absolute(&self, _value: u64) {}
}

/// The process's metrics recorder while a load runs: only the fallback
/// counter is kept.
struct FallbackRecorder;

impl metrics::Recorder for FallbackRecorder {
    fn describe_counter(
        &self,
        _key: metrics::KeyName,
        _unit: Option<metrics::Unit>,
        _description: metrics::SharedString,
    ) {
    }

    fn describe_gauge(
        &self,
        _key: metrics::KeyName,
        _unit: Option<metrics::Unit>,
        _description: metrics::SharedString,
    ) {
    }

    fn describe_histogram(
        &self,
        _key: metrics::KeyName,
        _unit: Option<metrics::Unit>,
        _description: metrics::SharedString,
    ) {
    }

    fn register_counter(
        &self,
        key: &metrics::Key,
        _metadata: &metrics::Metadata<'_>,
    ) -> metrics::Counter {
        if key.name() == "tower_redis_fallbacks_total" {
            metrics::Counter::from_arc(Arc::new(FallbackCounter))
        } else {
            metrics::Counter::noop()
        }
    }

    fn register_gauge(
        &self,
        _key: &metrics::Key,
        _metadata: &metrics::Metadata<'_>,
    ) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _key: &metrics::Key,
        _metadata: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// Installs [`FallbackRecorder`] as the process's metrics recorder, once;
/// false when another recorder was installed first (fallbacks then go
/// uncounted, and a load says so: [`Load::counts_fallbacks`]).
fn count_fallbacks() -> bool {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| metrics::set_global_recorder(FallbackRecorder).is_ok())
}

fn language(headers: &HeaderMap) -> String {
    headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

/// The body a page must have: its URL and its variant.
pub fn page_body(uri: &str, language: &str) -> String {
    format!("page {uri} lang={language}")
}

/// A shared page whose body names its URL and variant. Lifetimes of 0, 1
/// and 2 s and an `ETag` make the cache store, revalidate (304) and refetch.
async fn page(Path(id): Path<u32>, uri: Uri, headers: HeaderMap) -> Response {
    let lang = language(&headers);
    let etag = format!("\"p{id}-{lang}\"");
    let cache_control = format!("public, max-age={}", id % 3);
    let fields = [
        (header::CACHE_CONTROL, cache_control),
        (header::VARY, "accept-language".to_owned()),
        (header::ETAG, etag.clone()),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return (StatusCode::NOT_MODIFIED, fields).into_response();
    }
    (fields, page_body(&uri.to_string(), &lang)).into_response()
}

/// A page for one client only (`private`): must never be stored.
async fn private(Path(id): Path<u32>, headers: HeaderMap) -> Response {
    let client = headers
        .get("x-client")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    (
        [(header::CACHE_CONTROL, "private, max-age=60")],
        format!("private {id} for {client}"),
    )
        .into_response()
}

/// A page answered to an `Authorization` header, with freshness but no
/// `public`: a shared cache must not store it (RFC 9111 §3.5).
async fn authorised(Path(id): Path<u32>, headers: HeaderMap) -> Response {
    let who = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    (
        [(header::CACHE_CONTROL, "max-age=60")],
        format!("auth {id} for {who}"),
    )
        .into_response()
}

/// Where a scenario is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Before the fault.
    Healthy,
    /// From the moment the fault is in place until Redis serves again.
    Outage,
    /// After Redis serves again.
    Recovered,
}

/// One session write the app acknowledged.
#[derive(Debug, Clone)]
pub struct SessionWrite {
    /// The session id (the cookie value).
    pub id: String,
    /// The entry written.
    pub field: String,
    /// Its value.
    pub value: String,
    /// The phase in which the session was created.
    pub session_created: Phase,
    /// When the session was created (the start of the request that made it).
    pub session_created_at: Instant,
    /// The phase of the write.
    pub written: Phase,
}

/// What [`Load::rate_limit_report`] found for one phase.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitReport {
    /// The admissions and denials.
    pub count: RateLimitCount,
    /// How long the phase lasted, with the slack for requests begun in it.
    pub duration: Duration,
    /// The most admissions allowed in all: the local limiters' and the
    /// shared counter's allowances over the whole phase.
    pub bound: f64,
    /// The most admissions the instances' local limiters may make in the
    /// time they decided ([`RateLimitCount::local_window`]).
    pub local_bound: f64,
    /// The most admissions the shared counter may make.
    pub shared_bound: f64,
}

impl RateLimitReport {
    /// Prints the phase's figures and asserts that they stay within the
    /// documented bound: some admissions (the route was used), all of them
    /// within the whole bound, the local limiters' within theirs
    /// (`instances × share × quota` per period, plus a burst each) and the
    /// shared counter's within its limit. `during` names the phase.
    pub fn assert_within_bounds(&self, name: &str, during: &str) {
        let count = self.count;
        let shared = count.admitted - count.admitted_local;
        eprintln!(
            "{name}: rate limit during the {during} ({:?} with slack): admitted {} ({} local, bound {:.0}; {shared} shared, bound {:.0}) denied {} ({} local)",
            self.duration,
            count.admitted,
            count.admitted_local,
            self.local_bound,
            self.shared_bound,
            count.denied,
            count.denied_local,
        );
        assert!(
            count.admitted > 0,
            "{name}: the rate-limited route was used"
        );
        assert!(
            count.admitted as f64 <= self.bound,
            "{name}: {} admitted during the {during}, over the bound of {:.0}",
            count.admitted,
            self.bound
        );
        assert!(
            count.admitted_local as f64 <= self.local_bound,
            "{name}: the local limiters admitted {} during the {during}, over instances × share × quota per period (over the time they decided in) plus a burst each: {:.0}",
            count.admitted_local,
            self.local_bound
        );
        assert!(
            shared as f64 <= self.shared_bound,
            "{name}: the shared counter admitted {shared} during the {during}, over its limit of {:.0}",
            self.shared_bound
        );
    }
}

/// A session that vanished for the client holding it: read as empty
/// although the client's acknowledged writes were there, or replaced or
/// ended by a write. Only a fault that loses Redis' data (a restart without
/// persistence, `FLUSHALL`, a cluster node restarted empty) may explain
/// one, for a session that existed before the fault; any other is a user
/// logged out by an outage.
#[derive(Debug, Clone)]
pub struct SessionLoss {
    /// The client.
    pub client: String,
    /// The phase in which the session was created.
    pub session_created: Phase,
    /// When the session was created (the start of the request that made it).
    pub session_created_at: Instant,
    /// The phase of the request that found it gone.
    pub seen: Phase,
    /// When that request ended.
    pub seen_at: Instant,
    /// What happened.
    pub what: String,
}

/// Admissions on the rate-limited route in one phase (its own key).
#[derive(Debug, Clone, Copy, Default)]
pub struct RateLimitCount {
    /// Answered 200.
    pub admitted: u64,
    /// Answered 429.
    pub denied: u64,
    /// Of the admitted, those the local limiter decided (`RateLimit: …;local`).
    pub admitted_local: u64,
    /// Of the denied, those the local limiter decided.
    pub denied_local: u64,
    /// From the start of the first request a local limiter decided to the
    /// end of the last: every local decision of the phase fell within it.
    pub local_window: Option<(Instant, Instant)>,
}

#[derive(Default)]
struct Shared {
    phase: AtomicU8,
    stop: AtomicBool,
    requests: [AtomicU64; 3],
    degraded: [AtomicU64; 3],
    session_degraded: [AtomicU64; 3],
    violations: Mutex<Vec<String>>,
    /// The last acknowledged write of each (session, entry): bounded by
    /// the sessions of the run, however long it lasts.
    session_writes: Mutex<HashMap<(String, String), SessionWrite>>,
    session_losses: Mutex<Vec<SessionLoss>>,
    rate_limit: Mutex<HashMap<Phase, RateLimitCount>>,
    phase_started: Mutex<HashMap<Phase, Instant>>,
    fault_at: Mutex<Option<Instant>>,
    latency_bound: Duration,
    max_latency_ms: AtomicU64,
    /// The slowest request, for the report.
    slowest: Mutex<String>,
    /// Requests over the latency bound (start, end, what), judged at the
    /// end net of [`held_up`](Self::held_up).
    over_bound: Mutex<Vec<(Instant, Instant, String)>>,
    /// When the load's runtime could not run its tasks on time
    /// ([`HeldUp`](crate::held_up::HeldUp)).
    held_up: crate::held_up::HeldUp,
    /// [`UNATTRIBUTED_FALLBACKS`] when the load started.
    unattributed_at_start: u64,
    counts_fallbacks: bool,
}

impl Shared {
    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Healthy,
            1 => Phase::Outage,
            _ => Phase::Recovered,
        }
    }

    fn violation(&self, text: String) {
        let mut violations = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        // Enough to diagnose; a broken invariant can repeat thousands of times.
        if violations.len() < 50 {
            violations.push(text);
        }
    }

    fn session_loss(&self, held: &Held, client: &str, seen: Phase, what: String) {
        let mut losses = self
            .session_losses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // One per session at most (see `Held::lost`); bounded for long runs.
        if losses.len() < 10_000 {
            losses.push(SessionLoss {
                client: client.to_owned(),
                session_created: held.created,
                session_created_at: held.created_at,
                seen,
                seen_at: Instant::now(),
                what,
            });
        }
    }
}

/// A steady load on the instances: client tasks calling the apps in process
/// and checking every response.
pub struct Load {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    scenario: String,
}

/// What one client sends, in turn.
#[derive(Debug, Clone, Copy)]
enum Call {
    Page,
    Private,
    Authorised,
    SessionWrite,
    SessionRead,
}

const CALLS: [Call; 8] = [
    Call::Page,
    Call::Private,
    Call::Page,
    Call::SessionWrite,
    Call::Page,
    Call::Authorised,
    Call::Page,
    Call::SessionRead,
];

impl Load {
    /// Starts `clients` client tasks and one rate-limit task on `apps`.
    /// `scenario` names the run (it goes into the rate-limit keys).
    pub fn start(scenario: &str, apps: &[Router], clients: usize) -> Self {
        Self::start_with_latency_bound(scenario, apps, clients, LATENCY_BOUND)
    }

    /// [`start`](Self::start), with another bound than [`LATENCY_BOUND`]
    /// on every request.
    pub fn start_with_latency_bound(
        scenario: &str,
        apps: &[Router],
        clients: usize,
        latency_bound: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            latency_bound,
            counts_fallbacks: count_fallbacks(),
            unattributed_at_start: UNATTRIBUTED_FALLBACKS.load(Ordering::Acquire),
            ..Shared::default()
        });
        shared
            .phase_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Phase::Healthy, Instant::now());
        let mut tasks = Vec::new();
        for client in 0..clients {
            let apps = apps.to_vec();
            let shared = Arc::clone(&shared);
            tasks.push(tokio::spawn(client_task(client, apps, shared)));
        }
        // Two clients on the rate-limited route: with one, a scenario whose
        // requests wait out the command timeout (a cluster node down) sends
        // too few to reach the limit in its outage phase.
        for _ in 0..2 {
            tasks.push(tokio::spawn(rate_limit_task(
                scenario.to_owned(),
                apps.to_vec(),
                Arc::clone(&shared),
            )));
        }
        let watched = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            watched.held_up.watch(&watched.stop).await;
        }));
        Self {
            shared,
            tasks,
            scenario: scenario.to_owned(),
        }
    }

    /// Moves to the next phase: requests started from now on count for it.
    pub fn begin(&self, phase: Phase) {
        self.shared
            .phase_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(phase, Instant::now());
        self.shared.phase.store(phase as u8, Ordering::Release);
    }

    /// Marks the moment a fault is injected (call it just before): a
    /// [`SessionLoss`] seen before it cannot be the fault's doing.
    pub fn fault(&self) {
        *self
            .shared
            .fault_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// When [`fault`](Self::fault) was last called.
    pub fn fault_at(&self) -> Option<Instant> {
        *self
            .shared
            .fault_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this process counts Redis fallbacks (the load's metrics
    /// recorder is installed); without it [`degraded`](Self::degraded) sees
    /// only what the headers say and [`session_degraded`](Self::session_degraded)
    /// nothing.
    pub fn counts_fallbacks(&self) -> bool {
        self.shared.counts_fallbacks
    }

    /// Requests answered so far in `phase`.
    pub fn requests(&self, phase: Phase) -> u64 {
        self.shared.requests[phase as usize].load(Ordering::Acquire)
    }

    /// Requests in `phase` served at least in part without Redis: the
    /// response said so (`Cache-Status: …; detail=redis-unavailable` or
    /// `RateLimit: …;local`), or a layer took a Redis fallback while
    /// serving it.
    pub fn degraded(&self, phase: Phase) -> u64 {
        self.shared.degraded[phase as usize].load(Ordering::Acquire)
    }

    /// Requests in `phase` whose session layer took a Redis fallback
    /// (loaded or saved the session in process).
    pub fn session_degraded(&self, phase: Phase) -> u64 {
        self.shared.session_degraded[phase as usize].load(Ordering::Acquire)
    }

    /// Redis fallbacks taken since the load started outside any of its
    /// requests: in tasks the layers spawn (the cache's stores, the rate
    /// limit's batches), or by another user of the process's managers.
    pub fn unattributed_fallbacks(&self) -> u64 {
        UNATTRIBUTED_FALLBACKS
            .load(Ordering::Acquire)
            .saturating_sub(self.shared.unattributed_at_start)
    }

    /// The sessions that vanished for their clients (see [`SessionLoss`]).
    pub fn session_losses(&self) -> Vec<SessionLoss> {
        self.shared
            .session_losses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until `count` more requests have been answered in the current
    /// phase (or `deadline` passes), so every phase sees real traffic.
    pub async fn wait_requests(&self, count: u64, deadline: Duration) {
        let phase = self.shared.phase();
        let target = self.requests(phase) + count;
        let until = Instant::now() + deadline;
        while self.requests(phase) < target && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The broken invariants seen so far.
    pub fn violations(&self) -> Vec<String> {
        self.shared
            .violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How long the load's runtime could not run its tasks on time, so far.
    pub fn held_up(&self) -> Duration {
        self.held_up_during(self.started_at(), Instant::now())
    }

    fn started_at(&self) -> Instant {
        self.shared
            .phase_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&Phase::Healthy)
            .copied()
            .unwrap_or_else(Instant::now)
    }

    fn held_up_during(&self, from: Instant, to: Instant) -> Duration {
        self.shared.held_up.during(from, to)
    }

    /// The bound on every request of this load.
    pub fn latency_bound(&self) -> Duration {
        self.shared.latency_bound
    }

    /// The slowest request so far.
    pub fn max_latency(&self) -> Duration {
        Duration::from_millis(self.shared.max_latency_ms.load(Ordering::Acquire))
    }

    /// What the slowest request was, in which phase.
    pub fn slowest(&self) -> String {
        self.shared
            .slowest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the clients and returns every broken invariant seen (empty
    /// when all held), including panicked client tasks.
    pub async fn stop(&mut self) -> Vec<String> {
        self.shared.stop.store(true, Ordering::Release);
        for task in self.tasks.drain(..) {
            if let Err(error) = task.await {
                self.shared.violation(format!(
                    "a client task failed (a panic in the stack?): {error}"
                ));
            }
        }
        let over_bound = std::mem::take(
            &mut *self
                .shared
                .over_bound
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (start, end, what) in over_bound {
            let held_up = self.held_up_during(start, end);
            let took = end.duration_since(start);
            if took.saturating_sub(held_up) > self.shared.latency_bound {
                self.shared.violation(format!(
                    "{what} took {took:?} (the runtime was held up {held_up:?} of it), over {:?}",
                    self.shared.latency_bound
                ));
            }
        }
        self.shared
            .violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last acknowledged write of each entry of each session.
    pub fn session_writes(&self) -> Vec<SessionWrite> {
        self.shared
            .session_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The writes that `durable` selects (e.g. those of sessions created
    /// after the fault: they must be in Redis after recovery whatever the
    /// fault did to older data), and those of them not found in Redis
    /// after polling until `deadline`.
    pub async fn missing_session_writes(
        &self,
        checker: &RedisManager,
        durable: impl Fn(&SessionWrite) -> bool,
        deadline: Duration,
    ) -> (usize, Vec<SessionWrite>) {
        // A client writes one request at a time, so its last write of an
        // entry is the newest: that is the value Redis must hold.
        let mut latest: HashMap<(String, String), SessionWrite> = HashMap::new();
        for write in self.session_writes().into_iter().filter(|w| durable(w)) {
            latest.insert((write.id.clone(), write.field.clone()), write);
        }
        let expected: Vec<SessionWrite> = latest.into_values().collect();
        let until = Instant::now() + deadline;
        let mut missing = expected.clone();
        loop {
            let mut still = Vec::new();
            for write in missing {
                let key = checker.keys().tagged(
                    &URL_SAFE_NO_PAD.encode(Sha256::digest(write.id.as_bytes())),
                    &["s"],
                );
                let stored: Result<Option<String>, _> = checker
                    .query(
                        redis::cmd("HGET")
                            .arg(&key)
                            .arg(format!("d:{}", write.field)),
                    )
                    .await;
                let wanted = format!("\"{}\"", write.value);
                if stored.ok().flatten().as_deref() != Some(wanted.as_str()) {
                    still.push(write);
                }
            }
            missing = still;
            if !missing.is_empty() && Instant::now() > until {
                // What Redis holds instead, for the failure message.
                for write in missing.iter().take(3) {
                    let key = checker.keys().tagged(
                        &URL_SAFE_NO_PAD.encode(Sha256::digest(write.id.as_bytes())),
                        &["s"],
                    );
                    let all: Result<Vec<String>, _> =
                        checker.query(redis::cmd("HGETALL").arg(&key)).await;
                    eprintln!("session write {write:?} is missing; {key} holds {all:?}");
                }
            }
            if missing.is_empty() || Instant::now() > until {
                return (expected.len(), missing);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The admissions on the rate-limited route in `phase`, how long the
    /// phase lasted, and the most the documented bound allows in that time
    /// for `instances` instances, in two parts that are checked apart:
    /// what the local limiters decided (`RateLimit: …;local`) may not
    /// exceed each instance's `share × quota` per period plus its burst
    /// over the time they decided in, and what the shared counter decided
    /// may not exceed `quota` per period plus the burst over the phase;
    /// each rounded up by one request. A local limiter that ignored its
    /// share would admit twice its part, so the shared counter's allowance
    /// is never slack for the local ones.
    pub fn rate_limit_report(&self, phase: Phase, instances: u32) -> RateLimitReport {
        let started = self
            .shared
            .phase_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let start = started.get(&phase).copied().unwrap_or_else(Instant::now);
        let end = match phase {
            Phase::Healthy => started.get(&Phase::Outage),
            Phase::Outage => started.get(&Phase::Recovered),
            Phase::Recovered => None,
        }
        .copied()
        .unwrap_or_else(Instant::now);
        // Requests that started just before the end were still counted for it.
        let duration = end.saturating_duration_since(start) + self.shared.latency_bound;
        let periods = duration.as_secs_f64() / RL_PERIOD.as_secs_f64();
        let quota = f64::from(RL_QUOTA);
        let local = (quota * RL_SHARE).floor().max(1.0);
        let shared_bound = quota + quota * periods + 1.0;
        let count = self
            .shared
            .rate_limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&phase)
            .copied()
            .unwrap_or_default();
        // The local limiters over the time they decided in (no slack: the
        // window holds every local decision).
        let local_periods = count.local_window.map_or(0.0, |(first, last)| {
            last.saturating_duration_since(first).as_secs_f64() / RL_PERIOD.as_secs_f64()
        });
        let local_bound = f64::from(instances) * (local + local * local_periods + 1.0);
        RateLimitReport {
            count,
            duration,
            bound: f64::from(instances) * (local + local * periods + 1.0) + shared_bound,
            local_bound,
            shared_bound,
        }
    }

    /// The scenario's name.
    pub fn scenario(&self) -> &str {
        &self.scenario
    }
}

/// One answered request: the response with its body read, how long it
/// took, and the Redis fallbacks taken while serving it.
struct Answered {
    response: Response<String>,
    took: Duration,
    session_fallbacks: u64,
    other_fallbacks: u64,
}

/// Sends one request and reads the whole response, timing it and counting
/// the fallbacks taken for it.
async fn send(app: &Router, request: Request<Body>) -> Answered {
    let fallbacks = Arc::new(RequestFallbacks::default());
    let started = Instant::now();
    let (parts, bytes) = REQUEST_FALLBACKS
        .scope(Arc::clone(&fallbacks), async {
            let response = app
                .clone()
                .oneshot(request)
                .await
                .unwrap_or_else(|never| match never {});
            let (parts, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (parts, bytes)
        })
        .await;
    let took = started.elapsed();
    let body = String::from_utf8_lossy(&bytes).into_owned();
    Answered {
        response: Response::from_parts(parts, body),
        took,
        session_fallbacks: fallbacks.session.load(Ordering::Acquire),
        other_fallbacks: fallbacks.other.load(Ordering::Acquire),
    }
}

fn record(shared: &Shared, phase: Phase, what: &str, answered: &Answered) {
    let Answered { response, took, .. } = answered;
    let took = *took;
    shared.requests[phase as usize].fetch_add(1, Ordering::AcqRel);
    let millis = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    if shared.max_latency_ms.fetch_max(millis, Ordering::AcqRel) < millis {
        *shared.slowest.lock().unwrap_or_else(|p| p.into_inner()) = format!(
            "{what} in {phase:?} ({took:?}; fallbacks: session {}, other {}; {:?})",
            answered.session_fallbacks,
            answered.other_fallbacks,
            response.headers().get("cache-status"),
        );
    }
    if took > shared.latency_bound {
        // Judged when the load stops, net of the time the runtime was held up.
        let now = Instant::now();
        let mut over_bound = shared.over_bound.lock().unwrap_or_else(|p| p.into_inner());
        // Enough to judge; bounded however long the run.
        if over_bound.len() < 10_000 {
            over_bound.push((now - took, now, format!("{what} in {phase:?}")));
        }
    }
    if response.status().is_server_error() {
        shared.violation(format!(
            "{what} answered {} in {phase:?}: {}",
            response.status(),
            response.body()
        ));
    }
    let said_so = response
        .headers()
        .get_all("cache-status")
        .iter()
        .any(|v| v.as_bytes().windows(17).any(|w| w == b"redis-unavailable"))
        || response
            .headers()
            .get_all("ratelimit")
            .iter()
            .any(|v| v.as_bytes().ends_with(b";local"));
    if said_so || answered.session_fallbacks > 0 || answered.other_fallbacks > 0 {
        shared.degraded[phase as usize].fetch_add(1, Ordering::AcqRel);
    }
    if answered.session_fallbacks > 0 {
        shared.session_degraded[phase as usize].fetch_add(1, Ordering::AcqRel);
    }
}

/// A session cookie this client holds: its value, when the session began,
/// and what the client wrote to it (the value of each entry it last had
/// acknowledged).
struct Held {
    id: String,
    created: Phase,
    created_at: Instant,
    values: HashMap<String, String>,
    /// Found gone once (a [`SessionLoss`] was recorded): from then on the
    /// session reads as empty until a write replaces it.
    lost: bool,
}

impl Held {
    fn new(id: String, created: Phase, created_at: Instant) -> Self {
        Self {
            id,
            created,
            created_at,
            values: HashMap::new(),
            lost: false,
        }
    }
}

/// A response that sets or removes the session cookie, against the
/// session the client holds: a removal, or a new id where the client held
/// a session, is a [`SessionLoss`] (a write to a session that still exists
/// keeps its id); a new id makes a new session. Returns whether a new one
/// began.
fn take_cookie(
    shared: &Shared,
    me: &str,
    phase: Phase,
    what: &str,
    session: &mut Option<Held>,
    headers: &HeaderMap,
    sent_at: Instant,
) -> bool {
    match set_cookie_value(headers, COOKIE_NAME) {
        None => false,
        Some(None) => {
            if let Some(held) = session.take()
                && !held.lost
            {
                shared.session_loss(
                    &held,
                    me,
                    phase,
                    format!("{what} ended the session holding {:?}", held.values),
                );
            }
            false
        }
        Some(Some(id)) => {
            if session.as_ref().is_some_and(|held| held.id == id) {
                return false;
            }
            if let Some(held) = session.take()
                && !held.lost
            {
                shared.session_loss(
                    &held,
                    me,
                    phase,
                    format!(
                        "{what} found no session and began a new one; the old one held {:?}",
                        held.values
                    ),
                );
            }
            *session = Some(Held::new(id, phase, sent_at));
            true
        }
    }
}

const COOKIE_NAME: &str = "__Host-session";

async fn client_task(client: usize, apps: Vec<Router>, shared: Arc<Shared>) {
    let me = format!("c{client}");
    let mut session: Option<Held> = None;
    let mut n: usize = 0;
    let mut last_phase = Phase::Healthy;
    while !shared.stop.load(Ordering::Acquire) {
        n += 1;
        let phase = shared.phase();
        // Half the clients start a new session in each phase (a new
        // visitor), the others keep theirs across the fault.
        if phase != last_phase && client % 2 == 1 {
            session = None;
        }
        last_phase = phase;
        let app = &apps[(client + n) % apps.len()];
        // A session stays on one instance: without sticky routing an
        // instance cannot know, during an outage, a session another made.
        let sticky = &apps[client % apps.len()];
        let id = (n * 7 + client) % 24;
        let call = CALLS[n % CALLS.len()];
        let base = Request::builder()
            .header(header::HOST, HOST)
            .header("x-client", &me);
        match call {
            Call::Page => {
                let query = match n % 3 {
                    0 => String::new(),
                    other => format!("?q={other}"),
                };
                let uri = format!("/page/{id}{query}");
                let lang = ["en", "de", "fr", "-"][(n / 3) % 4];
                let mut request = base.uri(&uri);
                if lang != "-" {
                    request = request.header(header::ACCEPT_LANGUAGE, lang);
                }
                let answered = send(app, request.body(Body::empty()).expect("request")).await;
                record(&shared, phase, &format!("GET {uri} ({lang})"), &answered);
                let response = &answered.response;
                let expected = page_body(&uri, lang);
                if response.status() == StatusCode::OK && response.body() != &expected {
                    shared.violation(format!(
                        "GET {uri} with Accept-Language {lang} got {:?}, not {expected:?} ({:?})",
                        response.body(),
                        response.headers().get("cache-status")
                    ));
                }
            }
            Call::Private => {
                let uri = format!("/private/{id}");
                let answered =
                    send(app, base.uri(&uri).body(Body::empty()).expect("request")).await;
                record(&shared, phase, &format!("GET {uri}"), &answered);
                let response = &answered.response;
                let expected = format!("private {id} for {me}");
                if response.status() == StatusCode::OK && response.body() != &expected {
                    shared.violation(format!(
                        "{me} got another client's private response: {:?}",
                        response.body()
                    ));
                }
            }
            Call::Authorised => {
                let uri = format!("/auth/{id}");
                let token = format!("Bearer {me}");
                let request = base
                    .uri(&uri)
                    .header(header::AUTHORIZATION, &token)
                    .body(Body::empty())
                    .expect("request");
                let answered = send(app, request).await;
                record(
                    &shared,
                    phase,
                    &format!("GET {uri} (authorised)"),
                    &answered,
                );
                let response = &answered.response;
                let expected = format!("auth {id} for {token}");
                if response.status() == StatusCode::OK && response.body() != &expected {
                    shared.violation(format!(
                        "{me} got another client's authorised response: {:?}",
                        response.body()
                    ));
                }
            }
            Call::SessionWrite => {
                // 64 entries per session, rewritten in turn: sessions stay
                // small however long the run.
                let field = format!("w{}", (n / CALLS.len()) % 64);
                let value = format!("{me}-{n}");
                let mut request = base.method("POST").uri(format!("/session/{field}/{value}"));
                if let Some(held) = &session {
                    request = request.header(header::COOKIE, format!("{COOKIE_NAME}={}", held.id));
                }
                let sent_at = Instant::now();
                let answered = send(sticky, request.body(Body::empty()).expect("request")).await;
                record(&shared, phase, "POST /session", &answered);
                let response = &answered.response;
                if response.status() != StatusCode::OK {
                    shared.violation(format!("a session write answered {}", response.status()));
                    continue;
                }
                let had_session = session.is_some();
                let began = take_cookie(
                    &shared,
                    &me,
                    phase,
                    &format!("POST /session/{field}"),
                    &mut session,
                    response.headers(),
                    sent_at,
                );
                if !had_session && !began {
                    shared.violation(format!(
                        "{me}'s write of {field} without a session was acknowledged without a session cookie"
                    ));
                }
                if let Some(held) = &mut session {
                    held.values.insert(field.clone(), value.clone());
                    let write = SessionWrite {
                        id: held.id.clone(),
                        field,
                        value,
                        session_created: held.created,
                        session_created_at: held.created_at,
                        written: phase,
                    };
                    shared
                        .session_writes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((write.id.clone(), write.field.clone()), write);
                }
            }
            Call::SessionRead => {
                // The entry this client wrote four calls ago.
                let field = format!("w{}", (n / CALLS.len()) % 64);
                let mut request = base.uri(format!("/session/{field}"));
                if let Some(held) = &session {
                    request = request.header(header::COOKIE, format!("{COOKIE_NAME}={}", held.id));
                }
                let sent_at = Instant::now();
                let answered = send(sticky, request.body(Body::empty()).expect("request")).await;
                record(&shared, phase, "GET /session", &answered);
                let response = &answered.response;
                if response.status() != StatusCode::OK {
                    shared.violation(format!(
                        "{me}'s session read answered {}: {}",
                        response.status(),
                        response.body()
                    ));
                    continue;
                }
                let expected = session
                    .as_ref()
                    .and_then(|held| held.values.get(&field))
                    .map_or("none", String::as_str)
                    .to_owned();
                let read = response.body().as_str();
                if read != expected {
                    match &mut session {
                        Some(held) if read == "none" => {
                            shared.session_loss(
                                held,
                                &me,
                                phase,
                                format!(
                                    "GET /session/{field} read nothing; the session held {:?}",
                                    held.values
                                ),
                            );
                            held.lost = true;
                            held.values.clear();
                        }
                        _ => shared.violation(format!(
                            "{me} read {field} of its session as {read:?} in {phase:?}, but its last acknowledged write was {expected:?}"
                        )),
                    }
                }
                if take_cookie(
                    &shared,
                    &me,
                    phase,
                    &format!("GET /session/{field}"),
                    &mut session,
                    response.headers(),
                    sent_at,
                ) {
                    shared.violation(format!(
                        "{me}'s read of {field} began a new session (a read never makes one)"
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `Some(Some(value))` for a session cookie set, `Some(None)` for one
/// removed, `None` when the response leaves the cookie alone.
fn set_cookie_value(headers: &HeaderMap, name: &str) -> Option<Option<String>> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let (pair, attributes) = v.split_once(';').unwrap_or((v, ""));
            let (n, value) = pair.split_once('=')?;
            (n.trim() == name).then(|| {
                (!value.is_empty() && !attributes.contains("Max-Age=0")).then(|| value.to_owned())
            })
        })
}

async fn rate_limit_task(scenario: String, apps: Vec<Router>, shared: Arc<Shared>) {
    let mut n = 0usize;
    while !shared.stop.load(Ordering::Acquire) {
        n += 1;
        let phase = shared.phase();
        // A fresh counter per phase, so each phase's admissions stand alone.
        let key = format!("{scenario}-{phase:?}");
        let request = Request::builder()
            .uri("/limited")
            .header(header::HOST, HOST)
            .header("x-rl-key", &key)
            .body(Body::empty())
            .expect("request");
        let sent_at = Instant::now();
        let answered = send(&apps[n % apps.len()], request).await;
        record(&shared, phase, "GET /limited", &answered);
        let local = answered
            .response
            .headers()
            .get_all("ratelimit")
            .iter()
            .any(|v| v.as_bytes().ends_with(b";local"));
        {
            let mut counts = shared.rate_limit.lock().unwrap_or_else(|p| p.into_inner());
            let count = counts.entry(phase).or_default();
            if local {
                let first = count.local_window.map_or(sent_at, |(first, _)| first);
                count.local_window = Some((first, Instant::now()));
            }
            match answered.response.status() {
                StatusCode::OK => {
                    count.admitted += 1;
                    count.admitted_local += u64::from(local);
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    count.denied += 1;
                    count.denied_local += u64::from(local);
                }
                other => shared.violation(format!("GET /limited answered {other}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
}

/// Waits until every manager's breaker is closed; false after `deadline`.
pub async fn all_closed(managers: &[&RedisManager], deadline: Duration) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    for manager in managers {
        let mut states = manager.subscribe();
        let closed =
            tokio::time::timeout_at(until, states.wait_for(|s| *s == BreakerState::Closed)).await;
        if !matches!(closed, Ok(Ok(_))) {
            return false;
        }
    }
    true
}

/// Waits until every manager's breaker has left `Closed` at least once
/// since the call; false after `deadline`.
pub async fn all_opened(managers: &[&RedisManager], deadline: Duration) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    for manager in managers {
        let mut states = manager.subscribe();
        let opened =
            tokio::time::timeout_at(until, states.wait_for(|s| *s != BreakerState::Closed)).await;
        if !matches!(opened, Ok(Ok(_))) {
            return false;
        }
    }
    true
}

/// What [`FaultProxy`] does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything at once.
    Pass,
    /// Hold every chunk this long before forwarding it.
    Latency(Duration),
    /// Accept and read, forward nothing (packets lost; connections stay open).
    Blackhole,
    /// Reset every open connection and each new one (TCP RST).
    Reset,
}

struct ProxyState {
    /// 0 pass, 1 latency, 2 blackhole, 3 reset.
    mode: AtomicU8,
    latency_ms: AtomicU64,
    resets: tokio::sync::watch::Sender<u64>,
}

/// A TCP proxy between the managers and Redis that adds latency, drops
/// traffic or resets connections on command.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free local port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (resets, _) = tokio::sync::watch::channel(0);
        let state = Arc::new(ProxyState {
            mode: AtomicU8::new(0),
            latency_ms: AtomicU64::new(0),
            resets,
        });
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let _ = client.set_zero_linger();
                    if state.mode.load(Ordering::Acquire) == 3 {
                        return; // dropped with zero linger: RST
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = server.set_zero_linger();
                    let mut resets = state.resets.subscribe();
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        () = pump(client_read, server_write, &state) => {}
                        () = pump(server_read, client_write, &state) => {}
                        _ = resets.changed() => {}
                    }
                    // Every half dropped here, with zero linger: RST both ways.
                });
            }
        });
        Self { addr, state, task }
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Changes what happens to the traffic from now on.
    pub fn set(&self, fault: Fault) {
        let mode = match fault {
            Fault::Pass => 0,
            Fault::Latency(latency) => {
                self.state.latency_ms.store(
                    u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Release,
                );
                1
            }
            Fault::Blackhole => 2,
            Fault::Reset => 3,
        };
        self.state.mode.store(mode, Ordering::Release);
        if fault == Fault::Reset {
            self.state.resets.send_modify(|n| *n += 1);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: &ProxyState,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        match state.mode.load(Ordering::Acquire) {
            1 => {
                let latency = state.latency_ms.load(Ordering::Acquire);
                tokio::time::sleep(Duration::from_millis(latency)).await;
            }
            2 => continue,
            3 => return,
            _ => {}
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// This process's resident memory, from `/proc/self/status` (Linux), in KiB.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}
