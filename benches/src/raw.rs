//! The physical-limit baselines of every table: the same Redis commands a
//! layer makes per request, issued without HTTP and without a layer —
//! through a bare redis-rs `MultiplexedConnection` (or, in `core`, through
//! `RedisManager`) — and Redis' own `redis-benchmark` at the same concurrency.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_redis_core::RedisManager;
use tower_redis_core::redis::{self, Cmd, ConnectionAddr, Pipeline, aio::MultiplexedConnection};

use crate::error::BenchError;
use crate::load::Operation;
use crate::report::thousands;
use crate::server::BenchRedis;

/// A value the raw baselines read: written once with `SET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawValue {
    pub(crate) key: String,
    pub(crate) len: usize,
}

impl RawValue {
    /// Writes `len` bytes under `key`.
    pub(crate) async fn put(redis: &BenchRedis, key: &str, len: usize) -> Result<Self, BenchError> {
        redis::cmd("SET")
            .arg(key)
            .arg(vec![b'v'; len])
            .query_async::<()>(&mut redis.admin())
            .await?;
        Ok(Self {
            key: key.to_owned(),
            len,
        })
    }
}

/// What one raw "request" does: round trip `i` sends `trips[i]` commands
/// (pipelined when more than one), each a `GET` of the [`RawValue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawShape {
    pub(crate) trips: Vec<usize>,
}

impl RawShape {
    /// One `GET` per request.
    pub(crate) fn one_get() -> Self {
        Self { trips: vec![1] }
    }

    /// Round trips of these many commands each.
    pub(crate) fn trips(trips: &[usize]) -> Self {
        Self {
            trips: trips.to_vec(),
        }
    }
}

/// Who sends the raw commands.
#[derive(Clone)]
pub(crate) enum RawClient {
    /// One bare redis-rs multiplexed connection, cloned into every task.
    Bare(MultiplexedConnection),
    /// `RedisManager::query` / `query_pipeline`.
    Manager(RedisManager),
}

/// One round trip, built once.
enum Trip {
    One(Cmd),
    Many(Pipeline),
}

/// The prepared commands of one request.
pub(crate) struct RawPlan {
    trips: Vec<Trip>,
    len: usize,
}

impl RawPlan {
    pub(crate) fn new(shape: &RawShape, value: &RawValue) -> Self {
        let get = || {
            let mut cmd = redis::cmd("GET");
            cmd.arg(&value.key);
            cmd
        };
        let trips = shape
            .trips
            .iter()
            .map(|&n| {
                if n == 1 {
                    Trip::One(get())
                } else {
                    let mut pipe = redis::pipe();
                    for _ in 0..n {
                        pipe.add_command(get());
                    }
                    Trip::Many(pipe)
                }
            })
            .collect();
        Self {
            trips,
            len: value.len,
        }
    }
}

/// Why one raw request did not count.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RawError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("manager: {0}")]
    Manager(#[from] tower_redis_core::Error),
    #[error("GET returned {got} bytes, expected {expected}")]
    WrongValue { got: usize, expected: usize },
}

/// A task's raw request: every trip of the plan, one after the other.
pub(crate) struct RawOp {
    pub(crate) client: RawClient,
    pub(crate) plan: Arc<RawPlan>,
}

impl RawOp {
    fn check(&self, values: &[Vec<u8>]) -> Result<(), RawError> {
        match values.iter().find(|v| v.len() != self.plan.len) {
            None => Ok(()),
            Some(v) => Err(RawError::WrongValue {
                got: v.len(),
                expected: self.plan.len,
            }),
        }
    }
}

impl Operation for RawOp {
    type Error = RawError;

    async fn call(&mut self) -> Result<(), RawError> {
        for i in 0..self.plan.trips.len() {
            let values: Vec<Vec<u8>> = match (&mut self.client, &self.plan.trips[i]) {
                (RawClient::Bare(conn), Trip::One(cmd)) => vec![cmd.query_async(conn).await?],
                (RawClient::Bare(conn), Trip::Many(pipe)) => pipe.query_async(conn).await?,
                (RawClient::Manager(manager), Trip::One(cmd)) => vec![manager.query(cmd).await?],
                (RawClient::Manager(manager), Trip::Many(pipe)) => {
                    manager.query_pipeline(pipe).await?
                }
            };
            self.check(&values)?;
        }
        Ok(())
    }
}

/// `redis-benchmark` reading a [`RawValue`] with `GET` (its custom-command
/// form), `-c <concurrency>`, against the suite's own Redis.
#[derive(Debug)]
pub(crate) struct RedisBenchmark {
    binary: PathBuf,
    /// `-h`/`-p` (or `-s`), `-a`, `--user`, `--dbnum`.
    connection: Vec<String>,
    key: String,
    /// Requests per second seen at each concurrency, to size the next run.
    rates: Mutex<Vec<(usize, f64)>>,
}

/// What one `redis-benchmark` run printed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BenchmarkRun {
    pub(crate) requests: u64,
    pub(crate) requests_per_sec: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

