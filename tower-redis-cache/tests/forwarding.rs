//! The cache behind proxies (issue 15, item 3), against real Redis: the
//! forwarding headers of a trusted proxy key the entry; the same headers
//! from anyone else keep the response out of the cache.

#![allow(clippy::unwrap_used)] // A failed setup step should fail the test loudly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use axum::routing;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, CacheLayerBuilder};
use tower_redis_core::RedisManager;
use tower_redis_core::forwarding::{Forwarding, ForwardingHeader, TrustedProxies};
use tower_redis_core::testing::TestRedis;

const PROXY: &str = "10.0.0.1";
const CLIENT: &str = "203.0.113.7";

/// An app that, like many behind a TLS-terminating proxy, redirects plain
/// `http` to `https` (permanently, so the redirect is cacheable) and builds
/// absolute links from the forwarded host.
fn app(calls: Arc<AtomicU64>) -> Router {
    Router::new()
        .route(
            "/",
            routing::get(
                |State(calls): State<Arc<AtomicU64>>, headers: HeaderMap| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let value = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let forwarded = value("forwarded");
                    let proto =
                        if forwarded.contains("proto=http;") || forwarded.ends_with("proto=http") {
                            "http".to_owned()
                        } else {
                            value("x-forwarded-proto")
                        };
                    let forwarded_host = forwarded
                        .split(';')
                        .find_map(|pair| pair.trim().strip_prefix("host="))
                        .map(str::to_owned);
                    let host = match value("x-forwarded-host") {
                        h if !h.is_empty() => h,
                        _ => forwarded_host.unwrap_or_else(|| value("host")),
                    };
                    if proto == "http" {
                        return Response::builder()
                            .status(StatusCode::MOVED_PERMANENTLY)
                            .header(header::LOCATION, format!("https://{host}/"))
                            .header(header::CACHE_CONTROL, "max-age=3600")
                            .body(Body::empty())
                            .unwrap();
                    }
                    Response::builder()
                        .header(header::CACHE_CONTROL, "max-age=60")
                        .body(Body::from(format!("home of {host}")))
                        .unwrap()
                },
            ),
        )
        .route(
            "/links",
            routing::get(
                |State(calls): State<Arc<AtomicU64>>, headers: HeaderMap| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Links built from `Host`, as many frameworks do.
                    let host = headers
                        .get(header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    Response::builder()
                        .header(header::CACHE_CONTROL, "max-age=60")
                        .body(Body::from(format!("<a href=https://{host}/cart>")))
                        .unwrap()
                },
            ),
        )
        .route(
            "/",
            routing::post(|State(calls): State<Arc<AtomicU64>>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                "changed"
            }),
        )
        .route(
            "/poll",
            routing::post(|State(calls): State<Arc<AtomicU64>>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                // Relative: resolved against the host the client asked for.
                let fields = [
                    ("content-location", "/poll"),
                    ("cache-control", "max-age=60"),
                ];
                (fields, "after the vote")
            })
            .get(|State(calls): State<Arc<AtomicU64>>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                "from the origin"
            }),
        )
        .with_state(calls)
}

struct Fixture {
    _redis: TestRedis,
    app: Router,
    layer: CacheLayer,
    calls: Arc<AtomicU64>,
}

async fn fixture(forwarding: Forwarding) -> Fixture {
    fixture_with(forwarding, |b| b).await
}

async fn fixture_with(
    forwarding: Forwarding,
    tune: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder,
) -> Fixture {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = tune(CacheLayer::builder(manager).forwarding(forwarding))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let app = app(Arc::clone(&calls)).layer(layer.clone());
    Fixture {
        _redis: redis,
        app,
        layer,
        calls,
    }
}

fn behind(header: ForwardingHeader) -> Forwarding {
    Forwarding::new(TrustedProxies::parse(["10.0.0.0/8"]).unwrap(), header)
}

struct Answer {
    status: u16,
    cache_status: String,
    body: String,
}

async fn call(f: &Fixture, method: &str, peer: &str, headers: &[(&str, &str)]) -> Answer {
    call_at(f, method, "/", peer, "app.internal:8080", headers).await
}

