//! The recovery of a [`Failover`](super::Failover): writing the outage queue
//! to Redis when it is back, and ending the outage.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::queue::{Batch, OutageQueue};
use super::{
    Deferred, Recovered, Replay, ReplayError, Shared, record_degraded, record_queue_bytes,
    record_replayed,
};
use crate::breaker::BreakerState;

/// How a pass over the queue ended.
pub(super) enum Drained {
    /// The queue was empty at the end; `wrote` when Redis took some of it.
    Empty { wrote: bool },
    /// A write failed; what was not written is back at the front.
    Failed,
}

/// Starts the recovery task of `shared`; false outside a tokio runtime.
pub(super) fn spawn<R: Replay, M: Recovered>(shared: &Arc<Shared<R, M>>) -> bool {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let states = shared.manager.subscribe();
    runtime.spawn(recover(
        Arc::downgrade(shared),
        Arc::clone(&shared.wake),
        states,
        shared.recover_on_probe,
    ));
    true
}

/// The task: while the breaker is closed and the pair degraded, writes the
/// queue; retries failures with a doubling, bounded wait. It holds the
/// failover only while it works, so dropping the failover ends it.
async fn recover<R: Replay, M: Recovered>(
    failover: Weak<Shared<R, M>>,
    wake: Arc<Notify>,
    mut states: watch::Receiver<BreakerState>,
    recover_on_probe: bool,
) {
    // However the task ends (a replay that panicked, the manager gone),
    // the next operation of the failover starts a new one.
    let _restart = Restart(failover.clone());
    let mut retry: Option<Duration> = None;
    // The breaker closed since the last pass: its probe got an answer.
    let mut answered = false;
    loop {
        {
            let Some(shared) = failover.upgrade() else {
                return;
            };
            let closed = *states.borrow_and_update() == BreakerState::Closed;
            if !closed {
                retry = None;
            } else if shared.degraded.load(std::sync::atomic::Ordering::Acquire) {
                match drain(&shared).await {
                    Drained::Failed => {
                        retry = Some(retry.map_or(shared.min_backoff, |wait| {
                            wait.saturating_mul(2).min(shared.max_backoff)
                        }));
                    }
                    Drained::Empty { wrote } => {
                        retry = None;
                        if wrote || answered {
                            finish(&shared);
                        }
                    }
                }
            }
            answered = false;
        }
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
                answered = recover_on_probe && *states.borrow() == BreakerState::Closed;
            }
            () = wake.notified() => {}
            () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
        }
    }
}

/// Lets the failover start a new recovery task once this one has ended.
struct Restart<R: Replay, M>(Weak<Shared<R, M>>);

impl<R: Replay, M> Drop for Restart<R, M> {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared
                .task_started
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Writes the queue to Redis, oldest first, in batches; one writer at a
/// time. Cancel-safe: a batch whose write is abandoned goes back to the
/// front of the queue.
///
/// A change that fails holds back the later changes of its key only: the
/// other keys are still written in this pass (one key Redis keeps refusing,
/// or one cluster node down, does not stall every other key). When Redis
/// itself is unavailable the pass stops at once.
pub(super) async fn drain<R: Replay, M>(shared: &Shared<R, M>) -> Drained {
    let _one_writer = shared.draining.lock().await;
    let mut wrote = false;
    let mut held = HashSet::new();
    loop {
        let mut taken = Taken {
            queue: &shared.queue,
            batch: Some(shared.queue.take(shared.batch, &held)),
        };
        let changes = taken.changes();
        if changes.is_empty() {
            return if held.is_empty() {
                Drained::Empty { wrote }
            } else {
                Drained::Failed
            };
        }
        let count = changes.len();
        let result = without_panic(shared.redis.replay(&shared.manager, changes)).await;
        let written = match &result {
            Ok(()) => count,
            Err(stopped) => stopped.written.min(count),
        };
        let failed_key = changes.get(written).map(|change| change.key().to_owned());
        taken.settle(written);
        if written > 0 {
            wrote = true;
            shared
                .replayed
                .fetch_add(written as u64, std::sync::atomic::Ordering::AcqRel);
            record_replayed(shared.name, written);
        }
        record_queue_bytes(shared.name, shared.queue.usage().bytes);
        if let Err(stopped) = result {
            tracing::debug!(
                target: "tower_redis",
                layer = shared.name,
                error = %stopped.error,
                written,
                still_queued = shared.queue.len(),
                "writing the outage queue to Redis failed; retrying"
            );
            match failed_key {
                Some(key) if shared.manager.is_available() => {
                    held.insert(key);
                }
                _ => return Drained::Failed,
            }
        }
    }
}

/// A replay that panicked is a replay that failed on its first change
/// (held back with the retry backoff like any other failure), rather than
/// a recovery task that ends and is started again on the next request, to
/// panic again on the same change.
async fn without_panic<'a>(
    replay: impl Future<Output = Result<(), ReplayError>> + Send + 'a,
) -> Result<(), ReplayError> {
    let mut replay = Box::pin(replay);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| replay.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => std::task::Poll::Ready(Err(ReplayError::none(crate::Error::Redis(
                std::io::Error::other("writing the outage queue panicked").into(),
            )))),
        }
    })
    .await
}

