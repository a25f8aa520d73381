//! Where decisions are made: one Lua script on Redis for every policy of a
//! request, a local cache of keys Redis has blocked, and an in-process
//! limiter (or fail-open / fail-closed) while Redis is unavailable.
//!
//! The failover between them is [`RedisManager::failover`]: the service
//! never knows which one answered except through [`Source`].

mod blocked;
mod lru;
mod memory;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
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
    batch: Mutex<Batch>,
}

/// Decisions gathered for the next call to Redis.
///
/// A request that finds no batch forming starts one, lets the requests that
/// are ready to run at the same moment join it (one yield to the
/// scheduler), and then sends them all in one script call: the script
/// decides them one after another, exactly as separate calls would. Under
/// load one `EVALSHA` answers many requests, and a hot key is read and
/// written once per call instead of once per request; alone, a request
/// pays one yield. Batches do not wait for each other: several can be in
/// flight at once.
#[derive(Debug, Default)]
struct Batch {
    /// The followers of the batch being formed, if one is.
    forming: Option<Vec<Waiting>>,
}

#[derive(Debug)]
struct Waiting {
    checks: Vec<Check>,
    cost: u32,
    reply: oneshot::Sender<Verdict>,
}

/// The most followers one batch takes; more requests decide alone.
const MAX_BATCH: usize = 255;

impl Limiter {
    /// A limiter whose in-process state (the local limiter's counters and
    /// the blocked keys, half each) stays within `memory_bytes`.
    pub(crate) fn new(manager: RedisManager, fallback: Fallback, memory_bytes: u64) -> Arc<Self> {
        let share = match fallback {
            Fallback::Local { share } => share,
            Fallback::Allow | Fallback::Deny => 1.0,
        };
        Arc::new(Self {
            manager,
            fallback,
            local: MemoryLimiter::new(share, memory_bytes / 2),
            blocked: BlockedKeys::new(memory_bytes / 2),
            local_dirty: AtomicBool::new(false),
            batch: Mutex::new(Batch::default()),
        })
    }

    pub(crate) fn manager(&self) -> &RedisManager {
        &self.manager
    }

    /// Decides one request: from the blocked-key cache, or in a batch call
    /// to Redis (or the fallback) shared with the requests arriving with it.
    ///
    /// The Redis call is boxed wherever it is awaited: its future is large,
    /// and most requests under load (the followers of a batch) never make
    /// one, so it is not inlined into every request's future.
    pub(crate) async fn decide(self: &Arc<Self>, checks: &[Check], cost: u32) -> Verdict {
        if let Some(verdict) = self.blocked.verdict(checks, cost) {
            return verdict;
        }
        if !self.manager.is_available() {
            // Nothing to batch: the fallback answers at once.
            return self.decide_alone(checks, cost).await;
        }
        let role = {
            let mut batch = lock(&self.batch);
            match &mut batch.forming {
                Some(followers) if followers.len() < MAX_BATCH => {
                    let (reply, receiver) = oneshot::channel();
                    followers.push(Waiting {
                        checks: checks.to_vec(),
                        cost,
                        reply,
                    });
                    Role::Follow(receiver)
                }
                Some(_) => Role::Alone,
                None => {
                    batch.forming = Some(Vec::new());
                    Role::Lead
                }
            }
        };
        match role {
            Role::Lead => {}
            Role::Alone => return self.decide_alone(checks, cost).await,
            Role::Follow(receiver) => {
                return match receiver.await {
                    Ok(verdict) => verdict,
                    // The leader went away before answering (its request
                    // was cancelled): decide alone.
                    Err(_) => self.decide_alone(checks, cost).await,
                };
            }
        }
        // This request leads the batch.
        let mut leader = Leader {
            limiter: self,
            closed: false,
        };
        tokio::task::yield_now().await;
        let followers = leader.close();
        let mut requests = Vec::with_capacity(1 + followers.len());
        requests.push((checks, cost));
        requests.extend(followers.iter().map(|w| (w.checks.as_slice(), w.cost)));
        let mut verdicts = Box::pin(self.decide_batch(&requests)).await.into_iter();
        let own = verdicts.next();
        for (waiting, verdict) in followers.into_iter().zip(verdicts) {
            // A follower that went away (its request was dropped) is fine.
            let _ = waiting.reply.send(verdict);
        }
        own.unwrap_or_else(|| fail_open(checks))
    }

