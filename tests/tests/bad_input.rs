//! Bad input through all three layers at once, against a real Redis: huge
//! headers, very long URLs, bytes that are not UTF-8 in paths and header
//! values, and duplicate or conflicting directives. Every answer is a
//! bypass (the origin's answer) or a clean 4xx: never a panic, never a
//! 5xx the app did not send, never a wait beyond the latency bound.
//!
//! The parsers themselves are property-tested beside their code
//! (`proptests.rs` in the cache, rate-limit and session crates).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;

use tests::answer::Answer;
use tests::chaos::{app, tuned};

/// No request may take longer, whatever it carries.
const HANG_BOUND: Duration = Duration::from_secs(10);

/// The chaos app (cache, sessions, rate limit) plus a route whose response
/// directives come from the query, for conflicting origin directives.
async fn full_stack(redis: &TestRedis) -> (Router, RedisManager) {
    let manager = RedisManager::connect(tuned(redis.config()).build().unwrap())
        .await
        .unwrap();
    let echo = Router::new().route(
        "/echo",
        get(|uri: http::Uri| async move {
            let mut headers = HeaderMap::new();
            for pair in uri.query().unwrap_or("").split('&') {
                if let Some(value) = pair.strip_prefix("cc=")
                    && let Ok(value) = HeaderValue::from_str(&value.replace("%20", " "))
                {
                    headers.append(header::CACHE_CONTROL, value);
                }
            }
            (headers, format!("echo {uri}"))
        }),
    );
    // The echo route sits behind the same layers as the rest.
    let app = app(manager.clone()).merge(wrap(echo, manager.clone()));
    (app, manager)
}

/// The three layers around `router`, as in the chaos app.
fn wrap(router: Router, manager: RedisManager) -> Router {
    use tower_redis_cache::CacheLayer;
    use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};
    use tower_redis_session::SessionLayer;
    router
        .layer(CacheLayer::builder(manager.clone()).build().unwrap())
        .layer(SessionLayer::builder(manager.clone()).build().unwrap())
        .layer(
            RateLimitLayer::builder(manager)
                .policy(
                    Policy::gcra("echo", 1_000_000, Duration::from_secs(1))
                        .key(Key::header("x-client")),
                )
                .build()
                .unwrap(),
        )
}

/// Sends `request` through the stack in a task of its own, so that a panic
/// anywhere in the layers fails the test with its message instead of
/// aborting it, and checks the universal invariants.
async fn send(app: &Router, request: Request<Body>, what: &str) -> Answer {
    let app = app.clone();
    let started = Instant::now();
    let response = tokio::spawn(async move {
        let response = app.oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts, body)
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: the stack panicked: {e}"));
    let took = started.elapsed();
    let (parts, body) = response;
    // A bound against hangs. Not the chaos suite's Redis bound: a request
    // may wait for another's origin fetch of the same URL (the cache's
    // coalescing, 5 s at most by default).
    assert!(took <= HANG_BOUND, "{what}: took {took:?}");
    let answer = Answer::from_parts(parts.status, parts.headers, &body);
    assert!(
        !answer.status.is_server_error(),
        "{what}: answered {}: {}",
        answer.status,
        answer.body
    );
    answer
}

fn request(uri: &str) -> http::request::Builder {
    Request::get(uri)
        .header(header::HOST, "shop.test")
        .header("x-client", "c1")
}

/// Header values made of `bytes`, which may not be UTF-8 (obs-text).
fn raw(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).unwrap()
}

const STACK_HEADERS: [&str; 12] = [
    "cache-control",
    "pragma",
    "cookie",
    "authorization",
    "x-forwarded-for",
    "forwarded",
    "accept-language",
    "if-none-match",
    "if-modified-since",
    "range",
    "x-rl-key",
    "x-client",
];

