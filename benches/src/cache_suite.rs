//! Suite `cache`: what an HTTP response cache saves in front of a slow
//! origin, and what a hit costs.
//!
//! Every subject serves `GET /item`, whose handler sleeps 20 ms and answers
//! a 1 KiB body with `Cache-Control: max-age=600`, over the shared
//! in-process HTTP setup ([`crate::http_load`]). The caches are warmed
//! before measuring, so every measured request is a hit; `no cache` goes to
//! the origin every time. Besides the ratio to `no cache`, a hit is divided
//! by the `reference` cell: a bare route whose handler makes one Redis GET
//! through the manager (the yardstick for a Redis round trip).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{StatusCode, header};
use tower_redis_cache::CacheLayer;
use tower_redis_core::redis;
use tower_redis_core::{RedisConfig, RedisManager};

use crate::Options;
use crate::cpu::{self, CpuUse};
use crate::error::BenchError;
use crate::http_load::{
    Cell, Expect, HttpRequest, Sample, breakdown, clear_keys, columns, connect, headers, managers,
    ratio, ratios, run_interleaved, send, serve, top_level,
};
use crate::report::Table;
use crate::server::BenchRedis;

/// Prefix of every key the caches write; cleared before and after the suite.
const KEY_PREFIX: &str = "tower-redis-bench:cache";
/// The path every subject serves.
const PATH: &str = "/item";
/// How long the origin takes.
const ORIGIN_DELAY: Duration = Duration::from_millis(20);
/// The size of the origin's body.
const BODY_BYTES: usize = 1024;
/// The origin's freshness.
const CACHE_CONTROL: &str = "max-age=600";
/// The target: cache hit / one Redis GET in a handler, at this concurrency.
const TARGET_RATIO: f64 = 0.8;
const TARGET_CONCURRENCY: usize = 64;
/// Commands the cache's scripts (`lookup.lua`, `put.lua`) run inside their
/// EVALSHA; left out of the top-level count.
const SCRIPT_INNER: &[&str] = &[
    "hget", "hgetall", "hset", "hdel", "hlen", "del", "exists", "pexpire", "pttl", "time",
];
/// What a peer row says when the `peers` feature is off.
const NOT_BUILT: &str = "not built (enable --features peers)";

/// The cells of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    NoCache,
    OneGet,
    Redis,
    RedisDown,
    AxumResponseCache,
    HttpCacheTowerServer,
}

impl Subject {
    const ALL: [Subject; 6] = [
        Subject::NoCache,
        Subject::OneGet,
        Subject::Redis,
        Subject::RedisDown,
        Subject::AxumResponseCache,
        Subject::HttpCacheTowerServer,
    ];

    fn label(self) -> &'static str {
        match self {
            Subject::NoCache => "no cache (every request hits the 20 ms origin)",
            Subject::OneGet => "reference: no cache, handler makes 1 Redis GET",
            Subject::Redis => "tower-redis-cache (Redis)",
            Subject::RedisDown => "tower-redis-cache (Redis down, in-process store)",
            Subject::AxumResponseCache => "axum-response-cache 0.5 (in process)",
            Subject::HttpCacheTowerServer => "http-cache-tower-server 0.2 (moka, in process)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Subject::NoCache => "no cache",
            Subject::OneGet => "1 GET",
            Subject::Redis => "redis-cache",
            Subject::RedisDown => "redis-cache down",
            Subject::AxumResponseCache => "axum-resp-cache",
            Subject::HttpCacheTowerServer => "http-cache-tower",
        }
    }

    /// Subjects that answer from a cache (checked to hit before measuring).
    fn caches(self) -> bool {
        !matches!(self, Subject::NoCache | Subject::OneGet)
    }
}

/// The origin's body: 1 KiB of text.
fn body() -> Bytes {
    let text: String = "0123456789abcdef".repeat(BODY_BYTES / 16);
    Bytes::from(text)
}

/// The slow origin every subject serves.
fn origin() -> Router {
    let body = body();
    Router::new().route(
        PATH,
        get(move || {
            let body = body.clone();
            async move {
                tokio::time::sleep(ORIGIN_DELAY).await;
                ([(header::CACHE_CONTROL, CACHE_CONTROL)], body)
            }
        }),
    )
}

