//! Zero-round-trip session reads kept exact by Redis client tracking: two
//! managers on one Redis are two instances of the app.

use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::{get, post};
use tower_redis_core::testing::{TestRedis, TestSentinel};
use tower_redis_core::{RedisConfig, RedisManager, Tracking, redis};
use tower_redis_session::{Expiry, Session, SessionLayer};

mod support;
use support::{cookie_pair, send, within};

fn routes() -> Router {
    Router::new()
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
        .route("/login/{user}", post(support::login))
}

/// One instance of the app: its manager, layer and router.
struct Instance {
    manager: RedisManager,
    layer: SessionLayer,
    app: Router,
}

impl Instance {
    async fn start(config: RedisConfig) -> Self {
        Self::with_expiry(config, Expiry::default()).await
    }

    async fn with_expiry(config: RedisConfig, expiry: Expiry) -> Self {
        let manager = RedisManager::connect(config).await.expect("manager starts");
        let layer = SessionLayer::builder(manager.clone())
            .expiry(expiry)
            .build()
            .expect("valid session layer");
        let app = routes().layer(layer.clone());
        let instance = Self {
            manager,
            layer,
            app,
        };
        instance.wait_live().await;
        instance
    }

    fn tracking(&self) -> Tracking {
        self.manager
            .tracking()
            .expect("tracking on a standalone server")
    }

