//! The demo server: a small shop on axum with all three tower-redis layers.
//!
//! Run it with `cargo run --example server`, then:
//!
//! ```text
//! curl -si localhost:3000/products/1             # 50 ms "database" read, then cached:
//! curl -si localhost:3000/products/1             #   Cache-Status: tower-redis; hit; ttl=59
//! curl -si -X PUT localhost:3000/products/1 -d 'Blue mug'   # purges tag product-1: the data, /products/1 and /products
//! curl -si -c jar -X POST localhost:3000/login -d user=alice   # session cookie, new id
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
//! make one "database" read across every instance. Under the page cache,
//! the product's "database" read itself goes through the data cache
//! (`DataCache::get_or_insert_with`, key `product:<id>`, tag
//! `product-<id>`): a page purged on its own (`/admin/cache/purge/url`) is
//! rebuilt without the 50 ms read, and the one `purge_tag("product-<id>")`
//! of a `PUT` drops the data and every page that shows it.
//!
//! Observability: tower-http's `TraceLayer` logs each request (span
//! `request` with method, URI and version; `RUST_LOG=tower_http=debug`
//! shows its events), the histogram `http.server.request.duration`
//! (Prometheus: `http_server_request_duration`) times every request by
//! method, route and status, and `/metrics` serves it with every metric of
//! the layers, histograms with buckets (docs/OBSERVABILITY.md lists them). `examples/grafana-dashboard.json`
//! is a Grafana dashboard for that page. `/admin/cache/*` (the
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
//! header those proxies write), `BIND` (default `127.0.0.1`; an address,
//! `0.0.0.0` or `::`, or host:port, `0.0.0.0:8080`), `PORT` (default
//! `3000`, used when `BIND` names no port; `0` picks a free port, and the
//! log line `listening on http://…` names it), `RUST_LOG` (default `info`). Ctrl-C (or SIGTERM)
//! stops it gracefully: in-flight requests finish and pending cache stores
//! are written.
//!
//! `POST /login` takes the user name as a form (`user=alice`, what
//! `curl -d user=alice` sends) or as JSON (`{"user":"alice"}`); anything
//! else is a 400 that says what to send.
//!
//! If Redis does not answer at startup, one warning says so and how to
//! point the server at it; the server runs anyway. Stop Redis while it
//! runs: everything keeps working from process memory, `Cache-Status` and
//! `RateLimit` say so, and `/healthz` reports `degraded`; start Redis again
//! and it recovers by itself. The session cookie is sent without `Secure`
//! here so that it works over plain http on localhost.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_http::trace::TraceLayer;
use tower_redis_cache::admin::CacheAdmin;
use tower_redis_cache::data::{DataCache, DataOptions};
use tower_redis_cache::{CacheHandle, CacheLayer, Forwarding, Route};
// The layer crates re-export the connection manager: no tower-redis-core
// dependency is needed for it.
use tower_redis_cache::{BreakerState, RedisManager};
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};
use tower_redis_session::{Session, SessionLayer};

mod support;

#[derive(Clone)]
struct App {
    redis: RedisManager,
    products: Arc<RwLock<BTreeMap<u32, String>>>,
    metrics: PrometheusHandle,
    cache: CacheHandle,
    /// The product reads, cached as data (`product:<id>`, tag `product-<id>`).
    data: DataCache,
}

/// The request-duration histogram (OpenTelemetry's HTTP server convention).
const HTTP_SERVER_REQUEST_DURATION: &str = "http.server.request.duration";

