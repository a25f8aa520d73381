//! Each layer through a real failover, under load from two app instances:
//! the chaos app (cache, sessions, rate limit; `tests::chaos`) on two
//! managers, while the primary dies and a replica takes over, first behind
//! Redis Sentinel (`TestSentinel`), then in a Redis Cluster with a replica
//! per primary (`TestCluster::with_replicas(1)`).
//!
//! Checked, for each: the chaos invariants (no 5xx, no request over the
//! latency bound, no page served for another URL or variant, no private
//! response served to another client, every session read answering the
//! client's last acknowledged write); rate-limit admissions during the
//! failover within the documented bound and exact again after it; every
//! session write acknowledged from the kill on is in Redis after recovery
//! (those made while no primary answered were queued and replayed to the
//! new one). What asynchronous replication may lose is the last writes
//! acknowledged by the old primary just before it died: those are counted
//! and printed, and only a session created before the kill may be found
//! gone after it (the chaos load detects and reports each one).

use std::time::{Duration, Instant};

use tests::chaos::{
    CLUSTER_LATENCY_BOUND, Instance, Load, Phase, RL_QUOTA, all_closed, checker as checker_config,
};
use tower_redis_core::testing::{TestCluster, TestSentinel};
use tower_redis_core::{RedisConfigBuilder, RedisManager};

/// One scenario at a time: each runs Redis processes, two instances and a
/// load on a two-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Requests each phase must see at least, so no phase passes idle.
const PHASE_REQUESTS: u64 = 120;
/// Generous: phases and recovery on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

async fn instances(config: impl Fn() -> RedisConfigBuilder) -> Vec<Instance> {
    vec![
        Instance::start(config()).await,
        Instance::start(config()).await,
    ]
}

fn managers(instances: &[Instance]) -> Vec<&RedisManager> {
    instances.iter().map(|i| &i.manager).collect()
}

