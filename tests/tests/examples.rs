//! Smoke tests of the examples: each one runs as its own process, built by
//! `cargo build -p examples --examples`, against a private test Redis, and
//! goes through the walkthrough its docs and the README promise, Redis
//! outage included. The processes are killed when a test ends, failed or not.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tower_redis_core::testing::TestRedis;

/// How long anything in these tests may take before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Building and running the examples

/// `target/<profile>/examples`, after building the examples once for this
/// test binary (a no-op when they are up to date).
fn examples_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // This binary is target/<profile>/deps/examples-<hash>.
        let exe = std::env::current_exe().expect("the test binary knows its path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("the test binary lives in target/<profile>/deps")
            .to_path_buf();
        let profile = profile_dir
            .file_name()
            .and_then(|p| p.to_str())
            .expect("a UTF-8 profile directory")
            .to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ sits in the workspace")
            .to_path_buf();
        let mut build = std::process::Command::new(cargo);
        build
            .current_dir(&workspace)
            .args(["build", "--quiet", "-p", "examples", "--examples"]);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                build.arg("--release");
            }
            other => {
                build.args(["--profile", other]);
            }
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the examples failed: {status}");
        let dir = profile_dir.join("examples");
        assert!(
            dir.join(binary_name("server")).exists(),
            "the examples were built but are not in {}",
            dir.display()
        );
        dir
    })
}

fn binary_name(example: &str) -> String {
    format!("{example}{}", std::env::consts::EXE_SUFFIX)
}

/// A running example. Killed (SIGKILL) on drop; on a failing test its log
/// is printed, so a failure says what the process said.
struct Running {
    name: &'static str,
    child: tokio::process::Child,
    /// Every line, stdout and stderr, in the order they were read.
    log: Arc<Mutex<Vec<String>>>,
    /// The lines written to stderr only (the `tracing` log goes to stdout).
    stderr: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---", self.name);
            for line in self.log() {
                eprintln!("{line}");
            }
        }
    }
}

