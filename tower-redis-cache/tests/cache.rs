//! The cache layer against real Redis, in front of an axum origin that
//! counts its calls.

#![allow(clippy::unwrap_used)] // A failed setup step should fail the test loudly.

mod support;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use axum::routing;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use support::{Answer, OriginCalls, send, settle, wait_until_stale};
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, CacheLayerBuilder, Route};
use tower_redis_core::testing::{TestRedis, wait_for_breaker};
use tower_redis_core::{BreakerState, RedisManager, redis};

#[derive(Clone, Default)]
struct Origin {
    calls: OriginCalls,
}

impl Origin {
    /// Calls over all paths.
    fn calls(&self) -> u64 {
        self.calls.total()
    }
}

fn respond(
    status: StatusCode,
    headers: &[(&str, String)],
    body: impl Into<Body>,
) -> Response<Body> {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    response.body(body.into()).unwrap()
}

fn origin_routes(origin: Origin) -> Router {
    Router::new()
        .route(
            "/fresh",
            routing::get(|State(o): State<Origin>| async move {
                let n = o.calls.count("/fresh");
                respond(
                    StatusCode::OK,
                    &[("cache-control", "max-age=60".into())],
                    format!("fresh-{n}"),
                )
            })
            .post(|| async { "changed" }),
        )
        .route(
            "/private",
            routing::get(|State(o): State<Origin>| async move {
                o.calls.count("/private");
                respond(
                    StatusCode::OK,
                    &[("cache-control", "private, max-age=60".into())],
                    "mine",
                )
            }),
        )
        .route(
            "/no-store",
            routing::get(|State(o): State<Origin>| async move {
                o.calls.count("/no-store");
                respond(
                    StatusCode::OK,
                    &[("cache-control", "no-store".into())],
                    "never",
                )
            }),
        )
        .route(
            "/vary",
            routing::get(|State(o): State<Origin>, headers: HeaderMap| async move {
                o.calls.count("/vary");
                let lang = headers
                    .get("accept-language")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                respond(
                    StatusCode::OK,
                    &[
                        ("cache-control", "max-age=60".into()),
                        ("vary", "Accept-Language".into()),
                    ],
                    lang,
                )
            }),
        )
        .route(
            "/etag",
            routing::get(|State(o): State<Origin>, headers: HeaderMap| async move {
                o.calls.count("/etag");
                if headers
                    .get(header::IF_NONE_MATCH)
                    .is_some_and(|v| v == "\"v1\"")
                {
                    return respond(
                        StatusCode::NOT_MODIFIED,
                        &[
                            ("etag", "\"v1\"".into()),
                            ("cache-control", "max-age=60".into()),
                            ("x-refreshed", "yes".into()),
                            ("x-multi", "a".into()),
                            ("x-multi", "b".into()),
                        ],
                        Body::empty(),
                    );
                }
                respond(
                    StatusCode::OK,
                    &[
                        ("etag", "\"v1\"".into()),
                        ("cache-control", "max-age=1".into()),
                    ],
                    "etag-body",
                )
            }),
        )
        .route(
            "/reflect-host",
            routing::get(|State(o): State<Origin>, headers: HeaderMap| async move {
                o.calls.count("/reflect-host");
                let host = headers
                    .get("x-forwarded-host")
                    .or_else(|| headers.get(header::HOST))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                respond(
                    StatusCode::OK,
                    &[("cache-control", "max-age=60".into())],
                    format!("<script src=//{host}/app.js>"),
                )
            }),
        )
        .route(
            "/big",
            routing::get(|State(o): State<Origin>| async move {
                o.calls.count("/big");
                respond(
                    StatusCode::OK,
                    &[("cache-control", "max-age=60".into())],
                    vec![b'x'; 64 * 1024],
                )
            }),
        )
        .route(
            "/chunked",
            routing::get(|State(o): State<Origin>| async move {
                o.calls.count("/chunked");
                let chunks: VecDeque<Bytes> =
                    (0..4).map(|i| Bytes::from(format!("chunk{i};"))).collect();
                respond(
                    StatusCode::OK,
                    &[("cache-control", "max-age=60".into())],
                    Body::new(Chunks(chunks)),
                )
            }),
        )
        .route(
            "/unfinished",
            routing::get(|State(o): State<Origin>| async move {
                o.calls.count("/unfinished");
                respond(
                    StatusCode::OK,
                    &[("cache-control", "max-age=60".into())],
                    Body::new(OneChunk::new(b"chunk0;", false)),
                )
            }),
        )
        .route(
            "/announced",
            routing::get(|State(o): State<Origin>| async move {
                o.calls.count("/announced");
                respond(
                    StatusCode::OK,
                    &[
                        ("cache-control", "max-age=60".into()),
                        ("content-length", "6".into()),
                    ],
                    Body::new(OneChunk::new(b"whole;", true)),
                )
            }),
        )
        .with_state(origin)
}

