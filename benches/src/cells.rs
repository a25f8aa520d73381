//! Cells: one subject measured at one concurrency, whatever drives it — an
//! in-process HTTP server, raw Redis commands, or `redis-benchmark` — so
//! that one table can hold all of them and divide each by a baseline of the
//! same repeat.
//!
//! Cells of a table run interleaved: at one concurrency, each repeat runs
//! every cell, in an order that is reversed every other repeat, so that
//! drift in the machine's speed lands on every side of each ratio.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tower_redis_core::testing::Monitor;

use crate::Options;
use crate::cpu::{CpuSnapshot, CpuUse};
use crate::error::BenchError;
use crate::http_load::{
    Expect, HttpCall, HttpError, HttpRequest, InProcessCall, Server, connect, send, top_level,
};
use crate::load::{self, LoadResult, LoadSpec};
use crate::raw::{RawClient, RawOp, RawPlan, RedisBenchmark};
use crate::report::{Target, fixed1, fixed2, micros, thousands};
use crate::server::{BenchRedis, CommandCalls, CommandStat, requests_sent};

/// What a peer row says when the `peers` feature is off.
pub(crate) const NOT_BUILT: &str = "not built (enable --features peers)";

/// One cell's numbers.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) requests_per_sec: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// NaN where the driver does not report it (`redis-benchmark`).
    pub(crate) p999_us: f64,
    /// Every request the cell made (warm-up included): the denominator of
    /// the command counts.
    pub(crate) calls: u64,
    /// Commands Redis ran during the cell, by name (harness commands left
    /// out); empty while Redis is down.
    pub(crate) commands: BTreeMap<String, CommandStat>,
    /// Commands run inside the subject's scripts (see [`top_level`]).
    pub(crate) inner: &'static [&'static str],
    /// Where CPU time went during the cell.
    pub(crate) cpu: CpuUse,
    /// The work ran in another process (`redis-benchmark`): this process'
    /// CPU and the machine's other load say nothing about it.
    pub(crate) external: bool,
    /// Connections Redis accepted during the cell (a client that connects
    /// on the request path shows here); 0 while Redis is down.
    pub(crate) new_connections: u64,
}

impl Sample {
    fn from_load(result: &LoadResult, counters: Counters, inner: &'static [&'static str]) -> Self {
        Self {
            requests_per_sec: result.ops_per_sec(),
            p50_us: result.latency_us(0.50),
            p99_us: result.latency_us(0.99),
            p999_us: result.latency_us(0.999),
            calls: result.calls,
            commands: counters.commands,
            inner,
            cpu: counters.cpu,
            external: false,
            new_connections: counters.new_connections,
        }
    }

    /// Top-level Redis commands per request.
    pub(crate) fn top_level_per_request(&self) -> f64 {
        top_level(&self.commands, self.inner).calls as f64 / self.calls.max(1) as f64
    }

    /// CPU time of this process (load generator and server) per request, in
    /// µs; NaN for an external driver.
    pub(crate) fn process_cpu_us_per_request(&self) -> f64 {
        if self.external {
            return f64::NAN;
        }
        self.cpu.process * 1e6 / self.calls.max(1) as f64
    }

    /// CPU time of the Redis server per request, in µs.
    pub(crate) fn redis_cpu_us_per_request(&self) -> f64 {
        self.cpu.redis * 1e6 / self.calls.max(1) as f64
    }

    /// One progress line.
    pub(crate) fn progress(&self) -> String {
        format!(
            "{:>8} req/s  p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  {} commands/req  CPU µs/req {} + Redis {}  others {} CPUs, steal {}",
            thousands(self.requests_per_sec),
            micros(self.p50_us),
            micros(self.p99_us),
            micros(self.p999_us),
            fixed2(self.top_level_per_request()),
            fixed1(self.process_cpu_us_per_request()),
            fixed1(self.redis_cpu_us_per_request()),
            fixed2(self.cpu.others_load()),
            fixed2(self.cpu.steal_load()),
        )
    }
}

