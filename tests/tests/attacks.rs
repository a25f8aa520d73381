//! Attacks on the three layers, each a named test against a real Redis:
//! cache poisoning through unkeyed headers, cache deception, session
//! fixation, session id guessing, signed-cookie tampering, rate-limit key
//! spoofing through forwarding headers, and Redis key injection through
//! user-controlled key parts.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, Route};
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{RedisManager, redis};
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};
use tower_redis_session::{Session, SessionLayer};

use tests::answer::Answer;

const HOST: &str = "shop.test";
const COOKIE: &str = "__Host-session";

async fn manager(redis: &TestRedis, prefix: &str) -> RedisManager {
    RedisManager::connect(redis.config().key_prefix(prefix).build().unwrap())
        .await
        .unwrap()
}

/// A manager whose command timeout no loaded machine reaches, for tests
/// whose subject is an exact count while Redis answers: with the default,
/// a stalled decision falls back to the in-process limiter and the count
/// changes for a reason that is not the test's.
async fn patient_manager(redis: &TestRedis, prefix: &str) -> RedisManager {
    RedisManager::connect(
        redis
            .config()
            .key_prefix(prefix)
            .command_timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
    )
    .await
    .unwrap()
}

/// Counts an answer toward an exact rate-limit count: true when admitted,
/// and a failure when the limiter decided it without Redis.
fn admitted_by_redis(answer: &Answer) -> bool {
    let field = answer
        .headers
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        !field.contains(";local"),
        "decided without Redis while Redis was up: {field}"
    );
    answer.status == StatusCode::OK
}

async fn call(app: &Router, request: Request<Body>) -> Answer {
    Answer::read(app.clone().oneshot(request).await.unwrap()).await
}

fn get_request(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::get(path).header(header::HOST, HOST);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::empty()).unwrap()
}

