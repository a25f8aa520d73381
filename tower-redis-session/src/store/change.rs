//! The changes made while Redis was unavailable, as core's outage queue
//! holds them ([`Deferred`]), and how the Redis side writes them when it is
//! back ([`Replay`]).
//!
//! - **Weighed in bytes.** Every change has an approximate weight (its
//!   session key, entry names, JSON values and user, plus a fixed allowance
//!   for the bookkeeping); the queue refuses a save that does not fit.
//! - **Deletions always fit.** A log out is never refused nor dropped, and
//!   replaces the changes queued for its session, so deletions only take the
//!   queue over its bound by the sessions this instance held copies of
//!   before the outage (themselves bounded by bytes).
//! - **A cycle is conditional.** The old id of a `cycle_id` made during the
//!   outage is ended after its queued changes (it does not replace them, as
//!   a log out does, and a later log out of the old id does not replace
//!   it), and the new id is created only once that end found the old one
//!   in Redis: a session ended elsewhere meanwhile (logged out, revoked,
//!   timed out) is not brought back under its new id. Until the end has
//!   answered, the creation waits (a failed end holds it back, even when
//!   other keys are written).
//! - **Newer data wins.** A save is replayed through the same script as a
//!   live one, with the time it was made: the script's per-entry stamps keep
//!   it from overwriting an entry another instance changed after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use tower_redis_core::RedisManager;
use tower_redis_core::degrade::{Deferred, Replay, ReplayError};

use super::redis::RedisStore;
use super::users::REVOKED_MARGIN_MS;
use super::{Changes, Saved, Store, Write};

/// The bookkeeping of one queued change, in bytes, beyond its own data: the
/// ordered map's slot, the index entry, the strings' headers.
const CHANGE_OVERHEAD: usize = 192;
/// The bookkeeping of one entry of a queued save.
const ENTRY_OVERHEAD: usize = 48;

/// A change to one session, waiting for Redis.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    storage_key: String,
    kind: Kind,
    weight: usize,
}

#[derive(Debug, Clone)]
enum Kind {
    Save {
        /// `Some(created_ms)` when the session was created during the outage.
        create: Option<u64>,
        changes: Changes,
        /// When the change was made, for the per-entry "newer wins" rule.
        at_ms: u64,
        /// The creation of a cycle's new id: made only if the old one was
        /// still in Redis.
        cycle: Option<Arc<Cycle>>,
        /// When the user was first set by the changes this one holds (a
        /// merge keeps the earliest; this instance's monotonic clock): a
        /// "log out everywhere" of that user since then means it is not
        /// written.
        user_since: Option<Instant>,
        /// The session's user before the first change this one holds (a
        /// merge keeps the older one's): the user whose index the session
        /// leaves when the changes give it another.
        previous_user: Option<String>,
    },
    Delete {
        user: Option<String>,
    },
    /// The end of a cycle's old id.
    EndCycled {
        /// The user the session had before the cycle: the old id leaves
        /// that user's index.
        user: Option<String>,
        new_storage_key: String,
        cycle: Arc<Cycle>,
    },
}

/// What the replay of a queued cycle found of the old id, shared by the
/// cycle's two halves (and kept if the replay stops between them).
#[derive(Debug, Default)]
pub(crate) struct Cycle(AtomicU8);

impl Cycle {
    /// The end has not answered yet: the creation waits.
    const UNKNOWN: u8 = 0;
    /// Redis held the old id: the new one is created.
    const TAKEN: u8 = 1;
    /// The old id was gone (ended elsewhere, or timed out): the new one is
    /// not created.
    const GONE: u8 = 2;