/// What drives a cell.
pub(crate) enum Driver {
    /// HTTP requests to an in-process server; task `i` sends
    /// `requests[i % len]` (one cookie per task, say).
    Http {
        addr: SocketAddr,
        requests: Vec<Arc<HttpRequest>>,
        expect: Arc<Expect>,
    },
    /// The same requests to an app called in process, no TCP or HTTP.
    InProcess {
        app: axum::Router,
        requests: Vec<Arc<HttpRequest>>,
        expect: Arc<Expect>,
    },
    /// Raw Redis commands, no HTTP.
    Redis {
        client: RawClient,
        plan: Arc<RawPlan>,
    },
    /// `redis-benchmark` in a child process.
    Benchmark(Arc<RedisBenchmark>),
    /// Not measured, and why (a peer left out of the build, a tool not installed).
    Missing(String),
}

/// One subject of a table, ready to measure.
pub(crate) struct Cell {
    /// The table's `subject` column.
    pub(crate) label: String,
    /// A short name for progress lines and notes.
    pub(crate) short: &'static str,
    pub(crate) driver: Driver,
    /// Commands run inside the subject's scripts (see [`top_level`]).
    pub(crate) inner: &'static [&'static str],
    /// The server an HTTP cell talks to, kept alive as long as the cell.
    pub(crate) _server: Option<Server>,
}

impl Cell {
    /// An HTTP cell that owns its server.
    pub(crate) fn http(
        label: impl Into<String>,
        short: &'static str,
        server: Server,
        requests: Vec<Arc<HttpRequest>>,
        expect: Expect,
        inner: &'static [&'static str],
    ) -> Self {
        Self {
            label: label.into(),
            short,
            driver: Driver::Http {
                addr: server.addr,
                requests,
                expect: Arc::new(expect),
            },
            inner,
            _server: Some(server),
        }
    }

    /// A cell that calls `app` in process. `server` serves the same app
    /// (it was warmed and checked through it) and lives as long as the cell.
    pub(crate) fn in_process(
        label: impl Into<String>,
        short: &'static str,
        app: axum::Router,
        server: Server,
        requests: Vec<Arc<HttpRequest>>,
        expect: Expect,
        inner: &'static [&'static str],
    ) -> Self {
        Self {
            label: label.into(),
            short,
            driver: Driver::InProcess {
                app,
                requests,
                expect: Arc::new(expect),
            },
            inner,
            _server: Some(server),
        }
    }

    /// A cell that is not measured.
    pub(crate) fn missing(
        label: impl Into<String>,
        short: &'static str,
        why: impl Into<String>,
    ) -> Self {
        Self {
            label: label.into(),
            short,
            driver: Driver::Missing(why.into()),
            inner: &[],
            _server: None,
        }
    }

    /// Raw commands on a bare redis-rs connection (or through a manager).
    pub(crate) fn redis(
        label: impl Into<String>,
        short: &'static str,
        client: RawClient,
        plan: RawPlan,
    ) -> Self {
        Self {
            label: label.into(),
            short,
            driver: Driver::Redis {
                client,
                plan: Arc::new(plan),
            },
            inner: &[],
            _server: None,
        }
    }

    /// `redis-benchmark`, or why there is none.
    pub(crate) fn benchmark(
        label: impl Into<String>,
        short: &'static str,
        tool: Result<RedisBenchmark, String>,
    ) -> Self {
        match tool {
            Ok(tool) => Self {
                label: label.into(),
                short,
                driver: Driver::Benchmark(Arc::new(tool)),
                inner: &[],
                _server: None,
            },
            Err(why) => Self::missing(label, short, why),
        }
    }

    /// Why the cell is not measured, if it is not.
    pub(crate) fn missing_reason(&self) -> Option<&str> {
        match &self.driver {
            Driver::Missing(why) => Some(why),
            _ => None,
        }
    }
}

/// Server-side counters around a cell.
struct Counters {
    commands: BTreeMap<String, CommandStat>,
    cpu: CpuUse,
    new_connections: u64,
}

/// Counters read before a cell; `redis` is `None` while the server is down.
struct Before {
    commands: Option<CommandCalls>,
    connections: u64,
    cpu: CpuSnapshot,
}

async fn before(redis: Option<&BenchRedis>) -> Result<Before, BenchError> {
    Ok(match redis {
        Some(redis) => Before {
            connections: redis.connections_received().await?,
            commands: Some(redis.command_calls().await?),
            cpu: redis.cpu_snapshot().await?,
        },
        None => Before {
            commands: None,
            connections: 0,
            cpu: CpuSnapshot::now(0.0, true),
        },
    })
}