/// All keys in Redis, with SCAN.
async fn all_keys(redis: &TestRedis) -> Vec<String> {
    let mut conn = redis.connection().await.unwrap();
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

// ---------------------------------------------------------------------------
// Cache poisoning through unkeyed headers
// ---------------------------------------------------------------------------

/// An origin that trusts headers it should not: it builds links from
/// `X-Forwarded-Host`, routes on `X-Original-URL` and honours
/// `X-HTTP-Method-Override`, reflects the other unkeyed headers of
/// [`tower_redis_cache::DEFAULT_UNKEYED_HEADERS`], and marks every answer
/// publicly cacheable.
fn gullible_origin(cache: CacheLayer) -> Router {
    Router::new()
        .route(
            "/home",
            get(|headers: HeaderMap| async move {
                let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                let reflected = [
                    "x-forwarded-server",
                    "x-host",
                    "x-rewrite-url",
                    "x-http-method",
                    "x-method-override",
                ]
                .into_iter()
                .find_map(|name| text(name).map(|value| format!("{name} says {value}")));
                let body = if let Some(url) = text("x-original-url") {
                    format!("content of {url}")
                } else if let Some(method) = text("x-http-method-override") {
                    format!("{method} done")
                } else if let Some(reflected) = reflected {
                    reflected
                } else {
                    let host = text("x-forwarded-host").or(text("host")).unwrap_or("-");
                    format!("<script src=\"https://{host}/app.js\"></script>")
                };
                ([(header::CACHE_CONTROL, "public, max-age=300")], body)
            }),
        )
        .layer(cache)
}

async fn poisoning_attempt(attack: (&str, &str), poisoned_marker: &str) {
    let redis = TestRedis::start().await;
    let cache = CacheLayer::builder(manager(&redis, "poison").await)
        .build()
        .unwrap();
    let app = gullible_origin(cache.clone());

    // The attacker goes first, on an empty cache, and gets their own answer.
    let attacker = call(&app, get_request("/home", &[attack])).await;
    assert!(attacker.body.contains(poisoned_marker), "{}", attacker.body);
    assert!(
        !attacker.cache_status().contains("stored"),
        "a response to a request with {} is not stored: {}",
        attack.0,
        attacker.cache_status()
    );
    cache.flush().await;

    // Everyone else gets the real page, from the origin and then the cache.
    for _ in 0..2 {
        let victim = call(&app, get_request("/home", &[])).await;
        assert_eq!(victim.status, StatusCode::OK);
        assert!(
            !victim.body.contains(poisoned_marker),
            "the cache served the attacker's response: {}",
            victim.body
        );
        cache.flush().await;
    }
    let hit = call(&app, get_request("/home", &[])).await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert!(hit.body.contains(HOST));

    // With the entry in place, the attack header cannot replace it either.
    let again = call(&app, get_request("/home", &[attack])).await;
    cache.flush().await;
    let victim = call(&app, get_request("/home", &[])).await;
    assert!(!victim.body.contains(poisoned_marker), "{}", victim.body);
    drop(again);
}

#[tokio::test]
async fn cache_poisoning_via_x_forwarded_host() {
    poisoning_attempt(("x-forwarded-host", "evil.example"), "evil.example").await;
}

#[tokio::test]
async fn cache_poisoning_via_x_original_url() {
    poisoning_attempt(("x-original-url", "/admin"), "/admin").await;
}

#[tokio::test]
async fn cache_poisoning_via_x_http_method_override() {
    poisoning_attempt(("x-http-method-override", "DELETE"), "DELETE done").await;
}

#[tokio::test]
async fn cache_poisoning_via_x_forwarded_server() {
    poisoning_attempt(("x-forwarded-server", "evil.example"), "says evil.example").await;
}

#[tokio::test]
async fn cache_poisoning_via_x_host() {
    poisoning_attempt(("x-host", "evil.example"), "says evil.example").await;
}

#[tokio::test]
async fn cache_poisoning_via_x_rewrite_url() {
    poisoning_attempt(("x-rewrite-url", "/admin"), "says /admin").await;
}

#[tokio::test]
async fn cache_poisoning_via_x_http_method() {
    poisoning_attempt(("x-http-method", "DELETE"), "says DELETE").await;
}

#[tokio::test]
async fn cache_poisoning_via_x_method_override() {
    poisoning_attempt(("x-method-override", "DELETE"), "says DELETE").await;
}

// ---------------------------------------------------------------------------
// Cache deception
// ---------------------------------------------------------------------------

/// An app whose account page ignores whatever follows it in the path (as
/// many frameworks do), so `/account/style.css` is the account page; static
/// files under `/static/` are cached for a minute by route configuration.
async fn deception_app(redis: &TestRedis) -> (Router, CacheLayer) {
    let manager = manager(redis, "deception").await;
    let cache = CacheLayer::builder(manager.clone())
        .route(Route::new("/static/*").default_ttl(Duration::from_secs(60)))
        .build()
        .unwrap();
    let sessions = SessionLayer::builder(manager).build().unwrap();
    let account = |session: Session, headers: HeaderMap| async move {
        let user = match headers.get(header::AUTHORIZATION) {
            Some(token) => token.to_str().unwrap_or("-").to_owned(),
            None => session
                .user()
                .await
                .unwrap_or_else(|| "anonymous".to_owned()),
        };
        // A typical dynamic page: the origin says nothing about caching.
        format!("account of {user}")
    };
    let app = Router::new()
        .route("/account", get(account))
        .route("/account/{*rest}", get(account))
        .route("/static/{*file}", get(|| async { "body { color: red }" }))
        .route(
            "/login/{user}",
            post(|session: Session, Path(user): Path<String>| async move {
                session.cycle_id().await;
                session.set_user(&user).await;
                "welcome"
            }),
        )
        .layer(cache.clone())
        .layer(sessions);
    (app, cache)
}

#[tokio::test]
async fn cache_deception_through_a_static_looking_path_on_an_authenticated_route() {
    let redis = TestRedis::start().await;
    let (app, cache) = deception_app(&redis).await;
    let login = call(
        &app,
        Request::post("/login/victim")
            .header(header::HOST, HOST)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let cookie = format!("{COOKIE}={}", login.set_cookie(COOKIE).unwrap());

    // The victim is lured to account pages dressed up as static files.
    for path in [
        "/account/style.css",
        "/account/x/..%2F..%2Fstatic%2Fa.css",
        "/account/;.js",
        "/account.css",
    ] {
        let victim = call(&app, get_request(path, &[("cookie", &cookie)])).await;
        assert!(victim.status.as_u16() < 500, "{path}: {}", victim.status);
        let bearer = call(
            &app,
            get_request(path, &[("authorization", "Bearer victim-token")]),
        )
        .await;
        assert!(bearer.status.as_u16() < 500);
        cache.flush().await;

        // The attacker then fetches the same URL: never the victim's page.
        let attacker = call(&app, get_request(path, &[])).await;
        assert!(
            !attacker.body.contains("victim"),
            "{path}: the victim's account was served to another client ({})",
            attacker.cache_status()
        );
    }
    // Nothing personal was stored: the only cache entries are static files.
    let stored: Vec<String> = all_keys(&redis)
        .await
        .into_iter()
        .filter(|k| k.starts_with("deception:c:"))
        .collect();
    assert!(stored.is_empty(), "stored: {stored:?}");

    // The cache does cache the real static files (the rule is not just off).
    call(&app, get_request("/static/app.css", &[])).await;
    cache.flush().await;
    let hit = call(&app, get_request("/static/app.css", &[])).await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
}

// ---------------------------------------------------------------------------
// Sessions: fixation, guessing, tampering
// ---------------------------------------------------------------------------

fn session_app(layer: SessionLayer) -> Router {
    Router::new()
        .route(
            "/login/{user}",
            post(|session: Session, Path(user): Path<String>| async move {
                // The documented pattern: a new id on every privilege change.
                session.cycle_id().await;
                session.set_user(&user).await;
                "welcome"
            }),
        )
        .route(
            "/visit",
            post(|session: Session| async move {
                session.insert("visited", true).await.unwrap();
                "noted"
            }),
        )
        .route(
            "/whoami",
            get(|session: Session| async move {
                session
                    .user()
                    .await
                    .unwrap_or_else(|| "anonymous".to_owned())
            }),
        )
        .layer(layer)
}

async fn session_call(app: &Router, method: &str, path: &str, cookie: Option<&str>) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, format!("{COOKIE}={cookie}"));
    }
    call(app, request.body(Body::empty()).unwrap()).await
}

