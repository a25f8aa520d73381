//! Attacks on the session layer, against real Redis: a concurrent request
//! logging a user out, and attacks on the in-process outage queue and
//! local copies (flooding them, growing them, oversized sessions).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tower_redis_core::testing::{TestRedis, wait_for_breaker};
use tower_redis_core::{BreakerState, RedisManager, redis};
use tower_redis_session::{
    DEFAULT_MAX_SESSION_BYTES, Durability, Expiry, Session, SessionError, SessionLayer,
    SessionLayerBuilder, SessionStore,
};

mod support;
use support::{Gates, cookie_pair, session_keys, within};

/// The app, the gates its `/gated-*` routes wait on, and its store.
fn start_app(builder: SessionLayerBuilder) -> (Router, Arc<Gates>, SessionStore) {
    let layer = builder.build().expect("valid session layer");
    let store = layer.store().clone();
    let gates = Gates::new();
    let router = Router::new()
        .route("/get/{key}", get(support::get_entry))
        .route(
            "/set/{key}/{value}",
            post(
                |session: Session, Path((key, value)): Path<(String, String)>| async move {
                    match session.insert(&key, value).await {
                        Ok(()) => "ok".to_owned(),
                        Err(error) => format!("refused: {error}"),
                    }
                },
            ),
        )
        .route(
            "/fill/{key}/{bytes}",
            post(
                |session: Session, Path((key, bytes)): Path<(String, usize)>| async move {
                    match session.insert(&key, "x".repeat(bytes)).await {
                        Ok(()) => "ok".to_owned(),
                        Err(SessionError::TooLarge { size, limit, .. }) => {
                            format!("too large: {size} > {limit}")
                        }
                        Err(error) => format!("other error: {error}"),
                    }
                },
            ),
        )
        .route("/gated-set/{key}/{value}", post(support::gated_set))
        .route(
            "/gated-logout-then-set/{key}/{value}",
            post(
                |session: Session,
                 Extension(gates): Extension<Arc<Gates>>,
                 Path((key, value)): Path<(String, String)>| async move {
                    let _ = session.get::<String>(&key).await;
                    session.destroy().await;
                    gates.hold().await;
                    session.insert(&key, value).await.expect("json");
                    "bye"
                },
            ),
        )
        .route(
            "/gated-get/{key}",
            get(
                |session: Session,
                 Extension(gates): Extension<Arc<Gates>>,
                 Path(key): Path<String>| async move {
                    let value = session.get::<String>(&key).await.expect("json");
                    gates.hold().await;
                    value.unwrap_or_else(|| "none".to_owned())
                },
            ),
        )
        .route(
            "/fresh/{key}/{value}",
            post(
                |session: Session, Path((key, value)): Path<(String, String)>| async move {
                    // A new session in place of the old one (as an
                    // anti-fixation login may do without cycle_id).
                    session.destroy().await;
                    match session.insert(&key, value).await {
                        Ok(()) => "ok".to_owned(),
                        Err(error) => format!("refused: {error}"),
                    }
                },
            ),
        )
        .route(
            "/remove/{key}",
            post(|session: Session, Path(key): Path<String>| async move {
                match session.remove::<String>(&key).await {
                    Ok(_) => "ok".to_owned(),
                    Err(error) => format!("refused: {error}"),
                }
            }),
        )
        .route(
            "/set-many/{prefix}/{count}",
            post(
                |session: Session, Path((prefix, count)): Path<(String, usize)>| async move {
                    for i in 0..count {
                        if let Err(error) = session.insert(&format!("{prefix}-{i}"), 1).await {
                            return format!("refused: {error}");
                        }
                    }
                    "ok".to_owned()
                },
            ),
        )
        .route(
            "/remove-many/{prefix}/{count}",
            post(
                |session: Session, Path((prefix, count)): Path<(String, usize)>| async move {
                    for i in 0..count {
                        if let Err(error) = session.remove::<u32>(&format!("{prefix}-{i}")).await {
                            return format!("refused: {error}");
                        }
                    }
                    "ok".to_owned()
                },
            ),
        )
        .route("/login/{user}", post(support::login))
        .route(
            "/set-user/{user}",
            post(|session: Session, Path(user): Path<String>| async move {
                // A login kept under the same id (no cycle_id).
                session.set_user(&user).await;
                match session.insert("user", user).await {
                    Ok(()) => "ok".to_owned(),
                    Err(error) => format!("refused: {error}"),
                }
            }),
        )
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
                    session.insert("user", user).await.expect("json");
                    "welcome"
                },
            ),
        )
        .route("/logout", post(support::logout))
        .layer(Extension(Arc::clone(&gates)))
        .layer(layer);
    (router, gates, store)
}

/// [`support::send`] without the response head.
async fn send(
    app: &Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
) -> (u16, String, Option<String>) {
    let (status, body, set_cookie, _) = support::send(app, method, path, cookie).await;
    (status, body, set_cookie)
}

/// The app on `redis` and a session holding `cart=3`: the app, its store
/// and the session's cookie.
async fn app_with_a_cart(redis: &TestRedis) -> (Router, SessionStore, String) {
    let (app, _, store) = start_app(SessionLayer::builder(manager(redis).await));
    let (_, _, set_cookie) = send(&app, "POST", "/set/cart/3", None).await;
    let cookie = cookie_pair(&set_cookie.expect("session"));
    (app, store, cookie)
}

async fn manager(redis: &TestRedis) -> RedisManager {
    RedisManager::connect(redis.config().failure_threshold(1).build().expect("config"))
        .await
        .expect("manager")
}

#[tokio::test]
async fn concurrent_request_with_the_old_cookie_does_not_log_out_a_cycled_session() {
    let redis = TestRedis::start().await;
    for persistent in [false, true] {
        let expiry = Expiry {
            persistent,
            ..Expiry::default()
        };
        let (app, gates, _) =
            start_app(SessionLayer::builder(manager(&redis).await).expiry(expiry));
        let (_, _, set_cookie) = send(&app, "POST", "/set/cart/3", None).await;
        let old = cookie_pair(&set_cookie.expect("session"));
        let slow = {
            let (app, old) = (app.clone(), old.clone());
            tokio::spawn(
                async move { send(&app, "POST", "/gated-set/theme/dark", Some(&old)).await },
            )
        };
        within("the slow request's load", gates.loaded.notified()).await;
        let (_, _, login) = send(&app, "POST", "/login/alice", Some(&old)).await;
        let new = cookie_pair(&login.expect("login cookie"));
        gates.proceed.notify_one();
        let (status, _, slow_cookie) = within("the slow request", slow).await.expect("task");
        assert_eq!(status, 200);
        assert_eq!(
            slow_cookie, None,
            "persistent={persistent}: the request holding the old cookie must not touch the browser's cookie"
        );
        assert_eq!(send(&app, "GET", "/get/user", Some(&new)).await.1, "alice");
    }
}

/// With persistent cookies every request that reads the session renews the
/// cookie's `Max-Age`: a read that loaded the session before a concurrent
/// login cycled its id must not send the old id back.
#[tokio::test]
async fn a_concurrent_read_with_the_old_cookie_does_not_log_out_a_cycled_session() {
    a_read_with_the_old_cookie_while_a_login_cycles_it(false).await;
}

/// The same, with a flood of ends between the login and the slow read's
/// end: logins made on other instances, as fast as clients make them, each
/// announced to this one ([`announce_a_flood_of_ends`]), so the login's end
/// of the old id is pushed out of the instance's memory of ends before the
/// slow read asks. The memory knows it forgot an end newer than the read's
/// start and answers "ended": without that, the read renewed the old id's
/// persistent cookie and logged the fresh login out.
#[tokio::test]
async fn a_flood_of_ends_does_not_make_a_concurrent_read_log_out_a_cycled_session() {
    a_read_with_the_old_cookie_while_a_login_cycles_it(true).await;
}