/// Histogram buckets in seconds, for every `*duration` histogram (Redis
/// operations, the layers' added latency, HTTP requests) and the pool's
/// checkout wait: 100 µs to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    support::init_tracing();
    // Buckets make the `*duration` histograms Prometheus histograms
    // (`_bucket`, `_sum`, `_count`), which dashboards aggregate across
    // instances; without them the exporter writes summaries.
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".to_owned()), DURATION_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("db.client.connection.wait_time".to_owned()),
            DURATION_BUCKETS,
        )?
        .install_recorder()?;
    metrics::describe_histogram!(
        HTTP_SERVER_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Duration of HTTP requests the demo server answered, by method, route and status code."
    );
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
        data: cache.handle().data(),
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
        .layer(flood_guard.clone());
    let flood_guard_admin = flood_guard;
    // Added after `.layer(...)`, so no layer wraps them.
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .merge(shop)
        .with_state(app)
        // Behind the flood guard too: a wrong token costs a guess of the
        // client's quota, so tokens cannot be guessed at line rate.
        .nest("/admin/cache", admin.layer(flood_guard_admin))
        // Outermost: every request, answered by a layer or not, is traced
        // and timed.
        .layer(middleware::from_fn(request_duration))
        .layer(TraceLayer::new_for_http());

    let addr = listen_address(
        std::env::var("BIND").ok().as_deref(),
        std::env::var("PORT").ok().as_deref(),
    )?;
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
        // Trimmed: a token read from a file ends with a newline, which no
        // `Authorization` header can carry (its value is trimmed too).
        Ok(token) if !token.trim().is_empty() => {
            let token = token.trim().to_owned();
            if token.len() < 16 {
                eprintln!(
                    "warning: ADMIN_TOKEN is {} characters long; use a long random secret \
                     (32 or more) in any shared setup",
                    token.len()
                );
            }
            token
        }
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

/// Records `http.server.request.duration` with the OpenTelemetry HTTP
/// server attributes: `http.request.method` (the method, or `_OTHER`),
/// `http.route` (the route template, never the raw path, so the number of
/// series stays bounded; `unmatched` for a 404 without a route) and
/// `http.response.status_code`.
async fn request_duration(request: Request, next: Next) -> axum::response::Response {
    let started = Instant::now();
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::PATCH => "PATCH",
        axum::http::Method::OPTIONS => "OPTIONS",
        _ => "_OTHER",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    metrics::histogram!(
        HTTP_SERVER_REQUEST_DURATION,
        "http.request.method" => method,
        "http.route" => route,
        "http.response.status_code" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// A product's name from the "database", through the data cache: one
/// Redis round trip when cached, else one 50 ms read for every instance
/// asking at once. `None` (no such product) is cached too; a `PUT` purges
/// the tag. Should the data cache give no value (it always does here: the
/// read cannot fail), the database is read directly.
async fn product_name(app: &App, id: u32) -> Option<String> {
    let options = DataOptions::new(Duration::from_secs(60)).tag(format!("product-{id}"));
    let products = Arc::clone(&app.products);
    let read = move || async move {
        database_read().await;
        Ok::<_, Infallible>(products.read().ok().and_then(|p| p.get(&id).cloned()))
    };
    match app
        .data
        .get_or_insert_with(&format!("product:{id}"), &options, read)
        .await
    {
        Ok(name) => name,
        Err(error) => {
            tracing::warn!(%error, "the data cache gave no product; reading the database");
            database_read().await;
            app.products.read().ok().and_then(|p| p.get(&id).cloned())
        }
    }
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
    match product_name(&app, id).await {
        Some(name) => cacheable(
            format!("product-{id} products"),
            Json(serde_json::json!({ "id": id, "name": name })),
        )
        .into_response(),
        None => (StatusCode::NOT_FOUND, "no such product").into_response(),
    }
}

/// The longest product name a rename takes.
const MAX_NAME_CHARS: usize = 100;

/// Renames a product. A successful PUT invalidates its own URL (and its
/// same-origin `Location`); the tag purge drops the product's data and
/// reaches every other response that shows the product, on every instance.
///
/// Open to anyone, as the rest of the demo shop: a real app checks who
/// may change its catalogue. It renames only the products there are, to a
/// bounded name, so a client cannot grow the server's memory with it.
async fn update_product(
    State(app): State<App>,
    Path(id): Path<u32>,
    name: String,
) -> axum::response::Response {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return (
            StatusCode::BAD_REQUEST,
            format!("send the new name as the body: 1 to {MAX_NAME_CHARS} characters"),
        )
            .into_response();
    }
    let renamed = app.products.write().is_ok_and(|mut products| {
        products
            .get_mut(&id)
            .map(|product| name.clone_into(product))
            .is_some()
    });
    if !renamed {
        return (StatusCode::NOT_FOUND, "no such product").into_response();
    }
    app.cache.purge_tag(&format!("product-{id}")).await;
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, HeaderValue::from_static("/products"));
    (StatusCode::OK, headers, "updated").into_response()
}

