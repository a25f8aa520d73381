//! The demo server: an axum app on the shared Redis connection manager.
//!
//! Run it with `cargo run --example server`, then:
//!
//! ```text
//! curl -s localhost:3000/healthz     # the Redis breaker's state, as JSON
//! curl -s -X POST localhost:3000/visits   # a counter shared through Redis
//! curl -si localhost:3000/healthz | grep -i ratelimit   # 50 requests per 30 s per IP
//! ```
//!
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`; `memory` runs
//! without Redis), `BIND` (default `127.0.0.1`), `PORT` (default `3000`),
//! `RUST_LOG` (default `info`). Stop Redis while it runs: the counter keeps
//! counting in process and `/healthz` says `open`; start Redis again and it
//! goes back to `closed` by itself.
//!
//! Every route is rate limited per client IP (a flood guard of 50 requests
//! per 30 s); the 51st gets `429` with `Retry-After` and a problem+json body.
//! The cache and session layers join this server as they land.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use tower_redis_core::{RedisConfig, RedisManager, Source, redis};
use tower_redis_ratelimit::{Policy, RateLimitLayer};
use tracing_subscriber::EnvFilter;

#[derive(Clone)]
struct App {
    redis: RedisManager,
    local_visits: Arc<AtomicU64>,
}

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let redis = match std::env::var("REDIS_URL").as_deref() {
        Ok("memory") => {
            tracing::info!("REDIS_URL=memory: running on in-process state only");
            RedisManager::disabled()
        }
        _ => RedisManager::connect(RedisConfig::from_env()?).await?,
    };
    let flood_guard = RateLimitLayer::builder(redis.clone())
        .policy(Policy::gcra("flood", 50, Duration::from_secs(30)))
        .build()?;
    let app = App {
        redis,
        local_visits: Arc::new(AtomicU64::new(0)),
    };
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/visits", post(visit))
        .with_state(app)
        .layer(flood_guard);

    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let addr: SocketAddr = format!("{bind}:{port}")
        .parse()
        .map_err(|e| format!("BIND={bind} PORT={port} is not a socket address: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("listening on http://{addr}");
    // Connect info gives the rate limiter the client's address.
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
    .await?;
    Ok(())
}

/// Always 200: the app serves with or without Redis, so a load balancer
/// must not pull it out of rotation. The body says which mode it is in.
async fn healthz(State(app): State<App>) -> Json<serde_json::Value> {
    let health = app.redis.health();
    let status = if health.is_healthy() {
        "ok"
    } else {
        "degraded"
    };
    Json(serde_json::json!({ "status": status, "redis": health }))
}

/// Counts visits in Redis, or in process while Redis is away.
async fn visit(State(app): State<App>) -> Json<serde_json::Value> {
    let key = app.redis.keys().key(&["visits"]);
    let local = Arc::clone(&app.local_visits);
    let served = app
        .redis
        .failover(
            |mut conn| async move {
                redis::cmd("INCR")
                    .arg(key)
                    .query_async::<u64>(&mut conn)
                    .await
            },
            |_reason| async move { local.fetch_add(1, Ordering::Relaxed) + 1 },
        )
        .await;
    let source = match served.source {
        Source::Redis => "redis".to_owned(),
        Source::Fallback(reason) => format!("in-process ({})", reason.as_str()),
    };
    Json(serde_json::json!({ "visits": served.value, "counted_in": source }))
}
