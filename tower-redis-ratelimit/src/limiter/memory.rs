//! The in-process limiter used while Redis is unavailable: the same three
//! algorithms as `decide.lua`, all or nothing, with a share of each quota.
//!
//! Written here rather than taken from `governor` because the fallback must
//! decide several policies atomically (check all, then commit all), support
//! the window algorithms, and scale quotas by a share; governor checks one
//! quota at a time and cannot undo a consumed cell.

use std::convert::Infallible;
use std::sync::Mutex;

use tokio::time::Instant;
use tower_redis_core::degrade::Recovered;
use tower_redis_core::sync::lock;

use super::lru::Lru;
use super::{Check, DecisionSource, DecisionStore, Query, Verdict};
use crate::algorithm::{Counter, micros};

/// The in-process limiter: one small entry per counter, in a map bounded by
/// bytes.
///
/// At the bound the least recently used counter is evicted: that client
/// starts over with a fresh local quota the next time it comes, while every
/// counter still held keeps limiting. A client that keeps sending stays
/// recently used, so it is forgotten only when more distinct clients than
/// the bound holds arrive between two of its requests. A counter back to a
/// full quota counts as absent and leaves when read or when it reaches the
/// old end of the map.
#[derive(Debug)]
pub(crate) struct MemoryStore {
    share: f64,
    /// The origin of this store's clock (tokio's, so tests can pause it).
    start: Instant,
    /// One lock per decision: it reads all its counters, then writes them
    /// all or none. Every step under it is O(1) amortised.
    entries: Mutex<Lru<Counter>>,
}

impl MemoryStore {
    /// A limiter enforcing `share` of each quota, holding at most
    /// `max_bytes` of counters.
    pub(crate) fn new(share: f64, max_bytes: u64) -> Self {
        Self {
            share,
            start: Instant::now(),
            entries: Mutex::new(Lru::new(max_bytes)),
        }
    }

