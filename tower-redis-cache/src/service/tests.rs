//! The service's decisions, in process: a cache over
//! `RedisManager::disabled()` (so every entry lives in the in-process store
//! and every answer says `redis-unavailable`) in front of a scripted origin.
//! Entry ages come from the origin's `Age` field, so no wall clock is
//! waited for; waits for background work run on tokio's paused clock.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tower::{Layer, Service, ServiceExt};
use tower_redis_core::RedisManager;

use super::hit::{StaleUse, stale_use};
use crate::CacheLayer;
use crate::directives::{RequestDirectives, ResponseDirectives};
use crate::freshness::StaleWindows;

/// An origin that answers every request with `headers`, counts its calls
/// (and its clones), and answers 304 to a request carrying `If-None-Match`.
struct Origin {
    headers: &'static [(&'static str, &'static str)],
    calls: Arc<AtomicUsize>,
    clones: Arc<AtomicUsize>,
}

impl Clone for Origin {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Self {
            headers: self.headers,
            calls: Arc::clone(&self.calls),
            clones: Arc::clone(&self.clones),
        }
    }
}

impl Origin {
    fn new(headers: &'static [(&'static str, &'static str)]) -> Self {
        Self {
            headers,
            calls: Arc::new(AtomicUsize::new(0)),
            clones: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn clones(&self) -> usize {
        self.clones.load(Ordering::SeqCst)
    }
}

impl Service<Request<Empty<Bytes>>> for Origin {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Empty<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let validated = request.headers().contains_key("if-none-match");
        let mut builder = Response::builder().status(if validated {
            StatusCode::NOT_MODIFIED
        } else {
            StatusCode::OK
        });
        for (name, value) in self.headers {
            builder = builder.header(*name, *value);
        }
        let body = if validated { "" } else { "page" };
        std::future::ready(Ok(builder.body(Full::new(Bytes::from(body))).unwrap()))
    }
}

fn layer() -> CacheLayer {
    CacheLayer::builder(RedisManager::disabled())
        .build()
        .unwrap()
}

fn get(headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut builder = Request::get("http://shop.example/p/1");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Empty::new()).unwrap()
}

