//! Degradation, once for every layer: a Redis store and an in-process store
//! composed by [`Failover`].
//!
//! A layer writes one small async store trait for its own verbs, implements
//! it for Redis and for memory, and talks to a [`Failover`] of the two:
//!
//! - [`Failover::run`] runs an operation on the Redis side when the breaker
//!   allows it and on the memory side otherwise (or when Redis fails or
//!   times out); a fallback marks the pair *degraded*. While healthy this
//!   costs one atomic load beyond [`RedisManager::run`].
//! - [`Failover::defer`] queues a change made while Redis was unavailable
//!   ([`Deferred`]): the queue is bounded by bytes, refuses what does not
//!   fit, never refuses nor drops a delete, and a delete replaces the queued
//!   changes of its key (but those that
//!   [outlive a delete](Deferred::outlives_delete)). [`Failover::is_pending`] says in one hash lookup
//!   (none while the queue is empty) whether a key has changes waiting.
//! - Recovery: one background task per failover, started by the first
//!   fallback or deferred change, writes the queue to Redis oldest first in
//!   batches through [`Replay::replay`], keeps what failed at the front and
//!   retries with a bounded backoff. Once the queue is empty and Redis has
//!   answered, the pair is healthy again: the memory side is told
//!   ([`Recovered::recovered`], once per outage) and the
//!   [`recovered`](Failover::recovered) epoch goes up. The task holds the
//!   failover weakly and ends when it is dropped.
//!
//! ```
//! use std::sync::Mutex;
//! use tower_redis_core::{RedisManager, redis};
//! use tower_redis_core::degrade::{Deferred, Failover, NoChange, Recovered, Replay, ReplayError};
//!
//! /// The Redis side: reads and writes a counter (no changes to replay here).
//! struct RedisSide;
//! impl Replay for RedisSide {
//!     type Change = NoChange;
//!     async fn replay(&self, _: &RedisManager, _: &[NoChange]) -> Result<(), ReplayError> {
//!         Ok(())
//!     }
//! }
//! /// The memory side: a local count, dropped when Redis is back.
//! #[derive(Default)]
//! struct MemorySide(Mutex<u64>);
//! impl Recovered for MemorySide {
//!     fn recovered(&self) {
//!         *self.0.lock().expect("not poisoned") = 0;
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let failover = Failover::new(RedisManager::disabled(), RedisSide, MemorySide::default(), 1 << 20);
//! let served = failover
//!     .run(
//!         // The Redis side's own verb would do this; the manager has no
//!         // Redis here, so the breaker sends every call to the memory side.
//!         |_redis| async {
//!             let incr = redis::cmd("INCR").arg("visits").clone();
//!             failover.manager().query::<u64>(&incr).await
//!         },
//!         |memory, _reason| async move {
//!             let mut count = memory.0.lock().expect("not poisoned");
//!             *count += 1;
//!             *count
//!         },
//!     )
//!     .await;
//! assert!(served.is_fallback());
//! assert_eq!(served.value, 1);
//! assert!(failover.is_degraded());
//! # }
//! ```
//!
//! With the `metrics` feature, per failover (label `layer`, its
//! [`name`](FailoverBuilder::name)): `tower_redis_degraded` (0 or 1),
//! `tower_redis_outage_queue_bytes`, `tower_redis_outage_replayed_total` and
//! `tower_redis_outage_refused_total`.

mod queue;
mod recovery;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::error::Error;
use crate::failover::{FallbackReason, Served, Source};
use crate::manager::RedisManager;
use crate::record;
use queue::OutageQueue;

