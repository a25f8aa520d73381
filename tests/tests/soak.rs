//! Soak: the chaos app (cache, sessions, rate limit) on two instances under
//! a steady load, with the Redis server killed and restarted on a schedule,
//! while new visitors arrive at a steady rate — each one a client, a
//! session, a URL and a rate-limit key never seen before — so that any
//! in-process map that grows with the keys it has seen shows as rising
//! memory. Every restart cycle checks the chaos invariants (and that the
//! sessions begun since its restart are all in Redis); at the end the run
//! fails on an upward trend of the heap's held bytes (counted by this
//! binary's allocator) at their low point of each restart cycle after
//! warm-up, or on resident memory growing by half.
//!
//! CI runs the two-minute version below. `examples/soak.rs` runs the same
//! soak for longer (`cargo run --release -p tests --example soak -- --minutes 10`).
//!
//! The app here is the chaos app (`tests::chaos::app`: the same routes,
//! handlers and bodies, so its load and invariants apply) with every
//! in-process store given a small byte bound — 256 KiB for the cache's
//! local store and its near cache, 64 KiB for the rate limiter's maps —
//! and sessions a 30 s idle timeout, so that every store is full (or, for
//! the session copies, at its steady size) after warm-up, and what grows
//! after that is growth, not a store still filling.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use tests::chaos::{
    AppBounds, HOST, LATENCY_BOUND, Load, Phase, RL_PERIOD, RL_QUOTA, all_closed, bounded_app,
    page_body, tuned,
};
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;
use tower_redis_session::Expiry;

/// The in-process stores' byte bounds: small, so that the visitors fill
/// them within seconds (a rate-limit entry weighs about 150 bytes, a page
/// about 500) and they are full after warm-up. The outage queue only has
/// to hold one outage's changes.
const LOCAL_CACHE_BYTES: u64 = 256 << 10;
const NEAR_CACHE_BYTES: u64 = 256 << 10;
const RATE_LIMIT_BYTES: u64 = 64 << 10;
const SESSION_QUEUE_BYTES: usize = 1 << 20;
/// Sessions idle this long end, and their local copies go: the copies hold
/// the last half minute of visitors (about 750 per instance, 300 bytes
/// each), a plateau reached in warm-up. Their byte bound is never reached:
/// at the bound a new session may not be kept at all (the store admits by
/// frequency), and a chaos client that began one during an outage would
/// look logged out — a loss the chaos invariants rightly count.
const SESSION_IDLE: Duration = Duration::from_secs(30);
const SESSION_COPIES_BYTES: u64 = 1 << 20;
/// Each visitor may call `/visit` this many times per minute; it calls it
/// once more, so every visitor ends up denied and remembered as blocked.
const VISITS_PER_MINUTE: u32 = 2;
/// How long Redis stays down at each restart.
const OUTAGE: Duration = Duration::from_secs(2);
/// How long the load runs after recovery before the cycle is checked.
const RECOVERED_FOR: Duration = Duration::from_secs(3);
/// How long the session writes of a cycle may take to reach Redis.
const DURABLE_WITHIN: Duration = Duration::from_secs(20);
/// The last sample may be at most this many times the first after warm-up.
const MAX_GROWTH: f64 = 1.5;
/// The heap's low points (one a restart cycle, after warm-up) may rise
/// by at most this share of their mean, or [`TREND_FLOOR_KIB`] if that is
/// more: a plateau's last steps. A map growing per key grows for the whole
/// run.
const TREND_SHARE: f64 = 0.03;
const TREND_FLOOR_KIB: f64 = 384.0;
/// Progress lines on stderr this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How one soak runs.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The whole run.
    pub(crate) duration: Duration,
    /// Redis is killed every this often (at `k × restart_every`).
    pub(crate) restart_every: Duration,
    /// Client tasks of the chaos load (a fixed set of clients per cycle).
    pub(crate) clients: usize,
    /// New visitors per second, each with new keys.
    pub(crate) visitors_per_second: u32,
    /// Memory is sampled this often.
    pub(crate) sample_every: Duration,
    /// Memory before this is not judged: the stores fill, the allocator
    /// and the runtime find their size.
    pub(crate) warm_up: Duration,
    /// Where to write every memory sample (`seconds,rss_kib,anon_kib,heap_kib`
    /// lines), if anywhere.
    pub(crate) samples_csv: Option<std::path::PathBuf>,
}

