//! Degraded mode, per layer: the same app measured with Redis up, then with
//! Redis killed (every request takes the layer's in-process fallback), then
//! the time from Redis coming back to the first request Redis serves.
//!
//! Each section runs on its own private Redis ([`BenchRedis::dedicated`]),
//! so killing it disturbs no other cell. For each concurrency of each
//! repeat: prepare (warm the cache, create sessions), a `Redis up` cell,
//! SIGKILL, requests until the breaker opens, a `Redis killed` cell,
//! restart on the same port (empty), then one request after another until
//! the breaker closes and Redis sees a command of the layer. Each pair of
//! cells runs back to back, so the ratio sees little drift.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use tower_redis_core::{RedisConfig, RedisManager};

use crate::Options;
use crate::cells::{Cell, Driver, Row, measure};
use crate::error::BenchError;
use crate::grid::{Grid, Section};
use crate::http_load::{Expect, HttpRequest, Sender, connect, manager_for, send, serve};
use crate::load::LoadSpec;
use crate::report::{Target, median};
use crate::server::{BenchRedis, is_connection_command};

/// How long to wait for the breaker to open after the kill, and for the
/// first Redis-served request after the restart.
const DEADLINE: Duration = Duration::from_secs(30);
/// The target: degraded throughput / Redis-path throughput.
const TARGET_RATIO: f64 = 1.0;
/// The target: from Redis restarting to the first request Redis serves.
const TARGET_RECOVERY: Duration = Duration::from_secs(1);

/// A layer's app, as the degraded section needs it.
pub(crate) trait Outage {
    /// The suite's name, for progress lines.
    fn suite(&self) -> &'static str;
    /// What is served, for the section's paragraph.
    fn describe(&self) -> String;
    /// The app on `manager`.
    fn app(&self, manager: &RedisManager) -> Result<Router, BenchError>;
    /// Runs after Redis (re)started, before the `Redis up` cells: warms
    /// caches, creates sessions. Returns what the tasks send (task `i`
    /// sends `[i % len]`); `tasks` is the most tasks of any cell.
    async fn prepare(
        &self,
        addr: SocketAddr,
        tasks: usize,
    ) -> Result<Vec<Arc<HttpRequest>>, BenchError>;
    /// What every response must be, Redis up or down.
    fn expect(&self) -> Expect;
    /// Commands run inside the layer's scripts.
    fn inner(&self) -> &'static [&'static str];
    /// Requests that reached the app's slow origin so far, for a cache.
    fn origin_calls(&self) -> Option<u64> {
        None
    }
}

/// What happened around one kill and restart.
#[derive(Debug, Clone, Copy)]
struct Transition {
    /// The concurrency of the cells around it, and the repeat (from 1).
    concurrency: usize,
    repeat: usize,
    /// Requests that reached the origin during the `Redis up` and the
    /// `Redis killed` cell (warm-up included), for a cache.
    origin_calls: Option<(u64, u64)>,
    /// Requests sent after the kill until the breaker opened, and how long that took.
    open_requests: u64,
    open_after: Option<Duration>,
    /// How long Redis stayed down.
    down_for: Duration,
    /// From the restart until the breaker closed.
    closed_after: Option<Duration>,
    /// From the restart until Redis saw a command of the layer.
    served_after: Option<Duration>,
    /// Answers ≥ 500 during both transitions (the contract says none).
    server_errors: u64,
}

