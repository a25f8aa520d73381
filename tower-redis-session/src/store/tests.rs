//! The store's decisions, in process: over `RedisManager::disabled()` (every
//! operation takes the in-process side) and over the local store itself.

use std::time::Duration;

use tower_redis_core::RedisManager;

use super::*;

/// A clock for the store's unit tests, like tokio's paused clock: once
/// [`pause`](clock::pause)d, the store's "now" stands still until
/// [`advance`](clock::advance)d. The store's times are wall-clock
/// milliseconds (they are compared with times other instances and Redis
/// wrote), which tokio's paused clock does not move. Per thread: a
/// `current_thread` test runtime runs the test and its tasks on one.
pub(crate) mod clock {
    use std::cell::Cell;
    use std::time::Duration;

    thread_local! {
        static PAUSED_MS: Cell<Option<u64>> = const { Cell::new(None) };
    }

    pub(crate) fn paused_ms() -> Option<u64> {
        PAUSED_MS.with(Cell::get)
    }

    /// Stops the clock at the current wall-clock time.
    pub(crate) fn pause() {
        let now = tower_redis_core::clock::now_ms();
        PAUSED_MS.with(|paused| paused.set(Some(now)));
    }

    /// Moves the paused clock forward.
    pub(crate) fn advance(by: Duration) {
        PAUSED_MS.with(|paused| {
            let now = paused.get().expect("clock::pause() first");
            paused.set(Some(now + tower_redis_core::clock::duration_ms(by)));
        });
    }
}

fn key(n: usize) -> String {
    format!("{n:043}")
}

fn expiry(idle: Duration, absolute: Duration) -> Expiry {
    Expiry {
        idle,
        absolute,
        persistent: false,
    }
}

/// A store whose Redis is never available.
fn offline(expiry: Expiry, copies_bytes: u64, queue_bytes: usize) -> SessionStore {
    SessionStore::new(
        RedisManager::disabled(),
        expiry,
        LocalLimits {
            copies_bytes,
            queue_bytes,
            tracked_bytes: 0,
        },
    )
}

fn set(name: &str, json: &str) -> Changes {
    let mut changes = Changes::default();
    changes
        .entries
        .insert(name.to_owned(), Some(json.to_owned()));
    changes
}

fn field(record: Option<Record>, name: &str) -> Option<String> {
    record.and_then(|record| record.fields.get(name).cloned())
}

/// A store on `redis` with tracking (waited for), the idle timeout `idle`,
/// an absolute timeout of 1 h, and 1 MiB of each local bound: one
/// instance of an app.
async fn tracked_store(
    redis: &tower_redis_core::testing::TestRedis,
    idle: Duration,
) -> SessionStore {
    let manager = RedisManager::connect(redis.config().build().expect("config"))
        .await
        .expect("manager");
    tower_redis_core::testing::wait_for_tracking(&manager, Duration::from_secs(10)).await;
    SessionStore::new(
        manager,
        expiry(idle, Duration::from_secs(3600)),
        LocalLimits {
            copies_bytes: 1 << 20,
            queue_bytes: 1 << 20,
            tracked_bytes: 1 << 20,
        },
    )
}

/// Creates session 1 (`a` = 1) through `store`, and begins its first load,
/// which must wait for Redis: nothing of it is tracked yet.
async fn created_then_loaded(store: &SessionStore) -> failover::Later {
    assert_eq!(
        store
            .save(&key(1), Some(now_ms()), &set("a", "1"), None, false)
            .await,
        Saved::Written
    );
    let Err(later) = store.load_now(&key(1)) else {
        panic!("a session this instance has not read is not tracked");
    };
    later
}