/// The app: the chaos app with small in-process stores, a near cache, and
/// one more policy, `visit`, that blocks each visitor.
pub(crate) fn app(manager: RedisManager) -> Router {
    bounded_app(
        manager,
        &AppBounds {
            local_cache_bytes: Some(LOCAL_CACHE_BYTES),
            near_cache: Some((NEAR_CACHE_BYTES, Duration::from_secs(5))),
            session_expiry: Some(Expiry {
                idle: SESSION_IDLE,
                absolute: Duration::from_secs(3600),
                persistent: false,
            }),
            session_copies_bytes: Some(SESSION_COPIES_BYTES),
            session_queue_bytes: Some(SESSION_QUEUE_BYTES),
            rate_limit_bytes: Some(RATE_LIMIT_BYTES),
            visits_per_minute: Some(VISITS_PER_MINUTE),
        },
    )
}

/// The most requests over the latency bound kept for the final judgement.
const MAX_OVER_BOUND: usize = 10_000;

/// What the visitors share with the run.
#[derive(Default)]
struct Visits {
    next: AtomicU64,
    stop: AtomicBool,
    requests: AtomicU64,
    /// Redis restarts so far: a session that one of them lost is not a
    /// broken invariant (the server restarts empty).
    faults: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Requests over the latency bound (start, end, what), judged at the
    /// end net of the time the runtime was held up.
    over_bound: Mutex<Vec<(Instant, Instant, String)>>,
    /// When the runtime could not run the visitors on time, as (due, woke).
    held_up: tests::held_up::HeldUp,
}

impl Visits {
    fn failure(&self, text: String) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Enough to diagnose; bounded however long the run.
        if failures.len() < 50 {
            failures.push(text);
        }
    }

    fn held_up_during(&self, from: Instant, to: Instant) -> Duration {
        self.held_up.during(from, to)
    }
}

/// New visitors at a steady rate, each with keys never used before: a
/// client (`x-client`, the per-client policy's key), a page URL (a cache
/// entry, a coalescing flight, a `Vary` hint), a session (written, read,
/// written again) and a `visit` key that gets blocked. Keeps no state per
/// visitor, so its own memory stays flat.
struct Visitors {
    shared: Arc<Visits>,
    tasks: Vec<JoinHandle<()>>,
}

/// Tasks sending the visitors; each takes every `VISITOR_TASKS`-th one.
const VISITOR_TASKS: u32 = 4;

