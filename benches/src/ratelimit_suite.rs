//! Suite `ratelimit`: what a rate-limit decision costs an HTTP request.
//!
//! Every subject is the same axum route (`GET /` answering a short static
//! body) served in process on 127.0.0.1 over real TCP, with
//! `into_make_service_with_connect_info::<SocketAddr>()` so that limiters
//! keyed by client IP find the peer address. The load generator is a hyper
//! HTTP/1.1 client: one persistent keep-alive connection per task, opened
//! before the cell starts. Cells run interleaved — every subject at one
//! concurrency, in an order that alternates between repeats — and each
//! subject's throughput is divided by the `no limiter` cell of the same
//! repeat.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_redis_core::redis;
use tower_redis_core::{RedisConfig, RedisManager};
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};

use crate::Options;
use crate::cpu::{self, CpuUse};
use crate::error::BenchError;
use crate::http_load::{
    Cell, Expect, HttpError, HttpRequest, Sample, Sender, breakdown, clear_keys, connect, managers,
    med, ratios, run_interleaved, send, serve, top_level,
};
use crate::report::{Table, median, micros, thousands};
use crate::server::BenchRedis;

/// What the route answers.
const BODY: &str = "ok";
/// Prefix of every key the limiters write; cleared before and after the suite.
const KEY_PREFIX: &str = "tower-redis-bench:ratelimit";
/// A quota no cell can exhaust: 10⁹ requests per hour.
const HUGE_QUOTA: u32 = 1_000_000_000;
/// The period of every policy.
const HOUR: Duration = Duration::from_secs(3600);
/// The target for limited / unlimited throughput.
const TARGET_RATIO: f64 = 0.7;
/// The budget: Redis round trips a decision may add.
const MAX_ROUND_TRIPS: f64 = 1.0;
/// Commands the rate-limit script (`decide.lua`) runs inside its EVALSHA.
/// `INFO commandstats` counts them as if a client had sent them, so they are
/// left out of the top-level count (and listed separately).
const SCRIPT_INNER: &[&str] = &["time", "get", "set", "hmget", "hset", "pexpire"];
/// What the governor row says when the `peers` feature is off.
const NOT_BUILT: &str = "not built (enable --features peers)";

/// The cells of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    NoLimiter,
    OneGet,
    OnePolicy,
    ThreePolicies,
    BlockedKey,
    RedisDown,
    Governor,
}

impl Subject {
    /// Every subject, in table order.
    const ALL: [Subject; 7] = [
        Subject::NoLimiter,
        Subject::OneGet,
        Subject::OnePolicy,
        Subject::ThreePolicies,
        Subject::BlockedKey,
        Subject::RedisDown,
        Subject::Governor,
    ];

    fn label(self) -> &'static str {
        match self {
            Subject::NoLimiter => "no limiter",
            Subject::OneGet => "reference: no limiter, handler makes 1 Redis GET",
            Subject::OnePolicy => "tower-redis-ratelimit, 1 policy",
            Subject::ThreePolicies => "tower-redis-ratelimit, 3 stacked policies",
            Subject::BlockedKey => "tower-redis-ratelimit, blocked key",
            Subject::RedisDown => "tower-redis-ratelimit, Redis down (local fallback)",
            Subject::Governor => "tower_governor",
        }
    }

    /// A short name for progress lines and notes.
    fn short(self) -> &'static str {
        match self {
            Subject::NoLimiter => "no limiter",
            Subject::OneGet => "1 GET",
            Subject::OnePolicy => "1 policy",
            Subject::ThreePolicies => "3 policies",
            Subject::BlockedKey => "blocked key",
            Subject::RedisDown => "Redis down",
            Subject::Governor => "tower_governor",
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
            Subject::OnePolicy | Subject::ThreePolicies | Subject::BlockedKey
        )
    }

    /// Cells whose decisions go to Redis (the round-trip budget applies).
    fn decides_on_redis(self) -> bool {
        matches!(self, Subject::OnePolicy | Subject::ThreePolicies)
    }
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
        Subject::Governor => return governor_app(),
    };
    Ok(Some(app))
}

/// tower_governor keyed by peer IP (its default, read from `ConnectInfo`),
/// with the same huge quota: one cell per 3.6 µs, burst 10⁹.
#[cfg(feature = "peers")]
fn governor_app() -> Result<Option<Router>, BenchError> {
    use tower_governor::GovernorLayer;
    use tower_governor::governor::GovernorConfigBuilder;

    let config = GovernorConfigBuilder::default()
        .period(HOUR / HUGE_QUOTA)
        .burst_size(HUGE_QUOTA)
        .finish()
        .ok_or_else(|| BenchError::Check("tower_governor rejected its configuration".to_owned()))?;
    Ok(Some(route().layer(GovernorLayer::new(config))))
}

