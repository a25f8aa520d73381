//! [`RedisConfig`]: where Redis is and how patient to be with it.

use std::fmt;
use std::time::Duration;

use crate::error::ConfigError;

const URL_FIX: &str = "use redis://[user:password@]host[:port][/db], rediss:// for TLS, \
                       or redis+unix:///path/to/redis.sock[?user=…&pass=…&db=…] for a Unix socket";
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// Where Redis runs: one server, or the seed nodes of a Redis Cluster.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// A single server (or a proxy in front of one), reached through a pool
    /// of multiplexed connections.
    Standalone(RedisUrl),
    /// A Redis Cluster, reached through the cluster client; the nodes are
    /// seeds, the client discovers the rest.
    Cluster(Vec<RedisUrl>),
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topology::Standalone(url) => f.debug_tuple("Standalone").field(url).finish(),
            Topology::Cluster(nodes) => f.debug_tuple("Cluster").field(nodes).finish(),
        }
    }
}

/// A validated Redis URL. Its `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    url: url::Url,
}

impl RedisUrl {
    /// Parses and validates a Redis URL, in any form redis-rs reads:
    /// `redis://` / `valkey://` (`[user:password@]host[:port][/db]`),
    /// `rediss://` / `valkeys://` for TLS (feature `tls`), and the Unix
    /// socket forms `redis+unix://`, `valkey+unix://` and `unix://`
    /// (`/path?user=…&pass=…&db=…`). `Display` and `Debug` hide the
    /// password of every form.
    pub fn parse(field: &'static str, input: &str) -> Result<Self, ConfigError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ConfigError::new(field, "is empty", URL_FIX));
        }
        let url = url::Url::parse(input).map_err(|e| {
            ConfigError::new(
                field,
                format!("`{}` is not a valid URL ({e})", redact_unparsed(input)),
                URL_FIX,
            )
        })?;
        let this = Self { url };
        match this.url.scheme() {
            "redis" | "valkey" => {}
            "rediss" | "valkeys" => {
                if !cfg!(feature = "tls") {
                    return Err(ConfigError::new(
                        field,
                        format!("`{this}` asks for TLS, which this build does not include"),
                        "enable the `tls` feature of tower-redis-core",
                    ));
                }
            }
            "redis+unix" | "valkey+unix" | "unix" => return this.checked_by_redis(field),
            other => {
                return Err(ConfigError::new(
                    field,
                    format!("has the scheme `{other}:`, which is not a Redis scheme"),
                    URL_FIX,
                ));
            }
        }
        if this.url.host_str().is_none_or(str::is_empty) {
            return Err(ConfigError::new(
                field,
                format!("`{this}` names no host"),
                URL_FIX,
            ));
        }
        let db = this.url.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u16>().is_err() {
            return Err(ConfigError::new(
                field,
                format!("`{this}` selects the database `{db}`, which is not a number"),
                "put the database number after the host, e.g. redis://localhost:6379/2",
            ));
        }
        // redis-rs reads `user` and `pass` from the query of socket URLs
        // only: on a TCP URL they would be dropped without a word, and the
        // connection would go out unauthenticated.
        if let Some((key, _)) = this
            .url
            .query_pairs()
            .find(|(key, _)| key == "user" || is_secret_query_key(key))
        {
            return Err(ConfigError::new(
                field,
                format!(
                    "`{this}` gives `{key}` as a query parameter, which the Redis client \
                     reads only from Unix socket URLs"
                ),
                "put the credentials before the host: redis://user:password@host:6379",
            ));
        }
        this.checked_by_redis(field)
    }

    fn checked_by_redis(self, field: &'static str) -> Result<Self, ConfigError> {
        redis::Client::open(self.url.as_str())
            .map(|_| self.clone())
            .map_err(|e| {
                ConfigError::new(
                    field,
                    format!("`{self}` is rejected by the Redis client ({e})"),
                    URL_FIX,
                )
            })
    }

    /// The database number the URL selects (0 when it names none): the
    /// path of a TCP URL, the `db` query parameter of a Unix socket URL.
    pub fn db(&self) -> u16 {
        if self.is_unix() {
            return self
                .url
                .query_pairs()
                .filter(|(key, _)| key == "db")
                .last()
                .and_then(|(_, db)| db.parse().ok())
                .unwrap_or(0);
        }
        self.url.path().trim_start_matches('/').parse().unwrap_or(0)
    }

    /// Whether the URL asks for TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.url.scheme(), "rediss" | "valkeys")
    }

    /// Whether the URL names a Unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(self.url.scheme(), "redis+unix" | "valkey+unix" | "unix")
    }

    /// Whether the URL turns certificate checks off (`rediss://…#insecure`):
    /// anyone on the path can then pose as Redis and read every password
    /// and value sent to it.
    pub fn skips_certificate_checks(&self) -> bool {
        self.is_tls() && self.url.fragment() == Some("insecure")
    }

    /// The full URL, password included: for handing to the Redis client only.
    pub(crate) fn expose(&self) -> &str {
        self.url.as_str()
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret_in_query = self
            .url
            .query_pairs()
            .any(|(key, _)| is_secret_query_key(&key));
        if self.url.password().is_none() && !secret_in_query {
            return f.write_str(self.url.as_str());
        }
        let mut shown = self.url.clone();
        if shown.password().is_some() {
            // Setting a password only fails for URLs that cannot have one.
            let _ = shown.set_password(Some("***"));
        }
        if secret_in_query {
            // Unix socket URLs carry the password as `?pass=…`.
            let pairs: Vec<(String, String)> = shown
                .query_pairs()
                .map(|(key, value)| {
                    let value = if is_secret_query_key(&key) {
                        "***".to_owned()
                    } else {
                        value.into_owned()
                    };
                    (key.into_owned(), value)
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        f.write_str(shown.as_str())
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Query parameters that hold a password: redis-rs reads `pass` (Unix
/// socket URLs); `password` is hidden too, in case someone writes that.
fn is_secret_query_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("pass") || key.eq_ignore_ascii_case("password")
}

/// Hides what could be a password in a URL that is not validated (or did
/// not parse): whatever sits between `://` and the last `@`, and the value
/// of every `pass` / `password` query parameter (keys percent-decoded).
/// Where the two overlap, the union is hidden, so an `@` or `&` inside a
/// password never uncovers part of it.
fn redact_unparsed(input: &str) -> String {
    let mut hidden: Vec<(usize, usize)> = Vec::new();
    if let (Some(start), Some(at)) = (input.find("://"), input.rfind('@'))
        && at > start + 3
    {
        hidden.push((start + 3, at));
    }
    if let Some(question) = input.find('?') {
        let mut offset = question + 1;
        for pair in input[question + 1..].split('&') {
            if let Some(equals) = pair.find('=') {
                let key = url::form_urlencoded::parse(&pair.as_bytes()[..equals])
                    .next()
                    .map(|(key, _)| key.into_owned())
                    .unwrap_or_default();
                if is_secret_query_key(&key) && equals + 1 < pair.len() {
                    hidden.push((offset + equals + 1, offset + pair.len()));
                }
            }
            offset += pair.len() + 1;
        }
    }
    if hidden.is_empty() {
        return input.to_owned();
    }
    hidden.sort_unstable();
    let mut shown = String::with_capacity(input.len());
    let mut cursor = 0;
    for (start, end) in hidden {
        if end <= cursor {
            continue;
        }
        if start > cursor {
            shown.push_str(&input[cursor..start]);
            shown.push_str("***");
        } else if cursor == 0 {
            shown.push_str("***");
        }
        cursor = end;
    }
    shown.push_str(&input[cursor..]);
    shown
}

/// The circuit breaker's thresholds and the recovery probe's pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures or timeouts that open the breaker. A refused
    /// connection opens it at once.
    pub failure_threshold: u32,
    /// First delay before probing an open breaker; doubled after each failed probe.
    pub probe_min_backoff: Duration,
    /// Largest delay between two probes.
    pub probe_max_backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            probe_min_backoff: Duration::from_millis(50),
            probe_max_backoff: Duration::from_secs(2),
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
}

/// CA certificates (PEM) that `rediss://` connections trust instead of the
/// built-in roots. Public data, but long: `Debug` shows only their size.
#[derive(Clone, PartialEq, Eq)]
struct RootCertificates(Vec<u8>);

impl fmt::Debug for RootCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootCertificates({} bytes of PEM)", self.0.len())
    }
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

    /// Reads `REDIS_CLUSTER_NODES` (comma-separated URLs) or else `REDIS_URL`,
    /// falling back to `redis://127.0.0.1:6379`.
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
}

/// Builds a [`RedisConfig`]; every problem is reported by [`build`](Self::build).
/// Its `Debug` output hides passwords, like [`RedisConfig`]'s.
#[derive(Clone)]
pub struct RedisConfigBuilder {
    url: Option<(&'static str, String)>,
    cluster_nodes: Option<(&'static str, Vec<String>)>,
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
        f.debug_struct("RedisConfigBuilder")
            .field("url", &url)
            .field("cluster_nodes", &cluster_nodes)
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
    /// A builder whose location comes from `REDIS_CLUSTER_NODES` or `REDIS_URL`.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut builder = Self::default();
        if let Some(nodes) = var("REDIS_CLUSTER_NODES")
            && !nodes.trim().is_empty()
        {
            builder.cluster_nodes = Some(("REDIS_CLUSTER_NODES", split_nodes(&nodes)));
            return builder;
        }
        if let Some(url) = var("REDIS_URL") {
            builder.url = Some(("REDIS_URL", url));
        }
        builder
    }

    /// A standalone server.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(("url", url.into()));
        self.cluster_nodes = None;
        self
    }

    /// Seed nodes of a Redis Cluster.
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
        self
    }

    /// The most connections in the standalone pool (1 to 1024, default 1).
    /// Each is multiplexed and an operation holds its pool slot only to clone
    /// the connection, so one carries most loads; raise it for very large
    /// values or a client with many cores (measure with the `core` bench).
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
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Consecutive failures that open the breaker (default 5).
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.breaker.failure_threshold = failures;
        self
    }

    /// Delays between recovery probes: starts at `min`, doubles up to `max`,
    /// with jitter (default 50 ms to 2 s).
    pub fn probe_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.breaker.probe_min_backoff = min;
        self.breaker.probe_max_backoff = max;
        self
    }

    /// The prefix of every key (default `tower-redis`), so several apps can
    /// share one Redis.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Refuse to start when Redis cannot be reached (default: start on the
    /// fallbacks and recover later).
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
        let topology = match (self.cluster_nodes, self.url) {
            (Some((field, nodes)), _) => {
                let nodes: Vec<&String> = nodes.iter().filter(|n| !n.is_empty()).collect();
                if nodes.is_empty() {
                    return Err(ConfigError::new(
                        field,
                        "lists no nodes",
                        "give at least one node URL, e.g. redis://10.0.0.1:6379,redis://10.0.0.2:6379",
                    ));
                }
                let mut parsed = Vec::with_capacity(nodes.len());
                for node in nodes {
                    let url = RedisUrl::parse(field, node)?;
                    if url.db() != 0 {
                        return Err(ConfigError::new(
                            field,
                            format!(
                                "node `{url}` selects database {}, but Redis Cluster only has database 0",
                                url.db()
                            ),
                            "remove the /db part from the cluster node URLs",
                        ));
                    }
                    parsed.push(url);
                }
                Topology::Cluster(parsed)
            }
            (None, Some((field, url))) => Topology::Standalone(RedisUrl::parse(field, &url)?),
            (None, None) => Topology::Standalone(RedisUrl::parse("url", DEFAULT_URL)?),
        };
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
        check_key_prefix(&self.key_prefix)?;
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
        })
    }
}