impl Visitors {
    fn start(apps: &[Router], per_second: u32) -> Self {
        let shared = Arc::new(Visits {
            // At its full size at once: a list that doubled would count as
            // growth of the heap (see `judge_memory`).
            over_bound: Mutex::new(Vec::with_capacity(MAX_OVER_BOUND)),
            ..Visits::default()
        });
        let period = Duration::from_secs_f64(f64::from(VISITOR_TASKS) / f64::from(per_second));
        let mut tasks: Vec<JoinHandle<()>> = (0..VISITOR_TASKS)
            .map(|_| {
                let apps = apps.to_vec();
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(period);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !shared.stop.load(Ordering::Acquire) {
                        ticks.tick().await;
                        let n = shared.next.fetch_add(1, Ordering::AcqRel);
                        visit(&apps, n, &shared).await;
                    }
                })
            })
            .collect();
        let watched = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            watched.held_up.watch(&watched.stop).await;
        }));
        Self { shared, tasks }
    }

    fn visitors(&self) -> u64 {
        self.shared.next.load(Ordering::Acquire)
    }

    fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Acquire)
    }

    /// Redis is about to be killed.
    fn fault(&self) {
        self.shared.faults.fetch_add(1, Ordering::AcqRel);
    }

    async fn stop(self) -> Vec<String> {
        self.shared.stop.store(true, Ordering::Release);
        for task in self.tasks {
            if let Err(error) = task.await {
                self.shared.failure(format!(
                    "a visitor task failed (a panic in the stack?): {error}"
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
            let held_up = self.shared.held_up_during(start, end);
            let took = end.duration_since(start);
            if took.saturating_sub(held_up) > LATENCY_BOUND {
                self.shared.failure(format!(
                    "{what} took {took:?} (the runtime was held up {held_up:?} of it), over {LATENCY_BOUND:?}"
                ));
            }
        }
        self.shared
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

const COOKIE: &str = "__Host-session";

async fn visit(apps: &[Router], n: u64, shared: &Visits) {
    let app = &apps[usize::try_from(n).unwrap_or_default() % apps.len()];
    let me = format!("v{n}");
    let call = |method: &str, uri: String| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, HOST)
            .header("x-client", &me)
    };

    let lang = ["en", "de", "fr"][usize::try_from(n % 3).unwrap_or_default()];
    let uri = format!("/page/{n}?visitor={n}");
    let request = call("GET", uri.clone()).header(header::ACCEPT_LANGUAGE, lang);
    let response = send(app, request, shared, "GET /page").await;
    let expected = page_body(&uri, lang);
    if response.status() == StatusCode::OK && response.body() != &expected {
        shared.failure(format!(
            "visitor {n}: GET {uri} ({lang}) got {:?}, not {expected:?}",
            response.body()
        ));
    }

    // A new session, read back and written again on the same instance.
    let faults = shared.faults.load(Ordering::Acquire);
    let value = format!("x{n}");
    let response = send(
        app,
        call("POST", format!("/session/a/{value}")),
        shared,
        "POST /session",
    )
    .await;
    let Some(id) = new_session(response.headers()) else {
        shared.failure(format!(
            "visitor {n}: a first session write answered {} without a session cookie",
            response.status()
        ));
        return;
    };
    let cookie = format!("{COOKIE}={id}");
    let read = call("GET", "/session/a".to_owned()).header(header::COOKIE, &cookie);
    let response = send(app, read, shared, "GET /session").await;
    let lost_in_a_restart =
        response.body() == "none" && shared.faults.load(Ordering::Acquire) != faults;
    if (response.status() != StatusCode::OK || response.body() != &value) && !lost_in_a_restart {
        shared.failure(format!(
            "visitor {n}: its session read answered {} {:?}, not its write {value:?}",
            response.status(),
            response.body()
        ));
    }
    let write = call("POST", format!("/session/b/{value}")).header(header::COOKIE, &cookie);
    let response = send(app, write, shared, "POST /session (again)").await;
    if response.status() != StatusCode::OK {
        shared.failure(format!(
            "visitor {n}: its second session write answered {}",
            response.status()
        ));
    }

    // One call more than the quota: the visitor's key ends up blocked.
    for _ in 0..=VISITS_PER_MINUTE {
        let request = call("GET", "/visit".to_owned()).header("x-visitor", &me);
        let response = send(app, request, shared, "GET /visit").await;
        if !matches!(
            response.status(),
            StatusCode::OK | StatusCode::TOO_MANY_REQUESTS
        ) {
            shared.failure(format!(
                "visitor {n}: GET /visit answered {}",
                response.status()
            ));
        }
    }
}

/// Sends one request, reads the whole response, and checks what every
/// response must be: no 5xx, within [`LATENCY_BOUND`] (judged at the end,
/// net of the time the runtime was held up).
async fn send(
    app: &Router,
    request: http::request::Builder,
    shared: &Visits,
    what: &str,
) -> Response<String> {
    let started = Instant::now();
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("valid request"))
        .await
        .unwrap_or_else(|never| match never {});
    let (parts, body) = response.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let response = Response::from_parts(parts, String::from_utf8_lossy(&bytes).into_owned());
    shared.requests.fetch_add(1, Ordering::AcqRel);
    if started.elapsed() > LATENCY_BOUND {
        let mut over_bound = shared.over_bound.lock().unwrap_or_else(|p| p.into_inner());
        if over_bound.len() < MAX_OVER_BOUND {
            over_bound.push((started, Instant::now(), what.to_owned()));
        }
    }
    if response.status().is_server_error() {
        shared.failure(format!(
            "{what} answered {}: {}",
            response.status(),
            response.body()
        ));
    }
    response
}

/// The session id a response sets, if it sets one.
fn new_session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let pair = v.split(';').next()?;
            let (name, value) = pair.split_once('=')?;
            (name.trim() == COOKIE && !value.is_empty()).then(|| value.to_owned())
        })
}

