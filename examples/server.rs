//! The demo server: a small shop on axum with all three tower-redis layers.
//!
//! Run it with `cargo run --example server`, then:
//!
//! ```text
//! curl -si localhost:3000/products/1             # 50 ms "database" read, then cached:
//! curl -si localhost:3000/products/1             #   Cache-Status: tower-redis; hit; ttl=59
//! curl -si -X PUT localhost:3000/products/1 -d 'Blue mug'   # purges tag product-1: /products/1 and /products
//! curl -si -c jar -X POST localhost:3000/login -d 'alice'   # session cookie, new id
//! curl -si -b jar localhost:3000/me                        # {"user":"alice"}
//! curl -si -b jar localhost:3000/api/orders                # RateLimit: "per-user";r=99;...
//! curl -s  localhost:3000/healthz                # Redis breaker state
//! curl -s  localhost:3000/metrics                # Prometheus text
//! curl -s -X POST -H "authorization: Bearer $ADMIN_TOKEN" localhost:3000/admin/cache/purge/tag/products
//! curl -s -H "authorization: Bearer $ADMIN_TOKEN" localhost:3000/admin/cache/stats
//! ```
//!
//! Product responses are tagged (`Surrogate-Key: product-<id> products`,
//! removed before they reach the client) and served stale for up to 30 s
//! while one request refreshes them; concurrent misses for one product
//! make one "database" read across every instance. `/admin/cache/*` (the
//! cache's admin router: purge by tag, URL, prefix or everything, soft
//! purge, entry lookup, stats) requires `Authorization: Bearer <token>`,
//! with the token from `ADMIN_TOKEN`. Without it a random one is generated
//! and printed once to stderr with a warning, never to the log; set
//! `ADMIN_TOKEN` to a long random secret anywhere but on your own machine.
//! The token is checked in constant time.
//!
//! Limits: every shop route has a flood guard of 50 requests per 30 s per
//! client IP; under `/api`, anonymous clients get 10 per minute per IP and
//! logged-in users 100 per minute per user. `/healthz` and `/metrics` sit
//! outside the layers: health checks and scrapes are never limited, cached
//! or given a session.
//!
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`; `memory` runs
//! on the in-process stores only), `TRUSTED_PROXIES` (comma-separated
//! addresses or CIDRs of the reverse proxies in front; none by default) and
//! `FORWARDING_HEADER` (`x-forwarded-for`, the default, or `forwarded`: the
//! header those proxies write), `BIND` (default `127.0.0.1`), `PORT`
//! (default `3000`; `0` picks a free port, and the log line `listening on
//! http://…` names it), `RUST_LOG` (default `info`). Ctrl-C (or SIGTERM)
//! stops it gracefully: in-flight requests finish and pending cache stores
//! are written.
//!
//! If Redis does not answer at startup, one warning says so and how to
//! point the server at it; the server runs anyway. Stop Redis while it
//! runs: everything keeps working from process memory, `Cache-Status` and
//! `RateLimit` say so, and `/healthz` reports `degraded`; start Redis again
//! and it recovers by itself. The session cookie is sent without `Secure`
//! here so that it works over plain http on localhost.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_redis_cache::admin::CacheAdmin;
use tower_redis_cache::{CacheHandle, CacheLayer, Forwarding, Route};
use tower_redis_core::{BreakerState, RedisManager};
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};
use tower_redis_session::{Session, SessionLayer};

mod support;

