//! The composite the layer talks to: core's [`degrade::Failover`] of the
//! Redis store and the in-process one, with the session's rules on top.
//!
//! - A read is served by Redis when it can be; otherwise by the local copy.
//!   Every answer from Redis refreshes the copy, so a session read before
//!   an outage stays readable through it.
//! - A write goes to Redis; when Redis fails it is accepted, deferred to
//!   core's outage queue (a [`Change`]), and applied to the local copy. So
//!   is a write of a request whose read (or delete) of the session timed
//!   out, while no operation has succeeded since: the request has waited
//!   for Redis as long as it may. A
//!   session with changes still queued is written behind them, through the
//!   queue, even when Redis is back: sent directly, a change could find the
//!   session not created yet and be lost, or a log out be undone by the
//!   replay of the creation.
//! - The local copy is written through on every accepted write. It is kept
//!   when Redis recovers: it is also what reads fall back on next time.
//!
//! Core runs the Redis halves through the manager (breaker, timeout, the
//! shared fallback metrics) and writes the queue to Redis when it is back
//! ([`Replay`](tower_redis_core::degrade::Replay) on the Redis store).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tower_redis_core::degrade::{self, QueueFull, Recovered};
use tower_redis_core::record;
use tower_redis_core::{FallbackReason, RedisManager, Source};

use super::change::Change;
use super::ended::Announcements;
use super::ends::EndMark;
use super::local::{LocalCopy, LocalStore};
use super::redis::RedisStore;
use super::{LocalLimits, LocalUsage, Record, Saved, Store, Take, Write, now_ms};
use crate::config::Expiry;

/// How soon the outage queue is written again after a failed attempt while
/// Redis answers (a write it refused, out of memory for example).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Cheap to clone: the clones share the pair, its queue and its state.
#[derive(Clone)]
pub(crate) struct Failover {
    pair: degrade::Failover<RedisStore, LocalStore>,
    limits: LocalLimits,
    /// Ends the local copies of sessions ended on other instances.
    ended: Arc<Announcements>,
}

/// The local copies outlive an outage; once every change is in Redis, the
/// pinned ones go back to the LRU.
impl Recovered for LocalStore {
    fn recovered(&self) {
        self.unpin_all();
    }
}

impl Failover {
    #[cfg(test)]
    pub(crate) fn new(manager: RedisManager, expiry: Expiry, limits: LocalLimits) -> Self {
        Self::with_durability(manager, expiry, limits, crate::Durability::default())
    }

    pub(crate) fn with_durability(
        manager: RedisManager,
        expiry: Expiry,
        limits: LocalLimits,
        durability: crate::Durability,
    ) -> Self {
        let pin_limit = limits
            .copies_bytes
            .saturating_add(u64::try_from(limits.queue_bytes).unwrap_or(u64::MAX));
        let local = LocalStore::new(limits.copies_bytes, pin_limit, expiry.idle, expiry.absolute);
        let redis = RedisStore::new(manager.clone(), expiry, limits.tracked_bytes)
            .with_durability(durability)
            .with_local(local.clone());
        let pair = degrade::Failover::builder(manager.clone(), redis, local.clone())
            .name("session")
            .queue_bytes(limits.queue_bytes)
            .retry_backoff(RETRY_AFTER, RETRY_AFTER)
            // One change per write: a session stops being pending (read from
            // the local copy) as soon as its own changes are in Redis, not
            // when a whole batch is, so reads move back to Redis one by one
            // during the replay instead of piling onto this instance.
            .batch(1)
            .build();
        let ended = Announcements::new(manager.clone(), local.clone());
        ended.ensure_started();
        Self {
            pair,
            limits,
            ended,
        }
    }

    pub(crate) fn manager(&self) -> &RedisManager {
        self.pair.manager()
    }

    pub(crate) fn expiry(&self) -> &Expiry {
        self.redis().expiry()
    }