/// A slow read with a persistent cookie, a login cycling its id while it
/// runs (and, with `flood`, a flood of announced ends after the login):
/// the read sends no cookie, and the login holds.
async fn a_read_with_the_old_cookie_while_a_login_cycles_it(flood: bool) {
    let redis = TestRedis::start().await;
    let expiry = Expiry {
        persistent: true,
        ..Expiry::default()
    };
    let manager = manager(&redis).await;
    let (app, gates, store) = start_app(SessionLayer::builder(manager.clone()).expiry(expiry));
    let (_, _, set_cookie) = send(&app, "POST", "/set/cart/3", None).await;
    let old = cookie_pair(&set_cookie.expect("session"));
    let slow = {
        let (app, old) = (app.clone(), old.clone());
        tokio::spawn(async move { send(&app, "GET", "/gated-get/cart", Some(&old)).await })
    };
    within("the slow read's load", gates.loaded.notified()).await;
    let (_, _, login) = send(&app, "POST", "/login/alice", Some(&old)).await;
    let new = cookie_pair(&login.expect("login cookie"));
    if flood {
        announce_a_flood_of_ends(&redis, &manager, &app, &store).await;
    }
    gates.proceed.notify_one();
    let (status, body, slow_cookie) = within("the slow read", slow).await.expect("task");
    assert_eq!((status, body.as_str()), (200, "3"));
    assert_eq!(slow_cookie, None, "the old id is not sent back");
    assert_eq!(send(&app, "GET", "/get/user", Some(&new)).await.1, "alice");
}

/// The same for a write: made with the old cookie after the login (so its
/// request found no session), with a flood of ends between its load and
/// its end. The login's end of the old id is pushed out of the memory; an
/// end numbered after the write began was forgotten too, so the write is
/// answered as if the id was cycled away: its change is not stored as a
/// new session whose cookie would replace the login's.
#[tokio::test]
async fn a_flood_of_ends_does_not_make_a_concurrent_write_log_out_a_cycled_session() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The runtime of this test is one thread: the spawned requests count
    // on this recorder too.
    let _guard = metrics::set_default_local_recorder(&recorder);
    // The changes not stored since the last call, by reason.
    let dropped = || -> Vec<(String, u64)> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, _, _, _)| {
                key.key().name() == "tower_redis_session_dropped_changes_total"
            })
            .filter_map(|(key, _, _, value)| {
                let reason = key.key().labels().find(|l| l.key() == "reason")?;
                match value {
                    DebugValue::Counter(count) if count > 0 => {
                        Some((reason.value().to_owned(), count))
                    }
                    _ => None,
                }
            })
            .collect()
    };
    let redis = TestRedis::start().await;
    let manager = manager(&redis).await;
    let (app, gates, store) = start_app(SessionLayer::builder(manager.clone()));
    let (_, _, set_cookie) = send(&app, "POST", "/set/cart/3", None).await;
    let old = cookie_pair(&set_cookie.expect("session"));
    let (_, _, login) = send(&app, "POST", "/login/alice", Some(&old)).await;
    let new = cookie_pair(&login.expect("login cookie"));
    let write = {
        let (app, old) = (app.clone(), old.clone());
        tokio::spawn(async move { send(&app, "POST", "/gated-set/theme/dark", Some(&old)).await })
    };
    within("the write's load", gates.loaded.notified()).await;
    announce_a_flood_of_ends(&redis, &manager, &app, &store).await;
    gates.proceed.notify_one();
    let (status, _, cookie) = within("the write", write).await.expect("task");
    assert_eq!(status, 200);
    assert_eq!(cookie, None, "a new session's cookie replaced the login's");
    assert_eq!(send(&app, "GET", "/get/user", Some(&new)).await.1, "alice");
    // Not silent: counted (and logged as a warning) as a change dropped
    // because the memory of ends forgot, not as a known cycled id.
    assert_eq!(dropped(), [("ends_forgotten".to_owned(), 1)]);

    // A request that logs out and leaves a message in a new session, with
    // a flood of ends while it runs: its own logout has no successor, so
    // the message is stored, in a new session.
    let (_, _, made) = send(&app, "POST", "/set/cart/3", None).await;
    let cookie = cookie_pair(&made.expect("session"));
    let logout = {
        let (app, cookie) = (app.clone(), cookie.clone());
        tokio::spawn(async move {
            send(
                &app,
                "POST",
                "/gated-logout-then-set/flash/bye",
                Some(&cookie),
            )
            .await
        })
    };
    within("the logout's load", gates.loaded.notified()).await;
    announce_a_flood_of_ends(&redis, &manager, &app, &store).await;
    gates.proceed.notify_one();
    let (status, _, fresh) = within("the logout", logout).await.expect("task");
    assert_eq!(status, 200);
    let fresh = cookie_pair(&fresh.expect("the message's new session"));
    assert_eq!(send(&app, "GET", "/get/flash", Some(&fresh)).await.1, "bye");
    assert_eq!(dropped(), [], "the message was stored");
}

