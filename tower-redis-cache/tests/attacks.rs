//! Attacks on the cache and races in it (issue 15), each against real Redis:
//! a test named after the attack, which failed before the fix it guards.

#![allow(clippy::unwrap_used)] // A failed setup step should fail the test loudly.

mod support;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, Response, StatusCode, Version, header};
use axum::routing;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::BodyExt;
use support::{Answer, OriginCalls, call, request, settle, wait_until_stale};
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, CacheLayerBuilder, RequestCacheControl, Route};
use tower_redis_core::testing::{TestCluster, TestRedis};
use tower_redis_core::{RedisConfigBuilder, RedisManager, redis};

/// The origin behind the cache: counts its calls per path.
#[derive(Clone, Default)]
struct Origin {
    calls: OriginCalls,
    /// Run by `/pause-writes` before it answers (item 10).
    before_answer: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<()>>>>,
    /// When set, every answer waits for this many cache lookups in Redis
    /// (see [`LookupGate`]).
    hold: Arc<Mutex<Option<LookupGate>>>,
}

impl std::ops::Deref for Origin {
    type Target = OriginCalls;

    fn deref(&self) -> &OriginCalls {
        &self.calls
    }
}

impl Origin {
    /// The held answer's wait (when a gate is set), then the latency.
    async fn delay(&self) {
        let gate = self.hold.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.pass().await;
        }
        self.calls.delay().await;
    }
}

/// Holds an origin call until Redis has served `target` cache lookups in
/// all (`HMGET`, one per request that looks in Redis), so that an answer
/// leaves the origin only once every concurrent request has looked up its
/// entry: the overlap a coalescing test needs is an event, not a latency.
/// Gives up after 4 s, under the layer's 5 s coalescing wait, so that
/// wrongly queued requests cannot get through by timing out; a gate that
/// gave up is counted, and the tests require none.
#[derive(Clone)]
struct LookupGate {
    redis: redis::Client,
    target: Arc<AtomicU64>,
    gave_up: Arc<AtomicU64>,
}

impl LookupGate {
    fn new(redis: &TestRedis) -> Self {
        LookupGate {
            redis: redis.client(),
            target: Arc::default(),
            gave_up: Arc::default(),
        }
    }

    /// Lets origin calls through once `more` lookups than so far are served.
    async fn expect_lookups(&self, more: u64) {
        let now = lookups(&self.redis).await;
        self.target.store(now + more, Ordering::SeqCst);
    }