    pub(crate) fn redis(&self) -> &RedisStore {
        self.pair.redis()
    }

    pub(crate) fn local(&self) -> &LocalStore {
        self.pair.memory()
    }

    pub(crate) fn local_usage(&self) -> LocalUsage {
        let queue = self.pair.queue_usage();
        LocalUsage {
            queued_changes: queue.changes,
            queued_bytes: queue.bytes,
            queue_limit_bytes: self.limits.queue_bytes,
            local_copies_bytes: self.local().copies_bytes(),
            local_copies_limit_bytes: self.limits.copies_bytes,
            pinned_copies_bytes: self.local().pinned_bytes(),
            tracked_copies_bytes: self.redis().tracked_bytes(),
        }
    }

    #[cfg(test)]
    pub(crate) fn has_ended(&self, storage_key: &str) -> bool {
        self.local().has_ended(storage_key)
    }

    /// How often this instance renews a session's idle timeout in Redis
    /// ([`Expiry::renew_every_ms`]). Between renewals a read is a single
    /// `HGETALL`.
    pub(crate) fn touch_every_ms(&self) -> u64 {
        self.expiry().renew_every_ms()
    }

    /// A session's record: this instance's tracked copy when Redis has not
    /// changed it since, else read from Redis (or in process).
    #[cfg(test)]
    pub(crate) async fn load(&self, storage_key: &str) -> Option<Record> {
        match self.load_now(storage_key) {
            Ok(record) => Some(record),
            Err(later) => self.load_later(storage_key, later).await.record,
        }
    }

    /// [`load`](Self::load)'s answer when it needs no waiting: the tracked
    /// copy of a session unchanged in Redis since this instance read it,
    /// whose idle timeout needs no renewal yet (0 round trips). Else what
    /// [`load_later`](Self::load_later) goes on with.
    pub(crate) fn load_now(&self, storage_key: &str) -> Result<Record, Later> {
        if self.pair.is_pending(storage_key) {
            return Err(Later::Queued);
        }
        if self.local().has_pinned() {
            // Its changes are in Redis now (if it had any)…
            self.local().unpin(storage_key);
            // …unless a concurrent write queued one since (it pins the copy
            // after queueing: pinned again here if that came first).
            if self.pair.is_pending(storage_key) {
                self.local().pin(storage_key);
            }
        }
        let started_ms = now_ms();
        // Before anything is read: an end from here on is one the read's
        // copy must hear of.
        let mark = self.local().end_mark();
        let every_ms = self.touch_every_ms();
        // While Redis is unavailable the tracked copies are gone (a lost
        // tracking connection empties them): not looked for.
        let tracked = if self.pair.is_degraded() {
            None
        } else {
            self.redis().tracked(storage_key, started_ms)
        };
        // The common case: the tracked copy knows of a renewal recent
        // enough, so none is due.
        let tracked = match tracked {
            Some((record, touched_ms)) if !super::renewal_due(touched_ms, started_ms, every_ms) => {
                return Ok(record);
            }
            tracked => tracked,
        };
        let copy = self.local().copy(storage_key);
        let touch = LocalCopy::touch_due(copy.as_deref(), started_ms, every_ms);
        if !touch && let Some((record, _)) = tracked {
            return Ok(record);
        }
        // Redis is known down (its breaker is open): a read would send
        // nothing and answer with this copy (see `read`). Answered here,
        // with no future made, so that a degraded read costs no more than
        // a tracked one.
        if self.pair.is_open()
            && let Some(record) = self.local().live_record(storage_key, copy.as_deref())
        {
            self.pair.served_while_open();
            return Ok(record);
        }
        Err(Later::Read {
            copy,
            started_ms,
            mark,
            touch,
        })
    }

