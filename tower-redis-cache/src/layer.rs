//! [`CacheLayer`] and its builder.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;
use tower_redis_core::RedisManager;

use crate::freshness::Rules;
use crate::policy::Route;
use crate::service::Cache;
use crate::store::CacheStore;

/// A problem with the cache configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A targeted cache-control field name is not a valid header name.
    #[error("targeted field {0:?} is not a valid header name; use e.g. \"Acme-Cache-Control\"")]
    TargetedField(String),
    /// An unkeyed header name is not a valid header name.
    #[error("{0:?} is not a valid header name")]
    HeaderName(String),
    /// The body limit is zero.
    #[error("max_body_bytes is 0; use a positive size such as 1 MiB")]
    ZeroBodyLimit,
}

/// An RFC 9111 shared cache in front of the wrapped service.
///
/// Cheap to clone; clones share the store and configuration.
#[derive(Clone, Debug)]
pub struct CacheLayer {
    pub(crate) config: Arc<Config>,
}

#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) store: Arc<CacheStore>,
    pub(crate) routes: Vec<Route>,
    pub(crate) default_route: Route,
    pub(crate) rules: Rules,
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) max_body_bytes: usize,
    pub(crate) keep_stale_for: Duration,
    pub(crate) generate_etags: bool,
    pub(crate) unkeyed_headers: Vec<HeaderName>,
}

impl Config {
    /// The first route matching `path`, else the default.
    pub(crate) fn route_for(&self, path: &str) -> &Route {
        self.routes
            .iter()
            .find(|r| r.matches(path))
            .unwrap_or(&self.default_route)
    }
}

impl CacheLayer {
    /// Starts a builder on the shared connection manager.
    pub fn builder(manager: RedisManager) -> CacheLayerBuilder {
        CacheLayerBuilder {
            manager,
            routes: Vec::new(),
            default_route: Route::new("*"),
            targeted_fields: Vec::new(),
            heuristic: false,
            store_set_cookie: false,
            allowed_hosts: Vec::new(),
            max_body_bytes: 1 << 20,
            keep_stale_for: Duration::from_secs(60),
            generate_etags: false,
            memory_bytes: 64 << 20,
            unkeyed_headers: DEFAULT_UNKEYED_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
        }
    }
}

impl CacheLayer {
    /// Waits until the responses already sent have been stored (or their
    /// storing given up). Stores run after a body has gone out in full; call
    /// this before shutting down so that none is lost.
    pub async fn flush(&self) {
        self.config.store.flushed().await;
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache::new(inner, Arc::clone(&self.config))
    }
}

/// Configures a [`CacheLayer`].
#[derive(Debug)]
pub struct CacheLayerBuilder {
    manager: RedisManager,
    routes: Vec<Route>,
    default_route: Route,
    targeted_fields: Vec<String>,
    heuristic: bool,
    store_set_cookie: bool,
    allowed_hosts: Vec<String>,
    max_body_bytes: usize,
    keep_stale_for: Duration,
    generate_etags: bool,
    memory_bytes: u64,
    unkeyed_headers: Vec<String>,
}

/// Request headers that can change what an origin answers without being
/// part of the cache key; a response to a request carrying one is not
/// stored (it is still answered from the cache when an entry exists).
pub const DEFAULT_UNKEYED_HEADERS: &[&str] = &[
    "x-forwarded-host",
    "x-forwarded-server",
    "x-host",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

impl CacheLayerBuilder {
    /// Replaces [`DEFAULT_UNKEYED_HEADERS`]: the request headers whose
    /// presence stops a response from being stored, because an origin that
    /// reflects them would poison the entry for everyone.
    pub fn unkeyed_headers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.unkeyed_headers = names.into_iter().map(Into::into).collect();
        self
    }

    /// Adds route rules; the first route whose pattern matches applies.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// The rules for paths no route matches (default: origin headers only).
    pub fn default_route(mut self, route: Route) -> Self {
        self.default_route = route;
        self
    }

    /// A targeted cache-control field (RFC 9213) this cache obeys before
    /// `Cache-Control`, after `CDN-Cache-Control`. Lets an app say "cache
    /// here, not in browsers".
    pub fn targeted_field(mut self, name: &str) -> Self {
        self.targeted_fields.push(name.to_owned());
        self
    }

    /// Heuristic freshness (10% of the time since `Last-Modified`, at most a
    /// day) for responses without explicit freshness (default off).
    pub fn heuristic_freshness(mut self, enabled: bool) -> Self {
        self.heuristic = enabled;
        self
    }

    /// Stores responses that carry `Set-Cookie` (default off: they are
    /// usually personal).
    pub fn store_set_cookie(mut self, enabled: bool) -> Self {
        self.store_set_cookie = enabled;
        self
    }

    /// Only these hosts (the request's `Host` / authority) are cached; other
    /// requests pass through. Empty (the default) caches every host.
    pub fn allowed_hosts<I, S>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_hosts.extend(hosts.into_iter().map(Into::into));
        self
    }

    /// Larger bodies are streamed to the client but not stored (default 1 MiB).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// How long entries are kept past their freshness, for revalidation
    /// with their validators and for `max-stale` requests (default 60 s).
    pub fn keep_stale_for(mut self, duration: Duration) -> Self {
        self.keep_stale_for = duration;
        self
    }

    /// Adds a strong `ETag` (a hash of the body) to stored responses that
    /// have none, so later hits answer `If-None-Match` (default off).
    pub fn generate_etags(mut self, enabled: bool) -> Self {
        self.generate_etags = enabled;
        self
    }

    /// The in-process store's size while Redis is unavailable (default 64 MiB).
    pub fn memory_capacity_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    /// Checks everything and builds the layer.
    pub fn build(self) -> Result<CacheLayer, ConfigError> {
        if self.max_body_bytes == 0 {
            return Err(ConfigError::ZeroBodyLimit);
        }
        let unkeyed_headers = self
            .unkeyed_headers
            .iter()
            .map(|name| {
                HeaderName::try_from(name.as_str())
                    .map_err(|_| ConfigError::HeaderName(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let targeted_fields = self
            .targeted_fields
            .iter()
            .map(|name| {
                HeaderName::try_from(name.as_str())
                    .map_err(|_| ConfigError::TargetedField(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CacheLayer {
            config: Arc::new(Config {
                store: Arc::new(CacheStore::new(self.manager, self.memory_bytes)),
                routes: self.routes,
                default_route: self.default_route,
                rules: Rules {
                    targeted_fields,
                    heuristic: self.heuristic,
                    store_set_cookie: self.store_set_cookie,
                },
                allowed_hosts: self.allowed_hosts,
                max_body_bytes: self.max_body_bytes,
                keep_stale_for: self.keep_stale_for,
                generate_etags: self.generate_etags,
                unkeyed_headers,
            }),
        })
    }
}
