//! One request path, in process, for as long as a profiler needs it.
//!
//! ```text
//! cargo build --release -p benches --bin profile
//! target/release/profile cache-hit --concurrency 64 --secs 5
//! perf record -F 2999 -g -o hit.data -- target/release/profile cache-hit --secs 5
//! perf report -i hit.data --no-children --sort symbol
//! ```
//!
//! The suites time many cells in one process, so a profile of them mixes
//! every path. This runs one: `concurrency` tasks send requests to the app
//! through tower (`oneshot`: no TCP, no HTTP parsing) and read each body to
//! its end, for `secs` seconds after a warm-up, against a disposable
//! `redis-server` from `tower_redis_core::testing`. It prints requests per
//! second and this process's CPU time per request (user + system, from
//! `/proc/self/stat`), and the allocations a request makes (count and bytes).
//!
//! Paths:
//! - `none`: the route with no layer (a 1 KiB body);
//! - `reference`: no layer, the handler awaits one `RedisManager::query`
//!   (`GET` of a missing key), then answers the same body;
//! - `cache-hit`: a hit of tower-redis-cache in Redis (1 KiB body);
//! - `ratelimit`: tower-redis-ratelimit, one GCRA policy keyed by a header
//!   (one client; never denied);
//! - `session-read`: tower-redis-session, a read of an existing session,
//!   tracking off (1 round trip); `session-tracked` with tracking on;
//!   `session-write` the tracked session changed on every request (a new
//!   value of `k`; every task on the one session);
//!   `session-down` the tracked read with its Redis killed (a `redis-server`
//!   of its own), once the breaker is open: the in-process fallback;
//! - `stack-page`: the `stack` suite's `GET /page`: the rate limiter (as
//!   `ratelimit`), the cache with its near tier and the tracked session
//!   layer, stacked in one `ServiceBuilder`; the handler reads the session's
//!   `k` and answers the 1 KiB body with `Cache-Control: private` (every
//!   task on one session); `stack-none` the same route with no layer.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::redis;
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{RedisConfig, RedisManager};
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};
use tower_redis_session::{Session, SessionLayer};

/// The system allocator, counting allocations (for the allocations a
/// request makes).
#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// Allocations (reallocations included) and bytes allocated so far (a
/// reallocation's growth included: the counter adds it to
/// `bytes_allocated`).
fn allocated() -> (u64, u64) {
    let stats = GLOBAL.stats();
    (
        (stats.allocations + stats.reallocations) as u64,
        stats.bytes_allocated as u64,
    )
}

const USAGE: &str = "usage: profile <path>[,<path>...] [--concurrency N] [--secs S] [--warmup-secs S] \
                     [--rounds N] [--http]\npaths: none, reference, cache-hit, cache-near, axum-response-cache, ratelimit, ratelimit-leased, governor, governor-headers, session-read, session-tracked, session-write, session-down, stack-page, stack-none";
/// The paths `profile` runs.
const PATHS: [&str; 15] = [
    "none",
    "reference",
    "cache-hit",
    "cache-near",
    "axum-response-cache",
    "ratelimit",
    "ratelimit-leased",
    "governor",
    "governor-headers",
    "session-read",
    "session-tracked",
    "session-write",
    "session-down",
    "stack-page",
    "stack-none",
];

fn body() -> Bytes {
    Bytes::from(vec![b'x'; 1024])
}

fn plain() -> Router {
    let body = body();
    Router::new().route(
        "/",
        get(move || {
            let body = body.clone();
            async move { ([(header::CACHE_CONTROL, "max-age=600")], body) }
        }),
    )
}

/// The plain route behind axum-response-cache (feature `peers`), as the
/// cache suite builds it: a fixed lifespan of 600 s.
#[cfg(feature = "peers")]
fn axum_response_cache() -> Router {
    let layer = axum_response_cache::CacheLayer::with_lifespan(Duration::from_secs(600))
        .add_response_headers()
        .body_limit(16 << 20);
    plain().layer(layer)
}

/// Never called: `main` refuses the path without the feature.
#[cfg(not(feature = "peers"))]
fn axum_response_cache() -> Router {
    plain()
}

