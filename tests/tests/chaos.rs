//! Chaos: the app with all three layers on two instances sharing one Redis,
//! under a steady load, while Redis is killed, hung, slowed, cut off, reset,
//! filled up, flushed, or loses a cluster node. After each fault, every
//! invariant of [`tests::chaos`] is checked: no 5xx, no request over the
//! latency bound, no page served for another URL or variant, no private or
//! authorised response served to another client, every acknowledged session
//! write in Redis after recovery, and rate-limit admissions during the
//! outage within the documented bound.
//!
//! Scenarios run one at a time (they share two cores), each a few seconds.

use std::time::Duration;

use tests::chaos::{
    Fault, FaultProxy, Instance, LATENCY_BOUND, Load, Phase, all_closed, all_opened, tuned,
};
use tower_redis_core::testing::{TestCluster, TestRedis};
use tower_redis_core::{RedisConfig, RedisConfigBuilder, RedisManager, redis};

/// One scenario at a time: each runs two instances, a load and Redis
/// servers on a two-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Requests each phase must see at least, so no phase passes idle.
const PHASE_REQUESTS: u64 = 120;
/// How long a phase may take to see them on a slow machine.
const PHASE_DEADLINE: Duration = Duration::from_secs(20);
/// How long recovery may take.
const RECOVERY: Duration = Duration::from_secs(20);

/// What a scenario expects of the data once Redis is back.
struct Expect {
    /// Sessions created in this phase or later must have every write in
    /// Redis. `Healthy` when the fault keeps Redis' data; `Outage` when it
    /// loses it (a restart without persistence, FLUSHALL, a cluster node
    /// restarted empty): a session Redis lost is not recreated (README).
    durable_since: Phase,
    /// Whether responses must say they were degraded during the outage
    /// (proof that the fault was felt); `false` for faults the layers
    /// absorb without leaving Redis (FLUSHALL, SCRIPT FLUSH), which must
    /// then show no degradation at all.
    degraded: bool,
}

async fn instances(config: impl Fn() -> RedisConfigBuilder) -> Vec<Instance> {
    vec![
        Instance::start(config()).await,
        Instance::start(config()).await,
    ]
}

fn start_load(name: &str, instances: &[Instance]) -> Load {
    let apps: Vec<_> = instances.iter().map(|i| i.app.clone()).collect();
    Load::start(name, &apps, 4)
}

/// Healthy traffic first, so that the caches, sessions and counters hold
/// data when the fault strikes.
async fn healthy(load: &Load) {
    load.wait_requests(PHASE_REQUESTS, PHASE_DEADLINE).await;
    assert!(
        load.requests(Phase::Healthy) >= PHASE_REQUESTS,
        "too little healthy traffic"
    );
}

/// Traffic during the fault: the phase starts once the fault is in place.
async fn outage(load: &Load, at_least: Duration) {
    load.begin(Phase::Outage);
    let started = tokio::time::Instant::now();
    load.wait_requests(PHASE_REQUESTS, PHASE_DEADLINE).await;
    tokio::time::sleep_until(started + at_least).await;
}

fn managers(instances: &[Instance]) -> Vec<&RedisManager> {
    instances.iter().map(|i| &i.manager).collect()
}

