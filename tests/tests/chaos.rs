//! Chaos: the app with all three layers on two instances sharing one Redis,
//! under a steady load, while Redis is killed, hung, slowed, cut off, reset,
//! filled up, flushed, or loses a cluster node. After each fault, every
//! invariant of [`tests::chaos`] is checked: no 5xx, no request over the
//! latency bound, no page served for another URL or variant, no private or
//! authorised response served to another client, every session read
//! answering the client's last acknowledged write, no session lost unless
//! the fault lost Redis' data, every acknowledged session write in Redis
//! after recovery, and rate-limit admissions during the outage within the
//! documented bound (local and shared decisions each within their part).
//! Degradation is counted per request, the session layer's included; a
//! fault that Redis absorbs must show none at all.
//!
//! Scenarios run one at a time (they share two cores), each a few seconds.

use std::time::Duration;

use tests::chaos::{
    CLUSTER_LATENCY_BOUND, Fault, FaultProxy, Instance, Load, Phase, RL_QUOTA, all_closed,
    all_opened, checker as checker_config,
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
    /// Only then may a client find its session gone, and only a session
    /// that existed before the fault, after the fault.
    durable_since: Phase,
    /// Whether responses must say they were degraded during the outage
    /// (proof that the fault was felt); `false` for faults the layers
    /// absorb without leaving Redis (FLUSHALL, SCRIPT FLUSH), which must
    /// then show no degradation at all.
    degraded: bool,
    /// Whether the rate limit decides in process long enough during the
    /// outage for the local limiters to deny (proof that their bound was
    /// tested). Not on a cluster, whose other nodes keep the shared
    /// counter for most of the outage.
    local_limits_denied: bool,
    /// Whether the rate-limit load exceeds the limit during the outage
    /// (not when every Redis round trip is slowed: fewer requests are sent).
    limit_reached: bool,
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
        "{name}: requests healthy={} outage={} recovered={}, degraded during outage={} (session layer {}), runtime held up {:?}, slowest={:?}: {}",
        load.requests(Phase::Healthy),
        load.requests(Phase::Outage),
        load.requests(Phase::Recovered),
        load.degraded(Phase::Outage),
        load.session_degraded(Phase::Outage),
        load.held_up(),
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

    // Sessions a client found gone: only data the fault lost explains one.
    let loses_data = expect.durable_since > Phase::Healthy;
    let fault_at = load.fault_at().expect("the scenario marks its fault");
    let losses = load.session_losses();
    let unexplained: Vec<_> = losses
        .iter()
        .filter(|loss| {
            !(loses_data && loss.session_created_at < fault_at && loss.seen_at >= fault_at)
        })
        .collect();
    eprintln!(
        "{name}: sessions found gone: {} ({} unexplained)",
        losses.len(),
        unexplained.len()
    );
    assert!(
        unexplained.is_empty(),
        "{name}: sessions lost without a fault that loses data (users logged out):\n{:#?}",
        &unexplained[..unexplained.len().min(5)]
    );

    // Degradation, counted per request (headers and the managers' fallbacks).
    assert!(
        load.counts_fallbacks(),
        "{name}: the load counts the managers' fallbacks (its metrics recorder is installed)"
    );
    if expect.degraded {
        assert!(
            load.degraded(Phase::Outage) > 0,
            "{name}: no response was served without Redis, so the fault was not felt"
        );
        assert!(
            load.session_degraded(Phase::Outage) > 0,
            "{name}: the session layer never fell back during the outage, so its fallbacks are not counted"
        );
    } else {
        for phase in [Phase::Healthy, Phase::Outage, Phase::Recovered] {
            assert_eq!(
                load.degraded(phase),
                0,
                "{name}: Redis stayed up, so nothing may be served without it in {phase:?}"
            );
            assert_eq!(
                load.session_degraded(phase),
                0,
                "{name}: Redis stayed up, so no session may be loaded or saved without it in {phase:?}"
            );
        }
        assert_eq!(
            load.unattributed_fallbacks(),
            0,
            "{name}: Redis stayed up, so no background task (cache stores, rate-limit batches) may fall back"
        );
    }

    // Rate limit: within the documented bound while Redis was away, the
    // local limiters' and the shared counter's admissions each within their
    // own part, and exact (the shared counter alone) while it was healthy.
    let outage = load.rate_limit_report(Phase::Outage, 2);
    outage.assert_within_bounds(&name, "outage");
    let count = outage.count;
    if expect.limit_reached {
        assert!(
            count.denied > 0,
            "{name}: the load exceeds the limit, so some requests are denied"
        );
    }
    if expect.local_limits_denied {
        assert!(
            count.denied_local > 0,
            "{name}: the local limiters denied nothing, so their bound was not tested"
        );
    }
    let healthy = load.rate_limit_report(Phase::Healthy, 0);
    let exact = f64::from(RL_QUOTA) * (1.0 + healthy.duration.as_secs_f64() / 2.0) + 1.0;
    assert!(
        healthy.count.admitted as f64 <= exact,
        "{name}: {} admitted while healthy, over the shared limit of {exact:.0}",
        healthy.count.admitted
    );

    // Sessions: every acknowledged write of a durable session is in Redis.
    let checker = RedisManager::connect(checker_config(checker).build().expect("valid config"))
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

    load.fault();
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
            local_limits_denied: true,
            limit_reached: true,
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

    load.fault();
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
            local_limits_denied: true,
            limit_reached: true,
        },
    )
    .await;
}