fn storage_key_exists(keys: &[String], id: &str) -> bool {
    use sha2::Digest;
    let hash = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(id.as_bytes()));
    keys.iter().any(|k| k.contains(&hash))
}

#[tokio::test]
async fn session_fixation_a_client_chosen_id_is_never_adopted() {
    let redis = TestRedis::start().await;
    let app = session_app(
        SessionLayer::builder(manager(&redis, "fix").await)
            .build()
            .unwrap(),
    );

    // 1. An id the attacker made up, well-formed, planted in the victim's browser.
    let chosen = URL_SAFE_NO_PAD.encode([7u8; 32]);
    let login = session_call(&app, "POST", "/login/victim", Some(&chosen)).await;
    let issued = login.set_cookie(COOKIE).expect("a session is issued");
    assert_ne!(issued, chosen, "the chosen id was adopted");
    let keys = all_keys(&redis).await;
    assert!(!storage_key_exists(&keys, &chosen));
    assert!(storage_key_exists(&keys, &issued));
    assert_eq!(
        session_call(&app, "GET", "/whoami", Some(&chosen))
            .await
            .body,
        "anonymous"
    );
    assert_eq!(
        session_call(&app, "GET", "/whoami", Some(&issued))
            .await
            .body,
        "victim"
    );

    // 2. A real anonymous session the attacker obtained, then planted: the
    // login moves the session to a new id, and the planted one dies.
    let planted = session_call(&app, "POST", "/visit", None)
        .await
        .set_cookie(COOKIE)
        .expect("an anonymous session");
    let login = session_call(&app, "POST", "/login/victim2", Some(&planted)).await;
    let after = login.set_cookie(COOKIE).expect("a new id on login");
    assert_ne!(after, planted);
    assert_eq!(
        session_call(&app, "GET", "/whoami", Some(&planted))
            .await
            .body,
        "anonymous",
        "the attacker's copy of the id is not logged in"
    );
    assert_eq!(
        session_call(&app, "GET", "/whoami", Some(&after))
            .await
            .body,
        "victim2"
    );
}

