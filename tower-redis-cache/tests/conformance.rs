//! The RFC 9111 (and RFC 9110, RFC 9213) corners of the cache, one test per
//! behaviour, each against real Redis in front of a scripted origin. Each
//! test's doc comment names the section it checks; the crate docs'
//! conformance table points here.
//!
//! Freshness is judged by the wall clock (entries carry Redis' and the
//! origin's times), so no test waits for time to pass: staleness comes from
//! the response itself (`max-age=0`, `Age`, `Expires`, `Last-Modified`).

#![allow(clippy::unwrap_used)] // A failed setup step should fail the test loudly.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Response};
use support::{Answer, OriginCalls, send, settle};
use tower_redis_cache::{CacheLayer, CacheLayerBuilder, Route};
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{RedisConfigBuilder, RedisManager};

/// What the origin answers to its `n`th call (from 1) of a path, given the
/// request's headers.
type Script = Arc<dyn Fn(u64, &HeaderMap) -> Response<Body> + Send + Sync>;

/// An origin whose answers the test scripts per path; it counts calls and
/// keeps the headers of every request it received.
#[derive(Clone, Default)]
struct Origin {
    calls: OriginCalls,
    scripts: Arc<Mutex<HashMap<String, Script>>>,
    received: Arc<Mutex<Vec<(String, HeaderMap)>>>,
    /// How long the answers of a path take (none: at once).
    delays: Arc<Mutex<HashMap<String, Duration>>>,
}

impl Origin {
    /// The headers of the `n`th request (from 1) for `path`.
    fn request(&self, path: &str, n: usize) -> HeaderMap {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .nth(n - 1)
            .map(|(_, headers)| headers.clone())
            .unwrap_or_else(|| panic!("{path} was not called {n} times"))
    }
}

async fn answer(State(origin): State<Origin>, request: Request) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let n = origin.calls.count(&path);
    origin
        .received
        .lock()
        .unwrap()
        .push((path.clone(), request.headers().clone()));
    let script = origin.scripts.lock().unwrap().get(&path).cloned();
    let delay = origin.delays.lock().unwrap().get(&path).copied();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    match script {
        Some(script) => script(n, request.headers()),
        None => respond(404, &[], "no script"),
    }
}

fn respond(status: u16, headers: &[(&str, &str)], body: impl Into<Body>) -> Response<Body> {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, *value);
    }
    response.body(body.into()).unwrap()
}

struct Fixture {
    redis: TestRedis,
    origin: Origin,
    layer: CacheLayer,
    app: Router,
}

impl Fixture {
    /// A layer on a fresh Redis, configured by `configure`.
    async fn new(configure: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder) -> Self {
        Self::with_redis(|config| config, configure).await
    }

    /// [`new`](Self::new), with the manager's settings changed by `redis`.
    async fn with_redis(
        redis: impl FnOnce(RedisConfigBuilder) -> RedisConfigBuilder,
        configure: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder,
    ) -> Self {
        let server = TestRedis::start().await;
        let origin = Origin::default();
        let (layer, app) = Self::instance_with(&server, redis, &origin, configure).await;
        let redis = server;
        Self {
            redis,
            origin,
            layer,
            app,
        }
    }

    /// Another layer instance (its own manager and memory) on the same
    /// Redis and origin, as a second app instance would be.
    async fn instance(
        redis: &TestRedis,
        origin: &Origin,
        configure: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder,
    ) -> (CacheLayer, Router) {
        Self::instance_with(redis, |config| config, origin, configure).await
    }

    async fn instance_with(
        redis: &TestRedis,
        settings: impl FnOnce(RedisConfigBuilder) -> RedisConfigBuilder,
        origin: &Origin,
        configure: impl FnOnce(CacheLayerBuilder) -> CacheLayerBuilder,
    ) -> (CacheLayer, Router) {
        let manager = RedisManager::connect(settings(redis.config()).build().unwrap())
            .await
            .unwrap();
        let layer = configure(CacheLayer::builder(manager)).build().unwrap();
        let app = Router::new()
            .fallback(answer)
            .with_state(origin.clone())
            .layer(layer.clone());
        (layer, app)
    }

    /// Scripts `path`.
    fn on(
        &self,
        path: &str,
        script: impl Fn(u64, &HeaderMap) -> Response<Body> + Send + Sync + 'static,
    ) {
        self.origin
            .scripts
            .lock()
            .unwrap()
            .insert(path.to_owned(), Arc::new(script));
    }

    /// Scripts `path` to answer the same every time.
    fn always(&self, path: &str, status: u16, headers: &[(&str, &str)], body: &'static str) {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        self.on(path, move |_, _| {
            let pairs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            respond(status, &pairs, body)
        });
    }

    /// A GET for `path`, read whole, once whatever it stores is stored.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let answer = send(&self.app, "GET", path, headers).await;
        settle(&self.layer).await;
        answer
    }

    fn calls(&self, path: &str) -> u64 {
        self.origin.calls.calls(path)
    }
}

/// `time` as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), or, with
/// `asctime`, as `Sun Nov  6 08:49:37 1994`.
fn format_date(time: SystemTime, asctime: bool) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = time.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let days = i64::try_from(secs / 86_400).unwrap();
    let (hh, mm, ss) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = DAYS[usize::try_from(days.rem_euclid(7)).unwrap()];
    let month = MONTHS[usize::try_from(month - 1).unwrap()];
    if asctime {
        format!("{weekday} {month} {day:>2} {hh:02}:{mm:02}:{ss:02} {year}")
    } else {
        format!("{weekday}, {day:02} {month} {year} {hh:02}:{mm:02}:{ss:02} GMT")
    }
}

#[test]
fn the_date_formatter_agrees_with_the_rfc_example() {
    let example = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(format_date(example, false), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(format_date(example, true), "Sun Nov  6 08:49:37 1994");
}

fn hours_from_now(hours: i64) -> SystemTime {
    let delta = Duration::from_secs(hours.unsigned_abs() * 3600);
    if hours >= 0 {
        SystemTime::now() + delta
    } else {
        SystemTime::now() - delta
    }
}

/// RFC 9111 §5.1: an `Age` whose first member is not a delta-seconds
/// (`Age: old, 0`) makes the response stale, not 0 seconds old: its next
/// use is a revalidation. A valid first member counts, the rest is dropped.
#[tokio::test]
async fn invalid_age_makes_the_response_stale() {
    let f = Fixture::new(|b| b).await;
    let validated = |bad_age: &'static str| {
        move |_: u64, request: &HeaderMap| {
            let headers = [
                ("cache-control", "max-age=3600"),
                ("etag", "\"a\""),
                ("age", bad_age),
            ];
            if request.get("if-none-match").is_some_and(|v| v == "\"a\"") {
                return respond(304, &headers, Body::empty());
            }
            respond(200, &headers, "body")
        }
    };
    f.on("/old", validated("old, 0"));
    f.on("/valid", validated("10, 0"));

    assert_eq!(f.get("/old", &[]).await.body, "body");
    let second = f.get("/old", &[]).await;
    assert_eq!(second.body, "body");
    assert_eq!(f.calls("/old"), 2, "a stale entry is revalidated");
    assert_eq!(f.origin.request("/old", 2)["if-none-match"], "\"a\"");

    f.get("/valid", &[]).await;
    let hit = f.get("/valid", &[]).await;
    assert_eq!(f.calls("/valid"), 1, "{}", hit.cache_status());
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!(age >= 10, "the first member counts: Age {age}");
}

/// RFC 9111 §5.2.2.10 and §4.2.4: `s-maxage` implies `proxy-revalidate`,
/// so a shared cache never serves such a response stale on its own
/// initiative: the route's stale-while-revalidate and stale-if-error
/// windows do not apply to it (they still do to a `max-age` response).
#[tokio::test]
async fn s_maxage_forbids_serving_stale_through_route_windows() {
    let f = Fixture::new(|b| {
        b.default_route(
            Route::new("*")
                .stale_while_revalidate(Duration::from_secs(60))
                .stale_if_error(Duration::from_secs(300)),
        )
    })
    .await;
    let first_then_503 = |cache_control: &'static str, body: &'static str| {
        move |n: u64, _: &HeaderMap| match n {
            1 => respond(200, &[("cache-control", cache_control)], body),
            _ => respond(503, &[], "down"),
        }
    };
    f.on("/shared", first_then_503("s-maxage=0", "shared-v1"));
    f.on("/private-age", first_then_503("max-age=0", "plain-v1"));

    // The control: a max-age response is served stale within the window.
    f.get("/private-age", &[]).await;
    let stale = f.get("/private-age", &[]).await;
    assert_eq!(stale.body, "plain-v1");
    assert!(
        stale.cache_status().contains("stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );

    assert_eq!(f.get("/shared", &[]).await.body, "shared-v1");
    let second = f.get("/shared", &[]).await;
    assert_eq!(
        (second.status, second.body.as_str()),
        (503, "down"),
        "{}",
        second.cache_status()
    );
    assert_eq!(f.calls("/shared"), 2);
}

/// RFC 9213 §2.1: `CDN-Cache-Control` is a Structured Field dictionary; one
/// that does not parse, or whose directives have the wrong type
/// (`max-age="60"`), is ignored entirely and `Cache-Control` applies.
#[tokio::test]
async fn cdn_cache_control_that_is_not_a_valid_dictionary_is_ignored() {
    let f = Fixture::new(|b| b).await;
    f.always(
        "/wrong-type",
        200,
        &[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=\"60\""),
        ],
        "x",
    );
    f.always(
        "/unparsable",
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store, max-age=6 0"),
        ],
        "x",
    );
    f.always(
        "/valid",
        200,
        &[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60;ignored=1, other=(a b)"),
        ],
        "x",
    );
    for path in ["/wrong-type", "/unparsable", "/valid"] {
        f.get(path, &[]).await;
        f.get(path, &[]).await;
    }
    assert_eq!(f.calls("/wrong-type"), 2, "Cache-Control: no-store applies");
    assert_eq!(
        f.calls("/unparsable"),
        1,
        "Cache-Control: max-age=60 applies"
    );
    assert_eq!(
        f.calls("/valid"),
        1,
        "CDN-Cache-Control: max-age=60 applies"
    );
}

