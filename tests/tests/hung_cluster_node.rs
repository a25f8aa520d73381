//! A Redis Cluster primary that hangs (SIGSTOP) while the others answer,
//! seen through the cache layer: pages on the other nodes stay Redis hits,
//! and a page on the hung node waits for it once, not on every request.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, header};
use tests::answer::Answer;
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::testing::TestCluster;
use tower_redis_core::{BreakerState, RedisManager};

/// Pages spread over the slots (and so over the three primaries).
const PAGES: usize = 30;
const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);

fn cached_app(manager: RedisManager) -> (Router, CacheLayer) {
    let cache = CacheLayer::builder(manager)
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

/// `/page/{n}`, checked to be answered 200 with its own body; how long it took.
async fn fetch(app: &Router, n: usize) -> (Answer, Duration) {
    let request = Request::get(format!("/page/{n}"))
        .header(header::HOST, "shop.test")
        .body(Body::empty())
        .expect("request");
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(request))
        .await
        .unwrap_or_else(|_| panic!("/page/{n} took over 5 s"))
        .expect("infallible");
    let answer = Answer::read(response).await;
    let took = started.elapsed();
    assert_eq!(answer.status, 200, "/page/{n}: {answer:?}");
    assert_eq!(answer.body, format!("page {n}"), "/page/{n}: wrong body");
    (answer, took)
}

/// A hit read from Redis (not from the in-process fallback).
fn is_redis_hit(answer: &Answer) -> bool {
    let status = answer.cache_status();
    status.starts_with("tower-redis; hit") && !status.contains("redis-unavailable")
}

/// One primary hangs: the first request for each of its pages waits for it
/// (all at once here, so the whole wait is about one command timeout, well
/// within the cluster's node timeout of 2 s, after which the other nodes
/// would refuse every key). After that, every page is answered within a
/// third of the command timeout, the other nodes' pages as Redis hits,
/// and the breaker stays closed (default threshold). Before, the hung
/// node's response timeout threw the cluster connection away and every
/// page, on every node, waited; and each request for a hung node's page
/// waited again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_costs_its_pages_one_wait_and_the_others_none() {
    let cluster = TestCluster::start().await;
    let manager = RedisManager::connect(
        cluster
            .config()
            .key_prefix("hung")
            .command_timeout(COMMAND_TIMEOUT)
            .build()
            .expect("valid config"),
    )
    .await
    .expect("manager starts");
    let (app, cache) = cached_app(manager.clone());
    for n in 0..PAGES {
        fetch(&app, n).await;
    }
    cache.flush().await;
    for n in 0..PAGES {
        let (answer, _) = fetch(&app, n).await;
        assert!(
            is_redis_hit(&answer),
            "/page/{n}: {}",
            answer.cache_status()
        );
    }

    cluster.pause_node(1).await;
    let mut first = tokio::task::JoinSet::new();
    for n in 0..PAGES {
        let app = app.clone();
        first.spawn(async move { fetch(&app, n).await.1 });
    }
    let mut waited = 0;
    while let Some(took) = first.join_next().await {
        if took.expect("a first request") >= COMMAND_TIMEOUT / 2 {
            waited += 1;
        }
    }
    assert!(waited > 0, "some pages are on the hung node");
    for round in 0..2 {
        let mut hits = 0;
        for n in 0..PAGES {
            let (answer, took) = fetch(&app, n).await;
            assert!(
                took < COMMAND_TIMEOUT / 3,
                "round {round}: /page/{n} took {took:?} ({})",
                answer.cache_status()
            );
            if is_redis_hit(&answer) {
                hits += 1;
            }
        }
        assert!(
            hits >= PAGES - waited,
            "round {round}: {hits} Redis hits; {waited} pages waited for the hung node"
        );
    }
    assert_eq!(
        manager.health().state,
        BreakerState::Closed,
        "{:?}",
        manager.health()
    );
    cluster.resume_node(1).await;
}