fn split_nodes(list: &str) -> Vec<String> {
    list.split([',', ' '])
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            if n.contains("://") {
                n.to_owned()
            } else {
                format!("redis://{n}")
            }
        })
        .collect()
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

const ROOTS_FIELD: &str = "tls_root_certificates";

#[cfg(not(feature = "tls"))]
fn check_tls_roots(_topology: &Topology, _pem: &[u8]) -> Result<(), ConfigError> {
    Err(ConfigError::new(
        ROOTS_FIELD,
        "is set, but this build does not include TLS",
        "enable the `tls` feature of tower-redis-core",
    ))
}

#[cfg(feature = "tls")]
fn check_tls_roots(topology: &Topology, pem: &[u8]) -> Result<(), ConfigError> {
    let urls: Vec<&RedisUrl> = match topology {
        Topology::Standalone(url) => vec![url],
        Topology::Cluster(nodes) => nodes.iter().collect(),
    };
    if !urls.iter().any(|url| url.is_tls()) {
        return Err(ConfigError::new(
            ROOTS_FIELD,
            "is set, but no Redis URL asks for TLS",
            "use rediss:// URLs, or drop the root certificates",
        ));
    }
    // The same parsing the connections use, so a bad file fails here.
    tls_certificates(pem).map_err(|problem| ConfigError::new(ROOTS_FIELD, problem, PEM_FIX))?;
    Ok(())
}