/// The app of one subject; `None` for a peer that is not compiled in.
fn app(
    subject: Subject,
    manager: &RedisManager,
    down: &RedisManager,
) -> Result<Option<Router>, BenchError> {
    let config = |e: tower_redis_cache::ConfigError| BenchError::Check(format!("cache: {e}"));
    let app = match subject {
        Subject::NoCache => origin(),
        Subject::OneGet => {
            // One round trip through the manager, for scale: the handler
            // reads one (missing) key and answers the same body at once.
            let manager = manager.clone();
            let mut read = redis::cmd("GET");
            read.arg(format!("{KEY_PREFIX}:reference"));
            let read = Arc::new(read);
            let body = body();
            Router::new().route(
                PATH,
                get(move || {
                    let (manager, read, body) = (manager.clone(), Arc::clone(&read), body.clone());
                    async move {
                        let status = match manager.query::<Option<Vec<u8>>>(&read).await {
                            Ok(_) => StatusCode::OK,
                            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                        };
                        (status, [(header::CACHE_CONTROL, CACHE_CONTROL)], body)
                    }
                }),
            )
        }
        Subject::Redis => origin().layer(
            CacheLayer::builder(manager.clone())
                .build()
                .map_err(config)?,
        ),
        Subject::RedisDown => {
            origin().layer(CacheLayer::builder(down.clone()).build().map_err(config)?)
        }
        Subject::AxumResponseCache => return axum_response_cache_app(),
        Subject::HttpCacheTowerServer => return http_cache_tower_server_app(),
    };
    Ok(Some(app))
}

/// axum-response-cache keeps responses in a `cached::TtlCache` behind a
/// mutex, for a fixed lifespan (it does not read `Cache-Control`): 600 s.
#[cfg(feature = "peers")]
fn axum_response_cache_app() -> Result<Option<Router>, BenchError> {
    let layer = axum_response_cache::CacheLayer::with_lifespan(Duration::from_secs(600))
        .add_response_headers();
    Ok(Some(origin().layer(layer)))
}

/// http-cache-tower-server with http-cache's moka manager; its service
/// fails with a `BoxError`, turned into a 500 for axum.
#[cfg(feature = "peers")]
fn http_cache_tower_server_app() -> Result<Option<Router>, BenchError> {
    use axum::error_handling::HandleErrorLayer;
    use http_cache::MokaManager;
    use http_cache_tower_server::ServerCacheLayer;

    let cache = ServerCacheLayer::new(MokaManager::default());
    let layers = tower::ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: axum::BoxError| async {
            StatusCode::INTERNAL_SERVER_ERROR
        }))
        .layer(cache);
    Ok(Some(origin().layer(layers)))
}

#[cfg(not(feature = "peers"))]
fn axum_response_cache_app() -> Result<Option<Router>, BenchError> {
    Ok(None)
}

#[cfg(not(feature = "peers"))]
fn http_cache_tower_server_app() -> Result<Option<Router>, BenchError> {
    Ok(None)
}

fn check(subject: Subject, what: &str, holds: bool) -> Result<(), BenchError> {
    if holds {
        Ok(())
    } else {
        Err(BenchError::Check(format!(
            "cache, {}: {what}",
            subject.label()
        )))
    }
}

/// Checks, once, that a subject answers the way its cell assumes, and warms
/// the caches: after this, `GET /item` is a hit.
async fn preflight(
    redis: &BenchRedis,
    subject: Subject,
    addr: SocketAddr,
) -> Result<(), BenchError> {
    let failed = |e: crate::http_load::HttpError| {
        BenchError::Check(format!("cache, {}: {e}", subject.label()))
    };
    let request = HttpRequest::get(PATH);
    let mut sender = connect(addr).await.map_err(failed)?;
    let (status, _, got) = send(&mut sender, &request).await.map_err(failed)?;
    check(
        subject,
        &format!(
            "expected 200 and the 1 KiB body, got {status} and {} bytes",
            got.len()
        ),
        status == StatusCode::OK && got == body(),
    )?;
    if !subject.caches() {
        return Ok(());
    }
    // The entry may be stored after the response has gone out: wait for a
    // hit (an answer well under the origin's 20 ms, and the cache's own
    // status field when it has one).
    let mut last = String::new();
    for _ in 0..100 {
        let started = Instant::now();
        let (status, fields, got) = send(&mut sender, &request).await.map_err(failed)?;
        let took = started.elapsed();
        let field = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let (cache_status, x_cache) = (field("cache-status"), field("x-cache"));
        let hit = status == StatusCode::OK
            && got == body()
            && took < ORIGIN_DELAY / 2
            && match subject {
                Subject::Redis => {
                    cache_status.contains("; hit") && !cache_status.contains("unavailable")
                }
                Subject::RedisDown => {
                    cache_status.contains("; hit") && cache_status.contains("redis-unavailable")
                }
                Subject::HttpCacheTowerServer => x_cache == "HIT",
                _ => true,
            };
        if hit {
            if subject == Subject::Redis {
                let before = redis.command_calls().await?;
                let (status, _, _) = send(&mut sender, &request).await.map_err(failed)?;
                let deltas = redis.command_calls().await?.deltas(&before);
                let commands = top_level(&deltas, SCRIPT_INNER).calls;
                check(
                    subject,
                    &format!(
                        "expected a hit to cost 1 top-level Redis command, got {status} and {deltas:?}"
                    ),
                    status == StatusCode::OK && commands == 1,
                )?;
            }
            return Ok(());
        }
        last = format!(
            "{status}, {} bytes in {took:?}, Cache-Status {cache_status:?}, X-Cache {x_cache:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check(
        subject,
        &format!("never answered from the cache; last answer: {last}"),
        false,
    )
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
            requests: vec![Arc::new(HttpRequest::get(PATH))],
            expect: Arc::new(Expect {
                status: StatusCode::OK,
                body: Some(body()),
            }),
            inner: if matches!(subject, Subject::Redis | Subject::RedisDown) {
                SCRIPT_INNER
            } else {
                &[]
            },
        });
    }

    let rows = run_interleaved(redis, "cache", &cells, options).await?;
    drop(cells);
    clear_keys(redis, KEY_PREFIX).await?;
    Ok(render(options, pool_size, dead.how, &rows))
}

