//! Coalescing, stale serving, tags and purges, the handle and the near
//! cache, against real Redis, with two layer instances (each with its own
//! `RedisManager`, as two app instances would have) in front of one origin.

#![allow(clippy::unwrap_used)] // A failed setup step should fail the test loudly.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use axum::routing;
use http_body_util::BodyExt;
use support::{Answer, OriginCalls, call, request, send};
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, CacheLayerBuilder, Route};
use tower_redis_core::testing::{Monitor, TestCluster, TestRedis};
use tower_redis_core::{RedisConfigBuilder, RedisManager, redis};

/// How long a gated origin answer waits for the others at most: shorter
/// than the layer's coalescing wait (5 s by default), so that requests
/// wrongly coalesced behind a gated one cannot reach the gate by giving up
/// their wait; long enough that a loaded machine gets ten requests there.
const GATE_DEADLINE: Duration = Duration::from_secs(4);

/// One origin shared by every instance: counts calls per path.
#[derive(Clone, Default)]
struct Origin {
    calls: OriginCalls,
    /// `/sie` after its first answer: 0 ok, 1 answers 503, 2 hangs.
    sie_mode: Arc<AtomicU8>,
    /// `/private` requests being answered now, and the most at once.
    in_flight: Arc<AtomicU64>,
    most_in_flight: Arc<AtomicU64>,
    /// `/private` answers wait until this many are in flight at once
    /// (at most [`GATE_DEADLINE`]; 0: no wait).
    private_gate: Arc<AtomicU64>,
    /// `/item/{id}` answers wait until that item has had this many calls
    /// (at most [`GATE_DEADLINE`]; 0: no wait).
    item_gate: Arc<AtomicU64>,
    /// Chunks of `/growing`'s large answer read so far.
    chunks_read: Arc<AtomicU64>,
}

impl std::ops::Deref for Origin {
    type Target = OriginCalls;

    fn deref(&self) -> &OriginCalls {
        &self.calls
    }
}

fn routes(origin: Origin) -> Router {
    Router::new()
        .route(
            "/item/{id}",
            routing::get(
                |State(o): State<Origin>, Path(id): Path<String>| async move {
                    let path = format!("/item/{id}");
                    let n = o.count(&path);
                    let gate = o.item_gate.load(Ordering::SeqCst);
                    let deadline = Instant::now() + GATE_DEADLINE;
                    while o.calls(&path) < gate && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    o.delay().await;
                    Response::builder()
                        .header("cache-control", "max-age=60, stale-while-revalidate=30")
                        .header("surrogate-key", format!("item-{id} items"))
                        .body(Body::from(format!("item-{id}-v{n}")))
                        .unwrap()
                },
            )
            .put(|| async { "changed" }),
        )
        .route(
            "/plain/{id}",
            versioned("plain", |_, _| {
                vec![
                    ("cache-control", "max-age=60".to_owned()),
                    ("cache-tag", "plain,everything".to_owned()),
                ]
            }),
        )
        .route(
            "/etag/{id}",
            versioned("etag", |id, n| {
                vec![
                    ("cache-control", "max-age=60".to_owned()),
                    ("etag", format!("\"v{n}\"")),
                    ("surrogate-key", format!("etag-{id}")),
                ]
            }),
        )
        .route(
            "/targeted/{id}",
            // Fresh for a minute to the layer (its targeted field),
            // `no-cache` to everyone else.
            versioned("targeted", |_, _| {
                vec![
                    ("cache-control", "no-cache".to_owned()),
                    ("shop-cache-control", "max-age=60".to_owned()),
                ]
            }),
        )
        .route(
            "/growing",
            routing::get(|State(o): State<Origin>| async move {
                let n = o.count("/growing");
                let headers = "max-age=60, stale-while-revalidate=60";
                if n == 1 {
                    return Response::builder()
                        .header("cache-control", headers)
                        .body(Body::from("small"))
                        .unwrap();
                }
                // Then 64 chunks of 64 KiB, of no announced length,
                // counted as they are read.
                let read = Arc::clone(&o.chunks_read);
                let chunks = futures_util::stream::iter((0..64).map(move |_| {
                    read.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(vec![b'x'; 64 << 10]))
                }));
                Response::builder()
                    .header("cache-control", headers)
                    .body(Body::from_stream(chunks))
                    .unwrap()
            }),
        )
        .route(
            "/sie",
            routing::get(|State(o): State<Origin>| async move {
                let n = o.count("/sie");
                if n > 1 {
                    match o.sie_mode.load(Ordering::SeqCst) {
                        1 => {
                            return Response::builder()
                                .status(StatusCode::SERVICE_UNAVAILABLE)
                                .body(Body::from("down"))
                                .unwrap();
                        }
                        2 => tokio::time::sleep(Duration::from_secs(30)).await,
                        _ => {}
                    }
                }
                Response::builder()
                    .header("cache-control", "max-age=60, stale-if-error=300")
                    .body(Body::from(format!("sie-v{n}")))
                    .unwrap()
            }),
        )
        .route(
            "/private",
            routing::get(|State(o): State<Origin>| async move {
                o.count("/private");
                let now = o.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                o.most_in_flight.fetch_max(now, Ordering::SeqCst);
                let gate = o.private_gate.load(Ordering::SeqCst);
                let deadline = Instant::now() + GATE_DEADLINE;
                while o.most_in_flight.load(Ordering::SeqCst) < gate && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                o.delay().await;
                o.in_flight.fetch_sub(1, Ordering::SeqCst);
                Response::builder()
                    .header("cache-control", "private, max-age=60")
                    .body(Body::from("for one user"))
                    .unwrap()
            }),
        )
        .route(
            "/hang-first",
            routing::get(|State(o): State<Origin>| async move {
                let n = o.count("/hang-first");
                if n == 1 {
                    // The first caller never gets an answer (its instance "crashes").
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Response::builder()
                    .header("cache-control", "max-age=60")
                    .body(Body::from(format!("hang-first-v{n}")))
                    .unwrap()
            }),
        )
        .with_state(origin)
}

/// `GET /<name>/{id}`: `<name>-<id>-v<n>` on its n-th call, with the
/// fields `fields(id, n)`.
fn versioned(
    name: &'static str,
    fields: fn(&str, u64) -> Vec<(&'static str, String)>,
) -> routing::MethodRouter<Origin> {
    routing::get(
        move |State(o): State<Origin>, Path(id): Path<String>| async move {
            let n = o.count(&format!("/{name}/{id}"));
            let mut answer = Response::builder();
            for (field, value) in fields(&id, n) {
                answer = answer.header(field, value);
            }
            answer
                .body(Body::from(format!("{name}-{id}-v{n}")))
                .unwrap()
        },
    )
}

struct Instance {
    app: Router,
    layer: CacheLayer,
    manager: RedisManager,
}

async fn instance(
    config: RedisConfigBuilder,
    origin: &Origin,
    configure: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder,
) -> Instance {
    let manager = RedisManager::connect(config.build().unwrap())
        .await
        .unwrap();
    let layer = configure(CacheLayer::builder(manager.clone()))
        .build()
        .unwrap();
    let app = routes(origin.clone()).layer(layer.clone());
    Instance {
        app,
        layer,
        manager,
    }
}

async fn get(app: &Router, path: &str) -> Answer {
    call(app, request(path, &[])).await
}

/// Gets `path` and waits until what it stores (or refreshes) is in Redis.
async fn get_settled(instance: &Instance, path: &str) -> Answer {
    let answer = get(&instance.app, path).await;
    instance.layer.flush().await;
    answer
}

#[tokio::test]
async fn a_hundred_concurrent_misses_over_two_instances_make_one_origin_call() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    origin.delay_ms.store(150, Ordering::SeqCst);
    let a = instance(redis.config(), &origin, |b| b).await;
    let b = instance(redis.config(), &origin, |b| b).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let app = if i % 2 == 0 {
            a.app.clone()
        } else {
            b.app.clone()
        };
        tasks.push(tokio::spawn(async move { get(&app, "/item/1").await }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "item-1-v1", "{}", answer.cache_status());
        statuses.push(answer.cache_status().to_owned());
    }
    assert_eq!(origin.calls("/item/1"), 1, "{statuses:?}");
    let coalesced = statuses.iter().filter(|s| s.contains("coalesced")).count();
    assert!(coalesced >= 90, "{coalesced} coalesced: {statuses:?}");
}

/// RFC 9111 §4.2 and §5.2.1: a request coalesced behind another's miss is
/// served the leader's answer only when that answer satisfies its own
/// request; a `min-fresh` the entry does not meet sends it to the origin.
#[tokio::test]
async fn a_coalesced_follower_is_served_only_what_its_own_request_accepts() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    origin.delay_ms.store(1_500, Ordering::SeqCst);
    let a = instance(redis.config(), &origin, |b| b).await;
    let leader = {
        let app = a.app.clone();
        tokio::spawn(async move { get(&app, "/item/1").await })
    };
    // The leader is at the origin (for 1.5 s): join its flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.calls("/item/1") == 0 {
        assert!(
            Instant::now() < deadline,
            "the leader never reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let plain = {
        let app = a.app.clone();
        tokio::spawn(async move { get(&app, "/item/1").await })
    };
    // `max-age=60` cannot be fresh for 600 s more.
    let demanding = call(
        &a.app,
        request("/item/1", &[("cache-control", "min-fresh=600")]),
    )
    .await;
    assert_eq!(demanding.status, 200);
    assert!(
        !demanding.cache_status().contains("coalesced"),
        "{}",
        demanding.cache_status()
    );
    assert_eq!(leader.await.unwrap().body, "item-1-v1");
    let plain = plain.await.unwrap();
    assert_eq!(plain.body, "item-1-v1");
    assert!(
        plain.cache_status().contains("coalesced"),
        "{}",
        plain.cache_status()
    );
    assert_eq!(
        origin.calls("/item/1"),
        2,
        "the leader's and the demanding request's"
    );
}

