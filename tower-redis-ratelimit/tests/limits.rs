//! The rate limit layer against real Redis: exactness under concurrency,
//! stacking, keys, responses, the blocked-key cache, outages and clusters.

mod support;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use tower::{Service, ServiceExt};
use tower_redis_core::testing::{TestCluster, TestRedis, wait_for_breaker};
use tower_redis_core::{BreakerState, RedisManager, redis};
use tower_redis_ratelimit::{
    Fallback, Key, MissingKey, Policy, RateLimitLayer, RateLimitLayerBuilder,
};

use support::{
    PATIENT_TIMEOUT, Svc, app, away_from_window_edge, decided_locally, key_type, manager,
    patient_manager, replace_with_a_hash, the_key,
};

const HOUR: Duration = Duration::from_secs(3600);

fn request(peer: &str, path: &str) -> Request<()> {
    let mut request = Request::get(path).body(()).expect("request");
    let ip: IpAddr = peer.parse().expect("ip");
    request.extensions_mut().insert(SocketAddr::new(ip, 40_000));
    request
}

async fn send(
    service: &Svc,
    request: Request<()>,
) -> Response<tower_redis_ratelimit::ResponseBody<Empty<Bytes>>> {
    service.clone().oneshot(request).await.expect("infallible")
}

fn header<'r, B>(response: &'r Response<B>, name: &str) -> Option<&'r str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// 50 concurrent clients over two layer instances fire `total` requests
/// from one IP; returns how many were admitted. The subject is exactness
/// while Redis answers, so the managers get a command timeout no loaded
/// machine reaches, and an answer decided without Redis fails the test.
async fn admitted_under_load(redis: &TestRedis, policy: Policy, total: usize) -> usize {
    let a = app(RateLimitLayer::builder(patient_manager(redis).await)
        .policy(policy.clone())
        .build()
        .expect("layer"));
    let b = app(RateLimitLayer::builder(patient_manager(redis).await)
        .policy(policy)
        .build()
        .expect("layer"));
    let admitted = Arc::new(AtomicUsize::new(0));
    let degraded = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..50 {
        let service = if client % 2 == 0 {
            a.clone()
        } else {
            b.clone()
        };
        let (admitted, degraded, next) = (
            Arc::clone(&admitted),
            Arc::clone(&degraded),
            Arc::clone(&next),
        );
        clients.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let response = send(&service, request("198.51.100.7", "/")).await;
                if decided_locally(&response) {
                    degraded.fetch_add(1, Ordering::Relaxed);
                }
                match response.status() {
                    StatusCode::OK => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    StatusCode::TOO_MANY_REQUESTS => {}
                    other => panic!("unexpected status {other}"),
                }
            }
        }));
    }
    for client in clients {
        client.await.expect("client");
    }
    assert_eq!(
        degraded.load(Ordering::Relaxed),
        0,
        "answers decided without Redis (RateLimit: …;local) while Redis was up"
    );
    admitted.load(Ordering::Relaxed)
}

#[tokio::test]
async fn gcra_admits_exactly_the_quota_across_two_instances() {
    let redis = TestRedis::start().await;
    let admitted = admitted_under_load(&redis, Policy::gcra("per-ip", 100, HOUR), 1000).await;
    assert_eq!(admitted, 100);
}

#[tokio::test]
async fn fixed_window_admits_exactly_the_limit_across_two_instances() {
    let redis = TestRedis::start().await;
    away_from_window_edge(&redis, HOUR).await;
    let admitted =
        admitted_under_load(&redis, Policy::fixed_window("per-ip", 100, HOUR), 1000).await;
    assert_eq!(admitted, 100);
}

#[tokio::test]
async fn sliding_window_with_an_empty_previous_window_admits_the_limit() {
    // The documented error is the previous window's weighted count; with a
    // fresh key it is zero, so the count must be exact.
    let redis = TestRedis::start().await;
    away_from_window_edge(&redis, HOUR).await;
    let admitted =
        admitted_under_load(&redis, Policy::sliding_window("per-ip", 100, HOUR), 1000).await;
    assert_eq!(admitted, 100);
}

