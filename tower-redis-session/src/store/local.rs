//! The in-process side of the store: copies of recently read sessions (so
//! a user is not logged out by a short outage), and the memory of sessions
//! that ended. The changes made while Redis was unavailable wait in the
//! outage queue (core's, through `failover`), not here.
//!
//! The copies are an LRU bounded by bytes, except the copies of sessions
//! whose changes still wait for Redis: those are **pinned**, out of the
//! LRU, until their changes are written. While they wait the copy is the
//! only place the session's newest state is readable, so a flood of other
//! sessions (a client creating them as fast as it can during an outage)
//! must not evict it and log its visitor out. Pinned copies have their own
//! byte bound (the copies' bound plus the outage queue's: every pinned
//! session has a change in the queue); past it a copy stays in the LRU.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_redis_core::clock::duration_ms;
use tower_redis_core::{record, sync};

use super::ends::{EndMark, Ends};
use super::{Changes, Record, Saved, Store, Take, Write, now_ms};

/// The bookkeeping of one local copy, in bytes, beyond its data: the
/// cache's slot, the key, the record's map.
const COPY_OVERHEAD: usize = 160;
/// The bookkeeping of one entry of a local copy.
const FIELD_OVERHEAD: usize = 48;
/// How many locks the changes of copies are spread over (a power of two).
const STRIPES: usize = 64;

/// Cheap to clone: the clones share the copies and the memory of ends
/// (the announcements of sessions ended elsewhere hold one, see
/// `ended.rs`).
#[derive(Clone)]
pub(crate) struct LocalStore(Arc<LocalState>);

impl std::ops::Deref for LocalStore {
    type Target = LocalState;

    fn deref(&self) -> &LocalState {
        &self.0
    }
}

pub(crate) struct LocalState {
    /// Weighed in bytes.
    copies: moka::sync::Cache<String, Arc<LocalCopy>>,
    /// Sessions this instance recently destroyed, cycled away or saw
    /// gone (the ends other instances announce included), so that a
    /// concurrent request that loaded one before neither puts its copy
    /// back nor sends its old id back in a renewed persistent cookie; and
    /// which ids were cycled away (a login gave the session a successor
    /// the browser may already hold).
    ended: Ends,
    /// Copies of sessions with changes waiting for Redis.
    pinned: Mutex<Pinned>,
    /// Every change of a session's copy and every end of a session is made
    /// holding its key's stripe (then, if need be, `pinned`): a change, a
    /// read's refresh, a pin, or the pinned copies' return running at the
    /// same time as an end comes wholly before it (its copy is dropped by
    /// the end) or wholly after (it sees the end and puts nothing back),
    /// and two changes of one copy do not lose either. Striped, so that
    /// changes of different sessions do not wait for each other.
    stripes: Box<[Mutex<()>]>,
    stripe_hash: std::hash::RandomState,
    /// How many copies are pinned, readable without the lock.
    pinned_count: AtomicUsize,
    pin_limit_bytes: u64,
    absolute_ms: u64,
}

#[derive(Default)]
struct Pinned {
    copies: HashMap<String, PinnedCopy>,
    bytes: u64,
    /// Pins so far: each pin's number.
    pins: u64,
}

struct PinnedCopy {
    copy: Arc<LocalCopy>,
    /// The number of its last [`pin`](LocalState::pin): a caller that
    /// unpins gives the number of its own pin
    /// ([`unpin_if`](LocalState::unpin_if)), and a copy pinned again since
    /// (another request's change queued meanwhile) stays pinned.
    pin: u64,
}

/// A session as this instance last read or wrote it.
#[derive(Debug)]
pub(crate) struct LocalCopy {
    pub(crate) record: Record,
    /// When this instance last renewed the session's idle timeout in
    /// Redis (0: not known to have).
    pub(crate) touched_ms: u64,
}

impl LocalStore {
    /// `pin_limit_bytes`: the bound of the pinned copies.
    pub(crate) fn new(
        capacity_bytes: u64,
        pin_limit_bytes: u64,
        idle: Duration,
        absolute: Duration,
    ) -> Self {
        Self(Arc::new(LocalState::new(
            capacity_bytes,
            pin_limit_bytes,
            idle,
            absolute,
        )))
    }
}