/// Announces the ends of 60,000 sessions (none of them real) as other
/// instances would, well over what an instance's memory of ends holds
/// (4 MiB, about 22,000 heard once), and waits until `app`'s instance has heard them
/// all.
async fn announce_a_flood_of_ends(
    redis: &TestRedis,
    manager: &RedisManager,
    app: &Router,
    store: &SessionStore,
) {
    // A session whose copy this instance holds: its announced end, sent
    // after the flood, says when the flood has been heard.
    let before = session_keys(redis).await;
    let (_, _, made) = send(app, "POST", "/set/s/1", None).await;
    let made = cookie_pair(&made.expect("session"));
    assert_eq!(send(app, "GET", "/get/s", Some(&made)).await.1, "1");
    let sentinel = session_keys(redis)
        .await
        .into_iter()
        .find(|key| !before.contains(key))
        .expect("the sentinel's key");
    let sentinel = sentinel
        .split(['{', '}'])
        .nth(1)
        .expect("a storage key in braces")
        .to_owned();
    let copies = store.local_usage().local_copies_bytes;
    let mut conn = redis.connection().await.expect("connection");
    let channel = manager.keys().key(&["session-ended"]);
    for message in 0..60 {
        let keys: Vec<String> = (0..1000)
            .map(|n| format!("{:043}", message * 1000 + n))
            .collect();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(format!("c {}", keys.join(" ")))
            .query_async(&mut conn)
            .await
            .expect("PUBLISH");
    }
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(format!("d {sentinel}"))
        .query_async(&mut conn)
        .await
        .expect("PUBLISH");
    within("the flood to be heard", async {
        while store.local_usage().local_copies_bytes >= copies {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_double_submitted_login_does_not_log_out_the_first() {
    let redis = TestRedis::start().await;
    for persistent in [false, true] {
        let expiry = Expiry {
            persistent,
            ..Expiry::default()
        };
        let (app, gates, _) =
            start_app(SessionLayer::builder(manager(&redis).await).expiry(expiry));
        let (_, _, set_cookie) = send(&app, "POST", "/set/cart/3", None).await;
        let old = cookie_pair(&set_cookie.expect("session"));
        let second = {
            let (app, old) = (app.clone(), old.clone());
            tokio::spawn(async move { send(&app, "POST", "/gated-login/alice", Some(&old)).await })
        };
        within("the second login's load", gates.loaded.notified()).await;
        let (_, _, first) = send(&app, "POST", "/login/alice", Some(&old)).await;
        let new = cookie_pair(&first.expect("login cookie"));
        gates.proceed.notify_one();
        let (status, _, second_cookie) = within("the second login", second).await.expect("task");
        assert_eq!(status, 200);
        assert_eq!(second_cookie, None, "persistent={persistent}");
        assert_eq!(send(&app, "GET", "/get/user", Some(&new)).await.1, "alice");
    }
}

/// Waits until every change queued during the outage is in Redis.
async fn drained(store: &SessionStore) {
    within("the outage queue to drain", async {
        while store.local_usage().queued_changes > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_creates_and_deletes_during_an_outage_never_drops_a_logout() {
    const QUEUE: usize = 16 * 1024;
    let redis = TestRedis::start().await;
    let manager = manager(&redis).await;
    let (app, _, store) = start_app(
        SessionLayer::builder(manager.clone())
            .outage_queue_bytes(QUEUE)
            .max_session_bytes(1024),
    );
    let mut victims = Vec::new();
    for _ in 0..2 {
        let (_, _, victim) = send(&app, "POST", "/set/secret/s", None).await;
        let victim = cookie_pair(&victim.expect("victim session"));
        // Read before the outage: this instance keeps a copy.
        assert_eq!(send(&app, "GET", "/get/secret", Some(&victim)).await.1, "s");
        victims.push(victim);
    }

    redis.pause().await;
    // The first victim logs out early in the outage…
    let (_, _, removal) = send(&app, "POST", "/logout", Some(&victims[0])).await;
    assert!(removal.expect("removal cookie").contains("Max-Age=0"));
    // …then an attacker creates and destroys sessions as fast as it can.
    let mut refused = 0;
    for i in 0..400 {
        let (status, _, cookie) = send(&app, "POST", &format!("/set/k/{i}"), None).await;
        assert_eq!(status, 200);
        match cookie {
            Some(cookie) => {
                send(&app, "POST", "/logout", Some(&cookie_pair(&cookie))).await;
            }
            None => refused += 1,
        }
        let usage = store.local_usage();
        assert!(usage.queued_bytes <= QUEUE, "{usage:?}");
    }
    assert!(
        refused > 0,
        "the flood filled the queue: new sessions were refused"
    );
    // A log out once the queue is full is still taken.
    let (_, _, removal) = send(&app, "POST", "/logout", Some(&victims[1])).await;
    assert!(removal.expect("removal cookie").contains("Max-Age=0"));
    assert_eq!(
        send(&app, "GET", "/get/secret", Some(&victims[1])).await.1,
        "none"
    );

    redis.resume().await;
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    drained(&store).await;
    assert!(
        session_keys(&redis).await.is_empty(),
        "both victims' log outs made during the outage reached Redis"
    );
    for victim in &victims {
        assert_eq!(
            send(&app, "GET", "/get/secret", Some(victim)).await.1,
            "none"
        );
    }
}

#[tokio::test]
async fn outage_queue_is_bounded_by_bytes() {
    const QUEUE: usize = 64 * 1024;
    let redis = TestRedis::start().await;
    let manager = manager(&redis).await;
    let (app, _, store) = start_app(
        SessionLayer::builder(manager.clone())
            .outage_queue_bytes(QUEUE)
            .max_session_bytes(8 * 1024),
    );
    redis.pause().await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let (status, body, cookie) = send(&app, "POST", "/fill/blob/6000", None).await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        match cookie {
            Some(cookie) => accepted.push(cookie_pair(&cookie)),
            None => refused += 1,
        }
        let usage = store.local_usage();
        assert!(usage.queued_bytes <= QUEUE, "{usage:?}");
        assert_eq!(usage.queue_limit_bytes, QUEUE);
    }
    // 40 sessions of 6 kB (240 kB) do not fit in 64 KiB: the first ones
    // were queued, the rest refused, and nothing queued was dropped.
    assert!(
        (5..=10).contains(&accepted.len()) && refused == 40 - accepted.len(),
        "{} accepted, {refused} refused",
        accepted.len()
    );
    // A change to a queued session when the queue is full is not kept.
    send(&app, "POST", "/fill/more/6000", Some(&accepted[0])).await;
    assert_eq!(
        send(&app, "GET", "/get/more", Some(&accepted[0])).await.1,
        "none"
    );
    for cookie in &accepted {
        assert_eq!(
            send(&app, "GET", "/get/blob", Some(cookie)).await.1.len(),
            6000
        );
    }

    redis.resume().await;
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    drained(&store).await;
    assert_eq!(store.local_usage().queued_bytes, 0);
    assert_eq!(session_keys(&redis).await.len(), accepted.len());
    for cookie in &accepted {
        assert_eq!(
            send(&app, "GET", "/get/blob", Some(cookie)).await.1.len(),
            6000
        );
        assert_eq!(send(&app, "GET", "/get/more", Some(cookie)).await.1, "none");
    }
}

#[tokio::test]
async fn local_copies_are_bounded_by_bytes() {
    const COPIES: u64 = 64 * 1024;
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(
        SessionLayer::builder(manager(&redis).await)
            .local_capacity_bytes(COPIES)
            .max_session_bytes(8 * 1024),
    );
    for _ in 0..40 {
        let (_, _, cookie) = send(&app, "POST", "/fill/blob/6000", None).await;
        let cookie = cookie_pair(&cookie.expect("session"));
        assert_eq!(
            send(&app, "GET", "/get/blob", Some(&cookie)).await.1.len(),
            6000
        );
        let usage = store.local_usage();
        assert!(usage.local_copies_bytes <= COPIES, "{usage:?}");
        assert_eq!(usage.local_copies_limit_bytes, COPIES);
    }
    assert!(store.local_usage().local_copies_bytes > 0);
}

#[tokio::test]
async fn an_oversized_session_change_is_a_typed_error_the_handler_sees() {
    let redis = TestRedis::start().await;
    let (app, _, _) =
        start_app(SessionLayer::builder(manager(&redis).await).max_session_bytes(1024));
    // Too large for a new session: the handler is told, nothing is stored.
    let (status, body, cookie) = send(&app, "POST", "/fill/blob/2000", None).await;
    assert_eq!((status, body.as_str()), (200, "too large: 2006 > 1024"));
    assert_eq!(cookie, None);
    assert!(session_keys(&redis).await.is_empty());

    let (_, body, cookie) = send(&app, "POST", "/fill/a/500", None).await;
    assert_eq!(body, "ok");
    let cookie = cookie_pair(&cookie.expect("session"));
    // 503 bytes stored; 603 more would make 1106.
    let (_, body, _) = send(&app, "POST", "/fill/b/600", Some(&cookie)).await;
    assert_eq!(body, "too large: 1106 > 1024");
    assert_eq!(send(&app, "GET", "/get/b", Some(&cookie)).await.1, "none");
    assert_eq!(
        send(&app, "GET", "/get/a", Some(&cookie)).await.1.len(),
        500
    );
    // Replacing an entry counts its new size only.
    let (_, body, _) = send(&app, "POST", "/fill/a/1000", Some(&cookie)).await;
    assert_eq!(body, "ok");
    assert_eq!(
        send(&app, "GET", "/get/a", Some(&cookie)).await.1.len(),
        1000
    );

    // The default limit.
    let (defaults, _, _) = start_app(SessionLayer::builder(manager(&redis).await));
    let over = DEFAULT_MAX_SESSION_BYTES;
    let (_, body, cookie) = send(&defaults, "POST", &format!("/fill/blob/{over}"), None).await;
    assert_eq!(body, format!("too large: {} > {over}", over + 6));
    assert_eq!(cookie, None);
    let (_, body, cookie) =
        send(&defaults, "POST", &format!("/fill/blob/{}", over - 6), None).await;
    assert_eq!(body, "ok");
    assert!(cookie.is_some());
}

/// Logs alice in from `cookie`'s session while Redis refuses writes
/// (`take.lua` only reads and deletes before its marker, and a write after
/// a delete is allowed out of memory; the new id's write is refused): the
/// old id is taken, the login queued whole. Returns the new id's cookie;
/// writes stay refused.
async fn login_refused(app: &Router, redis: &TestRedis, cookie: &str) -> String {
    refuse_writes(redis, true).await;
    let (status, _, login) = send(app, "POST", "/login/alice", Some(cookie)).await;
    assert_eq!(status, 200);
    assert!(
        session_keys(redis).await.is_empty(),
        "the old id was taken, the new one refused"
    );
    cookie_pair(&login.expect("the login's new id"))
}

/// Makes Redis refuse writes (out of memory, `noeviction`) while it stays up,
/// or lifts that.
async fn refuse_writes(redis: &TestRedis, refuse: bool) {
    let mut conn = redis.connection().await.expect("connection");
    for (name, value) in [
        ("maxmemory-policy", "noeviction"),
        ("maxmemory", if refuse { "1" } else { "0" }),
    ] {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async::<()>(&mut conn)
            .await
            .expect("CONFIG SET");
    }
}

/// A session created while Redis refused writes waits in the outage queue.
/// A change to it must wait behind its creation: sent to Redis directly it
/// finds no session there and would be lost.
#[tokio::test]
async fn a_change_to_a_session_whose_creation_is_still_queued_is_not_lost() {
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(SessionLayer::builder(manager(&redis).await));
    refuse_writes(&redis, true).await;
    let (_, _, cookie) = send(&app, "POST", "/set/cart/3", None).await;
    let cookie = cookie_pair(&cookie.expect("a session, queued"));
    let (status, _, set_cookie) = send(&app, "POST", "/set/more/4", Some(&cookie)).await;
    assert_eq!((status, set_cookie), (200, None));
    assert_eq!(send(&app, "GET", "/get/more", Some(&cookie)).await.1, "4");
    // So must a login's id change.
    let (_, _, login) = send(&app, "POST", "/login/alice", Some(&cookie)).await;
    let login = cookie_pair(&login.expect("the login's new id"));
    refuse_writes(&redis, false).await;
    drained(&store).await;
    assert_eq!(session_keys(&redis).await.len(), 1);
    for (key, value) in [("cart", "3"), ("more", "4"), ("user", "alice")] {
        assert_eq!(
            send(&app, "GET", &format!("/get/{key}"), Some(&login))
                .await
                .1,
            value
        );
    }
    assert_eq!(
        send(&app, "GET", "/get/cart", Some(&cookie)).await.1,
        "none"
    );
}

/// A log out of a session whose creation is still queued must not be undone
/// by the creation's replay.
#[tokio::test]
async fn a_logout_of_a_session_whose_creation_is_still_queued_is_not_undone() {
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(SessionLayer::builder(manager(&redis).await));
    refuse_writes(&redis, true).await;
    let (_, _, cookie) = send(&app, "POST", "/set/cart/3", None).await;
    let cookie = cookie_pair(&cookie.expect("a session, queued"));
    send(&app, "POST", "/logout", Some(&cookie)).await;
    refuse_writes(&redis, false).await;
    drained(&store).await;
    assert!(
        session_keys(&redis).await.is_empty(),
        "the session was recreated"
    );
    assert_eq!(
        send(&app, "GET", "/get/cart", Some(&cookie)).await.1,
        "none"
    );
}

/// A request that still holds the old cookie and logs out after a
/// concurrent login cycled the id finds no session: it must not remove the
/// cookie, which the browser may already have replaced with the new id.
#[tokio::test]
async fn a_logout_with_the_old_cookie_does_not_log_out_a_cycled_session() {
    let redis = TestRedis::start().await;
    let (app, _, old) = app_with_a_cart(&redis).await;
    let (_, _, login) = send(&app, "POST", "/login/alice", Some(&old)).await;
    let new = cookie_pair(&login.expect("login cookie"));
    let (status, _, cookie) = send(&app, "POST", "/logout", Some(&old)).await;
    assert_eq!(status, 200);
    assert_eq!(cookie, None, "the logout of an id another request cycled");
    assert_eq!(send(&app, "GET", "/get/user", Some(&new)).await.1, "alice");
    // A logout of the live session still removes the cookie.
    let (_, _, removal) = send(&app, "POST", "/logout", Some(&new)).await;
    assert!(
        removal.as_deref().is_some_and(|c| c.contains("Max-Age=0")),
        "{removal:?}"
    );
}

/// A request that still holds the old cookie and writes (a form's token, a
/// cart entry) after a concurrent login cycled the id finds no session: it
/// must not start a new one, whose cookie would replace the login's.
#[tokio::test]
async fn a_write_with_the_old_cookie_does_not_log_out_a_cycled_session() {
    let redis = TestRedis::start().await;
    let (app, store, old) = app_with_a_cart(&redis).await;
    let (_, _, login) = send(&app, "POST", "/login/alice", Some(&old)).await;
    let new = cookie_pair(&login.expect("login cookie"));
    let (status, _, cookie) = send(&app, "POST", "/set/theme/dark", Some(&old)).await;
    assert_eq!(status, 200);
    assert_eq!(cookie, None, "a write to an id another request cycled");
    assert_eq!(send(&app, "GET", "/get/user", Some(&new)).await.1, "alice");
    assert_eq!(session_keys(&redis).await.len(), 1, "a session was created");
    // A cookie whose session expired (gone from Redis, not ended by a
    // request this instance saw) still starts a new session on a write.
    let mut conn = redis.connection().await.expect("connection");
    for key in session_keys(&redis).await {
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut conn)
            .await
            .expect("DEL");
    }
    // This instance's tracked copy goes with Redis' invalidation.
    store.sync().await.expect("sync");
    let (_, _, fresh) = send(&app, "POST", "/set/theme/dark", Some(&new)).await;
    assert!(fresh.is_some(), "a write to an expired session starts one");
}

/// An app that keeps entries under names its clients choose (a token per
/// form) and removes them: each removal leaves a tombstone (the removal's
/// time, for replays after an outage), which must not grow the session's
/// hash, and every read of it, without bound.
#[tokio::test]
async fn removals_under_names_a_client_chooses_do_not_grow_the_session_without_bound() {
    let redis = TestRedis::start().await;
    let (app, _, cookie) = app_with_a_cart(&redis).await;
    for i in 0..2_500 {
        let (status, body, _) =
            send(&app, "POST", &format!("/remove/form-{i}"), Some(&cookie)).await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    let hash = the_session_hash(&redis).await;
    let fields = hash.len();
    assert!(fields <= 2_048, "{fields} fields after 2,500 removals");
    assert_eq!(send(&app, "GET", "/get/cart", Some(&cookie)).await.1, "3");
    // Below the bound a removal still leaves its tombstone.
    let stamp = hash.get("t:form-0");
    assert!(stamp.is_some(), "the first removals keep their tombstones");
}

/// The fields of the one session hash in `redis`.
async fn the_session_hash(redis: &TestRedis) -> std::collections::HashMap<String, String> {
    let key = session_keys(redis).await.pop().expect("the session");
    let mut conn = redis.connection().await.expect("connection");
    redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("HGETALL")
}

/// The same bound for entries that were set before they were removed: a
/// removal used to refresh the tombstone a name already had whatever the
/// hash's size, so setting and then removing names a client chooses left
/// one field per name, for good.
#[tokio::test]
async fn names_set_then_removed_do_not_grow_the_session_without_bound() {
    let redis = TestRedis::start().await;
    let (app, _, cookie) = app_with_a_cart(&redis).await;
    for batch in 0..23 {
        let prefix = format!("form{batch}");
        let set = send(
            &app,
            "POST",
            &format!("/set-many/{prefix}/100"),
            Some(&cookie),
        )
        .await;
        assert_eq!((set.0, set.1.as_str()), (200, "ok"));
        let removed = send(
            &app,
            "POST",
            &format!("/remove-many/{prefix}/100"),
            Some(&cookie),
        )
        .await;
        assert_eq!((removed.0, removed.1.as_str()), (200, "ok"));
    }
    let fields = the_session_hash(&redis).await.len();
    assert!(
        fields <= 2_048,
        "{fields} fields after 2,300 names set and removed"
    );
    assert_eq!(send(&app, "GET", "/get/cart", Some(&cookie)).await.1, "3");
    assert_eq!(
        send(&app, "GET", "/get/form0-0", Some(&cookie)).await.1,
        "none"
    );
}

/// A tombstone's size does not follow its name's: long names set and then
/// removed (their tombstones kept, the hash being far below its bound in
/// fields) used to leave their whole names in the hash, which every read
/// of the session returns.
#[tokio::test]
async fn long_removed_names_leave_small_tombstones() {
    let redis = TestRedis::start().await;
    let (app, _, cookie) = app_with_a_cart(&redis).await;
    for i in 0..40 {
        let name = format!("{i}-{}", "n".repeat(8 * 1024));
        let set = send(&app, "POST", &format!("/set/{name}/1"), Some(&cookie)).await;
        assert_eq!((set.0, set.1.as_str()), (200, "ok"));
        let removed = send(&app, "POST", &format!("/remove/{name}"), Some(&cookie)).await;
        assert_eq!((removed.0, removed.1.as_str()), (200, "ok"));
    }
    let fields = the_session_hash(&redis).await;
    let bytes: usize = fields
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    assert!(
        bytes < 16 * 1024,
        "{bytes} bytes in the session's hash after 40 long names were set and removed"
    );
    assert_eq!(send(&app, "GET", "/get/cart", Some(&cookie)).await.1, "3");
}

/// A login whose second step fails (the old id taken, the new one refused:
/// Redis out of memory, or a timeout) is queued whole. Its replay must find
/// the old id taken by this very cycle, not ended by another request, and
/// write the new one: it used to answer "gone", drop the new id's creation
/// and end it on every instance, so the visitor logged in, was logged out,
/// and lost the session.
#[tokio::test]
async fn a_login_whose_new_id_is_refused_after_the_take_is_not_lost() {
    let redis = TestRedis::start().await;
    let (app, store, cookie) = app_with_a_cart(&redis).await;
    let mut conn = redis.connection().await.expect("connection");
    let mut markers = async || -> Vec<String> {
        redis::cmd("KEYS")
            .arg("*:cycled")
            .query_async(&mut conn)
            .await
            .expect("KEYS")
    };
    // A login Redis acknowledged whole leaves no marker behind.
    let (_, _, first) = send(&app, "POST", "/login/bob", Some(&cookie)).await;
    let cookie = cookie_pair(&first.expect("the first login's new id"));
    within("the first login's marker to go", async {
        while !markers().await.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let login = login_refused(&app, &redis, &cookie).await;
    refuse_writes(&redis, false).await;
    drained(&store).await;
    assert_eq!(session_keys(&redis).await.len(), 1);
    for (key, value) in [("cart", "3"), ("user", "alice")] {
        assert_eq!(
            send(&app, "GET", &format!("/get/{key}"), Some(&login))
                .await
                .1,
            value
        );
    }
    assert_eq!(
        send(&app, "GET", "/get/cart", Some(&cookie)).await.1,
        "none"
    );
}

/// "Log out everywhere" made while a login waits in an instance's outage
/// queue (its second step was refused: the new id is neither in Redis nor
/// in the user's index, for the revocation to find) ends that login too.
/// The replay finds the user's revocation newer than the login and writes
/// nothing. It used to write the new id: the user stayed logged in on the
/// device that logged in just before the revocation. A login queued after
/// the revocation is written.
#[tokio::test]
async fn a_revocation_ends_a_login_waiting_in_the_outage_queue() {
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(SessionLayer::builder(manager_as(&redis, "a", &[]).await));
    let (_, _, set_cookie) = send(&app, "POST", "/set/cart/3", None).await;
    let cookie = cookie_pair(&set_cookie.expect("session"));
    let login = login_refused(&app, &redis, &cookie).await;
    revoke_alice_while_the_replay_waits(&redis, &store).await;
    assert!(
        session_keys(&redis).await.is_empty(),
        "the login made before the revocation was written after it"
    );
    assert_eq!(send(&app, "GET", "/get/user", Some(&login)).await.1, "none");
    // A login queued the same way more than the margin (1 s) after the
    // revocation is written when replayed.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (_, _, set_cookie) = send(&app, "POST", "/set/cart/4", None).await;
    let cookie = cookie_pair(&set_cookie.expect("session"));
    let again = login_refused(&app, &redis, &cookie).await;
    refuse_writes(&redis, false).await;
    drained(&store).await;
    assert_eq!(session_keys(&redis).await.len(), 1);
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&again)).await.1,
        "alice"
    );
}

/// The same with the user set on an existing session under its own id
/// (no `cycle_id`): its queued save is not written, and the session ends.
/// It used to stay in Redis as it was before the login while this
/// instance's copy kept the login, which a later outage could serve. The
/// copy ends with the replay itself, not only through the announcement of
/// the end, which this instance's Redis user may not publish here (no
/// channel): an outage right after the replay serves no login. The session
/// also leaves the index of the user it had before (bob's here).
#[tokio::test]
async fn a_revocation_ends_a_session_whose_user_was_set_in_place_in_the_outage_queue() {
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(SessionLayer::builder(manager_as(&redis, "a", &[]).await));
    acl(&redis, "a", "resetchannels").await;
    let (_, _, set_cookie) = send(&app, "POST", "/set/cart/3", None).await;
    let cookie = cookie_pair(&set_cookie.expect("session"));
    // The session is bob's, and is handed to alice in the outage: Redis
    // refuses the whole save (the `SREM` from bob's index, which is no
    // write that grows memory, by the ACL).
    send(&app, "POST", "/set-user/bob", Some(&cookie)).await;
    // This line carries the test: without it the refused pipeline's
    // `SREM` runs anyway and does the defence's work, and the test passes
    // with the defence broken (checked: it did).
    acl(&redis, "a", "-srem").await;
    refuse_writes(&redis, true).await;
    let (status, body, _) = send(&app, "POST", "/set-user/alice", Some(&cookie)).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&cookie)).await.1,
        "alice"
    );
    revoke_alice_while_the_replay_waits(&redis, &store).await;
    assert!(
        session_keys(&redis).await.is_empty(),
        "the session whose login was made before the revocation lives on"
    );
    // Nor does its id stay in bob's index.
    let indexes = indexes(&redis).await;
    assert!(
        indexes.is_empty(),
        "an index keeps the ended session: {indexes:?}"
    );
    redis.pause().await;
    let in_outage = send(&app, "GET", "/get/user", Some(&cookie)).await.1;
    redis.resume().await;
    assert_eq!(in_outage, "none", "this instance's copy kept the login");
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&cookie)).await.1,
        "none"
    );
    assert_eq!(
        send(&app, "GET", "/get/cart", Some(&cookie)).await.1,
        "none"
    );
}

