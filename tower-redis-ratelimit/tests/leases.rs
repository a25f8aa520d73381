//! Leased quotas (`Policy::lease`) against real Redis, with two limiter
//! instances (two layers over two managers): the limits and the documented
//! bound hold, a hot key costs Redis about one call per lease, unused units
//! given back reach the other instance, and an outage falls back as
//! without a lease.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::redis;
use tower_redis_core::testing::TestRedis;
use tower_redis_ratelimit::{Fallback, Key, Policy, RateLimitLayer};

use support::{
    Svc, app, away_from_window_edge, decided_locally, key_type, manager, patient_manager,
    replace_with_a_hash, the_key,
};

const HOUR: Duration = Duration::from_secs(3600);

fn request(peer: &str) -> Request<()> {
    let mut request = Request::get("/").body(()).expect("request");
    let ip: IpAddr = peer.parse().expect("ip");
    request.extensions_mut().insert(SocketAddr::new(ip, 40_000));
    request
}

async fn send(
    service: &Svc,
    request: Request<()>,
) -> Response<tower_redis_ratelimit::ResponseBody<Empty<Bytes>>> {
    service.clone().oneshot(request).await.expect("infallible")
}

fn field<B>(response: &Response<B>) -> String {
    response
        .headers()
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Two instances of `policy`, each a layer over its own manager (patient:
/// the subject is exactness while Redis answers).
async fn two_instances(redis: &TestRedis, policy: &Policy) -> (RateLimitLayer, RateLimitLayer) {
    let layer = async || {
        RateLimitLayer::builder(patient_manager(redis).await)
            .policy(policy.clone())
            .build()
            .expect("layer")
    };
    (layer().await, layer().await)
}

/// 64 tasks over the two instances send `total` requests; returns how many
/// were admitted. An answer decided without Redis fails the test.
async fn admitted(a: &RateLimitLayer, b: &RateLimitLayer, total: usize) -> usize {
    let (a, b) = (app(a.clone()), app(b.clone()));
    let admitted = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..64 {
        let service = if task % 2 == 0 { a.clone() } else { b.clone() };
        let (admitted, next) = (Arc::clone(&admitted), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let response = send(&service, request("198.51.100.7")).await;
                assert!(
                    !decided_locally(&response),
                    "decided without Redis while Redis was up"
                );
                match response.status() {
                    StatusCode::OK => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    StatusCode::TOO_MANY_REQUESTS => {}
                    other => panic!("unexpected status {other}"),
                }
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the requests finish")
            .expect("task");
    }
    admitted.load(Ordering::Relaxed)
}

/// Fixed window: units are counted when leased and void when the window
/// ends, so two leasing instances never admit more than the limit; what
/// they admit less is at most what they still hold (2 × the lease).
#[tokio::test]
async fn two_leasing_instances_never_admit_more_than_a_fixed_window_limit() {
    let redis = TestRedis::start().await;
    away_from_window_edge(&redis, HOUR).await;
    let policy = Policy::fixed_window("global", 1000, HOUR)
        .key(Key::global())
        .lease(50);
    let (a, b) = two_instances(&redis, &policy).await;
    let monitor = redis.monitor().await;
    let admitted = admitted(&a, &b, 3000).await;
    assert!(
        (900..=1000).contains(&admitted),
        "admitted {admitted} of a limit of 1000 (at most 2 × 50 parked)"
    );
    // About 20 leases, then each instance asks again at most every 100 ms
    // once the limit is reached: requests waiting for a refill that was
    // denied do not each ask Redis.
    let commands = monitor.commands().await;
    assert!(
        commands.len() <= 60,
        "{} commands for 3000 requests",
        commands.len()
    );
}

/// GCRA: a leased unit may be spent after it was counted, so the
/// documented bound is the GCRA's own plus instances × lease.
#[tokio::test]
async fn two_leasing_instances_stay_within_the_gcra_bound_plus_instances_times_the_lease() {
    let redis = TestRedis::start().await;
    let policy = Policy::gcra("global", 1000, HOUR)
        .key(Key::global())
        .lease(50);
    let (a, b) = two_instances(&redis, &policy).await;
    let started = Instant::now();
    let admitted = admitted(&a, &b, 3000).await;
    // One more unit per 3.6 s of the run.
    let refilled = (started.elapsed().as_secs_f64() / 3.6).ceil() as usize;
    assert!(
        admitted <= 1000 + refilled + 2 * 50,
        "admitted {admitted}: over the burst + {refilled} + 2 × 50"
    );
    assert!(
        admitted >= 900,
        "admitted {admitted}: more than 2 × 50 parked"
    );
}

/// The point of a lease: a hot global key costs Redis one call per lease,
/// not one per request.
#[tokio::test]
async fn a_hot_global_key_costs_at_most_a_hundredth_of_a_redis_command_per_request() {
    let redis = TestRedis::start().await;
    let policy = Policy::gcra("global", 1_000_000_000, HOUR)
        .key(Key::global())
        .lease(1000);
    let (a, b) = two_instances(&redis, &policy).await;
    // Loads the script.
    send(&app(a.clone()), request("198.51.100.1")).await;
    let monitor = redis.monitor().await;
    const REQUESTS: usize = 20_000;
    assert_eq!(admitted(&a, &b, REQUESTS).await, REQUESTS);
    let commands = monitor.commands().await;
    assert!(
        commands.len() * 100 <= REQUESTS,
        "{} commands for {REQUESTS} requests: {commands:?}",
        commands.len()
    );
    assert!(commands.iter().all(|c| c == "evalsha"), "{commands:?}");
}

/// Sends `B`'s request until it is admitted, at most until `deadline`.
async fn admitted_before(service: &Svc, deadline: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if send(service, request("198.51.100.2")).await.status() == StatusCode::OK {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A takes the whole limit as its lease and spends one unit: B is denied
/// (for longer than B's own recheck interval), until A gives the rest back.
async fn a_holds_everything(redis: &TestRedis) -> (RateLimitLayer, Svc) {
    away_from_window_edge(redis, HOUR).await;
    let policy = Policy::fixed_window("global", 10, HOUR)
        .key(Key::global())
        .lease(10);
    let (a, b) = two_instances(redis, &policy).await;
    assert_eq!(
        send(&app(a.clone()), request("198.51.100.1"))
            .await
            .status(),
        200
    );
    let b = app(b);
    let denied = send(&b, request("198.51.100.2")).await;
    assert_eq!(denied.status(), 429);
    assert!(
        field(&denied).starts_with("\"global\";r=0;"),
        "{}",
        field(&denied)
    );
    // Held: B's denial is asked again every 100 ms, and stays a denial.
    assert_eq!(admitted_before(&b, Duration::from_millis(150)).await, None);
    (a, b)
}

/// A key of another type where a leased counter belongs (a hash) is an
/// empty counter to the lease script, as to the decision script: the lease
/// is taken from Redis and the key becomes a counter, instead of every take
/// failing and the policy falling back to the in-process limiter.
#[tokio::test]
async fn a_leased_counter_of_another_type_counts_as_empty() {
    let redis = TestRedis::start().await;
    away_from_window_edge(&redis, HOUR).await;
    for policy in [
        Policy::fixed_window("global", 10, HOUR)
            .key(Key::global())
            .lease(5),
        Policy::gcra("global", 10, HOUR).key(Key::global()).lease(5),
    ] {
        let mut conn = redis.connection().await.expect("connection");
        let () = redis::cmd("FLUSHALL")
            .query_async(&mut conn)
            .await
            .expect("FLUSHALL");
        // Made once, to learn its key; then replaced by a hash.
        let (made, _) = two_instances(&redis, &policy).await;
        assert_eq!(
            send(&app(made), request("198.51.100.1")).await.status(),
            200
        );
        let key = the_key(&mut conn, ":rl:global:").await;
        replace_with_a_hash(&mut conn, &key).await;
        let (fresh, _) = two_instances(&redis, &policy).await;
        let response = send(&app(fresh), request("198.51.100.1")).await;
        assert_eq!(response.status(), 200);
        assert!(!decided_locally(&response), "{}", field(&response));
        assert_eq!(key_type(&mut conn, &key).await, "string", "{key}");
    }
}

#[tokio::test]
async fn unused_units_given_back_reach_the_other_instance() {
    let redis = TestRedis::start().await;
    let (a, b) = a_holds_everything(&redis).await;
    a.return_leases().await;
    // Well before A's lease would go back by itself (1 s after A's last
    // request, which was more than 150 ms ago: not before 0.8 s from now).
    let waited = admitted_before(&b, Duration::from_millis(600)).await;
    assert!(waited.is_some(), "B did not get the units A gave back");
    // The other 8 are B's now; the 10th was A's.
    let mut more = 0;
    for _ in 0..20 {
        if send(&b, request("198.51.100.2")).await.status() == StatusCode::OK {
            more += 1;
        }
    }
    assert_eq!(more, 8);
}

#[tokio::test]
async fn an_idle_lease_goes_back_by_itself() {
    let redis = TestRedis::start().await;
    let (_a, b) = a_holds_everything(&redis).await;
    // A is idle from now on: its lease goes back after 1 s (the sweep runs
    // every 250 ms), and B asks again within 100 ms.
    let waited = admitted_before(&b, Duration::from_secs(10)).await;
    let waited = waited.expect("A's idle lease never came back");
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
}

/// A layer whose `global` policy (1000 an hour, fixed window) leases 10
/// units at a time, with `more` after it, once its first request (from
/// 192.0.2.1) was admitted: 9 units are left here, 990 on Redis.
async fn after_a_first_leased_request(redis: &TestRedis, more: Option<Policy>) -> Svc {
    away_from_window_edge(redis, HOUR).await;
    let mut builder = RateLimitLayer::builder(manager(redis).await).policy(
        Policy::fixed_window("global", 1000, HOUR)
            .key(Key::global())
            .lease(10),
    );
    if let Some(policy) = more {
        builder = builder.policy(policy);
    }
    let service = app(builder.build().expect("layer"));
    let first = send(&service, request("192.0.2.1")).await;
    assert_eq!(first.status(), 200);
    assert!(
        field(&first).starts_with("\"global\";r=999;"),
        "{}",
        field(&first)
    );
    service
}

/// A request that another policy denies spends nothing from the lease
/// (all or nothing, as without a lease).
#[tokio::test]
async fn a_request_denied_by_another_policy_spends_nothing_from_the_lease() {
    let redis = TestRedis::start().await;
    let service = after_a_first_leased_request(&redis, Some(Policy::gcra("per-ip", 1, HOUR))).await;
    for _ in 0..3 {
        assert_eq!(send(&service, request("192.0.2.1")).await.status(), 429);
    }
    let other = send(&service, request("192.0.2.2")).await;
    assert_eq!(other.status(), 200);
    assert!(
        field(&other).starts_with("\"global\";r=998;"),
        "the denied requests were charged: {}",
        field(&other)
    );
}

/// With every policy leased (and the layer's own keys), a request whose
/// lease holds its units is decided when the service is called, with no
/// future of its own: a response future dropped before it is polled has
/// spent its unit, as a request that reached the layer. A request that
/// must take a lease first is decided in its future, as before.
#[tokio::test]
async fn a_leased_request_is_decided_when_the_service_is_called() {
    use tower::Service as _;
    let redis = TestRedis::start().await;
    let service = after_a_first_leased_request(&redis, None).await;
    let mut called = service.clone();
    called.ready().await.expect("ready");
    drop(called.call(request("192.0.2.1")));
    let third = send(&service, request("192.0.2.1")).await;
    assert_eq!(third.status(), 200);
    assert!(
        field(&third).starts_with("\"global\";r=997;"),
        "the unpolled request was not decided: {}",
        field(&third)
    );
}

/// The service behind the layer in the tests below: counts its clones,
/// its calls and its drops, and answers 200.
#[derive(Default)]
struct Counted {
    clones: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    drops: Arc<AtomicUsize>,
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Self {
            clones: Arc::clone(&self.clones),
            calls: Arc::clone(&self.calls),
            drops: Arc::clone(&self.drops),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

impl tower::Service<Request<()>> for Counted {
    type Response = Response<Empty<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(Empty::new())))
    }
}

/// A layer whose one policy, `global`, admits `limit` requests an hour
/// and leases them all at once.
async fn leasing_all(redis: &TestRedis, limit: u32) -> RateLimitLayer {
    leasing(redis, manager(redis).await, limit, limit).await
}

/// A layer whose one policy, `global`, admits `limit` requests an hour
/// and leases `lease` units at a time, over `manager`.
async fn leasing(
    redis: &TestRedis,
    manager: RedisManager,
    limit: u32,
    lease: u32,
) -> RateLimitLayer {
    away_from_window_edge(redis, HOUR).await;
    RateLimitLayer::builder(manager)
        .policy(
            Policy::fixed_window("global", limit, HOUR)
                .key(Key::global())
                .lease(lease),
        )
        .build()
        .expect("layer")
}

/// Sends, through `service`, requests that Redis denies (the key is then
/// known blocked for `LEASE_RECHECK`, 100 ms) each followed at once by
/// one more, until that one is called within 50 ms of the denial: it is
/// then denied at once, from the blocked-key cache (a machine that stalls
/// longer sends it to Redis; it is tried again, at most 20 times). `check`
/// runs right after that request's `call` returned, before its future is
/// polled; its answer is returned.
async fn denied_at_once<S>(
    service: &mut S,
    mut check: impl FnMut(&mut S),
) -> Response<tower_redis_ratelimit::ResponseBody<Empty<Bytes>>>
where
    S: tower::Service<
            Request<()>,
            Response = Response<tower_redis_ratelimit::ResponseBody<Empty<Bytes>>>,
            Error = std::convert::Infallible,
        >,
{
    use tower::ServiceExt as _;
    for _ in 0..20 {
        service.ready().await.expect("ready");
        let by_redis = service.call(request("192.0.2.1")).await.expect("answer");
        assert_eq!(by_redis.status(), 429);
        let denied_at = Instant::now();
        service.ready().await.expect("ready");
        if denied_at.elapsed() >= Duration::from_millis(50) {
            continue;
        }
        let answer = service.call(request("192.0.2.1"));
        check(service);
        return answer.await.expect("answer");
    }
    panic!("20 times, more than 50 ms passed between a denial and the next request");
}

/// A request decided at once (its lease holds its units) calls the
/// service it wraps in place, when it is called: no clone of that
/// service, and its answer carries the decision's fields. A denial decided
/// at once (a key known blocked) answers without calling it, and lets go
/// of it when it is called (a denial from Redis lets go of it when its
/// future ends). A request that must take a lease first clones it, as
/// every request did before.
#[tokio::test]
async fn a_request_decided_at_once_calls_the_wrapped_service_in_place_without_a_clone() {
    use tower::{Layer as _, Service as _};
    let redis = TestRedis::start().await;
    let layer = leasing_all(&redis, 3).await;
    let inner = Counted::default();
    let (clones, calls, drops) = (
        Arc::clone(&inner.clones),
        Arc::clone(&inner.calls),
        Arc::clone(&inner.drops),
    );
    let mut service = layer.layer(inner);
    // The first request takes the lease (3 units: all the window holds).
    service.ready().await.expect("ready");
    let first = service.call(request("192.0.2.1")).await.expect("answer");
    assert_eq!(first.status(), 200);
    assert_eq!(clones.load(Ordering::SeqCst), 1, "the leasing request");
    for left in [1, 0] {
        service.ready().await.expect("ready");
        let answer = service.call(request("192.0.2.1"));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3 - left,
            "not called when the layer was"
        );
        let answer = answer.await.expect("answer");
        assert_eq!(answer.status(), 200);
        assert!(
            field(&answer).starts_with(&format!("\"global\";r={left};")),
            "{}",
            field(&answer)
        );
    }
    assert_eq!(
        clones.load(Ordering::SeqCst),
        1,
        "a request decided at once cloned the service"
    );
    // The window is spent: a request asks Redis, is denied, and the next
    // one is denied at once.
    let denied = denied_at_once(&mut service, |_| {
        // Alive: the original and its clones, less those dropped.
        assert_eq!(
            1 + clones.load(Ordering::SeqCst) - drops.load(Ordering::SeqCst),
            1,
            "a denial decided at once kept a service besides the layer's own"
        );
    })
    .await;
    assert_eq!(denied.status(), 429);
    assert!(
        field(&denied).starts_with("\"global\";r=0;"),
        "{}",
        field(&denied)
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "a denied request reached the service"
    );
}

/// The units a fixed-window counter has counted in its window (the
/// counter is three little-endian doubles: window, count, previous count).
async fn counted(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> f64 {
    let value: Vec<u8> = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET");
    let count: [u8; 8] = value
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .expect("a window counter");
    f64::from_le_bytes(count)
}

/// Waits (at most 10 s) until `key` has counted `units`, then until the
/// task that asked for them has their reply: a `PING` through the layer's
/// `manager` (the same connection, whose replies come in order) is
/// answered after it. The test's runtime runs one thread, so the task then
/// runs (keeps the units) before the test goes on.
async fn until_counted(
    conn: &mut redis::aio::MultiplexedConnection,
    manager: &RedisManager,
    key: &str,
    units: f64,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = counted(conn, key).await;
        if now == units {
            let pong: String = manager
                .run(|mut conn| async move { redis::cmd("PING").query_async(&mut conn).await })
                .await
                .expect("PING");
            assert_eq!(pong, "PONG");
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the counter stayed at {now} units, not {units}: no refill ahead"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A request that leaves a lease at a quarter of its size takes the next
/// units ahead, in a task of its own: as many as bring what the instance
/// holds back to the lease's size (never more). The requests after it are
/// all decided at once (no clone of the wrapped service, which a request
/// waiting on Redis makes), from the lease's own units and then from those
/// taken ahead, and every one is told exactly what is left.
#[tokio::test]
async fn a_lease_is_refilled_ahead_so_no_request_waits_for_redis() {
    use tower::{Layer as _, Service as _};
    let redis = TestRedis::start().await;
    let on = manager(&redis).await;
    let layer = leasing(&redis, on.clone(), 10_000, 100).await;
    let inner = Counted::default();
    let clones = Arc::clone(&inner.clones);
    let mut service = layer.layer(inner);
    let mut conn = redis.connection().await.expect("connection");
    let mut key = None;
    for n in 1..=200u32 {
        service.ready().await.expect("ready");
        let answer = service.call(request("192.0.2.1")).await.expect("answer");
        assert_eq!(answer.status(), 200, "request {n}");
        assert!(
            field(&answer).starts_with(&format!("\"global\";r={};", 10_000 - n)),
            "request {n}: {}",
            field(&answer)
        );
        let key = match &key {
            Some(key) => key,
            None => key.insert(the_key(&mut conn, ":rl:global:").await),
        };
        // The first request takes 100 units; the 75th leaves 25 and takes
        // 75 ahead; the 150th leaves 25 of those and takes 75 more.
        match n {
            1..=74 => assert_eq!(counted(&mut conn, key).await, 100.0, "request {n}"),
            75 => until_counted(&mut conn, &on, key, 175.0).await,
            150 => until_counted(&mut conn, &on, key, 250.0).await,
            _ => {}
        }
    }
    assert_eq!(
        clones.load(Ordering::SeqCst),
        1,
        "only the first request waited for Redis"
    );
}

/// `return_leases` gives back the units of a refill ahead still under way
/// too: it waits for it, then gives back both lots. Nothing stays counted.
#[tokio::test]
async fn returning_the_leases_waits_for_a_refill_ahead_under_way() {
    let redis = TestRedis::start().await;
    let layer = leasing(&redis, manager(&redis).await, 10_000, 100).await;
    let service = app(layer.clone());
    // The 75th request leaves 25 units and starts a refill ahead.
    for _ in 0..75 {
        assert_eq!(send(&service, request("192.0.2.1")).await.status(), 200);
    }
    // Its call goes out.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    layer.return_leases().await;
    let mut conn = redis.connection().await.expect("connection");
    let key = the_key(&mut conn, ":rl:global:").await;
    assert_eq!(
        counted(&mut conn, &key).await,
        75.0,
        "units still counted beyond the 75 spent"
    );
}

/// A denial decided at once (its key known blocked) does not call the
/// wrapped service, and lets go of it: what its `poll_ready` reserved (a
/// permit of `ConcurrencyLimit`, shared by the service's clones) is
/// released when the layer is called, as a denial from Redis releases it
/// when its future ends. A client that keeps its service while it waits
/// out `Retry-After` holds nothing the other clones need.
#[tokio::test]
async fn a_denial_decided_at_once_releases_what_the_wrapped_service_reserved() {
    use futures_util::FutureExt as _;
    use tower::{Layer as _, Service as _, ServiceExt as _};
    let redis = TestRedis::start().await;
    let layer = leasing_all(&redis, 1).await;
    let inner = tower::limit::ConcurrencyLimit::new(
        tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
        }),
        1,
    );
    let mut a = layer.layer(inner);
    let mut b = a.clone();
    a.ready().await.expect("ready");
    let admitted = a.call(request("192.0.2.1")).await.expect("answer");
    assert_eq!(admitted.status(), 200, "the lease's one unit");
    let denied = denied_at_once(&mut a, |_| {
        assert!(
            b.ready().now_or_never().is_some(),
            "the other clone is not ready: the denied request kept the permit"
        );
    })
    .await;
    assert_eq!(denied.status(), 429);
}

/// Redis goes away: the units already leased are spent (Redis counted
/// them), then the local fallback decides with its share, exactly as for
/// a policy without a lease.
#[tokio::test]
async fn while_redis_is_down_the_leased_policy_falls_back_as_without_a_lease() {
    let redis = TestRedis::start().await;
    away_from_window_edge(&redis, HOUR).await;
    let layer = RateLimitLayer::builder(manager(&redis).await)
        .policy(
            Policy::fixed_window("global", 10, HOUR)
                .key(Key::global())
                .lease(4),
        )
        .fallback(Fallback::Local { share: 0.5 })
        .build()
        .expect("layer");
    let service = app(layer);
    let first = send(&service, request("192.0.2.1")).await;
    assert_eq!(first.status(), 200);
    assert!(!decided_locally(&first));

    redis.kill().await;
    let mut answers = Vec::new();
    for _ in 0..10 {
        let response = send(&service, request("192.0.2.1")).await;
        answers.push((response.status().as_u16(), decided_locally(&response)));
    }
    let expected: Vec<(u16, bool)> = [(200, false); 3]
        .into_iter()
        .chain([(200, true); 5])
        .chain([(429, true); 2])
        .collect();
    assert_eq!(
        answers, expected,
        "3 leased units, then half of the limit locally, then denied locally"
    );
}

/// Redis stops answering (paused) while a lease is spent: the refill ahead
/// that the lease's last quarter starts times out, and the requests that
/// found the lease empty meanwhile, waiting for it, take the fallback when
/// it fails. None of them refills in turn, which would make the others
/// wait for a second command timeout, and a third, until the breaker
/// opened. The same holds for the requests that wait for a refill of an
/// empty lease that times out: no request waits for Redis longer than one
/// command timeout.
#[tokio::test]
async fn while_redis_hangs_no_leased_request_waits_longer_than_one_command_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let redis = TestRedis::start().await;
    // A breaker that stays closed: each failure would be one more wait.
    let manager = RedisManager::connect(
        redis
            .config()
            .command_timeout(TIMEOUT)
            .failure_threshold(50)
            .build()
            .expect("valid"),
    )
    .await
    .expect("starts");
    let service = app(leasing(&redis, manager, 10_000, 4).await);
    let first = send(&service, request("192.0.2.1")).await;
    assert!(first.status() == 200 && !decided_locally(&first));
    redis.pause().await;
    // 3 units left: the second of these leaves one (a quarter of the
    // lease) and starts a refill ahead, which hangs; the third spends it.
    for n in 2..=4 {
        let answer = send(&service, request("192.0.2.1")).await;
        assert!(
            answer.status() == 200 && !decided_locally(&answer),
            "request {n}: {answer:?}"
        );
    }
    // Four requests at once, twice: they wait for the refill ahead; then
    // one of them refills the empty lease and the others wait for it.
    for round in ["a refill ahead", "a refill"] {
        let started = Instant::now();
        let waiting: Vec<_> = (0..4)
            .map(|_| {
                let service = service.clone();
                tokio::spawn(async move {
                    let answer = send(&service, request("192.0.2.1")).await;
                    (answer.status(), decided_locally(&answer), started.elapsed())
                })
            })
            .collect();
        let mut waits = Vec::new();
        for task in waiting {
            let answered = tokio::time::timeout(Duration::from_secs(30), task).await;
            waits.push(answered.expect("every request is answered").expect("task"));
        }
        for (status, local, waited) in &waits {
            assert!(
                *status == 200 && *local,
                "{round}: not the fallback: {waits:?}"
            );
            assert!(
                *waited < TIMEOUT * 3 / 2,
                "{round}: a request waited {waited:?}, more than one command timeout \
                 ({TIMEOUT:?}): {waits:?}"
            );
        }
    }
    redis.resume().await;
}
