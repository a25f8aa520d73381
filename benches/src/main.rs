//! Load generator and comparison benchmarks for tower-redis.
//!
//! ```text
//! cargo run --release -p benches -- core
//! cargo run --release -p benches --features peers -- ratelimit
//! cargo run --release -p benches --features peers -- cache
//! cargo run --release -p benches --features peers -- session
//! cargo run --release -p benches --features peers -- stack
//! cargo run --release -p benches --features peers -- data
//! cargo run --release -p benches -- failover --quick
//! cargo run --release -p benches --features peers -- all --quick
//! ```
//!
//! Every suite runs against a disposable Redis from
//! `tower_redis_core::testing::TestRedis`, or against `REDIS_URL` when it is
//! set, and prints a markdown report on stdout (progress goes to stderr).
//! See `benches/README.md` for what the columns mean and measured numbers.

// A benchmark's job is to print its report on stdout.
#![allow(clippy::print_stdout)]

mod cache_suite;
mod cells;
mod core_suite;
mod cpu;
mod data_suite;
mod degraded;
mod error;
mod failover_suite;
mod grid;
mod http_load;
mod keys;
mod load;
mod ratelimit_suite;
mod raw;
mod report;
mod server;
mod session_suite;
mod stack_suite;

use std::process::ExitCode;
use std::time::Duration;

use crate::error::BenchError;
use crate::server::BenchRedis;

/// Exit code for a command line that cannot be run (unknown suite, bad option).
const USAGE_EXIT: u8 = 2;

/// The suites this binary knows. Add a variant, its name, its description
/// and its `run` arm to add a suite; `all` picks it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suite {
    /// `RedisManager` vs a bare redis-rs `MultiplexedConnection`.
    Core,
    /// An axum route over TCP with and without `RateLimitLayer` (and peers).
    RateLimit,
    /// An axum route behind a slow origin with and without `CacheLayer` (and peers).
    Cache,
    /// Session reads and writes with `SessionLayer` (and tower-sessions).
    Session,
    /// Rate limit + cache + session on one route.
    Stack,
    /// `DataCache::get_or_insert_with` vs bare GET + serde, moka (and amalgam-cache).
    Data,
    /// The stack through a Sentinel and a Cluster failover; cache hits from replicas.
    Failover,
}

impl Suite {
    /// Every suite, in the order `all` runs them.
    const ALL: &'static [Suite] = &[
        Suite::Core,
        Suite::RateLimit,
        Suite::Cache,
        Suite::Session,
        Suite::Stack,
        Suite::Data,
        Suite::Failover,
    ];

    fn name(self) -> &'static str {
        match self {
            Suite::Core => "core",
            Suite::RateLimit => "ratelimit",
            Suite::Cache => "cache",
            Suite::Session => "session",
            Suite::Stack => "stack",
            Suite::Data => "data",
            Suite::Failover => "failover",
        }
    }

    fn about(self) -> &'static str {
        match self {
            Suite::Core => {
                "GET ops/s through RedisManager vs a bare redis-rs MultiplexedConnection and redis-benchmark"
            }
            Suite::RateLimit => {
                "HTTP requests/s with and without RateLimitLayer (tower_governor with --features peers), degraded mode, Redis memory per client key"
            }
            Suite::Cache => {
                "HTTP requests/s of a 20 ms origin behind CacheLayer, hits only, by concurrency and payload (axum-response-cache, http-cache-tower-server with --features peers), degraded mode"
            }
            Suite::Session => {
                "HTTP requests/s of session reads and writes with SessionLayer (tower-sessions + redis store with --features peers), degraded mode, Redis memory per session"
            }
            Suite::Stack => {
                "HTTP requests/s of one route behind rate limit + cache + session vs no layer and raw Redis, degraded mode"
            }
            Suite::Data => {
                "DataCache::get_or_insert_with hit, miss and near hit vs bare redis-rs GET + serde and moka (amalgam-cache with --features peers), the herd across two instances"
            }
            Suite::Failover => {
                "rate limit + cache + session on two instances through one Sentinel and one Cluster failover (failed and degraded requests, recovery time, rate-limit overshoot); cache hits/s on a 3+3 cluster with and without read_from_replicas"
            }
        }
    }

    /// The suites a command-line name stands for (`all` stands for every one).
    fn select(name: &str) -> Option<Vec<Suite>> {
        if name == "all" {
            return Some(Self::ALL.to_vec());
        }
        Self::ALL
            .iter()
            .copied()
            .find(|s| s.name() == name)
            .map(|s| vec![s])
    }

    /// Runs the suite and returns its markdown report.
    async fn run(self, redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
        match self {
            Suite::Core => core_suite::run(redis, options).await,
            Suite::RateLimit => ratelimit_suite::run(redis, options).await,
            Suite::Cache => cache_suite::run(redis, options).await,
            Suite::Session => session_suite::run(redis, options).await,
            Suite::Stack => stack_suite::run(redis, options).await,
            Suite::Data => data_suite::run(redis, options).await,
            Suite::Failover => failover_suite::run(redis, options).await,
        }
    }
}

