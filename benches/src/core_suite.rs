//! Suite `core`: what the connection manager costs per operation.
//!
//! The operation is one `GET` of an existing key holding 100 bytes, made
//! on a bare redis-rs `MultiplexedConnection` (one connection, cloned into
//! every task: what an app without tower-redis would do), through
//! `RedisManager::query` (breaker check, command timeout, pool checkout),
//! and by `redis-benchmark` (Redis' own C client) at the same concurrency.

use tower_redis_core::{RedisConfig, RedisManager};

use crate::Options;
use crate::cells::{Cell, run_interleaved};
use crate::error::BenchError;
use crate::grid::{Grid, Section, timing};
use crate::raw::{RawClient, RawPlan, RawShape, RawValue, RedisBenchmark};
use crate::report::Target;
use crate::server::BenchRedis;

/// The key every `GET` reads.
const KEY: &str = "tower-redis-bench:core:value";
/// Size of the value under [`KEY`].
const VALUE_LEN: usize = 100;
/// The target for manager / bare throughput.
const TARGET_RATIO: f64 = 0.9;

const BARE: usize = 0;
const MANAGER: usize = 1;

/// Runs the suite and returns its markdown section.
pub(crate) async fn run(redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
    let value = RawValue::put(redis, KEY, VALUE_LEN).await?;
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
    let shape = RawShape::one_get();
    let cells = vec![
        Cell::redis(
            "bare redis-rs MultiplexedConnection",
            "bare",
            RawClient::Bare(bare),
            RawPlan::new(&shape, &value),
        ),
        Cell::redis(
            "RedisManager::query",
            "manager",
            RawClient::Manager(manager),
            RawPlan::new(&shape, &value),
        ),
        Cell::benchmark(
            "redis-benchmark (C client, GET of the same key)",
            "redis-benchmark",
            RedisBenchmark::find(redis, &value),
        ),
    ];
    let rows = run_interleaved(redis, "core", &cells, options).await?;
    let grid = Grid::new("concurrency", &cells, rows);

    let mut section = Section::new(
        &format!(
            "core: one GET of a {VALUE_LEN}-byte value, RedisManager vs bare redis-rs vs redis-benchmark"
        ),
        &format!(
            "{}. Manager: RedisConfig defaults with pool_size {pool_size}. Bare: one MultiplexedConnection \
             (redis-rs defaults) cloned into every task. redis-benchmark: `-c <concurrency> -n <about the \
             measured time's worth> -q --csv GET {KEY}` (no warm-up; it reports no p99.9).",
            timing(options, true)
        ),
    );
    section.table(&grid.table(&[(BARE, "bare redis-rs")]));
    let mut target = Target::new(format!("manager / bare redis-rs ≥ {TARGET_RATIO:.2}"));
    grid.check_ratio(&mut target, MANAGER, BARE, TARGET_RATIO, |_| true);
    section.target(&target);
    let mut one_command = Target::new("one Redis command per manager operation");
    grid.check_commands(&mut one_command, MANAGER, 1.0);
    section.target(&one_command);
    section.note(format!(
        "manager / bare, median (per repeat): {}",
        grid.spread(MANAGER, BARE)
    ));
    let connections: Vec<String> = grid
        .rows
        .iter()
        .map(|row| {
            let most = |cell: usize| {
                row.samples[cell]
                    .iter()
                    .map(|s| s.new_connections)
                    .max()
                    .unwrap_or(0)
            };
            format!("{}: {} / {}", row.name, most(BARE), most(MANAGER))
        })
        .collect();
    section.note(format!(
        "connections Redis accepted during a cell, most in any repeat, bare / manager (expect 0 / 0): {}",
        connections.join("; ")
    ));
    for note in grid.notes() {
        section.note(note);
    }
    section.gap();
    Ok(section.finish())
}
