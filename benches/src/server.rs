//! The Redis the suites run against, and the server-side counters they read.

use std::collections::{BTreeMap, HashMap};

use tower_redis_core::redis::{self, aio::MultiplexedConnection};
use tower_redis_core::testing::{Backend, TestRedis};

use crate::cpu::CpuSnapshot;
use crate::error::BenchError;

/// A Redis to benchmark against: `REDIS_URL` when set, otherwise a
/// disposable server from [`TestRedis`], kept alive as long as this is.
pub(crate) struct BenchRedis {
    url: String,
    origin: String,
    client: redis::Client,
    /// One long-lived connection for setup and `INFO`: opening a connection
    /// sends commands (`CLIENT SETINFO`), which would pollute command counts.
    admin: MultiplexedConnection,
    test: Option<TestRedis>,
}

impl BenchRedis {
    /// Connects to `REDIS_URL`, or starts a test Redis.
    pub(crate) async fn start() -> Result<Self, BenchError> {
        let (url, origin, test) = match std::env::var("REDIS_URL") {
            Ok(url) if !url.trim().is_empty() => {
                let origin = format!("REDIS_URL={}", redact(&url));
                (url, origin, None)
            }
            _ => {
                let test = TestRedis::builder().start().await?;
                let origin = match test.backend() {
                    Backend::Binary => {
                        format!("redis-server spawned by TestRedis at {}", test.url())
                    }
                    Backend::Docker => {
                        format!("redis container started by TestRedis at {}", test.url())
                    }
                    Backend::Url => format!("TestRedis URL backend at {}", redact(test.url())),
                };
                (test.url().to_owned(), origin, Some(test))
            }
        };
        let client = redis::Client::open(url.as_str())?;
        let admin = client.get_multiplexed_async_connection().await?;
        Ok(Self {
            url,
            origin,
            client,
            admin,
            test,
        })
    }

    /// A private server that this run may kill and restart (the degraded-mode
    /// sections): a [`TestRedis`] on the binary or Docker backend. `None`
    /// when only the `REDIS_URL` backend is available, which cannot be stopped.
    pub(crate) async fn dedicated() -> Result<Option<Self>, BenchError> {
        let test = TestRedis::builder().start().await?;
        if test.backend() == Backend::Url {
            return Ok(None);
        }
        let url = test.url().to_owned();
        let client = redis::Client::open(url.as_str())?;
        let admin = client.get_multiplexed_async_connection().await?;
        Ok(Some(Self {
            origin: format!("private TestRedis at {url}"),
            url,
            client,
            admin,
            test: Some(test),
        }))
    }

    /// SIGKILLs a [`dedicated`](Self::dedicated) server.
    pub(crate) async fn kill(&self) -> Result<(), BenchError> {
        let test = self.stoppable()?;
        test.kill().await;
        Ok(())
    }

    /// Starts a killed [`dedicated`](Self::dedicated) server again on the
    /// same port (it comes back empty) and reopens the setup connection.
    pub(crate) async fn restart(&mut self) -> Result<(), BenchError> {
        self.stoppable()?.restart().await;
        self.admin = self.client.get_multiplexed_async_connection().await?;
        Ok(())
    }

    fn stoppable(&self) -> Result<&TestRedis, BenchError> {
        match &self.test {
            Some(test) if test.backend() != Backend::Url => Ok(test),
            _ => Err(BenchError::Check(
                "this Redis cannot be stopped (REDIS_URL); the degraded-mode figures need a TestRedis".to_owned(),
            )),
        }
    }