async fn after(redis: Option<&BenchRedis>, before: &Before) -> Result<Counters, BenchError> {
    Ok(match (redis, &before.commands) {
        (Some(redis), Some(commands)) => {
            let cpu = redis.cpu_snapshot().await?.since(&before.cpu);
            let now = redis.command_calls().await?;
            let connections = redis.connections_received().await?;
            Counters {
                commands: now.deltas(commands),
                cpu,
                new_connections: connections.saturating_sub(before.connections),
            }
        }
        _ => Counters {
            commands: BTreeMap::new(),
            cpu: CpuSnapshot::now(0.0, true).since(&before.cpu),
            new_connections: 0,
        },
    })
}

/// Runs one cell at one concurrency. `redis` is the server whose counters
/// are read around it (`None` while it is down). `None` for a missing cell.
pub(crate) async fn measure(
    redis: Option<&BenchRedis>,
    suite: &str,
    cell: &Cell,
    spec: LoadSpec,
) -> Result<Option<Sample>, BenchError> {
    let subject = format!("{suite}: {} c={}", cell.short, spec.concurrency);
    let sample = match &cell.driver {
        Driver::Missing(_) => return Ok(None),
        Driver::Http {
            addr,
            requests,
            expect,
        } => {
            if requests.is_empty() {
                return Err(BenchError::Check(format!("{subject}: no request to send")));
            }
            let mut senders = Vec::with_capacity(spec.concurrency);
            for _ in 0..spec.concurrency {
                senders.push(
                    connect(*addr)
                        .await
                        .map_err(|e| BenchError::Check(format!("{subject}: {e}")))?,
                );
            }
            let mut senders = senders.into_iter();
            let before = before(redis).await?;
            let result = load::run(spec, |i| HttpCall {
                sender: senders.next(),
                addr: *addr,
                request: Arc::clone(&requests[i % requests.len()]),
                expect: Arc::clone(expect),
            })
            .await?;
            let counters = after(redis, &before).await?;
            result.require_no_errors(&subject)?;
            Sample::from_load(&result, counters, cell.inner)
        }
        Driver::InProcess {
            app,
            requests,
            expect,
        } => {
            if requests.is_empty() {
                return Err(BenchError::Check(format!("{subject}: no request to send")));
            }
            let before = before(redis).await?;
            let result = load::run(spec, |i| InProcessCall {
                app: app.clone(),
                request: Arc::clone(&requests[i % requests.len()]),
                expect: Arc::clone(expect),
            })
            .await?;
            let counters = after(redis, &before).await?;
            result.require_no_errors(&subject)?;
            Sample::from_load(&result, counters, cell.inner)
        }
        Driver::Redis { client, plan } => {
            let before = before(redis).await?;
            let result = load::run(spec, |_| RawOp {
                client: client.clone(),
                plan: Arc::clone(plan),
            })
            .await?;
            let counters = after(redis, &before).await?;
            result.require_no_errors(&subject)?;
            Sample::from_load(&result, counters, cell.inner)
        }
        Driver::Benchmark(tool) => {
            let requests = tool.requests_for(spec.concurrency, spec.duration).await?;
            let before = before(redis).await?;
            let run = tool.run(spec.concurrency, requests).await?;
            let counters = after(redis, &before).await?;
            eprintln!("{subject}: {}", RedisBenchmark::describe(&run));
            Sample {
                requests_per_sec: run.requests_per_sec,
                p50_us: run.p50_us,
                p99_us: run.p99_us,
                p999_us: f64::NAN,
                calls: run.requests,
                commands: counters.commands,
                inner: &[],
                cpu: counters.cpu,
                external: true,
                new_connections: counters.new_connections,
            }
        }
    };
    Ok(Some(sample))
}

/// One row of a table: one concurrency (or payload, or state), each cell's
/// samples over the repeats (empty for a missing cell).
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// The first column: `1`, `64`, `1 KiB`, ...
    pub(crate) key: String,
    /// `c=64` or `1 KiB`: how notes name the row.
    pub(crate) name: String,
    pub(crate) samples: Vec<Vec<Sample>>,
}