#[tokio::test]
async fn huge_header_values_are_bypassed_or_refused_never_a_5xx() {
    let redis = TestRedis::start().await;
    let (app, _) = full_stack(&redis).await;
    let huge = "a,".repeat(64 * 1024);
    for name in STACK_HEADERS {
        for path in [
            "/page/1",
            "/limited",
            "/session/w1",
            "/echo?cc=public,%20max-age=60",
        ] {
            let mut request = request(path);
            request = request.header(name, huge.as_str());
            send(
                &app,
                request.body(Body::empty()).unwrap(),
                &format!("128 KiB {name} on {path}"),
            )
            .await;
        }
    }
    // A cookie header of thousands of cookies, and thousands of header lines.
    let cookies: String = (0..5000).map(|i| format!("c{i}=v{i}; ")).collect();
    send(
        &app,
        request("/session/w1")
            .header(header::COOKIE, cookies)
            .body(Body::empty())
            .unwrap(),
        "5000 cookies",
    )
    .await;
    let mut many = request("/page/2");
    for i in 0..2000 {
        many = many
            .header("x-forwarded-for", format!("10.0.{}.{}", i / 256, i % 256))
            .header(header::ACCEPT_LANGUAGE, format!("l{i}"))
            .header(header::CACHE_CONTROL, format!("max-age={i}"));
    }
    send(&app, many.body(Body::empty()).unwrap(), "6000 header lines").await;
}

#[tokio::test]
async fn very_long_urls_are_served_or_refused_never_a_5xx() {
    let redis = TestRedis::start().await;
    let (app, _) = full_stack(&redis).await;
    let long_segment = "x".repeat(60 * 1024);
    let many_params: String = (0..4500).map(|i| format!("p{i}={i}&")).collect();
    for uri in [
        format!("/page/1?q={long_segment}"),
        format!("/page/{long_segment}"),
        format!("/{long_segment}"),
        format!("/page/1?{many_params}"),
        format!("/session/{long_segment}"),
        format!("/limited?{many_params}"),
        format!("/echo?cc=public,%20max-age=60&{many_params}"),
    ] {
        let what = format!("GET {}…", &uri[..30]);
        send(&app, request(&uri).body(Body::empty()).unwrap(), &what).await;
        // Twice: the second may come from the cache, and must be whole.
        let again = send(&app, request(&uri).body(Body::empty()).unwrap(), &what).await;
        if uri.starts_with("/echo") {
            assert_eq!(again.body, format!("echo {uri}"));
        }
    }
}

#[tokio::test]
async fn invalid_utf8_in_paths_and_header_values_never_a_5xx() {
    let redis = TestRedis::start().await;
    let (app, _) = full_stack(&redis).await;
    // A URI cannot carry raw bytes above 0x7f; percent-encoded ones decode
    // to invalid UTF-8, which the router refuses with a 4xx.
    for path in [
        "/page/%FF%FE",
        "/session/%C3%28",
        "/session/%80/%FF",
        "/%ED%A0%80",
    ] {
        let answer = send(&app, request(path).body(Body::empty()).unwrap(), path).await;
        assert!(
            answer.status.is_client_error() || answer.status.is_success(),
            "{path}"
        );
        let post = Request::post(path).body(Body::empty()).unwrap();
        send(&app, post, path).await;
    }
    let bytes: [&[u8]; 5] = [
        b"\xff\xfe",
        b"max-age=5, \xc3\x28",
        b"\x80",
        b"a=\xff; b=2",
        b"for=\xed\xa0\x80",
    ];
    for name in STACK_HEADERS {
        for value in bytes {
            let mut request = request("/page/3");
            request = request.header(name, raw(value));
            let what = format!("{name}: {value:?}");
            let answer = send(&app, request.body(Body::empty()).unwrap(), &what).await;
            if name != "range" && name != "if-none-match" {
                assert_eq!(answer.status, StatusCode::OK, "{what}");
                assert_eq!(answer.body, "page /page/3 lang=-", "{what}");
            }
            let cookie = Request::post("/session/a/b").header(name, raw(value));
            send(&app, cookie.body(Body::empty()).unwrap(), &what).await;
        }
    }
}