#[tokio::test]
async fn a_request_denied_by_one_policy_consumes_nothing_from_the_others() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("login", 2, HOUR).path("/login"))
        .policy(Policy::gcra("everything", 10, HOUR))
        .build()
        .expect("layer");
    let service = app(layer);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            send(&service, request("192.0.2.1", "/login"))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    // Only the two admitted requests were charged to "everything".
    let response = send(&service, request("192.0.2.1", "/other")).await;
    assert_eq!(
        header(&response, "ratelimit"),
        Some("\"everything\";r=7;t=1080")
    );
}

#[tokio::test]
async fn burst_then_refill() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 10, Duration::from_secs(1)).burst(2))
        .build()
        .expect("layer");
    let service = app(layer);
    assert_eq!(
        send(&service, request("192.0.2.2", "/")).await.status(),
        200
    );
    assert_eq!(
        send(&service, request("192.0.2.2", "/")).await.status(),
        200
    );
    let denied = send(&service, request("192.0.2.2", "/")).await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "retry-after"), Some("1"));
    // One request every 100 ms refills; 400 ms is a generous wait.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        send(&service, request("192.0.2.2", "/")).await.status(),
        200
    );
}

#[tokio::test]
async fn denied_response_is_problem_json_with_retry_after_and_fields() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 1, HOUR))
        .legacy_headers(true)
        .build()
        .expect("layer");
    let service = app(layer);
    let allowed = send(&service, request("192.0.2.3", "/")).await;
    assert_eq!(
        header(&allowed, "ratelimit-policy"),
        Some("\"per-ip\";q=1;w=3600")
    );
    assert_eq!(header(&allowed, "x-ratelimit-remaining"), Some("0"));

    let denied = send(&service, request("192.0.2.3", "/")).await;
    assert_eq!(denied.status(), 429);
    assert_eq!(
        header(&denied, "content-type"),
        Some("application/problem+json")
    );
    let retry: u64 = header(&denied, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((3590..=3600).contains(&retry), "{retry}");
    assert!(
        header(&denied, "ratelimit")
            .expect("RateLimit")
            .starts_with("\"per-ip\";r=0;t=")
    );
    let body = denied.into_body().collect().await.expect("body").to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(problem["violated-policies"], serde_json::json!(["per-ip"]));
    assert_eq!(problem["status"], 429);
}

