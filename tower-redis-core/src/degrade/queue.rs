//! The outage queue: changes made while Redis was unavailable, in the order
//! they were made, bounded by bytes and indexed by key.
//!
//! - **Bounded by bytes.** A change that does not fit is refused; nothing
//!   already queued is dropped to make room.
//! - **Deletes always fit.** A delete is never refused nor dropped. It
//!   replaces the changes queued for its key (not those already being
//!   written, nor those that outlive a delete, which stay ahead of it), so
//!   deletes only take the queue over its bound by the keys that had
//!   changes before them.
//! - **Merged by key.** A change its key's newest queued change can absorb
//!   ([`Deferred::merge`]) takes no new room: one client repeating a change
//!   cannot fill the queue. Whether a change fits is measured after the
//!   merge, so a repeated change still fits a nearly full queue.
//! - **Indexed by key.** "Does this key have changes waiting" is one hash
//!   lookup, and no lock at all while the queue is empty.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Deferred, QueueFull, QueueUsage};

pub(crate) struct OutageQueue<C> {
    inner: Mutex<Inner<C>>,
    /// Changes queued or being written, readable without the lock.
    len: AtomicUsize,
    limit_bytes: usize,
}

struct Inner<C> {
    /// Queued changes by sequence number, oldest first.
    changes: BTreeMap<u64, Queued<C>>,
    next_seq: u64,
    /// Keys with changes queued or being written.
    index: HashMap<String, Waiting>,
    /// Changes taken for writing and not yet settled.
    writing: usize,
    /// The weight of everything queued or being written.
    bytes: usize,
}

struct Queued<C> {
    weight: usize,
    change: C,
}

/// What one key has waiting.
#[derive(Default)]
struct Waiting {
    /// Sequence numbers of its queued changes, oldest first.
    queued: VecDeque<u64>,
    /// Its changes taken for writing and not yet settled.
    writing: usize,
}

/// One key in [`Inner::bytes_after`]: its newest queued change as the
/// pushes would leave it (with its weight), and the weight a delete would
/// replace (its queued changes, not counting those being written nor those
/// that outlive a delete).
type Simulated<C> = (Option<(C, usize)>, usize);

/// Changes taken from the front of the queue, oldest first, until
/// [`OutageQueue::settle`] is told how many of them were written.
pub(crate) struct Batch<C> {
    slots: Vec<(u64, usize)>,
    pub(crate) changes: Vec<C>,
}