    async fn pass(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        while lookups(&self.redis).await < self.target.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() >= deadline {
                self.gave_up.fetch_add(1, Ordering::SeqCst);
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn gave_up(&self) -> u64 {
        self.gave_up.load(Ordering::SeqCst)
    }
}

/// The cache's lookups Redis has served (`HMGET` calls in `INFO commandstats`).
async fn lookups(redis: &redis::Client) -> u64 {
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("test Redis answers");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_hmget:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

fn cacheable(body: impl Into<Body>) -> Response<Body> {
    Response::builder()
        .header("cache-control", "max-age=60")
        .body(body.into())
        .unwrap()
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

/// The body of [`SLOW_BODY`] in one-byte frames.
const SLOW_BODY: &str = "abcdefghijklmnopqrst";

fn routes(origin: Origin) -> Router {
    Router::new()
        .route(
            "/reflect-host",
            routing::get(|State(o): State<Origin>, headers: HeaderMap| async move {
                o.count("/reflect-host");
                let host = headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                cacheable(format!("<script src=//{host}/app.js>"))
            })
            .head(|State(o): State<Origin>| async move {
                o.count("/reflect-host");
                cacheable(Body::empty())
            }),
        )
        .route(
            "/echo-body",
            routing::get(|State(o): State<Origin>, body: String| async move {
                o.count("/echo-body");
                cacheable(format!("you sent: {body}"))
            }),
        )
        .route(
            "/slow",
            routing::get(|State(o): State<Origin>| async move {
                let n = o.count("/slow");
                o.delay().await;
                cacheable(format!("slow-v{n}"))
            }),
        )
        .route(
            "/one-byte-frames",
            routing::get(|State(o): State<Origin>| async move {
                o.count("/one-byte-frames");
                let chunks: VecDeque<Bytes> = SLOW_BODY
                    .bytes()
                    .map(|b| Bytes::copy_from_slice(&[b]))
                    .collect();
                cacheable(Body::new(Chunks(chunks)))
            }),
        )
        .route(
            "/pause-writes",
            routing::get(|State(o): State<Origin>| async move {
                let n = o.count("/pause-writes");
                let hook = o.before_answer.lock().unwrap().clone();
                if let Some(hook) = hook {
                    hook.send(()).unwrap();
                    // Give the test the moment to pause Redis writes.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                cacheable(format!("v{n}"))
            }),
        )
        .route(
            "/cgi/{case}",
            routing::get(|State(o): State<Origin>, headers: HeaderMap| async move {
                o.count("/cgi");
                // As a CGI-style origin reads fields: `_` and `-` alike.
                let field = |name: &str| {
                    headers
                        .get(name)
                        .or_else(|| headers.get(name.replace('-', "_")))
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("(none)")
                        .to_owned()
                };
                let mut response = cacheable(format!(
                    "tenant={} host={}",
                    field("x-tenant"),
                    field("x-forwarded-host")
                ));
                response
                    .headers_mut()
                    .insert(header::VARY, "X-Tenant".parse().unwrap());
                response
            }),
        )
        .route(
            "/prices/{case}",
            routing::get(|State(o): State<Origin>, headers: HeaderMap| async move {
                o.count("/prices");
                let tenant = headers.get("x-tenant").map_or("(none)".to_owned(), |v| {
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                });
                cacheable(format!(
                    "currency={} tenant={tenant}",
                    currency_as_the_cookie_crate_reads_it(&headers)
                ))
            }),
        )
        .route(
            "/conditional/{case}",
            routing::get(
                |State(o): State<Origin>, Path(case): Path<String>, headers: HeaderMap| async move {
                    let n = o.count(&format!("/conditional/{case}"));
                    o.delay().await;
                    conditional_answer(&headers, n, "max-age=60")
                },
            ),
        )
        .route(
            "/conditional-private/{case}",
            routing::get(
                |State(o): State<Origin>, Path(case): Path<String>, headers: HeaderMap| async move {
                    let n = o.count(&format!("/conditional-private/{case}"));
                    conditional_answer(&headers, n, "private, max-age=60")
                },
            ),
        )
        .fallback(
            |State(o): State<Origin>, request: Request<Body>| async move {
                let target = request.uri().to_string();
                o.count(&target);
                o.delay().await;
                cacheable(format!("page {target}"))
            },
        )
        .with_state(origin)
}

/// The `currency` cookie as the `cookie` crate reads it (so tower-cookies
/// and axum-extra's `CookieJar` do): every `Cookie` field, names trimmed
/// and percent-decoded, the last pair of a name winning.
fn currency_as_the_cookie_crate_reads_it(headers: &HeaderMap) -> String {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| cookie::Cookie::split_parse_encoded(v.to_owned()))
        .filter_map(Result::ok)
        .filter(|c| c.name() == "currency")
        .last()
        .map_or_else(|| "(none)".to_owned(), |c| c.value().to_owned())
}

/// The `Last-Modified` of the `/conditional/…` pages.
const LAST_MODIFIED: &str = "Mon, 01 Jan 2024 00:00:00 GMT";

/// What an origin that evaluates conditionals answers for a page whose
/// `ETag` is `"v1"`: `304` when `If-None-Match` names it or
/// `If-Modified-Since` is its `Last-Modified`, `412` when `If-Match` does
/// not name it or `If-Unmodified-Since` is another date, else the page
/// (the `n`th call's).
fn conditional_answer(headers: &HeaderMap, n: u64, cache_control: &'static str) -> Response<Body> {
    let field = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let status = if let Some(tags) = field(header::IF_NONE_MATCH) {
        if tags == "\"v1\"" {
            StatusCode::NOT_MODIFIED
        } else {
            StatusCode::OK
        }
    } else if field(header::IF_MODIFIED_SINCE) == Some(LAST_MODIFIED) {
        StatusCode::NOT_MODIFIED
    } else if field(header::IF_MATCH).is_some_and(|tags| tags != "\"v1\"")
        || field(header::IF_UNMODIFIED_SINCE).is_some_and(|date| date != LAST_MODIFIED)
    {
        StatusCode::PRECONDITION_FAILED
    } else {
        StatusCode::OK
    };
    let body = if status == StatusCode::OK {
        Body::from(format!("conditional-v{n}"))
    } else {
        Body::empty()
    };
    Response::builder()
        .status(status)
        .header("cache-control", cache_control)
        .header("etag", "\"v1\"")
        .header("last-modified", LAST_MODIFIED)
        .body(body)
        .unwrap()
}

struct Fixture {
    redis: TestRedis,
    origin: Origin,
    app: Router,
    layer: CacheLayer,
}

async fn fixture(configure: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder) -> Fixture {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let origin = Origin::default();
    let layer = configure(CacheLayer::builder(manager)).build().unwrap();
    let app = routes(origin.clone()).layer(layer.clone());
    Fixture {
        redis,
        origin,
        app,
        layer,
    }
}

async fn get(app: &Router, path: &str, headers: &[(&str, &str)]) -> Answer {
    call(app, request(path, headers)).await
}

/// Item 2. An absolute-form request names one host in its target and
/// another in `Host`; the origin (like axum's `Host` extractor and the proxy
/// example) builds links from `Host`. Keyed under the target's host, the
/// attacker's page would be served to everyone who asks for that host.
#[tokio::test]
async fn cache_poisoning_via_an_absolute_uri_whose_authority_disagrees_with_host() {
    let f = fixture(|b| b).await;
    let attack = || {
        Request::get("http://shop.example/reflect-host")
            .header(header::HOST, "evil.example")
            .body(Body::empty())
            .unwrap()
    };
    let attacker = call(&f.app, attack()).await;
    assert!(
        attacker.body.contains("evil.example"),
        "the origin reflects Host"
    );
    assert!(
        !attacker.cache_status().contains("stored"),
        "{}",
        attacker.cache_status()
    );
    settle(&f.layer).await;
    let victim = get(&f.app, "/reflect-host", &[]).await;
    assert!(
        victim.body.contains("shop.example"),
        "the attacker's page was served from the cache: {} ({})",
        victim.body,
        victim.cache_status()
    );
    settle(&f.layer).await;
    assert!(
        get(&f.app, "/reflect-host", &[])
            .await
            .cache_status()
            .contains("hit")
    );
    // Such a request is never answered from the cache either: it goes to
    // the origin, which sees the same disagreement the cache saw.
    let calls = f.origin.calls("/reflect-host");
    let again = call(&f.app, attack()).await;
    assert!(again.body.contains("evil.example"), "{}", again.body);
    assert!(
        !again.cache_status().contains("hit"),
        "{}",
        again.cache_status()
    );
    assert_eq!(f.origin.calls("/reflect-host"), calls + 1);
    // Agreeing absolute-form requests (and case differences) are cached.
    let agreeing = Request::get("http://shop.example/reflect-host")
        .header(header::HOST, "Shop.Example")
        .body(Body::empty())
        .unwrap();
    assert!(call(&f.app, agreeing).await.cache_status().contains("hit"));
}

/// `Route::key_cookie` read the cookie otherwise than the app: the first
/// pair whose untrimmed name was the cookie's, a missing and an empty
/// value alike. A request the app reads differently from the key filled
/// the variant of other requests: `currency=USD; currency=EUR` (keyed
/// `USD`, rendered `EUR`) the page of `currency=USD`; `currency =EUR` and
/// `%63urrency=EUR` (keyed as no cookie) the page of every visitor without
/// the cookie; `currency=` (empty) the page of no cookie. Now a cookie a
/// parser could read otherwise makes the request bypass the cache (it is
/// neither stored nor answered from it), and empty is a variant of its own.
#[tokio::test]
async fn cache_poisoning_via_a_key_cookie_the_app_reads_otherwise() {
    let f = fixture(|b| b.route(Route::new("*").key_cookie("currency"))).await;
    // The attacker's cookie, what the app reads in it, whether it bypasses
    // the cache, and the victim's cookie.
    let cases = [
        (
            "currency=USD; currency=EUR",
            "EUR",
            true,
            Some("currency=USD"),
        ),
        ("currency =EUR", "EUR", true, None),
        ("%63urrency=EUR", "EUR", true, None),
        ("currency=", "", false, None),
    ];
    for (i, (attack, read, bypasses, victim)) in cases.into_iter().enumerate() {
        let path = format!("/prices/{i}");
        let attacker = get(&f.app, &path, &[("cookie", attack)]).await;
        assert_eq!(attacker.body, format!("currency={read} tenant=(none)"));
        assert_eq!(
            attacker.cache_status().contains("stored"),
            !bypasses,
            "{attack:?}: {}",
            attacker.cache_status()
        );
        settle(&f.layer).await;
        let victim_fields: Vec<(&str, &str)> = victim.map(|c| ("cookie", c)).into_iter().collect();
        let expected = victim.map_or("(none)", |_| "USD");
        for round in ["stored", "hit"] {
            let answer = get(&f.app, &path, &victim_fields).await;
            assert_eq!(
                answer.body,
                format!("currency={expected} tenant=(none)"),
                "{attack:?} filled the entry of {victim:?}: {}",
                answer.cache_status()
            );
            assert!(
                answer.cache_status().contains(round),
                "{attack:?}, then {victim:?}: {}",
                answer.cache_status()
            );
            settle(&f.layer).await;
        }
        // Nor is the attacker answered with the victim's entry.
        let again = get(&f.app, &path, &[("cookie", attack)]).await;
        assert_eq!(
            again.body,
            format!("currency={read} tenant=(none)"),
            "{attack:?}: {}",
            again.cache_status()
        );
    }
}

/// `Route::key_header` keyed a header sent empty like no header: an app
/// that tells them apart (`None` and `Some("")` from `HeaderMap::get`)
/// had the answer to an empty header served to every request without it.
#[tokio::test]
async fn cache_poisoning_via_an_empty_key_header() {
    let f = fixture(|b| b.route(Route::new("*").key_header("x-tenant"))).await;
    let attacker = get(&f.app, "/prices/empty", &[("x-tenant", "")]).await;
    assert_eq!(attacker.body, "currency=(none) tenant=");
    settle(&f.layer).await;
    for round in ["stored", "hit"] {
        let answer = get(&f.app, "/prices/empty", &[]).await;
        assert_eq!(
            answer.body,
            "currency=(none) tenant=(none)",
            "the empty header's page was served: {}",
            answer.cache_status()
        );
        assert!(
            answer.cache_status().contains(round),
            "{}",
            answer.cache_status()
        );
        settle(&f.layer).await;
    }
    let again = get(&f.app, "/prices/empty", &[("x-tenant", "")]).await;
    assert_eq!(again.body, "currency=(none) tenant=");
    assert!(
        again.cache_status().contains("hit"),
        "{}",
        again.cache_status()
    );
}

fn fat_get(method: &str, body: Body, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri("/echo-body")
        .header(header::HOST, "shop.example");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(body).unwrap()
}

/// A body of unknown length that is not known to be empty.
struct UnknownLength(Option<Bytes>);

impl http_body::Body for UnknownLength {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|c| Ok(Frame::data(c))))
    }
}

/// Item 4. A GET (or HEAD) with a body is keyed without its body: an origin
/// that reads the body would have the attacker's answer stored for the URL.
#[tokio::test]
async fn cache_poisoning_via_a_get_with_a_body() {
    let f = fixture(|b| b).await;
    let attacker = call(
        &f.app,
        fat_get("GET", Body::from("poison"), &[("content-length", "6")]),
    )
    .await;
    assert_eq!(attacker.body, "you sent: poison");
    assert!(
        !attacker.cache_status().contains("stored"),
        "{}",
        attacker.cache_status()
    );
    settle(&f.layer).await;
    let victim = get(&f.app, "/echo-body", &[]).await;
    assert_eq!(
        victim.body,
        "you sent: ",
        "the attacker's answer was served from the cache ({})",
        victim.cache_status()
    );
    settle(&f.layer).await;
    assert!(
        get(&f.app, "/echo-body", &[])
            .await
            .cache_status()
            .contains("hit")
    );
    // With a clean entry stored, requests with a body are still not
    // answered from it: chunked, HTTP/2 without a length, HEAD.
    let calls = f.origin.calls("/echo-body");
    let chunked = call(
        &f.app,
        fat_get("GET", Body::from("x"), &[("transfer-encoding", "chunked")]),
    )
    .await;
    assert_eq!(chunked.body, "you sent: x", "{}", chunked.cache_status());
    let mut h2 = fat_get(
        "GET",
        Body::new(UnknownLength(Some(Bytes::from_static(b"y")))),
        &[],
    );
    *h2.version_mut() = Version::HTTP_2;
    let h2 = call(&f.app, h2).await;
    assert_eq!(h2.body, "you sent: y", "{}", h2.cache_status());
    let head = call(
        &f.app,
        fat_get("HEAD", Body::from("z"), &[("content-length", "1")]),
    )
    .await;
    assert!(
        !head.cache_status().contains("hit"),
        "{}",
        head.cache_status()
    );
    assert_eq!(f.origin.calls("/echo-body"), calls + 3);
    // A bodiless HTTP/2 GET and a `Content-Length: 0` GET are still hits.
    let mut empty_h2 = fat_get("GET", Body::empty(), &[]);
    *empty_h2.version_mut() = Version::HTTP_2;
    assert!(call(&f.app, empty_h2).await.cache_status().contains("hit"));
    let zero = fat_get("GET", Body::empty(), &[("content-length", "0")]);
    assert!(call(&f.app, zero).await.cache_status().contains("hit"));
}

/// Item 5. The prefix index dropped the query while the purge target kept
/// it: a URL whose query holds a `/` could never be purged by path.
#[tokio::test]
async fn a_url_whose_query_holds_a_slash_survives_a_purge_of_that_url() {
    let f = fixture(|b| b).await;
    let target = "/search?q=a/b";
    get(&f.app, target, &[]).await;
    settle(&f.layer).await;
    assert!(
        get(&f.app, target, &[])
            .await
            .cache_status()
            .contains("hit")
    );
    let purged = f.layer.handle().purge_url(target).await.unwrap();
    assert_eq!(purged.urls, 1, "{purged:?}");
    let after = get(&f.app, target, &[]).await;
    assert!(
        after.cache_status().contains("fwd=uri-miss"),
        "{}",
        after.cache_status()
    );
}

/// Item 5, as a property over URL shapes: store, then purge the same URL
/// (as a path, then as an absolute URL), and it is gone.
#[test]
fn store_then_purge_the_same_url_removes_it() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let f = runtime.block_on(fixture(|b| b.prefix_index_depth(3)));
    // Path segments and query text as clients write them; the query may
    // hold `/`, `?`, `=`, `&`, `;`, `:`, `@` and percent-escapes.
    let segment = "[a-z0-9._~-]{1,6}|%2[fF]|[a-z]{1,3}%20[a-z]";
    let query = "([a-z0-9/?:@._~!$'()*+,;=-]|%2F|%3F|%26){0,24}";
    let shapes = (
        proptest::collection::vec(proptest::string::string_regex(segment).unwrap(), 0..6),
        any::<bool>(),
        proptest::option::of(proptest::string::string_regex(query).unwrap()),
    );
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&shapes, |(segments, trailing_slash, query)| {
            let mut path = format!("/{}", segments.join("/"));
            if trailing_slash && !segments.is_empty() {
                path.push('/');
            }
            let target = match &query {
                Some(query) => format!("{path}?{query}"),
                None => path.clone(),
            };
            runtime.block_on(async {
                for purge_with in [target.clone(), format!("http://shop.example{target}")] {
                    let stored = get(&f.app, &target, &[]).await;
                    prop_assert!(stored.status == 200, "{target}: {}", stored.status);
                    settle(&f.layer).await;
                    let hit = get(&f.app, &target, &[]).await;
                    prop_assert!(
                        hit.cache_status().contains("hit"),
                        "{target}: {}",
                        hit.cache_status()
                    );
                    let purged = f.layer.handle().purge_url(&purge_with).await.unwrap();
                    prop_assert_eq!(purged.urls, 1, "purge of {} for {}", purge_with, target);
                    let after = get(&f.app, &target, &[]).await;
                    prop_assert!(
                        after.cache_status().contains("fwd=uri-miss"),
                        "{} still cached after purging {}: {}",
                        target,
                        purge_with,
                        after.cache_status()
                    );
                    settle(&f.layer).await;
                    f.layer.handle().purge_all().await;
                }
                Ok(())
            })
        })
        .unwrap();
}