impl Running {
    /// Starts an example and waits for its `listening on http://…` line.
    async fn start(name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = tokio::process::Command::new(examples_dir().join(binary_name(name)));
        command
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("REDIS_CLUSTER_NODES")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {name} example: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = oneshot::channel();
        let mut addr_tx = Some(addr_tx);
        let (lines_tx, mut lines_rx) = mpsc::unbounded_channel::<(bool, String)>();
        for (is_stderr, stream) in [
            (
                false,
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            ),
            (
                true,
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            ),
        ] {
            let Some(stream) = stream else { continue };
            let lines_tx = lines_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if lines_tx.send((is_stderr, line)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(lines_tx);
        let sink = Arc::clone(&log);
        let stderr_sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            while let Some((is_stderr, line)) = lines_rx.recv().await {
                if let Some(addr) = listening_address(&line)
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr);
                }
                if is_stderr {
                    stderr_sink.lock().expect("log lock").push(line.clone());
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let mut running = Self {
            name,
            child,
            log,
            stderr,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        match tokio::time::timeout(DEADLINE, addr_rx).await {
            Ok(Ok(addr)) => running.addr = addr,
            _ => panic!(
                "{name} did not log `listening on http://…` (exit: {:?})",
                running.child.try_wait()
            ),
        }
        running
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// What the process wrote to stderr (not its `tracing` log).
    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("log lock").clone()
    }

    /// Sends SIGINT (Ctrl-C) and waits for the process to exit.
    async fn interrupt(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits i32"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT sent");
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("exits after Ctrl-C")
            .expect("exit status")
    }
}

fn listening_address(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on http://")? + "listening on http://".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Runs an example to completion (client modes, bad arguments).
async fn run_to_end(name: &str, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(examples_dir().join(binary_name(name)));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{name} {args:?} did not finish"))
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

// ---------------------------------------------------------------------------
// A small HTTP client

type ClientBody = BoxBody<Bytes, std::io::Error>;

fn http_client() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Every value of a field, joined as one list.
    fn all(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn full(body: impl Into<Bytes>) -> ClientBody {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn send(
    client: &Client<HttpConnector, ClientBody>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut request = http::Request::builder().method(method.clone()).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(full(body.to_owned()))
        .expect("a valid request");
    let exchange = async {
        let response = client.request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {url} hung"))
        .unwrap_or_else(|e| panic!("{method} {url} failed: {e}"))
}

async fn get(client: &Client<HttpConnector, ClientBody>, url: &str) -> Reply {
    send(client, Method::GET, url, &[], "").await
}

/// GETs `url` until the cache answers it (the entry is written after the
/// response that filled it has gone out). For the in-process store, which
/// cannot be watched from outside; each try costs a flood-guard token, so
/// at most 20 tries.
async fn get_until_hit(client: &Client<HttpConnector, ClientBody>, url: &str) -> Reply {
    for _ in 0..20 {
        let reply = get(client, url).await;
        if reply.header("cache-status").contains("; hit") {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} was never answered from the cache");
}

/// Cache entries live at `tower-redis:c:<url hash>` (default key prefix).
/// The caching proxy's only: the demo server stores data values under the
/// same key space, so its tests wait for a page with [`wait_for_page`].
const CACHE_KEYS: &str = "tower-redis:c:*";

/// The one polling loop of these tests: calls `check` every `every` until
/// it gives a value, and fails after [`DEADLINE`] with `what` and the last
/// thing `check` saw.
async fn eventually<T, F, Fut>(what: &str, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let seen = match check().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened; last seen: {seen}"
        );
        tokio::time::sleep(every).await;
    }
}

/// `KEYS pattern` on the test Redis (empty when it does not answer in time).
async fn keys(
    conn: &mut tower_redis_core::redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Vec<String> {
    tower_redis_core::redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .unwrap_or_default()
}

/// Polls the test Redis until `pattern` matches at least `count` keys.
async fn wait_for_keys(redis: &TestRedis, pattern: &str, count: usize) {
    let conn = redis
        .connection()
        .await
        .expect("a connection to the test Redis");
    let what = format!("Redis holding {count} keys matching {pattern}");
    eventually(&what, Duration::from_millis(10), || {
        let mut conn = conn.clone();
        async move {
            let found = keys(&mut conn, pattern).await;
            if found.len() >= count {
                Ok(())
            } else {
                Err(format!("{found:?}"))
            }
        }
    })
    .await;
}

/// Polls the demo server's cache admin (token `smoke-token`) until it has
/// a stored page for the absolute URL `url`: a page, not a data value
/// (both live under `tower-redis:c:`, so counting keys would race).
async fn wait_for_page(client: &Client<HttpConnector, ClientBody>, server: &Running, url: &str) {
    let entry = server.url(&format!("/admin/cache/entry?url={url}"));
    eventually(
        &format!("a stored page for {url}"),
        Duration::from_millis(10),
        || {
            let entry = entry.clone();
            async move {
                let reply = send(
                    client,
                    Method::GET,
                    &entry,
                    &[("authorization", "Bearer smoke-token")],
                    "",
                )
                .await;
                if reply.status == StatusCode::OK {
                    Ok(())
                } else {
                    Err(format!("{} {}", reply.status, reply.body))
                }
            }
        },
    )
    .await;
}

/// Polls the test Redis until it holds a session of `user` (sessions live
/// at `tower-redis:{<hash of the id>}:s`, the user in field `_u`).
async fn wait_for_session_of(redis: &TestRedis, user: &str) {
    let conn = redis
        .connection()
        .await
        .expect("a connection to the test Redis");
    eventually(
        &format!("a session of {user} in Redis"),
        Duration::from_millis(20),
        || {
            let mut conn = conn.clone();
            async move {
                let mut users = Vec::new();
                for key in keys(&mut conn, "tower-redis:*:s").await {
                    // An answer slower than the client's timeout (a loaded
                    // machine) is asked again.
                    let owner: Option<String> = tower_redis_core::redis::cmd("HGET")
                        .arg(&key)
                        .arg("_u")
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                    users.push(owner);
                }
                if users.iter().any(|owner| owner.as_deref() == Some(user)) {
                    Ok(())
                } else {
                    Err(format!("sessions of {users:?}"))
                }
            }
        },
    )
    .await;
}

/// Polls `/healthz` until its `status` is `want`.
async fn wait_for_health(
    client: &Client<HttpConnector, ClientBody>,
    server: &Running,
    want: &str,
) -> serde_json::Value {
    eventually(
        &format!("/healthz saying {want}"),
        Duration::from_millis(50),
        || async {
            let health = get(client, &server.url("/healthz")).await.json();
            if health["status"] == want {
                Ok(health)
            } else {
                Err(health.to_string())
            }
        },
    )
    .await
}

/// Every series `examples/grafana-dashboard.json` queries (the names in
/// its PromQL expressions that belong to the demo: `tower_redis_*`,
/// `db_client_*`, `http_server_*`), each with the labels its expressions
/// group by (`by (...)`, `le` left out).
fn dashboard_queries() -> BTreeMap<String, Vec<String>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard is readable");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut queried: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let mut grouped = Vec::new();
            for (at, _) in expr.match_indices("by (") {
                let rest = &expr[at + 4..];
                let labels = &rest[..rest.find(')').expect("a closed by (...)")];
                grouped.extend(
                    labels
                        .split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && *l != "le")
                        .map(str::to_owned),
                );
            }
            // Series names only: label lists (`by (...)`) and matchers
            // (`{...}`) left out.
            let mut names = String::new();
            let mut depth_by = false;
            let mut in_matcher = false;
            for (at, c) in expr.char_indices() {
                if expr[at..].starts_with("by (") {
                    depth_by = true;
                }
                match c {
                    '{' => in_matcher = true,
                    '}' => in_matcher = false,
                    ')' if depth_by => depth_by = false,
                    _ if depth_by || in_matcher => {}
                    _ => names.push(c),
                }
            }
            for name in names.split(|c: char| !is_ident(c)) {
                if ["tower_redis_", "db_client_", "http_server_"]
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
                {
                    queried
                        .entry(name.to_owned())
                        .or_default()
                        .extend(grouped.clone());
                }
            }
        }
    }
    queried
}

/// `session=<value>` from a `Set-Cookie`.
fn session_cookie(reply: &Reply) -> String {
    let set_cookie = reply.header("set-cookie");
    assert!(set_cookie.starts_with("session="), "{:?}", reply.headers);
    set_cookie
        .split(';')
        .next()
        .expect("a cookie pair")
        .to_owned()
}

// ---------------------------------------------------------------------------
// examples/server.rs

#[tokio::test]
async fn server_walkthrough_survives_a_redis_outage() {
    let redis = TestRedis::start().await;
    let mut server = Running::start(
        "server",
        &[],
        &[
            ("REDIS_URL", redis.url()),
            ("PORT", "0"),
            ("ADMIN_TOKEN", "smoke-token"),
        ],
    )
    .await;
    let http = http_client();
    assert!(
        server
            .log()
            .iter()
            .any(|l| l.contains("connected to Redis")),
        "{:?}",
        server.log()
    );

    // A cache miss (50 ms "database"), then hits with Age.
    let miss = get(&http, &server.url("/products/1")).await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(
        miss.header("cache-status"),
        "tower-redis; fwd=uri-miss; stored"
    );
    assert!(miss.body.contains("Red mug"), "{}", miss.body);
    wait_for_page(&http, &server, &server.url("/products/1")).await;
    let hit = get(&http, &server.url("/products/1")).await;
    assert!(
        hit.header("cache-status")
            .starts_with("tower-redis; hit; ttl=")
    );
    assert!(
        hit.header("age").parse::<u64>().is_ok(),
        "{:?}",
        hit.headers
    );
    assert_eq!(hit.body, miss.body);

    // The page alone is purged: it is rebuilt from the data cache, whose
    // value (key product:1, tag product-1) the purge did not touch.
    let purged = send(
        &http,
        Method::POST,
        &server.url(&format!(
            "/admin/cache/purge/url?url={}",
            server.url("/products/1")
        )),
        &[("authorization", "Bearer smoke-token")],
        "",
    )
    .await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.body);
    let rebuilt = get(&http, &server.url("/products/1")).await;
    assert!(
        rebuilt.header("cache-status").contains("fwd=uri-miss"),
        "{:?}",
        rebuilt.headers
    );
    assert_eq!(rebuilt.body, miss.body);
    let metrics = get(&http, &server.url("/metrics")).await;
    assert!(
        metrics
            .body
            .lines()
            .any(|line| line.starts_with("tower_redis_cache_data_total{")
                && line.contains("result=\"hit\"")
                && line.contains("tier=\"redis\"")),
        "the rebuilt page did not read the data cache:\n{}",
        metrics.body
    );

    // A PUT invalidates the product and the list, and its one tag purge
    // drops the product's data too (else the pages would show the old name).
    wait_for_page(&http, &server, &server.url("/products/1")).await;
    get(&http, &server.url("/products")).await;
    wait_for_page(&http, &server, &server.url("/products")).await;
    let list = get(&http, &server.url("/products")).await;
    assert!(
        list.header("cache-status").contains("; hit"),
        "{:?}",
        list.headers
    );
    let put = send(
        &http,
        Method::PUT,
        &server.url("/products/1"),
        &[],
        "Blue mug",
    )
    .await;
    assert_eq!(put.status, StatusCode::OK);
    let after = get(&http, &server.url("/products/1")).await;
    assert!(
        after.header("cache-status").contains("fwd=uri-miss"),
        "{:?}",
        after.headers
    );
    assert!(after.body.contains("Blue mug"), "{}", after.body);
    let list = get(&http, &server.url("/products")).await;
    assert!(
        list.header("cache-status").contains("fwd=uri-miss"),
        "{:?}",
        list.headers
    );
    assert!(list.body.contains("Blue mug"), "{}", list.body);
    assert!(
        list.headers.get("surrogate-key").is_none(),
        "tags stay inside the cache: {:?}",
        list.headers
    );

    // The cache admin router: refused without the token, purges with it.
    wait_for_page(&http, &server, &server.url("/products/1")).await;
    wait_for_page(&http, &server, &server.url("/products")).await;
    let refused = send(
        &http,
        Method::POST,
        &server.url("/admin/cache/purge/tag/products"),
        &[],
        "",
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let purged = send(
        &http,
        Method::POST,
        &server.url("/admin/cache/purge/tag/products"),
        &[("authorization", "Bearer smoke-token")],
        "",
    )
    .await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.body);
    assert!(purged.body.contains("\"urls\":2"), "{}", purged.body);
    let list = get(&http, &server.url("/products")).await;
    assert!(
        list.header("cache-status").contains("fwd=uri-miss"),
        "{:?}",
        list.headers
    );
    let stats = send(
        &http,
        Method::GET,
        &server.url("/admin/cache/stats"),
        &[("authorization", "Bearer smoke-token")],
        "",
    )
    .await;
    assert!(stats.body.contains("\"hit_ratio\""), "{}", stats.body);

    // Log in, who am I, a per-user limit, log out.
    let login = send(
        &http,
        Method::POST,
        &server.url("/login"),
        FORM,
        "user=alice",
    )
    .await;
    assert_eq!(login.status, StatusCode::OK);
    assert!(
        login.header("set-cookie").contains("HttpOnly"),
        "{:?}",
        login.headers
    );
    let alice = session_cookie(&login);
    let me = send(
        &http,
        Method::GET,
        &server.url("/me"),
        &[("cookie", &alice)],
        "",
    )
    .await;
    assert_eq!(me.json()["user"], "alice");
    let orders = send(
        &http,
        Method::GET,
        &server.url("/api/orders"),
        &[("cookie", &alice)],
        "",
    )
    .await;
    assert_eq!(orders.status, StatusCode::OK);
    assert!(
        orders.all("ratelimit").contains("\"per-user\";r=99;"),
        "{:?}",
        orders.headers
    );
    assert!(
        orders
            .all("ratelimit-policy")
            .contains("\"per-user\";q=100;w=60")
    );
    let logout = send(
        &http,
        Method::POST,
        &server.url("/logout"),
        &[("cookie", &alice)],
        "",
    )
    .await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT);
    let me = send(
        &http,
        Method::GET,
        &server.url("/me"),
        &[("cookie", &alice)],
        "",
    )
    .await;
    assert_eq!(
        me.json()["user"],
        serde_json::Value::Null,
        "the old cookie is dead"
    );

    // Anonymous clients: 10 per minute under /api, then 429.
    let burst_started = std::time::Instant::now();
    let first = get(&http, &server.url("/api/orders")).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.headers);
    assert!(
        first.all("ratelimit").contains("\"anonymous\";r=9;"),
        "{:?}",
        first.headers
    );
    assert!(
        first
            .all("ratelimit-policy")
            .contains("\"anonymous\";q=10;w=60")
    );
    let mut allowed = 1;
    let denied = loop {
        let reply = get(&http, &server.url("/api/orders")).await;
        if reply.status != StatusCode::OK {
            break reply;
        }
        allowed += 1;
        assert!(allowed <= 20, "no 429 after {allowed} anonymous requests");
    };
    // One more call is earned every 6 s; on a loaded machine the burst may
    // have taken that long.
    if burst_started.elapsed() < Duration::from_secs(5) {
        assert_eq!(allowed, 10);
    } else {
        assert!(allowed >= 10, "{allowed}");
    }
    assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(denied.header("retry-after").parse::<u64>().is_ok());
    assert_eq!(denied.header("content-type"), "application/problem+json");
    assert_eq!(denied.json()["violated-policies"][0], "anonymous");
    assert!(
        denied.all("ratelimit").contains("\"anonymous\";r=0;"),
        "{:?}",
        denied.headers
    );
    let health = get(&http, &server.url("/healthz")).await.json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["redis"]["state"], "closed");
    let metrics = get(&http, &server.url("/metrics")).await;
    assert!(
        metrics.body.contains("tower_redis_cache_requests_total"),
        "{}",
        metrics.body
    );
    // Every series this traffic produces exists, with its help text (the
    // exporter writes the histogram's dots as underscores).
    for series in [
        "tower_redis_breaker_state",
        "tower_redis_breaker_in_state",
        "tower_redis_cache_requests_total",
        "tower_redis_ratelimit_decisions_total",
        "tower_redis_ratelimit_policy_decisions_total",
        "tower_redis_session_loads_total",
        "tower_redis_session_saves_total",
        "db_client_operation_duration",
    ] {
        assert!(
            metrics
                .body
                .lines()
                .any(|line| line.starts_with(series) && !line.starts_with('#')),
            "no {series} series in\n{}",
            metrics.body
        );
        assert!(
            metrics.body.contains(&format!("# HELP {series} ")),
            "no help text for {series} in\n{}",
            metrics.body
        );
    }
    assert!(
        metrics
            .body
            .contains("tower_redis_breaker_in_state{state=\"closed\"} 1"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains(
            "tower_redis_ratelimit_policy_decisions_total{outcome=\"denied\",policy=\"anonymous\"}"
        ),
        "{}",
        metrics.body
    );

    // Redis dies: everything still answers, and says it is degraded.
    redis.kill().await;
    let product = get(&http, &server.url("/products/2")).await;
    assert_eq!(product.status, StatusCode::OK);
    assert!(product.body.contains("Green teapot"));
    assert!(
        product
            .header("cache-status")
            .ends_with("detail=redis-unavailable"),
        "{:?}",
        product.headers
    );
    assert!(
        product.all("ratelimit").contains(";local"),
        "{:?}",
        product.headers
    );
    let cached = get_until_hit(&http, &server.url("/products/2")).await;
    assert!(
        cached
            .header("cache-status")
            .contains("detail=redis-unavailable")
    );
    let health = wait_for_health(&http, &server, "degraded").await;
    assert!(
        ["open", "half_open"].contains(&health["redis"]["state"].as_str().unwrap_or("")),
        "{health}"
    );
    let login = send(&http, Method::POST, &server.url("/login"), FORM, "user=bob").await;
    assert_eq!(login.status, StatusCode::OK);
    let bob = session_cookie(&login);
    let me = send(
        &http,
        Method::GET,
        &server.url("/me"),
        &[("cookie", &bob)],
        "",
    )
    .await;
    assert_eq!(me.json()["user"], "bob");

    // Redis comes back (empty): the server switches back by itself.
    redis.restart().await;
    wait_for_health(&http, &server, "ok").await;
    let product = get(&http, &server.url("/products/2")).await;
    assert_eq!(
        product.header("cache-status"),
        "tower-redis; fwd=uri-miss; stored"
    );
    assert!(
        !product.all("ratelimit").contains(";local"),
        "{:?}",
        product.headers
    );
    // The server's own answer could come from its local copy: look in Redis.
    wait_for_session_of(&redis, "bob").await;
    let me = send(
        &http,
        Method::GET,
        &server.url("/me"),
        &[("cookie", &bob)],
        "",
    )
    .await;
    assert_eq!(me.json()["user"], "bob", "and the server reads it back");

    // After this traffic, outage included, every series the Grafana
    // dashboard queries exists, with the labels it groups by.
    let metrics = get(&http, &server.url("/metrics")).await;
    let queried = dashboard_queries();
    assert!(queried.len() >= 10, "{queried:?}");
    for (series, labels) in &queried {
        let lines: Vec<&str> = metrics
            .body
            .lines()
            .filter(|line| {
                line.strip_prefix(series.as_str())
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .collect();
        assert!(
            !lines.is_empty(),
            "the dashboard queries {series}, which /metrics lacks:\n{}",
            metrics.body
        );
        for label in labels {
            assert!(
                lines
                    .iter()
                    .any(|line| line.contains(&format!("{label}=\""))),
                "the dashboard groups {series} by {label}, which it lacks: {lines:?}"
            );
        }
    }

    // Ctrl-C: a clean exit.
    let status = server.interrupt().await;
    assert!(status.success(), "{status}");
    assert!(
        server.log().iter().any(|l| l.contains("stopped")),
        "{:?}",
        server.log()
    );
}

#[tokio::test]
async fn server_starts_without_redis_and_says_so_once() {
    let redis = TestRedis::start().await;
    redis.kill().await;
    // The breaker's moves are logged at debug: they show the probes.
    let server = Running::start(
        "server",
        &[],
        &[
            ("REDIS_URL", redis.url()),
            ("PORT", "0"),
            ("RUST_LOG", "info,tower_redis=debug"),
        ],
    )
    .await;
    let warnings = |server: &Running| -> Vec<String> {
        server
            .log()
            .into_iter()
            .filter(|l| l.contains("WARN"))
            .collect()
    };
    let startup = warnings(&server);
    assert_eq!(startup.len(), 1, "{startup:?}");
    assert!(startup[0].contains("not reachable"), "{startup:?}");
    assert!(startup[0].contains("REDIS_URL="), "{startup:?}");
    let http = http_client();
    let product = get(&http, &server.url("/products/1")).await;
    assert_eq!(product.status, StatusCode::OK);
    assert!(
        product
            .header("cache-status")
            .contains("detail=redis-unavailable")
    );
    assert_eq!(
        get(&http, &server.url("/healthz")).await.json()["status"],
        "degraded"
    );
    // It keeps probing, and says nothing more about it.
    let probes = |server: &Running| {
        server
            .log()
            .iter()
            .filter(|l| l.contains("circuit breaker moved") && l.contains("to=half_open"))
            .count()
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while probes(&server) < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than 4 probes logged: {:?}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Redis appears later: the server finds it.
    redis.restart().await;
    wait_for_health(&http, &server, "ok").await;
    assert!(
        server
            .log()
            .iter()
            .any(|l| l.contains("circuit breaker closed")),
        "{:?}",
        server.log()
    );
    // Over the whole run, the one warning at startup.
    assert_eq!(warnings(&server), startup, "{:?}", server.log());

    // And without Redis at all:
    let memory = Running::start("server", &[], &[("REDIS_URL", "memory"), ("PORT", "0")]).await;
    let health = get(&http, &memory.url("/healthz")).await.json();
    assert_eq!(health["status"], "memory");
    assert_eq!(health["redis"]["state"], "disabled");
    assert_eq!(
        get(&http, &memory.url("/products/1")).await.status,
        StatusCode::OK
    );
}

/// What `curl -d user=alice` sends.
const FORM: &[(&str, &str)] = &[("content-type", "application/x-www-form-urlencoded")];

/// `BIND` in host:port form (a user's habit) is accepted as well as an
/// address; and `POST /login` takes the user as a form or as JSON, and
/// answers anything else with a 400 that says what to send.
#[tokio::test]
async fn server_bind_host_port_and_login_bodies() {
    let http = http_client();
    let server = Running::start(
        "server",
        &[],
        &[
            ("REDIS_URL", "memory"),
            ("BIND", "127.0.0.1:0"),
            ("PORT", ""),
        ],
    )
    .await;
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);

    let form = send(
        &http,
        Method::POST,
        &server.url("/login"),
        FORM,
        "user=alice",
    )
    .await;
    assert_eq!(form.status, StatusCode::OK, "{}", form.body);
    assert_eq!(form.json()["user"], "alice");
    let json = &[("content-type", "application/json")];
    let login = send(
        &http,
        Method::POST,
        &server.url("/login"),
        json,
        r#"{"user":"bob"}"#,
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.body);
    assert_eq!(login.json()["user"], "bob");
    let bob = session_cookie(&login);
    let me = send(
        &http,
        Method::GET,
        &server.url("/me"),
        &[("cookie", &bob)],
        "",
    )
    .await;
    assert_eq!(me.json()["user"], "bob");

    // The raw name (what the demo took before), a JSON string, no body.
    for (headers, body) in [
        (FORM, "alice"),
        (&[][..], "alice"),
        (json, r#"{"user":"#),
        (json, r#"{"name":"alice"}"#),
        (FORM, ""),
    ] {
        let refused = send(&http, Method::POST, &server.url("/login"), headers, body).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{headers:?} {body:?}"
        );
        assert!(
            refused.body.contains("user=alice") && refused.body.contains(r#"{"user":"alice"}"#),
            "says what to send: {}",
            refused.body
        );
        assert!(
            refused.header("set-cookie").is_empty(),
            "no session for a refused login"
        );
    }
}

/// The status of the demo's `GET /admin/cache/stats` with `authorization`.
fn admin_stats(
    http: &Client<HttpConnector, ClientBody>,
    server: &Running,
    authorization: String,
) -> impl Future<Output = StatusCode> + use<> {
    let (http, url) = (http.clone(), server.url("/admin/cache/stats"));
    async move {
        send(
            &http,
            Method::GET,
            &url,
            &[("authorization", &authorization)],
            "",
        )
        .await
        .status
    }
}

/// The admin token guards purges: it is never written to the `tracing`
/// log (which ends up in log aggregators). A generated one is printed once,
/// to stderr, with a warning; one from `ADMIN_TOKEN` is printed nowhere.
#[tokio::test]
async fn server_admin_token_never_reaches_the_log() {
    let http = http_client();
    let stats =
        |server: &Running, token: &str| admin_stats(&http, server, format!("Bearer {token}"));

    // No ADMIN_TOKEN: a generated one, shown once on stderr.
    let server = Running::start(
        "server",
        &[],
        &[
            ("REDIS_URL", "memory"),
            ("PORT", "0"),
            ("RUST_LOG", "trace"),
        ],
    )
    .await;
    let shown = tokio::time::timeout(DEADLINE, async {
        loop {
            let lines: Vec<String> = server
                .stderr()
                .into_iter()
                .filter(|l| l.contains("ADMIN_TOKEN"))
                .collect();
            if !lines.is_empty() {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no admin token on stderr: {:?}", server.log()));
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert!(shown[0].starts_with("warning:"), "{shown:?}");
    let token = shown[0]
        .split_whitespace()
        .last()
        .expect("the line ends with the token")
        .to_owned();
    assert!(token.len() >= 32, "a long random token: {token}");
    assert_eq!(stats(&server, &token).await, StatusCode::OK);
    let mut wrong = token.clone();
    wrong.pop();
    wrong.push('x');
    assert_eq!(stats(&server, &wrong).await, StatusCode::UNAUTHORIZED);
    assert_eq!(stats(&server, "").await, StatusCode::UNAUTHORIZED);
    let stdout: Vec<String> = {
        let stderr = server.stderr();
        server
            .log()
            .into_iter()
            .filter(|l| !stderr.contains(l))
            .collect()
    };
    assert!(
        stdout.iter().any(|l| l.contains("listening on")),
        "the tracing log is captured: {stdout:?}"
    );
    assert!(
        !stdout.iter().any(|l| l.contains(&token)),
        "the generated token is in the tracing log: {stdout:?}"
    );
    assert_eq!(
        server.log().iter().filter(|l| l.contains(&token)).count(),
        1,
        "printed once"
    );

    // ADMIN_TOKEN set: it works and is printed nowhere.
    let chosen = "chosen-admin-token-5f0c1d9e7a3b";
    let server = Running::start(
        "server",
        &[],
        &[
            ("REDIS_URL", "memory"),
            ("PORT", "0"),
            ("RUST_LOG", "trace"),
            ("ADMIN_TOKEN", chosen),
        ],
    )
    .await;
    assert_eq!(stats(&server, chosen).await, StatusCode::OK);
    assert_eq!(stats(&server, "chosen").await, StatusCode::UNAUTHORIZED);
    assert!(
        !server.log().iter().any(|l| l.contains(chosen)),
        "{:?}",
        server.log()
    );
}

/// What a client can do to the demo without credentials stays bounded: a
/// rename takes only the products there are and a name of at most 100
/// characters (it used to store any id with any body), and wrong admin
/// tokens are throttled by the flood guard (50 per 30 s a client). A token
/// from a file, ending with a newline, still works.
#[tokio::test]
async fn server_product_renames_and_admin_guesses_are_bounded() {
    let http = http_client();
    let token = "file-admin-token-9c2e4b7d1f0a";
    let with_newline = format!("{token}\n");
    let server = Running::start(
        "server",
        &[],
        &[
            ("REDIS_URL", "memory"),
            ("PORT", "0"),
            ("ADMIN_TOKEN", &with_newline),
        ],
    )
    .await;
    let put = |path: &str, body: String| {
        let (http, url) = (http.clone(), server.url(path));
        async move { send(&http, Method::PUT, &url, &[], &body).await }
    };
    let unknown = put("/products/4000000000", "Gold mug".to_owned()).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);
    let long = put("/products/1", "x".repeat(101)).await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST, "{}", long.body);
    assert!(long.body.contains("100"), "says the bound: {}", long.body);
    let empty = put("/products/1", "  ".to_owned()).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    let renamed = put("/products/1", "Blue mug".to_owned()).await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    assert!(
        get(&http, &server.url("/products/1"))
            .await
            .body
            .contains("Blue mug")
    );
    let list = get(&http, &server.url("/products")).await;
    assert!(!list.body.contains("Gold mug"), "{}", list.body);

    let stats = |authorization: String| admin_stats(&http, &server, authorization);
    assert_eq!(stats(format!("Bearer {token}")).await, StatusCode::OK);
    let mut statuses = Vec::new();
    for guess in 0..60 {
        statuses.push(stats(format!("Bearer guess-{guess}")).await);
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "60 wrong tokens in a row were never throttled: {statuses:?}"
    );
}

// ---------------------------------------------------------------------------
// examples/caching_proxy.rs

/// A request as the origin saw it: method, headers (lower-case names), body.
type Seen = (Method, BTreeMap<String, String>, String);

/// What the in-test origin saw.
#[derive(Clone, Default)]
struct Origin {
    cached_hits: Arc<AtomicUsize>,
    /// The last `/echo` request: method, headers, body.
    seen: Arc<Mutex<Option<Seen>>>,
    /// `/stream` sends its first chunk, then waits for this.
    release_stream: Arc<tokio::sync::Notify>,
    /// `/upload` reports each chunk it gets.
    uploads: Arc<Mutex<Option<mpsc::UnboundedSender<Bytes>>>>,
    /// The `Range` of every `/ranged` request (empty: none).
    ranges_seen: Arc<Mutex<Vec<String>>>,
}

/// The 100 bytes `/ranged` serves.
fn ranged_body() -> Vec<u8> {
    (0..100u8).map(|i| b'a' + i % 26).collect()
}

/// Answers `Range: bytes=a-b` with a `206`, anything else with the whole.
async fn origin_ranged(State(origin): State<Origin>, headers: HeaderMap) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    origin.ranges_seen.lock().expect("lock").push(range.clone());
    let body = ranged_body();
    let common = [
        (header::CACHE_CONTROL, "public, max-age=60"),
        (header::ETAG, "\"r1\""),
        (header::ACCEPT_RANGES, "bytes"),
    ];
    let span = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .filter(|(a, b)| a <= b && *b < body.len());
    match span {
        Some((a, b)) => (
            StatusCode::PARTIAL_CONTENT,
            common,
            [(
                header::CONTENT_RANGE,
                format!("bytes {a}-{b}/{}", body.len()),
            )],
            body[a..=b].to_vec(),
        )
            .into_response(),
        None => (common, body).into_response(),
    }
}

async fn origin_cached(State(origin): State<Origin>) -> Response {
    origin.cached_hits.fetch_add(1, Ordering::SeqCst);
    (
        [
            (header::CACHE_CONTROL, "public, max-age=60"),
            (header::CONNECTION, "x-hop"),
            (HeaderName::from_static("x-hop"), "secret"),
            (HeaderName::from_static("keep-alive"), "timeout=5"),
        ],
        "cached body",
    )
        .into_response()
}

async fn origin_short() -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=1")],
        "short-lived body",
    )
        .into_response()
}

async fn origin_echo(State(origin): State<Origin>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body).into_owned();
    *origin.seen.lock().expect("lock") = Some((parts.method, headers, body.clone()));
    (StatusCode::CREATED, body).into_response()
}

async fn origin_stream(State(origin): State<Origin>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(2);
    tokio::spawn(async move {
        let _ = tx
            .send(Ok(http_body::Frame::data(Bytes::from("first;"))))
            .await;
        origin.release_stream.notified().await;
        let _ = tx
            .send(Ok(http_body::Frame::data(Bytes::from("rest"))))
            .await;
    });
    Body::new(StreamBody::new(ReceiverStream::new(rx))).into_response()
}

async fn origin_upload(State(origin): State<Origin>, request: Request) -> Response {
    let reports = origin.uploads.lock().expect("lock").clone();
    let mut body = request.into_body();
    let mut total = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if let Some(reports) = &reports {
                let _ = reports.send(data);
            }
        }
    }
    format!("received {total} bytes").into_response()
}