/// A change made while Redis was unavailable, waiting to be written to it.
///
/// `Clone` lets the queue measure whether a change fits after it merges,
/// on a copy of its key's newest queued change: the copy must be deep as
/// far as [`merge`](Self::merge) goes (merging into it must leave the
/// original as it was).
pub trait Deferred: Clone + Send + Sync + 'static {
    /// What it changes: the key [`Failover::is_pending`] is asked about, and
    /// whose queued changes a later delete replaces.
    fn key(&self) -> &str;
    /// Its approximate memory, in bytes, bookkeeping included.
    fn weight(&self) -> usize;
    /// Deletes are never refused nor dropped, and replace the queued
    /// changes of their key (except those that
    /// [outlive](Self::outlives_delete) it).
    fn is_delete(&self) -> bool {
        false
    }
    /// Whether a later delete of its key leaves it queued, ahead of the
    /// delete, instead of replacing it: a change whose replay tells a
    /// later change of another key something (whether the key was still in
    /// Redis, for example). Default: replaced.
    fn outlives_delete(&self) -> bool {
        false
    }
    /// Absorbs `newer`, a later change of the same key, when writing the
    /// result alone leaves Redis exactly as writing `self` then `newer`
    /// would; returns whether it did. The queue asks the key's newest
    /// queued change (not one being written), so that repeated changes of
    /// one key take the room of one, and one client cannot fill the queue
    /// with them. Default: never.
    fn merge(&mut self, newer: &Self) -> bool
    where
        Self: Sized,
    {
        let _ = newer;
        false
    }
}

/// The Redis side of a [`Failover`]: what it writes when Redis is back.
pub trait Replay: Send + Sync + 'static {
    /// The changes it queues during an outage ([`NoChange`] for none).
    type Change: Deferred;

    /// Writes `changes`, oldest first. Must never overwrite newer data in
    /// Redis (per-entry timestamps checked by a script, for example): a
    /// change may be written again after a failure. On an error, says how
    /// many changes from the front were written; the rest are kept, in
    /// order, and tried again later.
    fn replay(
        &self,
        manager: &RedisManager,
        changes: &[Self::Change],
    ) -> impl Future<Output = Result<(), ReplayError>> + Send;
}

/// The memory side of a [`Failover`]: what it does when Redis answers again
/// and when the pair is healthy again.
pub trait Recovered: Send + Sync + 'static {
    /// Redis answered one of the failover's operations after fallbacks,
    /// perhaps with the queue still being written. Called once per return
    /// of Redis (a fallback after it arms it again), under the operation
    /// that got the answer, so keep it cheap. For a memory side whose
    /// entries must not be served in a later fallback once Redis has moved
    /// on without them (the cache's entries, which other instances may
    /// purge in Redis meanwhile).
    fn answered(&self) {}

    /// The queue is written and Redis answers: drop what only mattered
    /// during the outage (local entries, counts). Called once per outage,
    /// under the queue's lock: it must not call back into the failover.
    fn recovered(&self) {}
}

/// A [`Replay::replay`] that stopped: the first `written` changes are in
/// Redis, the rest are not.
#[derive(Debug)]
pub struct ReplayError {
    /// How many changes from the front were written.
    pub written: usize,
    /// Why the next one was not.
    pub error: Error,
}

impl ReplayError {
    /// None of the changes were written.
    pub fn none(error: Error) -> Self {
        Self { written: 0, error }
    }
}

/// A change for failovers that queue none (the rate limiter): it cannot be
/// made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoChange {}

impl Deferred for NoChange {
    fn key(&self) -> &str {
        match *self {}
    }
    fn weight(&self) -> usize {
        match *self {}
    }
}

/// A change was refused: it does not fit in the outage queue's byte bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the outage queue is full ({limit_bytes} bytes)")]
pub struct QueueFull {
    /// The queue's bound.
    pub limit_bytes: usize,
}

/// How much of its bound the outage queue uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct QueueUsage {
    /// Changes queued or being written.
    pub changes: usize,
    /// Their weight in bytes.
    pub bytes: usize,
    /// The bound.
    pub limit_bytes: usize,
}

/// A Redis store and a memory store composed: see the [module](self).
///
/// Cloning is cheap; the clones share the queue and the degraded state.
pub struct Failover<R: Replay, M> {
    shared: Arc<Shared<R, M>>,
}

impl<R: Replay, M> Clone for Failover<R, M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

