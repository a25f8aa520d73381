//! Real Redis servers for tests: isolated, disposable, and breakable.
//!
//! [`TestRedis::start`] picks a backend in this order, unless
//! `TOWER_REDIS_TEST_BACKEND=docker|binary|url` forces one:
//!
//! 1. `docker` (with the `testing-docker` feature, when a Docker daemon
//!    answers): a `redis:7.2` container through testcontainers;
//! 2. `binary`: a `redis-server` from `PATH` (or `REDIS_SERVER_BIN`) on a
//!    free port in a temporary directory, killed when the handle drops;
//! 3. `url`: the server at `REDIS_URL`, shared and not breakable.
//!
//! A server on the default port 6379 is never used unless `REDIS_URL` names
//! it and no other backend exists.
//!
//! ```no_run
//! use tower_redis_core::{RedisManager, testing::TestRedis};
//!
//! # async fn demo() {
//! let redis = TestRedis::start().await;
//! let manager = RedisManager::connect(redis.config().build().unwrap()).await.unwrap();
//! redis.pause().await;        // SIGSTOP: commands time out
//! redis.resume().await;
//! redis.kill().await;         // SIGKILL
//! redis.restart().await;      // same port, empty data
//! # drop(manager);
//! # }
//! ```

mod acl;
mod cluster;
#[cfg(feature = "testing-docker")]
mod docker;
mod monitor;
mod process;
mod sentinel;
mod slow;
mod traces;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

pub use cluster::TestCluster;
pub use monitor::Monitor;
use process::{ServerProcess, find_binary, free_port};
pub use sentinel::{SentinelEvents, TestSentinel};
pub use traces::{Fields, Traces, field, install_subscriber};

use crate::RedisConfigBuilder;

/// Why a test Redis could not be started or controlled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestRedisError {
    /// No way to get a Redis server on this machine.
    #[error(
        "no Redis available for tests: install a redis-server binary (Debian/Ubuntu: \
         `apt-get install redis-server redis-tools`, macOS: `brew install redis`), \
         or run a Docker daemon and enable the `testing-docker` feature, \
         or set REDIS_URL to a disposable server"
    )]
    NoBackend,
    /// `TOWER_REDIS_TEST_BACKEND` names something unknown or unusable.
    #[error("TOWER_REDIS_TEST_BACKEND={0}: {1}")]
    BadBackend(String, String),
    /// The process could not be started.
    #[error("cannot start redis-server: {0}")]
    Spawn(String),
    /// The server exited during startup.
    #[error(
        "redis-server on port {port} exited during startup ({status}); its log ends with:\n{log}"
    )]
    Exited {
        /// The port it was given.
        port: u16,
        /// Its exit status.
        status: String,
        /// The last lines of its log.
        log: String,
    },
    /// The server did not answer PING in time.
    #[error("redis-server on port {port} did not answer PING within 15 s")]
    NotReady {
        /// The port it was given.
        port: u16,
    },
    /// `redis-cli --cluster create` failed.
    #[error("cannot create the test cluster: {0}")]
    Cluster(String),
    /// A Docker or testcontainers failure.
    #[error("docker backend: {0}")]
    Docker(String),
    /// A Redis command used by the harness itself failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A [`Monitor`] could not watch the server.
    #[error("MONITOR: {0}")]
    Monitor(String),
    /// A socket the harness opened itself failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Which kind of server a [`TestRedis`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A testcontainers `redis:7` container.
    Docker,
    /// A `redis-server` child process.
    Binary,
    /// A server someone else runs, at `REDIS_URL`.
    Url,
}

/// A real Redis server for one test.
pub struct TestRedis {
    url: String,
    server: Server,
}

enum Server {
    Process {
        process: ServerProcess,
        _dir: tempfile::TempDir,
    },
    #[cfg(feature = "testing-docker")]
    Docker(Box<docker::DockerRedis>),
    Url,
}

impl std::fmt::Debug for TestRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRedis")
            .field("url", &self.url)
            .field("backend", &self.backend())
            .finish()
    }
}

/// Options for [`TestRedis`]: extra `redis-server` arguments, a forced backend.
#[derive(Debug, Clone, Default)]
pub struct TestRedisBuilder {
    args: Vec<String>,
    backend: Option<Backend>,
    tls: bool,
}

/// The files of a TLS test server, in PEM: its certificate and key, and the
/// CA that issued the certificate. See [`TestRedisBuilder::tls`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate (`--tls-cert-file`).
    pub cert: PathBuf,
    /// The server's private key (`--tls-key-file`).
    pub key: PathBuf,
    /// The CA certificate (`--tls-ca-cert-file`).
    pub ca: PathBuf,
}

