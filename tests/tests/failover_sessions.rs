//! Sessions and replication: `Durability::Replicated` sends `WAIT` after
//! the writes of a login, a logout and a "log out everywhere" (and only
//! those), a confirmed login
//! survives the primary's death, and what the `WAIT` costs (printed); on a
//! Redis Cluster, the `WAIT` reaches the primary that holds the session.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_core::testing::{Monitor, TestCluster, TestSentinel, wait_for_breaker};
use tower_redis_core::{BreakerState, RedisManager, redis};
use tower_redis_session::{Durability, Session, SessionLayer, SessionStore};

/// Generous: startup and a failover on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

const REPLICATED: Durability = Durability::Replicated {
    replicas: 1,
    timeout: Duration::from_millis(100),
};

fn app(manager: &RedisManager, durability: Durability) -> (Router, SessionStore) {
    async fn login(session: Session) -> &'static str {
        session.cycle_id().await;
        session.set_user("alice").await;
        "welcome"
    }
    async fn me(session: Session) -> String {
        session.user().await.unwrap_or_default()
    }
    async fn visit(session: Session) -> String {
        let visits: u32 = session.get("visits").await.ok().flatten().unwrap_or(0) + 1;
        match session.insert("visits", visits).await {
            Ok(()) => visits.to_string(),
            Err(error) => error.to_string(),
        }
    }
    async fn logout(session: Session) -> StatusCode {
        session.destroy().await;
        StatusCode::NO_CONTENT
    }
    let sessions = SessionLayer::builder(manager.clone())
        .durability(durability)
        .build()
        .expect("valid session layer");
    let store = sessions.store().clone();
    let app = Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/visit", post(visit))
        .route("/logout", post(logout))
        .layer(sessions);
    (app, store)
}

/// Sends `method uri` with `cookie` (`name=value`, or "" for none); returns
/// the status, the body and the `name=value` of a `Set-Cookie`, if any.
async fn call(app: &Router, method: &str, uri: &str, cookie: &str) -> (StatusCode, String, String) {
    let mut request = Request::builder().method(method).uri(uri);
    if !cookie.is_empty() {
        request = request.header("cookie", cookie);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let set_cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        set_cookie,
    )
}

async fn manager(sentinel: &TestSentinel) -> RedisManager {
    let config = sentinel.config().build().expect("valid config");
    let manager = RedisManager::connect(config).await.expect("connects");
    wait_for_breaker(&manager, BreakerState::Closed, DEADLINE).await;
    manager
}

/// The commands the primary receives while `work` runs.
async fn commands_on_primary<F: Future>(
    sentinel: &TestSentinel,
    work: F,
) -> (F::Output, Vec<String>) {
    let primary = sentinel.node_client(sentinel.primary_port().await);
    let monitor = Monitor::start(&primary).await.expect("MONITOR");
    let output = work.await;
    (output, monitor.commands().await)
}