/// Runs the section; its markdown (a `###` subsection).
pub(crate) async fn run<O: Outage>(outage: &O, options: &Options) -> Result<String, BenchError> {
    let suite = outage.suite();
    let title = format!("{suite}: degraded mode (Redis killed while serving, then restarted)");
    let Some(mut redis) = BenchRedis::dedicated().await? else {
        let mut section = Section::default();
        section.subsection(
            &title,
            "not measured: no stoppable Redis (only REDIS_URL); install redis-server or use Docker",
        );
        return Ok(section.finish());
    };
    let pool_size = options.pool_size.unwrap_or(RedisConfig::DEFAULT_POOL_SIZE);
    let config = RedisConfig::builder().url(redis.url()).build()?;
    let manager = manager_for(redis.url(), pool_size, "tower-redis-bench:degraded").await?;
    if !manager.is_available() {
        return Err(BenchError::Check(format!(
            "{suite}: the degraded-mode manager cannot reach its Redis: {:?}",
            manager.health()
        )));
    }
    let server = serve(outage.app(&manager)?).await?;
    let addr = server.addr;
    let tasks = options.concurrency.iter().copied().max().unwrap_or(1);
    let expect = Arc::new(outage.expect());
    let cell = |label: &str, short: &'static str, requests: &[Arc<HttpRequest>]| Cell {
        label: label.to_owned(),
        short,
        driver: Driver::Http {
            addr,
            requests: requests.to_vec(),
            expect: Arc::clone(&expect),
        },
        inner: outage.inner(),
        _server: None,
    };
    let labels = ["Redis up", "Redis killed (in-process fallback)"];

    let mut rows: Vec<Row> = options
        .concurrency
        .iter()
        .map(|c| Row {
            key: c.to_string(),
            name: format!("c={c}"),
            samples: vec![Vec::new(), Vec::new()],
        })
        .collect();
    let mut transitions = Vec::with_capacity(options.repeats);
    let mut cells = Vec::new();
    for repeat in 0..options.repeats {
        for (row, &concurrency) in rows.iter_mut().zip(&options.concurrency) {
            // Redis is up (and empty after a restart): new sessions, a warm cache.
            let requests = outage.prepare(addr, tasks).await?;
            let first = Arc::clone(requests.first().ok_or_else(|| {
                BenchError::Check(format!("{suite}: degraded mode has no request to send"))
            })?);
            cells = vec![
                cell(labels[0], "Redis up", &requests),
                cell(labels[1], "Redis killed", &requests),
            ];
            let spec = spec(options, concurrency);
            let origin_before = outage.origin_calls();
            if let Some(sample) = measure(Some(&redis), suite, &cells[0], spec).await? {
                progress(suite, "Redis up", concurrency, repeat, options, &sample);
                row.samples[0].push(sample);
            }
            let origin_up = since(outage.origin_calls(), origin_before);

            redis.kill().await?;
            let killed = Instant::now();
            let mut sender = connect(addr)
                .await
                .map_err(|e| BenchError::Check(format!("{suite}: {e}")))?;
            let mut server_errors = 0;
            let mut open_requests = 0;
            let open_after = loop {
                if !manager.is_available() {
                    break Some(killed.elapsed());
                }
                if killed.elapsed() > DEADLINE {
                    break None;
                }
                server_errors += request(suite, &mut sender, &first).await?;
                open_requests += 1;
            };
            let origin_before = outage.origin_calls();
            if let Some(sample) = measure(None, suite, &cells[1], spec).await? {
                progress(suite, "Redis killed", concurrency, repeat, options, &sample);
                row.samples[1].push(sample);
            }
            let origin_down = since(outage.origin_calls(), origin_before);
            let down_for = killed.elapsed();

            redis.restart().await?;
            let restarted = Instant::now();
            // Requests one after another: first until the breaker closes,
            // then until one of them reaches Redis. Commands counted from
            // the closing on, so that a pub/sub resubscription or the
            // manager's probe is not taken for a served request.
            let mut baseline = redis.command_calls().await?;
            let mut closed_after = None;
            let served_after = loop {
                if closed_after.is_none() && manager.is_available() {
                    closed_after = Some(restarted.elapsed());
                    baseline = redis.command_calls().await?;
                }
                server_errors += request(suite, &mut sender, &first).await?;
                if closed_after.is_some() {
                    let layer_commands: u64 = redis
                        .command_calls()
                        .await?
                        .deltas(&baseline)
                        .iter()
                        .filter(|(name, _)| !is_connection_command(name) && !is_pubsub(name))
                        .map(|(_, stat)| stat.calls)
                        .sum();
                    if layer_commands > 0 {
                        break Some(restarted.elapsed());
                    }
                }
                if restarted.elapsed() > DEADLINE {
                    break None;
                }
            };
            let transition = Transition {
                concurrency,
                repeat: repeat + 1,
                origin_calls: origin_up.zip(origin_down),
                open_requests,
                open_after,
                down_for,
                closed_after,
                served_after,
                server_errors,
            };
            eprintln!(
                "{suite}: degraded c={concurrency} run {}/{}: {transition:?}",
                repeat + 1,
                options.repeats
            );
            transitions.push(transition);
        }
    }

    if cells.is_empty() {
        cells = vec![
            cell(labels[0], "Redis up", &[]),
            cell(labels[1], "Redis killed", &[]),
        ];
    }
    let grid = Grid::new("concurrency", &cells, rows);
    let breaker = config.breaker();
    let mut section = Section::default();
    section.subsection(
        &title,
        &format!(
            "{} One private TestRedis for this section; manager: RedisConfig defaults with pool_size {pool_size} \
             (command timeout {} ms, breaker opens after {} failures or at once on a refused connection, probe \
             backoff {} ms doubling to {} ms, jittered). For each concurrency, in each repeat: prepare, a `Redis up` \
             cell, SIGKILL, one request after another until the breaker opens, a `Redis killed` cell (its warm-up \
             included), restart on the same port (empty), then one request after another until the breaker \
             has closed and a request then reaches Redis (a command other than PING / CLIENT / HELLO / (UN)SUBSCRIBE \
             after the closing): the recovery time, which the probe backoff \
             reached during the outage bounds. {}.",
            outage.describe(),
            manager.command_timeout().as_millis(),
            breaker.failure_threshold,
            breaker.probe_min_backoff.as_millis(),
            breaker.probe_max_backoff.as_millis(),
            crate::grid::timing(options, false),
        ),
    );
    section.table(&grid.table(&[(0, "Redis up")]));
    let mut target = Target::new(format!(
        "degraded path ≥ {TARGET_RATIO:.2}× its Redis path's throughput (Redis killed / Redis up)"
    ));
    grid.check_ratio(&mut target, 1, 0, TARGET_RATIO, |_| true);
    section.target(&target);
    for target in transition_targets(&transitions) {
        section.target(&target);
    }
    section.note(format!(
        "Redis killed / Redis up, median (per repeat): {}",
        grid.spread(1, 0)
    ));
    section.note(transitions_note(&transitions));
    for note in grid.notes() {
        section.note(note);
    }
    section.gap();
    drop(server);
    Ok(section.finish())
}