    async fn wait_live(&self) {
        let tracking = self.tracking();
        within("the tracking connection to come up", async {
            while !tracking.is_live() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    async fn get(&self, cookie: &str, key: &str) -> String {
        send(&self.app, "GET", &format!("/get/{key}"), Some(cookie))
            .await
            .1
    }

    async fn set(&self, cookie: Option<&str>, key: &str, value: &str) -> Option<String> {
        let (status, _, set_cookie, _) =
            send(&self.app, "POST", &format!("/set/{key}/{value}"), cookie).await;
        assert_eq!(status, 200);
        set_cookie.map(|c| cookie_pair(&c))
    }

    fn tracked_bytes(&self) -> u64 {
        self.layer.store().local_usage().tracked_copies_bytes
    }

    /// Waits until tracking has dropped everything at least once since
    /// `flushes` was read.
    async fn wait_flush(&self, flushes: u64) {
        let tracking = self.tracking();
        within("the local copies to be dropped", async {
            while tracking.flushes() <= flushes {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
    }
}

/// A configuration for an instance that hears of invalidations 50 ms late
/// (`TestRedis::slow_tracking_config`).
async fn slow_config(redis: &TestRedis) -> RedisConfig {
    redis
        .slow_tracking_config(Duration::from_millis(50))
        .await
        .build()
        .expect("config")
}

async fn two_instances(redis: &TestRedis) -> (Instance, Instance) {
    let a = Instance::start(redis.config().build().expect("config")).await;
    let b = Instance::start(redis.config().build().expect("config")).await;
    (a, b)
}

#[tokio::test]
async fn an_unchanged_session_is_read_with_no_round_trip_and_a_change_elsewhere_is_seen() {
    let redis = TestRedis::start().await;
    let (a, b) = two_instances(&redis).await;
    let cookie = a.set(None, "k", "1").await.expect("new session");

    // B's first read goes to Redis (renewing the idle timeout)…
    let (body, sent) = redis.commands_during(b.get(&cookie, "k")).await;
    assert_eq!(body, "1");
    assert_eq!(sent, ["pexpire", "hgetall", "pttl"], "first read on B");
    // …the next ones cost nothing.
    let (bodies, sent) = redis
        .commands_during(async {
            let mut bodies = Vec::new();
            for _ in 0..5 {
                bodies.push(b.get(&cookie, "k").await);
            }
            bodies
        })
        .await;
    assert_eq!(bodies, ["1"; 5]);
    assert!(sent.is_empty(), "reads of an unchanged session: {sent:?}");
    assert!(b.tracked_bytes() > 0);

    // A changes it: B, once its tracking connection has caught up, reads
    // the new value from Redis.
    a.set(Some(&cookie), "k", "2").await;
    b.layer.store().sync().await.expect("sync");
    let (body, sent) = redis.commands_during(b.get(&cookie, "k")).await;
    assert_eq!(body, "2");
    assert_eq!(sent, ["hgetall", "pttl"], "a read after a change elsewhere");
}

#[tokio::test]
async fn after_a_write_is_acknowledged_and_a_sync_the_old_value_is_never_read() {
    let redis = TestRedis::start().await;
    let a = Instance::start(redis.config().build().expect("config")).await;
    // B hears of invalidations 50 ms late: only the sync stands between it
    // and the old value.
    let b = Instance::start(slow_config(&redis).await).await;
    let cookie = a.set(None, "k", "0").await.expect("new session");
    for i in 1..=20 {
        // B holds a copy of the previous value…
        assert_eq!(b.get(&cookie, "k").await, (i - 1).to_string());
        // …A's write is acknowledged, B syncs: never the old value.
        a.set(Some(&cookie), "k", &i.to_string()).await;
        b.layer.store().sync().await.expect("sync");
        assert_eq!(b.get(&cookie, "k").await, i.to_string(), "round {i}");
    }
}

/// An update through this instance runs on its tracking connection and
/// leaves its copy current: the next read here costs no round trip. The
/// script reads the key last, so Redis keeps tracking it for this
/// instance: another instance's later change is still heard of.
#[tokio::test]
async fn an_instance_s_own_update_keeps_its_copy_and_a_later_change_elsewhere_is_seen() {
    let redis = TestRedis::start().await;
    let (a, b) = two_instances(&redis).await;
    let cookie = a.set(None, "k", "0").await.expect("new session");
    assert_eq!(a.get(&cookie, "k").await, "0", "A's copy");
    for i in 1..=5 {
        // A's update: its script, no read after it…
        let (_, sent) = redis
            .commands_during(a.set(Some(&cookie), "k", &i.to_string()))
            .await;
        assert_eq!(sent, ["evalsha"], "an update of a tracked session");
        // …and A reads the update from its copy.
        let (body, sent) = redis.commands_during(a.get(&cookie, "k")).await;
        assert_eq!(body, i.to_string(), "round {i}");
        assert!(sent.is_empty(), "a read after an own update: {sent:?}");
        // B changes another entry (B's own copy kept current the same way);
        // A, once synced, reads it, with A's update still there.
        b.set(Some(&cookie), "other", &i.to_string()).await;
        a.layer.store().sync().await.expect("sync");
        assert_eq!(a.get(&cookie, "other").await, i.to_string(), "round {i}");
        assert_eq!(a.get(&cookie, "k").await, i.to_string(), "round {i}");
        assert_eq!(b.get(&cookie, "k").await, i.to_string(), "round {i}");
    }
}

/// Updates of one session that overlap on one instance each build on the
/// copy as it was before any of them: none may keep its result as the
/// copy, or the copy would lose the others' changes. The instance's
/// tracking connection answers 50 ms late, so all twenty are in flight at
/// once.
#[tokio::test]
async fn overlapping_updates_on_one_instance_lose_nothing_from_its_copy() {
    let redis = TestRedis::start().await;
    let a = Instance::start(slow_config(&redis).await).await;
    let cookie = a.set(None, "k", "0").await.expect("new session");
    assert_eq!(a.get(&cookie, "k").await, "0", "A's copy");
    let mut updates = tokio::task::JoinSet::new();
    for i in 0..20 {
        let app = a.app.clone();
        let cookie = cookie.clone();
        updates.spawn(async move {
            let (status, ..) = send(&app, "POST", &format!("/set/e{i}/{i}"), Some(&cookie)).await;
            assert_eq!(status, 200);
        });
    }
    within("the updates", async {
        while let Some(done) = updates.join_next().await {
            done.expect("update");
        }
    })
    .await;
    for i in 0..20 {
        assert_eq!(
            a.get(&cookie, &format!("e{i}")).await,
            i.to_string(),
            "e{i}"
        );
    }
}

/// Two session layers built on one manager share its tracking connection:
/// an update through one must reach the other's copy at once, since Redis
/// reports a connection's own writes to nobody on it.
#[tokio::test]
async fn an_update_through_one_layer_reaches_another_layer_on_the_same_manager() {
    let redis = TestRedis::start().await;
    let x = Instance::start(redis.config().build().expect("config")).await;
    let y_layer = SessionLayer::builder(x.manager.clone())
        .build()
        .expect("valid session layer");
    let y = routes().layer(y_layer);
    let y_get = |cookie: String| {
        let y = y.clone();
        async move { send(&y, "GET", "/get/k", Some(&cookie)).await.1 }
    };
    let cookie = x.set(None, "k", "0").await.expect("new session");
    assert_eq!(x.get(&cookie, "k").await, "0", "X's copy");
    assert_eq!(y_get(cookie.clone()).await, "0", "Y's copy");
    for i in 1..=3 {
        x.set(Some(&cookie), "k", &i.to_string()).await;
        assert_eq!(y_get(cookie.clone()).await, i.to_string(), "round {i}");
        assert_eq!(x.get(&cookie, "k").await, i.to_string(), "round {i}");
    }
}

/// In a session's last idle window (its absolute timeout nearer than the
/// idle one) a renewing read caps the key's TTL with a `PEXPIRE` sent
/// after the read. On the tracking connection that write takes the key out
/// of Redis' tracking table, so the answer must not be kept: another
/// instance's later change would go unheard.
#[tokio::test]
async fn a_read_that_caps_the_ttl_keeps_no_copy() {
    let redis = TestRedis::start().await;
    // Idle as long as absolute: every renewing read caps the TTL.
    let expiry = Expiry {
        idle: Duration::from_secs(3600),
        absolute: Duration::from_secs(3600),
        persistent: false,
    };
    let a = Instance::with_expiry(redis.config().build().expect("config"), expiry).await;
    let b = Instance::with_expiry(redis.config().build().expect("config"), expiry).await;
    let cookie = a.set(None, "k", "0").await.expect("new session");
    // A millisecond at least, so that the deadline is nearer than the idle
    // timeout.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (body, sent) = redis.commands_during(b.get(&cookie, "k")).await;
    assert_eq!(body, "0");
    assert_eq!(
        sent,
        ["pexpire", "hgetall", "pttl", "pexpire"],
        "a capped read"
    );
    a.set(Some(&cookie), "k", "1").await;
    b.layer.store().sync().await.expect("sync");
    assert_eq!(b.get(&cookie, "k").await, "1", "A's change, on B");
}

#[tokio::test]
async fn a_revoked_user_is_logged_out_on_every_instance() {
    let redis = TestRedis::start().await;
    // A hears of invalidations (its own included) 50 ms late: it must drop
    // its copies itself.
    let a = Instance::start(slow_config(&redis).await).await;
    let b = Instance::start(redis.config().build().expect("config")).await;
    let (_, _, set_cookie, _) = send(&a.app, "POST", "/login/ada", None).await;
    let cookie = cookie_pair(&set_cookie.expect("login cookie"));
    assert_eq!(b.get(&cookie, "user").await, "ada");
    assert_eq!(b.get(&cookie, "user").await, "ada", "from B's copy");
    assert_eq!(a.get(&cookie, "user").await, "ada");
    assert_eq!(a.get(&cookie, "user").await, "ada", "from A's copy");

    assert_eq!(a.layer.store().revoke_user("ada").await.expect("revoke"), 1);
    b.layer.store().sync().await.expect("sync");
    assert_eq!(b.get(&cookie, "user").await, "none");
    // And on A itself, at once (no wait for Redis' invalidation).
    assert_eq!(a.get(&cookie, "user").await, "none");
}

/// `MONITOR` lines of the `PEXPIRE`s Lua ran inside a script.
fn script_renewals(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|line| line.contains(" lua] ") && line.to_ascii_lowercase().contains("\"pexpire\""))
        .count()
}

/// A change of a tracked session soon after this instance renewed its
/// idle timeout leaves the key's TTL as it is (the script sends no
/// `PEXPIRE`): a session changed on every request costs Redis no renewal
/// between two due ones. That holds too after a read that renewed nothing
/// (another instance had changed the session): the tracked copy that read
/// leaves knows of this instance's renewal from its in-process copy. A
/// change whose renewal fell due after its request's load renews in the
/// script (`a_change_renews_in_its_script_when_a_renewal_fell_due_after_the_load`
/// in the crate's store tests).
#[tokio::test]
async fn a_change_renews_the_idle_timeout_only_when_a_renewal_is_due() {
    let redis = TestRedis::start().await;
    // The default idle timeout (30 min): a renewal is due every 18 s.
    let (a, b) = two_instances(&redis).await;
    let cookie = a.set(None, "k", "0").await.expect("new session");
    let [key] = support::session_keys(&redis)
        .await
        .try_into()
        .expect("one session");
    // The first read renews, and leaves a tracked copy that knows it.
    assert_eq!(a.get(&cookie, "k").await, "0");
    for i in 1..=3 {
        assert_eq!(
            change_renewals(&redis, &a, &cookie, &key, &i.to_string()).await,
            0,
            "change {i}"
        );
    }

    // B changes the session: A's copy is dropped. A's next read finds its
    // own renewal recent (its in-process copy says so) and renews nothing;
    // the tracked copy it keeps knows of that renewal, so A's change does
    // not renew either. (It did before: that copy knew of no renewal.)
    b.set(Some(&cookie), "other", "1").await;
    a.layer.store().sync().await.expect("sync");
    let (body, sent) = redis.commands_during(a.get(&cookie, "other")).await;
    assert_eq!(body, "1", "B's change, on A");
    assert_eq!(sent, ["hgetall", "pttl"], "a read that renews nothing");
    assert_eq!(
        change_renewals(&redis, &a, &cookie, &key, "4").await,
        0,
        "the change after that read"
    );
}

/// Sets `k` to `value` in the session of `cookie` through `instance`, after
/// 20 ms (time for the TTL to fall below the full idle timeout): how many
/// `PEXPIRE`s the script ran. Checks that the change was one `EVALSHA`,
/// that the TTL grew exactly when it renewed, and that the instance reads
/// the change back.
async fn change_renewals(
    redis: &TestRedis,
    instance: &Instance,
    cookie: &str,
    key: &str,
    value: &str,
) -> usize {
    let pttl = || async { redis.pttl(key).await.expect("PTTL") };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = pttl().await;
    let monitor = redis.monitor().await;
    instance.set(Some(cookie), "k", value).await;
    let lines = monitor.stop_lines().await.expect("MONITOR");
    let after = pttl().await;
    let sent: Vec<_> = lines
        .iter()
        .filter(|line| !line.contains(" lua] ") && line.contains("EVALSHA"))
        .collect();
    assert_eq!(sent.len(), 1, "the change alone: {lines:?}");
    let renewals = script_renewals(&lines);
    if renewals == 0 {
        assert!(
            after <= before,
            "TTL {before} ms before, {after} ms after: renewed"
        );
    } else {
        assert!(after > before, "TTL {before} ms before, {after} ms after");
    }
    assert_eq!(instance.get(cookie, "k").await, value, "from the copy");
    renewals
}

#[tokio::test]
async fn an_instance_reads_its_own_change_back_at_once() {
    let redis = TestRedis::start().await;
    // The instance hears of invalidations (its own writes' included) 50 ms
    // late: it must drop its copy itself when its write is acknowledged.
    let a = Instance::start(slow_config(&redis).await).await;
    let cookie = a.set(None, "k", "0").await.expect("new session");
    for i in 1..=5 {
        assert_eq!(a.get(&cookie, "k").await, (i - 1).to_string());
        assert_eq!(a.get(&cookie, "k").await, (i - 1).to_string(), "copy");
        a.set(Some(&cookie), "k", &i.to_string()).await;
        assert_eq!(a.get(&cookie, "k").await, i.to_string(), "round {i}");
    }
}

#[tokio::test]
async fn a_killed_tracking_connection_drops_the_copies_at_once() {
    let redis = TestRedis::start().await;
    let (a, b) = two_instances(&redis).await;
    let cookie = a.set(None, "k", "1").await.expect("new session");
    assert_eq!(b.get(&cookie, "k").await, "1");
    assert!(b.tracked_bytes() > 0);

    // Every client with tracking on (flag `t`): both instances' tracking
    // connections.
    let mut conn = redis.connection().await.expect("connection");
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .expect("CLIENT LIST");
    let tracking_ids: Vec<String> = clients
        .lines()
        .filter(|line| {
            line.split(' ')
                .any(|f| f.strip_prefix("flags=").is_some_and(|f| f.contains('t')))
        })
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    assert_eq!(tracking_ids.len(), 2, "{clients}");
    let flushes = b.tracking().flushes();
    for id in &tracking_ids {
        redis.kill_clients("ID", id).await.expect("CLIENT KILL");
    }
    b.wait_flush(flushes).await;
    assert_eq!(b.tracked_bytes(), 0, "copies dropped with the connection");
    // The next read goes to Redis (through the new connection or the pool).
    let (body, sent) = redis.commands_during(b.get(&cookie, "k")).await;
    assert_eq!(body, "1");
    assert!(sent.contains(&"hgetall".to_owned()), "{sent:?}");
}

#[tokio::test]
async fn flushall_drops_the_copies() {
    let redis = TestRedis::start().await;
    let (a, b) = two_instances(&redis).await;
    let cookie = a.set(None, "k", "1").await.expect("new session");
    assert_eq!(b.get(&cookie, "k").await, "1");
    assert_eq!(b.get(&cookie, "k").await, "1");

    redis.flush_all().await.expect("FLUSHALL");
    b.layer.store().sync().await.expect("sync");
    assert_eq!(b.tracked_bytes(), 0);
    assert_eq!(b.get(&cookie, "k").await, "none", "the session is gone");
}

#[tokio::test]
async fn a_sentinel_failover_drops_the_copies() {
    let sentinel = TestSentinel::start().await;
    let config = || {
        sentinel
            .config()
            .command_timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    };
    let a = Instance::start(config()).await;
    let b = Instance::start(config()).await;
    let cookie = a.set(None, "k", "1").await.expect("new session");
    assert_eq!(b.get(&cookie, "k").await, "1");
    assert!(b.tracked_bytes() > 0);

    let flushes = b.tracking().flushes();
    sentinel.force_failover().await;
    b.wait_flush(flushes).await;
    assert_eq!(b.tracked_bytes(), 0, "copies dropped at the failover");
    // Tracking follows the new primary.
    b.wait_live().await;
}
