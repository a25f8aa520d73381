//! Soak run: the chaos app (cache, sessions, rate limit) on two instances
//! under a steady load for many minutes, with the Redis server killed and
//! restarted every minute, while new visitors (a new client, session, URL
//! and rate-limit key each) arrive at a steady rate. Prints the process's
//! memory over time (resident, anonymous, and the bytes its heap holds),
//! checks every chaos invariant in every restart cycle, and exits non-zero
//! when one broke or when memory kept growing after warm-up (a rising
//! trend of the heap's low point in each restart cycle, or resident memory
//! over 1.5× its size after warm-up). The run must leave at least three
//! whole restart cycles after the warm-up.
//!
//! ```sh
//! cargo run --release -p tests --example soak -- --minutes 10
//! cargo run --release -p tests --example soak -- --minutes 3 --restart-every 30
//! cargo run --release -p tests --example soak -- --minutes 30 --visitors 100 --samples rss.csv
//! ```
//!
//! The soak itself lives in `tests/soak.rs`, whose two-minute version runs
//! in CI (`cargo test -p tests --test soak`); needs a `redis-server` binary.

use std::time::Duration;

#[path = "../tests/soak.rs"]
mod soak;

use soak::Settings;

fn usage() -> ! {
    eprintln!(
        "usage: soak [--minutes N (default 10)] [--restart-every SECONDS (default 60, at least 10)]\n\
         \x20           [--visitors PER_SECOND (default 50)] [--clients N (default 4)] [--samples FILE.csv]\n\
         memory is judged after a warm-up of a third of the run (at most a minute),\n\
         on at least 3 whole restart cycles after it"
    );
    std::process::exit(2);
}

fn settings() -> Settings {
    let mut minutes = 10.0;
    let mut settings = Settings {
        duration: Duration::ZERO,
        restart_every: Duration::from_secs(60),
        clients: 4,
        visitors_per_second: 50,
        sample_every: Duration::from_secs(1),
        warm_up: Duration::ZERO,
        samples_csv: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        if pair[0] == "--samples" {
            let path = pair.get(1).unwrap_or_else(|| usage());
            settings.samples_csv = Some(path.into());
            continue;
        }
        let value = pair.get(1).and_then(|v| v.parse::<f64>().ok());
        match (pair[0].as_str(), value) {
            ("--minutes", Some(m)) if m > 0.0 => minutes = m,
            ("--restart-every", Some(secs)) if secs >= 10.0 => {
                settings.restart_every = Duration::from_secs_f64(secs);
            }
            ("--visitors", Some(n)) if (1.0..=10_000.0).contains(&n) => {
                settings.visitors_per_second = n as u32;
            }
            ("--clients", Some(n)) if (1.0..=64.0).contains(&n) => settings.clients = n as usize,
            _ => usage(),
        }
    }
    settings.duration = Duration::from_secs_f64(minutes * 60.0);
    settings.warm_up = (settings.duration / 3).min(Duration::from_secs(60));
    // Memory is judged on the low point of each whole restart cycle after
    // the warm-up: at least three of them.
    let needed = settings.warm_up + 3 * settings.restart_every;
    if settings.duration < needed {
        eprintln!(
            "soak: {minutes} minutes leave fewer than 3 whole restart cycles of {:?} after the warm-up of {:?}: \
             run at least {:.1} minutes, or restart more often",
            settings.restart_every,
            settings.warm_up,
            needed.as_secs_f64() / 60.0
        );
        std::process::exit(2);
    }
    settings
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let settings = settings();
    let failures = soak::run(&settings).await;
    if failures.is_empty() {
        eprintln!("soak: every invariant held and memory stayed flat");
    } else {
        eprintln!("soak: FAILED\n{}", failures.join("\n"));
        std::process::exit(1);
    }
}
