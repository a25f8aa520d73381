//! [`DataOptions`]: how long a value lives and what happens around its factory.

use std::time::Duration;

/// Per-call options of the data cache. Cheap to build, meant to be kept in a
/// `static` or a field and passed by reference.
///
/// | option | default | meaning |
/// |---|---|---|
/// | [`ttl`](Self::ttl) | 5 min | how long a value is fresh |
/// | [`tags`](Self::tag) | none | purged with [`CacheHandle::purge_tag`](crate::CacheHandle::purge_tag), together with the HTTP entries of that tag |
/// | [`fail_safe`](Self::fail_safe) | off | how long past its TTL an expired value is kept, to be served when the factory fails or times out |
/// | [`fail_safe_throttle`](Self::fail_safe_throttle) | 30 s | after a failure, the expired value is served for this long before the factory is tried again |
/// | [`soft_timeout`](Self::soft_timeout) | none | with an expired value at hand: serve it after this long and let the factory finish in the background |
/// | [`hard_timeout`](Self::hard_timeout) | none | give up waiting after this long (the factory still finishes in the background) |
/// | [`eager_refresh`](Self::eager_refresh) | off | a hit past this fraction of the TTL refreshes the value in the background, once across instances |
/// | [`near`](Self::near) | allowed | whether the value may be copied into the near tier |
#[derive(Debug, Clone)]
pub struct DataOptions {
    pub(crate) ttl: Duration,
    pub(crate) tags: Vec<String>,
    pub(crate) fail_safe: Option<Duration>,
    pub(crate) fail_safe_throttle: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) hard_timeout: Option<Duration>,
    pub(crate) eager_refresh: Option<f64>,
    pub(crate) near: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(300),
            tags: Vec::new(),
            fail_safe: None,
            fail_safe_throttle: Duration::from_secs(30),
            soft_timeout: None,
            hard_timeout: None,
            eager_refresh: None,
            near: true,
        }
    }
}

impl DataOptions {
    /// The defaults, with this TTL.
    pub fn new(ttl: Duration) -> Self {
        Self::default().ttl(ttl)
    }

    /// How long a value is fresh (at least 1 ms).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// Adds a tag. One [`CacheHandle::purge_tag`](crate::CacheHandle::purge_tag)
    /// (or [`DataCache::purge_tag`](super::DataCache::purge_tag)) removes
    /// every data value and every HTTP response with that tag, on every
    /// instance, near tiers included.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Keeps values this long past their TTL, to serve when the factory
    /// fails or exceeds a timeout (fail-safe). A value older than its TTL
    /// plus this window (by this call's options) is not served, wherever
    /// it was found. Its age is this instance's clock against the time
    /// Redis stored it, as for freshness: an instance whose clock runs
    /// ahead of Redis' by more than the TTL plus this window serves no
    /// expired value.
    pub fn fail_safe(mut self, window: Duration) -> Self {
        self.fail_safe = Some(window);
        self
    }

    /// After the factory failed and an expired value was served instead,
    /// that value counts as fresh for this long (on every instance), so a
    /// failing source is not asked again by every caller.
    pub fn fail_safe_throttle(mut self, throttle: Duration) -> Self {
        self.fail_safe_throttle = throttle.max(Duration::from_millis(1));
        self
    }

    /// With an expired value at hand (see [`fail_safe`](Self::fail_safe)),
    /// a factory slower than this is left to finish in the background and
    /// the expired value is served meanwhile.
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// The longest a caller waits for a value: then the expired value (if
    /// any) or [`DataError::Timeout`](super::DataError::Timeout). The
    /// factory still finishes in the background and its value is stored.
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = Some(timeout);
        self
    }

    /// A hit on a value older than `fraction` of its TTL (0 < fraction <
    /// 1, e.g. 0.8) is served and refreshes the value in the background:
    /// once per instance and across instances. Out-of-range fractions turn
    /// it off.
    pub fn eager_refresh(mut self, fraction: f64) -> Self {
        self.eager_refresh = (fraction > 0.0 && fraction < 1.0).then_some(fraction);
        self
    }

    /// Whether the value may be copied into the near tier (when the cache
    /// has one). Stored with the value: when it is not allowed, no read on
    /// any instance copies it near (plain [`get`](super::DataCache::get)s
    /// included), and this call does not read the near tier. Default:
    /// allowed.
    pub fn near(mut self, allowed: bool) -> Self {
        self.near = allowed;
        self
    }

    /// How long Redis keeps the value: its TTL plus the fail-safe window.
    pub(crate) fn keep_for(&self) -> Duration {
        self.ttl.saturating_add(self.fail_safe.unwrap_or_default())
    }
}
