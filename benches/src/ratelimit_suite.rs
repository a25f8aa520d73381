//! Suite `ratelimit`: what a rate-limit decision costs an HTTP request.
//!
//! Every subject is the same axum route (`GET /` answering a short static
//! body) served in process on 127.0.0.1 over real TCP, with
//! `into_make_service_with_connect_info::<SocketAddr>()` so that limiters
//! keyed by client IP find the peer address. The load generator is a hyper
//! HTTP/1.1 client: one persistent keep-alive connection per task, opened
//! before the cell starts. Cells run interleaved — every subject at one
//! concurrency, in an order that alternates between repeats — and each
//! subject's throughput is divided by the `no limiter` cell and by the raw
//! Redis cell (1 GET per request, no HTTP) of the same repeat.
//!
//! Then two more tables: degraded mode (the 1-policy layer with its Redis
//! killed, [`crate::degraded`]) and Redis memory per distinct client key
//! ([`crate::keys`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use tower_redis_core::redis;
use tower_redis_core::{RedisConfig, RedisManager};
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};

use crate::Options;
use crate::cells::{Cell, NOT_BUILT, TRIP_SOURCE, check_round_trips, run_interleaved};
use crate::degraded::{self, Outage};
use crate::error::BenchError;
use crate::grid::{Grid, Section, timing};
use crate::http_load::{
    Expect, HttpError, HttpRequest, Sender, clear_keys, connect, manager_for, managers, send, serve,
};
use crate::keys;
use crate::raw::{RawClient, RawPlan, RawShape, RawValue, RedisBenchmark};
use crate::report::Target;
use crate::server::{BenchRedis, requests_sent};
use tower_redis_core::testing::Monitor;

/// What the route answers.
const BODY: &str = "ok";
/// Prefix of every key the limiters write; cleared before and after the suite.
const KEY_PREFIX: &str = "tower-redis-bench:ratelimit";
/// A quota no cell can exhaust: 10⁹ requests per hour.
const HUGE_QUOTA: u32 = 1_000_000_000;
/// The period of every policy.
const HOUR: Duration = Duration::from_secs(3600);
/// The issue's target for limited / unlimited throughput.
const TARGET_RATIO: f64 = 0.7;
/// The issue's budget: Redis round trips a decision may add.
const MAX_ROUND_TRIPS: f64 = 1.0;
/// Commands the rate-limit script (`decide.lua`) runs inside its EVALSHA.
/// `INFO commandstats` counts them as if a client had sent them, so they are
/// left out of the top-level count (and listed separately).
/// `lease.lua` runs `TIME`, `GET`, `SET`, `SETRANGE` and `DEL`.
const SCRIPT_INNER: &[&str] = &["time", "get", "mget", "set", "setrange", "del"];
/// The raw baselines' value: small, as a decision's reply is (32 bytes for
/// one policy).
const RAW_KEY: &str = "tower-redis-bench:ratelimit:raw";
const RAW_LEN: usize = 16;
/// The distinct-key table's quota per client and hour: low, so that each
/// client's key outlives the run (a GCRA key lives one emission interval,
/// here 6 minutes, after one request).
const KEYS_QUOTA: u32 = 10;
/// The header the distinct-key table keys its policy by.
const KEY_HEADER: &str = "x-bench-client";

/// The cells of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    NoLimiter,
    Raw,
    RedisBenchmark,
    OneGet,
    OnePolicy,
    ClientKeys,
    ThreePolicies,
    BlockedKey,
    RedisDown,
    Governor,
    GovernorHeaders,
    Leased,
}

impl Subject {
    /// Every subject, in table order.
    const ALL: [Subject; 12] = [
        Subject::NoLimiter,
        Subject::Raw,
        Subject::RedisBenchmark,
        Subject::OneGet,
        Subject::OnePolicy,
        Subject::ClientKeys,
        Subject::ThreePolicies,
        Subject::BlockedKey,
        Subject::RedisDown,
        Subject::Governor,
        Subject::GovernorHeaders,
        // Last: its preflight's lease goes back 1 s later, after every
        // other preflight (the blocked-key one counts commands).
        Subject::Leased,
    ];