/// A body that sends one chunk, then waits for an end that never comes.
/// `announced`: the chunk is its last and the body says so
/// (`is_end_stream`), as hyper's body does once its `Content-Length` bytes
/// are read, so a client can take the chunk and leave before the end. Not
/// announced: an origin still sending when the client leaves.
struct OneChunk {
    chunk: Option<Bytes>,
    announced: bool,
}

impl OneChunk {
    fn new(chunk: &'static [u8], announced: bool) -> Self {
        OneChunk {
            chunk: Some(Bytes::from_static(chunk)),
            announced,
        }
    }
}

impl http_body::Body for OneChunk {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.chunk.take() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.announced && self.chunk.is_none()
    }
}

/// A body that yields its chunks one frame at a time.
struct Chunks(VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

struct Fixture {
    redis: TestRedis,
    manager: RedisManager,
    origin: Origin,
    app: Router,
    layer: CacheLayer,
}

async fn fixture(configure: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder) -> Fixture {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().failure_threshold(1).build().unwrap())
        .await
        .unwrap();
    let origin = Origin::default();
    let layer = configure(CacheLayer::builder(manager.clone()))
        .build()
        .unwrap();
    let app = origin_routes(origin.clone()).layer(layer.clone());
    Fixture {
        redis,
        manager,
        origin,
        app,
        layer,
    }
}

async fn get(app: &Router, path: &str) -> Answer {
    send(app, "GET", path, &[]).await
}

#[tokio::test]
async fn a_fresh_response_is_served_from_redis_with_age_and_cache_status() {
    let f = fixture(|b| b).await;
    let first = get(&f.app, "/fresh").await;
    assert_eq!(first.body, "fresh-1");
    assert_eq!(first.cache_status(), "tower-redis; fwd=uri-miss; stored");
    settle(&f.layer).await;
    // Warm the lookup script, then count what one hit costs.
    get(&f.app, "/fresh").await;
    f.redis.reset_stats().await.unwrap();
    let hit = get(&f.app, "/fresh").await;
    assert_eq!(hit.body, "fresh-1");
    assert_eq!(f.origin.calls(), 1);
    assert!(
        hit.cache_status().starts_with("tower-redis; hit; ttl="),
        "{}",
        hit.cache_status()
    );
    let age: u64 = hit
        .header("age")
        .expect("Age on every hit")
        .parse()
        .unwrap();
    assert!(age <= 2);
    // One command per hit: the URL's Vary is known here, so a plain HMGET.
    let mut calls: Vec<(String, u64)> = f
        .redis
        .command_calls()
        .await
        .unwrap()
        .into_iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config|resetstat"))
        .collect();
    calls.sort();
    assert_eq!(calls, [("hmget".to_owned(), 1)], "one round trip per hit");
}

#[tokio::test]
async fn private_and_no_store_responses_are_never_stored() {
    let f = fixture(|b| b).await;
    for path in ["/private", "/no-store"] {
        get(&f.app, path).await;
        settle(&f.layer).await;
        let again = get(&f.app, path).await;
        assert!(
            !again.cache_status().contains("hit"),
            "{path}: {}",
            again.cache_status()
        );
    }
    assert_eq!(f.origin.calls(), 4);
}

/// The commands Redis ran since the last reset, `INFO` and the reset left
/// out, sorted.
async fn commands(redis: &TestRedis) -> Vec<(String, u64)> {
    let mut calls: Vec<(String, u64)> = redis
        .command_calls()
        .await
        .unwrap()
        .into_iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config|resetstat"))
        .collect();
    calls.sort();
    calls
}

/// Asserts whether `answer`'s `Cache-Status` contains `text`.
fn assert_status(answer: &Answer, text: &str, contains: bool) {
    let status = answer.cache_status();
    assert_eq!(status.contains(text), contains, "{status}");
}

/// Another instance: a layer of its own on the same Redis, in front of
/// `origin`.
async fn second_instance(redis: &TestRedis, origin: Router) -> (Router, CacheLayer) {
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = CacheLayer::builder(manager).build().unwrap();
    (origin.layer(layer.clone()), layer)
}

/// A page that is never stored (private) is looked up on every request:
/// after the first lookup found it absent, each one is a plain `HMGET`,
/// not the lookup script with a digest of every request header.
#[tokio::test]
async fn a_page_never_stored_is_looked_up_with_a_plain_hmget() {
    let f = fixture(|b| b).await;
    let headers = [
        ("cookie", "sid=abc"),
        ("accept-language", "en"),
        ("user-agent", "test"),
    ];
    send(&f.app, "GET", "/private", &headers).await;
    settle(&f.layer).await;
    f.redis.reset_stats().await.unwrap();
    for _ in 0..3 {
        let again = send(&f.app, "GET", "/private", &headers).await;
        assert_eq!(again.body, "mine");
        assert_status(&again, "hit", false);
    }
    assert_eq!(commands(&f.redis).await, [("hmget".to_owned(), 3)]);
    assert_eq!(f.origin.calls(), 4);
}