    /// What an end found. Once taken, always taken: an end written again
    /// (a batch put back after its writer was cancelled) after the marker
    /// expired must not turn a created session into a gone one.
    fn found(&self, taken: bool) {
        if taken {
            self.0.store(Self::TAKEN, Ordering::Release);
        } else {
            let _ = self.0.compare_exchange(
                Self::UNKNOWN,
                Self::GONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    fn state(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

impl Change {
    /// A save made at `at_ms`. A later save of the session that rewrites
    /// every entry this one writes replaces it in the queue (see
    /// [`Deferred::merge`]); other saves each keep the time of their own
    /// changes for the "newer wins" rule.
    pub(crate) fn save(
        storage_key: &str,
        create: Option<u64>,
        changes: &Changes,
        at_ms: u64,
    ) -> Self {
        Self {
            weight: save_weight(storage_key, changes),
            storage_key: storage_key.to_owned(),
            kind: Kind::Save {
                create,
                changes: changes.clone(),
                at_ms,
                cycle: None,
                user_since: changes.user.as_ref().map(|_| Instant::now()),
                previous_user: None,
            },
        }
    }

    /// This save, made on a session whose user was `previous` (which the
    /// replay takes the session out of the index of, if the changes name
    /// another user).
    pub(crate) fn with_previous_user(mut self, previous: Option<&str>) -> Self {
        if let (Kind::Save { previous_user, .. }, Some(previous)) = (&mut self.kind, previous) {
            self.weight += previous.len();
            *previous_user = Some(previous.to_owned());
        }
        self
    }

    /// A `cycle_id`: the end of the old id (which leaves the index of
    /// `user`, the session's user before the cycle), then the creation of
    /// the new one (made at `at_ms`, holding the whole session, its user
    /// included), which waits for the end to find the old id in Redis.
    /// Queued both or neither.
    pub(crate) fn cycle(
        old_storage_key: &str,
        user: Option<&str>,
        new_storage_key: &str,
        created_ms: u64,
        changes: &Changes,
        at_ms: u64,
    ) -> Vec<Self> {
        let cycle = Arc::new(Cycle::default());
        let mut end = Self::delete(old_storage_key, user);
        end.weight += new_storage_key.len();
        end.kind = Kind::EndCycled {
            user: user.map(str::to_owned),
            new_storage_key: new_storage_key.to_owned(),
            cycle: Arc::clone(&cycle),
        };
        let mut create = Self::save(new_storage_key, Some(created_ms), changes, at_ms);
        if let Kind::Save { cycle: slot, .. } = &mut create.kind {
            *slot = Some(cycle);
        }
        vec![end, create]
    }

    /// The end of a session (and its removal from its user's index).
    pub(crate) fn delete(storage_key: &str, user: Option<&str>) -> Self {
        Self {
            weight: CHANGE_OVERHEAD + 2 * storage_key.len() + user.map_or(0, str::len),
            storage_key: storage_key.to_owned(),
            kind: Kind::Delete {
                user: user.map(str::to_owned),
            },
        }
    }

    /// Writes it through the manager (one round trip). A save finding its
    /// session gone is done: it is not recreated.
    async fn write(&self, redis: &RedisStore) -> Result<(), tower_redis_core::Error> {
        let storage_key = self.storage_key.as_str();
        match &self.kind {
            Kind::Delete { user } => redis.delete(storage_key, user.as_deref()).await,
            Kind::EndCycled {
                user,
                new_storage_key,
                cycle,
            } => {
                let taken = redis
                    .end_cycled(storage_key, user.as_deref(), new_storage_key)
                    .await?;
                cycle.found(taken);
                Ok(())
            }
            Kind::Save {
                create,
                changes,
                at_ms,
                cycle,
                user_since,
                previous_user,
            } => {
                match cycle.as_ref().map(|cycle| cycle.state()) {
                    Some(Cycle::GONE) => {
                        // The old id ended in Redis while the cycle waited:
                        // the session is not brought back under the new
                        // one, and every instance ends its copy of it.
                        redis.end_here(storage_key);
                        redis.announce_ended(false, vec![storage_key.to_owned()]);
                        return Ok(());
                    }
                    Some(Cycle::UNKNOWN) => {
                        // The end failed (its key is held back): this waits
                        // for it, and is tried again after it.
                        return Err(tower_redis_core::Error::Redis(
                            std::io::Error::other(
                                "a session id cycle waits for the end of its old id",
                            )
                            .into(),
                        ));
                    }
                    _ => {}
                }
                // A change that names a user, made before a "log out
                // everywhere" of that user, which could not find it (the
                // session, or its user, was not in Redis yet), is not
                // written, and the session ends, with every copy of it
                // (this instance's holds the login). An existing session's
                // change is checked before it is written; a creation's
                // after (a revocation that read the user's index before the
                // write missed it).
                let revoked = async || match (&changes.user, user_since) {
                    (Some(user), Some(since)) => {
                        let ago = u64::try_from(since.elapsed().as_millis())
                            .unwrap_or(u64::MAX)
                            .saturating_add(REVOKED_MARGIN_MS);
                        redis.revoked_since(user, ago).await
                    }
                    _ => Ok(false),
                };
                if create.is_none() && revoked().await? {
                    redis.delete(storage_key, changes.user.as_deref()).await?;
                    // Nor is it left in the index of the user it had.
                    if let Some(previous) = previous_user
                        .as_deref()
                        .filter(|previous| Some(*previous) != changes.user.as_deref())
                    {
                        redis.leave_index(previous, storage_key).await?;
                    }
                    redis.end_here(storage_key);
                    return Ok(());
                }
                let write = Write {
                    storage_key,
                    create: *create,
                    changes,
                    previous_user: previous_user.as_deref(),
                    at_ms: Some(*at_ms),
                };
                let saved = redis.save(&write).await?;
                if create.is_some() && revoked().await? {
                    redis.delete(storage_key, changes.user.as_deref()).await?;
                    redis.end_here(storage_key);
                    return Ok(());
                }
                if saved == Saved::Gone && create.is_none() {
                    // The session ended in Redis while this change waited:
                    // an end this instance (or another) may have missed.
                    redis.end_here(storage_key);
                    redis.announce_ended(false, vec![storage_key.to_owned()]);
                }
                Ok(())
            }
        }
    }
}

impl Deferred for Change {
    fn key(&self) -> &str {
        &self.storage_key
    }

    fn weight(&self) -> usize {
        self.weight
    }

    fn is_delete(&self) -> bool {
        matches!(self.kind, Kind::Delete { .. })
    }

    /// The end of a cycle's old id stays ahead of a later log out of that
    /// id: the cycle's creation waits for its answer.
    fn outlives_delete(&self) -> bool {
        matches!(self.kind, Kind::EndCycled { .. })
    }

    /// A later save replaces this one when it writes every entry (and the
    /// user, if set) this one writes, at a time not before it: each entry
    /// then ends with the later value and stamp either way. The creation,
    /// if this one creates the session, is kept. One visitor saving their
    /// session over and over during an outage so takes the room of one save.
    fn merge(&mut self, newer: &Self) -> bool {
        let (
            Kind::Save {
                changes,
                at_ms,
                user_since,
                previous_user,
                ..
            },
            Kind::Save {
                create: None,
                changes: newer_changes,
                at_ms: newer_at_ms,
                user_since: newer_user_since,
                ..
            },
        ) = (&mut self.kind, &newer.kind)
        else {
            return false;
        };
        let covered = *newer_at_ms >= *at_ms
            && (changes.user.is_none() || newer_changes.user.is_some())
            && changes
                .entries
                .keys()
                .all(|name| newer_changes.entries.contains_key(name));
        if covered {
            changes.clone_from(newer_changes);
            *at_ms = *newer_at_ms;
            // The user's time stays the earliest (a revocation since then
            // holds against the login, however often it was saved again).
            *user_since = user_since.or(*newer_user_since);
            // The user before the older change is the one Redis has.
            self.weight = save_weight(&self.storage_key, changes)
                + previous_user.as_ref().map_or(0, String::len);
        }
        covered
    }
}

/// The outage changes are written oldest first, one round trip each; the
/// first failure stops the batch (what follows waits, in order, so that a
/// session's later changes never reach Redis before its creation).
impl Replay for RedisStore {
    type Change = Change;

    async fn replay(&self, _manager: &RedisManager, changes: &[Change]) -> Result<(), ReplayError> {
        let mut written = 0;
        let mut result = Ok(());
        for change in changes {
            if let Err(error) = change.write(self).await {
                result = Err(ReplayError { written, error });
                break;
            }
            written += 1;
        }
        if written > 0 {
            tracing::debug!(
                target: "tower_redis_session",
                written,
                "wrote session changes made during the Redis outage"
            );
        }
        record_reconciled(written);
        result
    }
}

/// The approximate memory a queued save takes.
fn save_weight(storage_key: &str, changes: &Changes) -> usize {
    let entries: usize = changes
        .entries
        .iter()
        .map(|(name, value)| ENTRY_OVERHEAD + name.len() + value.as_ref().map_or(0, String::len))
        .sum();
    CHANGE_OVERHEAD + 2 * storage_key.len() + entries + changes.user.as_ref().map_or(0, String::len)
}

fn record_reconciled(count: usize) {
    let count = u64::try_from(count).unwrap_or(u64::MAX);
    tower_redis_core::record::counter("tower_redis_session_reconciled_total", &[], count);
}

/// The rules of the old session outage queue, moved here: they now hold for
/// session changes in core's queue. A recording Redis side shows what is
/// written, and in which order, when the queue is written.
#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use tokio::sync::Semaphore;
    use tower_redis_core::degrade::{Failover, Recovered};
    use tower_redis_core::testing::TestRedis;

    use super::*;

    /// Records the changes it is given; fails the write of the change
    /// numbered `fail_at` (counted over all writes) once; waits for a permit
    /// of `gate` before each batch.
    struct Recorder {
        written: Mutex<Vec<(String, bool)>>,
        fail_at: Mutex<Option<usize>>,
        gate: Semaphore,
    }

    impl Recorder {
        fn new(gate: usize) -> Self {
            Self {
                written: Mutex::new(Vec::new()),
                fail_at: Mutex::new(None),
                gate: Semaphore::new(gate),
            }
        }
    }

    impl Replay for Recorder {
        type Change = Change;

        async fn replay(&self, _: &RedisManager, changes: &[Change]) -> Result<(), ReplayError> {
            self.gate.acquire().await.expect("open").forget();
            for (i, change) in changes.iter().enumerate() {
                let mut written = self.written.lock().expect("not poisoned");
                if *self.fail_at.lock().expect("not poisoned") == Some(written.len()) {
                    self.fail_at.lock().expect("not poisoned").take();
                    return Err(ReplayError {
                        written: i,
                        error: tower_redis_core::Error::BreakerOpen,
                    });
                }
                written.push((change.key().to_owned(), change.is_delete()));
            }
            Ok(())
        }
    }

    struct Nothing;
    impl Recovered for Nothing {}

    fn queue(manager: RedisManager, limit: usize, gate: usize) -> Failover<Recorder, Nothing> {
        Failover::new(manager, Recorder::new(gate), Nothing, limit)
    }

    fn offline(limit: usize) -> Failover<Recorder, Nothing> {
        queue(RedisManager::disabled(), limit, usize::MAX >> 4)
    }

    async fn online(redis: &TestRedis, gate: usize) -> Failover<Recorder, Nothing> {
        let config = redis.config().build().expect("config");
        let manager = RedisManager::connect(config).await.expect("manager");
        queue(manager, usize::MAX, gate)
    }

    fn key(i: usize) -> String {
        format!("{i:043}")
    }

    fn changes(bytes: usize) -> Changes {
        let mut changes = Changes::default();
        changes
            .entries
            .insert("blob".to_owned(), Some("x".repeat(bytes)));
        changes
    }

    fn save(i: usize, bytes: usize) -> Change {
        Change::save(&key(i), Some(1), &changes(bytes), 1)
    }

    fn written(queue: &Failover<Recorder, Nothing>) -> Vec<(String, bool)> {
        std::mem::take(&mut *queue.redis().written.lock().expect("not poisoned"))
    }

    fn bytes(queue: &Failover<Recorder, Nothing>) -> usize {
        queue.queue_usage().bytes
    }

    /// Whether a session has changes waiting (asked on every read while
    /// anything is queued) is one hash lookup, whatever the queue's length.
    /// A scan of 50 000 changes per lookup takes minutes for 100 000
    /// lookups; the index answers in milliseconds.
    #[tokio::test]
    async fn pending_lookup_is_constant_time() {
        let redis = TestRedis::start().await;
        let queue = online(&redis, 0).await;
        let n = 50_000;
        for i in 0..n {
            queue
                .defer(Change::save(&key(i), Some(1), &Changes::default(), 1))
                .expect("unbounded");
        }
        let started = Instant::now();
        for i in 0..n {
            assert!(queue.is_pending(&key(i)));
            assert!(!queue.is_pending(&format!("x{i:042}")));
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{i} lookups took {:?}: the lookup scans the queue",
                started.elapsed()
            );
        }
        // Sessions being written still count: the writer holds its first
        // batch until let go.
        let catch_up = queue.catch_up();
        tokio::pin!(catch_up);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut catch_up)
                .await
                .is_err(),
            "held"
        );
        assert!(queue.is_pending(&key(7)));
        queue.redis().gate.add_permits(usize::MAX >> 4);
        // `catch_up` waits at most a command timeout; the recovery task
        // writes the rest.
        catch_up.await;
        tokio::time::timeout(Duration::from_secs(60), async {
            while queue.queue_usage().changes > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the queue is written");
        assert!(!queue.is_pending(&key(7)));
        assert_eq!(written(&queue).len(), n);
        assert_eq!((queue.queue_usage().changes, bytes(&queue)), (0, 0));
    }

    #[test]
    fn deletes_are_never_dropped_and_saves_that_do_not_fit_are_refused() {
        let limit = 4 * 1024;
        let queue = offline(limit);
        queue
            .defer(Change::delete(&key(0), Some("victim")))
            .expect("a delete always fits");
        // An attacker creates and destroys sessions.
        let mut refused = 0;
        for i in 1..1_000 {
            match queue.defer(save(i, 100)) {
                Ok(()) => queue
                    .defer(Change::delete(&key(i), None))
                    .expect("a delete always fits"),
                Err(full) => {
                    assert_eq!(full.limit_bytes, limit);
                    refused += 1;
                }
            }
            assert!(bytes(&queue) <= limit, "{} > {limit}", bytes(&queue));
        }
        assert!(refused > 900, "{refused}");
        // A log out still goes in when the queue is full.
        queue
            .defer(Change::delete(&key(5_000), None))
            .expect("a delete always fits");
        assert!(queue.is_pending(&key(0)) && queue.is_pending(&key(5_000)));
    }

    /// The order of the same queue as written: the victim's log out first,
    /// deletions only, the last log out last.
    #[tokio::test]
    async fn deletes_are_never_dropped_and_are_written_in_order() {
        let redis = TestRedis::start().await;
        let limit = 4 * 1024;
        let queue = queue(
            RedisManager::connect(redis.config().build().expect("config"))
                .await
                .expect("manager"),
            limit,
            usize::MAX >> 4,
        );
        // Nothing is written until the failover is degraded: deferring is.
        queue
            .defer(Change::delete(&key(0), Some("victim")))
            .expect("a delete always fits");
        for i in 1..1_000 {
            if queue.defer(save(i, 100)).is_ok() {
                queue
                    .defer(Change::delete(&key(i), None))
                    .expect("a delete always fits");
            }
        }
        queue
            .defer(Change::delete(&key(5_000), None))
            .expect("a delete always fits");
        queue.catch_up().await;
        let written = written(&queue);
        // The recovery task may have written some before catch_up: all
        // in one order either way.
        assert_eq!(written.first(), Some(&(key(0), true)));
        assert!(written.iter().all(|(_, delete)| *delete));
        assert_eq!(written.last(), Some(&(key(5_000), true)));
    }

    #[tokio::test]
    async fn a_delete_replaces_the_sessions_queued_changes_and_frees_their_bytes() {
        let redis = TestRedis::start().await;
        let queue = online(&redis, 0).await;
        queue.defer(save(1, 1000)).expect("fits");
        queue.defer(save(2, 10)).expect("fits");
        // Another entry: queued behind the first save, not merged into it.
        let mut other = Changes::default();
        other
            .entries
            .insert("other".to_owned(), Some("x".repeat(1000)));
        queue
            .defer(Change::save(&key(1), None, &other, 2))
            .expect("fits");
        let before = bytes(&queue);
        queue
            .defer(Change::delete(&key(1), Some("u")))
            .expect("a delete always fits");
        assert!(
            bytes(&queue) < before - 2000,
            "{} vs {before}",
            bytes(&queue)
        );
        assert_eq!(queue.queue_usage().changes, 2);
        queue.redis().gate.add_permits(usize::MAX >> 4);
        queue.catch_up().await;
        assert_eq!(written(&queue), [(key(2), false), (key(1), true)]);
    }

    /// Changes that failed to be written keep their place, ahead of newer
    /// ones; the first failure stops the pass (strict order).
    #[tokio::test]
    async fn requeued_changes_keep_their_place_ahead_of_newer_ones() {
        let redis = TestRedis::start().await;
        let queue = online(&redis, 0).await;
        for i in 0..3 {
            queue.defer(save(i, 10)).expect("fits");
        }
        *queue.redis().fail_at.lock().expect("not poisoned") = Some(1);
        let catch_up = queue.catch_up();
        tokio::pin!(catch_up);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut catch_up)
                .await
                .is_err(),
            "held"
        );
        // A change made while the first pass runs.
        queue.defer(save(9, 10)).expect("fits");
        queue.redis().gate.add_permits(1);
        catch_up.await;
        assert_eq!(written(&queue), [(key(0), false)]);
        assert!(!queue.is_pending(&key(0)));
        assert!(queue.is_pending(&key(1)) && queue.is_pending(&key(2)));
        queue.redis().gate.add_permits(usize::MAX >> 4);
        queue.catch_up().await;
        assert_eq!(
            written(&queue),
            [(key(1), false), (key(2), false), (key(9), false)]
        );
    }

    /// A visitor saving the same entries over and over during an outage
    /// takes the room of one save; a save that does not rewrite everything
    /// the queued one writes, a creation, or a delete is queued on its own.
    #[tokio::test]
    async fn repeated_saves_of_a_session_are_merged_when_the_newer_covers_the_older() {
        let queue = offline(4 * 1024);
        queue.defer(save(1, 100)).expect("fits");
        for at in 2..2_000 {
            queue
                .defer(Change::save(&key(1), None, &changes(100), at))
                .expect("merged: takes no more room");
        }
        assert_eq!(queue.queue_usage().changes, 1);
        assert_eq!(bytes(&queue), save(1, 100).weight(), "the room of one");
        let mut wider = changes(10);
        wider
            .entries
            .insert("more".to_owned(), Some("m".to_owned()));
        queue
            .defer(Change::save(&key(1), None, &wider, 3_000))
            .expect("covers blob: merged");
        assert_eq!(queue.queue_usage().changes, 1);
        let mut narrower = Changes::default();
        narrower.entries.insert("more".to_owned(), None);
        queue
            .defer(Change::save(&key(1), None, &narrower, 3_001))
            .expect("fits");
        assert_eq!(queue.queue_usage().changes, 2, "does not cover blob");
        queue
            .defer(Change::save(&key(1), None, &changes(5), 10))
            .expect("fits");
        assert_eq!(queue.queue_usage().changes, 3, "does not cover more");
        queue
            .defer(Change::save(&key(1), None, &changes(5), 9))
            .expect("fits");
        assert_eq!(queue.queue_usage().changes, 4, "older than the queued one");
        let mut user = changes(5);
        user.user = Some("alice".to_owned());
        queue
            .defer(Change::save(&key(1), None, &user, 4_000))
            .expect("fits");
        assert_eq!(queue.queue_usage().changes, 4, "covers the newest one");
        queue
            .defer(Change::save(&key(1), None, &changes(5), 4_001))
            .expect("fits");
        assert_eq!(queue.queue_usage().changes, 5, "would drop the user");
    }

    /// An end that found the old id taken stays so, whatever a later run of
    /// it finds (a batch put back after its writer was cancelled, run again
    /// once the marker is gone).
    #[test]
    fn a_cycle_found_taken_stays_taken() {
        let cycle = Cycle::default();
        cycle.found(true);
        cycle.found(false);
        assert_eq!(cycle.state(), Cycle::TAKEN);
        let cycle = Cycle::default();
        cycle.found(false);
        assert_eq!(cycle.state(), Cycle::GONE);
    }

    /// A store on `redis` (no tracking) holding the session `key(1)`, and
    /// a connection of the test's own.
    async fn holding_one(
        redis: &TestRedis,
    ) -> (
        RedisStore,
        tower_redis_core::redis::aio::MultiplexedConnection,
    ) {
        let manager = RedisManager::connect(redis.config().build().expect("config"))
            .await
            .expect("manager");
        let store = RedisStore::new(manager, crate::Expiry::default(), 0);
        let mut conn = redis.connection().await.expect("connection");
        let _: () = tower_redis_core::redis::cmd("HSET")
            .arg(store.session_key(&key(1)))
            .arg("_c")
            .arg(1)
            .query_async(&mut conn)
            .await
            .expect("HSET");
        (store, conn)
    }

    /// The end of a cycle's old id says whether Redis held it; a retry of
    /// the same end (its reply lost) still says so, another cycle's end of
    /// the same id does not, and an id Redis never held is gone.
    #[tokio::test]
    async fn the_end_of_a_cycled_id_is_found_again_by_its_own_retry_only() {
        let redis = TestRedis::start().await;
        let (store, _) = holding_one(&redis).await;
        let old = key(1);
        for (new, held, why) in [
            (2, true, "held"),
            (2, true, "a retry finds its own work"),
            (3, false, "another cycle finds it gone"),
        ] {
            let taken = store.end_cycled(&old, None, &key(new)).await;
            assert_eq!(taken.expect("ends"), held, "{why}");
        }
        assert!(
            !store
                .end_cycled(&key(4), None, &key(5))
                .await
                .expect("ends"),
            "never held"
        );
    }

    /// A cycle's creation waits for the end of its old id: written first
    /// (the end failed, its key held back), it fails and creates nothing;
    /// after an end that found the old id it creates the new one; after an
    /// end that found it gone it creates nothing and succeeds.
    #[tokio::test]
    async fn a_cycle_s_creation_waits_for_the_end_of_its_old_id() {
        let redis = TestRedis::start().await;
        let (store, reader) = holding_one(&redis).await;
        let exists = |storage_key: String| {
            let key = store.session_key(&storage_key);
            let mut conn = reader.clone();
            async move {
                tower_redis_core::redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<bool>(&mut conn)
                    .await
                    .expect("EXISTS")
            }
        };
        let now = super::super::now_ms();
        let held = Change::cycle(&key(1), None, &key(2), now, &changes(5), now);
        assert!(held[1].write(&store).await.is_err(), "waits for the end");
        assert!(!exists(key(2)).await);
        held[0].write(&store).await.expect("ends the old id");
        held[1].write(&store).await.expect("creates the new id");
        assert!(exists(key(2)).await && !exists(key(1)).await);

        let gone = Change::cycle(&key(3), None, &key(4), now, &changes(5), now);
        gone[0].write(&store).await.expect("finds the old id gone");
        gone[1]
            .write(&store)
            .await
            .expect("done: nothing to create");
        assert!(!exists(key(4)).await, "not brought back");
    }

    #[tokio::test]
    async fn a_cycle_is_queued_whole_or_not_at_all() {
        let redis = TestRedis::start().await;
        let queue = queue(
            RedisManager::connect(redis.config().build().expect("config"))
                .await
                .expect("manager"),
            3 * 1024,
            0,
        );
        queue.defer(save(1, 600)).expect("fits");
        let cycle = |old: usize, user: Option<&str>, new: usize, bytes: usize| {
            Change::cycle(&key(old), user, &key(new), 1, &changes(bytes), 2)
        };
        // The old session's queued creation stays ahead of its end: the end
        // must find it in Redis for the new one to be created.
        queue
            .defer_all(cycle(1, Some("u"), 2, 600))
            .expect("fits beside the old session's changes");
        assert_eq!(queue.queue_usage().changes, 3);
        // Not enough room for the new session: nothing changes.
        let before = queue.queue_usage();
        assert!(queue.defer_all(cycle(2, None, 3, 1000)).is_err());
        assert_eq!(queue.queue_usage(), before);
        assert!(queue.is_pending(&key(2)) && !queue.is_pending(&key(3)));
        queue.redis().gate.add_permits(usize::MAX >> 4);
        queue.catch_up().await;
        assert_eq!(
            written(&queue),
            [(key(1), false), (key(1), false), (key(2), false)]
        );
    }

    /// A save merged into a queued login (the session's every entry and its
    /// user, saved again) keeps the time the login first set the user:
    /// the replay compares that time with a "log out everywhere", which a
    /// later save made after the revocation must not push the login past.
    #[test]
    fn a_merged_save_keeps_the_time_the_user_was_first_set() {
        let mut with_user = changes(8);
        with_user.user = Some("alice".to_owned());
        let mut login = Change::cycle(&key(1), None, &key(2), 1, &with_user, 10)
            .pop()
            .expect("the creation half");
        let Kind::Save {
            user_since: Some(first),
            ..
        } = login.kind
        else {
            panic!("a save naming its user: {login:?}");
        };
        std::thread::sleep(Duration::from_millis(5));
        let again = Change::save(&key(2), None, &with_user, 20);
        assert!(login.merge(&again), "covers every entry and the user");
        let Kind::Save {
            user_since, at_ms, ..
        } = &login.kind
        else {
            panic!("still a save");
        };
        assert_eq!((*user_since, *at_ms), (Some(first), 20));
        // A save that sets the user merged into one that did not takes
        // the newer save's time.
        let mut anonymous = Change::save(&key(3), None, &changes(8), 30);
        let named = Change::save(&key(3), None, &with_user, 40);
        assert!(anonymous.merge(&named));
        let (
            Kind::Save { user_since, .. },
            Kind::Save {
                user_since: set, ..
            },
        ) = (&anonymous.kind, &named.kind)
        else {
            panic!("saves");
        };
        assert!(user_since.is_some() && user_since == set);
    }
}
