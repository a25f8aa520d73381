//! The in-process side of the store: copies of recently read sessions (so
//! a user is not logged out by a short outage), and the memory of sessions
//! that ended. The changes made while Redis was unavailable wait in the
//! outage queue (core's, through `failover`), not here.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tower_redis_core::clock::duration_ms;

use super::{Changes, Record, Saved, Store, Take, Write, now_ms};

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
    copies: moka::sync::Cache<String, Arc<LocalCopy>>,
    /// Sessions this instance recently destroyed, cycled away or saw
    /// gone, so that a concurrent request that loaded one before does not
    /// send its old id back in a renewed persistent cookie.
    ended: moka::sync::Cache<String, ()>,
    absolute_ms: u64,
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
    pub(crate) fn new(capacity_bytes: u64, idle: Duration, absolute: Duration) -> Self {
        Self {
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
            absolute_ms: duration_ms(absolute),
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
    pub(crate) fn get(&self, storage_key: &str) -> Option<Record> {
        let copy = self.copies.get(storage_key)?;
        if copy.record.created_ms.saturating_add(self.absolute_ms) <= now_ms() {
            self.copies.invalidate(storage_key);
            return None;
        }
        Some(copy.record.clone())
    }

    /// The local copy as it is, with when it was last renewed.
    pub(crate) fn copy(&self, storage_key: &str) -> Option<Arc<LocalCopy>> {
        self.copies.get(storage_key)
    }

    pub(crate) fn put(&self, storage_key: &str, record: Record, touched_ms: u64) {
        self.copies.insert(
            storage_key.to_owned(),
            Arc::new(LocalCopy { record, touched_ms }),
        );
    }

    /// Keeps the copy in step with what Redis answered to a read that began
    /// at `started_ms`; `touched`: that read renewed the idle timeout.
    pub(crate) fn refresh(
        &self,
        storage_key: &str,
        answer: Option<&Record>,
        copy: Option<Arc<LocalCopy>>,
        touched: bool,
        started_ms: u64,
    ) {
        match (answer, copy) {
            // Unchanged and not renewed: the copy is already right.
            (Some(record), Some(copy)) if !touched && copy.record == *record => {}
            // A copy for reading through an outage.
            (Some(record), copy) => {
                let touched_ms = match copy {
                    Some(copy) if !touched => copy.touched_ms,
                    _ => started_ms,
                };
                self.put(storage_key, record.clone(), touched_ms);
            }
            (None, _) => self.copies.invalidate(storage_key),
        }
    }

    /// Applies changes to the local copy (creating it for a new session).
    /// False when there is no copy to change.
    pub(crate) fn apply(&self, storage_key: &str, create: Option<u64>, changes: &Changes) -> bool {
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
            (None, None) => return false,
        };
        changes.apply_to(&mut record);
        self.put(storage_key, record, touched_ms);
        true
    }

    /// How long an unused copy is kept.
    #[cfg(test)]
    pub(crate) fn idle_timeout(&self) -> Option<Duration> {
        self.copies.policy().time_to_idle()
    }

    /// The approximate bytes the local copies take.
    pub(crate) fn copies_bytes(&self) -> u64 {
        self.copies.run_pending_tasks();
        self.copies.weighted_size()
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
        self.end(take.old_storage_key);
        // A new id never has a copy yet: the request's view is the session.
        self.put(take.new_storage_key, take.merged.clone(), 0);
        Ok(Saved::Written)
    }

    async fn delete(&self, storage_key: &str, _user: Option<&str>) -> Result<(), Infallible> {
        self.end(storage_key);
        Ok(())
    }
}

impl LocalCopy {
    /// Whether this instance should renew the session's idle timeout in
    /// Redis on a read at `now_ms`, renewing at most once per `every_ms`.
    pub(crate) fn touch_due(copy: Option<&Self>, now_ms: u64, every_ms: u64) -> bool {
        copy.is_none_or(|copy| now_ms.saturating_sub(copy.touched_ms) >= every_ms)
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

    /// A flood of ended sessions (logins cycle ids, logouts) must not stop
    /// the instance from remembering the next one: the memory is a plain
    /// LRU, so the newest marker always stays.
    #[test]
    fn a_full_ended_memory_still_remembers_the_newest_end() {
        let local = LocalStore::new(1 << 20, Duration::from_secs(60), Duration::from_secs(3600));
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
