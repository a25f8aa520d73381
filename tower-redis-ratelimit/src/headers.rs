//! The response fields: IETF `RateLimit-Policy` / `RateLimit`
//! (draft-ietf-httpapi-ratelimit-headers, structured-field lists),
//! `Retry-After`, and the legacy `X-RateLimit-*` trio.
//!
//! ```text
//! RateLimit-Policy: "per-ip";q=100;w=60, "per-user";q=1000;w=3600
//! RateLimit: "per-ip";r=42;t=18, "per-user";r=997;t=3600
//! RateLimit: "per-ip";r=3;t=18;local        (decided in process: Redis unavailable)
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::limiter::{DecisionSource, PolicyState};
use crate::policy::{Described, Policy};

/// `RateLimit-Policy`.
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Whole seconds, rounded up: a client that waits this long is not early.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The fields of one decision, held without a map of their own (a
/// `HeaderMap` allocates twice), until they join the response's.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    fields: [Option<(&'static HeaderName, HeaderValue)>; 5],
    len: usize,
}

impl Fields {
    fn insert(&mut self, name: &'static HeaderName, value: HeaderValue) {
        if let Some(slot) = self.fields.get_mut(self.len) {
            *slot = Some((name, value));
            self.len += 1;
        }
    }

    /// Appends each field to `headers` (stacked rate-limit layers each add
    /// their members to the same list fields).
    pub(crate) fn append_to(self, headers: &mut HeaderMap) {
        for (name, value) in self.fields.into_iter().flatten() {
            headers.append(name.clone(), value);
        }
    }

    /// Inserts each field `headers` does not have yet.
    pub(crate) fn insert_missing(self, headers: &mut HeaderMap) {
        for (name, value) in self.fields.into_iter().flatten() {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value);
            }
        }
    }
}

/// The fields for the policies that were decided.
pub(crate) fn fields(
    decided: &[(&Policy, Option<PolicyState>)],
    source: DecisionSource,
    legacy: bool,
) -> Fields {
    // The `RateLimit` field is written in this thread's buffer and copied
    // once into its value.
    thread_local! {
        static LIMIT_FIELD: std::cell::RefCell<String> =
            const { std::cell::RefCell::new(String::new()) };
    }
    tower_redis_core::sync::with_scratch(&LIMIT_FIELD, |limit_field| {
        fields_in(decided, source, legacy, limit_field)
    })
}