#[cfg(not(feature = "peers"))]
fn governor_app() -> Result<Option<Router>, BenchError> {
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
    let (status, fields, body) = get_root(&mut sender).await.map_err(failed)?;
    let field = |name: &str| {
        fields
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let limit = field("ratelimit");
    match subject {
        Subject::NoLimiter | Subject::OneGet | Subject::Governor => {
            check(
                subject,
                "expected 200 and the body",
                status == StatusCode::OK && body == BODY.as_bytes(),
            )?;
        }
        Subject::OnePolicy | Subject::ThreePolicies => {
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
            let before = redis.command_calls().await?;
            let (third, _, _) = get_root(&mut sender).await.map_err(failed)?;
            let commands =
                top_level(&redis.command_calls().await?.deltas(&before), SCRIPT_INNER).calls;
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

    let mut cells = Vec::with_capacity(Subject::ALL.len());
    for subject in Subject::ALL {
        let server = match app(subject, &manager, &down)? {
            Some(app) => Some(serve(app).await?),
            None => None,
        };
        if let Some(server) = &server {
            preflight(redis, subject, server.addr).await?;
        }
        cells.push(Cell {
            short: subject.short(),
            server,
            requests: vec![Arc::new(HttpRequest::get("/"))],
            expect: Arc::new(Expect {
                status: subject.expected_status(),
                body: Some(Bytes::from_static(BODY.as_bytes())),
            }),
            inner: if subject.runs_script() {
                SCRIPT_INNER
            } else {
                &[]
            },
        });
    }

    let rows = run_interleaved(redis, "ratelimit", &cells, options).await?;
    drop(cells);
    clear_keys(redis, KEY_PREFIX).await?;
    Ok(render(options, pool_size, dead.how, &rows))
}

/// `GET /` on `sender`: the status, the fields and the whole body.
async fn get_root(sender: &mut Sender) -> Result<(StatusCode, HeaderMap, Bytes), HttpError> {
    send(sender, &HttpRequest::get("/")).await
}

fn render(
    options: &Options,
    pool_size: u32,
    dead_how: &str,
    rows: &[(usize, Vec<Vec<Sample>>)],
) -> String {
    let mut table = Table::new([
        "concurrency",
        "subject",
        "requests/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "ratio to no limiter",
        "Redis commands / request",
        "CPU µs / request: process",
        "CPU µs / request: Redis",
    ])
    .left_aligned(2);
    let mut verdicts = Vec::new();
    let mut trips = Vec::new();
    let mut spreads: Vec<String> = Vec::new();
    for (concurrency, row) in rows {
        let baseline = &row[0];
        let mut pair_ratios = Vec::new();
        for (subject, samples) in Subject::ALL.iter().zip(row) {
            if samples.is_empty() {
                // Only a peer left out of the build has no samples.
                table.row([
                    concurrency.to_string(),
                    subject.label().to_owned(),
                    NOT_BUILT.to_owned(),
                ]);
                continue;
            }
            let each = ratios(baseline, samples);
            let ratio = median(&each).unwrap_or(f64::NAN);
            let commands = med(samples, Sample::top_level_per_request);
            table.row([
                concurrency.to_string(),
                subject.label().to_owned(),
                thousands(med(samples, |s| s.requests_per_sec)),
                micros(med(samples, |s| s.p50_us)),
                micros(med(samples, |s| s.p99_us)),
                micros(med(samples, |s| s.p999_us)),
                format!("{ratio:.2}"),
                format!("{commands:.2}"),
                format!("{:.1}", med(samples, Sample::process_cpu_us_per_request)),
                format!("{:.1}", med(samples, Sample::redis_cpu_us_per_request)),
            ]);
            if *subject == Subject::NoLimiter {
                continue;
            }
            let shown: Vec<String> = each.iter().map(|r| format!("{r:.2}")).collect();
            pair_ratios.push(format!("{} {}", subject.short(), shown.join("/")));
            if subject.decides_on_redis() {
                let met = if ratio >= TARGET_RATIO {
                    "met"
                } else {
                    "NOT met"
                };
                verdicts.push(format!(
                    "c={concurrency} {}: {met} ({ratio:.2})",
                    subject.short()
                ));
                let most = samples
                    .iter()
                    .map(Sample::top_level_per_request)
                    .fold(0.0, f64::max);
                let met = if most <= MAX_ROUND_TRIPS {
                    "met"
                } else {
                    "NOT met"
                };
                trips.push(format!(
                    "c={concurrency} {}: {met} ({most:.2})",
                    subject.short()
                ));
            }
        }
        spreads.push(format!("c={concurrency}: {}", pair_ratios.join("; ")));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## ratelimit: GET / on an in-process axum server over TCP, with and without a rate limiter\n"
    );
    let _ = writeln!(
        out,
        "{:.1} s measured after {:.1} s warm-up per cell; hyper HTTP/1.1 client, one keep-alive connection per task; \
         cells interleaved (order alternating between repeats), each run {} times; medians shown, \
         ratio = median of the per-repeat ratios to the `no limiter` cell of the same repeat. \
         Quotas 10⁹ per hour (never reached) except `blocked key` (1 per hour). \
         Managers: RedisConfig defaults with pool_size {pool_size}; `Redis down` points at {dead_how}.\n",
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64(),
        options.repeats,
    );
    out.push_str(&table.render());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- target limited / no limiter ≥ {TARGET_RATIO:.2}: {}",
        verdicts.join("; ")
    );
    let _ = writeln!(
        out,
        "- target ≤ {MAX_ROUND_TRIPS:.0} Redis round trip per decision (top-level commands per request, most in any repeat): {}",
        trips.join("; ")
    );
    let _ = writeln!(
        out,
        "- per-repeat ratios to no limiter: {}",
        spreads.join(" | ")
    );
    let mut per_subject = Vec::new();
    for (i, subject) in Subject::ALL.iter().enumerate() {
        let samples: Vec<&Sample> = rows.iter().flat_map(|(_, row)| &row[i]).collect();
        if !samples.is_empty() {
            per_subject.push(format!("{}: {}", subject.short(), breakdown(&samples)));
        }
    }
    let cells: Vec<CpuUse> = rows
        .iter()
        .flat_map(|(_, row)| row.iter().flatten())
        .map(|s| s.cpu)
        .collect();
    let _ = writeln!(out, "- {}", cpu::disturbance(&cells));
    let _ = writeln!(
        out,
        "- Redis commands per request by name, all cells (with the server time of each top-level command, `INFO commandstats` usec / calls): {}",
        per_subject.join("; ")
    );
    out
}