#[derive(Clone)]
struct App {
    redis: RedisManager,
    products: Arc<RwLock<BTreeMap<u32, String>>>,
    metrics: PrometheusHandle,
    cache: CacheHandle,
}

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    support::init_tracing();
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let redis = support::redis_from_env().await?;
    // Who the client is behind proxies: TRUSTED_PROXIES / FORWARDING_HEADER,
    // one configuration for the cache and the rate limits.
    let forwarding = Forwarding::from_env()?;
    if !forwarding.is_empty() {
        tracing::info!(header = ?forwarding.header(), "trusting forwarding headers from TRUSTED_PROXIES");
    }

    let cache = CacheLayer::builder(redis.clone())
        .forwarding(forwarding.clone())
        .route(
            Route::new("/products*")
                .default_ttl(Duration::from_secs(60))
                .stale_while_revalidate(Duration::from_secs(30)),
        )
        .route(Route::new("*").bypass())
        .build()?;
    let sessions = SessionLayer::builder(redis.clone())
        .insecure_http_for_local_development()
        .build()?;
    let flood_guard = RateLimitLayer::builder(redis.clone())
        .forwarding(forwarding.clone())
        .policy(Policy::gcra("flood", 50, Duration::from_secs(30)))
        .build()?;
    let client_of = forwarding.clone();
    let api_limits = RateLimitLayer::builder(redis.clone())
        .forwarding(forwarding)
        .policy(
            Policy::gcra("anonymous", 10, Duration::from_secs(60)).key(Key::from_async_fn(
                move |parts| {
                    let session = parts.extensions.get::<Session>().cloned();
                    let ip = client_of
                        .client_addr(&parts.headers, &parts.extensions)
                        .map(|ip| ip.to_string());
                    // Counted per IP only while nobody is logged in.
                    async move {
                        match session {
                            Some(session) if session.user().await.is_some() => None,
                            _ => ip,
                        }
                    }
                },
            )),
        )
        .policy(
            Policy::gcra("per-user", 100, Duration::from_secs(60)).key(Key::from_async_fn(
                |parts| {
                    let session = parts.extensions.get::<Session>().cloned();
                    async move {
                        match session {
                            Some(session) => session.user().await,
                            None => None,
                        }
                    }
                },
            )),
        )
        .build()?;

    let products = BTreeMap::from([(1, "Red mug".to_owned()), (2, "Green teapot".to_owned())]);
    let app = App {
        redis,
        products: Arc::new(RwLock::new(products)),
        metrics,
        cache: cache.handle(),
    };
    let admin = CacheAdmin::new(cache.handle(), bearer_token_check(admin_token())).into_router();
    let api = Router::new()
        .route("/orders", get(orders))
        .layer(api_limits);
    let shop = Router::new()
        .route("/products", get(list_products))
        .route("/products/{id}", get(product).put(update_product))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/me", get(me))
        .nest("/api", api)
        .layer(cache.clone())
        .layer(sessions)
        .layer(flood_guard);
    // Added after `.layer(...)`, so no layer wraps them.
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .merge(shop)
        .with_state(app)
        .nest("/admin/cache", admin);

    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let addr: SocketAddr = format!("{bind}:{port}")
        .parse()
        .map_err(|e| format!("BIND={bind} PORT={port} is not a socket address: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({e}); set PORT (or BIND) to another one"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    // Connect info gives the rate limiter the client's address.
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(support::shutdown_signal())
    .await?;
    // Responses already sent may still be on their way into the cache.
    cache.flush().await;
    tracing::info!("stopped");
    Ok(())
}

/// `ADMIN_TOKEN`, or a generated token. A secret never goes into the
/// `tracing` log (logs are shipped and kept): a generated one is printed
/// once to stderr, for the person who started the demo.
fn admin_token() -> String {
    match std::env::var("ADMIN_TOKEN") {
        Ok(token) if !token.trim().is_empty() => token,
        _ => {
            let token = format!("{:032x}", rand::random::<u128>());
            eprintln!(
                "warning: ADMIN_TOKEN is not set, so /admin/cache accepts this generated token \
                 until the server stops (shown once, never logged; set ADMIN_TOKEN to a long \
                 random secret in any shared setup): {token}"
            );
            token
        }
    }
}

/// Accepts `Authorization: Bearer <token>`. Both sides are hashed with
/// SHA-256 and the digests compared in constant time, so the time the check
/// takes says nothing about the token, not even its length.
fn bearer_token_check(token: String) -> impl Fn(&HeaderMap) -> bool + Send + Sync + 'static {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;

    let expected = Sha256::digest(format!("Bearer {token}").as_bytes());
    move |headers: &HeaderMap| {
        headers.get(header::AUTHORIZATION).is_some_and(|value| {
            Sha256::digest(value.as_bytes())
                .as_slice()
                .ct_eq(expected.as_slice())
                .into()
        })
    }
}

