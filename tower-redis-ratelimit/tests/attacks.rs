//! Ways a client, or a deployment mistake, could make limits disappear,
//! each against real Redis.

mod support;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;
use tower_redis_core::redis;
use tower_redis_core::testing::TestRedis;
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};

use support::{app, away_from_window_edge, manager, patient_manager};

const HOUR: Duration = Duration::from_secs(3600);

fn request(peer: &str) -> Request<()> {
    let mut request = Request::get("/").body(()).expect("request");
    let ip: IpAddr = peer.parse().expect("ip");
    request.extensions_mut().insert(SocketAddr::new(ip, 40_000));
    request
}

fn ratelimit_field<B>(response: &Response<B>) -> Option<String> {
    response
        .headers()
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A header key of 10 KiB (an API key the client made up, padded) used to
/// be treated as missing, so the policy was skipped and the client was
/// never limited. It is hashed into a bucket of its own instead.
#[tokio::test]
async fn an_over_long_key_is_still_limited() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-key", 3, HOUR).key(Key::header("x-api-key")))
        .build()
        .expect("layer");
    let service = app(layer);
    let long_key = |fill: char| {
        let value: String = std::iter::repeat_n(fill, 10 * 1024).collect();
        let mut request = request("192.0.2.30");
        request
            .headers_mut()
            .insert("x-api-key", value.parse().expect("value"));
        request
    };
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = service.clone().oneshot(long_key('a')).await.expect("ok");
        assert!(
            ratelimit_field(&response).is_some(),
            "the policy applied to the long key"
        );
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Another long key (same length, same first 256 bytes) is another client.
    let mut other = long_key('a');
    let mut value = "a".repeat(10 * 1024 - 1);
    value.push('b');
    other
        .headers_mut()
        .insert("x-api-key", value.parse().expect("value"));
    let response = service.clone().oneshot(other).await.expect("ok");
    assert_eq!(response.status(), 200);

    // The Redis keys stay short: a hash, not the 10 KiB value.
    let mut conn = redis.connection().await.expect("connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| k.len() < 200), "{keys:?}");
}

/// `Authorization`'s scheme is case-insensitive and may be followed by
/// several spaces: `bearer  t` is the credentials `Bearer t` to an app
/// reading them. Keyed on the raw text, each spelling was a bucket of its
/// own, so one token had as many quotas as it has spellings.
#[tokio::test]
async fn authorization_scheme_spellings_share_one_bucket() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-token", 2, HOUR).key(Key::header("authorization")))
        .build()
        .expect("layer");
    let service = app(layer);
    let with = |value: &str| {
        let mut request = request("192.0.2.31");
        request
            .headers_mut()
            .insert("authorization", value.parse().expect("value"));
        request
    };
    let mut statuses = Vec::new();
    for value in [
        "Bearer token-1",
        "bearer token-1",
        "BEARER   token-1",
        "bEaReR \t token-1",
    ] {
        let response = service.clone().oneshot(with(value)).await.expect("ok");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    // The credentials themselves keep their case: another token, another client.
    let other = service
        .clone()
        .oneshot(with("Bearer TOKEN-1"))
        .await
        .expect("ok");
    assert_eq!(other.status(), 200);
    // So does a value that is the credentials alone.
    for value in ["token-2", "TOKEN-2"] {
        let alone = service.clone().oneshot(with(value)).await.expect("ok");
        assert_eq!(alone.status(), 200, "{value}");
    }
}

/// A policy on `GET` only: a `HEAD` runs the same handler (axum answers it
/// with the `GET` route, without the body), so a client must not escape the
/// limit by asking `HEAD`.
#[tokio::test]
async fn a_get_policy_also_limits_head() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("reads", 1, HOUR).methods([http::Method::GET]))
        .build()
        .expect("layer");
    let service = app(layer);
    let asking = |method: http::Method| {
        let mut request = request("192.0.2.31");
        *request.method_mut() = method;
        request
    };
    let mut statuses = Vec::new();
    for method in [http::Method::GET, http::Method::HEAD, http::Method::HEAD] {
        let response = service.clone().oneshot(asking(method)).await.expect("ok");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 429, 429]);
    // Other methods stay outside the policy.
    let response = service
        .clone()
        .oneshot(asking(http::Method::POST))
        .await
        .expect("ok");
    assert_eq!(response.status(), 200);
}

/// Two services on one Redis that both call their policy "per-ip", one
/// with GCRA and one with windows (counters of different layouts): the
/// script used to fail with WRONGTYPE and every decision fell back to the
/// in-process limiter. Each algorithm has its own keys, so each limits
/// exactly, from Redis.
#[tokio::test]
async fn one_policy_name_with_different_algorithms_on_one_redis_limits_each_exactly() {
    let redis = TestRedis::start().await;
    away_from_window_edge(&redis, HOUR).await;
    // Exactness while Redis answers: a slow machine must not turn a
    // decision into a local one through the default command timeout.
    let gcra = app(RateLimitLayer::builder(patient_manager(&redis).await)
        .policy(Policy::gcra("per-ip", 3, HOUR))
        .build()
        .expect("layer"));
    let fixed = app(RateLimitLayer::builder(patient_manager(&redis).await)
        .policy(Policy::fixed_window("per-ip", 5, HOUR))
        .build()
        .expect("layer"));
    let sliding = app(RateLimitLayer::builder(patient_manager(&redis).await)
        .policy(Policy::sliding_window("per-ip", 7, HOUR))
        .build()
        .expect("layer"));
    let services = [(&gcra, 3), (&fixed, 5), (&sliding, 7)];
    let mut admitted = [0; 3];
    for _ in 0..10 {
        for (i, (service, _)) in services.iter().enumerate() {
            let response = (*service)
                .clone()
                .oneshot(request("198.51.100.40"))
                .await
                .expect("ok");
            let field = ratelimit_field(&response).expect("RateLimit field");
            assert!(
                field.starts_with("\"per-ip\";") && !field.contains("local"),
                "service {i} decided without Redis: {field}"
            );
            match response.status().as_u16() {
                200 => admitted[i] += 1,
                429 => {}
                other => panic!("service {i}: unexpected status {other}"),
            }
        }
    }
    assert_eq!(
        admitted,
        services.map(|(_, quota)| quota),
        "each algorithm admits exactly its own quota"
    );
}

/// A `MakeWriter` that appends everything to one buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// An axum app served with `into_make_service()` instead of
/// `into_make_service_with_connect_info::<SocketAddr>()` gives the layer no
/// peer address: every per-IP policy is skipped. That used to happen
/// without a word; now the layer warns once, naming the call to add.
#[tokio::test(flavor = "current_thread")]
async fn an_app_served_without_connect_info_warns_once_naming_the_call() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tower_redis_core::testing::install_subscriber(subscriber);

    let redis = TestRedis::start().await;
    let limits = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 1, HOUR))
        .build()
        .expect("layer");
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .layer(limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The mistake: no connect info.
    let server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service())
            .await
            .expect("serve");
    });

    for _ in 0..3 {
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET /hello HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            answer
        })
        .await
        .expect("answered in time");
        // `MissingKey::Skip` (the default) still lets the request through.
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    server.abort();

    let text = logs.text();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("no peer address"))
        .collect();
    assert_eq!(warnings.len(), 1, "warned once: {text}");
    assert!(warnings[0].contains("WARN"), "{text}");
    assert!(
        warnings[0].contains("into_make_service_with_connect_info::<SocketAddr>()"),
        "names the call to add: {text}"
    );
    assert!(warnings[0].contains("per-ip"), "names the policy: {text}");
}