/// An instance that marked a URL absent (its own answer was private) finds
/// it in one `HMGET` once another instance stored it without `Vary`.
#[tokio::test]
async fn a_url_marked_absent_then_stored_without_vary_elsewhere_is_one_hmget() {
    let f = fixture(|b| b).await;
    // A's origin answers `/private` privately: A marks the URL absent.
    send(&f.app, "GET", "/private", &[]).await;
    settle(&f.layer).await;
    send(&f.app, "GET", "/private", &[]).await;
    // Instance B: the same Redis, an origin whose `/private` is public.
    let (b_app, b_layer) = second_instance(
        &f.redis,
        Router::new().route(
            "/private",
            routing::get(|| async {
                respond(
                    StatusCode::OK,
                    &[("cache-control", "max-age=60".into())],
                    "everyone's",
                )
            }),
        ),
    )
    .await;
    assert_eq!(get(&b_app, "/private").await.body, "everyone's");
    settle(&b_layer).await;
    f.redis.reset_stats().await.unwrap();
    let found = get(&f.app, "/private").await;
    assert_eq!(found.body, "everyone's");
    assert_status(&found, "hit", true);
    assert_eq!(commands(&f.redis).await, [("hmget".to_owned(), 1)]);
    assert_eq!(f.origin.calls(), 2);
}

/// An instance that found a URL absent, then looks it up after another
/// instance stored it with `Vary`, finds the variant the request selects
/// (and only that one), and from then on in one `HMGET`.
#[tokio::test]
async fn a_url_found_absent_then_stored_with_vary_elsewhere_is_found() {
    let f = fixture(|b| b).await;
    // Instance B: the same Redis, an origin that varies `/shift`.
    let (b_app, b_layer) = second_instance(
        &f.redis,
        Router::new().route(
            "/shift",
            routing::get(|headers: HeaderMap| async move {
                let lang = headers
                    .get("accept-language")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                respond(
                    StatusCode::OK,
                    &[
                        ("cache-control", "max-age=60".into()),
                        ("vary", "accept-language".into()),
                    ],
                    format!("b-{lang}"),
                )
            }),
        ),
    )
    .await;
    let de = [("accept-language", "de")];
    let en = [("accept-language", "en")];
    // A looks `/shift` up: absent, and A's origin does not know it.
    let first = send(&f.app, "GET", "/shift", &de).await;
    assert_eq!(first.status, 404);
    assert_status(&first, "fwd=uri-miss", true);
    settle(&f.layer).await;
    // B stores the `de` variant.
    assert_eq!(send(&b_app, "GET", "/shift", &de).await.body, "b-de");
    settle(&b_layer).await;
    // A finds it, from Redis: A's hint (absent, its own answer was not
    // storable) reads the variant a response without `Vary` has, sees
    // the URL's `Vary`, and runs the lookup script: two round trips, once
    // (`INFO commandstats` also counts the script's own `HMGET`, `HGET`).
    f.redis.reset_stats().await.unwrap();
    let found = send(&f.app, "GET", "/shift", &de).await;
    assert_eq!(found.body, "b-de");
    assert_status(&found, "hit", true);
    assert_eq!(
        commands(&f.redis).await,
        [
            ("evalsha".to_owned(), 1),
            ("hget".to_owned(), 1),
            ("hmget".to_owned(), 2)
        ]
    );
    // Another variant is a vary miss (A's origin answers 404, not stored).
    let other = send(&f.app, "GET", "/shift", &en).await;
    assert_eq!(other.status, 404);
    assert_status(&other, "fwd=vary-miss", true);
    settle(&f.layer).await;
    // A knows the URL's Vary now: one HMGET.
    f.redis.reset_stats().await.unwrap();
    assert_eq!(send(&f.app, "GET", "/shift", &de).await.body, "b-de");
    assert_eq!(commands(&f.redis).await, [("hmget".to_owned(), 1)]);
}

#[tokio::test]
async fn vary_keeps_one_variant_per_value() {
    let f = fixture(|b| b).await;
    let en = [("accept-language", "en")];
    let de = [("accept-language", "de")];
    assert_eq!(send(&f.app, "GET", "/vary", &en).await.body, "en");
    settle(&f.layer).await;
    let de_first = send(&f.app, "GET", "/vary", &de).await;
    assert_eq!(de_first.body, "de");
    assert!(
        de_first.cache_status().contains("fwd=vary-miss"),
        "{}",
        de_first.cache_status()
    );
    settle(&f.layer).await;
    assert_eq!(send(&f.app, "GET", "/vary", &en).await.body, "en");
    assert_eq!(send(&f.app, "GET", "/vary", &de).await.body, "de");
    assert_eq!(get(&f.app, "/vary").await.body, "none");
    assert_eq!(f.origin.calls(), 3);
}

#[tokio::test]
async fn if_none_match_is_answered_with_304_from_the_cache() {
    let f = fixture(|b| b.generate_etags(true)).await;
    get(&f.app, "/fresh").await;
    settle(&f.layer).await;
    let hit = get(&f.app, "/fresh").await;
    let etag = hit
        .header("etag")
        .expect("generated strong ETag")
        .to_owned();
    let conditional = send(&f.app, "GET", "/fresh", &[("if-none-match", &etag)]).await;
    assert_eq!(conditional.status, 304);
    assert!(conditional.body.is_empty());
    assert!(conditional.header("age").is_some());
    assert_eq!(f.origin.calls(), 1);
}

