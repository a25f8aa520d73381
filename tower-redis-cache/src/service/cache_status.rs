//! This cache's member of the `Cache-Status` response field (RFC 9211),
//! e.g. `tower-redis; hit; ttl=42` or `tower-redis; fwd=uri-miss; stored`.
//! Pure: built from the decisions, rendered once per response.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tower_redis_core::record;

use crate::store::Tier;

/// The `Cache-Status` field (RFC 9211).
pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const CACHE_NAME: &str = "tower-redis";

/// This cache's member of the `Cache-Status` list.
#[derive(Debug, Clone)]
pub(crate) struct CacheStatus {
    hit_ttl: Option<i64>,
    pub(crate) fwd: Option<&'static str>,
    pub(crate) fwd_status: Option<StatusCode>,
    pub(crate) stored: bool,
    pub(crate) tier: Tier,
    /// The first `detail` token, before the tier's.
    pub(crate) lead: Option<&'static str>,
    /// `detail` tokens after the tier's: why it was served as it was.
    pub(crate) details: Vec<&'static str>,
}

impl CacheStatus {
    pub(crate) fn new(tier: Tier) -> Self {
        Self {
            hit_ttl: None,
            fwd: None,
            fwd_status: None,
            stored: false,
            tier,
            lead: None,
            details: Vec::new(),
        }
    }

    /// The `detail` tokens, in order: the lead, the tier's, the others.
    fn all_details(&self) -> impl Iterator<Item = &'static str> + '_ {
        let tier = match self.tier {
            Tier::Degraded => Some("redis-unavailable"),
            Tier::Near => Some("near"),
            Tier::Redis => None,
        };
        self.lead
            .into_iter()
            .chain(tier)
            .chain(self.details.iter().copied())
    }

    pub(crate) fn hit(ttl: i64, tier: Tier) -> Self {
        let mut status = Self::new(tier);
        status.hit_ttl = Some(ttl);
        status
    }

    pub(crate) fn forward(reason: &'static str, tier: Tier) -> Self {
        let mut status = Self::new(tier);
        status.fwd = Some(reason);
        status
    }

    pub(crate) fn with_fwd_status(mut self, status: StatusCode) -> Self {
        self.fwd_status = Some(status);
        self
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(64);
        self.render_into(&mut out);
        out
    }

    /// [`render`](Self::render), appended to `out`.
    fn render_into(&self, out: &mut String) {
        out.push_str(CACHE_NAME);
        if let Some(ttl) = self.hit_ttl {
            out.push_str("; hit; ttl=");
            out.push_str(itoa::Buffer::new().format(ttl));
        }
        if let Some(fwd) = self.fwd {
            out.push_str("; fwd=");
            out.push_str(fwd);
        }
        if let Some(status) = self.fwd_status {
            out.push_str("; fwd-status=");
            out.push_str(itoa::Buffer::new().format(status.as_u16()));
        }
        if self.stored {
            out.push_str("; stored");
        }
        let mut details = self.all_details();
        if let Some(first) = details.next() {
            match details.next() {
                None => {
                    out.push_str("; detail=");
                    out.push_str(first);
                }
                Some(second) => {
                    out.push_str("; detail=\"");
                    out.push_str(first);
                    for detail in std::iter::once(second).chain(details) {
                        out.push(' ');
                        out.push_str(detail);
                    }
                    out.push('"');
                }
            }
        }
    }
}