async fn login(session: Session, headers: HeaderMap, body: axum::body::Bytes) -> impl IntoResponse {
    let user = match login_user(&headers, &body) {
        Ok(user) => user,
        Err(problem) => {
            let answer = format!(
                "{problem}; send the user name as a form (user=alice) or as JSON ({{\"user\":\"alice\"}})\n"
            );
            return (StatusCode::BAD_REQUEST, answer).into_response();
        }
    };
    // A privilege change: a new session id, the old one stops working.
    session.cycle_id().await;
    session.set_user(&user).await;
    Json(serde_json::json!({ "user": user })).into_response()
}

/// The longest user name the demo accepts, in bytes.
const MAX_USER_BYTES: usize = 64;

/// The body of `POST /login`.
#[derive(serde::Deserialize)]
struct Login {
    user: String,
}

/// The user name of a login request: a form (`user=alice`) or JSON
/// (`{"user":"alice"}`), chosen by `Content-Type`. Anything else, or a name
/// that is empty, too long or holds control characters, is an error saying
/// what was wrong.
fn login_user(headers: &HeaderMap, body: &[u8]) -> Result<String, String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let login: Login = if essence == "application/x-www-form-urlencoded" {
        serde_urlencoded::from_bytes(body).map_err(|_| "the form has no `user` field".to_owned())?
    } else if essence == "application/json" || essence.ends_with("+json") {
        serde_json::from_slice(body)
            .map_err(|_| "the JSON is not an object with a string `user`".to_owned())?
    } else if essence.is_empty() {
        return Err("the request has no Content-Type".to_owned());
    } else {
        return Err(format!("Content-Type {essence} is not a form nor JSON"));
    };
    let user = login.user.trim();
    if user.is_empty() {
        return Err("the user name is empty".to_owned());
    }
    if user.len() > MAX_USER_BYTES {
        return Err(format!(
            "the user name is longer than {MAX_USER_BYTES} bytes"
        ));
    }
    if user.chars().any(char::is_control) {
        return Err("the user name holds control characters".to_owned());
    }
    Ok(user.to_owned())
}