#[tokio::test]
async fn grpc_requests_get_resource_exhausted_not_429() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-key", 1, HOUR).key(Key::header("x-api-key")))
        .build()
        .expect("layer");
    let service = app(layer);
    let grpc = || {
        let mut request = request("192.0.2.4", "/pkg.Service/Method");
        request
            .headers_mut()
            .insert("content-type", "application/grpc".parse().expect("value"));
        request
            .headers_mut()
            .insert("x-api-key", "k1".parse().expect("value"));
        request
    };
    assert_eq!(send(&service, grpc()).await.status(), 200);
    let denied = send(&service, grpc()).await;
    assert_eq!(denied.status(), 200);
    assert_eq!(header(&denied, "grpc-status"), Some("8"));
    assert!(
        header(&denied, "grpc-message")
            .expect("message")
            .contains("per-key")
    );
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_does_not_change_the_key() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 1, HOUR))
        .build()
        .expect("layer");
    let service = app(layer);
    for (i, spoof) in ["1.1.1.1", "2.2.2.2", "3.3.3.3"].iter().enumerate() {
        let mut request = request("203.0.113.9", "/");
        request
            .headers_mut()
            .insert("x-forwarded-for", spoof.parse().expect("value"));
        let expected = if i == 0 { 200 } else { 429 };
        assert_eq!(
            send(&service, request).await.status(),
            expected,
            "spoof {spoof}"
        );
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_rightmost_untrusted_address_is_the_key() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 1, HOUR))
        .trusted_proxies(["10.0.0.0/8"])
        .build()
        .expect("layer");
    let service = app(layer);
    let via_proxy = |xff: &str| {
        let mut request = request("10.1.2.3", "/");
        request
            .headers_mut()
            .insert("x-forwarded-for", xff.parse().expect("value"));
        request
    };
    assert_eq!(
        send(&service, via_proxy("6.6.6.6, 198.51.100.1"))
            .await
            .status(),
        200
    );
    // A different spoofed left part: same real client, same bucket.
    assert_eq!(
        send(&service, via_proxy("7.7.7.7, 198.51.100.1"))
            .await
            .status(),
        429
    );
    // Another real client.
    assert_eq!(
        send(&service, via_proxy("198.51.100.2, 10.0.0.1"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn ipv6_clients_are_grouped_by_their_64_prefix() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 1, HOUR))
        .build()
        .expect("layer");
    let service = app(layer);
    assert_eq!(
        send(&service, request("2001:db8:1:2::1", "/"))
            .await
            .status(),
        200
    );
    assert_eq!(
        send(&service, request("2001:db8:1:2:ffff::9", "/"))
            .await
            .status(),
        429
    );
    assert_eq!(
        send(&service, request("2001:db8:1:3::1", "/"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_missing_key_gets_the_configured_outcome_never_a_500() {
    let redis = TestRedis::start().await;
    let policy = || Policy::gcra("per-key", 1, HOUR).key(Key::header("x-api-key"));
    let layer = |outcome| {
        let redis = &redis;
        async move {
            app(RateLimitLayer::builder(manager(redis).await)
                .policy(policy())
                .on_missing_key(outcome)
                .build()
                .expect("layer"))
        }
    };

    let reject = layer(MissingKey::Reject).await;
    let response = send(&reject, request("192.0.2.5", "/")).await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        header(&response, "content-type"),
        Some("application/problem+json")
    );

    let skip = layer(MissingKey::Skip).await;
    for _ in 0..3 {
        let response = send(&skip, request("192.0.2.5", "/")).await;
        assert_eq!(response.status(), 200);
        assert!(header(&response, "ratelimit").is_none());
    }

    let shared = layer(MissingKey::SharedBucket).await;
    assert_eq!(send(&shared, request("192.0.2.5", "/")).await.status(), 200);
    assert_eq!(send(&shared, request("192.0.2.6", "/")).await.status(), 429);
}

#[tokio::test]
async fn shadow_mode_decides_but_never_blocks() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 1, HOUR))
        .shadow(true)
        .build()
        .expect("layer");
    let service = app(layer);
    redis.reset_stats().await.expect("reset");
    for _ in 0..5 {
        let response = send(&service, request("192.0.2.7", "/")).await;
        assert_eq!(response.status(), 200);
        assert!(header(&response, "ratelimit").is_none());
    }
    let calls = redis.command_calls().await.expect("stats");
    assert!(
        calls.get("evalsha").copied().unwrap_or(0) + calls.get("eval").copied().unwrap_or(0) >= 2,
        "{calls:?}"
    );
}

#[tokio::test]
async fn allow_listed_clients_are_never_limited() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 1, HOUR))
        .allow_ips(["192.0.2.0/28"])
        .allow_if(|parts| parts.uri.path() == "/healthz")
        .build()
        .expect("layer");
    let service = app(layer);
    for _ in 0..5 {
        assert_eq!(
            send(&service, request("192.0.2.8", "/")).await.status(),
            200
        );
        assert_eq!(
            send(&service, request("198.51.100.50", "/healthz"))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        send(&service, request("198.51.100.50", "/")).await.status(),
        200
    );
    assert_eq!(
        send(&service, request("198.51.100.50", "/")).await.status(),
        429
    );
}

#[tokio::test]
async fn stacked_policies_are_one_round_trip_and_blocked_keys_are_zero() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("per-ip", 5, HOUR))
        .policy(Policy::fixed_window("per-route", 1000, HOUR))
        .policy(Policy::sliding_window("global", 1000, HOUR).key(Key::global()))
        .build()
        .expect("layer");
    let service = app(layer);
    // Loads the script once.
    assert_eq!(
        send(&service, request("192.0.2.9", "/")).await.status(),
        200
    );

    let monitor = redis.monitor().await;
    for _ in 0..4 {
        assert_eq!(
            send(&service, request("192.0.2.9", "/")).await.status(),
            200
        );
    }
    assert_eq!(
        send(&service, request("192.0.2.9", "/")).await.status(),
        429
    );
    assert_eq!(
        monitor.commands().await,
        ["evalsha"; 5],
        "one command per decision, three policies each, and nothing else"
    );

    // The denied key is now answered in process.
    let monitor = redis.monitor().await;
    for _ in 0..20 {
        let response = send(&service, request("192.0.2.9", "/")).await;
        assert_eq!(response.status(), 429);
        // The cached denial still tells the truth about the reset time.
        let field = header(&response, "ratelimit").expect("RateLimit");
        let reset: u64 = field
            .trim_start_matches("\"per-ip\";r=0;t=")
            .parse()
            .expect("t");
        assert!(reset > 3000, "{field}");
    }
    let sent = monitor.commands().await;
    assert!(
        sent.is_empty(),
        "a blocked key must cost no Redis call: {sent:?}"
    );
}

