//! The session layer against real Redis: laziness, round trips, security,
//! expiry, concurrency, the user index, outages and clusters.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::header;
use tower_redis_core::testing::{TestCluster, TestRedis, wait_for_breaker};
use tower_redis_core::{BreakerState, RedisConfig, RedisManager, redis};
use tower_redis_session::{Expiry, Session, SessionLayer, SessionLayerBuilder};

mod support;
use support::{Gates, cookie_pair, send, send_bytes, session_keys, within};

fn routes() -> Router {
    routes_with(Gates::new())
}

fn routes_with(gates: Arc<Gates>) -> Router {
    Router::new()
        .route("/nothing", get(|| async { "ok" }))
        .route("/get/{key}", get(support::get_entry))
        .route(
            "/set/{key}/{value}",
            post(
                |session: Session, Path((key, value)): Path<(String, String)>| async move {
                    session.insert(&key, value).await.expect("json");
                    "set"
                },
            ),
        )
        .route(
            "/cacheable-set/{key}/{value}",
            post(
                |session: Session, Path((key, value)): Path<(String, String)>| async move {
                    session.insert(&key, value).await.expect("json");
                    (
                        axum::response::AppendHeaders([
                            (header::CACHE_CONTROL, "public"),
                            (header::CACHE_CONTROL, "max-age=600"),
                        ]),
                        "set",
                    )
                },
            ),
        )
        .route(
            "/cacheable-get/{key}",
            get(|session: Session, Path(key): Path<String>| async move {
                let value = session.get::<String>(&key).await.expect("json");
                (
                    [(header::CACHE_CONTROL, "public, max-age=600")],
                    value.unwrap_or_else(|| "none".to_owned()),
                )
            }),
        )
        .route(
            "/paired-set/{key}/{value}",
            post(
                |session: Session,
                 Extension(gates): Extension<Arc<Gates>>,
                 Path((key, value)): Path<(String, String)>| async move {
                    let _ = session.get::<String>(&key).await;
                    gates.pair.wait().await;
                    session.insert(&key, value).await.expect("json");
                    "set"
                },
            ),
        )
        .route("/gated-set/{key}/{value}", post(support::gated_set))
        .route(
            "/replace/{old}/{key}/{value}",
            post(
                |session: Session, Path((old, key, value)): Path<(String, String, String)>| async move {
                    let _ = session.remove::<String>(&old).await.expect("json");
                    session.insert(&key, value).await.expect("json");
                    "replaced"
                },
            ),
        )
        .route("/login/{user}", post(support::login))
        .route(
            "/gated-login/{user}",
            post(
                |session: Session,
                 Extension(gates): Extension<Arc<Gates>>,
                 Path(user): Path<String>| async move {
                    let _ = session.get::<String>("user").await;
                    gates.hold().await;
                    session.cycle_id().await;
                    session.set_user(&user).await;
                    "welcome"
                },
            ),
        )
        .route(
            "/claim/{user}",
            post(|session: Session, Path(user): Path<String>| async move {
                session.set_user(&user).await;
                "claimed"
            }),
        )
        .route(
            "/whoami",
            get(|session: Session| async move {
                session.user().await.unwrap_or_else(|| "nobody".to_owned())
            }),
        )
        .route("/logout", post(support::logout))
        .layer(Extension(gates))
}

/// The test routes behind a default session layer on `redis`, and its store.
async fn default_app(redis: &TestRedis) -> (Router, tower_redis_session::SessionStore) {
    let config = redis.config().build().expect("config");
    let layer = SessionLayer::builder(manager_for(config).await)
        .build()
        .expect("session layer");
    let store = layer.store().clone();
    (routes().layer(layer), store)
}

async fn manager_for(config: RedisConfig) -> RedisManager {
    RedisManager::connect(config).await.expect("manager starts")
}

fn app(builder: SessionLayerBuilder) -> Router {
    gated_app(builder).0
}

/// The app and the gates its `/paired-*` and `/gated-*` routes wait on.
fn gated_app(builder: SessionLayerBuilder) -> (Router, Arc<Gates>) {
    let gates = Gates::new();
    let app = routes_with(Arc::clone(&gates)).layer(builder.build().expect("valid session layer"));
    (app, gates)
}

/// A removed entry is gone for every instance: one request that removes an
/// entry and sets two others (one save) deletes the first's field in Redis,
/// keeps its stamp as a tombstone, and writes the others; a second instance,
/// which holds no copy of the session, reads exactly that.
#[tokio::test]
async fn a_request_that_removes_and_sets_entries_is_seen_by_every_instance() {
    let redis = TestRedis::start().await;
    let a = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let b = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, _) = send(&a, "POST", "/set/color/red", None).await;
    let cookie = cookie_pair(&set_cookie.expect("new session cookie"));
    send(&a, "POST", "/set/size/small", Some(&cookie)).await;
    let keys = session_keys(&redis).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let mut conn = redis.connection().await.unwrap();
    let reader = conn.clone();
    let color_stamp = || {
        let mut conn = reader.clone();
        let key = keys[0].clone();
        async move {
            redis::cmd("HMGET")
                .arg(key)
                .arg("d:color")
                .arg("t:color")
                .query_async::<(Option<String>, Option<u64>)>(&mut conn)
                .await
                .unwrap()
        }
    };
    let (_, set_at) = color_stamp().await;
    let set_at = set_at.expect("a set entry has its stamp");
    // The removal is stamped later than the set.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while redis_time_ms(&mut conn).await <= set_at {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis' clock stood still"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (status, body, _, _) = send(&a, "POST", "/replace/color/size/large", Some(&cookie)).await;
    assert_eq!((status, body.as_str()), (200, "replaced"));
    send(&a, "POST", "/set/shape/round", Some(&cookie)).await;

    for (entry, value) in [("color", "none"), ("size", "large"), ("shape", "round")] {
        assert_eq!(
            send(&b, "GET", &format!("/get/{entry}"), Some(&cookie))
                .await
                .1,
            value,
            "{entry}, read by the other instance"
        );
    }
    let (value, removed_at) = color_stamp().await;
    assert_eq!(value, None, "the removed entry's field is deleted");
    assert!(
        removed_at.is_some_and(|at| at > set_at),
        "its stamp is the removal's, kept as a tombstone: {removed_at:?}, set at {set_at}"
    );
}