/// Item 9. A client that reads one byte every 100 ms got the first miss at
/// expiry: the entry was stored, and the followers woken, only once that
/// client had read the whole body; `flush()` waited for it too.
#[tokio::test]
async fn a_slow_reader_holds_coalesced_followers_and_flush_hostage() {
    let f = fixture(|b| b).await;
    let response = f
        .app
        .clone()
        .oneshot(request("/one-byte-frames", &[]))
        .await
        .unwrap();
    assert!(
        response.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("stored")
    );
    // The slow reader: reads the first byte, then reads nothing more until
    // the test releases it, so every check below happens while it is
    // provably still reading (no wall-clock bound to miss under load).
    let (first_byte, first_byte_read) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut body = response.into_body();
        let mut read = Vec::new();
        let (mut first_byte, mut released) = (Some(first_byte), Some(released));
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                read.extend_from_slice(&data);
                if let Some(first_byte) = first_byte.take() {
                    let _ = first_byte.send(());
                }
                if let Some(released) = released.take() {
                    let _ = released.await;
                }
            }
        }
        read
    });
    tokio::time::timeout(Duration::from_secs(10), first_byte_read)
        .await
        .expect("the slow reader gets its first byte within 10 s")
        .expect("the slow reader's first byte");
    // Followers arriving while it reads are answered from the entry, without
    // waiting for it: it reads nothing more until released.
    let mut followers = Vec::new();
    for _ in 0..5 {
        let app = f.app.clone();
        followers.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer =
                tokio::time::timeout(Duration::from_secs(10), get(&app, "/one-byte-frames", &[]))
                    .await
                    .ok();
            (answer, started.elapsed())
        }));
    }
    for follower in followers {
        let (answer, waited) = follower.await.unwrap();
        let answer = answer.unwrap_or_else(|| {
            panic!("a follower waited {waited:?} for the slow reader (no answer within 10 s)")
        });
        assert_eq!(answer.body, SLOW_BODY);
        assert!(
            answer.cache_status().contains("hit"),
            "{}",
            answer.cache_status()
        );
    }
    tokio::time::timeout(Duration::from_secs(10), f.layer.flush())
        .await
        .expect("flush() waited for the slow reader");
    assert!(
        !reader.is_finished(),
        "the test must finish its checks while the reader still reads"
    );
    assert_eq!(f.origin.calls("/one-byte-frames"), 1);
    release.send(()).expect("the slow reader is still reading");
    let read = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the slow reader never finished")
        .unwrap();
    assert_eq!(
        read,
        SLOW_BODY.as_bytes(),
        "the slow reader gets the whole body"
    );
}

