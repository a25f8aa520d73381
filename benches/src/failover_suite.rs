//! Suite `failover`: the stack (rate limit + cache + session, two app
//! instances, each with its own manager) under a steady load through one
//! Sentinel failover (`TestSentinel`) and one Cluster failover
//! (`TestCluster::with_replicas(1)`, the primary of the rate limiter's
//! `{rl}` slot killed). The app, the load and its checks are the chaos
//! harness of the `tests` package (`tests::chaos`), as
//! `tests/tests/failover_layers.rs` runs them, so the bench and the tests
//! see the same failover.
//!
//! Reported per failover: requests that failed (a 5xx, a wrong body, a
//! session that lost an acknowledged write: the harness's invariants; must
//! be 0), answers served degraded (in part without Redis), the promotion
//! time, the recovery time (from the primary's death to the first write
//! through each instance's manager that the new primary acknowledged; the
//! slower instance is reported) and the rate limiter's admissions during
//! the failover against the exact shared limit (the overshoot).
//!
//! Then read scaling: cache hits on the 3+3 cluster with and without
//! `CacheLayerBuilder::read_from_replicas`, in requests/s and lookup reads
//! per node kind (`INFO commandstats`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, header};
use tests::chaos::{
    CLUSTER_LATENCY_BOUND, Instance, LATENCY_BOUND, Load, Phase, RL_PERIOD, RL_QUOTA, all_closed,
};
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::testing::{TestCluster, TestSentinel};
use tower_redis_core::{RedisConfigBuilder, RedisManager, redis};

use crate::Options;
use crate::error::BenchError;
use crate::report::{Table, fixed2, median, thousands};
use crate::server::BenchRedis;

/// Requests each phase sees at least.
const PHASE_REQUESTS: u64 = 120;
/// Generous: promotion and recovery on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);
/// Load clients per scenario (plus the harness's two rate-limit clients).
const CLIENTS: usize = 4;
/// Cached pages of the read-scaling cells.
const PAGES: usize = 100;
/// Concurrent requesters of the read-scaling cells.
const READERS: usize = 32;
/// Lookup reads, as `INFO commandstats` names them.
const READS: [&str; 3] = ["hmget", "evalsha_ro", "eval_ro"];

/// What one failover showed.
struct Figures {
    scenario: &'static str,
    requests: u64,
    during: u64,
    failed: usize,
    degraded: u64,
    promoted_after: Duration,
    recovered_after: Option<Duration>,
    closed_after: Duration,
    admitted: u64,
    admitted_local: u64,
    exact: f64,
    bound: f64,
}

/// Runs the suite and returns its markdown section. `_redis` is not used:
/// each scenario starts its own Sentinel or Cluster.
pub(crate) async fn run(_redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
    let load = machine_load();
    let mut out = String::from("## failover\n\n");
    out.push_str(&format!(
        "Two app instances (rate limit + cache + session, `tests::chaos`), {CLIENTS} clients and 2 \
         rate-limit clients, through one failover each. Machine load before the run: `{load}`.\n\n"
    ));
    let sentinel = sentinel_failover().await?;
    let cluster = cluster_failover().await?;
    let mut table = Table::new([
        "failover",
        "requests (during)",
        "failed",
        "degraded answers",
        "promotion",
        "recovery (death → first write on the new primary)",
        "breakers closed",
        "rate limit admitted (local) / exact limit / bound",
        "overshoot",
    ]);
    for f in [&sentinel, &cluster] {
        let ms = |d: Duration| format!("{} ms", d.as_millis());
        table.row([
            f.scenario.to_owned(),
            format!("{} ({})", f.requests, f.during),
            f.failed.to_string(),
            f.degraded.to_string(),
            ms(f.promoted_after),
            f.recovered_after.map_or_else(|| "—".to_owned(), ms),
            ms(f.closed_after),
            format!(
                "{} ({}) / {:.0} / {:.0}",
                f.admitted, f.admitted_local, f.exact, f.bound
            ),
            {
                // Rounded to whole requests (no "-0").
                let overshoot = (f.admitted as f64 - f.exact).round() as i64;
                format!("{overshoot:+}")
            },
        ]);
    }
    out.push_str(&table.render());
    out.push_str(
        "\nfailed: answers breaking the harness's invariants (5xx, a wrong body or variant, a \
         private answer to another client, a session read missing an acknowledged write); must \
         be 0. degraded: answers served at least in part without Redis during the failover. \
         exact limit: the shared quota over the failover window (quota × (1 + window / period)); \
         overshoot: admitted − exact (the local limiters' share while Redis was away, plus \
         what the new primary lost of the old one's counters); bound: the documented bound.\n\n",
    );
    for f in [&sentinel, &cluster] {
        if f.failed > 0 {
            return Err(BenchError::Check(format!(
                "{}: {} requests failed during the failover",
                f.scenario, f.failed
            )));
        }
    }
    out.push_str(&read_scaling(options).await?);
    Ok(out)
}

fn machine_load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

