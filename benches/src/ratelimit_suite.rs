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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower_redis_core::redis;
use tower_redis_core::testing::{Backend, TestRedis};
use tower_redis_core::{RedisConfig, RedisManager};
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};

use crate::Options;
use crate::cpu::{self, CpuUse};
use crate::error::BenchError;
use crate::load::{self, LoadResult, LoadSpec, Operation};
use crate::report::{Table, median, micros, thousands};
use crate::server::{BenchRedis, CommandStat};

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

/// One in-process HTTP server, stopped (accept loop aborted) on drop.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on 127.0.0.1 (a free port), with the peer address in
/// `ConnectInfo<SocketAddr>` and `TCP_NODELAY` on every accepted socket.
async fn serve(app: Router) -> Result<Server, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let listener = listener.tap_io(|tcp: &mut TcpStream| {
        // Best effort: a socket without NODELAY only makes this side slower.
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    Ok(Server { addr, task })
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

/// Why one request did not count.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("status {got}, expected {expected}")]
    Status {
        got: StatusCode,
        expected: StatusCode,
    },
    #[error("body {0:?}, expected {BODY:?}")]
    Body(Bytes),
}

/// Opens one keep-alive HTTP/1.1 connection; its driver runs in its own
/// task and ends when the returned sender is dropped.
async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, HttpError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// `GET /` on `sender`: the status, the fields and the whole body.
async fn get_root(
    sender: &mut SendRequest<Empty<Bytes>>,
) -> Result<(StatusCode, HeaderMap, Bytes), HttpError> {
    sender.ready().await?;
    let request = Request::get("/")
        .header(header::HOST, "127.0.0.1")
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// `GET /` on a task's own connection, checking the status (and the body
/// of a 200).
struct HttpGet {
    /// Opened before the cell; reopened if missing.
    sender: Option<SendRequest<Empty<Bytes>>>,
    addr: SocketAddr,
    expect: StatusCode,
}

impl Operation for HttpGet {
    type Error = HttpError;

    async fn call(&mut self) -> Result<(), HttpError> {
        let sender = match self.sender.take() {
            Some(sender) => sender,
            None => connect(self.addr).await?,
        };
        let sender = self.sender.insert(sender);
        let (status, _, body) = get_root(sender).await?;
        if status != self.expect {
            return Err(HttpError::Status {
                got: status,
                expected: self.expect,
            });
        }
        if status == StatusCode::OK && body != BODY.as_bytes() {
            return Err(HttpError::Body(body));
        }
        Ok(())
    }
}

/// A subject and its server (none when the subject is not compiled in).
struct Target {
    subject: Subject,
    server: Option<Server>,
}

/// The Redis the `Redis down` manager points at: nothing listens there.
struct DeadRedis {
    url: String,
    how: &'static str,
    /// Kept so that its directory outlives the run.
    _stopped: Option<TestRedis>,
}

async fn dead_redis() -> Result<DeadRedis, BenchError> {
    if let Ok(test) = TestRedis::builder().start().await
        && test.backend() != Backend::Url
    {
        test.stop().await;
        return Ok(DeadRedis {
            url: test.url().to_owned(),
            how: "a second TestRedis, stopped before the manager connected",
            _stopped: Some(test),
        });
    }
    // No stoppable test server (REDIS_URL only): a port nothing listens on.
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    drop(listener);
    Ok(DeadRedis {
        url: format!("redis://127.0.0.1:{port}"),
        how: "a closed local port (no stoppable TestRedis backend)",
        _stopped: None,
    })
}

async fn manager_for(url: &str, pool_size: u32) -> Result<RedisManager, BenchError> {
    let config = RedisConfig::builder()
        .url(url)
        .pool_size(pool_size)
        .key_prefix(KEY_PREFIX)
        .build()?;
    Ok(RedisManager::connect(config).await?)
}

/// Deletes every key under [`KEY_PREFIX`].
async fn clear_keys(redis: &BenchRedis) -> Result<(), BenchError> {
    let mut conn = redis.admin();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{KEY_PREFIX}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The commands in a delta that a client sent: their calls, and the server
/// time they took. For a subject that runs the rate-limit script, the
/// commands the script runs inside its EVALSHA are left out (their time is
/// already in the EVALSHA's).
fn top_level(deltas: &BTreeMap<String, CommandStat>, script: bool) -> CommandStat {
    deltas
        .iter()
        .filter(|(name, _)| !(script && SCRIPT_INNER.contains(&name.as_str())))
        .fold(CommandStat::default(), |sum, (_, stat)| CommandStat {
            calls: sum.calls + stat.calls,
            usec: sum.usec + stat.usec,
        })
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
            let commands = top_level(&redis.command_calls().await?.deltas(&before), true).calls;
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

/// One cell's numbers.
#[derive(Debug, Clone)]
struct Sample {
    requests_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// Every request the cell made (warm-up included): the denominator of
    /// the command counts.
    calls: u64,
    /// Commands Redis ran during the cell, by name (harness commands left out).
    commands: BTreeMap<String, CommandStat>,
    /// Whether the subject runs the rate-limit script (see [`top_level`]).
    script: bool,
    /// Where CPU time went during the cell.
    cpu: CpuUse,
}

impl Sample {
    fn new(
        result: &LoadResult,
        commands: BTreeMap<String, CommandStat>,
        script: bool,
        cpu: CpuUse,
    ) -> Self {
        Self {
            requests_per_sec: result.ops_per_sec(),
            p50_us: result.latency_us(0.50),
            p99_us: result.latency_us(0.99),
            p999_us: result.latency_us(0.999),
            calls: result.calls,
            commands,
            script,
            cpu,
        }
    }

    fn top_level_per_request(&self) -> f64 {
        top_level(&self.commands, self.script).calls as f64 / self.calls.max(1) as f64
    }

    /// CPU time of this process (load generator and server) per request, in µs.
    fn process_cpu_us_per_request(&self) -> f64 {
        self.cpu.process * 1e6 / self.calls.max(1) as f64
    }

    /// CPU time of the Redis server per request, in µs.
    fn redis_cpu_us_per_request(&self) -> f64 {
        self.cpu.redis * 1e6 / self.calls.max(1) as f64
    }
}

/// Runs one cell: `spec.concurrency` connections opened first, then the load.
async fn measure(
    redis: &BenchRedis,
    subject: Subject,
    server: &Server,
    spec: LoadSpec,
) -> Result<Sample, BenchError> {
    let addr = server.addr;
    let mut senders = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency {
        senders.push(
            connect(addr)
                .await
                .map_err(|e| BenchError::Check(format!("ratelimit, {}: {e}", subject.label())))?,
        );
    }
    let mut senders = senders.into_iter();
    let expect = subject.expected_status();
    let before = redis.command_calls().await?;
    let cpu_before = redis.cpu_snapshot().await?;
    let result = load::run(spec, |_| HttpGet {
        sender: senders.next(),
        addr,
        expect,
    })
    .await?;
    let cpu = redis.cpu_snapshot().await?.since(&cpu_before);
    let after = redis.command_calls().await?;
    result.require_no_errors(&format!("{} c={}", subject.label(), spec.concurrency))?;
    Ok(Sample::new(
        &result,
        after.deltas(&before),
        subject.runs_script(),
        cpu,
    ))
}

/// Runs the suite and returns its markdown section.
pub(crate) async fn run(redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
    clear_keys(redis).await?;
    let pool_size = options.pool_size.unwrap_or(RedisConfig::DEFAULT_POOL_SIZE);
    let manager = manager_for(redis.url(), pool_size).await?;
    if !manager.is_available() {
        return Err(BenchError::Check(format!(
            "the manager cannot reach Redis: {:?}",
            manager.health()
        )));
    }
    let dead = dead_redis().await?;
    let down = manager_for(&dead.url, pool_size).await?;
    if down.is_available() {
        return Err(BenchError::Check(format!(
            "the `Redis down` manager reaches a Redis at {}",
            dead.url
        )));
    }

    let mut targets = Vec::with_capacity(Subject::ALL.len());
    for subject in Subject::ALL {
        let server = match app(subject, &manager, &down)? {
            Some(app) => Some(serve(app).await?),
            None => None,
        };
        if let Some(server) = &server {
            preflight(redis, subject, server.addr).await?;
        }
        targets.push(Target { subject, server });
    }

    let mut rows = Vec::with_capacity(options.concurrency.len());
    for &concurrency in &options.concurrency {
        let spec = LoadSpec {
            concurrency,
            warmup: options.warmup,
            duration: options.duration,
        };
        let mut row: Vec<Vec<Sample>> = vec![Vec::new(); Subject::ALL.len()];
        for repeat in 0..options.repeats {
            // Alternate the order, so that no subject always runs first or
            // right after the same neighbour.
            let order: Vec<usize> = if repeat % 2 == 0 {
                (0..targets.len()).collect()
            } else {
                (0..targets.len()).rev().collect()
            };
            for i in order {
                let target = &targets[i];
                let Some(server) = &target.server else {
                    continue;
                };
                let sample = measure(redis, target.subject, server, spec).await?;
                eprintln!(
                    "ratelimit: {:<14} c={concurrency:<3} run {}/{}: {:>8} req/s  p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  {:.2} commands/req  CPU µs/req {:.1} + Redis {:.1}  others {:.2} CPUs, steal {:.2}",
                    target.subject.short(),
                    repeat + 1,
                    options.repeats,
                    thousands(sample.requests_per_sec),
                    micros(sample.p50_us),
                    micros(sample.p99_us),
                    micros(sample.p999_us),
                    sample.top_level_per_request(),
                    sample.process_cpu_us_per_request(),
                    sample.redis_cpu_us_per_request(),
                    sample.cpu.others_load(),
                    sample.cpu.steal_load(),
                );
                row[i].push(sample);
            }
        }
        rows.push((concurrency, row));
    }
    drop(targets);
    clear_keys(redis).await?;
    Ok(render(options, pool_size, dead.how, &rows))
}

fn med(samples: &[Sample], field: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(field).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// subject / no limiter for each repeat (each ran in the same round).
fn ratios(baseline: &[Sample], subject: &[Sample]) -> Vec<f64> {
    baseline
        .iter()
        .zip(subject)
        .map(|(b, s)| s.requests_per_sec / b.requests_per_sec)
        .collect()
}

/// `evalsha 1.00 (inside the script: time 1.00, get 1.00, set 1.00)` over
/// every cell of one subject.
fn breakdown(samples: &[&Sample]) -> String {
    let calls: u64 = samples.iter().map(|s| s.calls).sum();
    let script = samples.iter().any(|s| s.script);
    let mut totals: BTreeMap<&str, CommandStat> = BTreeMap::new();
    for sample in samples {
        for (name, stat) in &sample.commands {
            let total = totals.entry(name.as_str()).or_default();
            total.calls += stat.calls;
            total.usec += stat.usec;
        }
    }
    let per = |n: u64| n as f64 / calls.max(1) as f64;
    let list = |inner: bool| {
        totals
            .iter()
            .filter(|(name, _)| (script && SCRIPT_INNER.contains(name)) == inner)
            .map(|(name, stat)| {
                if inner {
                    format!("{name} {:.2}", per(stat.calls))
                } else {
                    let usec = stat.usec as f64 / stat.calls.max(1) as f64;
                    format!("{name} {:.2} ({usec:.1} µs each)", per(stat.calls))
                }
            })
            .collect::<Vec<_>>()
    };
    let (outer, inner) = (list(false), list(true));
    let mut text = if outer.is_empty() {
        "none".to_owned()
    } else {
        outer.join(", ")
    };
    if !inner.is_empty() {
        let _ = write!(text, " (inside the script: {})", inner.join(", "));
    }
    text
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