#[tokio::test]
async fn untouched_session_costs_no_redis_call() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let cookie = cookie_pair(&set_cookie.expect("new session cookie"));
    let monitor = redis.monitor().await;

    for _ in 0..10 {
        let (status, _, set_cookie, _) = send(&app, "GET", "/nothing", Some(&cookie)).await;
        assert_eq!(status, 200);
        assert!(set_cookie.is_none());
    }
    let sent = monitor.commands().await;
    assert!(sent.is_empty(), "{sent:?}");
}

#[tokio::test]
async fn a_read_is_one_round_trip_and_a_change_is_two() {
    let redis = TestRedis::start().await;
    // Without tracking (with it, see `tests/tracking.rs`: a read of an
    // unchanged session costs nothing).
    let app = app(
        SessionLayer::builder(manager_for(redis.config().build().unwrap()).await)
            .tracked_capacity_bytes(0),
    );
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());

    // A read: PEXPIRE + HGETALL in one pipelined round trip, nothing else.
    let monitor = redis.monitor().await;
    let (_, body, _, _) = send(&app, "GET", "/get/a", Some(&cookie)).await;
    assert_eq!(body, "1");
    assert_eq!(monitor.commands().await, ["pexpire", "hgetall"], "read");

    // The idle timeout (30 min) was just renewed: the next reads within
    // 1/100 of it are a single HGETALL each.
    let monitor = redis.monitor().await;
    for _ in 0..3 {
        let (_, body, _, _) = send(&app, "GET", "/get/a", Some(&cookie)).await;
        assert_eq!(body, "1");
    }
    assert_eq!(
        monitor.commands().await,
        ["hgetall"; 3],
        "reads right after a renewal"
    );

    // A change: the same read, then one EVALSHA (whose own commands run
    // inside Redis, renewing the TTL too).
    let monitor = redis.monitor().await;
    send(&app, "POST", "/set/b/2", Some(&cookie)).await;
    assert_eq!(
        monitor.commands().await,
        ["hgetall", "evalsha"],
        "load + save"
    );
}

#[tokio::test]
async fn reads_keep_renewing_the_idle_timeout() {
    let redis = TestRedis::start().await;
    let idle = Duration::from_secs(1);
    let app = app(
        SessionLayer::builder(manager_for(redis.config().build().unwrap()).await).expiry(Expiry {
            idle,
            absolute: Duration::from_secs(3600),
            persistent: false,
        }),
    );
    let mut used_at = std::time::Instant::now();
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let mut cookie = cookie_pair(&set_cookie.unwrap());
    let mut created = 1;
    // Reads for three idle timeouts: each instance renews at least every
    // 1/100 of the idle timeout, so the session never lapses. A read that
    // ends within the idle timeout of the previous use's start must find
    // it. After a longer stall of the loaded machine the session may have
    // lapsed, rightly: then the test starts over with a new one.
    let mut run_started = used_at;
    let mut reads = 0;
    let monitor = redis.monitor().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while used_at - run_started < idle * 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no read kept up with the idle timeout for 3 s in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let read_at = std::time::Instant::now();
        let (_, body, _, _) = send(&app, "GET", "/get/a", Some(&cookie)).await;
        reads += 1;
        if std::time::Instant::now() - used_at < idle {
            assert_eq!(
                body,
                "1",
                "lapsed {:?} after the previous read",
                read_at - used_at
            );
        } else if body == "none" {
            used_at = std::time::Instant::now();
            run_started = used_at;
            let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
            cookie = cookie_pair(&set_cookie.unwrap());
            created += 1;
            continue;
        }
        used_at = read_at;
    }
    // Renewed by the reads, at most once each (what the save script renews
    // inside Redis is not sent by the client).
    let renewals = monitor
        .commands()
        .await
        .iter()
        .filter(|name| *name == "pexpire")
        .count();
    assert!(
        renewals > 3 && renewals <= reads,
        "{renewals} renewals for {reads} reads ({created} sessions)"
    );
    // Unused for longer than the idle timeout, it ends: Redis expires it no
    // sooner than the idle timeout after the last read began.
    // (A session that lapsed during a stall is gone already.)
    let key = only_session_key(&redis).await;
    let gone_after = wait_until_gone(&redis, &key, idle).await - used_at;
    assert!(
        gone_after >= idle,
        "expired {gone_after:?} after the last read"
    );
    let (_, body, _, _) = send(&app, "GET", "/get/a", Some(&cookie)).await;
    assert_eq!(body, "none");
}

/// The one session hash in Redis.
async fn only_session_key(redis: &TestRedis) -> String {
    let keys = session_keys(redis).await;
    assert_eq!(keys.len(), 1, "exactly one stored session: {keys:?}");
    keys.into_iter().next().expect("one key")
}

/// Waits (at most `expected` + 10 s) until Redis no longer holds `key`;
/// returns when that was first seen.
async fn wait_until_gone(redis: &TestRedis, key: &str, expected: Duration) -> std::time::Instant {
    let mut conn = redis.connection().await.expect("connection");
    let deadline = std::time::Instant::now() + expected + Duration::from_secs(10);
    loop {
        // An answer slower than the client's timeout (a loaded machine) is
        // asked again.
        let exists: Result<bool, _> = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await;
        let now = std::time::Instant::now();
        if exists == Ok(false) {
            return now;
        }
        assert!(
            now < deadline,
            "{key} still in Redis {:?} after its expected end ({exists:?})",
            expected + Duration::from_secs(10)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_new_session_is_stored_only_once_it_holds_data() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, body, set_cookie, _) = send(&app, "GET", "/get/a", None).await;
    assert_eq!(body, "none");
    assert!(set_cookie.is_none());
    assert!(session_keys(&redis).await.is_empty());
}

#[tokio::test]
async fn cookie_has_secure_defaults_and_the_response_is_not_cacheable() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, response) = send(&app, "POST", "/set/a/1", None).await;
    let set_cookie = set_cookie.unwrap();
    assert!(set_cookie.starts_with("__Host-session="), "{set_cookie}");
    for attribute in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(
            set_cookie.contains(attribute),
            "{attribute} missing: {set_cookie}"
        );
    }
    assert!(
        !set_cookie.contains("Max-Age"),
        "browser-session cookie by default"
    );
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    // Redis knows the session by a hash, never by the id.
    let id = cookie_pair(&set_cookie)
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    let keys = session_keys(&redis).await;
    assert_eq!(keys.len(), 1);
    assert!(!keys[0].contains(&id));
}