async fn instances(config: impl Fn() -> RedisConfigBuilder) -> Vec<Instance> {
    vec![
        Instance::start(config()).await,
        Instance::start(config()).await,
    ]
}

/// Per instance: a write to the killed slot every 10 ms from `since`, until
/// one is acknowledged; the slowest instance's time.
fn watch_recovery(
    managers: Vec<RedisManager>,
    key: String,
    since: Instant,
) -> tokio::task::JoinHandle<Option<Duration>> {
    tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        let mut pending: Vec<RedisManager> = managers;
        while !pending.is_empty() {
            if since.elapsed() > DEADLINE {
                return None;
            }
            let mut still = Vec::new();
            for manager in pending {
                let written = manager
                    .query::<()>(redis::cmd("SET").arg(&key).arg("probe"))
                    .await;
                match written {
                    Ok(()) => slowest = slowest.max(since.elapsed()),
                    Err(_) => still.push(manager),
                }
            }
            pending = still;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(slowest)
    })
}

/// After the kill and the promotion: every breaker closed, the recovered
/// phase, the figures.
async fn settle(
    scenario: &'static str,
    mut load: Load,
    instances: &[Instance],
    killed_at: Instant,
    promoted_after: Duration,
    recovery: tokio::task::JoinHandle<Option<Duration>>,
) -> Result<Figures, BenchError> {
    load.wait_requests(PHASE_REQUESTS, DEADLINE).await;
    let managers: Vec<&RedisManager> = instances.iter().map(|i| &i.manager).collect();
    if !all_closed(&managers, DEADLINE).await {
        return Err(BenchError::Check(format!(
            "{scenario}: the breakers did not close within {DEADLINE:?}"
        )));
    }
    let closed_after = killed_at.elapsed();
    load.begin(Phase::Recovered);
    load.wait_requests(PHASE_REQUESTS, DEADLINE).await;
    let violations = load.stop().await;
    for violation in violations.iter().take(5) {
        eprintln!("{scenario}: {violation}");
    }
    let recovered_after = recovery.await.ok().flatten();
    let report = load.rate_limit_report(Phase::Outage, 2);
    let window = report.duration.as_secs_f64();
    let exact = f64::from(RL_QUOTA) * (1.0 + window / RL_PERIOD.as_secs_f64());
    Ok(Figures {
        scenario,
        requests: load.requests(Phase::Healthy)
            + load.requests(Phase::Outage)
            + load.requests(Phase::Recovered),
        during: load.requests(Phase::Outage),
        failed: violations.len(),
        degraded: load.degraded(Phase::Outage),
        promoted_after,
        recovered_after,
        closed_after,
        admitted: report.count.admitted,
        admitted_local: report.count.admitted_local,
        exact,
        bound: report.bound,
    })
}

async fn sentinel_failover() -> Result<Figures, BenchError> {
    eprintln!("failover: Sentinel …");
    let sentinel = TestSentinel::try_start().await?;
    let instances = instances(|| sentinel.config()).await;
    let apps: Vec<Router> = instances.iter().map(|i| i.app.clone()).collect();
    let load = Load::start_with_latency_bound("bench-sentinel", &apps, CLIENTS, LATENCY_BOUND);
    load.wait_requests(PHASE_REQUESTS, DEADLINE).await;
    load.fault();
    load.begin(Phase::Outage);
    let killed_at = Instant::now();
    let old = sentinel.kill_primary().await;
    let recovery = watch_recovery(
        instances.iter().map(|i| i.manager.clone()).collect(),
        "bench-failover-probe".to_owned(),
        killed_at,
    );
    sentinel.wait_for_promotion(old).await;
    let promoted_after = killed_at.elapsed();
    settle(
        "Sentinel",
        load,
        &instances,
        killed_at,
        promoted_after,
        recovery,
    )
    .await
}

async fn cluster_failover() -> Result<Figures, BenchError> {
    eprintln!("failover: Cluster …");
    let cluster = TestCluster::try_start_with(1).await?;
    let instances = instances(|| cluster.config()).await;
    let apps: Vec<Router> = instances.iter().map(|i| i.app.clone()).collect();
    let load =
        Load::start_with_latency_bound("bench-cluster", &apps, CLIENTS, CLUSTER_LATENCY_BOUND);
    load.wait_requests(PHASE_REQUESTS, DEADLINE).await;
    let slot = cluster.slot_of("{rl}").await;
    load.fault();
    load.begin(Phase::Outage);
    let killed_at = Instant::now();
    let killed = cluster.kill_primary(slot).await;
    let recovery = watch_recovery(
        instances.iter().map(|i| i.manager.clone()).collect(),
        "{rl}bench-failover-probe".to_owned(),
        killed_at,
    );
    cluster.wait_for_promotion(slot, killed).await;
    let promoted_after = killed_at.elapsed();
    settle(
        "Cluster",
        load,
        &instances,
        killed_at,
        promoted_after,
        recovery,
    )
    .await
}

