//! Read scaling on a Redis Cluster with a replica per primary
//! (`TestCluster::with_replicas(1)`): with
//! `CacheLayerBuilder::read_from_replicas(true)` cache hits are read from
//! replicas (counted with `INFO commandstats` on each node), without it
//! from the primaries only; and a replica that dies or hangs costs no
//! request: the lookup goes to the primary and the page is still a hit.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, header};
use tests::answer::Answer;
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::testing::TestCluster;
use tower_redis_core::{RedisManager, redis};

/// Pages spread over the slots (and so over the three shards).
const PAGES: usize = 60;
/// Generous: a lookup that falls back from a dead replica to the primary
/// takes at most the command timeout; this is that plus scheduling.
const REQUEST_BOUND: Duration = Duration::from_secs(2);

/// Read-only lookup commands, as `INFO commandstats` names them.
const READS: [&str; 3] = ["hmget", "evalsha_ro", "eval_ro"];

fn cached_app(manager: RedisManager, replicas: bool) -> (Router, CacheLayer) {
    let cache = CacheLayer::builder(manager)
        .read_from_replicas(replicas)
        .build()
        .expect("valid cache config");
    let app = Router::new()
        .route(
            "/page/{n}",
            get(
                |axum::extract::Path(n): axum::extract::Path<u32>| async move {
                    (
                        [(header::CACHE_CONTROL, "max-age=600")],
                        format!("page {n}"),
                    )
                },
            ),
        )
        .layer(cache.clone());
    (app, cache)
}

async fn fetch(app: &Router, n: usize) -> Answer {
    let request = Request::get(format!("/page/{n}"))
        .header(header::HOST, "shop.test")
        .body(Body::empty())
        .expect("request");
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(REQUEST_BOUND, app.clone().oneshot(request))
        .await
        .unwrap_or_else(|_| panic!("/page/{n} took over {REQUEST_BOUND:?}"))
        .expect("infallible");
    let answer = Answer::read(response).await;
    assert!(
        started.elapsed() < REQUEST_BOUND,
        "/page/{n} took {:?}",
        started.elapsed()
    );
    assert_eq!(answer.status, 200, "/page/{n}: {answer:?}");
    assert_eq!(answer.body, format!("page {n}"), "/page/{n}: wrong body");
    answer
}

/// A hit read from Redis (not from the in-process fallback).
fn is_redis_hit(answer: &Answer) -> bool {
    let status = answer.cache_status();
    status.starts_with("tower-redis; hit") && !status.contains("redis-unavailable")
}

/// Lookup reads on `nodes` since the last reset.
async fn reads_on(cluster: &TestCluster, nodes: &[usize]) -> u64 {
    let mut reads = 0;
    for &node in nodes {
        let calls = cluster.command_calls(node).await;
        reads += READS.iter().filter_map(|c| calls.get(*c)).sum::<u64>();
    }
    reads
}

/// Fills every page, then reads each once more: every answer is a hit.
/// Returns the hits' lookup reads on the replicas and on the primaries.
async fn hits(cluster: &TestCluster, app: &Router, cache: &CacheLayer) -> (u64, u64) {
    for n in 0..PAGES {
        fetch(app, n).await;
    }
    cache.flush().await;
    let replicas = cluster.replicas().await;
    let primaries: Vec<usize> = (0..cluster.len())
        .filter(|i| !replicas.contains(i))
        .collect();
    cluster.reset_stats().await;
    for n in 0..PAGES {
        let answer = fetch(app, n).await;
        assert!(
            is_redis_hit(&answer),
            "/page/{n} is a hit from Redis: {}",
            answer.cache_status()
        );
    }
    (
        reads_on(cluster, &replicas).await,
        reads_on(cluster, &primaries).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_read_from_replicas_only_when_asked_and_survive_a_dead_replica() {
    let cluster = TestCluster::with_replicas(1).await;
    let manager = RedisManager::connect(
        cluster
            .config()
            .key_prefix("replicas")
            .build()
            .expect("valid config"),
    )
    .await
    .expect("manager starts");

    // Without the option: every hit is read on a primary.
    let (app, cache) = cached_app(manager.clone(), false);
    let (on_replicas, on_primaries) = hits(&cluster, &app, &cache).await;
    eprintln!(
        "without read_from_replicas: {on_replicas} reads on replicas, {on_primaries} on primaries"
    );
    assert_eq!(on_replicas, 0, "no lookup reads a replica unless asked");
    assert!(
        on_primaries >= PAGES as u64,
        "the hits were read on the primaries"
    );

    // With it: the hits are read on the replicas (a dedicated layer, so
    // that nothing this instance learnt above is reused).
    let manager = RedisManager::connect(
        cluster
            .config()
            .key_prefix("replicas-on")
            .build()
            .expect("valid config"),
    )
    .await
    .expect("manager starts");
    let (app, cache) = cached_app(manager.clone(), true);
    let (on_replicas, on_primaries) = hits(&cluster, &app, &cache).await;
    eprintln!(
        "with read_from_replicas: {on_replicas} reads on replicas, {on_primaries} on primaries"
    );
    // Most, not all: a replica read that misses half the command timeout
    // on a loaded machine goes to the primary (and pauses replica reads).
    assert!(
        on_replicas >= PAGES as u64 * 3 / 4,
        "the hits are read on replicas ({on_replicas} reads there, {on_primaries} on primaries)"
    );

    // A replica dies, another hangs (SIGSTOP): every page is still
    // answered within the bound, and still a hit (its lookups go to the
    // primary: redis-rs itself for the dead one, the manager after half
    // the command timeout for the hung one).
    let keys: Vec<String> = (0..30).map(|i| format!("replicas:key:{i}")).collect();
    for key in &keys {
        manager
            .query::<()>(redis::cmd("SET").arg(key).arg(key))
            .await
            .expect("SET on the primary");
    }
    let replicas = cluster.replicas().await;
    let (dead, hung) = (replicas[0], replicas[1]);
    cluster.kill_node(dead).await;
    cluster.pause_node(hung).await;
    // The manager's own reads first: every one answers (from the primary
    // when its replica is dead or hung), within the command timeout.
    for key in &keys {
        let started = std::time::Instant::now();
        let read = manager
            .run_read(|mut conn| async move {
                redis::cmd("GET")
                    .arg(key)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            })
            .await;
        assert_eq!(
            read.as_ref().ok().and_then(Option::as_deref),
            Some(key.as_str()),
            "run_read({key}) with a replica dead and one hung: {read:?}"
        );
        assert!(
            started.elapsed() <= manager.command_timeout() + Duration::from_millis(100),
            "run_read({key}) took {:?}",
            started.elapsed()
        );
    }
    for round in 0..3 {
        for n in 0..PAGES {
            let answer = fetch(&app, n).await;
            assert!(
                is_redis_hit(&answer),
                "round {round}: /page/{n} is a hit with replica node {dead} dead and {hung} \
                 hung: {}",
                answer.cache_status()
            );
        }
    }
    cluster.resume_node(hung).await;
    assert_eq!(
        manager.health().state,
        tower_redis_core::BreakerState::Closed,
        "a dead or hung replica does not open the breaker"
    );
}