/// The origin on a free port; resolves `stop` to shut it down, and waits
/// until every connection is closed.
async fn start_origin(
    origin: Origin,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let app = Router::new()
        .route("/cached", axum::routing::get(origin_cached))
        .route("/short", axum::routing::get(origin_short))
        .route("/echo", axum::routing::any(origin_echo))
        .route("/stream", axum::routing::get(origin_stream))
        .route("/upload", axum::routing::post(origin_upload))
        .route("/ranged", axum::routing::get(origin_ranged))
        .with_state(origin);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .expect("origin serves");
    });
    (addr, stop, task)
}

#[tokio::test]
async fn caching_proxy_caches_forwards_streams_and_reports_a_dead_upstream() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let (origin_addr, stop_origin, origin_task) = start_origin(origin.clone()).await;
    let upstream = format!("http://{origin_addr}");
    let proxy = Running::start(
        "caching_proxy",
        &["--upstream", &upstream, "--listen", "127.0.0.1:0"],
        &[("REDIS_URL", redis.url())],
    )
    .await;
    let http = http_client();

    // GET: forwarded once, then answered from the cache.
    let first = get(&http, &proxy.url("/cached")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, "cached body");
    assert_eq!(
        first.header("cache-status"),
        "tower-redis; fwd=uri-miss; stored"
    );
    assert_eq!(first.header("via"), "1.1 tower-redis-proxy");
    for hop in ["x-hop", "keep-alive"] {
        assert!(
            !first.headers.contains_key(hop),
            "{hop} reached the client: {:?}",
            first.headers
        );
    }
    // The entry is written once the body has gone out: wait for it in Redis.
    wait_for_keys(&redis, CACHE_KEYS, 1).await;
    let hit = get(&http, &proxy.url("/cached")).await;
    assert!(
        hit.header("cache-status").starts_with("tower-redis; hit"),
        "{:?}",
        hit.headers
    );
    assert_eq!(hit.body, "cached body");
    assert!(hit.header("age").parse::<u64>().is_ok());
    assert_eq!(
        origin.cached_hits.load(Ordering::SeqCst),
        1,
        "the hit did not reach the origin"
    );

    // POST with a body, hop-by-hop fields, a forged X-Forwarded-For.
    let posted = send(
        &http,
        Method::POST,
        &proxy.url("/echo?x=1"),
        &[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9;host=evil.example"),
            ("x-kept", "yes"),
        ],
        "order=42",
    )
    .await;
    assert_eq!(posted.status, StatusCode::CREATED);
    assert_eq!(posted.body, "order=42");
    assert_eq!(posted.header("via"), "1.1 tower-redis-proxy");
    let (method, seen, body) = origin
        .seen
        .lock()
        .expect("lock")
        .clone()
        .expect("the origin got the POST");
    assert_eq!(method, Method::POST);
    assert_eq!(body, "order=42");
    assert_eq!(
        seen["host"],
        origin_addr.to_string(),
        "Host is the upstream's"
    );
    assert_eq!(seen["x-forwarded-host"], proxy.addr.to_string());
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "the client's forged value is gone"
    );
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(
        !seen.contains_key("forwarded"),
        "one forwarding family only (X-Forwarded-*), and the client's Forwarded is dropped: {seen:?}"
    );
    assert_eq!(seen["via"], "1.1 tower-redis-proxy");
    assert_eq!(seen["x-kept"], "yes");
    for hop in [
        "x-secret",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "keep-alive",
        "connection",
    ] {
        assert!(
            !seen.contains_key(hop),
            "{hop} reached the origin: {seen:?}"
        );
    }
    // Other methods too.
    let deleted = send(&http, Method::DELETE, &proxy.url("/echo"), &[], "").await;
    assert_eq!(deleted.status, StatusCode::CREATED);
    assert_eq!(
        origin
            .seen
            .lock()
            .expect("lock")
            .as_ref()
            .map(|s| s.0.clone()),
        Some(Method::DELETE)
    );

    // Response bodies stream: the first chunk arrives before the origin has sent the rest.
    let request = http::Request::get(proxy.url("/stream"))
        .body(full(""))
        .expect("request");
    let response = tokio::time::timeout(DEADLINE, http.request(request))
        .await
        .expect("head in time")
        .expect("response");
    let mut body = response.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("the first chunk comes through before the rest exists")
        .expect("a frame")
        .expect("no error");
    assert_eq!(first.into_data().expect("data"), "first;");
    origin.release_stream.notify_one();
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("rest")
        .expect("body");
    assert_eq!(rest.to_bytes(), "rest");

    // Request bodies stream: the origin has the first chunk before the client sends the second.
    let (chunks_tx, mut chunks_seen) = mpsc::unbounded_channel();
    *origin.uploads.lock().expect("lock") = Some(chunks_tx);
    let (frames_tx, frames_rx) =
        mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(1);
    let upload = http::Request::post(proxy.url("/upload"))
        .body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(
            frames_rx,
        ))))
        .expect("request");
    let reply = tokio::spawn({
        let http = http.clone();
        async move { http.request(upload).await }
    });
    frames_tx
        .send(Ok(http_body::Frame::data(Bytes::from("part one,"))))
        .await
        .expect("send");
    let got = tokio::time::timeout(DEADLINE, chunks_seen.recv())
        .await
        .expect("the origin got the first chunk while the upload was still open")
        .expect("a chunk");
    assert_eq!(got, "part one,");
    frames_tx
        .send(Ok(http_body::Frame::data(Bytes::from("part two"))))
        .await
        .expect("send");
    drop(frames_tx);
    let reply = tokio::time::timeout(DEADLINE, reply)
        .await
        .expect("upload answered")
        .expect("task")
        .expect("response");
    let text = reply.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(text, "received 17 bytes");

    // Fresh for one second only: stale (but kept) by the time the origin is gone.
    let short = get(&http, &proxy.url("/short")).await;
    assert_eq!(short.body, "short-lived body");
    wait_for_keys(&redis, CACHE_KEYS, 2).await;

    // The origin goes away: 502 with a short body; what is cached is still served.
    let _ = stop_origin.send(());
    tokio::time::timeout(DEADLINE, origin_task)
        .await
        .expect("origin stops")
        .expect("task");
    let down = get(&http, &proxy.url("/not-cached")).await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY);
    assert!(down.body.starts_with("502 Bad Gateway"), "{}", down.body);
    assert!(down.body.len() < 200, "{}", down.body);
    let cached = get(&http, &proxy.url("/cached")).await;
    assert_eq!(cached.status, StatusCode::OK);
    assert!(
        cached.header("cache-status").contains("; hit"),
        "{:?}",
        cached.headers
    );
    // Stale and the origin down: the stale copy instead of a 502
    // (stale-if-error). Polled until the entry has gone stale.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let stale = loop {
        let reply = get(&http, &proxy.url("/short")).await;
        let fresh_hit =
            reply.status == StatusCode::OK && !reply.header("cache-status").contains("fwd=");
        if !fresh_hit {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/short never went stale"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stale.status, StatusCode::OK, "{stale:?}");
    assert_eq!(stale.body, "short-lived body");
    let status = stale.header("cache-status");
    assert!(
        status.contains("fwd=stale")
            && status.contains("fwd-status=502")
            && status.contains("stale-if-error"),
        "{status}"
    );
}