/// A response that sets the session cookie is `no-store`, whatever
/// `Cache-Control` the handler gave it: a shared cache must never hand one
/// visitor's session id to another. Responses that set no cookie keep the
/// handler's.
#[tokio::test]
async fn a_response_setting_the_cookie_is_no_store_even_if_the_handler_said_public() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (status, _, set_cookie, response) = send(&app, "POST", "/cacheable-set/a/1", None).await;
    assert_eq!(status, 200);
    let cookie = cookie_pair(&set_cookie.expect("a new session's cookie"));
    let cache_control: Vec<_> = response
        .headers()
        .get_all(header::CACHE_CONTROL)
        .iter()
        .collect();
    assert_eq!(cache_control, ["no-store"]);

    // No cookie set: the handler's own header stands.
    let (_, body, set_cookie, response) =
        send(&app, "GET", "/cacheable-get/a", Some(&cookie)).await;
    assert_eq!((body.as_str(), set_cookie), ("1", None));
    assert_eq!(
        response.headers()[header::CACHE_CONTROL],
        "public, max-age=600"
    );
}

#[tokio::test]
async fn a_forged_id_is_never_adopted() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let forged = "__Host-session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let (status, _, set_cookie, _) = send(&app, "POST", "/set/a/1", Some(forged)).await;
    assert_eq!(status, 200);
    let issued = cookie_pair(&set_cookie.expect("a fresh id"));
    assert_ne!(issued, forged);
    let (_, body, _, _) = send(&app, "GET", "/get/a", Some(forged)).await;
    assert_eq!(body, "none");
    let (_, body, _, _) = send(&app, "GET", "/get/a", Some(&issued)).await;
    assert_eq!(body, "1");
}

#[tokio::test]
async fn a_tampered_signed_cookie_is_no_session() {
    let redis = TestRedis::start().await;
    let app = app(
        SessionLayer::builder(manager_for(redis.config().build().unwrap()).await)
            .signing_key(*b"a secret of thirty-two bytes!!!!"),
    );
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());
    assert!(cookie.contains('.'), "signed value: {cookie}");
    let (_, body, _, _) = send(&app, "GET", "/get/a", Some(&cookie)).await;
    assert_eq!(body, "1");

    // Flip one character of the id part.
    let (name, value) = cookie.split_once('=').unwrap();
    let mut bytes = value.as_bytes().to_vec();
    bytes[5] = if bytes[5] == b'x' { b'y' } else { b'x' };
    let tampered = format!("{name}={}", String::from_utf8(bytes).unwrap());
    let (status, body, _, _) = send(&app, "GET", "/get/a", Some(&tampered)).await;
    assert_eq!((status, body.as_str()), (200, "none"));
}

/// Other cookies on the session cookie's `Cookie` line belong to the app
/// or to the browser, and may hold bytes that are not text: UTF-8
/// (`pref=ü`), Latin-1, anything over 0x7f. None of them hides the session.
#[tokio::test]
async fn bytes_that_are_not_text_in_other_cookies_do_not_log_the_user_out() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, _) = send(&app, "POST", "/login/alice", None).await;
    let cookie = cookie_pair(&set_cookie.expect("a session after login"));
    let pair = cookie.as_bytes();
    let lines: [Vec<u8>; 4] = [
        [b"pref=\xc3\xbc; ", pair].concat(),
        [pair, b"; pref=\xc3\xbc"].concat(),
        [b"lang=\xfc; ", pair, b"; theme=\xff\x80"].concat(),
        [b"a=\x80\x81;", pair, b";b=\"\xfe\""].concat(),
    ];
    for (i, line) in lines.iter().enumerate() {
        let (status, body, set_cookie, _) = send_bytes(&app, "GET", "/whoami", Some(line)).await;
        assert_eq!(
            (status, body.as_str(), set_cookie),
            (200, "alice", None),
            "line {i}: {}",
            line.escape_ascii()
        );
        // A change through such a line reaches the same session in Redis.
        let (status, _, set_cookie, _) =
            send_bytes(&app, "POST", &format!("/set/k{i}/v{i}"), Some(line)).await;
        assert_eq!((status, set_cookie), (200, None), "line {i}");
    }
    let keys = session_keys(&redis).await;
    assert_eq!(keys.len(), 1, "one session, no fresh one: {keys:?}");
    let mut conn = redis.connection().await.expect("connection");
    let (user, values): (String, Vec<Option<String>>) = redis::pipe()
        .cmd("HGET")
        .arg(&keys[0])
        .arg("_u")
        .cmd("HMGET")
        .arg(&keys[0])
        .arg(&["d:k0", "d:k1", "d:k2", "d:k3"])
        .query_async(&mut conn)
        .await
        .expect("HGET, HMGET");
    assert_eq!(user, "alice");
    assert_eq!(
        values,
        ["\"v0\"", "\"v1\"", "\"v2\"", "\"v3\""].map(|v| Some(v.to_owned()))
    );
}

#[tokio::test]
async fn an_oversized_or_malformed_cookie_is_no_session_not_an_error() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let huge = format!("__Host-session={}", "A".repeat(10_000));
    for cookie in [
        huge.as_str(),
        "__Host-session=\"",
        "__Host-session",
        "=;;==",
        "__Host-session=a%ZZ",
    ] {
        let (status, body, _, _) = send(&app, "GET", "/get/a", Some(cookie)).await;
        assert_eq!((status, body.as_str()), (200, "none"), "{cookie:.40}");
    }
}

#[tokio::test]
async fn idle_timeout_ends_an_unused_session() {
    let redis = TestRedis::start().await;
    let idle = Duration::from_millis(800);
    let expiry = Expiry {
        idle,
        absolute: Duration::from_secs(60),
        persistent: false,
    };
    let app = app(
        SessionLayer::builder(manager_for(redis.config().build().unwrap()).await).expiry(expiry),
    );
    let mut used_at = std::time::Instant::now();
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let mut cookie = cookie_pair(&set_cookie.unwrap());
    // Used within the idle timeout, it stays alive: each use renews it. A
    // read that ends within the idle timeout of the previous use's start
    // must find it. One that does not (a stall of the loaded machine) is not
    // counted, and if the session lapsed then, the test starts a new one.
    let mut alive = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while alive < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no three reads within the idle timeout of each other in 20 s"
        );
        tokio::time::sleep(idle * 3 / 8).await;
        let read_at = std::time::Instant::now();
        let (_, body, _, _) = send(&app, "GET", "/get/a", Some(&cookie)).await;
        if std::time::Instant::now() - used_at < idle {
            assert_eq!(
                body,
                "1",
                "ended {:?} after its last use",
                read_at - used_at
            );
            alive += 1;
        } else if body == "none" {
            used_at = std::time::Instant::now();
            let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
            cookie = cookie_pair(&set_cookie.unwrap());
            continue;
        }
        used_at = read_at;
    }
    // Then left alone: Redis ends it, no sooner than the idle timeout after
    // its last use, and the cookie is no session any more.
    let key = only_session_key(&redis).await;
    let gone_after = wait_until_gone(&redis, &key, idle).await - used_at;
    assert!(
        gone_after >= idle,
        "expired {gone_after:?} after its last use"
    );
    assert_eq!(send(&app, "GET", "/get/a", Some(&cookie)).await.1, "none");
}