#[tokio::test]
async fn duplicate_and_conflicting_directives_never_a_5xx() {
    let redis = TestRedis::start().await;
    let (app, _) = full_stack(&redis).await;

    // Conflicting request directives, repeated fields, Pragma beside them.
    let request_sets: [&[(&str, &str)]; 6] = [
        &[("cache-control", "max-age=5, max-age=10, no-cache")],
        &[
            ("cache-control", "max-stale, max-stale=abc"),
            ("cache-control", "min-fresh=-1"),
        ],
        &[
            ("cache-control", "no-store"),
            ("cache-control", "max-age=60"),
        ],
        &[
            ("pragma", "no-cache"),
            ("cache-control", "max-age=999999999999999999999"),
        ],
        &[("cache-control", "\"max-age=5\", =, ,,, max-age=\"")],
        &[
            ("cookie", "__Host-session=a; __Host-session=b"),
            ("cookie", "__Host-session="),
        ],
    ];
    for headers in request_sets {
        for path in ["/page/4", "/echo?cc=public,%20max-age=60", "/session/w1"] {
            for _ in 0..2 {
                let mut request = request(path);
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                send(
                    &app,
                    request.body(Body::empty()).unwrap(),
                    &format!("{headers:?} {path}"),
                )
                .await;
            }
        }
    }

    // `only-if-cached` with nothing cached: 504 is RFC 9111's answer
    // (§5.2.1.7), the one 5xx the cache sends on a client's request.
    let answer = request("/page/5")
        .header(header::CACHE_CONTROL, "only-if-cached")
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(answer).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);

    // Conflicting response directives: the stricter one wins.
    for (directives, stored) in [
        ("public,%20max-age=60&cc=no-store", false),
        ("public,%20max-age=60,%20private", false),
        ("max-age=10&cc=max-age=20", true),
        ("s-maxage=abc,%20public", true),
        ("max-age=60,%20max-age=60", true),
    ] {
        let uri = format!("/echo?cc={directives}");
        let first = send(&app, request(&uri).body(Body::empty()).unwrap(), &uri).await;
        let status = first
            .headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert_eq!(status.contains("stored"), stored, "{uri}: {status}");
    }

    // A rate-limit key header sent twice: the first value counts. The
    // route allows 10 per 2 s; the requests naming both keys use up the
    // first key's bucket, and leave the second key's untouched.
    let twice = || {
        request("/limited")
            .header("x-rl-key", "one")
            .header("x-rl-key", "two")
            .body(Body::empty())
            .unwrap()
    };
    let mut admitted = 0;
    loop {
        let answer = send(&app, twice(), "two x-rl-key").await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        admitted += 1;
        assert!(admitted <= 20, "the limit of 10 applies to two x-rl-key");
    }
    let alone = |key: &'static str| {
        request("/limited")
            .header("x-rl-key", key)
            .body(Body::empty())
            .unwrap()
    };
    // The second key's bucket is fresh: nothing was counted against it.
    let second = send(&app, alone("two"), "x-rl-key: two").await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    assert_eq!(
        limited_remaining(&second.headers),
        Some(9),
        "the second value was never a key: {:?}",
        second.headers.get("ratelimit")
    );
    // The first key's bucket is the one used up (at most a token or two
    // back, refilled at one per 200 ms since).
    let first = send(&app, alone("one"), "x-rl-key: one").await;
    let left = limited_remaining(&first.headers);
    assert!(
        left.is_some_and(|left| left <= 2),
        "the first value was the key: {} {:?}",
        first.status,
        first.headers.get("ratelimit")
    );
}

/// The `r` (remaining) parameter of the `limited` policy in `RateLimit`.
fn limited_remaining(headers: &HeaderMap) -> Option<u64> {
    let field = headers.get("ratelimit")?.to_str().ok()?;
    field
        .split(',')
        .map(str::trim)
        .find(|item| item.starts_with("\"limited\""))?
        .split(';')
        .find_map(|param| param.trim().strip_prefix("r="))?
        .parse()
        .ok()
}

#[tokio::test]
async fn huge_headers_over_tcp_get_a_clean_4xx() {
    let redis = TestRedis::start().await;
    let (app, _) = full_stack(&redis).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let huge = "x".repeat(512 * 1024);
    let raw = format!(
        "GET /page/1 HTTP/1.1\r\nHost: shop.test\r\nCookie: {huge}\r\nConnection: close\r\n\r\n"
    );
    // The server may close before reading it all; that is its right.
    let _ = stream.write_all(raw.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    // Whatever the server read of it, it answers before it closes: the
    // answer is read even when the close resets the connection (what was
    // read stays in `answer`).
    let text = String::from_utf8_lossy(&answer);
    let status: Option<u16> = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    let status = status.unwrap_or_else(|| panic!("no HTTP answer to a 512 KiB header: {text:?}"));
    assert!((400..500).contains(&status), "{text}");

    // The same server still answers a normal request.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /page/1 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("page /page/1 lang=-"), "{text}");
    server.abort();
}