    /// `used_memory` of `INFO memory`, in bytes.
    pub(crate) async fn used_memory(&self) -> Result<u64, BenchError> {
        let memory = self.info("memory").await?;
        info_field(&memory, "used_memory")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| BenchError::Check("INFO memory has no used_memory".to_owned()))
    }

    /// `DBSIZE`.
    pub(crate) async fn dbsize(&self) -> Result<u64, BenchError> {
        Ok(redis::cmd("DBSIZE").query_async(&mut self.admin()).await?)
    }

    /// `MEMORY USAGE <key> SAMPLES 0` (every element counted) of up to
    /// `count` keys matching `pattern`: the keys' sizes, in bytes.
    pub(crate) async fn memory_usage_sample(
        &self,
        pattern: &str,
        count: usize,
    ) -> Result<Vec<u64>, BenchError> {
        let mut conn = self.admin();
        let mut cursor: u64 = 0;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(found);
            if next == 0 || keys.len() >= count {
                break;
            }
            cursor = next;
        }
        keys.truncate(count);
        let mut sizes = Vec::with_capacity(keys.len());
        for key in keys {
            let size: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut conn)
                .await?;
            sizes.extend(size);
        }
        Ok(sizes)
    }

    /// The server's URL (may hold a password: do not print it).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// A redis-rs client for this server.
    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The shared setup connection (a cheap clone).
    pub(crate) fn admin(&self) -> MultiplexedConnection {
        self.admin.clone()
    }

    /// `INFO <section>` as text.
    pub(crate) async fn info(&self, section: &str) -> Result<String, BenchError> {
        let mut conn = self.admin();
        Ok(redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await?)
    }

    /// Calls per command so far, from `INFO commandstats`.
    pub(crate) async fn command_calls(&self) -> Result<CommandCalls, BenchError> {
        Ok(CommandCalls::parse(&self.info("commandstats").await?))
    }

    /// CPU counters now: this process, the machine, and this server.
    pub(crate) async fn cpu_snapshot(&self) -> Result<CpuSnapshot, BenchError> {
        let redis = self.cpu_seconds().await?;
        Ok(CpuSnapshot::now(redis, self.test.is_some()))
    }

    /// CPU time the Redis server has used since it started, user + system
    /// (`INFO cpu`; the system part includes its sockets' kernel work).
    async fn cpu_seconds(&self) -> Result<f64, BenchError> {
        let cpu = self.info("cpu").await?;
        let field = |name: &str| info_field(&cpu, name).and_then(|v| v.parse::<f64>().ok());
        match (field("used_cpu_user"), field("used_cpu_sys")) {
            (Some(user), Some(sys)) => Ok(user + sys),
            _ => Err(BenchError::Check(
                "INFO cpu has no used_cpu_user / used_cpu_sys".to_owned(),
            )),
        }
    }

    /// Connections the server has accepted since it started (`INFO stats`),
    /// to catch a client that opens connections on the request path.
    pub(crate) async fn connections_received(&self) -> Result<u64, BenchError> {
        let stats = self.info("stats").await?;
        info_field(&stats, "total_connections_received")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                BenchError::Check("INFO stats has no total_connections_received".to_owned())
            })
    }

    /// One line: CPUs, OS, Redis version and where Redis runs.
    pub(crate) async fn machine_description(&self) -> Result<String, BenchError> {
        let server = self.info("server").await?;
        let version = info_field(&server, "redis_version").unwrap_or("unknown");
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                info_field(&text.replace('\t', ""), "model name").map(|s| s.trim().to_owned())
            })
            .map(|model| format!(" ({model})"))
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| format!(" {}", r.trim()))
            .unwrap_or_default();
        Ok(format!(
            "machine: nproc={cpus}{model}, {os}{kernel}; Redis {version} ({origin}, on the same machine); \
             tokio multi-thread runtime, {cpus} workers",
            os = std::env::consts::OS,
            origin = self.origin,
        ))
    }
}

/// `name:value` from `INFO`-style text.
fn info_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// `redis://user:secret@host` → `redis://***@host`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Calls and time per command name (`get`, `client|setinfo`, ...) from
/// `INFO commandstats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CommandCalls(HashMap<String, CommandStat>);

/// One command's counters in `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CommandStat {
    /// Times the command ran.
    pub(crate) calls: u64,
    /// Server CPU time spent in it, in µs (for `EVALSHA`, including the
    /// commands its script runs).
    pub(crate) usec: u64,
}

impl CommandCalls {
    /// Reads `cmdstat_<name>:calls=<n>,usec=<n>,...` lines.
    pub(crate) fn parse(info: &str) -> Self {
        let calls = info
            .lines()
            .filter_map(|line| {
                let (name, stats) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |key: &str| {
                    stats
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                        .and_then(|n| n.parse().ok())
                };
                let stat = CommandStat {
                    calls: field("calls")?,
                    usec: field("usec").unwrap_or(0),
                };
                Some((name.to_ascii_lowercase(), stat))
            })
            .collect();
        Self(calls)
    }