/// RFC 9110 §5.6.7 (recipients accept the asctime and RFC 850 formats,
/// and may accept any case) and RFC 9111 §5.3 (an invalid `Expires`, such
/// as `0` or `soon`, means already expired).
#[tokio::test]
async fn expires_is_read_leniently_and_invalid_means_expired() {
    let f = Fixture::new(|b| b).await;
    let in_an_hour = hours_from_now(1);
    let asctime = format_date(in_an_hour, true);
    let lower_case = format_date(in_an_hour, false).to_ascii_lowercase();
    let upper_case = format_date(in_an_hour, false).to_ascii_uppercase();
    for (path, expires) in [
        ("/asctime", asctime.as_str()),
        ("/lower-case", lower_case.as_str()),
        ("/upper-case", upper_case.as_str()),
        ("/invalid", "soon"),
    ] {
        let expires = expires.to_owned();
        f.on(path, move |_, _| {
            respond(200, &[("expires", expires.as_str())], "x")
        });
        f.get(path, &[]).await;
        f.get(path, &[]).await;
    }
    assert_eq!(f.calls("/asctime"), 1);
    assert_eq!(f.calls("/lower-case"), 1);
    assert_eq!(f.calls("/upper-case"), 1);
    assert_eq!(
        f.calls("/invalid"),
        2,
        "an invalid Expires is already expired"
    );
}

/// RFC 9110 §13.1.3 and RFC 9111 §4.3.2: a fresh entry without
/// `Last-Modified` answers `If-Modified-Since` from its `Date`: 304 when
/// the `Date` is not after the date given, the full response otherwise.
#[tokio::test]
async fn if_modified_since_is_evaluated_against_date_without_last_modified() {
    let f = Fixture::new(|b| b).await;
    let date = format_date(SystemTime::now(), false);
    f.on("/dated", move |_, _| {
        respond(
            200,
            &[("cache-control", "max-age=600"), ("date", date.as_str())],
            "dated",
        )
    });
    f.get("/dated", &[]).await;
    let later = format_date(hours_from_now(1), false);
    let not_modified = f
        .get("/dated", &[("if-modified-since", later.as_str())])
        .await;
    assert_eq!(not_modified.status, 304, "{}", not_modified.cache_status());
    assert_eq!(not_modified.body, "");
    let earlier = format_date(hours_from_now(-1), false);
    let full = f
        .get("/dated", &[("if-modified-since", earlier.as_str())])
        .await;
    assert_eq!((full.status, full.body.as_str()), (200, "dated"));
    assert_eq!(f.calls("/dated"), 1, "both answered from the cache");
}

/// RFC 9111 §5.2.2.3: with `must-understand`, a cache that understands the
/// status code stores the response whatever `no-store` says, and one with
/// a status code it does not know is not stored.
#[tokio::test]
async fn must_understand_stores_no_store_responses_with_an_understood_status() {
    let f = Fixture::new(|b| b).await;
    let cc = [("cache-control", "no-store, must-understand, max-age=60")];
    f.always("/understood", 200, &cc, "ok");
    f.always("/unknown-status", 299, &cc, "odd");
    f.always(
        "/no-store",
        200,
        &[("cache-control", "no-store, max-age=60")],
        "x",
    );
    for path in ["/understood", "/unknown-status", "/no-store"] {
        f.get(path, &[]).await;
        f.get(path, &[]).await;
    }
    assert_eq!(f.calls("/understood"), 1);
    assert_eq!(f.calls("/unknown-status"), 2);
    assert_eq!(f.calls("/no-store"), 2, "no-store alone still applies");
}

/// RFC 9111 §5.2.2.4: a response with `Cache-Control: no-cache` (and no
/// other freshness) is stored and validated with the origin, by a
/// conditional request, on every use.
#[tokio::test]
async fn no_cache_responses_are_stored_and_revalidated_on_every_use() {
    let f = Fixture::new(|b| b).await;
    f.on("/no-cache", |_, request| {
        let headers = [("cache-control", "no-cache"), ("etag", "\"n1\"")];
        if request.get("if-none-match").is_some_and(|v| v == "\"n1\"") {
            return respond(304, &headers, Body::empty());
        }
        respond(200, &headers, "validated")
    });
    assert_eq!(f.get("/no-cache", &[]).await.body, "validated");
    for use_ in 2..=3 {
        let answer = f.get("/no-cache", &[]).await;
        assert_eq!((answer.status, answer.body.as_str()), (200, "validated"));
        assert!(
            answer.cache_status().contains("fwd-status=304"),
            "{}",
            answer.cache_status()
        );
        assert_eq!(f.calls("/no-cache"), use_);
        let conditional = f
            .origin
            .request("/no-cache", usize::try_from(use_).unwrap());
        assert_eq!(conditional["if-none-match"], "\"n1\"");
    }
}

/// RFC 9111 §3 (a shared cache may store a response with `Set-Cookie`),
/// §5.2.2.7 and §5.2.2.4 (`private="Set-Cookie"`, `no-cache="Set-Cookie"`:
/// the named field alone is kept out of the stored copy). Off by default.
#[tokio::test]
async fn store_set_cookie_keeps_the_field_unless_a_qualifier_names_it() {
    let cookie = [("set-cookie", "id=1")];
    let script = |cache_control: &'static str| {
        move |_: u64, _: &HeaderMap| {
            respond(
                200,
                &[("cache-control", cache_control), cookie[0]],
                "with cookie",
            )
        }
    };
    let default = Fixture::new(|b| b).await;
    default.on("/public", script("public, max-age=60"));
    default.get("/public", &[]).await;
    default.get("/public", &[]).await;
    assert_eq!(default.calls("/public"), 2, "not stored by default");

    let f = Fixture::new(|b| b.store_set_cookie(true)).await;
    f.on("/public", script("public, max-age=60"));
    f.on("/private", script("max-age=60, private=\"Set-Cookie\""));
    f.on("/no-cache", script("max-age=60, no-cache=\"set-cookie\""));
    f.on(
        "/other",
        script("max-age=60, private=\"Set-Cookie, X-Other\""),
    );
    for path in ["/public", "/private", "/no-cache", "/other"] {
        let first = f.get(path, &[]).await;
        assert_eq!(first.header("set-cookie"), Some("id=1"), "{path}");
    }
    let public = f.get("/public", &[]).await;
    assert_eq!(f.calls("/public"), 1);
    assert_eq!(
        public.header("set-cookie"),
        Some("id=1"),
        "the RFC keeps it"
    );
    for path in ["/private", "/no-cache"] {
        let hit = f.get(path, &[]).await;
        assert_eq!(f.calls(path), 1, "{path}: {}", hit.cache_status());
        assert_eq!(hit.header("set-cookie"), None, "{path}");
        assert_eq!(hit.body, "with cookie");
    }
    f.get("/other", &[]).await;
    assert_eq!(f.calls("/other"), 2, "other qualified private: not stored");
}