/// Waits for recovery, runs the recovered phase, stops the load, and checks
/// every invariant.
async fn recover_and_check(
    mut load: Load,
    instances: &[Instance],
    checker: RedisConfigBuilder,
    expect: Expect,
) {
    assert!(
        all_closed(&managers(instances), RECOVERY).await,
        "{}: every instance serves from Redis again within {RECOVERY:?}",
        load.scenario()
    );
    load.begin(Phase::Recovered);
    load.wait_requests(PHASE_REQUESTS, PHASE_DEADLINE).await;
    let violations = load.stop().await;
    let name = load.scenario().to_owned();
    eprintln!(
        "{name}: requests healthy={} outage={} recovered={}, degraded during outage={}, slowest={:?}",
        load.requests(Phase::Healthy),
        load.requests(Phase::Outage),
        load.requests(Phase::Recovered),
        load.degraded(Phase::Outage),
        load.max_latency(),
    );
    assert!(
        violations.is_empty(),
        "{name}: broken invariants:\n{}",
        violations.join("\n")
    );
    assert!(load.max_latency() <= LATENCY_BOUND);
    for phase in [Phase::Outage, Phase::Recovered] {
        assert!(
            load.requests(phase) >= PHASE_REQUESTS,
            "{name}: too little traffic in {phase:?}"
        );
    }
    if expect.degraded {
        assert!(
            load.degraded(Phase::Outage) > 0,
            "{name}: no response was served without Redis, so the fault was not felt"
        );
    } else {
        for phase in [Phase::Healthy, Phase::Outage, Phase::Recovered] {
            assert_eq!(
                load.degraded(phase),
                0,
                "{name}: Redis stayed up, so nothing may be served without it in {phase:?}"
            );
        }
    }

    // Rate limit: within the documented bound while Redis was away, and
    // exact (the shared counter alone) while it was healthy.
    let (count, took, bound) = load.rate_limit_report(Phase::Outage, 2);
    eprintln!(
        "{name}: rate limit during the outage ({took:?} with slack): admitted {} denied {}, bound {bound:.0}",
        count.admitted, count.denied
    );
    assert!(
        count.admitted > 0,
        "{name}: the rate-limited route was used"
    );
    assert!(
        count.admitted as f64 <= bound,
        "{name}: {} admitted during the outage, over the bound of {bound:.0}",
        count.admitted
    );
    assert!(
        count.denied > 0,
        "{name}: the load exceeds the limit, so some requests are denied"
    );
    let (healthy, took, _) = load.rate_limit_report(Phase::Healthy, 0);
    let exact = tests::chaos::RL_QUOTA as f64 * (1.0 + took.as_secs_f64() / 2.0) + 1.0;
    assert!(
        healthy.admitted as f64 <= exact,
        "{name}: {} admitted while healthy, over the shared limit of {exact:.0}",
        healthy.admitted
    );

    // Sessions: every acknowledged write of a durable session is in Redis.
    let checker = RedisManager::connect(tuned(checker).build().expect("valid config"))
        .await
        .expect("checker starts");
    let (expected, missing) = load
        .missing_session_writes(
            &checker,
            |w| w.session_created >= expect.durable_since,
            RECOVERY,
        )
        .await;
    eprintln!(
        "{name}: {expected} session writes expected in Redis, {} missing",
        missing.len()
    );
    assert!(expected > 0, "{name}: the load wrote sessions");
    assert!(
        missing.is_empty(),
        "{name}: acknowledged session writes not in Redis after recovery: {:?}",
        &missing[..missing.len().min(10)]
    );
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("url ends in a port")
}

