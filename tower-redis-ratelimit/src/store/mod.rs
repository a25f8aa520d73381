//! Where decisions are made: one Lua script on Redis for every policy of a
//! request, a local cache of keys Redis has blocked, and an in-process
//! limiter (or fail-open / fail-closed) while Redis is unavailable.
//!
//! The failover between them is [`RedisManager::failover`]: the service
//! never knows which one answered except through [`Source`].

mod blocked;
mod memory;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tower_redis_core::redis::{self, Script};
use tower_redis_core::{FallbackReason, RedisConnection, RedisManager, Source as CoreSource};

pub(crate) use blocked::BlockedKeys;
pub(crate) use memory::MemoryLimiter;

use crate::policy::Algorithm;

/// One policy to decide for one request.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    /// The Redis key (and local key) of this policy's counter for this client.
    pub(crate) key: String,
    pub(crate) algorithm: Algorithm,
}

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
    /// The in-process limiter, while Redis was unavailable.
    Local,
    /// Redis was unavailable and the layer is configured to fail open.
    FailOpen,
    /// Redis was unavailable and the layer is configured to fail closed.
    FailClosed,
}

impl DecisionSource {
    /// The lower-case name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionSource::Redis => "redis",
            DecisionSource::BlockedCache => "blocked_cache",
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
    pub(crate) states: Vec<Option<PolicyState>>,
    pub(crate) source: DecisionSource,
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

static DECIDE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("decide.lua")));

/// Decides requests: blocked cache, then Redis, then the fallback.
#[derive(Debug)]
pub(crate) struct Limiter {
    manager: RedisManager,
    fallback: Fallback,
    local: MemoryLimiter,
    blocked: BlockedKeys,
    /// Set when the local limiter has state that must be dropped once Redis
    /// decides again (its counts are not the shared ones).
    local_dirty: AtomicBool,
}

impl Limiter {
    pub(crate) fn new(manager: RedisManager, fallback: Fallback) -> Arc<Self> {
        let share = match fallback {
            Fallback::Local { share } => share,
            Fallback::Allow | Fallback::Deny => 1.0,
        };
        Arc::new(Self {
            manager,
            fallback,
            local: MemoryLimiter::new(share),
            blocked: BlockedKeys::default(),
            local_dirty: AtomicBool::new(false),
        })
    }

    pub(crate) fn manager(&self) -> &RedisManager {
        &self.manager
    }

    pub(crate) async fn decide(&self, checks: &[Check], cost: u32) -> Verdict {
        if let Some(verdict) = self.blocked.verdict(checks, cost) {
            return verdict;
        }
        let served = self
            .manager
            .failover(
                |conn| decide_on_redis(conn, checks, cost),
                |reason| async move { self.decide_without_redis(checks, cost, reason) },
            )
            .await;
        if served.source == CoreSource::Redis {
            if self.local_dirty.swap(false, Ordering::AcqRel) {
                self.local.clear();
            }
            if !served.value.allowed {
                self.blocked.remember(checks, cost, &served.value.states);
            }
        }
        served.value
    }

    fn decide_without_redis(
        &self,
        checks: &[Check],
        cost: u32,
        _reason: FallbackReason,
    ) -> Verdict {
        match self.fallback {
            Fallback::Local { .. } => {
                self.local_dirty.store(true, Ordering::Release);
                self.local.decide(checks, cost)
            }
            Fallback::Allow => Verdict {
                allowed: true,
                states: vec![None; checks.len()],
                source: DecisionSource::FailOpen,
            },
            Fallback::Deny => Verdict {
                allowed: false,
                states: vec![None; checks.len()],
                source: DecisionSource::FailClosed,
            },
        }
    }
}

/// One EVALSHA for all checks: the whole decision in one round trip.
async fn decide_on_redis(
    mut conn: RedisConnection,
    checks: &[Check],
    cost: u32,
) -> redis::RedisResult<Verdict> {
    let mut invocation = DECIDE.prepare_invoke();
    invocation.arg(cost);
    for check in checks {
        invocation.key(&check.key);
        let (kind, a, b) = script_args(check.algorithm);
        invocation.arg(kind).arg(a).arg(b);
    }
    let reply: Vec<i64> = invocation.invoke_async(&mut conn).await?;
    parse_reply(&reply, checks.len())
}

/// The numbers the script takes for one algorithm (see `decide.lua`).
fn script_args(algorithm: Algorithm) -> (u8, f64, f64) {
    match algorithm {
        Algorithm::Gcra {
            quota,
            period,
            burst,
        } => {
            let interval = micros(period) / f64::from(quota);
            (1, interval, interval * f64::from(burst))
        }
        Algorithm::SlidingWindow { limit, window } => (2, f64::from(limit), micros(window)),
        Algorithm::FixedWindow { limit, window } => (3, f64::from(limit), micros(window)),
    }
}

pub(crate) fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000_000.0
}

fn parse_reply(reply: &[i64], checks: usize) -> redis::RedisResult<Verdict> {
    if reply.len() != 1 + 3 * checks {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "rate-limit script answered with the wrong number of values",
            format!("expected {}, got {}", 1 + 3 * checks, reply.len()),
        )));
    }
    let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    let states = reply[1..]
        .chunks_exact(3)
        .map(|c| {
            Some(PolicyState {
                remaining: u64::try_from(c[0]).unwrap_or(0),
                reset: us(c[1]),
                retry_after: (c[2] > 0).then(|| us(c[2])),
            })
        })
        .collect();
    Ok(Verdict {
        allowed: reply[0] == 1,
        states,
        source: DecisionSource::Redis,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_script_reply_is_an_error_not_a_panic() {
        assert!(parse_reply(&[1, 2], 1).is_err());
        assert!(parse_reply(&[], 0).is_err());
        let ok = parse_reply(&[0, 0, 1_000_000, 500_000], 1).expect("well formed");
        assert!(!ok.allowed);
        assert_eq!(
            ok.states[0].and_then(|s| s.retry_after),
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn gcra_arguments_are_interval_and_tolerance() {
        let (kind, interval, tolerance) = script_args(Algorithm::Gcra {
            quota: 10,
            period: Duration::from_secs(1),
            burst: 5,
        });
        assert_eq!(kind, 1);
        assert!((interval - 100_000.0).abs() < 1e-6);
        assert!((tolerance - 500_000.0).abs() < 1e-6);
    }
}