#[tokio::test]
async fn absolute_timeout_ends_even_an_active_session() {
    let redis = TestRedis::start().await;
    // Read every 100 ms, the idle timeout alone would keep it for good.
    let (idle, absolute) = (Duration::from_secs(1), Duration::from_millis(1500));
    let expiry = Expiry {
        idle,
        absolute,
        persistent: true,
    };
    let app = app(
        SessionLayer::builder(manager_for(redis.config().build().unwrap()).await).expiry(expiry),
    );
    let before = std::time::Instant::now();
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let after = std::time::Instant::now();
    let set_cookie = set_cookie.unwrap();
    assert!(
        set_cookie.contains("Max-Age=1;") || set_cookie.ends_with("Max-Age=1"),
        "persistent cookie: {set_cookie}"
    );
    let cookie = cookie_pair(&set_cookie);
    // It is stored, and its key does not outlive the absolute timeout.
    let key = only_session_key(&redis).await;
    let mut conn = redis.connection().await.expect("connection");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(
        ttl > 0 && ttl <= 1500,
        "TTL {ttl} ms, capped by the absolute timeout"
    );
    // Used all along: every read that ends before the absolute timeout (and
    // within the idle timeout of the previous use) finds it, every read that
    // starts after it does not.
    let mut alive = 0;
    let mut used_at = before;
    loop {
        assert!(
            before.elapsed() < absolute + Duration::from_secs(10),
            "still alive {:?} after creation",
            before.elapsed()
        );
        let read_at = std::time::Instant::now();
        let body = send(&app, "GET", "/get/a", Some(&cookie)).await.1;
        let ended = std::time::Instant::now();
        if ended - before < absolute && ended - used_at < idle {
            assert_eq!(body, "1", "ended {:?} after creation", read_at - before);
            alive += 1;
        } else if read_at >= after + absolute {
            assert_eq!(body, "none", "{:?} after creation", read_at - before);
            break;
        }
        used_at = read_at;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(alive > 0, "no read before the absolute timeout");
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert!(!exists, "the ended session left Redis");
}

#[tokio::test]
async fn cycle_id_stops_the_old_id_at_once() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/cart/3", None).await;
    let anonymous = cookie_pair(&set_cookie.unwrap());
    let (_, _, set_cookie, _) = send(&app, "POST", "/login/alice", Some(&anonymous)).await;
    let logged_in = cookie_pair(&set_cookie.expect("new id after login"));
    assert_ne!(anonymous, logged_in);

    assert_eq!(
        send(&app, "GET", "/get/user", Some(&anonymous)).await.1,
        "none"
    );
    assert_eq!(
        send(&app, "GET", "/get/cart", Some(&anonymous)).await.1,
        "none"
    );
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&logged_in)).await.1,
        "alice"
    );
    assert_eq!(
        send(&app, "GET", "/get/cart", Some(&logged_in)).await.1,
        "3",
        "data moves with the session"
    );
    assert_eq!(session_keys(&redis).await.len(), 1);
}

#[tokio::test]
async fn concurrent_requests_changing_different_keys_both_persist() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/base/0", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());

    let (a, b) = within("both paired requests", async {
        tokio::join!(
            send(&app, "POST", "/paired-set/left/L", Some(&cookie)),
            send(&app, "POST", "/paired-set/right/R", Some(&cookie)),
        )
    })
    .await;
    assert_eq!((a.0, b.0), (200, 200));
    assert_eq!(send(&app, "GET", "/get/left", Some(&cookie)).await.1, "L");
    assert_eq!(send(&app, "GET", "/get/right", Some(&cookie)).await.1, "R");
    assert_eq!(send(&app, "GET", "/get/base", Some(&cookie)).await.1, "0");
}

#[tokio::test]
async fn a_destroyed_session_is_not_resurrected_by_a_concurrent_save() {
    let redis = TestRedis::start().await;
    let (app, gates) = gated_app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());

    let slow = {
        let (app, cookie) = (app.clone(), cookie.clone());
        tokio::spawn(async move { send(&app, "POST", "/gated-set/b/2", Some(&cookie)).await })
    };
    // The slow request has loaded the session; log out before it saves.
    within("the slow request's load", gates.loaded.notified()).await;
    let (_, _, logout_cookie, _) = send(&app, "POST", "/logout", Some(&cookie)).await;
    gates.proceed.notify_one();
    assert!(logout_cookie.expect("removal cookie").contains("Max-Age=0"));
    let (status, _, _, _) = within("the slow request", slow).await.unwrap();
    assert_eq!(status, 200);

    assert!(
        session_keys(&redis).await.is_empty(),
        "the slow save must not recreate the session"
    );
    assert_eq!(send(&app, "GET", "/get/a", Some(&cookie)).await.1, "none");
}

#[tokio::test]
async fn revoke_user_logs_out_everywhere() {
    let redis = TestRedis::start().await;
    let (app, store) = default_app(&redis).await;
    let (_, _, laptop, _) = send(&app, "POST", "/login/bob", None).await;
    let (_, _, phone, _) = send(&app, "POST", "/login/bob", None).await;
    let (_, _, other, _) = send(&app, "POST", "/login/carol", None).await;
    let (laptop, phone, other) = (
        cookie_pair(&laptop.unwrap()),
        cookie_pair(&phone.unwrap()),
        cookie_pair(&other.unwrap()),
    );

    assert_eq!(store.list_user_sessions("bob").await.unwrap().len(), 2);
    assert_eq!(store.revoke_user("bob").await.unwrap(), 2);
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&laptop)).await.1,
        "none"
    );
    assert_eq!(send(&app, "GET", "/get/user", Some(&phone)).await.1, "none");
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&other)).await.1,
        "carol"
    );
    assert!(store.list_user_sessions("bob").await.unwrap().is_empty());
}