/// One memory sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Time since the start.
    pub(crate) at: Duration,
    /// Resident memory (`VmRSS`), KiB.
    pub(crate) rss: u64,
    /// Its anonymous part (`RssAnon`: the heap, stacks), KiB: what a
    /// growing map grows. The rest is mostly the binary's own pages, read
    /// in as code runs for the first time (after a restart, say).
    pub(crate) anon: u64,
    /// The bytes the program's allocations hold at the moment, KiB (from
    /// the counting allocator below): what a map that grows per key
    /// grows, without the allocator's own free lists, arenas and returned
    /// pages, which move the anonymous memory by hundreds of KiB now and
    /// then while nothing grows.
    pub(crate) heap: u64,
}

/// Counts every allocation of this process (the soak's binary alone), so
/// that the trend is judged on the bytes held, not on resident pages.
#[global_allocator]
static ALLOCATOR: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// The bytes held by live allocations, in KiB.
fn heap_kib() -> u64 {
    // A reallocation counts its growth as allocated, its shrinking as
    // deallocated.
    let stats = ALLOCATOR.stats();
    (stats
        .bytes_allocated
        .saturating_sub(stats.bytes_deallocated)
        / 1024) as u64
}

/// This process's resident memory and its anonymous part, from
/// `/proc/self/status` (Linux), in KiB.
fn memory_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}

/// Samples this process's memory every `every` until `stop`.
fn sample_memory(
    started: Instant,
    every: Duration,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        while !stop.load(Ordering::Acquire) {
            ticks.tick().await;
            if let Some((rss, anon)) = memory_kib() {
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Sample {
                        at: started.elapsed(),
                        rss,
                        anon,
                        heap: heap_kib(),
                    });
            }
        }
    })
}

