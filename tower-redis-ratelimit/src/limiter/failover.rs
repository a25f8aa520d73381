//! Redis when it answers, else the configured [`Fallback`]: the only place
//! that knows about both stores.
//!
//! The two stores are composed by core's [`degrade::Failover`]: it tries
//! Redis through the breaker, falls back to the memory side, and keeps the
//! degraded state. Nothing is queued for Redis during an outage (counters
//! are not replayed, [`NoChange`](tower_redis_core::degrade::NoChange)). The
//! memory store's counts outlive the outage: they age out with their
//! windows, so a Redis that flaps within a period does not hand out a fresh
//! local quota each time it answers.
//! What happens without Redis (count locally, allow, deny) is chosen here,
//! in the fallback.

use std::convert::Infallible;

use tower_redis_core::degrade::{self, Replay};
use tower_redis_core::{Error, RedisManager};

use super::memory::MemoryStore;
use super::redis::{LeaseReply, RedisStore};
use super::{Check, DecisionStore, Fallback, Query, Verdict};

/// The Redis store composed with the fallback.
#[derive(Debug)]
pub(super) struct Failover<R: Replay = RedisStore> {
    stores: degrade::Failover<R, MemoryStore>,
    fallback: Fallback,
}

impl<R> Failover<R>
where
    R: DecisionStore<Error = Error> + Replay<Change = degrade::NoChange>,
{
    /// With [`Fallback::Local`], a memory store of `share` of each quota
    /// holding at most `memory_bytes` of counters.
    pub(super) fn new(
        manager: RedisManager,
        redis: R,
        fallback: Fallback,
        memory_bytes: u64,
    ) -> Self {
        let share = match fallback {
            Fallback::Local { share } => share,
            Fallback::Allow | Fallback::Deny => 1.0,
        };
        let memory = MemoryStore::new(share, memory_bytes);
        let stores = degrade::Failover::builder(manager, redis, memory)
            .name("ratelimit")
            .queue_bytes(0)
            // The local counts hold until a decision of ours comes from
            // Redis again, not merely until the breaker's probe answers.
            .recover_on_answer_only()
            .build();
        Self { stores, fallback }
    }

    /// One verdict per request, from Redis or, when it does not answer,
    /// from the fallback.
    pub(super) async fn decide(&self, requests: &[Query<'_>]) -> Vec<Verdict> {
        let fallback = self.fallback;
        self.stores
            .run(
                |redis| redis.decide(requests),
                |memory, _reason| decide_without_redis(memory, fallback, requests),
            )
            .await
            .value
    }
}

impl<R> Failover<R>
where
    R: DecisionStore<Error = Error> + Replay<Change = degrade::NoChange>,
{
    /// The fallback's verdict for one request, Redis not asked (it is
    /// known to be unavailable); the pair's degraded state is kept as for
    /// any fallback.
    pub(super) async fn without_redis(&self, checks: &[Check], cost: u32) -> Verdict {
        let fallback = self.fallback;
        let requests = [(checks, cost)];
        self.stores
            .run(
                |_| std::future::ready(Err::<Vec<Verdict>, _>(Error::BreakerOpen)),
                |memory, _reason| decide_without_redis(memory, fallback, &requests),
            )
            .await
            .value
            .into_iter()
            .next()
            .unwrap_or_else(|| Verdict::fail_open(checks))
    }
}

impl Failover<RedisStore> {
    /// Takes up to `want` units of `check`'s counter for this instance's
    /// lease, or, when Redis does not answer, the fallback's verdict for
    /// the whole request (`checks`, `cost`), as without a lease.
    pub(super) async fn lease(
        &self,
        check: &Check,
        want: u64,
        checks: &[Check],
        cost: u32,
    ) -> Result<LeaseReply, Verdict> {
        let fallback = self.fallback;
        let requests = [(checks, cost)];
        self.stores
            .run(
                |redis| async move {
                    redis
                        .lease(&check.key, check.algorithm, want, cost)
                        .await
                        .map(Ok)
                },
                |memory, _reason| async move {
                    Err(decide_without_redis(memory, fallback, &requests)
                        .await
                        .into_iter()
                        .next()
                        .unwrap_or_else(|| Verdict::fail_open(checks)))
                },
            )
            .await
            .value
    }
}

async fn decide_without_redis(
    memory: &MemoryStore,
    fallback: Fallback,
    requests: &[Query<'_>],
) -> Vec<Verdict> {
    match fallback {
        Fallback::Local { .. } => {
            // The trait's verb, not the memory store's one-request `decide`.
            let verdicts: Result<_, Infallible> = DecisionStore::decide(memory, requests).await;
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