/// Knobs shared by every suite.
#[derive(Debug, Clone, PartialEq)]
struct Options {
    /// How long each cell is measured.
    duration: Duration,
    /// How long each cell runs before measuring starts.
    warmup: Duration,
    /// How many times each group of cells is repeated; the report shows medians.
    repeats: usize,
    /// The numbers of concurrent tasks to measure at.
    concurrency: Vec<usize>,
    /// The manager's pool size; `None` keeps the `RedisConfig` default.
    pool_size: Option<u32>,
    /// Checkpoints (ascending) of the distinct-key memory tables.
    keys: Vec<u64>,
    /// Body sizes of the cache's payload table, in bytes.
    payloads: Vec<usize>,
    /// Whether this is the `--quick` preset (said in the report).
    quick: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            repeats: 3,
            concurrency: vec![1, 16, 64, 256],
            pool_size: None,
            keys: vec![1, 1_000, 100_000, 1_000_000],
            payloads: vec![1 << 10, 64 << 10, 1 << 20],
            quick: false,
        }
    }
}

impl Options {
    /// The CI-size preset of `--quick` / `BENCH_QUICK=1`: short cells, one
    /// repeat, fewer concurrencies and keys.
    fn quick() -> Self {
        Self {
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(200),
            repeats: 1,
            concurrency: vec![1, 64, 256],
            keys: vec![1, 1_000, 10_000],
            quick: true,
            ..Self::default()
        }
    }

