//! The outage queue: session changes made while Redis was unavailable,
//! waiting to be written to Redis in the order they were made.
//!
//! - **Bounded by bytes.** Every queued change has an approximate weight
//!   (its session key, entry names, JSON values and user, plus a fixed
//!   allowance for the bookkeeping). A save that does not fit is refused:
//!   nothing already queued is ever dropped to make room.
//! - **Deletions always fit.** A log out is never refused nor dropped. A
//!   deletion replaces the changes queued for its session, so deletions can
//!   only take the queue over its bound by the sessions this instance held
//!   copies of before the outage (themselves bounded by bytes): an attacker
//!   who creates and destroys sessions during the outage fills the queue
//!   with deletions and is then refused new sessions, while the deletions
//!   already queued (a victim's log out among them) stay.
//! - **Indexed by session.** Whether a session has changes waiting (asked
//!   on every read during and after an outage) is one hash lookup, never a
//!   scan of the queue.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tower_redis_core::sync::lock;

use super::Changes;

/// The bookkeeping of one queued change, in bytes, beyond its own data: the
/// ordered map's slot, the index entry, the strings' headers.
const CHANGE_OVERHEAD: usize = 192;
/// The bookkeeping of one entry of a queued save.
const ENTRY_OVERHEAD: usize = 48;

/// A change waiting for Redis.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Save {
        /// `Some(created_ms)` when the session was created during the outage.
        create: Option<u64>,
        changes: Changes,
        /// When the change was made, for the per-entry "newer wins" rule.
        at_ms: u64,
    },
    Delete {
        user: Option<String>,
    },
}

/// One queued change, as the reconciler takes it.
#[derive(Debug)]
pub(crate) struct Queued {
    /// Its place in the queue: older changes have smaller numbers.
    seq: u64,
    pub(crate) storage_key: String,
    pub(crate) change: Pending,
    weight: usize,
}

/// A save was refused: it does not fit in the queue's byte bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueFull {
    /// The queue's bound.
    pub(crate) limit_bytes: usize,
}

/// See the module documentation.
pub(crate) struct OutageQueue {
    inner: Mutex<Inner>,
    /// Changes queued or being written, readable without the lock: a read
    /// checks it on every request, and it is zero outside outages.
    len: AtomicUsize,
    limit_bytes: usize,
}

#[derive(Default)]
struct Inner {
    /// Queued changes by sequence number, oldest first.
    changes: BTreeMap<u64, Queued>,
    next_seq: u64,
    /// Sessions with changes queued or being written.
    index: HashMap<String, Waiting>,
    /// Changes taken by the reconciler and not yet settled.
    writing: usize,
    /// The weight of everything queued or being written.
    bytes: usize,
}

/// What one session has waiting.
#[derive(Default)]
struct Waiting {
    /// Sequence numbers of its queued changes.
    queued: Vec<u64>,
    /// Its changes the reconciler has taken and not yet settled: until they
    /// are in Redis, this instance's copy is the newer one.
    writing: usize,
}

