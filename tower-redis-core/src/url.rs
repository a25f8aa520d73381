//! Redis URLs: parsing and validation of every form redis-rs reads, hiding
//! passwords from `Debug`/`Display`, and cluster node lists.

use std::fmt;

use crate::error::ConfigError;

const URL_FIX: &str = "use redis://[user:password@]host[:port][/db], rediss:// for TLS, \
                       or redis+unix:///path/to/redis.sock[?user=…&pass=…&db=…] for a Unix socket";
pub(crate) const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// Where Redis runs: one server, or the seed nodes of a Redis Cluster.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// A single server (or a proxy in front of one), reached through a pool
    /// of multiplexed connections.
    Standalone(RedisUrl),
    /// A Redis Cluster, reached through the cluster client; the nodes are
    /// seeds, the client discovers the rest.
    Cluster(Vec<RedisUrl>),
    /// A primary with replicas watched by Redis Sentinel: the Sentinels are
    /// asked where the primary is at every new connection.
    Sentinel(SentinelTopology),
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topology::Standalone(url) => f.debug_tuple("Standalone").field(url).finish(),
            Topology::Cluster(nodes) => f.debug_tuple("Cluster").field(nodes).finish(),
            Topology::Sentinel(sentinel) => f.debug_tuple("Sentinel").field(sentinel).finish(),
        }
    }
}

/// A Sentinel deployment: the Sentinels to ask, the name they monitor the
/// primary under, and how to talk to the primary once found.
///
/// The Sentinel URLs carry the Sentinels' own credentials and TLS
/// (`redis://:sentinel-pass@10.0.0.1:26379`, `rediss://…`). The primary's
/// credentials, database and TLS come from `master`: a URL whose host and
/// port are replaced by the address the Sentinels name.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelTopology {
    sentinels: Vec<RedisUrl>,
    master_name: String,
    master: RedisUrl,
}

impl SentinelTopology {
    /// The Sentinels, asked in this order.
    pub fn sentinels(&self) -> &[RedisUrl] {
        &self.sentinels
    }

    /// The name the Sentinels monitor the primary under.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The URL whose scheme, credentials and database are used for the
    /// primary (its host and port are not used).
    pub fn master_url(&self) -> &RedisUrl {
        &self.master
    }

    /// The primary's URL at the address a Sentinel named.
    pub(crate) fn master_at(&self, host: &str, port: u16) -> Result<RedisUrl, String> {
        let mut url = self.master.url.clone();
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        url.set_host(Some(&host)).map_err(|e| {
            format!("the Sentinels named the host `{host}`, which is not valid ({e})")
        })?;
        url.set_port(Some(port))
            .map_err(|()| format!("cannot set the port {port}"))?;
        Ok(RedisUrl { url })
    }

    /// The primary's database, TLS and whether credentials are given, for logs.
    fn master_summary(&self) -> String {
        let mut parts = vec![format!("db {}", self.master.db())];
        if self.master.is_tls() {
            parts.push("TLS".to_owned());
        }
        if self.master.url.password().is_some() || !self.master.url.username().is_empty() {
            parts.push("with credentials".to_owned());
        }
        parts.join(", ")
    }
}

impl fmt::Display for SentinelTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sentinels: Vec<String> = self.sentinels.iter().map(ToString::to_string).collect();
        write!(
            f,
            "sentinel master `{}` via [{}] ({})",
            self.master_name,
            sentinels.join(", "),
            self.master_summary()
        )
    }
}

