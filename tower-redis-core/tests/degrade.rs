//! The degradation mechanism every layer uses (`tower_redis_core::degrade`):
//! outage queue replayed in order on recovery, retries that keep order,
//! pending keys while they are written, one recovery per outage, and a
//! recovery task that ends with its failover.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower_redis_core::degrade::{Deferred, Failover, Recovered, Replay, ReplayError};
use tower_redis_core::redis;
use tower_redis_core::testing::{TestRedis, wait_for_breaker};
use tower_redis_core::{BreakerState, Error, RedisManager};

/// How long any recovery may take before a test gives up.
const DEADLINE: Duration = Duration::from_secs(20);

/// `SET key value`, or `DEL key` when `value` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    key: String,
    value: Option<String>,
}

impl Deferred for Change {
    fn key(&self) -> &str {
        &self.key
    }
    fn weight(&self) -> usize {
        64 + self.key.len() + self.value.as_ref().map_or(0, String::len)
    }
    fn is_delete(&self) -> bool {
        self.value.is_none()
    }
}

fn set(key: &str, value: &str) -> Change {
    Change {
        key: key.to_owned(),
        value: Some(value.to_owned()),
    }
}

/// The Redis side: writes changes one by one and logs them; can be made to
/// fail, and to wait at a gate before each write.
#[derive(Default)]
struct Store {
    written: Mutex<Vec<Change>>,
    /// The attempts (1-based) that fail before reaching Redis.
    fail: Vec<usize>,
    attempts: AtomicUsize,
    gate: Option<Arc<Semaphore>>,
    /// A key every write of which fails (Redis keeps refusing it).
    refused_key: Option<String>,
    /// The attempt (1-based) that panics.
    panic_at: Option<usize>,
}

impl Replay for Store {
    type Change = Change;

    async fn replay(&self, manager: &RedisManager, changes: &[Change]) -> Result<(), ReplayError> {
        for (i, change) in changes.iter().enumerate() {
            let attempt = self.attempts.fetch_add(1, Ordering::AcqRel) + 1;
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("open").forget();
            }
            assert_ne!(self.panic_at, Some(attempt), "a replay that panics");
            if self.fail.contains(&attempt) || self.refused_key.as_ref() == Some(&change.key) {
                return Err(ReplayError {
                    written: i,
                    error: Error::Timeout(Duration::ZERO),
                });
            }
            let key = manager.keys().key(&[&change.key]);
            let result = match &change.value {
                Some(value) => {
                    manager
                        .query::<()>(redis::cmd("SET").arg(&key).arg(value))
                        .await
                }
                None => manager.query::<()>(redis::cmd("DEL").arg(&key)).await,
            };
            if let Err(error) = result {
                return Err(ReplayError { written: i, error });
            }
            self.written
                .lock()
                .expect("not poisoned")
                .push(change.clone());
        }
        Ok(())
    }
}

/// The memory side: counts recoveries and returns of Redis; can be made to
/// panic at its first recovery.
#[derive(Default)]
struct Memory {
    recoveries: AtomicUsize,
    answers: AtomicUsize,
    panic_once: std::sync::atomic::AtomicBool,
}

impl Recovered for Memory {
    fn answered(&self) {
        self.answers.fetch_add(1, Ordering::AcqRel);
    }
    fn recovered(&self) {
        assert!(
            !self.panic_once.swap(false, Ordering::AcqRel),
            "a memory side that panics"
        );
        self.recoveries.fetch_add(1, Ordering::AcqRel);
    }
}

async fn manager_for(redis: &TestRedis) -> RedisManager {
    let config = redis
        .config()
        .command_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .probe_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .failure_threshold(1)
        .build()
        .expect("valid config");
    RedisManager::connect(config).await.expect("manager starts")
}

fn failover(manager: RedisManager, store: Store) -> Failover<Store, Memory> {
    Failover::builder(manager, store, Memory::default())
        .queue_bytes(1 << 20)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .batch(2)
        .build()
}