/// Every cell at every concurrency of `options`, interleaved; one row per
/// concurrency.
pub(crate) async fn run_interleaved(
    redis: &BenchRedis,
    suite: &str,
    cells: &[Cell],
    options: &Options,
) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::with_capacity(options.concurrency.len());
    for &concurrency in &options.concurrency {
        let samples = run_row(redis, suite, cells, options, concurrency).await?;
        rows.push(Row {
            key: concurrency.to_string(),
            name: format!("c={concurrency}"),
            samples,
        });
    }
    Ok(rows)
}

/// Every cell at one concurrency, `options.repeats` times, the order
/// reversed every other repeat.
pub(crate) async fn run_row(
    redis: &BenchRedis,
    suite: &str,
    cells: &[Cell],
    options: &Options,
    concurrency: usize,
) -> Result<Vec<Vec<Sample>>, BenchError> {
    let spec = LoadSpec {
        concurrency,
        warmup: options.warmup,
        duration: options.duration,
    };
    let mut row: Vec<Vec<Sample>> = vec![Vec::new(); cells.len()];
    for repeat in 0..options.repeats {
        let order: Vec<usize> = if repeat % 2 == 0 {
            (0..cells.len()).collect()
        } else {
            (0..cells.len()).rev().collect()
        };
        for i in order {
            let cell = &cells[i];
            let Some(sample) = measure(Some(redis), suite, cell, spec).await? else {
                continue;
            };
            eprintln!(
                "{suite}: {:<18} c={concurrency:<3} run {}/{}: {}",
                cell.short,
                repeat + 1,
                options.repeats,
                sample.progress()
            );
            row[i].push(sample);
        }
    }
    Ok(row)
}

/// Requests sent through a cell in its untimed round-trip window.
pub(crate) const TRIP_REQUESTS: usize = 50;

/// How a round-trip target says where its numbers come from.
pub(crate) const TRIP_SOURCE: &str = "every command the client sent, from MONITOR, in an untimed window of 50 sequential requests; only commands Lua runs inside a script and connection upkeep (a pool's PING, CLIENT, HELLO) are left out";

impl Cell {
    /// Redis commands per request of an HTTP cell, counted with `MONITOR`
    /// over [`TRIP_REQUESTS`] sequential requests outside the timed runs:
    /// every command any client sent while they ran, whatever its name
    /// (unlike the cells' `INFO commandstats` counts, which must skip the
    /// commands scripts run by name), without only what Lua ran inside a
    /// script. Also returns the commands by name. `None` for cells that are
    /// not HTTP.
    pub(crate) async fn round_trips(
        &self,
        redis: &BenchRedis,
    ) -> Result<Option<(f64, BTreeMap<String, usize>)>, BenchError> {
        let (Some(server), Driver::Http { requests, .. } | Driver::InProcess { requests, .. }) =
            (&self._server, &self.driver)
        else {
            return Ok(None);
        };
        let failed = |e: HttpError| BenchError::Check(format!("{}: round trips: {e}", self.short));
        let mut sender = connect(server.addr).await.map_err(failed)?;
        let monitor = Monitor::start(redis.client()).await?;
        for i in 0..TRIP_REQUESTS {
            send(&mut sender, &requests[i % requests.len()])
                .await
                .map_err(failed)?;
        }
        let commands = requests_sent(monitor).await?;
        let mut by_name = BTreeMap::new();
        for name in &commands {
            *by_name.entry(name.clone()).or_insert(0) += 1;
        }
        Ok(Some((
            commands.len() as f64 / TRIP_REQUESTS as f64,
            by_name,
        )))
    }
}

/// Checks `cells[of]`'s commands per request from its untimed window (see
/// [`Cell::round_trips`]) against `max`, labelled `at`.
pub(crate) async fn check_round_trips(
    target: &mut Target,
    redis: &BenchRedis,
    cells: &[Cell],
    of: usize,
    at: &str,
    max: f64,
) -> Result<(), BenchError> {
    let Some(cell) = cells.get(of) else {
        target.not_measured(at, "no such cell");
        return Ok(());
    };
    match cell.round_trips(redis).await? {
        Some((per_request, by_name)) => {
            eprintln!(
                "round trips: {} ({at}): {per_request:.2} commands per request over {TRIP_REQUESTS} requests: {by_name:?}",
                cell.short
            );
            target.at_most(format!("{at} {}", cell.short), per_request, max);
        }
        None => target.not_measured(
            format!("{at} {}", cell.short),
            cell.missing_reason().unwrap_or("not an HTTP cell"),
        ),
    }
    Ok(())
}