/// A session handed from one user to another under its own id while Redis
/// refused writes leaves the first user's index when the change is
/// replayed: "log out everywhere" of that user no longer ends it, nor lists
/// it. The queued change used to forget the previous user.
#[tokio::test]
async fn a_session_handed_to_another_user_in_the_outage_queue_leaves_the_first_user_s_index() {
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(SessionLayer::builder(manager_as(&redis, "h", &[]).await));
    let (_, _, set_cookie) = send(&app, "POST", "/set-user/bob", None).await;
    let cookie = cookie_pair(&set_cookie.expect("session"));
    assert_eq!(
        store.list_user_sessions("bob").await.expect("listed").len(),
        1
    );
    // Redis refuses the whole save: the script and the `SADD` (out of
    // memory), and the `SREM` from bob's index, which is no write that
    // grows memory (the instance's Redis user may not run it, here).
    // This line carries the test: without it the refused pipeline's
    // `SREM` runs anyway and does the defence's work, and the test passes
    // with the defence broken (checked: it did).
    acl(&redis, "h", "-srem").await;
    refuse_writes(&redis, true).await;
    let (status, body, _) = send(&app, "POST", "/set-user/alice", Some(&cookie)).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    refuse_writes(&redis, false).await;
    acl(&redis, "h", "+srem").await;
    drained(&store).await;
    assert_eq!(
        store
            .list_user_sessions("alice")
            .await
            .expect("listed")
            .len(),
        1
    );
    assert!(
        store
            .list_user_sessions("bob")
            .await
            .expect("listed")
            .is_empty()
    );
    assert_eq!(store.revoke_user("bob").await.expect("revoked"), 0);
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&cookie)).await.1,
        "alice"
    );
}