#[tokio::test]
async fn misses_on_a_url_that_answered_private_do_not_wait_for_each_other() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    // The first answer is private: nothing will ever be stored for it.
    assert_eq!(get_settled(&a, "/private").await.status, 200);
    // Each answer waits until all ten are at the origin together (4 s at
    // most): coalesced, they could never all be there at once.
    origin.private_gate.store(10, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let app = a.app.clone();
        tasks.push(tokio::spawn(async move { get(&app, "/private").await }));
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 200);
        assert!(
            !answer.cache_status().contains("; hit"),
            "{}",
            answer.cache_status()
        );
    }
    assert_eq!(origin.calls("/private"), 11);
    // Coalesced, nine of them would have waited for the first one's answer.
    assert_eq!(origin.most_in_flight.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn without_coalescing_concurrent_misses_all_reach_the_origin() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    // Each answer waits until all ten are at the origin (4 s at most):
    // coalesced, the others would wait for the first one instead.
    origin.item_gate.store(10, Ordering::SeqCst);
    let a = instance(redis.config(), &origin, |b| b.coalesce(None)).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let app = a.app.clone();
        tasks.push(tokio::spawn(async move { get(&app, "/item/1").await }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().status, 200);
    }
    assert_eq!(origin.calls("/item/1"), 10);
}

#[tokio::test]
async fn a_lock_holder_that_dies_frees_the_lock_by_expiry() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let configure = |b: CacheLayerBuilder| {
        b.lock_ttl(Duration::from_millis(300))
            .coalesce(Some(Duration::from_secs(20)))
    };
    let a = instance(redis.config(), &origin, configure).await;
    let b = instance(redis.config(), &origin, configure).await;
    // A takes the lock and its origin call never ends; then A "crashes".
    let app = a.app.clone();
    let holder = tokio::spawn(async move { get(&app, "/hang-first").await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.calls("/hang-first") == 0 {
        assert!(Instant::now() < deadline, "A never reached the origin");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    holder.abort();
    // B waits for the lock, finds it expired and fills the entry itself,
    // long before its 20 s coalescing wait would have run out.
    let answer = tokio::time::timeout(Duration::from_secs(10), get(&b.app, "/hang-first"))
        .await
        .expect("B waited for the dead holder's lock past its expiry");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "hang-first-v2");
    assert!(
        answer.cache_status().contains("stored"),
        "{}",
        answer.cache_status()
    );
    assert_eq!(origin.calls("/hang-first"), 2);
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_at_once_and_refreshes_once() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    let b = instance(redis.config(), &origin, |b| b).await;
    assert_eq!(get_settled(&a, "/item/7").await.body, "item-7-v1");
    // Soft purge: the entry is stale now, and may be served while refreshed.
    let purged = a.layer.handle().soft_purge_tag("item-7").await;
    assert_eq!(purged.urls, 1);
    assert!(!purged.deferred);
    // The refresh is slow; stale answers do not wait for it.
    origin.delay_ms.store(300, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let app = if i % 2 == 0 {
            a.app.clone()
        } else {
            b.app.clone()
        };
        tasks.push(tokio::spawn(async move { get(&app, "/item/7").await }));
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.body, "item-7-v1");
        let status = answer.cache_status();
        assert!(
            status.contains("hit")
                && status.contains("fwd=stale")
                && status.contains("stale-while-revalidate"),
            "{status}"
        );
    }
    a.layer.flush().await;
    b.layer.flush().await;
    assert_eq!(origin.calls("/item/7"), 2, "exactly one background refresh");
    origin.delay_ms.store(0, Ordering::SeqCst);
    let refreshed = get(&b.app, "/item/7").await;
    assert_eq!(refreshed.body, "item-7-v2");
    assert!(
        refreshed.cache_status().starts_with("tower-redis; hit"),
        "{}",
        refreshed.cache_status()
    );
}

/// A stale entry's background refresh reads the new answer for the entry
/// only, and no further than an entry may hold: a refresh of 4 MiB, with
/// entries bounded at 64 KiB, is not read (nor kept) to its end.
#[tokio::test]
async fn a_background_refresh_larger_than_an_entry_is_not_read_to_its_end() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b.max_body_bytes(64 << 10)).await;
    assert_eq!(get_settled(&a, "/growing").await.body, "small");
    a.layer.handle().soft_purge_url("/growing").await.unwrap();
    let stale = get(&a.app, "/growing").await;
    assert_eq!(stale.body, "small", "{}", stale.cache_status());
    assert!(
        stale.cache_status().contains("stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.calls("/growing") < 2 {
        assert!(Instant::now() < deadline, "no background refresh");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.layer.flush().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let read = origin.chunks_read.load(Ordering::SeqCst);
    assert!(
        read <= 4,
        "{read} chunks of 64 KiB read of a refresh no entry can hold"
    );
    // Nothing was stored from it: the stale entry is still what there is.
    assert_eq!(get(&a.app, "/growing").await.body, "small");
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_entry_when_the_origin_answers_503() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    assert_eq!(get_settled(&a, "/sie").await.body, "sie-v1");
    a.layer.handle().soft_purge_url("/sie").await.unwrap();
    origin.sie_mode.store(1, Ordering::SeqCst);
    let answer = get(&a.app, "/sie").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "sie-v1");
    let status = answer.cache_status();
    assert!(
        status.contains("fwd=stale")
            && status.contains("fwd-status=503")
            && status.contains("stale-if-error"),
        "{status}"
    );
    assert_eq!(origin.calls("/sie"), 2);
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_entry_when_the_origin_times_out() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| {
        b.origin_timeout(Duration::from_millis(200))
    })
    .await;
    assert_eq!(get_settled(&a, "/sie").await.body, "sie-v1");
    a.layer.handle().soft_purge_url("/sie").await.unwrap();
    origin.sie_mode.store(2, Ordering::SeqCst);
    let answer = tokio::time::timeout(Duration::from_secs(10), get(&a.app, "/sie"))
        .await
        .expect("the origin timeout did not apply");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "sie-v1");
    assert!(
        answer.cache_status().contains("stale-if-error"),
        "{}",
        answer.cache_status()
    );
}

#[tokio::test]
async fn stale_if_error_covers_an_origin_error() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = CacheLayer::builder(manager)
        .route(Route::new("*").stale_if_error(Duration::from_secs(60)))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    let service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(move |_request: Request<Body>| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Ok(Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(Body::from("first"))
                        .unwrap())
                } else {
                    Err(std::io::Error::other("origin unreachable"))
                }
            }
        });
    let request = || {
        Request::get("/x")
            .header(header::HOST, "shop.example")
            .body(Body::empty())
            .unwrap()
    };
    let first = service.clone().oneshot(request()).await.unwrap();
    let _ = first.into_body().collect().await.unwrap();
    layer.flush().await;
    layer.handle().soft_purge_url("/x").await.unwrap();
    let answer = service.clone().oneshot(request()).await.unwrap();
    assert!(
        answer.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("stale-if-error")
    );
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn tags_come_from_response_headers_and_are_not_sent_to_clients() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    let first = get_settled(&a, "/item/1").await;
    assert!(first.headers.get("surrogate-key").is_none());
    let hit = get(&a.app, "/item/1").await;
    assert!(hit.cache_status().contains("hit"));
    assert!(hit.headers.get("surrogate-key").is_none());
    assert!(hit.headers.get("tower-redis-tags").is_none());
    let info = a
        .layer
        .handle()
        .entry("http://shop.example/item/1")
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(info.tags, vec!["item-1".to_owned(), "items".to_owned()]);
    assert_eq!(info.source, "redis");
    assert!(info.ttl > 0);
}

#[tokio::test]
async fn a_tag_purge_on_one_instance_is_seen_on_the_other() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    let b = instance(redis.config(), &origin, |b| b).await;
    for id in ["1", "2"] {
        get_settled(&a, &format!("/item/{id}")).await;
    }
    get_settled(&a, "/plain/1").await;
    assert!(get(&b.app, "/item/1").await.cache_status().contains("hit"));

    let purged = a.layer.handle().purge_tag("item-1").await;
    assert_eq!(purged.urls, 1);
    let after = get(&b.app, "/item/1").await;
    assert_eq!(after.body, "item-1-v2", "{}", after.cache_status());
    assert!(get(&b.app, "/item/2").await.cache_status().contains("hit"));

    // `Cache-Tag` (comma-separated) works too; a tag over several URLs.
    b.layer.flush().await;
    let purged = b.layer.handle().purge_tag("items").await;
    assert_eq!(purged.urls, 2);
    assert!(get(&a.app, "/item/2").await.cache_status().contains("fwd="));
    assert!(get(&a.app, "/plain/1").await.cache_status().contains("hit"));
    let purged = a.layer.handle().purge_tag("plain").await;
    assert_eq!(purged.urls, 1);
    assert!(
        get(&b.app, "/plain/1")
            .await
            .cache_status()
            .contains("fwd=")
    );
}