async fn admin(redis: &TestRedis, command: &[&str]) {
    let mut conn = redis.connection().await.expect("admin connection");
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async::<redis::Value>(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_with_sigkill_and_restarted() {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await;
    let instances = instances(|| redis.config()).await;
    let load = start_load("sigkill", &instances);
    healthy(&load).await;

    redis.kill().await;
    outage(&load, Duration::from_millis(1500)).await;
    assert!(all_opened(&managers(&instances), RECOVERY).await);
    redis.restart().await;

    recover_and_check(
        load,
        &instances,
        redis.config(),
        Expect {
            durable_since: Phase::Outage,
            degraded: true,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_with_sigstop_then_resumed() {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await;
    let instances = instances(|| redis.config()).await;
    let load = start_load("sigstop", &instances);
    healthy(&load).await;

    redis.pause().await;
    outage(&load, Duration::from_millis(1500)).await;
    assert!(all_opened(&managers(&instances), RECOVERY).await);
    redis.resume().await;

    recover_and_check(
        load,
        &instances,
        redis.config(),
        Expect {
            durable_since: Phase::Healthy,
            degraded: true,
        },
    )
    .await;
}

/// The instances reach Redis through a [`FaultProxy`] that applies `fault`
/// during the outage.
async fn behind_proxy(name: &str, fault: Fault) {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], port_of(redis.url())).into()).await;
    let instances = instances(|| RedisConfig::builder().url(proxy.url())).await;
    let load = start_load(name, &instances);
    healthy(&load).await;

    proxy.set(fault);
    outage(&load, Duration::from_millis(1500)).await;
    assert!(all_opened(&managers(&instances), RECOVERY).await);
    proxy.set(Fault::Pass);

    recover_and_check(
        load,
        &instances,
        redis.config(),
        Expect {
            durable_since: Phase::Healthy,
            degraded: true,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slower_than_the_command_timeout() {
    behind_proxy("latency", Fault::Latency(Duration::from_millis(400))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_to_redis_silently_dropped() {
    behind_proxy("blackhole", Fault::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_redis_reset() {
    behind_proxy("reset", Fault::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slow_but_within_the_command_timeout_is_no_outage() {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], port_of(redis.url())).into()).await;
    let instances = instances(|| RedisConfig::builder().url(proxy.url())).await;
    let mut load = start_load("slow", &instances);
    healthy(&load).await;
    // Each chunk is held 20 ms: slower, but within the 200 ms budget.
    proxy.set(Fault::Latency(Duration::from_millis(20)));
    outage(&load, Duration::from_millis(1000)).await;
    proxy.set(Fault::Pass);
    load.begin(Phase::Recovered);
    load.wait_requests(PHASE_REQUESTS, PHASE_DEADLINE).await;
    let violations = load.stop().await;
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    assert!(load.requests(Phase::Outage) >= PHASE_REQUESTS);
    for instance in &instances {
        assert!(
            instance.manager.is_available(),
            "{:?}",
            instance.manager.health()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_refusing_writes() {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await;
    let instances = instances(|| redis.config()).await;
    let load = start_load("maxmemory", &instances);
    healthy(&load).await;

    admin(&redis, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).await;
    admin(&redis, &["CONFIG", "SET", "maxmemory", "1"]).await;
    outage(&load, Duration::from_millis(1500)).await;
    admin(&redis, &["CONFIG", "SET", "maxmemory", "0"]).await;

    recover_and_check(
        load,
        &instances,
        redis.config(),
        Expect {
            durable_since: Phase::Healthy,
            degraded: true,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_and_script_flush_mid_run() {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await;
    let instances = instances(|| redis.config()).await;
    let load = start_load("flush", &instances);
    healthy(&load).await;

    admin(&redis, &["FLUSHALL"]).await;
    admin(&redis, &["SCRIPT", "FLUSH"]).await;
    outage(&load, Duration::from_millis(1000)).await;
    // Scripts are reloaded on NOSCRIPT: they are in Redis again.
    let mut conn = redis.connection().await.expect("connection");
    let scripts: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    assert!(
        !scripts.contains("number_of_cached_scripts:0"),
        "scripts were loaded again"
    );

    recover_and_check(
        load,
        &instances,
        redis.config(),
        Expect {
            durable_since: Phase::Outage,
            degraded: false,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_stopped_and_started() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start().await;
    let instances = instances(|| cluster.config()).await;
    let load = start_load("cluster", &instances);
    healthy(&load).await;

    cluster.kill_node(1).await;
    // Long enough for the other nodes to declare the cluster down (node
    // timeout 2 s).
    outage(&load, Duration::from_millis(3000)).await;
    cluster.restart_node(1).await;

    recover_and_check(
        load,
        &instances,
        cluster.config(),
        Expect {
            durable_since: Phase::Outage,
            degraded: true,
        },
    )
    .await;
}