/// A login queued whole in an outage (the take of the old id could not
/// reach Redis) is replayed with the old id leaving the index of the user
/// the session had before (bob's) and the new id joining the new user's
/// (alice's). The replay used to take the old id out of the new user's
/// index, where it never was, and bob's index kept a dead id: "log out
/// everywhere" of bob and his listing met it until a listing tidied it.
#[tokio::test]
async fn a_login_queued_in_an_outage_takes_the_old_id_out_of_the_previous_user_s_index() {
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(SessionLayer::builder(manager(&redis).await));
    let (_, _, set_cookie) = send(&app, "POST", "/set-user/bob", None).await;
    let cookie = cookie_pair(&set_cookie.expect("session"));
    assert_eq!(indexes(&redis).await.len(), 1, "bob's index");
    redis.pause().await;
    let login = login_queued(&app, &store, &cookie).await;
    redis.resume().await;
    alice_alone_in_one_index(&app, &redis, &store, &login).await;
}

/// The same when another instance set the user on the old id while the
/// login waited (the login read an anonymous session): the old id leaves
/// the index of the user Redis held with it.
#[tokio::test]
async fn a_login_queued_in_an_outage_takes_the_old_id_out_of_the_index_redis_holds_it_in() {
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(SessionLayer::builder(manager_as(&redis, "q", &[]).await));
    let (other, _, _) = start_app(SessionLayer::builder(manager(&redis).await));
    let (_, _, set_cookie) = send(&app, "POST", "/set/cart/3", None).await;
    let cookie = cookie_pair(&set_cookie.expect("session"));
    // The login's take is refused (no scripts for this instance's Redis
    // user): the login waits whole in the outage queue.
    acl(&redis, "q", "-@scripting").await;
    let login = login_queued(&app, &store, &cookie).await;
    // Meanwhile another instance makes the old id alice's.
    let (status, body, _) = send(&other, "POST", "/set-user/alice", Some(&cookie)).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(
        indexes(&redis).await.len(),
        1,
        "alice's index, with the old id"
    );
    acl(&redis, "q", "+@all").await;
    alice_alone_in_one_index(&app, &redis, &store, &login).await;
}

/// The same when the login's take reached Redis and its second step did
/// not (the new id refused, and the index updates with it): the old id is
/// gone from Redis by then, so the replay knows whose index holds it only
/// from the session the login read.
#[tokio::test]
async fn a_login_whose_second_step_failed_takes_the_old_id_out_of_the_previous_user_s_index() {
    let redis = TestRedis::start().await;
    let (app, _, store) = start_app(SessionLayer::builder(manager_as(&redis, "s", &[]).await));
    let (_, _, set_cookie) = send(&app, "POST", "/set-user/bob", None).await;
    let cookie = cookie_pair(&set_cookie.expect("session"));
    // The `SREM` from bob's index is no write that grows memory: refused
    // here by the ACL, as the rest of the second step is for memory.
    // This line carries the test: without it the refused pipeline's
    // `SREM` runs anyway and does the defence's work, and the test passes
    // with the defence broken (checked: it did).
    acl(&redis, "s", "-srem").await;
    let login = login_refused(&app, &redis, &cookie).await;
    acl(&redis, "s", "+srem").await;
    refuse_writes(&redis, false).await;
    alice_alone_in_one_index(&app, &redis, &store, &login).await;
}