async fn call_at(
    f: &Fixture,
    method: &str,
    path: &str,
    peer: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let addr: SocketAddr = format!("{peer}:40000").parse().unwrap();
    let request = builder
        .extension(ConnectInfo(addr))
        .body(Body::empty())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), f.app.clone().oneshot(request))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("no body within 10 s")
        .unwrap()
        .to_bytes();
    tokio::time::timeout(Duration::from_secs(10), f.layer.flush())
        .await
        .expect("flush never finished");
    Answer {
        status: parts.status.as_u16(),
        cache_status: parts
            .headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// With `store_post`, behind a trusted proxy that reports the host, a `POST`
/// answer naming its own URL (relative to that host) is stored for the
/// `GET`s that proxy forwards for the same host, and only for them.
#[tokio::test]
async fn a_post_answer_behind_a_trusted_proxy_is_stored_under_the_reported_host() {
    let f = fixture_with(behind(ForwardingHeader::XForwardedFor), |b| {
        b.store_post(true)
    })
    .await;
    let via_proxy = |host| {
        [
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-host", host),
        ]
    };
    let internal = "app.internal:8080";
    let post = call_at(
        &f,
        "POST",
        "/poll",
        "10.0.0.1",
        internal,
        &via_proxy("shop.example"),
    )
    .await;
    assert!(
        post.cache_status.contains("stored"),
        "{}",
        post.cache_status
    );
    let get = call_at(
        &f,
        "GET",
        "/poll",
        "10.0.0.1",
        internal,
        &via_proxy("shop.example"),
    )
    .await;
    assert_eq!(
        (get.body.as_str(), f.calls.load(Ordering::SeqCst)),
        ("after the vote", 1)
    );
    assert!(get.cache_status.contains("hit"), "{}", get.cache_status);
    let other = call_at(
        &f,
        "GET",
        "/poll",
        "10.0.0.1",
        internal,
        &via_proxy("other.example"),
    )
    .await;
    assert_eq!(
        other.body, "from the origin",
        "another host has its own entry"
    );
}

/// From a peer that is not a trusted proxy, each forwarding header that
/// can change the answer keeps the response out of the cache: a client
/// sending `X-Forwarded-Proto: http` to an app that redirects to https
/// would otherwise store the redirect for everyone, and every client would
/// loop.
#[tokio::test]
async fn cache_poisoning_via_forwarding_headers_from_an_untrusted_peer() {
    for forwarding in [Forwarding::none(), behind(ForwardingHeader::XForwardedFor)] {
        let f = fixture(forwarding).await;
        for (name, value) in [
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=198.51.100.1;proto=http"),
            ("x-forwarded-scheme", "http"),
            ("x-forwarded-port", "80"),
            ("x-forwarded-prefix", "/evil"),
            ("x-forwarded-host", "evil.example"),
        ] {
            let poisoned = call(&f, "GET", CLIENT, &[(name, value)]).await;
            assert!(
                !poisoned.cache_status.contains("stored"),
                "{name}: {value} from a client was stored: {}",
                poisoned.cache_status
            );
        }
        let clean = call(&f, "GET", CLIENT, &[]).await;
        assert_eq!(
            clean.status, 200,
            "a redirect was served to a clean request"
        );
        assert!(
            clean.cache_status.contains("stored"),
            "{}",
            clean.cache_status
        );
    }
}

/// Behind a trusted TLS-terminating proxy, the scheme it reports is part
/// of the key: the redirect stored for `http` is never served for `https`.
#[tokio::test]
async fn redirect_loop_via_a_scheme_the_trusted_proxy_reports() {
    let f = fixture(behind(ForwardingHeader::XForwardedFor)).await;
    let via_proxy = |proto: &'static str| {
        [
            ("x-forwarded-for", CLIENT),
            ("x-forwarded-proto", proto),
            ("x-forwarded-host", "shop.example"),
        ]
    };
    let plain = call(&f, "GET", PROXY, &via_proxy("http")).await;
    assert_eq!(plain.status, 301);
    assert!(
        plain.cache_status.contains("stored"),
        "{}",
        plain.cache_status
    );

    let secure = call(&f, "GET", PROXY, &via_proxy("https")).await;
    assert_eq!(secure.status, 200, "the http redirect was served for https");
    assert_eq!(secure.body, "home of shop.example");
    assert!(
        secure.cache_status.contains("stored"),
        "{}",
        secure.cache_status
    );

    let again = call(&f, "GET", PROXY, &via_proxy("https")).await;
    assert_eq!(
        (again.status, again.body.as_str()),
        (200, "home of shop.example")
    );
    assert!(again.cache_status.contains("hit"), "{}", again.cache_status);
    let plain_again = call(&f, "GET", PROXY, &via_proxy("http")).await;
    assert_eq!(plain_again.status, 301);
    assert!(
        plain_again.cache_status.contains("hit"),
        "{}",
        plain_again.cache_status
    );
    assert_eq!(
        f.calls.load(Ordering::SeqCst),
        2,
        "one origin call per scheme"
    );
}

