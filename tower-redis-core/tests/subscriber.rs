//! `testing::install_subscriber`, alone in its test binary: with another
//! test's subscriber live beside it, `tracing` would ask every subscriber
//! anyway, and the test could not fail.

use tower_redis_core::testing::Traces;

fn reach() {
    tracing::info!(target: "tower_redis_traces_test", "reached");
}

/// Another test's thread, without a subscriber, reaches a call site
/// first: this thread's subscriber still sees its events.
#[test]
fn an_event_first_reached_on_another_thread_is_seen() {
    let seen = Traces::new("none");
    let _guard = seen.install();
    std::thread::spawn(reach).join().expect("the other thread");
    reach();
    assert_eq!(seen.messages(), ["reached"]);
}