/// Item 9, the other side: a client that goes away before the origin has
/// sent the whole body leaves no entry, and the origin body is dropped.
#[tokio::test]
async fn a_client_that_leaves_before_the_origin_body_ends_leaves_no_entry() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = CacheLayer::builder(manager).build().unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    let receiver = Arc::new(tokio::sync::Mutex::new(Some(receiver)));
    let app = Router::new()
        .route(
            "/endless",
            routing::get(move || {
                let receiver = Arc::clone(&receiver);
                async move {
                    let receiver = receiver.lock().await.take().unwrap();
                    let stream = tokio_stream_of(receiver);
                    cacheable(Body::from_stream(stream))
                }
            }),
        )
        .layer(layer.clone());
    let response = app.oneshot(request("/endless", &[])).await.unwrap();
    sender.send(Bytes::from_static(b"first;")).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first;");
    drop(body);
    // The origin body is dropped (its sender sees the channel close) and
    // nothing is stored; flush() does not wait for the endless origin.
    tokio::time::timeout(Duration::from_secs(5), sender.closed())
        .await
        .expect("the origin body was kept after the client left");
    settle(&layer).await;
    let mut conn = redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:c:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

fn tokio_stream_of(
    mut receiver: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx).map(|b| b.map(Ok)))
}

/// The node of a cluster that holds `key`: the one that answers a keyed
/// read without a redirection.
async fn node_of(cluster: &TestCluster, key: &str) -> String {
    for url in cluster.urls() {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let owned: redis::RedisResult<i64> =
            redis::cmd("EXISTS").arg(key).query_async(&mut conn).await;
        if owned.is_ok() {
            return url;
        }
    }
    panic!("no node owns {key}");
}

