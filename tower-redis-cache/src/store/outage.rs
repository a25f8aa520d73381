//! The cache's own outage bookkeeping: whether the in-process store is in
//! use, and the invalidations and purges that could not reach Redis, to be
//! replayed when it answers again.
//!
//! Kept apart behind this small API so that it can be swapped for core's
//! shared failover later; it behaves as the cache always has: at most
//! [`MAX_PENDING`] writes are remembered, later ones are dropped with a
//! warning, and the replay runs on the first Redis answer after the outage.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tower_redis_core::sync::lock;

use super::{CacheStore, Target};

/// Invalidations and purges remembered during an outage, at most.
const MAX_PENDING: usize = 10_000;

/// A write that could not reach Redis, replayed when it answers again.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Invalidate(String),
    Purge(Target, Option<u64>),
}

#[derive(Debug, Default)]
pub(crate) struct Outage {
    /// Set while the in-process store is in use; cleared (and the store
    /// emptied) on the first Redis answer after.
    degraded: AtomicBool,
    pending: Mutex<Vec<Pending>>,
}

impl Outage {
    /// An answer came from the in-process store.
    pub(crate) fn mark_degraded(&self) {
        self.degraded.store(true, Ordering::Release);
    }

    pub(crate) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Redis answered: true exactly once per outage, for the caller that
    /// must then drop the in-process entries and [`replay`](Self::take_pending).
    pub(crate) fn end(&self) -> bool {
        self.degraded.load(Ordering::Acquire) && self.degraded.swap(false, Ordering::AcqRel)
    }

    /// Remembers writes that could not reach Redis (and marks the outage).
    pub(crate) fn defer(&self, writes: impl IntoIterator<Item = Pending>) {
        self.mark_degraded();
        let mut pending = lock(&self.pending);
        for write in writes {
            if pending.len() < MAX_PENDING {
                pending.push(write);
            } else {
                tracing::warn!(target: "tower_redis_cache", "too many invalidations during the Redis outage; some stale entries may be served after it");
                break;
            }
        }
    }

    /// The writes to replay, in the order they were made.
    pub(crate) fn take_pending(&self) -> Vec<Pending> {
        std::mem::take(&mut *lock(&self.pending))
    }

    /// Writes whose replay failed: tried again on the next Redis answer.
    pub(crate) fn retry_later(&self, failed: Vec<Pending>) {
        if !failed.is_empty() {
            lock(&self.pending).extend(failed);
            self.mark_degraded();
        }
    }
}

impl CacheStore {
    /// Keeps the outage bookkeeping after an answer (`from_redis`, or from
    /// the in-process store): marks the outage, or, on the first Redis
    /// answer after one, drops the in-process entries and replays the
    /// writes Redis missed. Returns true for an answer from the outage.
    pub(super) async fn track_outage(&self, from_redis: bool) -> bool {
        if !from_redis {
            self.outage.mark_degraded();
            return true;
        }
        if self.outage.end() {
            self.memory.clear();
            self.replay().await;
            tracing::info!(target: "tower_redis_cache", "Redis is back: in-process cache entries dropped");
        }
        false
    }

    /// Replays what could not reach Redis during the outage.
    async fn replay(&self) {
        let mut failed = Vec::new();
        for write in self.outage.take_pending() {
            let result = match &write {
                Pending::Invalidate(url_hash) => self
                    .redis
                    .run_ops(&self.redis.delete_ops(std::iter::once(url_hash.as_str())))
                    .await
                    .map(|_| 0),
                Pending::Purge(target, soft_at) => self.redis.purge_indexed(target, *soft_at).await,
            };
            if result.is_err() {
                failed.push(write);
            }
        }
        self.outage.retry_later(failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_ends_once_and_keeps_its_writes_in_order() {
        let outage = Outage::default();
        assert!(!outage.end(), "no outage yet");
        outage.defer([
            Pending::Invalidate("a".into()),
            Pending::Purge(Target::All, None),
        ]);
        assert!(outage.is_degraded());
        assert!(outage.end());
        assert!(!outage.end(), "a second Redis answer replays nothing");
        let pending = outage.take_pending();
        assert!(
            matches!(&pending[..], [Pending::Invalidate(a), Pending::Purge(Target::All, None)] if a == "a")
        );
        outage.retry_later(pending);
        assert!(outage.is_degraded());
        assert_eq!(outage.take_pending().len(), 2);
    }

    #[test]
    fn the_queue_is_bounded() {
        let outage = Outage::default();
        outage.defer((0..MAX_PENDING + 5).map(|i| Pending::Invalidate(i.to_string())));
        assert_eq!(outage.take_pending().len(), MAX_PENDING);
    }
}
