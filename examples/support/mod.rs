//! What the examples share: logging, connecting to Redis (or not), and
//! graceful shutdown.

use std::io::IsTerminal;

use tower_redis_core::{BreakerState, RedisConfig, RedisManager, Topology};
use tracing::instrument::WithSubscriber;
use tracing_subscriber::EnvFilter;

/// Logs to stdout, filtered by `RUST_LOG` (default `info`), coloured only
/// on a terminal.
pub(crate) fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

/// The manager `REDIS_URL` asks for: `memory` for in-process stores only,
/// else a Redis URL (default `redis://127.0.0.1:6379`; `REDIS_CLUSTER_NODES`
/// for a cluster).
///
/// A Redis that does not answer is not an error: the app starts on the
/// in-process fallbacks, says so in one log line with how to point it at
/// Redis, and switches to Redis as soon as it answers. Only an invalid
/// configuration fails.
pub(crate) async fn redis_from_env() -> Result<RedisManager, Box<dyn std::error::Error>> {
    if std::env::var("REDIS_URL").as_deref() == Ok("memory") {
        tracing::info!("REDIS_URL=memory: running on in-process stores only");
        return Ok(RedisManager::disabled());
    }
    let config = RedisConfig::from_env()?;
    let target = match config.topology() {
        Topology::Standalone(url) => url.to_string(),
        Topology::Cluster(nodes) => {
            let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
            format!("cluster {}", nodes.join(","))
        }
        Topology::Sentinel(sentinel) => sentinel.to_string(),
    };
    // The manager logs a startup warning of its own; it is muted here so
    // that the line below, which also says what to do, is the only one. Its
    // later transitions (opened, closed) are logged as usual.
    let redis = RedisManager::connect(config)
        .with_subscriber(tracing::subscriber::NoSubscriber::default())
        .await?;
    let health = redis.health();
    if health.state == BreakerState::Closed {
        tracing::info!("connected to Redis at {target}");
    } else {
        let error = health.last_error.unwrap_or_else(|| "no answer".to_owned());
        tracing::warn!(
            "Redis at {target} is not reachable ({error}); serving from in-process memory and \
             switching to Redis as soon as it answers. Start Redis there, or set \
             REDIS_URL=redis://host:port/db (REDIS_URL=memory: no Redis at all)"
        );
    }
    Ok(redis)
}

/// Resolves on Ctrl-C, or SIGTERM on Unix (what `kill`, Docker and systemd send).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