    /// One line for the report: the preset and the knobs.
    fn describe(&self) -> String {
        let list = |v: Vec<String>| v.join(",");
        format!(
            "options: {}--duration-secs {} --warmup-secs {} --repeats {} --concurrency {} --keys {} --payloads {}{}",
            if self.quick { "--quick " } else { "" },
            self.duration.as_secs_f64(),
            self.warmup.as_secs_f64(),
            self.repeats,
            list(self.concurrency.iter().map(usize::to_string).collect()),
            list(self.keys.iter().map(u64::to_string).collect()),
            list(
                self.payloads
                    .iter()
                    .map(|p| report::bytes(*p as f64).replace(' ', ""))
                    .collect()
            ),
            self.pool_size
                .map(|p| format!(" --pool-size {p}"))
                .unwrap_or_default(),
        )
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Help,
    Run {
        suites: Vec<Suite>,
        options: Options,
    },
}

fn usage() -> String {
    let mut text = String::from(
        "usage: cargo run --release -p benches [--features peers] -- <suite> [options]\n\nsuites:\n  all        every suite below, in order\n",
    );
    for suite in Suite::ALL {
        text.push_str(&format!("  {:<10} {}\n", suite.name(), suite.about()));
    }
    text.push_str(
        "\noptions:\n\
         \x20 --quick             CI-size preset (also BENCH_QUICK=1): 0.5 s cells, 0.2 s warm-up, 1 repeat,\n\
         \x20                     concurrency 1,64,256, keys 1,1000,10000; options given too override it\n\
         \x20 --duration-secs N   measured time per cell, in seconds (default 2)\n\
         \x20 --warmup-secs N     un-measured time before each cell, in seconds (default 0.5)\n\
         \x20 --repeats N         runs of each group of cells; the report shows medians (default 3)\n\
         \x20 --concurrency LIST  comma-separated task counts (default 1,16,64,256)\n\
         \x20 --keys LIST         distinct-key checkpoints of the memory tables (default 1,1000,100000,1000000)\n\
         \x20 --payloads LIST     cache body sizes, e.g. 1K,64K,1M (default 1K,64K,1M)\n\
         \x20 --pool-size N       RedisManager pool size (default: RedisConfig's default)\n\
         \x20 -h, --help          this text\n\
         \nRedis: a disposable server from tower_redis_core::testing::TestRedis,\n\
         or the server at REDIS_URL when that is set (degraded-mode sections always\n\
         start their own TestRedis, which they kill and restart).\n",
    );
    text
}

/// Options given on the command line, applied over the preset.
#[derive(Debug, Default)]
struct Overrides {
    duration: Option<Duration>,
    warmup: Option<Duration>,
    repeats: Option<usize>,
    concurrency: Option<Vec<usize>>,
    pool_size: Option<u32>,
    keys: Option<Vec<u64>>,
    payloads: Option<Vec<usize>>,
}

/// Parses the arguments; `quick_env` is whether `BENCH_QUICK` asks for the
/// quick preset.
fn parse_args<I: IntoIterator<Item = String>>(args: I, quick_env: bool) -> Result<Command, String> {
    let mut set = Overrides::default();
    let mut quick = quick_env;
    let mut suite_name = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--quick" => quick = true,
            "--duration-secs" => {
                set.duration = Some(parse_secs(
                    "--duration-secs",
                    &value("--duration-secs")?,
                    false,
                )?)
            }
            "--warmup-secs" => {
                set.warmup = Some(parse_secs("--warmup-secs", &value("--warmup-secs")?, true)?)
            }
            "--repeats" => set.repeats = Some(parse_positive("--repeats", &value("--repeats")?)?),
            "--concurrency" => {
                set.concurrency = Some(parse_list(
                    "--concurrency",
                    &value("--concurrency")?,
                    |p| parse_positive("--concurrency", p),
                )?);
            }
            "--keys" => {
                let mut keys = parse_list("--keys", &value("--keys")?, |p| {
                    parse_positive("--keys", p).map(|n| n as u64)
                })?;
                keys.sort_unstable();
                keys.dedup();
                set.keys = Some(keys);
            }
            "--payloads" => {
                set.payloads = Some(parse_list("--payloads", &value("--payloads")?, parse_size)?);
            }
            "--pool-size" => {
                let size = parse_positive("--pool-size", &value("--pool-size")?)?;
                set.pool_size =
                    Some(u32::try_from(size).map_err(|_| "--pool-size is too large".to_owned())?);
            }
            other if other.starts_with('-') => return Err(format!("unknown option `{other}`")),
            name => {
                if let Some(first) = &suite_name {
                    return Err(format!(
                        "one suite at a time (got `{first}` and `{name}`); use `all` for every suite"
                    ));
                }
                suite_name = Some(name.to_owned());
            }
        }
    }
    let name = suite_name.ok_or_else(|| "no suite given".to_owned())?;
    let suites = Suite::select(&name).ok_or_else(|| format!("unknown suite `{name}`"))?;
    let base = if quick {
        Options::quick()
    } else {
        Options::default()
    };
    let options = Options {
        duration: set.duration.unwrap_or(base.duration),
        warmup: set.warmup.unwrap_or(base.warmup),
        repeats: set.repeats.unwrap_or(base.repeats),
        concurrency: set.concurrency.unwrap_or(base.concurrency),
        pool_size: set.pool_size.or(base.pool_size),
        keys: set.keys.unwrap_or(base.keys),
        payloads: set.payloads.unwrap_or(base.payloads),
        quick,
    };
    Ok(Command::Run { suites, options })
}

fn parse_list<T>(
    flag: &str,
    text: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let items: Vec<T> = text
        .split(',')
        .map(|part| parse(part.trim()))
        .collect::<Result<_, _>>()?;
    if items.is_empty() {
        return Err(format!("{flag} needs at least one value"));
    }
    Ok(items)
}

/// `1024`, `64K`, `1M` (binary units, `KiB`/`MiB` accepted too).
fn parse_size(text: &str) -> Result<usize, String> {
    let upper = text.to_ascii_uppercase();
    let (digits, unit) = match upper.trim_end_matches("IB").trim_end_matches('B') {
        t if t.ends_with('K') => (&t[..t.len() - 1], 1usize << 10),
        t if t.ends_with('M') => (&t[..t.len() - 1], 1usize << 20),
        t => (t, 1),
    };
    match digits.trim().parse::<usize>() {
        Ok(n) if n > 0 && n.checked_mul(unit).is_some_and(|b| b <= 64 << 20) => Ok(n * unit),
        _ => Err(format!(
            "--payloads takes sizes from 1 byte to 64M such as 1K,64K,1M, not `{text}`"
        )),
    }
}

