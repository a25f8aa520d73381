//! Suite `stack`: all three layers on one app, as an axum app would stack
//! them — rate limit outermost, then the response cache, then sessions:
//!
//! ```text
//! Router::new().route("/page", ..).route("/item", ..).route("/write", ..)
//!     .layer(ServiceBuilder::new().layer(rate_limit).layer(cache).layer(session))
//! ```
//!
//! `GET /page` reads the session entry `k` and answers a 1 KiB body with
//! `Cache-Control: private`, so every request pays each layer: a rate-limit
//! decision, a cache lookup (a miss: a shared cache does not store a
//! private answer) and a session read. `GET /item` answers a public 1 KiB
//! body: after the first request the cache answers it, and the session
//! layer inside the cache is not reached. The cache has its near tier on
//! (the hot-read paths, as the session layer's tracked reads): `/item` is
//! answered from it, and `/page`'s lookup, once the URL is known absent
//! from Redis, makes no round trip. Baselines: the same routes with no
//! layer, and the Redis commands a `/page` request makes without the
//! hot-read paths (3 round trips: 1 + 1 + 2 pipelined) issued raw on a bare
//! redis-rs connection.
//!
//! Then degraded mode for `/page` ([`crate::degraded`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{StatusCode, header};
use tower::ServiceBuilder;
use tower_redis_cache::CacheLayer;
use tower_redis_core::{RedisConfig, RedisManager};
use tower_redis_ratelimit::{Policy, RateLimitLayer};
use tower_redis_session::{Session, SessionLayer};

use crate::Options;
use crate::cells::{Cell, TRIP_SOURCE, check_round_trips, run_interleaved};
use crate::degraded::{self, Outage};
use crate::error::BenchError;
use crate::grid::{Grid, Section, timing};
use crate::http_load::{
    Expect, HttpError, HttpRequest, clear_keys, connect, create_sessions, managers, send, serve,
};
use crate::raw::{RawClient, RawPlan, RawShape, RawValue, RedisBenchmark};
use crate::report::{Target, bytes};
use crate::server::{BenchRedis, requests_sent};
use tower_redis_core::testing::Monitor;

/// Prefix of every key the layers write; cleared before and after the suite.
const KEY_PREFIX: &str = "tower-redis-bench:stack";
/// The size of both routes' bodies.
const BODY_BYTES: usize = 1024;
/// The raw baselines' value: small, as the replies of a `/page` request.
const RAW_KEY: &str = "tower-redis-bench:stack:raw";
const RAW_LEN: usize = 16;
/// The cache's near tier.
const NEAR_BYTES: u64 = 16 << 20;
/// A quota no cell can exhaust: 10⁹ requests per hour.
const HUGE_QUOTA: u32 = 1_000_000_000;
const HOUR: Duration = Duration::from_secs(3600);
/// Commands run inside the scripts a stacked request may run: the GCRA
/// decision (`TIME`, `GET`, `SET`, and `MGET` for a batch) and the cache's lookup script (`HGET`;
/// `/page`'s first lookup on an instance runs it; once its private answer
/// was not stored, its lookups are a plain `HMGET`). None of them is sent
/// top-level by the stack (its
/// top-level commands are `EVALSHA`, `HMGET`, `PEXPIRE`, `HGETALL`).
const STACK_INNER: &[&str] = &["time", "get", "mget", "set", "hget"];
/// Top-level commands (round trips) a request may make, on average over
/// the untimed window: `/page` = rate limit 1 + cache lookup 0 (known
/// absent) + session read 0 (tracked), with room for the session's idle
/// renewal and the cache's fill lock (its private answer leads a fill
/// again every 10 s); `/item` = rate limit 1 + near hit 0, with room for a
/// copy read from Redis once. Without the hot-read paths `/page` makes 4
/// (1 + 1 + 2 pipelined) and `/item` 2: both fail.
const PAGE_BUDGET: f64 = 2.0;
const ITEM_BUDGET: f64 = 1.5;
/// The issue's target for every degraded path.
const DEGRADED_RATIO: f64 = 1.0;
/// The issue's target for `/page` against no layer at c=64.
const STACK_RATIO: f64 = 0.5;

/// The cells of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    NoLayer,
    Raw,
    RedisBenchmark,
    Page,
    Item,
    PageDown,
}

