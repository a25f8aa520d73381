//! Suite `data`: the data cache (`DataCache::get_or_insert_with`) against
//! what an app writes by hand, and against in-process caches.
//!
//! The value is a small serde struct (a product row, about 150 bytes of
//! JSON). Three tables, run interleaved (every subject of a table once per
//! concurrency and repeat, in turn):
//!
//! - **hit**: `get_or_insert_with` on a stored value (Redis tier, near tier
//!   off) vs a bare redis-rs `GET` + `serde_json::from_slice` of the same
//!   bytes on one `MultiplexedConnection`;
//! - **miss**: `get_or_insert_with` on a new key each call (the factory
//!   returns at once) vs a bare `GET` (nil) + encode + `SET EX`;
//! - **near hit**: `get_or_insert_with` answered by the near tier vs `moka`
//!   alone (a typed `moka::sync::Cache` get) and, with `--features peers`,
//!   `amalgam-cache` (a FusionCache port) answered by its memory tier.
//!
//! Then the thundering herd: 100 concurrent calls for one new key, half on
//! each of two instances (two managers, two data caches) sharing the Redis,
//! with a 50 ms factory; the factory calls are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tower_redis_cache::data::{DataCache, DataOptions};
use tower_redis_core::redis::{self, aio::MultiplexedConnection};
use tower_redis_core::{RedisConfig, RedisManager};

use crate::Options;
use crate::error::BenchError;
use crate::grid::Section;
use crate::load::{self, LoadResult, LoadSpec, Operation};
use crate::report::{Table, Target, fixed2, median, micros, thousands};
use crate::server::BenchRedis;

/// Key prefix of the data caches (their keys are deleted after the suite).
const PREFIX: &str = "tower-redis-bench:data";
/// The bare baseline's key.
const BARE_KEY: &str = "tower-redis-bench:data-bare:product:1";
/// The data cache's key of the stored value.
const HIT_KEY: &str = "product:1";
/// The targets: hit / bare GET+decode and near hit / moka.
const TARGET_RATIO: f64 = 0.9;
/// Concurrent calls in the herd.
const HERD: usize = 100;
/// How long the herd's factory takes.
const HERD_FACTORY: Duration = Duration::from_millis(50);

/// The cached value: a product row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u32,
    name: String,
    description: String,
    price_cents: u64,
    stock: u32,
    tags: Vec<String>,
}

fn product(id: u32) -> Product {
    Product {
        id,
        name: format!("Product {id}"),
        description: "A sturdy stoneware mug, 350 ml, dishwasher safe.".to_owned(),
        price_cents: 1_250,
        stock: 42,
        tags: vec!["kitchen".to_owned(), "mugs".to_owned()],
    }
}

// Each subject's operation holds what it needs and borrows it for the
// call: no per-call clone of a connection, a cache or its options, so the
// tables compare the calls themselves.

/// `GET` + decode on a multiplexed connection.
struct BareHitOp(MultiplexedConnection);

impl Operation for BareHitOp {
    type Error = String;

    async fn call(&mut self) -> Result<(), String> {
        let bytes: Vec<u8> = redis::cmd("GET")
            .arg(BARE_KEY)
            .query_async(&mut self.0)
            .await
            .map_err(|e| e.to_string())?;
        let value: Product = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        check(&value.id, &1)
    }
}

/// `GET` (nil) + encode + `SET EX` of a new key.
struct BareMissOp(MultiplexedConnection, Arc<AtomicU64>);

impl Operation for BareMissOp {
    type Error = String;

    async fn call(&mut self) -> Result<(), String> {
        let n = self.1.fetch_add(1, Ordering::Relaxed);
        let key = format!("{PREFIX}-bare:miss:{n}");
        let found: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.0)
            .await
            .map_err(|e| e.to_string())?;
        if found.is_some() {
            return Err(format!("{key} was already there"));
        }
        let value = product(1);
        let bytes = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(bytes)
            .arg("EX")
            .arg(60)
            .query_async(&mut self.0)
            .await
            .map_err(|e| e.to_string())?;
        check(&value.id, &1)
    }
}

/// `get_or_insert_with` of the stored value (its factory must not run).
struct DataHitOp(DataCache, DataOptions);

impl Operation for DataHitOp {
    type Error = String;

    async fn call(&mut self) -> Result<(), String> {
        let value: Product = self
            .0
            .get_or_insert_with(HIT_KEY, &self.1, || async {
                Err::<Product, &str>("the value should be cached")
            })
            .await
            .map_err(|e| e.to_string())?;
        check(&value.id, &1)
    }
}