impl OutageQueue {
    pub(crate) fn new(limit_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            len: AtomicUsize::new(0),
            limit_bytes,
        }
    }

    /// Queues a save, unless it does not fit.
    pub(crate) fn push_save(
        &self,
        storage_key: &str,
        create: Option<u64>,
        changes: &Changes,
        at_ms: u64,
    ) -> Result<(), QueueFull> {
        let weight = save_weight(storage_key, changes);
        let mut inner = lock(&self.inner);
        if inner.bytes.saturating_add(weight) > self.limit_bytes {
            return Err(self.full());
        }
        inner.push(
            storage_key,
            Pending::Save {
                create,
                changes: changes.clone(),
                at_ms,
            },
            weight,
        );
        self.publish_len(&inner);
        Ok(())
    }

    /// Queues a deletion. Always accepted: it replaces the session's queued
    /// changes, and is never dropped.
    pub(crate) fn push_delete(&self, storage_key: &str, user: Option<&str>) {
        let mut inner = lock(&self.inner);
        inner.push_delete(storage_key, user);
        self.publish_len(&inner);
    }

    /// Queues the two halves of an id change, or neither: the deletion of the
    /// old key and the creation of the new one. Refused (nothing queued, the
    /// old session intact) when the creation does not fit.
    pub(crate) fn push_cycle(
        &self,
        old_storage_key: &str,
        user: Option<&str>,
        new_storage_key: &str,
        created_ms: u64,
        full: &Changes,
        at_ms: u64,
    ) -> Result<(), QueueFull> {
        let weight = save_weight(new_storage_key, full);
        let mut inner = lock(&self.inner);
        // The room the deletion leaves, counted before deciding.
        let freed: usize = inner.index.get(old_storage_key).map_or(0, |waiting| {
            waiting
                .queued
                .iter()
                .filter_map(|seq| inner.changes.get(seq))
                .map(|queued| queued.weight)
                .sum()
        });
        let after = inner.bytes.saturating_sub(freed) + delete_weight(old_storage_key, user);
        if after.saturating_add(weight) > self.limit_bytes {
            return Err(self.full());
        }
        inner.push_delete(old_storage_key, user);
        inner.push(
            new_storage_key,
            Pending::Save {
                create: Some(created_ms),
                changes: full.clone(),
                at_ms,
            },
            weight,
        );
        self.publish_len(&inner);
        Ok(())
    }

    /// Whether changes to this session are waiting for Redis (queued, or
    /// taken by the reconciler and not yet written). One hash lookup.
    pub(crate) fn contains(&self, storage_key: &str) -> bool {
        self.len.load(Ordering::Acquire) > 0 && lock(&self.inner).index.contains_key(storage_key)
    }

    /// Changes queued or being written.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Their weight in bytes.
    pub(crate) fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }

    /// Takes every queued change, oldest first, for writing. Each must be
    /// given back to [`written`](Self::written) or [`requeue`](Self::requeue);
    /// until then its session counts as waiting and its weight as used.
    pub(crate) fn take(&self) -> Vec<Queued> {
        let mut inner = lock(&self.inner);
        let taken = std::mem::take(&mut inner.changes);
        inner.writing += taken.len();
        self.publish_len(&inner);
        for waiting in inner.index.values_mut() {
            waiting.writing += waiting.queued.len();
            waiting.queued.clear();
        }
        taken.into_values().collect()
    }

    /// A taken change is in Redis (or was settled there).
    pub(crate) fn written(&self, queued: &Queued) {
        let mut inner = lock(&self.inner);
        inner.writing = inner.writing.saturating_sub(1);
        inner.bytes = inner.bytes.saturating_sub(queued.weight);
        if let Entry::Occupied(mut entry) = inner.index.entry(queued.storage_key.clone()) {
            let waiting = entry.get_mut();
            waiting.writing = waiting.writing.saturating_sub(1);
            if waiting.writing == 0 && waiting.queued.is_empty() {
                entry.remove();
            }
        }
        self.publish_len(&inner);
    }

    /// Puts back taken changes that could not be written. They keep their
    /// place: ahead of anything queued since.
    pub(crate) fn requeue(&self, failed: Vec<Queued>) {
        if failed.is_empty() {
            return;
        }
        let mut inner = lock(&self.inner);
        for queued in failed {
            inner.writing = inner.writing.saturating_sub(1);
            let waiting = inner.index.entry(queued.storage_key.clone()).or_default();
            waiting.writing = waiting.writing.saturating_sub(1);
            waiting.queued.push(queued.seq);
            inner.changes.insert(queued.seq, queued);
        }
        self.publish_len(&inner);
    }

    fn full(&self) -> QueueFull {
        QueueFull {
            limit_bytes: self.limit_bytes,
        }
    }

    fn publish_len(&self, inner: &Inner) {
        self.len
            .store(inner.changes.len() + inner.writing, Ordering::Release);
    }
}

impl Inner {
    fn push(&mut self, storage_key: &str, change: Pending, weight: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.index
            .entry(storage_key.to_owned())
            .or_default()
            .queued
            .push(seq);
        self.changes.insert(
            seq,
            Queued {
                seq,
                storage_key: storage_key.to_owned(),
                change,
                weight,
            },
        );
        self.bytes = self.bytes.saturating_add(weight);
    }

    fn push_delete(&mut self, storage_key: &str, user: Option<&str>) {
        // The session's queued changes are replaced by its end. Changes
        // already being written stay ahead of the deletion.
        if let Some(waiting) = self.index.get_mut(storage_key) {
            for seq in std::mem::take(&mut waiting.queued) {
                if let Some(removed) = self.changes.remove(&seq) {
                    self.bytes = self.bytes.saturating_sub(removed.weight);
                }
            }
        }
        self.push(
            storage_key,
            Pending::Delete {
                user: user.map(str::to_owned),
            },
            delete_weight(storage_key, user),
        );
    }
}

/// The approximate memory a queued save takes.
pub(crate) fn save_weight(storage_key: &str, changes: &Changes) -> usize {
    let entries: usize = changes
        .entries
        .iter()
        .map(|(name, value)| ENTRY_OVERHEAD + name.len() + value.as_ref().map_or(0, String::len))
        .sum();
    CHANGE_OVERHEAD + 2 * storage_key.len() + entries + changes.user.as_ref().map_or(0, String::len)
}