    /// The load [`load_now`](Self::load_now) could not answer.
    pub(crate) fn load_later(
        &self,
        storage_key: &str,
        later: Later,
    ) -> impl Future<Output = Loaded> + Send {
        use futures_util::future::Either;
        match later {
            // Changes from an outage are still on their way to Redis: this
            // instance's copy is the newer one.
            // Boxed: this rare path's state is not part of every load's.
            Later::Queued => Either::Left(Box::pin(async move {
                Loaded {
                    record: local(self.local().load(storage_key, false).await),
                    waited: false,
                }
            })),
            Later::Read {
                copy,
                started_ms,
                mark,
                touch,
            } => Either::Right(self.read(storage_key, copy, (started_ms, mark), touch)),
        }
    }

    /// Reads the session from Redis (renewing its idle timeout when
    /// `touch`), or in process while Redis is unavailable.
    ///
    /// Not an `async fn`, which would hold its arguments twice in the
    /// future of every load.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its arguments twice in its future"
    )]
    fn read(
        &self,
        storage_key: &str,
        copy: Option<Arc<LocalCopy>>,
        (started_ms, mark): (u64, EndMark),
        touch: bool,
    ) -> impl Future<Output = Loaded> + Send {
        // Before a copy is made: it must hear of its session's end.
        self.ended.ensure_started();
        async move {
            let read_copy = &copy;
            let served = self
                .pair
                .run(
                    |redis| redis.load(storage_key, touch),
                    // Boxed: only a load during an outage pays for its state.
                    |local_store, reason| {
                        Box::pin(async move {
                            if reason == FallbackReason::BreakerOpen {
                                // Nothing was sent, nothing was awaited: the copy
                                // read above is the current one (Redis is down,
                                // and a second lookup would make the degraded
                                // read dearer than a tracked one).
                                local_store.live_record(storage_key, read_copy.as_deref())
                            } else {
                                local(local_store.load(storage_key, touch).await)
                            }
                        })
                    },
                )
                .await;
            if served.source == Source::Redis {
                if !touch && let Some(copy) = &copy {
                    self.redis().renewed_at(storage_key, copy.touched_ms);
                }
                self.local().refresh(
                    storage_key,
                    served.value.as_ref(),
                    copy,
                    touch,
                    started_ms,
                    mark,
                );
            }
            Loaded {
                // A wait, not a refusal or a breaker open (no wait).
                waited: served.source == Source::Fallback(FallbackReason::Timeout),
                record: served.value,
            }
        }
    }

    pub(crate) async fn save(&self, write: &Write<'_>, waited: bool) -> Saved {
        self.ended.ensure_started();
        let storage_key = write.storage_key;
        let (value, queue) = if self.pair.is_pending(storage_key) {
            // Behind the session's earlier changes: see the module docs.
            (Saved::Written, true)
        } else {
            let served = self
                .pair
                .run_caught_up(
                    !waited,
                    |redis| redis.save(write),
                    |_, _| async { Saved::Written },
                )
                .await;
            let queue = served.is_fallback();
            (served.value, queue)
        };
        if queue {
            let change = Change::save(storage_key, write.create, write.changes, now_ms())
                .with_previous_user(write.previous_user);
            if let Err(full) = self.pair.defer(change) {
                refused(full, write.create.is_some());
                return Saved::Refused;
            }
        }
        if value == Saved::Written {
            local(self.local().save(write).await);
            if queue {
                self.pin(storage_key);
            }
        } else {
            local(self.local().delete(storage_key, None).await);
        }
        value
    }

    pub(crate) async fn take(&self, take: &Take<'_>, waited: bool) -> Saved {
        self.ended.ensure_started();
        let (value, queue) = if self.pair.is_pending(take.old_storage_key) {
            // Behind the session's earlier changes: see the module docs.
            (Saved::Written, true)
        } else {
            let served = self
                .pair
                .run_caught_up(
                    !waited,
                    |redis| redis.take(take),
                    |_, _| async { Saved::Written },
                )
                .await;
            let queue = served.is_fallback();
            (served.value, queue)
        };
        if queue {
            let merged = take.merged;
            // Both halves, or neither: the old session ends (and leaves the
            // index of the user it had), and the new one is created with the
            // whole record (and joins the index of the user it has).
            let halves = Change::cycle(
                take.old_storage_key,
                take.previous_user,
                take.new_storage_key,
                merged.created_ms,
                &merged.as_changes(),
                now_ms(),
            );
            if let Err(full) = self.pair.defer_all(halves) {
                // Neither half is queued: the session keeps its old id.
                refused(full, false);
                return Saved::Refused;
            }
        }
        if value == Saved::Written {
            local(self.local().take(take).await);
            if queue {
                self.pin(take.new_storage_key);
            }
        } else {
            local(self.local().delete(take.old_storage_key, None).await);
        }
        value
    }

    pub(crate) async fn delete(&self, storage_key: &str, user: Option<&str>, waited: bool) -> bool {
        // Behind the session's earlier changes: see the module docs.
        let (queue, timed_out) = if self.pair.is_pending(storage_key) {
            (true, false)
        } else {
            let served = self
                .pair
                .run_caught_up(
                    !waited,
                    |redis| redis.delete(storage_key, user),
                    |_, _| async {},
                )
                .await;
            (
                served.is_fallback(),
                served.source == Source::Fallback(FallbackReason::Timeout),
            )
        };
        if queue {
            let queued = self.pair.defer(Change::delete(storage_key, user));
            debug_assert!(queued.is_ok(), "a deletion is never refused");
        }
        local(self.local().delete(storage_key, user).await);
        timed_out
    }

    /// Pins the copy of a session whose change was just queued, unless the
    /// recovery task already wrote it (then nothing would unpin it). Only
    /// this pin is undone: a change another request queued meanwhile pins
    /// the copy again, and it stays pinned.
    fn pin(&self, storage_key: &str) {
        if let Some(pin) = self.local().pin_numbered(storage_key)
            && !self.pair.is_pending(storage_key)
        {
            self.local().unpin_if(storage_key, pin);
        }
    }

    /// Writes the queued outage changes to Redis now, oldest first, when
    /// Redis answers (the recovery task does it on its own otherwise).
    #[cfg(test)]
    pub(crate) async fn reconcile(&self) {
        self.pair.catch_up().await;
    }
}

