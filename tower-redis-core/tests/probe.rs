//! The recovery probe's backoff. The test reads the breaker's transitions
//! from `tracing` events, and must see every one of them. Its subscriber
//! is installed with `testing::install_subscriber`, and it is alone in its
//! test binary: no other test reaches the breaker's call sites at all, not
//! even while the process registers its first subscriber (the one race
//! `install_subscriber` leaves).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_redis_core::testing::install_subscriber;
use tower_redis_core::{BreakerState, RedisConfig, RedisManager};

/// The breaker's transitions as the manager logs them: when (on tokio's
/// clock) and to which state.
#[derive(Clone, Default)]
struct Transitions(Arc<Mutex<Vec<(tokio::time::Instant, String)>>>);

impl Transitions {
    fn to(&self, state: &str) -> usize {
        let seen = self.0.lock().expect("transitions lock");
        seen.iter().filter(|(_, to)| to == state).count()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Transitions {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct To(Option<String>);
        impl tracing::field::Visit for To {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "to" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        if event.metadata().target() != "tower_redis" {
            return;
        }
        let mut to = To(None);
        event.record(&mut to);
        if let Some(to) = to.0 {
            let now = tokio::time::Instant::now();
            self.0.lock().expect("transitions lock").push((now, to));
        }
    }
}

/// The recovery probe waits between attempts from 50 ms, doubling up to
/// 500 ms (the defaults), each wait jittered between half and all of it so
/// that instances do not probe in lockstep. The cap bounds how long a
/// Redis that is back goes unused: at most 500 ms after a long outage. On
/// tokio's paused clock every wait is exact.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_probe_backs_off_from_50_ms_doubling_to_500_ms_with_jitter() {
    use tracing_subscriber::layer::SubscriberExt;
    const PROBES: usize = 14;
    let transitions = Transitions::default();
    let _logs = install_subscriber(tracing_subscriber::registry().with(transitions.clone()));
    // Nothing listens on port 1: every probe is refused.
    let config = RedisConfig::builder()
        .url("redis://127.0.0.1:1")
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("starts open");
    let started = tokio::time::Instant::now();
    while transitions.to("half_open") < PROBES {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} probes in 120 s: {:?}",
            transitions.to("half_open"),
            manager.health()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(manager.health().state, BreakerState::Closed);

    // Each wait: from a failed attempt (open) to the next probe (half-open).
    let seen = transitions.0.lock().expect("transitions lock").clone();
    let mut waits = Vec::new();
    let mut opened = None;
    for (at, to) in &seen {
        match to.as_str() {
            "open" => opened = Some(*at),
            "half_open" => waits.push(*at - opened.take().expect("a probe after a failure")),
            other => panic!("unexpected transition to {other}: {seen:?}"),
        }
    }
    let mut ceiling = Duration::from_millis(50);
    for (i, wait) in waits.iter().enumerate() {
        // Timers fire on whole milliseconds: allow one more.
        assert!(
            *wait >= ceiling / 2 && *wait <= ceiling + Duration::from_millis(1),
            "wait {i} was {wait:?}, not within [{:?}, {ceiling:?}]: {waits:?}",
            ceiling / 2
        );
        ceiling = (ceiling * 2).min(Duration::from_millis(500));
    }
    let capped: std::collections::HashSet<_> = waits[4..].iter().collect();
    assert!(
        capped.len() > 1,
        "the waits at the 500 ms cap are not jittered: {waits:?}"
    );
}