fn delete_weight(storage_key: &str, user: Option<&str>) -> usize {
    CHANGE_OVERHEAD + 2 * storage_key.len() + user.map_or(0, str::len)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

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

    fn keys_of(taken: &[Queued]) -> Vec<(&str, bool)> {
        taken
            .iter()
            .map(|q| {
                (
                    q.storage_key.as_str(),
                    matches!(q.change, Pending::Delete { .. }),
                )
            })
            .collect()
    }

    /// Whether a session has changes waiting is asked on every read while
    /// anything is queued: one hash lookup, whatever the queue's length. A
    /// scan of 50 000 changes per lookup takes minutes for 100 000 lookups;
    /// the index answers in milliseconds.
    #[test]
    fn pending_lookup_is_constant_time() {
        let queue = OutageQueue::new(usize::MAX);
        let n = 50_000;
        for i in 0..n {
            queue
                .push_save(&key(i), Some(1), &Changes::default(), 1)
                .expect("unbounded");
        }
        let started = Instant::now();
        for i in 0..n {
            assert!(queue.contains(&key(i)));
            assert!(!queue.contains(&format!("x{i:042}")));
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{i} lookups took {:?}: the lookup scans the queue",
                started.elapsed()
            );
        }
        // Sessions being written still count, through the same index.
        let taken = queue.take();
        assert!(queue.contains(&key(7)));
        for queued in &taken {
            queue.written(queued);
        }
        assert!(!queue.contains(&key(7)));
        assert_eq!((queue.len(), queue.bytes()), (0, 0));
        assert!(lock(&queue.inner).index.is_empty(), "the index is emptied");
    }

    #[test]
    fn deletes_are_never_dropped_and_saves_that_do_not_fit_are_refused() {
        let limit = 4 * 1024;
        let queue = OutageQueue::new(limit);
        queue.push_delete(&key(0), Some("victim"));
        // An attacker creates and destroys sessions.
        let mut refused = 0;
        for i in 1..1_000 {
            match queue.push_save(&key(i), Some(1), &changes(100), 1) {
                Ok(()) => queue.push_delete(&key(i), None),
                Err(full) => {
                    assert_eq!(full.limit_bytes, limit);
                    refused += 1;
                }
            }
            assert!(queue.bytes() <= limit, "{} > {limit}", queue.bytes());
        }
        assert!(refused > 900, "{refused}");
        // A log out still goes in when the queue is full.
        queue.push_delete(&key(5_000), None);
        let taken = queue.take();
        assert_eq!(keys_of(&taken[..1]), [(key(0).as_str(), true)]);
        assert!(
            taken
                .iter()
                .all(|q| matches!(q.change, Pending::Delete { .. }))
        );
        assert_eq!(
            taken.last().map(|q| q.storage_key.clone()),
            Some(key(5_000))
        );
    }

    #[test]
    fn a_delete_replaces_the_sessions_queued_changes_and_frees_their_bytes() {
        let queue = OutageQueue::new(usize::MAX);
        queue
            .push_save(&key(1), Some(1), &changes(1000), 1)
            .expect("fits");
        queue
            .push_save(&key(2), Some(1), &changes(10), 1)
            .expect("fits");
        queue
            .push_save(&key(1), None, &changes(1000), 2)
            .expect("fits");
        let before = queue.bytes();
        queue.push_delete(&key(1), Some("u"));
        assert!(
            queue.bytes() < before - 2000,
            "{} vs {before}",
            queue.bytes()
        );
        assert_eq!(queue.len(), 2);
        let taken = queue.take();
        assert_eq!(
            keys_of(&taken),
            [(key(2).as_str(), false), (key(1).as_str(), true)]
        );
    }

    #[test]
    fn requeued_changes_keep_their_place_ahead_of_newer_ones() {
        let queue = OutageQueue::new(usize::MAX);
        for i in 0..3 {
            queue
                .push_save(&key(i), Some(1), &changes(10), 1)
                .expect("fits");
        }
        let mut taken = queue.take();
        // A change made while the first pass runs.
        queue
            .push_save(&key(9), Some(1), &changes(10), 2)
            .expect("fits");
        let written = taken.remove(1);
        queue.written(&written);
        queue.requeue(taken);
        assert!(!queue.contains(&key(1)));
        assert!(queue.contains(&key(0)) && queue.contains(&key(2)));
        let again = queue.take();
        assert_eq!(
            keys_of(&again),
            [
                (key(0).as_str(), false),
                (key(2).as_str(), false),
                (key(9).as_str(), false)
            ]
        );
    }

    #[test]
    fn a_cycle_is_queued_whole_or_not_at_all() {
        let queue = OutageQueue::new(2 * 1024);
        queue
            .push_save(&key(1), Some(1), &changes(600), 1)
            .expect("fits");
        // The old session's queued creation makes room for the new one.
        queue
            .push_cycle(&key(1), Some("u"), &key(2), 1, &changes(600), 2)
            .expect("fits once the old session's changes are replaced");
        assert_eq!(queue.len(), 2);
        // Not enough room for the new session: nothing changes.
        let before = (queue.len(), queue.bytes());
        assert!(
            queue
                .push_cycle(&key(2), None, &key(3), 1, &changes(1900), 3)
                .is_err()
        );
        assert_eq!((queue.len(), queue.bytes()), before);
        assert!(queue.contains(&key(2)) && !queue.contains(&key(3)));
        let taken = queue.take();
        assert_eq!(
            keys_of(&taken),
            [(key(1).as_str(), true), (key(2).as_str(), false)]
        );
    }
}
