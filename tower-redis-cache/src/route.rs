//! Per-route policy: which paths are cached, how long, and what goes into
//! the cache key besides the URL.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http::request::Parts;
use tower_redis_core::http::PathPattern;

type KeyFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
type TagsFn = Arc<dyn Fn(&Parts, &http::response::Parts) -> Vec<String> + Send + Sync>;

/// The cache rules for the paths that match a pattern. The first matching
/// route applies; paths no route matches use the layer's default route.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::Route;
///
/// let products = Route::new("/products/*")
///     .default_ttl(Duration::from_secs(60))
///     .max_ttl(Duration::from_secs(300))
///     .ignore_query_params(["utm_*", "fbclid"])
///     .key_header("accept-language");
/// let account = Route::new("/account/*").bypass();
/// # let _ = (products, account);
/// ```
#[derive(Clone)]
pub struct Route {
    pub(crate) pattern: PathPattern,
    pub(crate) enabled: bool,
    pub(crate) default_ttl: Option<Duration>,
    pub(crate) min_ttl: Option<Duration>,
    pub(crate) max_ttl: Option<Duration>,
    pub(crate) override_origin: bool,
    pub(crate) sort_query: bool,
    pub(crate) ignored_params: Vec<String>,
    pub(crate) key_headers: Vec<HeaderName>,
    pub(crate) key_cookies: Vec<String>,
    pub(crate) key_fn: Option<KeyFn>,
    pub(crate) stale_while_revalidate: Option<Duration>,
    pub(crate) stale_if_error: Option<Duration>,
    pub(crate) tags: Vec<String>,
    pub(crate) tags_fn: Option<TagsFn>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("pattern", &self.pattern)
            .field("enabled", &self.enabled)
            .field("default_ttl", &self.default_ttl)
            .field("override_origin", &self.override_origin)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// Rules for an exact path (`/about`) or a prefix ending in `*`
    /// (`/products/*`); `*` alone matches everything.
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: PathPattern::new(pattern),
            enabled: true,
            default_ttl: None,
            min_ttl: None,
            max_ttl: None,
            override_origin: false,
            sort_query: true,
            ignored_params: Vec::new(),
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            key_fn: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            tags: Vec::new(),
            tags_fn: None,
        }
    }

    /// Never cache these paths (they still invalidate on unsafe requests).
    pub fn bypass(mut self) -> Self {
        self.enabled = false;
        self
    }

    /// Freshness for responses that state none (no `max-age`, `s-maxage`,
    /// `Expires`). Without it such responses are only stored when heuristic
    /// freshness is enabled on the layer.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// Raises shorter freshness lifetimes to this.
    pub fn min_ttl(mut self, ttl: Duration) -> Self {
        self.min_ttl = Some(ttl);
        self
    }

    /// Caps longer freshness lifetimes to this.
    pub fn max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = Some(ttl);
        self
    }

    /// Uses [`default_ttl`](Self::default_ttl) whatever freshness the origin
    /// states. `no-store`, `private` and `Set-Cookie` are still respected.
    pub fn override_origin(mut self) -> Self {
        self.override_origin = true;
        self
    }

    /// Keeps the query's parameter order as sent (by default parameters are
    /// sorted, so `?a=1&b=2` and `?b=2&a=1` share an entry).
    pub fn keep_query_order(mut self) -> Self {
        self.sort_query = false;
        self
    }

    /// Query parameters left out of the key (a trailing `*` matches a prefix).
    pub fn ignore_query_params<I, S>(mut self, params: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.ignored_params
            .extend(params.into_iter().map(Into::into));
        self
    }

    /// Adds a request header's value to the key (like a `Vary` the origin
    /// did not send).
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name.
    pub fn key_header(mut self, name: &str) -> Self {
        match HeaderName::try_from(name) {
            Ok(name) => self.key_headers.push(name),
            Err(_) => panic!("Route::key_header: {name:?} is not a valid header name"),
        }
        self
    }

    /// Adds a cookie's value to the key.
    pub fn key_cookie(mut self, name: &str) -> Self {
        self.key_cookies.push(name.to_owned());
        self
    }

    /// Adds a computed value to the key; `None` adds nothing.
    pub fn key_fn<F>(mut self, key: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.key_fn = Some(Arc::new(key));
        self
    }

    /// Serves a stale entry at once for this long past its freshness while
    /// one background request refreshes it (RFC 5861), when the response
    /// does not say `stale-while-revalidate` itself. Never for responses
    /// with `must-revalidate`, `proxy-revalidate`, `no-cache` or `s-maxage`
    /// (which implies `proxy-revalidate`, RFC 9111 §5.2.2.10).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = Some(window);
        self
    }

    /// Serves a stale entry for this long past its freshness when the
    /// origin fails (an error, a 500, 502, 503 or 504, or no answer within
    /// the layer's origin timeout), when the response does not say
    /// `stale-if-error` itself. Never for responses with `must-revalidate`,
    /// `proxy-revalidate`, `no-cache` or `s-maxage`.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = Some(window);
        self
    }

    /// Tags every response stored under this route with `tag`, for
    /// [`CacheHandle::purge_tag`](crate::CacheHandle::purge_tag).
    pub fn tag(mut self, tag: &str) -> Self {
        self.tags.push(tag.to_owned());
        self
    }

    /// Computes tags for a response from the request and the response head
    /// (added to those from the response's tag headers and [`tag`](Self::tag)).
    ///
    /// ```
    /// use tower_redis_cache::Route;
    ///
    /// let route = Route::new("/products/*").tags_fn(|request, _response| {
    ///     let id = request.uri.path().trim_start_matches("/products/");
    ///     vec![format!("product:{id}")]
    /// });
    /// # let _ = route;
    /// ```
    pub fn tags_fn<F>(mut self, tags: F) -> Self
    where
        F: Fn(&Parts, &http::response::Parts) -> Vec<String> + Send + Sync + 'static,
    {
        self.tags_fn = Some(Arc::new(tags));
        self
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        self.pattern.matches(path)
    }

    /// Clamps a freshness lifetime (seconds) to the route's bounds.
    pub(crate) fn clamp(&self, lifetime: u64) -> u64 {
        let mut lifetime = lifetime;
        if let Some(min) = self.min_ttl {
            lifetime = lifetime.max(min.as_secs());
        }
        if let Some(max) = self.max_ttl {
            lifetime = lifetime.min(max.as_secs());
        }
        lifetime
    }

    pub(crate) fn ignores_param(&self, name: &str) -> bool {
        self.ignored_params
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_applies_min_then_max() {
        let route = Route::new("*")
            .min_ttl(Duration::from_secs(10))
            .max_ttl(Duration::from_secs(60));
        assert_eq!(route.clamp(1), 10);
        assert_eq!(route.clamp(30), 30);
        assert_eq!(route.clamp(600), 60);
    }

    #[test]
    fn ignored_params_support_prefixes() {
        let route = Route::new("*").ignore_query_params(["utm_*", "fbclid"]);
        assert!(route.ignores_param("utm_source"));
        assert!(route.ignores_param("fbclid"));
        assert!(!route.ignores_param("page"));
    }

    #[test]
    fn patterns() {
        assert!(Route::new("*").matches("/anything"));
        assert!(Route::new("/p/*").matches("/p/1"));
        assert!(!Route::new("/p/*").matches("/q"));
        assert!(Route::new("/about").matches("/about"));
        assert!(!Route::new("/about").matches("/about/x"));
    }
}
