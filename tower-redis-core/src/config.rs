//! [`RedisConfig`]: where Redis is and how patient to be with it, built
//! from code or the environment. URL parsing lives in [`crate::url`], TLS
//! roots in [`crate::tls`].

use std::fmt;
use std::time::Duration;

use crate::error::ConfigError;
#[cfg(feature = "tls")]
pub(crate) use crate::tls::tls_certificates;
use crate::tls::{RootCertificates, check_tls_roots};
use crate::url::{
    DEFAULT_URL, is_sentinel_url, parse_cluster_nodes, parse_sentinel, parse_sentinel_url,
    redact_unparsed, split_nodes,
};
pub use crate::url::{RedisUrl, SentinelTopology, Topology};

/// The circuit breaker's thresholds and the recovery probe's pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures or timeouts that open the breaker. A refused
    /// connection opens it at once.
    pub failure_threshold: u32,
    /// First delay before probing an open breaker; doubled after each failed probe.
    pub probe_min_backoff: Duration,
    /// Largest delay between two probes: after a long outage, Redis goes
    /// unused for up to this long once it is back. Each probe is one
    /// connection attempt: a refused one costs next to nothing, one to an
    /// unreachable host waits out the connect timeout.
    pub probe_max_backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            probe_min_backoff: Duration::from_millis(50),
            probe_max_backoff: Duration::from_millis(500),
        }
    }
}

/// How to reach Redis and how long to wait for it.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_core::RedisConfig;
///
/// let config = RedisConfig::builder()
///     .url("redis://:secret@localhost:6379/1")
///     .command_timeout(Duration::from_millis(150))
///     .key_prefix("shop")
///     .build()?;
/// assert_eq!(config.command_timeout(), Duration::from_millis(150));
/// // The password never shows up in logs.
/// assert!(!format!("{config:?}").contains("secret"));
///
/// let err = RedisConfig::from_url("http://localhost").unwrap_err();
/// assert_eq!(err.field, "url");
/// # Ok::<(), tower_redis_core::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    topology: Topology,
    pool_size: u32,
    connect_timeout: Duration,
    command_timeout: Duration,
    breaker: BreakerConfig,
    key_prefix: String,
    require_redis: bool,
    tls_roots: Option<RootCertificates>,
    /// Which environment variables chose the topology, when several were set.
    origin: Option<String>,
}

impl RedisConfig {
    /// The default command timeout: long enough for a loaded server on a
    /// LAN, short enough that a hung Redis costs a request little.
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
    /// The default timeout for establishing one connection.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
    /// The default number of multiplexed connections per standalone server:
    /// one multiplexed connection pipelines every concurrent operation, and
    /// measured on two cores it beats spreading them over several sockets.
    pub const DEFAULT_POOL_SIZE: u32 = 1;
    /// The default key prefix.
    pub const DEFAULT_KEY_PREFIX: &'static str = "tower-redis";

    /// Starts a builder with every default (standalone Redis on `127.0.0.1:6379`).
    pub fn builder() -> RedisConfigBuilder {
        RedisConfigBuilder::default()
    }

    /// A standalone configuration with default knobs.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        Self::builder().url(url).build()
    }

    /// A cluster configuration with default knobs.
    pub fn from_cluster_nodes<I, S>(nodes: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder().cluster_nodes(nodes).build()
    }

    /// Reads `REDIS_SENTINELS` (comma-separated `host:port` or URLs) with
    /// `REDIS_SENTINEL_MASTER`, or else `REDIS_CLUSTER_NODES`
    /// (comma-separated URLs), or else `REDIS_URL`, falling back to
    /// `redis://127.0.0.1:6379`. With Sentinels, a `REDIS_URL` set as well
    /// gives the primary's credentials, database and TLS (its host and port
    /// are not used), and the manager's startup log line says so.
    pub fn from_env() -> Result<Self, ConfigError> {
        RedisConfigBuilder::from_env().build()
    }

    /// Where Redis is.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }
    /// Connections in the standalone pool.
    pub fn pool_size(&self) -> u32 {
        self.pool_size
    }
    /// How long establishing one connection may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
    /// The longest a request path waits for Redis, connection checkout included.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }
    /// The breaker's thresholds.
    pub fn breaker(&self) -> BreakerConfig {
        self.breaker
    }
    /// The prefix of every key the layers write.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }
    /// Whether startup fails when Redis cannot be reached.
    pub fn require_redis(&self) -> bool {
        self.require_redis
    }
    /// The CA certificates (PEM) that `rediss://` connections trust instead
    /// of the built-in roots, if any were set.
    pub fn tls_root_certificates(&self) -> Option<&[u8]> {
        self.tls_roots.as_ref().map(|roots| roots.0.as_slice())
    }
    /// Which environment variables chose the topology, when more than one
    /// was set (for the startup log line).
    pub(crate) fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }
}