#[tokio::test]
async fn session_id_guessing_ids_are_uniformly_random() {
    let redis = TestRedis::start().await;
    let app = session_app(
        SessionLayer::builder(manager(&redis, "ids").await)
            .build()
            .unwrap(),
    );
    const N: usize = 1000;
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        let cookie = session_call(&app, "POST", &format!("/login/u{i}"), None)
            .await
            .set_cookie(COOKIE)
            .unwrap();
        let bytes = URL_SAFE_NO_PAD.decode(&cookie).unwrap();
        assert_eq!(bytes.len(), 32, "256-bit ids");
        ids.push(bytes);
    }
    let distinct: HashSet<&Vec<u8>> = ids.iter().collect();
    assert_eq!(distinct.len(), N, "no id repeats");

    // Each of the 256 bit positions is set in about half the ids: the
    // chi-square statistic over positions follows chi2(256) for a uniform
    // source (mean 256, sd 22.6); 430 is exceeded with probability < 1e-10.
    let mut ones = [0u32; 256];
    for id in &ids {
        for (bit, count) in ones.iter_mut().enumerate() {
            *count += u32::from(id[bit / 8] >> (bit % 8) & 1);
        }
    }
    let half = N as f64 / 2.0;
    let chi_bits: f64 = ones
        .iter()
        .map(|&c| (f64::from(c) - half).powi(2) / (N as f64 / 4.0))
        .sum();
    assert!(
        chi_bits < 430.0,
        "bit positions are biased: chi2 = {chi_bits:.1}"
    );

    // Byte values are equally frequent: chi2(255) over 32 000 bytes, same bound.
    let mut counts = [0u32; 256];
    for byte in ids.iter().flatten() {
        counts[usize::from(*byte)] += 1;
    }
    let expected = (N * 32) as f64 / 256.0;
    let chi_bytes: f64 = counts
        .iter()
        .map(|&c| (f64::from(c) - expected).powi(2) / expected)
        .sum();
    assert!(
        chi_bytes < 430.0,
        "byte values are biased: chi2 = {chi_bytes:.1}"
    );

    // Consecutive ids are unrelated: they differ in about half their bits
    // (mean 128, sd 8 per pair; the mean of N-1 pairs has sd 0.25).
    let distance: u32 = ids
        .windows(2)
        .map(|w| {
            w[0].iter()
                .zip(&w[1])
                .map(|(a, b)| (a ^ b).count_ones())
                .sum::<u32>()
        })
        .sum();
    let mean = f64::from(distance) / (N - 1) as f64;
    assert!(
        (mean - 128.0).abs() < 3.0,
        "mean Hamming distance {mean:.2}"
    );

    // And guessing finds nothing: ids near a real one are not sessions.
    let real = &ids[0];
    for bit in (0..256).step_by(32) {
        let mut guess = real.clone();
        guess[bit / 8] ^= 1 << (bit % 8);
        let guess = URL_SAFE_NO_PAD.encode(&guess);
        assert_eq!(
            session_call(&app, "GET", "/whoami", Some(&guess))
                .await
                .body,
            "anonymous"
        );
    }
}

#[tokio::test]
async fn signed_cookie_tampering_every_single_bit_flip_is_rejected() {
    let redis = TestRedis::start().await;
    let layer = SessionLayer::builder(manager(&redis, "signed").await)
        .signing_key(*b"an attacker never sees this key!")
        .build()
        .unwrap();
    let app = session_app(layer);
    let value = session_call(&app, "POST", "/login/alice", None)
        .await
        .set_cookie(COOKIE)
        .unwrap();
    assert_eq!(value.len(), 43 + 1 + 43, "id.signature");
    assert_eq!(
        session_call(&app, "GET", "/whoami", Some(&value))
            .await
            .body,
        "alice"
    );

    let mut tried = 0;
    for index in 0..value.len() {
        for bit in 0..8 {
            let mut bytes = value.clone().into_bytes();
            bytes[index] ^= 1 << bit;
            // Bytes a header cannot carry cannot be sent at all.
            let Ok(cookie) = HeaderValue::from_bytes(&[COOKIE.as_bytes(), b"=", &bytes].concat())
            else {
                continue;
            };
            let request = Request::get("/whoami")
                .header(header::COOKIE, cookie)
                .body(Body::empty())
                .unwrap();
            let answer = call(&app, request).await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(
                answer.body, "anonymous",
                "flipping bit {bit} of byte {index} still authenticates"
            );
            tried += 1;
        }
    }
    assert!(tried > 500, "{tried} flips tried");
    // The untampered cookie still works: the rejections were the signature's doing.
    assert_eq!(
        session_call(&app, "GET", "/whoami", Some(&value))
            .await
            .body,
        "alice"
    );
}

// ---------------------------------------------------------------------------
// Rate limits: key spoofing and key injection
// ---------------------------------------------------------------------------

fn with_peer(mut request: Request<Body>, peer: &str) -> Request<Body> {
    let addr: SocketAddr = format!("{peer}:40000").parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(addr));
    request
}