#[tokio::test]
async fn purge_by_url_prefix_and_everything() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    let handle = a.layer.handle();
    for path in ["/item/1", "/item/2", "/plain/1", "/plain/2"] {
        get_settled(&a, path).await;
    }
    assert_eq!(handle.purge_url("/item/1").await.unwrap().urls, 1);
    assert!(get(&a.app, "/item/1").await.cache_status().contains("fwd="));
    assert!(get(&a.app, "/item/2").await.cache_status().contains("hit"));
    a.layer.flush().await;

    assert_eq!(
        handle
            .purge_url("http://shop.example/plain/1")
            .await
            .unwrap()
            .urls,
        1
    );
    assert_eq!(
        handle
            .purge_url("http://other.example/plain/2")
            .await
            .unwrap()
            .urls,
        0,
        "another host's URL is another entry"
    );
    assert!(get(&a.app, "/plain/2").await.cache_status().contains("hit"));

    assert_eq!(handle.purge_prefix("/item/").await.unwrap().urls, 2);
    assert!(get(&a.app, "/item/2").await.cache_status().contains("fwd="));
    assert!(get(&a.app, "/plain/2").await.cache_status().contains("hit"));
    a.layer.flush().await;

    // Live now: /item/2 (stored again after the prefix purge) and /plain/2.
    let everything = handle.purge_all().await;
    assert_eq!(everything.urls, 2, "{everything:?}");
    for path in ["/item/1", "/item/2", "/plain/1", "/plain/2"] {
        assert!(get(&a.app, path).await.cache_status().contains("fwd="));
    }

    let error = handle.purge_prefix("item").await.unwrap_err();
    assert!(error.to_string().contains("starting with `/`"), "{error}");
    let error = handle.purge_url("not a url").await.unwrap_err();
    assert!(error.to_string().contains("give"), "{error}");
}

#[tokio::test]
async fn a_soft_purge_without_stale_while_revalidate_revalidates() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    get_settled(&a, "/plain/1").await;
    let purged = a.layer.handle().soft_purge_tag("everything").await;
    assert_eq!(purged.urls, 1);
    let after = get(&a.app, "/plain/1").await;
    assert_eq!(after.body, "plain-1-v2");
    assert!(
        after.cache_status().contains("fwd=stale"),
        "{}",
        after.cache_status()
    );
}

#[tokio::test]
async fn warm_fills_through_the_service_and_stats_count() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    let handle = a.layer.handle();
    let report = handle
        .warm(
            a.app.clone(),
            [
                "http://shop.example/item/1",
                "http://shop.example/item/2",
                "/relative",
            ],
        )
        .await;
    assert_eq!(report.len(), 3);
    assert_eq!(report[0].status, Some(200));
    assert!(
        report[0]
            .cache_status
            .as_deref()
            .unwrap()
            .contains("stored")
    );
    assert!(report[2].error.as_deref().unwrap().contains("absolute"));
    assert!(get(&a.app, "/item/1").await.cache_status().contains("hit"));
    assert!(get(&a.app, "/item/2").await.cache_status().contains("hit"));
    let again = handle
        .warm(a.app.clone(), ["http://shop.example/item/1"])
        .await;
    assert!(again[0].cache_status.as_deref().unwrap().contains("hit"));
    assert_eq!(origin.calls("/item/1"), 1);

    let stats = handle.stats().await;
    assert_eq!(stats.entries, 2, "{stats:?}");
    assert!(stats.bytes > 0, "{stats:?}");
    assert_eq!(stats.misses, 2, "{stats:?}");
    assert_eq!(stats.hits, 3, "{stats:?}");
    assert!((stats.hit_ratio - 0.6).abs() < 1e-9, "{stats:?}");
    assert!(!stats.in_process);
}

async fn numsub(redis: &TestRedis) -> i64 {
    let n = redis
        .subscribers("tower-redis:cache-events")
        .await
        .expect("PUBSUB NUMSUB");
    i64::try_from(n).expect("a count")
}

async fn wait_for_subscribers(redis: &TestRedis, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while numsub(redis).await != count {
        assert!(
            Instant::now() < deadline,
            "subscribers never reached {count}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_near_cache_answers_without_redis_and_a_purge_elsewhere_reaches_it_fast() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let near = |b: CacheLayerBuilder| b.near_cache(8 << 20, Duration::from_secs(3600));
    let a = instance(redis.config(), &origin, near).await;
    let b = instance(redis.config(), &origin, near).await;
    get_settled(&a, "/item/1").await;
    get(&b.app, "/item/1").await;
    wait_for_subscribers(&redis, 2).await;
    wait_tracking(&b).await;
    // A read once tracking is up is kept near (or served from there).
    get(&b.app, "/item/1").await;
    redis.reset_stats().await.unwrap();
    let near_hit = get(&b.app, "/item/1").await;
    assert_eq!(near_hit.body, "item-1-v1");
    assert!(
        near_hit.cache_status().contains("hit") && near_hit.cache_status().contains("near"),
        "{}",
        near_hit.cache_status()
    );
    // (The tracking connection's once-a-second heartbeat is not the hit's.)
    let calls = round_trips(&redis).await;
    assert_eq!(
        calls.values().sum::<u64>(),
        0,
        "a near hit costs no round trip: {calls:?}"
    );

    let purged = a
        .layer
        .handle()
        .purge_url("http://shop.example/item/1")
        .await
        .unwrap();
    assert_eq!(purged.urls, 1);
    // Only the purge message can end B's copy: it would live an hour.
    // Waited for with a generous deadline, not timed, so that a loaded
    // machine cannot fail it; a lost message fails it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = get(&b.app, "/item/1").await;
        if !answer.cache_status().contains("near") {
            assert_eq!(answer.body, "item-1-v2");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still served its near copy 10 s after the purge on A"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the instance's near tier follows Redis client tracking.
async fn wait_tracking(instance: &Instance) {
    tower_redis_core::testing::wait_for_tracking(&instance.manager, Duration::from_secs(10)).await;
}

/// The fields of an answer but those that move with time (`Age`, and the
/// `ttl` and tier in `Cache-Status`), in order.
fn timeless_fields(answer: &Answer) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = answer
        .headers
        .iter()
        .filter(|(name, _)| *name != header::AGE)
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes());
            let value = if *name == "cache-status" {
                value
                    .split("; ")
                    .filter(|item| !item.starts_with("ttl=") && *item != "detail=near")
                    .collect::<Vec<_>>()
                    .join("; ")
            } else {
                value.into_owned()
            };
            (name.to_string(), value)
        })
        .collect();
    fields.sort();
    fields
}

/// A near hit is answered without a copy of the request's head or a
/// future to await (`service/mod.rs`); what it answers is what the same
/// entry read from Redis answers: conditionals, `HEAD` and ranges included.
#[tokio::test]
async fn a_near_hit_answers_as_the_same_entry_read_from_redis() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let near = instance(redis.config(), &origin, |b| {
        b.near_cache(8 << 20, Duration::from_secs(3600))
            .targeted_field("shop-cache-control")
    })
    .await;
    let plain = instance(redis.config(), &origin, |b| {
        b.targeted_field("shop-cache-control")
    })
    .await;
    wait_tracking(&near).await;
    let tracking = near.manager.tracking().unwrap();
    let path = "/etag/1";
    get_settled(&near, path).await;
    // The store's own invalidation is in; then read from Redis: kept near.
    tracking.sync().await.unwrap();
    get(&near.app, path).await;
    let cases: [(&str, &[(&str, &str)]); 7] = [
        ("GET", &[]),
        ("HEAD", &[]),
        ("GET", &[("if-none-match", "\"v1\"")]),
        ("GET", &[("if-none-match", "W/\"v0\", \"v9\"")]),
        ("GET", &[("range", "bytes=0-3")]),
        ("GET", &[("range", "bytes=2-"), ("if-range", "\"v1\"")]),
        ("HEAD", &[("if-none-match", "*")]),
    ];
    for (method, fields) in cases {
        let from_near = send(&near.app, method, path, fields).await;
        let from_redis = send(&plain.app, method, path, fields).await;
        let case = format!("{method} {fields:?}");
        assert!(
            from_near.cache_status().contains("hit") && from_near.cache_status().contains("near"),
            "{case}: {}",
            from_near.cache_status()
        );
        assert!(
            !from_redis.cache_status().contains("near"),
            "{case}: {}",
            from_redis.cache_status()
        );
        assert_eq!(from_near.status, from_redis.status, "{case}");
        assert_eq!(from_near.body, from_redis.body, "{case}");
        assert_eq!(
            timeless_fields(&from_near),
            timeless_fields(&from_redis),
            "{case}"
        );
    }
    assert_eq!(origin.calls(path), 1);
    // An entry the request does not take as it is (`no-cache`) goes to the
    // origin from the near tier as from Redis.
    let refused = send(&near.app, "GET", path, &[("cache-control", "no-cache")]).await;
    assert!(
        refused.cache_status().contains("fwd=request") && refused.cache_status().contains("near"),
        "{}",
        refused.cache_status()
    );
    assert_eq!(refused.body, "etag-1-v2");

    // The directives a near copy is served by are the layer's: its
    // targeted field makes this one fresh, where `Cache-Control` says
    // `no-cache`.
    let path = "/targeted/1";
    get_settled(&near, path).await;
    tracking.sync().await.unwrap();
    get(&near.app, path).await;
    let from_near = get(&near.app, path).await;
    let from_redis = get(&plain.app, path).await;
    assert!(
        from_near.cache_status().contains("hit") && from_near.cache_status().contains("near"),
        "{}",
        from_near.cache_status()
    );
    assert_eq!(from_near.body, from_redis.body);
    assert_eq!(timeless_fields(&from_near), timeless_fields(&from_redis));
    assert_eq!(origin.calls(path), 1);
}