    /// A batch of one.
    async fn decide_alone(&self, checks: &[Check], cost: u32) -> Verdict {
        Box::pin(self.decide_batch(&[(checks, cost)]))
            .await
            .remove(0)
    }

    /// One call for a batch of requests (or the fallback for each), with
    /// the bookkeeping after it. One verdict per request, in order.
    async fn decide_batch(&self, requests: &[(&[Check], u32)]) -> Vec<Verdict> {
        let served = self
            .manager
            .failover(
                |conn| decide_on_redis(conn, requests),
                |reason| async move {
                    requests
                        .iter()
                        .map(|(checks, cost)| self.decide_without_redis(checks, *cost, reason))
                        .collect()
                },
            )
            .await;
        let mut verdicts = served.value;
        // The script answers for every request or fails as a whole; this
        // only guards the indexing below.
        while verdicts.len() < requests.len() {
            verdicts.push(fail_open(requests[verdicts.len()].0));
        }
        for ((checks, cost), verdict) in requests.iter().zip(&verdicts) {
            self.after(checks, *cost, verdict, served.source);
        }
        verdicts
    }

    /// Bookkeeping after a decision: a Redis answer ends the local
    /// limiter's outage state and feeds the blocked-key cache.
    fn after(&self, checks: &[Check], cost: u32, verdict: &Verdict, source: CoreSource) {
        if source == CoreSource::Redis {
            if self.local_dirty.load(Ordering::Acquire)
                && self.local_dirty.swap(false, Ordering::AcqRel)
            {
                self.local.clear();
            }
            if !verdict.allowed {
                self.blocked.remember(checks, cost, &verdict.states);
            }
        }
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
            Fallback::Allow => fail_open(checks),
            Fallback::Deny => Verdict {
                allowed: false,
                states: vec![None; checks.len()],
                source: DecisionSource::FailClosed,
            },
        }
    }
}

/// What a request does with the batch being formed.
enum Role {
    Lead,
    Follow(oneshot::Receiver<Verdict>),
    /// The forming batch is full.
    Alone,
}

fn fail_open(checks: &[Check]) -> Verdict {
    Verdict {
        allowed: true,
        states: vec![None; checks.len()],
        source: DecisionSource::FailOpen,
    }
}

/// The leader of a forming batch. Closing it takes the followers; a leader
/// dropped before closing (its request was cancelled during the yield)
/// hands them to a task of their own, so nobody waits forever.
struct Leader<'a> {
    limiter: &'a Arc<Limiter>,
    closed: bool,
}

impl Leader<'_> {
    fn close(&mut self) -> Vec<Waiting> {
        self.closed = true;
        lock(&self.limiter.batch).forming.take().unwrap_or_default()
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let followers = self.close();
        if followers.is_empty() {
            return;
        }
        let limiter = Arc::clone(self.limiter);
        let run = async move {
            let requests: Vec<(&[Check], u32)> = followers
                .iter()
                .map(|w| (w.checks.as_slice(), w.cost))
                .collect();
            let verdicts = limiter.decide_batch(&requests).await;
            for (waiting, verdict) in followers.into_iter().zip(verdicts) {
                let _ = waiting.reply.send(verdict);
            }
        };
        // Without a runtime the followers' channels close and each of them
        // decides alone.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(run);
        }
    }
}