#[tokio::test]
async fn rate_limit_key_spoofing_via_forwarding_headers_from_an_untrusted_peer() {
    let redis = TestRedis::start().await;
    let limits = RateLimitLayer::builder(patient_manager(&redis, "spoof").await)
        .policy(Policy::gcra("per-ip", 5, Duration::from_secs(60)))
        .trusted_proxies(["10.0.0.0/8"])
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(limits);

    // A client connecting directly rotates forwarding headers: one bucket.
    let mut admitted = 0;
    for i in 0..30 {
        let spoof = format!("198.51.100.{i}");
        let headers: Vec<(&str, String)> = match i % 3 {
            0 => vec![("x-forwarded-for", spoof)],
            1 => vec![("forwarded", format!("for={spoof}"))],
            _ => vec![
                ("x-forwarded-for", format!("{spoof}, 10.0.0.1")),
                ("x-real-ip", spoof),
            ],
        };
        let mut request = Request::get("/");
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        let request = with_peer(request.body(Body::empty()).unwrap(), "203.0.113.7");
        if admitted_by_redis(&call(&app, request).await) {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 5,
        "the quota of the socket peer, whatever the headers say"
    );

    // Behind a trusted proxy that appends the real client: whatever the
    // client put to the left, its own address is the key.
    let mut admitted = 0;
    for i in 0..30 {
        let xff = format!("198.51.100.{i}, 1.2.3.{i}, 203.0.113.9");
        let request = Request::get("/").header("x-forwarded-for", xff);
        let request = with_peer(request.body(Body::empty()).unwrap(), "10.0.0.1");
        if admitted_by_redis(&call(&app, request).await) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);

    let keys: Vec<String> = all_keys(&redis)
        .await
        .into_iter()
        .filter(|k| k.starts_with("spoof:"))
        .collect();
    assert_eq!(keys.len(), 2, "one counter per real client: {keys:?}");
    assert!(keys.iter().any(|k| k.ends_with(":203.0.113.7")), "{keys:?}");
    assert!(keys.iter().any(|k| k.ends_with(":203.0.113.9")), "{keys:?}");
}

#[tokio::test]
async fn rate_limit_bypass_via_a_client_forwarded_header_through_a_trusted_proxy() {
    // The proxies append to X-Forwarded-For and, like nginx, HAProxy and
    // cloud load balancers, pass a client's `Forwarded` on untouched. A
    // client that writes `Forwarded: for=<anything>` must neither get a
    // fresh bucket per request nor name an allow-listed address.
    let redis = TestRedis::start().await;
    let limits = RateLimitLayer::builder(patient_manager(&redis, "fwd").await)
        .policy(Policy::gcra("per-ip", 5, Duration::from_secs(60)))
        .trusted_proxies(["10.0.0.0/8"])
        .allow_ips(["192.0.2.1"])
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(limits);

    let mut admitted = 0;
    for i in 0..30 {
        let spoof = if i % 2 == 0 {
            format!("for=198.51.100.{i}")
        } else {
            "for=192.0.2.1".to_owned()
        };
        let request = Request::get("/")
            .header("forwarded", spoof)
            .header("x-forwarded-for", "203.0.113.7");
        let request = with_peer(request.body(Body::empty()).unwrap(), "10.0.0.1");
        if admitted_by_redis(&call(&app, request).await) {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 5,
        "the quota of the client the proxy appended to X-Forwarded-For"
    );
    let keys: Vec<String> = all_keys(&redis)
        .await
        .into_iter()
        .filter(|k| k.starts_with("fwd:"))
        .collect();
    assert_eq!(keys.len(), 1, "one counter for the one client: {keys:?}");
    assert!(keys[0].ends_with(":203.0.113.7"), "{keys:?}");
}

/// Raw key parts an attacker controls, several of which a naive key builder
/// would map to the same key, to another key's namespace, or to a glob.
fn hostile_parts() -> Vec<String> {
    [
        "alice",
        "alice:admin",
        "alice%3Aadmin",
        "alice%253Aadmin",
        "{rl}",
        "x}:{rl",
        "}",
        "{",
        "*",
        "?",
        "[a-z]",
        "al*ce",
        "alice\n",
        "alice\r\nFLUSHALL\r\n",
        "alice ",
        " alice",
        "a l i c e",
        "alice\t",
        "alice\u{0}",
        ":",
        "::",
        "%",
        "%%",
        "..",
        "k:rl:other",
        "\\",
        "ü",
        "😀",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

#[tokio::test]
async fn redis_key_injection_through_user_controlled_key_parts() {
    let redis = TestRedis::start().await;
    let manager = manager(&redis, "inj").await;
    // The key is a query parameter, percent-decoded: any bytes at all.
    let limits = RateLimitLayer::builder(manager.clone())
        .policy(
            Policy::gcra("by-user", 2, Duration::from_secs(60)).key(Key::from_fn(|parts| {
                let query = parts.uri.query()?;
                let value = query.strip_prefix("user=")?;
                Some(percent_decode(value))
            })),
        )
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(limits);

    let parts = hostile_parts();
    for part in &parts {
        let uri = format!("/?user={}", percent_encode(part));
        for attempt in 0..3 {
            let answer = call(&app, Request::get(&uri).body(Body::empty()).unwrap()).await;
            // Two each: one key's quota is never shared with another's.
            let expected = if attempt < 2 { 200 } else { 429 };
            assert_eq!(
                answer.status.as_u16(),
                expected,
                "{part:?} attempt {attempt}"
            );
        }
    }

    let keys = all_keys(&redis).await;
    assert_eq!(
        keys.len(),
        parts.len(),
        "one key per distinct input, no collisions: {keys:?}"
    );
    let prefix = "inj:{rl}:rl:by-user:k:";
    for key in &keys {
        let Some(escaped) = key.strip_prefix(prefix) else {
            panic!("{key:?} escaped the namespace");
        };
        assert!(
            !escaped.contains([
                ':', '{', '}', '*', '?', '[', ']', ' ', '\n', '\r', '\t', '\0', '\\'
            ]),
            "{key:?} carries a structural character"
        );
    }
    // The keyspace's own escaping gives these keys, one to one.
    let expected: HashSet<String> = parts
        .iter()
        .map(|p| manager.keys().tagged("rl", &["rl", "by-user", "k", p]))
        .collect();
    assert_eq!(expected, keys.into_iter().collect::<HashSet<_>>());
}

#[tokio::test]
async fn redis_key_injection_through_urls_and_session_data_stays_hashed() {
    let redis = TestRedis::start().await;
    let manager = manager(&redis, "inj2").await;
    let cache = CacheLayer::builder(manager.clone()).build().unwrap();
    let app = Router::new()
        .route(
            "/{*path}",
            get(|| async { ([(header::CACHE_CONTROL, "public, max-age=60")], "page") }),
        )
        .route(
            "/user/{name}",
            post(|session: Session, Path(name): Path<String>| async move {
                session.set_user(&name).await;
                session.insert(&name, &name).await.unwrap();
                "ok"
            }),
        )
        .layer(cache.clone())
        .layer(SessionLayer::builder(manager).build().unwrap());
    for part in hostile_parts() {
        let encoded = percent_encode(&part);
        let answer = call(&app, get_request(&format!("/p/{encoded}"), &[])).await;
        assert_eq!(answer.status, StatusCode::OK, "{part:?}");
        let answer = call(
            &app,
            Request::post(format!("/user/{encoded}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{part:?}");
    }
    cache.flush().await;
    let keys = all_keys(&redis).await;
    assert!(!keys.is_empty());
    let hash = |s: &str| {
        s.len() == 43
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    for key in &keys {
        // Cache entries: prefix:c:<sha256 of the URL>; purge indexes:
        // prefix:cx:<directory> with structural characters escaped. Sessions
        // and users: prefix:{<sha256>}:s / :u. Nothing a client typed
        // reaches a key unescaped.
        let ok = match key.strip_prefix("inj2:") {
            Some(rest) => match rest.split_once(':') {
                Some(("c", digest)) => hash(digest),
                // The cache's purge indexes: a URL directory or a tag, escaped.
                Some(("cx" | "ct", name)) => !name.contains([
                    ':', '{', '}', '*', '?', '[', ']', ' ', '\n', '\r', '\t', '\0', '\\',
                ]),
                Some((tag, kind)) => {
                    (kind == "s" || kind == "u")
                        && tag.starts_with('{')
                        && tag.ends_with('}')
                        && hash(&tag[1..tag.len() - 1])
                }
                None => false,
            },
            None => false,
        };
        assert!(ok, "unexpected key shape {key:?}");
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