/// Logs alice in from `cookie`'s session while Redis cannot take the old
/// id: the login waits whole in the outage queue. Returns its cookie.
async fn login_queued(app: &Router, store: &SessionStore, cookie: &str) -> String {
    let (status, _, login) = send(app, "POST", "/login/alice", Some(cookie)).await;
    assert_eq!(status, 200);
    assert!(
        store.local_usage().queued_changes > 0,
        "the login waits in the outage queue"
    );
    cookie_pair(&login.expect("the login's new id"))
}

/// Once the outage queue is written: `login` is alice's session, and the
/// one index left in Redis (alice's) names that session alone.
async fn alice_alone_in_one_index(
    app: &Router,
    redis: &TestRedis,
    store: &SessionStore,
    login: &str,
) {
    drained(store).await;
    assert_eq!(send(app, "GET", "/get/user", Some(login)).await.1, "alice");
    let indexes = indexes(redis).await;
    assert_eq!(indexes.len(), 1, "alice's index alone: {indexes:?}");
    assert_eq!(indexes[0].1.len(), 1, "one id in it: {indexes:?}");
    let live = session_keys(redis).await;
    assert_eq!(live.len(), 1, "the new id's session");
    assert!(
        live[0].contains(&indexes[0].1[0]),
        "the index names the live session: {indexes:?}, {live:?}"
    );
}

/// A user who logs in again and again (a script, a shared account) does
/// not grow the user's index with the ids of sessions that timed out: each
/// login checks a few members at random and removes the dead ones. 300
/// logins whose sessions then time out (deleted here), and 100 more: the
/// index holds the 100 live ones and few of the dead (400 without the
/// check), and no live one leaves it.
#[tokio::test]
async fn a_user_who_logs_in_again_and_again_does_not_grow_the_index() {
    let redis = TestRedis::start().await;
    let (app, _, _) = start_app(SessionLayer::builder(manager(&redis).await));
    for _ in 0..300 {
        send(&app, "POST", "/login/alice", None).await;
    }
    let mut conn = redis.connection().await.expect("connection");
    let dead = session_keys(&redis).await;
    assert_eq!(dead.len(), 300);
    for key in &dead {
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut conn)
            .await
            .expect("DEL");
    }
    for _ in 0..100 {
        send(&app, "POST", "/login/alice", None).await;
    }
    let live = session_keys(&redis).await;
    assert_eq!(live.len(), 100);
    let members = within("the index to shrink", async {
        loop {
            let index = indexes(&redis).await;
            let members = index.into_iter().next().expect("alice's index").1;
            if members.len() <= 150 {
                break members;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for key in &live {
        let handle = key.split(['{', '}']).nth(1).expect("a storage key");
        assert!(
            members.iter().any(|member| member == handle),
            "a live session left the index"
        );
    }
}

/// Every user index in Redis, with its members.
async fn indexes(redis: &TestRedis) -> Vec<(String, Vec<String>)> {
    let mut conn = redis.connection().await.expect("connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:u")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    let mut indexes = Vec::new();
    for key in keys {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("SMEMBERS");
        indexes.push((key, members));
    }
    indexes
}

/// With `Durability::Replicated`, "log out everywhere" waits for the
/// replicas after its writes; a `WAIT` that fails (refused here by an ACL;
/// on a Cluster, a primary that does not answer) is logged, and the
/// revocation goes on and ends every session. It used to stop at the
/// first failed `WAIT`, with the user's sessions still live.
#[tokio::test]
async fn a_revocation_whose_wait_for_the_replicas_fails_still_ends_the_sessions() {
    let redis = TestRedis::start().await;
    let (app, _, _) = start_app(SessionLayer::builder(manager(&redis).await));
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let (_, _, login) = send(&app, "POST", "/login/alice", None).await;
        cookies.push(cookie_pair(&login.expect("login cookie")));
    }
    let replicated = SessionLayer::builder(manager_as(&redis, "w", &["wait"]).await)
        .durability(Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_millis(50),
        })
        .build()
        .expect("valid session layer");
    let revoked = within("the revocation", replicated.store().revoke_user("alice"))
        .await
        .expect("a revocation whose WAIT fails");
    assert_eq!(revoked, 3);
    for cookie in &cookies {
        assert_eq!(send(&app, "GET", "/get/user", Some(cookie)).await.1, "none");
    }
}

/// "Log out everywhere" first records its time (a script); where Redis
/// refuses that (a Redis user without scripts here; out of memory alike,
/// where only deletes are allowed), the revocation still ends the user's
/// sessions and answers how many. It used to fail as a whole.
#[tokio::test]
async fn a_revocation_whose_time_cannot_be_recorded_still_ends_the_sessions() {
    let redis = TestRedis::start().await;
    let (app, _, cookie) = app_with_a_cart(&redis).await;
    let (_, _, login) = send(&app, "POST", "/login/alice", Some(&cookie)).await;
    let alice = cookie_pair(&login.expect("the login's new id"));
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&alice)).await.1,
        "alice"
    );
    let (_, _, scriptless) = start_app(SessionLayer::builder(
        manager_as(&redis, "no-scripts", &["@scripting"]).await,
    ));
    assert_eq!(scriptless.revoke_user("alice").await.expect("revoked"), 1);
    assert_eq!(send(&app, "GET", "/get/user", Some(&alice)).await.1, "none");
}

/// The guard above is for ids cycled away only: a session this request
/// destroyed, or one "log out everywhere" ended, has no successor, and a
/// write after it starts a new session with its cookie (it used to be
/// dropped, with no cookie, whenever this instance had seen the id end).
#[tokio::test]
async fn a_write_after_a_destroy_or_a_revocation_starts_a_new_session() {
    let redis = TestRedis::start().await;
    let (app, store, old) = app_with_a_cart(&redis).await;
    let (status, body, fresh) = send(&app, "POST", "/fresh/theme/dark", Some(&old)).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let fresh = cookie_pair(&fresh.expect("the new session's cookie"));
    assert_ne!(fresh, old);
    assert_eq!(
        send(&app, "GET", "/get/theme", Some(&fresh)).await.1,
        "dark"
    );
    assert_eq!(send(&app, "GET", "/get/cart", Some(&fresh)).await.1, "none");

    let (_, _, login) = send(&app, "POST", "/login/alice", Some(&fresh)).await;
    let alice = cookie_pair(&login.expect("login cookie"));
    assert_eq!(store.revoke_user("alice").await.expect("revoked"), 1);
    let (_, _, after) = send(&app, "POST", "/set/cart/4", Some(&alice)).await;
    let after = cookie_pair(&after.expect("a new session after the revocation"));
    assert_eq!(send(&app, "GET", "/get/cart", Some(&after)).await.1, "4");
    assert_eq!(send(&app, "GET", "/get/user", Some(&after)).await.1, "none");
}

/// A neighbour's large cookie (a sibling subdomain's, a page script's) on
/// the same `Cookie` line must not hide the session cookie.
#[tokio::test]
async fn a_large_neighbour_cookie_does_not_hide_the_session() {
    let redis = TestRedis::start().await;
    let (app, _, session) = app_with_a_cart(&redis).await;
    let big = "x".repeat(16 * 1024);
    for line in [
        format!("tracking={big}; {session}"),
        format!("{session}; tracking={big}"),
    ] {
        assert_eq!(send(&app, "GET", "/get/cart", Some(&line)).await.1, "3");
    }
}

