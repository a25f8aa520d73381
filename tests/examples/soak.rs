//! Soak run: the chaos app (cache, sessions, rate limit) on two instances
//! under a steady load for many minutes, with the Redis server killed and
//! restarted every minute. Prints the process's resident memory over time
//! and checks every chaos invariant; exits non-zero when one broke or when
//! memory kept growing.
//!
//! ```sh
//! cargo run --release -p tests --example soak -- --minutes 10
//! cargo run --release -p tests --example soak -- --minutes 2 --restart-every 30
//! ```
//!
//! Not part of CI (it runs for minutes); needs a `redis-server` binary.

use std::time::{Duration, Instant};

use tests::chaos::{Instance, LATENCY_BOUND, Load, Phase, all_closed, rss_kib, tuned};
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;

/// Memory may grow this much over the first sample after warm-up before
/// the run counts as leaking.
const MAX_GROWTH: f64 = 1.5;

struct Options {
    minutes: f64,
    restart_every: Duration,
}

fn options() -> Options {
    let mut options = Options {
        minutes: 10.0,
        restart_every: Duration::from_secs(60),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<f64>().ok());
        match (args[i].as_str(), value) {
            ("--minutes", Some(minutes)) if minutes > 0.0 => options.minutes = minutes,
            ("--restart-every", Some(secs)) if secs >= 5.0 => {
                options.restart_every = Duration::from_secs_f64(secs);
            }
            _ => {
                eprintln!(
                    "usage: soak [--minutes N (default 10)] [--restart-every SECONDS (default 60, at least 5)]"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    options
}

fn log(line: &str) {
    eprintln!("{line}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let options = options();
    let total = Duration::from_secs_f64(options.minutes * 60.0);
    let redis = TestRedis::start().await;
    let instances = [
        Instance::start(redis.config()).await,
        Instance::start(redis.config()).await,
    ];
    let managers: Vec<&RedisManager> = instances.iter().map(|i| &i.manager).collect();
    let apps: Vec<_> = instances.iter().map(|i| i.app.clone()).collect();
    let mut load = Load::start("soak", &apps, 4);
    let started = Instant::now();
    let mut next_restart = started + options.restart_every;
    let mut next_sample = started;
    let mut last_restart = started;
    let mut restarts = 0u32;
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    log(&format!(
        "soak: {:.1} min, Redis killed and restarted every {:?}, latency bound {LATENCY_BOUND:?}",
        options.minutes, options.restart_every
    ));

    while started.elapsed() < total {
        let now = Instant::now();
        if now >= next_sample {
            let rss = rss_kib().unwrap_or(0);
            samples.push((started.elapsed(), rss));
            let requests: u64 = [Phase::Healthy, Phase::Outage, Phase::Recovered]
                .iter()
                .map(|p| load.requests(*p))
                .sum();
            log(&format!(
                "t={:>4}s rss={:>7} KiB requests={requests:>8} restarts={restarts} slowest={:?} violations={}",
                started.elapsed().as_secs(),
                rss,
                load.max_latency(),
                load.violations().len()
            ));
            next_sample += Duration::from_secs(10);
        }
        if now >= next_restart {
            redis.kill().await;
            load.begin(Phase::Outage);
            tokio::time::sleep(Duration::from_secs(2)).await;
            redis.restart().await;
            last_restart = Instant::now();
            if all_closed(&managers, Duration::from_secs(30)).await {
                load.begin(Phase::Recovered);
            } else {
                failures.push(format!(
                    "restart {}: an instance did not recover within 30 s",
                    restarts + 1
                ));
            }
            restarts += 1;
            next_restart += options.restart_every;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let violations = load.stop().await;
    failures.extend(violations);
    // Sessions begun after the last restart must all be in Redis (older
    // ones died with the server's data, as documented).
    let checker = RedisManager::connect(tuned(redis.config()).build().expect("valid config"))
        .await
        .expect("checker starts");
    let (expected, missing) = load
        .missing_session_writes(
            &checker,
            |w| w.session_created_at >= last_restart,
            Duration::from_secs(20),
        )
        .await;
    log(&format!(
        "session writes since the last restart: {expected}, missing in Redis: {}",
        missing.len()
    ));
    if !missing.is_empty() {
        failures.push(format!("{} session writes missing in Redis", missing.len()));
    }

    // Memory: the first sample after a minute of warm-up is the baseline.
    let baseline = samples
        .iter()
        .find(|(t, _)| *t >= Duration::from_secs(60))
        .or(samples.first())
        .map_or(0, |(_, rss)| *rss);
    let last = samples.last().map_or(0, |(_, rss)| *rss);
    let peak = samples.iter().map(|(_, rss)| *rss).max().unwrap_or(0);
    log(&format!(
        "rss: baseline {baseline} KiB, peak {peak} KiB, last {last} KiB over {} samples; {restarts} restarts; slowest request {:?}",
        samples.len(),
        load.max_latency()
    ));
    if baseline > 0 && last as f64 > baseline as f64 * MAX_GROWTH {
        failures.push(format!(
            "memory grew from {baseline} KiB to {last} KiB (over {MAX_GROWTH}x)"
        ));
    }
    if failures.is_empty() {
        log("soak: every invariant held");
    } else {
        log(&format!("soak: FAILED\n{}", failures.join("\n")));
        std::process::exit(1);
    }
}