/// A user with more sessions than one batch (256 are read or ended at
/// once): every live one is listed and ended, and a listed session that
/// expired meanwhile leaves the index.
#[tokio::test]
async fn a_user_s_many_sessions_are_listed_and_revoked_in_batches() {
    let redis = TestRedis::start().await;
    let (app, store) = default_app(&redis).await;
    for _ in 0..300 {
        let (status, _, cookie, _) = send(&app, "POST", "/login/dana", None).await;
        assert_eq!(status, 200);
        assert!(cookie.is_some());
    }
    // One of them expires (its hash goes; its index entry stays).
    let mut conn = redis.connection().await.expect("connection");
    let expired = session_keys(&redis).await.pop().expect("a session");
    let _: () = redis::cmd("DEL")
        .arg(&expired)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let index = async || -> usize {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*:u")
            .query_async(&mut redis.connection().await.expect("connection"))
            .await
            .expect("KEYS");
        let mut members = 0;
        for key in keys {
            let n: usize = redis::cmd("SCARD")
                .arg(&key)
                .query_async(&mut redis.connection().await.expect("connection"))
                .await
                .expect("SCARD");
            members += n;
        }
        members
    };
    assert_eq!(index().await, 300);
    assert_eq!(store.list_user_sessions("dana").await.unwrap().len(), 299);
    assert_eq!(index().await, 299, "the expired session left the index");
    assert_eq!(store.revoke_user("dana").await.unwrap(), 299);
    assert!(session_keys(&redis).await.is_empty());
    assert!(store.list_user_sessions("dana").await.unwrap().is_empty());
}

/// "Log out everywhere" is not one atomic step: a login while it runs must
/// not end up live and missing from the user's index, where no later
/// revocation would find it (the index used to be deleted whole at the end,
/// taking the new login's entry with it).
#[tokio::test]
async fn a_login_during_a_revocation_is_ended_or_stays_listed() {
    let redis = TestRedis::start().await;
    let (app, store) = default_app(&redis).await;
    for _ in 0..500 {
        send(&app, "POST", "/login/bob", None).await;
    }
    let mut conn = redis.connection().await.expect("connection");
    let mut dbsize = async || -> usize {
        redis::cmd("DBSIZE")
            .query_async(&mut conn)
            .await
            .expect("DBSIZE")
    };
    let before = dbsize().await;
    let revoking = tokio::spawn({
        let store = store.clone();
        async move { store.revoke_user("bob").await }
    });
    // Once the revocation has read the index (its first session is gone),
    // bob logs in again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while dbsize().await >= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no session was revoked"
        );
    }
    let (_, _, login, _) = send(&app, "POST", "/login/bob", None).await;
    let login = cookie_pair(&login.expect("login cookie"));
    let revoked = revoking.await.expect("task").expect("revoked");
    assert!(revoked >= 500, "{revoked}");
    let live = send(&app, "GET", "/get/user", Some(&login)).await.1 == "bob";
    let listed = store.list_user_sessions("bob").await.unwrap().len();
    assert_eq!(
        listed,
        usize::from(live),
        "the login during the revocation is live: {live}, listed: {listed}"
    );
}

/// Polls Redis directly until the session hash has `field`.
async fn wait_for_field(redis: &TestRedis, field: &str) -> bool {
    let mut conn = redis.connection().await.expect("connection");
    for _ in 0..100 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*:s")
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        for key in keys {
            let exists: bool = redis::cmd("HEXISTS")
                .arg(&key)
                .arg(field)
                .query_async(&mut conn)
                .await
                .expect("HEXISTS");
            if exists {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_hung_redis_does_not_log_anyone_out_and_changes_reach_redis_after() {
    let redis = TestRedis::start().await;
    let manager = manager_for(redis.config().failure_threshold(1).build().unwrap()).await;
    let app = app(SessionLayer::builder(manager.clone()));
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());
    assert_eq!(send(&app, "GET", "/get/a", Some(&cookie)).await.1, "1");

    redis.pause().await;
    // Served from this instance's copy, changed in process; never a 5xx.
    assert_eq!(send(&app, "GET", "/get/a", Some(&cookie)).await.1, "1");
    let (status, _, _, _) = send(&app, "POST", "/set/b/2", Some(&cookie)).await;
    assert_eq!(status, 200);
    assert_eq!(send(&app, "GET", "/get/b", Some(&cookie)).await.1, "2");
    // A new visitor during the outage gets a session too.
    let (_, _, new_visitor, _) = send(&app, "POST", "/set/during/outage", None).await;
    assert!(new_visitor.is_some());

    redis.resume().await;
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    assert!(
        wait_for_field(&redis, "d:b").await,
        "the change made during the outage reached Redis"
    );
    assert!(
        wait_for_field(&redis, "d:during").await,
        "the session created during the outage reached Redis"
    );
    assert_eq!(send(&app, "GET", "/get/a", Some(&cookie)).await.1, "1");
    assert_eq!(send(&app, "GET", "/get/b", Some(&cookie)).await.1, "2");
}

/// Redis' clock, in milliseconds since the epoch.
async fn redis_time_ms(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    secs * 1000 + micros / 1000
}

fn local_time_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits u64")
}

/// The app's Redis user (`app`), which the tests turn off and on to hold the
/// app's breaker open while Redis itself stays up for the test's own writes.
async fn with_app_user(redis: &TestRedis) -> RedisConfig {
    let url = redis
        .add_user("app", "app-secret")
        .await
        .expect("ACL SETUSER app");
    redis
        .config()
        .url(url)
        .failure_threshold(1)
        .build()
        .expect("valid config")
}

/// Cuts the app off Redis: its user is turned off and its connections are
/// closed, so requests fail and every probe is refused at authentication.
async fn cut_the_app_off(redis: &TestRedis) {
    redis
        .set_user_enabled("app", false)
        .await
        .expect("ACL SETUSER app off");
}

async fn let_the_app_back(redis: &TestRedis) {
    redis
        .set_user_enabled("app", true)
        .await
        .expect("ACL SETUSER app on");
}

/// A change made during an outage is replayed with the time it was made, so
/// a write another instance made after it, while this one was still cut
/// off, wins, even though the replay itself comes later than both.
#[tokio::test]
async fn outage_changes_never_overwrite_newer_data_in_redis() {
    let redis = TestRedis::start().await;
    let manager = manager_for(with_app_user(&redis).await).await;
    let layer = SessionLayer::builder(manager.clone()).build().unwrap();
    let store = layer.store().clone();
    let app = routes().layer(layer);
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/color/red", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());
    let mut conn = redis.connection().await.unwrap();
    let keys = session_keys(&redis).await;
    assert_eq!(keys.len(), 1, "{keys:?}");

    cut_the_app_off(&redis).await;
    send(&app, "POST", "/set/color/blue", Some(&cookie)).await; // queued locally
    let blue_queued_by = local_time_ms();
    // Queued after it: once this reaches Redis, the color change has been replayed.
    send(&app, "POST", "/set/marker/1", Some(&cookie)).await;
    assert_ne!(manager.health().state, BreakerState::Closed);
    assert_eq!(store.local_usage().queued_changes, 2, "both changes queued");

    // Meanwhile another instance writes a newer value, stamped with the
    // real time: after the queued change, before its replay.
    let mut newer_at = redis_time_ms(&mut conn).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while newer_at <= blue_queued_by {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis' clock never passed {blue_queued_by}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        newer_at = redis_time_ms(&mut conn).await;
    }
    redis::cmd("HSET")
        .arg(&keys[0])
        .arg("d:color")
        .arg("\"green\"")
        .arg("t:color")
        .arg(newer_at)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    // The app is still cut off: nothing has been replayed yet.
    assert_ne!(manager.health().state, BreakerState::Closed);
    let marker: bool = redis::cmd("HEXISTS")
        .arg(&keys[0])
        .arg("d:marker")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!marker, "replayed before the newer write");

    let_the_app_back(&redis).await;
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    assert!(
        wait_for_field(&redis, "d:marker").await,
        "the outage queue was replayed"
    );
    let (color, stamp): (String, u64) = redis::cmd("HMGET")
        .arg(&keys[0])
        .arg("d:color")
        .arg("t:color")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        (color.as_str(), stamp),
        ("\"green\"", newer_at),
        "the replayed change (made before the newer write) must not win"
    );
    assert_eq!(
        send(&app, "GET", "/get/color", Some(&cookie)).await.1,
        "green"
    );
}