pub(crate) struct Shared<R: Replay, M> {
    manager: RedisManager,
    redis: R,
    memory: M,
    queue: OutageQueue<R::Change>,
    name: &'static str,
    degraded: AtomicBool,
    /// Whether the memory side was told of Redis's answer since the last
    /// fallback.
    answered: AtomicBool,
    task_started: AtomicBool,
    /// Wakes the recovery task: a change queued, a Redis answer while
    /// degraded, or the failover dropped.
    wake: Arc<Notify>,
    epoch: watch::Sender<u64>,
    /// One writer of the queue at a time, so that it is written in order.
    draining: tokio::sync::Mutex<()>,
    /// Changes written from the queue so far (by either writer): whether a
    /// catch-up that ran out of time saw Redis answer.
    replayed: AtomicU64,
    batch: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    /// Whether the breaker closing (its probe answered) ends an outage that
    /// has nothing queued, or only an answer to [`Failover::run`] does.
    recover_on_probe: bool,
}

/// Builds a [`Failover`]; see [`Failover::builder`].
pub struct FailoverBuilder<R, M> {
    manager: RedisManager,
    redis: R,
    memory: M,
    queue_bytes: usize,
    name: &'static str,
    batch: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    recover_on_probe: bool,
}

impl<R: Replay, M: Recovered> FailoverBuilder<R, M> {
    /// The outage queue's bound in bytes (default 1 MiB).
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }

    /// The `layer` label of its metrics and the name in its logs.
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// How many changes one [`Replay::replay`] call gets at most (default 64).
    pub fn batch(mut self, changes: usize) -> Self {
        self.batch = changes.max(1);
        self
    }

    /// The wait before writing the queue again after a failure: doubles
    /// from `min` up to `max` (default 100 ms to 5 s).
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// Ends an outage only when Redis answers one of this failover's own
    /// operations ([`Failover::run`]) or takes its queue, not when the
    /// breaker's probe answers: for a memory side whose state must hold
    /// until Redis serves this layer again (the rate limiter's local counts
    /// through a breaker that closes and opens again). Default: either ends it.
    pub fn recover_on_answer_only(mut self) -> Self {
        self.recover_on_probe = false;
        self
    }

    /// The failover.
    pub fn build(self) -> Failover<R, M> {
        Failover {
            shared: Arc::new(Shared {
                queue: OutageQueue::new(self.queue_bytes),
                manager: self.manager,
                redis: self.redis,
                memory: self.memory,
                name: self.name,
                degraded: AtomicBool::new(false),
                answered: AtomicBool::new(true),
                replayed: AtomicU64::new(0),
                task_started: AtomicBool::new(false),
                wake: Arc::new(Notify::new()),
                epoch: watch::Sender::new(0),
                draining: tokio::sync::Mutex::new(()),
                batch: self.batch,
                min_backoff: self.min_backoff,
                max_backoff: self.max_backoff,
                recover_on_probe: self.recover_on_probe,
            }),
        }
    }
}

impl<R: Replay, M: Recovered> Failover<R, M> {
    /// A failover with an outage queue of `queue_bytes` and the defaults of
    /// [`builder`](Self::builder).
    pub fn new(manager: RedisManager, redis: R, memory: M, queue_bytes: usize) -> Self {
        Self::builder(manager, redis, memory)
            .queue_bytes(queue_bytes)
            .build()
    }

    /// A builder, for the name, batch size and retry backoff.
    pub fn builder(manager: RedisManager, redis: R, memory: M) -> FailoverBuilder<R, M> {
        FailoverBuilder {
            manager,
            redis,
            memory,
            queue_bytes: 1 << 20,
            name: "failover",
            batch: 64,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            recover_on_probe: true,
        }
    }

    /// The Redis side.
    pub fn redis(&self) -> &R {
        &self.shared.redis
    }

    /// The memory side.
    pub fn memory(&self) -> &M {
        &self.shared.memory
    }

    /// The shared connection manager.
    pub fn manager(&self) -> &RedisManager {
        &self.shared.manager
    }

