//! The counting algorithms and their arithmetic.
//!
//! `limiter/decide.lua` decides on Redis and the in-process store decides
//! here, with the same arithmetic (and a batch's GCRA test by whole units,
//! [`Algorithm::decide_gcra_in_batch`], as the script's batch makes it);
//! the script's arguments come from here too, so the two cannot disagree
//! on what a policy's numbers mean.

use std::time::Duration;

use crate::limiter::PolicyState;

/// The counting algorithm of a [`Policy`](crate::Policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Generic cell rate algorithm: `quota` requests per `period`, spaced
    /// evenly, with up to `burst` at once. Exact, one small key per client.
    Gcra {
        /// Requests per period.
        quota: u32,
        /// The period.
        period: Duration,
        /// Requests allowed at once (defaults to `quota`).
        burst: u32,
    },
    /// Sliding-window counter: the current window's count plus the previous
    /// window's, weighted by how much of it still overlaps. Smooth at window
    /// edges; approximate (see the crate docs for the bound).
    SlidingWindow {
        /// Requests per window.
        limit: u32,
        /// The window.
        window: Duration,
    },
    /// Fixed window: at most `limit` requests per aligned window. Exact, but
    /// allows up to `2 × limit` across a window edge.
    FixedWindow {
        /// Requests per window.
        limit: u32,
        /// The window.
        window: Duration,
    },
}

impl Algorithm {
    /// The quota advertised in `RateLimit-Policy` (`q`).
    pub fn quota(&self) -> u32 {
        match *self {
            Algorithm::Gcra { quota, .. } => quota,
            Algorithm::SlidingWindow { limit, .. } | Algorithm::FixedWindow { limit, .. } => limit,
        }
    }

    /// The window advertised in `RateLimit-Policy` (`w`).
    pub fn window(&self) -> Duration {
        match *self {
            Algorithm::Gcra { period, .. } => period,
            Algorithm::SlidingWindow { window, .. } | Algorithm::FixedWindow { window, .. } => {
                window
            }
        }
    }
}

/// A counter as the in-process store keeps it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counter {
    /// From this moment (µs on the store's clock) the counter is back to a
    /// full quota and counts as absent.
    pub(crate) expires_us: f64,
    pub(crate) state: CounterState,
}

/// What a counter holds, per algorithm.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CounterState {
    /// GCRA: the theoretical arrival time (µs).
    Tat(f64),
    /// Windows: the index of the window last written, its count and the
    /// count of the window before it.
    Window {
        index: f64,
        current: f64,
        previous: f64,
    },
}

impl Algorithm {
    /// The quota an instance enforces alone: `share` of this one, at least 1.
    pub(crate) fn scaled(self, share: f64) -> Self {
        let scale = |n: u32| -> u32 {
            let scaled = (f64::from(n) * share).floor();
            if scaled < 1.0 {
                1
            } else {
                scaled.min(f64::from(u32::MAX)) as u32
            }
        };
        match self {
            Algorithm::Gcra {
                quota,
                period,
                burst,
            } => Algorithm::Gcra {
                quota: scale(quota),
                period,
                burst: scale(burst),
            },
            Algorithm::SlidingWindow { limit, window } => Algorithm::SlidingWindow {
                limit: scale(limit),
                window,
            },
            Algorithm::FixedWindow { limit, window } => Algorithm::FixedWindow {
                limit: scale(limit),
                window,
            },
        }
    }

    /// The numbers `decide.lua` takes for this algorithm: kind, a, b.
    pub(crate) fn script_args(self) -> (u8, f64, f64) {
        match self {
            Algorithm::Gcra {
                quota,
                period,
                burst,
            } => {
                let (interval, tolerance) = gcra_spacing(quota, period, burst);
                (1, interval, tolerance)
            }
            Algorithm::SlidingWindow { limit, window } => (2, f64::from(limit), micros(window)),
            Algorithm::FixedWindow { limit, window } => (3, f64::from(limit), micros(window)),
        }
    }