    fn label(self) -> &'static str {
        match self {
            Subject::NoLimiter => "no limiter",
            Subject::Raw => "raw Redis: 1 GET per request on a bare redis-rs connection (no HTTP)",
            Subject::RedisBenchmark => "raw Redis: redis-benchmark, 1 GET per request (no HTTP)",
            Subject::OneGet => "reference: no limiter, handler makes 1 Redis GET",
            Subject::OnePolicy => "tower-redis-ratelimit, 1 policy",
            Subject::ClientKeys => {
                "tower-redis-ratelimit, 1 policy keyed by a header, a distinct client per connection"
            }
            Subject::ThreePolicies => "tower-redis-ratelimit, 3 stacked policies",
            Subject::BlockedKey => "tower-redis-ratelimit, blocked key",
            Subject::RedisDown => "tower-redis-ratelimit, Redis down (local fallback)",
            Subject::Governor => "tower_governor",
            Subject::GovernorHeaders => {
                "tower_governor with its x-ratelimit-* response fields (use_headers)"
            }
            Subject::Leased => {
                "tower-redis-ratelimit, 1 global GCRA policy leased 1000 units at a time"
            }
        }
    }

    /// A short name for progress lines and notes.
    fn short(self) -> &'static str {
        match self {
            Subject::NoLimiter => "no limiter",
            Subject::Raw => "raw redis-rs",
            Subject::RedisBenchmark => "redis-benchmark",
            Subject::OneGet => "1 GET",
            Subject::OnePolicy => "1 policy",
            Subject::ClientKeys => "1 policy, client per connection",
            Subject::ThreePolicies => "3 policies",
            Subject::BlockedKey => "blocked key",
            Subject::RedisDown => "Redis down",
            Subject::Governor => "tower_governor",
            Subject::GovernorHeaders => "tower_governor with headers",
            Subject::Leased => "leased global key",
        }
    }

    /// The status every response of a cell must have.
    fn expected_status(self) -> StatusCode {
        match self {
            Subject::BlockedKey => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::OK,
        }
    }

    /// Subjects whose requests may run the rate-limit script on Redis.
    fn runs_script(self) -> bool {
        matches!(
            self,
            Subject::OnePolicy
                | Subject::ClientKeys
                | Subject::ThreePolicies
                | Subject::BlockedKey
                | Subject::Leased
        )
    }

    fn index(self) -> usize {
        Subject::ALL
            .iter()
            .position(|s| *s == self)
            .unwrap_or_default()
    }
}

/// Distinct clients of the `ClientKeys` cell: task `i` is client `i % MAX_CLIENTS`.
const MAX_CLIENTS: usize = 256;

/// `GET /` as client `i` of the `ClientKeys` cell.
fn client_request(i: usize) -> Result<HttpRequest, BenchError> {
    let mut request = HttpRequest::get("/");
    let value = http::HeaderValue::from_str(&format!("client-{i}"))
        .map_err(|e| BenchError::Check(format!("client header: {e}")))?;
    request.fields.insert(KEY_HEADER, value);
    Ok(request)
}

/// The route every subject serves.
fn route() -> Router {
    Router::new().route("/", get(|| async { BODY }))
}

/// A layer builder on `manager` whose keys live under this layer's own hash
/// tag, so that no two cells share a counter.
fn limits(manager: &RedisManager, tag: &str) -> tower_redis_ratelimit::RateLimitLayerBuilder {
    RateLimitLayer::builder(manager.clone()).hash_tag(tag)
}