/// With `store_set_cookie` on, a cookie is still never handed to another
/// client where the origin did not make the response explicitly shared:
/// a bare `private` beside a qualified one keeps the whole response
/// private (RFC 9111 §5.2.2.7); a `no-cache` response (revalidated by 304s
/// that carry no cookie) or one with only heuristic freshness is not stored
/// with its cookie.
#[tokio::test]
async fn store_set_cookie_never_shares_a_cookie_the_origin_did_not_make_public() {
    let f = Fixture::new(|b| b.store_set_cookie(true).heuristic_freshness(true)).await;
    let script = |headers: &'static [(&'static str, &'static str)]| {
        move |n: u64, _: &HeaderMap| {
            let mut all: Vec<(&str, &str)> = headers.to_vec();
            let cookie = format!("id={n}");
            all.push(("set-cookie", Box::leak(cookie.into_boxed_str())));
            respond(200, &all, "personal")
        }
    };
    f.on(
        "/bare-private",
        script(&[(
            "cache-control",
            "private, private=\"Set-Cookie\", max-age=60",
        )]),
    );
    f.on(
        "/bare-no-cache",
        script(&[
            (
                "cache-control",
                "no-cache, no-cache=\"Set-Cookie\", max-age=60",
            ),
            ("etag", "\"v1\""),
        ]),
    );
    f.on(
        "/no-cache",
        script(&[("cache-control", "no-cache"), ("etag", "\"v1\"")]),
    );
    f.on(
        "/heuristic",
        script(&[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")]),
    );
    for path in ["/bare-private", "/bare-no-cache", "/no-cache", "/heuristic"] {
        let first = f.get(path, &[]).await;
        assert_eq!(first.header("set-cookie"), Some("id=1"), "{path}");
        let second = f.get(path, &[]).await;
        assert_eq!(
            second.header("set-cookie"),
            Some("id=2"),
            "{path}: another client got the first one's cookie ({})",
            second.cache_status()
        );
        assert_eq!(f.calls(path), 2, "{path}");
    }
}

/// RFC 9111 §4.2.2: heuristic freshness (10% of the time since
/// `Last-Modified`) only when enabled, only for heuristically cacheable
/// status codes, and at most the configured cap.
#[tokio::test]
async fn heuristic_freshness_is_opt_in_and_capped() {
    let script = |status: u16| {
        move |_: u64, _: &HeaderMap| {
            let modified = format_date(hours_from_now(-100), false);
            let date = format_date(SystemTime::now(), false);
            respond(
                status,
                &[
                    ("last-modified", modified.as_str()),
                    ("date", date.as_str()),
                ],
                "heuristic",
            )
        }
    };
    let off = Fixture::new(|b| b).await;
    off.on("/h", script(200));
    off.get("/h", &[]).await;
    off.get("/h", &[]).await;
    assert_eq!(off.calls("/h"), 2, "off by default");

    let f = Fixture::new(|b| {
        b.heuristic_freshness(true)
            .heuristic_freshness_cap(Duration::from_secs(100))
    })
    .await;
    f.on("/h", script(200));
    f.on("/error", script(500));
    f.get("/h", &[]).await;
    let hit = f.get("/h", &[]).await;
    assert_eq!(f.calls("/h"), 1);
    let status = hit.cache_status();
    let ttl: i64 = status
        .split("ttl=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|ttl| ttl.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {status}"));
    // 10% of 100 hours is 10 hours; the cap is 100 s.
    assert!((90..=100).contains(&ttl), "{status}");
    f.get("/error", &[]).await;
    f.get("/error", &[]).await;
    assert_eq!(f.calls("/error"), 2, "500 is not heuristically cacheable");
}

/// RFC 9111 §4.1: selecting header values are compared after a
/// normalisation known to keep their meaning: whitespace removed, lines
/// combined, `Accept-Encoding` as a set of codings, `Accept-Language` as
/// case-insensitive tags by weight (RFC 9110 §12.4.2, §12.5.4). Both ways of
/// finding a variant agree: the instance that knows the URL's `Vary`, and
/// a new one that lets the lookup script resolve it.
#[tokio::test]
async fn vary_compares_normalised_selecting_values() {
    let f = Fixture::new(|b| b).await;
    f.on("/negotiated", |n, _| {
        respond(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("vary", "Accept-Encoding, Accept-Language"),
            ],
            format!("variant-{n}"),
        )
    });
    let first = [
        ("accept-encoding", "gzip, br"),
        ("accept-language", "en-GB, fr;q=0.5"),
    ];
    assert_eq!(f.get("/negotiated", &first).await.body, "variant-1");
    let same = [
        ("accept-encoding", "BR,gzip;q=1.0"),
        ("accept-language", "fr;q=0.50,EN-gb"),
    ];
    assert_eq!(f.get("/negotiated", &same).await.body, "variant-1");
    let (_, other_instance) = Fixture::instance(&f.redis, &f.origin, |b| b).await;
    let answer = send(&other_instance, "GET", "/negotiated", &same).await;
    assert_eq!(answer.body, "variant-1", "{}", answer.cache_status());
    // Found by its first lookup: a plain hit, not a vary-miss that a
    // second look repaired.
    assert!(
        answer.cache_status().starts_with("tower-redis; hit")
            && !answer.cache_status().contains("fwd=")
            && !answer.cache_status().contains("coalesced"),
        "{}",
        answer.cache_status()
    );
    assert_eq!(f.calls("/negotiated"), 1);
    let different = [
        ("accept-encoding", "gzip"),
        ("accept-language", "en-GB, fr;q=0.5"),
    ];
    assert_eq!(f.get("/negotiated", &different).await.body, "variant-2");
}

/// The body every range test's origin sends: 20 bytes, one per position.
const TWENTY: &str = "0123456789abcdefghij";

/// Scripts `path` to answer [`TWENTY`], fresh for an hour, with a strong
/// `ETag` and a `Last-Modified` two hours before its `Date`.
fn twenty_bytes(f: &Fixture, path: &str) {
    let last_modified = format_date(hours_from_now(-2), false);
    let date = format_date(SystemTime::now(), false);
    f.on(path, move |_, _| {
        respond(
            200,
            &[
                ("cache-control", "max-age=3600"),
                ("etag", "\"v1\""),
                ("last-modified", &last_modified),
                ("date", &date),
            ],
            TWENTY,
        )
    });
}

/// RFC 9110 §14.1.2, §14.4, §15.3.7 and RFC 9111 §3.4: `bytes=a-b`,
/// `bytes=a-` and `bytes=-n` are served from a stored complete response as
/// `206` with the right `Content-Range`. On a miss the origin is asked for
/// the whole response (no `Range`), which is stored, and the range is cut
/// from it on its way; `HEAD` ignores `Range` (§14.2), and every cached
/// `200` says `Accept-Ranges: bytes` (§14.3).
#[tokio::test]
async fn byte_ranges_are_served_from_a_stored_complete_response() {
    let f = Fixture::new(|b| b).await;
    twenty_bytes(&f, "/file");

    let miss = f.get("/file", &[("range", "bytes=2-5")]).await;
    assert_eq!(miss.status, 206, "{}", miss.cache_status());
    assert_eq!(miss.body, "2345");
    assert_eq!(miss.header("content-range"), Some("bytes 2-5/20"));
    assert_eq!(miss.header("content-length"), Some("4"));
    assert!(
        miss.cache_status().contains("stored"),
        "{}",
        miss.cache_status()
    );
    let forwarded = f.origin.request("/file", 1);
    assert!(
        forwarded.get("range").is_none() && forwarded.get("if-range").is_none(),
        "the origin is asked for the whole response: {forwarded:?}"
    );

    for (range, body, content_range) in [
        ("bytes=-3", "hij", "bytes 17-19/20"),
        ("bytes=15-", "fghij", "bytes 15-19/20"),
        ("BYTES=10-1000", "abcdefghij", "bytes 10-19/20"),
        ("bytes=0-0", "0", "bytes 0-0/20"),
        ("bytes=-50", TWENTY, "bytes 0-19/20"),
    ] {
        let hit = f.get("/file", &[("range", range)]).await;
        assert_eq!(hit.status, 206, "{range}: {}", hit.cache_status());
        assert_eq!(hit.body, body, "{range}");
        assert_eq!(hit.header("content-range"), Some(content_range), "{range}");
        assert!(
            hit.cache_status().starts_with("tower-redis; hit"),
            "{range}"
        );
        assert!(hit.header("age").is_some(), "{range}");
    }

    let whole = f.get("/file", &[]).await;
    assert_eq!((whole.status, whole.body.as_str()), (200, TWENTY));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    let head = send(&f.app, "HEAD", "/file", &[("range", "bytes=0-1")]).await;
    assert_eq!(head.status, 200, "HEAD ignores Range");
    assert!(head.header("content-range").is_none());
    assert_eq!(f.calls("/file"), 1, "every answer after the first is a hit");
}