/// The app (its Redis user cut off) and another instance on the same
/// Redis, which stays up: the app's store, to see its outage queue.
async fn cut_off_app_and_another(
    redis: &TestRedis,
) -> (
    Router,
    RedisManager,
    tower_redis_session::SessionStore,
    Router,
) {
    let manager = manager_for(with_app_user(redis).await).await;
    let layer = SessionLayer::builder(manager.clone())
        .build()
        .expect("session layer");
    let store = layer.store().clone();
    let other = default_app(redis).await.0;
    (routes().layer(layer), manager, store, other)
}

/// Lets the app back and waits until its outage queue is written.
async fn replayed(
    redis: &TestRedis,
    manager: &RedisManager,
    store: &tower_redis_session::SessionStore,
) {
    let_the_app_back(redis).await;
    wait_for_breaker(manager, BreakerState::Closed, Duration::from_secs(15)).await;
    within("the outage queue's replay", async {
        while store.local_usage().queued_changes > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A login (`cycle_id`) on an instance cut off from Redis is queued: end
/// the old id, create the new one. The user then logs out on another
/// instance, which reaches Redis. When the first instance is back, its
/// replay must not bring the session back under the new id it handed
/// out: the logout would be undone for whoever holds that cookie.
#[tokio::test]
async fn a_login_queued_during_an_outage_does_not_undo_a_logout_made_elsewhere() {
    let redis = TestRedis::start().await;
    let (app, manager, store, other) = cut_off_app_and_another(&redis).await;
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/secret/s", None).await;
    let old = cookie_pair(&set_cookie.unwrap());

    cut_the_app_off(&redis).await;
    let (status, _, set_cookie, _) = send(&app, "POST", "/login/mallory", Some(&old)).await;
    assert_eq!(status, 200);
    let new = cookie_pair(&set_cookie.expect("the login's new id"));
    assert_ne!(manager.health().state, BreakerState::Closed);
    assert!(
        store.local_usage().queued_changes > 0,
        "the login is queued"
    );
    assert_eq!(send(&other, "POST", "/logout", Some(&old)).await.1, "bye");
    assert!(session_keys(&redis).await.is_empty());

    replayed(&redis, &manager, &store).await;
    assert_eq!(
        session_keys(&redis).await,
        Vec::<String>::new(),
        "the replayed login brought the logged-out session back"
    );
    for instance in [&other, &app] {
        assert_eq!(
            send(instance, "GET", "/get/secret", Some(&new)).await.1,
            "none"
        );
    }
}

/// A session created during an outage and logged into during the same
/// outage reaches Redis under its new id when the outage ends (its
/// creation is written before its old id is ended).
#[tokio::test]
async fn a_session_created_and_logged_into_during_an_outage_reaches_redis_under_its_new_id() {
    let redis = TestRedis::start().await;
    let (app, manager, store, other) = cut_off_app_and_another(&redis).await;
    // Connected once before the outage.
    send(&app, "POST", "/set/warm/1", None).await;

    cut_the_app_off(&redis).await;
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/secret/s", None).await;
    let old = cookie_pair(&set_cookie.expect("a session during the outage"));
    let (status, _, set_cookie, _) = send(&app, "POST", "/login/alice", Some(&old)).await;
    assert_eq!(status, 200);
    let new = cookie_pair(&set_cookie.expect("the login's new id"));
    assert_ne!(manager.health().state, BreakerState::Closed);

    replayed(&redis, &manager, &store).await;
    assert_eq!(send(&other, "GET", "/get/secret", Some(&new)).await.1, "s");
    assert_eq!(send(&other, "GET", "/whoami", Some(&new)).await.1, "alice");
    assert_eq!(
        send(&other, "GET", "/get/secret", Some(&old)).await.1,
        "none"
    );
    assert_eq!(
        session_keys(&redis).await.len(),
        2,
        "the warm-up's and the login's"
    );
}

/// `tower_redis_session_reconciled_total` counts the changes made during an
/// outage as they are written to Redis after it.
#[tokio::test(flavor = "current_thread")]
async fn replayed_outage_changes_are_counted_in_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // A snapshot takes the counts since the previous one: add them up.
    let total = std::cell::Cell::new(0);
    let reconciled = || {
        let counted: u64 = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, _, _, _)| key.key().name() == "tower_redis_session_reconciled_total")
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(count) => count,
                other => panic!("a counter, not {other:?}"),
            })
            .sum();
        total.set(total.get() + counted);
        total.get()
    };

    let redis = TestRedis::start().await;
    let manager = manager_for(with_app_user(&redis).await).await;
    let app = app(SessionLayer::builder(manager.clone()));
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());
    assert_eq!(reconciled(), 0, "nothing replayed while Redis is up");

    cut_the_app_off(&redis).await;
    for change in ["/set/b/2", "/set/c/3", "/set/d/4"] {
        let (status, _, _, _) = send(&app, "POST", change, Some(&cookie)).await;
        assert_eq!(status, 200);
    }
    // A new session during the outage, too.
    send(&app, "POST", "/set/e/5", None).await;
    assert_eq!(reconciled(), 0, "nothing replayed during the outage");

    let_the_app_back(&redis).await;
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while reconciled() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 4 changes counted as replayed",
            reconciled()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reconciled(), 4);
    assert!(
        wait_for_field(&redis, "d:d").await,
        "the changes are in Redis"
    );
    assert!(
        wait_for_field(&redis, "d:e").await,
        "the new session is in Redis"
    );
}