async fn node_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Item 10. On a cluster the write batch went out as concurrent commands,
/// the `PUBLISH` among them: a subscriber (a near cache, a waiting
/// instance) could hear of the update and read the key before the write
/// had happened. Here the entry's node holds writes for a moment (`CLIENT
/// PAUSE … WRITE`); the announcement, routed to the channel's node, must
/// still come after the write.
#[tokio::test]
async fn a_cluster_update_announcement_can_overtake_its_write() {
    let cluster = TestCluster::start().await;
    let config: RedisConfigBuilder = cluster.config().command_timeout(Duration::from_secs(3));
    let manager = RedisManager::connect(config.build().unwrap())
        .await
        .unwrap();
    let origin = Origin::default();
    let layer = CacheLayer::builder(manager.clone())
        .coalesce(None)
        .build()
        .unwrap();
    let app = routes(origin.clone()).layer(layer.clone());
    let channel = "tower-redis:cache-events";
    let channel_node = node_of(&cluster, channel).await;
    // Pick URLs whose entries live on another node than the channel.
    let mut candidates = Vec::new();
    for i in 0..40 {
        let path = format!("/pause-writes?n={i}");
        let url_hash = url_hash(&format!("//shop.example{path}"));
        let key = manager.keys().key(&["c", &url_hash]);
        let node = node_of(&cluster, &key).await;
        if node != channel_node {
            candidates.push((path, key, node));
        }
        if candidates.len() == 3 {
            break;
        }
    }
    assert_eq!(candidates.len(), 3);
    let mut pubsub = redis::Client::open(channel_node.as_str())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub.subscribe(channel).await.unwrap();
    let mut messages = pubsub.into_on_message();
    let (hook, mut hooked) = tokio::sync::mpsc::unbounded_channel();
    *origin.before_answer.lock().unwrap() = Some(hook);
    for (path, key, node) in &candidates {
        let mut entry_node = node_connection(node).await;
        // The origin answers; just before the cache writes, the entry's
        // node stops taking writes for 300 ms.
        let app = app.clone();
        let path = path.clone();
        let answer = tokio::spawn(async move { get(&app, &path, &[]).await });
        tokio::time::timeout(Duration::from_secs(5), hooked.recv())
            .await
            .unwrap()
            .unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(300)
            .arg("WRITE")
            .query_async(&mut entry_node)
            .await
            .unwrap();
        assert_eq!(answer.await.unwrap().status, 200);
        // On the announcement, the entry must already be readable.
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("no announcement")
            .unwrap();
        let announced: String = message.get_payload().unwrap();
        assert!(announced.starts_with("u "), "{announced}");
        let stored: bool = redis::cmd("HEXISTS")
            .arg(key)
            .arg("vary")
            .query_async(&mut entry_node)
            .await
            .unwrap();
        assert!(
            stored,
            "the announcement for {key} arrived before its write"
        );
        settle(&layer).await;
        // A purge's announcement, too, comes after the delete.
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(300)
            .arg("WRITE")
            .query_async(&mut entry_node)
            .await
            .unwrap();
        let handle = layer.handle();
        let absolute = format!("http://shop.example{}", candidates_path(key, &candidates));
        let purge = tokio::spawn(async move { handle.purge_url(&absolute).await });
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("no announcement")
            .unwrap();
        let announced: String = message.get_payload().unwrap();
        assert!(announced.starts_with("u "), "{announced}");
        // A purged URL's hash is a tombstone: no `vary`, no entry.
        let still_there: bool = redis::cmd("HEXISTS")
            .arg(key)
            .arg("vary")
            .query_async(&mut entry_node)
            .await
            .unwrap();
        assert!(
            !still_there,
            "the purge announcement for {key} arrived before its delete"
        );
        assert_eq!(purge.await.unwrap().unwrap().urls, 1);
    }
}

fn candidates_path<'a>(key: &str, candidates: &'a [(String, String, String)]) -> &'a str {
    &candidates.iter().find(|(_, k, _)| k == key).unwrap().0
}

/// The cache's name for a URL (`key::hash_url`): base64url of its SHA-256.
fn url_hash(url: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(url.as_bytes()))
}

async fn concurrent(app: &Router, n: usize, path: &str, headers: &[(&str, &str)]) -> Vec<Answer> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let app = app.clone();
        let path = path.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            get(&app, &path, &headers).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// Item 15. `Cache-Control: no-cache` (or `Pragma: no-cache`) from any
/// client forces a revalidation, and revalidations were not coalesced: a
/// client could turn every one of its requests into an origin request, in
/// parallel.
#[tokio::test]
async fn origin_flood_via_concurrent_no_cache_requests() {
    let f = fixture(|b| b).await;
    get(&f.app, "/slow", &[]).await;
    settle(&f.layer).await;
    // The revalidation answers once all ten requests have looked up the
    // entry, so the other nine are in the layer while it is under way.
    let gate = LookupGate::new(&f.redis);
    *f.origin.hold.lock().unwrap() = Some(gate.clone());
    for directive in [("cache-control", "no-cache"), ("pragma", "no-cache")] {
        let before = f.origin.calls("/slow");
        gate.expect_lookups(10).await;
        let answers = concurrent(&f.app, 10, "/slow", &[directive]).await;
        for answer in &answers {
            assert_eq!(answer.status, 200);
            assert!(answer.body.starts_with("slow-v"), "{}", answer.body);
        }
        let statuses: Vec<&str> = answers.iter().map(Answer::cache_status).collect();
        assert_eq!(
            f.origin.calls("/slow"),
            before + 1,
            "{directive:?}: one revalidation for ten requests: {statuses:?}"
        );
        assert_eq!(
            gate.gave_up(),
            0,
            "{directive:?}: the ten requests never all looked up the entry while the revalidation was under way"
        );
        settle(&f.layer).await;
    }
}

/// A cache layer on `redis` with its defaults, a count of the origin's
/// calls for its handler to keep, and a gate for the handler to hold
/// revalidations at until the requests have all looked up the entry.
async fn counted_and_gated(redis: &TestRedis) -> (CacheLayer, Arc<AtomicU64>, LookupGate) {
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = CacheLayer::builder(manager).build().unwrap();
    (layer, Arc::new(AtomicU64::new(0)), LookupGate::new(redis))
}