/// A route's key function is given the request's head, near hits
/// included: two tenants never share a near copy.
#[tokio::test]
async fn a_near_hit_is_keyed_by_the_routes_key_function() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let tenant = |parts: &http::request::Parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let near = instance(redis.config(), &origin, |b| {
        b.near_cache(8 << 20, Duration::from_secs(3600))
            .route(Route::new("*").key_fn(tenant))
    })
    .await;
    wait_tracking(&near).await;
    let path = "/plain/1";
    let as_tenant = |name: &'static str| {
        let app = near.app.clone();
        async move { send(&app, "GET", path, &[("x-tenant", name)]).await }
    };
    // Stored, and the invalidation its write causes is in: the next read
    // is from Redis, and kept near.
    let settled = || async {
        near.layer.flush().await;
        near.manager.tracking().unwrap().sync().await.unwrap();
    };
    assert_eq!(as_tenant("a").await.body, "plain-1-v1");
    settled().await;
    assert_eq!(as_tenant("a").await.body, "plain-1-v1");
    let near_a = as_tenant("a").await;
    assert!(
        near_a.cache_status().contains("near"),
        "{}",
        near_a.cache_status()
    );
    assert_eq!(near_a.body, "plain-1-v1");
    let other = as_tenant("b").await;
    assert_eq!(other.body, "plain-1-v2", "{}", other.cache_status());
    settled().await;
    assert_eq!(as_tenant("b").await.body, "plain-1-v2");
    let near_b = as_tenant("b").await;
    assert!(
        near_b.cache_status().contains("near"),
        "{}",
        near_b.cache_status()
    );
    assert_eq!(near_b.body, "plain-1-v2");
    // A's copy went with B's store (the URL's copies go together): from
    // Redis, then near again.
    assert_eq!(as_tenant("a").await.body, "plain-1-v1");
    let near_a = as_tenant("a").await;
    assert!(
        near_a.cache_status().contains("near"),
        "{}",
        near_a.cache_status()
    );
    assert_eq!(near_a.body, "plain-1-v1");
    assert_eq!(origin.calls(path), 2);
}

#[tokio::test]
async fn a_near_copy_is_never_served_after_a_change_elsewhere_is_acknowledged_and_synced() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let near = |b: CacheLayerBuilder| b.near_cache(8 << 20, Duration::from_secs(3600));
    let a = instance(redis.config(), &origin, near).await;
    let b = instance(redis.config(), &origin, near).await;
    wait_tracking(&a).await;
    wait_tracking(&b).await;
    let tracking = b.manager.tracking().expect("tracking");
    for round in 1..=10 {
        let path = "/item/1";
        let version = format!("item-1-v{round}");
        assert_eq!(get_settled(&a, path).await.body, version);
        // B reads it from Redis (kept near), then from its near copy.
        assert_eq!(get(&b.app, path).await.body, version);
        let near_hit = get(&b.app, path).await;
        assert!(
            near_hit.cache_status().contains("near"),
            "round {round}: {}",
            near_hit.cache_status()
        );
        assert_eq!(near_hit.body, version);
        // A's purge is acknowledged; B syncs: its near copy is gone.
        assert_eq!(a.layer.handle().purge_url(path).await.unwrap().urls, 1);
        tracking.sync().await.unwrap();
        let after = get(&b.app, path).await;
        assert!(
            !after.cache_status().contains("near"),
            "round {round}: {}",
            after.cache_status()
        );
        assert_eq!(
            after.body,
            format!("item-1-v{}", round + 1),
            "round {round}"
        );
        b.layer.flush().await;
        // A's own near copy of the old version is gone too (its tracking).
        a.manager
            .tracking()
            .expect("tracking")
            .sync()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn flushall_and_a_killed_tracking_connection_empty_the_near_tier() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let near = |b: CacheLayerBuilder| b.near_cache(8 << 20, Duration::from_secs(3600));
    let a = instance(redis.config(), &origin, near).await;
    wait_tracking(&a).await;
    let tracking = a.manager.tracking().expect("tracking");
    get_settled(&a, "/item/1").await;
    get(&a.app, "/item/1").await;
    assert!(get(&a.app, "/item/1").await.cache_status().contains("near"));

    // FLUSHALL: Redis says "everything", the near copy goes.
    let mut conn = redis.connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    tracking.sync().await.unwrap();
    let after = get(&a.app, "/item/1").await;
    assert!(
        !after.cache_status().contains("near"),
        "{}",
        after.cache_status()
    );
    assert_eq!(after.body, "item-1-v2");
    a.layer.flush().await;

    // A killed tracking connection: the near copy goes with it.
    get(&a.app, "/item/1").await;
    assert!(get(&a.app, "/item/1").await.cache_status().contains("near"));
    kill_tracking(&redis, &a).await;
    let after = get(&a.app, "/item/1").await;
    assert!(
        !after.cache_status().contains("near"),
        "{}",
        after.cache_status()
    );
    assert_eq!(after.body, "item-1-v2");
}