fn parse_secs(flag: &str, text: &str, zero_ok: bool) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{flag} takes a number of seconds, not `{text}`"))?;
    let valid = secs.is_finite() && (secs > 0.0 || (zero_ok && secs == 0.0)) && secs < 86_400.0;
    if !valid {
        let range = if zero_ok { "0 or more" } else { "more than 0" };
        return Err(format!(
            "{flag} must be {range} (and under a day), not `{text}`"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_positive(flag: &str, text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{flag} takes a whole number above 0, not `{text}`")),
    }
}

fn main() -> ExitCode {
    let quick_env = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let (suites, options) = match parse_args(std::env::args().skip(1), quick_env) {
        Ok(Command::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run { suites, options }) => (suites, options),
        Err(message) => {
            eprintln!("error: {message}\n\n{}", usage());
            return ExitCode::from(USAGE_EXIT);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&suites, &options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(suites: &[Suite], options: &Options) -> Result<(), BenchError> {
    let redis = BenchRedis::start().await?;
    println!("{}", redis.machine_description().await?);
    println!();
    println!("{}", options.describe());
    println!();
    for suite in suites {
        eprintln!("running suite `{}`", suite.name());
        let report = suite.run(&redis, options).await?;
        println!("{report}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()), false)
    }

    fn options(args: &[&str]) -> Options {
        match parse(args) {
            Ok(Command::Run { options, .. }) => options,
            other => panic!("{args:?} should parse, got {other:?}"),
        }
    }

    #[test]
    fn core_with_defaults() {
        assert_eq!(
            parse(&["core"]),
            Ok(Command::Run {
                suites: vec![Suite::Core],
                options: Options::default()
            })
        );
        assert_eq!(Options::default().concurrency, vec![1, 16, 64, 256]);
    }

    #[test]
    fn every_suite_by_name() {
        for suite in Suite::ALL {
            let Ok(Command::Run { suites, .. }) = parse(&[suite.name()]) else {
                panic!("`{}` should parse", suite.name());
            };
            assert_eq!(suites, vec![*suite]);
        }
        assert!(Suite::ALL.contains(&Suite::Stack));
    }

    #[test]
    fn all_selects_every_suite() {
        let Ok(Command::Run { suites, .. }) = parse(&["all"]) else {
            panic!("`all` should parse");
        };
        assert_eq!(suites, Suite::ALL);
    }

    #[test]
    fn options_in_both_spellings() {
        let options = options(&[
            "--duration-secs",
            "5",
            "core",
            "--warmup-secs=0",
            "--concurrency",
            "2, 8",
            "--repeats=1",
            "--pool-size",
            "1",
            "--keys=1000,1,10",
            "--payloads",
            "1K,64KiB,1M,100",
        ]);
        assert_eq!(options.duration, Duration::from_secs(5));
        assert_eq!(options.warmup, Duration::ZERO);
        assert_eq!(options.concurrency, vec![2, 8]);
        assert_eq!(options.repeats, 1);
        assert_eq!(options.pool_size, Some(1));
        assert_eq!(options.keys, vec![1, 10, 1000]);
        assert_eq!(options.payloads, vec![1024, 65_536, 1 << 20, 100]);
    }

    #[test]
    fn quick_preset_by_flag_or_environment_and_overridable() {
        assert_eq!(options(&["all", "--quick"]), Options::quick());
        let from_env = match parse_args(["all".to_owned()], true) {
            Ok(Command::Run { options, .. }) => options,
            other => panic!("should parse, got {other:?}"),
        };
        assert_eq!(from_env, Options::quick());
        let quick = options(&["--concurrency", "4", "--quick", "cache"]);
        assert!(quick.quick);
        assert_eq!(quick.concurrency, vec![4]);
        assert_eq!(quick.repeats, 1);
        assert!(Options::quick().keys.iter().all(|k| *k <= 10_000));
        assert!(Options::quick().describe().starts_with("options: --quick "));
    }

    #[test]
    fn mistakes_are_usage_errors() {
        assert_eq!(parse(&["nope"]), Err("unknown suite `nope`".to_owned()));
        assert!(parse(&[]).is_err());
        assert!(parse(&["core", "--duration-secs"]).is_err());
        assert!(parse(&["core", "--duration-secs", "0"]).is_err());
        assert!(parse(&["core", "--concurrency", "1,0"]).is_err());
        assert!(parse(&["core", "--payloads", "1G"]).is_err());
        assert!(parse(&["core", "--payloads", "0"]).is_err());
        assert!(parse(&["core", "--keys", "x"]).is_err());
        assert!(parse(&["core", "--frobnicate"]).is_err());
        assert!(parse(&["core", "all"]).is_err());
        assert_eq!(parse(&["core", "--help"]), Ok(Command::Help));
    }
}
