//! The in-process HTTP load setup the HTTP suites share (`ratelimit`,
//! `cache`, `session`).
//!
//! Every subject is an axum app served in process on 127.0.0.1 over real
//! TCP, with `into_make_service_with_connect_info::<SocketAddr>()` so that
//! layers keyed by client IP find the peer address. The load generator is a
//! hyper HTTP/1.1 client: one persistent keep-alive connection per task,
//! opened before the cell starts. Cells run interleaved — every subject at
//! one concurrency, in an order that alternates between repeats — so that
//! each subject can be divided by a baseline cell of the same repeat.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::serve::ListenerExt as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower_redis_core::redis;
use tower_redis_core::testing::{Backend, TestRedis};
use tower_redis_core::{RedisConfig, RedisManager};

use crate::Options;
use crate::cpu::CpuUse;
use crate::error::BenchError;
use crate::load::{self, LoadResult, LoadSpec, Operation};
use crate::report::{median, micros, thousands};
use crate::server::{BenchRedis, CommandStat};

/// One in-process HTTP server, stopped (accept loop aborted) on drop.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on 127.0.0.1 (a free port), with the peer address in
/// `ConnectInfo<SocketAddr>` and `TCP_NODELAY` on every accepted socket.
pub(crate) async fn serve(app: Router) -> Result<Server, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let listener = listener.tap_io(|tcp: &mut TcpStream| {
        // Best effort: a socket without NODELAY only makes this side slower.
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    Ok(Server { addr, task })
}

/// Why one request did not count.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("status {got}, expected {expected}")]
    Status {
        got: StatusCode,
        expected: StatusCode,
    },
    #[error("body of {got} bytes ({start:?}...), expected {expected} bytes")]
    Body {
        got: usize,
        start: Bytes,
        expected: usize,
    },
}

/// The client half of one keep-alive connection.
pub(crate) type Sender = SendRequest<Empty<Bytes>>;

/// Opens one keep-alive HTTP/1.1 connection; its driver runs in its own
/// task and ends when the returned sender is dropped.
pub(crate) async fn connect(addr: SocketAddr) -> Result<Sender, HttpError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// What a task sends, every time: a method, a path and its fields (`Host`
/// is always `127.0.0.1`). The body is empty.
#[derive(Debug, Clone)]
pub(crate) struct HttpRequest {
    pub(crate) method: Method,
    pub(crate) path: &'static str,
    pub(crate) fields: HeaderMap,
}

impl HttpRequest {
    /// `GET path`.
    pub(crate) fn get(path: &'static str) -> Self {
        Self {
            method: Method::GET,
            path,
            fields: HeaderMap::new(),
        }
    }

    /// `POST path`.
    pub(crate) fn post(path: &'static str) -> Self {
        Self {
            method: Method::POST,
            ..Self::get(path)
        }
    }

    /// The same request with a `Cookie` field.
    pub(crate) fn with_cookie(mut self, cookie: &str) -> Result<Self, BenchError> {
        let value = HeaderValue::from_str(cookie)
            .map_err(|e| BenchError::Check(format!("cookie {cookie:?}: {e}")))?;
        self.fields.insert(header::COOKIE, value);
        Ok(self)
    }
}

/// Sends `request` on `sender`: the status, the fields and the whole body.
pub(crate) async fn send(
    sender: &mut Sender,
    request: &HttpRequest,
) -> Result<(StatusCode, HeaderMap, Bytes), HttpError> {
    sender.ready().await?;
    let mut builder = Request::builder()
        .method(request.method.clone())
        .uri(request.path)
        .header(header::HOST, "127.0.0.1");
    for (name, value) in &request.fields {
        builder = builder.header(name, value);
    }
    let response = sender.send_request(builder.body(Empty::new())?).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// What every response of a cell must be.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    pub(crate) status: StatusCode,
    /// The body of a 200, if it is checked.
    pub(crate) body: Option<Bytes>,
}

impl Expect {
    fn check(&self, status: StatusCode, body: &Bytes) -> Result<(), HttpError> {
        if status != self.status {
            return Err(HttpError::Status {
                got: status,
                expected: self.status,
            });
        }
        if let Some(expected) = &self.body
            && status == StatusCode::OK
            && body != expected
        {
            return Err(HttpError::Body {
                got: body.len(),
                start: body.slice(..body.len().min(32)),
                expected: expected.len(),
            });
        }
        Ok(())
    }
}

