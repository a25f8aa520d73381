//! Decisions without Redis, on tokio's paused clock: the manager is
//! [`RedisManager::disabled`] (its breaker never lets a call through), so
//! every request is decided by the configured fallback, and time moves
//! only when a test advances it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::advance;
use tower_redis_core::degrade::{NoChange, Replay, ReplayError};
use tower_redis_core::{Error, RedisManager};

use super::blocked::BlockedKeys;
use super::failover::Failover;
use super::*;

const MIB: u64 = 1 << 20;

fn without_redis(fallback: Fallback) -> Arc<Limiter> {
    Limiter::new(RedisManager::disabled(), fallback, MIB)
}

pub(super) fn check(key: &str, algorithm: Algorithm) -> Check {
    Check {
        key: std::sync::Arc::from(key),
        algorithm,
        lease: None,
    }
}

/// How many of `n` requests of cost 1 are allowed now.
async fn admitted(limiter: &Arc<Limiter>, checks: &[Check], n: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..n {
        if limiter.decide(checks, 1).await.allowed {
            allowed += 1;
        }
    }
    allowed
}

#[tokio::test(start_paused = true)]
async fn a_fixed_window_starts_over_when_the_next_window_begins() {
    let limiter = without_redis(Fallback::default());
    let checks = [check(
        "fw",
        Algorithm::FixedWindow {
            limit: 3,
            window: Duration::from_secs(1),
        },
    )];
    assert_eq!(admitted(&limiter, &checks, 3).await, 3);
    let denied = limiter.decide(&checks, 1).await;
    assert!(!denied.allowed);
    assert_eq!(denied.source, DecisionSource::Local);
    let retry = denied.states[0].and_then(|s| s.retry_after).expect("retry");
    assert!(retry > Duration::from_millis(1) && retry <= Duration::from_secs(1));

    advance(retry - Duration::from_millis(1)).await;
    assert_eq!(admitted(&limiter, &checks, 1).await, 0, "same window");
    advance(Duration::from_millis(1)).await;
    assert_eq!(admitted(&limiter, &checks, 5).await, 3, "the next window");
}

#[tokio::test(start_paused = true)]
async fn gcra_admits_the_burst_then_one_per_emission_interval() {
    let limiter = without_redis(Fallback::default());
    // One every 100 ms, three at once.
    let checks = [check(
        "gcra",
        Algorithm::Gcra {
            quota: 10,
            period: Duration::from_secs(1),
            burst: 3,
        },
    )];
    assert_eq!(admitted(&limiter, &checks, 10).await, 3);
    let denied = limiter.decide(&checks, 1).await;
    assert_eq!(
        denied.states[0].and_then(|s| s.retry_after),
        Some(Duration::from_millis(100))
    );

    advance(Duration::from_millis(99)).await;
    assert_eq!(admitted(&limiter, &checks, 1).await, 0);
    advance(Duration::from_millis(1)).await;
    assert_eq!(admitted(&limiter, &checks, 5).await, 1);
    // A full period later the whole burst is back, not more.
    advance(Duration::from_secs(1)).await;
    assert_eq!(admitted(&limiter, &checks, 10).await, 3);
}

#[tokio::test(start_paused = true)]
async fn while_degraded_an_instance_enforces_its_share_of_each_quota() {
    let limiter = without_redis(Fallback::Local { share: 0.25 });
    let checks = [
        check(
            "per-ip",
            Algorithm::Gcra {
                quota: 40,
                period: Duration::from_secs(60),
                burst: 40,
            },
        ),
        check(
            "sw",
            Algorithm::SlidingWindow {
                limit: 100,
                window: Duration::from_secs(60),
            },
        ),
    ];
    let first = limiter.decide(&checks, 1).await;
    assert_eq!(first.source, DecisionSource::Local);
    assert!(first.source.is_degraded());
    // 25 % of 40 is 10, of 100 is 25: the GCRA policy decides.
    assert_eq!(admitted(&limiter, &checks, 50).await, 9);
    let denied = limiter.decide(&checks, 1).await;
    assert_eq!(denied.states[0].map(|s| s.remaining), Some(0));
    // The sliding window counted only the ten allowed requests: 25 - 10,
    // less this request's unit, which it would have allowed.
    assert_eq!(denied.states[1].map(|s| s.remaining), Some(14));

    let closed = without_redis(Fallback::Deny).decide(&checks, 1).await;
    assert!(!closed.allowed);
    assert_eq!(closed.source, DecisionSource::FailClosed);
    let open = without_redis(Fallback::Allow).decide(&checks, 1).await;
    assert!(open.allowed);
    assert_eq!(open.source, DecisionSource::FailOpen);
}

#[tokio::test(start_paused = true)]
async fn a_blocked_key_is_answered_until_its_retry_after_then_forgotten() {
    let blocked = BlockedKeys::new(MIB);
    let checks = [check(
        "k",
        Algorithm::Gcra {
            quota: 1,
            period: Duration::from_secs(60),
            burst: 1,
        },
    )];
    let denied = [Some(PolicyState {
        remaining: 0,
        reset: Duration::from_secs(60),
        retry_after: Some(Duration::from_secs(2)),
    })];
    blocked.remember(&checks, 1, &denied);

    advance(Duration::from_millis(1_999)).await;
    let verdict = blocked.verdict(&checks, 1).expect("still blocked");
    assert_eq!(verdict.source, DecisionSource::BlockedCache);
    assert_eq!(
        verdict.states[0].and_then(|s| s.retry_after),
        Some(Duration::from_millis(1))
    );
    assert_eq!(
        verdict.states[0].map(|s| s.reset),
        Some(Duration::from_millis(58_001))
    );
    advance(Duration::from_millis(1)).await;
    assert!(blocked.verdict(&checks, 1).is_none(), "expired");
}

