//! The circuit breaker that keeps request paths away from a failing Redis.
//!
//! Closed: requests go to Redis; consecutive failures are counted. Open: no
//! request touches Redis, every one takes its fallback at once. HalfOpen: the
//! background probe is talking to Redis; requests still take the fallback
//! until the probe succeeds and closes the breaker.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::record;

/// The breaker's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Redis is healthy; request paths use it.
    Closed,
    /// Redis is failing; request paths use their fallbacks without calling it.
    Open,
    /// A probe is checking whether Redis is back; request paths still use their fallbacks.
    HalfOpen,
    /// The manager was built without Redis ([`RedisManager::disabled`](crate::RedisManager::disabled)):
    /// the fallbacks serve everything, for good.
    Disabled,
}

impl BreakerState {
    /// The lower-case name used in logs, metrics and health output.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Disabled => "disabled",
        }
    }

    fn encode(self) -> u8 {
        self as u8
    }

    fn decode(value: u8) -> Self {
        match value {
            0 => BreakerState::Closed,
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Disabled,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of the connection's health, for health endpoints and logs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// Where the breaker is.
    pub state: BreakerState,
    /// How long it has been there.
    #[serde(serialize_with = "serialize_millis", rename = "in_state_ms")]
    pub in_state_for: Duration,
    /// Failures in a row since the last success.
    pub consecutive_failures: u32,
    /// The last failure, if any since the breaker last closed.
    pub last_error: Option<String>,
}

impl Health {
    /// True when request paths are using Redis.
    pub fn is_healthy(&self) -> bool {
        self.state == BreakerState::Closed
    }
}

fn serialize_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a failed operation tells the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Nothing listens: open at once, counting more would only waste requests.
    Refused,
    /// A broken connection, an error reply: counts toward the threshold.
    Counted,
    /// No answer within the command timeout: counts toward the threshold,
    /// and says that Redis may hang ([`Breaker::hangs`]).
    TimedOut,
    /// A Cluster node's timeout while the cluster answers other
    /// operations: one node hangs, not Redis. Counted as a timeout (a
    /// success still ends the count, and [`Breaker::hangs`] says so), but
    /// not toward the threshold, and it never opens the breaker: the other
    /// nodes' keys keep using Redis.
    NodeTimedOut,
}

struct Counters {
    last_error: Option<String>,
    changed_at: Instant,
}

pub(crate) struct Breaker {
    state: AtomicU8,
    /// Outside the mutex so that a success (every operation) costs one load.
    consecutive_failures: AtomicU32,
    /// Those of them that count toward the threshold: all but
    /// [`Failure::NodeTimedOut`]. Reset with them.
    tripping_failures: AtomicU32,
    /// Whether the last failure was a timeout.
    last_timed_out: AtomicBool,
    counters: Mutex<Counters>,
    threshold: u32,
    tx: watch::Sender<BreakerState>,
}