/// A GET of `url` with `Range: range`.
async fn get_range(client: &Client<HttpConnector, ClientBody>, url: &str, range: &str) -> Reply {
    send(client, Method::GET, url, &[("range", range)], "").await
}

/// `caching_proxy --forward-ranges`: a range miss goes upstream with its
/// `Range` as the client sent it, the `206` is stored as a partial entry,
/// and a sub-range of it is then answered from the cache.
#[tokio::test]
async fn caching_proxy_forward_ranges_stores_the_partial_answer() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let (origin_addr, stop_origin, origin_task) = start_origin(origin.clone()).await;
    let upstream = format!("http://{origin_addr}");
    let proxy = Running::start(
        "caching_proxy",
        &[
            "--upstream",
            &upstream,
            "--listen",
            "127.0.0.1:0",
            "--forward-ranges",
        ],
        &[("REDIS_URL", redis.url())],
    )
    .await;
    let http = http_client();
    let whole = String::from_utf8(ranged_body()).expect("ASCII");

    let url = proxy.url("/ranged");
    let first = get_range(&http, &url, "bytes=10-19").await;
    assert_eq!(first.status, StatusCode::PARTIAL_CONTENT, "{first:?}");
    assert_eq!(first.body, whole[10..20]);
    assert_eq!(first.header("content-range"), "bytes 10-19/100");
    assert_eq!(
        *origin.ranges_seen.lock().expect("lock"),
        vec!["bytes=10-19".to_owned()],
        "the range went upstream as the client sent it"
    );
    wait_for_keys(&redis, CACHE_KEYS, 1).await;

    let sub = get_range(&http, &url, "bytes=12-15").await;
    assert_eq!(sub.status, StatusCode::PARTIAL_CONTENT, "{sub:?}");
    assert_eq!(sub.body, whole[12..16]);
    assert_eq!(sub.header("content-range"), "bytes 12-15/100");
    assert!(
        sub.header("cache-status").starts_with("tower-redis; hit"),
        "{:?}",
        sub.headers
    );
    assert_eq!(
        origin.ranges_seen.lock().expect("lock").len(),
        1,
        "the sub-range was answered from the stored part"
    );

    let _ = stop_origin.send(());
    let _ = tokio::time::timeout(DEADLINE, origin_task).await;
}