impl fmt::Debug for SentinelTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelTopology")
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("master", &self.master)
            .finish()
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

    /// `server.address` and `server.port` in OpenTelemetry's terms: the host
    /// and port (6379 unless given), or a Unix socket's path and no port.
    pub(crate) fn server(&self) -> (String, Option<u16>) {
        if self.is_unix() {
            return (self.url.path().to_owned(), None);
        }
        let host = self.url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (host.to_owned(), Some(self.url.port().unwrap_or(6379)))
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
pub(crate) fn redact_unparsed(input: &str) -> String {
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

/// Splits a `REDIS_CLUSTER_NODES` list (commas or spaces) into node URLs;
/// a bare `host:port` gets the `redis://` scheme.
pub(crate) fn split_nodes(list: &str) -> Vec<String> {
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

/// Validates the seed nodes of a cluster: at least one, each a valid URL
/// on database 0 (the only one Redis Cluster has).
pub(crate) fn parse_cluster_nodes(
    field: &'static str,
    nodes: &[String],
) -> Result<Vec<RedisUrl>, ConfigError> {
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
    Ok(parsed)
}

const SENTINEL_FIX: &str = "give the Sentinels as host:port or redis://[user:password@]host:port, \
                            e.g. REDIS_SENTINELS=10.0.0.1:26379,10.0.0.2:26379";

/// Validates a Sentinel configuration: at least one Sentinel (database 0,
/// TCP), a master name, and a master URL that is not a Unix socket.
pub(crate) fn parse_sentinel(
    field: &'static str,
    nodes: &[String],
    master_field: &'static str,
    master_name: Option<&str>,
    master_url_field: &'static str,
    master_url: &str,
) -> Result<SentinelTopology, ConfigError> {
    let nodes: Vec<&String> = nodes.iter().filter(|n| !n.is_empty()).collect();
    if nodes.is_empty() {
        return Err(ConfigError::new(field, "lists no Sentinels", SENTINEL_FIX));
    }
    let mut sentinels = Vec::with_capacity(nodes.len());
    for node in nodes {
        let url = RedisUrl::parse(field, node)?;
        if url.is_unix() || url.db() != 0 {
            return Err(ConfigError::new(
                field,
                format!("`{url}` is not a Sentinel address (a Unix socket or a /db part)"),
                SENTINEL_FIX,
            ));
        }
        sentinels.push(url);
    }
    let master_name = master_name.map(str::trim).unwrap_or_default();
    if master_name.is_empty() {
        return Err(ConfigError::new(
            master_field,
            "is not set",
            "name the primary as the Sentinels monitor it (`sentinel monitor <name> …`), \
             e.g. REDIS_SENTINEL_MASTER=mymaster",
        ));
    }
    if master_name.len() > 256
        || master_name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ConfigError::new(
            master_field,
            "is not a Sentinel master name",
            "use the name from `sentinel monitor <name> …`: no spaces, at most 256 bytes",
        ));
    }
    let master = RedisUrl::parse(master_url_field, master_url)?;
    if master.is_unix() {
        return Err(ConfigError::new(
            master_url_field,
            format!("`{master}` is a Unix socket, but the Sentinels name a TCP address"),
            "give the primary's credentials and database as redis://[user:password@]host[/db]",
        ));
    }
    Ok(SentinelTopology {
        sentinels,
        master_name: master_name.to_owned(),
        master,
    })
}

/// The Sentinel port a `redis+sentinel://` host without one gets.
const SENTINEL_PORT: u16 = 26379;

const SENTINEL_URL_FIX: &str = "write redis+sentinel://[user:password@]host1:port1,host2:port2/mastername[/db] \
                                (rediss+sentinel:// for TLS)";

/// Whether `url` is in the `redis+sentinel://` (or `rediss+sentinel://`) form.
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.trim_start()
        .split_once("://")
        .is_some_and(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("redis+sentinel")
                || scheme.eq_ignore_ascii_case("rediss+sentinel")
        })
}

