//! The in-process side of the store: copies of recently read sessions (so
//! a user is not logged out by a short outage) and the changes made while
//! Redis was unavailable, queued for reconciliation.

use std::sync::Arc;
use std::time::Duration;

use super::queue::{OutageQueue, QueueFull, Queued};
use super::{Changes, Record, now_ms};

/// The bookkeeping of one local copy, in bytes, beyond its data: the
/// cache's slot, the key, the record's map.
const COPY_OVERHEAD: usize = 160;
/// The bookkeeping of one entry of a local copy.
const FIELD_OVERHEAD: usize = 48;
/// How long this instance remembers that a session ended: longer than any
/// request that loaded it before can still be running.
const ENDED_FOR: Duration = Duration::from_secs(120);
/// The bound of that memory (about 10 000 sessions).
const ENDED_BYTES: u64 = 1024 * 1024;
/// The bookkeeping of one remembered end.
const ENDED_OVERHEAD: usize = 64;

pub(crate) struct LocalStore {
    /// Weighed in bytes.
    copies: moka::sync::Cache<String, Arc<Copy>>,
    queue: OutageQueue,
    /// Sessions this instance recently destroyed, cycled away or saw
    /// gone, so that a concurrent request that loaded one before does not
    /// send its old id back in a renewed persistent cookie.
    ended: moka::sync::Cache<String, ()>,
}

/// A session as this instance last read or wrote it.
#[derive(Debug)]
pub(crate) struct Copy {
    pub(crate) record: Record,
    /// When this instance last renewed the session's idle timeout in
    /// Redis (0: not known to have).
    pub(crate) touched_ms: u64,
}

impl LocalStore {
    pub(crate) fn new(capacity_bytes: u64, queue_bytes: usize, idle: Duration) -> Self {
        Self {
            copies: moka::sync::Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(|key: &String, copy: &Arc<Copy>| {
                    u32::try_from(key.len() + copy.weight()).unwrap_or(u32::MAX)
                })
                .time_to_idle(idle)
                .build(),
            queue: OutageQueue::new(queue_bytes),
            ended: moka::sync::Cache::builder()
                .max_capacity(ENDED_BYTES)
                .weigher(|key: &String, ()| {
                    u32::try_from(key.len() + ENDED_OVERHEAD).unwrap_or(u32::MAX)
                })
                .time_to_live(ENDED_FOR)
                // Plain LRU: the markers are only ever checked with
                // `contains_key`, which moka's default admission (TinyLFU)
                // does not count as use, so once full it would refuse every
                // new marker.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
        }
    }

    /// The session ended: its copy goes, and its end is remembered for a
    /// while.
    pub(crate) fn end(&self, storage_key: &str) {
        self.copies.invalidate(storage_key);
        self.ended.insert(storage_key.to_owned(), ());
    }

    /// Whether this instance saw the session end recently.
    pub(crate) fn has_ended(&self, storage_key: &str) -> bool {
        self.ended.contains_key(storage_key)
    }

    /// The local copy, unless it has outlived the absolute timeout.
    pub(crate) fn get(&self, storage_key: &str, absolute_ms: u64) -> Option<Record> {
        let copy = self.copies.get(storage_key)?;
        if copy.record.created_ms.saturating_add(absolute_ms) <= now_ms() {
            self.copies.invalidate(storage_key);
            return None;
        }
        Some(copy.record.clone())
    }

    /// The local copy as it is, with when it was last renewed.
    pub(crate) fn copy(&self, storage_key: &str) -> Option<Arc<Copy>> {
        self.copies.get(storage_key)
    }

    pub(crate) fn put(&self, storage_key: &str, record: Record, touched_ms: u64) {
        self.copies.insert(
            storage_key.to_owned(),
            Arc::new(Copy { record, touched_ms }),
        );
    }

    pub(crate) fn remove(&self, storage_key: &str) {
        self.copies.invalidate(storage_key);
    }

