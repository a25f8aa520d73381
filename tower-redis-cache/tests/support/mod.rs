//! Helpers shared by the cache crate's integration suites: an answer read
//! whole, requests to `shop.example`, waits that end in a deadline, and
//! the Redis operations a metrics snapshot timed.
//!
//! Each suite uses a part of this module; the rest is dead code there.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, header};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;

/// How long any one wait of these helpers may take.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// A response read whole.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `Cache-Status` field, or "" without one.
    pub(crate) fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }
}

/// Calls `app` and reads the whole answer, each within [`DEADLINE`].
pub(crate) async fn call(app: &Router, request: Request<Body>) -> Answer {
    let response = tokio::time::timeout(DEADLINE, app.clone().oneshot(request))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("no body within 10 s")
        .unwrap()
        .to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A `method` request for `path` on `shop.example` with `headers`.
pub(crate) fn request_with(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "shop.example");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).unwrap()
}

/// [`call`] with a [`request_with`].
pub(crate) async fn send(
    app: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    call(app, request_with(method, path, headers)).await
}

/// Waits ([`DEADLINE`] at most) until the entry for `url` has no freshness
/// left; freshness is judged by Redis' clock, so no paused clock here.
pub(crate) async fn wait_until_stale(layer: &CacheLayer, url: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let entry = layer.handle().entry(url).await.unwrap();
        let info = entry.unwrap_or_else(|| panic!("{url} is not stored"));
        if info.ttl <= 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} still fresh after 10 s: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stores run after the body is sent: waits ([`DEADLINE`] at most) until
/// they are done.
pub(crate) async fn settle(layer: &CacheLayer) {
    tokio::time::timeout(DEADLINE, layer.flush())
        .await
        .expect("flush never finished");
}

/// A `GET` request for `path` on `shop.example` with `headers`.
pub(crate) fn request(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    request_with("GET", path, headers)
}

/// What every suite's origin keeps: its calls per path and a latency for
/// all its answers. A suite's `Origin` holds one (and derefs to it) beside
/// its own knobs.
#[derive(Clone, Default)]
pub(crate) struct OriginCalls {
    calls: Arc<Mutex<HashMap<String, u64>>>,
    /// Calls over all paths, for waiting on a call to arrive.
    arrivals: Arc<tokio::sync::watch::Sender<u64>>,
    /// Latency of every answer, ms.
    pub(crate) delay_ms: Arc<AtomicU64>,
}

impl OriginCalls {
    /// Counts a call to `path`; returns its number (1 for the first).
    pub(crate) fn count(&self, path: &str) -> u64 {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.entry(path.to_owned()).or_default();
        *n += 1;
        self.arrivals.send_modify(|all| *all += 1);
        *n
    }

    /// The calls over all paths so far.
    pub(crate) fn total(&self) -> u64 {
        self.calls.lock().unwrap().values().sum()
    }

    /// The calls to `path` so far.
    pub(crate) fn calls(&self, path: &str) -> u64 {
        self.calls.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Waits ([`DEADLINE`] at most) until `path` has been called `n` times.
    pub(crate) async fn wait_for_calls(&self, path: &str, n: u64) {
        let mut arrivals = self.arrivals.subscribe();
        tokio::time::timeout(DEADLINE, arrivals.wait_for(|_| self.calls(path) >= n))
            .await
            .unwrap_or_else(|_| panic!("{path} was not called {n} times within 10 s"))
            .expect("the origin is alive");
    }

    /// Sleeps for the configured latency, if any.
    pub(crate) async fn delay(&self) {
        let ms = self.delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

/// How many times each Redis operation was timed in `snapshot`
/// (`db.client.operation.duration` samples by `db.operation.name`).
pub(crate) fn operations(
    snapshot: metrics_util::debugging::Snapshot,
) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for (key, _, _, value) in snapshot.into_vec() {
        let key = key.key();
        if key.name() != "db.client.operation.duration" {
            continue;
        }
        let Some(name) = key
            .labels()
            .find(|label| label.key() == "db.operation.name")
        else {
            continue;
        };
        if let metrics_util::debugging::DebugValue::Histogram(samples) = value {
            *counts.entry(name.value().to_owned()).or_default() += samples.len();
        }
    }
    counts
}

/// The fills counted as not stored in `snapshot`
/// (`tower_redis_cache_fills_dropped_total`): `(kind, reason, count)`,
/// sorted. A debugging recorder's snapshot takes its counts: each holds
/// what was counted since the one before.
pub(crate) fn dropped_fills(
    snapshot: metrics_util::debugging::Snapshot,
) -> Vec<(String, String, u64)> {
    let mut dropped = Vec::new();
    for (key, _, _, value) in snapshot.into_vec() {
        let key = key.key();
        if key.name() != "tower_redis_cache_fills_dropped_total" {
            continue;
        }
        let label = |name: &str| {
            key.labels()
                .find(|label| label.key() == name)
                .map(|label| label.value().to_owned())
                .unwrap_or_default()
        };
        if let metrics_util::debugging::DebugValue::Counter(n @ 1..) = value {
            dropped.push((label("kind"), label("reason"), n));
        }
    }
    dropped.sort();
    dropped
}