/// The Sentinels and master name given to a builder, not validated yet.
#[derive(Clone)]
struct SentinelInput {
    field: &'static str,
    nodes: Vec<String>,
    master_field: &'static str,
    master_name: Option<String>,
}

/// Builds a [`RedisConfig`]; every problem is reported by [`build`](Self::build).
/// Its `Debug` output hides passwords, like [`RedisConfig`]'s.
#[derive(Clone)]
pub struct RedisConfigBuilder {
    url: Option<(&'static str, String)>,
    cluster_nodes: Option<(&'static str, Vec<String>)>,
    sentinel: Option<SentinelInput>,
    origin: Option<String>,
    pool_size: u32,
    connect_timeout: Duration,
    command_timeout: Duration,
    breaker: BreakerConfig,
    key_prefix: String,
    require_redis: bool,
    tls_roots: Option<RootCertificates>,
}

impl fmt::Debug for RedisConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URLs are not validated yet: hide whatever could be a password.
        let url = self.url.as_ref().map(|(_, url)| redact_unparsed(url));
        let cluster_nodes = self
            .cluster_nodes
            .as_ref()
            .map(|(_, nodes)| nodes.iter().map(|n| redact_unparsed(n)).collect::<Vec<_>>());
        let sentinels = self.sentinel.as_ref().map(|s| {
            s.nodes
                .iter()
                .map(|n| redact_unparsed(n))
                .collect::<Vec<_>>()
        });
        let master_name = self.sentinel.as_ref().map(|s| &s.master_name);
        f.debug_struct("RedisConfigBuilder")
            .field("url", &url)
            .field("cluster_nodes", &cluster_nodes)
            .field("sentinels", &sentinels)
            .field("sentinel_master", &master_name)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("breaker", &self.breaker)
            .field("key_prefix", &self.key_prefix)
            .field("require_redis", &self.require_redis)
            .field("tls_roots", &self.tls_roots)
            .finish()
    }
}

impl Default for RedisConfigBuilder {
    fn default() -> Self {
        Self {
            url: None,
            cluster_nodes: None,
            sentinel: None,
            origin: None,
            pool_size: RedisConfig::DEFAULT_POOL_SIZE,
            connect_timeout: RedisConfig::DEFAULT_CONNECT_TIMEOUT,
            command_timeout: RedisConfig::DEFAULT_COMMAND_TIMEOUT,
            breaker: BreakerConfig::default(),
            key_prefix: RedisConfig::DEFAULT_KEY_PREFIX.to_owned(),
            require_redis: false,
            tls_roots: None,
        }
    }
}