    /// Counters per command since `before`, by name, leaving out the
    /// harness's own commands (`INFO`, `CONFIG ...`) and commands not called.
    pub(crate) fn deltas(&self, before: &CommandCalls) -> BTreeMap<String, CommandStat> {
        self.0
            .iter()
            .filter(|(name, _)| !is_harness_command(name))
            .map(|(name, now)| {
                let then = before.0.get(name).copied().unwrap_or_default();
                let delta = CommandStat {
                    calls: now.calls.saturating_sub(then.calls),
                    usec: now.usec.saturating_sub(then.usec),
                };
                (name.clone(), delta)
            })
            .filter(|(_, delta)| delta.calls > 0)
            .collect()
    }
}

fn is_harness_command(name: &str) -> bool {
    let base = name.split('|').next().unwrap_or(name);
    base == "info" || base == "config"
}

/// Commands a client sends to open or check a connection (`PING` of the
/// manager's probe, `CLIENT SETINFO`, `HELLO`, ...) rather than for a
/// request: what the recovery timer must not take for a Redis-served request.
pub(crate) fn is_connection_command(name: &str) -> bool {
    let base = name.split('|').next().unwrap_or(name);
    matches!(base, "ping" | "client" | "hello" | "select" | "auth")
}

/// What [`Monitor`](tower_redis_core::testing::Monitor) saw a client send,
/// less the connection upkeep ([`is_connection_command`]): a pool checks a
/// connection with a `PING` about once a second whatever the load, which
/// falls into a window of requests now and then (two in 50 hits of 1 MiB)
/// and is no request's round trip.
pub(crate) async fn requests_sent(
    monitor: tower_redis_core::testing::Monitor,
) -> Result<Vec<String>, tower_redis_core::testing::TestRedisError> {
    let mut sent = monitor.stop().await?;
    sent.retain(|name| !is_connection_command(name));
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool's `PING` (and a connection's `CLIENT` / `HELLO`) in a window
    /// of requests is not counted as theirs; every other command is.
    #[tokio::test]
    async fn connection_upkeep_is_not_a_request_s_command() {
        let redis = tower_redis_core::testing::TestRedis::start().await;
        let mut conn = redis.connection().await.expect("connection");
        let monitor = tower_redis_core::testing::Monitor::start(&redis.client())
            .await
            .expect("monitor");
        for command in [
            redis::cmd("PING"),
            redis::cmd("GET").arg("k").clone(),
            redis::cmd("CLIENT").arg("ID").clone(),
            redis::cmd("GET").arg("k").clone(),
        ] {
            let _: redis::Value = command.query_async(&mut conn).await.expect("answered");
        }
        assert_eq!(
            requests_sent(monitor).await.expect("watched"),
            ["get", "get"]
        );
    }

    const BEFORE: &str = "# Commandstats\r\n\
        cmdstat_get:calls=10,usec=20,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n";
    const AFTER: &str = "# Commandstats\r\n\
        cmdstat_get:calls=110,usec=220,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_ping:calls=2,usec=2,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_client|setinfo:calls=4,usec=4,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_config|resetstat:calls=1,usec=9,usec_per_call=9.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=5,usec=150,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n";

    #[test]
    fn counts_deltas_without_harness_commands() {
        let before = CommandCalls::parse(BEFORE);
        let after = CommandCalls::parse(AFTER);
        let deltas = after.deltas(&before);
        assert_eq!(deltas.values().map(|s| s.calls).sum::<u64>(), 100 + 2 + 4);
        assert_eq!(
            deltas.get("get"),
            Some(&CommandStat {
                calls: 100,
                usec: 200
            })
        );
        assert_eq!(deltas.get("client|setinfo").map(|s| s.calls), Some(4));
        assert!(!deltas.contains_key("info") && !deltas.contains_key("config|resetstat"));
    }

    #[test]
    fn reads_info_fields_and_redacts() {
        assert_eq!(
            info_field("# Server\r\nredis_version:7.0.15\r\n", "redis_version"),
            Some("7.0.15")
        );
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
