//! The manager while its Redis is broken on purpose: absent at start,
//! killed under load, hung with SIGSTOP, restarted on the same port.
//!
//! Every test asserts behaviour (states, sources, counts); the only time
//! bounds are the contract's own ("checkout and command together never
//! take longer than the command timeout") with [`MARGIN`] for scheduling,
//! net of the time the test's runtime could not run at all ([`Stalls`]: a
//! loaded machine was seen to stop the process for over a second).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower_redis_core::redis;
use tower_redis_core::testing::{TestRedis, wait_for_breaker};
use tower_redis_core::{BreakerState, Error, FallbackReason, RedisManager, Served, Source};

const COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
/// Scheduling slack (a timer that fires late, a task that waits its turn);
/// the contract is the timeout.
const MARGIN: Duration = Duration::from_millis(100);
/// How long recovery may take before a test gives up.
const RECOVERY: Duration = Duration::from_secs(15);

/// The times the test's runtime could not run its tasks on time: a task
/// of its own sleeps [`Stalls::TICK`] at a time and records each wake-up
/// more than [`Stalls::LATE`] late. On the shared two-core CI machine the
/// process was seen not to run for over a second at a time, which no
/// margin on a 200 ms timeout absorbs. A wait the library makes is not
/// one: while a caller waits for Redis the runtime is free and this task
/// wakes up on time (a library that blocked the thread would be excused;
/// that is not what these tests are about).
struct Stalls {
    stopped: Arc<Mutex<Vec<(Instant, Instant)>>>,
    stop: Arc<AtomicBool>,
}

impl Stalls {
    const TICK: Duration = Duration::from_millis(2);
    const LATE: Duration = Duration::from_millis(10);

    fn start() -> Self {
        let stopped = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stopped = Arc::clone(&stopped);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut last = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    tokio::time::sleep(Self::TICK).await;
                    let now = Instant::now();
                    let due = last + Self::TICK;
                    if now > due + Self::LATE {
                        stopped
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((due, now));
                    }
                    last = now;
                }
            });
        }
        Self { stopped, stop }
    }

    /// How long the runtime was held up between `from` and `to`.
    fn during(&self, from: Instant, to: Instant) -> Duration {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|&(start, end)| end.min(to).saturating_duration_since(start.max(from)))
            .sum()
    }

    /// The longest of `waits` (start, end), net of the hold-ups within it,
    /// and those hold-ups. Ask once the waits are over.
    async fn longest_net(&self, waits: &[(Instant, Instant)]) -> (Duration, Duration) {
        // A hold-up is recorded when the task runs again.
        tokio::time::sleep(Self::TICK * 5).await;
        waits
            .iter()
            .map(|&(from, to)| {
                let stalled = self.during(from, to);
                (to.duration_since(from).saturating_sub(stalled), stalled)
            })
            .max()
            .unwrap_or_default()
    }
}