    /// One policy's decision at `now` (µs) for `cost` units, given its
    /// counter: how the policy stands, and the counter to write if the
    /// request is allowed. The same arithmetic as `decide.lua`.
    pub(crate) fn decide(
        self,
        current: Option<CounterState>,
        now: f64,
        cost: f64,
    ) -> (PolicyState, Option<Counter>) {
        match self {
            Algorithm::Gcra {
                quota,
                period,
                burst,
            } => {
                let (interval, tolerance) = gcra_spacing(quota, period, burst);
                let tat = match current {
                    Some(CounterState::Tat(tat)) if tat > now => tat,
                    _ => now,
                };
                gcra(interval, tolerance, tat, now, cost)
            }
            Algorithm::SlidingWindow { limit, window } => {
                Window::at(f64::from(limit), micros(window), current, now).decide(true, cost)
            }
            Algorithm::FixedWindow { limit, window } => {
                Window::at(f64::from(limit), micros(window), current, now).decide(false, cost)
            }
        }
    }

    /// A GCRA policy's decision inside a batch, as `decide.lua`'s batch path
    /// makes it: `current` the counter as it was before the batch, `units`
    /// the units the batch allowed on it before this request, `now` the
    /// batch's time. How the policy stands, and whether it allows `cost`
    /// more; `None` for a window policy (see [`decide`](Self::decide)).
    ///
    /// Relative to `now` and in whole units, term for term as the script
    /// computes it ([`gcra_units`]): the requests of a batch share one
    /// `now`, so the last of a burst on a fresh counter lands exactly on
    /// the boundary.
    pub(crate) fn decide_gcra_in_batch(
        self,
        current: Option<CounterState>,
        units: f64,
        now: f64,
        cost: f64,
    ) -> Option<(PolicyState, bool)> {
        let Algorithm::Gcra {
            quota,
            period,
            burst,
        } = self
        else {
            return None;
        };
        let (interval, tolerance) = gcra_spacing(quota, period, burst);
        let base = match current {
            Some(CounterState::Tat(tat)) if tat > now => tat,
            _ => now,
        };
        Some(gcra_units(interval, tolerance, base - now, units, cost))
    }
}

/// Microseconds in `d`, as the script and the in-process store count time.
pub(crate) fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000_000.0
}

/// A duration from microseconds, rounded up, never negative.
fn duration(us: f64) -> Duration {
    Duration::from_micros(us.max(0.0).ceil() as u64)
}

/// GCRA's emission interval and burst tolerance, in µs.
fn gcra_spacing(quota: u32, period: Duration, burst: u32) -> (f64, f64) {
    let interval = micros(period) / f64::from(quota);
    (interval, interval * f64::from(burst))
}

/// GCRA from the theoretical arrival time `tat` (never before `now`): the
/// test and arithmetic of [`gcra_units`] with no unit allowed before, as
/// `decide.lua`'s lone paths make them.
fn gcra(
    interval: f64,
    tolerance: f64,
    tat: f64,
    now: f64,
    cost: f64,
) -> (PolicyState, Option<Counter>) {
    let (state, allowed) = gcra_units(interval, tolerance, tat - now, 0.0, cost);
    let counter = allowed.then(|| {
        let new_tat = tat + cost * interval;
        Counter {
            expires_us: new_tat,
            state: CounterState::Tat(new_tat),
        }
    });
    (state, counter)
}

/// GCRA's decision for `cost` units, `ahead` µs (the theoretical arrival
/// time less now, never negative) and `units` already allowed at this same
/// instant: allowed when `ahead + (units + cost) * interval - tolerance` is
/// not above 0. How the policy stands, and whether it allows them.
///
/// Relative to now and in whole units: on a fresh counter,
/// `(units + cost) * interval` and the tolerance are the same product, so
/// the last unit of a burst lands exactly on the boundary. Absolute times
/// (about 1.8e15 µs, where a double's step is 0.25 µs) came out a fraction
/// of a µs past it, which denied the last of a burst arriving together and
/// told a lone request one unit fewer than was left.
fn gcra_units(
    interval: f64,
    tolerance: f64,
    ahead: f64,
    units: f64,
    cost: f64,
) -> (PolicyState, bool) {
    let before = ahead + units * interval;
    let after = ahead + (units + cost) * interval;
    // Whether `n` units in all fit: the test every request meets.
    let fits = |n: f64| ahead + n * interval - tolerance <= 0.0;
    // The units left after `done`: the quotient, a hair off a whole number
    // at times, set right by the test the next requests will meet (so it
    // never promises a unit they are denied).
    let left = |done: f64| {
        let mut r = ((tolerance - (ahead + done * interval)) / interval)
            .floor()
            .max(0.0);
        if fits(done + r + 1.0) {
            r += 1.0;
        } else if r > 0.0 && !fits(done + r) {
            r -= 1.0;
        }
        r as u64
    };
    if after - tolerance > 0.0 {
        let state = PolicyState {
            remaining: left(units),
            reset: duration(before),
            retry_after: Some(duration(after - tolerance)),
        };
        (state, false)
    } else {
        let state = PolicyState {
            remaining: left(units + cost),
            reset: duration(after),
            retry_after: None,
        };
        (state, true)
    }
}