fn spec(options: &Options, concurrency: usize) -> LoadSpec {
    LoadSpec {
        concurrency,
        warmup: options.warmup,
        duration: options.duration,
    }
}

fn progress(
    suite: &str,
    what: &str,
    concurrency: usize,
    repeat: usize,
    options: &Options,
    sample: &crate::cells::Sample,
) {
    eprintln!(
        "{suite}: degraded {what:<13} c={concurrency:<3} run {}/{}: {}",
        repeat + 1,
        options.repeats,
        sample.progress()
    );
}

/// One request during a transition: 1 if it was answered with a 5xx.
async fn request(
    suite: &str,
    sender: &mut Sender,
    request: &HttpRequest,
) -> Result<u64, BenchError> {
    let (status, _, _) = send(sender, request)
        .await
        .map_err(|e| BenchError::Check(format!("{suite}, during a Redis transition: {e}")))?;
    Ok(u64::from(status.is_server_error()))
}

fn since(now: Option<u64>, before: Option<u64>) -> Option<u64> {
    Some(now?.saturating_sub(before?))
}

fn millis(d: Option<Duration>) -> String {
    d.map_or_else(
        || format!("not within {} s", DEADLINE.as_secs()),
        |d| format!("{:.0}", d.as_secs_f64() * 1e3),
    )
}

fn median_ms(values: impl Iterator<Item = Option<Duration>>) -> String {
    let values: Vec<Option<Duration>> = values.collect();
    if values.iter().any(Option::is_none) {
        return "not always reached".to_owned();
    }
    let ms: Vec<f64> = values
        .iter()
        .flatten()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    median(&ms).map_or_else(|| "–".to_owned(), |m| format!("{m:.0} ms"))
}