    /// Runs `redis_op` on the Redis side when the breaker allows it, else
    /// (or when it fails or times out) `memory_op` on the memory side, and
    /// keeps the degraded state: a fallback marks the pair degraded; a Redis
    /// answer while degraded ends the outage once the queue is written.
    ///
    /// `redis_op` should make its calls through [`RedisManager::run`] (or
    /// the query helpers), so that the breaker and the command timeout
    /// apply to each of them.
    ///
    /// `redis_op` is called at once, to make its future; what it does runs
    /// when the returned future is polled. The returned future holds the
    /// Redis operation's future, then (only after a failure) the memory
    /// side's, never both, and each once: it is a chain of combinators, not
    /// an `async` body, which would also keep the two closures it was given
    /// beside its copies of them.
    pub fn run<'a, T, F, Fut, G, GFut>(
        &'a self,
        redis_op: F,
        memory_op: G,
    ) -> impl Future<Output = Served<T>>
    where
        F: FnOnce(&'a R) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
        G: FnOnce(&'a M, FallbackReason) -> GFut,
        GFut: Future<Output = T>,
    {
        use futures_util::FutureExt as _;
        use futures_util::future::Either;
        let shared = &*self.shared;
        redis_op(&shared.redis).then(move |result| match result {
            Ok(value) => {
                if shared.degraded.load(Ordering::Acquire) {
                    self.on_redis_answer();
                }
                Either::Left(std::future::ready(Served {
                    value,
                    source: Source::Redis,
                }))
            }
            Err(error) => {
                let reason = FallbackReason::of(&error);
                if reason != FallbackReason::BreakerOpen {
                    tracing::debug!(target: "tower_redis", layer = shared.name, %error, "Redis operation failed; using the in-process store");
                }
                crate::failover::record_fallback(reason);
                self.mark_degraded();
                Either::Right(memory_op(&shared.memory, reason).map(move |value| {
                    // Again, after: an outage that ended (or a return of
                    // Redis the memory side heard of) while `memory_op` ran
                    // must not leave what it stored unaccounted for.
                    self.mark_degraded();
                    Served {
                        value,
                        source: Source::Fallback(reason),
                    }
                }))
            }
        })
    }

    /// Queues a change for Redis. Refused when it does not fit (a delete
    /// never is). Marks the pair degraded and wakes the recovery task.
    pub fn defer(&self, change: R::Change) -> Result<(), QueueFull> {
        self.defer_all(vec![change])
    }

    /// Queues `changes` in order, all or none (an id change: the delete of
    /// the old key and the creation of the new one). The deletes among them
    /// free the room of the changes they replace before the rest is
    /// measured; a batch of deletes only is always accepted.
    pub fn defer_all(&self, changes: Vec<R::Change>) -> Result<(), QueueFull> {
        let shared = &*self.shared;
        let result = shared.queue.push_all(changes, || {
            // Under the queue's lock, so recovery cannot declare the queue
            // empty and the pair healthy between the push and this.
            shared.degraded.store(true, Ordering::Release);
        });
        match result {
            Ok(()) => {
                record_queue_bytes(shared.name, shared.queue.usage().bytes);
                self.ensure_task();
                shared.wake.notify_one();
            }
            Err(_) => record_refused(shared.name),
        }
        result
    }

    /// Whether `key` has changes queued or being written: until they are in
    /// Redis, the memory side holds the newer data. One hash lookup; no lock
    /// while the queue is empty.
    pub fn is_pending(&self, key: &str) -> bool {
        self.shared.queue.contains(key)
    }

    /// Whether `key` has changes still waiting to be written, not counting
    /// those being written right now (a change being written may already be
    /// partly in Redis).
    pub fn is_queued(&self, key: &str) -> bool {
        self.shared.queue.is_queued(key)
    }

    /// Whether Redis is known unavailable right now (its breaker is open):
    /// [`run`](Self::run) would send nothing and answer from the memory
    /// side with reason [`FallbackReason::BreakerOpen`]. A caller that
    /// already holds that answer serves it at once and calls
    /// [`served_while_open`](Self::served_while_open), with no future made.
    pub fn is_open(&self) -> bool {
        !self.shared.manager.is_available()
    }

    /// Accounts an answer served from the memory side because
    /// [`is_open`](Self::is_open) said so, as [`run`](Self::run) accounts
    /// its fallbacks: the fallback is recorded and the pair is degraded.
    pub fn served_while_open(&self) {
        crate::failover::record_fallback(FallbackReason::BreakerOpen);
        self.mark_degraded();
    }

    /// Whether the memory side has been used since Redis last recovered.
    pub fn is_degraded(&self) -> bool {
        self.shared.degraded.load(Ordering::Acquire)
    }

    /// Whether [`catch_up`](Self::catch_up) has nothing to do: the memory
    /// side has not been used since Redis last recovered, or Redis is
    /// still unavailable. A caller that reads state kept coherent through
    /// Redis (a copy in process memory) checks this before trusting it at
    /// once, without awaiting.
    pub fn is_caught_up(&self) -> bool {
        !self.is_degraded() || !self.shared.manager.is_available()
    }

    /// The recovery epoch: bumped after each full recovery.
    pub fn recovered(&self) -> watch::Receiver<u64> {
        self.shared.epoch.subscribe()
    }

    /// How much of its bound the outage queue uses.
    pub fn queue_usage(&self) -> QueueUsage {
        self.shared.queue.usage()
    }

    /// When degraded and the breaker lets requests through: writes the
    /// queue now, on the caller's time (waiting for a write in progress),
    /// instead of leaving it to the recovery task. For a layer whose next
    /// read must already see the outage's changes (the cache's purges).
    /// Nothing at all while healthy but one atomic load.
    ///
    /// The caller waits at most one command timeout: a long queue (or one
    /// that keeps failing) is left to the recovery task, and the caller
    /// goes on (the write in progress is cancel-safe: what it did not
    /// finish stays queued).
    ///
    /// False when that timeout passed with nothing written while Redis
    /// answers nothing: no operation has succeeded since the last one
    /// failed (it hangs, and the breaker has not opened yet). The caller
    /// has then waited for Redis as long as a request may, and should not
    /// ask it again: [`run_caught_up`](Self::run_caught_up) does not, and
    /// answers from the memory side. That wait counts as a timeout toward
    /// the breaker, as the request's own operation would have. A long
    /// queue that a healthy Redis is still writing is true: the caller
    /// goes on to Redis.
    ///
    /// The write is boxed: while healthy this future is a few words, so a
    /// caller on a hot path can await it inline.
    pub async fn catch_up(&self) -> bool {
        if self.is_caught_up() {
            return true;
        }
        // A `dyn` box: its type does not nest into every caller's future.
        let write: std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> =
            Box::pin(self.write_queue_now());
        write.await
    }

    /// [`catch_up`](Self::catch_up)'s write, within one command timeout.
    async fn write_queue_now(&self) -> bool {
        let within = self.shared.manager.command_timeout();
        let replayed = self.shared.replayed.load(Ordering::Acquire);
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(within, recovery::drain(&self.shared)).await {
            Ok(recovery::Drained::Empty { wrote }) => {
                if wrote {
                    recovery::finish(&self.shared);
                }
                true
            }
            // A failure that came at once (a change Redis refused, the
            // breaker open), or a queue that Redis is writing: it answers.
            _ if started.elapsed() < within
                || self.shared.replayed.load(Ordering::Acquire) != replayed =>
            {
                true
            }
            // A whole timeout with nothing written: Redis answers if any
            // operation has succeeded since the last failure (a long batch,
            // a purge paging through a large index, is under way).
            _ => {
                let manager = &self.shared.manager;
                if !manager.is_failing() || !manager.is_available() {
                    return true;
                }
                let _ = manager.record_timeout();
                false
            }
        }
    }

    /// [`run`](Self::run), for a caller that awaited
    /// [`catch_up`](Self::catch_up) first, or whose earlier operation timed
    /// out: when that found Redis not answering (`caught_up` is false), and
    /// Redis still hangs (the last failure a timeout, no operation having
    /// succeeded since: [`RedisManager::is_hanging`]), Redis is not asked
    /// again, and the memory side answers at once, as after a timeout. A request then waits for Redis at most one command timeout,
    /// not two.
    pub fn run_caught_up<'a, T, F, Fut, G, GFut>(
        &'a self,
        caught_up: bool,
        redis_op: F,
        memory_op: G,
    ) -> impl Future<Output = Served<T>>
    where
        F: FnOnce(&'a R) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
        G: FnOnce(&'a M, FallbackReason) -> GFut,
        GFut: Future<Output = T>,
    {
        use futures_util::future::Either;
        let manager = &self.shared.manager;
        self.run(
            move |redis| {
                if caught_up || manager.is_available() && !manager.is_hanging() {
                    // Redis answered another operation since: it is asked.
                    Either::Left(redis_op(redis))
                } else if manager.is_available() {
                    Either::Right(std::future::ready(Err(Error::Timeout(
                        manager.command_timeout(),
                    ))))
                } else {
                    // Opened meanwhile: no call would be made anyway.
                    Either::Right(std::future::ready(Err(Error::BreakerOpen)))
                }
            },
            memory_op,
        )
    }

    fn mark_degraded(&self) {
        let shared = &*self.shared;
        if shared.answered.load(Ordering::Acquire) {
            shared.answered.store(false, Ordering::Release);
        }
        if !shared.degraded.load(Ordering::Acquire) && !shared.degraded.swap(true, Ordering::AcqRel)
        {
            tracing::info!(target: "tower_redis", layer = shared.name, "Redis unavailable: serving from the in-process store");
            record_degraded(shared.name, true);
        }
        self.ensure_task();
    }

    fn on_redis_answer(&self) {
        let shared = &*self.shared;
        if !shared.answered.load(Ordering::Acquire) && !shared.answered.swap(true, Ordering::AcqRel)
        {
            shared.memory.answered();
        }
        if shared.queue.len() == 0 {
            recovery::finish(shared);
        } else {
            self.ensure_task();
            shared.wake.notify_one();
        }
    }

    fn ensure_task(&self) {
        let shared = &*self.shared;
        if shared.task_started.load(Ordering::Acquire)
            || shared.task_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        if !recovery::spawn(&self.shared) {
            // Outside a runtime: the next call from inside one starts it.
            shared.task_started.store(false, Ordering::Release);
        }
    }
}

impl<R: Replay, M> Drop for Shared<R, M> {
    fn drop(&mut self) {
        // The recovery task waits on this; it then finds the failover gone.
        self.wake.notify_one();
    }
}

impl<R: Replay, M> fmt::Debug for Failover<R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("name", &self.shared.name)
            .field("degraded", &self.shared.degraded.load(Ordering::Relaxed))
            .field("queue", &self.shared.queue.usage())
            .finish_non_exhaustive()
    }
}

fn record_degraded(layer: &'static str, degraded: bool) {
    let value = if degraded { 1.0 } else { 0.0 };
    record::gauge("tower_redis_degraded", &[("layer", layer)], value);
}

fn record_queue_bytes(layer: &'static str, bytes: usize) {
    #[allow(clippy::cast_precision_loss)] // A gauge of bytes: f64 is exact far enough.
    record::gauge(
        "tower_redis_outage_queue_bytes",
        &[("layer", layer)],
        bytes as f64,
    );
}

fn record_refused(layer: &'static str) {
    record::counter("tower_redis_outage_refused_total", &[("layer", layer)], 1);
}

fn record_replayed(layer: &'static str, changes: usize) {
    let changes = u64::try_from(changes).unwrap_or(u64::MAX);
    record::counter(
        "tower_redis_outage_replayed_total",
        &[("layer", layer)],
        changes,
    );
}