/// During an outage a client creating sessions as fast as it can must not
/// evict the copy of another visitor's session whose changes still wait for
/// Redis: until they are written, that copy is the only place the session's
/// newest state can be read, and losing it logs the visitor out.
#[tokio::test]
async fn a_flood_of_new_sessions_during_an_outage_does_not_evict_a_session_with_changes_waiting() {
    const COPIES: u64 = 16 * 1024;
    let redis = TestRedis::start().await;
    let manager = manager(&redis).await;
    let (app, _, store) = start_app(
        SessionLayer::builder(manager.clone())
            .local_capacity_bytes(COPIES)
            .outage_queue_bytes(1 << 20)
            .max_session_bytes(4 * 1024),
    );
    let (_, _, victim) = send(&app, "POST", "/set/secret/before", None).await;
    let victim = cookie_pair(&victim.expect("victim session"));
    assert_eq!(
        send(&app, "GET", "/get/secret", Some(&victim)).await.1,
        "before"
    );

    redis.pause().await;
    send(&app, "POST", "/set/secret/during", Some(&victim)).await;
    // 300 sessions of about 600 bytes: far more than the copies' 16 KiB.
    for _ in 0..300 {
        let (status, body, _) = send(&app, "POST", "/fill/blob/400", None).await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        let usage = store.local_usage();
        assert!(usage.local_copies_bytes <= COPIES, "{usage:?}");
        assert!(usage.pinned_copies_bytes <= COPIES + (1 << 20), "{usage:?}");
    }
    assert_eq!(
        send(&app, "GET", "/get/secret", Some(&victim)).await.1,
        "during",
        "the victim's session, with its change waiting, was evicted"
    );

    redis.resume().await;
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    drained(&store).await;
    assert_eq!(
        send(&app, "GET", "/get/secret", Some(&victim)).await.1,
        "during"
    );
}

/// One visitor saving its session over and over during an outage must not
/// fill the outage queue for everyone: repeated saves of the same entries
/// take the room of one, so another visitor's new session still fits.
#[tokio::test]
async fn repeated_saves_of_one_session_during_an_outage_do_not_fill_the_queue() {
    const QUEUE: usize = 16 * 1024;
    let redis = TestRedis::start().await;
    let manager = manager(&redis).await;
    let (app, _, store) = start_app(
        SessionLayer::builder(manager.clone())
            .outage_queue_bytes(QUEUE)
            .max_session_bytes(1024),
    );
    let (_, _, flooder) = send(&app, "POST", "/set/k/0", None).await;
    let flooder = cookie_pair(&flooder.expect("session"));

    redis.pause().await;
    let mut last = String::new();
    for i in 0..500 {
        last = format!("{i:0100}");
        send(&app, "POST", &format!("/set/k/{last}"), Some(&flooder)).await;
        let usage = store.local_usage();
        assert!(usage.queued_bytes <= QUEUE, "{usage:?}");
    }
    let (_, body, victim) = send(&app, "POST", "/set/secret/v", None).await;
    assert_eq!(body, "ok");
    let victim = cookie_pair(&victim.expect("the queue still had room for a new session"));
    assert_eq!(store.local_usage().queued_changes, 2);

    redis.resume().await;
    wait_for_breaker(&manager, BreakerState::Closed, Duration::from_secs(15)).await;
    drained(&store).await;
    assert_eq!(send(&app, "GET", "/get/secret", Some(&victim)).await.1, "v");
    assert_eq!(send(&app, "GET", "/get/k", Some(&flooder)).await.1, last);
    let mut conn = redis.connection().await.expect("connection");
    let keys = session_keys(&redis).await;
    assert_eq!(keys.len(), 2, "both sessions are in Redis: {keys:?}");
    let _: () = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
}

/// A new session logged in as `user` on `app`: its cookie.
async fn logged_in(app: &Router, user: &str) -> String {
    let (_, _, set_cookie) = send(app, "POST", &format!("/login/{user}"), None).await;
    cookie_pair(&set_cookie.expect("a login sets the cookie"))
}

/// Waits (at most 10 s) until `done` holds of `store`'s in-process side,
/// or fails naming `what`.
async fn wait_for(what: &str, store: &SessionStore, done: impl Fn(u64) -> bool) {
    wait_within(Duration::from_secs(10), what, store, done).await;
}