#[tokio::test]
async fn a_stale_entry_is_revalidated_and_a_304_refreshes_its_headers() {
    let f = fixture(|b| b).await;
    assert_eq!(get(&f.app, "/etag").await.body, "etag-body");
    settle(&f.layer).await;
    wait_until_stale(&f.layer, "http://shop.example/etag").await;
    let revalidated = get(&f.app, "/etag").await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(
        revalidated.body, "etag-body",
        "the stored body, not the empty 304"
    );
    assert_eq!(revalidated.header("x-refreshed"), Some("yes"));
    let multi: Vec<_> = revalidated.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"], "every line of a refreshed field is kept");
    assert_eq!(
        revalidated.cache_status(),
        "tower-redis; fwd=stale; fwd-status=304; stored"
    );
    assert_eq!(f.origin.calls(), 2);
    // Refreshed to max-age=60: a plain hit now.
    let hit = get(&f.app, "/etag").await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(hit.header("x-refreshed"), Some("yes"));
    assert_eq!(f.origin.calls(), 2);
}

#[tokio::test]
async fn a_successful_post_invalidates_the_url() {
    let f = fixture(|b| b).await;
    get(&f.app, "/fresh").await;
    settle(&f.layer).await;
    assert_eq!(get(&f.app, "/fresh").await.body, "fresh-1");
    assert_eq!(send(&f.app, "POST", "/fresh", &[]).await.status, 200);
    assert_eq!(get(&f.app, "/fresh").await.body, "fresh-2");
}

#[tokio::test]
async fn a_body_over_the_limit_is_streamed_whole_but_not_stored() {
    let f = fixture(|b| b.max_body_bytes(1024)).await;
    let big = get(&f.app, "/big").await;
    assert_eq!(big.body.len(), 64 * 1024);
    settle(&f.layer).await;
    let again = get(&f.app, "/big").await;
    assert_eq!(again.body.len(), 64 * 1024);
    assert_eq!(f.origin.calls(), 2);
}

#[tokio::test]
async fn a_streamed_body_is_stored_once_complete() {
    let f = fixture(|b| b).await;
    assert_eq!(
        get(&f.app, "/chunked").await.body,
        "chunk0;chunk1;chunk2;chunk3;"
    );
    settle(&f.layer).await;
    let hit = get(&f.app, "/chunked").await;
    assert_eq!(hit.body, "chunk0;chunk1;chunk2;chunk3;");
    assert_eq!(f.origin.calls(), 1);
}

/// The body is read for the cache at the origin's pace (issue 15, item 9):
/// "mid-body" is while the origin still sends it. A client that leaves
/// after the origin has sent it all leaves a complete entry.
#[tokio::test]
async fn a_client_that_disconnects_mid_body_leaves_no_entry() {
    let f = fixture(|b| b).await;
    let request = Request::get("/unfinished")
        .header(header::HOST, "shop.example")
        .body(Body::empty())
        .unwrap();
    let response = f.app.clone().oneshot(request).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "chunk0;");
    drop(body);
    settle(&f.layer).await;
    let mut conn = f.redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:c:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

/// A page answered `stored` was once missing from Redis: hyper drops a body
/// as soon as its declared bytes are written, and the store took the
/// client's departure for a disconnect mid-body. A client that leaves with
/// the whole body leaves the entry.
#[tokio::test]
async fn a_client_that_leaves_with_the_whole_body_leaves_the_entry() {
    let f = fixture(|b| b).await;
    let request = Request::get("/announced")
        .header(header::HOST, "shop.example")
        .body(Body::empty())
        .unwrap();
    let response = f.app.clone().oneshot(request).await.unwrap();
    assert_eq!(
        response.headers()["cache-status"],
        "tower-redis; fwd=uri-miss; stored"
    );
    let mut body = response.into_body();
    let all = body.frame().await.unwrap().unwrap();
    assert_eq!(all.into_data().unwrap(), "whole;");
    drop(body);
    settle(&f.layer).await;
    let mut conn = f.redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:c:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "the page was not stored: {keys:?}");
    let hit = get(&f.app, "/announced").await;
    assert!(
        hit.header("cache-status")
            .is_some_and(|s| s.starts_with("tower-redis; hit")),
        "{:?}",
        hit.headers
    );
    assert_eq!(hit.body, "whole;");
    assert_eq!(f.origin.calls(), 1);
}

