//! The reusable closed-loop load generator.
//!
//! `concurrency` tokio tasks each call one [`Operation`] in a loop, back to
//! back, for `warmup + duration`. Only operations that *complete* inside the
//! measured window count towards throughput and latency, so ops/s is simply
//! completions / window. Each task records latency into its own
//! [`Histogram`] (no shared state on the hot path); they are merged at the end.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::error::BenchError;

/// Highest latency the histograms track, in nanoseconds (60 s); anything
/// slower is recorded as 60 s.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// Significant decimal digits kept by the histograms.
const SIGNIFICANT_DIGITS: u8 = 3;

/// One unit of work: what a task does in a loop. Each task owns its
/// operation, so per-task state (a connection clone, a key) lives here.
pub(crate) trait Operation: Send + 'static {
    /// Why a call failed.
    type Error: fmt::Display + Send + 'static;

    /// Does the work once.
    fn call(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The shape of one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoadSpec {
    /// Tasks calling the operation at once.
    pub(crate) concurrency: usize,
    /// Time run before measuring starts (connections, caches, CPU clocks).
    pub(crate) warmup: Duration,
    /// Time measured.
    pub(crate) duration: Duration,
}

/// What one measurement saw.
#[derive(Debug, Clone)]
pub(crate) struct LoadResult {
    /// Successful operations completed inside the measured window.
    pub(crate) ops: u64,
    /// Every call made, including warm-up, the tail after the window, and
    /// failures: the denominator for server-side counters such as `INFO commandstats`.
    pub(crate) calls: u64,
    /// Failed calls, at any time.
    pub(crate) errors: u64,
    /// The first failure, if any.
    pub(crate) first_error: Option<String>,
    /// The measured window.
    pub(crate) window: Duration,
    /// Latency of the operations counted in `ops`, in nanoseconds.
    pub(crate) latency: Histogram<u64>,
}

impl LoadResult {
    /// Completions per second over the measured window.
    pub(crate) fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64()
    }

    /// The latency at `quantile` (0.5 for p50), in microseconds; NaN when
    /// no operation completed inside the window.
    pub(crate) fn latency_us(&self, quantile: f64) -> f64 {
        if self.latency.is_empty() {
            return f64::NAN;
        }
        self.latency.value_at_quantile(quantile) as f64 / 1_000.0
    }

    /// Turns failures into an error naming `subject`.
    pub(crate) fn require_no_errors(&self, subject: &str) -> Result<(), BenchError> {
        match &self.first_error {
            None => Ok(()),
            Some(first) => Err(BenchError::OperationsFailed {
                subject: subject.to_owned(),
                errors: self.errors,
                calls: self.calls,
                first: first.clone(),
            }),
        }
    }
}

/// Runs `spec.concurrency` tasks, the `i`-th calling `make(i)`'s operation,
/// and returns what they measured together.
pub(crate) async fn run<O, F>(spec: LoadSpec, mut make: F) -> Result<LoadResult, BenchError>
where
    O: Operation,
    F: FnMut(usize) -> O,
{
    if spec.concurrency == 0 || spec.duration.is_zero() {
        return Err(BenchError::Check(
            "a load needs at least one task and a non-zero duration".to_owned(),
        ));
    }
    let operations: Vec<O> = (0..spec.concurrency).map(&mut make).collect();
    let start = Instant::now();
    let window = Window {
        from: start + spec.warmup,
        until: start + spec.warmup + spec.duration,
    };
    let mut tasks = JoinSet::new();
    for operation in operations {
        tasks.spawn(drive(operation, window));
    }

    let mut total = LoadResult {
        ops: 0,
        calls: 0,
        errors: 0,
        first_error: None,
        window: spec.duration,
        latency: new_histogram()?,
    };
    while let Some(joined) = tasks.join_next().await {
        let task = joined.map_err(|e| {
            BenchError::Check(format!("a load task panicked or was cancelled: {e}"))
        })??;
        total.ops += task.ops;
        total.calls += task.calls;
        total.errors += task.errors;
        if total.first_error.is_none() {
            total.first_error = task.first_error;
        }
        total
            .latency
            .add(&task.latency)
            .map_err(|e| BenchError::Histogram(e.to_string()))?;
    }
    Ok(total)
}

#[derive(Debug, Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

struct TaskStats {
    ops: u64,
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

/// One task: call the operation back to back until the window has passed.
async fn drive<O: Operation>(mut operation: O, window: Window) -> Result<TaskStats, BenchError> {
    let mut stats = TaskStats {
        ops: 0,
        calls: 0,
        errors: 0,
        first_error: None,
        latency: new_histogram()?,
    };
    loop {
        let began = Instant::now();
        let outcome = operation.call().await;
        let ended = Instant::now();
        stats.calls += 1;
        match outcome {
            Ok(()) => {
                if ended >= window.from && ended < window.until {
                    stats.ops += 1;
                    let nanos = u64::try_from((ended - began).as_nanos()).unwrap_or(u64::MAX);
                    stats.latency.saturating_record(nanos.max(1));
                }
            }
            Err(error) => {
                stats.errors += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(error.to_string());
                }
            }
        }
        if ended >= window.until {
            return Ok(stats);
        }
    }
}

fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, SIGNIFICANT_DIGITS)
        .map_err(|e| BenchError::Histogram(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sleeps 1 ms per call.
    struct Sleepy;

    impl Operation for Sleepy {
        type Error = String;

        async fn call(&mut self) -> Result<(), String> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        }
    }

    /// Fails every call.
    struct Broken;

    impl Operation for Broken {
        type Error = String;

        async fn call(&mut self) -> Result<(), String> {
            tokio::task::yield_now().await;
            Err("nope".to_owned())
        }
    }

    fn spec(concurrency: usize) -> LoadSpec {
        LoadSpec {
            concurrency,
            warmup: Duration::from_millis(20),
            duration: Duration::from_millis(200),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_completions_in_the_window() {
        let result = run(spec(4), |_| Sleepy).await.unwrap();
        assert!(result.ops > 0);
        assert!(
            result.calls > result.ops,
            "warm-up calls are counted in calls only"
        );
        assert_eq!(result.latency.len(), result.ops);
        assert!(result.latency_us(0.5) >= 1_000.0, "each call sleeps 1 ms");
        // 4 tasks at ≤ 1 call per ms for 200 ms.
        assert!(result.ops <= 4 * 200 + 4, "{} ops", result.ops);
        result.require_no_errors("sleepy").unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_are_reported() {
        let result = run(spec(2), |_| Broken).await.unwrap();
        assert_eq!(result.ops, 0);
        assert!(
            result.latency_us(0.5).is_nan(),
            "no latency without completions"
        );
        assert_eq!(result.errors, result.calls);
        let error = result.require_no_errors("broken").unwrap_err().to_string();
        assert!(
            error.contains("broken") && error.contains("nope"),
            "{error}"
        );
    }
}