/// Where to listen: `BIND` is an address (`127.0.0.1`, `0.0.0.0`, `::`),
/// with the port from `PORT`, or host:port (`0.0.0.0:8080`, `[::]:8080`,
/// `localhost:8080`). `PORT` defaults to 3000; when both name a port they
/// must agree. Unset and empty variables count as not given.
fn listen_address(bind: Option<&str>, port: Option<&str>) -> Result<SocketAddr, String> {
    use std::net::{IpAddr, ToSocketAddrs};

    let bind = bind
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .unwrap_or("127.0.0.1");
    let port_var = port.map(str::trim).filter(|p| !p.is_empty());
    let port = match port_var {
        Some(port) => Some(
            port.parse::<u16>()
                .map_err(|_| format!("PORT={port} is not a port number (0 to 65535)"))?,
        ),
        None => None,
    };
    let with_port = |named: u16| match port {
        Some(port) if port != named => Err(format!(
            "BIND={bind} names port {named} and PORT={port} another; set the port in one of them"
        )),
        _ => Ok(named),
    };
    if let Ok(addr) = bind.parse::<SocketAddr>() {
        return with_port(addr.port()).map(|_| addr);
    }
    let fallback_port = port.unwrap_or(3000);
    if let Ok(ip) = bind
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, fallback_port));
    }
    // A host name, with or without a port.
    let (host, port) = match bind.rsplit_once(':') {
        Some((host, named)) if !host.contains(':') => {
            let named = named
                .parse::<u16>()
                .map_err(|_| format!("BIND={bind}: `{named}` is not a port number (0 to 65535)"))?;
            (host, with_port(named)?)
        }
        _ => (bind, fallback_port),
    };
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            format!(
                "BIND={bind} is neither an address (127.0.0.1, 0.0.0.0, ::) nor host:port \
                 (0.0.0.0:8080, [::]:8080, localhost:8080)"
            )
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        headers
    }

    #[test]
    fn login_takes_a_form_or_json() {
        let form = typed("application/x-www-form-urlencoded");
        assert_eq!(login_user(&form, b"user=alice").unwrap(), "alice");
        assert_eq!(
            login_user(&form, b"user=al%20ice&remember=1").unwrap(),
            "al ice"
        );
        let json = typed("application/json; charset=utf-8");
        assert_eq!(login_user(&json, br#"{"user":"alice"}"#).unwrap(), "alice");
        assert_eq!(login_user(&json, br#"{"user":" bob "}"#).unwrap(), "bob");
    }

    #[test]
    fn login_refuses_anything_else_with_a_reason() {
        let form = typed("application/x-www-form-urlencoded");
        let json = typed("application/json");
        // The raw name, as the demo took it before: no `user` field.
        assert!(
            login_user(&form, b"alice")
                .unwrap_err()
                .contains("no `user` field")
        );
        assert!(login_user(&json, b"alice").unwrap_err().contains("JSON"));
        assert!(login_user(&json, br#"{"user":42}"#).is_err());
        assert!(
            login_user(&HeaderMap::new(), b"user=alice")
                .unwrap_err()
                .contains("Content-Type")
        );
        assert!(
            login_user(&typed("text/plain"), b"alice")
                .unwrap_err()
                .contains("text/plain")
        );
        assert!(login_user(&form, b"user=").unwrap_err().contains("empty"));
        assert!(login_user(&form, format!("user={}", "a".repeat(65)).as_bytes()).is_err());
        assert!(
            login_user(&form, b"user=a%0Ab")
                .unwrap_err()
                .contains("control")
        );
        assert!(login_user(&form, &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn bind_is_an_address_or_host_and_port() {
        let addr = |bind: Option<&str>, port: Option<&str>| listen_address(bind, port);
        assert_eq!(addr(None, None).unwrap(), "127.0.0.1:3000".parse().unwrap());
        assert_eq!(
            addr(Some("0.0.0.0"), Some("8080")).unwrap(),
            "0.0.0.0:8080".parse().unwrap()
        );
        assert_eq!(
            addr(Some("0.0.0.0:8080"), None).unwrap(),
            "0.0.0.0:8080".parse().unwrap()
        );
        assert_eq!(
            addr(Some("::"), Some("8080")).unwrap(),
            "[::]:8080".parse().unwrap()
        );
        assert_eq!(
            addr(Some("[::]:8080"), None).unwrap(),
            "[::]:8080".parse().unwrap()
        );
        assert_eq!(
            addr(Some("[::1]"), None).unwrap(),
            "[::1]:3000".parse().unwrap()
        );
        assert_eq!(
            addr(Some("0.0.0.0:8080"), Some("8080")).unwrap().port(),
            8080
        );
        assert_eq!(
            addr(Some(""), Some("")).unwrap(),
            "127.0.0.1:3000".parse().unwrap()
        );
        assert!(
            addr(Some("localhost:8080"), None)
                .unwrap()
                .ip()
                .is_loopback()
        );
    }

    #[test]
    fn bind_mistakes_are_clear_errors() {
        let error = listen_address(Some("0.0.0.0:8080"), Some("3000")).unwrap_err();
        assert!(error.contains("8080") && error.contains("3000"), "{error}");
        assert!(
            listen_address(None, Some("http"))
                .unwrap_err()
                .contains("PORT=http")
        );
        assert!(listen_address(Some("0.0.0.0:99999"), None).is_err());
        assert!(listen_address(Some("0.0.0.0:80:80"), None).is_err());
        assert!(listen_address(Some("no such host.invalid"), None).is_err());
    }
}