/// `get_or_insert_with` of a new key, the factory answering at once.
struct DataMissOp(DataCache, DataOptions, Arc<AtomicU64>);

impl Operation for DataMissOp {
    type Error = String;

    async fn call(&mut self) -> Result<(), String> {
        let n = self.2.fetch_add(1, Ordering::Relaxed);
        let key = format!("miss:{n}");
        let value: Product = self
            .0
            .get_or_insert_with(&key, &self.1, || async { Ok::<_, &str>(product(1)) })
            .await
            .map_err(|e| e.to_string())?;
        check(&value.id, &1)
    }
}

/// A typed `moka::sync::Cache::get`.
struct MokaOp(moka::sync::Cache<String, Product>);

impl Operation for MokaOp {
    type Error = String;

    async fn call(&mut self) -> Result<(), String> {
        match self.0.get(HIT_KEY) {
            Some(value) => check(&value.id, &1),
            None => Err("moka lost the value".to_owned()),
        }
    }
}

/// amalgam-cache's `get_or_set` of the stored value.
#[cfg(feature = "peers")]
struct AmalgamOp(amalgam::Cache<Product>);

#[cfg(feature = "peers")]
impl Operation for AmalgamOp {
    type Error = String;

    async fn call(&mut self) -> Result<(), String> {
        let value = self
            .0
            .get_or_set(HIT_KEY, |_| async {
                Ok::<_, std::convert::Infallible>(product(1))
            })
            .await
            .map_err(|e| e.to_string())?;
        check(&value.id, &1)
    }
}

/// One subject of a table: how to make task `i`'s operation.
struct Subject {
    label: &'static str,
    kind: SubjectKind,
}

enum SubjectKind {
    BareHit(MultiplexedConnection),
    BareMiss(MultiplexedConnection, Arc<AtomicU64>),
    DataHit(DataCache, DataOptions),
    DataMiss(DataCache, DataOptions, Arc<AtomicU64>),
    Moka(moka::sync::Cache<String, Product>),
    #[cfg(feature = "peers")]
    Amalgam(amalgam::Cache<Product>),
    /// A peer left out of the build, and why.
    #[cfg_attr(feature = "peers", allow(dead_code))]
    Missing(String),
}

/// What one subject did in one cell.
struct Sample {
    ops_per_sec: f64,
    p50: f64,
    p99: f64,
    commands_per_op: f64,
}

fn check<T: PartialEq + std::fmt::Debug>(got: &T, want: &T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("wrong value: {got:?}"))
    }
}

async fn measure_subject(
    redis: &BenchRedis,
    subject: &Subject,
    spec: LoadSpec,
) -> Result<Option<Sample>, BenchError> {
    let before = redis.command_calls().await?;
    let result: LoadResult = match &subject.kind {
        SubjectKind::Missing(_) => return Ok(None),
        SubjectKind::BareHit(conn) => load::run(spec, |_| BareHitOp(conn.clone())).await?,
        SubjectKind::BareMiss(conn, next) => {
            load::run(spec, |_| BareMissOp(conn.clone(), Arc::clone(next))).await?
        }
        SubjectKind::DataHit(data, options) => {
            load::run(spec, |_| DataHitOp(data.clone(), options.clone())).await?
        }
        SubjectKind::DataMiss(data, options, next) => {
            load::run(spec, |_| {
                DataMissOp(data.clone(), options.clone(), Arc::clone(next))
            })
            .await?
        }
        SubjectKind::Moka(cache) => load::run(spec, |_| MokaOp(cache.clone())).await?,
        #[cfg(feature = "peers")]
        SubjectKind::Amalgam(cache) => load::run(spec, |_| AmalgamOp(cache.clone())).await?,
    };
    result.require_no_errors(subject.label)?;
    let after = redis.command_calls().await?;
    let commands: u64 = after.deltas(&before).values().map(|s| s.calls).sum();
    Ok(Some(Sample {
        ops_per_sec: result.ops_per_sec(),
        p50: result.latency_us(0.5),
        p99: result.latency_us(0.99),
        commands_per_op: commands as f64 / result.calls.max(1) as f64,
    }))
}

/// A table's samples: `[concurrency][subject][repeat]`.
type Samples = Vec<Vec<Vec<Sample>>>;