/// Runs the soak; the broken invariants and memory findings (empty when
/// everything held). Progress and the memory verdict go to stderr.
pub(crate) async fn run(settings: &Settings) -> Vec<String> {
    let redis = TestRedis::start().await;
    let config = || tuned(redis.config()).build().expect("valid Redis config");
    let mut managers = Vec::new();
    for _ in 0..2 {
        managers.push(
            RedisManager::connect(config())
                .await
                .expect("the manager starts"),
        );
    }
    let apps: Vec<Router> = managers.iter().map(|m| app(m.clone())).collect();
    let checker = RedisManager::connect(
        tests::chaos::checker(redis.config())
            .build()
            .expect("valid Redis config"),
    )
    .await
    .expect("checker starts");
    let manager_refs: Vec<&RedisManager> = managers.iter().collect();
    eprintln!(
        "soak: {:?}, Redis killed every {:?} for {OUTAGE:?}, {} chaos clients, {} new visitors/s, \
         memory judged after {:?}, latency bound {LATENCY_BOUND:?}",
        settings.duration,
        settings.restart_every,
        settings.clients,
        settings.visitors_per_second,
        settings.warm_up
    );

    let started = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_memory(
        started,
        settings.sample_every,
        Arc::clone(&samples),
        Arc::clone(&stop_sampling),
    );
    let visitors = Visitors::start(&apps, settings.visitors_per_second);
    let mut failures = Vec::new();
    let mut restarts = 0u32;
    let mut requests = 0u64;
    let mut next_log = started;
    let end = started + settings.duration;
    loop {
        let cycle = restarts + 1;
        let mut load = Load::start("soak", &apps, settings.clients);
        let restart_at = started + settings.restart_every * cycle;
        // The last cycle runs to the end without a restart.
        let restarting = restart_at + OUTAGE + RECOVERED_FOR < end;
        let until = if restarting { restart_at } else { end };
        while Instant::now() < until {
            if Instant::now() >= next_log {
                log_progress(started, &visitors, requests, restarts);
                next_log += LOG_EVERY;
            }
            tokio::time::sleep_until(until.min(next_log).into()).await;
        }
        if restarting {
            load.fault();
            visitors.fault();
            redis.kill().await;
            load.begin(Phase::Outage);
            tokio::time::sleep(OUTAGE).await;
            redis.restart().await;
            restarts += 1;
            if all_closed(&manager_refs, Duration::from_secs(30)).await {
                load.begin(Phase::Recovered);
            } else {
                failures.push(format!(
                    "restart {restarts}: an instance did not recover within 30 s"
                ));
            }
            tokio::time::sleep(RECOVERED_FOR).await;
        }
        requests += [Phase::Healthy, Phase::Outage, Phase::Recovered]
            .iter()
            .map(|p| load.requests(*p))
            .sum::<u64>();
        failures.extend(
            check_cycle(&mut load, &checker, restarting)
                .await
                .into_iter()
                .map(|v| format!("cycle {cycle}: {v}")),
        );
        if !restarting {
            break;
        }
    }
    let visited = visitors.visitors();
    let visitor_requests = visitors.requests();
    failures.extend(visitors.stop().await);
    stop_sampling.store(true, Ordering::Release);
    sampler.await.expect("the memory sampler ends");
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(path) = &settings.samples_csv {
        let csv: String = samples
            .iter()
            .map(|s| {
                format!(
                    "{:.1},{},{},{}\n",
                    s.at.as_secs_f64(),
                    s.rss,
                    s.anon,
                    s.heap
                )
            })
            .collect();
        if let Err(error) = std::fs::write(path, csv) {
            failures.push(format!(
                "cannot write the samples to {}: {error}",
                path.display()
            ));
        }
    }
    eprintln!(
        "soak: {:.0} s, {restarts} restarts, {visited} visitors ({visitor_requests} requests), \
         {requests} chaos requests",
        started.elapsed().as_secs_f64()
    );
    let memory = judge_memory(&samples, settings.warm_up, settings.restart_every);
    eprintln!("{}", memory.summary);
    failures.extend(memory.failures);
    failures
}

/// Stops a cycle's load and checks the chaos invariants over it, as the
/// chaos suite does after a kill and restart: no broken invariant of the
/// load's own; no session lost unless it existed before the restart that
/// lost it (the server restarts empty) and was found gone after; the rate
/// limit within the documented bound during the outage (local and shared
/// admissions each within their part) and exact while healthy; and every
/// acknowledged write of a session made since the fault (of any session in
/// a cycle without one) in Redis.
async fn check_cycle(load: &mut Load, checker: &RedisManager, faulted: bool) -> Vec<String> {
    let mut failures = load.stop().await;
    let phases: &[Phase] = if faulted {
        &[Phase::Healthy, Phase::Outage, Phase::Recovered]
    } else {
        &[Phase::Healthy]
    };
    for phase in phases {
        if load.requests(*phase) == 0 {
            failures.push(format!("no traffic in {phase:?}"));
        }
    }

    let fault_at = load.fault_at();
    let unexplained: Vec<_> = load
        .session_losses()
        .into_iter()
        .filter(|loss| {
            !fault_at.is_some_and(|at| loss.session_created_at < at && loss.seen_at >= at)
        })
        .collect();
    if !unexplained.is_empty() {
        failures.push(format!(
            "{} sessions lost without a restart that lost them (users logged out), e.g. {:?}",
            unexplained.len(),
            unexplained.first()
        ));
    }

    if faulted {
        let outage = load.rate_limit_report(Phase::Outage, 2);
        let count = outage.count;
        let shared = count.admitted - count.admitted_local;
        if count.admitted as f64 > outage.bound
            || count.admitted_local as f64 > outage.local_bound
            || shared as f64 > outage.shared_bound
        {
            failures.push(format!(
                "the rate limit admitted {} during the outage ({} local, bound {:.0}; {shared} shared, bound {:.0}; bound in all {:.0})",
                count.admitted, count.admitted_local, outage.local_bound, outage.shared_bound, outage.bound
            ));
        }
    }
    let healthy = load.rate_limit_report(Phase::Healthy, 0);
    let exact = f64::from(RL_QUOTA)
        * (1.0 + healthy.duration.as_secs_f64() / RL_PERIOD.as_secs_f64())
        + 1.0;
    if healthy.count.admitted as f64 > exact {
        failures.push(format!(
            "the rate limit admitted {} while healthy, over the shared limit of {exact:.0}",
            healthy.count.admitted
        ));
    }

    let durable_since = if faulted {
        Phase::Outage
    } else {
        Phase::Healthy
    };
    let (expected, missing) = load
        .missing_session_writes(
            checker,
            |w| w.session_created >= durable_since,
            DURABLE_WITHIN,
        )
        .await;
    if !missing.is_empty() {
        failures.push(format!(
            "{} of {expected} acknowledged session writes not in Redis, e.g. {:?}",
            missing.len(),
            missing.first()
        ));
    }
    failures
}

