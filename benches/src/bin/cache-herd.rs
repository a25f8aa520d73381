//! Thundering herd and near-cache figures for `tower-redis-cache` (issue 4).
//!
//! ```text
//! cargo run --release -p benches --bin cache-herd                 # tower-redis only
//! cargo run --release -p benches --features peers --bin cache-herd  # + axum-response-cache
//! ```
//!
//! 1. **Herd**: 1,000 concurrent requests for one cold key, split over two
//!    layer instances (each with its own `RedisManager`) in front of one
//!    origin that takes 50 ms: origin calls, p50 / p99 / max latency, for
//!    coalescing on, coalescing off, and axum-response-cache (one process;
//!    it has no cross-instance story, so it gets all 1,000 on one instance).
//! 2. **Near cache**: hit throughput of one warm key at concurrency 64, near
//!    cache vs Redis, in process (tower `oneshot`, no TCP), with Redis
//!    commands per request from `INFO commandstats`.
//!
//! Runs against a disposable `redis-server` from `tower_redis_core::testing`.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, header};
use axum::routing::get;
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;
use tower_service::Service;

const HERD: usize = 1_000;
const ORIGIN_MS: u64 = 50;
/// The row the herd target is about.
const COALESCING_ON: &str = "tower-redis, coalescing on (2 instances)";

/// The herd's verdict, in the suites' `- target …: **met** / **NOT met**`
/// form: with coalescing on, the whole herd (over both instances) makes
/// exactly one origin call.
fn herd_target(origin_calls: Option<u64>) -> String {
    let what = format!(
        "{HERD} concurrent requests for one cold key over 2 instances, coalescing on, make 1 origin call"
    );
    match origin_calls {
        Some(calls) => {
            let verdict = if calls == 1 { "met" } else { "NOT met" };
            format!("- target {what}: **{verdict}** (origin calls: {calls})")
        }
        None => format!("- target {what}: **not measured**"),
    }
}

fn origin(calls: Arc<AtomicU64>) -> Router {
    Router::new().route(
        "/{*path}",
        get(move || {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ORIGIN_MS)).await;
                Response::builder()
                    .header(header::CACHE_CONTROL, "max-age=600")
                    .body(Body::from(vec![b'x'; 4096]))
                    .expect("valid response")
            }
        }),
    )
}

async fn request(mut app: Router, path: &str) -> Duration {
    let start = Instant::now();
    let request = Request::get(path)
        .header(header::HOST, "bench.example")
        .body(Body::empty())
        .expect("valid request");
    // A Router is always ready.
    let response = app.call(request).await.expect("infallible");
    let _ = response.into_body().collect().await;
    start.elapsed()
}

struct HerdRow {
    subject: &'static str,
    origin_calls: u64,
    histogram: Histogram<u64>,
}

async fn herd(
    subject: &'static str,
    apps: Vec<Router>,
    calls: Arc<AtomicU64>,
    key: &str,
) -> HerdRow {
    let mut tasks = Vec::with_capacity(HERD);
    for i in 0..HERD {
        let app = apps[i % apps.len()].clone();
        let path = key.to_owned();
        tasks.push(tokio::spawn(async move { request(app, &path).await }));
    }
    let mut histogram = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        let took = task.await.expect("task");
        histogram
            .record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX))
            .expect("in range");
    }
    HerdRow {
        subject,
        origin_calls: calls.load(Ordering::SeqCst),
        histogram,
    }
}

async fn redis_instances(
    redis: &TestRedis,
    coalesce: bool,
    near: bool,
    calls: &Arc<AtomicU64>,
) -> (Vec<Router>, Vec<CacheLayer>) {
    let mut apps = Vec::new();
    let mut layers = Vec::new();
    for _ in 0..2 {
        let manager = RedisManager::connect(redis.config().build().expect("config"))
            .await
            .expect("manager");
        let mut builder = CacheLayer::builder(manager);
        if !coalesce {
            builder = builder.coalesce(None);
        }
        if near {
            builder = builder.near_cache(64 << 20, Duration::from_secs(60));
        }
        let layer = builder.build().expect("layer");
        apps.push(origin(Arc::clone(calls)).layer(layer.clone()));
        layers.push(layer);
    }
    (apps, layers)
}

#[cfg(feature = "peers")]
fn peer(calls: &Arc<AtomicU64>) -> Option<Router> {
    let layer = axum_response_cache::CacheLayer::with_lifespan(Duration::from_secs(600));
    Some(origin(Arc::clone(calls)).layer(layer))
}