async fn run_table(
    redis: &BenchRedis,
    name: &str,
    subjects: &[Subject],
    options: &Options,
) -> Result<Samples, BenchError> {
    let mut all: Samples = Vec::new();
    for &concurrency in &options.concurrency {
        let mut per_subject: Vec<Vec<Sample>> = subjects.iter().map(|_| Vec::new()).collect();
        for repeat in 0..options.repeats {
            for (i, subject) in subjects.iter().enumerate() {
                let spec = LoadSpec {
                    concurrency,
                    warmup: options.warmup,
                    duration: options.duration,
                };
                if let Some(sample) = measure_subject(redis, subject, spec).await? {
                    eprintln!(
                        "data/{name}: c={concurrency} repeat {} {}: {} ops/s",
                        repeat + 1,
                        subject.label,
                        thousands(sample.ops_per_sec)
                    );
                    per_subject[i].push(sample);
                }
            }
        }
        all.push(per_subject);
    }
    Ok(all)
}

/// Median over the repeats of `field`.
fn med(samples: &[Sample], field: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(field).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// The median of the per-repeat throughput ratios `of / to`.
fn ratio(of: &[Sample], to: &[Sample]) -> f64 {
    let ratios: Vec<f64> = of
        .iter()
        .zip(to)
        .map(|(a, b)| a.ops_per_sec / b.ops_per_sec)
        .collect();
    median(&ratios).unwrap_or(f64::NAN)
}

fn render(
    subjects: &[Subject],
    samples: &Samples,
    options: &Options,
    baseline: usize,
    baseline_name: &str,
) -> Table {
    let mut table = Table::new([
        "concurrency".to_owned(),
        "subject".to_owned(),
        "ops/s".to_owned(),
        "p50 µs".to_owned(),
        "p99 µs".to_owned(),
        format!("ratio to {baseline_name}"),
        "Redis commands / op".to_owned(),
    ])
    .left_aligned(2);
    for (c, per_subject) in samples.iter().enumerate() {
        for (i, subject) in subjects.iter().enumerate() {
            let concurrency = options.concurrency[c].to_string();
            if let SubjectKind::Missing(why) = &subject.kind {
                table.row([concurrency, subject.label.to_owned(), why.clone()]);
                continue;
            }
            let mine = &per_subject[i];
            table.row([
                concurrency,
                subject.label.to_owned(),
                thousands(med(mine, |s| s.ops_per_sec)),
                micros(med(mine, |s| s.p50)),
                micros(med(mine, |s| s.p99)),
                fixed2(ratio(mine, &per_subject[baseline])),
                fixed2(med(mine, |s| s.commands_per_op)),
            ]);
        }
    }
    table
}

fn check_target(target: &mut Target, samples: &Samples, options: &Options, of: usize, to: usize) {
    for (c, per_subject) in samples.iter().enumerate() {
        target.at_least(
            format!("c={}", options.concurrency[c]),
            ratio(&per_subject[of], &per_subject[to]),
            TARGET_RATIO,
        );
    }
}

async fn manager(redis: &BenchRedis, options: &Options) -> Result<RedisManager, BenchError> {
    let pool_size = options.pool_size.unwrap_or(RedisConfig::DEFAULT_POOL_SIZE);
    let config = RedisConfig::builder()
        .url(redis.url())
        .pool_size(pool_size)
        .key_prefix(PREFIX)
        .build()?;
    let manager = RedisManager::connect(config).await?;
    if !manager.is_available() {
        return Err(BenchError::Check(format!(
            "the manager cannot reach Redis: {:?}",
            manager.health()
        )));
    }
    Ok(manager)
}

/// Deletes every key the suite wrote. `KEYS` over the miss table's keys
/// (each miss writes a value and its index records) outlasted the admin
/// connection's response timeout, and left them to expire.
async fn clean(redis: &BenchRedis) -> Result<(), BenchError> {
    for pattern in [format!("{PREFIX}*"), format!("{{{PREFIX}}}*")] {
        crate::http_load::clear_matching(redis, &pattern).await?;
    }
    Ok(())
}

/// Runs the suite and returns its markdown section.
pub(crate) async fn run(redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
    clean(redis).await?;
    let value = product(1);
    let encoded = serde_json::to_vec(&value)
        .map_err(|e| BenchError::Check(format!("the product does not encode: {e}")))?;
    let mut admin = redis.admin();
    let () = redis::cmd("SET")
        .arg(BARE_KEY)
        .arg(&encoded)
        .query_async(&mut admin)
        .await?;
    let bare = redis.client().get_multiplexed_async_connection().await?;

    let on_redis = DataCache::new(manager(redis, options).await?);
    let near_manager = manager(redis, options).await?;
    let near = DataCache::builder(near_manager)
        .near_cache(64 << 20, Duration::from_secs(600))
        .build();
    let redis_only = DataOptions::new(Duration::from_secs(3600)).near(false);
    let near_allowed = DataOptions::new(Duration::from_secs(3600));
    // Stored with the near tier allowed (a value stored `near(false)` is
    // never copied near by any instance).
    let stored: Product = on_redis
        .get_or_insert_with(HIT_KEY, &near_allowed, {
            let value = value.clone();
            move || async move { Ok::<_, &str>(value) }
        })
        .await
        .map_err(|e| BenchError::Check(format!("cannot store the value: {e}")))?;
    if stored != value {
        return Err(BenchError::Check("the stored value differs".to_owned()));
    }
    // The near instance reads it from Redis once, then keeps a copy.
    let _: Product = near
        .get_or_insert_with(HIT_KEY, &near_allowed, || async {
            Err::<Product, &str>("the value should be in Redis")
        })
        .await
        .map_err(|e| BenchError::Check(format!("the near instance cannot read it: {e}")))?;
    let moka_alone = moka::sync::Cache::builder().max_capacity(10_000).build();
    moka_alone.insert(HIT_KEY.to_owned(), value.clone());

    let mut section = Section::new(
        "data: DataCache::get_or_insert_with vs bare redis-rs GET + serde, moka and amalgam-cache",
        &format!(
            "{:.1} s measured after {:.1} s warm-up per cell; each subject of a table runs in turn at each \
             concurrency, {} time(s); medians shown; a ratio is the median of the per-repeat ratios to the \
             table's baseline of the same repeat. The value: a {}-byte JSON product row. Managers: \
             RedisConfig defaults, pool_size {}. Bare: one MultiplexedConnection cloned into every task. \
             Redis commands / op: `INFO commandstats` deltas around the cell over every call, warm-up included.",
            options.duration.as_secs_f64(),
            options.warmup.as_secs_f64(),
            options.repeats,
            encoded.len(),
            options.pool_size.unwrap_or(RedisConfig::DEFAULT_POOL_SIZE),
        ),
    );

    // Hits through Redis.
    let hit_subjects = [
        Subject {
            label: "bare GET + serde_json decode",
            kind: SubjectKind::BareHit(bare.clone()),
        },
        Subject {
            label: "get_or_insert_with hit (Redis)",
            kind: SubjectKind::DataHit(on_redis.clone(), redis_only.clone()),
        },
    ];
    let hits = run_table(redis, "hit", &hit_subjects, options).await?;
    section.subsection(
        "hit: a stored value, read from Redis",
        "The data cache's near tier is off for this value (`DataOptions::near(false)`).",
    );
    section.table(&render(&hit_subjects, &hits, options, 0, "bare"));
    let mut target = Target::new(format!(
        "get_or_insert_with hit / bare GET + decode ≥ {TARGET_RATIO:.2}"
    ));
    check_target(&mut target, &hits, options, 1, 0);
    section.target(&target);
    section.gap();

    // Misses.
    let miss_subjects = [
        Subject {
            label: "bare GET (nil) + encode + SET EX",
            kind: SubjectKind::BareMiss(bare.clone(), Arc::new(AtomicU64::new(0))),
        },
        Subject {
            label: "get_or_insert_with miss (fill lock, factory, store)",
            kind: SubjectKind::DataMiss(
                on_redis.clone(),
                DataOptions::new(Duration::from_secs(60)).near(false),
                Arc::new(AtomicU64::new(0)),
            ),
        },
    ];
    let misses = run_table(redis, "miss", &miss_subjects, options).await?;
    section.subsection(
        "miss: a new key every call, the factory answers at once",
        "What the data cache adds on a miss: the fill lock across instances, the entry's metadata and its root \
         index record (4 commands from the client: HGET, the lock script, and one pipeline of the value's \
         script and the index script; the table counts what the scripts run too). No target.",
    );
    section.table(&render(&miss_subjects, &misses, options, 0, "bare"));
    section.gap();

    // Near-tier hits.
    let mut near_subjects = vec![
        Subject {
            label: "moka alone (sync::Cache::get, typed value)",
            kind: SubjectKind::Moka(moka_alone),
        },
        Subject {
            label: "get_or_insert_with hit (near tier)",
            kind: SubjectKind::DataHit(near.clone(), near_allowed.clone()),
        },
    ];
    near_subjects.push(amalgam_subject(&value).await?);
    let nears = run_table(redis, "near", &near_subjects, options).await?;
    section.subsection(
        "near hit: answered in process",
        "The near tier keeps the value decoded beside its encoded copy: a near hit is one lookup by key \
         and a clone of the typed value, as with moka alone. amalgam-cache: its memory tier only (no \
         distributed tier), value set once.",
    );
    section.table(&render(&near_subjects, &nears, options, 0, "moka"));
    let mut target = Target::new(format!(
        "get_or_insert_with near hit / moka alone ≥ {TARGET_RATIO:.2}"
    ));
    check_target(&mut target, &nears, options, 1, 0);
    section.target(&target);
    section.gap();

    // The herd.
    let a = DataCache::new(manager(redis, options).await?);
    let b = DataCache::new(manager(redis, options).await?);
    let mut calls_per_herd = Vec::new();
    let mut target =
        Target::new("exactly 1 factory call for 100 concurrent misses on two instances");
    for repeat in 0..options.repeats {
        let calls = herd(&a, &b, &format!("herd:{repeat}")).await?;
        eprintln!("data/herd: repeat {}: {calls} factory call(s)", repeat + 1);
        if calls == 1 {
            target.at_most(format!("repeat {}", repeat + 1), calls as f64, 1.0);
        } else {
            target.missed(
                format!("repeat {}", repeat + 1),
                format!("{calls} factory calls"),
            );
        }
        calls_per_herd.push(calls.to_string());
    }
    section.subsection(
        "thundering herd across two instances",
        &format!(
            "{HERD} concurrent get_or_insert_with calls for one new key, alternating between two instances \
             (two managers, two data caches) on the same Redis; the factory takes {} ms.",
            HERD_FACTORY.as_millis()
        ),
    );
    section.note(format!(
        "factory calls per herd: {}",
        calls_per_herd.join(", ")
    ));
    section.target(&target);
    section.gap();
    // Best effort: the keys expire by themselves (miss keys after 60 s).
    if let Err(error) = clean(redis).await {
        section.note(format!(
            "the suite's keys were not all deleted ({error}); they expire"
        ));
    }
    Ok(section.finish())
}

/// `HERD` concurrent calls for `key`, alternating between `a` and `b`;
/// returns how many times the factory ran. Every caller must get the value.
async fn herd(a: &DataCache, b: &DataCache, key: &str) -> Result<usize, BenchError> {
    let calls = Arc::new(AtomicUsize::new(0));
    let options = DataOptions::new(Duration::from_secs(600)).near(false);
    let start = Arc::new(tokio::sync::Barrier::new(HERD));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..HERD {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let calls = Arc::clone(&calls);
        let options = options.clone();
        let start = Arc::clone(&start);
        let key = key.to_owned();
        tasks.spawn(async move {
            start.wait().await;
            cache
                .get_or_insert_with(&key, &options, move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(HERD_FACTORY).await;
                    Ok::<_, &str>(product(7))
                })
                .await
                .map_err(|e| e.to_string())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let value = joined
            .map_err(|e| BenchError::Check(format!("a herd task failed: {e}")))?
            .map_err(|e| BenchError::Check(format!("a herd call failed: {e}")))?;
        if value != product(7) {
            return Err(BenchError::Check(format!("a herd call got {value:?}")));
        }
    }
    Ok(calls.load(Ordering::SeqCst))
}

#[cfg(feature = "peers")]
async fn amalgam_subject(value: &Product) -> Result<Subject, BenchError> {
    let options = amalgam::EntryOptions::default().with_duration(Duration::from_secs(3600));
    let cache = amalgam::Cache::<Product>::builder()
        .default_options(options)
        .try_build()
        .map_err(|e| BenchError::Check(format!("amalgam-cache: {e}")))?;
    cache
        .set(HIT_KEY, value.clone())
        .await
        .map_err(|e| BenchError::Check(format!("amalgam-cache set: {e}")))?;
    Ok(Subject {
        label: "amalgam-cache get_or_set hit (memory tier)",
        kind: SubjectKind::Amalgam(cache),
    })
}

#[cfg(not(feature = "peers"))]
async fn amalgam_subject(_value: &Product) -> Result<Subject, BenchError> {
    Ok(Subject {
        label: "amalgam-cache get_or_set hit (memory tier)",
        kind: SubjectKind::Missing("not built (enable --features peers)".to_owned()),
    })
}
