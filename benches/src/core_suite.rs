//! Suite `core`: what the connection manager costs per operation.
//!
//! The operation is one `GET` of an existing key holding 100 bytes, made
//! either on a bare redis-rs `MultiplexedConnection` (one connection, cloned
//! into every task: what an app without tower-redis would do) or through
//! `RedisManager::query` (breaker check, command timeout, pool checkout).
//! Cells run interleaved — bare then manager at one concurrency, repeated —
//! so drift in the machine's speed lands on both sides of each ratio.

use std::fmt::Write as _;
use std::sync::Arc;

use tower_redis_core::redis::{self, Cmd, aio::MultiplexedConnection};
use tower_redis_core::{RedisConfig, RedisManager};

use crate::Options;
use crate::cpu::{self, CpuUse};
use crate::error::BenchError;
use crate::load::{self, LoadResult, LoadSpec, Operation};
use crate::report::{Table, median, micros, thousands};
use crate::server::BenchRedis;

/// The key every `GET` reads.
const KEY: &str = "tower-redis-bench:core:value";
/// Size of the value under [`KEY`].
const VALUE_LEN: usize = 100;
/// The target for manager / bare throughput.
const TARGET_RATIO: f64 = 0.9;

/// Why one `GET` did not count.
#[derive(Debug, thiserror::Error)]
enum GetError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("manager: {0}")]
    Manager(#[from] tower_redis_core::Error),
    #[error("GET returned {0} bytes, expected {VALUE_LEN}")]
    WrongValue(usize),
}

fn check(value: &[u8]) -> Result<(), GetError> {
    if value.len() == VALUE_LEN {
        Ok(())
    } else {
        Err(GetError::WrongValue(value.len()))
    }
}

/// `GET` on a task's own clone of one multiplexed connection.
struct BareGet {
    conn: MultiplexedConnection,
    cmd: Arc<Cmd>,
}

impl Operation for BareGet {
    type Error = GetError;

    async fn call(&mut self) -> Result<(), GetError> {
        let value: Vec<u8> = self.cmd.query_async(&mut self.conn).await?;
        check(&value)
    }
}

/// `GET` through [`RedisManager::query`].
struct ManagerGet {
    manager: RedisManager,
    cmd: Arc<Cmd>,
}

impl Operation for ManagerGet {
    type Error = GetError;

    async fn call(&mut self) -> Result<(), GetError> {
        let value: Vec<u8> = self.manager.query(&self.cmd).await?;
        check(&value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Bare,
    Manager,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Bare => "bare redis-rs",
            Side::Manager => "manager",
        }
    }
}

/// One cell's numbers.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    commands_per_op: f64,
    /// Connections the server accepted during the run (expect 0).
    new_connections: u64,
}

/// All runs at one concurrency.
#[derive(Debug, Default)]
struct Row {
    bare: Vec<Sample>,
    manager: Vec<Sample>,
}

impl Row {
    fn push(&mut self, side: Side, sample: Sample) {
        match side {
            Side::Bare => self.bare.push(sample),
            Side::Manager => self.manager.push(sample),
        }
    }

    /// manager / bare for each repeat (each pair ran back to back).
    fn ratios(&self) -> Vec<f64> {
        self.bare
            .iter()
            .zip(&self.manager)
            .map(|(bare, manager)| manager.ops_per_sec / bare.ops_per_sec)
            .collect()
    }
}