impl Breaker {
    pub(crate) fn new(initial: BreakerState, threshold: u32) -> Self {
        let (tx, _) = watch::channel(initial);
        record_state_gauge(initial);
        Self {
            state: AtomicU8::new(initial.encode()),
            consecutive_failures: AtomicU32::new(0),
            tripping_failures: AtomicU32::new(0),
            last_timed_out: AtomicBool::new(false),
            counters: Mutex::new(Counters {
                last_error: None,
                changed_at: Instant::now(),
            }),
            threshold,
            tx,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        BreakerState::decode(self.state.load(Ordering::Acquire))
    }

    /// Only a closed breaker lets request paths call Redis.
    pub(crate) fn allows_requests(&self) -> bool {
        self.state() == BreakerState::Closed
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.tx.subscribe()
    }

    pub(crate) fn health(&self) -> Health {
        let counters = self.lock();
        Health {
            state: self.state(),
            in_state_for: counters.changed_at.elapsed(),
            consecutive_failures: self.consecutive_failures.load(Ordering::Acquire),
            last_error: counters.last_error.clone(),
        }
    }

    /// Failures since the last success (or the last close).
    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Acquire)
    }

    /// The last operation to end timed out, none having succeeded since.
    pub(crate) fn hangs(&self) -> bool {
        self.consecutive_failures() > 0 && self.last_timed_out.load(Ordering::Acquire)
    }

    pub(crate) fn on_success(&self) {
        let seen = self.consecutive_failures.load(Ordering::Acquire);
        if seen != 0 && self.state() == BreakerState::Closed {
            // Not a plain store: a failure counted meanwhile is kept.
            let tripping = self.tripping_failures.load(Ordering::Acquire);
            let _ = self.consecutive_failures.compare_exchange(
                seen,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            let _ = self.tripping_failures.compare_exchange(
                tripping,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// Records a failure of a request-path operation. Returns true when this
    /// failure opened the breaker (the caller then starts the probe).
    pub(crate) fn on_failure(&self, failure: Failure, error: &str) -> bool {
        let mut counters = self.lock();
        self.last_timed_out.store(
            matches!(failure, Failure::TimedOut | Failure::NodeTimedOut),
            Ordering::Release,
        );
        self.consecutive_failures.fetch_add(1, Ordering::AcqRel);
        let tripping = if failure == Failure::NodeTimedOut {
            self.tripping_failures.load(Ordering::Acquire)
        } else {
            self.tripping_failures
                .fetch_add(1, Ordering::AcqRel)
                .saturating_add(1)
        };
        counters.last_error = Some(error.to_owned());
        if self.state() != BreakerState::Closed {
            return false;
        }
        let trip = match failure {
            Failure::Refused => true,
            Failure::Counted | Failure::TimedOut => tripping >= self.threshold,
            Failure::NodeTimedOut => false,
        };
        if trip {
            self.set(&mut counters, BreakerState::Open, error);
        }
        trip
    }

    /// Moves the breaker on behalf of the probe (or at startup).
    pub(crate) fn transition(&self, to: BreakerState, error: Option<&str>) {
        let mut counters = self.lock();
        if to == BreakerState::Closed {
            self.consecutive_failures.store(0, Ordering::Release);
            self.tripping_failures.store(0, Ordering::Release);
            counters.last_error = None;
        } else if let Some(error) = error {
            counters.last_error = Some(error.to_owned());
        }
        self.set(&mut counters, to, error.unwrap_or(""));
    }

    fn set(&self, counters: &mut Counters, to: BreakerState, reason: &str) {
        let from = self.state();
        if from == to {
            return;
        }
        self.state.store(to.encode(), Ordering::Release);
        counters.changed_at = Instant::now();
        self.tx.send_replace(to);
        log_transition(from, to, reason);
        record_transition(from, to);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        // The counters stay consistent even if a holder panicked.
        crate::sync::lock(&self.counters)
    }
}

fn log_transition(from: BreakerState, to: BreakerState, reason: &str) {
    match (from, to) {
        (BreakerState::Closed, BreakerState::Open) => tracing::warn!(
            target: "tower_redis",
            %from, %to, reason,
            "Redis circuit breaker opened; request paths use their in-process fallbacks"
        ),
        (_, BreakerState::Closed) => tracing::info!(
            target: "tower_redis",
            %from, %to,
            "Redis circuit breaker closed; request paths use Redis again"
        ),
        _ => {
            tracing::debug!(target: "tower_redis", %from, %to, reason, "Redis circuit breaker moved")
        }
    }
}

fn record_transition(from: BreakerState, to: BreakerState) {
    record::counter(
        "tower_redis_breaker_transitions_total",
        &[("from", from.as_str()), ("to", to.as_str())],
        1,
    );
    record_state_gauge(to);
}

fn record_state_gauge(state: BreakerState) {
    record::gauge("tower_redis_breaker_state", &[], f64::from(state.encode()));
    // The same as a labelled gauge: 1 for the current state, 0 for the others.
    for each in [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
        BreakerState::Disabled,
    ] {
        let value = if each == state { 1.0 } else { 0.0 };
        record::gauge(
            "tower_redis_breaker_in_state",
            &[("state", each.as_str())],
            value,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let breaker = Breaker::new(BreakerState::Closed, 3);
        assert!(!breaker.on_failure(Failure::Counted, "timeout"));
        assert!(!breaker.on_failure(Failure::Counted, "timeout"));
        assert!(breaker.allows_requests());
        assert!(breaker.on_failure(Failure::Counted, "timeout"));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allows_requests());
    }

    #[test]
    fn a_success_resets_the_count() {
        let breaker = Breaker::new(BreakerState::Closed, 2);
        breaker.on_failure(Failure::Counted, "timeout");
        breaker.on_success();
        assert!(!breaker.on_failure(Failure::Counted, "timeout"));
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// Redis hangs while the last failure is a timeout and nothing has
    /// succeeded since; an error that came at once says nothing of it.
    #[test]
    fn only_a_timeout_since_the_last_success_says_redis_hangs() {
        let breaker = Breaker::new(BreakerState::Closed, 10);
        assert!(!breaker.hangs());
        breaker.on_failure(Failure::TimedOut, "no answer");
        assert!(breaker.hangs());
        breaker.on_failure(Failure::Counted, "READONLY");
        assert!(!breaker.hangs(), "the last failure came at once");
        breaker.on_failure(Failure::TimedOut, "no answer");
        assert!(breaker.hangs());
        breaker.on_success();
        assert!(!breaker.hangs(), "answered since");
    }

    /// A Cluster node's timeouts while the cluster answers are counted (a
    /// hang, as far as `hangs` goes) but not toward the threshold: however
    /// many of them came, it takes `threshold` other failures with no
    /// success between them to open the breaker. Before, the count they
    /// made let the next error of any node open it at once.
    #[test]
    fn node_timeouts_never_count_toward_the_threshold() {
        let breaker = Breaker::new(BreakerState::Closed, 3);
        for _ in 0..10 {
            assert!(!breaker.on_failure(Failure::NodeTimedOut, "timed out"));
        }
        assert!(breaker.hangs());
        assert_eq!(breaker.consecutive_failures(), 10);
        assert!(!breaker.on_failure(Failure::Counted, "CLUSTERDOWN"));
        assert!(!breaker.on_failure(Failure::TimedOut, "no answer"));
        assert!(breaker.allows_requests());
        assert!(breaker.on_failure(Failure::TimedOut, "no answer"));
        assert_eq!(breaker.state(), BreakerState::Open);
        // A success ends both counts.
        let breaker = Breaker::new(BreakerState::Closed, 2);
        breaker.on_failure(Failure::Counted, "CLUSTERDOWN");
        breaker.on_failure(Failure::NodeTimedOut, "timed out");
        breaker.on_success();
        assert_eq!(breaker.consecutive_failures(), 0);
        assert!(!breaker.on_failure(Failure::Counted, "CLUSTERDOWN"));
        assert!(
            breaker.allows_requests(),
            "the count before the success ended"
        );
    }

    #[test]
    fn refused_connection_opens_at_once() {
        let breaker = Breaker::new(BreakerState::Closed, 10);
        assert!(breaker.on_failure(Failure::Refused, "connection refused"));
        assert_eq!(
            breaker.health().last_error.as_deref(),
            Some("connection refused")
        );
    }

    #[test]
    fn failures_while_open_do_not_reopen() {
        let breaker = Breaker::new(BreakerState::Open, 1);
        assert!(!breaker.on_failure(Failure::Refused, "still down"));
    }

    #[test]
    fn subscribers_see_every_transition() {
        let breaker = Breaker::new(BreakerState::Closed, 1);
        let mut rx = breaker.subscribe();
        breaker.on_failure(Failure::Counted, "boom");
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), BreakerState::Open);
        breaker.transition(BreakerState::Closed, None);
        assert_eq!(*rx.borrow_and_update(), BreakerState::Closed);
        assert_eq!(breaker.health().consecutive_failures, 0);
    }
}