/// Kills the tracking connections on `redis`, and waits until `instance`
/// has emptied what it kept through them and follows tracking again.
async fn kill_tracking(redis: &TestRedis, instance: &Instance) {
    let tracking = instance.manager.tracking().expect("tracking");
    let mut conn = redis.connection().await.unwrap();
    let flushes = tracking.flushes();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    for id in clients
        .lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.strip_prefix("flags=").is_some_and(|f| f.contains('t')))
        })
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
    {
        redis.kill_clients("ID", id).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracking.flushes() <= flushes {
        assert!(Instant::now() < deadline, "the near tier was never emptied");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Until tracking is back the near tier is not used; after, it was emptied.
    wait_tracking(instance).await;
}

/// An instance with a near cache that follows tracking, without
/// coalescing: a miss never takes the fill lock, whose write would end a
/// known-absent mark by itself (every 10 s, when the URL leads a fill
/// again), so only what a test does ends it.
async fn marking_instance(redis: &TestRedis, origin: &Origin) -> Instance {
    let near = |b: CacheLayerBuilder| {
        b.near_cache(8 << 20, Duration::from_secs(3600))
            .coalesce(None)
    };
    let instance = instance(redis.config(), origin, near).await;
    wait_tracking(&instance).await;
    instance
}

/// Any write to a URL's key ends its known absence, once this instance's
/// tracking connection has read Redis' invalidation (a write with no
/// announcement here: a raw `HSET`). An update announcement alone ends it
/// too, at once: a waiter it wakes must find the entry even before the
/// tracking connection has read the invalidation (another socket).
#[tokio::test]
async fn a_write_or_an_announcement_ends_a_known_absence() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = marking_instance(&redis, &origin).await;
    let known_absent = |answer: &Answer| answer.cache_status().contains("near");
    // (The first lookup starts the instance's subscription.)
    get_settled(&a, "/private").await;
    wait_for_subscribers(&redis, 1).await;
    // The second lookup's `HMGET` names the URL's key.
    let monitor = Monitor::start(&redis.client()).await.unwrap();
    assert!(!known_absent(&get(&a.app, "/private").await));
    let lines = monitor.stop_lines().await.unwrap();
    let entry_prefix = format!("{}:", a.manager.keys().key(&["c"]));
    let url_hash = lines
        .iter()
        .filter(|line| line.contains("\"HMGET\""))
        .find_map(|line| {
            let key = line.split('"').nth(3)?;
            key.strip_prefix(&entry_prefix).map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no HMGET of a key under {entry_prefix}: {lines:?}"));
    assert!(known_absent(&get(&a.app, "/private").await));
    // A write, announced to nobody: the tracking invalidation ends the
    // mark. (The hash holds no entry, so the lookup finds the URL absent
    // again, and marks it again.)
    let mut conn = redis.connection().await.unwrap();
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{entry_prefix}{url_hash}"))
        .arg("unrelated")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    a.manager.tracking().unwrap().sync().await.unwrap();
    redis.reset_stats().await.unwrap();
    assert!(!known_absent(&get(&a.app, "/private").await));
    assert_eq!(
        round_trips(&redis).await,
        [("hmget".to_owned(), 1)].into_iter().collect()
    );
    assert!(known_absent(&get(&a.app, "/private").await));
    // An announcement alone, with nothing written in Redis: no tracking
    // invalidation comes, only the message.
    let channel = a.manager.keys().key(&["cache-events"]);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(format!("u {url_hash}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while known_absent(&get(&a.app, "/private").await) {
        assert!(
            Instant::now() < deadline,
            "the URL was still known absent 10 s after its announcement"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The Redis commands run since the last `reset_stats`, but the reset and
/// the tracking connection's heartbeat.
async fn round_trips(redis: &TestRedis) -> std::collections::HashMap<String, u64> {
    let mut calls = redis.command_calls().await.unwrap();
    calls.remove("config|resetstat");
    calls.remove("ping");
    calls.retain(|_, count| *count > 0);
    calls
}

/// A page that is never stored (a private one) costs no round trip once
/// its instance knows it is absent from Redis: its lookup was read on the
/// tracking connection, so Redis tells the instance when any instance
/// writes it. Such a write ends the mark (the next lookup finds the entry
/// another instance stored), and so does a lost tracking connection.
#[tokio::test]
async fn a_page_never_stored_costs_no_round_trip_with_the_near_cache() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = marking_instance(&redis, &origin).await;
    let tracking = a.manager.tracking().expect("tracking");
    let known_absent = |answer: &Answer| {
        let status = answer.cache_status();
        assert_eq!(answer.body, "for one user", "{status}");
        status.contains("fwd=uri-miss") && status.contains("near")
    };
    // The first lookup finds the URL absent and the answer is private: the
    // URL is hinted absent (its next lookup is a plain `HMGET`); the second
    // reads it so on the tracking connection, finds it absent again, and
    // marks it known absent.
    for _ in 0..2 {
        assert!(!known_absent(&get_settled(&a, "/private").await));
    }
    redis.reset_stats().await.unwrap();
    for _ in 0..3 {
        assert!(known_absent(&get(&a.app, "/private").await));
    }
    let calls = round_trips(&redis).await;
    assert!(
        calls.is_empty(),
        "a known-absent URL costs no round trip: {calls:?}"
    );
    assert_eq!(origin.calls("/private"), 5);

    // A lost tracking connection ends the mark: the next lookup reads Redis
    // (and marks the URL again).
    kill_tracking(&redis, &a).await;
    redis.reset_stats().await.unwrap();
    assert!(!known_absent(&get(&a.app, "/private").await));
    assert_eq!(
        round_trips(&redis).await,
        [("hmget".to_owned(), 1)].into_iter().collect()
    );
    assert!(known_absent(&get(&a.app, "/private").await));

    // Instance B, on the same Redis, stores the URL (its origin answers it
    // publicly). Once A's tracking connection has read what Redis sent
    // before B's write was acknowledged, A finds B's entry.
    let b_manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let b_layer = CacheLayer::builder(b_manager).build().unwrap();
    let b_app = Router::new()
        .route(
            "/private",
            routing::get(|| async {
                Response::builder()
                    .header("cache-control", "max-age=60")
                    .body(Body::from("everyone's"))
                    .unwrap()
            }),
        )
        .layer(b_layer.clone());
    assert_eq!(get(&b_app, "/private").await.body, "everyone's");
    b_layer.flush().await;
    tracking.sync().await.unwrap();
    let found = get(&a.app, "/private").await;
    assert_eq!(found.body, "everyone's", "{}", found.cache_status());
    assert!(
        found.cache_status().contains("hit"),
        "{}",
        found.cache_status()
    );
    assert_eq!(origin.calls("/private"), 7);
}

#[tokio::test]
async fn the_near_cache_is_not_trusted_across_a_lost_pubsub_connection() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let near = |b: CacheLayerBuilder| b.near_cache(8 << 20, Duration::from_secs(60));
    let a = instance(redis.config(), &origin, near).await;
    get_settled(&a, "/item/1").await;
    wait_for_subscribers(&redis, 1).await;
    get(&a.app, "/item/1").await;
    assert!(get(&a.app, "/item/1").await.cache_status().contains("near"));
    // Change the entry behind the near cache's back, and cut its messages.
    let mut conn = redis.connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    redis.kill_clients("TYPE", "pubsub").await.unwrap();
    wait_for_subscribers(&redis, 1).await;
    let after = get(&a.app, "/item/1").await;
    assert!(
        !after.cache_status().contains("near"),
        "{}",
        after.cache_status()
    );
    assert_eq!(after.body, "item-1-v2");
}

#[tokio::test]
async fn tags_and_purges_work_on_a_redis_cluster() {
    let cluster = TestCluster::start().await;
    let origin = Origin::default();
    let a = instance(cluster.config(), &origin, |b| b).await;
    let b = instance(cluster.config(), &origin, |b| b).await;
    let paths: Vec<String> = (0..12).map(|i| format!("/item/{i}")).collect();
    for path in &paths {
        get_settled(&a, path).await;
    }
    for path in &paths {
        assert!(get(&b.app, path).await.cache_status().contains("hit"));
    }
    assert_eq!(a.layer.handle().purge_tag("item-3").await.urls, 1);
    assert!(get(&b.app, "/item/3").await.cache_status().contains("fwd="));
    b.layer.flush().await;
    assert_eq!(b.layer.handle().soft_purge_tag("items").await.urls, 12);
    let stale = get(&a.app, "/item/5").await;
    assert!(stale.cache_status().contains("stale-while-revalidate"));
    a.layer.flush().await;
    assert_eq!(
        a.layer.handle().purge_prefix("/item/").await.unwrap().urls,
        12
    );
    for path in &paths {
        assert!(get(&b.app, path).await.cache_status().contains("fwd="));
    }
    // Coalescing across instances on the cluster too.
    origin.delay_ms.store(100, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let app = if i % 2 == 0 {
            a.app.clone()
        } else {
            b.app.clone()
        };
        tasks.push(tokio::spawn(async move { get(&app, "/item/100").await }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().body, "item-100-v1");
    }
    assert_eq!(origin.calls("/item/100"), 1);
}

#[tokio::test]
async fn a_purge_while_redis_hangs_is_deferred_and_replayed_when_it_answers() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config().failure_threshold(1), &origin, |b| b).await;
    get_settled(&a, "/item/1").await;
    get_settled(&a, "/item/2").await;
    redis.pause().await;
    let purged = a.layer.handle().purge_tag("item-1").await;
    assert!(purged.deferred, "{purged:?}");
    redis.resume().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = get(&a.app, "/item/2").await;
        if !answer.cache_status().contains("redis-unavailable") {
            break;
        }
        assert!(Instant::now() < deadline, "Redis never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = get(&a.app, "/item/1").await;
    assert_eq!(after.body, "item-1-v2", "{}", after.cache_status());
    assert!(get(&a.app, "/item/2").await.cache_status().contains("hit"));
}

/// A revalidation waiting for another instance's (its lock held), that
/// finds Redis hung when it looks again, asks the origin itself after that
/// one timeout: it does not ask Redis for the lock again, which would make
/// it wait a second command timeout.
#[tokio::test]
async fn a_revalidation_waiting_for_another_instance_s_stops_asking_redis_once_it_hangs() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    const ORIGIN: Duration = Duration::from_secs(2);
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let config = || {
        redis
            .config()
            .command_timeout(TIMEOUT)
            .failure_threshold(50)
    };
    let a = instance(config(), &origin, |b| b).await;
    let b = instance(config(), &origin, |b| b).await;
    // Stored (and Redis knows the lock script: the miss took a lock).
    get_settled(&a, "/item/2").await;
    origin
        .delay_ms
        .store(ORIGIN.as_millis() as u64, Ordering::SeqCst);
    // B revalidates `/item/2` for a `no-cache` request, holding the URL's
    // lock while the origin answers.
    let no_cache = [("cache-control", "no-cache")];
    let revalidating = tokio::spawn({
        let app = b.app.clone();
        async move { call(&app, request("/item/2", &no_cache)).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.calls("/item/2") < 2 {
        assert!(Instant::now() < deadline, "B never reached the origin");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A finds the lock held, and waits for B's answer, looking again now
    // and then (every 250 ms at most).
    let waiting = tokio::spawn({
        let app = a.app.clone();
        async move { call(&app, request("/item/2", &no_cache)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.pause().await;
    let paused = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("A answered")
        .expect("task");
    let waited = paused.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.cache_status());
    assert_eq!(origin.calls("/item/2"), 3, "A asked the origin itself");
    // One timeout (of the look or the lock attempt under way, or of the
    // next, within 250 ms), then the origin; not a second timeout.
    assert!(
        waited < TIMEOUT + ORIGIN + Duration::from_secs(1),
        "A waited {waited:?} after Redis hung ({})",
        answer.cache_status()
    );
    redis.resume().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), revalidating).await;
}

/// A fill-lock attempt that timed out while Redis hung runs when Redis
/// wakes, taking the URL's lock for a request that gave up long before.
/// Its release is queued and written as soon as Redis answers again (with
/// the announcement that wakes the waiters), so the first requests for the
/// URL afterwards, here on another instance, do not wait out the lock's
/// 5 s TTL for a fill that never comes.
#[tokio::test]
async fn a_fill_lock_taken_by_an_attempt_that_timed_out_is_released_when_redis_answers() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    // The default lock TTL and coalescing wait (5 s each), and a breaker
    // that stays closed through the lock's timeout. The answer is private:
    // nothing stored releases the lock.
    let a = instance(redis.config().failure_threshold(3), &origin, |b| b).await;
    let b = instance(redis.config(), &origin, |b| b).await;
    // Redis knows the lock script (a miss took a lock), and A knows that
    // `/private` is not stored, so its lookup is a plain `HMGET`: it saw a
    // request with credentials (which leads no fill, so that the URL is
    // not marked as one that nothing is stored for, which coalesces no
    // request and takes no lock).
    get_settled(&a, "/item/1").await;
    let with_credentials = request("/private", &[("authorization", "Bearer x")]);
    assert_eq!(call(&a.app, with_credentials).await.status, 200);
    // Redis hangs on writes only: A's lookup is answered, and its lock
    // attempt (a script) is sent and times out. (After a lookup that timed
    // out, no lock is asked for.)
    redis.pause_writes().await;
    let answer = get(&a.app, "/private").await;
    assert_eq!(answer.status, 200);
    assert_eq!(origin.calls("/private"), 2);
    redis.resume_writes().await;

    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), get(&b.app, "/private"))
        .await
        .expect("B answered");
    let waited = started.elapsed();
    assert_eq!(answer.status, 200);
    assert!(
        waited < Duration::from_secs(3),
        "B waited {waited:?} for a lock nobody would release ({})",
        answer.cache_status()
    );
    assert_eq!(origin.calls("/private"), 3);
}

#[tokio::test]
async fn the_admin_router_checks_authorisation_and_runs_the_operations() {
    use tower_redis_cache::admin::CacheAdmin;
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = instance(redis.config(), &origin, |b| b).await;
    let admin = CacheAdmin::new(a.layer.handle(), |headers: &HeaderMap| {
        headers
            .get("authorization")
            .is_some_and(|v| v == "Bearer token")
    })
    .warm_through(a.app.clone())
    .into_router();
    let app = a.app.clone().nest("/admin", admin);
    let call = |method: &'static str, path: &'static str, auth: bool, body: &'static str| {
        let app = app.clone();
        async move {
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, "shop.example");
            if auth {
                request = request.header("authorization", "Bearer token");
            }
            let response = app
                .oneshot(request.body(Body::from(body)).unwrap())
                .await
                .unwrap();
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    assert_eq!(call("POST", "/admin/purge/all", false, "").await.0, 401);
    let (status, report) = call(
        "POST",
        "/admin/warm",
        true,
        r#"["http://shop.example/item/1","http://shop.example/item/2"]"#,
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert!(report.contains("stored"), "{report}");
    let (status, entry) = call(
        "GET",
        "/admin/entry?url=http://shop.example/item/1",
        true,
        "",
    )
    .await;
    assert_eq!(status, 200, "{entry}");
    assert!(entry.contains("\"item-1\""), "{entry}");
    let (status, purged) = call("POST", "/admin/purge/tag/item-1", true, "").await;
    assert_eq!(
        (status, purged.as_str()),
        (200, r#"{"deferred":false,"urls":1}"#)
    );
    let (status, _) = call(
        "GET",
        "/admin/entry?url=http://shop.example/item/1",
        true,
        "",
    )
    .await;
    assert_eq!(status, 404);
    let (status, problem) = call("POST", "/admin/purge/prefix?prefix=item", true, "").await;
    assert_eq!(status, 400);
    assert!(problem.contains("starting with"), "{problem}");
    let (status, stats) = call("GET", "/admin/stats", true, "").await;
    assert_eq!(status, 200);
    assert!(stats.contains("\"entries\":1"), "{stats}");
    let (status, _) = call("POST", "/admin/warm", true, "not json").await;
    assert_eq!(status, 400);
    // A path or method the router does not have: the same check, then an
    // answer that names the routes.
    assert_eq!(call("POST", "/admin/purge/tag", false, "").await.0, 401);
    let (status, problem) = call("POST", "/admin/purge/tag?tag=item-1", true, "").await;
    assert_eq!(status, 404, "{problem}");
    assert!(problem.contains("POST /purge/tag/{tag}"), "{problem}");
    assert_eq!(call("GET", "/admin/purge/all", false, "").await.0, 401);
    let (status, problem) = call("GET", "/admin/purge/all", true, "").await;
    assert_eq!(status, 405, "{problem}");
    assert!(problem.contains("POST /purge/all"), "{problem}");
}

/// A purge of a URL on the instance that holds a near copy, while four
/// readers keep missing and refilling it: once `purge_url` has returned,
/// that instance never answers the purged version again. Guards three
/// defences: the fill that asked the origin before the purge does not
/// store after it (`put.lua` finds the tombstone and not its lock), later
/// requests do not follow its in-process flight (`Flights::detach_all`),
/// and a near copy that a reader refilled from what it read before the
/// purge is dropped before the purge returns (`CacheStore::purge`; a
/// reader keeping its copy as the purge runs is waited for,
/// `Bus::bump_epoch`). The same holds for a purge by path and by tag,
/// which cannot find near copies by URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_returns_only_once_the_purging_instance_cannot_serve_the_old_copy() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let near = |b: CacheLayerBuilder| b.near_cache(8 << 20, Duration::from_secs(3600));
    let a = Arc::new(instance(redis.config(), &origin, near).await);
    wait_tracking(&a).await;
    let version = |body: &str| -> u64 { body.rsplit('v').next().unwrap().parse().unwrap() };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let a = Arc::clone(&a);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    get(&a.app, "/item/1").await;
                    // A near hit never yields: let the connection drivers run.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for round in 0..200 {
        let before = version(&get(&a.app, "/item/1").await.body);
        a.layer
            .handle()
            .purge_url("http://shop.example/item/1")
            .await
            .unwrap();
        let after = get(&a.app, "/item/1").await;
        assert!(
            version(&after.body) > before,
            "round {round}: v{before} was purged, then served again ({})",
            after.cache_status()
        );
    }
    for round in 0..100 {
        let before = version(&get(&a.app, "/item/1").await.body);
        let handle = a.layer.handle();
        let (how, purged) = if round % 2 == 0 {
            ("by path", handle.purge_url("/item/1").await.unwrap())
        } else {
            ("by tag", handle.purge_tag("item-1").await)
        };
        assert!(!purged.deferred, "round {round} ({how})");
        let after = get(&a.app, "/item/1").await;
        assert!(
            version(&after.body) > before,
            "round {round}: v{before} was purged {how}, then served again ({})",
            after.cache_status()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
}

/// A purge by path or by tag on the instance that holds a near copy of
/// the page: the copy is gone when the purge returns, though near copies
/// carry neither their URL nor their tags, and though Redis' invalidation
/// reaches this instance 50 ms after the purge (its tracking connection
/// is slow). The same for a purge by prefix and a soft purge by tag. The
/// near copy of another page stays.
#[tokio::test]
async fn a_purge_by_path_or_tag_drops_the_purging_instance_s_near_copy() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let slow = redis.slow_tracking_config(Duration::from_millis(50)).await;
    let near = |b: CacheLayerBuilder| b.near_cache(8 << 20, Duration::from_secs(3600));
    let a = instance(slow, &origin, near).await;
    wait_tracking(&a).await;
    let version = |body: &str| -> u64 { body.rsplit('v').next().unwrap().parse().unwrap() };
    let near_hit = |path: &'static str| {
        let a = &a;
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let answer = get(&a.app, path).await;
                    if answer.cache_status().contains("detail=near") {
                        return answer;
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("a near hit within 10 s")
        }
    };
    get_settled(&a, "/item/2").await;
    let other = near_hit("/item/2").await;
    for how in ["path", "tag", "prefix", "soft tag"] {
        get_settled(&a, "/item/1").await;
        // Read from Redis, then from the near copy that read kept.
        let kept = near_hit("/item/1").await;
        let handle = a.layer.handle();
        let purged = match how {
            "path" => handle.purge_url("/item/1").await.unwrap(),
            "tag" => handle.purge_tag("item-1").await,
            "prefix" => handle.purge_prefix("/item/1").await.unwrap(),
            _ => handle.soft_purge_tag("item-1").await,
        };
        assert_eq!(purged.urls, 1, "purged by {how}");
        let after = get(&a.app, "/item/1").await;
        if how == "soft tag" {
            // Marked stale in Redis, and served stale from there while it
            // is refreshed (the page allows it): not from the near copy.
            assert!(
                !after.cache_status().contains("detail=near"),
                "{} was soft-purged by tag, then served from the near copy ({})",
                kept.body,
                after.cache_status()
            );
        } else {
            assert!(
                version(&after.body) > version(&kept.body),
                "{} was purged by {how}, then served again ({})",
                kept.body,
                after.cache_status()
            );
        }
        // The copies of pages the purge did not name stay.
        let unpurged = get(&a.app, "/item/2").await;
        assert_eq!(
            (
                unpurged.body.as_str(),
                unpurged.cache_status().contains("detail=near")
            ),
            (other.body.as_str(), true),
            "/item/2 after a purge of /item/1 by {how} ({})",
            unpurged.cache_status()
        );
    }
}

/// A lookup that Redis answered before this instance stored a new
/// version of the page, and whose answer arrives after the store was
/// acknowledged, keeps no near copy of the old version: the next request
/// on this instance is served the new one. (Redis reports the store on the
/// tracking connection, but that word comes after the lookup's answer;
/// here the tracking connection's network is 50 ms slow.)
#[tokio::test]
async fn a_lookup_answered_before_this_instance_stored_keeps_no_copy_of_the_old_page() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    // Every tracked command answers 50 ms late: a command timeout well
    // above that, so that a busy machine does not open the breaker.
    let slow = redis
        .slow_tracking_config(Duration::from_millis(50))
        .await
        .command_timeout(Duration::from_secs(2));
    let near = |b: CacheLayerBuilder| b.near_cache(8 << 20, Duration::from_secs(3600));
    let a = Arc::new(instance(slow, &origin, near).await);
    wait_tracking(&a).await;
    let version = |body: &str| -> u64 { body.rsplit('v').next().unwrap().parse().unwrap() };
    // Rounds where the second lookup did read the old version from Redis
    // (on a busy machine it may be sent only after the store, and read the
    // new one, or late enough to find the revalidation's near copy).
    let mut raced = 0;
    for round in 1..=20 {
        if raced == 3 {
            break;
        }
        // A page of its own per round: no near copy of it from before.
        let path: &'static str = format!("/item/{}", 100 + round).leak();
        get_settled(&a, path).await;
        let tracking = a.manager.tracking().expect("tracking");
        tracking.sync().await.unwrap();
        // The revalidation's lookup answers 50 ms late; its new version is
        // stored at once after that.
        let revalidating = tokio::spawn({
            let a = Arc::clone(&a);
            async move { call(&a.app, request(path, &[("cache-control", "no-cache")])).await }
        });
        tokio::time::sleep(Duration::from_millis(25)).await;
        // Answered by Redis now, before the store; here 25 ms after it.
        let reading = tokio::spawn({
            let a = Arc::clone(&a);
            async move { get(&a.app, path).await }
        });
        let stored = version(&revalidating.await.unwrap().body);
        a.layer.flush().await;
        let read = reading.await.unwrap();
        raced +=
            u32::from(version(&read.body) < stored && !read.cache_status().contains("detail=near"));
        let after = get(&a.app, path).await;
        assert_eq!(
            version(&after.body),
            stored,
            "round {round}: served after this instance stored v{stored} ({})",
            after.cache_status()
        );
    }
    assert_eq!(raced, 3, "lookups answered before the store, in 20 rounds");
}

/// A fill that asked the origin before a purge of its URL does not store
/// its answer after the purge, whether the URL is purged once or twice:
/// the next request goes to the origin instead of finding the purged
/// version back in the cache.
#[tokio::test]
async fn a_fill_that_began_before_a_purge_does_not_store_after_it() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = Arc::new(instance(redis.config(), &origin, |b| b).await);
    let cases = [
        ("/item/1", &["http://shop.example/item/1"][..]),
        (
            "/item/2",
            &["http://shop.example/item/2", "http://shop.example/item/2"][..],
        ),
    ];
    for (path, purges) in cases {
        origin.delay_ms.store(300, Ordering::SeqCst);
        let first = tokio::spawn({
            let a = Arc::clone(&a);
            async move { get(&a.app, path).await }
        });
        origin.wait_for_calls(path, 1).await;
        for purge in purges {
            a.layer.handle().purge_url(purge).await.unwrap();
        }
        let id = &path[6..];
        assert_eq!(first.await.unwrap().body, format!("item-{id}-v1"));
        a.layer.flush().await;
        origin.delay_ms.store(0, Ordering::SeqCst);
        let next = get(&a.app, path).await;
        assert_eq!(
            next.body,
            format!("item-{id}-v2"),
            "{purges:?}: {}",
            next.cache_status()
        );
    }
}

/// A fill that asked the origin longer ago than a purge's tombstone lives
/// (twelve fill lock lifetimes, at least 2 s) is not stored: a purge made
/// early in its question may have left a tombstone that is gone when its
/// answer comes. Here the lock lives 100 ms (so the tombstone 2 s), the
/// origin answers after 3 s, and the URL is purged while it works.
#[tokio::test]
async fn a_fill_slower_than_a_tombstone_lives_does_not_store_what_a_purge_removed() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let snapshotter = recorder.snapshotter();
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = Arc::new(
        instance(redis.config(), &origin, |b| {
            b.lock_ttl(Duration::from_millis(100))
        })
        .await,
    );
    let first = purged_while_its_first_fill_asks(&a, &origin, 3_000).await;
    assert_eq!(first.await.unwrap().body, "item-1-v1");
    a.layer.flush().await;
    // Counted as too slow to be checked against purges (not as purged:
    // the tombstone was gone when it came).
    assert_eq!(
        support::dropped_fills(snapshotter.snapshot()),
        [("page".to_owned(), "too_slow".to_owned(), 1)]
    );
    origin.delay_ms.store(0, Ordering::SeqCst);
    let next = get(&a.app, "/item/1").await;
    assert_eq!(next.body, "item-1-v2", "{}", next.cache_status());
    // A fill as fast as usual with the same lock is stored.
    assert_eq!(get(&a.app, "/item/1").await.body, "item-1-v2");
    a.layer.flush().await;
    assert_eq!(support::dropped_fills(snapshotter.snapshot()), []);
}

/// A fill whose origin outlives its fill lock is not stored where the
/// URL holds a purge mark, even one older than its question (it cannot
/// tell a purge's removal of its lock from the lock's expiry), and is
/// counted as `lock_lost`, not as purged: the cure is a longer
/// `lock_ttl`. Here the URL was soft-purged a while before a background
/// refresh that takes 1.5 s under a 300 ms lock (a tombstone would live
/// 3.6 s), which another instance takes over once it has expired.
#[tokio::test]
async fn a_fill_that_outlives_its_lock_after_an_older_purge_is_counted_as_lock_lost() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let snapshotter = recorder.snapshotter();
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let short_lock = |b: CacheLayerBuilder| b.lock_ttl(Duration::from_millis(300));
    let a = instance(redis.config(), &origin, short_lock).await;
    let b = instance(redis.config(), &origin, short_lock).await;
    get_settled(&a, "/item/1").await;
    let purged = a.layer.handle().soft_purge_url("/item/1").await.unwrap();
    assert_eq!(purged.urls, 1);
    // Older than the question by more than the second's margin a fill
    // adds to its age.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    origin.delay_ms.store(1_500, Ordering::SeqCst);
    // Served stale while a background refresh asks the origin; once its
    // lock has expired, `b` takes it over for a refresh of its own.
    let stale = get(&a.app, "/item/1").await;
    assert_eq!(stale.body, "item-1-v1", "{}", stale.cache_status());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stale = get(&b.app, "/item/1").await;
    assert_eq!(stale.body, "item-1-v1", "{}", stale.cache_status());
    a.layer.flush().await;
    b.layer.flush().await;
    assert_eq!(origin.calls("/item/1"), 3);
    assert_eq!(
        support::dropped_fills(snapshotter.snapshot()),
        [("page".to_owned(), "lock_lost".to_owned(), 1)]
    );
}

/// `/item/1` purged while its first fill, whose origin call takes
/// `delay_ms`, is under way; the fill's request, to await.
async fn purged_while_its_first_fill_asks(
    a: &Arc<Instance>,
    origin: &Origin,
    delay_ms: u64,
) -> tokio::task::JoinHandle<Answer> {
    origin.delay_ms.store(delay_ms, Ordering::SeqCst);
    let first = tokio::spawn({
        let a = Arc::clone(a);
        async move { get(&a.app, "/item/1").await }
    });
    origin.wait_for_calls("/item/1", 1).await;
    a.layer
        .handle()
        .purge_url("http://shop.example/item/1")
        .await
        .unwrap();
    first
}

/// As above, for every way a purge selects a URL and for fills with and
/// without the fill lock: a fill that asked the origin before a purge
/// does not store its answer after it, whether it holds the fill lock or
/// goes without (coalescing off), whatever the purge selects the URL by, and whether the URL had an
/// entry (the fill revalidates it) or nothing yet (a purge of that one URL
/// leaves a tombstone all the same). A soft purge alike: the answer would
/// be stored as newer than the mark, fresh. Each purge comes while the
/// fill's origin call is under way; the next request must then go to the
/// origin (for a soft purge, to refresh the stale entry).
#[tokio::test]
async fn a_fill_with_or_without_its_lock_that_began_before_any_purge_does_not_store_after_it() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let locked = Arc::new(instance(redis.config(), &origin, |b| b).await);
    let lockless = Arc::new(instance(redis.config(), &origin, |b| b.coalesce(None)).await);
    let cases = [
        (&locked, "tag", true),
        (&locked, "prefix", true),
        (&locked, "soft tag", true),
        (&lockless, "tag", true),
        (&lockless, "url", true),
        (&lockless, "soft tag", true),
        (&lockless, "url", false),
        // Nothing stored yet: a tag purge finds no URL in its index, and
        // leaves a mark there that the fill finds when it records its URL.
        (&locked, "tag", false),
        (&locked, "soft tag", false),
        (&lockless, "tag", false),
    ];
    for (n, (a, how, stored)) in cases.into_iter().enumerate() {
        let id = n + 1;
        let path = format!("/item/{id}");
        let case = format!(
            "{how} purge, {} lock, entry stored: {stored}",
            if Arc::ptr_eq(a, &locked) {
                "with a"
            } else {
                "without a"
            }
        );
        if stored {
            assert_eq!(get_settled(a, &path).await.body, format!("item-{id}-v1"));
        }
        let asked = origin.calls(&path);
        origin.delay_ms.store(300, Ordering::SeqCst);
        let filling = tokio::spawn({
            let a = Arc::clone(a);
            let path = path.clone();
            let headers: &[(&str, &str)] = if stored {
                &[("cache-control", "no-cache")]
            } else {
                &[]
            };
            async move { call(&a.app, request(&path, headers)).await }
        });
        origin.wait_for_calls(&path, asked + 1).await;
        let handle = a.layer.handle();
        match how {
            "tag" => {
                handle.purge_tag(&format!("item-{id}")).await;
            }
            "prefix" => {
                handle.purge_prefix(&path).await.unwrap();
            }
            "soft tag" => {
                handle.soft_purge_tag(&format!("item-{id}")).await;
            }
            _ => {
                handle
                    .purge_url(&format!("http://shop.example{path}"))
                    .await
                    .unwrap();
            }
        }
        let filled = filling.await.unwrap();
        assert_eq!(filled.body, format!("item-{id}-v{}", asked + 1), "{case}");
        a.layer.flush().await;
        origin.delay_ms.store(0, Ordering::SeqCst);
        let next = get_settled(a, &path).await;
        assert_eq!(
            origin.calls(&path),
            asked + 2,
            "{case}: {} was asked before the purge, then served after it as {} ({})",
            filled.body,
            next.body,
            next.cache_status()
        );
    }
    // The margin's other side: a fill without the lock that asks the
    // origin more than a second after a purge of its URL is stored.
    let path = "/item/20";
    get_settled(&lockless, path).await;
    lockless
        .layer
        .handle()
        .purge_url(&format!("http://shop.example{path}"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(get_settled(&lockless, path).await.body, "item-20-v2");
    let next = get(&lockless.app, path).await;
    assert_eq!(
        (next.body.as_str(), origin.calls(path)),
        ("item-20-v2", 2),
        "{}",
        next.cache_status()
    );
}

/// A path purge (`purge_url("/item/1")`) while a request's revalidation
/// of the stored entry is under way: the revalidation's answer, asked for
/// before the purge, is not stored after it.
#[tokio::test]
async fn a_revalidation_that_began_before_a_path_purge_does_not_store_after_it() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = Arc::new(instance(redis.config(), &origin, |b| b).await);
    assert_eq!(get_settled(&a, "/item/1").await.body, "item-1-v1");
    origin.delay_ms.store(300, Ordering::SeqCst);
    let revalidating = tokio::spawn({
        let a = Arc::clone(&a);
        async move { call(&a.app, request("/item/1", &[("cache-control", "no-cache")])).await }
    });
    origin.wait_for_calls("/item/1", 2).await;
    let purged = a.layer.handle().purge_url("/item/1").await.unwrap();
    assert_eq!(purged.urls, 1);
    assert_eq!(revalidating.await.unwrap().body, "item-1-v2");
    a.layer.flush().await;
    origin.delay_ms.store(0, Ordering::SeqCst);
    let next = get(&a.app, "/item/1").await;
    assert_eq!(next.body, "item-1-v3", "{}", next.cache_status());
}

/// A request that comes after a purge never follows a flight that asked
/// the origin before it: it goes to the origin on its own.
#[tokio::test]
async fn a_request_after_a_purge_does_not_follow_a_flight_from_before_it() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = Arc::new(instance(redis.config(), &origin, |b| b).await);
    let first = purged_while_its_first_fill_asks(&a, &origin, 300).await;
    let after = get(&a.app, "/item/1").await;
    assert_eq!(after.body, "item-1-v2", "{}", after.cache_status());
    assert_eq!(first.await.unwrap().body, "item-1-v1");
    // The flight from before the purge was not stored, and is counted so.
    a.layer.flush().await;
    assert_eq!(
        support::dropped_fills(recorder.snapshotter().snapshot()),
        [("page".to_owned(), "purged".to_owned(), 1)]
    );
}