/// One GET through the failover: Redis, or `None` from memory.
async fn get(failover: &Failover<Store, Memory>, key: &str) -> Option<String> {
    let key = failover.manager().keys().key(&[key]);
    failover
        .run(
            |_store| {
                let manager = failover.manager().clone();
                async move {
                    manager
                        .query::<Option<String>>(redis::cmd("GET").arg(&key))
                        .await
                }
            },
            |_memory, _reason| async { None },
        )
        .await
        .value
}

async fn wait_for_recovery(failover: &Failover<Store, Memory>, epoch: u64) {
    let mut recovered = failover.recovered();
    tokio::time::timeout(DEADLINE, recovered.wait_for(|e| *e > epoch))
        .await
        .expect("recovered in time")
        .expect("failover alive");
}

#[tokio::test]
async fn changes_made_during_an_outage_are_replayed_in_order_once_redis_is_back() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let failover = failover(manager, Store::default());
    redis.stop().await;
    assert_eq!(get(&failover, "a").await, None);
    assert!(failover.is_degraded());
    for change in [
        set("a", "1"),
        set("b", "1"),
        set("a", "2"),
        set("c", "1"),
        set("b", "2"),
    ] {
        failover.defer(change).expect("fits");
    }
    assert!(failover.is_pending("a") && !failover.is_pending("z"));
    redis.restart().await;
    wait_for_recovery(&failover, 0).await;
    assert!(!failover.is_degraded());
    assert!(!failover.is_pending("a"));
    let written = failover
        .redis()
        .written
        .lock()
        .expect("not poisoned")
        .clone();
    assert_eq!(
        written,
        [
            set("a", "1"),
            set("b", "1"),
            set("a", "2"),
            set("c", "1"),
            set("b", "2")
        ]
    );
    assert_eq!(get(&failover, "a").await.as_deref(), Some("2"));
    assert_eq!(get(&failover, "b").await.as_deref(), Some("2"));
    assert_eq!(failover.queue_usage().changes, 0);
}

#[tokio::test]
async fn a_failed_replay_keeps_the_order_and_is_retried() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    // The second write fails (the first of its batch is written), then the
    // first of the retry: what was not written is tried again, in order,
    // ahead of the rest.
    let store = Store {
        fail: vec![2, 3],
        ..Store::default()
    };
    let failover = failover(manager, store);
    let changes: Vec<Change> = (0..7)
        .map(|i| set(&format!("k{i}"), &i.to_string()))
        .collect();
    failover.defer_all(changes.clone()).expect("fits");
    wait_for_recovery(&failover, 0).await;
    // k1 and k2 failed: each holds back only its own key; the other keys
    // are written in the same pass, and the two on the retry.
    let order = [0, 3, 4, 5, 6, 1, 2].map(|i| changes[i].clone());
    assert_eq!(
        *failover.redis().written.lock().expect("not poisoned"),
        order
    );
    assert!(failover.redis().attempts.load(Ordering::Acquire) >= changes.len() + 2);
    assert_eq!(failover.memory().recoveries.load(Ordering::Acquire), 1);
}

