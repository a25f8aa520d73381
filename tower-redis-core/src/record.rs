//! One way to count things: the `metrics` facade when the `metrics` feature
//! is on, nothing at all when it is off, so callers write one line instead
//! of a `#[cfg(feature = "metrics")]` pair of functions.
//!
//! Names and label values are `&'static str`, as every metric of the
//! project is: recording costs what the `metrics` macros cost with
//! runtime labels (one small label vector), and nothing without the feature.
//!
//! ```
//! use tower_redis_core::record;
//!
//! record::counter("tower_redis_fallbacks_total", &[("reason", "timeout")], 1);
//! record::gauge("tower_redis_breaker_state", &[], 1.0);
//! ```

/// Labels of one measurement: `(name, value)` pairs.
pub type Labels<'a> = &'a [(&'static str, &'static str)];

/// Adds `value` to the counter `name` with `labels`.
#[inline]
pub fn counter(name: &'static str, labels: Labels<'_>, value: u64) {
    #[cfg(feature = "metrics")]
    metrics::counter!(name, labels).increment(value);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, labels, value);
}

/// Sets the gauge `name` with `labels` to `value`.
#[inline]
pub fn gauge(name: &'static str, labels: Labels<'_>, value: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(name, labels).set(value);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, labels, value);
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// One measurement: (name, sorted labels, value).
    type Measurement = (String, Vec<(String, String)>, DebugValue);

    /// Every measurement the closure records.
    fn recorded(body: impl FnOnce()) -> Vec<Measurement> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, body);
        let mut seen: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let mut labels: Vec<(String, String)> = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                (key.key().name().to_owned(), labels, value)
            })
            .collect();
        seen.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        seen
    }

    fn pair(key: &str, value: &str) -> (String, String) {
        (key.to_owned(), value.to_owned())
    }

    #[test]
    fn counters_add_up_per_label_set() {
        let seen = recorded(|| {
            counter(
                "requests_total",
                &[("result", "hit"), ("stored", "false")],
                1,
            );
            counter(
                "requests_total",
                &[("result", "hit"), ("stored", "false")],
                2,
            );
            counter(
                "requests_total",
                &[("result", "miss"), ("stored", "true")],
                1,
            );
            counter("refused_total", &[], 5);
        });
        assert_eq!(
            seen,
            [
                ("refused_total".to_owned(), vec![], DebugValue::Counter(5)),
                (
                    "requests_total".to_owned(),
                    vec![pair("result", "hit"), pair("stored", "false")],
                    DebugValue::Counter(3)
                ),
                (
                    "requests_total".to_owned(),
                    vec![pair("result", "miss"), pair("stored", "true")],
                    DebugValue::Counter(1)
                ),
            ]
        );
    }

    #[test]
    fn gauges_keep_the_last_value() {
        let seen = recorded(|| {
            gauge("breaker_state", &[], 1.0);
            gauge("breaker_state", &[], 2.0);
        });
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "breaker_state");
        assert!(matches!(seen[0].2, DebugValue::Gauge(v) if v.into_inner() == 2.0));
    }
}