/// An invalidation (a `PUT` to the URL) detaches the flights of that URL
/// whatever their key: a request keyed by a header (`key_header`) that
/// comes after the `PUT` goes to the origin instead of following the fill
/// that asked before it.
#[tokio::test]
async fn a_request_after_an_invalidation_does_not_follow_a_flight_from_before_it() {
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let a = Arc::new(
        instance(redis.config(), &origin, |b| {
            b.route(Route::new("*").key_header("x-tenant"))
        })
        .await,
    );
    let tenant = [("x-tenant", "t1")];
    origin.delay_ms.store(300, Ordering::SeqCst);
    let first = tokio::spawn({
        let a = Arc::clone(&a);
        async move { call(&a.app, request("/item/1", &tenant)).await }
    });
    origin.wait_for_calls("/item/1", 1).await;
    let put = call(&a.app, support::request_with("PUT", "/item/1", &[])).await;
    assert_eq!(put.status, StatusCode::OK);
    let after = call(&a.app, request("/item/1", &tenant)).await;
    assert_eq!(after.body, "item-1-v2", "{}", after.cache_status());
    assert_eq!(first.await.unwrap().body, "item-1-v1");
}

/// While Redis hangs and the breaker has not opened yet, no request waits
/// for Redis longer than one command timeout:
/// - a miss whose lookup timed out goes to the origin without asking for
///   the fill lock;
/// - a lookup after the outage's first change (here the tag purge) was
///   queued waits for the queue's write at most one command timeout, and
///   is then not sent to Redis: the in-process store answers.
#[tokio::test]
async fn while_redis_hangs_a_request_waits_for_it_at_most_one_command_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    // A breaker that stays closed: each call sent is one more wait.
    let config = redis
        .config()
        .command_timeout(TIMEOUT)
        .failure_threshold(50);
    let a = instance(config, &origin, |b| b).await;
    get_settled(&a, "/item/1").await;
    redis.pause().await;
    let timed = async |path: &str| {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(30), get(&a.app, path))
            .await
            .expect("answered");
        (answer, started.elapsed())
    };
    let (miss, waited) = timed("/item/2").await;
    assert_eq!(miss.body, "item-2-v1", "{}", miss.cache_status());
    assert!(
        waited < TIMEOUT * 3 / 2,
        "a miss waited {waited:?} ({})",
        miss.cache_status()
    );
    // The purge's mark in its index times out; its pages are not asked
    // for (a second timeout): it is deferred.
    let started = Instant::now();
    let purged = a.layer.handle().purge_tag("item-1").await;
    let waited = started.elapsed();
    assert!(purged.deferred, "{purged:?}");
    assert!(waited < TIMEOUT * 3 / 2, "the purge waited {waited:?}");
    for (path, body) in [("/item/3", "item-3-v1"), ("/item/1", "item-1-v2")] {
        let (answer, waited) = timed(path).await;
        assert_eq!(answer.body, body, "{path}: {}", answer.cache_status());
        assert!(
            waited < TIMEOUT * 3 / 2,
            "{path} waited {waited:?} ({})",
            answer.cache_status()
        );
    }
    // Two requests at once for a URL whose answer is not stored (each
    // answer takes the origin 200 ms): one leads, and the other, which
    // cannot use the leader's answer, goes to the origin after it, without
    // looking in Redis again.
    origin.delay_ms.store(200, Ordering::SeqCst);
    let (first, second) = tokio::join!(timed("/private"), timed("/private"));
    for (answer, waited) in [first, second] {
        assert_eq!(answer.status, 200);
        assert!(
            waited < TIMEOUT + Duration::from_millis(700),
            "/private waited {waited:?} ({})",
            answer.cache_status()
        );
    }
    assert_eq!(origin.calls("/private"), 2);
    redis.resume().await;
}

