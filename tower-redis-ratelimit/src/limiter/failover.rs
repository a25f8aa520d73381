//! Redis when it answers, else the configured [`Fallback`]: the only place
//! that knows about both stores.
//!
//! While Redis is unavailable the in-process store counts alone; its counts
//! are not the shared ones, so the first answer from Redis afterwards drops
//! them. That is this crate's whole recovery step; it lives here alone so
//! that core's shared failover composition can replace it in one place.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};

use tower_redis_core::FallbackReason;

use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::{DecisionStore, Fallback, Query, Verdict};

/// The Redis store composed with the fallback.
#[derive(Debug)]
pub(super) struct Failover<R = RedisStore> {
    redis: R,
    fallback: Fallback,
    memory: MemoryStore,
    /// Set when the memory store has counts that must be dropped once Redis
    /// decides again.
    memory_dirty: AtomicBool,
}

impl<R> Failover<R>
where
    R: DecisionStore<Error = FallbackReason>,
{
    /// With [`Fallback::Local`], a memory store of `share` of each quota
    /// holding at most `memory_bytes` of counters.
    pub(super) fn new(redis: R, fallback: Fallback, memory_bytes: u64) -> Self {
        let share = match fallback {
            Fallback::Local { share } => share,
            Fallback::Allow | Fallback::Deny => 1.0,
        };
        Self {
            redis,
            fallback,
            memory: MemoryStore::new(share, memory_bytes),
            memory_dirty: AtomicBool::new(false),
        }
    }

    /// One verdict per request, from Redis or, when it does not answer,
    /// from the fallback.
    pub(super) async fn decide(&self, requests: &[Query<'_>]) -> Vec<Verdict> {
        match self.redis.decide(requests).await {
            Ok(verdicts) => {
                self.redis_answered();
                verdicts
            }
            Err(_reason) => self.decide_without_redis(requests).await,
        }
    }

    /// Redis decides again: the memory store's counts no longer apply.
    fn redis_answered(&self) {
        if self.memory_dirty.load(Ordering::Acquire)
            && self.memory_dirty.swap(false, Ordering::AcqRel)
        {
            self.memory.clear();
        }
    }

    async fn decide_without_redis(&self, requests: &[Query<'_>]) -> Vec<Verdict> {
        match self.fallback {
            Fallback::Local { .. } => {
                self.memory_dirty.store(true, Ordering::Release);
                // The trait's verb, not the memory store's one-request `decide`.
                let verdicts: Result<_, Infallible> =
                    DecisionStore::decide(&self.memory, requests).await;
                match verdicts {
                    Ok(verdicts) => verdicts,
                    Err(never) => match never {},
                }
            }
            Fallback::Allow => requests
                .iter()
                .map(|(checks, _)| Verdict::fail_open(checks))
                .collect(),
            Fallback::Deny => requests
                .iter()
                .map(|(checks, _)| Verdict::fail_closed(checks))
                .collect(),
        }
    }
}