/// The app of one subject; `None` for a peer that is not compiled in.
fn app(
    subject: Subject,
    manager: &RedisManager,
    down: &RedisManager,
) -> Result<Option<Router>, BenchError> {
    let app = match subject {
        Subject::Raw | Subject::RedisBenchmark => return Ok(None),
        Subject::NoLimiter => route(),
        Subject::OneGet => {
            // What one round trip through the manager costs a request, for
            // scale: no limiter, but the handler reads one (missing) key.
            let manager = manager.clone();
            let mut read = redis::cmd("GET");
            read.arg(format!("{KEY_PREFIX}:reference"));
            let read = Arc::new(read);
            Router::new().route(
                "/",
                get(move || {
                    let (manager, read) = (manager.clone(), Arc::clone(&read));
                    async move {
                        match manager.query::<Option<Vec<u8>>>(&read).await {
                            Ok(_) => (StatusCode::OK, BODY),
                            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, BODY),
                        }
                    }
                }),
            )
        }
        Subject::OnePolicy => route().layer(
            limits(manager, "bench-1")
                .policy(Policy::gcra("per-ip", HUGE_QUOTA, HOUR))
                .build()?,
        ),
        Subject::ClientKeys => route().layer(
            limits(manager, "bench-clients")
                .policy(Policy::gcra("per-client", HUGE_QUOTA, HOUR).key(Key::header(KEY_HEADER)))
                .build()?,
        ),
        Subject::ThreePolicies => route().layer(
            limits(manager, "bench-3")
                .policy(Policy::gcra("per-ip", HUGE_QUOTA, HOUR))
                .policy(Policy::fixed_window("route", HUGE_QUOTA, HOUR).path("/"))
                .policy(Policy::sliding_window("global", HUGE_QUOTA, HOUR).key(Key::global()))
                .build()?,
        ),
        Subject::BlockedKey => route().layer(
            limits(manager, "bench-blocked")
                .policy(Policy::gcra("per-ip", 1, HOUR))
                .build()?,
        ),
        Subject::RedisDown => route().layer(
            limits(down, "bench-down")
                .policy(Policy::gcra("per-ip", HUGE_QUOTA, HOUR))
                .build()?,
        ),
        Subject::Governor => return governor_app(false),
        Subject::GovernorHeaders => return governor_app(true),
        Subject::Leased => route().layer(
            limits(manager, "bench-leased")
                .policy(
                    Policy::gcra("global", HUGE_QUOTA, HOUR)
                        .key(Key::global())
                        .lease(LEASE_UNITS),
                )
                .build()?,
        ),
    };
    Ok(Some(app))
}

/// tower_governor keyed by peer IP (its default, read from `ConnectInfo`),
/// with the same huge quota: one cell per 3.6 µs, burst 10⁹. With
/// `headers`, its `x-ratelimit-limit` / `-remaining` response fields on
/// (`use_headers`; off by default), as tower-redis-ratelimit's `RateLimit`
/// fields always are.
#[cfg(feature = "peers")]
fn governor_app(headers: bool) -> Result<Option<Router>, BenchError> {
    use tower_governor::GovernorLayer;
    use tower_governor::governor::GovernorConfigBuilder;

    let refused = || BenchError::Check("tower_governor rejected its configuration".to_owned());
    let mut builder = GovernorConfigBuilder::default();
    builder.period(HOUR / HUGE_QUOTA).burst_size(HUGE_QUOTA);
    if headers {
        let config = builder.use_headers().finish().ok_or_else(refused)?;
        return Ok(Some(route().layer(GovernorLayer::new(config))));
    }
    let config = builder.finish().ok_or_else(refused)?;
    Ok(Some(route().layer(GovernorLayer::new(config))))
}

#[cfg(not(feature = "peers"))]
fn governor_app(_headers: bool) -> Result<Option<Router>, BenchError> {
    Ok(None)
}

fn check(subject: Subject, what: &str, holds: bool) -> Result<(), BenchError> {
    if holds {
        Ok(())
    } else {
        Err(BenchError::Check(format!(
            "ratelimit, {}: {what}",
            subject.label()
        )))
    }
}