fn transitions_note(transitions: &[Transition]) -> String {
    let each =
        |f: fn(&Transition) -> String| transitions.iter().map(f).collect::<Vec<_>>().join(" / ");
    let origin = if transitions.iter().any(|t| t.origin_calls.is_some()) {
        format!(
            "; requests that reached the 20 ms origin in the (Redis up, Redis killed) cells, warm-up included: {}",
            each(|t| t
                .origin_calls
                .map_or_else(|| "–".to_owned(), |(up, down)| format!("({up}, {down})")))
        )
    } else {
        String::new()
    };
    format!(
        "per kill (one per concurrency and repeat, in table order): kill → breaker open: {} requests, {} ms; \
         Redis down for {} s; restart → breaker closed: median {} ({} ms); \
         **restart → first Redis-served request: median {}** ({} ms); \
         answers ≥ 500 during the transitions: {}{origin}",
        each(|t| t.open_requests.to_string()),
        each(|t| millis(t.open_after)),
        each(|t| format!("{:.1}", t.down_for.as_secs_f64())),
        median_ms(transitions.iter().map(|t| t.closed_after)),
        each(|t| millis(t.closed_after)),
        median_ms(transitions.iter().map(|t| t.served_after)),
        each(|t| millis(t.served_after)),
        transitions.iter().map(|t| t.server_errors).sum::<u64>(),
    )
}

/// The contract's promises around each kill and restart, one verdict per
/// kill: Redis serves again within [`TARGET_RECOVERY`] of its restart, and
/// no answer is a 5xx while the breaker opens or closes.
fn transition_targets(transitions: &[Transition]) -> [Target; 2] {
    let mut recovery = Target::new(format!(
        "restart → first Redis-served request ≤ {:.1} s",
        TARGET_RECOVERY.as_secs_f64()
    ));
    let mut errors = Target::new("answers ≥ 500 while the breaker opens and closes = 0");
    for t in transitions {
        let at = format!("c={} run {}", t.concurrency, t.repeat);
        match t.served_after {
            Some(after) => {
                recovery.at_most(&at, after.as_secs_f64(), TARGET_RECOVERY.as_secs_f64());
            }
            None => recovery.missed(&at, format!("not within {} s", DEADLINE.as_secs())),
        }
        errors.at_most(&at, t.server_errors as f64, 0.0);
    }
    if transitions.is_empty() {
        recovery.not_measured("every row", "no kill ran");
        errors.not_measured("every row", "no kill ran");
    }
    [recovery, errors]
}

/// Pub/sub bookkeeping (a subscriber reconnecting), not a request's work.
fn is_pubsub(name: &str) -> bool {
    matches!(
        name.split('|').next().unwrap_or(name),
        "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe" | "sunsubscribe"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(repeat: usize, served_after: Option<Duration>, server_errors: u64) -> Transition {
        Transition {
            concurrency: 64,
            repeat,
            origin_calls: None,
            open_requests: 1,
            open_after: Some(Duration::from_millis(1)),
            down_for: Duration::from_millis(700),
            closed_after: served_after,
            served_after,
            server_errors,
        }
    }

    #[test]
    fn recovery_and_server_errors_are_targets_that_can_fail() {
        let [recovery, errors] =
            transition_targets(&[transition(1, Some(Duration::from_millis(400)), 0)]);
        assert_eq!(recovery.met(), Some(true), "{}", recovery.render());
        assert_eq!(errors.met(), Some(true), "{}", errors.render());

        let [recovery, errors] = transition_targets(&[
            transition(1, Some(Duration::from_millis(400)), 0),
            transition(2, Some(Duration::from_millis(1_600)), 2),
        ]);
        assert_eq!(recovery.met(), Some(false), "{}", recovery.render());
        assert!(
            recovery
                .render()
                .contains("c=64 run 1: met, 0.40; c=64 run 2: NOT met, 1.60"),
            "{}",
            recovery.render()
        );
        assert_eq!(errors.met(), Some(false), "{}", errors.render());
        assert!(
            errors.render().contains("c=64 run 2: NOT met, 2.00"),
            "{}",
            errors.render()
        );

        let [recovery, _] = transition_targets(&[transition(1, None, 0)]);
        assert_eq!(recovery.met(), Some(false), "{}", recovery.render());
        assert!(recovery.render().contains("NOT met, not within 30 s"));

        let [recovery, errors] = transition_targets(&[]);
        assert_eq!((recovery.met(), errors.met()), (None, None));
    }
}