    /// Applies changes to the local copy (creating it for a new session).
    pub(crate) fn apply(&self, storage_key: &str, create: Option<u64>, changes: &Changes) {
        let existing = self.copies.get(storage_key);
        let (mut record, touched_ms) = match (existing, create) {
            (Some(copy), _) => (copy.record.clone(), copy.touched_ms),
            (None, Some(created_ms)) => (
                Record {
                    created_ms,
                    ..Record::default()
                },
                0,
            ),
            (None, None) => return,
        };
        changes.apply_to(&mut record);
        self.put(storage_key, record, touched_ms);
    }

    /// Queues a save made while Redis was unavailable. Saves are not merged:
    /// each keeps the time of its own changes for the "newer wins" rule.
    pub(crate) fn queue(
        &self,
        storage_key: &str,
        create: Option<u64>,
        changes: &Changes,
        at_ms: u64,
    ) -> Result<(), QueueFull> {
        self.queue.push_save(storage_key, create, changes, at_ms)
    }

    /// Whether changes to this session are waiting for Redis. Then this
    /// instance's copy is newer than Redis', and the session's next changes
    /// are queued behind them, in order, even if Redis is back: sent
    /// directly, a change could find the session not created yet and be
    /// lost, or a log out be undone by the replay of the creation.
    pub(crate) fn has_pending(&self, storage_key: &str) -> bool {
        self.queue.contains(storage_key)
    }

    /// Queues a deletion made while Redis was unavailable (never refused).
    pub(crate) fn queue_delete(&self, storage_key: &str, user: Option<&str>) {
        self.queue.push_delete(storage_key, user);
    }

    /// Queues an id change made while Redis was unavailable: both halves, or
    /// neither when the new session does not fit.
    pub(crate) fn queue_cycle(
        &self,
        old_storage_key: &str,
        user: Option<&str>,
        new_storage_key: &str,
        created_ms: u64,
        full: &Changes,
        at_ms: u64,
    ) -> Result<(), QueueFull> {
        self.queue.push_cycle(
            old_storage_key,
            user,
            new_storage_key,
            created_ms,
            full,
            at_ms,
        )
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.queue.len()
    }

    /// Takes the queued changes for writing.
    pub(crate) fn take_pending(&self) -> Vec<Queued> {
        self.queue.take()
    }

    /// Puts back what could not be written, ahead of anything queued since.
    pub(crate) fn requeue(&self, failed: Vec<Queued>) {
        self.queue.requeue(failed);
    }

    /// One taken change is in Redis.
    pub(crate) fn reconciled(&self, queued: &Queued) {
        self.queue.written(queued);
    }

    /// The approximate bytes the outage queue takes.
    pub(crate) fn queue_bytes(&self) -> usize {
        self.queue.bytes()
    }

    /// The approximate bytes the local copies take.
    pub(crate) fn copies_bytes(&self) -> u64 {
        self.copies.run_pending_tasks();
        self.copies.weighted_size()
    }
}

impl Copy {
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

    /// A flood of ended sessions (logins cycle ids, logouts) must not stop
    /// the instance from remembering the next one: the memory is a plain
    /// LRU, so the newest marker always stays.
    #[test]
    fn a_full_ended_memory_still_remembers_the_newest_end() {
        let local = LocalStore::new(1 << 20, 1 << 20, Duration::from_secs(60));
        for n in 0..30_000 {
            local.end(&format!("flood-{n:040}"));
        }
        local.ended.run_pending_tasks();
        for n in 0..100 {
            let key = format!("victim-{n:039}");
            local.end(&key);
            local.ended.run_pending_tasks();
            assert!(local.has_ended(&key), "marker {n} was refused");
        }
        assert!(
            local.ended.weighted_size() <= ENDED_BYTES,
            "{} bytes",
            local.ended.weighted_size()
        );
    }
}