impl LocalState {
    fn new(capacity_bytes: u64, pin_limit_bytes: u64, idle: Duration, absolute: Duration) -> Self {
        Self {
            pinned: Mutex::default(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            stripe_hash: std::hash::RandomState::new(),
            pinned_count: AtomicUsize::new(0),
            pin_limit_bytes,
            copies: moka::sync::Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(|key: &String, copy: &Arc<LocalCopy>| {
                    u32::try_from(key.len() + copy.weight()).unwrap_or(u32::MAX)
                })
                .time_to_idle(idle)
                // Plain LRU: with moka's default admission (TinyLFU) a
                // session created during an outage loses to copies read
                // often before it and is refused, logging its visitor out.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            ended: Ends::new(),
            absolute_ms: duration_ms(absolute),
        }
    }

    /// The session ended: its copy goes, and its end is remembered for a
    /// while.
    pub(crate) fn end(&self, storage_key: &str) {
        self.end_as(storage_key, false);
    }

    /// The session's id was cycled away: [`end`](Self::end), remembering
    /// that the session lives on under another id.
    fn end_cycled(&self, storage_key: &str) {
        self.end_as(storage_key, true);
    }

    /// The session ended (`cycled`: its id was cycled away), here or on
    /// another instance.
    ///
    /// An id known to be cycled away stays known so (a plain end of it
    /// heard later, a logout of the old id for example, does not change
    /// that).
    pub(crate) fn end_as(&self, storage_key: &str, cycled: bool) {
        let _key = self.lock_key(storage_key);
        self.with_pinned(|pinned| pinned.remove(storage_key));
        self.copies.invalidate(storage_key);
        if cycled || !self.was_cycled(storage_key) {
            self.ended.record(storage_key, cycled);
        }
    }

    /// Whether this instance saw the session end recently.
    pub(crate) fn has_ended(&self, storage_key: &str) -> bool {
        self.ended.holds(storage_key)
    }

    /// What a request takes before it reads a session, to ask
    /// [`ended_since`](Self::ended_since) later.
    pub(crate) fn end_mark(&self) -> EndMark {
        self.ended.mark()
    }

    /// Whether the session ended (here or announced) since `mark` was
    /// taken, or may have: an end that came after it was forgotten to
    /// make room (see `ends.rs`).
    pub(crate) fn ended_since(&self, storage_key: &str, mark: EndMark) -> bool {
        self.ended.ended_since(storage_key, mark)
    }

    /// Whether this instance recently cycled the session's id away (a
    /// login): the session lives on under an id the browser may hold.
    pub(crate) fn was_cycled(&self, storage_key: &str) -> bool {
        self.ended.was_cycled(storage_key)
    }

    /// [`was_cycled`](Self::was_cycled), or may have been since `mark` was
    /// taken: an end that came after it was forgotten to make room.
    pub(crate) fn cycled_since(&self, storage_key: &str, mark: EndMark) -> Option<super::Known> {
        self.ended.cycled_since(storage_key, mark)
    }

    /// The local copy, unless it has outlived the absolute timeout.
    pub(crate) fn get(&self, storage_key: &str) -> Option<Record> {
        self.live_record(storage_key, self.copy(storage_key).as_deref())
    }

    /// The record of `copy` (the local copy of `storage_key`, as just read
    /// with [`copy`](Self::copy)), unless it has outlived the absolute
    /// timeout: then the copy is dropped.
    pub(crate) fn live_record(
        &self,
        storage_key: &str,
        copy: Option<&LocalCopy>,
    ) -> Option<Record> {
        let copy = copy?;
        if copy.record.created_ms.saturating_add(self.absolute_ms) <= now_ms() {
            self.end_copy(storage_key);
            return None;
        }
        Some(copy.record.clone())
    }

    /// The local copy as it is, with when it was last renewed.
    pub(crate) fn copy(&self, storage_key: &str) -> Option<Arc<LocalCopy>> {
        self.current(storage_key).or_else(|| {
            // Not found, perhaps because it was moving between the LRU and
            // the pinned copies meanwhile: looked for again, under its
            // stripe.
            let _key = self.lock_key(storage_key);
            self.current(storage_key)
        })
    }

    /// The copy as it is now, pinned or not. Exact with the key's stripe
    /// held (nothing pins, unpins or changes it meanwhile); without it, a
    /// copy moving between the two may be missed.
    fn current(&self, storage_key: &str) -> Option<Arc<LocalCopy>> {
        self.with_pinned(|pinned| pinned.get(storage_key))
            .flatten()
            .or_else(|| self.copies.get(storage_key))
    }

    /// Keeps `record` as the session's copy, unless the session ended
    /// (here, or announced by another instance): false then, and no copy
    /// comes back.
    pub(crate) fn put(&self, storage_key: &str, record: Record, touched_ms: u64) -> bool {
        let copy = Arc::new(LocalCopy { record, touched_ms });
        let _key = self.lock_key(storage_key);
        self.put_locked(storage_key, copy)
    }

    /// [`put`](Self::put) with the key's stripe held.
    fn put_locked(&self, storage_key: &str, copy: Arc<LocalCopy>) -> bool {
        if self.has_ended(storage_key) {
            return false;
        }
        let pinned = self.with_pinned(|pinned| pinned.replace(storage_key, Arc::clone(&copy)));
        if pinned != Some(true) {
            self.copies.insert(storage_key.to_owned(), copy);
        }
        true
    }

    /// The storage keys of the copies outside the pinned ones.
    pub(crate) fn copy_keys(&self) -> Vec<String> {
        self.copies.iter().map(|(key, _)| (*key).clone()).collect()
    }

    /// Drops every copy outside the pinned ones (whose changes still wait
    /// for Redis): they may have missed the end of their session on
    /// another instance.
    pub(crate) fn drop_copies(&self) {
        self.copies.invalidate_all();
    }

    /// Drops the copy (not the memory of an end).
    pub(crate) fn end_copy(&self, storage_key: &str) {
        let _key = self.lock_key(storage_key);
        self.with_pinned(|pinned| pinned.remove(storage_key));
        self.copies.invalidate(storage_key);
    }

    /// Drops the copy unless it is pinned (its session's changes, its
    /// creation perhaps, still wait for Redis: a check that found the
    /// session absent from Redis says nothing of it).
    pub(crate) fn end_unpinned_copy(&self, storage_key: &str) {
        let _key = self.lock_key(storage_key);
        let pinned = self
            .with_pinned(|pinned| pinned.copies.contains_key(storage_key))
            .unwrap_or(false);
        if !pinned {
            self.copies.invalidate(storage_key);
        }
    }

    /// The session has changes waiting for Redis: its copy leaves the LRU
    /// until [`unpin`](Self::unpin), unless the pinned copies are at their
    /// bound. False when it was not pinned.
    pub(crate) fn pin(&self, storage_key: &str) -> bool {
        self.pin_numbered(storage_key).is_some()
    }

    /// [`pin`](Self::pin), answering the pin's number (counted over every
    /// pin, a copy pinned again included): [`unpin_if`](Self::unpin_if)
    /// takes it.
    pub(crate) fn pin_numbered(&self, storage_key: &str) -> Option<u64> {
        let _key = self.lock_key(storage_key);
        let mut pinned = sync::lock(&self.pinned);
        pinned.pins += 1;
        let pins = pinned.pins;
        if let Some(held) = pinned.copies.get_mut(storage_key) {
            held.pin = pins;
            return Some(pins);
        }
        let copy = self.copies.get(storage_key)?;
        if pinned.bytes + weight(storage_key, &copy) > self.pin_limit_bytes {
            drop(pinned);
            tracing::debug!(target: "tower_redis_session", limit_bytes = self.pin_limit_bytes, "the copies of sessions with changes waiting are at their bound; this one stays evictable");
            record::counter("tower_redis_session_unpinned_total", &[], 1);
            return None;
        }
        pinned.insert(storage_key, copy, pins);
        // Counted before it leaves the LRU: a reader without the lock that
        // misses it there looks again among the pinned ones (see `copy`).
        self.pinned_count
            .store(pinned.copies.len(), Ordering::Release);
        drop(pinned);
        // Under the key's stripe: a `put` from now on goes to the pinned
        // copy, and one before it is the copy just pinned.
        self.copies.invalidate(storage_key);
        Some(pins)
    }

    /// The session's changes are in Redis: its copy goes back to the LRU.
    pub(crate) fn unpin(&self, storage_key: &str) {
        let _key = self.lock_key(storage_key);
        self.unpin_locked(storage_key);
    }

    /// [`unpin`](Self::unpin) with the key's stripe held: back in the LRU
    /// before it leaves the pinned copies (a reader without the stripe
    /// finds one or the other), the pinned copies' lock not held over the
    /// LRU's insert.
    fn unpin_locked(&self, storage_key: &str) {
        let Some(copy) = self.with_pinned(|pinned| pinned.get(storage_key)).flatten() else {
            return;
        };
        self.copies.insert(storage_key.to_owned(), copy);
        self.with_pinned(|pinned| pinned.remove(storage_key));
    }

    /// Every change is in Redis: every pinned copy goes back to the LRU.
    pub(crate) fn unpin_all(&self) {
        self.unpin_listed(self.pinned_now());
    }

    /// The copies pinned now, each with the number of its last pin.
    fn pinned_now(&self) -> Vec<(String, u64)> {
        let pinned = sync::lock(&self.pinned);
        pinned
            .copies
            .iter()
            .map(|(key, held)| (key.clone(), held.pin))
            .collect()
    }

    /// Moves the `listed` copies back to the LRU, each under its key's
    /// stripe: an end that runs meanwhile finds its copy pinned or back in
    /// the LRU, and drops it either way (never between the two, to be put
    /// back after the end). A copy pinned after the list was taken, first
    /// or again, stays pinned (the recovery lists them under the outage
    /// queue's lock, where no change is queued, so a pin after it is for a
    /// change already written, which its caller unpins).
    fn unpin_listed(&self, listed: Vec<(String, u64)>) {
        for (storage_key, pin) in listed {
            self.unpin_if(&storage_key, pin);
        }
    }

    /// Moves the copy back to the LRU if its last pin is the one numbered
    /// `pin`: not when it was pinned again since (a change queued
    /// meanwhile, whose copy must stay out of the LRU's eviction).
    pub(crate) fn unpin_if(&self, storage_key: &str, pin: u64) {
        let _key = self.lock_key(storage_key);
        let same = self
            .with_pinned(|pinned| pinned.copies.get(storage_key).map(|held| held.pin) == Some(pin))
            .unwrap_or(false);
        if same {
            self.unpin_locked(storage_key);
        }
    }

    /// Whether any copy is pinned (no lock).
    pub(crate) fn has_pinned(&self) -> bool {
        self.pinned_count.load(Ordering::Acquire) > 0
    }

    /// Runs `f` on the pinned copies when there are any.
    fn with_pinned<T>(&self, f: impl FnOnce(&mut Pinned) -> T) -> Option<T> {
        if !self.has_pinned() {
            return None;
        }
        let mut pinned = sync::lock(&self.pinned);
        let result = f(&mut pinned);
        self.pinned_count
            .store(pinned.copies.len(), Ordering::Release);
        Some(result)
    }

    /// The stripe of `storage_key` (see [`LocalState::stripes`]).
    fn lock_key(&self, storage_key: &str) -> std::sync::MutexGuard<'_, ()> {
        let hash = usize::try_from(
            std::hash::BuildHasher::hash_one(&self.stripe_hash, storage_key) % STRIPES as u64,
        )
        .unwrap_or_default();
        sync::lock(&self.stripes[hash])
    }