/// Item 15, on a stale entry: the revalidations at expiry are coalesced too.
#[tokio::test]
async fn origin_flood_via_concurrent_requests_for_a_stale_entry() {
    let redis = TestRedis::start().await;
    // The revalidation answers once all ten requests have looked up the
    // stale entry, so the other nine are in the layer while it is under way.
    let (layer, calls, gate) = counted_and_gated(&redis).await;
    let (counted, held) = (Arc::clone(&calls), gate.clone());
    let app = Router::new()
        .route(
            "/short",
            routing::get(move || {
                let (calls, held) = (Arc::clone(&counted), held.clone());
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if n > 1 {
                        held.pass().await;
                    }
                    Response::builder()
                        .header("cache-control", "max-age=1")
                        .header("etag", "\"same\"")
                        .body(Body::from(format!("short-v{n}")))
                        .unwrap()
                }
            }),
        )
        .layer(layer.clone());
    get(&app, "/short", &[]).await;
    settle(&layer).await;
    wait_until_stale(&layer, "http://shop.example/short").await;
    gate.expect_lookups(10).await;
    let answers = concurrent(&app, 10, "/short", &[]).await;
    let statuses: Vec<&str> = answers.iter().map(Answer::cache_status).collect();
    for answer in &answers {
        assert_eq!(answer.body, "short-v2", "{statuses:?}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{statuses:?}");
    assert_eq!(gate.gave_up(), 0, "the ten requests never overlapped");
}

/// A request its origin rejects for something of its own (a header the
/// app refuses: `400`, no freshness) used to mark the URL uncacheable when
/// it led a revalidation, which switched coalescing off for every client
/// for 10 s: one such `no-cache` request every 10 s let the next herd
/// through to the origin. A client error that does not describe the URL
/// leaves coalescing on.
#[tokio::test]
async fn a_request_the_origin_rejects_does_not_turn_off_coalescing() {
    let redis = TestRedis::start().await;
    // The revalidation answers once all ten requests have looked up the
    // entry, so the other nine are in the layer while it is under way.
    let (layer, calls, gate) = counted_and_gated(&redis).await;
    let (counted, held) = (Arc::clone(&calls), gate.clone());
    let app = Router::new()
        .route(
            "/guarded",
            routing::get(move |headers: http::HeaderMap| {
                let (calls, held) = (Arc::clone(&counted), held.clone());
                async move {
                    if headers.contains_key("x-bad") {
                        return Response::builder()
                            .status(400)
                            .body(Body::from("bad request"))
                            .unwrap();
                    }
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if n > 1 {
                        held.pass().await;
                    }
                    Response::builder()
                        .header("cache-control", "max-age=600")
                        .header("etag", "\"same\"")
                        .body(Body::from(format!("guarded-v{n}")))
                        .unwrap()
                }
            }),
        )
        .layer(layer.clone());
    get(&app, "/guarded", &[]).await;
    settle(&layer).await;
    let rejected = get(
        &app,
        "/guarded",
        &[("cache-control", "no-cache"), ("x-bad", "1")],
    )
    .await;
    assert_eq!(rejected.status, 400);
    gate.expect_lookups(10).await;
    let answers = concurrent(&app, 10, "/guarded", &[("cache-control", "no-cache")]).await;
    let statuses: Vec<&str> = answers.iter().map(Answer::cache_status).collect();
    for answer in &answers {
        assert_eq!(answer.body, "guarded-v2", "{statuses:?}");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one revalidation for ten requests: {statuses:?}"
    );
    assert_eq!(gate.gave_up(), 0, "the ten requests never overlapped");
}

/// Item 15, the layer option: request cache directives from clients can
/// be ignored (the proxy example does), so `no-cache` is a plain hit.
#[tokio::test]
async fn request_cache_directives_can_be_ignored() {
    let f = fixture(|b| b.request_cache_control(RequestCacheControl::Ignore)).await;
    get(&f.app, "/slow", &[]).await;
    settle(&f.layer).await;
    for directive in [
        ("cache-control", "no-cache"),
        ("pragma", "no-cache"),
        ("cache-control", "max-age=0"),
        ("cache-control", "no-store"),
    ] {
        let answer = get(&f.app, "/slow", &[directive]).await;
        assert!(
            answer.cache_status().contains("hit"),
            "{directive:?}: {}",
            answer.cache_status()
        );
    }
    // Ignored on the way in too: a no-store request's answer is stored.
    let answer = get(&f.app, "/fallback-page", &[("cache-control", "no-store")]).await;
    assert!(
        answer.cache_status().contains("stored"),
        "{}",
        answer.cache_status()
    );
    assert_eq!(f.origin.calls("/slow"), 1);
}

/// Item 16. A request that carries an unkeyed header (here
/// `X-Forwarded-Host`) is refused storage because of itself; when it led
/// the coalesced fill, the URL was marked uncacheable for everyone for
/// 10 s, and the others queued behind it for nothing.
#[tokio::test]
async fn a_request_with_an_unkeyed_header_turns_off_coalescing_for_everyone() {
    let f = fixture(|b| b).await;
    f.origin.delay_ms.store(200, Ordering::SeqCst);
    // One after the other: the refusal must not switch coalescing off.
    let attacker = get(&f.app, "/slow", &[("x-forwarded-host", "evil.example")]).await;
    assert!(
        !attacker.cache_status().contains("stored"),
        "{}",
        attacker.cache_status()
    );
    settle(&f.layer).await;
    let answers = concurrent(&f.app, 10, "/slow", &[]).await;
    let statuses: Vec<&str> = answers.iter().map(Answer::cache_status).collect();
    assert_eq!(f.origin.calls("/slow"), 2, "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| s.contains("stored")).count(),
        1,
        "{statuses:?}"
    );
    settle(&f.layer).await;
    assert!(
        get(&f.app, "/slow", &[])
            .await
            .cache_status()
            .contains("hit")
    );

    // At the same time: the others do not wait for the attacker's answer.
    let app = f.app.clone();
    let attacker =
        tokio::spawn(
            async move { get(&app, "/other", &[("x-forwarded-host", "evil.example")]).await },
        );
    // The attacker is at the origin before the others start.
    f.origin.wait_for_calls("/other", 1).await;
    let answers = concurrent(&f.app, 10, "/other", &[]).await;
    let statuses: Vec<&str> = answers.iter().map(Answer::cache_status).collect();
    assert!(
        !attacker.await.unwrap().cache_status().contains("stored"),
        "{statuses:?}"
    );
    assert_eq!(
        f.origin.calls("/other"),
        2,
        "the attacker and one fill for the others: {statuses:?}"
    );
}