/// A window counter as it stands at `now`, shifted to the window `now`
/// falls in.
struct Window {
    limit: f64,
    /// The window's length (µs).
    window: f64,
    /// The index of the window `now` falls in.
    index: f64,
    /// Time since that window began (µs).
    elapsed: f64,
    current: f64,
    previous: f64,
}

impl Window {
    fn at(limit: f64, window: f64, counter: Option<CounterState>, now: f64) -> Self {
        let index = (now / window).floor();
        let (current, previous) = match counter {
            Some(CounterState::Window {
                index: i,
                current,
                previous,
            }) if i == index => (current, previous),
            Some(CounterState::Window {
                index: i, current, ..
            }) if i == index - 1.0 => (0.0, current),
            _ => (0.0, 0.0),
        };
        Self {
            limit,
            window,
            index,
            elapsed: now - index * window,
            current,
            previous,
        }
    }

    /// The decision of a sliding (weighted previous window) or fixed window.
    fn decide(&self, sliding: bool, cost: f64) -> (PolicyState, Option<Counter>) {
        let Self {
            limit,
            window,
            index,
            elapsed,
            current,
            previous,
        } = *self;
        let reset = window - elapsed;
        let used = if sliding {
            previous * (window - elapsed) / window + current
        } else {
            current
        };
        if used + cost > limit {
            let retry = if sliding {
                self.sliding_retry(cost, reset)
            } else {
                reset
            };
            let state = PolicyState {
                remaining: (limit - used).floor().max(0.0) as u64,
                reset: duration(reset),
                retry_after: Some(duration(retry.max(1.0))),
            };
            return (state, None);
        }
        let state = PolicyState {
            remaining: (limit - used - cost).floor().max(0.0) as u64,
            reset: duration(reset),
            retry_after: None,
        };
        let counter = Counter {
            expires_us: (index + 2.0) * window,
            state: CounterState::Window {
                index,
                current: current + cost,
                previous,
            },
        };
        (state, Some(counter))
    }

    /// When a sliding window denying `cost` units would allow them.
    fn sliding_retry(&self, cost: f64, reset: f64) -> f64 {
        let Self {
            limit,
            window,
            elapsed,
            current,
            previous,
            ..
        } = *self;
        if limit - current - cost >= 0.0 {
            window - elapsed - (limit - current - cost) * window / previous
        } else if cost <= limit {
            reset + window * (1.0 - (limit - cost) / current)
        } else {
            reset + window
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_arguments_are_interval_and_tolerance() {
        let (kind, interval, tolerance) = Algorithm::Gcra {
            quota: 10,
            period: Duration::from_secs(1),
            burst: 5,
        }
        .script_args();
        assert_eq!(kind, 1);
        assert!((interval - 100_000.0).abs() < 1e-6);
        assert!((tolerance - 500_000.0).abs() < 1e-6);
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let window = 1_000_000.0;
        let algorithm = Algorithm::SlidingWindow {
            limit: 10,
            window: Duration::from_secs(1),
        };
        // Previous window full, a quarter into the current one: 7.5 still count.
        let previous = Some(CounterState::Window {
            index: 4.0,
            current: 10.0,
            previous: 0.0,
        });
        let (state, _) = algorithm.decide(previous, 5.0 * window + 250_000.0, 1.0);
        assert_eq!(state.remaining, 1);
        let (state, _) = algorithm.decide(previous, 5.0 * window + 250_000.0, 3.0);
        assert!(state.retry_after.is_some());
    }
}