    /// Keeps the copy in step with what Redis answered to a read that began
    /// at `started_ms`, with [`end_mark`](Self::end_mark) `mark`; `touched`:
    /// that read renewed the idle timeout.
    pub(crate) fn refresh(
        &self,
        storage_key: &str,
        answer: Option<&Record>,
        copy: Option<Arc<LocalCopy>>,
        touched: bool,
        started_ms: u64,
        mark: EndMark,
    ) {
        match (answer, copy) {
            // Unchanged and not renewed: the copy is already right.
            (Some(record), Some(copy)) if !touched && copy.record == *record => {}
            // A copy for reading through an outage (none comes back when
            // the session ended since the read began, here or announced
            // from another instance, or may have: an end since was
            // forgotten to make room).
            //
            // Only over the copy the read found: a change made meanwhile
            // (its copy is newer than this answer) is not undone.
            (Some(record), copy) => {
                let touched_ms = match &copy {
                    Some(copy) if !touched => copy.touched_ms,
                    _ => started_ms,
                };
                let _key = self.lock_key(storage_key);
                let current = self.current(storage_key);
                let unchanged = match (&current, &copy) {
                    (Some(current), Some(copy)) => Arc::ptr_eq(current, copy),
                    (None, None) => true,
                    _ => false,
                };
                if unchanged && !self.ended_since(storage_key, mark) {
                    let copy = Arc::new(LocalCopy {
                        record: record.clone(),
                        touched_ms,
                    });
                    self.put_locked(storage_key, copy);
                }
            }
            (None, _) => self.end_copy(storage_key),
        }
    }