impl RedisConfigBuilder {
    /// A builder whose location comes from `REDIS_SENTINELS` and
    /// `REDIS_SENTINEL_MASTER`, `REDIS_CLUSTER_NODES` or `REDIS_URL`, in
    /// this order of precedence (see [`RedisConfig::from_env`]).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut builder = Self::default();
        let set = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let sentinels = set("REDIS_SENTINELS");
        let master_name = set("REDIS_SENTINEL_MASTER");
        if sentinels.is_some() || master_name.is_some() {
            builder.sentinel = Some(SentinelInput {
                field: "REDIS_SENTINELS",
                nodes: sentinels.as_deref().map(split_nodes).unwrap_or_default(),
                master_field: "REDIS_SENTINEL_MASTER",
                master_name,
            });
            let mut notes = vec!["REDIS_SENTINELS and REDIS_SENTINEL_MASTER".to_owned()];
            if set("REDIS_CLUSTER_NODES").is_some() {
                notes.push("REDIS_CLUSTER_NODES is ignored".to_owned());
            }
            if let Some(url) = var("REDIS_URL") {
                notes.push(
                    "REDIS_URL gives only the primary's credentials, database and TLS, \
                     not its address"
                        .to_owned(),
                );
                builder.url = Some(("REDIS_URL", url));
            }
            builder.origin = Some(format!("chosen by {}", notes.join("; ")));
            return builder;
        }
        if let Some(nodes) = var("REDIS_CLUSTER_NODES")
            && !nodes.trim().is_empty()
        {
            builder.cluster_nodes = Some(("REDIS_CLUSTER_NODES", split_nodes(&nodes)));
            if var("REDIS_URL").is_some() {
                builder.origin =
                    Some("chosen by REDIS_CLUSTER_NODES; REDIS_URL is ignored".to_owned());
            }
            return builder;
        }
        if let Some(url) = var("REDIS_URL") {
            builder.url = Some(("REDIS_URL", url));
        }
        builder
    }

    /// A standalone server.
    ///
    /// After [`sentinels`](Self::sentinels) (in either order), the URL
    /// gives the primary's credentials, database and TLS instead; its host
    /// and port are then not used.
    ///
    /// A URL in the Sentinel form,
    /// `redis+sentinel://[user:password@]host1:port1,host2:port2/mastername[/db]`
    /// (`rediss+sentinel://` for TLS; port 26379 when left out), finds the
    /// primary through those Sentinels, with the URL's credentials and
    /// database for the primary; so does `REDIS_URL` in that form.
    ///
    /// ```
    /// use tower_redis_core::{RedisConfig, Topology};
    ///
    /// let config = RedisConfig::builder()
    ///     .url("redis+sentinel://app:secret@10.0.0.1:26379,10.0.0.2/mymaster/2")
    ///     .build()?;
    /// let Topology::Sentinel(sentinel) = config.topology() else { unreachable!() };
    /// assert_eq!(sentinel.sentinels().len(), 2);
    /// assert_eq!(sentinel.master_name(), "mymaster");
    /// assert_eq!(sentinel.master_url().db(), 2);
    /// # Ok::<(), tower_redis_core::ConfigError>(())
    /// ```
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_core::Topology;
    ///
    /// let config = RedisConfig::builder().url("redis://app:secret@redis.internal:6380/2").build()?;
    /// let Topology::Standalone(url) = config.topology() else { unreachable!() };
    /// assert_eq!(url.to_string(), "redis://app:***@redis.internal:6380/2"); // never the password
    ///
    /// // A wrong scheme fails at build, naming the field and the fix.
    /// let error = RedisConfig::builder().url("http://redis.internal").build().unwrap_err();
    /// assert_eq!(error.field, "url");
    /// assert!(error.to_string().contains("redis://"));
    /// # Ok(()) }
    /// ```
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(("url", url.into()));
        self.cluster_nodes = None;
        self.origin = None;
        self
    }

    /// A primary with replicas watched by Redis Sentinel: `nodes` are the
    /// Sentinels (`host:port`, or `redis://[user:password@]host:port` /
    /// `rediss://…` when the Sentinels want credentials or TLS) and
    /// `master_name` is the name they monitor the primary under.
    ///
    /// The primary's own credentials, database and TLS come from
    /// [`url`](Self::url) when it is set (its host and port are replaced by
    /// the address the Sentinels name), else it is reached as
    /// `redis://<address>/0` without credentials. Every new connection asks
    /// the Sentinels in turn (each within the connect timeout), connects to
    /// the address they name and checks with `ROLE` that it is the primary.
    ///
    /// ```
    /// use tower_redis_core::{RedisConfig, Topology};
    ///
    /// let config = RedisConfig::builder()
    ///     .sentinels(["10.0.0.1:26379", "redis://:sentinel-secret@10.0.0.2:26379"], "mymaster")
    ///     .url("redis://app:secret@primary/2")
    ///     .build()?;
    /// let Topology::Sentinel(sentinel) = config.topology() else { unreachable!() };
    /// assert_eq!(sentinel.master_name(), "mymaster");
    /// assert_eq!(sentinel.master_url().db(), 2);
    /// assert!(!format!("{config:?}").contains("secret"));
    /// # Ok::<(), tower_redis_core::ConfigError>(())
    /// ```
    pub fn sentinels<I, S>(mut self, nodes: I, master_name: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.sentinel = Some(SentinelInput {
            field: "sentinels",
            nodes: nodes
                .into_iter()
                .flat_map(|n| split_nodes(n.as_ref()))
                .collect(),
            master_field: "sentinel_master",
            master_name: Some(master_name.into()),
        });
        self.cluster_nodes = None;
        self.origin = None;
        self
    }

    /// Seed nodes of a Redis Cluster.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_core::Topology;
    ///
    /// // Seed nodes; replaces any `url`.
    /// let config = RedisConfig::builder()
    ///     .url("redis://ignored:6379")
    ///     .cluster_nodes(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"])
    ///     .build()?;
    /// assert!(matches!(config.topology(), Topology::Cluster(nodes) if nodes.len() == 3));
    /// # Ok(()) }
    /// ```
    pub fn cluster_nodes<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.cluster_nodes = Some((
            "cluster_nodes",
            nodes
                .into_iter()
                .map(|n| n.as_ref().trim().to_owned())
                .collect(),
        ));
        self.url = None;
        self.sentinel = None;
        self.origin = None;
        self
    }

    /// The most connections in the standalone pool (1 to 1024, default 1).
    /// Each is multiplexed and an operation holds its pool slot only to clone
    /// the connection, so one carries most loads; raise it for very large
    /// values or a client with many cores (measure with the `core` bench).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// assert_eq!(RedisConfig::builder().build()?.pool_size(), 1);
    /// assert_eq!(RedisConfig::builder().pool_size(4).build()?.pool_size(), 4);
    /// let error = RedisConfig::builder().pool_size(0).build().unwrap_err();
    /// assert_eq!(error.field, "pool_size");
    /// # Ok(()) }
    /// ```
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// How long establishing one connection may take (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest a request path waits for Redis before taking its fallback
    /// (default 200 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = RedisConfig::builder().command_timeout(Duration::from_millis(50)).build()?;
    /// assert_eq!(config.command_timeout(), Duration::from_millis(50));
    /// // Zero would mean "always fall back": refused.
    /// assert!(RedisConfig::builder().command_timeout(Duration::ZERO).build().is_err());
    /// # Ok(()) }
    /// ```
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Consecutive failures that open the breaker (default 5).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = RedisConfig::builder().failure_threshold(3).build()?;
    /// assert_eq!(config.breaker().failure_threshold, 3);
    /// assert!(RedisConfig::builder().failure_threshold(0).build().is_err());
    /// # Ok(()) }
    /// ```
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.breaker.failure_threshold = failures;
        self
    }

    /// Delays between recovery probes: starts at `min`, doubles up to `max`,
    /// with jitter (default 50 ms to 500 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = RedisConfig::builder()
    ///     .probe_backoff(Duration::from_millis(100), Duration::from_secs(5))
    ///     .build()?;
    /// assert_eq!(config.breaker().probe_max_backoff, Duration::from_secs(5));
    /// let error = RedisConfig::builder()
    ///     .probe_backoff(Duration::from_secs(5), Duration::from_secs(1))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(error.field, "probe_backoff");
    /// # Ok(()) }
    /// ```
    pub fn probe_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.breaker.probe_min_backoff = min;
        self.breaker.probe_max_backoff = max;
        self
    }

    /// The prefix of every key (default `tower-redis`), so several apps can
    /// share one Redis.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = RedisConfig::builder().key_prefix("shop").build()?;
    /// assert_eq!(config.key_prefix(), "shop");
    /// // The layers' keys all start with it, e.g. `shop:{rl}:rl:per-ip:k:…`.
    /// assert_eq!(tower_redis_core::Keyspace::new("shop").key(&["visits"]), "shop:visits");
    /// # Ok(()) }
    /// ```
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Refuse to start when Redis cannot be reached (default: start on the
    /// fallbacks and recover later).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_core::Error;
    ///
    /// // Nothing listens on port 1.
    /// let config = |required| {
    ///     RedisConfig::builder().url("redis://127.0.0.1:1").require_redis(required).build().unwrap()
    /// };
    /// // By default the app starts on its fallbacks and recovers when Redis appears ...
    /// let manager = RedisManager::connect(config(false)).await?;
    /// assert!(!manager.is_available());
    /// // ... required, startup fails instead.
    /// let error = RedisManager::connect(config(true)).await.unwrap_err();
    /// assert!(matches!(error, Error::Required { .. }), "{error}");
    /// # Ok(()) }
    /// ```
    pub fn require_redis(mut self, required: bool) -> Self {
        self.require_redis = required;
        self
    }

    /// Trusts these CA certificates (PEM, one or more) for `rediss://`
    /// connections **instead of** the built-in webpki roots: for a Redis
    /// whose certificate comes from a private CA. Needs the `tls` feature;
    /// the certificates are parsed by [`build`](Self::build).
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = std::fs::read("/etc/redis/tls/ca.crt")?;
    /// let config = tower_redis_core::RedisConfig::builder()
    ///     .url("rediss://app:secret@redis.internal:6380")
    ///     .tls_root_certificates(ca)
    ///     .build()?;
    /// # let _ = config; Ok(()) }
    /// ```
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_roots = Some(RootCertificates(pem.into()));
        self
    }

    /// Validates everything and returns the configuration.
    pub fn build(self) -> Result<RedisConfig, ConfigError> {
        let topology = self.topology()?;
        self.check_knobs()?;
        if let Some(roots) = &self.tls_roots {
            check_tls_roots(&topology, &roots.0)?;
        }
        Ok(RedisConfig {
            topology,
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            breaker: self.breaker,
            key_prefix: self.key_prefix,
            require_redis: self.require_redis,
            tls_roots: self.tls_roots,
            origin: self.origin,
        })
    }

    /// Where Redis is: the Sentinels if given, else the cluster nodes, else
    /// the URL, else the default.
    fn topology(&self) -> Result<Topology, ConfigError> {
        if let Some(sentinel) = &self.sentinel {
            let (url_field, url) = match &self.url {
                Some((field, url)) => (*field, url.as_str()),
                None => ("url", "redis://127.0.0.1"),
            };
            return Ok(Topology::Sentinel(parse_sentinel(
                sentinel.field,
                &sentinel.nodes,
                sentinel.master_field,
                sentinel.master_name.as_deref(),
                url_field,
                url,
            )?));
        }
        Ok(match (&self.cluster_nodes, &self.url) {
            (Some((field, nodes)), _) => Topology::Cluster(parse_cluster_nodes(field, nodes)?),
            (None, Some((field, url))) if is_sentinel_url(url) => {
                Topology::Sentinel(parse_sentinel_url(field, url)?)
            }
            (None, Some((field, url))) => Topology::Standalone(RedisUrl::parse(field, url)?),
            (None, None) => Topology::Standalone(RedisUrl::parse("url", DEFAULT_URL)?),
        })
    }

    /// The pool size, timeouts, breaker thresholds and key prefix.
    fn check_knobs(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.pool_size) {
            return Err(ConfigError::new(
                "pool_size",
                format!("is {}", self.pool_size),
                "use 1 to 1024 connections; each is multiplexed, so 2 to 8 is plenty",
            ));
        }
        check_duration(
            "connect_timeout",
            self.connect_timeout,
            Duration::from_secs(60),
        )?;
        check_duration(
            "command_timeout",
            self.command_timeout,
            Duration::from_secs(60),
        )?;
        if self.breaker.failure_threshold == 0 {
            return Err(ConfigError::new(
                "failure_threshold",
                "is 0",
                "use at least 1 failure",
            ));
        }
        check_duration(
            "probe_backoff",
            self.breaker.probe_min_backoff,
            Duration::from_secs(300),
        )?;
        if self.breaker.probe_max_backoff < self.breaker.probe_min_backoff {
            return Err(ConfigError::new(
                "probe_backoff",
                "has a maximum below its minimum",
                "pass (min, max) with min <= max",
            ));
        }
        check_key_prefix(&self.key_prefix)
    }
}