impl Subject {
    const ALL: [Subject; 6] = [
        Subject::NoLayer,
        Subject::Raw,
        Subject::RedisBenchmark,
        Subject::Page,
        Subject::Item,
        Subject::PageDown,
    ];

    fn label(self) -> &'static str {
        match self {
            Subject::NoLayer => "no layer (GET /page answering the same 1 KiB)",
            Subject::Raw => {
                "raw Redis: /page's commands without the hot-read paths, 3 round trips (1 + 1 + 2 pipelined GETs) on a bare redis-rs connection (no HTTP)"
            }
            Subject::RedisBenchmark => "raw Redis: redis-benchmark, 1 GET per request (no HTTP)",
            Subject::Page => {
                "stack, GET /page: rate limit + cache lookup (private: a miss, known absent) + session read"
            }
            Subject::Item => {
                "stack, GET /item: rate limit + cache hit (near tier; session layer not reached)"
            }
            Subject::PageDown => {
                "stack, GET /page, Redis down (every layer on its in-process fallback)"
            }
        }
    }

    fn short(self) -> &'static str {
        match self {
            Subject::NoLayer => "no layer",
            Subject::Raw => "raw redis-rs",
            Subject::RedisBenchmark => "redis-benchmark",
            Subject::Page => "stack /page",
            Subject::Item => "stack /item",
            Subject::PageDown => "stack /page down",
        }
    }

    fn index(self) -> usize {
        Subject::ALL
            .iter()
            .position(|s| *s == self)
            .unwrap_or_default()
    }
}

/// Both routes' body.
fn body() -> Bytes {
    let pattern = b"stack-0123456789";
    Bytes::from(
        (0..BODY_BYTES)
            .map(|i| pattern[i % pattern.len()])
            .collect::<Vec<u8>>(),
    )
}