fn log_progress(started: Instant, visitors: &Visitors, requests: u64, restarts: u32) {
    let (rss, anon) = memory_kib().unwrap_or_default();
    let heap = heap_kib();
    eprintln!(
        "t={:>4}s rss={rss:>7} KiB (anon {anon:>7}, heap {heap:>7}) visitors={:>7} visitor requests={:>8} chaos requests={requests:>8} restarts={restarts}",
        started.elapsed().as_secs(),
        visitors.visitors(),
        visitors.requests()
    );
}

/// What the memory samples say.
#[derive(Debug)]
pub(crate) struct Memory {
    /// One paragraph for the log: baseline, peak, last, the trend.
    pub(crate) summary: String,
    /// Empty when memory stayed flat.
    pub(crate) failures: Vec<String>,
}

/// Judges the samples: after `warm_up`, the last RSS may not exceed
/// [`MAX_GROWTH`] × the first; and the heap's held bytes may not trend
/// upward: the least-squares line through the lowest sample of each
/// `cycle` (the Redis restart period) after the warm-up may not rise by
/// more than [`TREND_SHARE`] of their mean (at least [`TREND_FLOOR_KIB`]).
///
/// The lowest sample of a cycle, because the heap swings within each one:
/// an outage fills the queues and the fallback stores, and the recovery
/// empties them (about 500 KiB up and down in the two-minute run). A line
/// through every sample leans by where in that swing the run happens to
/// end; a line through the cycles' low points does not, and a map that
/// keeps what it should not lifts every one of them.
pub(crate) fn judge_memory(samples: &[Sample], warm_up: Duration, cycle: Duration) -> Memory {
    let Some(last) = samples.last().copied() else {
        return Memory {
            summary: "memory: no sample".to_owned(),
            failures: vec!["memory: no RSS sample (not Linux?)".to_owned()],
        };
    };
    let end = last.at;
    let Some(baseline) = samples.iter().find(|s| s.at >= warm_up).copied() else {
        return Memory {
            summary: "memory: no sample after warm-up".to_owned(),
            failures: vec![format!(
                "memory: no sample after the warm-up ({warm_up:?}); run longer than the warm-up"
            )],
        };
    };
    // Each whole cycle after the warm-up: (its middle, its lowest heap).
    let mut lows: Vec<(f64, f64)> = Vec::new();
    let mut from = warm_up;
    while !cycle.is_zero() && from + cycle <= end {
        let low = samples
            .iter()
            .filter(|s| s.at >= from && s.at < from + cycle)
            .map(|s| s.heap)
            .min();
        if let Some(low) = low {
            lows.push(((from + cycle / 2).as_secs_f64(), low as f64));
        }
        from += cycle;
    }
    if lows.len() < 3 {
        return Memory {
            summary: format!("memory: {} whole cycles after the warm-up", lows.len()),
            failures: vec![format!(
                "memory: only {} whole cycles of {cycle:?} between the warm-up ({warm_up:?}) and the end ({end:?}); \
                 at least 3 are needed: run longer",
                lows.len()
            )],
        };
    }
    let peak = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let (slope, mean) = least_squares(&lows);
    let span = lows[lows.len() - 1].0 - lows[0].0;
    let rise = slope * span;
    let allowed = (mean * TREND_SHARE).max(TREND_FLOOR_KIB);
    let low_points: Vec<String> = lows.iter().map(|(_, low)| format!("{low:.0}")).collect();
    let summary = format!(
        "memory: rss at start {} KiB, after warm-up ({warm_up:?}) {} KiB, peak {peak} KiB, last {} KiB; \
         anonymous {} KiB after warm-up, last {} KiB; heap held {} KiB after warm-up, last {} KiB, \
         its lowest in each {cycle:?} after warm-up [{}] KiB: {:+.1} KiB/min, \
         {rise:+.0} KiB over {span:.0} s (allowed {allowed:.0} KiB, {:.0}% of their mean {mean:.0} KiB)",
        samples[0].rss,
        baseline.rss,
        last.rss,
        baseline.anon,
        last.anon,
        baseline.heap,
        last.heap,
        low_points.join(", "),
        slope * 60.0,
        TREND_SHARE * 100.0
    );
    let mut failures = Vec::new();
    if last.rss as f64 > baseline.rss as f64 * MAX_GROWTH {
        failures.push(format!(
            "memory grew from {} KiB after warm-up to {} KiB (over {MAX_GROWTH}x)",
            baseline.rss, last.rss
        ));
    }
    if rise > allowed {
        failures.push(format!(
            "memory kept growing after warm-up: the heap's lowest held bytes of each {cycle:?} \
             [{}] KiB, {:+.1} KiB/min, {rise:+.0} KiB over {span:.0} s, more than {allowed:.0} KiB",
            low_points.join(", "),
            slope * 60.0,
        ));
    }
    Memory { summary, failures }
}