/// One task's request on its own connection, checking every response.
struct HttpCall {
    /// Opened before the cell; reopened if missing.
    sender: Option<Sender>,
    addr: SocketAddr,
    request: Arc<HttpRequest>,
    expect: Arc<Expect>,
}

impl Operation for HttpCall {
    type Error = HttpError;

    async fn call(&mut self) -> Result<(), HttpError> {
        let sender = match self.sender.take() {
            Some(sender) => sender,
            None => connect(self.addr).await?,
        };
        let sender = self.sender.insert(sender);
        let (status, _, body) = send(sender, &self.request).await?;
        self.expect.check(status, &body)
    }
}

/// The Redis a `Redis down` manager points at: nothing listens there.
pub(crate) struct DeadRedis {
    pub(crate) url: String,
    pub(crate) how: &'static str,
    /// Kept so that its directory outlives the run.
    _stopped: Option<TestRedis>,
}

pub(crate) async fn dead_redis() -> Result<DeadRedis, BenchError> {
    if let Ok(test) = TestRedis::builder().start().await
        && test.backend() != Backend::Url
    {
        test.stop().await;
        return Ok(DeadRedis {
            url: test.url().to_owned(),
            how: "a second TestRedis, stopped before the manager connected",
            _stopped: Some(test),
        });
    }
    // No stoppable test server (REDIS_URL only): a port nothing listens on.
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    drop(listener);
    Ok(DeadRedis {
        url: format!("redis://127.0.0.1:{port}"),
        how: "a closed local port (no stoppable TestRedis backend)",
        _stopped: None,
    })
}

/// A manager on `url` whose keys live under `key_prefix`.
pub(crate) async fn manager_for(
    url: &str,
    pool_size: u32,
    key_prefix: &str,
) -> Result<RedisManager, BenchError> {
    let config = RedisConfig::builder()
        .url(url)
        .pool_size(pool_size)
        .key_prefix(key_prefix)
        .build()?;
    Ok(RedisManager::connect(config).await?)
}

/// A manager that reaches the bench Redis, and one that cannot reach any.
pub(crate) async fn managers(
    redis: &BenchRedis,
    pool_size: u32,
    key_prefix: &str,
) -> Result<(RedisManager, RedisManager, DeadRedis), BenchError> {
    let manager = manager_for(redis.url(), pool_size, key_prefix).await?;
    if !manager.is_available() {
        return Err(BenchError::Check(format!(
            "the manager cannot reach Redis: {:?}",
            manager.health()
        )));
    }
    let dead = dead_redis().await?;
    let down = manager_for(&dead.url, pool_size, key_prefix).await?;
    if down.is_available() {
        return Err(BenchError::Check(format!(
            "the `Redis down` manager reaches a Redis at {}",
            dead.url
        )));
    }
    Ok((manager, down, dead))
}

/// Deletes every key under `prefix`.
pub(crate) async fn clear_keys(redis: &BenchRedis, prefix: &str) -> Result<(), BenchError> {
    let mut conn = redis.admin();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The commands in a delta that a client sent: their calls, and the server
/// time they took. `inner` names the commands the subject's scripts run
/// inside their EVALSHA: `INFO commandstats` counts them as if a client
/// had sent them, so they are left out (their time is already in the
/// EVALSHA's).
pub(crate) fn top_level(deltas: &BTreeMap<String, CommandStat>, inner: &[&str]) -> CommandStat {
    deltas
        .iter()
        .filter(|(name, _)| !inner.contains(&name.as_str()))
        .fold(CommandStat::default(), |sum, (_, stat)| CommandStat {
            calls: sum.calls + stat.calls,
            usec: sum.usec + stat.usec,
        })
}

/// One cell's numbers.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) requests_per_sec: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    /// Every request the cell made (warm-up included): the denominator of
    /// the command counts.
    pub(crate) calls: u64,
    /// Commands Redis ran during the cell, by name (harness commands left out).
    pub(crate) commands: BTreeMap<String, CommandStat>,
    /// Commands run inside the subject's scripts (see [`top_level`]).
    pub(crate) inner: &'static [&'static str],
    /// Where CPU time went during the cell.
    pub(crate) cpu: CpuUse,
}