    /// Applies changes to the local copy (creating it for a new session).
    /// False when there is no copy to change, or the session ended.
    ///
    /// Read, changed and put back under its key's stripe: two requests changing the
    /// same session at once both find their change in the copy.
    pub(crate) fn apply(&self, storage_key: &str, create: Option<u64>, changes: &Changes) -> bool {
        let _key = self.lock_key(storage_key);
        let existing = self.current(storage_key);
        let (mut record, touched_ms) = match (existing, create) {
            (Some(copy), _) => (copy.record.clone(), copy.touched_ms),
            (None, Some(created_ms)) => (
                Record {
                    created_ms,
                    ..Record::default()
                },
                0,
            ),
            (None, None) => return false,
        };
        changes.apply_to(&mut record);
        self.put_locked(storage_key, Arc::new(LocalCopy { record, touched_ms }))
    }

    /// How long an unused copy is kept.
    #[cfg(test)]
    pub(crate) fn idle_timeout(&self) -> Option<Duration> {
        self.copies.policy().time_to_idle()
    }

    /// The approximate bytes the local copies take (pinned ones apart).
    pub(crate) fn copies_bytes(&self) -> u64 {
        self.copies.run_pending_tasks();
        self.copies.weighted_size()
    }

    /// The approximate bytes the pinned copies take.
    pub(crate) fn pinned_bytes(&self) -> u64 {
        sync::lock(&self.pinned).bytes
    }
}