fn med(samples: &[Sample], field: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(field).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// Runs the suite and returns its markdown section.
pub(crate) async fn run(redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
    let value = vec![b'v'; VALUE_LEN];
    redis::cmd("SET")
        .arg(KEY)
        .arg(&value)
        .query_async::<()>(&mut redis.admin())
        .await?;

    let bare = redis.client().get_multiplexed_async_connection().await?;
    let pool_size = options.pool_size.unwrap_or(RedisConfig::DEFAULT_POOL_SIZE);
    let config = RedisConfig::builder()
        .url(redis.url())
        .pool_size(pool_size)
        .build()?;
    let manager = RedisManager::connect(config).await?;
    if !manager.is_available() {
        return Err(BenchError::Check(format!(
            "the manager cannot reach Redis: {:?}",
            manager.health()
        )));
    }
    let mut get = redis::cmd("GET");
    get.arg(KEY);
    let get = Arc::new(get);
    // Both paths answer before anything is timed.
    check(&get.query_async::<Vec<u8>>(&mut bare.clone()).await?)
        .map_err(|e| BenchError::Check(e.to_string()))?;
    check(&manager.query::<Vec<u8>>(&get).await?).map_err(|e| BenchError::Check(e.to_string()))?;

    let mut rows = Vec::with_capacity(options.concurrency.len());
    let mut cells = Vec::new();
    for &concurrency in &options.concurrency {
        let spec = LoadSpec {
            concurrency,
            warmup: options.warmup,
            duration: options.duration,
        };
        let mut row = Row::default();
        for repeat in 0..options.repeats {
            // Alternate which side goes first, so neither always runs
            // right after the other.
            let order = if repeat % 2 == 0 {
                [Side::Bare, Side::Manager]
            } else {
                [Side::Manager, Side::Bare]
            };
            for side in order {
                let connections_before = redis.connections_received().await?;
                let before = redis.command_calls().await?;
                let cpu_before = redis.cpu_snapshot().await?;
                let result = match side {
                    Side::Bare => {
                        load::run(spec, |_| BareGet {
                            conn: bare.clone(),
                            cmd: Arc::clone(&get),
                        })
                        .await?
                    }
                    Side::Manager => {
                        load::run(spec, |_| ManagerGet {
                            manager: manager.clone(),
                            cmd: Arc::clone(&get),
                        })
                        .await?
                    }
                };
                cells.push(redis.cpu_snapshot().await?.since(&cpu_before));
                let commands = redis.command_calls().await?.since(&before);
                let new_connections = redis
                    .connections_received()
                    .await?
                    .saturating_sub(connections_before);
                let subject = format!("{} c={concurrency}", side.label());
                result.require_no_errors(&subject)?;
                let sample = sample(&result, commands, new_connections);
                eprintln!(
                    "core: {subject:<20} run {}/{}: {:>9} ops/s  p50 {:>6} µs  p99 {:>6} µs  {:.2} commands/op  {} new connections",
                    repeat + 1,
                    options.repeats,
                    thousands(sample.ops_per_sec),
                    micros(sample.p50_us),
                    micros(sample.p99_us),
                    sample.commands_per_op,
                    sample.new_connections,
                );
                row.push(side, sample);
            }
        }
        rows.push((concurrency, row));
    }
    Ok(render(options, pool_size, &rows, &cells))
}

fn sample(result: &LoadResult, commands: u64, new_connections: u64) -> Sample {
    Sample {
        ops_per_sec: result.ops_per_sec(),
        p50_us: result.latency_us(0.50),
        p99_us: result.latency_us(0.99),
        commands_per_op: commands as f64 / result.calls.max(1) as f64,
        new_connections,
    }
}

fn render(options: &Options, pool_size: u32, rows: &[(usize, Row)], cells: &[CpuUse]) -> String {
    let mut table = Table::new([
        "concurrency",
        "bare redis-rs ops/s",
        "manager ops/s",
        "ratio (manager / bare)",
        "bare p50/p99 µs",
        "manager p50/p99 µs",
        "Redis commands per op (manager)",
    ]);
    let mut verdicts = Vec::new();
    let mut spreads = Vec::new();
    let mut checks = Vec::new();
    let mut connections = Vec::new();
    for (concurrency, row) in rows {
        let ratios = row.ratios();
        let ratio = median(&ratios).unwrap_or(f64::NAN);
        table.row([
            concurrency.to_string(),
            thousands(med(&row.bare, |s| s.ops_per_sec)),
            thousands(med(&row.manager, |s| s.ops_per_sec)),
            format!("{ratio:.2}"),
            format!(
                "{} / {}",
                micros(med(&row.bare, |s| s.p50_us)),
                micros(med(&row.bare, |s| s.p99_us))
            ),
            format!(
                "{} / {}",
                micros(med(&row.manager, |s| s.p50_us)),
                micros(med(&row.manager, |s| s.p99_us))
            ),
            format!("{:.2}", med(&row.manager, |s| s.commands_per_op)),
        ]);
        let met = if ratio >= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        };
        verdicts.push(format!("c={concurrency} {met} ({ratio:.2})"));
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        spreads.push(format!("c={concurrency}: {}", each.join(", ")));
        checks.push(format!(
            "c={concurrency}: {:.2}",
            med(&row.bare, |s| s.commands_per_op)
        ));
        let most =
            |samples: &[Sample]| samples.iter().map(|s| s.new_connections).max().unwrap_or(0);
        connections.push(format!(
            "c={concurrency}: {} / {}",
            most(&row.bare),
            most(&row.manager)
        ));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## core: one GET of a {VALUE_LEN}-byte value, RedisManager vs bare redis-rs\n"
    );
    let _ = writeln!(
        out,
        "{:.1} s measured after {:.1} s warm-up per cell; bare and manager cells interleaved, each pair run {} times \
         (alternating which goes first); medians shown, ratio = median of the per-pair ratios. \
         Manager: RedisConfig defaults with pool_size {pool_size}. \
         Bare: one MultiplexedConnection (redis-rs defaults) cloned into every task.\n",
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64(),
        options.repeats,
    );
    out.push_str(&table.render());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- target manager/bare ≥ {TARGET_RATIO:.2}: {}",
        verdicts.join("; ")
    );
    let _ = writeln!(out, "- per-pair ratios: {}", spreads.join("; "));
    let _ = writeln!(
        out,
        "- commands per op, bare redis-rs (check of the method, expect 1.00): {}",
        checks.join("; ")
    );
    let _ = writeln!(
        out,
        "- connections opened during a run, most in any repeat, bare / manager (expect 0 / 0): {}",
        connections.join("; ")
    );
    let _ = writeln!(out, "- {}", cpu::disturbance(cells));
    out
}