impl Sample {
    fn new(
        result: &LoadResult,
        commands: BTreeMap<String, CommandStat>,
        inner: &'static [&'static str],
        cpu: CpuUse,
    ) -> Self {
        Self {
            requests_per_sec: result.ops_per_sec(),
            p50_us: result.latency_us(0.50),
            p99_us: result.latency_us(0.99),
            p999_us: result.latency_us(0.999),
            calls: result.calls,
            commands,
            inner,
            cpu,
        }
    }

    pub(crate) fn top_level_per_request(&self) -> f64 {
        top_level(&self.commands, self.inner).calls as f64 / self.calls.max(1) as f64
    }

    /// CPU time of this process (load generator and server) per request, in µs.
    pub(crate) fn process_cpu_us_per_request(&self) -> f64 {
        self.cpu.process * 1e6 / self.calls.max(1) as f64
    }

    /// CPU time of the Redis server per request, in µs.
    pub(crate) fn redis_cpu_us_per_request(&self) -> f64 {
        self.cpu.redis * 1e6 / self.calls.max(1) as f64
    }
}

/// One subject of an HTTP suite, ready to measure.
pub(crate) struct Cell {
    /// A short name for progress lines.
    pub(crate) short: &'static str,
    /// `None` for a peer left out of the build.
    pub(crate) server: Option<Server>,
    /// Task `i` sends `requests[i % len]` (one cookie per task, say).
    pub(crate) requests: Vec<Arc<HttpRequest>>,
    pub(crate) expect: Arc<Expect>,
    /// Commands run inside the subject's scripts (see [`top_level`]).
    pub(crate) inner: &'static [&'static str],
}

/// Runs one cell: `spec.concurrency` connections opened first, then the load.
async fn measure(
    redis: &BenchRedis,
    suite: &str,
    cell: &Cell,
    server: &Server,
    spec: LoadSpec,
) -> Result<Sample, BenchError> {
    let addr = server.addr;
    let mut senders = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency {
        senders.push(
            connect(addr)
                .await
                .map_err(|e| BenchError::Check(format!("{suite}, {}: {e}", cell.short)))?,
        );
    }
    if cell.requests.is_empty() {
        return Err(BenchError::Check(format!(
            "{suite}, {}: no request to send",
            cell.short
        )));
    }
    let mut senders = senders.into_iter();
    let before = redis.command_calls().await?;
    let cpu_before = redis.cpu_snapshot().await?;
    let result = load::run(spec, |i| HttpCall {
        sender: senders.next(),
        addr,
        request: Arc::clone(&cell.requests[i % cell.requests.len()]),
        expect: Arc::clone(&cell.expect),
    })
    .await?;
    let cpu = redis.cpu_snapshot().await?.since(&cpu_before);
    let after = redis.command_calls().await?;
    result.require_no_errors(&format!("{suite}: {} c={}", cell.short, spec.concurrency))?;
    Ok(Sample::new(&result, after.deltas(&before), cell.inner, cpu))
}

/// Every cell at every concurrency, interleaved: at one concurrency, each
/// repeat runs every cell, in an order that alternates between repeats.
/// Returns, per concurrency, each cell's samples (empty for a cell without
/// a server).
pub(crate) async fn run_interleaved(
    redis: &BenchRedis,
    suite: &str,
    cells: &[Cell],
    options: &Options,
) -> Result<Vec<(usize, Vec<Vec<Sample>>)>, BenchError> {
    let mut rows = Vec::with_capacity(options.concurrency.len());
    for &concurrency in &options.concurrency {
        let spec = LoadSpec {
            concurrency,
            warmup: options.warmup,
            duration: options.duration,
        };
        let mut row: Vec<Vec<Sample>> = vec![Vec::new(); cells.len()];
        for repeat in 0..options.repeats {
            // Alternate the order, so that no subject always runs first or
            // right after the same neighbour.
            let order: Vec<usize> = if repeat % 2 == 0 {
                (0..cells.len()).collect()
            } else {
                (0..cells.len()).rev().collect()
            };
            for i in order {
                let cell = &cells[i];
                let Some(server) = &cell.server else {
                    continue;
                };
                let sample = measure(redis, suite, cell, server, spec).await?;
                eprintln!(
                    "{suite}: {:<16} c={concurrency:<3} run {}/{}: {:>8} req/s  p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  {:.2} commands/req  CPU µs/req {:.1} + Redis {:.1}  others {:.2} CPUs, steal {:.2}",
                    cell.short,
                    repeat + 1,
                    options.repeats,
                    thousands(sample.requests_per_sec),
                    micros(sample.p50_us),
                    micros(sample.p99_us),
                    micros(sample.p999_us),
                    sample.top_level_per_request(),
                    sample.process_cpu_us_per_request(),
                    sample.redis_cpu_us_per_request(),
                    sample.cpu.others_load(),
                    sample.cpu.steal_load(),
                );
                row[i].push(sample);
            }
        }
        rows.push((concurrency, row));
    }
    Ok(rows)
}