impl RedisBenchmark {
    /// The tool aimed at `redis`, reading `value`; `Err` says why there is
    /// none (not installed, a TLS server).
    pub(crate) fn find(redis: &BenchRedis, value: &RawValue) -> Result<Self, String> {
        let binary = std::env::var_os("REDIS_BENCHMARK_BIN")
            .map(PathBuf::from)
            .or_else(|| find_on_path("redis-benchmark"))
            .ok_or_else(|| "redis-benchmark not installed".to_owned())?;
        let info = redis.client().get_connection_info();
        let mut connection = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                vec![
                    "-h".to_owned(),
                    host.clone(),
                    "-p".to_owned(),
                    port.to_string(),
                ]
            }
            ConnectionAddr::Unix(path) => vec!["-s".to_owned(), path.display().to_string()],
            _ => return Err("redis-benchmark: TLS is not supported by this harness".to_owned()),
        };
        let settings = info.redis_settings();
        if let Some(user) = settings.username() {
            connection.extend(["--user".to_owned(), user.to_owned()]);
        }
        if let Some(password) = settings.password() {
            connection.extend([
                "-a".to_owned(),
                password.to_owned(),
                "--no-auth-warning".to_owned(),
            ]);
        }
        if settings.db() != 0 {
            connection.extend(["--dbnum".to_owned(), settings.db().to_string()]);
        }
        Ok(Self {
            binary,
            connection,
            key: value.key.clone(),
            rates: Mutex::new(Vec::new()),
        })
    }

    /// How many requests to send at `concurrency` so that the run lasts
    /// about `duration`: from the last rate seen there, or from a short
    /// calibration run.
    pub(crate) async fn requests_for(
        &self,
        concurrency: usize,
        duration: Duration,
    ) -> Result<u64, BenchError> {
        let known = self.rate_at(concurrency);
        let rate = match known {
            Some(rate) => rate,
            None => {
                let probe = (20 * concurrency as u64).max(1_000);
                self.run(concurrency, probe).await?.requests_per_sec
            }
        };
        let wanted = (rate * duration.as_secs_f64()) as u64;
        Ok(wanted.clamp(10 * concurrency as u64, 50_000_000))
    }

    fn rate_at(&self, concurrency: usize) -> Option<f64> {
        let rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        rates
            .iter()
            .find(|(c, _)| *c == concurrency)
            .map(|(_, rate)| *rate)
    }

    /// One run of `requests` GETs from `concurrency` clients.
    pub(crate) async fn run(
        &self,
        concurrency: usize,
        requests: u64,
    ) -> Result<BenchmarkRun, BenchError> {
        let mut command = std::process::Command::new(&self.binary);
        command
            .args(&self.connection)
            .args(["-c", &concurrency.to_string()])
            .args(["-n", &requests.to_string()])
            .args(["-q", "--csv", "GET", &self.key]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .map_err(|e| BenchError::Check(format!("redis-benchmark: {e}")))??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(BenchError::Check(format!(
                "redis-benchmark exited with {}: {}{}",
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let run = parse_csv(&stdout, requests).ok_or_else(|| {
            BenchError::Check(format!(
                "cannot read redis-benchmark's output: {:?}",
                stdout.trim()
            ))
        })?;
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        rates.retain(|(c, _)| *c != concurrency);
        rates.push((concurrency, run.requests_per_sec));
        Ok(run)
    }

    /// For progress lines.
    pub(crate) fn describe(run: &BenchmarkRun) -> String {
        format!(
            "{} requests, {} req/s",
            thousands(run.requests as f64),
            thousands(run.requests_per_sec)
        )
    }
}

/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`
/// then one row per test (`-q --csv`, Redis 7). Older versions print only
/// `"test","rps"`: their latencies are NaN.
fn parse_csv(text: &str, requests: u64) -> Option<BenchmarkRun> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let unquote = |line: &str| -> Vec<String> {
        line.split(',')
            .map(|f| f.trim().trim_matches('"').to_owned())
            .collect()
    };
    let first = unquote(lines.next()?);
    let (header, row) = if first.first().map(String::as_str) == Some("test") {
        (first, unquote(lines.next()?))
    } else {
        (vec!["test".to_owned(), "rps".to_owned()], first)
    };
    let field = |name: &str| -> f64 {
        header
            .iter()
            .position(|h| h == name)
            .and_then(|i| row.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let requests_per_sec = field("rps");
    if requests_per_sec.is_nan() {
        return None;
    }
    Some(BenchmarkRun {
        requests,
        requests_per_sec,
        p50_us: field("p50_latency_ms") * 1_000.0,
        p99_us: field("p99_latency_ms") * 1_000.0,
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_file(candidate))
}

fn is_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redis_benchmark_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"GET tower-redis-bench:raw\",\"98039.22\",\"0.287\",\"0.080\",\"0.271\",\"0.415\",\"0.583\",\"1.263\"\n";
        let run = parse_csv(text, 5_000).unwrap();
        assert_eq!(run.requests, 5_000);
        assert!((run.requests_per_sec - 98_039.22).abs() < 1e-6);
        assert!((run.p50_us - 271.0).abs() < 1e-6);
        assert!((run.p99_us - 583.0).abs() < 1e-6);
        // Redis 6 prints only the rate.
        let old = parse_csv("\"GET\",\"12345.00\"\n", 10).unwrap();
        assert!((old.requests_per_sec - 12_345.0).abs() < 1e-6 && old.p99_us.is_nan());
        assert_eq!(parse_csv("", 1), None);
        assert_eq!(parse_csv("ERR something\n", 1), None);
    }
}