/// An app behind a trusted proxy keeps caching, keyed by the host the
/// proxy reports (not the `Host` it rewrote to the upstream's), and a POST
/// through the proxy invalidates that entry.
#[tokio::test]
async fn a_proxied_app_stores_under_the_host_the_trusted_proxy_reports() {
    let f = fixture(behind(ForwardingHeader::XForwardedFor)).await;
    let via = |host: &'static str| {
        [
            ("x-forwarded-for", CLIENT),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", host),
            ("x-forwarded-port", "443"),
        ]
    };
    let first = call(&f, "GET", PROXY, &via("shop.example")).await;
    assert!(
        first.cache_status.contains("stored"),
        "{}",
        first.cache_status
    );
    let hit = call(&f, "GET", PROXY, &via("shop.example")).await;
    assert!(hit.cache_status.contains("hit"), "{}", hit.cache_status);
    assert_eq!(hit.body, "home of shop.example");

    let other = call(&f, "GET", PROXY, &via("other.example")).await;
    assert_eq!(
        other.body, "home of other.example",
        "another host's page served"
    );
    assert!(
        !other.cache_status.contains("hit"),
        "{}",
        other.cache_status
    );

    let post = call(&f, "POST", PROXY, &via("shop.example")).await;
    assert_eq!(post.status, 200);
    let after = call(&f, "GET", PROXY, &via("shop.example")).await;
    assert!(
        !after.cache_status.contains("hit"),
        "a POST through the proxy left the entry: {}",
        after.cache_status
    );
}