/// With tracking, a session unchanged in Redis since this instance read it
/// is loaded with no waiting ([`SessionStore::load_now`]: no future, no
/// round trip). The first load waits for Redis and fills the copy; a plain
/// update through this instance keeps it current (the script's answer says
/// nobody else wrote meanwhile); a login drops it, so the next load waits
/// again.
#[tokio::test]
async fn a_tracked_session_is_loaded_without_waiting() {
    let redis = tower_redis_core::testing::TestRedis::start().await;
    let store = tracked_store(&redis, Duration::from_secs(1800)).await;
    let later = created_then_loaded(&store).await;
    let record = store.load_later(&key(1), later).await.record;
    assert_eq!(field(record, "a").as_deref(), Some("1"));
    for _ in 0..3 {
        let record = store.load_now(&key(1)).ok();
        assert_eq!(field(record, "a").as_deref(), Some("1"), "tracked");
    }
    assert_eq!(
        store.save(&key(1), None, &set("a", "2"), None, false).await,
        Saved::Written
    );
    let Ok(record) = store.load_now(&key(1)) else {
        panic!("a session this instance updated stays tracked, with the update");
    };
    assert_eq!(field(Some(record), "a").as_deref(), Some("2"));
    let mut login = set("a", "3");
    login.user = Some("ada".to_owned());
    assert_eq!(
        store.save(&key(1), None, &login, None, false).await,
        Saved::Written
    );
    let Err(later) = store.load_now(&key(1)) else {
        panic!("a session this instance logged in is read from Redis again");
    };
    let record = store.load_later(&key(1), later).await.record;
    assert_eq!(field(record, "a").as_deref(), Some("3"));
}