/// Requests decided at the same moment share one script call, and the
/// answers are exactly those of deciding them one by one: per client, the
/// login policy admits its quota, and only admitted requests are charged
/// to the other policy.
#[tokio::test]
async fn concurrent_decisions_share_a_call_and_stay_exact() {
    let redis = TestRedis::start().await;
    away_from_window_edge(&redis, HOUR).await;
    // Exactness while Redis answers: a batch must not time out into the
    // local limiter on a loaded machine.
    let layer = RateLimitLayer::builder(patient_manager(&redis).await)
        .policy(Policy::gcra("login", 3, HOUR).path("/login"))
        .policy(Policy::fixed_window("everything", 1000, HOUR))
        .build()
        .expect("layer");
    let service = app(layer);
    // Loads the script once.
    send(&service, request("192.0.2.200", "/")).await;
    let monitor = redis.monitor().await;

    let clients: Vec<String> = (1..=20).map(|i| format!("10.0.0.{i}")).collect();
    let mut set = tokio::task::JoinSet::new();
    for client in &clients {
        for path in ["/login", "/login", "/login", "/login", "/login", "/a", "/b"] {
            let (service, request) = (service.clone(), request(client, path));
            let client = client.clone();
            set.spawn(async move {
                let response = send(&service, request).await;
                (client, response.status(), decided_locally(&response))
            });
        }
    }
    let mut admitted = std::collections::HashMap::<String, (usize, usize)>::new();
    while let Some(result) = set.join_next().await {
        let (client, status, local) = result.expect("task");
        assert!(!local, "{client}: decided without Redis while Redis was up");
        let counts = admitted.entry(client).or_default();
        match status {
            StatusCode::OK => counts.0 += 1,
            StatusCode::TOO_MANY_REQUESTS => counts.1 += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    for client in &clients {
        assert_eq!(
            admitted[client],
            (5, 2),
            "{client}: 3 logins + 2 others admitted"
        );
        // 5 admitted requests charged to "everything", the 2 denied ones not.
        let response = send(&service, request(client, "/c")).await;
        let field = header(&response, "ratelimit").expect("RateLimit");
        assert!(
            field.starts_with("\"everything\";r=994;"),
            "{client}: {field}"
        );
    }
    let sent = monitor.commands().await;
    // 140 concurrent decisions plus 20 follow-ups, in far fewer calls, and
    // nothing but decisions.
    assert!(sent.iter().all(|c| c == "evalsha"), "{sent:?}");
    assert!(sent.len() < 60, "decisions were not batched: {sent:?}");
}

#[tokio::test]
async fn every_key_has_a_ttl() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(patient_manager(&redis).await)
        .policy(Policy::gcra("a", 5, Duration::from_secs(60)))
        .policy(Policy::fixed_window("b", 5, Duration::from_secs(60)))
        .policy(Policy::sliding_window("c", 5, Duration::from_secs(60)))
        .build()
        .expect("layer");
    let service = app(layer);
    // The second request finds every counter in its window: a window
    // counter keeps the TTL its window's first write gave it.
    for _ in 0..2 {
        let response = send(&service, request("192.0.2.10", "/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!decided_locally(&response));
    }
    let mut conn = redis.connection().await.expect("connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in keys {
        assert!(key.contains("{rl}"), "{key}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!(ttl > 0 && ttl <= 120_001, "{key}: {ttl}");
        let kind = key_type(&mut conn, &key).await;
        assert_eq!(kind, "string", "{key}");
    }
}

/// The window index Redis's clock is in, for a window of `window`.
async fn server_window(conn: &mut redis::aio::MultiplexedConnection, window: Duration) -> f64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    #[allow(clippy::cast_precision_loss)]
    let now = (secs * 1_000_000 + micros) as f64;
    #[allow(clippy::cast_precision_loss)]
    let window = window.as_micros() as f64;
    (now / window).floor()
}

/// A window counter as the script stores it: window index, count, previous
/// window's count, as three little-endian doubles.
fn packed_window(window: f64, count: f64, previous: f64) -> Vec<u8> {
    [window, count, previous]
        .iter()
        .flat_map(|n| n.to_le_bytes())
        .collect()
}

#[tokio::test]
async fn a_window_counter_is_read_from_its_packed_string() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(patient_manager(&redis).await)
        .policy(Policy::fixed_window("fixed", 10, HOUR))
        .policy(Policy::sliding_window("sliding", 10, HOUR))
        .build()
        .expect("layer");
    let service = app(layer);
    away_from_window_edge(&redis, HOUR).await;
    // Makes both counters, then reads them back as written.
    let response = send(&service, request("192.0.2.20", "/")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut conn = redis.connection().await.expect("connection");
    let fixed = the_key(&mut conn, ":fw2:").await;
    let sliding = the_key(&mut conn, ":sw2:").await;
    let w = server_window(&mut conn, HOUR).await;
    for key in [&fixed, &sliding] {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("GET");
        assert_eq!(value, packed_window(w, 1.0, 0.0), "{key}");
    }
    // Each case from a client of its own (a denied key is then answered in
    // process until its Retry-After), its counters written beforehand.
    let cases = [
        // The fixed window full in this window: denied.
        (
            "192.0.2.21",
            packed_window(w, 10.0, 0.0),
            None,
            StatusCode::TOO_MANY_REQUESTS,
        ),
        // Full in the window before: a fixed window forgets it.
        (
            "192.0.2.22",
            packed_window(w - 1.0, 10.0, 0.0),
            None,
            StatusCode::OK,
        ),
        // A sliding window weighs the previous window's count by what is
        // left of it: a count this large denies at any point of the hour.
        (
            "192.0.2.23",
            packed_window(w, 0.0, 0.0),
            Some(packed_window(w - 1.0, 1e9, 0.0)),
            StatusCode::TOO_MANY_REQUESTS,
        ),
        // The counts of two windows ago weigh nothing.
        (
            "192.0.2.24",
            packed_window(w, 0.0, 0.0),
            Some(packed_window(w - 2.0, 1e9, 1e9)),
            StatusCode::OK,
        ),
    ];
    for (ip, fixed_value, sliding_value, expected) in cases {
        for (key, value) in [(&fixed, Some(fixed_value)), (&sliding, sliding_value)] {
            let Some(value) = value else { continue };
            let () = redis::cmd("SET")
                .arg(key.replace("192.0.2.20", ip))
                .arg(value)
                .arg("PX")
                .arg(60_000)
                .query_async(&mut conn)
                .await
                .expect("SET");
        }
        let response = send(&service, request(ip, "/")).await;
        assert_eq!(response.status(), expected, "{ip}");
        assert!(!decided_locally(&response), "{ip}");
    }
}

/// The same with a layer of one policy, whose counter is read with a plain
/// `GET` (the script's one-counter paths): a hash under its key is an empty
/// counter too, not an error that sends every decision to the fallback.
#[tokio::test]
async fn a_lone_counter_of_another_type_counts_as_empty() {
    let redis = TestRedis::start().await;
    for (policy, part) in [
        (Policy::gcra("gcra", 1, HOUR), ":gcra:"),
        (Policy::fixed_window("fixed", 1, HOUR), ":fw2:"),
        (Policy::sliding_window("sliding", 1, HOUR), ":sw2:"),
    ] {
        let service = app(RateLimitLayer::builder(patient_manager(&redis).await)
            .policy(policy)
            .build()
            .expect("layer"));
        let response = send(&service, request("192.0.2.40", "/")).await;
        assert_eq!(response.status(), StatusCode::OK, "{part}");
        let mut conn = redis.connection().await.expect("connection");
        let key = the_key(&mut conn, part).await;
        replace_with_a_hash(&mut conn, &key).await;
        let response = send(&service, request("192.0.2.40", "/")).await;
        assert_eq!(response.status(), StatusCode::OK, "{part}");
        assert!(!decided_locally(&response), "{part}");
        let kind = key_type(&mut conn, &key).await;
        assert_eq!(kind, "string", "{part}");
        // Counted again: over the limit of 1.
        let response = send(&service, request("192.0.2.40", "/")).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{part}");
        assert!(!decided_locally(&response), "{part}");
    }
}

#[tokio::test]
async fn a_counter_of_another_shape_or_type_counts_as_empty() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(patient_manager(&redis).await)
        .policy(Policy::gcra("gcra", 1, HOUR))
        .policy(Policy::fixed_window("fixed", 1, HOUR))
        .policy(Policy::sliding_window("sliding", 1, HOUR))
        .build()
        .expect("layer");
    let service = app(layer);
    let response = send(&service, request("192.0.2.30", "/")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut conn = redis.connection().await.expect("connection");
    let gcra = the_key(&mut conn, ":gcra:").await;
    let fixed = the_key(&mut conn, ":fw2:").await;
    let sliding = the_key(&mut conn, ":sw2:").await;
    // A hash where a string belongs (the layout of earlier versions), a
    // string of the wrong length, and text that is not a number: each is
    // an empty counter, decided on Redis (no script error, no fallback),
    // and overwritten with a counter of the right shape.
    replace_with_a_hash(&mut conn, &fixed).await;
    let () = redis::cmd("SET")
        .arg(&sliding)
        .arg(&b"not 24 bytes"[..])
        .query_async(&mut conn)
        .await
        .expect("SET");
    let () = redis::cmd("SET")
        .arg(&gcra)
        .arg("not a number")
        .query_async(&mut conn)
        .await
        .expect("SET");
    let response = send(&service, request("192.0.2.30", "/")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!decided_locally(&response));
    for key in [&fixed, &sliding] {
        let len: usize = redis::cmd("STRLEN")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("STRLEN");
        assert_eq!(len, 24, "{key}");
    }
    // And they count again: the next request is over every limit of 1.
    let response = send(&service, request("192.0.2.30", "/")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(!decided_locally(&response));
}

#[tokio::test]
async fn hash_tag_puts_every_key_of_the_layer_in_its_own_tag() {
    let redis = TestRedis::start().await;
    let tagged = |tag: &str| {
        let manager = manager(&redis);
        let tag = tag.to_owned();
        async move {
            RateLimitLayer::builder(manager.await)
                .policy(Policy::gcra("per-ip", 2, Duration::from_secs(60)))
                .policy(Policy::fixed_window("burst", 5, Duration::from_secs(60)))
                .hash_tag(&tag)
                .build()
                .expect("layer")
        }
    };
    let first = app(tagged("shop-a").await);
    let second = app(tagged("shop-b").await);
    let mut statuses = Vec::new();
    for service in [&first, &first, &first, &second] {
        statuses.push(send(service, request("192.0.2.10", "/")).await.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK
        ],
        "each tag counts on its own"
    );
    let mut conn = redis.connection().await.expect("connection");
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    keys.sort();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert_eq!(
        keys.iter().filter(|k| k.contains("{shop-a}")).count(),
        2,
        "{keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| k.contains("{shop-b}")).count(),
        2,
        "{keys:?}"
    );
}

#[tokio::test]
async fn redis_outage_falls_back_to_local_limits_and_recovers() {
    let redis = TestRedis::start().await;
    let manager = manager(&redis).await;
    let layer = RateLimitLayer::builder(manager.clone())
        .policy(Policy::gcra("per-ip", 4, HOUR))
        .fallback(Fallback::Local { share: 0.5 })
        .build()
        .expect("layer");
    let service = app(layer);
    let shared = send(&service, request("192.0.2.11", "/")).await;
    assert_eq!(header(&shared, "ratelimit"), Some("\"per-ip\";r=3;t=900"));

    redis.kill().await;
    let mut statuses = Vec::new();
    let mut marked_local = 0;
    for _ in 0..6 {
        let response = send(&service, request("192.0.2.12", "/")).await;
        statuses.push(response.status().as_u16());
        if header(&response, "ratelimit").is_some_and(|v| v.ends_with(";local")) {
            marked_local += 1;
        }
    }
    // Half the quota locally: 2 admitted, the rest denied; never a 5xx.
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429]);
    assert_eq!(marked_local, 6);

    redis.restart().await;
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    // The restarted Redis is empty: the shared counters start over, unmarked.
    let response = send(&service, request("192.0.2.12", "/")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "ratelimit"), Some("\"per-ip\";r=3;t=900"));
}

#[tokio::test]
async fn fail_open_and_fail_closed_while_redis_is_down() {
    let redis = TestRedis::start().await;
    redis.stop().await;
    let open = app(RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("p", 1, HOUR))
        .fallback(Fallback::Allow)
        .build()
        .expect("layer"));
    let closed = app(RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("p", 1, HOUR))
        .fallback(Fallback::Deny)
        .build()
        .expect("layer"));
    for _ in 0..3 {
        assert_eq!(send(&open, request("192.0.2.13", "/")).await.status(), 200);
        let denied = send(&closed, request("192.0.2.13", "/")).await;
        assert_eq!(denied.status(), 429);
        assert_eq!(header(&denied, "retry-after"), Some("1"));
    }
}