impl<C: Deferred> OutageQueue<C> {
    pub(crate) fn new(limit_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                changes: BTreeMap::new(),
                next_seq: 0,
                index: HashMap::new(),
                writing: 0,
                bytes: 0,
            }),
            len: AtomicUsize::new(0),
            limit_bytes,
        }
    }

    /// Queues `changes` in order, all or none: refused when the queue would
    /// hold more than its bound once they are in (the deletes among them
    /// having replaced what they replace, and merges counted at their merged
    /// weight). A batch of deletes only is always accepted.
    /// `and_then` runs under the queue's lock once the changes are in.
    pub(crate) fn push_all(
        &self,
        changes: Vec<C>,
        and_then: impl FnOnce(),
    ) -> Result<(), QueueFull> {
        let mut inner = self.lock();
        if changes.iter().any(|c| !c.is_delete()) && inner.bytes_after(&changes) > self.limit_bytes
        {
            return Err(QueueFull {
                limit_bytes: self.limit_bytes,
            });
        }
        for change in changes {
            inner.push(change);
        }
        and_then();
        self.publish_len(&inner);
        Ok(())
    }

    /// Whether `key` has changes queued or being written.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.len.load(Ordering::Acquire) > 0 && self.lock().index.contains_key(key)
    }

    /// Whether `key` has changes still queued, not counting those being
    /// written.
    pub(crate) fn is_queued(&self, key: &str) -> bool {
        self.len.load(Ordering::Acquire) > 0
            && self
                .lock()
                .index
                .get(key)
                .is_some_and(|waiting| !waiting.queued.is_empty())
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub(crate) fn usage(&self) -> QueueUsage {
        let inner = self.lock();
        QueueUsage {
            changes: inner.changes.len() + inner.writing,
            bytes: inner.bytes,
            limit_bytes: self.limit_bytes,
        }
    }

    /// Runs `f` under the queue's lock when nothing is queued nor being
    /// written; returns whether it ran.
    pub(crate) fn if_empty(&self, f: impl FnOnce()) -> bool {
        let inner = self.lock();
        let empty = inner.changes.is_empty() && inner.writing == 0;
        if empty {
            f();
        }
        empty
    }

    /// Takes up to `max` changes from the front, passing over the changes
    /// of the `held` keys (a key whose oldest change failed keeps its later
    /// ones back; other keys go on). Until they are settled, their keys
    /// count as waiting and their weight as used.
    pub(crate) fn take(&self, max: usize, held: &HashSet<String>) -> Batch<C> {
        let mut inner = self.lock();
        let mut batch = Batch {
            slots: Vec::new(),
            changes: Vec::new(),
        };
        let seqs: Vec<u64> = inner
            .changes
            .iter()
            .filter(|(_, queued)| held.is_empty() || !held.contains(queued.change.key()))
            .take(max)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in seqs {
            let Some(queued) = inner.changes.remove(&seq) else {
                continue;
            };
            if let Some(waiting) = inner.index.get_mut(queued.change.key()) {
                // Taken oldest first: it is the front of its key's list.
                if waiting.queued.front() == Some(&seq) {
                    waiting.queued.pop_front();
                } else {
                    waiting.queued.retain(|queued_seq| *queued_seq != seq);
                }
                waiting.writing += 1;
            }
            batch.slots.push((seq, queued.weight));
            batch.changes.push(queued.change);
        }
        inner.writing += batch.changes.len();
        self.publish_len(&inner);
        batch
    }

    /// The first `written` changes of `batch` are in Redis; the others go
    /// back to the front of the queue, in their order, ahead of anything
    /// queued since. Returns the weight settled.
    pub(crate) fn settle(&self, batch: Batch<C>, written: usize) -> usize {
        let mut inner = self.lock();
        let mut settled = 0;
        for (i, ((seq, weight), change)) in batch.slots.into_iter().zip(batch.changes).enumerate() {
            inner.writing = inner.writing.saturating_sub(1);
            let Entry::Occupied(mut entry) = inner.index.entry(change.key().to_owned()) else {
                continue;
            };
            let waiting = entry.get_mut();
            waiting.writing = waiting.writing.saturating_sub(1);
            if i < written {
                if waiting.writing == 0 && waiting.queued.is_empty() {
                    entry.remove();
                }
                inner.bytes = inner.bytes.saturating_sub(weight);
                settled += weight;
            } else {
                // Older than anything of its key queued since: near the front.
                let at = waiting
                    .queued
                    .partition_point(|queued_seq| *queued_seq < seq);
                waiting.queued.insert(at, seq);
                inner.changes.insert(seq, Queued { weight, change });
            }
        }
        self.publish_len(&inner);
        settled
    }

    fn publish_len(&self, inner: &Inner<C>) {
        self.len
            .store(inner.changes.len() + inner.writing, Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<C>> {
        crate::sync::lock(&self.inner)
    }
}

impl<C: Deferred> Inner<C> {
    /// The weight the queue would hold after pushing `changes`: the same
    /// steps as [`push`](Self::push), on copies of the newest queued change
    /// of each key they touch, so the queue itself is not changed.
    fn bytes_after(&self, changes: &[C]) -> usize {
        let mut keys: HashMap<&str, Simulated<C>> = HashMap::new();
        let mut bytes = self.bytes;
        for change in changes {
            let (newest, queued) = keys.entry(change.key()).or_insert_with(|| {
                let newest = self
                    .index
                    .get(change.key())
                    .and_then(|waiting| waiting.queued.back())
                    .and_then(|seq| self.changes.get(seq))
                    .map(|queued| (queued.change.clone(), queued.weight));
                (newest, self.replaceable_weight(change.key()))
            });
            let weight = change.weight();
            if change.is_delete() {
                bytes = bytes.saturating_sub(*queued).saturating_add(weight);
                *queued = weight;
            } else if change.outlives_delete() {
                bytes = bytes.saturating_add(weight);
            } else if let Some((merged, old)) = newest
                && !merged.outlives_delete()
                && merged.merge(change)
            {
                let new = merged.weight();
                bytes = bytes.saturating_sub(*old).saturating_add(new);
                *queued = queued.saturating_sub(*old).saturating_add(new);
                *old = new;
                continue;
            } else {
                bytes = bytes.saturating_add(weight);
                *queued = queued.saturating_add(weight);
            }
            *newest = Some((change.clone(), weight));
        }
        bytes
    }

    /// The weight of `key`'s queued changes that a delete replaces.
    fn replaceable_weight(&self, key: &str) -> usize {
        self.index.get(key).map_or(0, |waiting| {
            waiting
                .queued
                .iter()
                .filter_map(|seq| self.changes.get(seq))
                .filter(|queued| !queued.change.outlives_delete())
                .map(|queued| queued.weight)
                .sum()
        })
    }

    fn push(&mut self, change: C) {
        // A change that outlives a delete neither absorbs nor is absorbed
        // (a later delete would otherwise drop it with the change it merged
        // into), as `bytes_after` counts it.
        if !change.is_delete()
            && !change.outlives_delete()
            && let Some(waiting) = self.index.get(change.key())
            && let Some(newest) = waiting.queued.back()
            && let Some(queued) = self.changes.get_mut(newest)
            && !queued.change.outlives_delete()
            && queued.change.merge(&change)
        {
            let weight = queued.change.weight();
            self.bytes = self
                .bytes
                .saturating_sub(queued.weight)
                .saturating_add(weight);
            queued.weight = weight;
            return;
        }
        if change.is_delete()
            && let Some(waiting) = self.index.get_mut(change.key())
        {
            // The key's queued changes are replaced by the delete; those
            // being written, and those that outlive a delete, stay ahead of
            // it.
            let queued = std::mem::take(&mut waiting.queued);
            for seq in queued {
                if self
                    .changes
                    .get(&seq)
                    .is_some_and(|queued| queued.change.outlives_delete())
                {
                    waiting.queued.push_back(seq);
                } else if let Some(removed) = self.changes.remove(&seq) {
                    self.bytes = self.bytes.saturating_sub(removed.weight);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let weight = change.weight();
        self.index
            .entry(change.key().to_owned())
            .or_default()
            .queued
            .push_back(seq);
        self.bytes = self.bytes.saturating_add(weight);
        self.changes.insert(seq, Queued { weight, change });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test change: a key, a weight, whether it deletes, and whether it
    /// outlives a later delete.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Change(String, usize, bool, bool);

    impl Deferred for Change {
        fn key(&self) -> &str {
            &self.0
        }
        fn weight(&self) -> usize {
            self.1
        }
        fn is_delete(&self) -> bool {
            self.2
        }
        fn outlives_delete(&self) -> bool {
            self.3
        }
    }

    fn save(key: &str, weight: usize) -> Change {
        Change(key.to_owned(), weight, false, false)
    }

    fn delete(key: &str) -> Change {
        Change(key.to_owned(), 10, true, false)
    }

    fn lasting(key: &str, weight: usize) -> Change {
        Change(key.to_owned(), weight, false, true)
    }

    fn push(queue: &OutageQueue<Change>, change: Change) -> Result<(), QueueFull> {
        queue.push_all(vec![change], || {})
    }

    fn drain(queue: &OutageQueue<Change>) -> Vec<Change> {
        let batch = queue.take(usize::MAX, &HashSet::new());
        let changes = batch.changes.clone();
        queue.settle(batch, changes.len());
        changes
    }

    #[test]
    fn a_change_being_written_is_pending_but_no_longer_queued() {
        let queue = OutageQueue::new(1_000);
        push(&queue, save("k", 10)).expect("fits");
        assert!(queue.is_queued("k") && queue.contains("k"));
        let batch = queue.take(1, &HashSet::new());
        assert!(!queue.is_queued("k"), "taken for writing");
        assert!(queue.contains("k"), "still pending until settled");
        push(&queue, save("k", 10)).expect("fits");
        assert!(queue.is_queued("k"), "a newer change of the key is queued");
        queue.settle(batch, 1);
        drain(&queue);
        assert!(!queue.is_queued("k") && !queue.contains("k"));
    }

    #[test]
    fn the_queue_is_bounded_by_bytes_and_refuses_what_does_not_fit() {
        let queue = OutageQueue::new(1_000);
        for i in 0..9 {
            push(&queue, save(&format!("k{i}"), 100)).expect("fits");
        }
        assert_eq!(
            push(&queue, save("big", 101)),
            Err(QueueFull { limit_bytes: 1_000 })
        );
        push(&queue, save("last", 100)).expect("exactly fits");
        assert_eq!(
            push(&queue, save("one-more", 1)),
            Err(QueueFull { limit_bytes: 1_000 })
        );
        let usage = queue.usage();
        assert_eq!((usage.changes, usage.bytes), (10, 1_000));
        // Nothing queued was dropped to make room.
        assert_eq!(drain(&queue).len(), 10);
        assert_eq!(queue.usage().bytes, 0);
    }

    #[test]
    fn deletes_are_never_refused_and_replace_the_queued_changes_of_their_key() {
        let queue = OutageQueue::new(300);
        push(&queue, save("a", 100)).expect("fits");
        push(&queue, save("b", 100)).expect("fits");
        push(&queue, save("a", 100)).expect("fits");
        assert!(push(&queue, save("c", 100)).is_err());
        // Full, and deletes still go in, over the bound if need be.
        for i in 0..50 {
            push(&queue, delete(&format!("gone{i}"))).expect("a delete always fits");
        }
        push(&queue, delete("a")).expect("a delete always fits");
        assert_eq!(queue.usage().changes, 52, "both changes of `a` replaced");
        let changes = drain(&queue);
        assert_eq!(changes[0], save("b", 100));
        assert_eq!(changes.last(), Some(&delete("a")));
        assert!(!changes.contains(&save("a", 100)));
    }

    #[test]
    fn a_batch_is_queued_whole_or_not_at_all_with_the_room_its_delete_frees() {
        let queue = OutageQueue::new(250);
        push(&queue, save("old", 200)).expect("fits");
        // The delete of `old` frees its 200 bytes for the new key.
        queue
            .push_all(vec![delete("old"), save("new", 200)], || {})
            .expect("fits once `old` is replaced");
        let before = queue.usage();
        assert!(
            queue
                .push_all(vec![delete("new"), save("newer", 300)], || {})
                .is_err()
        );
        assert_eq!(
            queue.usage(),
            before,
            "nothing of a refused batch is queued"
        );
        assert!(queue.contains("new") && !queue.contains("newer"));
        assert_eq!(drain(&queue), [delete("old"), save("new", 200)]);
    }

    /// A change that outlives a delete stays queued ahead of it, and the
    /// room the delete frees is only that of the changes it replaced, both
    /// when it is queued and when a batch is measured before.
    #[test]
    fn a_change_that_outlives_a_delete_stays_ahead_of_it() {
        let queue = OutageQueue::new(400);
        push(&queue, save("k", 100)).expect("fits");
        push(&queue, lasting("k", 100)).expect("fits");
        push(&queue, save("k", 100)).expect("fits");
        // The delete frees the two saves (200), not the lasting change.
        assert!(
            queue
                .push_all(vec![delete("k"), save("other", 291)], || {})
                .is_err(),
            "100 + 10 + 291 does not fit 400"
        );
        queue
            .push_all(vec![delete("k"), save("other", 290)], || {})
            .expect("100 + 10 + 290 fits");
        assert_eq!(queue.usage().bytes, 400);
        assert_eq!(
            drain(&queue),
            [lasting("k", 100), delete("k"), save("other", 290)]
        );
    }

    #[test]
    fn unwritten_changes_go_back_to_the_front_in_order_and_stay_pending() {
        let queue = OutageQueue::new(usize::MAX);
        for key in ["a", "b", "c", "d"] {
            push(&queue, save(key, 1)).expect("fits");
        }
        let batch = queue.take(3, &HashSet::new());
        assert_eq!(batch.changes.len(), 3);
        // Being written: still pending.
        assert!(queue.contains("a") && queue.contains("c"));
        // A change made while the batch is written, and a delete of a key
        // being written: both wait behind the batch.
        push(&queue, save("e", 1)).expect("fits");
        push(&queue, delete("b")).expect("fits");
        assert_eq!(queue.len(), 6);
        queue.settle(batch, 1);
        assert!(!queue.contains("a"), "written and settled");
        assert!(queue.contains("b") && queue.contains("c"));
        let keys: Vec<(String, bool)> = drain(&queue).into_iter().map(|c| (c.0, c.2)).collect();
        assert_eq!(
            keys,
            [
                ("b".to_owned(), false),
                ("c".to_owned(), false),
                ("d".to_owned(), false),
                ("e".to_owned(), false),
                ("b".to_owned(), true),
            ]
        );
        assert_eq!((queue.len(), queue.usage().bytes), (0, 0));
        assert!(!queue.contains("b"));
        assert!(queue.lock().index.is_empty(), "the index is emptied");
    }

    /// A change that absorbs any later save of its key, keeping the newer
    /// weight.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Merging(String, usize, bool);

    impl Deferred for Merging {
        fn key(&self) -> &str {
            &self.0
        }
        fn weight(&self) -> usize {
            self.1
        }
        fn is_delete(&self) -> bool {
            self.2
        }
        fn merge(&mut self, newer: &Self) -> bool {
            if self.2 || newer.2 {
                return false;
            }
            self.1 = newer.1;
            true
        }
    }

    /// One client saving its session over and over during an outage takes
    /// the room of one change, so other clients' changes still fit.
    #[test]
    fn repeated_changes_of_one_key_take_the_room_of_one() {
        let queue = OutageQueue::new(1_000);
        let push = |change: Merging| queue.push_all(vec![change], || {});
        for _ in 0..10_000 {
            push(Merging("k".to_owned(), 100, false)).expect("merged");
        }
        push(Merging("other".to_owned(), 800, false)).expect("still fits");
        let usage = queue.usage();
        assert_eq!((usage.changes, usage.bytes), (2, 900));
        // Into the key's newest queued change, not past it into one being
        // written: what is being written may already be in Redis.
        let batch = queue.take(1, &HashSet::new());
        assert_eq!(batch.changes[0].0, "k");
        push(Merging("k".to_owned(), 50, false)).expect("fits");
        assert_eq!(queue.usage().changes, 3);
        push(Merging("k".to_owned(), 40, false)).expect("merged");
        assert_eq!((queue.usage().changes, queue.usage().bytes), (3, 940));
        queue.settle(batch, 1);
        // A delete is never merged; it replaces the key's queued changes.
        push(Merging("k".to_owned(), 10, true)).expect("a delete always fits");
        let batch = queue.take(usize::MAX, &HashSet::new());
        let keys: Vec<(&str, usize, bool)> = batch
            .changes
            .iter()
            .map(|c| (c.0.as_str(), c.1, c.2))
            .collect();
        assert_eq!(keys, [("other", 800, false), ("k", 10, true)]);
    }

    /// Room is measured after the merge: a nearly full queue still takes
    /// one more save of a key it holds, and still refuses a new key.
    #[test]
    fn a_change_that_merges_fits_a_nearly_full_queue() {
        let queue = OutageQueue::new(1_000);
        let push = |changes: Vec<Merging>| queue.push_all(changes, || {});
        let merging = |key: &str, weight| Merging(key.to_owned(), weight, false);
        push(vec![merging("k", 100)]).expect("fits");
        push(vec![merging("other", 850)]).expect("fits");
        push(vec![merging("k", 120)]).expect("merged into k's 100: 970 bytes");
        assert_eq!((queue.usage().changes, queue.usage().bytes), (2, 970));
        push(vec![merging("new", 100)]).expect_err("a new key does not fit");
        push(vec![merging("k", 200)]).expect_err("merged, k would weigh 200: 1,050 bytes");
        // Several changes of one key in one batch merge in turn.
        push(vec![merging("k", 150), merging("k", 130)]).expect("980 bytes");
        assert_eq!((queue.usage().changes, queue.usage().bytes), (2, 980));
        // A delete in the batch frees its key's room before the save after it.
        push(vec![
            Merging("other".to_owned(), 10, true),
            merging("new", 800),
        ])
        .expect("fits");
        assert_eq!(queue.usage().bytes, 130 + 10 + 800);
        assert_eq!(queue.usage().changes, 3);
    }

    #[test]
    fn is_pending_is_an_index_lookup_not_a_scan() {
        let queue = OutageQueue::new(usize::MAX);
        let n = 50_000;
        for i in 0..n {
            push(&queue, save(&format!("{i:020}"), 1)).expect("fits");
        }
        let started = std::time::Instant::now();
        for i in 0..n {
            assert!(queue.contains(&format!("{i:020}")));
            assert!(!queue.contains(&format!("x{i:019}")));
        }
        // A scan per lookup would take minutes; the index, milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}