impl TestRedisBuilder {
    /// Serves TLS only: `--port 0 --tls-port <port>` with these files, and no
    /// client certificates asked for (`--tls-auth-clients no`). The server's
    /// [`url`](TestRedis::url) is then `rediss://127.0.0.1:<port>`, so the
    /// certificate must name `127.0.0.1`. The harness's own helpers
    /// ([`client`](TestRedis::client) and those using it) do not know the CA:
    /// talk to the server through a manager configured with
    /// [`tls_root_certificates`](crate::RedisConfigBuilder::tls_root_certificates).
    /// Binary backend only; the `redis-server` must be built with TLS.
    pub fn tls(mut self, files: &TlsFiles) -> Self {
        self.tls = true;
        self.backend = Some(Backend::Binary);
        for (flag, path) in [
            ("--tls-cert-file", &files.cert),
            ("--tls-key-file", &files.key),
            ("--tls-ca-cert-file", &files.ca),
        ] {
            self.args.push(flag.to_owned());
            self.args.push(path.display().to_string());
        }
        self.args.push("--tls-auth-clients".to_owned());
        self.args.push("no".to_owned());
        self
    }

    /// Adds one `redis-server` argument (e.g. `"--maxmemory"`, then `"1mb"`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Uses this backend whatever the environment says.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Starts the server and waits until it answers.
    pub async fn start(self) -> Result<TestRedis, TestRedisError> {
        let backend = match self.backend {
            Some(backend) => backend,
            None => choose_backend()?,
        };
        match backend {
            Backend::Binary => {
                let binary = redis_server_binary().ok_or(TestRedisError::NoBackend)?;
                let dir = tempfile::Builder::new()
                    .prefix("tower-redis-test-")
                    .tempdir()
                    .map_err(|e| TestRedisError::Spawn(format!("temporary directory: {e}")))?;
                let mut last_error = None;
                // A port found free can be taken by a parallel test before
                // the server binds it: try a few.
                for _ in 0..5 {
                    let port = free_port(false)?;
                    match ServerProcess::spawn(
                        binary.clone(),
                        dir.path().to_owned(),
                        port,
                        self.args.clone(),
                        self.tls,
                    )
                    .await
                    {
                        Ok(process) => {
                            let scheme = if self.tls { "rediss" } else { "redis" };
                            return Ok(TestRedis {
                                url: format!("{scheme}://127.0.0.1:{port}"),
                                server: Server::Process { process, _dir: dir },
                            });
                        }
                        Err(error @ TestRedisError::Exited { .. }) => last_error = Some(error),
                        Err(error) => return Err(error),
                    }
                }
                Err(last_error.unwrap_or(TestRedisError::NoBackend))
            }
            Backend::Url => {
                let url = std::env::var("REDIS_URL").map_err(|_| {
                    TestRedisError::BadBackend("url".to_owned(), "REDIS_URL is not set".to_owned())
                })?;
                Ok(TestRedis {
                    url,
                    server: Server::Url,
                })
            }
            Backend::Docker => start_docker(&self.args).await,
        }
    }
}

#[cfg(feature = "testing-docker")]
async fn start_docker(args: &[String]) -> Result<TestRedis, TestRedisError> {
    let docker = docker::DockerRedis::start(args).await?;
    Ok(TestRedis {
        url: docker.url(),
        server: Server::Docker(Box::new(docker)),
    })
}

#[cfg(not(feature = "testing-docker"))]
async fn start_docker(_args: &[String]) -> Result<TestRedis, TestRedisError> {
    Err(TestRedisError::BadBackend(
        "docker".to_owned(),
        "enable the `testing-docker` feature of tower-redis-core".to_owned(),
    ))
}

fn choose_backend() -> Result<Backend, TestRedisError> {
    if let Ok(forced) = std::env::var("TOWER_REDIS_TEST_BACKEND") {
        return match forced.trim() {
            "docker" => Ok(Backend::Docker),
            "binary" => Ok(Backend::Binary),
            "url" => Ok(Backend::Url),
            other => Err(TestRedisError::BadBackend(
                other.to_owned(),
                "use docker, binary or url".to_owned(),
            )),
        };
    }
    if cfg!(feature = "testing-docker") && docker_answers() {
        return Ok(Backend::Docker);
    }
    if redis_server_binary().is_some() {
        return Ok(Backend::Binary);
    }
    if std::env::var_os("REDIS_URL").is_some() {
        return Ok(Backend::Url);
    }
    Err(TestRedisError::NoBackend)
}