#[tokio::test]
async fn a_key_stays_pending_while_its_change_is_being_written() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let gate = Arc::new(Semaphore::new(0));
    let store = Store {
        gate: Some(Arc::clone(&gate)),
        ..Store::default()
    };
    let failover = failover(manager, store);
    failover.defer(set("a", "1")).expect("fits");
    // The recovery task takes the change and waits at the gate.
    tokio::time::timeout(DEADLINE, async {
        while failover.redis().attempts.load(Ordering::Acquire) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the write starts");
    assert!(
        failover.is_pending("a"),
        "taken but not written: still pending"
    );
    assert_eq!(failover.queue_usage().changes, 1);
    // A change pushed meanwhile is written after it.
    failover.defer(set("a", "2")).expect("fits");
    gate.add_permits(2);
    wait_for_recovery(&failover, 0).await;
    assert!(!failover.is_pending("a"));
    assert_eq!(
        *failover.redis().written.lock().expect("not poisoned"),
        [set("a", "1"), set("a", "2")]
    );
    assert_eq!(get(&failover, "a").await.as_deref(), Some("2"));
}

#[tokio::test]
async fn recovery_ends_each_outage_once() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let failover = failover(manager, Store::default());
    for outage in 1..=2_u64 {
        redis.stop().await;
        // Several fallbacks and deferred changes in one outage.
        for _ in 0..3 {
            assert_eq!(get(&failover, "x").await, None);
        }
        failover.defer(set("x", &outage.to_string())).expect("fits");
        assert!(failover.is_degraded());
        redis.restart().await;
        wait_for_recovery(&failover, outage - 1).await;
        assert!(!failover.is_degraded());
        // Redis answers again: no second recovery for the same outage.
        for _ in 0..3 {
            assert_eq!(get(&failover, "x").await, Some(outage.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let recoveries = failover.memory().recoveries.load(Ordering::Acquire);
        assert_eq!(recoveries, usize::try_from(outage).expect("small"));
        assert_eq!(*failover.recovered().borrow(), outage);
    }
}

#[tokio::test]
async fn an_outage_without_changes_ends_on_the_next_redis_answer() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let failover = failover(manager, Store::default());
    redis.stop().await;
    assert_eq!(get(&failover, "x").await, None);
    assert!(failover.is_degraded());
    redis.restart().await;
    tokio::time::timeout(DEADLINE, async {
        while get(&failover, "x").await.is_none() && failover.is_degraded() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("Redis answers again");
    wait_for_recovery(&failover, 0).await;
    assert_eq!(failover.memory().recoveries.load(Ordering::Acquire), 1);
}

/// The recovery task holds the failover weakly: dropping the failover ends
/// it, even while it waits for a Redis that never comes.
#[tokio::test(start_paused = true)]
async fn the_recovery_task_ends_when_the_failover_is_dropped() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let failover = Failover::new(
        RedisManager::disabled(),
        Store::default(),
        Memory::default(),
        1024,
    );
    assert_eq!(metrics.num_alive_tasks(), 0);
    failover.defer(set("a", "1")).expect("fits");
    assert!(get(&failover, "a").await.is_none());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        metrics.num_alive_tasks(),
        1,
        "one recovery task per failover"
    );
    drop(failover);
    tokio::time::timeout(Duration::from_secs(60), async {
        while metrics.num_alive_tasks() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the task ends");
}

/// Many requests on several threads see Redis answer at the end of the
/// same outage: the memory side is still told once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_answers_end_an_outage_once() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let failover = failover(manager, Store::default());
    for outage in 1..=3_u64 {
        redis.stop().await;
        assert_eq!(get(&failover, "x").await, None);
        redis.restart().await;
        // From here Redis answers every request: no fallback can start a
        // second outage (the memory side told twice, rightly) while the
        // tasks race to end this one.
        wait_for_breaker(failover.manager(), BreakerState::Closed, DEADLINE).await;
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let failover = failover.clone();
                tokio::spawn(async move {
                    tokio::time::timeout(DEADLINE, async {
                        while failover.is_degraded() {
                            let _ = get(&failover, "x").await;
                            // A fallback never waits: let the probe run.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    })
                    .await
                    .expect("the outage ends");
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("no panic");
        }
        let recoveries = failover.memory().recoveries.load(Ordering::Acquire);
        assert_eq!(recoveries, usize::try_from(outage).expect("small"));
    }
}

/// A caller of `catch_up` (the cache, before each lookup after an outage)
/// waits at most about one command timeout for a replay that is stuck,
/// and the change it could not finish stays queued.
#[tokio::test]
async fn catch_up_waits_at_most_a_command_timeout() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let gate = Arc::new(Semaphore::new(0));
    let store = Store {
        gate: Some(Arc::clone(&gate)),
        ..Store::default()
    };
    let failover = failover(manager, store);
    failover.defer(set("a", "1")).expect("fits");
    assert!(failover.is_degraded());
    let started = std::time::Instant::now();
    tokio::time::timeout(DEADLINE, failover.catch_up())
        .await
        .expect("catch_up returns");
    let waited = started.elapsed();
    // The command timeout is 300 ms; 1.5 s leaves room for a loaded machine.
    assert!(waited < Duration::from_millis(1_500), "waited {waited:?}");
    assert!(failover.is_pending("a"), "not written: still pending");
    assert!(failover.is_degraded());
    gate.add_permits(1);
    wait_for_recovery(&failover, 0).await;
    assert!(!failover.is_pending("a"));
}

/// A catch-up that runs out of time while Redis answers (the queue is
/// long: here its replay is held at a gate) says that Redis answers, and
/// its caller goes on to Redis. One that runs out of time after an
/// operation failed, none having succeeded since (Redis hangs), says that
/// it does not, so that its caller does not wait a second timeout; its
/// wait counts toward the breaker as a timeout.
#[tokio::test]
async fn a_catch_up_out_of_time_tells_a_long_queue_from_a_hung_redis() {
    let redis = TestRedis::start().await;
    let manager = hanging_manager(&redis).await;
    let gate = Arc::new(Semaphore::new(0));
    let store = Store {
        gate: Some(Arc::clone(&gate)),
        ..Store::default()
    };
    let failover = failover(manager.clone(), store);
    failover.defer(set("a", "1")).expect("fits");
    assert!(
        within(failover.catch_up()).await,
        "Redis answers: the queue is only long"
    );
    redis.pause().await;
    assert_eq!(get(&failover, "x").await, None, "the read timed out");
    let failures = manager.health().consecutive_failures;
    assert!(failures > 0);
    assert!(!within(failover.catch_up()).await, "Redis hangs");
    assert_eq!(
        manager.health().consecutive_failures,
        failures + 1,
        "the catch-up's wait counted as a timeout"
    );
    redis.resume().await;
    gate.add_permits(1);
    wait_for_recovery(&failover, 0).await;
}

/// `run_caught_up` for a caller that Redis failed (`caught_up` false):
/// the in-process side answers at once while no operation has succeeded
/// since the failure, and Redis is asked again once one has (Redis
/// answered another request in between).
#[tokio::test]
async fn a_call_redis_failed_asks_it_again_once_another_operation_has_succeeded() {
    let redis = TestRedis::start().await;
    let manager = hanging_manager(&redis).await;
    let failover = failover(manager.clone(), Store::default());
    let key = manager.keys().key(&["x"]);
    let () = within(manager.query(redis::cmd("SET").arg(&key).arg("1")))
        .await
        .expect("SET");
    // Whether the operation went to Redis (a `PING`), and how long it took.
    let asked = |caught_up: bool| {
        let failover = &failover;
        async move {
            let started = tokio::time::Instant::now();
            let served = within(failover.run_caught_up(
                caught_up,
                |_store| async {
                    let manager = failover.manager();
                    manager
                        .query::<String>(&redis::cmd("PING"))
                        .await
                        .map(|_| true)
                },
                |_memory, _reason| async { false },
            ))
            .await;
            (served.value, started.elapsed())
        }
    };
    redis.pause().await;
    assert_eq!(get(&failover, "x").await, None, "the read timed out");
    let (to_redis, took) = asked(false).await;
    assert!(!to_redis, "nothing succeeded since the failure");
    assert!(
        took < Duration::from_millis(100),
        "answered at once: {took:?}"
    );
    redis.resume().await;
    within(async {
        while get(&failover, "x").await.as_deref() != Some("1") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (to_redis, _) = asked(false).await;
    assert!(
        to_redis,
        "a read succeeded since the failure: Redis is asked"
    );
}

/// A manager that waits 300 ms for each command and keeps its breaker
/// closed (50 failures): while Redis hangs, each call sent is one more wait.
async fn hanging_manager(redis: &TestRedis) -> RedisManager {
    let config = redis
        .config()
        .command_timeout(Duration::from_millis(300))
        .failure_threshold(50);
    RedisManager::connect(config.build().expect("valid config"))
        .await
        .expect("manager starts")
}

async fn within<T>(work: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, work)
        .await
        .expect("answered in time")
}

/// A key Redis keeps refusing (a wrong type, a script error, its cluster
/// node down while the breaker stays closed) holds back its own later
/// changes only: every other key is written, in order.
#[tokio::test]
async fn a_key_that_keeps_failing_holds_back_only_its_own_changes() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let store = Store {
        refused_key: Some("bad".to_owned()),
        ..Store::default()
    };
    let failover = failover(manager, store);
    let changes = vec![
        set("bad", "1"),
        set("a", "1"),
        set("bad", "2"),
        set("b", "1"),
        set("a", "2"),
    ];
    failover.defer_all(changes).expect("fits");
    tokio::time::timeout(DEADLINE, async {
        while failover.is_pending("a") || failover.is_pending("b") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the other keys are written while `bad` keeps failing");
    assert_eq!(
        *failover.redis().written.lock().expect("not poisoned"),
        [set("a", "1"), set("b", "1"), set("a", "2")]
    );
    assert!(failover.is_pending("bad"), "still queued, retried");
    assert!(
        failover.is_degraded(),
        "the outage lasts while a change waits"
    );
    assert_eq!(failover.queue_usage().changes, 2);
}

/// The memory side hears of Redis's first answer after fallbacks at once,
/// while the queue is still being written (the cache drops its in-process
/// entries then: other instances may purge them in Redis meanwhile), and
/// again after each later fallback; the end of the outage comes once the
/// queue is written.
#[tokio::test]
async fn the_memory_side_hears_of_each_return_of_redis_before_the_queue_is_written() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let gate = Arc::new(Semaphore::new(0));
    let failover = failover(
        manager,
        Store {
            gate: Some(Arc::clone(&gate)),
            ..Store::default()
        },
    );
    let answers = || failover.memory().answers.load(Ordering::Acquire);
    assert_eq!(get(&failover, "x").await, None, "healthy, nothing stored");
    assert_eq!(answers(), 0, "no fallback yet");
    for round in 1..=2 {
        redis.stop().await;
        assert_eq!(get(&failover, "x").await, None);
        failover.defer(set("x", "1")).expect("fits");
        redis.restart().await;
        wait_for_breaker(failover.manager(), BreakerState::Closed, DEADLINE).await;
        tokio::time::timeout(DEADLINE, async {
            while answers() < round {
                let _ = get(&failover, "y").await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("Redis answers");
        for _ in 0..3 {
            let _ = get(&failover, "y").await;
        }
        assert_eq!(answers(), round, "once per return of Redis");
        assert!(failover.is_pending("x"), "the queue is held at the gate");
        assert_eq!(failover.memory().recoveries.load(Ordering::Acquire), 0);
    }
    gate.add_permits(1 << 20);
    wait_for_recovery(&failover, 0).await;
    assert_eq!(failover.memory().recoveries.load(Ordering::Acquire), 1);
    assert_eq!(get(&failover, "x").await.as_deref(), Some("1"));
}

/// A replay that panics is a failed replay: retried with the backoff, and
/// nothing queued is lost.
#[tokio::test]
async fn a_replay_that_panics_is_retried_and_nothing_queued_is_lost() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let failover = failover(
        manager,
        Store {
            panic_at: Some(1),
            ..Store::default()
        },
    );
    failover.defer(set("a", "1")).expect("fits");
    failover.defer(set("b", "1")).expect("fits");
    wait_for_recovery(&failover, 0).await;
    assert_eq!(get(&failover, "a").await.as_deref(), Some("1"));
    assert_eq!(get(&failover, "b").await.as_deref(), Some("1"));
    assert!(
        failover.redis().attempts.load(Ordering::Acquire) >= 3,
        "retried"
    );
}

/// A recovery task that ended (here: the memory side panicked as the task
/// ended an outage) is started again by the next operation of the
/// failover, and what is queued then is written.
#[tokio::test]
async fn a_recovery_task_that_ended_is_started_again() {
    let redis = TestRedis::start().await;
    let manager = manager_for(&redis).await;
    let failover = Failover::builder(
        manager,
        Store::default(),
        Memory {
            panic_once: true.into(),
            ..Memory::default()
        },
    )
    .build();
    failover.defer(set("a", "1")).expect("fits");
    // The task writes `a`, then panics telling the memory side.
    tokio::time::timeout(DEADLINE, async {
        while failover.memory().panic_once.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the task wrote the queue and panicked");
    failover.defer(set("b", "1")).expect("fits");
    wait_for_recovery(&failover, 0).await;
    assert_eq!(get(&failover, "b").await.as_deref(), Some("1"));
}