/// RFC 9110 §14.1.1 and §15.5.17: a range that does not overlap the
/// representation (a first byte at or past its end, a suffix of 0) is
/// answered `416` with `Content-Range: bytes */<length>`. On a miss the
/// whole response is still read from the origin and stored.
#[tokio::test]
async fn unsatisfiable_ranges_are_answered_416_with_the_length() {
    let f = Fixture::new(|b| b).await;
    twenty_bytes(&f, "/file");

    let miss = f.get("/file", &[("range", "bytes=20-")]).await;
    assert_eq!(miss.status, 416, "{}", miss.cache_status());
    assert_eq!(miss.header("content-range"), Some("bytes */20"));
    assert_eq!(miss.body, "");
    for range in ["bytes=-0", "bytes=25-30", "bytes=20-20"] {
        let hit = f.get("/file", &[("range", range)]).await;
        assert_eq!(hit.status, 416, "{range}");
        assert_eq!(hit.header("content-range"), Some("bytes */20"), "{range}");
        assert_eq!(hit.body, "", "{range}");
    }
    let whole = f.get("/file", &[]).await;
    assert_eq!((whole.status, whole.body.as_str()), (200, TWENTY));
    assert_eq!(
        f.calls("/file"),
        1,
        "the 416 on the miss stored the response"
    );
}

/// RFC 9110 §14.2: a server may ignore `Range`. Several ranges, another
/// unit, a range whose last byte is before its first, two `Range` lines or
/// a field that does not parse are answered with the whole `200`.
#[tokio::test]
async fn several_or_invalid_ranges_are_answered_with_the_whole_response() {
    let f = Fixture::new(|b| b).await;
    twenty_bytes(&f, "/file");
    f.get("/file", &[]).await;
    for range in [
        "bytes=0-1,5-6",
        "bytes=5-2",
        "items=0-1",
        "bytes=x-1",
        "bytes=-",
        "0-1",
    ] {
        let answer = f.get("/file", &[("range", range)]).await;
        assert_eq!(answer.status, 200, "{range}");
        assert_eq!(answer.body, TWENTY, "{range}");
        assert!(answer.header("content-range").is_none(), "{range}");
    }
    let two_lines = f
        .get("/file", &[("range", "bytes=0-1"), ("range", "bytes=2-3")])
        .await;
    assert_eq!((two_lines.status, two_lines.body.as_str()), (200, TWENTY));
    assert_eq!(f.calls("/file"), 1);
}

/// RFC 9110 §13.1.5: with `If-Range`, the range is served only when the
/// validator matches the stored response strongly: the same strong entity
/// tag, or exactly its `Last-Modified` when that is at least a second
/// before its `Date`. Otherwise (a weak tag, another tag or date) the whole
/// `200` is sent.
#[tokio::test]
async fn if_range_serves_the_range_only_on_a_strong_match() {
    let f = Fixture::new(|b| b).await;
    twenty_bytes(&f, "/file");
    let stored = f.get("/file", &[]).await;
    let last_modified = stored.header("last-modified").unwrap().to_owned();
    let other_date = format_date(hours_from_now(-3), false);

    for (if_range, ranged) in [
        ("\"v1\"", true),
        (last_modified.as_str(), true),
        ("W/\"v1\"", false),
        ("\"v0\"", false),
        (other_date.as_str(), false),
        ("not a validator", false),
    ] {
        let answer = f
            .get("/file", &[("range", "bytes=0-3"), ("if-range", if_range)])
            .await;
        if ranged {
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (206, "0123"),
                "{if_range}"
            );
        } else {
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (200, TWENTY),
                "{if_range}"
            );
        }
    }
    assert_eq!(f.calls("/file"), 1);
}

/// RFC 9111 §3.4 and the round-trip budget: a range hit costs one Redis
/// round trip, the same `HMGET` as a whole hit, and the answer holds only
/// the range (64 KiB out of a 1 MiB entry here).
#[tokio::test]
async fn a_range_hit_is_one_round_trip() {
    let f = Fixture::new(|b| b.max_body_bytes(2 << 20)).await;
    let body: String = (0..1 << 20)
        .map(|i: u32| char::from(b'a' + u8::try_from(i % 26).unwrap()))
        .collect();
    let expected = body[100_000..100_000 + 65_536].to_owned();
    f.on("/big", move |_, _| {
        respond(200, &[("cache-control", "max-age=3600")], body.clone())
    });
    f.get("/big", &[]).await;
    // Once to learn the URL's Vary, so that the next lookup is a plain HMGET.
    f.get("/big", &[("range", "bytes=0-0")]).await;

    let range = "bytes=100000-165535";
    let (hit, commands) = f
        .redis
        .commands_during(send(&f.app, "GET", "/big", &[("range", range)]))
        .await;
    assert_eq!(hit.status, 206, "{}", hit.cache_status());
    assert_eq!(
        hit.header("content-range"),
        Some("bytes 100000-165535/1048576")
    );
    assert!(hit.body == expected, "the bytes of the range");
    assert_eq!(commands, ["hmget"]);
    assert_eq!(f.calls("/big"), 1);
}

/// RFC 9110 §15.2 and RFC 9111 §3: an interim (1xx) response is never
/// stored, even with explicit freshness, and none of its fields reach the
/// final response that is stored after it. In tower a service answers one
/// response per request, so an interim response can only reach the layer
/// as that response: it passes through as it is, and the next request's
/// final `200` is stored and served with its own fields only.
#[tokio::test]
async fn interim_responses_are_passed_on_and_never_stored() {
    let f = Fixture::new(|b| b).await;
    for status in [100u16, 102, 103] {
        let path = format!("/interim-{status}");
        f.on(&path, move |n, _| match n {
            1 => respond(
                status,
                &[
                    ("cache-control", "max-age=60"),
                    ("link", "</style.css>; rel=preload"),
                ],
                Body::empty(),
            ),
            _ => respond(200, &[("cache-control", "max-age=60")], "final"),
        });
        let interim = f.get(&path, &[]).await;
        assert_eq!(interim.status, status);
        assert_eq!(interim.header("link"), Some("</style.css>; rel=preload"));
        assert!(
            !interim.cache_status().contains("stored"),
            "{status}: {}",
            interim.cache_status()
        );
        let last = f.get(&path, &[]).await;
        assert_eq!(
            (last.status, last.body.as_str()),
            (200, "final"),
            "{status}"
        );
        assert_eq!(f.calls(&path), 2, "{status}: the 1xx was not stored");
        let hit = f.get(&path, &[]).await;
        assert_eq!((hit.status, hit.body.as_str()), (200, "final"), "{status}");
        assert!(
            hit.cache_status().starts_with("tower-redis; hit"),
            "{status}"
        );
        assert!(
            hit.header("link").is_none(),
            "{status}: no interim field stored"
        );
        assert_eq!(f.calls(&path), 2, "{status}");
    }
}

/// RFC 9111 §3.4 with RFC 9110 §14.1.2: a range request on a miss whose
/// range ends before the origin has sent the rest of its body still
/// stores the whole response: the client has its `206` as soon as its
/// range has arrived, and the cache reads the rest on its own.
#[tokio::test]
async fn a_range_on_a_miss_still_stores_the_whole_streamed_response() {
    let f = Fixture::new(|b| b).await;
    f.on("/streamed", |_, _| {
        let chunks = futures_util::stream::unfold(0u8, |i| async move {
            if i == 4 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            let chunk = axum::body::Bytes::from(format!("chunk{i}-"));
            Some((Ok::<_, std::convert::Infallible>(chunk), i + 1))
        });
        respond(
            200,
            &[("cache-control", "max-age=3600"), ("content-length", "28")],
            Body::from_stream(chunks),
        )
    });
    let miss = f.get("/streamed", &[("range", "bytes=0-6")]).await;
    assert_eq!((miss.status, miss.body.as_str()), (206, "chunk0-"));
    assert_eq!(miss.header("content-range"), Some("bytes 0-6/28"));
    let whole = f.get("/streamed", &[]).await;
    assert_eq!(whole.body, "chunk0-chunk1-chunk2-chunk3-");
    assert!(
        whole.cache_status().starts_with("tower-redis; hit"),
        "{}",
        whole.cache_status()
    );
    assert_eq!(f.calls("/streamed"), 1);
    let tail = f.get("/streamed", &[("range", "bytes=-7")]).await;
    assert_eq!((tail.status, tail.body.as_str()), (206, "chunk3-"));
}

