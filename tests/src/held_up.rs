//! When the machine did not run a load's process on time: a task sleeps
//! 2 ms at a time and notes every wake-up more than 10 ms late. A request's
//! wait for Redis is not one (the runtime is free meanwhile); the machine
//! not running the process (seen for over a second on a loaded two-core
//! machine) is, and a latency bound is judged net of it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The most late wake-ups kept, however long the run (the soak run lasts
/// minutes).
const MAX_TIMES: usize = 100_000;

/// The late wake-ups, as (due, woke), at most `MAX_TIMES` of them, in a
/// list made at its full size at once: the soak judges the heap's held
/// bytes, and a list that doubled as a loaded machine held the process up
/// would look like a leak.
#[derive(Debug)]
pub struct HeldUp {
    times: Mutex<Vec<(Instant, Instant)>>,
}

impl Default for HeldUp {
    fn default() -> Self {
        Self {
            times: Mutex::new(Vec::with_capacity(MAX_TIMES)),
        }
    }
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
                if times.len() < MAX_TIMES {
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
