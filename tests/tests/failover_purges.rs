//! Purges issued during a failover are replayed on the new primary: two
//! app instances share a cached, tagged page; its primary dies; one
//! instance purges the tag while no primary answers (the purge is
//! deferred); after the replica takes over, neither instance ever serves
//! the purged page again, while an untouched page is still a hit from
//! Redis (the new primary has the replicated entries, so the page's
//! absence is the replayed purge's doing). Behind Redis Sentinel
//! (`TestSentinel`) and in a Redis Cluster with a replica per primary
//! (`TestCluster::with_replicas(1)`, the primary of the tag's index killed).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, header};
use tests::answer::Answer;
use tests::chaos::tuned;
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::testing::{TestCluster, TestSentinel};
use tower_redis_core::{RedisConfigBuilder, RedisManager};

/// One scenario at a time (Redis processes on a two-core machine).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Generous: promotion and recovery on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);
const TAG: &str = "purged-tag";
const PREFIX: &str = "purges";
/// The longest the outage queue waits between two replay attempts while
/// the breaker stays closed (core's `Failover` default `max_backoff`),
/// plus scheduling.
const REPLAY_RETRY_BOUND: Duration = Duration::from_secs(6);

struct Instance {
    manager: RedisManager,
    app: Router,
    cache: CacheLayer,
}

/// The purged page (tagged) and a control page, each answered with the
/// origin's call count, so every fill is told apart.
fn app(manager: RedisManager, calls: Arc<AtomicU32>) -> (Router, CacheLayer) {
    let cache = CacheLayer::builder(manager)
        .build()
        .expect("valid cache config");
    let tagged = Arc::clone(&calls);
    let app = Router::new()
        .route(
            "/tagged",
            get(move || {
                let n = tagged.fetch_add(1, Ordering::AcqRel) + 1;
                async move {
                    (
                        [
                            (header::CACHE_CONTROL, "max-age=600"),
                            (header::HeaderName::from_static("surrogate-key"), TAG),
                        ],
                        format!("tagged v{n}"),
                    )
                }
            }),
        )
        .route(
            "/control",
            get(move || {
                let n = calls.fetch_add(1, Ordering::AcqRel) + 1;
                async move {
                    (
                        [(header::CACHE_CONTROL, "max-age=600")],
                        format!("control v{n}"),
                    )
                }
            }),
        )
        .layer(cache.clone());
    (app, cache)
}

async fn instances(config: impl Fn() -> RedisConfigBuilder) -> Vec<Instance> {
    let calls = Arc::new(AtomicU32::new(0));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let manager = RedisManager::connect(
            tuned(config())
                .key_prefix(PREFIX)
                .build()
                .expect("valid config"),
        )
        .await
        .expect("manager starts");
        let (app, cache) = app(manager.clone(), Arc::clone(&calls));
        instances.push(Instance {
            manager,
            app,
            cache,
        });
    }
    instances
}

async fn fetch(app: &Router, path: &str) -> Answer {
    let request = Request::get(path)
        .header(header::HOST, "shop.test")
        .body(Body::empty())
        .expect("request");
    let response = tokio::time::timeout(DEADLINE, app.clone().oneshot(request))
        .await
        .unwrap_or_else(|_| panic!("{path} took over {DEADLINE:?}"))
        .expect("infallible");
    let answer = Answer::read(response).await;
    assert!(
        !answer.status.is_server_error(),
        "{path}: a failover is never a 5xx: {answer:?}"
    );
    answer
}

fn is_redis_hit(answer: &Answer) -> bool {
    let status = answer.cache_status();
    status.starts_with("tower-redis; hit") && !status.contains("redis-unavailable")
}

/// Both instances cache the two pages (filled by the first, hits from
/// Redis on the second); returns the purged page's body.
async fn cache_both(instances: &[Instance]) -> String {
    let tagged = fetch(&instances[0].app, "/tagged").await.body;
    fetch(&instances[0].app, "/control").await;
    instances[0].cache.flush().await;
    for instance in instances {
        let answer = fetch(&instance.app, "/tagged").await;
        assert!(is_redis_hit(&answer), "cached before the fault: {answer:?}");
        assert_eq!(answer.body, tagged);
        assert!(is_redis_hit(&fetch(&instance.app, "/control").await));
    }
    tagged
}

/// Purges the tag on the first instance while no primary answers; the
/// purge must be deferred (else the scenario did not test a replay).
async fn purge_during_outage(instances: &[Instance]) {
    let purged = instances[0].cache.handle().purge_tag(TAG).await;
    assert!(
        purged.deferred,
        "the purge ran while the primary was dead, so it is deferred: {purged:?}"
    );
}

/// After the promotion: until both instances serve the control page as a
/// Redis hit again, and for a while after (at least `grace`), the
/// instance that purged never answers with the purged body, and the other
/// only within `grace` of the promotion (the purge is not replayed yet).
async fn never_served_again(
    name: &str,
    instances: &[Instance],
    purged_body: &str,
    grace: Duration,
) {
    let started = Instant::now();
    let mut recovered = [false, false];
    let mut checks_after = 0;
    let mut last_served: Option<Duration> = None;
    while checks_after < 20 || started.elapsed() <= grace {
        assert!(
            started.elapsed() < DEADLINE,
            "{name}: the instances serve from Redis again within {DEADLINE:?} (recovered: \
             {recovered:?}; health {:?} / {:?})",
            instances[0].manager.health(),
            instances[1].manager.health()
        );
        for (index, instance) in instances.iter().enumerate() {
            let tagged = fetch(&instance.app, "/tagged").await;
            if tagged.body == purged_body {
                let at = started.elapsed();
                assert!(
                    index == 1 && at < grace,
                    "{name}: instance {index} served the purged page {at:?} after the \
                     promotion ({}; allowed: the other instance within {grace:?})",
                    tagged.cache_status()
                );
                last_served = Some(at);
            }
            if is_redis_hit(&fetch(&instance.app, "/control").await) {
                recovered[index] = true;
            }
        }
        if recovered == [true, true] {
            checks_after += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{name}: both instances served from Redis again; the purged page was last served \
         {last_served:?} after the promotion (by the instance that did not purge), never after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purged_while_the_sentinel_primary_is_dead_is_replayed() {
    let _serial = SERIAL.lock().await;
    let sentinel = TestSentinel::start().await;
    let instances = instances(|| sentinel.config()).await;
    let purged_body = cache_both(&instances).await;

    let old = sentinel.kill_primary().await;
    purge_during_outage(&instances).await;
    sentinel.wait_for_promotion(old).await;
    // The breakers open and close: the close replays the purge at once.
    never_served_again("sentinel", &instances, &purged_body, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purged_while_the_cluster_primary_is_dead_is_replayed() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::with_replicas(1).await;
    let instances = instances(|| cluster.config()).await;
    let purged_body = cache_both(&instances).await;

    // The primary holding the tag's index: the purge cannot read it.
    let index_key = instances[0].manager.keys().key(&["ct", TAG]);
    let slot = cluster.slot_of(&index_key).await;
    let killed = cluster.kill_primary(slot).await;
    purge_during_outage(&instances).await;
    cluster.wait_for_promotion(slot, killed).await;
    // Only one shard died, so the breakers stay closed: the purge is
    // replayed by the outage queue's retry, whose wait doubles up to 5 s
    // (core's `Failover` default). Until then the instance that did not
    // purge may still find the page on the shards that stayed up.
    never_served_again("cluster", &instances, &purged_body, REPLAY_RETRY_BOUND).await;
}