/// The slope (KiB per second) of the least-squares line through the
/// points (seconds, KiB), and their mean (KiB).
fn least_squares(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for (t, y) in points {
        covariance += (t - mean_t) * (y - mean_y);
        variance += (t - mean_t) * (t - mean_t);
    }
    let slope = if variance > 0.0 {
        covariance / variance
    } else {
        0.0
    };
    (slope, mean_y)
}

/// Two minutes in CI: a restart every 20 s (5 restarts), 50 new visitors a
/// second (6,000 in all), memory judged from 40 s on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_minutes_of_new_visitors_and_redis_restarts_keep_every_invariant_and_memory_flat() {
    let settings = Settings {
        duration: Duration::from_secs(120),
        restart_every: Duration::from_secs(20),
        clients: 2,
        visitors_per_second: 50,
        sample_every: Duration::from_secs(1),
        warm_up: Duration::from_secs(40),
        samples_csv: None,
    };
    let failures = run(&settings).await;
    assert!(
        failures.is_empty(),
        "the soak failed:\n{}",
        failures.join("\n")
    );
}

#[cfg(test)]
mod memory_trend {
    use super::*;

    /// One sample a second for `seconds`, the heap's held bytes from
    /// `heap(t)` plus a deterministic ±`noise` KiB wobble, 2 MiB more of
    /// anonymous memory, and 8 MiB of other pages.
    fn series(seconds: u64, noise: f64, heap: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..=seconds)
            .map(|s| {
                let t = s as f64;
                let wobble = noise * ((s * 7919 % 13) as f64 / 6.0 - 1.0);
                let heap = (heap(t) + wobble).max(0.0) as u64;
                Sample {
                    at: Duration::from_secs(s),
                    rss: heap + 2_048 + 8_192,
                    anon: heap + 2_048,
                    heap,
                }
            })
            .collect()
    }

    const WARM_UP: Duration = Duration::from_secs(40);
    const CYCLE: Duration = Duration::from_secs(20);

    /// The heap bytes `steps` adds at the restarts (every 20 s) before `t`.
    fn stepped(t: f64, steps: impl Fn(u32) -> f64) -> f64 {
        (1..=(t / 20.0) as u32).map(steps).sum()
    }

    #[test]
    fn flat_memory_with_noise_and_a_bump_at_each_restart_passes() {
        let samples = series(120, 60.0, |t| {
            6_000.0 + if t % 20.0 < 5.0 { 300.0 } else { 0.0 }
        });
        let memory = judge_memory(&samples, WARM_UP, CYCLE);
        assert!(memory.failures.is_empty(), "{memory:?}");
    }

    #[test]
    fn a_plateau_reached_during_warm_up_passes() {
        let samples = series(120, 40.0, |t| 6_000.0 + 2_000.0 * (1.0 - (-t / 10.0).exp()));
        let memory = judge_memory(&samples, WARM_UP, CYCLE);
        assert!(memory.failures.is_empty(), "{memory:?}");
    }

    #[test]
    fn steps_at_the_restarts_that_shrink_pass() {
        // As measured in debug with no leak: +700, +300, +170, +40, +16 KiB.
        let samples = series(120, 20.0, |t| {
            5_000.0 + stepped(t, |k| 700.0 / f64::from(k).powf(1.7))
        });
        let memory = judge_memory(&samples, WARM_UP, CYCLE);
        assert!(memory.failures.is_empty(), "{memory:?}");
    }

    #[test]
    fn steady_growth_after_warm_up_fails_the_trend_check_alone() {
        // 450 KiB a minute: a leak of ~60 bytes for each of ~150 page
        // requests a second. Far under the 1.5x ratio.
        let samples = series(120, 60.0, |t| 6_000.0 + 7.5 * t);
        let memory = judge_memory(&samples, WARM_UP, CYCLE);
        assert_eq!(memory.failures.len(), 1, "{memory:?}");
        assert!(memory.failures[0].contains("kept growing"), "{memory:?}");
    }

    #[test]
    fn a_step_at_every_restart_that_does_not_shrink_fails() {
        let samples = series(120, 20.0, |t| 6_000.0 + stepped(t, |_| 150.0));
        let memory = judge_memory(&samples, WARM_UP, CYCLE);
        assert_eq!(memory.failures.len(), 1, "{memory:?}");
    }

    #[test]
    fn growth_over_half_again_fails_the_ratio_check_too() {
        let samples = series(120, 0.0, |t| 1_000.0 + 100.0 * t);
        let memory = judge_memory(&samples, WARM_UP, CYCLE);
        assert_eq!(memory.failures.len(), 2, "{memory:?}");
    }

    #[test]
    fn fewer_than_three_whole_cycles_after_warm_up_fail() {
        // 90 s: the cycles 40–60 and 60–80 s are whole, 80–100 s is not.
        let memory = judge_memory(&series(90, 0.0, |_| 6_000.0), WARM_UP, CYCLE);
        assert_eq!(memory.failures.len(), 1, "{memory:?}");
        assert!(memory.failures[0].contains("whole cycles"), "{memory:?}");
        assert!(
            judge_memory(&series(100, 0.0, |_| 6_000.0), WARM_UP, CYCLE)
                .failures
                .is_empty()
        );
    }

    #[test]
    fn dips_of_varying_depth_after_each_restart_pass() {
        // As measured: the heap drops by about 500 KiB as the recovery
        // empties the fallback stores, by a little more or less each time.
        let depths = [520.0, 430.0, 560.0, 410.0, 540.0, 450.0, 500.0];
        let samples = series(120, 20.0, |t| {
            let cycle = (t / 20.0) as usize;
            6_000.0 - if t % 20.0 < 5.0 { depths[cycle] } else { 0.0 }
        });
        let memory = judge_memory(&samples, WARM_UP, CYCLE);
        assert!(memory.failures.is_empty(), "{memory:?}");
    }

    #[test]
    fn too_few_samples_to_judge_fail() {
        let samples = series(30, 0.0, |_| 6_000.0);
        assert_eq!(judge_memory(&samples, WARM_UP, CYCLE).failures.len(), 1);
        assert_eq!(judge_memory(&[], WARM_UP, CYCLE).failures.len(), 1);
    }
}