/// tower_governor with one global key and the leased path's quota (the
/// `ratelimit` suite keys it by peer IP, which is one key there too: every
/// connection comes from 127.0.0.1; in process there is no peer address).
/// With `headers`, its `x-ratelimit-*` response fields on (`use_headers`),
/// as tower-redis-ratelimit's `RateLimit` fields always are.
#[cfg(feature = "peers")]
fn governor(headers: bool) -> Router {
    use tower_governor::GovernorLayer;
    use tower_governor::governor::GovernorConfigBuilder;
    use tower_governor::key_extractor::GlobalKeyExtractor;

    let mut builder = GovernorConfigBuilder::default()
        .period(Duration::from_secs(3600) / 1_000_000_000)
        .burst_size(1_000_000_000)
        .key_extractor(GlobalKeyExtractor);
    if headers {
        let config = builder
            .use_headers()
            .finish()
            .expect("tower_governor configuration");
        return plain().layer(GovernorLayer::new(config));
    }
    let config = builder.finish().expect("tower_governor configuration");
    plain().layer(GovernorLayer::new(config))
}

/// Never called: `main` refuses the path without the feature.
#[cfg(not(feature = "peers"))]
fn governor(_headers: bool) -> Router {
    plain()
}

fn reference(manager: &RedisManager) -> Router {
    let manager = manager.clone();
    let read = Arc::new({
        let mut read = redis::cmd("GET");
        read.arg("profile:reference");
        read
    });
    let body = body();
    Router::new().route(
        "/",
        get(move || {
            let (manager, read, body) = (manager.clone(), Arc::clone(&read), body.clone());
            async move {
                let status = match manager.query::<Option<Vec<u8>>>(&read).await {
                    Ok(_) => StatusCode::OK,
                    Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                };
                (status, [(header::CACHE_CONTROL, "max-age=600")], body)
            }
        }),
    )
}

