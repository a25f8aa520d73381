//! The composite the layer talks to: Redis first, the in-process store when
//! Redis is unavailable, and the outage queue in between.
//!
//! - A read is served by Redis when it can be; otherwise by the local copy.
//!   Every answer from Redis refreshes the copy, so a session read before
//!   an outage stays readable through it.
//! - A write goes to Redis; when Redis fails it is accepted, queued for
//!   reconciliation, and applied to the local copy. A session with changes
//!   still queued is written behind them, through the queue, even when
//!   Redis is back.
//! - The local copy is written through on every accepted write.
//!
//! The Redis halves run inside [`RedisManager::failover`], which accounts
//! each outcome to the breaker and to the shared fallback metrics. This type
//! is what core's shared failover will replace.

use std::convert::Infallible;

use tower_redis_core::clock::duration_ms;
use tower_redis_core::record;
use tower_redis_core::{RedisManager, Source};

use super::local::{LocalCopy, LocalStore};
use super::queue::QueueFull;
use super::reconcile::Reconciler;
use super::redis::RedisStore;
use super::{LocalLimits, LocalUsage, Record, Saved, Store, Take, Write, now_ms};
use crate::config::Expiry;

pub(crate) struct Failover {
    redis: RedisStore,
    local: LocalStore,
    reconciler: Reconciler,
    limits: LocalLimits,
}

impl Failover {
    pub(crate) fn new(manager: RedisManager, expiry: Expiry, limits: LocalLimits) -> Self {
        Self {
            redis: RedisStore::new(manager, expiry),
            local: LocalStore::new(limits.copies_bytes, expiry.idle, expiry.absolute),
            reconciler: Reconciler::new(limits.queue_bytes),
            limits,
        }
    }

    pub(crate) fn manager(&self) -> &RedisManager {
        self.redis.manager()
    }

    pub(crate) fn expiry(&self) -> &Expiry {
        self.redis.expiry()
    }

    pub(crate) fn redis(&self) -> &RedisStore {
        &self.redis
    }

    pub(crate) fn local(&self) -> &LocalStore {
        &self.local
    }

    pub(crate) fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }

    pub(crate) fn local_usage(&self) -> LocalUsage {
        LocalUsage {
            queued_changes: self.reconciler.len(),
            queued_bytes: self.reconciler.bytes(),
            queue_limit_bytes: self.limits.queue_bytes,
            local_copies_bytes: self.local.copies_bytes(),
            local_copies_limit_bytes: self.limits.copies_bytes,
        }
    }

    pub(crate) fn has_ended(&self, storage_key: &str) -> bool {
        self.local.has_ended(storage_key)
    }

    /// How often this instance renews a session's idle timeout in Redis:
    /// 1/100 of the idle timeout, at most a minute. Between renewals a read
    /// is a single `HGETALL`.
    pub(crate) fn touch_every_ms(&self) -> u64 {
        (duration_ms(self.expiry().idle) / 100).min(60_000)
    }

    pub(crate) async fn load(&self, storage_key: &str) -> Option<Record> {
        if self.reconciler.has_pending(storage_key) {
            // Changes from an outage are still on their way to Redis: this
            // instance's copy is the newer one.
            return local(self.local.load(storage_key, false).await);
        }
        let copy = self.local.copy(storage_key);
        let started_ms = now_ms();
        let touch = LocalCopy::touch_due(copy.as_deref(), started_ms, self.touch_every_ms());
        let served = self
            .manager()
            .failover(
                |mut conn| async move { self.redis.load_on(&mut conn, storage_key, touch).await },
                |_| async { local(self.local.load(storage_key, touch).await) },
            )
            .await;
        if served.source == Source::Redis {
            self.local
                .refresh(storage_key, served.value.as_ref(), copy, touch, started_ms);
        }
        served.value
    }

    pub(crate) async fn save(&self, write: &Write<'_>) -> Saved {
        let storage_key = write.storage_key;
        let (value, queue) = if self.reconciler.has_pending(storage_key) {
            // Behind the session's earlier changes: see `has_pending`.
            (Saved::Written, true)
        } else {
            let served = self
                .manager()
                .failover(
                    |mut conn| async move { self.redis.save_on(&mut conn, write).await },
                    |_| async { Saved::Written },
                )
                .await;
            let queue = served.is_fallback();
            (served.value, queue)
        };
        if queue {
            let queued =
                self.reconciler
                    .queue_save(storage_key, write.create, write.changes, now_ms());
            if let Err(full) = queued {
                refused(full, write.create.is_some());
                return Saved::Refused;
            }
        }
        if value == Saved::Written {
            local(self.local.save(write).await);
        } else {
            local(self.local.delete(storage_key, None).await);
        }
        value
    }

    pub(crate) async fn take(&self, take: &Take<'_>) -> Saved {
        let pending = self.reconciler.has_pending(take.old_storage_key);
        let (value, queue) = if pending {
            // Behind the session's earlier changes: see `has_pending`.
            (Saved::Written, true)
        } else {
            let served = self
                .manager()
                .failover(
                    |mut conn| async move { self.redis.take_on(&mut conn, take).await },
                    |_| async { Saved::Written },
                )
                .await;
            let queue = served.is_fallback();
            (served.value, queue)
        };
        if queue {
            let merged = take.merged;
            let queued = self.reconciler.queue_cycle(
                take.old_storage_key,
                merged.user.as_deref(),
                take.new_storage_key,
                merged.created_ms,
                &merged.as_changes(),
                now_ms(),
            );
            if let Err(full) = queued {
                // Neither half is queued: the session keeps its old id.
                refused(full, false);
                return Saved::Refused;
            }
        }
        if value == Saved::Written {
            local(self.local.take(take).await);
        } else {
            local(self.local.delete(take.old_storage_key, None).await);
        }
        value
    }

    pub(crate) async fn delete(&self, storage_key: &str, user: Option<&str>) {
        // Behind the session's earlier changes: see `has_pending`.
        let queue =
            self.reconciler.has_pending(storage_key)
                || self
                    .manager()
                    .failover(
                        |mut conn| async move {
                            self.redis.delete_on(&mut conn, storage_key, user).await
                        },
                        |_| async {},
                    )
                    .await
                    .is_fallback();
        if queue {
            self.reconciler.queue_delete(storage_key, user);
        }
        local(self.local.delete(storage_key, user).await);
    }

    /// Writes the queued outage changes to Redis, oldest first.
    pub(crate) async fn reconcile(&self) {
        self.reconciler.replay(&self.redis).await;
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