/// The median of `field` over `samples`.
pub(crate) fn med(samples: &[Sample], field: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(field).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// subject / baseline for each repeat (each ran in the same round).
pub(crate) fn ratios(baseline: &[Sample], subject: &[Sample]) -> Vec<f64> {
    baseline
        .iter()
        .zip(subject)
        .map(|(b, s)| s.requests_per_sec / b.requests_per_sec)
        .collect()
}

/// The median of [`ratios`].
pub(crate) fn ratio(baseline: &[Sample], subject: &[Sample]) -> f64 {
    median(&ratios(baseline, subject)).unwrap_or(f64::NAN)
}

/// `evalsha 1.00 (inside the script: time 1.00, get 1.00, set 1.00)` over
/// every cell of one subject.
pub(crate) fn breakdown(samples: &[&Sample]) -> String {
    let calls: u64 = samples.iter().map(|s| s.calls).sum();
    let inner_names: &[&str] = samples.first().map_or(&[], |s| s.inner);
    let mut totals: BTreeMap<&str, CommandStat> = BTreeMap::new();
    for sample in samples {
        for (name, stat) in &sample.commands {
            let total = totals.entry(name.as_str()).or_default();
            total.calls += stat.calls;
            total.usec += stat.usec;
        }
    }
    let per = |n: u64| n as f64 / calls.max(1) as f64;
    let list = |inner: bool| {
        totals
            .iter()
            .filter(|(name, _)| inner_names.contains(name) == inner)
            .map(|(name, stat)| {
                if inner {
                    format!("{name} {:.2}", per(stat.calls))
                } else {
                    let usec = stat.usec as f64 / stat.calls.max(1) as f64;
                    format!("{name} {:.2} ({usec:.1} µs each)", per(stat.calls))
                }
            })
            .collect::<Vec<_>>()
    };
    let (outer, inner) = (list(false), list(true));
    let mut text = if outer.is_empty() {
        "none".to_owned()
    } else {
        outer.join(", ")
    };
    if !inner.is_empty() {
        let _ = write!(text, " (inside the script: {})", inner.join(", "));
    }
    text
}

/// The standard columns of an HTTP suite's table, after `concurrency` and
/// `subject`: requests/s, latencies, the ratio, commands and CPU.
pub(crate) fn columns(samples: &[Sample], ratio: f64) -> Vec<String> {
    vec![
        thousands(med(samples, |s| s.requests_per_sec)),
        micros(med(samples, |s| s.p50_us)),
        micros(med(samples, |s| s.p99_us)),
        micros(med(samples, |s| s.p999_us)),
        format!("{ratio:.2}"),
        format!("{:.2}", med(samples, Sample::top_level_per_request)),
        format!("{:.1}", med(samples, Sample::process_cpu_us_per_request)),
        format!("{:.1}", med(samples, Sample::redis_cpu_us_per_request)),
    ]
}

/// The headers matching [`columns`], with the ratio column named after the baseline.
pub(crate) fn headers(baseline: &str) -> Vec<String> {
    [
        "concurrency",
        "subject",
        "requests/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        &format!("ratio to {baseline}"),
        "Redis commands / request",
        "CPU µs / request: process",
        "CPU µs / request: Redis",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}