/// The session app: `GET /` reads the session's `k`, or with `writes`
/// sets it to a new value (a counter's) on every request.
async fn session_app(manager: &RedisManager, tracked: bool, writes: bool) -> (Router, HeaderValue) {
    let mut builder = SessionLayer::builder(manager.clone()).insecure_http_for_local_development();
    if !tracked {
        builder = builder.tracked_capacity_bytes(0);
    }
    let layer = builder.build().expect("session layer");
    let read = get(|session: Session| async move {
        match session.get::<String>("k").await {
            Ok(Some(value)) => (StatusCode::OK, value),
            Ok(None) => (StatusCode::NOT_FOUND, String::new()),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    });
    let count = Arc::new(AtomicU64::new(0));
    let write = get(move |session: Session| {
        let n = count.fetch_add(1, Ordering::Relaxed);
        async move {
            match session.insert("k", format!("{n:064}")).await {
                Ok(()) => (StatusCode::OK, String::new()),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
    });
    let app = Router::new()
        .route("/", if writes { write } else { read })
        .route(
            "/write",
            post(|session: Session| async move {
                session.insert("k", "v".repeat(64)).await.expect("insert");
                StatusCode::OK
            }),
        )
        .layer(layer);
    let written = app
        .clone()
        .oneshot(Request::post("/write").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let cookie = written
        .headers()
        .get(header::SET_COOKIE)
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    (app, HeaderValue::from_str(&cookie).unwrap())
}

/// The `ratelimit` path's layer: one GCRA policy (10⁹ an hour, never
/// denied here) keyed by the `x-profile-client` header.
fn header_rate_limit(manager: &RedisManager) -> RateLimitLayer {
    RateLimitLayer::builder(manager.clone())
        .policy(
            Policy::gcra("profile", 1_000_000_000, Duration::from_secs(3600))
                .key(Key::header("x-profile-client")),
        )
        .build()
        .expect("rate limit layer")
}

/// The `stack` suite's `/page`, answering the 1 KiB body `private` (the
/// cache stores nothing): with `layers`, behind the three layers, its
/// handler reading the session's `k` (the cookie returned is that
/// session's); without, the route alone.
async fn stack_app(manager: &RedisManager, layers: bool) -> (Router, Option<HeaderValue>) {
    let body = body();
    if !layers {
        let page = get(move || {
            let body = body.clone();
            async move { ([(header::CACHE_CONTROL, "private")], body) }
        });
        return (Router::new().route("/", page), None);
    }
    let page = get(move |session: Session| {
        let body = body.clone();
        async move {
            let _ = session.get::<String>("k").await;
            ([(header::CACHE_CONTROL, "private")], body)
        }
    });
    let (sessions, cookie) = session_app(manager, true, false).await;
    drop(sessions);
    let rate_limit = header_rate_limit(manager);
    let cache = CacheLayer::builder(manager.clone())
        .near_cache(16 << 20, Duration::from_secs(3600))
        .build()
        .expect("cache layer");
    let session = SessionLayer::builder(manager.clone())
        .insecure_http_for_local_development()
        .build()
        .expect("session layer");
    let app = Router::new().route("/", page).layer(
        tower::ServiceBuilder::new()
            .layer(rate_limit)
            .layer(cache)
            .layer(session),
    );
    (app, Some(cookie))
}

/// A disposable `redis-server`, and a manager on it.
async fn started() -> (TestRedis, RedisManager) {
    let redis = TestRedis::start().await;
    let config = RedisConfig::builder()
        .url(redis.url())
        .build()
        .expect("config");
    let manager = RedisManager::connect(config).await.expect("manager");
    (redis, manager)
}

/// The tracked session app on a `redis-server` of its own, which is
/// killed once the session was read: its reads are then the in-process
/// fallback's (checked to answer the session's value).
async fn session_down() -> (Router, HeaderValue) {
    let (redis, manager) = started().await;
    let (app, cookie) = session_app(&manager, true, false).await;
    let read = || get_request(Some(&cookie), Body::empty());
    let answered = app.clone().oneshot(read()).await.unwrap();
    assert_eq!(answered.status(), StatusCode::OK, "the session is read");
    redis.kill().await;
    let killed = Instant::now();
    while manager.is_available() {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the breaker opens within 30 s of the kill"
        );
        let answered = app.clone().oneshot(read()).await.unwrap();
        assert_eq!(
            answered.status(),
            StatusCode::OK,
            "served while Redis is down"
        );
    }
    let answered = app.clone().oneshot(read()).await.unwrap();
    let body = answered.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "v".repeat(64), "the fallback serves the session");
    // The server is dead: dropping its handle removes its directory.
    drop(redis);
    (app, cookie)
}

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th fields of the line (12th and 13th after it).
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// `GET /` as every path's requests are: `Host`, the client header the
/// rate limit keys on, and the session cookie if there is one.
fn get_request<B>(cookie: Option<&HeaderValue>, body: B) -> Request<B> {
    let mut request = Request::get("/")
        .header(header::HOST, "127.0.0.1")
        .header("x-profile-client", "one")
        .body(body)
        .unwrap();
    if let Some(cookie) = cookie {
        request.headers_mut().insert(header::COOKIE, cookie.clone());
    }
    request
}

/// Checks an answer: 200, and a hit where one is expected.
fn answered<B>(response: &axum::http::Response<B>, hit: bool) {
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the path must answer 200"
    );
    if hit {
        let status = response.headers().get("cache-status");
        assert!(
            status.is_some_and(|s| s.as_bytes().windows(3).any(|w| w == b"hit")),
            "a cache hit was expected, Cache-Status: {status:?}"
        );
    }
}

/// `concurrency` tasks, each made by `task` from the deadline and the
/// count of answered requests they share, run to their end; how many
/// requests were answered.
async fn on_tasks<F, Fut>(concurrency: usize, for_: Duration, task: F) -> u64
where
    F: Fn(Instant, Arc<AtomicU64>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let deadline = Instant::now() + for_;
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(task(deadline, Arc::clone(&done))))
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    done.load(Ordering::Relaxed)
}