fn lock(batch: &Mutex<Batch>) -> std::sync::MutexGuard<'_, Batch> {
    batch
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One EVALSHA for a batch of requests and all their checks: the whole
/// decision of each in one round trip.
async fn decide_on_redis(
    mut conn: RedisConnection,
    requests: &[(&[Check], u32)],
) -> redis::RedisResult<Vec<Verdict>> {
    let mut invocation = DECIDE.prepare_invoke();
    let mut keys: Vec<&str> = Vec::new();
    // Each request's counters, as indexes into `keys`.
    let mut indexes: Vec<usize> = Vec::new();
    for (checks, _) in requests {
        for check in *checks {
            let index = match keys.iter().position(|k| *k == check.key) {
                Some(index) => index,
                None => {
                    keys.push(&check.key);
                    invocation.key(&check.key);
                    let (kind, a, b) = script_args(check.algorithm);
                    invocation.arg(kind).arg(a).arg(b);
                    keys.len() - 1
                }
            };
            indexes.push(index + 1);
        }
    }
    // Consecutive requests with the same cost and counters go as one group.
    let mut groups: Vec<(usize, u32, &[usize])> = Vec::new();
    let mut offset = 0;
    for (checks, cost) in requests {
        let counters = &indexes[offset..offset + checks.len()];
        offset += checks.len();
        match groups.last_mut() {
            Some((count, group_cost, group)) if *group_cost == *cost && *group == counters => {
                *count += 1;
            }
            _ => groups.push((1, *cost, counters)),
        }
    }
    invocation.arg(groups.len());
    for (count, cost, counters) in &groups {
        invocation.arg(*count).arg(*cost).arg(counters.len());
        for index in *counters {
            invocation.arg(*index);
        }
    }
    let reply: Vec<u8> = invocation.invoke_async(&mut conn).await?;
    let reply = parse_numbers(&reply)?;
    parse_reply(&reply, requests)
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

/// The script's answer: space-separated integers.
fn parse_numbers(reply: &[u8]) -> redis::RedisResult<Vec<i64>> {
    reply
        .split(|b| *b == b' ')
        .filter(|part| !part.is_empty())
        .map(|part| {
            std::str::from_utf8(part)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
                .ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "rate-limit script answered with a value that is not an integer",
                        String::from_utf8_lossy(part).into_owned(),
                    ))
                })
        })
        .collect()
}

fn parse_reply(reply: &[i64], requests: &[(&[Check], u32)]) -> redis::RedisResult<Vec<Verdict>> {
    let expected: usize = requests
        .iter()
        .map(|(checks, _)| 1 + 3 * checks.len())
        .sum();
    if reply.len() != expected {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "rate-limit script answered with the wrong number of values",
            format!("expected {expected}, got {}", reply.len()),
        )));
    }
    let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    let mut rest = reply;
    let mut verdicts = Vec::with_capacity(requests.len());
    for (checks, _) in requests {
        let (this, tail) = rest.split_at(1 + 3 * checks.len());
        rest = tail;
        let states = this[1..]
            .chunks_exact(3)
            .map(|c| {
                Some(PolicyState {
                    remaining: u64::try_from(c[0]).unwrap_or(0),
                    reset: us(c[1]),
                    retry_after: (c[2] > 0).then(|| us(c[2])),
                })
            })
            .collect();
        verdicts.push(Verdict {
            allowed: this[0] == 1,
            states,
            source: DecisionSource::Redis,
        });
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_script_reply_is_an_error_not_a_panic() {
        let check = Check {
            key: "k".to_owned(),
            algorithm: Algorithm::FixedWindow {
                limit: 1,
                window: Duration::from_secs(1),
            },
        };
        let one: &[Check] = std::slice::from_ref(&check);
        assert!(parse_reply(&[1, 2], &[(one, 1)]).is_err());
        assert!(parse_reply(&[1], &[]).is_err());
        assert!(parse_reply(&[0, 0, 1_000_000, 500_000], &[(one, 1), (one, 1)]).is_err());
        let ok = parse_reply(&[0, 0, 1_000_000, 500_000], &[(one, 1)]).expect("well formed");
        assert!(!ok[0].allowed);
        assert_eq!(
            ok[0].states[0].and_then(|s| s.retry_after),
            Some(Duration::from_millis(500))
        );
        let two =
            parse_reply(&[1, 3, 10, 0, 0, 0, 20, 7], &[(one, 1), (one, 1)]).expect("two requests");
        assert!(two[0].allowed && !two[1].allowed);
        assert_eq!(
            two[1].states[0].map(|s| s.reset),
            Some(Duration::from_micros(20))
        );
    }

    #[test]
    fn the_script_reply_is_space_separated_integers() {
        assert_eq!(
            parse_numbers(b"1 999 3600000000 0").expect("numbers"),
            [1, 999, 3_600_000_000, 0]
        );
        assert_eq!(parse_numbers(b"").expect("empty"), Vec::<i64>::new());
        assert!(parse_numbers(b"1 1e+15 0").is_err());
        assert!(parse_numbers(b"1 x").is_err());
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