/// While the breaker is open a read is answered from this instance's copy
/// at once, and counted as what it is: a fallback because the breaker was
/// open (`tower_redis_fallbacks_total{reason="breaker_open"}`), one a read.
#[tokio::test(flavor = "current_thread")]
async fn a_read_while_the_breaker_is_open_is_served_from_the_copy_and_counted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // A snapshot takes the counts since the previous one.
    let breaker_open = || -> u64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, _, _, _)| {
                key.key().name() == "tower_redis_fallbacks_total"
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "reason" && l.value() == "breaker_open")
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(count) => count,
                other => panic!("a counter, not {other:?}"),
            })
            .sum()
    };

    let redis = TestRedis::start().await;
    let manager = manager_for(with_app_user(&redis).await).await;
    let app = app(SessionLayer::builder(manager.clone()));
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/a/1", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());
    assert_eq!(send(&app, "GET", "/get/a", Some(&cookie)).await.1, "1");

    cut_the_app_off(&redis).await;
    // The first read after the cut meets the failure that opens the breaker.
    assert_eq!(send(&app, "GET", "/get/a", Some(&cookie)).await.1, "1");
    wait_for_breaker(&manager, BreakerState::Open, Duration::from_secs(15)).await;
    breaker_open();
    for _ in 0..3 {
        assert_eq!(send(&app, "GET", "/get/a", Some(&cookie)).await.1, "1");
    }
    assert_eq!(breaker_open(), 3, "each read counted once as a fallback");
    let_the_app_back(&redis).await;
}

#[tokio::test]
async fn sessions_work_on_redis_cluster() {
    let cluster = TestCluster::start().await;
    let layer = SessionLayer::builder(manager_for(cluster.config().build().unwrap()).await)
        .build()
        .unwrap();
    let store = layer.store().clone();
    let app = routes().layer(layer);
    let mut cookies = Vec::new();
    for user in ["u1", "u2", "u3", "u4"] {
        let (_, _, set_cookie, _) = send(&app, "POST", &format!("/login/{user}"), None).await;
        cookies.push((user, cookie_pair(&set_cookie.unwrap())));
    }
    for (user, cookie) in &cookies {
        send(&app, "POST", "/set/k/v", Some(cookie)).await;
        assert_eq!(send(&app, "GET", "/get/user", Some(cookie)).await.1, *user);
        assert_eq!(send(&app, "GET", "/get/k", Some(cookie)).await.1, "v");
    }
    let (_, _, cycled, _) = send(&app, "POST", "/login/u1", Some(&cookies[0].1)).await;
    let cycled = cookie_pair(&cycled.unwrap());
    assert_eq!(send(&app, "GET", "/get/k", Some(&cycled)).await.1, "v");
    assert_eq!(
        send(&app, "GET", "/get/k", Some(&cookies[0].1)).await.1,
        "none"
    );
    assert_eq!(store.revoke_user("u2").await.unwrap(), 1);
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&cookies[1].1)).await.1,
        "none"
    );
}

#[tokio::test]
async fn a_new_session_holding_only_a_user_is_stored() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, _) = send(&app, "POST", "/claim/dora", None).await;
    let cookie = cookie_pair(&set_cookie.expect("a session holding a user is stored"));
    assert_eq!(send(&app, "GET", "/whoami", Some(&cookie)).await.1, "dora");
}

#[tokio::test]
async fn a_cycle_racing_a_logout_does_not_bring_the_session_back() {
    let redis = TestRedis::start().await;
    let (app, gates) = gated_app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let (_, _, set_cookie, _) = send(&app, "POST", "/set/secret/s", None).await;
    let cookie = cookie_pair(&set_cookie.unwrap());
    let login = {
        let (app, cookie) = (app.clone(), cookie.clone());
        tokio::spawn(async move { send(&app, "POST", "/gated-login/mallory", Some(&cookie)).await })
    };
    // The login has loaded the session; log out before it cycles the id.
    within("the login's load", gates.loaded.notified()).await;
    send(&app, "POST", "/logout", Some(&cookie)).await;
    gates.proceed.notify_one();
    let (status, _, login_cookie, _) = within("the login", login).await.unwrap();
    assert_eq!(status, 200);
    // Issue 15: a request whose session was ended by another sends no
    // cookie at all (a removal could delete a concurrent login's new id).
    assert_eq!(
        login_cookie, None,
        "the cycled-out session leaves the cookie alone"
    );
    assert!(
        session_keys(&redis).await.is_empty(),
        "no session was recreated"
    );
}

#[tokio::test]
async fn a_write_refused_while_redis_is_up_reaches_redis_later() {
    let redis = TestRedis::start().await;
    let app = app(SessionLayer::builder(
        manager_for(redis.config().build().unwrap()).await,
    ));
    let mut conn = redis.connection().await.unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let (status, _, set_cookie, _) = send(&app, "POST", "/set/cart/3", None).await;
    assert_eq!(status, 200);
    let cookie = cookie_pair(&set_cookie.expect("the visitor still gets a session"));
    // Readable from this instance meanwhile.
    assert_eq!(send(&app, "GET", "/get/cart", Some(&cookie)).await.1, "3");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(
        wait_for_field(&redis, "d:cart").await,
        "the queued write reached Redis"
    );
    assert_eq!(send(&app, "GET", "/get/cart", Some(&cookie)).await.1, "3");
}