/// Requests to `app` in process for `for_`, from `concurrency` tasks.
async fn run(
    app: Router,
    cookie: Option<HeaderValue>,
    hit: bool,
    concurrency: usize,
    for_: Duration,
) -> u64 {
    on_tasks(concurrency, for_, |deadline, done| {
        let (app, cookie) = (app.clone(), cookie.clone());
        async move {
            while Instant::now() < deadline {
                let request = get_request(cookie.as_ref(), Body::empty());
                let response = app.clone().oneshot(request).await.unwrap();
                answered(&response, hit);
                let _ = response.into_body().collect().await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await
}

/// As [`run`], over HTTP/1.1: the app served by axum on a loopback port,
/// each task a hyper client on its own keep-alive connection (as the
/// suites' HTTP tables).
async fn run_http(
    addr: std::net::SocketAddr,
    cookie: Option<HeaderValue>,
    hit: bool,
    concurrency: usize,
    for_: Duration,
) -> u64 {
    on_tasks(concurrency, for_, |deadline, done| {
        let cookie = cookie.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            while Instant::now() < deadline {
                let request = get_request(cookie.as_ref(), http_body_util::Empty::<Bytes>::new());
                sender.ready().await.unwrap();
                let response = sender.send_request(request).await.unwrap();
                answered(&response, hit);
                let _ = response.into_body().collect().await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await
}

/// One path made ready to run: its app, the cookie its requests carry,
/// and, over HTTP, the address it is served on.
struct Ready {
    path: String,
    app: Router,
    cookie: Option<HeaderValue>,
    addr: Option<std::net::SocketAddr>,
}

impl Ready {
    async fn new(path: &str, manager: &RedisManager, http: bool) -> Self {
        let (app, cookie) = match path {
            "none" => (plain(), None),
            "reference" => (reference(manager), None),
            "cache-hit" => {
                let layer = CacheLayer::builder(manager.clone())
                    .build()
                    .expect("cache layer");
                (plain().layer(layer), None)
            }
            "cache-near" => {
                let layer = CacheLayer::builder(manager.clone())
                    .near_cache(64 << 20, Duration::from_secs(600))
                    .build()
                    .expect("cache layer");
                (plain().layer(layer), None)
            }
            "axum-response-cache" => (axum_response_cache(), None),
            "ratelimit" => (plain().layer(header_rate_limit(manager)), None),
            "ratelimit-leased" => {
                let layer = RateLimitLayer::builder(manager.clone())
                    .policy(
                        Policy::gcra("profile", 1_000_000_000, Duration::from_secs(3600))
                            .key(Key::global())
                            .lease(1000),
                    )
                    .build()
                    .expect("rate limit layer");
                (plain().layer(layer), None)
            }
            "governor" => (governor(false), None),
            "governor-headers" => (governor(true), None),
            "session-read" | "session-tracked" | "session-write" => {
                let tracked = path != "session-read";
                let (app, cookie) = session_app(manager, tracked, path == "session-write").await;
                (app, Some(cookie))
            }
            "session-down" => {
                let (app, cookie) = session_down().await;
                (app, Some(cookie))
            }
            "stack-page" | "stack-none" => stack_app(manager, path == "stack-page").await,
            _ => unreachable!("paths are checked in `main`"),
        };
        // The headers a request of this path answers with (to stderr).
        let first = get_request(cookie.as_ref(), Body::empty());
        let first = app.clone().oneshot(first).await.unwrap();
        eprintln!("{path}: {:?} {:?}", first.status(), first.headers());
        // Warm: the cache stores its entry, the scripts load, tracking starts.
        let warm = Duration::from_millis(200);
        run(app.clone(), cookie.clone(), false, 1, warm).await;
        let addr = if http {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let listener =
                axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                    let _ = tcp.set_nodelay(true);
                });
            let served = app.clone();
            tokio::spawn(async move { axum::serve(listener, served).await });
            Some(addr)
        } else {
            None
        };
        Self {
            path: path.to_owned(),
            app,
            cookie,
            addr,
        }
    }

    /// Requests a second, this process's CPU µs a request, and the
    /// allocations (count, bytes) a request, over `for_`.
    async fn measure(&self, concurrency: usize, for_: Duration) -> (f64, f64, f64, f64) {
        let cpu = cpu_secs();
        let (allocations, bytes) = allocated();
        let started = Instant::now();
        let hit = self.path.starts_with("cache-");
        let cookie = self.cookie.clone();
        let requests = match self.addr {
            Some(addr) => run_http(addr, cookie, hit, concurrency, for_).await,
            None => run(self.app.clone(), cookie, hit, concurrency, for_).await,
        };
        let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_secs() - cpu);
        let per = |n: u64| n as f64 / requests.max(1) as f64;
        (
            requests as f64 / elapsed,
            cpu * 1e6 / requests.max(1) as f64,
            per(allocated().0 - allocations),
            per(allocated().1 - bytes),
        )
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let paths = args.next().unwrap_or_else(|| {
        eprintln!("{USAGE}");
        std::process::exit(2)
    });
    let (mut concurrency, mut secs, mut warmup, mut rounds, mut http) =
        (64usize, 5.0f64, 1.0f64, 1usize, false);
    while let Some(flag) = args.next() {
        if flag == "--http" {
            http = true;
            continue;
        }
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--concurrency" => concurrency = value.parse().expect("--concurrency N"),
            "--secs" => secs = value.parse().expect("--secs S"),
            "--warmup-secs" => warmup = value.parse().expect("--warmup-secs S"),
            "--rounds" => rounds = value.parse().expect("--rounds N"),
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2)
            }
        }
    }
    // Checked before any `redis-server` starts: an exit skips the drop
    // that stops it.
    if let Some(unknown) = paths.split(',').find(|path| !PATHS.contains(path)) {
        eprintln!("unknown path `{unknown}`\n{USAGE}");
        std::process::exit(2)
    }
    let peer = |path: &str| {
        matches!(
            path,
            "axum-response-cache" | "governor" | "governor-headers"
        )
    };
    if let Some(path) = paths
        .split(',')
        .find(|path| !cfg!(feature = "peers") && peer(path))
    {
        eprintln!("the path `{path}` needs the peers: build with `--features peers`");
        std::process::exit(2)
    }
    // Held to the end: dropping it stops the server.
    let (_redis, manager) = started().await;
    let mut ready = Vec::new();
    for path in paths.split(',') {
        ready.push(Ready::new(path, &manager, http).await);
    }
    let (for_, warm) = (
        Duration::from_secs_f64(secs),
        Duration::from_secs_f64(warmup),
    );
    for path in &ready {
        path.measure(concurrency, warm).await;
    }
    // Interleaved: every round runs each path once, in reverse order every
    // other round, so that a slower minute of a shared machine weighs on
    // all of them.
    let mut results = vec![Vec::new(); ready.len()];
    for round in 0..rounds.max(1) {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..ready.len()).collect()
        } else {
            (0..ready.len()).rev().collect()
        };
        for i in order {
            results[i].push(ready[i].measure(concurrency, for_).await);
        }
    }
    let via = if http { "HTTP" } else { "in process" };
    for (path, result) in ready.iter().zip(&results) {
        let mut rate: Vec<f64> = result.iter().map(|r| r.0).collect();
        let mut cpu: Vec<f64> = result.iter().map(|r| r.1).collect();
        let mut allocations: Vec<f64> = result.iter().map(|r| r.2).collect();
        let mut bytes: Vec<f64> = result.iter().map(|r| r.3).collect();
        let mut ratio: Vec<f64> = result
            .iter()
            .zip(&results[0])
            .map(|(r, first)| r.0 / first.0)
            .collect();
        println!(
            "{} ({via}, c={concurrency}): {:.0} requests/s, {:.1} µs process CPU and {:.1} allocations ({:.0} bytes) a request, {:.2}× the rate of {} (medians of {} rounds)",
            path.path,
            median(&mut rate),
            median(&mut cpu),
            median(&mut allocations),
            median(&mut bytes),
            median(&mut ratio),
            ready[0].path,
            results[0].len(),
        );
    }
}