#[cfg(feature = "tls")]
const PEM_FIX: &str = "pass the CA certificate file's contents (PEM: -----BEGIN CERTIFICATE-----…)";

/// redis-rs' form of trusted roots, after checking they hold at least one
/// certificate that parses.
#[cfg(feature = "tls")]
pub(crate) fn tls_certificates(pem: &[u8]) -> Result<redis::TlsCertificates, String> {
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    };
    if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err("holds no PEM certificate".to_owned());
    }
    redis::Client::build_with_tls("rediss://localhost", certificates.clone())
        .map_err(|e| format!("cannot be read ({e})"))?;
    Ok(certificates)
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
    fn url_with_user_password_and_db_is_accepted() {
        let config =
            RedisConfig::from_url("redis://app:pa55@cache.internal:6380/3").expect("valid");
        let Topology::Standalone(url) = config.topology() else {
            panic!("standalone expected")
        };
        assert_eq!(url.db(), 3);
        assert_eq!(url.expose(), "redis://app:pa55@cache.internal:6380/3");
    }

    #[test]
    fn password_is_hidden_from_debug_display_and_errors() {
        let config = RedisConfig::from_url("redis://app:hunter2@localhost/1").expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
        let err = RedisConfig::from_url("redis://app:hunter2@local host/1").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn wrong_scheme_names_the_field_and_the_fix() {
        let err = RedisConfig::from_url("http://localhost:6379").unwrap_err();
        assert_eq!(err.field, "url");
        assert!(err.to_string().contains("redis://"), "{err}");
    }

    #[test]
    fn non_numeric_database_is_rejected() {
        let err = RedisConfig::from_url("redis://localhost/sessions").unwrap_err();
        assert!(err.problem.contains("sessions"), "{err}");
    }

    #[test]
    fn missing_host_is_rejected() {
        assert!(RedisConfig::from_url("redis://").is_err());
        assert!(RedisConfig::from_url("").is_err());
    }

    #[test]
    fn tls_url_without_tls_feature_says_which_feature() {
        let result = RedisConfig::from_url("rediss://localhost:6380");
        if cfg!(feature = "tls") {
            assert!(result.is_ok());
        } else {
            let err = result.unwrap_err();
            assert!(err.fix.contains("`tls` feature"), "{err}");
        }
    }

    #[test]
    fn cluster_nodes_accept_bare_host_port_from_env_syntax() {
        let nodes = split_nodes("10.0.0.1:7000, redis://10.0.0.2:7001");
        assert_eq!(nodes, ["redis://10.0.0.1:7000", "redis://10.0.0.2:7001"]);
        let config = RedisConfig::from_cluster_nodes(nodes).expect("valid");
        assert!(matches!(config.topology(), Topology::Cluster(n) if n.len() == 2));
    }

    #[test]
    fn cluster_rejects_databases_and_empty_lists() {
        assert_eq!(
            RedisConfig::from_cluster_nodes(["redis://a:7000/2"])
                .unwrap_err()
                .field,
            "cluster_nodes"
        );
        assert!(RedisConfig::from_cluster_nodes(Vec::<String>::new()).is_err());
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
    fn tls_root_certificates_need_tls() {
        let result = RedisConfig::builder()
            .url("redis://localhost:6379")
            .tls_root_certificates("-----BEGIN CERTIFICATE-----")
            .build();
        let err = result.unwrap_err();
        assert_eq!(err.field, "tls_root_certificates");
        if cfg!(feature = "tls") {
            assert!(err.fix.contains("rediss://"), "{err}");
        } else {
            assert!(err.fix.contains("`tls` feature"), "{err}");
        }
    }

    #[test]
    fn unix_socket_password_is_hidden_from_display() {
        let url = RedisUrl::parse(
            "url",
            "redis+unix:///run/redis.sock?user=app&pass=hunter2&db=4",
        )
        .expect("valid");
        assert_eq!(
            url.to_string(),
            "redis+unix:///run/redis.sock?user=app&pass=***&db=4"
        );
        assert_eq!(url.db(), 4);
        assert!(url.is_unix());
        assert!(url.expose().contains("hunter2"), "redis-rs still gets it");
    }

    #[test]
    fn redact_unparsed_hides_userinfo_and_query_passwords_even_when_they_overlap() {
        for (input, shown) in [
            ("redis://app:hunter2@local host", "redis://***@local host"),
            ("unix:///s?pass=hunter2&db=1", "unix:///s?pass=***&db=1"),
            ("unix:///s?db=1&PASS=hunter2", "unix:///s?db=1&PASS=***"),
            ("unix:///s?pa%73s=hunter2", "unix:///s?pa%73s=***"),
            ("unix:///s?password=hunter2#x", "unix:///s?password=***"),
            ("unix:///s?pass=hun@ter2", "unix://***"),
            ("redis://:hun?pass=ter2@host", "redis://***"),
            ("redis://:hun?ter2@host", "redis://***@host"),
            ("redis://host:6379", "redis://host:6379"),
            ("unix:///s?pass=", "unix:///s?pass="),
        ] {
            assert_eq!(redact_unparsed(input), shown, "{input}");
        }
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

    #[test]
    fn credentials_in_the_query_of_a_tcp_url_are_refused_not_dropped() {
        for url in [
            "redis://cache.internal?pass=hunter2",
            "redis://cache.internal/?user=app&pass=hunter2",
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert!(err.fix.contains("redis://user:password@host"), "{err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
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