fn index(subject: Subject) -> usize {
    Subject::ALL
        .iter()
        .position(|s| *s == subject)
        .unwrap_or_default()
}

fn render(
    options: &Options,
    pool_size: u32,
    dead_how: &str,
    rows: &[(usize, Vec<Vec<Sample>>)],
) -> String {
    let mut table = Table::new(headers("no cache")).left_aligned(2);
    let mut verdicts = Vec::new();
    let mut spreads = Vec::new();
    for (concurrency, row) in rows {
        let baseline = &row[index(Subject::NoCache)];
        for (subject, samples) in Subject::ALL.iter().zip(row) {
            let mut cells = vec![concurrency.to_string(), subject.label().to_owned()];
            if samples.is_empty() {
                cells.push(NOT_BUILT.to_owned());
            } else {
                cells.extend(columns(samples, ratio(baseline, samples)));
            }
            table.row(cells);
        }
        let reference = &row[index(Subject::OneGet)];
        let hit = &row[index(Subject::Redis)];
        let each = ratios(reference, hit);
        let shown: Vec<String> = each.iter().map(|r| format!("{r:.2}")).collect();
        let to_reference = ratio(reference, hit);
        spreads.push(format!(
            "c={concurrency}: {to_reference:.2} ({})",
            shown.join("/")
        ));
        if *concurrency == TARGET_CONCURRENCY {
            let met = if to_reference >= TARGET_RATIO {
                "met"
            } else {
                "NOT met"
            };
            verdicts.push(format!("c={concurrency}: {met} ({to_reference:.2})"));
        }
    }
    if verdicts.is_empty() {
        verdicts.push(format!("not measured (no c={TARGET_CONCURRENCY} cell)"));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## cache: GET /item (20 ms origin, 1 KiB body, Cache-Control: {CACHE_CONTROL}) on an in-process axum server over TCP\n"
    );
    let _ = writeln!(
        out,
        "{:.1} s measured after {:.1} s warm-up per cell; hyper HTTP/1.1 client, one keep-alive connection per task, \
         `Host: 127.0.0.1` on every request; cells interleaved (order alternating between repeats), each run {} times; \
         medians shown, ratio = median of the per-repeat ratios to the `no cache` cell of the same repeat. \
         Every cache is warmed (and checked to hit) before measuring. \
         Managers: RedisConfig defaults with pool_size {pool_size}; `Redis down` points at {dead_how}.\n",
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64(),
        options.repeats,
    );
    out.push_str(&table.render());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- target tower-redis-cache hit / reference (1 Redis GET in handler) ≥ {TARGET_RATIO:.2} at c={TARGET_CONCURRENCY}: {}",
        verdicts.join("; ")
    );
    let _ = writeln!(
        out,
        "- tower-redis-cache (Redis) / reference, median (per repeat): {}",
        spreads.join(" | ")
    );
    let mut per_subject = Vec::new();
    for (i, subject) in Subject::ALL.iter().enumerate() {
        let samples: Vec<&Sample> = rows.iter().flat_map(|(_, row)| &row[i]).collect();
        if !samples.is_empty() {
            per_subject.push(format!("{}: {}", subject.short(), breakdown(&samples)));
        }
    }
    let all: Vec<CpuUse> = rows
        .iter()
        .flat_map(|(_, row)| row.iter().flatten())
        .map(|s| s.cpu)
        .collect();
    let _ = writeln!(out, "- {}", cpu::disturbance(&all));
    let _ = writeln!(
        out,
        "- Redis commands per request by name, all cells (with the server time of each top-level command, `INFO commandstats` usec / calls): {}",
        per_subject.join("; ")
    );
    out
}
