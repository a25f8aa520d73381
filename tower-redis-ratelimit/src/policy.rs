//! Policies: what a limit is (algorithm and numbers), whom it counts (key)
//! and where it applies (path pattern and methods).

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tower_redis_core::http::PathPattern;

use crate::algorithm::Algorithm;
use crate::key::Key;

/// One named limit. Several can apply to a request; they are decided
/// together, all or nothing.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_ratelimit::{Key, Policy};
///
/// let per_ip = Policy::gcra("per-ip", 100, Duration::from_secs(60)).burst(20);
/// let per_user_writes = Policy::fixed_window("user-writes", 1_000, Duration::from_secs(3600))
///     .key(Key::header("x-user-id"))
///     .path("/api/*")
///     .methods([http::Method::POST, http::Method::PUT]);
/// # let _ = (per_ip, per_user_writes);
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) name: Arc<str>,
    pub(crate) algorithm: Algorithm,
    pub(crate) key: Key,
    pub(crate) path: Option<PathPattern>,
    pub(crate) methods: Option<Vec<Method>>,
}

impl Policy {
    /// A GCRA policy (the default choice): `quota` requests per `period`,
    /// burst equal to the quota, keyed by client IP.
    pub fn gcra(name: &str, quota: u32, period: Duration) -> Self {
        Self::new(
            name,
            Algorithm::Gcra {
                quota,
                period,
                burst: quota,
            },
        )
    }

    /// A sliding-window counter policy keyed by client IP.
    pub fn sliding_window(name: &str, limit: u32, window: Duration) -> Self {
        Self::new(name, Algorithm::SlidingWindow { limit, window })
    }

    /// A fixed-window policy keyed by client IP.
    pub fn fixed_window(name: &str, limit: u32, window: Duration) -> Self {
        Self::new(name, Algorithm::FixedWindow { limit, window })
    }

    fn new(name: &str, algorithm: Algorithm) -> Self {
        Self {
            name: name.into(),
            algorithm,
            key: Key::client_ip(),
            path: None,
            methods: None,
        }
    }

    /// For GCRA, how many requests may arrive at once (default: the quota).
    /// Ignored by the window algorithms.
    pub fn burst(mut self, burst: u32) -> Self {
        if let Algorithm::Gcra { burst: b, .. } = &mut self.algorithm {
            *b = burst;
        }
        self
    }

    /// Whom the policy counts (default: [`Key::client_ip`]).
    pub fn key(mut self, key: Key) -> Self {
        self.key = key;
        self
    }

    /// Applies the policy only to matching paths: an exact path (`/login`)
    /// or a prefix ending in `*` (`/api/*`).
    pub fn path(mut self, pattern: &str) -> Self {
        self.path = Some(PathPattern::new(pattern));
        self
    }

    /// Applies the policy only to these methods.
    pub fn methods<I: IntoIterator<Item = Method>>(mut self, methods: I) -> Self {
        self.methods = Some(methods.into_iter().collect());
        self
    }

    /// The policy's name, as reported in the `RateLimit` fields.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The counting algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub(crate) fn applies_to(&self, method: &Method, path: &str) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
            && self.path.as_ref().is_none_or(|p| p.matches(path))
    }

    /// Checks the numbers and the name; the message says what to change.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err("the name must be 1 to 64 characters".to_owned());
        }
        if let Some(bad) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':')))
        {
            return Err(format!(
                "the name contains {bad:?}; use letters, digits, `-`, `_`, `.`, `/` or `:`"
            ));
        }
        let (count, span) = match self.algorithm {
            Algorithm::Gcra {
                quota,
                period,
                burst,
            } => {
                if burst == 0 {
                    return Err("burst is 0; use at least 1".to_owned());
                }
                (quota, period)
            }
            Algorithm::SlidingWindow { limit, window }
            | Algorithm::FixedWindow { limit, window } => (limit, window),
        };
        if count == 0 {
            return Err(
                "the quota is 0; use at least 1 (or leave the route out of the policy)".to_owned(),
            );
        }
        if span < Duration::from_millis(1) || span > Duration::from_secs(366 * 24 * 3600) {
            return Err(format!("the period is {span:?}; use 1 ms to a year"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_exact_patterns() {
        let api = Policy::gcra("a", 1, Duration::from_secs(1)).path("/api/*");
        assert!(api.applies_to(&Method::GET, "/api/items"));
        assert!(!api.applies_to(&Method::GET, "/apix"));
        let login = Policy::gcra("b", 1, Duration::from_secs(1))
            .path("/login")
            .methods([Method::POST]);
        assert!(login.applies_to(&Method::POST, "/login"));
        assert!(!login.applies_to(&Method::GET, "/login"));
        assert!(!login.applies_to(&Method::POST, "/login/x"));
    }

    #[test]
    fn zero_quota_and_bad_names_are_rejected() {
        assert!(
            Policy::gcra("x", 0, Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            Policy::gcra("x", 1, Duration::from_secs(1))
                .burst(0)
                .validate()
                .is_err()
        );
        assert!(
            Policy::gcra("with space", 1, Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            Policy::gcra("quote\"", 1, Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            Policy::fixed_window("ok", 1, Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            Policy::sliding_window("per-ip", 10, Duration::from_secs(1))
                .validate()
                .is_ok()
        );
    }
}