/// Ends the outage when nothing is waiting for Redis: clears the degraded
/// flag, tells the memory side, bumps the epoch. Once per outage.
///
/// The memory side is told before the flag is cleared, under the queue's
/// lock (so nothing is queued meanwhile): what a fallback puts in the
/// memory side after it was told stays, and that fallback sets the flag
/// again once its memory operation is done ([`Failover::run`] marks the
/// outage before and after it), rather than a new outage's state being
/// dropped as the old one's.
///
/// [`Failover::run`]: super::Failover::run
pub(super) fn finish<R: Replay, M: Recovered>(shared: &Shared<R, M>) {
    use std::sync::atomic::Ordering;
    let mut ended = false;
    shared.queue.if_empty(|| {
        if shared.degraded.load(Ordering::Acquire) {
            shared.memory.recovered();
            ended = shared.degraded.swap(false, Ordering::AcqRel);
        }
    });
    if ended {
        shared.epoch.send_modify(|epoch| *epoch += 1);
        record_degraded(shared.name, false);
        tracing::info!(target: "tower_redis", layer = shared.name, "Redis is back: outage changes written, in-process store released");
    }
}

/// A batch being written: given back whole if its write is abandoned.
struct Taken<'a, C: Deferred> {
    queue: &'a OutageQueue<C>,
    batch: Option<Batch<C>>,
}

impl<C: Deferred> Taken<'_, C> {
    fn changes(&self) -> &[C] {
        self.batch.as_ref().map_or(&[], |batch| &batch.changes)
    }

    fn settle(&mut self, written: usize) {
        if let Some(batch) = self.batch.take() {
            self.queue.settle(batch, written);
        }
    }
}

impl<C: Deferred> Drop for Taken<'_, C> {
    fn drop(&mut self) {
        self.settle(0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::RedisManager;
    use crate::degrade::{Failover, NoChange, ReplayError};

    struct Nothing;

    impl Replay for Nothing {
        type Change = NoChange;
        async fn replay(&self, _: &RedisManager, _: &[NoChange]) -> Result<(), ReplayError> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Counted(AtomicUsize);

    impl Recovered for Counted {
        fn recovered(&self) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// `finish` is reached from the recovery task, from `catch_up` and from
    /// every Redis answer while degraded: whoever comes second, even on
    /// another thread at the same instant, must not end the outage again
    /// (the memory side would drop what a new outage put in it).
    #[test]
    fn finish_ends_an_outage_once_whoever_calls_it() {
        let failover = Failover::new(RedisManager::disabled(), Nothing, Counted::default(), 1);
        let shared = &failover.shared;
        finish(shared);
        assert_eq!(shared.memory.0.load(Ordering::Acquire), 0, "not degraded");
        let outages = 300;
        for outage in 1..=outages {
            shared.degraded.store(true, Ordering::Release);
            let barrier = Barrier::new(4);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        barrier.wait();
                        finish(shared);
                        finish(shared);
                    });
                }
            });
            assert_eq!(shared.memory.0.load(Ordering::Acquire), outage);
            assert_eq!(*shared.epoch.borrow(), outage as u64);
        }
    }
}
