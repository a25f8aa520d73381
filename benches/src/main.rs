//! Load generator and comparison benchmarks for tower-redis.
//!
//! ```text
//! cargo run --release -p benches -- core
//! cargo run --release -p benches --features peers -- ratelimit
//! cargo run --release -p benches --features peers -- cache
//! cargo run --release -p benches --features peers -- session
//! cargo run --release -p benches -- all --duration-secs 5
//! ```
//!
//! Every suite runs against a disposable Redis from
//! `tower_redis_core::testing::TestRedis`, or against `REDIS_URL` when it is
//! set, and prints a markdown report on stdout (progress goes to stderr).
//! See `benches/README.md` for what the columns mean and measured numbers.

// A benchmark's job is to print its report on stdout.
#![allow(clippy::print_stdout)]

mod cache_suite;
mod core_suite;
mod cpu;
mod error;
mod http_load;
mod load;
mod ratelimit_suite;
mod report;
mod server;
mod session_suite;

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
}

impl Suite {
    /// Every suite, in the order `all` runs them.
    const ALL: &'static [Suite] = &[Suite::Core, Suite::RateLimit, Suite::Cache, Suite::Session];

    fn name(self) -> &'static str {
        match self {
            Suite::Core => "core",
            Suite::RateLimit => "ratelimit",
            Suite::Cache => "cache",
            Suite::Session => "session",
        }
    }

    fn about(self) -> &'static str {
        match self {
            Suite::Core => {
                "GET ops/s through RedisManager vs a bare redis-rs MultiplexedConnection"
            }
            Suite::RateLimit => {
                "HTTP requests/s of an axum route with and without RateLimitLayer (tower_governor with --features peers)"
            }
            Suite::Cache => {
                "HTTP requests/s of a 20 ms origin behind CacheLayer, hits only (axum-response-cache, http-cache-tower-server with --features peers)"
            }
            Suite::Session => {
                "HTTP requests/s of session reads and writes with SessionLayer (tower-sessions + redis store with --features peers)"
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
    /// How many times each (baseline, subject) pair is repeated; the report
    /// shows medians.
    repeats: usize,
    /// The numbers of concurrent tasks to measure at.
    concurrency: Vec<usize>,
    /// The manager's pool size; `None` keeps the `RedisConfig` default.
    pool_size: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            repeats: 3,
            concurrency: vec![1, 16, 64],
            pool_size: None,
        }
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
        "usage: cargo run --release -p benches -- <suite> [options]\n\nsuites:\n  all        every suite below, in order\n",
    );
    for suite in Suite::ALL {
        text.push_str(&format!("  {:<10} {}\n", suite.name(), suite.about()));
    }
    text.push_str(
        "\noptions:\n\
         \x20 --duration-secs N   measured time per cell, in seconds (default 2)\n\
         \x20 --warmup-secs N     un-measured time before each cell, in seconds (default 0.5)\n\
         \x20 --repeats N         runs of each pair; the report shows medians (default 3)\n\
         \x20 --concurrency LIST  comma-separated task counts (default 1,16,64)\n\
         \x20 --pool-size N       RedisManager pool size (default: RedisConfig's default)\n\
         \x20 -h, --help          this text\n\
         \nRedis: a disposable server from tower_redis_core::testing::TestRedis,\n\
         or the server at REDIS_URL when that is set.\n",
    );
    text
}

fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut options = Options::default();
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
            "--duration-secs" => {
                options.duration = parse_secs("--duration-secs", &value("--duration-secs")?, false)?
            }
            "--warmup-secs" => {
                options.warmup = parse_secs("--warmup-secs", &value("--warmup-secs")?, true)?
            }
            "--repeats" => options.repeats = parse_positive("--repeats", &value("--repeats")?)?,
            "--concurrency" => {
                options.concurrency = value("--concurrency")?
                    .split(',')
                    .map(|part| parse_positive("--concurrency", part.trim()))
                    .collect::<Result<_, _>>()?;
            }
            "--pool-size" => {
                let size = parse_positive("--pool-size", &value("--pool-size")?)?;
                options.pool_size =
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
    Ok(Command::Run { suites, options })
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
    let (suites, options) = match parse_args(std::env::args().skip(1)) {
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
        parse_args(args.iter().map(|s| (*s).to_owned()))
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
    }

    #[test]
    fn ratelimit_by_name() {
        let Ok(Command::Run { suites, .. }) = parse(&["ratelimit"]) else {
            panic!("`ratelimit` should parse");
        };
        assert_eq!(suites, vec![Suite::RateLimit]);
    }

    #[test]
    fn cache_and_session_by_name() {
        for (name, suite) in [("cache", Suite::Cache), ("session", Suite::Session)] {
            let Ok(Command::Run { suites, .. }) = parse(&[name]) else {
                panic!("`{name}` should parse");
            };
            assert_eq!(suites, vec![suite]);
        }
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
        let Ok(Command::Run { options, .. }) = parse(&[
            "--duration-secs",
            "5",
            "core",
            "--warmup-secs=0",
            "--concurrency",
            "2, 8",
            "--repeats=1",
            "--pool-size",
            "1",
        ]) else {
            panic!("should parse");
        };
        assert_eq!(options.duration, Duration::from_secs(5));
        assert_eq!(options.warmup, Duration::ZERO);
        assert_eq!(options.concurrency, vec![2, 8]);
        assert_eq!(options.repeats, 1);
        assert_eq!(options.pool_size, Some(1));
    }

    #[test]
    fn mistakes_are_usage_errors() {
        assert_eq!(parse(&["nope"]), Err("unknown suite `nope`".to_owned()));
        assert!(parse(&[]).is_err());
        assert!(parse(&["core", "--duration-secs"]).is_err());
        assert!(parse(&["core", "--duration-secs", "0"]).is_err());
        assert!(parse(&["core", "--concurrency", "1,0"]).is_err());
        assert!(parse(&["core", "--frobnicate"]).is_err());
        assert!(parse(&["core", "all"]).is_err());
        assert_eq!(parse(&["core", "--help"]), Ok(Command::Help));
    }
}