/// A tracked copy made by a read that renewed nothing knows when this
/// instance last renewed the session (the local copy's time, which told
/// the read that none was due), so that the reads it answers need no look
/// at the local copy until a renewal is due. Here the session changes on
/// another instance between two reads of this one. The tracked copy used
/// to say "not known" after such a read, which made every read it answered
/// look the local copy up as well.
#[tokio::test]
async fn a_tracked_copy_knows_the_renewal_its_read_did_not_make() {
    let redis = tower_redis_core::testing::TestRedis::start().await;
    let idle = Duration::from_secs(1800);
    let (store, other) = (
        tracked_store(&redis, idle).await,
        tracked_store(&redis, idle).await,
    );
    // The first read renews the idle timeout.
    let later = created_then_loaded(&store).await;
    assert!(matches!(later, failover::Later::Read { touch: true, .. }));
    store.load_later(&key(1), later).await;
    let failover = &store.inner;
    let renewed_ms = failover
        .local()
        .copy(&key(1))
        .map(|copy| copy.touched_ms)
        .expect("the read's local copy");
    assert!(renewed_ms > 0, "the read renewed the idle timeout");
    // Another instance changes it: this one's tracked copy goes.
    assert_eq!(
        other.save(&key(1), None, &set("a", "2"), None, false).await,
        Saved::Written
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let later = loop {
        match store.load_now(&key(1)) {
            Err(later) => break later,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(_) => panic!("Redis did not invalidate the tracked copy within 10 s"),
        }
    };
    assert!(
        matches!(later, failover::Later::Read { touch: false, .. }),
        "no renewal is due yet"
    );
    let record = store.load_later(&key(1), later).await.record;
    assert_eq!(field(record, "a").as_deref(), Some("2"));
    let (_, touched_ms) = failover
        .redis()
        .tracked(&key(1), now_ms())
        .expect("the read made a tracked copy");
    assert_eq!(touched_ms, renewed_ms, "the tracked copy knows the renewal");
}

/// A change whose renewal fell due after its request's load (the load
/// answered by the tracked copy, the renewal due by the time of the save)
/// renews the idle timeout in the save's script, with no command of its
/// own. Since a tracked copy knows of the local copy's renewal, this is the
/// only way a change renews in its script.
#[tokio::test]
async fn a_change_renews_in_its_script_when_a_renewal_fell_due_after_the_load() {
    clock::pause();
    let redis = tower_redis_core::testing::TestRedis::start().await;
    let store = tracked_store(&redis, Duration::from_secs(1800)).await;
    let later = created_then_loaded(&store).await;
    store.load_later(&key(1), later).await;
    assert!(
        store.load_now(&key(1)).is_ok(),
        "loaded from the tracked copy"
    );
    clock::advance(Duration::from_millis(store.inner.touch_every_ms()));
    let session_key = redis::session_key(store.inner.manager(), &key(1));
    let pttl = || async { redis.pttl(&session_key).await.expect("PTTL") };
    // Real time, for the TTL to fall below the full idle timeout.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = pttl().await;
    let monitor = redis.monitor().await;
    assert_eq!(
        store.save(&key(1), None, &set("a", "2"), None, false).await,
        Saved::Written
    );
    let lines = monitor.stop_lines().await.expect("MONITOR");
    let after = pttl().await;
    let (scripted, sent): (Vec<_>, Vec<_>) = lines.iter().partition(|line| line.contains(" lua] "));
    assert_eq!(sent.len(), 1, "the save's script alone: {lines:?}");
    assert_eq!(
        scripted
            .iter()
            .filter(|line| line.to_ascii_lowercase().contains("\"pexpire\""))
            .count(),
        1,
        "renewed in the script: {lines:?}"
    );
    assert!(after > before, "TTL {before} ms before, {after} ms after");
}

/// A renewing read that caps the TTL (the session's last idle window)
/// sends that `PEXPIRE` after its read: on the tracking connection the
/// write takes the key out of Redis' tracking table, so the copy this
/// instance held from before must go too, or another instance's change
/// would go unheard.
#[tokio::test]
async fn a_read_that_caps_the_ttl_drops_the_copy_it_had() {
    let redis = tower_redis_core::testing::TestRedis::start().await;
    let mut stores = Vec::new();
    for _ in 0..2 {
        // Idle as long as absolute: every renewal caps the TTL.
        stores.push(tracked_store(&redis, Duration::from_secs(3600)).await);
    }
    let (a, b) = (&stores[0], &stores[1]);
    clock::pause();
    assert_eq!(
        a.save(&key(1), Some(now_ms()), &set("k", "0"), None, false)
            .await,
        Saved::Written
    );
    clock::advance(Duration::from_millis(1));
    // B's first read renews (capped: no copy kept); its second, with no
    // renewal due, keeps one.
    assert_eq!(field(b.load(&key(1)).await, "k").as_deref(), Some("0"));
    assert!(b.load_now(&key(1)).is_err(), "no copy from a capped read");
    assert_eq!(field(b.load(&key(1)).await, "k").as_deref(), Some("0"));
    assert!(b.load_now(&key(1)).is_ok(), "a copy from a plain read");
    // A renewal falls due (every 1/100 of the idle timeout): capped again.
    clock::advance(Duration::from_secs(36));
    assert_eq!(field(b.load(&key(1)).await, "k").as_deref(), Some("0"));
    // A changes it; B, synced, reads the change.
    assert_eq!(
        a.save(&key(1), None, &set("k", "1"), None, false).await,
        Saved::Written
    );
    b.sync().await.expect("sync");
    assert_eq!(field(b.load(&key(1)).await, "k").as_deref(), Some("1"));
}

/// The local copies must take a session created during an outage even when
/// they are full of sessions read many times before it: with moka's
/// default admission (TinyLFU) a newcomer loses to popular entries and is
/// refused, and its visitor is logged out on the next request.
#[tokio::test]
async fn sessions_created_during_an_outage_are_kept_even_after_a_warm_up() {
    let store = offline(
        expiry(Duration::from_secs(1800), Duration::from_secs(3600)),
        64 * 1024,
        16 << 20,
    );
    let value = format!("\"{}\"", "p".repeat(100));
    // About 150 copies fill the bound: popular sessions, read often.
    for n in 0..150 {
        store
            .save(&key(n), Some(now_ms()), &set("cart", &value), None, false)
            .await;
    }
    for _ in 0..20 {
        for n in 0..150 {
            assert!(store.load(&key(n)).await.is_some(), "popular {n}");
        }
    }
    // New visitors, fewer than the bound holds.
    for n in 1000..1100 {
        let saved = store
            .save(&key(n), Some(now_ms()), &set("cart", &value), None, false)
            .await;
        assert_eq!(saved, Saved::Written, "new {n}");
    }
    // Let the copies settle (admission and eviction run here).
    let usage = store.local_usage();
    assert!(usage.local_copies_bytes <= usage.local_copies_limit_bytes);
    let lost: Vec<usize> = {
        let mut lost = Vec::new();
        for n in 1000..1100 {
            if store.load(&key(n)).await.is_none() {
                lost.push(n);
            }
        }
        lost
    };
    assert!(
        lost.is_empty(),
        "{} new sessions were not kept: {lost:?}",
        lost.len()
    );
}

/// A local copy is not served past the session's absolute timeout, however
/// recently it was used.
#[tokio::test]
async fn a_local_copy_ends_at_the_absolute_timeout() {
    clock::pause();
    let store = offline(
        expiry(Duration::from_secs(1800), Duration::from_secs(3600)),
        1 << 20,
        1 << 20,
    );
    store
        .save(&key(1), Some(now_ms()), &set("a", "1"), None, false)
        .await;
    clock::advance(Duration::from_secs(3600 - 60));
    assert_eq!(field(store.load(&key(1)).await, "a").as_deref(), Some("1"));
    clock::advance(Duration::from_secs(61));
    assert_eq!(store.load(&key(1)).await, None);
}

/// The failover of a store without Redis (idle timeout 30 min, absolute
/// 1 h, 1 MiB of local copies and of queue, no tracked copies).
fn offline_failover() -> failover::Failover {
    failover::Failover::new(
        RedisManager::disabled(),
        expiry(Duration::from_secs(1800), Duration::from_secs(3600)),
        LocalLimits {
            copies_bytes: 1 << 20,
            queue_bytes: 1 << 20,
            tracked_bytes: 0,
        },
    )
}

/// With Redis unavailable (the breaker open: nothing is sent), a read of a
/// session without queued changes is its local copy, and not past the
/// absolute timeout; the ended copy is dropped.
#[tokio::test]
async fn a_read_while_redis_is_down_is_the_local_copy_until_the_absolute_timeout() {
    clock::pause();
    let failover = offline_failover();
    let mut record = Record {
        created_ms: now_ms(),
        ..Record::default()
    };
    Arc::make_mut(&mut record.fields).insert("a".to_owned(), "1".to_owned());
    failover.local().put(&key(1), record, now_ms());
    clock::advance(Duration::from_secs(3600 - 60));
    // Answered at once (`load_now`: no future), as `load` answers.
    let now = failover.load_now(&key(1)).ok();
    assert_eq!(
        now.and_then(|r| r.fields.get("a").cloned()).as_deref(),
        Some("1")
    );
    let read = failover.load(&key(1)).await;
    assert_eq!(
        read.and_then(|r| r.fields.get("a").cloned()).as_deref(),
        Some("1")
    );
    clock::advance(Duration::from_secs(61));
    assert!(failover.load_now(&key(1)).is_err(), "an ended copy waits");
    assert_eq!(failover.load(&key(1)).await, None);
    assert!(
        failover.local().copy(&key(1)).is_none(),
        "the ended copy is dropped"
    );
}

/// The local copies forget a session unused for the idle timeout (moka's
/// time-to-idle, on its own clock: checked as configuration).
#[test]
fn local_copies_expire_after_the_idle_timeout() {
    let idle = Duration::from_secs(1800);
    let local = local::LocalStore::new(1 << 20, 1 << 20, idle, Duration::from_secs(3600));
    assert_eq!(local.idle_timeout(), Some(idle));
}

/// Reads renew the idle timeout in Redis at most once per 1/100 of it
/// (capped at a minute), counted from the last renewal this instance made.
#[test]
fn a_renewal_is_due_once_its_time_has_passed_or_when_the_clock_went_back() {
    assert!(super::renewal_due(0, 10_000, 1_000), "no renewal known");
    assert!(!super::renewal_due(9_500, 10_000, 1_000), "a recent one");
    assert!(super::renewal_due(9_000, 10_000, 1_000), "a renewal ago");
    // Stamped after now: the wall clock stepped back since.
    assert!(super::renewal_due(10_500, 10_000, 1_000), "from the future");
}

#[tokio::test]
async fn the_idle_timeout_is_renewed_at_most_once_per_hundredth() {
    clock::pause();
    let failover = offline_failover();
    let every = failover.touch_every_ms();
    assert_eq!(every, 18_000);
    let local = failover.local();
    let record = Record {
        created_ms: now_ms(),
        ..Record::default()
    };
    assert!(
        local::LocalCopy::touch_due(None, now_ms(), every),
        "no copy"
    );
    local.put(&key(1), record.clone(), now_ms());
    let due = || local::LocalCopy::touch_due(local.copy(&key(1)).as_deref(), now_ms(), every);
    assert!(!due(), "just renewed");
    clock::advance(Duration::from_millis(every - 1));
    assert!(!due(), "before a hundredth");
    // A read from Redis that did not renew keeps the time of the renewal...
    let renewed_ms = local.copy(&key(1)).map(|copy| copy.touched_ms);
    let mut changed = record.clone();
    Arc::make_mut(&mut changed.fields).insert("a".to_owned(), "1".to_owned());
    local.refresh(
        &key(1),
        Some(&changed),
        local.copy(&key(1)),
        false,
        now_ms(),
        local.end_mark(),
    );
    assert_eq!(local.copy(&key(1)).map(|copy| copy.touched_ms), renewed_ms);
    clock::advance(Duration::from_millis(1));
    assert!(due(), "a hundredth after the renewal");
    // ...and one that did renew restarts the count.
    local.refresh(
        &key(1),
        Some(&changed),
        local.copy(&key(1)),
        true,
        now_ms(),
        local.end_mark(),
    );
    assert!(!due(), "renewed again");

    let long = failover::Failover::new(
        RedisManager::disabled(),
        expiry(
            Duration::from_secs(12 * 3600),
            Duration::from_secs(24 * 3600),
        ),
        LocalLimits {
            copies_bytes: 1 << 20,
            queue_bytes: 1 << 20,
            tracked_bytes: 0,
        },
    );
    assert_eq!(long.touch_every_ms(), 60_000, "at most a minute");
}

/// Without Redis, changes are kept locally and queued; a log out is queued
/// and remembered; an id change queues both halves.
#[tokio::test]
async fn outage_writes_are_queued_and_served_locally() {
    let store = offline(
        expiry(Duration::from_secs(1800), Duration::from_secs(3600)),
        1 << 20,
        1 << 20,
    );
    let created = now_ms();
    assert_eq!(
        store
            .save(&key(1), Some(created), &set("a", "1"), None, false)
            .await,
        Saved::Written
    );
    assert_eq!(
        store.save(&key(1), None, &set("b", "2"), None, false).await,
        Saved::Written
    );
    let record = store.load(&key(1)).await;
    assert_eq!(field(record.clone(), "a").as_deref(), Some("1"));
    assert_eq!(field(record.clone(), "b").as_deref(), Some("2"));
    assert_eq!(store.local_usage().queued_changes, 2);

    let merged = record.expect("the session");
    assert_eq!(
        store
            .cycle(&key(1), &key(2), &merged, &Changes::default(), None, false)
            .await,
        Saved::Written
    );
    assert!(store.has_ended(&key(1)));
    assert_eq!(store.load(&key(1)).await, None);
    assert_eq!(field(store.load(&key(2)).await, "b").as_deref(), Some("2"));
    // The old session's saves stay ahead of its end (which must find it in
    // Redis for the new one to be created); the new one is created.
    assert_eq!(store.local_usage().queued_changes, 4);

    // A deletion replaces the new session's queued creation.
    store.delete(&key(2), None, false).await;
    assert!(store.has_ended(&key(2)));
    assert_eq!(store.load(&key(2)).await, None);
    assert_eq!(store.local_usage().queued_changes, 4);
}

/// A full outage queue refuses a new session (nothing kept, nothing to
/// read), but never a log out.
#[tokio::test]
async fn a_full_queue_refuses_new_sessions_but_never_a_log_out() {
    let store = offline(
        expiry(Duration::from_secs(1800), Duration::from_secs(3600)),
        1 << 20,
        2048,
    );
    let big = format!("\"{}\"", "x".repeat(1200));
    assert_eq!(
        store
            .save(&key(1), Some(now_ms()), &set("a", &big), None, false)
            .await,
        Saved::Written
    );
    assert_eq!(
        store
            .save(&key(2), Some(now_ms()), &set("a", &big), None, false)
            .await,
        Saved::Refused
    );
    assert_eq!(
        store.load(&key(2)).await,
        None,
        "a refused session is not kept"
    );
    assert!(!store.has_ended(&key(2)));
    for n in 10..40 {
        store.delete(&key(n), Some("someone"), false).await;
    }
    let usage = store.local_usage();
    assert_eq!(usage.queued_changes, 31, "every log out is queued");
    assert!(usage.queued_bytes > usage.queue_limit_bytes);
}

/// A replay that cannot reach Redis keeps every change queued, in order.
#[tokio::test]
async fn a_failed_replay_keeps_the_changes_queued() {
    let store = offline(
        expiry(Duration::from_secs(1800), Duration::from_secs(3600)),
        1 << 20,
        1 << 20,
    );
    // Two entries, so that the next save (of one) is queued behind it
    // rather than merged into it.
    let mut first = set("a", "1");
    first.entries.insert("c".to_owned(), Some("1".to_owned()));
    store
        .save(&key(1), Some(now_ms()), &first, None, false)
        .await;
    store.save(&key(1), None, &set("a", "2"), None, false).await;
    store.delete(&key(3), None, false).await;
    let before = store.local_usage();
    store.reconcile().await;
    let after = store.local_usage();
    assert_eq!(after.queued_changes, 3);
    assert_eq!(after.queued_bytes, before.queued_bytes);
    // The session still reads as this instance holds it.
    assert_eq!(field(store.load(&key(1)).await, "a").as_deref(), Some("2"));
}

/// An id change that does not fit in the outage queue is refused whole: the
/// old session's deletion is not queued either, and the session keeps its
/// old id, intact.
#[tokio::test]
async fn a_cycle_that_does_not_fit_leaves_the_session_as_it_was() {
    let store = offline(
        expiry(Duration::from_secs(1800), Duration::from_secs(3600)),
        1 << 20,
        2048,
    );
    let big = format!("\"{}\"", "x".repeat(1200));
    assert_eq!(
        store
            .save(&key(1), Some(now_ms()), &set("a", &big), None, false)
            .await,
        Saved::Written
    );
    let before = store.local_usage();
    let mut merged = store.load(&key(1)).await.expect("the session");
    let more = set("b", &format!("\"{}\"", "y".repeat(700)));
    more.apply_to(&mut merged);
    assert_eq!(
        store
            .cycle(&key(1), &key(2), &merged, &more, None, false)
            .await,
        Saved::Refused
    );
    assert_eq!(
        store.local_usage(),
        before,
        "nothing of the cycle is queued"
    );
    assert!(!store.has_ended(&key(1)));
    assert_eq!(field(store.load(&key(1)).await, "a"), Some(big));
    assert_eq!(store.load(&key(2)).await, None);
}

/// A read hands out a copy of a record that shares its entries; a change
/// to that copy (a request's session) copies them first, so the record it
/// came from (tracked or local) keeps what Redis holds.
#[test]
fn a_change_to_a_copy_leaves_the_record_it_was_copied_from() {
    let mut original = Record::default();
    Arc::make_mut(&mut original.fields).insert("a".to_owned(), "1".to_owned());
    let mut copy = original.clone();
    assert!(
        Arc::ptr_eq(&original.fields, &copy.fields),
        "shared, not copied"
    );
    let changes = Changes {
        entries: [
            ("a".to_owned(), Some("2".to_owned())),
            ("b".to_owned(), Some("3".to_owned())),
        ]
        .into(),
        user: None,
    };
    changes.apply_to(&mut copy);
    assert_eq!(original.fields.len(), 1);
    assert_eq!(original.fields.get("a").map(String::as_str), Some("1"));
    assert_eq!(copy.fields.get("a").map(String::as_str), Some("2"));
    assert_eq!(copy.fields.get("b").map(String::as_str), Some("3"));
}

/// A session write's futures each fit the allocator's per-thread cache
/// (glibc's tcache takes blocks of up to 1,032 bytes; a larger one comes
/// from the shared arena, which first consolidates its small free blocks:
/// 2% of the process's CPU in a write-heavy run). The store's save, which
/// `Session` boxes, was 1,512 bytes with the save's commands inlined; they
/// are boxed apart now.
#[tokio::test]
async fn a_session_write_s_futures_fit_the_allocators_thread_cache() {
    let redis = tower_redis_core::testing::TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("config"))
        .await
        .expect("manager");
    let store = SessionStore::new(
        manager.clone(),
        expiry(Duration::from_secs(1800), Duration::from_secs(3600)),
        LocalLimits {
            copies_bytes: 1 << 20,
            queue_bytes: 1 << 20,
            tracked_bytes: 1 << 20,
        },
    );
    let (changes, storage_key) = (set("a", "1"), key(1));
    let save = store.save(&storage_key, None, &changes, None, false);
    let size = std::mem::size_of_val(&save);
    assert!(size <= 1032, "the store's save is {size} bytes");
    drop(save);
    let write = Write {
        storage_key: &storage_key,
        create: None,
        changes: &changes,
        previous_user: None,
        at_ms: None,
    };
    let redis_store = store.inner.redis();
    let write = &write;
    let size = manager
        .run(|mut conn| async move {
            let send = redis_store.send_save(write.storage_key, write, true, &mut conn);
            Ok(std::mem::size_of_val(&send))
        })
        .await
        .expect("a connection");
    assert!(size <= 1032, "the boxed send of a save is {size} bytes");
}