/// Appends the field to a response's headers (and counts the answer).
pub(crate) fn add_cache_status(headers: &mut HeaderMap, status: &CacheStatus) {
    record(status);
    // Rendered in a buffer the thread keeps; a line the same as the last
    // one shares its value (see `remembered`).
    thread_local! {
        static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        static LAST: std::cell::RefCell<Option<(String, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    let value = tower_redis_core::sync::with_scratch(&LINE, |line| {
        status.render_into(line);
        super::remembered(&LAST, &*line, || HeaderValue::from_str(line).ok())
    });
    if let Some(value) = value {
        headers.append(CACHE_STATUS.clone(), value);
    }
}

/// Counts the answer (`tower_redis_cache_requests_total`) and traces its
/// Cache-Status; the trace's text is only built when trace is enabled.
fn record(status: &CacheStatus) {
    let result = match (status.hit_ttl, status.fwd) {
        (Some(_), _) => "hit",
        (None, Some(fwd)) => fwd,
        (None, None) => "none",
    };
    let degraded = status.tier == Tier::Degraded;
    if result == "hit" && !status.stored {
        // A hit, the most frequent answer: counters whose keys are built
        // once (the general call below allocates its labels every time).
        static HITS: [record::Counter; 2] = [
            record::Counter::new(
                "tower_redis_cache_requests_total",
                &[
                    ("result", "hit"),
                    ("stored", "false"),
                    ("degraded", "false"),
                ],
            ),
            record::Counter::new(
                "tower_redis_cache_requests_total",
                &[("result", "hit"), ("stored", "false"), ("degraded", "true")],
            ),
        ];
        HITS[usize::from(degraded)].increment(1);
    } else if result == "uri-miss" {
        // The next most frequent (every request of a page never stored):
        // by `stored`, then `degraded`.
        macro_rules! miss {
            ($stored:literal, $degraded:literal) => {
                record::Counter::new(
                    "tower_redis_cache_requests_total",
                    &[
                        ("result", "uri-miss"),
                        ("stored", $stored),
                        ("degraded", $degraded),
                    ],
                )
            };
        }
        static MISSES: [[record::Counter; 2]; 2] = [
            [miss!("false", "false"), miss!("false", "true")],
            [miss!("true", "false"), miss!("true", "true")],
        ];
        MISSES[usize::from(status.stored)][usize::from(degraded)].increment(1);
    } else {
        let flag = |on: bool| if on { "true" } else { "false" };
        record::counter(
            "tower_redis_cache_requests_total",
            &[
                ("result", result),
                ("stored", flag(status.stored)),
                ("degraded", flag(degraded)),
            ],
            1,
        );
    }
    if status.hit_ttl.is_some() && status.tier == Tier::Near {
        static NEAR_HITS: record::Counter =
            record::Counter::new("tower_redis_cache_near_hits_total", &[]);
        NEAR_HITS.increment(1);
    }
    for detail in &status.details {
        match *detail {
            "coalesced" => record::counter("tower_redis_cache_coalesced_total", &[], 1),
            kind @ ("stale-while-revalidate" | "stale-if-error") => {
                record::counter("tower_redis_cache_stale_total", &[("kind", kind)], 1);
            }
            _ => {}
        }
    }
    // The request's `cache` span (when enabled) records the outcome.
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("result", result);
        span.record("cache_status", status.render().as_str());
    }
    tracing::trace!(target: "tower_redis_cache", cache_status = %status.render(), "answered");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field a response gets is its own status's, whether the thread
    /// made that line last or not.
    #[test]
    fn each_response_gets_its_own_line() {
        let statuses = [
            CacheStatus::hit(42, Tier::Redis),
            CacheStatus::hit(42, Tier::Redis),
            CacheStatus::hit(42, Tier::Near),
            CacheStatus::hit(41, Tier::Near),
            CacheStatus::forward("uri-miss", Tier::Redis),
            CacheStatus::hit(42, Tier::Redis),
        ];
        for status in statuses.iter().chain(&statuses) {
            let mut headers = HeaderMap::new();
            add_cache_status(&mut headers, status);
            assert_eq!(headers[&CACHE_STATUS], status.render().as_str());
            assert_eq!(headers.get_all(&CACHE_STATUS).iter().count(), 1);
        }
    }

    #[test]
    fn a_hit_renders_its_ttl_and_the_tier() {
        assert_eq!(
            CacheStatus::hit(42, Tier::Redis).render(),
            "tower-redis; hit; ttl=42"
        );
        assert_eq!(
            CacheStatus::hit(-3, Tier::Near).render(),
            "tower-redis; hit; ttl=-3; detail=near"
        );
    }

    #[test]
    fn a_forward_renders_reason_status_stored_and_details_in_order() {
        let mut status =
            CacheStatus::forward("stale", Tier::Degraded).with_fwd_status(StatusCode::NOT_MODIFIED);
        status.stored = true;
        assert_eq!(
            status.render(),
            "tower-redis; fwd=stale; fwd-status=304; stored; detail=redis-unavailable"
        );
        status.details.push("stale-if-error");
        assert!(
            status
                .render()
                .ends_with("; detail=\"redis-unavailable stale-if-error\""),
            "several details are one quoted string: {}",
            status.render()
        );
    }

    #[test]
    fn the_field_is_appended_not_replacing_others() {
        let mut headers = HeaderMap::new();
        headers.insert(&CACHE_STATUS, HeaderValue::from_static("upstream; hit"));
        add_cache_status(&mut headers, &CacheStatus::forward("uri-miss", Tier::Redis));
        let values: Vec<_> = headers.get_all(&CACHE_STATUS).iter().collect();
        assert_eq!(values, ["upstream; hit", "tower-redis; fwd=uri-miss"]);
    }
}
