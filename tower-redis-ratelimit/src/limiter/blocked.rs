//! Keys Redis has denied, remembered until they would be allowed again, so
//! an abusive client costs Redis nothing while it stays blocked.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tower_redis_core::sync::lock;

use super::lru::Lru;
use super::{Check, DecisionSource, PolicyState, Verdict};

/// The blocked keys, in a map bounded by bytes.
///
/// At the bound the least recently used key is evicted; its next request
/// goes to Redis, which denies it again, and it is remembered again: an
/// eviction costs one Redis call and never loosens a limit. A key whose
/// `Retry-After` has passed counts as absent and leaves when read or when
/// it reaches the old end of the map. Every operation is O(1) amortised.
#[derive(Debug)]
pub(crate) struct BlockedKeys {
    entries: Mutex<Lru<Blocked>>,
    /// The origin of `latest_until_us`: this cache's creation, on tokio's
    /// clock (so tests can pause it).
    epoch: Instant,
    /// The latest `until` of any key ever remembered, in microseconds since
    /// `epoch`: past it nothing can be blocked, and a request is answered
    /// without taking the lock.
    latest_until_us: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Blocked {
    /// When the request would be allowed (reported as `Retry-After`).
    until: Instant,
    /// Until when it is answered from here (at most `until`).
    held: Instant,
    /// When the policy's quota is fully available again.
    reset_at: Instant,
    /// The cost that was denied; a cheaper request may fit sooner, so only
    /// requests costing at least this much are answered from here.
    cost: u32,
}

impl BlockedKeys {
    /// A cache holding at most `max_bytes` of blocked keys.
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            entries: Mutex::new(Lru::new(max_bytes)),
            // Taken now, so that every `until` comes after it.
            epoch: Instant::now(),
            latest_until_us: AtomicU64::new(0),
        }
    }

    /// A denial without Redis when one of the request's keys is blocked.
    pub(crate) fn verdict(&self, checks: &[Check], cost: u32) -> Option<Verdict> {
        let now = Instant::now();
        if self.micros_since_epoch(now) >= self.latest_until_us.load(Ordering::Relaxed) {
            return None;
        }
        let live = |entry: &Blocked| entry.held > now;
        let mut entries = lock(&self.entries);
        let mut states = super::States::from_elem(None, checks.len());
        let mut blocked = false;
        for (check, state) in checks.iter().zip(&mut states) {
            if let Some(entry) = entries.get(&check.key, live)
                && cost >= entry.cost
            {
                *state = Some(PolicyState {
                    remaining: 0,
                    reset: entry.reset_at.saturating_duration_since(now),
                    retry_after: Some(entry.until - now),
                });
                blocked = true;
            }
        }
        blocked.then_some(Verdict {
            allowed: false,
            states,
            source: DecisionSource::BlockedCache,
        })
    }

    /// Remembers the keys whose policies denied a request.
    pub(crate) fn remember(&self, checks: &[Check], cost: u32, states: &[Option<PolicyState>]) {
        self.remember_for(checks, cost, states, None);
    }

    /// Remembers the keys whose policies denied a request, each until its
    /// `Retry-After` or for at most `hold` (the answers still report the
    /// whole `Retry-After`).
    pub(crate) fn remember_for(
        &self,
        checks: &[Check],
        cost: u32,
        states: &[Option<PolicyState>],
        hold: Option<Duration>,
    ) {
        let now = Instant::now();
        let live = |entry: &Blocked| entry.held > now;
        let mut entries = lock(&self.entries);
        for (check, state) in checks.iter().zip(states) {
            if let Some(state) = state
                && let Some(retry_after) = state.retry_after
                && retry_after > Duration::ZERO
            {
                let until = now + retry_after;
                let held = hold.map_or(until, |hold| until.min(now + hold));
                self.latest_until_us
                    .fetch_max(self.micros_since_epoch(held), Ordering::Relaxed);
                entries.insert(
                    std::sync::Arc::clone(&check.key),
                    Blocked {
                        until,
                        held,
                        reset_at: now + state.reset,
                        cost,
                    },
                    live,
                );
            }
        }
    }

    /// Entries held, the bytes they are counted for, and the bytes allocated.
    #[cfg(test)]
    fn footprint(&self) -> (u64, u64, u64) {
        let entries = lock(&self.entries);
        (
            entries.len() as u64,
            entries.bytes(),
            entries.allocated_bytes(),
        )
    }

    fn micros_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::Algorithm;
    use crate::limiter::tests::a_million_keys_stay_bounded_and_o1;

    const HOUR: Duration = Duration::from_secs(3600);

    fn check(key: &str) -> Check {
        Check {
            key: std::sync::Arc::from(key),
            algorithm: Algorithm::Gcra {
                quota: 1,
                period: HOUR,
                burst: 1,
            },
            lease: None,
        }
    }

    /// An attacker with a million addresses gets each of them denied (say,
    /// by a global or per-route policy): every denial is remembered. The
    /// cache stays within its byte bound (the least recently used entries
    /// are evicted), a key that keeps coming stays blocked without Redis,
    /// and a request costs the same after a million keys as after the first
    /// hundred thousand (no sweep over every entry under the lock).
    #[test]
    fn a_million_blocked_keys_keep_the_blocked_cache_bounded_and_o1() {
        const BOUND: u64 = 4 << 20;
        let blocked = BlockedKeys::new(BOUND);
        let denied = [Some(PolicyState {
            remaining: 0,
            reset: HOUR,
            retry_after: Some(HOUR),
        })];
        let abuser = [check("p:{rl}:rl:per-ip:k:203.0.113.66")];
        blocked.remember(&abuser, 1, &denied);
        a_million_keys_stay_bounded_and_o1(
            BOUND,
            |n| {
                let key = format!(
                    "p:{{rl}}:rl:per-ip:k:198.{}.{}.{}",
                    n >> 16,
                    (n >> 8) & 0xff,
                    n & 0xff
                );
                let checks = [check(&key)];
                // The request path: not blocked yet, Redis denies, remembered.
                assert!(blocked.verdict(&checks, 1).is_none(), "key {n}");
                blocked.remember(&checks, 1, &denied);
            },
            || blocked.verdict(&abuser, 1).is_some(),
            || blocked.footprint(),
        );
    }

    #[test]
    fn an_expired_block_answers_nothing() {
        let blocked = BlockedKeys::new(1 << 20);
        let checks = [check("k")];
        let state = |retry_ms| {
            [Some(PolicyState {
                remaining: 0,
                reset: HOUR,
                retry_after: Some(Duration::from_millis(retry_ms)),
            })]
        };
        assert!(blocked.verdict(&checks, 1).is_none());
        blocked.remember(&checks, 1, &state(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(blocked.verdict(&checks, 1).is_none());
        blocked.remember(&checks, 1, &state(60_000));
        let verdict = blocked.verdict(&checks, 1).expect("blocked");
        assert!(!verdict.allowed);
        // A cheaper request than the one denied may fit: not answered here.
        blocked.remember(&checks, 5, &state(60_000));
        assert!(blocked.verdict(&checks, 1).is_none());
    }
}