#[tokio::test]
async fn sessions_created_during_an_outage_stay_readable_while_they_are_replayed() {
    const SESSIONS: usize = 300;
    let redis = TestRedis::start().await;
    let manager = manager_for(redis.config().failure_threshold(1).build().unwrap()).await;
    let app = app(SessionLayer::builder(manager.clone()));

    redis.pause().await;
    let mut cookies = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let (status, _, set_cookie, _) = send(&app, "POST", &format!("/set/n/{i}"), None).await;
        assert_eq!(status, 200);
        cookies.push(cookie_pair(
            &set_cookie.expect("a session during the outage"),
        ));
    }
    let cookies = Arc::new(cookies);
    redis.resume().await;
    // Connected before the readers start: a new connection's handshake can
    // take longer than the client's timeout while they keep the thread busy.
    let mut conn = within("a connection for the test", async {
        loop {
            if let Ok(conn) = redis.connection().await {
                return conn;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // Readers run from before the breaker closes until every session is in
    // Redis: the replay writes them one by one, and a session whose queued
    // creation has been taken but not yet written must still read back.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = tokio::task::JoinSet::new();
    for reader in 0..4 {
        let (app, cookies, done) = (app.clone(), Arc::clone(&cookies), Arc::clone(&done));
        readers.spawn(async move {
            let mut wrong = Vec::new();
            let mut pass = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) || pass < 1 {
                for (i, cookie) in cookies.iter().enumerate().skip(reader).step_by(4) {
                    let (_, body, _, _) = send(&app, "GET", "/get/n", Some(cookie)).await;
                    if body != i.to_string() {
                        wrong.push((i, body));
                    }
                }
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    pass += 1;
                }
            }
            wrong
        });
    }
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    let mut stored = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while stored != SESSIONS && std::time::Instant::now() < deadline {
        // An answer slower than the client's timeout is asked again.
        let keys: Result<Vec<String>, _> =
            redis::cmd("KEYS").arg("*:s").query_async(&mut conn).await;
        if let Ok(keys) = keys {
            stored = keys.len();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let mut wrong = Vec::new();
    while let Some(found) = readers.join_next().await {
        wrong.extend(found.expect("reader"));
    }
    assert_eq!(
        stored, SESSIONS,
        "every outage session reached Redis within 15 s"
    );
    assert!(
        wrong.is_empty(),
        "{} reads during the replay did not see their session, e.g. {:?}",
        wrong.len(),
        wrong.first()
    );
}

/// The command timeout of the tests where Redis hangs.
const TIMEOUT: Duration = Duration::from_secs(1);

/// A manager on `redis` with a [`TIMEOUT`] command timeout, and a breaker
/// that stays closed while Redis hangs: each call sent is one more wait.
async fn hanging_manager(redis: &TestRedis) -> RedisManager {
    let config = redis
        .config()
        .command_timeout(TIMEOUT)
        .failure_threshold(50)
        .build()
        .expect("config");
    manager_for(config).await
}

/// While Redis hangs and the breaker has not opened yet, "log out
/// everywhere" reports Redis unavailable after one command timeout: the
/// time of the revocation could not be recorded, so the index is not read
/// (a second timeout).
#[tokio::test]
async fn revoke_user_while_redis_hangs_fails_after_one_command_timeout() {
    let redis = TestRedis::start().await;
    let layer = SessionLayer::builder(hanging_manager(&redis).await)
        .build()
        .expect("session layer");
    let store = layer.store().clone();
    let app = routes().layer(layer);
    send(&app, "POST", "/login/bob", None).await;
    redis.pause().await;
    let started = tokio::time::Instant::now();
    let revoked = within("the revocation", store.revoke_user("bob")).await;
    let waited = started.elapsed();
    redis.resume().await;
    assert!(revoked.is_err(), "{revoked:?}");
    assert!(
        waited < TIMEOUT * 3 / 2,
        "the revocation waited {waited:?} for a {TIMEOUT:?} command timeout"
    );
}

/// While Redis hangs and the breaker has not opened yet, a request that
/// reads its session (the read times out, and falls back to this
/// instance's copy) and then changes it, logs in again or logs out, waits
/// for Redis one command timeout: its write is queued without asking Redis
/// again (a second timeout).
#[tokio::test]
async fn while_redis_hangs_a_request_that_reads_then_writes_waits_one_command_timeout() {
    let redis = TestRedis::start().await;
    // No tracked copies: each read goes to Redis.
    let layer = SessionLayer::builder(hanging_manager(&redis).await)
        .tracked_capacity_bytes(0)
        .build()
        .expect("session layer");
    let app = routes().layer(layer);
    // A session of its own for each request: none has a change queued
    // (which its request's write would join without asking Redis).
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let (_, _, set_cookie, _) = send(&app, "POST", "/login/bob", None).await;
        cookies.push(cookie_pair(&set_cookie.expect("a session after login")));
    }
    redis.pause().await;
    let mut logged_in = None;
    for (path, cookie) in ["/set/a/1", "/login/bob", "/logout"]
        .into_iter()
        .zip(&cookies)
    {
        let started = tokio::time::Instant::now();
        let (status, body, set_cookie, _) =
            within(path, send(&app, "POST", path, Some(cookie))).await;
        let waited = started.elapsed();
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            waited < TIMEOUT * 3 / 2,
            "{path} waited {waited:?} for a {TIMEOUT:?} command timeout"
        );
        if path == "/login/bob" {
            logged_in = Some(cookie_pair(&set_cookie.expect("the login's new id")));
        }
    }
    redis.resume().await;
    // The queued writes reach Redis: another instance sees them.
    let other = default_app(&redis).await.0;
    let logged_in = logged_in.expect("logged in");
    let seen = [
        ("/get/a", &cookies[0], "1"),
        ("/get/user", &logged_in, "bob"),
        ("/get/user", &cookies[2], "none"),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (path, cookie, expected) in seen {
        loop {
            let body = send(&other, "GET", path, Some(cookie)).await.1;
            if body == expected {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} on another instance: {body}, not {expected}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