/// A request waiting for another instance's fill (its lock held), that
/// finds Redis hung when it looks again, goes to the origin after that one
/// timeout: it does not ask Redis for the lock again, which would make it
/// wait a second command timeout.
#[tokio::test]
async fn a_request_waiting_for_another_instance_s_fill_stops_asking_redis_once_it_hangs() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    const ORIGIN: Duration = Duration::from_secs(2);
    let redis = TestRedis::start().await;
    let origin = Origin::default();
    let config = || {
        redis
            .config()
            .command_timeout(TIMEOUT)
            .failure_threshold(50)
    };
    let a = instance(config(), &origin, |b| b).await;
    let b = instance(config(), &origin, |b| b).await;
    // Redis knows the lock script (a miss took a lock).
    get_settled(&a, "/item/1").await;
    origin
        .delay_ms
        .store(ORIGIN.as_millis() as u64, Ordering::SeqCst);
    // B leads the fill of `/item/2`, holding its lock while the origin
    // answers.
    let filling = tokio::spawn({
        let app = b.app.clone();
        async move { get(&app, "/item/2").await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.calls("/item/2") == 0 {
        assert!(Instant::now() < deadline, "B never reached the origin");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A finds the lock held, and waits for B's entry, looking again now
    // and then (every 250 ms at most).
    let waiting = tokio::spawn({
        let app = a.app.clone();
        async move { get(&app, "/item/2").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.pause().await;
    let paused = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("A answered")
        .expect("task");
    let waited = paused.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.cache_status());
    // One timeout (of the look or the lock attempt under way, or of the
    // next, within 250 ms), then the origin; not a second timeout.
    assert!(
        waited < TIMEOUT + ORIGIN + Duration::from_secs(1),
        "A waited {waited:?} after Redis hung ({})",
        answer.cache_status()
    );
    redis.resume().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), filling).await;
}