fn waits(commands: &[String]) -> usize {
    commands.iter().filter(|c| c.as_str() == "wait").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_logins_and_logouts_wait_for_the_replica_and_survive_a_failover() {
    let sentinel = TestSentinel::start().await;
    let manager = manager(&sentinel).await;
    let (replicated, replicated_store) = app(&manager, REPLICATED);
    let (primary_only, primary_store) = app(&manager, Durability::Primary);

    // An ordinary write (a new session) does not wait.
    let ((status, visits, cookie), commands) =
        commands_on_primary(&sentinel, call(&replicated, "POST", "/visit", "")).await;
    assert_eq!((status, visits.as_str()), (StatusCode::OK, "1"));
    assert!(!cookie.is_empty(), "the visit starts a session");
    assert_eq!(
        waits(&commands),
        0,
        "no WAIT after an ordinary write: {commands:?}"
    );
    // A login on that session (its id cycled, the user set) waits for the
    // replica, once.
    let ((status, _, cookie), commands) =
        commands_on_primary(&sentinel, call(&replicated, "POST", "/login", &cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!cookie.is_empty(), "the login sets a new cookie");
    assert_eq!(
        waits(&commands),
        1,
        "one WAIT after the id cycle of a login: {commands:?}"
    );
    // A login that starts a session (a save that sets the user) waits too.
    let ((_, _, fresh), commands) =
        commands_on_primary(&sentinel, call(&replicated, "POST", "/login", "")).await;
    assert_eq!(
        waits(&commands),
        1,
        "one WAIT after a fresh login: {commands:?}"
    );
    call(&replicated, "POST", "/logout", &fresh).await;
    // A logout waits.
    let ((status, _, _), commands) =
        commands_on_primary(&sentinel, call(&replicated, "POST", "/logout", &cookie)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        waits(&commands),
        1,
        "one WAIT after the logout: {commands:?}"
    );
    // "Log out everywhere" waits after recording its time (a failover that
    // lost it would let a login queued in an outage survive) and after
    // each pass's deletes: here one pass ends alice's two sessions.
    call(&replicated, "POST", "/login", "").await;
    call(&replicated, "POST", "/login", "").await;
    let (revoked, commands) =
        commands_on_primary(&sentinel, replicated_store.revoke_user("alice")).await;
    assert_eq!(revoked.expect("revoked"), 2);
    assert_eq!(
        waits(&commands),
        2,
        "a WAIT after the mark and after the deletes: {commands:?}"
    );
    call(&replicated, "POST", "/login", "").await;
    let (revoked, commands) =
        commands_on_primary(&sentinel, primary_store.revoke_user("alice")).await;
    assert_eq!(revoked.expect("revoked"), 1);
    assert_eq!(waits(&commands), 0, "no WAIT by default: {commands:?}");
    // The default: never.
    let ((_, _, other), commands) =
        commands_on_primary(&sentinel, call(&primary_only, "POST", "/login", "")).await;
    assert_eq!(waits(&commands), 0, "no WAIT by default: {commands:?}");
    let ((_, _, _), commands) =
        commands_on_primary(&sentinel, call(&primary_only, "POST", "/logout", &other)).await;
    assert_eq!(waits(&commands), 0, "no WAIT by default: {commands:?}");

    // The cost of the WAIT, measured (printed, not asserted): logins and
    // logouts in turn, with and without it.
    let mut timings = Vec::new();
    for (name, app) in [("primary", &primary_only), ("replicated", &replicated)] {
        let rounds = 50u32;
        let started = Instant::now();
        for _ in 0..rounds {
            let (_, _, cookie) = call(app, "POST", "/login", "").await;
            call(app, "POST", "/logout", &cookie).await;
        }
        let each = started.elapsed() / (2 * rounds);
        timings.push((name, each));
    }
    println!(
        "session durability: mean login/logout request {:?} with Durability::Primary, {:?} with \
         Durability::Replicated (ratio {:.2}; one more round trip, WAIT 1 100)",
        timings[0].1,
        timings[1].1,
        timings[1].1.as_secs_f64() / timings[0].1.as_secs_f64()
    );

    // A confirmed login survives the primary's death at once after it.
    let (_, _, cookie) = call(&replicated, "POST", "/login", "").await;
    let old = sentinel.kill_primary().await;
    sentinel.wait_for_promotion(old).await;
    let started = Instant::now();
    loop {
        let (status, user, _) = call(&replicated, "GET", "/me", &cookie).await;
        if status == StatusCode::OK && user == "alice" && manager.is_available() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the login confirmed by the replica is not on the new primary: {status} {user:?}, {:?}",
            manager.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Read from the new primary itself, not from an in-process copy.
    let new = sentinel.primary_port().await;
    let mut conn = sentinel
        .node_client(new)
        .get_multiplexed_async_connection()
        .await
        .expect("new primary answers");
    let sessions: Vec<String> = redis::cmd("KEYS")
        .arg("*:s")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert_eq!(
        sessions.len(),
        1,
        "the logged-in session is on the new primary: {sessions:?}"
    );
}

/// On a Redis Cluster, a confirmed login's `WAIT` reaches the primary that
/// holds the session (redis-rs sends `WAIT` to every primary and answers
/// with the smallest count), after the session's write there: the login
/// then waits for that primary's replica, not another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_login_on_a_cluster_waits_on_the_primary_that_holds_its_session() {
    let cluster = TestCluster::with_replicas(1).await;
    let config = cluster.config().build().expect("valid config");
    let manager = RedisManager::connect(config).await.expect("connects");
    wait_for_breaker(&manager, BreakerState::Closed, DEADLINE).await;
    let (replicated, _) = app(&manager, REPLICATED);
    // Warm-up: the cluster client knows the slots before MONITOR starts.
    let (_, _, cookie) = call(&replicated, "POST", "/login", "").await;
    call(&replicated, "POST", "/logout", &cookie).await;

    let replicas = cluster.replicas().await;
    let urls = cluster.urls();
    let primaries: Vec<usize> = (0..cluster.len())
        .filter(|index| !replicas.contains(index))
        .collect();
    assert_eq!(primaries.len(), 3, "three primaries: {replicas:?}");
    let mut monitors = Vec::new();
    for &index in &primaries {
        let client = redis::Client::open(urls[index].as_str()).expect("node URL");
        monitors.push(Monitor::start(&client).await.expect("MONITOR"));
    }
    let (status, user, cookie) = call(&replicated, "POST", "/login", "").await;
    assert_eq!((status, user.as_str()), (StatusCode::OK, "welcome"));
    assert!(!cookie.is_empty(), "the login sets a cookie");
    // Per primary, the commands clients sent (not those scripts ran), with
    // their arguments.
    let mut sent = Vec::new();
    for monitor in monitors {
        let lines = monitor.stop_lines().await.expect("MONITOR lines");
        let commands: Vec<String> = lines
            .into_iter()
            .filter_map(|line| {
                let (client, command) = line.split_once("] ")?;
                (!client.ends_with(" lua")).then(|| command.to_owned())
            })
            .collect();
        sent.push(commands);
    }
    let writes_session =
        |command: &String| command.starts_with("\"EVALSHA\"") && command.contains(":s\"");
    let holders: Vec<&Vec<String>> = sent
        .iter()
        .filter(|commands| commands.iter().any(writes_session))
        .collect();
    assert_eq!(holders.len(), 1, "one primary holds the session: {sent:?}");
    let commands = holders[0];
    let written = commands
        .iter()
        .position(writes_session)
        .expect("the session's write");
    assert!(
        commands[written..]
            .iter()
            .any(|command| command.starts_with("\"WAIT\" \"1\"")),
        "no WAIT after the session's write on its primary: {commands:?}"
    );
}