#[cfg(not(feature = "peers"))]
fn peer(_calls: &Arc<AtomicU64>) -> Option<Router> {
    None
}

async fn throughput(app: Router, path: &str, concurrency: usize, duration: Duration) -> f64 {
    let deadline = Instant::now() + duration;
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let app = app.clone();
        let done = Arc::clone(&done);
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                request(app.clone(), &path).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

async fn commands(redis: &TestRedis) -> u64 {
    let mut calls = redis.command_calls().await.expect("commandstats");
    calls.remove("config|resetstat");
    calls.remove("info");
    calls.values().sum()
}

#[tokio::main]
async fn main() {
    let redis = TestRedis::start().await;
    let mut rows = Vec::new();
    for (subject, coalesce) in [
        (COALESCING_ON, true),
        ("tower-redis, coalescing off (2 instances)", false),
    ] {
        let calls = Arc::new(AtomicU64::new(0));
        let (apps, _layers) = redis_instances(&redis, coalesce, false, &calls).await;
        let key = format!("/herd/{}", rows.len());
        eprintln!("herd: {subject}");
        rows.push(herd(subject, apps, calls, &key).await);
    }
    let calls = Arc::new(AtomicU64::new(0));
    if let Some(app) = peer(&calls) {
        eprintln!("herd: axum-response-cache");
        rows.push(
            herd(
                "axum-response-cache (1 instance)",
                vec![app],
                calls,
                "/herd/peer",
            )
            .await,
        );
    }
    println!(
        "## Thundering herd: {HERD} concurrent requests for one cold key, origin {ORIGIN_MS} ms\n"
    );
    println!("| subject | origin calls | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for row in &rows {
        let ms = |q: f64| row.histogram.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            row.subject,
            row.origin_calls,
            ms(0.5),
            ms(0.99),
            row.histogram.max() as f64 / 1000.0
        );
    }
    let coalesced = rows
        .iter()
        .find(|row| row.subject == COALESCING_ON)
        .map(|row| row.origin_calls);
    println!("\n{}", herd_target(coalesced));

    // Near cache vs Redis hits, one warm key, in process.
    let duration = Duration::from_secs(3);
    let concurrency = 64;
    let mut results = Vec::new();
    for round in 0..3 {
        for (subject, near) in [("Redis hit", false), ("near-cache hit", true)] {
            let calls = Arc::new(AtomicU64::new(0));
            let (apps, _layers) = redis_instances(&redis, true, near, &calls).await;
            let path = format!("/hot/{round}/{near}");
            for _ in 0..3 {
                request(apps[0].clone(), &path).await;
                _layers[0].flush().await;
            }
            // The near cache is used once the layer's pub/sub listener is up.
            tokio::time::sleep(Duration::from_millis(200)).await;
            request(apps[0].clone(), &path).await;
            redis.reset_stats().await.expect("reset");
            let rate = throughput(apps[0].clone(), &path, concurrency, duration).await;
            let per_request = commands(&redis).await as f64 / (rate * duration.as_secs_f64());
            eprintln!("{subject}: {rate:.0} req/s");
            results.push((round, subject, rate, per_request));
        }
    }
    println!(
        "\n## Hit throughput, one warm key, concurrency {concurrency}, in process, 3 rounds of {}s\n",
        duration.as_secs()
    );
    println!(
        "| round | Redis hit req/s | near-cache hit req/s | near / Redis | Redis cmds/req (Redis) | (near) |"
    );
    println!("|---|---|---|---|---|---|");
    for round in 0..3 {
        let redis_row = results
            .iter()
            .find(|r| r.0 == round && r.1 == "Redis hit")
            .expect("row");
        let near_row = results
            .iter()
            .find(|r| r.0 == round && r.1 == "near-cache hit")
            .expect("row");
        println!(
            "| {round} | {:.0} | {:.0} | {:.2} | {:.2} | {:.3} |",
            redis_row.2,
            near_row.2,
            near_row.2 / redis_row.2,
            redis_row.3,
            near_row.3
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_herd_target_is_met_by_one_origin_call_only() {
        assert!(herd_target(Some(1)).contains("**met** (origin calls: 1)"));
        assert!(herd_target(Some(2)).contains("**NOT met** (origin calls: 2)"));
        assert!(herd_target(Some(0)).contains("**NOT met** (origin calls: 0)"));
        assert!(herd_target(Some(1_000)).contains("**NOT met**"));
        assert!(herd_target(None).contains("**not measured**"));
    }
}