/// A Redis store that answers "allowed" while `up`, and is unavailable
/// otherwise.
struct Switch {
    up: Arc<AtomicBool>,
}

impl DecisionStore for Switch {
    type Error = Error;

    fn decide(
        &self,
        batch: &[Query<'_>],
    ) -> impl Future<Output = Result<Vec<Verdict>, Error>> + Send {
        let answer = if self.up.load(Ordering::Relaxed) {
            Ok(batch
                .iter()
                .map(|(checks, _)| Verdict {
                    allowed: true,
                    states: super::States::from_elem(None, checks.len()),
                    source: DecisionSource::Redis,
                })
                .collect())
        } else {
            Err(Error::BreakerOpen)
        };
        std::future::ready(answer)
    }
}

impl Replay for Switch {
    type Change = NoChange;

    async fn replay(&self, _: &RedisManager, _: &[NoChange]) -> Result<(), ReplayError> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_local_counts_outlive_redis_answering_again() {
    let up = Arc::new(AtomicBool::new(false));
    let redis = Switch {
        up: Arc::clone(&up),
    };
    let failover = Failover::new(RedisManager::disabled(), redis, Fallback::default(), MIB);
    let checks = [check(
        "k",
        Algorithm::FixedWindow {
            limit: 2,
            window: Duration::from_secs(3600),
        },
    )];
    let one: &[Query<'_>] = &[(&checks, 1)];
    let allowed = |verdicts: Vec<Verdict>| verdicts[0].allowed;

    // Outage: the memory store counts, and keeps counting.
    assert!(allowed(failover.decide(one).await));
    assert!(allowed(failover.decide(one).await));
    assert!(!allowed(failover.decide(one).await));
    assert!(!allowed(failover.decide(one).await));

    // Redis answers: the shared counters apply.
    up.store(true, Ordering::Relaxed);
    let verdicts = failover.decide(one).await;
    assert_eq!(verdicts[0].source, DecisionSource::Redis);

    // The next outage in the same window carries on from the local count:
    // a flapping Redis does not hand out a fresh local quota.
    up.store(false, Ordering::Relaxed);
    let verdicts = failover.decide(one).await;
    assert_eq!(verdicts[0].source, DecisionSource::Local);
    assert!(!verdicts[0].allowed);

    // The local count ages out with its window, as Redis' would.
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(allowed(failover.decide(one).await));
    assert!(allowed(failover.decide(one).await));
    assert!(!allowed(failover.decide(one).await));
}

/// Waits (on the real clock, with a deadline) for the breaker to be `state`.
async fn breaker_becomes(manager: &RedisManager, state: tower_redis_core::BreakerState) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while manager.health().state != state {
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker did not become {state:?}: {:?}",
            manager.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Redis comes back (the breaker's probe answers, the breaker closes) and
/// goes away again before any decision came from it: the local counts of
/// the first outage still hold. Only a decision Redis answered drops them.
#[tokio::test]
async fn the_local_counts_hold_until_a_decision_comes_from_redis() {
    use tower_redis_core::BreakerState;
    use tower_redis_core::testing::TestRedis;

    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let limiter = Limiter::new(manager.clone(), Fallback::default(), MIB);
    let checks = [check(
        "held",
        Algorithm::FixedWindow {
            limit: 2,
            window: Duration::from_secs(3600),
        },
    )];
    redis.kill().await;
    assert_eq!(admitted(&limiter, &checks, 3).await, 2);
    breaker_becomes(&manager, BreakerState::Open).await;

    redis.restart().await;
    breaker_becomes(&manager, BreakerState::Closed).await;
    // Time for anything the breaker's transition wakes to run.
    tokio::time::sleep(Duration::from_millis(200)).await;

    redis.kill().await;
    let verdict = limiter.decide(&checks, 1).await;
    assert_eq!(verdict.source, DecisionSource::Local);
    assert!(
        !verdict.allowed,
        "the local count was dropped without Redis deciding"
    );
}

/// The attack both in-process maps must survive: a million distinct keys,
/// one `fresh(n)` each (which asserts what a new key gets), while one
/// client that keeps coming must stay `held()` (still limited). The map
/// stays within `bound` (its `footprint`: entries, bytes counted, bytes
/// allocated), and a request costs the same after a million keys as after
/// the first hundred thousand (no sweep over every entry under the lock).
pub(super) fn a_million_keys_stay_bounded_and_o1(
    bound: u64,
    mut fresh: impl FnMut(u32),
    mut held: impl FnMut() -> bool,
    footprint: impl FnOnce() -> (u64, u64, u64),
) {
    const CHUNK: u32 = 100_000;
    let mut per_chunk: Vec<Duration> = Vec::new();
    for chunk in 0..10 {
        let started = std::time::Instant::now();
        for i in 0..CHUNK {
            let n = chunk * CHUNK + i;
            fresh(n);
            if i % 1000 == 0 {
                assert!(held(), "the abuser was forgotten after {n} keys");
                // A deadline: stop as soon as this chunk is clearly slower.
                if let Some(first) = per_chunk.first() {
                    assert!(
                        started.elapsed() < *first * 5,
                        "chunk {chunk} is over 5x slower than the first ({:?} so far, first {first:?})",
                        started.elapsed()
                    );
                }
            }
        }
        per_chunk.push(started.elapsed());
    }
    let (entries, bytes, allocated) = footprint();
    assert!(bytes <= bound, "{bytes} bytes in {entries} entries");
    assert!(
        allocated <= bound,
        "{allocated} bytes allocated for {entries} entries"
    );
    assert!(entries > 0 && entries < 100_000, "{entries} entries");
    let (first, last) = (per_chunk[0], per_chunk[9]);
    assert!(
        last < first * 5,
        "the last 100k keys took {last:?}, the first {first:?}"
    );
}

/// A limiter on a private Redis, kept up while the returned server lives.
pub(super) async fn on_redis() -> (tower_redis_core::testing::TestRedis, Arc<Limiter>) {
    let redis = tower_redis_core::testing::TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    (redis, Limiter::new(manager, Fallback::default(), MIB))
}

/// A Redis and a manager on it with this command timeout and breaker
/// threshold.
async fn redis_with(
    timeout: Duration,
    threshold: u32,
) -> (tower_redis_core::testing::TestRedis, RedisManager) {
    let redis = tower_redis_core::testing::TestRedis::start().await;
    let config = redis
        .config()
        .command_timeout(timeout)
        .failure_threshold(threshold);
    let manager = RedisManager::connect(config.build().expect("valid"))
        .await
        .expect("starts");
    (redis, manager)
}

/// A request with no other decision waiting takes the direct path (no
/// batch, no yield); requests that arrive together still share calls.
#[tokio::test]
async fn a_lone_request_is_decided_directly_and_concurrent_ones_in_batches() {
    let (_redis, limiter) = on_redis().await;
    let checks = [check(
        "lone",
        Algorithm::FixedWindow {
            limit: 1000,
            window: Duration::from_secs(3600),
        },
    )];
    for _ in 0..5 {
        let verdict = limiter.decide(&checks, 1).await;
        assert!(verdict.allowed);
        assert_eq!(verdict.source, DecisionSource::Redis);
    }
    assert_eq!(
        limiter.batches_led(),
        0,
        "sequential requests formed batches"
    );

    // 20 decisions at once: the first goes alone, the others find it
    // waiting and batch.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (limiter, checks) = (Arc::clone(&limiter), checks.clone());
        set.spawn(async move { limiter.decide(&checks, 1).await });
    }
    while let Some(verdict) = set.join_next().await {
        let verdict = verdict.expect("task");
        assert!(verdict.allowed && verdict.source == DecisionSource::Redis);
    }
    assert!(
        limiter.batches_led() >= 1,
        "concurrent requests were not batched"
    );
    // Exact: 25 counted.
    let verdict = limiter.decide(&checks, 1).await;
    assert_eq!(verdict.states[0].map(|s| s.remaining), Some(1000 - 26));
}

/// A batch is one Redis call, and its failure is one failure for the
/// breaker, however many requests it carried: 64 requests that arrive
/// together while Redis does not answer fall back, and count a few
/// failures (the lone request's call, the batches'), not 64. Counted per
/// request, one slow moment under load would open the breaker at once and
/// send every instance to its fallback.
#[tokio::test]
async fn a_failed_batch_counts_once_toward_the_breaker() {
    const REQUESTS: usize = 64;
    const THRESHOLD: u32 = 16;
    let (redis, manager) = redis_with(Duration::from_millis(150), THRESHOLD).await;
    let limiter = Limiter::new(manager.clone(), Fallback::default(), MIB);
    let checks = [check(
        "batched",
        Algorithm::FixedWindow {
            limit: 1000,
            window: Duration::from_secs(3600),
        },
    )];
    // Connected, and the script loaded: the calls below fail only because
    // Redis does not answer.
    assert_eq!(
        limiter.decide(&checks, 1).await.source,
        DecisionSource::Redis
    );
    redis.pause().await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..REQUESTS {
        let (limiter, checks) = (Arc::clone(&limiter), checks.clone());
        set.spawn(async move { limiter.decide(&checks, 1).await });
    }
    let verdicts = tokio::time::timeout(Duration::from_secs(10), async {
        let mut verdicts = Vec::new();
        while let Some(verdict) = set.join_next().await {
            verdicts.push(verdict.expect("task"));
        }
        verdicts
    })
    .await
    .expect("the decisions took over 10 s");
    redis.resume().await;
    assert!(
        verdicts.iter().all(|v| v.source != DecisionSource::Redis),
        "Redis decided while paused"
    );
    assert!(limiter.batches_led() >= 1, "no batch formed");
    let health = manager.health();
    assert!(
        health.consecutive_failures >= 1 && health.consecutive_failures < 8,
        "{REQUESTS} requests counted {} failures",
        health.consecutive_failures
    );
    assert_eq!(health.state, tower_redis_core::BreakerState::Closed);
}

/// A batch whose leader's request is cancelled while the batch's call is
/// in flight (Redis hangs) still answers its followers from that call once
/// Redis does: they are decided by Redis once, not a second time each in a
/// call of their own (which counted them twice: the script ran for the
/// batch already).
#[tokio::test]
async fn a_batch_whose_leader_is_cancelled_mid_call_answers_its_followers_once() {
    const FOLLOWERS: usize = 8;
    let (redis, manager) = redis_with(Duration::from_secs(5), 50).await;
    let limiter = Limiter::new(manager, Fallback::default(), MIB);
    let checks = [check(
        "cancelled",
        Algorithm::FixedWindow {
            limit: 1000,
            window: Duration::from_secs(3600),
        },
    )];
    // Connected, and the script loaded.
    assert_eq!(
        limiter.decide(&checks, 1).await.source,
        DecisionSource::Redis
    );
    redis.pause().await;
    let spawn = |limiter: &Arc<Limiter>| {
        let (limiter, checks) = (Arc::clone(limiter), checks.clone());
        tokio::spawn(async move { limiter.decide(&checks, 1).await })
    };
    // The first goes alone; the next leads a batch, which the others join
    // (this runtime runs the tasks in turn: each reaches Redis, or its
    // batch, before the next starts).
    let alone = spawn(&limiter);
    tokio::task::yield_now().await;
    let leader = spawn(&limiter);
    let followers: Vec<_> = (0..FOLLOWERS).map(|_| spawn(&limiter)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while limiter.batches_led() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no batch formed");
        tokio::task::yield_now().await;
    }
    // The batch's call is sent (Redis does not answer): its leader goes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.resume().await;
    let alone = alone.await.expect("task");
    assert_eq!(alone.source, DecisionSource::Redis);
    for follower in followers {
        let verdict = tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .expect("answered")
            .expect("task");
        assert!(verdict.allowed && verdict.source == DecisionSource::Redis);
    }
    // Counted once each: the warm-up, the lone one, the batch (its leader
    // and followers), and this one.
    assert_eq!(
        limiter.batches_led(),
        1,
        "one batch, led by the cancelled one"
    );
    let verdict = limiter.decide(&checks, 1).await;
    assert_eq!(
        verdict.states[0].map(|s| s.remaining),
        Some(1000 - 3 - FOLLOWERS as u64 - 1)
    );
}

/// The decision counters are indexed by `source as usize` through
/// `DecisionSource::ALL`, so each source must sit at its own index.
#[test]
fn every_source_is_at_its_own_index() {
    for (index, source) in DecisionSource::ALL.iter().enumerate() {
        assert_eq!(*source as usize, index, "{source:?}");
    }
}

/// A decision's Redis call, boxed apart from the request's future
/// (`decide_alone`), fits the allocator's per-thread cache (glibc's tcache
/// takes blocks of up to 1,032 bytes). It was 1,400 bytes in a release
/// build: the script's rare reload (`NOSCRIPT`) was inlined into every
/// call, and core's failover held its closures twice. The size is this
/// build's layout (a test build's, larger than a release build's).
#[test]
fn the_boxed_redis_decision_fits_the_allocators_thread_cache() {
    let limiter = without_redis(Fallback::default());
    let checks = [check(
        "k",
        Algorithm::FixedWindow {
            limit: 1,
            window: Duration::from_secs(1),
        },
    )];
    let requests = [(&checks[..], 1)];
    let batch = limiter.decide_batch(&requests);
    let size = std::mem::size_of_val(&batch);
    assert!(size <= 1032, "the boxed decision is {size} bytes");
}

/// A batch whose reply spans several of the script's packing slices (64
/// numbers each): 30 requests on two counters answer 210 numbers. Each
/// request gets its own verdict, as deciding them one after another would:
/// the fixed window admits 25 and counts each down, the GCRA counter (one
/// a minute, a burst of 100) counts every admitted request, and the denied
/// ones consume nothing from it.
#[tokio::test]
async fn a_batch_larger_than_a_packing_slice_is_answered_request_by_request() {
    let (_redis, limiter) = on_redis().await;
    let checks = [
        check(
            "window",
            Algorithm::FixedWindow {
                limit: 25,
                window: Duration::from_secs(3600),
            },
        ),
        check(
            "gcra",
            Algorithm::Gcra {
                quota: 1,
                period: Duration::from_secs(60),
                burst: 100,
            },
        ),
    ];
    let requests: Vec<Query<'_>> = (0..30).map(|_| (&checks[..], 1)).collect();
    let verdicts = limiter.decide_batch(&requests).await;
    assert_eq!(verdicts.len(), 30);
    for (i, verdict) in verdicts.iter().enumerate() {
        assert_eq!(verdict.source, DecisionSource::Redis, "request {i}");
        let window = verdict.states[0].expect("the window's state");
        let gcra = verdict.states[1].expect("the GCRA counter's state");
        let admitted_before = u64::try_from(i.min(25)).expect("small");
        if i < 25 {
            assert!(verdict.allowed, "request {i}");
            assert_eq!(window.remaining, 24 - admitted_before, "request {i}");
            assert_eq!(window.retry_after, None, "request {i}");
            assert_eq!(gcra.remaining, 99 - admitted_before, "request {i}");
        } else {
            assert!(!verdict.allowed, "request {i}");
            assert_eq!(window.remaining, 0, "request {i}");
            assert!(window.retry_after.is_some(), "request {i}");
            // Not counted by the policy that would have allowed it.
            assert_eq!(gcra.remaining, 99 - admitted_before, "request {i}");
            assert_eq!(gcra.retry_after, None, "request {i}");
        }
        // Windows are aligned to the clock: the rest of the current hour.
        assert!(
            window.reset > Duration::ZERO && window.reset <= Duration::from_secs(3600),
            "request {i}: {:?}",
            window.reset
        );
        assert_eq!(window.reset, verdicts[0].states[0].expect("a state").reset);
    }
}

/// A request with more counters than the script's lone-request path takes
/// (64), and a batch with more than one `MGET`'s worth (512): both decided
/// on Redis, each counter read and counted once.
#[tokio::test]
async fn many_counters_in_one_call_are_read_in_parts() {
    let (redis, limiter) = on_redis().await;
    let mut conn = redis.connection().await.expect("connection");
    // Not across the end of an hour, where the windows start over.
    let (secs, _): (u64, u64) = tower_redis_core::redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .expect("TIME");
    if 3600 - secs % 3600 < 10 {
        tokio::time::sleep(Duration::from_secs(3600 - secs % 3600 + 1)).await;
    }
    let window = |i: usize| {
        check(
            &format!("many-{i}"),
            Algorithm::FixedWindow {
                limit: 2,
                window: Duration::from_secs(3600),
            },
        )
    };
    // One request on 70 counters, twice: the second finds each counted once.
    let wide: Vec<Check> = (0..70).map(window).collect();
    for remaining in [1, 0] {
        let verdict = limiter.decide(&wide, 1).await;
        assert_eq!(verdict.source, DecisionSource::Redis);
        assert!(verdict.allowed);
        assert_eq!(verdict.states.len(), 70);
        for (i, state) in verdict.states.iter().enumerate() {
            assert_eq!(state.map(|s| s.remaining), Some(remaining), "counter {i}");
        }
    }
    // 600 requests on a counter each, in one batch, twice.
    let singles: Vec<[Check; 1]> = (100..700).map(|i| [window(i)]).collect();
    let requests: Vec<Query<'_>> = singles.iter().map(|c| (&c[..], 1)).collect();
    for remaining in [1, 0] {
        let verdicts = limiter.decide_batch(&requests).await;
        assert_eq!(verdicts.len(), 600);
        for (i, verdict) in verdicts.iter().enumerate() {
            assert_eq!(verdict.source, DecisionSource::Redis, "request {i}");
            assert!(verdict.allowed, "request {i}");
            assert_eq!(
                verdict.states[0].map(|s| s.remaining),
                Some(remaining),
                "request {i}"
            );
        }
    }
    // The third request on the 70 is over every limit of 2.
    let verdict = limiter.decide(&wide, 1).await;
    assert!(!verdict.allowed);
    // The second write of a window (in a batch, and alone) kept the TTL the
    // first gave it.
    for key in ["many-0", "many-100", "many-699"] {
        let ttl: i64 = tower_redis_core::redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!(ttl > 0 && ttl <= 7_200_001, "{key}: {ttl}");
    }
}

/// How many are allowed of ten decisions on `checks` made at once behind
/// another decision (of cost 0, on another counter of the first check's
/// policy, which goes alone: on this current-thread runtime the first to
/// run), so that the ten take the batch's path. Each decided by Redis.
async fn ten_behind_another(limiter: &Arc<Limiter>, checks: &[Check]) -> usize {
    let mut decisions = tokio::task::JoinSet::new();
    let alone = [check("another", checks[0].algorithm)];
    let first = Arc::clone(limiter);
    decisions.spawn(async move { first.decide(&alone, 0).await });
    for _ in 0..10 {
        let (limiter, checks) = (Arc::clone(limiter), checks.to_vec());
        decisions.spawn(async move { limiter.decide(&checks, 1).await });
    }
    let mut allowed = 0;
    while let Some(verdict) = decisions.join_next().await {
        let verdict = verdict.expect("task");
        assert_eq!(verdict.source, DecisionSource::Redis);
        allowed += usize::from(verdict.allowed);
    }
    allowed
}

/// A counter Redis holds in a shape no decision writes is an empty counter,
/// as any other foreign value: a window's count that is NaN used to allow
/// every request for good (no comparison admits NaN, and the count stayed
/// NaN), a negative one allowed that many more, a GCRA time of "nan"
/// made every call on its key fail, and one of "inf" (or any time further
/// ahead than the policy's burst tolerance plus 10^14 µs, which no decision
/// writes) denied every request for good, since a denial writes nothing. Each of the script's paths: a lone request on
/// one GCRA counter, a lone request on several counters, a batch, and a
/// lease.
#[tokio::test]
async fn a_counter_holding_nan_infinity_or_negative_counts_is_an_empty_counter() {
    let (redis, limiter) = on_redis().await;
    let mut conn = redis.connection().await.expect("connection");
    let window = Duration::from_secs(3600);
    let (seconds, _): (u64, u64) = tower_redis_core::redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .expect("TIME");
    #[allow(clippy::cast_precision_loss)]
    let this_window = (seconds / 3600) as f64;
    let corrupt = |count: f64| -> Vec<u8> {
        [this_window, count, 0.0]
            .iter()
            .flat_map(|n| n.to_le_bytes())
            .collect()
    };
    let mut set = async |key: &str, value: Vec<u8>| {
        tower_redis_core::redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut conn)
            .await
            .expect("SET");
    };
    for (n, count) in [f64::NAN, -1e9, f64::NEG_INFINITY, f64::INFINITY, 1e300]
        .into_iter()
        .enumerate()
    {
        for algorithm in [
            Algorithm::FixedWindow { limit: 3, window },
            Algorithm::SlidingWindow { limit: 3, window },
        ] {
            // One after another: the lone request's path.
            let key = format!("lone-{n}-{algorithm:?}");
            set(&key, corrupt(count)).await;
            let checks = [check(&key, algorithm)];
            assert_eq!(
                admitted(&limiter, &checks, 5).await,
                3,
                "{count} in {algorithm:?}"
            );
            // Ten at once behind another decision (which goes alone, on
            // this current-thread runtime the first to run): the batch's
            // path.
            let key = format!("batch-{n}-{algorithm:?}");
            set(&key, corrupt(count)).await;
            let checks = [check(&key, algorithm)];
            // The other decision (cost 0) is always allowed.
            assert_eq!(
                ten_behind_another(&limiter, &checks).await,
                1 + 3,
                "{count} in {algorithm:?}, batched"
            );
        }
    }
    // A lease's script reads a window counter the same way.
    let store = super::redis::RedisStore::new(limiter.manager.clone());
    for (n, count) in [f64::NAN, -1e9, f64::INFINITY].into_iter().enumerate() {
        let key = format!("leased-{n}");
        set(&key, corrupt(count)).await;
        let lease = store
            .lease(&key, Algorithm::FixedWindow { limit: 3, window }, 10, 1)
            .await
            .expect("a lease");
        assert_eq!(lease.granted, 3, "{count}");
    }
    let gcra = Algorithm::Gcra {
        quota: 2,
        period: window,
        burst: 2,
    };
    for (n, time) in ["nan", "inf", "1e300"].into_iter().enumerate() {
        // The one-GCRA-counter path.
        let key = format!("gcra-{n}");
        set(&key, time.as_bytes().to_vec()).await;
        let checks = [check(&key, gcra)];
        let first = limiter.decide(&checks, 1).await;
        assert_eq!(
            (first.allowed, first.source),
            (true, DecisionSource::Redis),
            "{time}"
        );
        assert_eq!(admitted(&limiter, &checks, 3).await, 1, "{time}");
        // A lone request on two counters.
        let key = format!("gcra-pair-{n}");
        set(&key, time.as_bytes().to_vec()).await;
        let checks = [check(&key, gcra), check(&format!("gcra-other-{n}"), gcra)];
        assert_eq!(
            admitted(&limiter, &checks, 3).await,
            2,
            "{time}, two counters"
        );
        // And what it wrote is a time a decision writes: within the hour
        // (two requests of a 2-an-hour policy) from now.
        let written: String = tower_redis_core::redis::cmd("GET")
            .arg(&key)
            .query_async(&mut redis.connection().await.expect("connection"))
            .await
            .expect("GET");
        let written: u64 = written.parse().expect("a time in µs");
        let micros = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_micros(),
        )
        .expect("µs");
        assert!(
            written >= micros - 60_000_000 && written <= micros + 3_660_000_000,
            "{time}, two counters: wrote {written} (now {micros})"
        );
        // Ten at once behind another decision: the batch's path.
        let key = format!("gcra-batch-{n}");
        set(&key, time.as_bytes().to_vec()).await;
        let checks = [check(&key, gcra)];
        assert_eq!(
            ten_behind_another(&limiter, &checks).await,
            1 + 2,
            "{time}, batched"
        );
        // A lease.
        let key = format!("gcra-leased-{n}");
        set(&key, time.as_bytes().to_vec()).await;
        let lease = store.lease(&key, gcra, 10, 1).await.expect("a lease");
        assert_eq!(lease.granted, 2, "{time}, leased");
    }
}

/// A batch answers each request what deciding it alone would: the script
/// decides and writes, and the numbers of each request (remaining, reset,
/// retry) are worked out from its reply with the same arithmetic. Random
/// batches (five policies of the three algorithms, one with an emission
/// interval that is not a whole number of µs, a sliding window whose
/// counters hold counts in the previous window; one to five policies a
/// request, costs 0 to 3, runs of identical requests; and one full batch
/// of distinct clients, more counters than one `MGET` reads) are decided
/// as one batch on one set of counters, and request by request (each a
/// lone call, whose numbers the script computes) on another: the same
/// verdicts and remaining counts, and the same times but for the time that
/// passed between the calls.
#[tokio::test]
async fn a_batch_answers_each_request_what_deciding_it_alone_would() {
    let (redis, limiter) = on_redis().await;
    let hour = Duration::from_secs(3600);
    let ten_days = 240 * hour;
    // Not within a minute of the end of an hour: the windows' counts must
    // not start over between the two runs.
    let ms = redis.time_ms().await.expect("TIME");
    let into_hour = ms % 3_600_000;
    if into_hour > 3_540_000 {
        tokio::time::sleep(Duration::from_millis(3_600_000 - into_hour + 100)).await;
    }
    let algorithms = [
        Algorithm::Gcra {
            quota: 5,
            period: hour,
            burst: 5,
        },
        Algorithm::FixedWindow {
            limit: 7,
            window: hour,
        },
        Algorithm::SlidingWindow {
            limit: 6,
            window: hour,
        },
        // An emission interval that is not a whole number of µs.
        Algorithm::Gcra {
            quota: 7,
            period: hour,
            burst: 3,
        },
        // Its counters get counts in the previous window (below); ten days,
        // so that their weight moves by nothing the counts show between
        // the two runs.
        Algorithm::SlidingWindow {
            limit: 9,
            window: ten_days,
        },
    ];
    let mut conn = redis.connection().await.expect("connection");
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut random = move |below: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        usize::try_from(seed % below as u64).expect("small")
    };
    // Six rounds of 40 requests on two clients; then one of 250 requests
    // (a full batch) on 1,000 clients, whose batch reads more counters
    // than one MGET does.
    for round in 0..7 {
        let wide = round == 6;
        let (size, clients) = if wide { (250, 1000) } else { (40, 2) };
        // Each request: some policies (each on one of the clients), a cost.
        let mut requests: Vec<(Vec<(usize, usize)>, u32)> = Vec::new();
        for _ in 0..size {
            if let Some(last) = requests.last().filter(|_| !wide && random(2) == 0) {
                requests.push(last.clone());
                continue;
            }
            let mut policies: Vec<(usize, usize)> = Vec::new();
            for policy in 0..algorithms.len() {
                if random(2) == 0 {
                    policies.push((policy, random(clients)));
                }
            }
            if policies.is_empty() {
                policies.push((random(algorithms.len()), random(clients)));
            }
            requests.push((policies, u32::try_from(random(4)).expect("small")));
        }
        let checks_of = |set: &str, policies: &[(usize, usize)]| -> Vec<Check> {
            policies
                .iter()
                .map(|&(policy, client)| {
                    check(
                        &format!("{set}-{round}-{policy}-{client}"),
                        algorithms[policy],
                    )
                })
                .collect()
        };
        if wide {
            let counters: std::collections::HashSet<&(usize, usize)> =
                requests.iter().flat_map(|(p, _)| p).collect();
            assert!(counters.len() > 512, "{} counters", counters.len());
        }
        // The ten-day window's counters: each client's count in the
        // previous window, the same on both sets; stored as the current
        // window's counter (no count yet) or as the previous window's own
        // (which the scripts shift: its count becomes the previous one, and
        // the one before it is dropped).
        let window_us = u64::try_from(ten_days.as_micros()).expect("small");
        let current = redis.time_ms().await.expect("TIME") * 1000 / window_us;
        for client in 0..clients {
            let previous = random(13) as f64;
            let stored = if random(2) == 0 {
                [current as f64, 0.0, previous]
            } else {
                [current as f64 - 1.0, previous, random(13) as f64]
            };
            let mut counter = Vec::new();
            for number in stored {
                counter.extend_from_slice(&number.to_le_bytes());
            }
            for set in ["batch", "alone"] {
                tower_redis_core::redis::cmd("SET")
                    .arg(format!("{set}-{round}-4-{client}"))
                    .arg(&counter)
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("SET");
            }
        }
        let batched: Vec<Vec<Check>> = requests
            .iter()
            .map(|(p, _)| checks_of("batch", p))
            .collect();
        let queries: Vec<Query<'_>> = batched
            .iter()
            .zip(&requests)
            .map(|(checks, (_, cost))| (checks.as_slice(), *cost))
            .collect();
        let started = std::time::Instant::now();
        let together = limiter.decide_batch(&queries).await;
        let mut alone = Vec::new();
        for (policies, cost) in &requests {
            let checks = checks_of("alone", policies);
            alone.push(limiter.decide_batch(&[(&checks, *cost)]).await.remove(0));
        }
        let apart = started.elapsed() + Duration::from_millis(2);
        assert_eq!(together.len(), requests.len());
        for (i, (batch, lone)) in together.iter().zip(&alone).enumerate() {
            let what = format!("round {round}, request {i} {:?}", requests[i]);
            assert_eq!(batch.source, DecisionSource::Redis, "{what}");
            assert_eq!(lone.source, DecisionSource::Redis, "{what}");
            assert_eq!(batch.allowed, lone.allowed, "{what}");
            for (b, l) in batch.states.iter().zip(&lone.states) {
                let (b, l) = (b.expect("a state"), l.expect("a state"));
                assert_eq!(b.remaining, l.remaining, "{what}");
                assert_eq!(b.retry_after.is_some(), l.retry_after.is_some(), "{what}");
                let close = |x: Duration, y: Duration| x.abs_diff(y) <= apart;
                assert!(close(b.reset, l.reset), "{what}: reset {b:?} / {l:?}");
                if let (Some(x), Some(y)) = (b.retry_after, l.retry_after) {
                    assert!(close(x, y), "{what}: retry {b:?} / {l:?}");
                }
            }
        }
    }
}

/// A burst that arrives in one batch gets the whole burst, whatever the
/// quota: the requests of a batch share one `now`, so the last of a burst
/// lands exactly on GCRA's boundary (its allowed time is `now`). Kept as
/// absolute times (about 1.8e15 µs, where a double's step is 0.25 µs), the
/// boundary came out a fraction of a µs late for about a third of the
/// quotas below, and that request was denied. Each policy, on a fresh
/// counter: its burst plus one identical requests, as one batch (the
/// burst allowed, the one after it denied, and each allowed one told the
/// units left), in units of cost 1 and 2.
#[tokio::test]
async fn a_burst_arriving_in_one_batch_is_allowed_whole() {
    let (_redis, limiter) = on_redis().await;
    let mut wrong = Vec::new();
    let mut n = 0;
    for (algorithm, burst) in gcra_grid() {
        for cost in [1_u32, 2] {
            n += 1;
            let checks = [check(&format!("burst-{n}"), algorithm)];
            let fits = burst / cost;
            let queries: Vec<Query<'_>> = (0..=fits).map(|_| (&checks[..], cost)).collect();
            let verdicts = limiter.decide_batch(&queries).await;
            let allowed = verdicts.iter().filter(|v| v.allowed).count();
            assert!(
                verdicts.iter().all(|v| v.source == DecisionSource::Redis),
                "{algorithm:?}, cost {cost}: not decided by Redis"
            );
            if allowed != fits as usize {
                wrong.push(format!("{algorithm:?}, cost {cost}: {allowed} of {fits}"));
            }
            // Each allowed request says how many units are left: what the
            // rest of the batch is then allowed.
            for (i, verdict) in verdicts.iter().enumerate().take(fits as usize) {
                let left = verdict.states[0].expect("a state").remaining;
                let expected = u64::from(burst - cost * (i as u32 + 1));
                if left != expected {
                    wrong.push(format!(
                        "{algorithm:?}, cost {cost}, request {i}: {left} left, not {expected}"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{} of {n}: {wrong:#?}", wrong.len());
}

/// A lone request on a fresh counter is told the units a batch would
/// leave it, and one whose cost is the whole burst is allowed: the lone
/// paths of `decide.lua` make the batch's test, relative to `now` in whole
/// units. From absolute times (`tat + cost * a`, about 1.8e15 µs) the
/// units left came out one short for a share of the quotas below. Each
/// policy alone (the one-counter path) and beside a window policy (the
/// lone path of several counters), with costs 1, 2 and the burst.
#[tokio::test]
async fn a_lone_request_is_told_the_units_a_batch_would_leave() {
    let (_redis, limiter) = on_redis().await;
    let window = Algorithm::FixedWindow {
        limit: 100,
        window: Duration::from_secs(3600),
    };
    let mut wrong = Vec::new();
    let mut n = 0;
    for (algorithm, burst) in gcra_grid() {
        for cost in [1, 2, burst] {
            for beside in [false, true] {
                n += 1;
                let mut checks = vec![check(&format!("lone-{n}"), algorithm)];
                if beside {
                    checks.push(check(&format!("lone-{n}-w"), window));
                }
                let verdict = limiter.decide(&checks, cost).await;
                assert_eq!(verdict.source, DecisionSource::Redis, "{algorithm:?}");
                let left = verdict.states[0].expect("a state").remaining;
                if !verdict.allowed || left != u64::from(burst - cost) {
                    wrong.push(format!(
                        "{algorithm:?}, cost {cost}, beside a window: {beside}: allowed {}, \
                         {left} left, not {}",
                        verdict.allowed,
                        burst - cost
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{} of {n}: {wrong:#?}", wrong.len());
}

/// The in-process store tells a fresh counter's first request the units
/// left as Redis does (the same GCRA arithmetic, `gcra_units`).
#[tokio::test(start_paused = true)]
async fn the_in_process_store_tells_a_lone_request_the_units_a_batch_would_leave() {
    let limiter = without_redis(Fallback::default());
    let mut wrong = Vec::new();
    let mut n = 0;
    for (algorithm, burst) in gcra_grid() {
        for cost in [1, 2, burst] {
            n += 1;
            let checks = [check(&format!("lone-{n}"), algorithm)];
            let verdict = limiter.decide(&checks, cost).await;
            assert_eq!(verdict.source, DecisionSource::Local, "{algorithm:?}");
            let left = verdict.states[0].expect("a state").remaining;
            if !verdict.allowed || left != u64::from(burst - cost) {
                wrong.push(format!(
                    "{algorithm:?}, cost {cost}: allowed {}, {left} left",
                    verdict.allowed
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{} of {n}: {wrong:#?}", wrong.len());
}

/// GCRA policies of many quotas (per second, minute and hour) and bursts,
/// with each one's burst: intervals of every kind of fraction.
fn gcra_grid() -> impl Iterator<Item = (Algorithm, u32)> {
    let quotas = [
        3, 6, 7, 9, 11, 12, 13, 17, 23, 29, 31, 37, 41, 97, 1000, 3600, 7777,
    ];
    quotas.into_iter().flat_map(|quota| {
        [1, 60, 3600].into_iter().flat_map(move |period| {
            [2, 3, 5, 10, 17].into_iter().map(move |burst| {
                let algorithm = Algorithm::Gcra {
                    quota,
                    period: Duration::from_secs(period),
                    burst,
                };
                (algorithm, burst)
            })
        })
    })
}

/// A lease taken from a fresh GCRA counter holds the whole burst, whatever
/// the quota: `lease.lua` counts what fits from `(now - tat) + b`, which is
/// the burst exactly on a fresh counter, and sets the quotient right by
/// the batch's test; summed as absolute times (`now + b - tat`, about
/// 1.8e15 µs, where a double's step is 0.25 µs) it could come out a hair
/// under it, and the lease one unit short.
#[tokio::test]
async fn a_lease_from_a_fresh_counter_holds_the_whole_burst() {
    let (_redis, limiter) = on_redis().await;
    let store = super::redis::RedisStore::new(limiter.manager.clone());
    let mut wrong = Vec::new();
    let mut n = 0;
    for (algorithm, burst) in gcra_grid() {
        n += 1;
        let key = format!("fresh-lease-{n}");
        let lease = store
            .lease(&key, algorithm, u64::from(burst) + 5, 1)
            .await
            .expect("a lease");
        if lease.granted != u64::from(burst) {
            wrong.push(format!("{algorithm:?}: {} of {burst}", lease.granted));
        }
        // A lease of all but one unit leaves that unit, as a batch would
        // tell (from absolute times it came out one short).
        let lease = store
            .lease(&format!("{key}-less"), algorithm, u64::from(burst) - 1, 1)
            .await
            .expect("a lease");
        if (lease.granted, lease.state.remaining) != (u64::from(burst) - 1, 1) {
            wrong.push(format!(
                "{algorithm:?}: {} of {} leased, {} left",
                lease.granted,
                burst - 1,
                lease.state.remaining
            ));
        }
    }
    assert!(wrong.is_empty(), "{} of {n}: {wrong:#?}", wrong.len());
}