/// Checks, once, that a subject answers the way its cell assumes.
async fn preflight(
    redis: &BenchRedis,
    subject: Subject,
    addr: SocketAddr,
) -> Result<(), BenchError> {
    let failed = |e: HttpError| BenchError::Check(format!("ratelimit, {}: {e}", subject.label()));
    let mut sender = connect(addr).await.map_err(failed)?;
    let (status, fields, body) = if subject == Subject::ClientKeys {
        send(&mut sender, &client_request(0)?)
            .await
            .map_err(failed)?
    } else {
        get_root(&mut sender).await.map_err(failed)?
    };
    let field = |name: &str| {
        fields
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let limit = field("ratelimit");
    match subject {
        Subject::Raw | Subject::RedisBenchmark => {}
        Subject::NoLimiter | Subject::OneGet | Subject::Governor | Subject::GovernorHeaders => {
            check(
                subject,
                "expected 200 and the body",
                status == StatusCode::OK && body == BODY.as_bytes(),
            )?;
            // tower_governor's fields: on with `use_headers` only.
            let counted = !field("x-ratelimit-remaining").is_empty();
            check(
                subject,
                "x-ratelimit-remaining only with use_headers",
                counted == (subject == Subject::GovernorHeaders),
            )?;
        }
        Subject::OnePolicy | Subject::ThreePolicies | Subject::ClientKeys | Subject::Leased => {
            check(
                subject,
                &format!("expected 200, got {status}"),
                status == StatusCode::OK,
            )?;
            check(
                subject,
                &format!("expected a RateLimit field decided by Redis, got {limit:?}"),
                !limit.is_empty() && !limit.contains("local"),
            )?;
            if subject == Subject::ThreePolicies {
                let policies = field("ratelimit-policy");
                check(
                    subject,
                    &format!("expected 3 policies, got {policies:?}"),
                    policies.matches(";q=").count() == 3,
                )?;
            }
        }
        Subject::RedisDown => {
            check(
                subject,
                &format!("expected 200, got {status}"),
                status == StatusCode::OK,
            )?;
            check(
                subject,
                &format!("expected a local decision, got RateLimit {limit:?}"),
                limit.contains(";local"),
            )?;
        }
        Subject::BlockedKey => {
            // The first request of the hour is allowed; the next is denied
            // by Redis, which puts the key in the blocked cache.
            let (second, _, _) = get_root(&mut sender).await.map_err(failed)?;
            check(
                subject,
                &format!("expected the second request to get 429, got {second}"),
                second == StatusCode::TOO_MANY_REQUESTS,
            )?;
            let monitor = Monitor::start(redis.client()).await?;
            let (third, _, _) = get_root(&mut sender).await.map_err(failed)?;
            let commands = requests_sent(monitor).await?.len();
            check(
                subject,
                &format!(
                    "expected 429 from the blocked-key cache, got {third} and {commands} Redis commands"
                ),
                third == StatusCode::TOO_MANY_REQUESTS && commands == 0,
            )?;
        }
    }
    Ok(())
}

/// Runs the suite and returns its markdown section.
pub(crate) async fn run(redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
    clear_keys(redis, KEY_PREFIX).await?;
    let pool_size = options.pool_size.unwrap_or(RedisConfig::DEFAULT_POOL_SIZE);
    let (manager, down, dead) = managers(redis, pool_size, KEY_PREFIX).await?;
    let value = RawValue::put(redis, RAW_KEY, RAW_LEN).await?;

    let mut cells = Vec::with_capacity(Subject::ALL.len());
    for subject in Subject::ALL {
        let cell = match subject {
            Subject::Raw => Cell::redis(
                subject.label(),
                subject.short(),
                RawClient::Bare(redis.client().get_multiplexed_async_connection().await?),
                RawPlan::new(&RawShape::one_get(), &value),
            ),
            Subject::RedisBenchmark => Cell::benchmark(
                subject.label(),
                subject.short(),
                RedisBenchmark::find(redis, &value),
            ),
            _ => match app(subject, &manager, &down)? {
                Some(app) => {
                    let server = serve(app).await?;
                    preflight(redis, subject, server.addr).await?;
                    Cell::http(
                        subject.label(),
                        subject.short(),
                        server,
                        if subject == Subject::ClientKeys {
                            (0..MAX_CLIENTS)
                                .map(|i| client_request(i).map(Arc::new))
                                .collect::<Result<_, _>>()?
                        } else {
                            vec![Arc::new(HttpRequest::get("/"))]
                        },
                        Expect {
                            status: subject.expected_status(),
                            body: Some(Bytes::from_static(BODY.as_bytes())),
                        },
                        if subject.runs_script() {
                            SCRIPT_INNER
                        } else {
                            &[]
                        },
                    )
                }
                None => Cell::missing(subject.label(), subject.short(), NOT_BUILT),
            },
        };
        cells.push(cell);
    }

    let rows = run_interleaved(redis, "ratelimit", &cells, options).await?;
    let mut trips = Target::new(format!(
        "≤ {MAX_ROUND_TRIPS:.0} Redis round trip per decision ({TRIP_SOURCE})"
    ));
    for subject in [
        Subject::OnePolicy,
        Subject::ClientKeys,
        Subject::ThreePolicies,
    ] {
        check_round_trips(
            &mut trips,
            redis,
            &cells,
            subject.index(),
            "untimed",
            MAX_ROUND_TRIPS,
        )
        .await?;
    }
    let grid = Grid::new("concurrency", &cells, rows);
    drop(cells);
    clear_keys(redis, KEY_PREFIX).await?;

    let mut section = Section::new(
        "ratelimit: GET / on an in-process axum server over TCP, with and without a rate limiter",
        &format!(
            "{}. hyper HTTP/1.1 client, one keep-alive connection per task. Quotas 10⁹ per hour (never reached) \
             except `blocked key` (1 per hour). Managers: RedisConfig defaults with pool_size {pool_size}; \
             `Redis down` points at {}. Raw Redis rows: {RAW_LEN}-byte GETs, no HTTP.",
            timing(options, true),
            dead.how
        ),
    );
    section.table(&grid.table(&[
        (Subject::NoLimiter.index(), "no limiter"),
        (Subject::Raw.index(), "raw redis-rs"),
    ]));
    let mut throughput = Target::new(format!(
        "rate-limited / no limiter ≥ {TARGET_RATIO:.2} (1 policy on one client, 1 policy on a client per connection, 3 stacked policies)"
    ));
    for subject in [
        Subject::OnePolicy,
        Subject::ClientKeys,
        Subject::ThreePolicies,
    ] {
        grid.check_ratio(
            &mut throughput,
            subject.index(),
            Subject::NoLimiter.index(),
            TARGET_RATIO,
            |_| true,
        );
    }
    section.target(&throughput);
    section.target(&trips);
    for target in lease_targets(&grid) {
        section.target(&target);
    }
    for target in issue_targets(&grid) {
        section.target(&target);
    }
    section.note(server_time_note(&grid));
    for subject in [
        Subject::OnePolicy,
        Subject::ClientKeys,
        Subject::ThreePolicies,
        Subject::Governor,
        Subject::GovernorHeaders,
        Subject::Leased,
    ] {
        section.note(format!(
            "{} / no limiter, median (per repeat): {}",
            subject.short(),
            grid.spread(subject.index(), Subject::NoLimiter.index())
        ));
    }
    // Like for like: both answering with their rate-limit fields.
    section.note(format!(
        "leased global key / tower_governor with headers, median (per repeat): {}",
        grid.spread(Subject::Leased.index(), Subject::GovernorHeaders.index())
    ));
    for note in grid.notes() {
        section.note(note);
    }
    section.gap();

    section.append(&degraded::run(&RateLimitOutage, options).await?);
    section.append(&key_memory(redis, pool_size, options).await?);
    Ok(section.finish())
}

/// Units a leased policy takes from Redis at a time.
const LEASE_UNITS: u32 = 1000;
/// The leased global key / tower_governor (one key in process) at c=64.
const LEASE_GOVERNOR_RATIO: f64 = 0.9;
/// Top-level Redis commands per request of the leased global key.
const LEASE_COMMANDS: f64 = 0.01;

/// The verdicts of leased quotas: one global key at c=64 against
/// tower_governor (which keeps its one key in process), and the Redis
/// commands a request costs (leases and give-backs, every row).
fn lease_targets(grid: &Grid) -> Vec<Target> {
    let leased = Subject::Leased.index();
    let mut speed = Target::new(format!(
        "leased global key ({LEASE_UNITS} units a lease) / tower_governor ≥ {LEASE_GOVERNOR_RATIO:.1}× at c=64"
    ));
    grid.check_ratio(
        &mut speed,
        leased,
        Subject::Governor.index(),
        LEASE_GOVERNOR_RATIO,
        |row| row.key.parse::<usize>().unwrap_or(0) == 64,
    );
    let mut commands = Target::new(format!(
        "leased global key: ≤ {LEASE_COMMANDS} Redis commands per request (every repeat, warm-up included)"
    ));
    grid.check_commands(&mut commands, leased, LEASE_COMMANDS);
    vec![speed, commands]
}

/// Rate limit / reference route (the same route whose handler makes one
/// Redis GET): at c=1 the decision must cost about what its round trip
/// does; at c ≥ 64 batching must make it cheaper than one GET a request.
const REFERENCE_RATIO_C1: f64 = 0.9;
const REFERENCE_RATIO_LOADED: f64 = 1.0;
/// Redis server time per decision (µs), from `INFO commandstats`.
const SERVER_US_ONE_POLICY: f64 = 5.0;
const SERVER_US_THREE_POLICIES: f64 = 10.0;
/// p99.9 of a rate-limited cell at c=64 / the reference route's.
const TAIL_RATIO: f64 = 1.5;

/// Server time of the rate-limit script per decision in one sample:
/// `EVALSHA` usec (the commands it runs included) / requests.
fn server_us_per_decision(sample: &crate::cells::Sample) -> f64 {
    let usec = sample.commands.get("evalsha").map_or(0, |stat| stat.usec);
    usec as f64 / sample.calls.max(1) as f64
}

/// The verdicts of the speed issue's rate-limit rows: throughput against
/// the reference route, server time per decision, and the tail at c=64.
fn issue_targets(grid: &Grid) -> Vec<Target> {
    // One policy on one client, and on a client per connection (a
    // per-client policy's usual load: as many counters as clients).
    let (one, clients, three, reference) = (
        Subject::OnePolicy.index(),
        Subject::ClientKeys.index(),
        Subject::ThreePolicies.index(),
        Subject::OneGet.index(),
    );
    let concurrency = |row: &crate::cells::Row| row.key.parse::<usize>().unwrap_or(0);
    let mut c1 = Target::new(format!(
        "rate limit, 1 policy (on one client, on a client per connection) / reference route (handler makes 1 GET) ≥ {REFERENCE_RATIO_C1:.1}× at c=1"
    ));
    let mut loaded = Target::new(format!(
        "rate limit, 1 policy (on one client, on a client per connection) / reference route ≥ {REFERENCE_RATIO_LOADED:.1}× at c ≥ 64 (batching)"
    ));
    for subject in [one, clients] {
        grid.check_ratio(&mut c1, subject, reference, REFERENCE_RATIO_C1, |row| {
            concurrency(row) == 1
        });
        grid.check_ratio(
            &mut loaded,
            subject,
            reference,
            REFERENCE_RATIO_LOADED,
            |row| concurrency(row) >= 64,
        );
    }
    let mut server = Target::new(format!(
        "Redis server time per decision (`INFO commandstats` EVALSHA usec / requests) ≤ {SERVER_US_ONE_POLICY:.0} µs for 1 policy, ≤ {SERVER_US_THREE_POLICIES:.0} µs for 3"
    ));
    let mut tail = Target::new(format!(
        "p99.9 at c=64 (1 policy on one client, on a client per connection, 3 policies) / the reference route's p99.9 ≤ {TAIL_RATIO:.1}×"
    ));
    for row in &grid.rows {
        for (subject, max) in [
            (one, SERVER_US_ONE_POLICY),
            (clients, SERVER_US_ONE_POLICY),
            (three, SERVER_US_THREE_POLICIES),
        ] {
            let at = format!("{} {}", row.name, Subject::ALL[subject].short());
            let us = crate::grid::med(&row.samples[subject], server_us_per_decision);
            if us.is_nan() {
                server.not_measured(at, "no sample");
            } else {
                server.at_most(at, us, max);
            }
        }
        if concurrency(row) == 64 {
            let p999 = |i: usize| crate::grid::med(&row.samples[i], |s| s.p999_us);
            for subject in [one, clients, three] {
                tail.at_most(
                    format!("{} {}", row.name, Subject::ALL[subject].short()),
                    p999(subject) / p999(reference),
                    TAIL_RATIO,
                );
            }
        }
    }
    vec![c1, loaded, server, tail]
}

/// Server µs per decision and what that makes one Redis core decide per
/// second (10⁶ / Redis CPU µs per request, from `INFO cpu`).
fn server_time_note(grid: &Grid) -> String {
    let mut parts = Vec::new();
    for row in &grid.rows {
        for subject in [
            Subject::OnePolicy,
            Subject::ClientKeys,
            Subject::ThreePolicies,
        ] {
            let samples = &row.samples[subject.index()];
            let us = crate::grid::med(samples, server_us_per_decision);
            let cpu = crate::grid::med(samples, crate::cells::Sample::redis_cpu_us_per_request);
            parts.push(format!(
                "{} {}: {us:.2} µs script time, {cpu:.1} µs Redis CPU → {} decisions/s per Redis core",
                row.name,
                subject.short(),
                crate::report::thousands(1e6 / cpu)
            ));
        }
    }
    format!(
        "server time per decision (EVALSHA usec / requests; Redis CPU from `INFO cpu` includes its network I/O): {}",
        parts.join(" | ")
    )
}

/// The 1-policy layer, for the degraded-mode section.
struct RateLimitOutage;

impl Outage for RateLimitOutage {
    fn suite(&self) -> &'static str {
        "ratelimit"
    }

    fn describe(&self) -> String {
        "`GET /` behind `tower-redis-ratelimit, 1 policy` (per-IP GCRA, 10⁹ per hour): Redis decides while up, \
         the in-process limiter (the default fallback) while down."
            .to_owned()
    }

    fn app(&self, manager: &RedisManager) -> Result<Router, BenchError> {
        Ok(route().layer(
            limits(manager, "bench-degraded")
                .policy(Policy::gcra("per-ip", HUGE_QUOTA, HOUR))
                .build()?,
        ))
    }

    async fn prepare(
        &self,
        _addr: SocketAddr,
        _tasks: usize,
    ) -> Result<Vec<Arc<HttpRequest>>, BenchError> {
        Ok(vec![Arc::new(HttpRequest::get("/"))])
    }

    fn expect(&self) -> Expect {
        Expect::ok(Some(Bytes::from_static(BODY.as_bytes())))
    }

    fn inner(&self) -> &'static [&'static str] {
        SCRIPT_INNER
    }
}

