//! Reconciliation: the changes made while Redis was unavailable wait in the
//! outage queue, and a background task writes them to Redis when it is
//! back, oldest first.
//!
//! The rest of the store sees a small API — [`Reconciler::has_pending`],
//! the `queue_*` methods, [`start`] and [`Reconciler::replay`] — so that
//! core's shared failover can replace this module as a whole.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tower_redis_core::BreakerState;
use tower_redis_core::record;

use super::failover::Failover;
use super::queue::{OutageQueue, Pending, QueueFull, Queued};
use super::redis::RedisStore;
use super::{Changes, Store, Write};

/// How soon writes that failed while Redis was up are retried.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The outage queue and the state of the task that empties it.
pub(crate) struct Reconciler {
    queue: OutageQueue,
    started: AtomicBool,
    /// Wakes the task when a write had to be queued, whether or not the
    /// breaker moved.
    wake: Arc<Notify>,
}

impl Reconciler {
    pub(crate) fn new(queue_bytes: usize) -> Self {
        Self {
            queue: OutageQueue::new(queue_bytes),
            started: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Whether changes to this session are waiting for Redis. Then this
    /// instance's copy is newer than Redis', and the session's next changes
    /// are queued behind them, in order, even if Redis is back: sent
    /// directly, a change could find the session not created yet and be
    /// lost, or a log out be undone by the replay of the creation.
    pub(crate) fn has_pending(&self, storage_key: &str) -> bool {
        self.queue.contains(storage_key)
    }

    /// Queues a save made while Redis was unavailable. Saves are not merged:
    /// each keeps the time of its own changes for the "newer wins" rule.
    pub(crate) fn queue_save(
        &self,
        storage_key: &str,
        create: Option<u64>,
        changes: &Changes,
        at_ms: u64,
    ) -> Result<(), QueueFull> {
        self.queue.push_save(storage_key, create, changes, at_ms)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Queues a deletion made while Redis was unavailable (never refused).
    pub(crate) fn queue_delete(&self, storage_key: &str, user: Option<&str>) {
        self.queue.push_delete(storage_key, user);
        self.wake.notify_one();
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
        )?;
        self.wake.notify_one();
        Ok(())
    }

    /// Changes queued or being written.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// The approximate bytes the outage queue takes.
    pub(crate) fn bytes(&self) -> usize {
        self.queue.bytes()
    }

    /// Writes the queued outage changes to Redis, oldest first. A change
    /// older than what Redis holds is skipped entry by entry; a session that
    /// no longer exists in Redis is not recreated unless it was created
    /// during the outage. What fails stays queued, in order.
    pub(crate) async fn replay(&self, redis: &RedisStore) {
        let pending = self.queue.take();
        if pending.is_empty() {
            return;
        }
        let total = pending.len();
        let mut requeue: Vec<Queued> = Vec::new();
        // Sessions with a change that could not be written in this pass:
        // their later changes wait behind it, in order. Replaying them now
        // could find the session absent (its creation still queued) and
        // drop them as changes to a session that ended.
        let mut blocked = HashSet::new();
        for queued in pending {
            let storage_key = queued.storage_key.as_str();
            if blocked.contains(storage_key) {
                requeue.push(queued);
                continue;
            }
            if replay_one(redis, &queued).await.is_err() {
                blocked.insert(storage_key.to_owned());
                requeue.push(queued);
            } else {
                self.queue.written(&queued);
            }
        }
        let failed = requeue.len();
        self.queue.requeue(requeue);
        tracing::info!(
            target: "tower_redis_session",
            written = total - failed,
            still_queued = failed,
            "wrote session changes made during the Redis outage"
        );
        record::counter(
            "tower_redis_session_reconciled_total",
            &[],
            (total - failed) as u64,
        );
    }
}

/// Writes one queued change, through the manager (one round trip).
async fn replay_one(redis: &RedisStore, queued: &Queued) -> Result<(), tower_redis_core::Error> {
    let storage_key = queued.storage_key.as_str();
    match &queued.change {
        Pending::Delete { user } => redis.delete(storage_key, user.as_deref()).await,
        Pending::Save {
            create,
            changes,
            at_ms,
        } => {
            let write = Write {
                storage_key,
                create: *create,
                changes,
                previous_user: None,
                at_ms: Some(*at_ms),
            };
            redis.save(&write).await.map(|_| ())
        }
    }
}

/// Starts, once, the task that writes changes made during an outage to
/// Redis when it is back. A swap of a flag on every later call.
pub(crate) fn start(failover: &Arc<Failover>) {
    let reconciler = failover.reconciler();
    if reconciler.started.swap(true, Ordering::AcqRel) {
        return;
    }
    let weak = Arc::downgrade(failover);
    let wake = Arc::clone(&reconciler.wake);
    let states = failover.manager().subscribe();
    tokio::spawn(run(weak, wake, states));
}

/// The task: a pass whenever the breaker closes or a write is queued, and
/// every [`RETRY_AFTER`] while changes remain.
async fn run(
    weak: Weak<Failover>,
    wake: Arc<Notify>,
    mut states: tokio::sync::watch::Receiver<BreakerState>,
) {
    loop {
        // The task holds the store only while it works, so dropping the
        // layer ends it.
        let retry = {
            let Some(failover) = weak.upgrade() else {
                return;
            };
            if *states.borrow_and_update() == BreakerState::Closed {
                failover.reconcile().await;
            }
            failover.reconciler().len() > 0
        };
        tokio::select! {
            changed = states.changed() => if changed.is_err() { return },
            () = wake.notified() => {}
            // Writes that failed while Redis was up are retried soon.
            () = tokio::time::sleep(RETRY_AFTER), if retry => {}
        }
    }
}