/// The demo server behind the caching proxy: told to trust the proxy
/// (`TRUSTED_PROXIES`), it keys its cache by the host the proxy reports
/// and stores responses; before, the proxy's `X-Forwarded-Host` kept every
/// response out of its cache.
#[tokio::test]
async fn the_demo_server_behind_the_caching_proxy_keeps_caching() {
    let app_redis = TestRedis::start().await;
    let proxy_redis = TestRedis::start().await;
    let server = Running::start(
        "server",
        &[],
        &[
            ("REDIS_URL", app_redis.url()),
            ("PORT", "0"),
            ("ADMIN_TOKEN", "smoke-token"),
            ("TRUSTED_PROXIES", "127.0.0.1, ::1"),
        ],
    )
    .await;
    let upstream = server.url("");
    let proxy = Running::start(
        "caching_proxy",
        &["--upstream", &upstream, "--listen", "127.0.0.1:0"],
        &[("REDIS_URL", proxy_redis.url())],
    )
    .await;
    let http = http_client();
    let first = get(&http, &proxy.url("/products/1")).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    // The app's own cache stored the page, keyed by the proxy's host: two
    // entries, the product's data value and the page (the admin's entry
    // lookup cannot name a forwarded origin's key).
    wait_for_keys(&app_redis, CACHE_KEYS, 2).await;
    // A client's forged forwarding headers change nothing: the proxy drops them.
    let forged = send(
        &http,
        Method::GET,
        &proxy.url("/products/1"),
        &[
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "gopher"),
            ("forwarded", "for=1.2.3.4;host=evil.example"),
        ],
        "",
    )
    .await;
    assert_eq!(forged.status, StatusCode::OK);
    assert!(
        !forged.body.contains("evil.example"),
        "a forged host reached the page: {}",
        forged.body
    );
}