/// RFC 9110 §9.3.3 and RFC 9111 §4.4: with `store_post`, the answer to a
/// `POST` whose `Content-Location` is the request's own URL and whose
/// freshness is explicit is stored for later `GET`s (after the `POST` has
/// invalidated the URL). Another `Content-Location`, no explicit freshness,
/// or the option off (the default) store nothing.
#[tokio::test]
async fn post_answers_naming_their_own_url_are_stored_for_gets() {
    let own = [
        ("content-location", "/poll"),
        ("cache-control", "max-age=60"),
    ];
    for enabled in [true, false] {
        let f = Fixture::new(|b| b.store_post(enabled)).await;
        f.on("/poll", move |n, _| match n {
            1 => respond(200, &[("cache-control", "max-age=60")], "before"),
            2 => respond(200, &own, "after the vote"),
            _ => respond(200, &[], "from the origin"),
        });
        assert_eq!(f.get("/poll", &[]).await.body, "before");
        let post = send(&f.app, "POST", "/poll", &[]).await;
        settle(&f.layer).await;
        assert_eq!(post.body, "after the vote");
        assert_eq!(
            post.cache_status().contains("stored"),
            enabled,
            "{}",
            post.cache_status()
        );
        let get = f.get("/poll", &[]).await;
        if enabled {
            assert_eq!((get.body.as_str(), f.calls("/poll")), ("after the vote", 2));
            assert!(get.cache_status().contains("hit"), "{}", get.cache_status());
        } else {
            // The POST invalidated the URL and stored nothing.
            assert_eq!(
                (get.body.as_str(), f.calls("/poll")),
                ("from the origin", 3)
            );
        }
    }
    // Heuristic freshness on: it alone is not enough for a POST answer.
    // Set-Cookie storable on GETs: still not on a POST answer.
    let f = Fixture::new(|b| {
        b.store_post(true)
            .heuristic_freshness(true)
            .store_set_cookie(true)
    })
    .await;
    let elsewhere = [
        ("content-location", "/other"),
        ("cache-control", "max-age=60"),
    ];
    let heuristic = [
        ("content-location", "/heuristic"),
        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ];
    f.always("/elsewhere", 200, &elsewhere, "x");
    f.always("/heuristic", 200, &heuristic, "x");
    // Not a 200 or 203: an error page (that may echo the body sent) is not
    // the URL's representation.
    let own = |path: &'static str| [("content-location", path), ("cache-control", "max-age=60")];
    f.always("/rejected", 422, &own("/rejected"), "your input: <script>");
    // A cookie set by a POST is one client's.
    let cookie = [
        ("content-location", "/cookie"),
        ("cache-control", "public, max-age=60"),
        ("set-cookie", "session=alice"),
    ];
    f.always("/cookie", 200, &cookie, "welcome alice");
    // An answer chosen by the body's type is no GET's answer.
    let by_type = [
        ("content-location", "/by-type"),
        ("cache-control", "max-age=60"),
        ("vary", "Content-Type"),
    ];
    f.always("/by-type", 200, &by_type, "{\"json\": true}");
    for path in [
        "/elsewhere",
        "/heuristic",
        "/rejected",
        "/cookie",
        "/by-type",
    ] {
        let post = send(&f.app, "POST", path, &[]).await;
        settle(&f.layer).await;
        assert!(
            !post.cache_status().contains("stored"),
            "{path}: {}",
            post.cache_status()
        );
        f.get(path, &[]).await;
        assert_eq!(f.calls(path), 2, "{path}: the GET went to the origin");
    }
}

/// Another representation of the same URL, as long as [`TWENTY`]: what an
/// origin sends once the resource changed.
const CHANGED: &str = "KLMNOPQRSTUVWXYZklmn";

/// What a range-capable origin answers to `headers` for a representation
/// `body` with entity tag `etag`: the one range asked (`a-b`, `a-`, `-n`)
/// as a `206`, or the whole `200` without a `Range` or when `If-Range`
/// names another tag. `extra` fields go on either.
fn ranged(
    headers: &HeaderMap,
    body: &'static str,
    etag: &str,
    extra: &[(&str, &str)],
) -> Response<Body> {
    let mut fields = vec![("etag", etag)];
    fields.extend_from_slice(extra);
    ranged_under(headers, body, etag, &fields)
}

/// [`ranged`] for a representation whose validator (what `If-Range` must
/// name for the range to be sent) is `validator`, with `fields`.
fn ranged_under(
    headers: &HeaderMap,
    body: &'static str,
    validator: &str,
    fields: &[(&str, &str)],
) -> Response<Body> {
    let len = body.len();
    let mut fields = [&[("cache-control", "max-age=3600")], fields].concat();
    let if_range_holds = headers
        .get("if-range")
        .is_none_or(|tag| tag.to_str().unwrap() == validator);
    let range = headers.get("range").filter(|_| if_range_holds).map(|v| {
        v.to_str()
            .unwrap()
            .strip_prefix("bytes=")
            .unwrap()
            .to_owned()
    });
    let Some(range) = range else {
        let length = len.to_string();
        fields.push(("content-length", &length));
        return respond(200, &fields, body);
    };
    let (first, last) = range.split_once('-').unwrap();
    let (first, last) = match (first.parse::<usize>(), last.parse::<usize>()) {
        (Ok(first), Ok(last)) => (first, last.min(len - 1)),
        (Ok(first), Err(_)) => (first, len - 1),
        (Err(_), Ok(suffix)) => (len - suffix, len - 1),
        _ => panic!("not a range this origin answers: {range}"),
    };
    let content_range = format!("bytes {first}-{last}/{len}");
    fields.push(("content-range", &content_range));
    respond(206, &fields, &body[first..=last])
}