/// [`wait_for`], at most `within`.
async fn wait_within(
    within: Duration,
    what: &str,
    store: &SessionStore,
    done: impl Fn(u64) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !done(store.local_usage().local_copies_bytes) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `instances` are subscribed to the session announcements.
async fn subscribed(redis: &TestRedis, manager: &RedisManager, instances: u64) {
    let channel = manager.keys().key(&["session-ended"]);
    within("the subscriptions", async {
        while redis.subscribers(&channel).await.expect("PUBSUB NUMSUB") < instances {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Two instances of the app on `redis`, A and B: A's app and store, B's
/// app, manager and store.
async fn two_instances(
    redis: &TestRedis,
) -> ((Router, SessionStore), (Router, RedisManager, SessionStore)) {
    two_instances_with(redis, manager(redis).await).await
}

/// [`two_instances`], B on `b_manager`.
async fn two_instances_with(
    redis: &TestRedis,
    b_manager: RedisManager,
) -> ((Router, SessionStore), (Router, RedisManager, SessionStore)) {
    let (a, _, a_store) = start_app(SessionLayer::builder(manager(redis).await));
    let (b, _, b_store) = start_app(SessionLayer::builder(b_manager.clone()));
    ((a, a_store), (b, b_manager, b_store))
}

/// A logs in "victim" and "live"; B reads both (its copies), subscribed.
/// Returns their cookies.
async fn b_holds_two_copies(
    redis: &TestRedis,
    a: &Router,
    b: &Router,
    b_manager: &RedisManager,
) -> (String, String) {
    let victim = logged_in(a, "victim").await;
    let live = logged_in(a, "live").await;
    assert_eq!(send(b, "GET", "/get/user", Some(&victim)).await.1, "victim");
    subscribed(redis, b_manager, 2).await;
    assert_eq!(send(b, "GET", "/get/user", Some(&live)).await.1, "live");
    (victim, live)
}

/// In an outage B serves the live session's copy and not the victim's,
/// whose session Redis no longer holds.
async fn in_an_outage_b_serves_only_the_live_one(
    redis: &TestRedis,
    b: &Router,
    b_manager: &RedisManager,
    (victim, live): (&str, &str),
) {
    outage(redis, b, b_manager).await;
    let (status, body, _) = send(b, "GET", "/get/user", Some(victim)).await;
    assert_eq!(status, 200);
    assert_eq!(body, "none", "B served a session Redis had ended");
    let (status, body, _) = send(b, "GET", "/get/user", Some(live)).await;
    assert_eq!(status, 200);
    assert_eq!(body, "live", "B logged a live session out");
    redis.resume().await;
}

/// With Redis refusing writes to `store`'s instance (Redis user `a`) and a
/// change naming alice in its outage queue: lets writes in again, but
/// holds the replay (no scripts for `a`, nor `SADD`: a retry of a queued
/// login whose script is refused still sends the index's `SADD`, which
/// would let the revocation find the login) until another instance has
/// logged alice out everywhere (which finds nothing), then lets it run to
/// its end.
async fn revoke_alice_while_the_replay_waits(redis: &TestRedis, store: &SessionStore) {
    acl(redis, "a", "-@scripting").await;
    acl(redis, "a", "-sadd").await;
    refuse_writes(redis, false).await;
    let (_, _, other) = start_app(SessionLayer::builder(manager(redis).await));
    assert_eq!(other.revoke_user("alice").await.expect("revoked"), 0);
    acl(redis, "a", "+@all").await;
    drained(store).await;
}

/// Creates the Redis user `name` (every key, channel and command but
/// `denied`) and connects a manager as it.
async fn manager_as(redis: &TestRedis, name: &str, denied: &[&str]) -> RedisManager {
    let mut conn = redis.connection().await.expect("connection");
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg(name)
        .arg("on")
        .arg(format!(">{name}-secret"));
    setuser.arg("~*").arg("&*").arg("+@all");
    for command in denied {
        setuser.arg(format!("-{command}"));
    }
    let _: () = setuser.query_async(&mut conn).await.expect("ACL SETUSER");
    let url = format!("redis://{name}:{name}-secret@127.0.0.1:{}", redis.port());
    RedisManager::connect(
        redis
            .config()
            .url(url)
            .failure_threshold(1)
            .build()
            .expect("config"),
    )
    .await
    .expect("manager")
}

/// How many `EXISTS` Redis refused (for want of an ACL permission here).
async fn exists_refused(redis: &TestRedis) -> u64 {
    let mut conn = redis.connection().await.expect("connection");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_exists:"))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|field| field.strip_prefix("rejected_calls="))
        })
        .map_or(0, |count| count.trim().parse().expect("a count"))
}

/// Applies one ACL `rule` to the Redis user `name`.
async fn acl(redis: &TestRedis, name: &str, rule: &str) {
    let mut conn = redis.connection().await.expect("connection");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(name)
        .arg(rule)
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
}

/// Deletes `user`'s session behind the layer's back (no announcement).
async fn delete_session_of(redis: &TestRedis, user: &str) {
    let mut conn = redis.connection().await.expect("connection");
    for key in session_keys(redis).await {
        let owner: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("_u")
            .query_async(&mut conn)
            .await
            .expect("HGET");
        if owner.as_deref() == Some(user) {
            let _: u64 = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("DEL");
            return;
        }
    }
    panic!("no session of {user}");
}

/// Closes every pub/sub connection: the instances subscribe again (and
/// miss what was announced meanwhile).
async fn kill_subscriptions(redis: &TestRedis) {
    redis
        .kill_clients("TYPE", "pubsub")
        .await
        .expect("CLIENT KILL");
}

/// Hangs Redis, and waits until `manager`'s breaker has opened (a new
/// session's write on `app` times out): from then on `app` serves sessions
/// from its in-process copies only (an open breaker drops the tracked ones).
async fn outage(redis: &TestRedis, app: &Router, manager: &RedisManager) {
    redis.pause().await;
    send(app, "POST", "/set/trigger/1", None).await;
    wait_for_breaker(manager, BreakerState::Open, Duration::from_secs(10)).await;
}

/// Instance B reads three sessions (and keeps its copies, to serve them
/// through an outage); on instance A one logs out, one logs in again (its
/// id is cycled away) and the third's user is logged out everywhere. In a
/// later outage B must serve none of them from its copies: the attacker
/// holding a stolen cookie the victim logged out would otherwise get the
/// victim's session back whenever Redis is down.
#[tokio::test]
async fn session_ended_on_another_instance_served_from_this_one_s_outage_copy() {
    let redis = TestRedis::start().await;
    let ((a, a_store), (b, b_manager, b_store)) = two_instances(&redis).await;
    let out = logged_in(&a, "out").await;
    let cycled = logged_in(&a, "cycled").await;
    let revoked = logged_in(&a, "revoked").await;
    // Both listen (B from its first read: its store starts the listener).
    assert_eq!(send(&b, "GET", "/get/user", Some(&out)).await.1, "out");
    subscribed(&redis, &b_manager, 2).await;
    for (cookie, user) in [(&out, "out"), (&cycled, "cycled"), (&revoked, "revoked")] {
        assert_eq!(send(&b, "GET", "/get/user", Some(cookie)).await.1, user);
    }
    let held = b_store.local_usage().local_copies_bytes;
    assert!(held > 0);

    assert_eq!(send(&a, "POST", "/logout", Some(&out)).await.1, "bye");
    assert_eq!(
        send(&a, "POST", "/login/again", Some(&cycled)).await.1,
        "welcome"
    );
    assert_eq!(a_store.revoke_user("revoked").await.expect("revoke"), 1);
    wait_for("B heard of the three ends", &b_store, |bytes| bytes == 0).await;

    outage(&redis, &b, &b_manager).await;
    for (cookie, user) in [(&out, "out"), (&cycled, "cycled"), (&revoked, "revoked")] {
        let (status, body, _) = send(&b, "GET", "/get/user", Some(cookie)).await;
        assert_eq!(status, 200);
        assert_eq!(
            body, "none",
            "B served {user}'s ended session during the outage"
        );
    }
    redis.resume().await;
    for cookie in [&out, &cycled, &revoked] {
        assert_eq!(send(&b, "GET", "/get/user", Some(cookie)).await.1, "none");
    }
}

/// The announcements are lost while an instance is not subscribed (its
/// subscription connection dropped): after a new subscription it checks
/// its copies against Redis and ends those whose session is gone. Here one
/// session ends unannounced (deleted behind the layer's back) while B's
/// subscription is cut: in the next outage B must not serve it, and must
/// still serve the other session, live, which it did not read again.
#[tokio::test]
async fn session_ended_while_this_instance_was_not_subscribed_served_from_its_copy() {
    let redis = TestRedis::start().await;
    let ((a, _), (b, b_manager, b_store)) = two_instances(&redis).await;
    let (victim, live) = b_holds_two_copies(&redis, &a, &b, &b_manager).await;
    assert_eq!(session_keys(&redis).await.len(), 2);
    let held = b_store.local_usage().local_copies_bytes;

    kill_subscriptions(&redis).await;
    delete_session_of(&redis, "victim").await;
    wait_for("B checked its copies", &b_store, |bytes| {
        bytes > 0 && bytes < held
    })
    .await;

    in_an_outage_b_serves_only_the_live_one(&redis, &b, &b_manager, (&victim, &live)).await;
}

/// A check of the copies that fails after a new subscription is made
/// again, with the copies kept meanwhile; once it passes, a session Redis
/// no longer holds is ended. Here B's Redis user may not run `EXISTS` for
/// a while, as when the Cluster node of some sessions is down until its
/// replica takes over: dropping every copy on the first failure logged
/// out, for the rest of that outage, sessions the check never reached.
#[tokio::test]
async fn a_failed_check_of_the_copies_keeps_them_and_checks_again() {
    let redis = TestRedis::start().await;
    let ((a, _), (b, b_manager, b_store)) =
        two_instances_with(&redis, manager_as(&redis, "checker", &[]).await).await;
    let (victim, live) = b_holds_two_copies(&redis, &a, &b, &b_manager).await;
    let held = b_store.local_usage().local_copies_bytes;
    assert!(held > 0);

    acl(&redis, "checker", "-exists").await;
    delete_session_of(&redis, "victim").await;
    kill_subscriptions(&redis).await;
    // Subscribed again: B's check runs now, fails (NOPERM), and is made
    // again: two copies, two refused `EXISTS` an attempt.
    subscribed(&redis, &b_manager, 2).await;
    within("the check made again", async {
        while exists_refused(&redis).await <= 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        b_store.local_usage().local_copies_bytes,
        held,
        "a failed check dropped the copies"
    );

    acl(&redis, "checker", "+exists").await;
    wait_for("B checked its copies again", &b_store, |bytes| {
        bytes > 0 && bytes < held
    })
    .await;
    in_an_outage_b_serves_only_the_live_one(&redis, &b, &b_manager, (&victim, &live)).await;
}

/// ... but not for long: a check of the copies still failing 10 s after
/// its first failure drops them all, unchecked (any of them could have
/// missed an end).
#[tokio::test]
async fn a_check_of_the_copies_that_keeps_failing_drops_them() {
    let redis = TestRedis::start().await;
    let ((a, _), (b, b_manager, b_store)) =
        two_instances_with(&redis, manager_as(&redis, "nocheck", &["exists"]).await).await;
    let live = logged_in(&a, "live").await;
    assert_eq!(send(&b, "GET", "/get/user", Some(&live)).await.1, "live");
    subscribed(&redis, &b_manager, 2).await;
    kill_subscriptions(&redis).await;
    subscribed(&redis, &b_manager, 2).await;
    assert!(b_store.local_usage().local_copies_bytes > 0);
    wait_within(
        Duration::from_secs(20),
        "the copies that could not be checked dropped",
        &b_store,
        |bytes| bytes == 0,
    )
    .await;
}

/// Announcing is best-effort: a Redis user without the channel's
/// permission (Redis 7's default for new users) still logs out, logs in
/// and logs out everywhere, with nothing left queued.
#[tokio::test]
async fn ends_work_for_a_redis_user_that_may_not_publish() {
    let redis = TestRedis::start().await;
    let mut conn = redis.connection().await.expect("connection");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("nopub")
        .arg("reset")
        .arg("on")
        .arg(">nopub-secret")
        .arg("~*")
        .arg("resetchannels")
        .arg("+@all")
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
    let url = format!("redis://nopub:nopub-secret@127.0.0.1:{}", redis.port());
    let manager = RedisManager::connect(
        redis
            .config()
            .url(url)
            .failure_threshold(1)
            .build()
            .expect("config"),
    )
    .await
    .expect("manager");
    let (app, _, store) = start_app(SessionLayer::builder(manager.clone()));
    let out = logged_in(&app, "out").await;
    assert_eq!(send(&app, "POST", "/logout", Some(&out)).await.1, "bye");
    let cycled = logged_in(&app, "cycled").await;
    let (_, body, again) = send(&app, "POST", "/login/again", Some(&cycled)).await;
    assert_eq!(body, "welcome");
    let again = cookie_pair(&again.expect("the new id"));
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&again)).await.1,
        "again"
    );
    logged_in(&app, "revoked").await;
    assert_eq!(store.revoke_user("revoked").await.expect("revoke"), 1);
    assert_eq!(send(&app, "GET", "/get/user", Some(&out)).await.1, "none");
    assert_eq!(
        send(&app, "GET", "/get/user", Some(&cycled)).await.1,
        "none"
    );
    assert_eq!(store.local_usage().queued_changes, 0);
    assert_eq!(
        session_keys(&redis).await.len(),
        1,
        "only the login's new id"
    );
}
