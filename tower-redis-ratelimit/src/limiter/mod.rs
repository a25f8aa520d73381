//! Where decisions are made.
//!
//! - [`Limiter`] (here): the entry point. A request blocked in the
//!   blocked-key cache is denied at once; the others join a batch.
//! - `batch`: concurrent decisions gathered into one script call.
//! - `failover`: Redis when it answers, else the configured [`Fallback`],
//!   through core's `degrade::Failover`; the in-process counters are
//!   dropped once Redis answers again.
//! - `redis` and `memory`: the two [`DecisionStore`]s, the script on Redis
//!   and the in-process limiter (its map is `lru`).
//! - `blocked`: keys Redis denied, remembered until their `Retry-After`.
//!
//! The service never knows which of them answered except through
//! [`DecisionSource`].

mod batch;
mod blocked;
mod failover;
mod lease;
mod lru;
mod memory;
mod redis;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_redis_core::RedisManager;
use tower_redis_core::sync::Active;

use self::batch::Batch;
use self::blocked::BlockedKeys;
use self::failover::Failover;
use self::lease::Leases;
use self::redis::RedisStore;
use crate::algorithm::Algorithm;

/// One policy to decide for one request.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    /// The Redis key (and local key) of this policy's counter for this client.
    pub(crate) key: Arc<str>,
    pub(crate) algorithm: Algorithm,
    /// The policy's lease size ([`Policy::lease`](crate::Policy::lease)), if it leases.
    pub(crate) lease: Option<u32>,
}

/// One request to decide: its checks (all or nothing) and its cost.
pub(crate) type Query<'a> = (&'a [Check], u32);

/// How one policy stands after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PolicyState {
    /// Requests (cost units) left now.
    pub(crate) remaining: u64,
    /// Until the policy's quota is fully available again.
    pub(crate) reset: Duration,
    /// For a policy that denied the request: when it would allow it.
    pub(crate) retry_after: Option<Duration>,
}

/// Which mechanism made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionSource {
    /// The shared counters in Redis.
    Redis,
    /// This instance's cache of keys Redis recently denied (no Redis call).
    BlockedCache,
    /// Units this instance leased from Redis earlier (no Redis call).
    Lease,
    /// The in-process limiter, while Redis was unavailable.
    Local,
    /// Redis was unavailable and the layer is configured to fail open.
    FailOpen,
    /// Redis was unavailable and the layer is configured to fail closed.
    FailClosed,
}

impl DecisionSource {
    /// Every source, in declaration order: `source as usize` indexes it
    /// (`tests::every_source_is_at_its_own_index`).
    pub(crate) const ALL: [DecisionSource; 6] = [
        DecisionSource::Redis,
        DecisionSource::BlockedCache,
        DecisionSource::Lease,
        DecisionSource::Local,
        DecisionSource::FailOpen,
        DecisionSource::FailClosed,
    ];

    /// The lower-case name used in logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DecisionSource::Redis => "redis",
            DecisionSource::BlockedCache => "blocked_cache",
            DecisionSource::Lease => "lease",
            DecisionSource::Local => "local",
            DecisionSource::FailOpen => "fail_open",
            DecisionSource::FailClosed => "fail_closed",
        }
    }

    /// True when Redis was not consulted because it is unavailable.
    pub fn is_degraded(self) -> bool {
        matches!(
            self,
            DecisionSource::Local | DecisionSource::FailOpen | DecisionSource::FailClosed
        )
    }
}

/// The outcome for all policies of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) allowed: bool,
    /// Per check, in order; empty when the source knows nothing (fail-open,
    /// fail-closed), or only the blocking checks for the blocked cache.
    pub(crate) states: States,
    pub(crate) source: DecisionSource,
}

/// Policies of a request held inline (the usual one or two) in its
/// checks, its states and the service's lists of them, with no allocation;
/// more spill to the heap.
pub(crate) const INLINE_POLICIES: usize = 2;

/// A verdict's per-check states.
pub(crate) type States = smallvec::SmallVec<[Option<PolicyState>; INLINE_POLICIES]>;

impl Verdict {
    /// Allowed, knowing nothing about the policies.
    pub(crate) fn fail_open(checks: &[Check]) -> Self {
        Verdict {
            allowed: true,
            states: States::from_elem(None, checks.len()),
            source: DecisionSource::FailOpen,
        }
    }

    /// Denied, knowing nothing about the policies.
    fn fail_closed(checks: &[Check]) -> Self {
        Verdict {
            allowed: false,
            states: States::from_elem(None, checks.len()),
            source: DecisionSource::FailClosed,
        }
    }
}

/// The one verb of a place that holds counters: decide requests.
///
/// Batched because the hot path is: concurrent requests share one script
/// call. Each request is decided all or nothing over its checks, in order,
/// exactly as deciding them one after another would; the answer has one
/// verdict per request. Implemented by [`RedisStore`] (the shared counters)
/// and `MemoryStore` (this instance's), composed by [`Failover`].
pub(crate) trait DecisionStore {
    /// Why the store could not decide.
    type Error;

    fn decide(
        &self,
        batch: &[Query<'_>],
    ) -> impl Future<Output = Result<Vec<Verdict>, Self::Error>> + Send;
}

/// What to do while Redis is unavailable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fallback {
    /// Limit in process, with this share (0 < share ≤ 1) of each policy's
    /// quota. With N instances behind a balancer, `1.0 / N` keeps the total
    /// near the shared limit.
    Local {
        /// The fraction of each quota this instance enforces alone.
        share: f64,
    },
    /// Let every request through.
    Allow,
    /// Deny every request (429).
    Deny,
}