/// RFC 9111 §3.3: with `forward_ranges`, a range miss is forwarded as the
/// client sent it, and the origin's `206` (one `Content-Range: bytes
/// a-b/N`) is stored as a partial entry. A range inside its span is served
/// from it, `206` with the right `Content-Range`, in one Redis round trip;
/// a range past the representation's end is `416`. A range apart from the
/// span is forwarded (its answer replaces the partial entry), and a
/// request without `Range` is never served from a partial entry: it is
/// forwarded whole, and the `200` stored as a complete entry.
#[tokio::test]
async fn partial_responses_are_stored_and_serve_the_ranges_inside_them() {
    let f = Fixture::new(|b| b.forward_ranges(true)).await;
    f.on("/part", |_, headers| ranged(headers, TWENTY, "\"v1\"", &[]));

    let miss = f.get("/part", &[("range", "bytes=-5")]).await;
    assert_eq!((miss.status, miss.body.as_str()), (206, "fghij"));
    assert_eq!(miss.header("content-range"), Some("bytes 15-19/20"));
    assert!(
        miss.cache_status().contains("fwd=uri-miss") && miss.cache_status().contains("stored"),
        "{}",
        miss.cache_status()
    );
    let forwarded = f.origin.request("/part", 1);
    assert_eq!(forwarded["range"], "bytes=-5", "the range is forwarded");

    let (hit, commands) = f
        .redis
        .commands_during(send(&f.app, "GET", "/part", &[("range", "bytes=16-18")]))
        .await;
    assert_eq!(
        (hit.status, hit.body.as_str()),
        (206, "ghi"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(hit.header("content-range"), Some("bytes 16-18/20"));
    assert_eq!(hit.header("content-length"), Some("3"));
    assert!(
        hit.cache_status().starts_with("tower-redis; hit"),
        "{}",
        hit.cache_status()
    );
    assert!(hit.header("age").is_some());
    assert_eq!(commands, ["hmget"], "a partial hit is one round trip");
    for (range, body, content_range) in [
        ("bytes=17-", "hij", "bytes 17-19/20"),
        ("bytes=-1", "j", "bytes 19-19/20"),
        ("bytes=15-100", "fghij", "bytes 15-19/20"),
    ] {
        let hit = f.get("/part", &[("range", range)]).await;
        assert_eq!((hit.status, hit.body.as_str()), (206, body), "{range}");
        assert_eq!(hit.header("content-range"), Some(content_range), "{range}");
    }
    let past_the_end = f.get("/part", &[("range", "bytes=20-")]).await;
    assert_eq!(past_the_end.status, 416);
    assert_eq!(past_the_end.header("content-range"), Some("bytes */20"));
    assert_eq!(f.calls("/part"), 1, "every range inside the span was a hit");

    // Apart from the span (and not joining it): forwarded with its range.
    let apart = f.get("/part", &[("range", "bytes=0-3")]).await;
    assert_eq!((apart.status, apart.body.as_str()), (206, "0123"));
    assert!(
        apart.cache_status().contains("fwd=partial"),
        "{}",
        apart.cache_status()
    );
    assert_eq!(f.origin.request("/part", 2)["range"], "bytes=0-3");

    // No range: never from the partial entry.
    let whole = f.get("/part", &[]).await;
    assert_eq!((whole.status, whole.body.as_str()), (200, TWENTY));
    assert!(
        whole.cache_status().contains("fwd=partial"),
        "{}",
        whole.cache_status()
    );
    assert!(f.origin.request("/part", 3).get("range").is_none());
    let stored_whole = f.get("/part", &[]).await;
    assert_eq!(
        (stored_whole.status, stored_whole.body.as_str()),
        (200, TWENTY)
    );
    assert!(stored_whole.cache_status().starts_with("tower-redis; hit"));
    assert_eq!(f.calls("/part"), 3);
}

/// A range inside a partial entry that may not be used as it is (the
/// client's `no-cache`, or the entry gone stale) is forwarded as the client
/// asked: the span holds all of its bytes, so there is nothing to complete,
/// and asking the origin for "the bytes after the span" would ask for
/// none (`bytes=20-` of 20 bytes, a `416` for a satisfiable range).
#[tokio::test]
async fn a_range_inside_a_partial_entry_that_must_be_revalidated_is_forwarded_as_asked() {
    let f = Fixture::new(|b| b.forward_ranges(true)).await;
    f.on("/part", |_, headers| ranged(headers, TWENTY, "\"v1\"", &[]));
    let stored = f.get("/part", &[("range", "bytes=10-")]).await;
    assert_eq!((stored.status, stored.body.as_str()), (206, "abcdefghij"));
    for (n, range, body) in [(2, "bytes=12-", "cdefghij"), (3, "bytes=13-15", "def")] {
        let reloaded = f
            .get("/part", &[("range", range), ("cache-control", "no-cache")])
            .await;
        assert_eq!(
            (reloaded.status, reloaded.body.as_str()),
            (206, body),
            "{range}: {}",
            reloaded.cache_status()
        );
        assert_eq!(f.origin.request("/part", n)["range"], range);
    }
}

/// RFC 9111 §3.4: a range that reaches past a stored partial entry is
/// completed with a range request to the origin for the missing bytes only,
/// with `If-Range` set to the stored strong `ETag`. The answer (a `206` of
/// the same tag) is combined with the span and stored, taking the new
/// response's fields; once the bytes `0..N` are all there the entry is a
/// complete `200`, served to requests without `Range` too.
#[tokio::test]
async fn a_partial_response_is_completed_with_a_range_request_for_the_missing_bytes() {
    let f = Fixture::new(|b| b.forward_ranges(true)).await;
    f.on("/video", |n, headers| {
        let part = n.to_string();
        ranged(headers, TWENTY, "\"v1\"", &[("x-part", &part)])
    });
    f.get("/video", &[("range", "bytes=0-4")]).await;

    let completed = f.get("/video", &[("range", "bytes=3-9")]).await;
    assert_eq!(
        (completed.status, completed.body.as_str()),
        (206, "3456789")
    );
    assert_eq!(completed.header("content-range"), Some("bytes 3-9/20"));
    let status = completed.cache_status();
    assert!(
        status.contains("fwd=partial") && status.contains("stored"),
        "{status}"
    );
    let asked = f.origin.request("/video", 2);
    assert_eq!(asked["range"], "bytes=5-9", "only the missing bytes");
    assert_eq!(asked["if-range"], "\"v1\"");

    let inside = f.get("/video", &[("range", "bytes=0-9")]).await;
    assert_eq!((inside.status, inside.body.as_str()), (206, "0123456789"));
    assert_eq!(
        inside.header("x-part"),
        Some("2"),
        "the new response's fields"
    );
    assert_eq!(f.calls("/video"), 2, "the combined span is served");

    let to_the_end = f.get("/video", &[("range", "bytes=8-")]).await;
    assert_eq!(
        (to_the_end.status, to_the_end.body.as_str()),
        (206, "89abcdefghij")
    );
    assert_eq!(to_the_end.header("content-range"), Some("bytes 8-19/20"));
    assert_eq!(f.origin.request("/video", 3)["range"], "bytes=10-");

    let whole = f.get("/video", &[]).await;
    assert_eq!((whole.status, whole.body.as_str()), (200, TWENTY));
    assert!(
        whole.cache_status().starts_with("tower-redis; hit"),
        "{}",
        whole.cache_status()
    );
    assert_eq!(whole.header("content-length"), Some("20"));
    assert!(whole.header("content-range").is_none());
    assert_eq!(whole.header("x-part"), Some("3"));
    assert_eq!(f.calls("/video"), 3, "the entry became a complete 200");
}

/// RFC 9111 §3.4, RFC 9110 §8.8.2.2: a partial entry without an `ETag` is
/// completed under its `Last-Modified` when a cache may treat that as
/// strong (at least 60 seconds before the entry's `Date`): the date goes in
/// `If-Range`, and the origin's part is combined only because it carries
/// the same date. A `Last-Modified` closer to its `Date` is weak: the range
/// is forwarded as the client sent it, without `If-Range`, and nothing is
/// combined.
#[tokio::test]
async fn a_partial_response_without_etag_is_completed_under_a_strong_last_modified() {
    let f = Fixture::new(|b| b.forward_ranges(true)).await;
    let now = SystemTime::now();
    let date = format_date(now, false);
    let strong = format_date(now - Duration::from_secs(3600), false);
    let weak = format_date(now - Duration::from_secs(10), false);
    for (path, modified) in [("/strong", strong.clone()), ("/weak", weak.clone())] {
        let date = date.clone();
        f.on(path, move |_, headers| {
            let fields = [
                ("last-modified", modified.as_str()),
                ("date", date.as_str()),
            ];
            ranged_under(headers, TWENTY, &modified, &fields)
        });
    }

    f.get("/strong", &[("range", "bytes=0-4")]).await;
    let completed = f.get("/strong", &[("range", "bytes=0-9")]).await;
    assert_eq!(
        (completed.status, completed.body.as_str()),
        (206, "0123456789")
    );
    let asked = f.origin.request("/strong", 2);
    assert_eq!(asked["range"], "bytes=5-9", "only the missing bytes");
    assert_eq!(asked["if-range"], strong.as_str());
    let again = f.get("/strong", &[("range", "bytes=2-8")]).await;
    assert_eq!((again.status, again.body.as_str()), (206, "2345678"));
    assert_eq!(f.calls("/strong"), 2, "the combined span is served");

    f.get("/weak", &[("range", "bytes=0-4")]).await;
    let forwarded = f.get("/weak", &[("range", "bytes=0-9")]).await;
    assert_eq!(
        (forwarded.status, forwarded.body.as_str()),
        (206, "0123456789")
    );
    let asked = f.origin.request("/weak", 2);
    assert_eq!(
        asked["range"], "bytes=0-9",
        "forwarded as the client sent it"
    );
    assert!(asked.get("if-range").is_none());

    // Two versions of a file can share a date (builds that fix file
    // times): a part of another type is not combined under it.
    let (retyped_date, retyped_modified) = (date.clone(), strong.clone());
    f.on("/retyped", move |n, headers| {
        let kind = if n == 1 { "text/plain" } else { "image/png" };
        let fields = [
            ("last-modified", retyped_modified.as_str()),
            ("date", retyped_date.as_str()),
            ("content-type", kind),
        ];
        ranged_under(headers, TWENTY, &retyped_modified, &fields)
    });
    f.get("/retyped", &[("range", "bytes=0-4")]).await;
    let apart = f.get("/retyped", &[("range", "bytes=0-9")]).await;
    assert_eq!(
        f.origin.request("/retyped", 2)["if-range"],
        strong.as_str(),
        "a completion was asked"
    );
    assert_ne!(
        apart.body.as_str(),
        "0123456789",
        "parts of two types were combined"
    );
}

/// RFC 9111 §3.4: ranges are combined only under the same strong
/// validator. An origin that answers the completion with a part of another
/// representation (another `ETag`, `If-Range` ignored) gets that part passed
/// on as it is, never a body mixing both; it replaces the partial entry. An
/// origin that honours `If-Range` sends the whole new representation, which
/// is stored and the range cut from it.
#[tokio::test]
async fn ranges_with_different_validators_are_never_combined() {
    let f = Fixture::new(|b| b.forward_ranges(true)).await;
    // Ignores If-Range once the representation changed.
    f.on("/changed", |n, headers| {
        let mut headers = headers.clone();
        headers.remove("if-range");
        match n {
            1 => ranged(&headers, TWENTY, "\"v1\"", &[]),
            _ => ranged(&headers, CHANGED, "\"v2\"", &[]),
        }
    });
    f.get("/changed", &[("range", "bytes=0-4")]).await;
    let answer = f.get("/changed", &[("range", "bytes=0-9")]).await;
    assert_eq!(f.origin.request("/changed", 2)["range"], "bytes=5-9");
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (206, &CHANGED[5..10])
    );
    assert_eq!(answer.header("content-range"), Some("bytes 5-9/20"));
    assert_eq!(answer.header("etag"), Some("\"v2\""));
    // The new part replaced the old one: its bytes are served, the old
    // ones are gone.
    let new_part = f.get("/changed", &[("range", "bytes=6-8")]).await;
    assert_eq!(
        (new_part.status, new_part.body.as_str()),
        (206, &CHANGED[6..9])
    );
    assert_eq!(f.calls("/changed"), 2);
    let old_span = f.get("/changed", &[("range", "bytes=0-9")]).await;
    assert_eq!(f.origin.request("/changed", 3)["if-range"], "\"v2\"");
    assert_eq!(old_span.body, &CHANGED[..10], "never a mixed body");

    // Honours If-Range: the whole new representation.
    f.on("/honoured", |n, headers| match n {
        1 => ranged(headers, TWENTY, "\"v1\"", &[]),
        _ => ranged(headers, CHANGED, "\"v2\"", &[]),
    });
    f.get("/honoured", &[("range", "bytes=0-4")]).await;
    let answer = f.get("/honoured", &[("range", "bytes=0-9")]).await;
    assert_eq!(f.origin.request("/honoured", 2)["if-range"], "\"v1\"");
    assert_eq!((answer.status, answer.body.as_str()), (206, &CHANGED[..10]));
    assert_eq!(answer.header("content-range"), Some("bytes 0-9/20"));
    let whole = f.get("/honoured", &[]).await;
    assert_eq!((whole.status, whole.body.as_str()), (200, CHANGED));
    assert!(
        whole.cache_status().starts_with("tower-redis; hit"),
        "{}",
        whole.cache_status()
    );
    assert_eq!(f.calls("/honoured"), 2);
}

/// RFC 9111 §3.4 and §4.3.4: a `206` of the stored complete response (the
/// same strong `ETag`, a `Content-Range` of its length), here the answer to
/// the revalidation of a stale entry, updates the stored response: it takes
/// the fields the 206 carries, but its `Content-Range` and
/// `Content-Length`, and keeps those the 206 does not send. A 206 with
/// another `ETag` updates nothing.
#[tokio::test]
async fn a_stored_response_takes_the_fields_of_a_206_of_the_same_representation() {
    let f = Fixture::new(|b| b).await;
    let stale_first = |etag_later: &'static str| {
        move |n: u64, _: &HeaderMap| match n {
            1 => respond(
                200,
                &[
                    ("cache-control", "max-age=0"),
                    ("etag", "\"v1\""),
                    ("content-length", "20"),
                    ("x-kept", "stored"),
                    ("x-changed", "1"),
                ],
                TWENTY,
            ),
            2 => respond(
                206,
                &[
                    ("cache-control", "max-age=3600"),
                    ("etag", etag_later),
                    ("content-range", "bytes 0-3/20"),
                    ("content-length", "4"),
                    ("x-changed", "2"),
                ],
                &TWENTY[..4],
            ),
            _ => respond(
                200,
                &[
                    ("cache-control", "max-age=3600"),
                    ("etag", etag_later),
                    ("x-changed", "3"),
                ],
                TWENTY,
            ),
        }
    };
    f.on("/updated", stale_first("\"v1\""));
    f.get("/updated", &[]).await;
    let revalidated = f.get("/updated", &[("range", "bytes=0-3")]).await;
    assert_eq!(
        (revalidated.status, revalidated.body.as_str()),
        (206, "0123")
    );
    assert_eq!(revalidated.header("content-range"), Some("bytes 0-3/20"));
    let status = revalidated.cache_status();
    assert!(
        status.contains("fwd-status=206") && status.contains("stored"),
        "{status}"
    );
    let hit = f.get("/updated", &[]).await;
    assert_eq!((hit.status, hit.body.as_str()), (200, TWENTY));
    assert!(
        hit.cache_status().starts_with("tower-redis; hit"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(hit.header("x-changed"), Some("2"), "taken from the 206");
    assert_eq!(hit.header("x-kept"), Some("stored"), "kept");
    assert_eq!(hit.header("content-length"), Some("20"));
    assert!(hit.header("content-range").is_none());
    assert_eq!(f.calls("/updated"), 2);

    f.on("/other-tag", stale_first("\"v2\""));
    f.get("/other-tag", &[]).await;
    let other = f.get("/other-tag", &[("range", "bytes=0-3")]).await;
    assert_eq!((other.status, other.body.as_str()), (206, "0123"));
    // The other tag's part replaced the stale entry; a request without
    // `Range` goes to the origin.
    let after = f.get("/other-tag", &[]).await;
    assert_eq!(f.calls("/other-tag"), 3, "not a hit of an updated entry");
    assert_eq!((after.status, after.header("x-changed")), (200, Some("3")));
}

/// `response` with its body sent only after `delay_ms`.
fn slowly(response: Response<Body>, delay_ms: u64) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let body = async move {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        axum::body::to_bytes(body, usize::MAX).await
    };
    let stream = futures_util::stream::once(body);
    Response::from_parts(parts, Body::from_stream(stream))
}

/// RFC 9111 §3.3 with request coalescing: a range request on a miss,
/// forwarded with its range, neither leads nor follows the flight of the
/// requests that want the whole response (a partial answer is of no use to
/// them); and its partial entry, stored after the whole one, does not
/// replace that fresh complete entry.
#[tokio::test]
async fn a_forwarded_range_never_joins_a_whole_response_flight() {
    let f = Fixture::new(|b| b.forward_ranges(true)).await;
    f.on("/shared", |_, headers| {
        // The range's answer is the slower: its entry is stored last.
        let delay = if headers.contains_key("range") {
            400
        } else {
            200
        };
        slowly(ranged(headers, TWENTY, "\"v1\"", &[]), delay)
    });
    let range = tokio::spawn({
        let app = f.app.clone();
        async move { send(&app, "GET", "/shared", &[("range", "bytes=2-5")]).await }
    });
    f.origin.calls.wait_for_calls("/shared", 1).await;
    let wholes: Vec<_> = (0..3)
        .map(|_| {
            let app = f.app.clone();
            tokio::spawn(async move { send(&app, "GET", "/shared", &[]).await })
        })
        .collect();
    let range = range.await.unwrap();
    assert_eq!((range.status, range.body.as_str()), (206, "2345"));
    assert_eq!(range.header("content-range"), Some("bytes 2-5/20"));
    for whole in wholes {
        let whole = whole.await.unwrap();
        assert_eq!(
            (whole.status, whole.body.as_str()),
            (200, TWENTY),
            "{}",
            whole.cache_status()
        );
    }
    settle(&f.layer).await;
    assert_eq!(
        f.calls("/shared"),
        2,
        "the range alone, then one whole fill for three requests"
    );
    let hit = f.get("/shared", &[]).await;
    assert_eq!((hit.status, hit.body.as_str()), (200, TWENTY));
    assert!(
        hit.cache_status().starts_with("tower-redis; hit"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(f.calls("/shared"), 2, "the complete entry was kept");
}

/// RFC 9111 §3.3 while Redis is down: partial entries live in the
/// in-process store like any other, and are served the same way.
#[tokio::test]
async fn partial_entries_are_kept_in_process_while_redis_is_down() {
    let f = Fixture::new(|b| b.forward_ranges(true)).await;
    f.on("/outage", |_, headers| {
        ranged(headers, TWENTY, "\"v1\"", &[])
    });
    f.redis.kill().await;
    let miss = f.get("/outage", &[("range", "bytes=10-14")]).await;
    assert_eq!((miss.status, miss.body.as_str()), (206, "abcde"));
    let status = miss.cache_status();
    assert!(
        status.contains("stored") && status.contains("detail=redis-unavailable"),
        "{status}"
    );
    let hit = f.get("/outage", &[("range", "bytes=11-12")]).await;
    assert_eq!((hit.status, hit.body.as_str()), (206, "bc"));
    assert_eq!(hit.header("content-range"), Some("bytes 11-12/20"));
    let status = hit.cache_status();
    assert!(
        status.starts_with("tower-redis; hit") && status.contains("detail=redis-unavailable"),
        "{status}"
    );
    let completed = f.get("/outage", &[("range", "bytes=10-19")]).await;
    assert_eq!(
        (completed.status, completed.body.as_str()),
        (206, "abcdefghij")
    );
    assert_eq!(f.origin.request("/outage", 2)["range"], "bytes=15-");
    let whole = f.get("/outage", &[]).await;
    assert_eq!((whole.status, whole.body.as_str()), (200, TWENTY));
    assert_eq!(
        f.calls("/outage"),
        3,
        "without Range: forwarded, never the partial entry"
    );
}

/// RFC 9111 §4.3 and §3.4 while Redis hangs and the breaker is still
/// closed: a revalidation answered `304`, and a range completion, wait for
/// Redis one command timeout. A request whose lookup fell back (the entry
/// is in the in-process store), or whose lock attempt timed out, stores
/// the refreshed or combined entry without asking Redis again; it asked
/// for the lock and waited for the write before (two or three timeouts).
#[tokio::test]
async fn while_redis_hangs_a_revalidation_or_a_range_completion_waits_for_it_one_command_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let f = Fixture::with_redis(
        |config| config.command_timeout(TIMEOUT).failure_threshold(50),
        |b| b.forward_ranges(true),
    )
    .await;
    // Fresh for a minute; a `304` when asked with its tag.
    f.on("/validated", |n, headers| {
        let fields = [("etag", "\"v1\""), ("cache-control", "max-age=60")];
        if headers
            .get("if-none-match")
            .is_some_and(|tag| tag == "\"v1\"")
        {
            let answer = n.to_string();
            respond(304, &[&fields[..], &[("x-answer", &answer)]].concat(), "")
        } else {
            respond(200, &fields, "validated")
        }
    });
    f.on("/video", |_, headers| {
        ranged(headers, TWENTY, "\"v1\"", &[])
    });
    // The same with `Vary`: a revalidation's entry is not handed to the
    // requests coalesced on it.
    f.on("/varied", |_, headers| {
        let fields = [
            ("etag", "\"v1\""),
            ("cache-control", "max-age=60"),
            ("vary", "accept-encoding"),
        ];
        if headers
            .get("if-none-match")
            .is_some_and(|tag| tag == "\"v1\"")
        {
            respond(304, &fields, "")
        } else {
            respond(200, &fields, "varied")
        }
    });
    let timed = async |path: &str, headers: &[(&str, &str)]| {
        let started = Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(30), send(&f.app, "GET", path, headers))
                .await
                .expect("answered");
        (answer, started.elapsed())
    };
    let no_cache = [("cache-control", "no-cache")];
    f.get("/validated", &[]).await;
    // Redis hangs on writes only: the lookup is answered, the lock attempt
    // (a script) times out.
    f.redis.pause_writes().await;
    let (answer, waited) = timed("/validated", &no_cache).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "validated"),
        "{}",
        answer.cache_status()
    );
    assert_eq!(answer.header("x-answer"), Some("2"), "the 304's fields");
    assert!(
        waited < TIMEOUT * 3 / 2,
        "a revalidation whose lock attempt timed out waited {waited:?} ({})",
        answer.cache_status()
    );
    f.redis.resume_writes().await;
    // Redis answers a lookup again, which ends the outage: the in-process
    // store is emptied.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = send(&f.app, "GET", "/validated", &[]).await;
        if !answer.cache_status().contains("redis-unavailable") {
            break;
        }
        assert!(Instant::now() < deadline, "Redis never answered again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Redis hangs: lookups fall back to the in-process store (emptied when
    // Redis answered again), which keeps what these two misses store.
    f.redis.pause().await;
    let (part, _) = timed("/video", &[("range", "bytes=0-4")]).await;
    assert_eq!((part.status, part.body.as_str()), (206, "01234"));
    let (whole, _) = timed("/validated", &[]).await;
    assert_eq!(whole.status, 200);
    let (varied, _) = timed("/varied", &[]).await;
    assert_eq!(varied.status, 200);
    settle(&f.layer).await;
    let (answer, waited) = timed("/validated", &no_cache).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "validated"),
        "{}",
        answer.cache_status()
    );
    assert_eq!(answer.header("x-answer"), Some("4"), "the 304's fields");
    assert!(
        waited < TIMEOUT * 3 / 2,
        "a revalidation whose lookup timed out waited {waited:?} ({})",
        answer.cache_status()
    );
    // Two at once: one revalidates, and the other, which its entry is not
    // handed to (`Vary`), finds it in the in-process store: it does not
    // look in Redis again.
    // (The origin takes 100 ms, so that the second finds the first's
    // revalidation under way.)
    f.origin
        .delays
        .lock()
        .unwrap()
        .insert("/varied".to_owned(), Duration::from_millis(100));
    let (first, second) = tokio::join!(timed("/varied", &no_cache), timed("/varied", &no_cache));
    for (answer, waited) in [first, second] {
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, "varied"),
            "{}",
            answer.cache_status()
        );
        assert!(
            waited < TIMEOUT + Duration::from_millis(700),
            "a coalesced revalidation waited {waited:?} ({})",
            answer.cache_status()
        );
    }
    assert_eq!(
        f.calls("/varied"),
        2,
        "one revalidation: the other request is served what it stored"
    );
    let (completed, waited) = timed("/video", &[("range", "bytes=3-9")]).await;
    assert_eq!(
        (completed.status, completed.body.as_str()),
        (206, "3456789"),
        "{}",
        completed.cache_status()
    );
    assert!(
        waited < TIMEOUT * 3 / 2,
        "a range completion waited {waited:?} ({})",
        completed.cache_status()
    );
    assert_eq!(f.origin.request("/video", 2)["range"], "bytes=5-9");
    f.redis.resume().await;
}