/// After the kill: waits for the promotion (`promoted`), then for every
/// instance to serve from Redis again, runs the recovered phase, and checks
/// every invariant.
async fn through_failover(
    mut load: Load,
    instances: &[Instance],
    killed_at: Instant,
    checker: RedisConfigBuilder,
) {
    let name = load.scenario().to_owned();
    load.wait_requests(PHASE_REQUESTS, DEADLINE).await;
    assert!(
        all_closed(&managers(instances), DEADLINE).await,
        "{name}: every instance serves from Redis again within {DEADLINE:?}"
    );
    let closed_after = killed_at.elapsed();
    load.begin(Phase::Recovered);
    load.wait_requests(PHASE_REQUESTS, DEADLINE).await;
    let violations = load.stop().await;
    eprintln!(
        "{name}: every breaker closed {closed_after:?} after the kill; requests healthy={} \
         failover={} recovered={}, degraded during the failover={} (session layer {}), slowest={:?}: {}",
        load.requests(Phase::Healthy),
        load.requests(Phase::Outage),
        load.requests(Phase::Recovered),
        load.degraded(Phase::Outage),
        load.session_degraded(Phase::Outage),
        load.max_latency(),
        load.slowest(),
    );
    assert!(
        violations.is_empty(),
        "{name}: broken invariants:\n{}",
        violations.join("\n")
    );
    for phase in [Phase::Outage, Phase::Recovered] {
        assert!(
            load.requests(phase) >= PHASE_REQUESTS,
            "{name}: too little traffic in {phase:?}"
        );
    }

    // Sessions found gone: only one created before the kill (its last
    // writes not yet replicated), found gone after it.
    let fault_at = load.fault_at().expect("the scenario marks its fault");
    let losses = load.session_losses();
    let unexplained: Vec<_> = losses
        .iter()
        .filter(|loss| !(loss.session_created_at < fault_at && loss.seen_at >= fault_at))
        .collect();
    eprintln!(
        "{name}: sessions found gone after the failover: {} ({} unexplained)",
        losses.len(),
        unexplained.len()
    );
    assert!(
        unexplained.is_empty(),
        "{name}: sessions lost that the failover cannot explain:\n{:#?}",
        &unexplained[..unexplained.len().min(5)]
    );

    // Rate limit: within the documented bound during the failover (local
    // and shared admissions each within their part), exact after it.
    let failover = load.rate_limit_report(Phase::Outage, 2);
    failover.assert_within_bounds(&name, "failover");
    let recovered = load.rate_limit_report(Phase::Recovered, 0);
    let exact = f64::from(RL_QUOTA) * (1.0 + recovered.duration.as_secs_f64() / 2.0) + 1.0;
    eprintln!(
        "{name}: rate limit after the failover: admitted {} ({} local), limit {exact:.0}",
        recovered.count.admitted, recovered.count.admitted_local
    );
    assert!(
        recovered.count.admitted as f64 <= exact,
        "{name}: {} admitted after the failover, over the shared limit of {exact:.0}",
        recovered.count.admitted
    );
    assert!(
        recovered.count.denied > 0,
        "{name}: the load exceeds the limit after the failover, so some requests are denied"
    );

    // Sessions: every write acknowledged from the kill on is in Redis; of
    // the writes acknowledged before it, those the replica had not received
    // are lost (counted, not asserted: asynchronous replication).
    let checker = RedisManager::connect(checker_config(checker).build().expect("valid config"))
        .await
        .expect("checker starts");
    let (expected, missing) = load
        .missing_session_writes(&checker, |w| w.written >= Phase::Outage, DEADLINE)
        .await;
    let (before, lost_before) = load
        .missing_session_writes(
            &checker,
            |w| w.written == Phase::Healthy,
            Duration::from_millis(200),
        )
        .await;
    eprintln!(
        "{name}: session writes acknowledged from the kill on: {expected}, {} missing; \
         acknowledged before the kill (last per entry): {before}, {} lost with the old primary",
        missing.len(),
        lost_before.len()
    );
    assert!(
        expected > 0,
        "{name}: the load wrote sessions during and after the failover"
    );
    assert!(
        missing.is_empty(),
        "{name}: session writes acknowledged during or after the failover are not in Redis: {:?}",
        &missing[..missing.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_layer_through_a_sentinel_failover() {
    let _serial = SERIAL.lock().await;
    let sentinel = TestSentinel::start().await;
    let instances = instances(|| sentinel.config()).await;
    let apps: Vec<_> = instances.iter().map(|i| i.app.clone()).collect();
    let load = Load::start("sentinel-failover", &apps, 4);
    load.wait_requests(PHASE_REQUESTS, DEADLINE).await;

    load.fault();
    load.begin(Phase::Outage);
    let killed_at = Instant::now();
    let old = sentinel.kill_primary().await;
    sentinel.wait_for_promotion(old).await;
    eprintln!(
        "sentinel-failover: the Sentinels promoted the replica {:?} after the kill",
        killed_at.elapsed()
    );
    through_failover(load, &instances, killed_at, sentinel.config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_layer_through_a_cluster_failover() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::with_replicas(1).await;
    let instances = instances(|| cluster.config()).await;
    let apps: Vec<_> = instances.iter().map(|i| i.app.clone()).collect();
    let load = Load::start_with_latency_bound("cluster-failover", &apps, 4, CLUSTER_LATENCY_BOUND);
    load.wait_requests(PHASE_REQUESTS, DEADLINE).await;

    // The primary of the slot of the rate limiter's `{rl}` tag (every
    // rate-limit decision goes to it) and of many session and cache keys.
    let slot = cluster.slot_of("{rl}").await;
    load.fault();
    load.begin(Phase::Outage);
    let killed_at = Instant::now();
    let killed = cluster.kill_primary(slot).await;
    let promoted = cluster.wait_for_promotion(slot, killed).await;
    eprintln!(
        "cluster-failover: node {promoted} took over slot {slot} from node {killed} {:?} after \
         the kill",
        killed_at.elapsed()
    );
    through_failover(load, &instances, killed_at, cluster.config()).await;
}