/// In process: what this instance holds. It cannot see other instances'
/// sessions, nor tell a session it never held from one that ended.
impl Store for LocalStore {
    type Error = Infallible;

    async fn load(&self, storage_key: &str, _touch: bool) -> Result<Option<Record>, Infallible> {
        Ok(self.get(storage_key))
    }

    /// [`Saved::Gone`] for an update of a session without a copy here.
    async fn save(&self, write: &Write<'_>) -> Result<Saved, Infallible> {
        Ok(
            if self.apply(write.storage_key, write.create, write.changes) {
                Saved::Written
            } else {
                Saved::Gone
            },
        )
    }

    async fn take(&self, take: &Take<'_>) -> Result<Saved, Infallible> {
        self.end_cycled(take.old_storage_key);
        // A new id never has a copy yet: the request's view is the session
        // (unless the new id already ended: a "log out everywhere" that
        // ran meanwhile announced it).
        self.put(take.new_storage_key, take.merged.clone(), 0);
        Ok(Saved::Written)
    }

    async fn delete(&self, storage_key: &str, _user: Option<&str>) -> Result<(), Infallible> {
        self.end(storage_key);
        Ok(())
    }
}

impl Pinned {
    fn get(&self, storage_key: &str) -> Option<Arc<LocalCopy>> {
        self.copies
            .get(storage_key)
            .map(|held| Arc::clone(&held.copy))
    }

    /// Pins `copy` as pin number `pin` (it was not pinned).
    fn insert(&mut self, storage_key: &str, copy: Arc<LocalCopy>, pin: u64) {
        self.bytes += weight(storage_key, &copy);
        self.copies
            .insert(storage_key.to_owned(), PinnedCopy { copy, pin });
    }

    /// Replaces the copy of a pinned session, which stays pinned as it
    /// was; false (nothing done) when it is not pinned.
    fn replace(&mut self, storage_key: &str, copy: Arc<LocalCopy>) -> bool {
        let Some(held) = self.copies.get_mut(storage_key) else {
            return false;
        };
        let (added, removed) = (weight(storage_key, &copy), weight(storage_key, &held.copy));
        held.copy = copy;
        self.bytes = (self.bytes + added).saturating_sub(removed);
        true
    }