/// Splits `redis+sentinel://[user:password@]host1:port1,host2:port2/mastername[/db]`
/// (`rediss+sentinel://` for TLS) into what [`parse_sentinel`] checks: the
/// Sentinels (`redis://host:port`, port 26379 when left out), the master
/// name, and the primary's URL (its credentials, database and TLS; the
/// host is replaced by the address the Sentinels name). Credentials in the
/// URL are the primary's; Sentinels that want their own are given with
/// [`RedisConfigBuilder::sentinels`](crate::RedisConfigBuilder::sentinels).
pub(crate) fn parse_sentinel_url(
    field: &'static str,
    url: &str,
) -> Result<SentinelTopology, ConfigError> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let tls = scheme.eq_ignore_ascii_case("rediss+sentinel");
    let data_scheme = if tls { "rediss" } else { "redis" };
    if rest.contains(['?', '#']) {
        return Err(ConfigError::new(
            field,
            "is a Sentinel URL with query parameters or a fragment, which are not supported",
            SENTINEL_URL_FIX,
        ));
    }
    // The credentials end at the last `@` before the first `/`.
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        // `host`, `host:port`, `[v6]`, `[v6]:port`.
        let has_port = match host.rfind(']') {
            Some(close) => host[close..].contains(':'),
            None => host.contains(':'),
        };
        nodes.push(if has_port {
            format!("{data_scheme}://{host}")
        } else {
            format!("{data_scheme}://{host}:{SENTINEL_PORT}")
        });
    }
    let mut segments = path.split('/');
    let master_name = segments.next().filter(|name| !name.is_empty());
    let db = match (segments.next(), segments.next()) {
        (None | Some(""), None) => "0",
        (Some(db), None) if db.parse::<u32>().is_ok() => db,
        _ => {
            return Err(ConfigError::new(
                field,
                "is a Sentinel URL whose path is not /mastername or /mastername/db",
                SENTINEL_URL_FIX,
            ));
        }
    };
    let credentials = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let master = format!("{data_scheme}://{credentials}127.0.0.1/{db}");
    parse_sentinel(field, &nodes, field, master_name, field, &master).map_err(|mut error| {
        if master_name.is_none() {
            error.fix = SENTINEL_URL_FIX.to_owned();
        }
        error
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisConfig;

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
    fn a_sentinel_url_names_the_sentinels_the_master_and_the_primary_settings() {
        let topology = parse_sentinel_url(
            "url",
            "redis+sentinel://app:hunter2@10.0.0.1:26380,10.0.0.2,[::1]:5000/mymaster/3",
        )
        .expect("valid");
        let sentinels: Vec<String> = topology
            .sentinels()
            .iter()
            .map(|u| u.expose().to_owned())
            .collect();
        assert_eq!(sentinels.len(), 3);
        assert!(sentinels[0].contains("10.0.0.1:26380"), "{sentinels:?}");
        assert!(
            sentinels[1].contains("10.0.0.2:26379"),
            "default port: {sentinels:?}"
        );
        assert!(sentinels[2].contains("[::1]:5000"), "{sentinels:?}");
        assert_eq!(topology.master_name(), "mymaster");
        assert_eq!(topology.master_url().db(), 3);
        let at = topology.master_at("10.0.0.9", 6379).expect("address");
        assert!(
            at.expose().starts_with("redis://app:hunter2@10.0.0.9:6379"),
            "{}",
            at.expose()
        );
        assert!(!topology.to_string().contains("hunter2"), "{topology}");

        #[cfg(feature = "tls")]
        {
            let tls = parse_sentinel_url("url", "rediss+sentinel://s1:26379/m").expect("valid");
            assert!(tls.master_url().is_tls());
            assert_eq!(tls.master_url().db(), 0);
        }
        assert!(is_sentinel_url("REDIS+SENTINEL://s1/m"));
        assert!(!is_sentinel_url("redis://s1/0"));
    }

    #[test]
    fn a_bad_sentinel_url_says_how_to_write_one_without_echoing_the_password() {
        for bad in [
            "redis+sentinel://:pw-secret@s1:26379",
            "redis+sentinel://:pw-secret@s1:26379/",
            "redis+sentinel://:pw-secret@/mymaster",
            "redis+sentinel://:pw-secret@s1/mymaster/x",
            "redis+sentinel://:pw-secret@s1/mymaster/1/2",
            "redis+sentinel://:pw-secret@s1/mymaster?db=1",
            "redis+sentinel://:pw-secret@s1/my master",
        ] {
            let error = parse_sentinel_url("url", bad).expect_err(bad);
            assert_eq!(error.field, "url", "{bad}");
            assert!(!error.to_string().contains("pw-secret"), "{bad}: {error}");
        }
    }
}