fn check_duration(field: &'static str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::new(
            field,
            "is zero",
            "use a positive duration, e.g. 200 ms",
        ));
    }
    if value > max {
        return Err(ConfigError::new(
            field,
            format!("is {value:?}"),
            format!("use at most {max:?}; a longer wait turns a Redis outage into an app outage"),
        ));
    }
    Ok(())
}

fn check_key_prefix(prefix: &str) -> Result<(), ConfigError> {
    if prefix.len() > 64 {
        return Err(ConfigError::new(
            "key_prefix",
            "is longer than 64 bytes",
            "use a short name such as `myapp`",
        ));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}'))
    {
        return Err(ConfigError::new(
            "key_prefix",
            format!("contains {bad:?}"),
            "use letters, digits, `-`, `_`, `.` or `:`; braces would break cluster hash tags",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_point_at_local_redis() {
        let config = RedisConfig::builder().build().expect("defaults are valid");
        assert_eq!(
            config.topology(),
            &Topology::Standalone(RedisUrl::parse("url", DEFAULT_URL).expect("valid"))
        );
        assert_eq!(
            config.command_timeout(),
            RedisConfig::DEFAULT_COMMAND_TIMEOUT
        );
        assert!(!config.require_redis());
    }

    #[test]
    fn out_of_range_knobs_are_rejected_by_name() {
        let err = RedisConfig::builder().pool_size(0).build().unwrap_err();
        assert_eq!(err.field, "pool_size");
        let err = RedisConfig::builder()
            .command_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(err.field, "command_timeout");
        let err = RedisConfig::builder()
            .failure_threshold(0)
            .build()
            .unwrap_err();
        assert_eq!(err.field, "failure_threshold");
        let err = RedisConfig::builder()
            .probe_backoff(Duration::from_secs(2), Duration::from_millis(1))
            .build()
            .unwrap_err();
        assert_eq!(err.field, "probe_backoff");
    }

    #[test]
    fn builder_debug_hides_passwords_of_unvalidated_urls() {
        let builder = RedisConfig::builder().url("redis://app:hunter2@local host:6379");
        assert!(!format!("{builder:?}").contains("hunter2"), "{builder:?}");
        let builder = RedisConfig::builder().cluster_nodes(["redis://:hunter2@10.0.0.1:7000"]);
        assert!(!format!("{builder:?}").contains("hunter2"), "{builder:?}");
    }

    #[test]
    fn passwords_from_the_environment_stay_hidden() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            }
        };
        for vars in [
            &[(
                "REDIS_URL",
                "redis+unix:///run/redis.sock?pass=hunter2&db=2",
            )][..],
            &[("REDIS_URL", "unix:///run/redis.sock?pass=hunter2")],
            &[("REDIS_URL", "redis://app:hunter2@cache.internal:6379/1")],
            &[("REDIS_URL", "redis://app:hunter2@cache internal")],
            &[(
                "REDIS_URL",
                "redis+unix:///run/redis.sock?pass=hunter2&db=x",
            )],
            &[(
                "REDIS_CLUSTER_NODES",
                "app:hunter2@10.0.0.1:7000, redis://:hunter2@10.0.0.2:7000",
            )],
            &[("REDIS_CLUSTER_NODES", "app:hunter2@10.0.0.1:7000/2")],
        ] {
            let builder = RedisConfigBuilder::from_vars(env(vars));
            assert!(!format!("{builder:?}").contains("hunter2"), "{builder:?}");
            match builder.build() {
                Ok(config) => {
                    assert!(!format!("{config:?}").contains("hunter2"), "{config:?}");
                }
                Err(error) => {
                    assert!(error.field.starts_with("REDIS_"), "{error}");
                    assert!(!error.to_string().contains("hunter2"), "{error}");
                    assert!(!format!("{error:?}").contains("hunter2"), "{error:?}");
                }
            }
        }
    }

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name: &str| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn sentinel_variables_take_precedence_and_say_so() {
        let config = RedisConfigBuilder::from_vars(vars(&[
            (
                "REDIS_SENTINELS",
                "10.0.0.1:26379, redis://:s3cret@10.0.0.2:26379",
            ),
            ("REDIS_SENTINEL_MASTER", "mymaster"),
            ("REDIS_URL", "redis://app:hunter2@old-primary:6379/3"),
            ("REDIS_CLUSTER_NODES", "10.0.0.9:7000"),
        ]))
        .build()
        .expect("valid");
        let Topology::Sentinel(sentinel) = config.topology() else {
            panic!("Sentinel must win: {config:?}")
        };
        assert_eq!(sentinel.master_name(), "mymaster");
        assert_eq!(sentinel.sentinels().len(), 2);
        // REDIS_URL gives the primary's credentials and database only.
        assert_eq!(sentinel.master_url().db(), 3);
        let at = sentinel.master_at("10.0.0.5", 6380).expect("address");
        assert_eq!(at.expose(), "redis://app:hunter2@10.0.0.5:6380/3");
        let origin = config.origin().expect("the choice is explained");
        assert!(origin.contains("REDIS_SENTINELS"), "{origin}");
        assert!(origin.contains("REDIS_URL"), "{origin}");
        assert!(origin.contains("REDIS_CLUSTER_NODES"), "{origin}");
        let described = crate::backend::describe_config(&config);
        assert!(described.contains("mymaster"), "{described}");
        assert!(described.contains("REDIS_URL"), "{described}");
        assert!(!described.contains("hunter2") && !described.contains("s3cret"));

        // Without Sentinels: the cluster, then the URL, as before.
        let config = RedisConfigBuilder::from_vars(vars(&[
            ("REDIS_URL", "redis://old-primary:6379"),
            ("REDIS_CLUSTER_NODES", "10.0.0.9:7000"),
        ]))
        .build()
        .expect("valid");
        assert!(matches!(config.topology(), Topology::Cluster(_)));
        let config =
            RedisConfigBuilder::from_vars(vars(&[("REDIS_URL", "redis://old-primary:6379")]))
                .build()
                .expect("valid");
        assert!(matches!(config.topology(), Topology::Standalone(_)));
        assert_eq!(config.origin(), None);
        // A bare IPv6 address from a Sentinel gets its brackets.
        let config = RedisConfig::builder()
            .sentinels(["[::1]:26379"], "m")
            .build()
            .expect("valid");
        let Topology::Sentinel(sentinel) = config.topology() else {
            panic!("Sentinel expected")
        };
        assert_eq!(
            sentinel.master_at("::1", 6379).expect("address").expose(),
            "redis://[::1]:6379"
        );
    }

    #[test]
    fn half_a_sentinel_configuration_is_an_error_naming_the_missing_variable() {
        let err = RedisConfigBuilder::from_vars(vars(&[("REDIS_SENTINELS", "10.0.0.1:26379")]))
            .build()
            .unwrap_err();
        assert_eq!(err.field, "REDIS_SENTINEL_MASTER");
        let err = RedisConfigBuilder::from_vars(vars(&[("REDIS_SENTINEL_MASTER", "mymaster")]))
            .build()
            .unwrap_err();
        assert_eq!(err.field, "REDIS_SENTINELS");
        let err = RedisConfig::builder()
            .sentinels(["10.0.0.1:26379/2"], "mymaster")
            .build()
            .unwrap_err();
        assert_eq!(err.field, "sentinels");
        let err = RedisConfig::builder()
            .sentinels(["10.0.0.1:26379"], "my master")
            .build()
            .unwrap_err();
        assert_eq!(err.field, "sentinel_master");
        let err = RedisConfig::builder()
            .sentinels(["10.0.0.1:26379"], "mymaster")
            .url("unix:///run/redis.sock")
            .build()
            .unwrap_err();
        assert_eq!(err.field, "url");
    }

    #[test]
    fn key_prefix_with_braces_is_rejected() {
        let err = RedisConfig::builder()
            .key_prefix("app{1}")
            .build()
            .unwrap_err();
        assert_eq!(err.field, "key_prefix");
    }
}