#[tokio::test]
async fn weighted_cost_is_charged_in_quota_units() {
    let redis = TestRedis::start().await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("units", 10, HOUR))
        .cost(|parts| if parts.uri.path() == "/export" { 6 } else { 1 })
        .build()
        .expect("layer");
    let service = app(layer);
    assert_eq!(
        send(&service, request("192.0.2.14", "/export"))
            .await
            .status(),
        200
    );
    assert_eq!(
        send(&service, request("192.0.2.14", "/export"))
            .await
            .status(),
        429
    );
    for _ in 0..4 {
        assert_eq!(
            send(&service, request("192.0.2.14", "/")).await.status(),
            200
        );
    }
    assert_eq!(
        send(&service, request("192.0.2.14", "/")).await.status(),
        429
    );
}

#[tokio::test]
async fn exact_limits_on_redis_cluster() {
    let cluster = TestCluster::start().await;
    let policy = Policy::gcra("per-ip", 30, HOUR);
    // Exactness while Redis answers: no decision may time out into the
    // local limiter on a loaded machine.
    let config = || {
        cluster
            .config()
            .command_timeout(PATIENT_TIMEOUT)
            .build()
            .expect("valid")
    };
    let managers = [
        RedisManager::connect(config()).await.expect("starts"),
        RedisManager::connect(config()).await.expect("starts"),
    ];
    let services: Vec<Svc> = managers
        .iter()
        .map(|m| {
            app(RateLimitLayer::builder(m.clone())
                .policy(policy.clone())
                .policy(Policy::fixed_window("global", 1000, HOUR).key(Key::global()))
                .build()
                .expect("layer"))
        })
        .collect();
    let mut admitted = 0;
    for i in 0..100 {
        let mut service = services[i % 2].clone();
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request("198.51.100.77", "/"))
            .await
            .expect("infallible");
        assert!(
            !decided_locally(&response),
            "request {i} was decided without Redis while Redis was up"
        );
        if response.status() == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 30);
}

