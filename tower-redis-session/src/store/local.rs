//! The in-process side of the store: copies of recently read sessions (so
//! a user is not logged out by a short outage) and the changes made while
//! Redis was unavailable, queued for reconciliation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Changes, Record, now_ms};

/// Queued changes beyond which the oldest are dropped, with a warning.
const MAX_PENDING: usize = 100_000;

/// A change waiting for Redis.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Save {
        /// `Some(created_ms)` when the session was created during the outage.
        create: Option<u64>,
        changes: Changes,
        /// When the (latest) change was made, for the per-entry "newer wins" rule.
        at_ms: u64,
    },
    Delete {
        user: Option<String>,
    },
}

pub(crate) struct LocalStore {
    copies: moka::sync::Cache<String, Arc<Copy>>,
    pending: Mutex<Vec<(String, Pending)>>,
    /// The length of `pending`, readable without its lock (a read checks
    /// it on every request).
    pending_len: AtomicUsize,
    /// Sessions whose queued changes the reconciler has taken but not yet
    /// written: until they are in Redis, reads of these sessions are still
    /// answered from this instance's copy (Redis does not have them yet).
    reconciling: Mutex<Vec<String>>,
    reconciling_len: AtomicUsize,
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
    pub(crate) fn new(capacity: u64, idle: Duration) -> Self {
        Self {
            copies: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(idle)
                .build(),
            pending: Mutex::new(Vec::new()),
            pending_len: AtomicUsize::new(0),
            reconciling: Mutex::new(Vec::new()),
            reconciling_len: AtomicUsize::new(0),
        }
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
    ) {
        let mut pending = self.lock();
        push_bounded(
            &mut pending,
            storage_key,
            Pending::Save {
                create,
                changes: changes.clone(),
                at_ms,
            },
        );
        self.pending_len.store(pending.len(), Ordering::Release);
    }

    /// Whether changes to this session are waiting for Redis.
    pub(crate) fn has_pending(&self, storage_key: &str) -> bool {
        (self.pending_len.load(Ordering::Acquire) > 0
            && self.lock().iter().any(|(k, _)| k == storage_key))
            || (self.reconciling_len.load(Ordering::Acquire) > 0
                && lock(&self.reconciling).iter().any(|k| k == storage_key))
    }

    /// Queues a deletion made while Redis was unavailable.
    pub(crate) fn queue_delete(&self, storage_key: &str, user: Option<&str>) {
        let mut pending = self.lock();
        pending.retain(|(k, _)| k != storage_key);
        push_bounded(
            &mut pending,
            storage_key,
            Pending::Delete {
                user: user.map(str::to_owned),
            },
        );
        self.pending_len.store(pending.len(), Ordering::Release);
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.lock().len()
    }

    /// Takes the queued changes for writing. Their sessions count as
    /// pending until [`reconciled`](Self::reconciled) or
    /// [`end_reconcile`](Self::end_reconcile) says otherwise.
    pub(crate) fn take_pending(&self) -> Vec<(String, Pending)> {
        let mut pending = self.lock();
        let mut reconciling = lock(&self.reconciling);
        reconciling.extend(pending.iter().map(|(k, _)| k.clone()));
        self.reconciling_len
            .store(reconciling.len(), Ordering::Release);
        self.pending_len.store(0, Ordering::Release);
        std::mem::take(&mut *pending)
    }

    /// One taken change of this session is in Redis.
    pub(crate) fn reconciled(&self, storage_key: &str) {
        let mut reconciling = lock(&self.reconciling);
        if let Some(at) = reconciling.iter().position(|k| k == storage_key) {
            reconciling.remove(at);
        }
        self.reconciling_len
            .store(reconciling.len(), Ordering::Release);
    }

    /// The pass is over (what failed was requeued first).
    pub(crate) fn end_reconcile(&self) {
        let mut reconciling = lock(&self.reconciling);
        reconciling.clear();
        self.reconciling_len.store(0, Ordering::Release);
    }

    /// Puts back what could not be written, ahead of anything queued since.
    pub(crate) fn requeue(&self, mut failed: Vec<(String, Pending)>) {
        if failed.is_empty() {
            return;
        }
        let mut pending = self.lock();
        failed.append(&mut pending);
        *pending = failed;
        self.pending_len.store(pending.len(), Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Pending)>> {
        lock(&self.pending)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn push_bounded(pending: &mut Vec<(String, Pending)>, storage_key: &str, change: Pending) {
    if pending.len() >= MAX_PENDING {
        // Deletions (log outs) are never the ones dropped.
        let oldest_save = pending
            .iter()
            .position(|(_, p)| matches!(p, Pending::Save { .. }))
            .unwrap_or(0);
        pending.remove(oldest_save);
        tracing::warn!(
            target: "tower_redis_session",
            limit = MAX_PENDING,
            "too many session changes queued during the Redis outage; the oldest save was dropped"
        );
    }
    pending.push((storage_key.to_owned(), change));
}