/// Item 15, when the origin fails: the requests coalesced on a
/// revalidation that fails serve their stale entry (`stale-if-error`)
/// instead of each asking the failing origin again.
#[tokio::test]
async fn origin_flood_via_concurrent_requests_while_the_origin_fails() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = CacheLayer::builder(manager).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    // The failing revalidation answers once all ten requests have looked up
    // the stale entry, so the other nine are in the layer meanwhile.
    let gate = LookupGate::new(&redis);
    let held = gate.clone();
    let app = Router::new()
        .route(
            "/failing",
            routing::get(move || {
                let (calls, held) = (Arc::clone(&counted), held.clone());
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        return Response::builder()
                            .header("cache-control", "max-age=1, stale-if-error=300")
                            .body(Body::from("good"))
                            .unwrap();
                    }
                    held.pass().await;
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(Body::from("down"))
                        .unwrap()
                }
            }),
        )
        .layer(layer.clone());
    get(&app, "/failing", &[]).await;
    settle(&layer).await;
    wait_until_stale(&layer, "http://shop.example/failing").await;
    gate.expect_lookups(10).await;
    let answers = concurrent(&app, 10, "/failing", &[]).await;
    let statuses: Vec<&str> = answers.iter().map(Answer::cache_status).collect();
    for answer in &answers {
        assert_eq!(answer.body, "good", "{statuses:?}");
        assert!(
            answer.cache_status().contains("stale-if-error"),
            "{statuses:?}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{statuses:?}");
    assert_eq!(gate.gave_up(), 0, "the ten requests never overlapped");
}

/// Item 16, the other side: a refusal because of the request no longer
/// switches coalescing off for the URL, so requests whose answers are
/// refused because of themselves (here `Authorization` with an answer not
/// marked shareable) must not lead fills either, or every concurrent one
/// would wait for a leader whose answer cannot be shared.
#[tokio::test]
async fn authorised_requests_do_not_queue_behind_each_other() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = CacheLayer::builder(manager).build().unwrap();
    let in_flight = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    // Once armed, each call stays in the handler until all 10 concurrent
    // ones have arrived (or the shared deadline below passes): all 10 in flight
    // at once is then an event, not a 200 ms overlap to hit under load.
    // Counted monotonically, so no waiter can miss the moment.
    let arrived = Arc::new(tokio::sync::watch::Sender::new(0_u64));
    let gate: Arc<std::sync::OnceLock<tokio::time::Instant>> = Arc::default();
    let (now, peak, counted) = (
        Arc::clone(&in_flight),
        Arc::clone(&most),
        Arc::clone(&calls),
    );
    let (arrivals, armed) = (Arc::clone(&arrived), Arc::clone(&gate));
    let app = Router::new()
        .route(
            "/api",
            routing::get(move || {
                let (now, peak, counted) =
                    (Arc::clone(&now), Arc::clone(&peak), Arc::clone(&counted));
                let (arrivals, armed) = (Arc::clone(&arrivals), Arc::clone(&armed));
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(current, Ordering::SeqCst);
                    if let Some(deadline) = armed.get() {
                        let mut all_here = arrivals.subscribe();
                        arrivals.send_modify(|n| *n += 1);
                        let _ = tokio::time::timeout_at(*deadline, all_here.wait_for(|n| *n >= 10))
                            .await;
                    }
                    now.fetch_sub(1, Ordering::SeqCst);
                    // Shared-cacheable, but not for an authorised request.
                    cacheable("for you")
                }
            }),
        )
        .layer(layer.clone());
    let token = [("authorization", "Bearer t")];
    assert!(
        !get(&app, "/api", &token)
            .await
            .cache_status()
            .contains("stored")
    );
    settle(&layer).await;
    most.store(0, Ordering::SeqCst);
    // 4 s: shorter than the layer's coalescing wait (5 s by default), so
    // that requests wrongly queued behind a leader cannot reach the gate by
    // giving up their wait; long enough for a loaded machine to get all ten
    // there.
    gate.set(tokio::time::Instant::now() + Duration::from_secs(4))
        .expect("armed once");
    let answers = concurrent(&app, 10, "/api", &token).await;
    let statuses: Vec<&str> = answers.iter().map(Answer::cache_status).collect();
    assert_eq!(calls.load(Ordering::SeqCst), 11, "{statuses:?}");
    assert_eq!(most.load(Ordering::SeqCst), 10, "{statuses:?}");
}

/// An origin that reads fields through CGI-style names (PHP's `$_SERVER`)
/// takes `X_Tenant` for `X-Tenant` and `X_Forwarded_Host` for
/// `X-Forwarded-Host`. A page it rendered for such a spelling must not be
/// stored: the key would file it under the field's absence (`Vary`, a key
/// header) or miss the unkeyed field altogether.
#[tokio::test]
async fn cache_poisoning_via_an_underscore_spelling_of_a_field() {
    let f = fixture(|b| b.route(Route::new("/cgi/keyed").key_header("x-tenant"))).await;
    for (case, name, value, seen) in [
        ("vary", "x_tenant", "evil", "tenant=evil host=(none)"),
        ("keyed", "x_tenant", "evil", "tenant=evil host=(none)"),
        (
            "unkeyed",
            "x_forwarded_host",
            "evil.example",
            "tenant=(none) host=evil.example",
        ),
    ] {
        let path = format!("/cgi/{case}");
        let attacker = get(&f.app, &path, &[(name, value)]).await;
        assert_eq!(attacker.body, seen, "{case}: the origin reads the spelling");
        assert!(
            !attacker.cache_status().contains("stored"),
            "{case}: {}",
            attacker.cache_status()
        );
        settle(&f.layer).await;
        let victim = get(&f.app, &path, &[]).await;
        assert_eq!(
            victim.body,
            "tenant=(none) host=(none)",
            "{case}: {}",
            victim.cache_status()
        );
    }
    // Fields with `_` that spell nothing the answer depends on change nothing.
    let plain = get(&f.app, "/cgi/other", &[("x_request_id", "1")]).await;
    assert!(
        plain.cache_status().contains("stored"),
        "{}",
        plain.cache_status()
    );
}

