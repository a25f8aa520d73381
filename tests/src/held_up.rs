//! When the machine did not run a load's process on time: a task sleeps
//! 2 ms at a time and notes every wake-up more than 10 ms late. A request's
//! wait for Redis is not one (the runtime is free meanwhile); the machine
//! not running the process (seen for over a second on a loaded two-core
//! machine) is, and a latency bound is judged net of it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The late wake-ups, as (due, woke), at most 100 000 of them however long
/// the run (the soak run lasts minutes).
#[derive(Debug, Default)]
pub struct HeldUp {
    times: Mutex<Vec<(Instant, Instant)>>,
}

impl HeldUp {
    /// Watches until `stop` is set.
    pub async fn watch(&self, stop: &AtomicBool) {
        const TICK: Duration = Duration::from_millis(2);
        const LATE: Duration = Duration::from_millis(10);
        let mut last = Instant::now();
        while !stop.load(Ordering::Acquire) {
            tokio::time::sleep(TICK).await;
            let now = Instant::now();
            let due = last + TICK;
            if now > due + LATE {
                let mut times = self.times.lock().unwrap_or_else(|p| p.into_inner());
                if times.len() < 100_000 {
                    times.push((due, now));
                }
            }
            last = now;
        }
    }

    /// How long the process was held up between `from` and `to`.
    pub fn during(&self, from: Instant, to: Instant) -> Duration {
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|&(due, woke)| woke.min(to).saturating_duration_since(due.max(from)))
            .sum()
    }
}