#[tokio::test]
async fn x_forwarded_host_cannot_poison_the_entry() {
    let f = fixture(|b| b).await;
    let attack = send(
        &f.app,
        "GET",
        "/reflect-host",
        &[("x-forwarded-host", "evil.example")],
    )
    .await;
    assert!(
        attack.body.contains("evil.example"),
        "the origin reflects it"
    );
    assert!(
        !attack.cache_status().contains("stored"),
        "{}",
        attack.cache_status()
    );
    settle(&f.layer).await;
    let victim = get(&f.app, "/reflect-host").await;
    assert!(victim.body.contains("shop.example"), "{}", victim.body);
    settle(&f.layer).await;
    // And once a clean entry exists, the attacker gets it too.
    let attack_again = send(
        &f.app,
        "GET",
        "/reflect-host",
        &[("x-forwarded-host", "evil.example")],
    )
    .await;
    assert!(attack_again.body.contains("shop.example"));
}

#[tokio::test]
async fn a_corrupt_entry_is_a_miss_and_is_replaced() {
    let f = fixture(|b| b).await;
    get(&f.app, "/fresh").await;
    settle(&f.layer).await;
    let mut conn = f.redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:c:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    let variant = fields.iter().find(|f| f.starts_with("e:")).unwrap();
    redis::cmd("HSET")
        .arg(&keys[0])
        .arg(variant)
        .arg("garbage")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let answer = get(&f.app, "/fresh").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "fresh-2");
    settle(&f.layer).await;
    assert_eq!(get(&f.app, "/fresh").await.body, "fresh-2");
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry() {
    let f = fixture(|b| b).await;
    get(&f.app, "/fresh").await;
    settle(&f.layer).await;
    let head = send(&f.app, "HEAD", "/fresh", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert!(head.cache_status().contains("hit"));
    assert_eq!(f.origin.calls(), 1);
    // RFC 9110 §9.3.2: the length a GET's answer has, not the empty body's.
    let whole = get(&f.app, "/fresh").await;
    assert!(whole.cache_status().contains("hit"));
    assert_eq!(
        head.header("content-length"),
        Some(whole.body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn request_directives_are_honoured() {
    let f = fixture(|b| b).await;
    let miss = send(
        &f.app,
        "GET",
        "/fresh",
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(miss.status, 504);
    get(&f.app, "/fresh").await;
    settle(&f.layer).await;
    let no_cache = send(&f.app, "GET", "/fresh", &[("cache-control", "no-cache")]).await;
    assert_eq!(no_cache.body, "fresh-2");
    assert!(
        no_cache.cache_status().contains("fwd=request"),
        "{}",
        no_cache.cache_status()
    );
    settle(&f.layer).await;
    let young_enough = send(&f.app, "GET", "/fresh", &[("cache-control", "max-age=30")]).await;
    assert_eq!(young_enough.body, "fresh-2");
    assert_eq!(f.origin.calls(), 2);
}

#[tokio::test]
async fn route_rules_bypass_and_default_ttl() {
    let f = fixture(|b| {
        b.route(Route::new("/private").bypass())
            .route(Route::new("/no-store").default_ttl(Duration::from_secs(30)))
    })
    .await;
    let bypassed = get(&f.app, "/private").await;
    assert!(bypassed.header("cache-status").is_none());
    // default_ttl does not override no-store.
    get(&f.app, "/no-store").await;
    settle(&f.layer).await;
    get(&f.app, "/no-store").await;
    assert_eq!(f.origin.calls(), 3);
}

#[tokio::test]
async fn redis_outage_keeps_caching_in_process_and_says_so() {
    let f = fixture(|b| b).await;
    get(&f.app, "/fresh").await;
    settle(&f.layer).await;
    f.redis.kill().await;
    let first = get(&f.app, "/fresh").await;
    assert_eq!(first.status, 200);
    assert!(
        first.cache_status().contains("detail=redis-unavailable"),
        "{}",
        first.cache_status()
    );
    settle(&f.layer).await;
    let second = get(&f.app, "/fresh").await;
    assert!(
        second.cache_status().contains("hit"),
        "{}",
        second.cache_status()
    );
    assert!(second.cache_status().contains("detail=redis-unavailable"));
    let calls_during_outage = f.origin.calls();

    f.redis.restart().await;
    wait_for_breaker(&f.manager, BreakerState::Closed, Duration::from_secs(15)).await;
    // Redis is empty after its restart: a miss there (the in-process copy is
    // dropped), then shared hits again.
    let back = get(&f.app, "/fresh").await;
    assert!(
        back.cache_status().contains("fwd=uri-miss"),
        "{}",
        back.cache_status()
    );
    assert!(!back.cache_status().contains("redis-unavailable"));
    settle(&f.layer).await;
    let shared = get(&f.app, "/fresh").await;
    assert!(shared.cache_status().contains("hit"));
    assert_eq!(f.origin.calls(), calls_during_outage + 1);
}

/// Requests the cache cannot key (no host, or a host not allowed) and
/// safe methods it does not cache (`OPTIONS`, `TRACE`) reach the origin
/// every time, carry no `Cache-Status`, and leave
/// nothing in Redis.
#[tokio::test]
async fn requests_without_a_host_or_with_other_methods_pass_through() {
    let f = fixture(|b| b.allowed_hosts(["shop.example"])).await;
    // An origin that answers every method as cacheable.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let service = tower::ServiceBuilder::new()
        .layer(f.layer.clone())
        .service_fn(move |request: Request<Body>| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok::<_, std::convert::Infallible>(respond(
                    StatusCode::OK,
                    &[("cache-control", "public, max-age=60".into())],
                    format!("{} {n}", request.method()),
                ))
            }
        });
    let ask = |request: Request<Body>| {
        let service = service.clone();
        async move {
            let response = service.oneshot(request).await.unwrap();
            let status = response.status();
            let cache_status = response.headers().get("cache-status").cloned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                cache_status,
                String::from_utf8_lossy(&body).into_owned(),
            )
        }
    };
    let no_host = || Request::get("/fresh").body(Body::empty()).unwrap();
    let other_host = || {
        Request::get("/fresh")
            .header(header::HOST, "evil.example")
            .body(Body::empty())
            .unwrap()
    };
    let method = |m: &str| {
        Request::builder()
            .method(m)
            .uri("/fresh")
            .header(header::HOST, "shop.example")
            .body(Body::empty())
            .unwrap()
    };
    let cases: [(&str, &dyn Fn() -> Request<Body>); 4] = [
        ("GET without a host", &no_host),
        ("GET to a host not allowed", &other_host),
        ("OPTIONS", &|| method("OPTIONS")),
        ("TRACE", &|| method("TRACE")),
    ];
    let mut expected_calls = 0;
    for (what, request) in cases {
        for _ in 0..2 {
            let (status, cache_status, body) = ask(request()).await;
            f.layer.flush().await;
            expected_calls += 1;
            assert_eq!(status, 200, "{what}");
            assert_eq!(cache_status, None, "{what}: handled by the cache");
            assert!(
                body.ends_with(&format!(" {expected_calls}")),
                "{what}: not from the origin: {body}"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), expected_calls, "{what}");
    }
    let mut conn = f.redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "a pass-through left {keys:?} in Redis");
    // The same origin through the cache, keyed: stored, then a hit.
    let (_, stored, _) = ask(method("GET")).await;
    f.layer.flush().await;
    let (_, hit, _) = ask(method("GET")).await;
    assert!(
        stored.is_some_and(|v| v.to_str().unwrap().contains("stored")),
        "the origin's answer is storable"
    );
    assert!(hit.is_some_and(|v| v.to_str().unwrap().contains("hit")));
}

#[tokio::test]
async fn route_key_parts_never_reach_redis_in_clear() {
    let f = fixture(|b| b.route(Route::new("/fresh").key_cookie("sid"))).await;
    let mut conn = f.redis.connection().await.unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(0)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let secret = "s3cr3t-session-value";
    let cookie = format!("sid={secret}");
    send(
        &f.app,
        "GET",
        "/fresh",
        &[("cookie", &cookie), ("authorization", "Basic dXNlcjpwYXNz")],
    )
    .await;
    settle(&f.layer).await;
    send(&f.app, "GET", "/fresh", &[("cookie", &cookie)]).await;
    let log: redis::Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let text = format!("{log:?}");
    assert!(
        text.contains("evalsha") || text.contains("EVALSHA"),
        "the slow log records the lookups"
    );
    assert!(!text.contains(secret), "cookie value sent to Redis");
    assert!(!text.contains("dXNlcjpwYXNz"), "credential sent to Redis");
}

#[tokio::test]
async fn a_vary_on_a_header_clients_control_cannot_grow_a_url_without_bound() {
    let f = fixture(|b| b).await;
    for i in 0..100 {
        let lang = format!("x-{i}");
        send(&f.app, "GET", "/vary", &[("accept-language", &lang)]).await;
    }
    settle(&f.layer).await;
    let mut conn = f.redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:c:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    let fields: usize = redis::cmd("HLEN")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(fields <= 34, "{fields} fields");
}

#[tokio::test]
async fn an_instance_with_an_outdated_vary_still_finds_the_entry() {
    let redis = TestRedis::start().await;
    let instance = |vary: Option<&'static str>, body: &'static str| {
        let redis = &redis;
        async move {
            let manager = RedisManager::connect(redis.config().build().unwrap())
                .await
                .unwrap();
            let layer = CacheLayer::builder(manager).build().unwrap();
            let router = Router::new()
                .route(
                    "/page",
                    routing::get(move || async move {
                        let mut headers = vec![("cache-control", "max-age=60".to_owned())];
                        if let Some(vary) = vary {
                            headers.push(("vary", vary.to_owned()));
                        }
                        respond(StatusCode::OK, &headers, body)
                    })
                    .post(|| async { "changed" }),
                )
                .layer(layer.clone());
            (router, layer)
        }
    };
    let (a, a_layer) = instance(Some("Accept-Language"), "from-a").await;
    let (b, b_layer) = instance(None, "from-b").await;
    // A learns that /page varies on Accept-Language.
    assert_eq!(get(&a, "/page").await.body, "from-a");
    settle(&a_layer).await;
    // B replaces the URL's entries with a response that varies on nothing.
    send(&b, "POST", "/page", &[]).await;
    assert_eq!(get(&b, "/page").await.body, "from-b");
    settle(&b_layer).await;
    // A's idea of the Vary is outdated; it must still find B's entry.
    let answer = get(&a, "/page").await;
    assert_eq!(answer.body, "from-b");
    assert!(
        answer.cache_status().contains("hit"),
        "{}",
        answer.cache_status()
    );
}

/// A layer (configured by `configure`) in front of an origin that answers
/// every request with `headers` and the body `body`, counting its calls.
struct Simple {
    redis: TestRedis,
    layer: CacheLayer,
    service: tower::util::BoxCloneService<Request<Body>, Answer, std::convert::Infallible>,
    calls: Arc<AtomicUsize>,
}

async fn simple(
    configure: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder,
    headers: &[(&'static str, String)],
    body: &'static [u8],
) -> Simple {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = configure(CacheLayer::builder(manager)).build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let headers: Vec<(&'static str, String)> = headers.to_vec();
    let service = tower::ServiceBuilder::new()
        .and_then(|response: Response<_>| async move {
            let (parts, body) = response.into_parts();
            let body = BodyExt::collect(body).await.unwrap().to_bytes();
            Ok(Answer {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        })
        .layer(layer.clone())
        .service_fn(move |_: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let response = respond(StatusCode::OK, &headers, body);
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
    Simple {
        redis,
        layer,
        service: tower::util::BoxCloneService::new(service),
        calls,
    }
}

impl Simple {
    /// GETs `path` and waits until what it stores is stored.
    async fn get(&self, path: &str) -> Answer {
        let request = Request::get(path)
            .header(header::HOST, "shop.example")
            .body(Body::empty())
            .unwrap();
        let answer = self.service.clone().oneshot(request).await.unwrap();
        self.layer.flush().await;
        answer
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// `targeted_field`: the named field (RFC 9213) is obeyed before
/// `Cache-Control`, which here says `no-store` (for browsers).
#[tokio::test]
async fn a_targeted_field_overrides_cache_control() {
    let headers = [
        ("cache-control", "no-store".to_owned()),
        ("acme-cache-control", "max-age=60".to_owned()),
    ];
    let s = simple(|b| b.targeted_field("Acme-Cache-Control"), &headers, b"x").await;
    let first = s.get("/t").await;
    assert_eq!(first.cache_status(), "tower-redis; fwd=uri-miss; stored");
    let second = s.get("/t").await;
    assert!(
        second.cache_status().starts_with("tower-redis; hit; ttl="),
        "{}",
        second.cache_status()
    );
    assert_eq!(s.calls(), 1);
    // Without the option, the same answers are never stored.
    let plain = simple(|b| b, &headers, b"x").await;
    plain.get("/t").await;
    assert!(!plain.get("/t").await.cache_status().contains("hit"));
    assert_eq!(plain.calls(), 2);
}

/// `heuristic_freshness`: an answer with `Last-Modified` and no explicit
/// freshness is fresh for 10% of its age (at most a day), so it is a hit.
#[tokio::test]
async fn heuristic_freshness_makes_a_last_modified_answer_fresh() {
    let ten_days_ago =
        httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(10 * 24 * 3600));
    let headers = [("last-modified", ten_days_ago)];
    let s = simple(|b| b.heuristic_freshness(true), &headers, b"x").await;
    s.get("/h").await;
    let second = s.get("/h").await;
    let status = second.cache_status();
    assert!(status.starts_with("tower-redis; hit; ttl="), "{status}");
    let ttl: u64 = status["tower-redis; hit; ttl=".len()..]
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // 10% of ten days is a day: capped at a day.
    assert!((86_000..=86_400).contains(&ttl), "{status}");
    assert_eq!(s.calls(), 1);
    // Off (the default), the same answer is not fresh: the origin again.
    let plain = simple(|b| b, &headers, b"x").await;
    plain.get("/h").await;
    assert!(!plain.get("/h").await.cache_status().contains("hit"));
    assert_eq!(plain.calls(), 2);
}

/// `store_set_cookie`: an answer that sets a cookie is stored when allowed.
#[tokio::test]
async fn store_set_cookie_stores_answers_that_set_a_cookie() {
    let headers = [
        ("cache-control", "max-age=60".to_owned()),
        ("set-cookie", "theme=dark; Path=/".to_owned()),
    ];
    let s = simple(|b| b.store_set_cookie(true), &headers, b"x").await;
    assert!(s.get("/c").await.cache_status().contains("stored"));
    let hit = s.get("/c").await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(s.calls(), 1);
    // Off (the default), never stored.
    let plain = simple(|b| b, &headers, b"x").await;
    assert!(!plain.get("/c").await.cache_status().contains("stored"));
    assert!(!plain.get("/c").await.cache_status().contains("hit"));
    assert_eq!(plain.calls(), 2);
}

/// The Redis key holding `/k` of a layer, and its time to live in seconds.
async fn entry_ttl(redis: &TestRedis) -> i64 {
    let mut conn = redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:c:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    redis::cmd("TTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// `keep_stale_for`: entries are kept in Redis that long past their
/// freshness (for revalidation and `max-stale`), then expire.
#[tokio::test]
async fn keep_stale_for_sets_how_long_a_stale_entry_is_kept() {
    let headers = [("cache-control", "max-age=60".to_owned())];
    let s = simple(
        |b| b.keep_stale_for(Duration::from_secs(3600)),
        &headers,
        b"x",
    )
    .await;
    let stored = s.get("/k").await;
    assert_eq!(stored.cache_status(), "tower-redis; fwd=uri-miss; stored");
    let ttl = entry_ttl(&s.redis).await;
    assert!((3600..=3660).contains(&ttl), "kept {ttl} s");
    // The default keeps it 60 s past its 60 s of freshness.
    let plain = simple(|b| b, &headers, b"x").await;
    let stored = plain.get("/k").await;
    assert_eq!(stored.cache_status(), "tower-redis; fwd=uri-miss; stored");
    let ttl = entry_ttl(&plain.redis).await;
    assert!((60..=120).contains(&ttl), "kept {ttl} s");
}

/// `memory_capacity_bytes`: while Redis is down, the in-process store
/// holds at most that many bytes; older entries are evicted to keep it so.
#[tokio::test]
async fn the_in_process_store_stays_within_its_byte_bound() {
    const BODY: &[u8] = &[b'x'; 8 * 1024];
    let headers = [("cache-control", "max-age=60".to_owned())];
    let s = simple(|b| b.memory_capacity_bytes(64 * 1024), &headers, BODY).await;
    s.redis.kill().await;
    for i in 0..32 {
        let answer = s.get(&format!("/m/{i}")).await;
        assert!(
            answer.cache_status().contains("stored")
                && answer.cache_status().contains("redis-unavailable"),
            "{}",
            answer.cache_status()
        );
    }
    let stats = s.layer.handle().stats().await;
    assert!(stats.in_process, "{stats:?}");
    // 32 × 8 KiB were stored: at most 8 of them fit in 64 KiB.
    assert!(stats.bytes <= 64 * 1024, "{stats:?}");
    assert!((1..=8).contains(&stats.entries), "{stats:?}");
    // What it keeps, it answers (which ones is moka's admission policy).
    let mut hits = 0;
    for i in 0..32 {
        if s.get(&format!("/m/{i}"))
            .await
            .cache_status()
            .contains("hit")
        {
            hits += 1;
        }
    }
    assert!((1..=8).contains(&hits), "{hits} hits");
}

/// A body of `left` chunks, one every 20 ms (an origin still sending).
struct Trickle {
    left: usize,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        std::task::ready!(self.timer.as_mut().poll(cx));
        self.left -= 1;
        let next = tokio::time::Instant::now() + Duration::from_millis(20);
        self.timer.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"chunk;")))))
    }
}

/// Graceful shutdown: `CacheLayer::flush()` waits for the stores of the
/// responses already answered, so an app that flushes and then exits (its
/// runtime dropped, every pending task with it) leaves them all in Redis;
/// here the origins are still sending their bodies (and the clients have
/// read none of them) when the app starts to shut down.
#[test]
fn flush_before_exit_stores_every_answered_response() {
    let outer = tokio::runtime::Runtime::new().unwrap();
    let redis = outer.block_on(TestRedis::start());
    let config = redis.config().build().unwrap();
    let app_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses = app_runtime.block_on(async move {
        let manager = RedisManager::connect(config).await.unwrap();
        let layer = CacheLayer::builder(manager).build().unwrap();
        let service = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|_: Request<Body>| async {
                let body = Trickle {
                    left: 5,
                    timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
                };
                Ok::<_, std::convert::Infallible>(respond(
                    StatusCode::OK,
                    &[("cache-control", "max-age=60".into())],
                    Body::new(body),
                ))
            });
        let mut unread = Vec::new();
        for i in 0..10 {
            let request = Request::get(format!("/trickle/{i}"))
                .header(header::HOST, "shop.example")
                .body(Body::empty())
                .unwrap();
            unread.push(service.clone().oneshot(request).await.unwrap());
        }
        // Answered (heads sent, bodies on their way): shut down.
        layer.flush().await;
        unread
            .iter()
            .map(|r| r.headers()["cache-status"].to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    });
    // The process exits: whatever was not stored yet never will be.
    drop(app_runtime);
    for status in &statuses {
        assert_eq!(status, "tower-redis; fwd=uri-miss; stored", "{statuses:?}");
    }
    // Entries, not fill locks (which live in the same hash).
    let stored: Vec<String> = outer.block_on(async {
        let mut conn = redis.connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*:c:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut stored = Vec::new();
        for key in keys {
            let fields: Vec<String> = redis::cmd("HKEYS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            if fields.iter().any(|f| f.starts_with("e:")) {
                stored.push(key);
            }
        }
        stored
    });
    assert_eq!(
        stored.len(),
        10,
        "answered but not stored before exit: {stored:?}"
    );
    outer.block_on(async move { drop(redis) });
}