impl Default for Fallback {
    fn default() -> Self {
        Fallback::Local { share: 1.0 }
    }
}

/// Decides requests: blocked cache, then Redis, then the fallback.
#[derive(Debug)]
pub(crate) struct Limiter {
    manager: RedisManager,
    failover: Failover,
    blocked: BlockedKeys,
    /// This instance's leases, when a policy leases.
    leases: Option<Arc<Leases>>,
    batch: Mutex<Batch>,
    /// Decisions of this limiter now waiting for Redis: a request that
    /// finds none decides at once, alone (no yield, no batch lock).
    active: AtomicUsize,
    /// Batches led so far (each one yielded once to gather followers).
    batches_led: AtomicU64,
}

impl Limiter {
    /// A limiter whose in-process state (the local limiter's counters and
    /// the blocked keys, half each) stays within `memory_bytes`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn new(manager: RedisManager, fallback: Fallback, memory_bytes: u64) -> Arc<Self> {
        Self::with_leases(manager, fallback, memory_bytes, false)
    }

    /// A limiter as [`Limiter::new`]; with `leases`, an eighth of
    /// `memory_bytes` goes to the leases, taken from the blocked keys' half.
    pub(crate) fn with_leases(
        manager: RedisManager,
        fallback: Fallback,
        memory_bytes: u64,
        leases: bool,
    ) -> Arc<Self> {
        let (blocked_bytes, leases) = if leases {
            let lease_bytes = memory_bytes / 8;
            (
                memory_bytes / 2 - lease_bytes,
                Some(Arc::new(Leases::new(
                    RedisStore::new(manager.clone()),
                    lease_bytes,
                ))),
            )
        } else {
            (memory_bytes / 2, None)
        };
        Arc::new(Self {
            failover: Failover::new(
                manager.clone(),
                RedisStore::new(manager.clone()),
                fallback,
                memory_bytes / 2,
            ),
            manager,
            blocked: BlockedKeys::new(blocked_bytes),
            leases,
            batch: Mutex::new(Batch::default()),
            active: AtomicUsize::new(0),
            batches_led: AtomicU64::new(0),
        })
    }

    /// Decides one request: from the blocked-key cache, alone when no other
    /// decision is waiting for Redis (the direct path: no task hop), or
    /// else in a batch call to Redis (or the fallback) shared with the
    /// requests arriving with it.
    pub(crate) async fn decide(self: &Arc<Self>, checks: &[Check], cost: u32) -> Verdict {
        if let Some(verdict) = self.decide_now(checks, cost) {
            return verdict;
        }
        if let Some(leases) = &self.leases
            && checks.iter().any(|check| check.lease.is_some())
        {
            return Box::pin(self.decide_leased(leases, checks, cost)).await;
        }
        self.decide_shared(checks, cost).await
    }

    /// The verdict when nothing needs to be waited for: a key this
    /// instance knows is blocked, or every policy spending from its lease.
    /// `None` (and nothing spent) otherwise.
    pub(crate) fn decide_now(&self, checks: &[Check], cost: u32) -> Option<Verdict> {
        if let Some(verdict) = self.blocked.verdict(checks, cost) {
            return Some(verdict);
        }
        // The hot path of leased policies: no future at all.
        self.leases
            .as_ref()
            .filter(|_| checks.iter().any(|check| check.lease.is_some()))
            .and_then(|leases| leases.spend_all(checks, cost))
    }

    /// Gives every lease's unused units back to Redis now.
    pub(crate) async fn return_leases(&self) {
        if let Some(leases) = &self.leases {
            leases.return_all().await;
        }
    }

    /// Decides a request on the shared counters (or the fallback): alone or
    /// in a batch.
    async fn decide_shared(self: &Arc<Self>, checks: &[Check], cost: u32) -> Verdict {
        if !self.manager.is_available() {
            // Nothing to batch: the fallback answers at once.
            return self.decide_alone(checks, cost).await;
        }
        let active = Active::enter(&self.active);
        if active.was_alone() {
            // Nobody to share a call with: the batching machinery (a
            // yield to gather followers, the batch lock) would only add
            // latency. Requests arriving while this one waits see it
            // active and batch among themselves.
            return self.decide_alone(checks, cost).await;
        }
        self.decide_in_batch(checks, cost).await
    }

    /// How many batches this limiter has led (for tests and diagnostics).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn batches_led(&self) -> u64 {
        self.batches_led.load(Ordering::Relaxed)
    }

    /// A batch of one.
    ///
    /// The Redis call is boxed wherever it is awaited: its future is large,
    /// and most requests under load (the followers of a batch) never make
    /// one, so it is not inlined into every request's future.
    async fn decide_alone(&self, checks: &[Check], cost: u32) -> Verdict {
        Box::pin(self.decide_batch(&[(checks, cost)]))
            .await
            .remove(0)
    }

    /// One call for a batch of requests (or the fallback for each), and the
    /// denials Redis answered remembered. One verdict per request, in order.
    async fn decide_batch(&self, requests: &[Query<'_>]) -> Vec<Verdict> {
        let mut verdicts = self.failover.decide(requests).await;
        // The stores answer for every request or fail as a whole; this only
        // guards the indexing below.
        while verdicts.len() < requests.len() {
            verdicts.push(Verdict::fail_open(requests[verdicts.len()].0));
        }
        for ((checks, cost), verdict) in requests.iter().zip(&verdicts) {
            if verdict.source == DecisionSource::Redis && !verdict.allowed {
                self.blocked.remember(checks, *cost, &verdict.states);
            }
        }
        verdicts
    }
}

#[cfg(test)]
mod tests;