/// The proxies write `X-Forwarded-*` and pass a client's `Forwarded` on
/// untouched: its presence keeps the response out of the cache, and with
/// proxies that write `Forwarded`, a client's `X-Forwarded-*` does.
#[tokio::test]
async fn cache_poisoning_via_the_forwarding_header_the_trusted_proxies_do_not_write() {
    let f = fixture(behind(ForwardingHeader::XForwardedFor)).await;
    let smuggled = call(
        &f,
        "GET",
        PROXY,
        &[
            ("x-forwarded-for", CLIENT),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=198.51.100.1;proto=http;host=evil.example"),
        ],
    )
    .await;
    assert!(
        !smuggled.cache_status.contains("stored"),
        "{}",
        smuggled.cache_status
    );

    let f = fixture(behind(ForwardingHeader::Forwarded)).await;
    let smuggled = call(
        &f,
        "GET",
        PROXY,
        &[
            ("forwarded", "for=203.0.113.7;proto=https;host=shop.example"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    assert!(
        !smuggled.cache_status.contains("stored"),
        "{}",
        smuggled.cache_status
    );
    let keyed = call(
        &f,
        "GET",
        PROXY,
        &[("forwarded", "for=203.0.113.7;proto=https;host=shop.example")],
    )
    .await;
    assert_eq!(keyed.body, "home of shop.example");
    assert!(
        keyed.cache_status.contains("stored"),
        "{}",
        keyed.cache_status
    );
    let plain = call(
        &f,
        "GET",
        PROXY,
        &[("forwarded", "for=203.0.113.7;proto=http;host=shop.example")],
    )
    .await;
    assert_eq!(plain.status, 301, "the https page was served for http");
}

/// A trusted proxy that sends a scheme, host or port that cannot be read
/// leaves the request's origin unknown: it bypasses the cache.
#[tokio::test]
async fn an_unreadable_value_from_a_trusted_proxy_bypasses_the_cache() {
    let f = fixture(behind(ForwardingHeader::XForwardedFor)).await;
    let stored = call(
        &f,
        "GET",
        PROXY,
        &[("x-forwarded-for", CLIENT), ("x-forwarded-proto", "https")],
    )
    .await;
    assert!(
        stored.cache_status.contains("stored"),
        "{}",
        stored.cache_status
    );
    for (name, value) in [
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-host", "a b"),
        ("x-forwarded-port", "99999"),
    ] {
        let answer = call(
            &f,
            "GET",
            PROXY,
            &[
                ("x-forwarded-for", CLIENT),
                ("x-forwarded-proto", "https"),
                (name, value),
            ],
        )
        .await;
        assert!(
            !answer.cache_status.contains("hit") && !answer.cache_status.contains("stored"),
            "{name}: {value}: {}",
            answer.cache_status
        );
    }
}

/// A proxy that passes the client's `Host` on (nginx with
/// `proxy_set_header Host $http_host`) while reporting the normalised host
/// in `X-Forwarded-Host`: an app building links from `Host` must not have
/// the page it built for `Host: shop.example:1` served to every visitor of
/// `shop.example`.
#[tokio::test]
async fn cache_poisoning_via_a_host_the_trusted_proxy_passes_on() {
    let f = fixture(behind(ForwardingHeader::XForwardedFor)).await;
    let via = [
        ("x-forwarded-for", CLIENT),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
    ];
    let poisoned = call_at(&f, "GET", "/links", PROXY, "shop.example:1", &via).await;
    assert_eq!(poisoned.body, "<a href=https://shop.example:1/cart>");
    let visitor = call_at(&f, "GET", "/links", PROXY, "shop.example", &via).await;
    assert_eq!(
        visitor.body, "<a href=https://shop.example/cart>",
        "the page built for another Host was served: {}",
        visitor.cache_status
    );
    let again = call_at(&f, "GET", "/links", PROXY, "shop.example", &via).await;
    assert!(again.cache_status.contains("hit"), "{}", again.cache_status);
    assert_eq!(again.body, "<a href=https://shop.example/cart>");
}

/// Frameworks disagree on which of several `X-Forwarded-Host` (or
/// `-Proto`) values counts: the first line, the first entry, the last.
/// Several values, or an empty one, leave the answer unknown, so such a
/// request bypasses the cache.
#[tokio::test]
async fn cache_poisoning_via_several_values_of_a_forwarded_field() {
    let f = fixture(behind(ForwardingHeader::XForwardedFor)).await;
    for extra in [
        vec![
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-host", "shop.example"),
        ],
        vec![("x-forwarded-host", "evil.example, shop.example")],
        vec![("x-forwarded-host", "")],
        vec![("x-forwarded-proto", "http, https")],
    ] {
        let mut headers = vec![("x-forwarded-for", CLIENT)];
        headers.extend(extra.iter().copied());
        let answer = call(&f, "GET", PROXY, &headers).await;
        assert!(
            !answer.cache_status.contains("stored") && !answer.cache_status.contains("hit"),
            "{extra:?}: {}",
            answer.cache_status
        );
    }
}

/// Behind proxies that append to `Forwarded`, the elements to the left of
/// the one they appended are the client's. An app that reads the first
/// element would build its answer for the client's `host=` / `proto=`, so
/// such a request bypasses the cache.
#[tokio::test]
async fn cache_poisoning_via_a_client_element_of_forwarded() {
    let f = fixture(behind(ForwardingHeader::Forwarded)).await;
    let answer = call(
        &f,
        "GET",
        PROXY,
        &[(
            "forwarded",
            "for=1.1.1.1;host=evil.example;proto=http, for=203.0.113.7;host=shop.example;proto=https",
        )],
    )
    .await;
    assert!(
        !answer.cache_status.contains("stored") && !answer.cache_status.contains("hit"),
        "{}",
        answer.cache_status
    );
    let clean = call(
        &f,
        "GET",
        PROXY,
        &[(
            "forwarded",
            "for=1.1.1.1, for=203.0.113.7;host=shop.example;proto=https",
        )],
    )
    .await;
    assert!(
        clean.cache_status.contains("stored"),
        "{}",
        clean.cache_status
    );
}