/// The in-process store's answer (it cannot fail).
fn local<T>(result: Result<T, Infallible>) -> T {
    match result {
        Ok(value) => value,
        Err(never) => match never {},
    }
}

/// Says why a change made during an outage was not kept.
fn refused(full: QueueFull, create: bool) {
    tracing::warn!(
        target: "tower_redis_session",
        limit_bytes = full.limit_bytes,
        "Redis is unavailable and the session outage queue is full; {} (raise SessionLayerBuilder::outage_queue_bytes if this happens in normal outages)",
        if create {
            "a new session was not created: the visitor gets a fresh, empty session on the next request"
        } else {
            "a session change was not kept"
        }
    );
    record::counter("tower_redis_session_refused_total", &[], 1);
}

/// A session read from Redis (or in process), and whether Redis failed the
/// read (it fell back): Redis has then cost the request its wait already,
/// and the request's writes are queued without asking it again (a request
/// waits for Redis at most one command timeout).
pub(crate) struct Loaded {
    pub(crate) record: Option<Record>,
    pub(crate) waited: bool,
}

/// What a load goes on with when [`Failover::load_now`] could not answer.
pub(crate) enum Later {
    /// Changes from an outage are queued for Redis: the local copy answers.
    Queued,
    /// Redis is read (or, while it is unavailable, the local store), with
    /// the local copy read and the renewal decided when the load began.
    Read {
        copy: Option<Arc<LocalCopy>>,
        started_ms: u64,
        /// The local store's `end_mark` before the read.
        mark: EndMark,
        touch: bool,
    },
}