/// Cache hits on the 3+3 cluster with and without replica reads,
/// interleaved, `options.repeats` times; medians.
async fn read_scaling(options: &Options) -> Result<String, BenchError> {
    eprintln!("failover: read scaling …");
    let cluster = TestCluster::try_start_with(1).await?;
    let mut cells = Vec::new();
    for (name, replicas) in [("primaries only", false), ("read_from_replicas", true)] {
        let manager = RedisManager::connect(
            cluster
                .config()
                .key_prefix(if replicas { "scale-on" } else { "scale-off" })
                .build()?,
        )
        .await?;
        let cache = CacheLayer::builder(manager)
            .read_from_replicas(replicas)
            .build()
            .map_err(|e| BenchError::Check(format!("cache config: {e}")))?;
        let app = Router::new()
            .route(
                "/page/{n}",
                get(
                    |axum::extract::Path(n): axum::extract::Path<u32>| async move {
                        (
                            [(header::CACHE_CONTROL, "max-age=3600")],
                            format!("page {n}"),
                        )
                    },
                ),
            )
            .layer(cache.clone());
        for n in 0..PAGES {
            get_page(&app, n).await?;
        }
        cache.flush().await;
        // Once more, so that every `Vary` hint is known and a hit is one HMGET.
        for n in 0..PAGES {
            let status = get_page(&app, n).await?;
            if !is_redis_hit(&status) {
                return Err(BenchError::Check(format!(
                    "{name}: /page/{n} is not a Redis hit after the fill: {status}"
                )));
            }
        }
        cells.push((name, app, Vec::new(), (0_u64, 0_u64)));
    }
    let replicas = cluster.replicas().await;
    let primaries: Vec<usize> = (0..cluster.len())
        .filter(|i| !replicas.contains(i))
        .collect();
    for _ in 0..options.repeats {
        for (name, app, rates, reads) in &mut cells {
            tokio::time::sleep(options.warmup).await;
            cluster.reset_stats().await;
            let rate = hits_per_second(name, app, options.duration).await?;
            rates.push(rate);
            reads.0 += lookup_reads(&cluster, &primaries).await;
            reads.1 += lookup_reads(&cluster, &replicas).await;
        }
    }
    let load = machine_load();
    let mut table = Table::new([
        "cache hits, 3+3 cluster",
        "hits/s (median)",
        "ratio",
        "lookup reads on primaries",
        "on replicas",
    ]);
    let base = median(&cells[0].2).unwrap_or(0.0);
    for (name, _, rates, (on_primaries, on_replicas)) in &cells {
        let rate = median(rates).unwrap_or(0.0);
        table.row([
            (*name).to_owned(),
            thousands(rate),
            if base > 0.0 {
                fixed2(rate / base)
            } else {
                "—".to_owned()
            },
            on_primaries.to_string(),
            on_replicas.to_string(),
        ]);
    }
    Ok(format!(
        "### read scaling\n\n{READERS} in-process requesters on {PAGES} cached pages, {:?} per cell, \
         {} repeat(s) interleaved; machine load after: `{load}`.\n\n{}",
        options.duration,
        options.repeats,
        table.render()
    ))
}

async fn get_page(app: &Router, n: usize) -> Result<String, BenchError> {
    let request = Request::get(format!("/page/{n}"))
        .header(header::HOST, "bench.test")
        .body(Body::empty())
        .map_err(|e| BenchError::Check(e.to_string()))?;
    let response = app
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| BenchError::Check(format!("{e:?}")))?;
    if !response.status().is_success() {
        return Err(BenchError::Check(format!(
            "/page/{n}: {}",
            response.status()
        )));
    }
    let status = response
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // Read to the end: the cache stores a body once it has been read whole.
    http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|e| BenchError::Check(format!("/page/{n}: body: {e}")))?;
    Ok(status)
}

/// Hits per second of [`READERS`] tasks over `duration`; a non-hit ends
/// the run with an error.
async fn hits_per_second(name: &str, app: &Router, duration: Duration) -> Result<f64, BenchError> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for reader in 0..READERS {
        let (app, done, name) = (app.clone(), Arc::clone(&done), name.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut n = reader;
            while started.elapsed() < duration {
                let page = n % PAGES;
                let status = get_page(&app, page).await?;
                if !is_redis_hit(&status) {
                    return Err(BenchError::Check(format!(
                        "{name}: /page/{page} after {:?}: not a Redis hit: {status}",
                        started.elapsed()
                    )));
                }
                done.fetch_add(1, Ordering::Relaxed);
                n += READERS;
            }
            Ok::<(), BenchError>(())
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| BenchError::Check(format!("reader: {e}")))??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

fn is_redis_hit(status: &str) -> bool {
    status.starts_with("tower-redis; hit") && !status.contains("redis-unavailable")
}

async fn lookup_reads(cluster: &TestCluster, nodes: &[usize]) -> u64 {
    let mut reads = 0;
    for &node in nodes {
        let calls = cluster.command_calls(node).await;
        reads += READS.iter().filter_map(|c| calls.get(*c)).sum::<u64>();
    }
    reads
}