fn fields_in(
    decided: &[(&Policy, Option<PolicyState>)],
    source: DecisionSource,
    legacy: bool,
    limit_field: &mut String,
) -> Fields {
    let mut headers = Fields::default();
    // Built by hand, not with `write!`: this runs on every request, and
    // the formatting machinery was a measurable share of a decision. What
    // never changes of a policy was written when it was made.
    // The usual single policy's field is its own value; a list is joined
    // from the second policy on.
    let mut first: Option<&Described> = None;
    let mut policy_field = String::new();
    let mut number = itoa::Buffer::new();
    let mut count = 0;
    for (policy, state) in decided {
        let Some(state) = state else { continue };
        let described = &*policy.described;
        count += 1;
        if let Some(first) = first {
            if count == 2 {
                policy_field.reserve(48 * decided.len());
                policy_field.push_str(&first.item);
            }
            policy_field.push_str(", ");
            policy_field.push_str(&described.item);
            limit_field.push_str(", ");
        } else {
            first = Some(described);
        }
        limit_field.push_str(&described.limit_prefix);
        limit_field.push_str(number.format(state.remaining));
        limit_field.push_str(";t=");
        limit_field.push_str(number.format(ceil_secs(state.reset)));
        if source == DecisionSource::Local {
            limit_field.push_str(";local");
        }
    }
    if count == 0 {
        return headers;
    }
    // Policy names are validated to be header-safe, so these cannot fail.
    // The strings become the values' buffers: no copy.
    let policy_value = match first {
        Some(first) if count == 1 => first.value.clone(),
        _ => HeaderValue::from_maybe_shared(Bytes::from(policy_field)).ok(),
    };
    if let (Some(policy_value), Ok(limit_value)) = (
        policy_value,
        HeaderValue::from_bytes(limit_field.as_bytes()),
    ) {
        headers.insert(&RATELIMIT_POLICY, policy_value);
        headers.insert(&RATELIMIT, limit_value);
    }
    if legacy {
        // The legacy fields describe one policy: the one closest to its limit.
        if let Some((policy, Some(state))) = decided
            .iter()
            .filter(|(_, s)| s.is_some())
            .min_by_key(|(_, s)| s.map(|s| s.remaining))
        {
            headers.insert(&X_LIMIT, HeaderValue::from(policy.algorithm().quota()));
            headers.insert(&X_REMAINING, HeaderValue::from(state.remaining));
            headers.insert(&X_RESET, HeaderValue::from(ceil_secs(state.reset)));
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(remaining: u64, reset_ms: u64) -> Option<PolicyState> {
        Some(PolicyState {
            remaining,
            reset: Duration::from_millis(reset_ms),
            retry_after: None,
        })
    }

    #[test]
    fn fields_list_every_decided_policy_in_structured_field_syntax() {
        let ip = Policy::gcra("per-ip", 100, Duration::from_secs(60));
        let user = Policy::fixed_window("per-user", 1000, Duration::from_secs(3600));
        let mut headers = HeaderMap::new();
        fields(
            &[(&ip, state(42, 17_200)), (&user, state(997, 3_600_000))],
            DecisionSource::Redis,
            false,
        )
        .append_to(&mut headers);
        assert_eq!(
            headers[&RATELIMIT_POLICY],
            "\"per-ip\";q=100;w=60, \"per-user\";q=1000;w=3600"
        );
        assert_eq!(
            headers[&RATELIMIT],
            "\"per-ip\";r=42;t=18, \"per-user\";r=997;t=3600"
        );
        assert!(headers.get(&X_LIMIT).is_none());
    }

    #[test]
    fn only_the_decided_policies_are_listed() {
        let a = Policy::gcra("a", 100, Duration::from_secs(60));
        let b = Policy::fixed_window("b", 5, Duration::from_millis(1500));
        let c = Policy::sliding_window("c", 7, Duration::from_secs(10));
        let mut headers = HeaderMap::new();
        fields(
            &[(&a, state(1, 1000)), (&b, None), (&c, state(6, 9_001))],
            DecisionSource::Redis,
            false,
        )
        .append_to(&mut headers);
        assert_eq!(
            headers[&RATELIMIT_POLICY],
            "\"a\";q=100;w=60, \"c\";q=7;w=10"
        );
        assert_eq!(headers[&RATELIMIT], "\"a\";r=1;t=1, \"c\";r=6;t=10");
        // One decided policy after an undecided one: its own field alone.
        let mut headers = HeaderMap::new();
        fields(
            &[(&a, None), (&b, state(0, 1))],
            DecisionSource::Redis,
            false,
        )
        .append_to(&mut headers);
        assert_eq!(headers[&RATELIMIT_POLICY], "\"b\";q=5;w=2");
        assert_eq!(headers[&RATELIMIT], "\"b\";r=0;t=1");
        // None decided: no field.
        let mut headers = HeaderMap::new();
        fields(&[(&a, None)], DecisionSource::Redis, false).append_to(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn local_decisions_are_marked() {
        let ip = Policy::gcra("per-ip", 10, Duration::from_secs(1));
        let mut headers = HeaderMap::new();
        fields(&[(&ip, state(3, 500))], DecisionSource::Local, false).append_to(&mut headers);
        assert_eq!(headers[&RATELIMIT], "\"per-ip\";r=3;t=1;local");
    }

    #[test]
    fn legacy_fields_describe_the_tightest_policy() {
        let a = Policy::gcra("a", 100, Duration::from_secs(60));
        let b = Policy::gcra("b", 10, Duration::from_secs(60));
        let mut headers = HeaderMap::new();
        fields(
            &[(&a, state(50, 1000)), (&b, state(2, 30_000))],
            DecisionSource::Redis,
            true,
        )
        .append_to(&mut headers);
        assert_eq!(headers[&X_LIMIT], "10");
        assert_eq!(headers[&X_REMAINING], "2");
        assert_eq!(headers[&X_RESET], "30");
    }
}
