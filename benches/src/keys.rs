//! How Redis memory grows with the number of distinct keys a layer tracks
//! (rate-limit clients, sessions).
//!
//! The keys are made by the layer itself: the app is called in process
//! (`tower::ServiceExt::oneshot` on the axum `Router`, no HTTP) by many
//! tasks at once, request `i` carrying distinct key `i`. At each checkpoint
//! the report reads `INFO memory` `used_memory` and `DBSIZE` (deltas from
//! before the first key) and `MEMORY USAGE` of a few of the keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use crate::error::BenchError;
use crate::http_load::clear_keys;
use crate::report::{NOT_MEASURED, Table, bytes, thousands};
use crate::server::BenchRedis;

/// Tasks calling the app at once while keys are made.
const TASKS: usize = 256;
/// Keys whose `MEMORY USAGE` is read at each checkpoint.
const SAMPLED_KEYS: usize = 5;

/// What a checkpoint saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Checkpoint {
    /// Distinct keys made so far.
    pub(crate) keys: u64,
    /// `DBSIZE` growth.
    pub(crate) redis_keys: i64,
    /// `used_memory` growth, in bytes.
    pub(crate) used_memory: i64,
    /// The mean `MEMORY USAGE` of the sampled keys, in bytes.
    pub(crate) memory_usage: f64,
    /// Keys made per second since the previous checkpoint.
    pub(crate) keys_per_sec: f64,
}

/// Makes `counts` (ascending) distinct keys through `app`, whose keys match
/// `prefix:*`; `make(i)` is the request for key `i`, answered with `expect`.
pub(crate) async fn grow<F>(
    redis: &BenchRedis,
    suite: &str,
    app: Router,
    prefix: &str,
    counts: &[u64],
    make: F,
    expect: StatusCode,
) -> Result<Vec<Checkpoint>, BenchError>
where
    F: Fn(u64) -> Request<Body> + Send + Sync + 'static,
{
    let make = Arc::new(make);
    // One request first, so that scripts are loaded and connections open
    // before the baseline; its key is deleted.
    call(&app, make(u64::MAX), expect).await?;
    clear_keys(redis, prefix).await?;
    let memory_before = redis.used_memory().await?;
    let keys_before = redis.dbsize().await?;

    let mut checkpoints = Vec::with_capacity(counts.len());
    let mut made = 0;
    for &count in counts {
        let started = Instant::now();
        let next = Arc::new(AtomicU64::new(made));
        let mut tasks = JoinSet::new();
        for _ in 0..TASKS {
            let (app, next, make) = (app.clone(), Arc::clone(&next), Arc::clone(&make));
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<(), BenchError>(());
                    }
                    call(&app, make(i), expect).await?;
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.map_err(|e| BenchError::Check(format!("{suite}: a key task failed: {e}")))??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let new = count.saturating_sub(made);
        made = made.max(count);
        let sizes = redis
            .memory_usage_sample(&format!("{prefix}:*"), SAMPLED_KEYS)
            .await?;
        let checkpoint = Checkpoint {
            keys: made,
            redis_keys: redis.dbsize().await? as i64 - keys_before as i64,
            used_memory: redis.used_memory().await? as i64 - memory_before as i64,
            memory_usage: if sizes.is_empty() {
                f64::NAN
            } else {
                sizes.iter().sum::<u64>() as f64 / sizes.len() as f64
            },
            keys_per_sec: new as f64 / elapsed.max(1e-9),
        };
        eprintln!("{suite}: keys: {checkpoint:?}");
        checkpoints.push(checkpoint);
    }
    clear_keys(redis, prefix).await?;
    Ok(checkpoints)
}

async fn call(app: &Router, request: Request<Body>, expect: StatusCode) -> Result<(), BenchError> {
    let response = app
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| BenchError::Check(format!("in-process call: {e}")))?;
    let status = response.status();
    // The whole body: a layer may finish its work when the body ends.
    let _ = response.into_body().collect().await;
    if status == expect {
        Ok(())
    } else {
        Err(BenchError::Check(format!(
            "a key-making request got {status}, expected {expect}"
        )))
    }
}

fn per_key(value: f64) -> String {
    if value.is_nan() {
        NOT_MEASURED.to_owned()
    } else {
        format!("{value:.0} B")
    }
}

/// The table of [`grow`]'s checkpoints.
pub(crate) fn table(checkpoints: &[Checkpoint], what: &str) -> Table {
    let mut table = Table::new([
        format!("distinct {what}"),
        "Redis keys added".to_owned(),
        "used_memory added".to_owned(),
        "used_memory per key".to_owned(),
        format!("MEMORY USAGE per key (mean of {SAMPLED_KEYS})"),
        format!("{what} made / s (in process, {TASKS} tasks)"),
    ]);
    for c in checkpoints {
        table.row([
            thousands(c.keys as f64),
            thousands(c.redis_keys as f64),
            bytes(c.used_memory as f64),
            per_key(c.used_memory as f64 / c.keys.max(1) as f64),
            per_key(c.memory_usage),
            thousands(c.keys_per_sec),
        ]);
    }
    table
}