/// The slow "database" a cache is for.
async fn database_read() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Cacheable for a minute, tagged so that a change can purge every
/// response that shows it.
fn cacheable(tags: String, body: impl IntoResponse) -> impl IntoResponse {
    let tags = HeaderValue::from_str(&tags).unwrap_or(HeaderValue::from_static("products"));
    (
        [
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=60"),
            ),
            (header::HeaderName::from_static("surrogate-key"), tags),
        ],
        body,
    )
}

async fn list_products(State(app): State<App>) -> impl IntoResponse {
    database_read().await;
    let products = app.products.read().map(|p| p.clone()).unwrap_or_default();
    let tags: Vec<String> = std::iter::once("products".to_owned())
        .chain(products.keys().map(|id| format!("product-{id}")))
        .collect();
    cacheable(tags.join(" "), Json(products))
}

async fn product(State(app): State<App>, Path(id): Path<u32>) -> axum::response::Response {
    database_read().await;
    let name = app.products.read().ok().and_then(|p| p.get(&id).cloned());
    match name {
        Some(name) => cacheable(
            format!("product-{id} products"),
            Json(serde_json::json!({ "id": id, "name": name })),
        )
        .into_response(),
        None => (StatusCode::NOT_FOUND, "no such product").into_response(),
    }
}

/// A successful PUT invalidates its own URL (and its same-origin
/// `Location`); the tag purge reaches every other response that shows the
/// product, on every instance.
async fn update_product(
    State(app): State<App>,
    Path(id): Path<u32>,
    name: String,
) -> impl IntoResponse {
    if let Ok(mut products) = app.products.write() {
        products.insert(id, name.trim().to_owned());
    }
    app.cache.purge_tag(&format!("product-{id}")).await;
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, HeaderValue::from_static("/products"));
    (StatusCode::OK, headers, "updated")
}

async fn login(session: Session, user: String) -> impl IntoResponse {
    let user = user.trim().to_owned();
    if user.is_empty() {
        return (StatusCode::BAD_REQUEST, "send the user name as the body").into_response();
    }
    // A privilege change: a new session id, the old one stops working.
    session.cycle_id().await;
    session.set_user(&user).await;
    Json(serde_json::json!({ "user": user })).into_response()
}

async fn logout(session: Session) -> impl IntoResponse {
    session.destroy().await;
    StatusCode::NO_CONTENT
}

async fn me(session: Session) -> impl IntoResponse {
    Json(serde_json::json!({ "user": session.user().await }))
}

async fn orders(session: Session) -> impl IntoResponse {
    Json(serde_json::json!({ "user": session.user().await, "orders": [] }))
}

/// Always 200: the app serves with or without Redis, so a load balancer
/// must not pull it out of rotation. The body says which mode it is in:
/// `ok` (on Redis), `degraded` (Redis down, serving from process memory) or
/// `memory` (`REDIS_URL=memory`).
async fn healthz(State(app): State<App>) -> impl IntoResponse {
    let health = app.redis.health();
    let status = match health.state {
        BreakerState::Closed => "ok",
        BreakerState::Disabled => "memory",
        BreakerState::Open | BreakerState::HalfOpen => "degraded",
    };
    Json(serde_json::json!({ "status": status, "redis": health }))
}

async fn metrics_text(State(app): State<App>) -> impl IntoResponse {
    app.metrics.render()
}