impl Drop for Stalls {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

async fn manager_for(redis: &TestRedis) -> RedisManager {
    let config = redis
        .config()
        .command_timeout(COMMAND_TIMEOUT)
        .connect_timeout(Duration::from_millis(300))
        .failure_threshold(3)
        .build()
        .expect("valid config");
    RedisManager::connect(config).await.expect("manager starts")
}

/// One INCR through the failover helper; the fallback answers -1.
async fn incr(manager: &RedisManager) -> Served<i64> {
    let key = manager.keys().key(&["counter"]);
    manager
        .failover(
            |mut conn| async move { redis::cmd("INCR").arg(key).query_async(&mut conn).await },
            |_| async { -1 },
        )
        .await
}

/// Redis closes every client connection but the one that asks (the
/// manager's pooled one among them).
async fn close_the_managers_connections(redis: &TestRedis) {
    let killed = redis
        .kill_clients("TYPE", "normal")
        .await
        .expect("CLIENT KILL");
    assert!(killed >= 1, "the manager's connection was closed");
}

async fn wait_for_state(manager: &RedisManager, state: BreakerState) {
    wait_for_breaker(manager, state, RECOVERY).await;
}

#[tokio::test]
async fn starts_with_redis_down_then_recovers_when_it_appears() {
    let redis = TestRedis::start().await;
    redis.stop().await;

    let manager = manager_for(&redis).await;
    assert_eq!(manager.health().state, BreakerState::Open);

    let stalls = Stalls::start();
    let started = Instant::now();
    let served = incr(&manager).await;
    let ended = Instant::now();
    assert_eq!(served.source, Source::Fallback(FallbackReason::BreakerOpen));
    let (waited, stalled) = stalls.longest_net(&[(started, ended)]).await;
    assert!(
        waited < MARGIN,
        "an open breaker answers at once: {waited:?} (and {stalled:?} held up)"
    );

    redis.restart().await;
    wait_for_state(&manager, BreakerState::Closed).await;
    let served = incr(&manager).await;
    assert_eq!(served.source, Source::Redis);
    assert_eq!(served.value, 1);
}

#[tokio::test]
async fn require_redis_refuses_to_start_without_redis() {
    let redis = TestRedis::start().await;
    redis.stop().await;
    let config = redis
        .config()
        .require_redis(true)
        .build()
        .expect("valid config");
    let error = RedisManager::connect(config)
        .await
        .expect_err("must refuse");
    assert!(matches!(error, Error::Required { .. }), "{error}");
    assert!(error.to_string().contains("require_redis"), "{error}");
}

#[tokio::test]
async fn an_open_breaker_sends_nothing_to_redis() {
    let redis = TestRedis::start().await;
    // A slow probe keeps the breaker open for the whole test.
    let config = redis
        .config()
        .command_timeout(COMMAND_TIMEOUT)
        .failure_threshold(3)
        .probe_backoff(Duration::from_secs(60), Duration::from_secs(60))
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("manager starts");
    redis.pause().await;
    for _ in 0..3 {
        assert_eq!(
            incr(&manager).await.source,
            Source::Fallback(FallbackReason::Timeout)
        );
    }
    assert_eq!(manager.health().state, BreakerState::Open);
    redis.resume().await;
    redis.reset_stats().await.expect("reset");

    for _ in 0..50 {
        assert_eq!(
            incr(&manager).await.source,
            Source::Fallback(FallbackReason::BreakerOpen)
        );
    }
    let calls = redis.command_calls().await.expect("commandstats");
    assert_eq!(calls.get("incr"), None, "{calls:?}");
}

#[tokio::test]
async fn kill_under_load_opens_the_breaker_and_no_caller_waits_past_the_timeout() {
    let redis = Arc::new(TestRedis::start().await);
    let manager = manager_for(&redis).await;
    let mut opened = manager.subscribe();
    let stalls = Stalls::start();
    let fallbacks = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_millis(1500);

    let mut workers = Vec::new();
    for _ in 0..16 {
        let manager = manager.clone();
        let fallbacks = Arc::clone(&fallbacks);
        workers.push(tokio::spawn(async move {
            let mut waits = Vec::new();
            while Instant::now() < stop_at {
                let started = Instant::now();
                let served = incr(&manager).await;
                waits.push((started, Instant::now()));
                if served.is_fallback() {
                    fallbacks.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
            waits
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill().await;
    let mut waits = Vec::new();
    for worker in workers {
        waits.extend(worker.await.expect("worker"));
    }

    assert!(
        tokio::time::timeout(RECOVERY, opened.wait_for(|s| *s != BreakerState::Closed))
            .await
            .is_ok(),
        "breaker never opened"
    );
    assert!(fallbacks.load(Ordering::Relaxed) > 0);
    let (longest, stalled) = stalls.longest_net(&waits).await;
    assert!(
        longest <= COMMAND_TIMEOUT + MARGIN,
        "a caller waited {longest:?} (besides {stalled:?} the runtime was held up)"
    );
}

/// A hung Redis (SIGSTOP) whose pooled connection was dropped: operations
/// under load must connect to a server that accepts the TCP connection
/// (its kernel does) but never answers, and those already on the old
/// connection find it closed. Checkout and command together never take
/// longer than the command timeout. The connect timeout is far longer
/// here, so only that one timer can end the waits in time. (A SIGKILL
/// fails sockets at once and never tests a timeout.)
#[tokio::test]
async fn hang_under_load_with_the_pooled_connection_dropped_no_caller_waits_past_the_timeout() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .command_timeout(COMMAND_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .failure_threshold(3)
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("manager starts");
    assert_eq!(incr(&manager).await.source, Source::Redis);
    let mut opened = manager.subscribe();

    // Redis closes the manager's pooled connection, then hangs.
    close_the_managers_connections(&redis).await;
    redis.pause().await;

    let stalls = Stalls::start();
    let timeouts = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_millis(800);
    let mut workers = Vec::new();
    for _ in 0..16 {
        let manager = manager.clone();
        let timeouts = Arc::clone(&timeouts);
        workers.push(tokio::spawn(async move {
            let mut waits = Vec::new();
            while Instant::now() < stop_at {
                let started = Instant::now();
                let served = incr(&manager).await;
                waits.push((started, Instant::now()));
                assert!(served.is_fallback(), "Redis is hung: {:?}", served.source);
                if served.source == Source::Fallback(FallbackReason::Timeout) {
                    timeouts.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
            waits
        }));
    }
    let mut waits = Vec::new();
    for worker in workers {
        waits.extend(worker.await.expect("worker"));
    }
    let (longest, stalled) = stalls.longest_net(&waits).await;
    // Checked while Redis still hangs: once it answers again, the half-open
    // probe can close the breaker before this test looks (a `docker unpause`
    // takes long enough for that).
    assert!(
        tokio::time::timeout(RECOVERY, opened.wait_for(|s| *s != BreakerState::Closed))
            .await
            .is_ok(),
        "breaker never opened"
    );
    redis.resume().await;

    assert!(
        longest <= COMMAND_TIMEOUT + MARGIN,
        "a caller waited {longest:?} (besides {stalled:?} the runtime was held up), over the command timeout of {COMMAND_TIMEOUT:?} + {MARGIN:?}"
    );
    // The hang was felt as timeouts, not only as the closed connection.
    assert!(
        timeouts.load(Ordering::Relaxed) > 0,
        "no operation timed out, so the timeout was not exercised"
    );
    wait_for_state(&manager, BreakerState::Closed).await;
    assert_eq!(incr(&manager).await.source, Source::Redis);
}

/// The client's own timeouts count as a wait for a hung Redis, as the
/// manager's command timeout does: here a new connection's, whose connect
/// timeout is shorter than the command timeout, after Redis closed the
/// pooled connection and hung. `is_hanging` is what tells the layers not
/// to ask Redis again for a request it has already failed.
#[tokio::test]
async fn a_new_connection_that_times_out_says_redis_hangs() {
    const CONNECT: Duration = Duration::from_millis(300);
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .command_timeout(Duration::from_secs(3))
        .connect_timeout(CONNECT)
        .failure_threshold(50)
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("manager starts");
    assert_eq!(incr(&manager).await.source, Source::Redis);
    close_the_managers_connections(&redis).await;
    redis.pause().await;
    // The first operation may find the closed connection (an error at
    // once, which is no hang); a later one connects anew, and waits.
    let deadline = Instant::now() + Duration::from_secs(10);
    let waited = loop {
        let started = Instant::now();
        let served = incr(&manager).await;
        let waited = started.elapsed();
        assert!(served.is_fallback(), "Redis is hung: {:?}", served.source);
        if waited >= CONNECT / 2 {
            break waited;
        }
        assert!(
            Instant::now() < deadline,
            "no operation waited for a new connection"
        );
    };
    let hanging = manager.is_hanging();
    redis.resume().await;
    assert!(
        waited < Duration::from_secs(2),
        "the connect timeout ended the wait, not the command timeout: {waited:?}"
    );
    assert!(hanging, "a connection that timed out says Redis hangs");
}

/// Callers that give up before the command timeout (a client that
/// disconnects, a `TimeoutLayer` shorter than it) never see an operation
/// end, so no operation would tell the breaker that Redis hangs. A caller
/// abandoning an operation sends one `PING` of the manager's own (at most
/// one a command timeout): while Redis hangs those time out, and the
/// breaker opens, so that the layers serve from memory.
#[tokio::test]
async fn a_hang_that_every_caller_gives_up_on_still_opens_the_breaker() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    assert_eq!(incr(&manager).await.source, Source::Redis);
    redis.pause().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    // Each caller waits a quarter of the command timeout, then goes away.
    while manager.health().state == BreakerState::Closed {
        assert!(
            Instant::now() < deadline,
            "callers that give up never opened the breaker: {:?}",
            manager.health()
        );
        let gave_up = tokio::time::timeout(COMMAND_TIMEOUT / 4, incr(&manager)).await;
        assert!(gave_up.is_err(), "Redis is hung: nothing answers");
    }
    // Three failures (the threshold), one canary each: about three
    // command timeouts (0.6 s); the 5 s deadline leaves room for a loaded
    // machine's stalls.
    redis.resume().await;
    wait_for_state(&manager, BreakerState::Closed).await;
}

/// The canary of [`a_hang_that_every_caller_gives_up_on_still_opens_the_breaker`]
/// costs a healthy Redis little: callers abandoning operations one after
/// another send at most one `PING` a command timeout, and open nothing.
#[tokio::test]
async fn callers_giving_up_send_at_most_one_ping_a_command_timeout() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    assert_eq!(incr(&manager).await.source, Source::Redis);
    let mut admin = redis.connection().await.expect("admin connection");
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .expect("CONFIG RESETSTAT");
    let started = Instant::now();
    let mut abandoned = 0u32;
    while started.elapsed() < 5 * COMMAND_TIMEOUT / 2 || abandoned < 40 {
        // Dropped after its first poll: the command is sent, its answer
        // never awaited.
        let answered = futures_util::FutureExt::now_or_never(incr(&manager));
        assert!(answered.is_none(), "no round trip answers at once");
        abandoned += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    // Let the last canary end.
    tokio::time::sleep(COMMAND_TIMEOUT).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin)
        .await
        .expect("INFO commandstats");
    let pings = stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_ping:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse::<u64>().expect("a count"));
    let most = elapsed.as_millis() / COMMAND_TIMEOUT.as_millis() + 1;
    assert!(abandoned >= 40, "{abandoned} operations abandoned");
    assert!(pings >= 1, "an abandoned operation sends a canary");
    assert!(
        u128::from(pings) <= most,
        "{pings} PINGs for {abandoned} abandoned operations in {elapsed:?} (at most {most})"
    );
    assert_eq!(manager.health().state, BreakerState::Closed);
    assert_eq!(incr(&manager).await.source, Source::Redis);
}

#[tokio::test]
async fn hung_redis_times_out_opens_and_closes_after_resume() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    assert_eq!(incr(&manager).await.source, Source::Redis);

    redis.pause().await;
    let stalls = Stalls::start();
    let mut reasons = Vec::new();
    let mut waits = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let served = incr(&manager).await;
        waits.push((started, Instant::now()));
        if let Source::Fallback(reason) = served.source {
            reasons.push(reason);
        }
    }
    let (longest, stalled) = stalls.longest_net(&waits).await;
    assert!(
        longest <= COMMAND_TIMEOUT + MARGIN,
        "waited {longest:?} (besides {stalled:?} the runtime was held up)"
    );
    assert_eq!(&reasons[..3], &[FallbackReason::Timeout; 3], "{reasons:?}");
    assert!(
        reasons[3..]
            .iter()
            .all(|r| *r == FallbackReason::BreakerOpen),
        "{reasons:?}"
    );
    assert_ne!(manager.health().state, BreakerState::Closed);

    redis.resume().await;
    wait_for_state(&manager, BreakerState::Closed).await;
    assert_eq!(incr(&manager).await.source, Source::Redis);
}

/// What the load of the restart test saw, as Redis went away and came back.
#[derive(Default)]
struct Seen {
    /// Answers from Redis before the kill.
    before: AtomicU64,
    /// Fallbacks after the kill.
    fallbacks: AtomicU64,
    /// Answers from Redis to calls begun after the restart.
    after: AtomicU64,
}

/// Waits until `count` reaches `at_least`; panics naming `what` after [`RECOVERY`].
async fn wait_until(count: &AtomicU64, at_least: u64, what: &str) {
    let waited = tokio::time::timeout(RECOVERY, async {
        while count.load(Ordering::Acquire) < at_least {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what}: {} within {RECOVERY:?}, wanted {at_least}",
        count.load(Ordering::Acquire)
    );
}

#[tokio::test]
async fn restart_under_load_replaces_pooled_connections_and_nothing_fails_after_recovery() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let seen = Arc::new(Seen::default());
    let restarted = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let manager = manager.clone();
        let seen = Arc::clone(&seen);
        let restarted = Arc::clone(&restarted);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                // Read before the call: an answer counts as "after" only
                // if the call began once Redis was back.
                let after_restart = restarted.load(Ordering::Acquire);
                let served = incr(&manager).await;
                let counter = match (served.source, after_restart) {
                    (Source::Fallback(_), _) => &seen.fallbacks,
                    (Source::Redis, false) => &seen.before,
                    (Source::Redis, true) => &seen.after,
                };
                counter.fetch_add(1, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // The load runs through the whole restart: before the kill, while
    // Redis is away, and after it is back, on the connections the pool
    // made anew.
    wait_until(&seen.before, 20, "answers from Redis before the kill").await;
    redis.kill().await;
    wait_until(&seen.fallbacks, 1, "fallbacks while Redis is away").await;
    redis.restart().await;
    restarted.store(true, Ordering::Release);
    wait_until(&seen.after, 20, "answers from Redis after the restart").await;
    stop.store(true, Ordering::Release);
    load.await.expect("load");

    wait_for_state(&manager, BreakerState::Closed).await;
    for _ in 0..200 {
        let served = incr(&manager).await;
        assert_eq!(
            served.source,
            Source::Redis,
            "health: {:?}",
            manager.health()
        );
    }
}

#[tokio::test]
async fn idle_restart_costs_at_most_one_fallback() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    for _ in 0..8 {
        assert_eq!(incr(&manager).await.source, Source::Redis);
    }
    // No traffic while Redis is away: every pooled connection is now dead
    // without the manager having noticed.
    redis.restart().await;

    let mut fallbacks = 0;
    for _ in 0..100 {
        if incr(&manager).await.is_fallback() {
            fallbacks += 1;
        }
    }
    assert!(
        fallbacks <= 1,
        "{fallbacks} operations fell back after the restart"
    );
    assert_eq!(manager.health().state, BreakerState::Closed);
}

#[tokio::test]
async fn a_disabled_manager_always_falls_back() {
    let manager = RedisManager::disabled();
    assert_eq!(manager.health().state, BreakerState::Disabled);
    let served = incr(&manager).await;
    assert_eq!(served.source, Source::Fallback(FallbackReason::BreakerOpen));
}