/// True when a Docker daemon answers (not merely when the client is installed).
fn docker_answers() -> bool {
    let Some(docker) = find_binary("docker") else {
        return false;
    };
    std::process::Command::new(docker)
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn redis_server_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("REDIS_SERVER_BIN") {
        return Some(PathBuf::from(path));
    }
    find_binary("redis-server")
}

impl TestRedis {
    /// Starts a server with the default backend, or panics with a message that
    /// says how to get one.
    pub async fn start() -> Self {
        match Self::builder().start().await {
            Ok(redis) => redis,
            Err(error) => panic!("{error}"),
        }
    }

    /// Options: extra server arguments, a forced backend.
    pub fn builder() -> TestRedisBuilder {
        TestRedisBuilder::default()
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` for a [TLS](TestRedisBuilder::tls) server).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which backend runs the server.
    pub fn backend(&self) -> Backend {
        match self.server {
            Server::Process { .. } => Backend::Binary,
            #[cfg(feature = "testing-docker")]
            Server::Docker(_) => Backend::Docker,
            Server::Url => Backend::Url,
        }
    }

    /// A configuration for this server with test-friendly pacing: a fast
    /// recovery probe, so tests of recovery finish quickly.
    pub fn config(&self) -> RedisConfigBuilder {
        crate::RedisConfig::builder()
            .url(self.url.clone())
            .probe_backoff(Duration::from_millis(20), Duration::from_millis(200))
    }

    /// A direct client, bypassing the manager, for setting up and checking.
    pub fn client(&self) -> redis::Client {
        match redis::Client::open(self.url.as_str()) {
            Ok(client) => client,
            Err(error) => panic!("test Redis URL {} is invalid: {error}", self.url),
        }
    }

    /// A direct connection, bypassing the manager.
    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, TestRedisError> {
        Ok(self.client().get_multiplexed_async_connection().await?)
    }

    /// The time to live of `key` in milliseconds (`PTTL`: -1 without one,
    /// -2 when it does not exist).
    pub async fn pttl(&self, key: &str) -> Result<i64, TestRedisError> {
        let mut conn = self.connection().await?;
        Ok(redis::cmd("PTTL").arg(key).query_async(&mut conn).await?)
    }

    /// How many clients subscribe to `channel` (`PUBSUB NUMSUB`).
    pub async fn subscribers(&self, channel: &str) -> Result<u64, TestRedisError> {
        let mut conn = self.connection().await?;
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    /// Redis' own clock (`TIME`), in milliseconds since the epoch: the
    /// clock the layers' scripts stamp entries and marks with.
    pub async fn time_ms(&self) -> Result<u64, TestRedisError> {
        let mut conn = self.connection().await?;
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Calls per command since the last [`reset_stats`](Self::reset_stats),
    /// from `INFO commandstats` (lower-case names such as `get`, `evalsha`).
    pub async fn command_calls(&self) -> Result<HashMap<String, u64>, TestRedisError> {
        let mut conn = self.connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await?;
        Ok(parse_commandstats(&info))
    }

    /// `CONFIG SET name value`: changes a setting of the running server.
    pub async fn config_set(&self, name: &str, value: &str) -> Result<(), TestRedisError> {
        let mut conn = self.connection().await?;
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// `CONFIG RESETSTAT`: zeroes the command counters.
    pub async fn reset_stats(&self) -> Result<(), TestRedisError> {
        let mut conn = self.connection().await?;
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// `CLIENT KILL <filter> <value> SKIPME yes`: closes the client
    /// connections that match (`"TYPE", "pubsub"`, `"ID", "12"`, …) but
    /// the one that asks, and answers how many it closed.
    pub async fn kill_clients(&self, filter: &str, value: &str) -> Result<u64, TestRedisError> {
        let mut conn = self.connection().await?;
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg(filter)
            .arg(value)
            .arg("SKIPME")
            .arg("yes")
            .query_async(&mut conn)
            .await?;
        Ok(killed)
    }

    /// `FLUSHALL`.
    pub async fn flush_all(&self) -> Result<(), TestRedisError> {
        let mut conn = self.connection().await?;
        redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Whether the server process is up (always true for the URL backend).
    pub fn is_running(&self) -> bool {
        match &self.server {
            Server::Process { process, .. } => process.is_running(),
            #[cfg(feature = "testing-docker")]
            Server::Docker(docker) => docker.is_running(),
            Server::Url => true,
        }
    }

    /// SIGKILL the server. Panics on the URL backend, which cannot be broken.
    pub async fn kill(&self) {
        match &self.server {
            Server::Process { process, .. } => process.kill(),
            #[cfg(feature = "testing-docker")]
            Server::Docker(docker) => docker
                .kill()
                .await
                .unwrap_or_else(|e| panic!("cannot kill the test Redis: {e}")),
            Server::Url => unbreakable("kill"),
        }
    }

    /// Shut the server down gracefully (SIGTERM).
    pub async fn stop(&self) {
        match &self.server {
            Server::Process { process, .. } => process.stop(),
            #[cfg(feature = "testing-docker")]
            Server::Docker(docker) => docker
                .stop()
                .await
                .unwrap_or_else(|e| panic!("cannot stop the test Redis: {e}")),
            Server::Url => unbreakable("stop"),
        }
    }

    /// SIGSTOP: connections stay open, nothing is answered.
    pub async fn pause(&self) {
        match &self.server {
            Server::Process { process, .. } => process.pause(),
            #[cfg(feature = "testing-docker")]
            Server::Docker(docker) => docker
                .pause()
                .await
                .unwrap_or_else(|e| panic!("cannot pause the test Redis: {e}")),
            Server::Url => unbreakable("pause"),
        }
    }

    /// Holds writes only (`CLIENT PAUSE 30000 WRITE`): reads are answered,
    /// while writes and scripts wait (for up to 30 s, or until
    /// [`resume_writes`](Self::resume_writes)). Panics if it cannot.
    pub async fn pause_writes(&self) {
        self.client_command(redis::cmd("CLIENT").arg("PAUSE").arg(30_000).arg("WRITE"))
            .await;
    }

    /// Answers the writes held by [`pause_writes`](Self::pause_writes).
    pub async fn resume_writes(&self) {
        self.client_command(redis::cmd("CLIENT").arg("UNPAUSE"))
            .await;
    }

    async fn client_command(&self, command: &redis::Cmd) {
        let mut conn = self
            .connection()
            .await
            .unwrap_or_else(|e| panic!("cannot reach the test Redis: {e}"));
        let () = command
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("the test Redis refused {command:?}: {e}"));
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub async fn resume(&self) {
        match &self.server {
            Server::Process { process, .. } => process.resume(),
            #[cfg(feature = "testing-docker")]
            Server::Docker(docker) => docker
                .resume()
                .await
                .unwrap_or_else(|e| panic!("cannot resume the test Redis: {e}")),
            Server::Url => unbreakable("resume"),
        }
    }

    /// Starts the server again on the same port (stopping it first if it
    /// runs); it comes back empty. Panics if it cannot.
    pub async fn restart(&self) {
        let result = match &self.server {
            Server::Process { process, .. } => {
                process.stop();
                process.start().await
            }
            #[cfg(feature = "testing-docker")]
            Server::Docker(docker) => docker.restart().await,
            Server::Url => unbreakable("restart"),
        };
        if let Err(error) = result {
            panic!("cannot restart the test Redis: {error}");
        }
    }
}

fn unbreakable(what: &str) -> ! {
    panic!(
        "cannot {what} a Redis reached through REDIS_URL; use the binary or docker backend for fault tests"
    )
}

pub(crate) fn parse_commandstats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// Waits until `manager`'s breaker is in `state`, and panics with the
/// manager's health if it is not within `within`: a breaker that never gets
/// there fails the test instead of hanging it.
pub async fn wait_for_breaker(
    manager: &crate::RedisManager,
    state: crate::BreakerState,
    within: Duration,
) {
    let mut states = manager.subscribe();
    let reached = tokio::time::timeout(within, states.wait_for(|s| *s == state)).await;
    assert!(
        matches!(reached, Ok(Ok(_))),
        "breaker did not reach {state} within {within:?}; health: {:?}",
        manager.health()
    );
}

/// Waits until `manager`'s client-tracking connection is live (the layers'
/// near tiers are used from then on), and panics if it is not within
/// `within` or the manager has no tracking (a Cluster).
pub async fn wait_for_tracking(manager: &crate::RedisManager, within: Duration) {
    let tracking = manager
        .tracking()
        .expect("client tracking on a standalone or Sentinel manager");
    let live = tokio::time::timeout(within, async {
        while !tracking.is_live() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        live.is_ok(),
        "tracking did not come up within {within:?}; health: {:?}",
        manager.health()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_are_parsed_per_command() {
        let info = "# Commandstats\r\ncmdstat_get:calls=3,usec=10,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\n\
                    cmdstat_evalsha:calls=1,usec=5\r\n";
        let calls = parse_commandstats(info);
        assert_eq!(calls.get("get"), Some(&3));
        assert_eq!(calls.get("evalsha"), Some(&1));
        assert_eq!(calls.get("ping"), None);
    }
}