#[test]
fn layer_and_builder_are_send_sync_debug() {
    fn check<T: Send + Sync + std::fmt::Debug>() {}
    check::<RateLimitLayer>();
    check::<RateLimitLayerBuilder>();
}

#[tokio::test]
async fn stacked_layers_each_add_their_fields() {
    let redis = TestRedis::start().await;
    let outer = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("outer", 10, HOUR))
        .build()
        .expect("layer");
    let inner = RateLimitLayer::builder(manager(&redis).await)
        .policy(Policy::gcra("inner", 5, HOUR))
        .build()
        .expect("layer");
    let service = tower::util::BoxCloneSyncService::new(tower::Layer::layer(
        &outer,
        tower::Layer::layer(
            &inner,
            tower::service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }),
        ),
    ));
    let response = service
        .oneshot(request("192.0.2.20", "/"))
        .await
        .expect("infallible");
    let fields: Vec<&str> = response
        .headers()
        .get_all("ratelimit")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(fields.len(), 2, "{fields:?}");
    assert!(
        fields.iter().any(|f| f.starts_with("\"inner\";r=4")),
        "{fields:?}"
    );
    assert!(
        fields.iter().any(|f| f.starts_with("\"outer\";r=9")),
        "{fields:?}"
    );
}

#[test]
fn a_memory_capacity_below_64_kib_is_a_configuration_error() {
    let build = |bytes| {
        RateLimitLayer::builder(RedisManager::disabled())
            .policy(Policy::gcra("per-ip", 1, HOUR))
            .memory_capacity_bytes(bytes)
            .build()
    };
    let error = build(1024).expect_err("too small");
    assert!(
        matches!(
            error,
            tower_redis_ratelimit::ConfigError::MemoryCapacityTooSmall(1024)
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("at least 65536"), "{error}");
    assert!(build(64 << 10).is_ok());
    assert_eq!(tower_redis_ratelimit::DEFAULT_MEMORY_BYTES, 64 << 20);
}