/// The same spelling on a revalidation: the origin's `304` (for
/// `X_Tenant: evil`, read as `X-Tenant`) used to refresh the stored
/// answer of the field's absence with its fields and freshness, as a
/// `200` for the spelling was already kept from being stored.
#[tokio::test]
async fn a_304_for_an_underscore_spelling_does_not_refresh_the_absent_variant() {
    let redis = TestRedis::start().await;
    let (layer, calls, _) = counted_and_gated(&redis).await;
    let counted = Arc::clone(&calls);
    let app = Router::new()
        .route(
            "/tenant",
            routing::get(move |headers: HeaderMap| {
                let calls = Arc::clone(&counted);
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let builder = Response::builder()
                        .header("vary", "x-tenant")
                        .header("etag", "\"v1\"");
                    if headers.get("if-none-match").is_some_and(|v| v == "\"v1\"") {
                        return builder
                            .status(304)
                            .header("cache-control", "max-age=600")
                            .body(Body::empty())
                            .unwrap();
                    }
                    builder
                        .header("cache-control", "max-age=1")
                        .body(Body::from("tenant=(none)"))
                        .unwrap()
                }
            }),
        )
        .layer(layer.clone());
    get(&app, "/tenant", &[]).await;
    settle(&layer).await;
    wait_until_stale(&layer, "http://shop.example/tenant").await;
    let spelled = get(&app, "/tenant", &[("x_tenant", "evil")]).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "{}",
        spelled.cache_status()
    );
    assert!(
        !spelled.cache_status().contains("stored"),
        "{}",
        spelled.cache_status()
    );
    settle(&layer).await;
    // The absent variant is as stale as before: revalidated again.
    let plain = get(&app, "/tenant", &[]).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "{}", plain.cache_status());
}

/// A conditional request on a miss led the fill with its conditionals: the
/// origin's `304` (or `412`) is not storable, which marked the URL
/// uncacheable and switched coalescing off for it for 10 s, so one request
/// with `If-None-Match` sent every request of the next 10 s to the origin
/// (here 21 origin calls for 21 requests). The leader now asks the origin
/// for the whole page, stores it and answers its client's conditionals from
/// it: `304` for `If-None-Match` / `If-Modified-Since` that match (as a hit
/// does), the page for `If-Match` / `If-Unmodified-Since` (which a cache
/// may ignore, and a hit does).
#[tokio::test]
async fn a_conditional_request_on_a_miss_turns_off_coalescing_for_everyone() {
    let f = fixture(|b| b).await;
    f.origin.delay_ms.store(100, Ordering::SeqCst);
    let stale = "Sun, 01 Jan 2023 00:00:00 GMT";
    let cases = [
        ("if-none-match", "\"v1\"", 304),
        ("if-none-match", "\"v0\"", 200),
        ("if-modified-since", LAST_MODIFIED, 304),
        ("if-match", "\"v0\"", 200),
        ("if-unmodified-since", stale, 200),
    ];
    for (i, (name, value, expected)) in cases.into_iter().enumerate() {
        // One after the other, and while the conditional one is at the
        // origin.
        for overlapping in [false, true] {
            let path = format!("/conditional/{i}-{overlapping}");
            let app = f.app.clone();
            let target = path.clone();
            let conditional =
                tokio::spawn(async move { get(&app, &target, &[(name, value)]).await });
            let (conditional, answers) = if overlapping {
                f.origin.wait_for_calls(&path, 1).await;
                let answers = concurrent(&f.app, 20, &path, &[]).await;
                (conditional.await.unwrap(), answers)
            } else {
                let conditional = conditional.await.unwrap();
                settle(&f.layer).await;
                (conditional, concurrent(&f.app, 20, &path, &[]).await)
            };
            let statuses: Vec<&str> = answers.iter().map(Answer::cache_status).collect();
            let case = format!("{name}: {value} (overlapping: {overlapping})");
            assert_eq!(f.origin.calls(&path), 1, "{case}: {statuses:?}");
            for answer in &answers {
                assert_eq!(answer.status, 200, "{case}: {statuses:?}");
                assert_eq!(answer.body, "conditional-v1", "{case}: {statuses:?}");
            }
            assert_eq!(
                conditional.status,
                expected,
                "{case}: {}",
                conditional.cache_status()
            );
            assert_eq!(conditional.header("etag"), Some("\"v1\""), "{case}");
            let body = if expected == 304 {
                ""
            } else {
                "conditional-v1"
            };
            assert_eq!(conditional.body, body, "{case}");
            assert!(
                conditional.cache_status().contains("stored"),
                "{case}: {}",
                conditional.cache_status()
            );
            settle(&f.layer).await;
        }
    }
}

/// The leader of a fill asks the origin for the whole page; when that page
/// is not stored (here it is `private`), its client's conditionals are
/// still answered as the origin would have: a `304` for a matching
/// `If-None-Match`, not the whole page.
#[tokio::test]
async fn a_conditional_request_whose_page_is_not_stored_still_gets_its_304() {
    let f = fixture(|b| b).await;
    for (i, (value, expected)) in [("\"v1\"", 304), ("\"v0\"", 200)].into_iter().enumerate() {
        let path = format!("/conditional-private/{i}");
        let answer = get(&f.app, &path, &[("if-none-match", value)]).await;
        assert_eq!(
            answer.status,
            expected,
            "{value}: {}",
            answer.cache_status()
        );
        assert_eq!(answer.header("etag"), Some("\"v1\""));
        assert_eq!(answer.body.is_empty(), expected == 304, "{value}");
        assert!(
            !answer.cache_status().contains("stored"),
            "{}",
            answer.cache_status()
        );
    }
}

/// A request whose conditionals reach the origin (one that leads no fill:
/// here coalescing is off) got its answer stored like any other: a `412`
/// to `If-Match` or `If-Unmodified-Since` that carries freshness was
/// served to every client of the URL. A `304` or `412` to a request with
/// conditionals is now a refusal because of the request: not stored, and
/// nothing is said of the URL (the next plain request stores its page).
#[tokio::test]
async fn cache_poisoning_via_a_precondition_that_fails() {
    let f = fixture(|b| b.coalesce(None)).await;
    let cases = [
        ("if-match", "\"v0\"", 412),
        ("if-unmodified-since", "Sun, 01 Jan 2023 00:00:00 GMT", 412),
        ("if-none-match", "\"v1\"", 304),
    ];
    for (i, (name, value, status)) in cases.into_iter().enumerate() {
        let path = format!("/conditional/failed-{i}");
        let attacker = get(&f.app, &path, &[(name, value)]).await;
        assert_eq!(attacker.status, status, "{name}");
        assert!(
            !attacker.cache_status().contains("stored"),
            "{name}: {}",
            attacker.cache_status()
        );
        settle(&f.layer).await;
        for round in ["stored", "hit"] {
            let answer = get(&f.app, &path, &[]).await;
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (200, "conditional-v2"),
                "{name}: {}",
                answer.cache_status()
            );
            assert!(
                answer.cache_status().contains(round),
                "{name}: {}",
                answer.cache_status()
            );
            settle(&f.layer).await;
        }
    }
}