    fn remove(&mut self, storage_key: &str) -> Option<Arc<LocalCopy>> {
        let held = self.copies.remove(storage_key)?;
        self.bytes = self.bytes.saturating_sub(weight(storage_key, &held.copy));
        Some(held.copy)
    }
}

/// A copy's weight with its key, in bytes.
fn weight(storage_key: &str, copy: &LocalCopy) -> u64 {
    u64::try_from(storage_key.len() + copy.weight()).unwrap_or(u64::MAX)
}

impl LocalCopy {
    /// Whether this instance should renew the session's idle timeout in
    /// Redis on a read at `now_ms`, renewing at most once per `every_ms`.
    pub(crate) fn touch_due(copy: Option<&Self>, now_ms: u64, every_ms: u64) -> bool {
        copy.is_none_or(|copy| super::renewal_due(copy.touched_ms, now_ms, every_ms))
    }

    /// The approximate memory this copy takes, beyond its key.
    fn weight(&self) -> usize {
        let fields: usize = self
            .record
            .fields
            .iter()
            .map(|(name, json)| FIELD_OVERHEAD + name.len() + json.len())
            .sum();
        COPY_OVERHEAD + fields + self.record.user.as_ref().map_or(0, String::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned copies stay out of the LRU's eviction, within their own byte
    /// bound: past it a copy stays evictable; unpinned, it is an ordinary
    /// copy again.
    #[test]
    fn pinned_copies_survive_a_flood_within_their_bound() {
        let record = |bytes: usize| Record {
            fields: std::sync::Arc::new([("blob".to_owned(), "x".repeat(bytes))].into()),
            created_ms: now_ms(),
            ..Record::default()
        };
        let local = LocalStore::new(
            16 * 1024,
            4 * 1024,
            Duration::from_secs(60),
            Duration::from_secs(3600),
        );
        local.put("victim", record(1000), 0);
        local.put("too-big", record(5000), 0);
        assert!(local.pin("victim"));
        assert!(!local.pin("too-big"), "past the pinned bound");
        assert!(!local.pin("never-held"), "nothing to pin");
        for n in 0..200 {
            local.put(&format!("flood-{n}"), record(500), 0);
        }
        local.copies.run_pending_tasks();
        assert!(local.copies_bytes() <= 16 * 1024);
        assert!(local.get("victim").is_some(), "the pinned copy survives");
        assert!(
            local.get("too-big").is_none(),
            "the unpinned one was evicted"
        );
        assert!(local.pinned_bytes() <= 4 * 1024);
        local.unpin("victim");
        assert!(!local.has_pinned());
        assert_eq!(local.pinned_bytes(), 0);
        assert!(local.get("victim").is_some(), "back in the LRU");
    }

    /// Runs `test` (threads racing each other) with a deadline: a deadlock
    /// fails the test instead of hanging it.
    fn within_a_minute(test: impl FnOnce() + Send + 'static) {
        let (done, finished) = std::sync::mpsc::channel();
        let runner = std::thread::spawn(move || {
            test();
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => runner.join().expect("test thread"),
            // It panicked: its panic is the failure.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(runner.join().expect_err("it panicked"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("no end within a minute"),
        }
    }

    /// A reader without the lock never misses a copy that exists, while it
    /// moves between the LRU and the pinned copies (pinned and unpinned as
    /// changes wait for Redis and reach it).
    #[test]
    fn a_copy_moving_in_and_out_of_the_pinned_ones_is_always_found() {
        within_a_minute(|| {
            let local = store();
            local.put("other", live_record(), 0);
            assert!(local.pin("other"), "so that reads look among the pinned");
            local.put("moving", live_record(), 0);
            let moves = std::sync::atomic::AtomicBool::new(true);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    for _ in 0..20_000 {
                        assert!(local.pin("moving"));
                        local.unpin("moving");
                    }
                    moves.store(false, Ordering::Release);
                });
                let mut reads = 0_u64;
                while moves.load(Ordering::Acquire) {
                    assert!(local.copy("moving").is_some(), "missed after {reads} reads");
                    reads += 1;
                }
            });
        });
    }

    fn store() -> LocalStore {
        LocalStore::new(
            64 << 20,
            64 << 20,
            Duration::from_secs(60),
            Duration::from_secs(3600),
        )
    }

    fn live_record() -> Record {
        Record {
            created_ms: now_ms(),
            ..Record::default()
        }
    }

    /// A copy is pinned by a change queued in an outage, and unpinned by
    /// the same request when its change was written meanwhile (the
    /// recovery ran between the queueing and the pin). Another request's
    /// change queued in between pins it again: that pin stands, and the
    /// copy stays out of the LRU's eviction while its change waits. The
    /// same holds for the pinned copies going back at the end of an
    /// outage. Without the pin's number the first request's unpin (and the
    /// list) moved it back.
    #[test]
    fn a_copy_pinned_again_meanwhile_stays_pinned() {
        let local = store();
        for key in ["again", "done", "listed"] {
            local.put(key, live_record(), 0);
        }
        let first = local.pin_numbered("again").expect("pinned");
        assert!(local.pin("again"), "pinned again: another change waits");
        local.unpin_if("again", first);
        let done = local.pin_numbered("done").expect("pinned");
        local.unpin_if("done", done);
        let pinned = |key: &str| sync::lock(&local.pinned).copies.contains_key(key);
        assert!(pinned("again"), "moved back to the LRU");
        assert!(!pinned("done"), "still pinned");
        assert!(local.copy("done").is_some(), "back in the LRU");
        // The end of an outage: the copies pinned then, listed; one pinned
        // again after the listing stays.
        assert!(local.pin("listed"));
        let listed = local.pinned_now();
        assert!(local.pin("listed"), "pinned again after the listing");
        local.unpin_listed(listed);
        assert!(pinned("listed"), "listed: moved back");
        assert!(
            !pinned("again"),
            "listed and not pinned since: still pinned"
        );
    }

    /// Redis came back and the pinned copies go back to the LRU while
    /// sessions are logged out: no copy of a logged-out session is put back
    /// after its end (it would be served in the next outage).
    #[test]
    fn an_end_while_the_pinned_copies_go_back_is_not_undone() {
        within_a_minute(|| {
            const SESSIONS: usize = 2000;
            let key = |n: usize| format!("session-{n}");
            for round in 0..20 {
                let local = store();
                for n in 0..SESSIONS {
                    local.put(&key(n), live_record(), 0);
                    assert!(local.pin(&key(n)));
                }
                let start = std::sync::Barrier::new(2);
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        start.wait();
                        local.unpin_all();
                    });
                    start.wait();
                    // Every other round the ends run while the copies go back;
                    // the others wait until no copy is said to be pinned: the
                    // copies are all back then.
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while round % 2 == 0 && local.has_pinned() {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "unpin_all never ended"
                        );
                        std::thread::yield_now();
                    }
                    for n in (0..SESSIONS).rev() {
                        local.end(&key(n));
                    }
                });
                let back: Vec<usize> = (0..SESSIONS)
                    .filter(|&n| local.get(&key(n)).is_some())
                    .collect();
                assert!(
                    back.is_empty(),
                    "round {round}: {} ended sessions have a copy again",
                    back.len()
                );
            }
        });
    }

    /// Reads from Redis put copies while the same sessions are logged out:
    /// once both are done, no logged-out session has a copy.
    #[test]
    fn an_end_racing_a_read_s_copy_is_not_undone() {
        within_a_minute(|| {
            const SESSIONS: usize = 5000;
            let key = |n: usize| format!("session-{n}");
            for round in 0..4 {
                let local = store();
                let start = std::sync::Barrier::new(2);
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        start.wait();
                        for n in 0..SESSIONS {
                            local.refresh(
                                &key(n),
                                Some(&live_record()),
                                None,
                                true,
                                now_ms(),
                                local.end_mark(),
                            );
                        }
                    });
                    start.wait();
                    for n in 0..SESSIONS {
                        local.end(&key(n));
                    }
                });
                let back = (0..SESSIONS)
                    .filter(|&n| local.get(&key(n)).is_some())
                    .count();
                assert_eq!(back, 0, "round {round}: ended sessions with a copy");
            }
        });
    }

    /// An ended session gets no copy back: not from a read that began
    /// before its end, nor from a change made meanwhile.
    #[test]
    fn an_ended_session_gets_no_copy_back() {
        let local = store();
        local.put("ended", live_record(), 0);
        local.end("ended");
        assert!(!local.put("ended", live_record(), 0));
        local.refresh(
            "ended",
            Some(&live_record()),
            None,
            true,
            now_ms(),
            local.end_mark(),
        );
        let changes = Changes {
            entries: [("k".to_owned(), Some("1".to_owned()))].into(),
            user: None,
        };
        assert!(!local.apply("ended", Some(now_ms()), &changes));
        assert!(local.get("ended").is_none());
        assert!(local.copy("ended").is_none());
    }

    /// A read that began before a session's end puts no copy back, even
    /// once a flood of ends has pushed that end out of the memory: the
    /// memory knows it forgot an end newer than the read's mark. A read
    /// that began after the flood makes its copy.
    #[test]
    fn a_read_that_began_before_a_flood_of_ends_puts_no_copy_back() {
        let local = store();
        let mark = local.end_mark();
        local.end("ended");
        for n in 0..30_000 {
            local.end(&format!("flood-{n:037}"));
        }
        assert!(!local.has_ended("ended"), "pushed out by the flood");
        local.refresh("ended", Some(&live_record()), None, true, now_ms(), mark);
        assert!(local.copy("ended").is_none(), "a copy came back");
        let mark = local.end_mark();
        local.refresh("later", Some(&live_record()), None, true, now_ms(), mark);
        assert!(local.copy("later").is_some());
    }

    /// A read from Redis that returns after a change to the copy (made by
    /// a write that came later) does not put its older answer over it.
    #[test]
    fn a_read_that_returns_after_a_change_does_not_undo_it() {
        let local = store();
        local.put("session", live_record(), 0);
        let read_found = local.copy("session");
        let answer = read_found.as_ref().expect("copy").record.clone();
        let changes = Changes {
            entries: [("role".to_owned(), Some("\"admin\"".to_owned()))].into(),
            user: None,
        };
        assert!(local.apply("session", None, &changes));
        local.refresh(
            "session",
            Some(&answer),
            read_found,
            true,
            now_ms(),
            local.end_mark(),
        );
        let copy = local.get("session").expect("copy");
        assert_eq!(
            copy.fields.get("role").map(String::as_str),
            Some("\"admin\""),
            "the older answer replaced the change"
        );
    }

    /// Two requests change one session at once (in an outage the copy is
    /// what every read sees): each finds its change in the copy.
    #[test]
    fn changes_made_at_once_are_all_in_the_copy() {
        within_a_minute(|| {
            const CHANGES: usize = 400;
            let local = store();
            local.put("shared", live_record(), 0);
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                for side in ["a", "b"] {
                    let (local, start) = (&local, &start);
                    scope.spawn(move || {
                        start.wait();
                        for n in 0..CHANGES {
                            let changes = Changes {
                                entries: [(format!("{side}-{n}"), Some("1".to_owned()))].into(),
                                user: None,
                            };
                            assert!(local.apply("shared", None, &changes));
                        }
                    });
                }
            });
            let kept = local.get("shared").expect("copy").fields.len();
            assert_eq!(kept, 2 * CHANGES, "{} changes lost", 2 * CHANGES - kept);
        });
    }

    /// A flood of ended sessions (logins cycle ids, logouts) must not stop
    /// the instance from remembering the next one: the oldest end is
    /// forgotten first, so the newest always stays.
    #[test]
    fn a_full_ended_memory_still_remembers_the_newest_end() {
        let local = LocalStore::new(
            1 << 20,
            1 << 20,
            Duration::from_secs(60),
            Duration::from_secs(3600),
        );
        for n in 0..30_000 {
            local.end(&format!("flood-{n:040}"));
        }
        for n in 0..100 {
            let key = format!("victim-{n:039}");
            local.end(&key);
            assert!(local.has_ended(&key), "marker {n} was refused");
        }
        assert!(
            local.ended.bytes() <= super::super::ends::ENDED_BYTES,
            "{} bytes",
            local.ended.bytes()
        );
    }
}