#[tokio::test]
async fn caching_proxy_rate_limit_and_bad_arguments() {
    let origin = Origin::default();
    let (origin_addr, _stop_origin, _task) = start_origin(origin.clone()).await;
    let upstream = format!("http://{origin_addr}");
    let proxy = Running::start(
        "caching_proxy",
        &[
            "--upstream",
            &upstream,
            "--listen",
            "127.0.0.1:0",
            "--rate-limit",
            "2/min",
        ],
        &[("REDIS_URL", "memory")],
    )
    .await;
    let http = http_client();
    let statuses = [
        get(&http, &proxy.url("/echo")).await,
        get(&http, &proxy.url("/echo")).await,
        get(&http, &proxy.url("/echo")).await,
    ];
    assert_eq!(statuses[0].status, StatusCode::CREATED);
    assert!(
        statuses[0]
            .all("ratelimit-policy")
            .contains("\"per-ip\";q=2;w=60")
    );
    assert_eq!(statuses[1].status, StatusCode::CREATED);
    assert_eq!(statuses[2].status, StatusCode::TOO_MANY_REQUESTS);

    for bad in [
        &[][..],
        &["--upstream"],
        &["--upstream", "ftp://x"],
        &["--upstream", "http://x", "--rate-limit", "lots"],
    ] {
        let output = run_to_end("caching_proxy", bad).await;
        assert_eq!(output.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("usage: caching_proxy"),
            "{bad:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// examples/grpc.rs

/// The `OK: n, RESOURCE_EXHAUSTED: n, other: n` summary of a client run.
fn summary(output: &std::process::Output) -> String {
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output: {output:?}"))
        .to_owned()
}

#[tokio::test]
async fn grpc_limits_per_api_key_with_and_without_redis() {
    let redis = TestRedis::start().await;
    let server = Running::start(
        "grpc",
        &["--listen", "127.0.0.1:0", "--limit", "3"],
        &[("REDIS_URL", redis.url())],
    )
    .await;
    let url = server.url("");

    let team_a = run_to_end(
        "grpc",
        &[
            "client", "--server", &url, "--key", "team-a", "--calls", "5",
        ],
    )
    .await;
    assert_eq!(summary(&team_a), "OK: 3, RESOURCE_EXHAUSTED: 2, other: 0");
    let stdout = String::from_utf8_lossy(&team_a.stdout);
    assert!(
        stdout.contains("4: RESOURCE_EXHAUSTED rate limit exceeded (per-key)"),
        "{stdout}"
    );
    // Another key has its own quota.
    let team_b = run_to_end(
        "grpc",
        &[
            "client", "--server", &url, "--key", "team-b", "--calls", "1",
        ],
    )
    .await;
    assert_eq!(summary(&team_b), "OK: 1, RESOURCE_EXHAUSTED: 0, other: 0");
    // No key: INVALID_ARGUMENT.
    let anonymous = run_to_end(
        "grpc",
        &["client", "--server", &url, "--no-key", "--calls", "1"],
    )
    .await;
    assert_eq!(
        summary(&anonymous),
        "OK: 0, RESOURCE_EXHAUSTED: 0, other: 1"
    );
    assert!(String::from_utf8_lossy(&anonymous.stdout).contains("INVALID_ARGUMENT"));

    // Without Redis each instance limits alone, with the same quota.
    redis.kill().await;
    let team_c = run_to_end(
        "grpc",
        &[
            "client", "--server", &url, "--key", "team-c", "--calls", "4",
        ],
    )
    .await;
    assert_eq!(summary(&team_c), "OK: 3, RESOURCE_EXHAUSTED: 1, other: 0");
}