/// RFC 5861 while Redis hangs: a stale entry served while it is refreshed
/// in the background, after a lookup that timed out (the entry is in the
/// in-process store). The refresh asks the origin at once: it asks Redis
/// for no fill lock, which would make it wait one more command timeout
/// first (this instance refreshes for itself).
#[tokio::test]
async fn while_redis_hangs_a_background_refresh_asks_for_no_lock() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let f = Fixture::with_redis(
        |config| config.command_timeout(TIMEOUT).failure_threshold(50),
        |b| b,
    )
    .await;
    f.on("/swr", |n, _| {
        let answer = n.to_string();
        respond(
            200,
            &[
                ("cache-control", "max-age=1, stale-while-revalidate=600"),
                ("x-answer", &answer),
            ],
            "swr",
        )
    });
    f.redis.pause().await;
    // A miss while Redis hangs: stored in process.
    let stored = f.get("/swr", &[]).await;
    assert_eq!(stored.header("x-answer"), Some("1"));
    settle(&f.layer).await;
    // Stale after its second of freshness (the age counts whole seconds).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    // Not `f.get`, which waits for the refresh's write.
    let stale = send(&f.app, "GET", "/swr", &[]).await;
    let served = Instant::now();
    assert_eq!(
        (stale.status, stale.header("x-answer")),
        (200, Some("1")),
        "{}",
        stale.cache_status()
    );
    assert!(
        stale.cache_status().contains("fwd=stale"),
        "served stale: {}",
        stale.cache_status()
    );
    let deadline = served + Duration::from_secs(10);
    while f.calls("/swr") < 2 {
        assert!(
            Instant::now() < deadline,
            "the refresh never asked the origin"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refreshed_after = served.elapsed();
    f.redis.resume().await;
    assert!(
        refreshed_after < TIMEOUT / 2,
        "the background refresh asked the origin {refreshed_after:?} after the stale answer"
    );
}

/// RFC 9111 §3.3 with §4.1 and the layer's tags and size limit: a partial
/// entry is one variant among a URL's (`Vary`), carries its response's tags
/// (a purge removes it like any entry), and is stored only within
/// `max_body_bytes`.
#[tokio::test]
async fn partial_entries_follow_vary_tags_purges_and_the_size_limit() {
    let f = Fixture::new(|b| b.forward_ranges(true)).await;
    f.on("/media", |_, headers| {
        let coding = headers
            .get("accept-encoding")
            .map_or("none", |v| v.to_str().unwrap())
            .to_owned();
        ranged(
            headers,
            TWENTY,
            "\"v1\"",
            &[
                ("vary", "accept-encoding"),
                ("surrogate-key", "media"),
                ("x-coding", &coding),
            ],
        )
    });
    let gzip = [("range", "bytes=0-9"), ("accept-encoding", "gzip")];
    let br = [("range", "bytes=0-9"), ("accept-encoding", "br")];
    f.get("/media", &gzip).await;
    let hit = f
        .get(
            "/media",
            &[("range", "bytes=2-3"), ("accept-encoding", "gzip")],
        )
        .await;
    assert_eq!((hit.status, hit.body.as_str()), (206, "23"));
    assert_eq!(hit.header("x-coding"), Some("gzip"));
    assert!(
        hit.header("surrogate-key").is_none(),
        "tag fields are not served"
    );
    let other = f.get("/media", &br).await;
    assert!(
        other.cache_status().contains("fwd=vary-miss"),
        "{}",
        other.cache_status()
    );
    assert_eq!(other.header("x-coding"), Some("br"));
    assert_eq!(f.calls("/media"), 2);
    assert!(
        f.get("/media", &br)
            .await
            .cache_status()
            .starts_with("tower-redis; hit")
    );

    let purged = f.layer.handle().purge_tag("media").await;
    assert_eq!(purged.urls, 1);
    let after = f.get("/media", &gzip).await;
    assert!(
        after.cache_status().contains("fwd=uri-miss"),
        "{}",
        after.cache_status()
    );
    assert_eq!(f.calls("/media"), 3);

    let small = Fixture::new(|b| b.forward_ranges(true).max_body_bytes(4)).await;
    small.on("/big-part", |_, headers| {
        ranged(headers, TWENTY, "\"v1\"", &[])
    });
    let part = small.get("/big-part", &[("range", "bytes=0-4")]).await;
    assert_eq!((part.status, part.body.as_str()), (206, "01234"));
    assert!(
        !part.cache_status().contains("stored"),
        "{}",
        part.cache_status()
    );
    small.get("/big-part", &[("range", "bytes=0-4")]).await;
    assert_eq!(
        small.calls("/big-part"),
        2,
        "a part past the limit is not stored"
    );
    small.get("/big-part", &[("range", "bytes=0-3")]).await;
    let within = small.get("/big-part", &[("range", "bytes=0-3")]).await;
    assert!(
        within.cache_status().starts_with("tower-redis; hit"),
        "{}",
        within.cache_status()
    );
}