/// Sends one request, reads the whole body, waits for its store; returns
/// the status and `Cache-Status`.
async fn send(
    layer: &CacheLayer,
    origin: &Origin,
    request: Request<Empty<Bytes>>,
) -> (StatusCode, String) {
    let response = layer.layer(origin.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let cache_status = response.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_owned();
    let _ = response.into_body().collect().await;
    layer.flush().await;
    (status, cache_status)
}

#[tokio::test]
async fn a_miss_is_stored_and_then_served_without_the_origin() {
    let (layer, origin) = (layer(), Origin::new(&[("cache-control", "max-age=60")]));
    let (_, first) = send(&layer, &origin, get(&[])).await;
    assert_eq!(
        first,
        "tower-redis; fwd=uri-miss; stored; detail=redis-unavailable"
    );
    let (status, second) = send(&layer, &origin, get(&[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        second.starts_with("tower-redis; hit; ttl=") && second.ends_with("redis-unavailable"),
        "{second}"
    );
    assert_eq!(origin.calls(), 1);
}

#[tokio::test]
async fn a_no_store_answer_is_forwarded_every_time() {
    let (layer, origin) = (layer(), Origin::new(&[("cache-control", "no-store")]));
    for _ in 0..2 {
        let (_, status) = send(&layer, &origin, get(&[])).await;
        assert_eq!(
            status,
            "tower-redis; fwd=uri-miss; detail=redis-unavailable"
        );
    }
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn only_if_cached_without_an_entry_is_a_504_and_nothing_is_forwarded() {
    let (layer, origin) = (layer(), Origin::new(&[("cache-control", "max-age=60")]));
    let (status, cache_status) =
        send(&layer, &origin, get(&[("cache-control", "only-if-cached")])).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        cache_status,
        "tower-redis; detail=\"only-if-cached redis-unavailable\""
    );
    assert_eq!(origin.calls(), 0);
}

#[tokio::test]
async fn a_request_no_cache_revalidates_a_fresh_entry_and_a_304_refreshes_it() {
    let origin = Origin::new(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")]);
    let layer = layer();
    send(&layer, &origin, get(&[])).await;
    let (status, cache_status) = send(&layer, &origin, get(&[("cache-control", "no-cache")])).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the client had no validator: the entry"
    );
    assert_eq!(
        cache_status,
        "tower-redis; fwd=request; fwd-status=304; stored; detail=redis-unavailable"
    );
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_stale_entry_within_stale_while_revalidate_is_served_and_refreshed_once() {
    // 70 s old at arrival with a 60 s lifetime: stale by 10 s, within 30 s.
    let origin = Origin::new(&[
        ("cache-control", "max-age=60, stale-while-revalidate=30"),
        ("age", "70"),
        ("etag", "\"v1\""),
    ]);
    let layer = layer();
    send(&layer, &origin, get(&[])).await;
    let (status, cache_status) = send(&layer, &origin, get(&[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        cache_status.contains("; fwd=stale")
            && cache_status.ends_with("detail=\"redis-unavailable stale-while-revalidate\""),
        "{cache_status}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while origin.calls() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no background refresh"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    layer.flush().await;
    assert_eq!(origin.calls(), 2, "one refresh, in the background");
}

#[tokio::test]
async fn a_stale_entry_past_its_windows_is_revalidated_before_answering() {
    let origin = Origin::new(&[
        ("cache-control", "max-age=60, stale-while-revalidate=5"),
        ("age", "70"),
        ("etag", "\"v1\""),
    ]);
    let layer = layer();
    send(&layer, &origin, get(&[])).await;
    let (_, cache_status) = send(&layer, &origin, get(&[])).await;
    assert!(
        cache_status.starts_with("tower-redis; fwd=stale; fwd-status=304"),
        "{cache_status}"
    );
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn a_successful_post_invalidates_its_target() {
    let (layer, origin) = (layer(), Origin::new(&[("cache-control", "max-age=60")]));
    send(&layer, &origin, get(&[])).await;
    let post = Request::post("http://shop.example/p/1")
        .body(Empty::new())
        .unwrap();
    let response = layer.layer(origin.clone()).oneshot(post).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, cache_status) = send(&layer, &origin, get(&[])).await;
    assert!(cache_status.contains("fwd=uri-miss"), "{cache_status}");
    assert_eq!(origin.calls(), 3);
}

#[test]
fn stale_use_decides_between_serving_stale_and_revalidating() {
    let windows = StaleWindows {
        while_revalidate: 30,
        if_error: 60,
    };
    let stored = ResponseDirectives::default();
    let plain = RequestDirectives::default();
    assert_eq!(
        stale_use(70, 60, &stored, &plain, windows),
        StaleUse::WhileRevalidate
    );
    assert_eq!(
        stale_use(100, 60, &stored, &plain, windows),
        StaleUse::Revalidate {
            reason: "stale",
            if_error: true
        }
    );
    let no_cache = RequestDirectives {
        no_cache: true,
        ..RequestDirectives::default()
    };
    assert_eq!(
        stale_use(70, 60, &stored, &no_cache, windows),
        StaleUse::Revalidate {
            reason: "request",
            if_error: false
        }
    );
    assert_eq!(
        stale_use(10, 60, &stored, &no_cache, windows),
        StaleUse::Revalidate {
            reason: "request",
            if_error: false
        },
        "a fresh entry the request refuses"
    );
}

/// The futures of a hit each fit the allocator's per-thread cache (glibc's
/// tcache takes blocks of up to 1,032 bytes; a larger block comes from the
/// shared arena, under its lock): the one the service boxes per request
/// (with its span), the lookup's and the Redis read's, each boxed apart.
/// The service's box was 4,384 bytes in a release build, and at c=64 the
/// arena's lock showed in profiles of a hit. The sizes are this build's
/// layout: a test build's, larger than a release build's.
#[test]
fn a_hits_boxed_futures_fit_the_allocators_thread_cache() {
    const THREAD_CACHE_BYTES: usize = 1032;
    let config = Arc::clone(&layer().config);
    let request = get(&[]);
    assert!(
        super::Key::of(&config, &request).is_some(),
        "the request is one the cache handles"
    );
    // What the service boxes for it (with its span and clock), as
    // `Finish::boxed` measured it.
    let mut service = tower_layer::Layer::layer(&layer(), Origin::new(&[]));
    super::LAST_BOXED_BYTES.set(0);
    let future = service.call(request);
    let size = super::LAST_BOXED_BYTES.get();
    assert!(size > 0, "without a near cache, a lookup is awaited");
    assert!(
        size <= THREAD_CACHE_BYTES,
        "the boxed request is {size} bytes"
    );
    drop(future);
    let headers = http::HeaderMap::new();
    let lookup = config.store.lookup("url", &headers, "");
    let size = std::mem::size_of_val(&lookup);
    assert!(
        size <= THREAD_CACHE_BYTES,
        "the boxed lookup is {size} bytes"
    );
    let read = config
        .store
        .read_served("url", &headers, "", Some(String::new()), false, true);
    let size = std::mem::size_of_val(&read);
    assert!(size <= THREAD_CACHE_BYTES, "the boxed read is {size} bytes");
}

/// A miss that goes to the origin boxes only the origin's call and what
/// storing its answer needs (the future measured here is what `on_miss`
/// boxes), within the allocator's per-thread cache (as above), around this
/// file's origin. As `async fn`s, the miss and its forwarding were two
/// boxes per miss, each holding the whole exchange: 1,288 and 1,336 bytes
/// in a release build around an axum app (measured with valgrind's DHAT),
/// 1,448 bytes here; with coalescing, the leader's and the follower's
/// paths made one future of about 4 KB for every miss.
#[test]
fn a_forwarded_miss_boxes_within_the_allocators_thread_cache() {
    const THREAD_CACHE_BYTES: usize = 1032;
    let config = Arc::clone(&layer().config);
    let request = get(&[]);
    let key = super::Key::of_target(&config, &request).expect("a request the cache handles");
    let exchange = super::Exchange::keyed(config, key, Origin::new(&[]), request);
    let forwarded = exchange.forward_and_store(
        super::cache_status::CacheStatus::forward("uri-miss", crate::store::Tier::Redis),
        super::miss::Fill::none(),
    );
    let size = std::mem::size_of_val(&forwarded);
    assert!(
        size <= THREAD_CACHE_BYTES,
        "the forwarding future (boxed by on_miss) is {size} bytes"
    );
}

/// A fresh entry of the near tier is answered when the service is called,
/// without a clone of the inner service, judged by the directives the near tier kept with it under the layer's
/// rules (here a targeted field makes fresh what `Cache-Control` says must
/// be revalidated); a range request takes the path that cuts its range.
#[tokio::test]
async fn a_fresh_near_hit_is_answered_at_once_by_the_directives_kept_with_it() {
    use tower_redis_core::testing::{TestRedis, wait_for_tracking};
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = CacheLayer::builder(manager.clone())
        .near_cache(1 << 20, Duration::from_secs(3600))
        .targeted_field("shop-cache-control")
        .build()
        .unwrap();
    let origin = Origin::new(&[
        ("cache-control", "no-cache"),
        ("shop-cache-control", "max-age=60"),
    ]);
    let tracking = manager.tracking().unwrap();
    wait_for_tracking(&manager, Duration::from_secs(10)).await;
    let at_once = || super::ANSWERED_AT_ONCE.get();
    let (_, stored) = send(&layer, &origin, get(&[])).await;
    assert!(stored.contains("stored"), "{stored}");
    // The store's own invalidation is in: the next read keeps a copy.
    tracking.sync().await.unwrap();
    let (_, from_redis) = send(&layer, &origin, get(&[])).await;
    assert!(!from_redis.contains("near"), "{from_redis}");
    let before = at_once();
    let clones = origin.clones();
    let (status, near) = send(&layer, &origin, get(&[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(near.contains("hit") && near.contains("near"), "{near}");
    assert_eq!(at_once(), before + 1, "answered when called");
    assert_eq!(
        origin.clones(),
        clones + 1,
        "a near hit clones no inner service (the one clone is the test's own)"
    );
    let (status, ranged) = send(&layer, &origin, get(&[("range", "bytes=0-1")])).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert!(
        ranged.contains("hit") && ranged.contains("near"),
        "{ranged}"
    );
    assert_eq!(at_once(), before + 1, "a range takes the awaited path");
    assert_eq!(origin.calls(), 1);
}

/// What the origin is sent for a request the cache forwards: the client's
/// head (method, target, version, fields; its range restored when ranges
/// are forwarded; the stored validators added when an entry is
/// revalidated) and the request's extensions. The cache keys and looks up
/// a request on its own head, and copies that head for the origin only
/// when it forwards the request.
#[tokio::test]
async fn a_forwarded_request_reaches_the_origin_with_its_head_and_extensions() {
    #[derive(Clone, Debug, PartialEq)]
    struct Marker(u32);
    type Seen = (
        http::Method,
        http::Uri,
        http::Version,
        http::HeaderMap,
        Option<Marker>,
    );
    let seen: Arc<std::sync::Mutex<Vec<Seen>>> = Arc::default();
    // Answers with `fields`, and 304 to a request with `If-None-Match`.
    let origin = |fields: &'static [(&'static str, &'static str)]| {
        let seen = Arc::clone(&seen);
        tower::service_fn(move |request: Request<Empty<Bytes>>| {
            seen.lock().unwrap().push((
                request.method().clone(),
                request.uri().clone(),
                request.version(),
                request.headers().clone(),
                request.extensions().get::<Marker>().cloned(),
            ));
            let validated = request.headers().contains_key("if-none-match");
            let mut response = Response::builder().status(if validated {
                StatusCode::NOT_MODIFIED
            } else {
                StatusCode::OK
            });
            for (name, value) in fields {
                response = response.header(*name, *value);
            }
            std::future::ready(Ok::<_, Infallible>(
                response.body(Full::new(Bytes::from("page"))).unwrap(),
            ))
        })
    };
    let fresh = origin(&[("cache-control", "max-age=60")]);
    let validated = origin(&[("cache-control", "no-cache"), ("etag", "\"v1\"")]);
    let send = |layer: CacheLayer, mut request: Request<Empty<Bytes>>, marker: u32| {
        let (fresh, validated) = (fresh.clone(), validated.clone());
        async move {
            request.extensions_mut().insert(Marker(marker));
            let response = if marker < 10 {
                layer.layer(fresh).oneshot(request).await.unwrap()
            } else {
                layer.layer(validated).oneshot(request).await.unwrap()
            };
            let _ = response.into_body().collect().await;
            layer.flush().await;
        }
    };
    // A miss.
    send(
        layer(),
        get(&[("accept", "text/html"), ("x-trace", "t1")]),
        7,
    )
    .await;
    // A range, forwarded as the client sent it.
    let ranges = CacheLayer::builder(RedisManager::disabled())
        .forward_ranges(true)
        .build()
        .unwrap();
    send(
        ranges,
        get(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")]),
        8,
    )
    .await;
    // A HEAD request (a miss: no entry in this layer).
    let mut head = get(&[("x-trace", "t3")]);
    *head.method_mut() = http::Method::HEAD;
    send(layer(), head, 9).await;
    // An entry stored, then revalidated (`no-cache`) with its `ETag`.
    let revalidating = layer();
    send(revalidating.clone(), get(&[]), 10).await;
    send(revalidating, get(&[("x-trace", "t5")]), 11).await;

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let uri: http::Uri = "http://shop.example/p/1".parse().unwrap();
    let (method, target, version, fields, marker) = &seen[0];
    assert_eq!(
        (method, target, *version, marker),
        (
            &http::Method::GET,
            &uri,
            http::Version::HTTP_11,
            &Some(Marker(7))
        )
    );
    assert_eq!(fields["accept"], "text/html");
    assert_eq!(fields["x-trace"], "t1");
    assert!(!fields.contains_key("range"));
    let (_, _, _, fields, marker) = &seen[1];
    assert_eq!(marker, &Some(Marker(8)));
    assert_eq!(fields["range"], "bytes=0-1");
    assert_eq!(fields["if-range"], "\"v1\"");
    let (method, target, _, fields, marker) = &seen[2];
    assert_eq!(
        (method, target, marker),
        (&http::Method::HEAD, &uri, &Some(Marker(9)))
    );
    assert_eq!(fields["x-trace"], "t3");
    let (method, target, _, fields, marker) = &seen[4];
    assert_eq!(
        (method, target, marker),
        (&http::Method::GET, &uri, &Some(Marker(11)))
    );
    assert_eq!(fields["x-trace"], "t5");
    assert_eq!(
        fields["if-none-match"], "\"v1\"",
        "the stored validator is sent"
    );
}