/// Redis memory per distinct client: a GCRA policy keyed by a header, each
/// request with its own value.
async fn key_memory(
    redis: &BenchRedis,
    pool_size: u32,
    options: &Options,
) -> Result<String, BenchError> {
    let prefix = "tower-redis-bench:ratelimit-keys";
    let manager = manager_for(redis.url(), pool_size, prefix).await?;
    let app = route().layer(
        RateLimitLayer::builder(manager)
            .policy(Policy::gcra("per-client", KEYS_QUOTA, HOUR).key(Key::header(KEY_HEADER)))
            .build()?,
    );
    let checkpoints = keys::grow(
        redis,
        "ratelimit",
        app,
        prefix,
        &options.keys,
        |i| {
            Request::get("/")
                .header(KEY_HEADER, format!("client-{i}"))
                .body(Body::empty())
                .unwrap_or_default()
        },
        StatusCode::OK,
    )
    .await?;
    let mut section = Section::default();
    section.subsection(
        "ratelimit: Redis memory by number of distinct clients",
        &format!(
            "One policy, `Policy::gcra(\"per-client\", {KEYS_QUOTA}, 1 h).key(Key::header(\"{KEY_HEADER}\"))`; \
             request `i` carries `{KEY_HEADER}: client-i`, so every request is a new client's first decision, whose \
             key lives {} s (a GCRA key expires when its client's next request would be fully allowed again: one \
             emission interval after a single request). Requests go to \
             the axum `Router` in process (no HTTP). Key names carry the bench prefix `{prefix}` ({} bytes; the \
             default `tower-redis` is 11). Memory from `INFO memory` used_memory and `DBSIZE` before the first \
             key and at each checkpoint; `MEMORY USAGE <key> SAMPLES 0` of a few keys.",
            HOUR.as_secs() / u64::from(KEYS_QUOTA),
            prefix.len()
        ),
    );
    section.table(&keys::table(&checkpoints, "clients"));
    section.gap();
    Ok(section.finish())
}

/// `GET /` on `sender`: the status, the fields and the whole body.
async fn get_root(sender: &mut Sender) -> Result<(StatusCode, HeaderMap, Bytes), HttpError> {
    send(sender, &HttpRequest::get("/")).await
}