    /// Decides one request, all or nothing over its checks.
    pub(crate) fn decide(&self, checks: &[Check], cost: u32) -> Verdict {
        let now = self.now_us();
        let live = |e: &Counter| e.expires_us > now;
        let cost = f64::from(cost);
        let mut entries = lock(&self.entries);
        let mut states = super::States::with_capacity(checks.len());
        let mut writes = Vec::with_capacity(checks.len());
        let mut allowed = true;
        for check in checks {
            let current = entries.get(&check.key, live).map(|e| e.state);
            let (state, write) = check
                .algorithm
                .scaled(self.share)
                .decide(current, now, cost);
            allowed &= state.retry_after.is_none();
            states.push(Some(state));
            writes.push(write);
        }
        if allowed {
            for (check, write) in checks.iter().zip(writes) {
                if let Some(entry) = write {
                    entries.insert(std::sync::Arc::clone(&check.key), entry, live);
                }
            }
        }
        Verdict {
            allowed,
            states,
            source: DecisionSource::Local,
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

    /// Microseconds on this store's monotonic clock, offset by a day so that
    /// window indexes and the first TAT are never near zero.
    fn now_us(&self) -> f64 {
        micros(self.start.elapsed()) + 86_400_000_000.0
    }
}

/// Redis decides again. The local counts are kept, not forgotten: they
/// age out with their own windows, and an outage that comes back within a
/// period carries on from them. Dropping them would hand every client a
/// fresh local quota each time a flapping Redis answered once, and the
/// overshoot bound (`share × quota` per period per instance, plus one
/// burst) would not hold. The map stays bounded by bytes either way.
impl Recovered for MemoryStore {}

impl DecisionStore for MemoryStore {
    type Error = Infallible;

    /// Each request in turn, at once: nothing here waits.
    fn decide(
        &self,
        batch: &[Query<'_>],
    ) -> impl Future<Output = Result<Vec<Verdict>, Infallible>> + Send {
        let verdicts = batch
            .iter()
            .map(|(checks, cost)| MemoryStore::decide(self, checks, *cost))
            .collect();
        std::future::ready(Ok(verdicts))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::algorithm::Algorithm;
    use crate::limiter::tests::a_million_keys_stay_bounded_and_o1;

    fn check(key: &str, algorithm: Algorithm) -> Check {
        Check {
            key: std::sync::Arc::from(key),
            algorithm,
            lease: None,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn gcra_admits_exactly_the_burst_at_once() {
        let limiter = MemoryStore::new(1.0, 1 << 20);
        let checks = [check(
            "k",
            Algorithm::Gcra {
                quota: 10,
                period: HOUR,
                burst: 10,
            },
        )];
        let admitted = (0..50)
            .filter(|_| limiter.decide(&checks, 1).allowed)
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn share_scales_the_local_quota() {
        let limiter = MemoryStore::new(0.25, 1 << 20);
        let checks = [check(
            "k",
            Algorithm::FixedWindow {
                limit: 100,
                window: HOUR,
            },
        )];
        let admitted = (0..200)
            .filter(|_| limiter.decide(&checks, 1).allowed)
            .count();
        assert_eq!(admitted, 25);
    }

    #[test]
    fn a_denial_by_one_policy_consumes_nothing_from_the_others() {
        let limiter = MemoryStore::new(1.0, 1 << 20);
        let small = check(
            "small",
            Algorithm::FixedWindow {
                limit: 1,
                window: HOUR,
            },
        );
        let big = check(
            "big",
            Algorithm::FixedWindow {
                limit: 5,
                window: HOUR,
            },
        );
        assert!(limiter.decide(&[small.clone(), big.clone()], 1).allowed);
        for _ in 0..10 {
            assert!(!limiter.decide(&[small.clone(), big.clone()], 1).allowed);
        }
        // "big" was charged once only: four more fit.
        let admitted = (0..10)
            .filter(|_| limiter.decide(std::slice::from_ref(&big), 1).allowed)
            .count();
        assert_eq!(admitted, 4);
    }

    #[test]
    fn weighted_cost_counts_units() {
        let limiter = MemoryStore::new(1.0, 1 << 20);
        let checks = [check(
            "k",
            Algorithm::Gcra {
                quota: 10,
                period: HOUR,
                burst: 10,
            },
        )];
        assert!(limiter.decide(&checks, 7).allowed);
        let denied = limiter.decide(&checks, 4);
        assert!(!denied.allowed);
        assert_eq!(denied.states[0].map(|s| s.remaining), Some(3));
        assert!(limiter.decide(&checks, 3).allowed);
    }

    /// During an outage an attacker rotates through IPv6 /64s (or header
    /// keys): one new local counter per request. The limiter stays within
    /// its byte bound (the least recently used counters are evicted), a
    /// client that keeps coming stays limited, and a decision costs the same
    /// after a million keys as after the first hundred thousand.
    #[test]
    fn a_million_rotating_keys_during_an_outage_keep_the_local_limiter_bounded() {
        const BOUND: u64 = 4 << 20;
        let limiter = MemoryStore::new(1.0, BOUND);
        let gcra = Algorithm::Gcra {
            quota: 2,
            period: HOUR,
            burst: 2,
        };
        let abuser = [check("p:{rl}:rl:per-ip:k:203.0.113.66", gcra)];
        assert!(limiter.decide(&abuser, 1).allowed);
        assert!(limiter.decide(&abuser, 1).allowed);
        a_million_keys_stay_bounded_and_o1(
            BOUND,
            |n| {
                let key = format!(
                    "p:{{rl}}:rl:per-ip:k:2001%3Adb8%3A{:x}%3A{:x}%3A%3A/64",
                    n >> 16,
                    n & 0xffff
                );
                let checks = [check(&key, gcra)];
                assert!(limiter.decide(&checks, 1).allowed, "key {n}: a fresh quota");
            },
            || !limiter.decide(&abuser, 1).allowed,
            || limiter.footprint(),
        );
    }
}