/// `/page`: the session's `k`, then the private body; 404 without `k`.
async fn page(session: Session) -> (StatusCode, [(header::HeaderName, &'static str); 1], Bytes) {
    let status = match session.get::<String>("k").await {
        Ok(Some(_)) => StatusCode::OK,
        Ok(None) => StatusCode::NOT_FOUND,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, [(header::CACHE_CONTROL, "private")], body())
}

/// `/item`: the public body.
async fn item() -> ([(header::HeaderName, &'static str); 1], Bytes) {
    ([(header::CACHE_CONTROL, "public, max-age=600")], body())
}

/// `/write`: makes a session with `k`.
async fn write(session: Session) -> StatusCode {
    match session.insert("k", "v").await {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The three layers on `manager`.
fn stacked(manager: &RedisManager) -> Result<Router, BenchError> {
    let rate_limit = RateLimitLayer::builder(manager.clone())
        .hash_tag("bench-stack")
        .policy(Policy::gcra("per-ip", HUGE_QUOTA, HOUR))
        .build()?;
    // The near cache on, as issue 18's stack target asks ("with the
    // hot-read paths on"): `/item` is answered from it, and `/page`, whose
    // private answer is never stored, is known absent from Redis.
    let cache = CacheLayer::builder(manager.clone())
        .near_cache(NEAR_BYTES, HOUR)
        .build()
        .map_err(|e| BenchError::Check(format!("stack, cache: {e}")))?;
    let session = SessionLayer::builder(manager.clone())
        .insecure_http_for_local_development()
        .build()
        .map_err(|e| BenchError::Check(format!("stack, session: {e}")))?;
    // Applied together with `ServiceBuilder`, as axum's docs advise for
    // several layers: each `Router::layer` call wraps every route in a
    // boxed service of its own, which every request then goes through.
    Ok(Router::new()
        .route("/page", get(page))
        .route("/item", get(item))
        .route("/write", post(write))
        .layer(
            ServiceBuilder::new()
                .layer(rate_limit)
                .layer(cache)
                .layer(session),
        ))
}

/// The routes without any layer.
fn bare() -> Router {
    Router::new()
        .route(
            "/page",
            get(|| async { ([(header::CACHE_CONTROL, "private")], body()) }),
        )
        .route("/item", get(item))
}

fn check(subject: Subject, what: &str, holds: bool) -> Result<(), BenchError> {
    if holds {
        Ok(())
    } else {
        Err(BenchError::Check(format!(
            "stack, {}: {what}",
            subject.label()
        )))
    }
}

/// The requests a subject's tasks send, checked once (and the cache warmed
/// for `/item`).
async fn requests(
    redis: &BenchRedis,
    subject: Subject,
    addr: SocketAddr,
    tasks: usize,
) -> Result<Vec<Arc<HttpRequest>>, BenchError> {
    let failed = |e: HttpError| BenchError::Check(format!("stack, {}: {e}", subject.label()));
    let mut sender = connect(addr).await.map_err(failed)?;
    let requests = match subject {
        Subject::Page | Subject::PageDown => {
            create_sessions(
                addr,
                &format!("stack, {}", subject.label()),
                HttpRequest::get("/page"),
                tasks,
            )
            .await?
        }
        Subject::Item => vec![Arc::new(HttpRequest::get("/item"))],
        _ => vec![Arc::new(HttpRequest::get("/page"))],
    };
    let Some(first) = requests.first() else {
        return Err(BenchError::Check("stack: no task".to_owned()));
    };
    if subject == Subject::Item {
        // Stored after the first answer has gone out: wait for a hit.
        let mut last = String::new();
        for _ in 0..300 {
            let (status, fields, _) = send(&mut sender, first).await.map_err(failed)?;
            let cache_status = fields
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            if status == StatusCode::OK
                && cache_status.contains("; hit")
                && !cache_status.contains("unavailable")
            {
                last.clear();
                break;
            }
            last = format!("{status}, Cache-Status {cache_status:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        check(
            subject,
            &format!("never a cache hit; last answer: {last}"),
            last.is_empty(),
        )?;
    }
    let monitor = Monitor::start(redis.client()).await?;
    let (status, fields, got) = send(&mut sender, first).await.map_err(failed)?;
    let sent = requests_sent(monitor).await?;
    check(
        subject,
        &format!(
            "expected 200 and the 1 KiB body, got {status} and {} bytes",
            got.len()
        ),
        status == StatusCode::OK && got == body(),
    )?;
    let limit = fields
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if subject == Subject::PageDown {
        check(
            subject,
            &format!("expected a local rate-limit decision, got RateLimit {limit:?}"),
            limit.contains(";local"),
        )?;
    }
    eprintln!(
        "stack: {}: one request sent {} Redis commands ({sent:?})",
        subject.short(),
        sent.len(),
    );
    Ok(requests)
}

/// Runs the suite and returns its markdown section.
pub(crate) async fn run(redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
    clear_keys(redis, KEY_PREFIX).await?;
    let pool_size = options.pool_size.unwrap_or(RedisConfig::DEFAULT_POOL_SIZE);
    let (manager, down, dead) = managers(redis, pool_size, KEY_PREFIX).await?;
    let tasks = options.concurrency.iter().copied().max().unwrap_or(1);
    let value = RawValue::put(redis, RAW_KEY, RAW_LEN).await?;

    let mut cells = Vec::with_capacity(Subject::ALL.len());
    for subject in Subject::ALL {
        let app = match subject {
            Subject::Raw => {
                cells.push(Cell::redis(
                    subject.label(),
                    subject.short(),
                    RawClient::Bare(redis.client().get_multiplexed_async_connection().await?),
                    RawPlan::new(&RawShape::trips(&[1, 1, 2]), &value),
                ));
                continue;
            }
            Subject::RedisBenchmark => {
                cells.push(Cell::benchmark(
                    subject.label(),
                    subject.short(),
                    RedisBenchmark::find(redis, &value),
                ));
                continue;
            }
            Subject::NoLayer => bare(),
            Subject::Page | Subject::Item => stacked(&manager)?,
            Subject::PageDown => stacked(&down)?,
        };
        let server = serve(app).await?;
        let requests = requests(redis, subject, server.addr, tasks).await?;
        let inner = if subject == Subject::NoLayer {
            &[][..]
        } else {
            STACK_INNER
        };
        cells.push(Cell::http(
            subject.label(),
            subject.short(),
            server,
            requests,
            Expect::ok(Some(body())),
            inner,
        ));
    }

    let rows = run_interleaved(redis, "stack", &cells, options).await?;
    let mut page = Target::new(format!(
        "/page makes ≤ {PAGE_BUDGET:.0} Redis commands (rate limit 1; the cache's lookup, known absent, and the tracked session read 0; {TRIP_SOURCE})"
    ));
    check_round_trips(
        &mut page,
        redis,
        &cells,
        Subject::Page.index(),
        "untimed",
        PAGE_BUDGET,
    )
    .await?;
    let mut item = Target::new(format!(
        "/item makes ≤ {ITEM_BUDGET:.1} Redis commands (rate limit 1 + near hit 0; {TRIP_SOURCE})"
    ));
    check_round_trips(
        &mut item,
        redis,
        &cells,
        Subject::Item.index(),
        "untimed",
        ITEM_BUDGET,
    )
    .await?;
    let grid = Grid::new("concurrency", &cells, rows);
    drop(cells);
    clear_keys(redis, KEY_PREFIX).await?;

    let mut section = Section::new(
        "stack: rate limit + cache + session on one axum app, over TCP",
        &format!(
            "{}. Layers, in one `ServiceBuilder`, outermost first: `RateLimitLayer` (per-IP GCRA, 10⁹ per hour), `CacheLayer` (`near_cache(16 MiB, 1 h)`), \
             `SessionLayer` (`insecure_http_for_local_development()`), all on one manager (RedisConfig defaults \
             with pool_size {pool_size}); `/page` and `/item` answer {}. One session per task, created before \
             measuring. `Redis down` points at {}. Raw Redis rows: {RAW_LEN}-byte GETs, no HTTP.",
            timing(options, true),
            bytes(BODY_BYTES as f64),
            dead.how
        ),
    );
    section.table(&grid.table(&[
        (Subject::NoLayer.index(), "no layer"),
        (Subject::Raw.index(), "raw redis-rs"),
    ]));
    section.target(&page);
    section.target(&item);
    let mut degraded_target = Target::new(format!(
        "/page with Redis down ≥ {DEGRADED_RATIO:.2}× /page with Redis"
    ));
    grid.check_ratio(
        &mut degraded_target,
        Subject::PageDown.index(),
        Subject::Page.index(),
        DEGRADED_RATIO,
        |_| true,
    );
    section.target(&degraded_target);
    // Issue 18's stack target, with the hot-read paths on (the near cache
    // and the session layer's tracked reads).
    let mut stack_target = Target::new(format!(
        "stack /page / no layer ≥ {STACK_RATIO:.2}× at c=64 (the hot-read paths on)"
    ));
    grid.check_ratio(
        &mut stack_target,
        Subject::Page.index(),
        Subject::NoLayer.index(),
        STACK_RATIO,
        |row| row.key.parse::<usize>().unwrap_or(0) == 64,
    );
    section.target(&stack_target);
    for (of, to) in [
        (Subject::Page, Subject::NoLayer),
        (Subject::Page, Subject::Raw),
        (Subject::Item, Subject::NoLayer),
    ] {
        section.note(format!(
            "{} / {}, median (per repeat): {}",
            of.short(),
            to.short(),
            grid.spread(of.index(), to.index())
        ));
    }
    for note in grid.notes() {
        section.note(note);
    }
    section.gap();

    section.append(&degraded::run(&StackOutage, options).await?);
    Ok(section.finish())
}

/// `/page` through the three layers, for the degraded-mode section.
struct StackOutage;

impl Outage for StackOutage {
    fn suite(&self) -> &'static str {
        "stack"
    }

    fn describe(&self) -> String {
        "`GET /page` through rate limit + cache + session, one session per task (created after every \
         (re)start): while Redis is down the limiter decides in process, the cache looks up its in-process \
         store, the session is read from the layer's in-process copy."
            .to_owned()
    }

    fn app(&self, manager: &RedisManager) -> Result<Router, BenchError> {
        stacked(manager)
    }

    async fn prepare(
        &self,
        addr: SocketAddr,
        tasks: usize,
    ) -> Result<Vec<Arc<HttpRequest>>, BenchError> {
        create_sessions(
            addr,
            "stack, degraded mode",
            HttpRequest::get("/page"),
            tasks,
        )
        .await
    }

    fn expect(&self) -> Expect {
        Expect::ok(Some(body()))
    }

    fn inner(&self) -> &'static [&'static str] {
        STACK_INNER
    }
}