/// Redis hangs, and every client gives up before the command timeout (a
/// client that disconnects, a load balancer's or a `TimeoutLayer`'s
/// timeout shorter than it): no Redis operation of a request ever ends.
/// The manager's own canary (a `PING` when an operation is abandoned)
/// still times out, so the breaker opens and requests are answered from
/// memory within the clients' patience, instead of never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_that_every_client_gives_up_on_is_still_served_from_memory() {
    use tower::ServiceExt;
    const COMMAND_TIMEOUT: Duration = Duration::from_millis(400);
    const PATIENCE: Duration = Duration::from_millis(150);
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .command_timeout(COMMAND_TIMEOUT)
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("manager starts");
    let app = tests::chaos::app(manager.clone());
    let get = |id: u32| {
        http::Request::get(format!("/page/{id}"))
            .header("x-client", "impatient")
            .body(axum::body::Body::empty())
            .expect("a request")
    };
    let warm = app.clone().oneshot(get(1)).await.expect("infallible");
    assert_eq!(warm.status(), http::StatusCode::OK);
    redis.pause().await;
    let started = std::time::Instant::now();
    let (mut gave_up, mut id) = (0u32, 2);
    let answered = loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{gave_up} clients gave up, none was answered; the breaker: {:?}",
            manager.health()
        );
        id += 1;
        match tokio::time::timeout(PATIENCE, app.clone().oneshot(get(id))).await {
            Ok(response) => break response.expect("infallible"),
            Err(_) => gave_up += 1,
        }
    };
    let state = manager.health().state;
    redis.resume().await;
    assert_eq!(answered.status(), http::StatusCode::OK);
    assert!(gave_up >= 1, "the first requests waited for the hung Redis");
    assert_ne!(
        state,
        tower_redis_core::BreakerState::Closed,
        "answered from memory: the breaker opened"
    );
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

    load.fault();
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
            local_limits_denied: true,
            limit_reached: true,
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
    let load = start_load("slow", &instances);
    healthy(&load).await;
    // Every breaker transition from now on is seen, even one that opened
    // and closed again within the slow phase.
    let mut breakers: Vec<_> = instances.iter().map(|i| i.manager.subscribe()).collect();
    // Each chunk is held 20 ms: slower, but within the 200 ms budget.
    load.fault();
    proxy.set(Fault::Latency(Duration::from_millis(20)));
    outage(&load, Duration::from_millis(1000)).await;
    proxy.set(Fault::Pass);

    for (n, breaker) in breakers.iter_mut().enumerate() {
        assert!(
            !breaker.has_changed().expect("the manager is alive"),
            "instance {n}: the breaker moved (now {:?}) while Redis was only slow",
            instances[n].manager.health()
        );
    }
    // No answer degraded in any phase, the session layer's included, and
    // every other invariant, as for a fault.
    recover_and_check(
        load,
        &instances,
        redis.config(),
        Expect {
            durable_since: Phase::Healthy,
            degraded: false,
            local_limits_denied: false,
            limit_reached: false,
        },
    )
    .await;
    for (n, breaker) in breakers.iter_mut().enumerate() {
        assert!(
            !breaker.has_changed().expect("the manager is alive"),
            "instance {n}: the breaker moved after Redis was fast again"
        );
    }
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
    load.fault();
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
            local_limits_denied: true,
            limit_reached: true,
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

    load.fault();
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
            local_limits_denied: false,
            limit_reached: true,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_stopped_and_started() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start().await;
    let instances = instances(|| cluster.config()).await;
    let apps: Vec<_> = instances.iter().map(|i| i.app.clone()).collect();
    let load = Load::start_with_latency_bound("cluster", &apps, 4, CLUSTER_LATENCY_BOUND);
    healthy(&load).await;

    load.fault();
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
            local_limits_denied: false,
            limit_reached: true,
        },
    )
    .await;
}
